"""One process, each model loaded once: ``catlens.model.ModelPool`` (same object for the same model, device and
dtype; another for another dtype), the main job passing one pool to every stage (a two-stage job loads each model
once, and twice as often without the pool), and a pooled model left as it was found after steered generation (no
hook behind: its logits equal a freshly loaded model's). Tiny random models, seconds."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import catlens.model as cm
from catlens.model import ModelPool

REPO = Path(__file__).resolve().parents[1]

COUNTING_SCRIPT = '''
import json
from pathlib import Path
from catlens.model import ModelPool
from catlens.runs import RunDir

def run(options, models):
    """A stand-in stage that, as p1 does, loads the tuned model and its stock partner."""
    models = ModelPool() if models is None else models
    tuned = models.get(options.model, device=options.device, dtype=options.dtype)
    stock = models.get(options.stock_model, device=options.device, dtype=options.dtype)
    with open(Path(__file__).with_suffix(".ids.jsonl"), "a") as f:
        f.write(json.dumps([id(tuned), id(stock)]) + "\\n")
    run = RunDir.create(options.out, config={}, overwrite=options.overwrite)
    run.finish()
    return 0
'''


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from catlens.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("onepass")
    return (make_tiny_model_dir(root / "tuned", categories=("privacy", "cybercrime"), n_layers=2, seed=0),
            make_tiny_model_dir(root / "stock", n_layers=2, seed=1))


@pytest.fixture
def counted(monkeypatch):
    """Every call of catlens.model.load_model (the pool's loader), by spec."""
    calls = []
    real = cm.load_model

    def loader(spec, **kw):
        calls.append(str(spec))
        return real(spec, **kw)

    monkeypatch.setattr(cm, "load_model", loader)
    return calls


def test_the_pool_returns_the_same_model_for_the_same_key_and_another_for_another_dtype(two_models, counted):
    tuned, _ = two_models
    pool = ModelPool()
    a = pool.get(tuned)
    assert pool.get(str(tuned)) is a  # the same folder given as a path or as text
    assert pool.get(tuned.parent / ".." / tuned.parent.name / tuned.name, dtype="float32") is a  # spelled otherwise
    b = pool.get(tuned, dtype="bfloat16")
    assert b is not a and b.dtype == torch.bfloat16 and a.dtype == torch.float32
    assert pool.get(tuned, dtype="bfloat16") is b
    assert counted == [str(tuned), str(tuned)]  # one load per (model, dtype)
    assert pool.stats()["loads"] == 2 and pool.stats()["hits"] == 3 and len(pool) == 2
    assert ModelPool().get(tuned) is not a  # another pool (a stage run alone) loads its own


def test_the_pool_says_what_was_wrong_with_a_spec():
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint folder"):
        ModelPool().get("/no/such/folder")


def load_main():
    spec = importlib.util.spec_from_file_location("_catlens_main_onepass", REPO / "analyses" / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("share", [True, False])
def test_a_two_stage_job_loads_each_model_once(two_models, counted, tmp_path, monkeypatch, share):
    """geometry (the real script: the tuned model and its stock partner) then a p1 stand-in that asks for the same
    two models: with the job's pool each is loaded once and p1 gets geometry's objects; without it (each stage its
    own pool, as separate processes) each stage loads both."""
    tuned, stock = two_models
    main = load_main()
    fake = tmp_path / "scripts" / "p1_steering.py"
    fake.parent.mkdir()
    fake.write_text(COUNTING_SCRIPT)
    monkeypatch.setitem(main.STAGE_SCRIPTS, "p1", fake)
    out = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"{lab}{i}", "text": f"{'how to hack' if lab == 'h' else 'how to bake'} thing {i}",
             "label": "harmful" if lab == "h" else "benign", "category": "cybercrime" if lab == "h" else None,
             "split": "train"} for lab in ("h", "b") for i in range(4)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(tuned), "--other-model", str(stock), "--out", str(out), "--dtype", "float32",
            "--set", f"data.prompts={prompts}", "--set", "geometry.layers=all", "--set", "geometry.tsne_layers=none",
            "--set", "geometry.cv_folds=2", "--set", "geometry.args.directions=one_vs_benign",
            "--set", "geometry.args.pca-dims=none"]
    for off in ("eval", "p2", "specificity", "figures", "report"):
        argv += ["--set", f"{off}.enabled=false"]
    summary = main.main(argv, share_models=share)
    assert summary["stages"]["geometry"] == "done" and summary["stages"]["p1"] == "done"
    resolved = {str(Path(tuned).resolve()), str(Path(stock).resolve())}
    loads = json.loads((out / "manifest.json").read_text())["model_loads"]
    if share:
        assert sorted(counted) == sorted([str(tuned), str(stock)])  # each model once in the whole job
        assert loads["by_stage"] == {"geometry": {"n": 2, "seconds": loads["seconds"]}, "p1": {"n": 0, "seconds": 0}}
        assert loads["pool"]["loads"] == 2 and loads["pool"]["hits"] == 2
    else:
        assert sorted(counted) == sorted([str(tuned), str(stock)] * 2)  # every stage loads both
        assert loads["by_stage"]["geometry"]["n"] == loads["by_stage"]["p1"]["n"] == 2 and "pool" not in loads
    assert loads["n"] == len(counted) and set(loads["by_model"]) <= {str(tuned), str(stock)} | resolved


def test_a_pooled_model_has_no_hook_or_change_left_after_steered_generation(two_models):
    from catlens.generation import generate
    from catlens.steer import Intervention, SteeringPolicy

    tuned, _ = two_models
    pool = ModelPool()
    model = pool.get(tuned)
    prompts = ["How do I bake bread?", "Tell me how to pick a lock."]
    vec = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3)) * 8.0
    policy = SteeringPolicy((Intervention("resid_post", 0, vec),))  # every row, coefficient 1

    def toks(steer):
        return [r["token_ids"] for r in generate(model, prompts, steer, max_new_tokens=6, show_progress=False)]

    plain = toks(None)
    assert toks(policy) != plain  # the steering was live while generating
    assert not model.bridge.list_hooks()
    assert toks(None) == plain
    fresh = cm.load_model(tuned)
    assert pool.get(tuned) is model
    assert torch.equal(model.logits(prompts), fresh.logits(prompts))  # bitwise: nothing left behind
