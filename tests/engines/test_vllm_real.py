"""The vLLM backend on the real embedded model (SmolLM2-135M-Instruct, float32 in both engines): greedy
generations over half of the built-in test prompts agree with catlens.generate's, and closing the engine ends
its engine-core processes. Marked slow (the engine starts in about 20 s, then about 15 s of generation); runs in
`make test`."""

import os

import pytest

from catlens.engines import vllm_available

if not vllm_available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the vLLM tests: vLLM is not installed (make setup installs catlens[vllm]).")
    pytest.skip("vLLM is not installed (pip install 'catlens[vllm]')", allow_module_level=True)

pytestmark = pytest.mark.slow


def test_unsteered_greedy_agrees_with_catlens_on_the_embedded_model(real_model):
    import catlens
    from catlens.engines.vllm import VLLMEngine
    from catlens.datasets import load_prompts

    prompts = list(load_prompts("builtin").where(split="test"))[::2]  # every other one: 63 prompts, every category
    ref = catlens.generate(real_model, prompts, max_new_tokens=16, batch_size=32, show_progress=False)
    with VLLMEngine("smollm2-135m-instruct", dtype="float32") as engine:  # vLLM's own layout: engine core apart
        procs = list(engine.llm.llm_engine.engine_core.resources.engine_manager.processes)
        got = engine.generate(prompts, max_new_tokens=16, show_progress=False)
    assert procs and not any(p.is_alive() for p in procs)  # leaving the block ended the engine-core processes
    same = [a["token_ids"] == b["token_ids"] for a, b in zip(ref, got)]
    first = [a["token_ids"][0] == b["token_ids"][0] for a, b in zip(ref, got)]
    print(f"\nvLLM vs catlens, float32, {len(prompts)} built-in test prompts: 16 tokens identical on "
          f"{sum(same)}, first token on {sum(first)}")
    assert sum(same) / len(same) >= 0.95
    assert [a["response"] for a, s in zip(got, same) if s] == [b["response"] for b, s in zip(ref, same) if s]
