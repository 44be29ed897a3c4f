"""Run directories: one run, one folder, with a manifest written first and outputs written atomically.

A run folder holds ``manifest.json`` (config, command, git commit, package versions, seed, model and data
provenance, outputs with their sha256), tidy tables (Parquet plus a CSV twin when small), tensors
(safetensors) and JSONL files. Every write goes to a temporary file in the same folder and is renamed into
place, so an interrupted job never leaves a half-written file behind.
"""

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_CSV_TWIN_MAX_ROWS = 10_000
_VERSIONED_PACKAGES = ("catlens", "torch", "transformer-lens", "transformers", "numpy", "scikit-learn")


# ----------------------------------------------------------------------------------------------- atomic I/O
@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on POSIX).

    Works for files and folders alike: the caller writes whatever it wants at the yielded path.
    On an exception the temporary is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        os.replace(target, path) if not (path.is_dir() and target.is_dir()) else _replace_dir(target, path)
    finally:
        _rmtree(tmp)


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    _rmtree(old)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value") and hasattr(obj, "name"):  # Enum
        return obj.value
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


# ----------------------------------------------------------------------------------------- reproducibility
def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch``. Only entry points (scripts, the CLI) call this."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_process(threads: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Set the process-wide state once, in an entry point (the CLI, an analysis or bench script), never in library
    code: torch's CPU threads (``threads``, else ``$OMP_NUM_THREADS``, else torch's default) and, with ``seed``,
    the global seeds (:func:`seed_everything`). Two jobs sharing a 2-core machine should each run with
    ``threads=1`` (``bench/bench_concurrency.py``). Returns the settings for a manifest."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        try:
            threads = int(os.environ["OMP_NUM_THREADS"])
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']!r} is not a whole number; unset it "
                             f"or set e.g. OMP_NUM_THREADS=1.") from None
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: give a whole number >= 1 (e.g. --threads 1).")
        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            threadpool_limits(limits=threads)  # numpy / scikit-learn BLAS pools, for the rest of the process
    if seed is not None:
        seed_everything(seed)
    return {"threads": torch.get_num_threads(), "seed": seed}


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or ``None`` when it is not installed.

    >>> package_version("no-such-distribution-catlens") is None
    True
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions(packages: Iterable[str] = _VERSIONED_PACKAGES) -> dict[str, str | None]:
    """``{"python": ..., package: version or None, ...}``: the one place catlens records package versions."""
    return {"python": platform.python_version(), **{name: package_version(name) for name in packages}}


def git_state(start: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the repository holding catlens (or ``start``); ``None`` outside git."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if dirty:
        log.warning("the catlens git tree has uncommitted changes; the manifest records git_dirty=true")
    return {"git_commit": commit, "git_dirty": dirty}


def check_resume_config(path: str | os.PathLike[str], config: Mapping[str, Any], *,
                        ignore: Sequence[str] = ()) -> None:
    """Refuse to resume the run folder ``path`` with another configuration: every key of ``config`` (except
    ``ignore``) must equal the saved manifest's. Nothing to check when the folder has no manifest yet.

    >>> import tempfile, json, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "manifest.json").write_text(json.dumps({"config": {"a": 1}}))
    >>> check_resume_config(d, {"a": 2})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: cannot resume ... with another configuration: a (saved 1, now 2). Use the saved options, --overwrite to start afresh, or another --out.
    """
    manifest = Path(path) / "manifest.json"
    if not manifest.exists():
        return
    saved = (json.loads(manifest.read_text()).get("config") or {})
    if not isinstance(saved, Mapping):
        return
    diff = [f"{k} (saved {saved.get(k)!r}, now {config.get(k)!r})"
            for k in sorted(set(saved) | set(config)) if k not in ignore and saved.get(k) != config.get(k)]
    if diff:
        raise ValueError(f"cannot resume {str(path)!r} with another configuration: {'; '.join(diff)}. Use the saved "
                         f"options, --overwrite to start afresh, or another --out.")


# --------------------------------------------------------------------------------------------------- RunDir
class RunDir:
    """A run folder with a manifest. Create with :meth:`create`; reopen an existing run with :meth:`open`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], config: Any = None, *, overwrite: bool = False,
               resume: bool = False, seed: int | None = None) -> "RunDir":
        """Make a run folder and write its manifest before any work starts.

        A non-empty folder is refused unless ``overwrite`` (start afresh, old files removed) or ``resume``
        (keep what is there; the manifest records the resumption) is given.
        """
        path = Path(path)
        if overwrite and resume:
            raise ValueError("overwrite=True and resume=True exclude each other: choose one.")
        if path.exists() and any(path.iterdir()):
            if overwrite:
                _rmtree(path)
            elif not resume:
                raise FileExistsError(
                    f"run folder {str(path)!r} is not empty. Pass --overwrite to replace it, --resume to "
                    f"continue it, or choose another --out.")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        previous = run.manifest if (path / "manifest.json").exists() else {}
        manifest = {
            "config": config,
            "command": sys.argv,
            "created": previous.get("created") or _now(),
            "resumed": ([*previous.get("resumed", []), _now()] if previous else []),
            "seed": seed,
            "versions": package_versions(),
            **git_state(),
            "models": previous.get("models", {}),
            "data": previous.get("data", {}),
            "outputs": previous.get("outputs", {}),
            "status": "running",
        }
        write_json_atomic(path / "manifest.json", manifest)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "RunDir":
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(f"{str(path)!r} is not a catlens run folder (no manifest.json).")
        return cls(path)

    # manifest -----------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "manifest.json").read_text())

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest
        for key, value in fields.items():
            if isinstance(value, Mapping) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        write_json_atomic(self.path / "manifest.json", json.loads(json.dumps(manifest, default=_json_default)))

    def record_model(self, model: Any, role: str = "model") -> None:
        """Record a model's provenance (anything with a ``provenance`` dict) under ``models[role]``."""
        self.update_manifest(models={role: getattr(model, "provenance", model)})

    def record_data(self, name: str, provenance: Mapping[str, Any]) -> None:
        self.update_manifest(data={name: dict(provenance)})

    def finish(self, **summary: Any) -> None:
        self.update_manifest(status="done", finished=_now(), **({"summary": summary} if summary else {}))

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the wall seconds of a phase of the run under ``timings[phase]`` in the manifest (a phase entered
        twice adds up), and log them."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            before = self.manifest.get("timings", {}).get(phase, 0.0)
            self.update_manifest(timings={phase: round(before + seconds, 2)})
            log.info("%s: %.1f s", phase, seconds)

    def _register(self, file: Path, **extra: Any) -> None:
        rel = str(file.relative_to(self.path))
        self.update_manifest(outputs={rel: {"sha256": sha256_file(file), "bytes": file.stat().st_size, **extra}})

    # outputs ------------------------------------------------------------------------------------------
    def save_table(self, name: str, table: Any) -> Path:
        """Save a tidy pandas table as ``name.parquet`` (and ``name.csv`` when it has few rows)."""
        target = self.path / f"{name}.parquet"
        with atomic_path(target) as tmp:
            table.to_parquet(tmp, index=False)
        self._register(target, rows=len(table))
        if len(table) <= _CSV_TWIN_MAX_ROWS:
            with atomic_path(self.path / f"{name}.csv") as tmp:
                table.to_csv(tmp, index=False)
        return target

    def load_table(self, name: str) -> Any:
        return load_table(self.path / name)

    def save_json(self, name: str, obj: Any) -> Path:
        target = self.path / f"{name}.json"
        write_json_atomic(target, obj)
        self._register(target)
        return target

    def append_jsonl(self, name: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Append rows to ``name.jsonl``; each call's rows land whole (write to temp, then append + fsync)."""
        target = self.path / f"{name}.jsonl"
        text = "".join(json.dumps(dict(r), default=_json_default) + "\n" for r in rows)
        with open(target, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return target

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        target = self.path / f"{name}.jsonl"
        if not target.exists():
            return []
        rows = []
        for line in target.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash: drop it
                log.warning("dropping a torn line in %s", target)
        return rows


def load_table(path: str | os.PathLike[str]) -> Any:
    """Load ``path`` (with or without the ``.parquet`` suffix) as a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    if path.suffix != ".parquet":
        path = path.with_name(path.name + ".parquet")
    if not path.exists():
        raise FileNotFoundError(f"no table at {str(path)!r}; run the analysis that writes it first.")
    return pd.read_parquet(path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
