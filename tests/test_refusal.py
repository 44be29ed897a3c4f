"""Refusal-token registry, first-position scores, response parsing, the generation gate and greedy generation."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from catlens.refusal import (
    P1_CATEGORY_TOKENS,
    RESPOND,
    RefusalTokens,
    SpecialTokenGate,
    category_token,
    decide,
    find_special_tokens,
    parse_response,
    special_token_probs,
)

TOKENS = RefusalTokens.for_categories(["privacy", "cybercrime"])


# ------------------------------------------------------------------------------------------------ registry
def test_naming_and_lookups():
    assert category_token("privacy") == "[refuse:privacy]"
    assert TOKENS.all_tokens == ("[refuse:privacy]", "[refuse:cybercrime]", "[respond]")
    assert TOKENS.token_of("cybercrime") == "[refuse:cybercrime]"
    assert TOKENS.category_of("[refuse:privacy]") == "privacy"
    assert TOKENS.category_of(RESPOND) is None
    assert RefusalTokens.single().all_tokens == ("[refuse]", "[respond]")
    assert RefusalTokens.p1().refuse[0] == "[Requests with safety concerns]"
    assert RefusalTokens.from_dict(TOKENS.to_dict()) == TOKENS


def test_registry_errors():
    with pytest.raises(ValueError, match="did you mean|Did you mean"):
        TOKENS.token_of("privcy")
    with pytest.raises(ValueError, match="not one of"):
        TOKENS.category_of("[refuse:nope]")
    with pytest.raises(ValueError, match="distinct"):
        RefusalTokens(("a", "b"), ("[x]", "[x]"))
    with pytest.raises(ValueError, match="one token per category"):
        RefusalTokens(("a", "b"), ("[x]",))
    with pytest.raises(ValueError, match="cannot name a token"):
        category_token("bad]name")


def _tokenizer_with(tokens: list[str]):
    from transformers import AutoTokenizer

    from catlens.model import embedded_checkpoint

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    if tokens:
        tok.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tok


def test_detect_tokens_from_tokenizer():
    tok = _tokenizer_with(list(TOKENS.all_tokens))
    assert RefusalTokens.from_tokenizer(tok) == TOKENS
    ids = TOKENS.ids(tok)
    assert ids == [tok.convert_tokens_to_ids(t) for t in TOKENS.all_tokens] and min(ids) >= 49152
    p1 = _tokenizer_with([*P1_CATEGORY_TOKENS.values(), RESPOND])
    assert RefusalTokens.from_tokenizer(p1) == RefusalTokens.p1()
    with pytest.raises(ValueError, match="no '\\[respond\\]' token"):
        RefusalTokens.from_tokenizer(_tokenizer_with([]))
    with pytest.raises(ValueError, match="not in this tokenizer"):
        RefusalTokens.single().ids(tok)


# ------------------------------------------------------------------------------------------------- scoring
def test_special_token_probs_known_values():
    logits = torch.zeros(2, 10)
    logits[1, 3] = math.log(9.0)  # row 1: token 3 has 9x the weight of each other token -> 9/18
    p = special_token_probs(logits, [3, 4])
    torch.testing.assert_close(p[0], torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(p[1], torch.tensor([0.5, 1 / 18]))
    hot = special_token_probs(logits, [3, 4], temperature=2.0)  # 3/(3+9) at T=2
    torch.testing.assert_close(hot[1], torch.tensor([0.25, 1 / 12]))
    with pytest.raises(ValueError, match="temperature"):
        special_token_probs(logits, [3], temperature=0.0)


def test_decide():
    probs = torch.tensor([[0.5, 0.1, 0.3],   # refuses with category 0
                          [0.1, 0.2, 0.6],   # responds (0.2 < 0.6) although the refusal tokens sum to 0.3
                          [0.05, 0.4, 0.3]])  # refuses with category 1
    d = decide(probs)
    assert d.refused.tolist() == [True, False, True]
    assert d.category_index.tolist() == [0, 1, 1]
    torch.testing.assert_close(d.refusal_score, torch.tensor([0.6, 0.3, 0.45]))
    torch.testing.assert_close(d.respond_prob, torch.tensor([0.3, 0.6, 0.3]))


def test_parse_response():
    r = parse_response("[refuse:privacy]I can't help with that.", TOKENS)
    assert (r.first_token, r.category, r.refused, r.n_special, r.repeated) == ("[refuse:privacy]", "privacy", True, 1,
                                                                              False)
    assert r.body == "I can't help with that."
    r = parse_response("[respond]Sure! [refuse:cybercrime] no", TOKENS)
    assert (r.first_token, r.refused, r.n_special, r.repeated) == ("[respond]", False, 2, True)
    r = parse_response("[refuse:privacy][refuse:cybercrime] can't", TOKENS)
    assert r.repeated and r.category == "privacy"
    r = parse_response("Hello there", TOKENS)
    assert (r.first_token, r.refused, r.n_special, r.body) == (None, False, 0, "Hello there")
    assert find_special_tokens("a [respond] b [refuse:privacy]", TOKENS) == ["[respond]", "[refuse:privacy]"]


# -------------------------------------------------------------------------------------------------- gate
def test_gate_blocks_special_tokens_after_the_first_position():
    scores = torch.arange(20, dtype=torch.float32).repeat(2, 1)
    gate = SpecialTokenGate([17, 18], prompt_length=5)
    first = gate(torch.zeros(2, 5, dtype=torch.long), scores)
    assert torch.equal(first, scores)  # first position: untouched
    later = gate(torch.zeros(2, 7, dtype=torch.long), scores)
    assert torch.isinf(later[:, [17, 18]]).all() and (later[:, [17, 18]] < 0).all()
    keep = [i for i in range(20) if i not in (17, 18)]
    assert torch.equal(later[:, keep], scores[:, keep])
    forced = SpecialTokenGate([3, 4], prompt_length=5, force_first=True)(torch.zeros(2, 5, dtype=torch.long), scores)
    assert forced.argmax(-1).tolist() == [4, 4] and torch.isinf(forced[:, 5:]).all()


# ---------------------------------------------------------------------------------- generation on a tiny model
@pytest.fixture(scope="module")
def tiny_refusal_model(tiny_model_dir, tmp_path_factory):
    """The tiny random Llama with the refusal tokens and a planted preference: a forward hook on the unembedding
    adds 100 to the logit of [refuse:privacy] at every position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from catlens.model import load_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": list(TOKENS.all_tokens)}, replace_extra_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    folder = tmp_path_factory.mktemp("tiny_refusal")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    m = load_model(folder)
    priv = m.tokenizer.convert_tokens_to_ids("[refuse:privacy]")

    def plant(module, inputs, output):
        output = output.clone()
        output[..., priv] += 100.0
        return output

    handle = m.hf.lm_head.register_forward_hook(plant)
    yield m
    handle.remove()


@pytest.mark.slow
def test_generate_gate_and_scores(tiny_refusal_model):
    from catlens.refusal import first_token_scores, generate, generate_ids

    m = tiny_refusal_model
    prompts = ["Hello there", "How do I find someone's home address?", "Write a poem"]
    priv = m.tokenizer.convert_tokens_to_ids("[refuse:privacy]")
    free = generate_ids(m, prompts, max_new_tokens=6, tokens=TOKENS, gate=False, show_progress=False)
    assert all(sum(i == priv for i in row) >= 2 for row in free)  # the planted token repeats without the gate
    gated = generate_ids(m, prompts, max_new_tokens=6, tokens=TOKENS, show_progress=False, batch_size=2)
    special = set(TOKENS.ids(m.tokenizer))
    for row in gated:
        assert not special & set(row[1:])  # special tokens only at the first position
    assert [row[0] for row in gated] == [priv] * 3
    forced = generate_ids(m, prompts, max_new_tokens=2, tokens=TOKENS, force_first=True, show_progress=False)
    assert all(row[0] in special for row in forced)
    texts = generate(m, prompts, max_new_tokens=6, tokens=TOKENS, show_progress=False)
    assert all(t.startswith("[refuse:privacy]") and t.count("[refuse:") == 1 for t in texts)

    table = first_token_scores(m, prompts, tokens=TOKENS, show_progress=False, batch_size=2)
    logits = m.logits(prompts)
    expected = torch.softmax(logits, dim=-1)[:, TOKENS.ids(m.tokenizer)]
    torch.testing.assert_close(torch.tensor(table[[f"p[{t}]" for t in TOKENS.all_tokens]].values, dtype=torch.float32),
                               expected, rtol=1e-5, atol=1e-7)
    assert table["refused"].all() and (table["predicted_category"] == "privacy").all()
    torch.testing.assert_close(torch.tensor(table["refusal_score"].values, dtype=torch.float32),
                               expected[:, :2].sum(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_first_token_scores_plain_copy_sorted_batches_equal_the_bridge_unbatched(tiny_refusal_model):
    """first_token_scores through a plain Hugging Face copy (logits at the last position only) and through the
    bridge, in batches sorted by length: the rows of single-prompt bridge calls, in the caller's order."""
    from catlens.refusal import first_token_scores

    from catlens.model import load_model

    m = load_model(tiny_refusal_model.provenance["source"]["folder"])  # without the fixture's planted hook
    prompts = ["Hi", "How do I find someone's home address without them knowing, step by step?", "Write a poem",
               "What is the capital of France, and why is it there?", "Ok"]
    cols = ["refusal_score", "respond_prob"] + [f"p[{t}]" for t in TOKENS.all_tokens]
    one = pd.concat([first_token_scores(m, [p], tokens=TOKENS, show_progress=False) for p in prompts],
                    ignore_index=True)
    bridge = first_token_scores(m, prompts, tokens=TOKENS, show_progress=False, batch_size=2)
    fast = first_token_scores(m, prompts, tokens=TOKENS, show_progress=False, batch_size=2, hf=m.plain_hf())
    for table in (bridge, fast):
        np.testing.assert_allclose(table[cols].to_numpy(float), one[cols].to_numpy(float), rtol=1e-4, atol=1e-6)
        assert table.top_token.tolist() == one.top_token.tolist()
        assert table.predicted_category.tolist() == one.predicted_category.tolist()


@pytest.mark.slow
def test_plain_copy_generates_what_the_bridge_generates(real_model):
    """generate_ids through the bridge, through a plain Hugging Face copy (model.plain_hf) and unbatched: the same
    greedy ids, in the caller's order."""
    from catlens.refusal import generate_ids

    prompts = ["Name three primary colours.", "What is 2 + 2?", "Write one sentence about the sea, please."]
    kw = {"max_new_tokens": 8, "tokens": None, "show_progress": False}
    bridge = generate_ids(real_model, prompts, batch_size=3, **kw)
    plain = real_model.plain_hf()
    assert not hasattr(plain, "cfg") and type(plain).__name__.endswith("ForCausalLM")
    assert generate_ids(real_model, prompts, batch_size=3, hf=plain, **kw) == bridge
    assert [generate_ids(real_model, [p], hf=plain, **kw)[0] for p in prompts] == bridge
    assert all(1 <= len(r) <= 8 for r in bridge)


# --------------------------------------------------------------------------------- reading at a refusal token
def test_token_read_context_raw_is_p1s_string_and_chat_the_template(tiny_lm):
    """"raw" = BOS + prompt + " [c]" with no template (P1's extraction reads, PAPERS §2.3 A); "chat" = template +
    the token as the response's first token. Both read at the token itself."""
    from catlens.cache import collect
    from catlens.model import render_chat
    from catlens.refusal import READ_CONTEXTS, token_read_format, token_read_texts

    tok = tiny_lm.tokenizer
    texts = ["How do I bake bread at home?", "Tell me how to pick a lock."]
    marks = [category_token("fraud"), RESPOND]
    ids = [tiny_lm.token_id(m) for m in marks]

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    raw = token_read_texts(tiny_lm, texts, marks, read_context="raw")
    assert raw == [tok.bos_token + t + " " + m for t, m in zip(texts, marks)]
    chat = token_read_texts(tiny_lm, texts, marks, read_context="chat")
    assert chat == [render_chat(tok, t) + m for t, m in zip(texts, marks)]
    assert token_read_texts(tiny_lm, texts, marks) == chat  # the default
    for t, m, i, r, c in zip(texts, marks, ids, raw, chat):
        assert encode(r) == [tok.bos_token_id] + encode(t + " ") + [i]
        assert encode(c) == encode(render_chat(tok, t)) + [i]
        assert "<|im_end|>" not in r and "assistant" not in r and "assistant" in c
    # collect reads the activation at the token itself in both contexts
    for context, rendered in (("raw", raw), ("chat", chat)):
        store = collect(tiny_lm, texts, layers=[1], show_progress=False,
                        **token_read_format(marks, read_context=context))
        for j, r in enumerate(rendered):
            name = tiny_lm.hook_name("resid_post", 1)
            _, cache = tiny_lm.bridge.run_with_cache(torch.tensor([encode(r)]), names_filter=[name])
            torch.testing.assert_close(store.get("resid_post")[j, 0], cache[name][0, -1].float(), rtol=0, atol=1e-4)
    assert set(READ_CONTEXTS) == {"chat", "raw"}
    with pytest.raises(ValueError, match="Did you mean: raw"):
        token_read_format(RESPOND, "raww")
    with pytest.raises(ValueError, match="not a token string"):
        token_read_format(["", RESPOND], "raw")
