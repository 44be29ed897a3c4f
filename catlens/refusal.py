"""Refusal tokens: the registry of special tokens, a generation gate, first-position scores and greedy generation.

A refusal-token model (Jain et al., "Refusal Tokens"; PAPERS §1) opens every response with exactly one special
token: a *category refusal token* when it refuses, ``[respond]`` when it answers. catlens names its own tokens

* ``[refuse:<category>]`` for a category ``<category>`` (shared taxonomy names, e.g. ``[refuse:privacy]``);
* ``[respond]`` before an answer (the same string as the published checkpoints);
* ``[refuse]`` for the single-token (binary) variant, P1's ``binary-refusal`` baseline.

The published categorical checkpoint of the papers uses the five CoCoNot category names in brackets
(``[Requests with safety concerns]``, ...; :data:`P1_CATEGORY_TOKENS`); :meth:`RefusalTokens.from_model` finds either
naming in a model's vocabulary, so the scores below work for both.

Decisions are read at the **first response position** (the position right after the assistant header):

* :func:`special_token_probs` (pure): softmax over the whole vocabulary at temperature ``T``, read at the special ids;
* the *logit-based refusal score* is the summed probability of the refusal tokens at that position (Jain's
  ``softmax(logits/T)`` score); the model *refuses* when a refusal token beats ``[respond]`` there (Jain's
  threshold ``-1`` rule), and the predicted category is the most probable refusal token;
* :func:`first_token_scores` runs this for a list of prompts and returns a tidy table.

:class:`SpecialTokenGate` is a ``transformers`` logits processor that allows the special tokens only at the first
response position (optionally forcing one there), so generations never show two special tokens in a row or a
category token in the middle of an answer. :func:`generate` is the greedy batched generation helper used across
catlens; it returns the decoded responses with the special tokens left visible.
"""

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import LogitsProcessor

from catlens.model import tokenize_left

log = logging.getLogger(__name__)

RESPOND = "[respond]"
"""The token that opens an answer."""
REFUSE = "[refuse]"
"""The single refusal token of the binary variant."""
CATEGORY_PREFIX = "[refuse:"
"""catlens category tokens are ``[refuse:<category>]``."""

COCONOT_CATEGORIES = (
    "Requests with safety concerns",
    "Humanizing requests",
    "Incomplete requests",
    "Indeterminate requests",
    "Unsupported requests",
)
"""CoCoNot's five noncompliance categories in P1's column order (PAPERS §2.3 notation ``C``)."""

P1_CATEGORY_TOKENS = {c: f"[{c}]" for c in COCONOT_CATEGORIES}
"""Category -> token string of the published refusal-token checkpoint (``tomg-group-umd/...-multiple-tokens``)."""

_TOKEN_NAME = re.compile(r"^[A-Za-z0-9_\- ]+$")


def category_token(category: str) -> str:
    """catlens's token string for ``category``: ``category_token("privacy") == "[refuse:privacy]"``."""
    if not isinstance(category, str) or not _TOKEN_NAME.match(category):
        raise ValueError(f"category {category!r} cannot name a token: use letters, digits, '_', '-' or spaces "
                         f"(e.g. 'privacy', 'weapons_drugs').")
    return f"{CATEGORY_PREFIX}{category}]"


# ------------------------------------------------------------------------------------ reading at a refusal token
READ_CONTEXTS = ("chat", "raw")
"""Text around a refusal token when activations are read *at* it (the reads P1's category directions are made of):

* ``"chat"`` (catlens default): the prompt in the model's chat template, the assistant header, then the token as
  the first token of the response: ``template(x) + "[refuse:c]"`` (or ``+ "[respond]"``). The token sits where
  the fine-tune put it, and where the model itself emits it.
* ``"raw"``: P1's extraction string (PAPERS §2.3 A, ``scripts/steering_vector_data.py``): no chat template, no
  header, the prompt followed by a space and the token, with the BOS that TransformerLens's ``to_tokens`` prepends:
  ``BOS + x + " [c]"`` (harmful, category c) or ``BOS + x + " [respond]"`` (benign). This is
  :meth:`catlens.model.LensModel.format`'s ``"p1_append"`` with the append ``" " + token``.

Either way the read position is the token itself (the last token of the text). PAPERS §2.7 lists this as one
of the differences between catlens and P1's code; ``"raw"`` reproduces P1's reads.
"""


def token_read_format(tokens: str | Sequence[str], read_context: str = "chat") -> dict[str, Any]:
    """The ``fmt`` and ``append`` keywords of :func:`catlens.cache.collect` (and :meth:`LensModel.format`) that read
    activations at refusal token(s) ``tokens`` (one string for every prompt, or one per prompt) in ``read_context``
    (:data:`READ_CONTEXTS`)::

        collect(model, harmful, layers=..., **token_read_format([tokens.token_of(p.category) for p in harmful],
                                                                read_context="raw"))

    >>> token_read_format("[respond]", "raw")
    {'fmt': 'p1_append', 'append': ' [respond]'}
    >>> token_read_format(["[refuse:fraud]", "[respond]"])
    {'fmt': 'chat', 'append': ['[refuse:fraud]', '[respond]']}
    """
    if read_context not in READ_CONTEXTS:
        from catlens.errors import unknown_name_message

        raise ValueError(unknown_name_message("read context", read_context, READ_CONTEXTS,
                                              "'chat' reads in the chat template (catlens), 'raw' as P1's code does."))
    single = isinstance(tokens, str)
    items = [tokens] if single else list(tokens)
    for t in items:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"token {t!r} is not a token string; give e.g. '[respond]' or '[refuse:privacy]'.")
    if read_context == "chat":
        return {"fmt": "chat", "append": tokens if single else items}
    spaced = [" " + t for t in items]
    return {"fmt": "p1_append", "append": spaced[0] if single else spaced}


def token_read_texts(model: Any, texts: Sequence[str], tokens: str | Sequence[str], *,
                     read_context: str = "chat") -> list[str]:
    """The strings :func:`token_read_format` makes ``model`` read (the rendered inputs, before tokenising)."""
    return model.format(texts, **token_read_format(tokens, read_context))


# -------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class RefusalTokens:
    """The refusal tokens of one model: one per category (in a fixed order) and the ``[respond]`` token.

    Build with :meth:`for_categories` (catlens naming), :meth:`single` (binary variant), :meth:`p1` (the published
    checkpoint's naming) or :meth:`from_model` / :meth:`from_tokenizer` (detect what a vocabulary has).
    """

    categories: tuple[str, ...]
    """Category names, in column order. The binary variant has the single category ``"refuse"``."""
    refuse: tuple[str, ...]
    """Token string of each category, same order as ``categories``."""
    respond: str = RESPOND
    """Token string that opens an answer."""

    def __post_init__(self) -> None:
        if len(self.categories) == 0:
            raise ValueError("RefusalTokens needs at least one refusal category.")
        if len(self.categories) != len(self.refuse):
            raise ValueError(f"{len(self.categories)} categories but {len(self.refuse)} token strings; give one "
                             f"token per category.")
        strings = [*self.refuse, self.respond]
        if len(set(strings)) != len(strings) or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"refusal tokens must be distinct; got categories={self.categories}, "
                             f"tokens={strings}.")

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def for_categories(cls, categories: Iterable[str]) -> "RefusalTokens":
        """``[refuse:<c>]`` for each category plus ``[respond]``."""
        cats = tuple(categories)
        return cls(cats, tuple(category_token(c) for c in cats))

    @classmethod
    def single(cls) -> "RefusalTokens":
        """The binary variant: ``[refuse]`` and ``[respond]``."""
        return cls(("refuse",), (REFUSE,))

    @classmethod
    def p1(cls) -> "RefusalTokens":
        """The five CoCoNot tokens of the published checkpoint plus ``[respond]``."""
        return cls(COCONOT_CATEGORIES, tuple(P1_CATEGORY_TOKENS[c] for c in COCONOT_CATEGORIES))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RefusalTokens":
        return cls(tuple(d["categories"]), tuple(d["refuse"]), d.get("respond", RESPOND))

    def to_dict(self) -> dict[str, Any]:
        return {"categories": list(self.categories), "refuse": list(self.refuse), "respond": self.respond}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "RefusalTokens":
        """Detect the refusal tokens a tokenizer has (catlens ``[refuse:*]``, ``[refuse]``, or P1's five).

        Raises ``ValueError`` when the vocabulary has no ``[respond]`` token or no refusal token.
        """
        vocab = tokenizer.get_vocab()
        if RESPOND not in vocab:
            raise ValueError("this tokenizer has no '[respond]' token: the model is not a refusal-token model. "
                             "Fine-tune one with `catlens finetune` (or load a checkpoint that has the tokens).")
        ours = sorted((vocab[t], t) for t in vocab if t.startswith(CATEGORY_PREFIX) and t.endswith("]"))
        if ours:
            toks = tuple(t for _, t in ours)
            return cls(tuple(t[len(CATEGORY_PREFIX):-1] for t in toks), toks)
        if REFUSE in vocab:
            return cls.single()
        if all(t in vocab for t in P1_CATEGORY_TOKENS.values()):
            return cls.p1()
        raise ValueError("the tokenizer has '[respond]' but no refusal token ('[refuse:<category>]', '[refuse]' "
                         "or the five CoCoNot tokens of the published checkpoint).")

    @classmethod
    def from_model(cls, model: Any) -> "RefusalTokens":
        """The registry recorded in a catlens fine-tune's manifest, else detected from the tokenizer."""
        finetune = (getattr(model, "provenance", {}) or {}).get("source", {}).get("finetune")
        if finetune and "tokens" in finetune:
            return cls.from_dict(finetune["tokens"])
        return cls.from_tokenizer(model.tokenizer)

    # lookups ------------------------------------------------------------------------------------------
    @property
    def all_tokens(self) -> tuple[str, ...]:
        """Refusal tokens then ``[respond]``: the column order of :func:`special_token_probs`."""
        return (*self.refuse, self.respond)

    def token_of(self, category: str) -> str:
        if category not in self.categories:
            from catlens.errors import unknown_name_message

            raise ValueError(unknown_name_message("refusal category", category, self.categories))
        return self.refuse[self.categories.index(category)]

    def category_of(self, token: str) -> str | None:
        """The category of a refusal token, ``None`` for ``[respond]``; ``ValueError`` for other strings."""
        if token == self.respond:
            return None
        if token in self.refuse:
            return self.categories[self.refuse.index(token)]
        raise ValueError(f"{token!r} is not one of this model's refusal tokens {self.all_tokens}.")

    def ids(self, tokenizer: Any) -> list[int]:
        """Vocabulary ids of :attr:`all_tokens` (a clear error when one is missing)."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.all_tokens if t not in vocab]
        if missing:
            raise ValueError(f"token(s) {missing} are not in this tokenizer's vocabulary; the model was not "
                             f"fine-tuned with these refusal tokens (has it the right --config?).")
        return [int(vocab[t]) for t in self.all_tokens]


def refusal_token_ids(model: Any) -> tuple[RefusalTokens | None, list[int]]:
    """A model's refusal tokens (:meth:`RefusalTokens.from_model`) and their vocabulary ids, refusal tokens then
    ``[respond]``; ``(None, [])`` for a model without refusal tokens (an ordinary chat model)."""
    try:
        tokens = RefusalTokens.from_model(model)
        return tokens, tokens.ids(model.tokenizer)
    except ValueError:
        return None, []


# ------------------------------------------------------------------------------------------- pure scoring
def special_token_probs(
    logits: Float[Tensor, "prompt d_vocab"],
    ids: Sequence[int],
    temperature: float = 1.0,
) -> Float[Tensor, "prompt token"]:
    """``softmax(logits / T)`` over the whole vocabulary, read at ``ids`` (one column per special token)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if not ids:
        raise ValueError("ids is empty: pass the ids of the refusal tokens and [respond].")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp[:, list(ids)].exp()


@dataclass(frozen=True)
class Decision:
    """The first-position decision for a batch of prompts (from :func:`decide`)."""

    refusal_score: Float[Tensor, " prompt"]
    """Summed probability of the refusal tokens (the logit-based refusal score)."""
    respond_prob: Float[Tensor, " prompt"]
    refused: Tensor
    """Bool per prompt: the most probable refusal token beats ``[respond]``."""
    category_index: Int[Tensor, " prompt"]
    """Index (into the registry's categories) of the most probable refusal token."""


def decide(probs: Float[Tensor, "prompt token"]) -> Decision:
    """Decision from :func:`special_token_probs` columns (refusal tokens first, ``[respond]`` last)."""
    if probs.shape[1] < 2:
        raise ValueError(f"probs has {probs.shape[1]} columns; it needs the refusal tokens and [respond] last.")
    refuse, respond = probs[:, :-1], probs[:, -1]
    best, idx = refuse.max(dim=1)
    return Decision(refusal_score=refuse.sum(dim=1), respond_prob=respond, refused=best > respond,
                    category_index=idx)


# --------------------------------------------------------------------------------------- text detection
def find_special_tokens(text: str, tokens: RefusalTokens) -> list[str]:
    """The refusal/``[respond]`` token strings in ``text``, in order of occurrence."""
    pattern = "|".join(re.escape(t) for t in sorted(tokens.all_tokens, key=len, reverse=True))
    return re.findall(pattern, text)


@dataclass(frozen=True)
class ParsedResponse:
    """A generated response split into its opening special token and its text."""

    first_token: str | None
    """The special token the response starts with (``None`` when it starts with ordinary text)."""
    category: str | None
    """Category of an opening refusal token (``None`` for ``[respond]`` or no token)."""
    refused: bool
    """The response opens with a refusal token."""
    n_special: int
    """Number of special tokens anywhere in the response (1 for a well-formed response)."""
    repeated: bool
    """More than one special token in the response (two in a row, or one in the middle of the answer)."""
    body: str
    """The text after the opening token (the whole text when there is none)."""


def parse_response(text: str, tokens: RefusalTokens) -> ParsedResponse:
    """Split a generated response (special tokens visible) into its opening token and its body."""
    found = find_special_tokens(text, tokens)
    stripped = text.lstrip()
    first = next((t for t in tokens.all_tokens if stripped.startswith(t)), None)
    body = stripped[len(first):] if first is not None else text
    category = tokens.category_of(first) if first is not None else None
    return ParsedResponse(first_token=first, category=category, refused=first is not None and category is not None,
                          n_special=len(found), repeated=len(found) > 1, body=body)


# --------------------------------------------------------------------------------------- logits processor
class SpecialTokenGate(LogitsProcessor):
    """Allow ``special_ids`` only at the first generated position (``prompt_length`` = padded prompt length).

    After the first position their scores are set to ``-inf``. With ``force_first`` the first position is
    restricted to the special tokens (the model must open with one of them).
    """

    def __init__(self, special_ids: Sequence[int], prompt_length: int, force_first: bool = False) -> None:
        if not special_ids:
            raise ValueError("SpecialTokenGate needs at least one special token id.")
        self.special_ids = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)
        self.prompt_length = int(prompt_length)
        self.force_first = force_first

    def __call__(self, input_ids: Int[Tensor, "batch pos"], scores: Float[Tensor, "batch d_vocab"]
                 ) -> Float[Tensor, "batch d_vocab"]:
        step = input_ids.shape[1] - self.prompt_length
        ids = self.special_ids.to(scores.device)
        scores = scores.clone()
        if step == 0:
            if self.force_first:
                keep = scores[:, ids].clone()
                scores[:] = float("-inf")
                scores[:, ids] = keep
        else:
            scores[:, ids] = float("-inf")
        return scores


# ------------------------------------------------------------------------------------------- generation
def _resolve_tokens(model: Any, tokens: RefusalTokens | str | None) -> RefusalTokens | None:
    if tokens is None or isinstance(tokens, RefusalTokens):
        return tokens
    if tokens != "auto":
        raise ValueError(f"tokens={tokens!r}: pass a RefusalTokens, 'auto' (detect from the model) or None.")
    try:
        return RefusalTokens.from_model(model)
    except ValueError:
        return None


@torch.inference_mode()
def greedy_batches(
    hf: Any,
    tokenizer: Any,
    rendered: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    special_ids: Sequence[int] = (),
    force_first: bool = False,
    bar: Any = None,
) -> list[list[int]]:
    """Greedy generation of a Hugging Face model for already-rendered prompts: the one batching loop behind
    :func:`generate_ids` and the fine-tune's self-distillation.

    Longest prompts first (little padding), left-padded batches; each response is cut after the first end token
    (kept) and results come back in the caller's order. With ``special_ids`` a :class:`SpecialTokenGate` allows
    them only at the first response position. ``bar`` (a tqdm) is advanced by each batch's size.
    """
    from transformers import LogitsProcessorList

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    eos = tokenizer.eos_token_id
    device = next(hf.parameters()).device
    order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i]))
    results: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask = tokenize_left(tokenizer, [rendered[i] for i in batch], device)
        processors = LogitsProcessorList()
        if special_ids:
            processors.append(SpecialTokenGate(special_ids, ids.shape[1], force_first=force_first))
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=eos, logits_processor=processors)
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), batch):
            results[i] = row[: row.index(eos) + 1] if eos in row else row
        if bar is not None:
            bar.update(len(batch))
    return [results[i] for i in range(len(rendered))]


def generate_ids(
    model: Any,
    prompts: Sequence[str],
    *,
    fmt: str = "chat",
    system: str | None = None,
    append: str = "",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    tokens: RefusalTokens | str | None = "auto",
    gate: bool = True,
    force_first: bool = False,
    hf: Any = None,
    show_progress: bool = True,
) -> list[list[int]]:
    """Greedy generation for ``prompts``; returns each response's token ids, cut after the first end token.

    ``model`` is a :class:`catlens.model.LensModel`. Its ``hf`` model generates through the bridge, so hooks
    (steering) fire; ``hf`` replaces it with another model of the same weights and tokenizer, e.g. a plain Hugging
    Face copy, which is about 1.8x faster when no hooks are needed (``bench/bench_finetune.py``). With ``gate`` and
    a refusal-token model (``tokens="auto"`` detects one), :class:`SpecialTokenGate` allows the special tokens only
    at the first response position (``force_first`` forces one there).
    """
    from tqdm.auto import tqdm

    registry = _resolve_tokens(model, tokens)
    special = registry.ids(model.tokenizer) if (registry is not None and (gate or force_first)) else []
    if force_first and not special:
        raise ValueError("force_first=True needs a refusal-token model (no refusal tokens found).")
    rendered = model.format(list(prompts), fmt, system=system, append=append)
    with tqdm(total=len(rendered), desc="generate", unit="prompt", disable=not show_progress) as bar:
        return greedy_batches(model.hf if hf is None else hf, model.tokenizer, rendered,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, special_ids=special,
                              force_first=force_first, bar=bar)


def decode_response(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode response ids with the refusal tokens visible and the end-of-turn / padding tokens dropped."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)


def generate(model: Any, prompts: Sequence[str], **kwargs: Any) -> list[str]:
    """Greedy batched generation; the decoded responses keep the refusal tokens visible (see :func:`generate_ids`
    for the arguments)."""
    return [decode_response(model.tokenizer, ids) for ids in generate_ids(model, prompts, **kwargs)]


# -------------------------------------------------------------------------------------------- batch scores
@torch.inference_mode()
def first_token_scores(
    model: Any,
    prompts: Sequence[str],
    *,
    tokens: RefusalTokens | None = None,
    fmt: str = "chat",
    system: str | None = None,
    temperature: float = 1.0,
    batch_size: int = 32,
    show_progress: bool = True,
    hf: Any = None,
) -> Any:
    """Refusal-token probabilities at the first response position, one row per prompt (a DataFrame).

    Columns: ``refusal_score`` (summed refusal-token probability), ``respond_prob``, ``refusal_share``
    (``refusal_score / (refusal_score + respond_prob)``), ``refused`` (a refusal token beats ``[respond]``),
    ``predicted_category`` (most probable refusal token's category), ``top_token`` (argmax over the whole
    vocabulary) and one ``p[<token>]`` column per special token.

    Prompts are batched longest first (little padding; rows come back in the caller's order). ``hf``: a plain
    Hugging Face copy of the model (:meth:`catlens.model.LensModel.plain_hf`) to run instead of the bridge, with
    logits at the last position only: the same numbers, several times faster when nothing is steered
    (``bench/bench_steer.py --only scores``).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    registry = tokens or RefusalTokens.from_model(model)
    ids = registry.ids(model.tokenizer)
    rendered = model.format(list(prompts), fmt, system=system)
    order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i]))
    rows: dict[int, dict[str, Any]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="first-token scores", disable=not show_progress):
        batch = order[start:start + batch_size]
        if hf is None:
            logits = model.logits([prompts[i] for i in batch], fmt, system=system)
        else:
            tok_ids, mask = tokenize_left(model.tokenizer, [rendered[i] for i in batch], next(hf.parameters()).device)
            logits = hf(input_ids=tok_ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :].float()
        probs = special_token_probs(logits, ids, temperature)
        d = decide(probs)
        top = logits.argmax(dim=-1).tolist()
        for j, i in enumerate(batch):
            row: dict[str, Any] = {
                "refusal_score": float(d.refusal_score[j]), "respond_prob": float(d.respond_prob[j]),
                "refusal_share": float(d.refusal_score[j] / (d.refusal_score[j] + d.respond_prob[j] + 1e-30)),
                "refused": bool(d.refused[j]),
                "predicted_category": registry.categories[int(d.category_index[j])],
                "top_token": model.tokenizer.convert_ids_to_tokens(top[j]),
            }
            row.update({f"p[{t}]": float(probs[j, k]) for k, t in enumerate(registry.all_tokens)})
            rows[i] = row
    return pd.DataFrame([rows[i] for i in range(len(rendered))])
