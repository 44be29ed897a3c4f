"""The activation store: positions, batching, on-disk shards, resume after interruption, bad input."""

import json
from pathlib import Path

import pytest
import torch

from catlens.cache import ActivationStore, collect

slow = pytest.mark.slow  # the tests on the real model; the tiny-model tests at the end are fast

TEXTS = [f"Tell me something interesting about the number {i}." if i % 2 else f"Hi {i}" for i in range(7)]


@slow
def test_positions_read_the_right_tokens(real_model):
    full = collect(real_model, TEXTS, sites=["resid_post"], layers=[2], positions=(-3, -2, -1), show_progress=False)
    last = collect(real_model, TEXTS, sites=["resid_post"], layers=[2], positions="last", show_progress=False)
    assert full.get_all("resid_post").shape == (7, 3, 1, 576)
    torch.testing.assert_close(full.get("resid_post", pos=-1), last.get("resid_post"), rtol=0, atol=0)


@slow
def test_mean_over_instruction_tokens(real_model):
    from catlens.cache import _instruction_masks

    rendered = real_model.format(TEXTS[:2])
    ids, mask = real_model.tokenize(rendered)
    instr, after = _instruction_masks(real_model, rendered, TEXTS[:2], ids.shape[1])
    for i in range(2):
        assert real_model.tokenizer.decode(ids[i][instr[i]]).strip() == TEXTS[i]
        assert real_model.tokenizer.decode(ids[i][after[i]]) == real_model.assistant_header
    store = collect(real_model, TEXTS[:2], layers=[1], positions="mean", show_progress=False)
    _, cache = real_model.bridge.run_with_cache(ids, attention_mask=mask, names_filter=["blocks.1.hook_resid_post"])
    expected = cache["blocks.1.hook_resid_post"][0][instr[0]].mean(0)
    torch.testing.assert_close(store.at("resid_post", 1)[0], expected, rtol=0, atol=1e-5)
    post = collect(real_model, TEXTS[:2], layers=[1], positions="post_instruction", show_progress=False)
    assert post.get_all("resid_post").shape[1] == int(after[0].sum())


@slow
def test_batched_equals_unbatched_and_disk_equals_memory(real_model, tmp_path, assert_float32_close):
    mem = collect(real_model, TEXTS, sites=["resid_post", "z"], layers=[0, 3], batch_size=7, show_progress=False)
    one = collect(real_model, TEXTS, sites=["resid_post", "z"], layers=[0, 3], batch_size=1, show_progress=False)
    disk = collect(real_model, TEXTS, sites=["resid_post", "z"], layers=[0, 3], batch_size=3, shard_size=2,
                   out=tmp_path / "s", show_progress=False)
    for site in ("resid_post", "z"):
        assert_float32_close(mem.get(site), one.get(site))
        assert_float32_close(mem.get(site), disk.get(site))
    assert len(list((tmp_path / "s" / "shards").iterdir())) == 4
    loaded = ActivationStore.load(tmp_path / "s")
    assert torch.equal(loaded.get("z"), disk.get("z"))
    assert loaded.index["text"].tolist() == TEXTS
    assert loaded.meta["model"]["name"] == real_model.name and loaded.meta["dtype"] == "float32"


@slow
def test_resume_after_interruption(real_model, tmp_path, monkeypatch):
    import catlens.cache as cache_mod

    out = tmp_path / "store"
    reference = collect(real_model, TEXTS, layers=[1], shard_size=2, show_progress=False)
    calls = {"n": 0}
    real_forward = cache_mod._forward_batch

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # die while computing the second shard
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_forward_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        collect(real_model, TEXTS, layers=[1], shard_size=2, batch_size=1, out=out, show_progress=False)
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["00000.safetensors"]  # no partial or temporary shard is left behind
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ActivationStore.load(out)
    monkeypatch.setattr(cache_mod, "_forward_batch", real_forward)
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_forward_batch", counting)
    resumed = collect(real_model, TEXTS, layers=[1], shard_size=2, batch_size=1, out=out, show_progress=False)
    assert counted["n"] == len(TEXTS) - 2  # the finished shard was not recomputed
    torch.testing.assert_close(resumed.get("resid_post"), reference.get("resid_post"), rtol=0, atol=1e-5)


@slow
def test_store_refuses_other_arguments(real_model, tmp_path):
    collect(real_model, TEXTS[:2], layers=[1], out=tmp_path / "s", show_progress=False)
    with pytest.raises(FileExistsError, match="different layers"):
        collect(real_model, TEXTS[:2], layers=[2], out=tmp_path / "s", show_progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an activation store"):
        collect(real_model, TEXTS[:2], layers=[1], out=tmp_path / "other", show_progress=False)


@slow
def test_where_and_bad_input(real_model):
    store = collect(real_model, TEXTS, layers=[1, 2], show_progress=False)
    sub = store.where(id=["p1", "p3"])
    assert len(sub) == 2 and torch.equal(sub.get()[1], store.get()[3])
    with pytest.raises(KeyError, match="was not collected"):
        store.get("attn_out")
    with pytest.raises(KeyError, match="layer 5 was not collected"):
        store.at("resid_post", 5)
    with pytest.raises(ValueError, match="Did you mean: last"):
        collect(real_model, TEXTS, positions="lats")
    with pytest.raises(ValueError, match="negative"):
        collect(real_model, TEXTS, positions=[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        collect(real_model, TEXTS, layers=[99])
    with pytest.raises(ValueError, match="pattern"):
        collect(real_model, TEXTS, sites=["pattern"])
    with pytest.raises(ValueError, match="Unknown site"):
        collect(real_model, TEXTS, sites=["resid"])
    with pytest.raises(TypeError, match="PromptSet or a list of strings"):
        collect(real_model, [1, 2])


@slow
def test_load_checks_shard_rows_against_the_index(real_model, tmp_path):
    from safetensors.torch import load_file, save_file

    store = collect(real_model, TEXTS[:4], layers=[0], shard_size=2, out=tmp_path / "s", show_progress=False)
    assert store.get("resid_post").shape[0] == 4
    shard = tmp_path / "s" / "shards" / "00000.safetensors"
    save_file({k: v[:1].contiguous() for k, v in load_file(shard).items()}, str(shard))  # a shard lost a row
    with pytest.raises(ValueError, match=r"shards/00000.safetensors .*truncated or replaced.*Rerun"):
        ActivationStore.load(tmp_path / "s")
    with pytest.raises(ValueError, match=r"shards/00000.safetensors .*holds rows None.*rows 0:2"):
        ActivationStore.load(tmp_path / "s", verify=False)  # without checksums the row range still catches it


# ----------------------------------------------------------------------- nothing wrong is loaded silently
def _prompt_set(labels=("harmful", "benign", "harmful", "benign")):
    from catlens.prompts import PromptSet

    return PromptSet([{"id": f"q{i}", "text": TEXTS[i], "label": lab, "category": None}
                      for i, lab in enumerate(labels)], name="t")


@slow
def test_resume_refuses_changed_prompt_fields_and_formatting(real_model, tmp_path):
    out = tmp_path / "s"
    first = collect(real_model, _prompt_set(), layers=[1], shard_size=2, out=out, show_progress=False)
    assert first.index["label"].tolist() == ["harmful", "benign", "harmful", "benign"]
    fixed = _prompt_set(("harmful", "harmful", "harmful", "benign"))  # a label fixed in the prompt file
    with pytest.raises(FileExistsError, match=r"different prompts \(fields that differ: label\).*overwrite=True"):
        collect(real_model, fixed, layers=[1], shard_size=2, out=out, show_progress=False)
    with pytest.raises(FileExistsError, match="system"):
        collect(real_model, _prompt_set(), layers=[1], shard_size=2, out=out, system="Be brief.",
                show_progress=False)
    with pytest.raises(FileExistsError, match=r"different append"):
        collect(real_model, _prompt_set(), layers=[1], shard_size=2, out=out, append=["", "x", "", ""],
                show_progress=False)
    again = collect(real_model, fixed, layers=[1], shard_size=2, out=out, overwrite=True, show_progress=False)
    assert again.index["label"].tolist() == ["harmful", "harmful", "harmful", "benign"]


@slow
def test_resume_refuses_another_model_with_the_same_name(real_model, tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from catlens.model import load_model

    folders = []
    for k in range(2):
        folder = tmp_path / f"v{k}" / "tiny"
        shutil.copytree(tiny_model_dir, folder)
        if k:
            weights = next(folder.glob("*.safetensors"))
            tensors = load_file(weights)
            name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
            tensors[name] = tensors[name] + 0.01
            save_file(tensors, str(weights), metadata={"format": "pt"})
        folders.append(folder)
    a, b = (load_model(f) for f in folders)
    assert a.name == b.name == "tiny"
    collect(a, TEXTS[:3], layers=[1], out=tmp_path / "s", show_progress=False)
    with pytest.raises(FileExistsError, match=r"different model \(weights differ"):
        collect(b, TEXTS[:3], layers=[1], out=tmp_path / "s", show_progress=False)


@slow
def test_load_detects_swapped_shards_and_a_flipped_byte_and_rerun_recomputes(real_model, tmp_path):
    out = tmp_path / "s"
    store = collect(real_model, TEXTS[:6], layers=[0, 2], shard_size=2, out=out, show_progress=False)
    reference = store.get_all("resid_post")
    shards = out / "shards"
    first, second = (shards / "00000.safetensors").read_bytes(), (shards / "00001.safetensors").read_bytes()
    (shards / "00000.safetensors").write_bytes(second)
    (shards / "00001.safetensors").write_bytes(first)
    with pytest.raises(ValueError, match=r"shards/00000.safetensors .*fails its checksum.*Rerun"):
        ActivationStore.load(out)
    with pytest.raises(ValueError, match=r"shards/00000.safetensors .*holds rows '2:4'.*rows 0:2"):
        ActivationStore.load(out, verify=False)
    (shards / "00000.safetensors").write_bytes(first)
    (shards / "00001.safetensors").write_bytes(second)
    data = bytearray(second)
    data[-3] ^= 0x10
    (shards / "00001.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shards/00001.safetensors .*fails its checksum"):
        ActivationStore.load(out)
    again = collect(real_model, TEXTS[:6], layers=[0, 2], shard_size=2, out=out, show_progress=False)  # recomputes it
    assert torch.equal(again.get_all("resid_post"), reference)
    assert torch.equal(ActivationStore.load(out).get_all("resid_post"), reference)


@slow
def test_damaged_metadata_files_name_the_file(real_model, tmp_path):
    out = tmp_path / "s"
    collect(real_model, TEXTS[:2], layers=[0], out=out, show_progress=False)
    text = (out / "store.json").read_text()
    (out / "store.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"store.json' is damaged.*overwrite"):
        ActivationStore.load(out)
    (out / "store.json").write_text(text)
    (out / "index.parquet").write_bytes((out / "index.parquet").read_bytes()[:30])
    with pytest.raises(ValueError, match=r"index.parquet' is damaged or truncated"):
        ActivationStore.load(out)


# ------------------------------------------------------------------------ crashes never block the rerun
@slow
def test_leftovers_of_an_interrupted_setup_do_not_block_the_rerun(real_model, tmp_path, monkeypatch):
    import catlens.cache as cache_mod

    out = tmp_path / "s"  # what a kill during the old setup left: the folder and a temporary index
    (out / ".index.parquet.k3j2.tmp").mkdir(parents=True)
    (out / ".index.parquet.k3j2.tmp" / "index.parquet").write_bytes(b"PAR1 partial")
    with pytest.raises(FileNotFoundError, match="interrupted store.*rerun"):
        ActivationStore.load(out)
    store = collect(real_model, TEXTS[:2], layers=[0], out=out, show_progress=False)
    assert len(store) == 2 and sorted(p.name for p in out.iterdir()) == ["index.parquet", "shards", "store.json"]

    def killed(*args, **kwargs):  # a kill while the new setup writes store.json
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        collect(real_model, TEXTS[:2], layers=[0], out=tmp_path / "t", show_progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.*"))
    assert len(collect(real_model, TEXTS[:2], layers=[0], out=tmp_path / "t", show_progress=False)) == 2


@slow
def test_failed_argument_checks_create_nothing(real_model, tmp_path):
    out = tmp_path / "s"
    bad_calls = [
        (dict(positions="post_instruction", fmt="raw"), "same number"),
        (dict(positions=(-400, -1)), "reaches before the start"),
        (dict(layers=[]), "layers=.*is empty"),
        (dict(layers=range(5, 2)), "high to low"),
        (dict(layers=[1, 1]), "duplicates"),
        (dict(batch_size=0), "batch_size=0"),
    ]
    for kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            collect(real_model, TEXTS[:3], out=out, show_progress=False, **kwargs)
        assert not out.exists(), kwargs
    with pytest.raises(ValueError, match=r"prompts is empty \(0 prompts"):
        collect(real_model, [], out=out, show_progress=False)
    with pytest.raises(ValueError, match="no tokens after formatting"):
        collect(real_model, ["", "x"], fmt="raw", out=out, show_progress=False)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        collect(real_model, TEXTS[:3], out=tmp_path / "file", show_progress=False)
    with pytest.raises(FileExistsError, match="lies under .*which is a file"):
        collect(real_model, TEXTS[:3], out=tmp_path / "file" / "s", show_progress=False)
    # the corrected command runs
    assert len(collect(real_model, TEXTS[:3], positions="post_instruction", out=out, show_progress=False)) == 3


# ---------------------------------------------------------------------------------- a store larger than memory
@slow
def test_lazy_store_equals_eager_for_every_accessor(real_model, tmp_path):
    from catlens.cache import ShardedData

    kwargs = dict(sites=["resid_post", "z"], layers=[0, 2, 3], positions=(-2, -1), batch_size=2, show_progress=False)
    mem = collect(real_model, TEXTS, **kwargs)
    lazy = collect(real_model, TEXTS, shard_size=2, out=tmp_path / "s", **kwargs)
    assert isinstance(lazy.data, ShardedData) and lazy.lazy and not mem.lazy
    eager = ActivationStore.load(tmp_path / "s", lazy=False)
    assert not eager.lazy and ActivationStore.load(tmp_path / "s").lazy
    assert lazy.index.equals(mem.index) and eager.index.equals(mem.index)

    def same(a, b):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

    for pair in ((lazy, mem), (lazy, eager)):
        for site in ("resid_post", "z"):
            same(pair[0].get_all(site), pair[1].get_all(site))
            for pos in (-1, -2, 0, 1):
                same(pair[0].get(site, pos), pair[1].get(site, pos))
                for layer in (0, 2, 3):
                    same(pair[0].at(site, layer, pos), pair[1].at(site, layer, pos))
        for cond in ({"id": ["p6", "p1", "p4"]}, {"id": "p3"}, {"source": "inline"}):
            a, b = pair[0].where(**cond), pair[1].where(**cond)
            assert a.lazy == pair[0].lazy and a.index.equals(b.index)
            same(a.get_all("z"), b.get_all("z"))
            same(a.at("resid_post", 2, 0), b.at("resid_post", 2, 0))
            same(a.where(id="p4").get("z"), b.where(id="p4").get("z"))
    same(lazy.to_memory().get_all("z"), mem.get_all("z"))
    with pytest.raises(IndexError, match="pos=2 is out of range"):
        lazy.get("resid_post", 2)
    assert "lazy" in repr(lazy) and "(7, 2, 3, 576)" in repr(lazy)


def test_a_format_1_store_still_loads_with_a_warning(tmp_path, caplog):
    import pandas as pd
    from safetensors.torch import save_file

    root = tmp_path / "old"
    (root / "shards").mkdir(parents=True)
    x = torch.randn(3, 1, 2, 4)
    (root / "store.json").write_text(json.dumps({"version": 1, "sites": ["resid_post"], "layers": [3, 5],
                                                 "positions": ["last"], "shard_size": 2, "n_prompts": 3}))
    pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "y", "z"]}).to_parquet(root / "index.parquet", index=False)
    save_file({"resid_post": x[:2].contiguous()}, str(root / "shards" / "00000.safetensors"), metadata={"rows": "0:2"})
    save_file({"resid_post": x[2:].contiguous()}, str(root / "shards" / "00001.safetensors"), metadata={"rows": "2:3"})
    with caplog.at_level("WARNING"):
        store = ActivationStore.load(root)
    assert "older catlens" in caplog.text and store.lazy
    assert torch.equal(store.get_all(), x) and torch.equal(store.at("resid_post", 5), x[:, 0, 1])


# ------------------------------------------------------- tiny model: memory does not grow with the prompts (fast)
def _tiny_texts(n: int) -> list[str]:
    return [f"Tell me about item {i:05d} and the sea at night, please." for i in range(n)]


def test_lazy_accessors_read_only_what_they_return(tiny_lm, tmp_path, monkeypatch):
    from catlens.cache import ShardedData

    kwargs = dict(layers=[0, 2], positions=(-2, -1), show_progress=False)
    mem = collect(tiny_lm, _tiny_texts(6), **kwargs)
    store = collect(tiny_lm, _tiny_texts(6), shard_size=2, out=tmp_path / "s", **kwargs)
    reads = []
    real_read = ShardedData.read

    def spy(self, site, pos=None, layer=None):
        reads.append((site, pos, layer))
        return real_read(self, site, pos, layer)

    monkeypatch.setattr(ShardedData, "read", spy)
    assert "resid_post" in store.data and "z" not in store.data and "resid_post" in store.sites
    assert reads == []  # a membership test reads nothing (it used to read the whole site)
    assert torch.equal(store.at("resid_post", 2), mem.at("resid_post", 2))
    assert reads == [("resid_post", 1, 1)]  # one read: the last position of the second stored layer
    reads.clear()
    assert torch.equal(store.get("resid_post", 0), mem.get("resid_post", 0)) and reads == [("resid_post", 0, None)]
    reads.clear()
    sub = store.where(id=["p1", "p4"])
    assert torch.equal(sub.at("resid_post", 0, -2), mem.where(id=["p1", "p4"]).at("resid_post", 0, -2))
    assert reads == [("resid_post", 0, 0)], reads


def test_streamed_hashes_are_those_earlier_stores_recorded(tiny_lm, tmp_path, monkeypatch):
    import hashlib

    import catlens.cache as cache_mod
    from catlens.cache import _JsonListHash
    from catlens.prompts import PromptSet

    def whole(obj):  # what earlier catlens recorded: the sha256 of the JSON of the whole list
        return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()

    cases = [[], ["a"], ["é ✓ \"q\" \\ \n\t", "b", ""], [1, 2.5, None, True, float("nan"), -0.0, 10**20],
             [{"b": 1, "a": [1, "x"]}, {"z": None}, []], [Path("x"), ("t", 1)]]
    for items in cases:
        for step in (1, 2, 5):
            h = _JsonListHash()
            for i in range(0, len(items), step):
                h.update(items[i:i + step])
            assert h.hexdigest() == whole(items), (items, step)
    monkeypatch.setattr(cache_mod, "_SCAN_CHUNK", 2)  # render, check and hash in chunks of 2 prompts
    texts = _tiny_texts(5)
    prompts = PromptSet([{"id": f"q{i}", "text": t, "label": "harmful" if i % 2 else "benign",
                          "category": None if i % 2 else "privacy", "meta": {"k": i, "é": [i, "x"]}}
                         for i, t in enumerate(texts)], name="t")
    appends = [f" [{i}]" for i in range(5)]
    store = collect(tiny_lm, prompts, layers=[0], positions="mean", system="Be brief.", append=appends,
                    shard_size=2, out=tmp_path / "s", show_progress=False)
    full = prompts.to_frame()
    assert store.meta["prompt_fields_sha256"] == {str(c): whole(full[c].tolist()) for c in full.columns}
    assert store.meta["prompts_sha256"] == whole(store.meta["prompt_fields_sha256"])
    assert store.meta["rendered_sha256"] == whole(tiny_lm.format(texts, system="Be brief.", append=appends))
    assert store.meta["append_sha256"] == whole(appends)
    one = collect(tiny_lm, texts, layers=[0], append=" [respond]", out=tmp_path / "t", show_progress=False)
    assert one.meta["append_sha256"] == whole([" [respond]"] * 5)
    assert one.meta["rendered_sha256"] == whole(tiny_lm.format(texts, append=" [respond]"))


def test_collect_to_disk_python_memory_does_not_grow_with_the_prompts(tiny_lm, tmp_path, monkeypatch):
    """Python-side peak allocation (tracemalloc) of collect(..., out=...): 4x the prompts may add the index (id,
    text, label, ... and token counts: well under 600 bytes a prompt), not every prompt's rendering, its JSON, its
    tokens (earlier: about 3 KB a prompt)."""
    import tracemalloc

    import catlens.cache as cache_mod

    monkeypatch.setattr(cache_mod, "_SCAN_CHUNK", 32)

    def peak(n: int) -> int:
        texts = _tiny_texts(n)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            collect(tiny_lm, texts, layers=[0], shard_size=32, batch_size=32, out=tmp_path / f"s{n}",
                    show_progress=False)
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()

    peak(32)  # warm-up: first-call imports and caches
    small, large = peak(64), peak(256)
    per_prompt = (large - small) / (256 - 64)
    assert per_prompt < 600, f"Python-side peak grows by {per_prompt:.0f} bytes a prompt ({small} -> {large} bytes)"


def test_resume_refuses_weights_changed_in_memory(tiny_lm_dir, tmp_path, monkeypatch):
    import catlens.cache as cache_mod
    from catlens.model import load_model

    model = load_model(tiny_lm_dir)  # an own copy: the shared tiny_lm must keep its weights
    out, texts = tmp_path / "s", _tiny_texts(4)
    first = collect(model, texts, layers=[1], shard_size=2, out=out, show_progress=False)
    calls = {"n": 0}
    real_forward = cache_mod._forward_batch

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_forward_batch", counting)
    again = collect(load_model(tiny_lm_dir), texts, layers=[1], shard_size=2, out=out, show_progress=False)
    assert calls["n"] == 0 and again.meta["store_id"] == first.meta["store_id"]  # same weights: resumes
    weight = next(p for name, p in model.hf.named_parameters() if "down_proj" in name)
    with torch.no_grad():
        weight[0, 0] += 1e-3  # one weight, changed in memory after loading (the files are unchanged)
    with pytest.raises(FileExistsError, match=r"different model \(its weights in memory differ.*changed after "
                                              r"loading.*overwrite=True"):
        collect(model, texts, layers=[1], shard_size=2, out=out, show_progress=False)
    # a store from before the in-memory hash (no parameters_sha256 recorded) still resumes
    meta = json.loads((out / "store.json").read_text())
    del meta["model_identity"]["parameters_sha256"]
    (out / "store.json").write_text(json.dumps(meta))
    assert len(collect(load_model(tiny_lm_dir), texts, layers=[1], shard_size=2, out=out,
                       show_progress=False)) == 4 and calls["n"] == 0


@slow
def test_peak_rss_of_collect_and_a_full_pass_does_not_grow_with_the_prompts(tmp_path):
    """Child processes on a proxy of the real model's width and depth (d_model 576, 30 layers): collect 4x the
    prompts to disk and read every layer back; the peak RSS may not grow by a quarter of the larger store (it
    grew by the whole store when every one-layer read first read the whole site). glibc's mmap threshold is pinned
    in the children: left dynamic, the peak of the forward passes varies by +-50 MiB from run to run."""
    import os
    import subprocess
    import sys

    from catlens.testing import make_tiny_model_dir

    proxy = make_tiny_model_dir(tmp_path / "proxy", n_layers=30, d_model=576, n_heads=2, n_kv_heads=1, d_head=8,
                                d_mlp=16)
    child = """
import json, resource, sys, torch
from catlens.cache import collect
from catlens.model import load_model
torch.set_num_threads(1)
n, proxy, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
model = load_model(proxy)
texts = [f"Tell me about item {i:05d} and the sea at night, please." for i in range(n)]
store = collect(model, texts, positions=tuple(range(-8, 0)), shard_size=16, out=out, show_progress=False)
total = sum(float(store.at("resid_post", layer, pos).double().sum()) for layer in store.layers for pos in (0, -1))
print("RESULT", json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "total": total}))
"""

    def run(n: int) -> int:
        res = subprocess.run([sys.executable, "-c", child, str(n), str(proxy), str(tmp_path / f"s{n}")],
                             capture_output=True, text=True, check=False, cwd=str(Path(__file__).parents[1]),
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.split("RESULT", 1)[1])["peak"]

    small, large = run(32), run(128)
    store_bytes = 128 * 8 * 30 * 576 * 4  # 71 MiB
    assert large - small < store_bytes / 4, f"peak RSS {small / 2**20:.0f} -> {large / 2**20:.0f} MiB"
