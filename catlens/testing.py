"""Small offline models for tests, benchmarks and smoke runs: a tiny random Llama with its own tiny tokenizer.

    >>> from catlens.testing import make_tiny_model_dir
    >>> folder = make_tiny_model_dir(tmp_path, categories=("fraud", "hate"))
    >>> tiny = catlens.load_model(folder)
    >>> vocab = tiny.tokenizer.get_vocab()
    >>> tiny.n_layers, tiny.d_model, all(t in vocab for t in ("[refuse:fraud]", "[refuse:hate]", "[respond]"))
    (4, 64, True)

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in memory on a few built-in sentences,
with a ChatML chat template, and (optionally) catlens's refusal tokens ``[refuse:<category>]`` and ``[respond]``,
so every refusal-token code path runs on it. The weights are random (seeded), with a larger initialisation than
usual so that greedy decoding has clear margins (cached and uncached computation pick the same tokens).

:func:`make_small_gguf` cuts a GGUF file (by default the embedded model's) down to a few blocks and tokens, for tests
of the GGUF conversion that need a real file but not a real model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

TINY_CORPUS = (
    "How do I bake bread at home with flour water salt and yeast?",
    "Tell me how to pick a lock on a door that is not mine.",
    "Write a short poem about the sea and the wind at night.",
    "What is the capital of France and why is it famous?",
    "Explain how vaccines train the immune system to fight a virus.",
    "Give me a plan to steal a password from my coworker's laptop.",
    "I'm sorry for your loss. Here is how to plan a memorial.",
    "I can't help with that request because it could hurt people.",
    "Sure! Here are three steps: mix, knead, and bake for thirty minutes.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(categories: Sequence[str] = (), vocab_size: int = 384):
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on :data:`TINY_CORPUS`, ChatML template, BOS
    ``<|im_start|>``, EOS ``<|im_end|>``, pad ``<|endoftext|>``; refusal tokens when ``categories`` are given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from catlens.refusal import RESPOND, category_token

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(TINY_CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    if categories:
        fast.add_special_tokens({"additional_special_tokens": [category_token(c) for c in categories] + [RESPOND]})
    return fast


def make_tiny_model_dir(folder: str | os.PathLike[str], *, categories: Sequence[str] = (), n_layers: int = 4,
                        d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0,
                        init_range: float = 0.2, d_mlp: int | None = None, d_head: int | None = None) -> Path:
    """Save a random tiny Llama (``n_layers`` x ``d_model``, tied embeddings) and its tokenizer to ``folder``; the
    folder loads with :func:`catlens.model.load_model` like any checkpoint.

    ``d_mlp`` (default ``2 * d_model``) and ``d_head`` (default ``d_model // n_heads``) let a model have a real
    model's residual width and depth (e.g. SmolLM2-135M's ``d_model=576, n_layers=30``) while staying fast: a narrow
    MLP and narrow heads keep the parameter count, and so the forward pass, small (``bench/bench_store.py --tiny``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer(categories)
    extra = {} if d_head is None else {"head_dim": d_head}
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model,
                      intermediate_size=2 * d_model if d_mlp is None else d_mlp,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init_range,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **extra)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # test-only helper: the weights must be the same on every call
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_small_gguf(path: str | os.PathLike[str], source: str | os.PathLike[str] | None = None, *,
                    n_blocks: int = 1, n_vocab: int | None = None) -> Path:
    """Write a cut-down copy of a Llama-style GGUF file and return ``path``: its first ``n_blocks`` transformer
    blocks and, if ``n_vocab`` is given, its first ``n_vocab`` tokens.

    ``source`` defaults to the embedded model's file (:func:`catlens.model.embedded_gguf`). Everything else is the
    source's: its metadata (``<arch>.block_count`` and ``<arch>.vocab_size`` set to the new sizes), tokenizer
    settings and chat template, and the quantised bytes of the kept blocks, the output norm and the kept rows of the
    token embedding, copied unchanged. A cut vocabulary keeps the BPE merges whose pieces and result are all kept
    tokens, so it is still a consistent tokenizer (it splits text into more, shorter tokens). Dequantising the copy
    (``from_pretrained(..., gguf_file=...)``, :func:`catlens.model.embedded_checkpoint`) runs the same code as for
    the source in a fraction of the time and disk: most of a conversion is parsing the vocabulary's metadata, and
    the dequantised embedding is most of a small model's weights.
    """
    import gguf

    from catlens.model import embedded_gguf

    reader = gguf.GGUFReader(embedded_gguf() if source is None else source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    blocks_key, vocab_key = (key.format(arch=arch) for key in (gguf.Keys.LLM.BLOCK_COUNT, gguf.Keys.LLM.VOCAB_SIZE))
    tokens = reader.fields[gguf.Keys.Tokenizer.LIST].contents()
    n_vocab = len(tokens) if n_vocab is None else n_vocab
    for name, size, limit in (("n_blocks", n_blocks, reader.fields[blocks_key].contents()),
                              ("n_vocab", n_vocab, len(tokens))):
        if not 1 <= size <= limit:
            raise ValueError(f"{name}={size!r}: the source GGUF has {limit}; keep between 1 and {limit}.")
    sizes = {blocks_key: n_blocks, vocab_key: n_vocab}
    special = {k: reader.fields[k].contents() for k in reader.fields
               if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")}
    if any(i >= n_vocab for i in special.values()):
        raise ValueError(f"n_vocab={n_vocab}: the special tokens {special} must be kept; keep at least "
                         f"{max(special.values()) + 1} tokens.")
    kept = set(tokens[:n_vocab])
    per_token = (gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.TOKEN_TYPE, gguf.Keys.Tokenizer.SCORES)
    writer = gguf.GGUFWriter(path, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = sizes.get(field.name, field.contents())
        if field.name in per_token:
            value = value[:n_vocab]
        elif field.name == gguf.Keys.Tokenizer.MERGES:
            value = [m for m in value if all(part in kept for part in (*m.split(" "), m.replace(" ", "")))]
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY
                             else None)
    vocab_rows = {gguf.TENSOR_NAMES[t] + ".weight" for t in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT)}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= n_blocks:
            continue
        data = tensor.data[:n_vocab] if tensor.name in vocab_rows else tensor.data  # one row per token
        writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
