"""Error messages for bad input: what was given, what is allowed, how to fix it."""

import difflib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def unknown_name_message(kind: str, value: object, allowed: Iterable[str], fix: str = "") -> str:
    """``Unknown {kind} 'x'. Did you mean: y? Allowed: a, b, c.`` plus an optional fix sentence.

    >>> unknown_name_message("site", "resid_pots", ["resid_post", "attn_out"])
    "Unknown site 'resid_pots'. Did you mean: resid_post? Allowed: attn_out, resid_post."
    """
    allowed = sorted({str(a) for a in allowed})
    close = difflib.get_close_matches(str(value), allowed, n=3, cutoff=0.6)
    msg = f"Unknown {kind} {value!r}."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    shown = ", ".join(allowed[:40]) + (f", ... ({len(allowed)} total)" if len(allowed) > 40 else "")
    msg += f" Allowed: {shown}."
    return f"{msg} {fix}".rstrip()


class FileFormatError(ValueError):
    """A file that cannot be read as what it should be; the message names the file, what is wrong and the fix."""


class ConfigError(ValueError):
    """A bad config key, value or file; the message names it, says what is allowed and how to fix it."""


class StoreError(ValueError):
    """A store on disk is damaged, inconsistent or from an incompatible version (the message names the file)."""


class LeakageError(ValueError):
    """A test prompt also appears (exactly or nearly) in the training set. ``pairs`` lists them (a DataFrame)."""

    def __init__(self, message: str, pairs: Any) -> None:
        super().__init__(message)
        self.pairs = pairs


class NonFiniteLossError(ValueError):
    """A training loss (the fine-tune's or the low-rank map's) became NaN or infinite; the message names the step."""


class GenerationCancelled(RuntimeError):
    """Raised by :func:`catlens.generation.generate` when its ``should_stop`` callback returns True (the explorer's
    cancel flag)."""


class Cancelled(Exception):
    """An explorer job was cancelled by a newer request (raised inside the explorer's worker only)."""


@contextmanager
def reading(path: str | os.PathLike[str], what: str = "file", fix: str = "") -> Iterator[None]:
    """Turn the raw errors of reading and parsing ``path`` (JSON, CSV, text decoding) into a
    :class:`FileFormatError` that names the file, says what is wrong and how to fix it.

    >>> import json
    >>> with reading("data/x.json", "dataset file", "Restore it."):
    ...     json.loads('{"a": ')
    Traceback (most recent call last):
    ...
    catlens.errors.FileFormatError: dataset file 'data/x.json' is not valid JSON: Expecting value at line 1, column 7; the file is truncated or corrupt. Restore it.
    """
    where = f"{what} {str(path)!r}"
    try:
        yield
    except FileFormatError:
        raise
    except json.JSONDecodeError as e:
        if not e.doc.strip():
            raise FileFormatError(f"{where} is empty. {fix}".rstrip()) from None
        raise FileFormatError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; the file "
                              f"is truncated or corrupt. {fix}".rstrip()) from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{where} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); it is "
                              f"binary, corrupt or in another encoding. Save it as UTF-8. {fix}".rstrip()) from None
    except Exception as e:
        kind = type(e).__name__
        if type(e).__module__.startswith("pandas") and kind == "EmptyDataError":
            raise FileFormatError(f"{where} is empty (no header row). {fix}".rstrip()) from None
        if type(e).__module__.startswith("pandas") and kind == "ParserError":
            raise FileFormatError(f"{where} is not valid CSV ({' '.join(str(e).split())}); check its quoting and "
                                  f"column count. {fix}".rstrip()) from None
        raise


def check_writable_folder(path: str | os.PathLike[str], what: str, fix: str = "") -> None:
    """:func:`check_folder_target`, and the folder (or, when it does not exist yet, the nearest existing folder
    above it) must be writable: a ``PermissionError`` naming both otherwise, before any work starts."""
    check_folder_target(path, what, fix)
    p = Path(path).expanduser().absolute()
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == p else f"would be created in {str(existing)!r}, which is"
        raise PermissionError(f"{what} {str(path)!r} {where} not writable by this user; choose a folder you can "
                              f"write to. {fix}".rstrip())


def check_folder_target(path: str | os.PathLike[str], what: str, fix: str = "") -> None:
    """Raise ``NotADirectoryError`` when ``path`` (a folder to be used or created) is a file or lies under one.

    >>> check_folder_target("/dev/null/x", "--out")
    Traceback (most recent call last):
    ...
    NotADirectoryError: --out '/dev/null/x' lies under '/dev/null', which is a file, not a folder.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is a file, not a folder. {fix}".rstrip())
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {str(path)!r} lies under {str(parent)!r}, which is a file, not a "
                                         f"folder. {fix}".rstrip())
            break
