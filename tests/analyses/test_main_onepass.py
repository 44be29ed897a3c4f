"""One process, each model loaded once: ``catlens.model.ModelPool`` (same object for the same model, device and
dtype; another for another dtype), the main job passing one pool to every stage (a two-stage job loads each model
once, and twice as often without the pool), and a pooled model left as it was found after steered generation (no
hook behind: its logits equal a freshly loaded model's), and every script still a command line of its own (geometry
run alone in a subprocess writes the same tables as its ``run(options, pool)``; P1's typed options get the checks its
command line gets). Tiny random models, seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import catlens.model as cm
from _scripts import load_main, load_script
from catlens.model import ModelPool

REPO = Path(__file__).resolve().parents[2]

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


def test_the_pool_makes_a_plain_copy_once_and_counts_it(two_models, counted):
    """A pooled model's plain Hugging Face copy: made on first request and recorded in the pool's loads (marked as
    the plain copy, with the model's spec), a second request is a hit; another dtype is another model and copy; no
    extra load_model call; a model the pool did not give out is refused."""
    tuned, _ = two_models
    pool = ModelPool()
    a = pool.get(tuned)
    plain = pool.plain_hf(a)
    assert pool.plain_hf(pool.get(str(tuned))) is plain  # the same key however the model was asked for
    assert type(plain).__name__ == "LlamaForCausalLM" and not hasattr(plain, "cfg") and plain is not a.hf
    assert pool.stats()["loads"] == 2 and pool.stats()["plain_copies"] == 1 and pool.hits == 2 and len(pool) == 1
    copy = pool.loads[1]
    assert copy["copy"] == "plain_hf" and "copy" not in pool.loads[0]
    assert {k: copy[k] for k in ("spec", "location", "device", "dtype")} == {k: pool.loads[0][k] for k in (
        "spec", "location", "device", "dtype")} == {"spec": str(tuned), "location": str(tuned.resolve()),
                                                      "device": "cpu", "dtype": "float32"}
    b = pool.get(tuned, dtype="bfloat16")
    plain_b = pool.plain_hf(b)
    assert plain_b is not plain and plain_b.dtype == torch.bfloat16 and pool.stats()["plain_copies"] == 2
    assert pool.stats()["models"] == pool.loads and len(pool.loads) == 4
    assert counted == [str(tuned), str(tuned)]  # the copies are not load_model calls
    with pytest.raises(ValueError, match="is not a model of this pool: get it with pool.get"):
        ModelPool().plain_hf(a)
    pool.clear()
    assert pool.plain_hf(pool.get(tuned)) is not plain  # cleared: the model and its copy made again


def test_the_plain_copy_computes_what_the_model_computes(two_models):
    """The plain copy, built from the loaded model's weights (nothing read from disk), gives the logits of the
    checkpoint loaded again with transformers (what plain_hf returned before) to the bit, float32 and bfloat16, with
    the same attention and generation config, and the bridge's logits up to float32 rounding (the bridge runs eager
    attention, the plain copy SDPA); it shares the loaded weights (no second copy in memory)."""
    from transformers import AutoModelForCausalLM

    tuned, _ = two_models
    ids = torch.tensor([[1, 5, 9, 20, 33, 7], [1, 2, 3, 4, 5, 6]])
    for dtype in ("float32", "bfloat16"):
        model = cm.load_model(tuned, dtype=dtype)
        seed = torch.random.get_rng_state()
        plain = model.plain_hf()
        assert torch.equal(torch.random.get_rng_state(), seed)  # the throwaway init left the caller's seed alone
        reloaded = AutoModelForCausalLM.from_pretrained(tuned, dtype=model.dtype).eval()
        with torch.inference_mode():
            logits = plain(ids).logits
            assert torch.equal(logits, reloaded(ids).logits)
            if dtype == "float32":
                torch.testing.assert_close(logits, model.bridge(ids), rtol=1e-5, atol=1e-5)
        assert type(plain) is type(reloaded) and plain.dtype == model.dtype and not plain.training
        assert plain.config._attn_implementation == reloaded.config._attn_implementation != "eager"
        assert model.hf.config._attn_implementation == "eager"  # the bridge's config is left as it was
        assert plain.generation_config.to_dict() == reloaded.generation_config.to_dict()
        shared = {t.data_ptr() for t in model.hf.state_dict().values()}
        assert all(p.data_ptr() in shared for p in plain.parameters())


def test_the_pool_says_what_was_wrong_with_a_spec():
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint folder"):
        ModelPool().get("/no/such/folder")


def write_prompts(path: Path) -> Path:
    """Eight train prompts, four harmful (one category) and four benign: enough for the geometry script."""
    rows = [{"id": f"{lab}{i}", "text": f"{'how to hack' if lab == 'h' else 'how to bake'} thing {i}",
             "label": "harmful" if lab == "h" else "benign", "category": "cybercrime" if lab == "h" else None,
             "split": "train"} for lab in ("h", "b") for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
    prompts = write_prompts(tmp_path / "prompts.jsonl")
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


def test_a_script_still_runs_alone_from_its_command_line_and_equals_its_run_on_a_pool(two_models, tmp_path):
    """``python analyses/geometry.py ...`` in its own process (its own models) writes the same tables, to the bit,
    as ``run(options, pool)`` in this process on the options that command line parses to."""
    import pandas as pd

    from catlens.stages import GeometryOptions, build_parser, from_namespace

    tuned, stock = two_models
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["--model", str(tuned), "--other-model", str(stock), "--prompts", str(prompts), "--layers", "all",
              "--tsne-layers", "none", "--cv-folds", "2", "--directions", "one_vs_benign", "--pca-dims", "none",
              "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    alone = tmp_path / "alone"
    done = subprocess.run([sys.executable, str(REPO / "analyses" / "geometry.py"), *common, "--out", str(alone)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((alone / "manifest.json").read_text())["status"] == "done"

    geometry = load_script("geometry")
    options = from_namespace(GeometryOptions, build_parser(GeometryOptions).parse_args(
        [*common, "--out", str(tmp_path / "pooled")]))
    pool = ModelPool()
    geometry.run(options, pool)
    assert pool.stats()["loads"] == 2  # the model and its other model, from the pool it was given
    for table in ("cosine", "separability", "model_diff"):
        a = pd.read_parquet(alone / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "pooled" / f"{table}.parquet")
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_p1_run_checks_typed_options_as_its_command_line_does(tmp_path, capsys):
    """The same checks and ``--quick`` sizes whether P1 gets a command line (usage error, exit 2) or typed options
    (a ValueError); either way before the run folder or any model."""
    from catlens.stages import SIZES, P1Options

    p1 = load_script("p1_steering")
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"--zone-grid=2 must be >= 3"):
        p1.run(P1Options(model="no-such-model", out=str(out), zone_grid=2), ModelPool(loader=_no_load))
    with pytest.raises(SystemExit) as e:
        p1.main(["--model", "no-such-model", "--out", str(out), "--zone-grid", "2"])
    assert e.value.code == 2 and "--zone-grid=2 must be >= 3" in capsys.readouterr().err
    assert not out.exists()
    quick = p1.prepare(P1Options(model="m", out="o", quick=True, train_cap=7))
    assert quick.train_cap == 7  # given explicitly: wins over the quick size
    assert quick.val_cap == SIZES["p1"]["script_quick"]["val_cap"] != P1Options(model="m", out="o").val_cap
    assert vars(quick) == vars(p1.parse_args(["--model", "m", "--out", "o", "--quick", "--train-cap", "7"]))


def _no_load(*a, **k):
    raise AssertionError("a model was loaded before the options were checked")


def test_a_stage_that_exits_is_a_failed_stage_and_the_job_goes_on(two_models, tmp_path, monkeypatch):
    """A script's ``SystemExit("what to fix")`` inside the one-process job fails its stage (recorded, with the
    message), the independent stages still run, and the job then raises naming it."""
    tuned, stock = two_models
    main = load_main()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "p1_steering.py").write_text("def run(options, models):\n"
                                            "    raise SystemExit('--layers 99: no such layer')\n")
    (scripts / "p2_steering.py").write_text("from catlens.runs import RunDir\n\ndef run(options, models):\n"
                                            "    RunDir.create(options.out, config={}).finish()\n")
    monkeypatch.setitem(main.STAGE_SCRIPTS, "p1", scripts / "p1_steering.py")
    monkeypatch.setitem(main.STAGE_SCRIPTS, "p2", scripts / "p2_steering.py")
    argv = ["--model", str(tuned), "--other-model", str(stock), "--out", str(tmp_path / "run"), "--dtype", "float32"]
    for off in ("eval", "geometry", "specificity", "figures", "report"):
        argv += ["--set", f"{off}.enabled=false"]
    with pytest.raises(RuntimeError, match=r"p1: SystemExit: --layers 99: no such layer"):
        main.main(argv)
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert stages["p1"]["status"].startswith("failed: SystemExit: --layers 99")
    assert stages["p2"]["status"] == "done"


def test_specificity_reads_p1s_chosen_policy_and_chooses_its_own_setting_without_one(tmp_path, caplog):
    """specificity measures at P1's chosen global policy when P1 wrote it; with no P1 policy it runs with its own
    layer and scale choice (no options added, a warning) instead of failing the job; the config's own policy or
    layers win."""
    from catlens.config import resolve
    from catlens.runs import RunDir

    main = load_main()
    job = main.Job(config=resolve(), run=RunDir.create(tmp_path / "run", {}))
    with caplog.at_level("WARNING"):
        assert main._p1_policy(job.config, job) == {}
    assert "chose no policy" in caplog.text
    for name in reversed(main.P1_POLICIES_FOR_SPECIFICITY):  # the first name is preferred when both exist
        folder = job.out / "p1" / "policies" / name
        folder.mkdir(parents=True)
        (folder / "policy.json").write_text("{}")
    assert main._p1_policy(job.config, job) == {"policy": str(job.out / "p1" / "policies" / "categorical_global")}
    given = resolve(sets=["specificity.args.layers=\"10\""])
    assert main._p1_policy(given, job) == {}
