"""catlens.testing's helpers that the other tests rely on: here, the cut-down GGUF copy (:func:`make_small_gguf`)."""

import numpy as np
import pytest

from catlens.testing import make_small_gguf

TOKENS = ["<s>", "</s>", "a", "b", "c", "ab", "abc", "bc"]
MERGES = ["a b", "ab c", "b c"]


def _source(path):
    """A 3-block Llama-style GGUF with an 8-token BPE vocabulary: a Q8_0 token embedding, an F32 output matrix, and
    per-block norms that differ block by block."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(3)
    w.add_vocab_size(len(TOKENS))
    w.add_embedding_length(32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{{ messages }}")
    embd = rng.normal(size=(len(TOKENS), 32)).astype(np.float32)
    w.add_tensor("token_embd.weight", gguf.quantize(embd, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output.weight", rng.normal(size=(len(TOKENS), 32)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    for b in range(3):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.full(32, b, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_make_small_gguf_keeps_the_first_blocks_and_tokens_and_copies_the_rest(tmp_path):
    import gguf

    src = gguf.GGUFReader(_source(tmp_path / "src.gguf"))
    out = make_small_gguf(tmp_path / "small.gguf", tmp_path / "src.gguf", n_blocks=2, n_vocab=6)
    assert out == tmp_path / "small.gguf"
    cut = gguf.GGUFReader(out)

    changed = {"GGUF.tensor_count", "llama.block_count", "llama.vocab_size", "tokenizer.ggml.tokens",
               "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    assert list(cut.fields) == list(src.fields)
    for key, field in src.fields.items():
        if key not in changed:
            assert (cut.fields[key].types, cut.fields[key].contents()) == (field.types, field.contents()), key
    assert cut.fields["llama.block_count"].contents() == 2 and cut.fields["llama.vocab_size"].contents() == 6
    assert cut.fields["tokenizer.ggml.tokens"].contents() == TOKENS[:6]
    assert cut.fields["tokenizer.ggml.token_type"].contents() == src.fields["tokenizer.ggml.token_type"].contents()[:6]
    assert cut.fields["tokenizer.ggml.merges"].contents() == ["a b"]  # "ab c" and "b c" make tokens cut away

    tensors = {t.name: t for t in src.tensors}
    assert [t.name for t in cut.tensors] == [n for n in tensors if not n.startswith("blk.2.")]
    for t in cut.tensors:
        rows = 6 if t.name in ("token_embd.weight", "output.weight") else None
        assert t.tensor_type == tensors[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(tensors[t.name].data)[:rows]), t.name
    assert make_small_gguf(tmp_path / "same.gguf", tmp_path / "src.gguf", n_blocks=3).read_bytes() == \
        (tmp_path / "src.gguf").read_bytes()  # nothing cut: the same file


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_blocks": 0}, "n_blocks=0: the source GGUF has 3; keep between 1 and 3"),
    ({"n_blocks": 4}, "n_blocks=4: the source GGUF has 3; keep between 1 and 3"),
    ({"n_vocab": 9}, "n_vocab=9: the source GGUF has 8; keep between 1 and 8"),
    ({"n_vocab": 1}, "the special tokens .* must be kept; keep at least 2 tokens"),
])
def test_make_small_gguf_bad_sizes(tmp_path, kwargs, message):
    _source(tmp_path / "src.gguf")
    with pytest.raises(ValueError, match=message):
        make_small_gguf(tmp_path / "small.gguf", tmp_path / "src.gguf", **kwargs)
    assert not (tmp_path / "small.gguf").exists()
