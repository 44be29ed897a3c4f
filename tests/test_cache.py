"""The activation store: positions, batching, on-disk shards, resume after interruption, bad input."""

import json

import pytest
import torch

from catlens.cache import ActivationStore, collect

pytestmark = pytest.mark.slow

TEXTS = [f"Tell me something interesting about the number {i}." if i % 2 else f"Hi {i}" for i in range(7)]


def test_positions_read_the_right_tokens(real_model):
    full = collect(real_model, TEXTS, sites=["resid_post"], layers=[2], positions=(-3, -2, -1), show_progress=False)
    last = collect(real_model, TEXTS, sites=["resid_post"], layers=[2], positions="last", show_progress=False)
    assert full.get_all("resid_post").shape == (7, 3, 1, 576)
    torch.testing.assert_close(full.get("resid_post", pos=-1), last.get("resid_post"), rtol=0, atol=0)


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


def test_store_refuses_other_arguments(real_model, tmp_path):
    collect(real_model, TEXTS[:2], layers=[1], out=tmp_path / "s", show_progress=False)
    with pytest.raises(FileExistsError, match="different layers"):
        collect(real_model, TEXTS[:2], layers=[2], out=tmp_path / "s", show_progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an activation store"):
        collect(real_model, TEXTS[:2], layers=[1], out=tmp_path / "other", show_progress=False)


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
