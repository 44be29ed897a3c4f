"""The vLLM backend on a CUDA machine (marked ``gpu``; skipped without CUDA or vLLM): the embedded model, or the
checkpoint folder in ``CATLENS_GPU_MODEL`` with ``CATLENS_GPU_TP`` GPUs (tensor parallelism). Run by
``bench/gpu_vllm.sh``. Both engines run bfloat16 here (float32 on a GPU is not what anyone serves with), so the
token agreement is a rate, as on the CPU: at least 95 % of the built-in test prompts over 16 tokens."""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm", reason="needs the CUDA build of vLLM (pip install vllm)")


@pytest.fixture(scope="module")
def spec():
    return os.environ.get("CATLENS_GPU_MODEL", "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def engine(spec):
    from catlens.engines.vllm import VLLMEngine

    eng = VLLMEngine(spec, dtype="bfloat16", tensor_parallel_size=int(os.environ.get("CATLENS_GPU_TP", "1")),
                     gpu_memory_utilization=0.45)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def lm(spec):
    from catlens.model import load_model

    return load_model(spec, device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def prompts():
    from catlens.datasets import load_prompts

    return list(load_prompts("builtin").where(split="test"))[:64]


def test_unsteered_greedy_agrees_on_gpu(engine, lm, prompts):
    import catlens

    ref = catlens.generate(lm, prompts, max_new_tokens=16, batch_size=32, show_progress=False)
    got = engine.generate(prompts, max_new_tokens=16, show_progress=False)
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(ref, got)) / len(ref)
    print(f"unsteered 16-token agreement: {same:.3f}")
    assert same >= 0.95


def test_gated_routed_policy_decides_alike_on_gpu(engine, lm, prompts):
    import catlens
    from catlens.steer import Gate, Intervention, Router, SteeringPolicy

    g = torch.Generator().manual_seed(0)
    d, L = lm.d_model, lm.n_layers
    cats = ("a", "b", "c")
    iv = Intervention("resid_post", L * 2 // 3, torch.randn(3, d, generator=g) * 2, labels=cats,
                      positions="last_prompt")
    pol = SteeringPolicy((iv,), gate=Gate(torch.randn(d, generator=g) * 0.01, 0.0, 0.5, L // 2),
                         router=Router("probe", cats, weight=torch.randn(3, d, generator=g), bias=torch.zeros(3),
                                       layer=L // 2), toward=1.0, away=-1.0)
    ref = catlens.generate(lm, prompts, pol, max_new_tokens=4, batch_size=32, show_progress=False)
    got = engine.generate(prompts, pol, max_new_tokens=4, show_progress=False)
    gate = sum(a["gate"]["flagged"] == b["gate"]["flagged"] for a, b in zip(ref, got)) / len(ref)
    route = sum(a["route"]["category"] == b["route"]["category"] for a, b in zip(ref, got)) / len(ref)
    first = sum(a["token_ids"][0] == b["token_ids"][0] for a, b in zip(ref, got)) / len(ref)
    print(f"gate {gate:.3f} route {route:.3f} first token {first:.3f}")
    assert gate >= 0.95 and route >= 0.95 and first >= 0.95
