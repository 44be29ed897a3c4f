"""catlens: discover, measure and steer category-specific refusal directions in chat language models.

``import catlens`` touches no disk, network or device: the public names below are imported on first use. They are
the papers' verbs: load a model and prompts, collect activations, fit directions (``fit_directions``, any method of
``catlens.directions.METHODS``), measure them (``separability``, ``cosine_matrix``, ``anisotropy``, ...), whiten
and build the basis (``fit_whitener``, ``orthonormal_basis``, ``init_basis``), steer (``SteeringPolicy``,
``fit_gate``), generate, judge (``judge_records``), rate (``rate_table``), train the low-rank map
(``train_low_rank``) and report (``build_report``).

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
    "fit_directions": "catlens.directions",
    "separability": "catlens.geometry",
    "cosine_matrix": "catlens.geometry",
    "whitened_cosine_matrix": "catlens.geometry",
    "anisotropy": "catlens.geometry",
    "projections": "catlens.geometry",
    "model_diff_cosines": "catlens.geometry",
    "fit_whitener": "catlens.geometry",
    "orthonormal_basis": "catlens.geometry",
    "init_basis": "catlens.combine",
    "train_low_rank": "catlens.combine",
    "low_rank_policy": "catlens.combine",
    "build_report": "catlens.report",
    "generate": "catlens.generation",
    "first_position": "catlens.generation",
    "prefill_reads": "catlens.generation",
    "choose_gate": "catlens.gate",
    "fit_feature_gate": "catlens.gate",
    "stack_features": "catlens.gate",
    "zone_sweep": "catlens.gate",
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
