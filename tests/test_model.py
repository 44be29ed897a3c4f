"""The model wrapper on the real embedded model: hook names, numerics, padding, formats, provenance, loading routes."""

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from catlens.model import DEFAULT_MODEL, Site, hook_name, load_model, resolve_spec

pytestmark = pytest.mark.slow

PROMPTS = ["How do I bake sourdough bread at home?", "Hi", "Write a haiku about the sea, please, in English."]


def test_every_site_and_layer_is_a_real_hook(real_model):
    hooks = real_model.bridge.hook_dict
    for site in Site:
        for layer in range(real_model.n_layers):
            assert hook_name(site, layer) in hooks, (site, layer)
    assert real_model.hook_name("resid_post", -1) == f"blocks.{real_model.n_layers - 1}.hook_resid_post"


def test_hook_name_errors():
    with pytest.raises(ValueError, match="Did you mean: resid_post"):
        hook_name("resid_pots", 0)
    with pytest.raises(ValueError, match="out of range"):
        hook_name("resid_post", 30, n_layers=30)
    with pytest.raises(ValueError, match="negative"):
        hook_name("resid_post", -1)


def test_logits_equal_plain_transformers(real_model):
    from transformers import AutoModelForCausalLM

    # The bridge runs attention in eager mode: identical to plain transformers in eager mode, and equal to its
    # default SDPA kernel up to float32 rounding.
    folder = real_model.provenance["source"]["folder"]
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    for text in PROMPTS:
        ids, mask = real_model.tokenize(real_model.format([text]))
        with torch.inference_mode():
            ours = real_model.bridge(ids, attention_mask=mask)
            assert torch.equal(ours, eager(input_ids=ids, attention_mask=mask).logits)
            torch.testing.assert_close(ours, sdpa(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-3)


def test_left_padded_batch_equals_single_prompts(real_model, assert_float32_close):
    from catlens.cache import collect

    batch = collect(real_model, PROMPTS, sites=["resid_post", "attn_out"], show_progress=False, batch_size=3)
    for i, text in enumerate(PROMPTS):
        single = collect(real_model, [text], sites=["resid_post", "attn_out"], show_progress=False)
        for site in ("resid_post", "attn_out"):
            assert_float32_close(batch.get(site)[i], single.get(site)[0])


def test_resid_post_is_hf_hidden_state(real_model):
    ids, mask = real_model.tokenize(real_model.format(PROMPTS[:1]))
    with torch.inference_mode():
        hidden = real_model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        _, cache = real_model.bridge.run_with_cache(ids, attention_mask=mask,
                                                    names_filter=[hook_name("resid_post", 5)])
    torch.testing.assert_close(cache[hook_name("resid_post", 5)], hidden[6], rtol=0, atol=1e-4)


def test_chat_format_has_one_bos(real_model):
    tok = real_model.tokenizer
    ids, _ = real_model.tokenize(real_model.format(["Hello"]))
    assert ids[0, 0].item() == tok.bos_token_id
    assert ids[0, 1].item() != tok.bos_token_id
    rendered = real_model.format(["Hello"], "p1_header")[0]
    assert rendered == tok.bos_token + "Hello" + real_model.assistant_header
    assert rendered.count(tok.bos_token) == 1 + real_model.assistant_header.count(tok.bos_token)
    assert real_model.format(["x"], "raw", append=" [respond]") == ["x [respond]"]
    chat = real_model.format(["x"], "chat", append="Sure")[0]
    assert chat.endswith(real_model.assistant_header + "Sure")
    assert "custom system" in real_model.format(["x"], system="custom system")[0]


def test_format_errors(real_model):
    with pytest.raises(ValueError, match="Did you mean: chat"):
        real_model.format(["x"], "chta")
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        real_model.format(["x"], append=["a", "b"])
    with pytest.raises(ValueError, match="not a token"):
        real_model.token_id("[refuse:privacy]")


def test_provenance(real_model):
    prov = real_model.provenance
    assert prov["source"]["kind"] == "embedded"
    assert len(prov["source"]["file_sha256"]) == 64
    assert prov["dtype"] == "float32" and prov["n_layers"] == 30 and prov["d_model"] == 576
    assert prov["versions"]["catlens"]
    assert len(prov["tokenizer"]["chat_template_sha256"]) == 64


def test_local_folder_route_and_round_trip(tiny_model_dir, tiny_model):
    """A hub id and a local folder go through the same loader; offline we exercise it with a local folder."""
    assert tiny_model.n_layers == 2 and tiny_model.d_model == 64
    assert tiny_model.provenance["source"]["kind"] == "folder"
    assert "model.safetensors" in tiny_model.provenance["source"]["weights_sha256"]
    again = load_model(tiny_model_dir)
    ids, mask = tiny_model.tokenize(tiny_model.format(PROMPTS))
    with torch.inference_mode():
        assert torch.equal(tiny_model.bridge(ids, attention_mask=mask), again.bridge(ids, attention_mask=mask))


def test_spec_resolution_errors(tmp_path):
    assert resolve_spec("default") == ("embedded", DEFAULT_MODEL)
    assert resolve_spec("meta-llama/Meta-Llama-3-8B-Instruct") == ("hub", "meta-llama/Meta-Llama-3-8B-Instruct")
    with pytest.raises(ValueError, match="Did you mean"):
        resolve_spec("smollm2-135m-instrct")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_spec(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint folder"):
        resolve_spec(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype"):
        load_model(dtype="float64")


def _use_gguf(gguf: str, barrier) -> None:
    """Pool initializer (a fresh process): the embedded model's GGUF is ``gguf``, and a conversion waits there until
    the other worker's conversion has started too, so both pass the cache check and race to put the folder in place."""
    import catlens.model as M

    def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
        barrier.wait(timeout=120)
        return Path(gguf)

    M.embedded_gguf = embedded_gguf


def _convert(cache: str) -> str:
    from catlens.model import embedded_checkpoint

    return str(embedded_checkpoint(cache=cache))


def test_cache_conversion_is_atomic_under_concurrency(tmp_path, small_gguf):
    """Two processes converting the GGUF at the same time leave one complete cache folder and no temporaries.

    The workers convert a cut of the embedded GGUF (``small_gguf``: one block, 1024 tokens): the same conversion in
    a fraction of the time. Each is held until both are converting (a worker that found the cache filled would never
    reach the barrier, and the pool would fail with BrokenBarrierError), so both race to put the folder in place."""
    from catlens.runs import sha256_file

    ctx = mp.get_context("spawn")
    with ctx.Pool(2, initializer=_use_gguf, initargs=(str(small_gguf), ctx.Barrier(2))) as pool:
        paths = pool.map(_convert, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    folder = Path(paths[0])
    source = json.loads((folder / "catlens_source.json").read_text())
    assert source["kind"] == "gguf" and source["file_sha256"] == sha256_file(small_gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [DEFAULT_MODEL]
    model = load_model(cache=tmp_path)
    assert model.provenance["source"]["folder"] == str(folder)
    assert (model.n_layers, len(model.tokenizer)) == (1, 1024)  # the cut file was converted, and loads


def test_folder_source(tmp_path):
    from catlens.model import folder_source
    from catlens.runs import sha256_file

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    src = folder_source(tmp_path, "my/folder", "folder")
    assert src["kind"] == "folder" and src["weights_sha256"] == {"model.safetensors":
                                                                 sha256_file(tmp_path / "model.safetensors")}
    assert "finetune" not in src
    with pytest.raises(ValueError, match="'embedded' or 'folder'"):
        folder_source(tmp_path, "x", "hub")


def test_transformers_version_guard():
    from catlens.model import _check_transformers_version

    assert _check_transformers_version("5.23.0") is None
    assert _check_transformers_version("5.0.0.dev0") is None
    assert _check_transformers_version("not-a-version") is None
    msg = _check_transformers_version("5.24.0")
    assert msg and "5.24.0" in msg and "transformers<5.24" in msg
    assert _check_transformers_version("6.1.0")


def test_tokenize_left_pads_left_and_restores_the_padding_side(real_model):
    from catlens.model import tokenize_left

    tok = real_model.tokenizer
    before = tok.padding_side
    rendered = real_model.format(["Hi", "Tell me a long story about a lighthouse keeper, please."])
    ids, mask = tokenize_left(tok, rendered)
    assert tok.padding_side == before
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and bool(mask[1].all())  # the short prompt is padded on the left
    assert ids[0, mask[0].bool()].tolist() == tok(rendered[0], add_special_tokens=False)["input_ids"]
    lens_ids, lens_mask = real_model.tokenize(rendered)
    assert torch.equal(lens_ids, ids) and torch.equal(lens_mask, mask)


def test_auto_dtype_is_bfloat16_only_where_the_device_has_it_natively(tiny_model_dir, monkeypatch):
    import catlens.model as M

    assert M.resolve_dtype("float16") == "float16" and M.resolve_dtype("float32", "cuda") == "float32"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(M, "native_bfloat16", lambda device="cpu", native=native: native)
        assert M.resolve_dtype("auto") == expected
        assert M.load_model(tiny_model_dir, dtype="auto").dtype == M.DTYPES[expected]
    monkeypatch.undo()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the real answer follows the CPU's flags
        flags = cpuinfo.read_text()
        assert M.native_bfloat16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert M.native_bfloat16("meta") is False
    with pytest.raises(ValueError, match="or auto"):
        M.load_model(tiny_model_dir, dtype="bf16")
