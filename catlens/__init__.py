"""catlens: discover, measure and steer category-specific refusal directions in chat language models.

``import catlens`` touches no disk, network or device: the public names below are imported on first use.

    >>> import catlens as cl
    >>> model = cl.load_model()                                   # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
    >>> acts = cl.collect(model, cl.load_prompts("builtin"), sites=["resid_post"])             # doctest: +SKIP
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "catlens.model",
    "LensModel": "catlens.model",
    "Site": "catlens.model",
    "hook_name": "catlens.model",
    "DEFAULT_MODEL": "catlens.model",
    "collect": "catlens.cache",
    "ActivationStore": "catlens.cache",
    "RunDir": "catlens.runs",
    "seed_everything": "catlens.runs",
    "configure_process": "catlens.runs",
    "load_table": "catlens.runs",
    "Prompt": "catlens.prompts",
    "PromptSet": "catlens.prompts",
    "load_prompts": "catlens.datasets",
    "split_prompts": "catlens.prompts",
    "deduplicate": "catlens.prompts",
    "check_leakage": "catlens.prompts",
    "load_dataset": "catlens.datasets",
    "Directions": "catlens.directions",
    "generate": "catlens.generation",
    "Intervention": "catlens.steer",
    "Gate": "catlens.steer",
    "Router": "catlens.steer",
    "SteeringPolicy": "catlens.steer",
    "steering": "catlens.steer",
    "fit_gate": "catlens.probes",
    "fit_router_probe": "catlens.probes",
    "get_judge": "catlens.judges",
    "judge_records": "catlens.judges",
    "agreement_table": "catlens.judges",
    "rate_table": "catlens.metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'catlens' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
