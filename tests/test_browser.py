"""catlens.browser: which Chromium is driven, the error and skip reason without one, and a real headless page whose
console errors are collected (skipped, with the reason, without playwright or Chromium)."""

import pytest

from catlens.browser import browser_unavailable, chromium_executable, headless_chromium, page_errors

_NO_BROWSER = browser_unavailable()


def test_chromium_executable_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CATLENS_CHROMIUM", "/from/env")
    assert chromium_executable("/given") == "/given"
    assert chromium_executable() == "/from/env"
    monkeypatch.delenv("CATLENS_CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on the PATH: the Debian path
    assert chromium_executable() == "/usr/bin/chromium"
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert chromium_executable() == str(fake)


def test_missing_chromium_is_named(tmp_path):
    missing = str(tmp_path / "no-chromium")
    reason = browser_unavailable(missing)
    assert reason is not None and missing in reason and "apt-get install -y chromium" in reason
    pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    with pytest.raises(FileNotFoundError, match=r"no Chromium at '.*no-chromium'.*CATLENS_CHROMIUM"):
        with headless_chromium(missing):
            pass


@pytest.mark.browser
@pytest.mark.skipif(_NO_BROWSER is not None, reason=_NO_BROWSER or "")
def test_headless_page_collects_console_errors(tmp_path):
    page_path = tmp_path / "p.html"
    page_path.write_text("<html><body><p id='x'>hi</p><script>console.error('boom'); undefinedName();"
                         "</script></body></html>")
    with headless_chromium() as browser:
        page = browser.new_page()
        errors = page_errors(page)
        page.goto(page_path.resolve().as_uri())
        page.wait_for_load_state("load")
        assert page.inner_text("#x") == "hi"
        assert browser.is_connected()
    assert not browser.is_connected()  # closed on exit
    assert errors[0] == "boom" and "undefinedName" in errors[1] and len(errors) == 2
