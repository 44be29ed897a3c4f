"""Loading the scripts of ``analyses/`` (and ``figures/``) as modules, the way the tests that drive them need: one
fresh module per call (a test's monkeypatching of one copy never leaks into another). The loader is the main
job's own, ``analyses/main.py:load_script``; only ``main.py`` itself is bootstrapped here."""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_main() -> ModuleType:
    """``analyses/main.py``: the main job's page (its stages, ``STAGE_SCRIPTS``, ``main``, ``cli`` and
    ``load_script``), as a fresh module."""
    spec = importlib.util.spec_from_file_location("_test_analyses_main", REPO / "analyses" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main.py defines no dataclasses: it needs no sys.modules entry
    return module


def load_script(stem: str, folder: str = "analyses", name: str | None = None) -> ModuleType:
    """``<repo>/<folder>/<stem>.py`` as a fresh module named ``name`` (default ``_test_<folder>_<stem>``)."""
    if (folder, stem) == ("analyses", "main"):
        return load_main()
    return load_main().load_script(REPO / folder / f"{stem}.py", name=name or f"_test_{folder}_{stem}")
