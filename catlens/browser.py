"""Headless Chromium through Playwright, driving the system browser (e.g. Debian's ``/usr/bin/chromium``; nothing is
downloaded): the report's and the explorer's screenshots and the browser tests share it.

    >>> from catlens.browser import chromium_executable
    >>> chromium_executable("/opt/chrome/chrome")
    '/opt/chrome/chrome'
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def chromium_executable(executable: str | None = None) -> str:
    """The Chromium to drive: ``executable`` when given, else ``$CATLENS_CHROMIUM``, else ``chromium`` on the PATH,
    else ``/usr/bin/chromium``. The path is not checked (:func:`headless_chromium` does)."""
    return executable or os.environ.get("CATLENS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@contextmanager
def headless_chromium(executable: str | None = None) -> Iterator[Any]:
    """A Playwright ``Browser``: headless Chromium launched from :func:`chromium_executable` (``executable``), closed
    on exit. Needs playwright (the dev extra); a missing browser is a ``FileNotFoundError`` saying how to install
    one."""
    from playwright.sync_api import sync_playwright

    exe = chromium_executable(executable)
    if not Path(exe).exists():
        raise FileNotFoundError(f"no Chromium at {exe!r}; install Debian's with `apt-get install -y chromium` or "
                                f"set CATLENS_CHROMIUM.")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def page_errors(page: Any) -> list[str]:
    """A list that collects the page's console errors and uncaught exceptions from now on (empty while clean)."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def browser_unavailable(executable: str | None = None) -> str | None:
    """``None`` when playwright imports and the Chromium of :func:`chromium_executable` exists; else the one-line
    reason (the browser tests' skip reason)."""
    exe = chromium_executable(executable)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        have_playwright = False
    else:
        have_playwright = True
    if have_playwright and Path(exe).exists():
        return None
    return f"needs playwright (the dev extra) and Chromium at {exe} (apt-get install -y chromium)"
