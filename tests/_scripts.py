"""Loading the scripts of ``analyses/`` (and ``figures/``) as modules, the way the tests that drive them need: one
fresh module per call (a test's monkeypatching of one copy never leaks into another), registered in ``sys.modules``
under ``name`` while it executes (dataclasses look their module up while the class is made)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(stem: str, folder: str = "analyses", name: str | None = None) -> ModuleType:
    """``<repo>/<folder>/<stem>.py`` as a fresh module named ``name`` (default ``_test_<folder>_<stem>``)."""
    path = REPO / folder / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(name or f"_test_{folder}_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def load_main() -> ModuleType:
    """``analyses/main.py``: the main job's page (its stages, ``STAGE_SCRIPTS``, ``main`` and ``cli``)."""
    return load_script("main")
