"""catlens: discover, measure and steer category-specific refusal directions in chat language models.

``import catlens as cl`` touches no disk, network or device: the public names below are imported on first use. They
are the papers' verbs (and the types they return):

* models and prompts: ``load_model`` (the embedded SmolLM2-135M-Instruct, a checkpoint folder, a hub id, or a model
  in the cache by the name ``catlens models`` lists, e.g. the refusal-token fine-tune ``"refusal-default"``),
  ``load_prompts`` / ``load_dataset``, ``split_prompts``, ``deduplicate``, ``check_leakage``;
* activations: ``collect`` (an ``ActivationStore``);
* directions and geometry: ``fit_directions`` (any method of ``catlens.directions.METHODS``), ``separability``,
  ``cosine_matrix``, ``whitened_cosine_matrix``, ``anisotropy``, ``projections``, ``model_diff_cosines``; whitening
  and the basis: ``fit_whitener``, ``orthonormal_basis``;
* steering: ``Intervention`` (``Intervention.from_directions``), a ``Gate`` from ``fit_gate`` (P1's probe) or
  ``fit_feature_gate`` / ``choose_gate`` / ``zone_sweep`` (the three-zone feature gate), a ``Router`` (refusal
  tokens, or ``fit_router_probe``), ``SteeringPolicy``, ``steering`` (hooks inside a ``with`` block);
* generation, judges, rates: ``generate``, ``first_position``, ``prefill_reads``, ``get_judge``, ``judge_records``,
  ``agreement_table``, ``rate_table``;
* P1's learned low-rank map: ``init_basis``, ``train_low_rank``, ``low_rank_policy``; the report: ``build_report``.

The README's "P1 in twenty lines" runs P1 end to end through these names. The same steps, here on a tiny test model
(``model``) instead of ``cl.load_model("refusal-default")``:

    >>> import catlens as cl
    >>> builtin = cl.load_prompts("builtin")
    >>> train, val = (builtin.where(split=s).sample(32) for s in ("train", "val"))
    >>> acts, val_acts = (cl.collect(model, p, layers=[3], show_progress=False) for p in (train, val))
    >>> dirs = cl.fit_directions(acts, "one_vs_benign", normalize=True).with_ref_norm(acts)
    >>> gate = cl.fit_gate(acts, layer=3, val=val_acts)
    >>> policy = cl.SteeringPolicy(cl.Intervention.from_directions(dirs, 3, scale="norm", positions="last_prompt+0"),
    ...                            gate=gate, toward=0.1, away=-0.1)
    >>> records = cl.generate(model, val[:2], policy, max_new_tokens=2, show_progress=False)
    >>> [r["gate"]["outcome"] in ("toward", "away") for r in records]
    [True, True]
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
