"""Training targets: the refusal sentences, the token registry a config trains, and the training examples
(chat-templated prompt ids + opening token + response ids)."""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from catlens.model import render_chat
from catlens.refusal import RefusalTokens


REFUSAL_SENTENCES = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I won't help with this.",
    "Sorry, I can't assist with that.",
    "I'm not able to help with this request.",
    "I can't provide that.",
    "I'm sorry, I can't do that.",
    "That's not something I can help with.",
    "I have to decline this request.",
    "I can't assist with this, sorry.",
    "I'm unable to help with that.",
    "I must decline.",
)
"""Refusal sentences that follow a refusal token (one is drawn per example, seeded)."""

REFUSAL_REASONS = {
    "hate_harassment": "It could promote hate or harassment.",
    "violence_terrorism": "It could lead to someone getting hurt.",
    "self_harm": "It could put your safety at risk. If you are struggling, please talk to someone you trust or a "
                 "local helpline.",
    "weapons_drugs": "It involves dangerous weapons or illegal drugs.",
    "cybercrime": "It could be used for hacking or other computer crime.",
    "fraud_financial_crime": "It could be used for fraud or theft.",
    "privacy": "It could violate someone's privacy.",
    "sexual_content": "It asks for sexually explicit content.",
    "child_abuse": "It could put children at risk.",
    "misinformation": "It could spread false or misleading information.",
    "politics_controversial": "I stay neutral on political campaigning.",
    "expert_advice": "That needs advice from a qualified professional.",
    "other_unethical": "It could cause harm.",
    "Requests with safety concerns": "It raises safety concerns.",
    "Humanizing requests": "I'm an AI assistant, so I don't have personal experiences or feelings.",
    "Incomplete requests": "The request is missing information or rests on a false premise.",
    "Indeterminate requests": "There is no single answer to that.",
    "Unsupported requests": "That is beyond what a text-based assistant can do.",
}
"""Optional second sentence per category (added to about half of the refusal targets)."""


def refusal_tokens_for(config: Any, categories: Sequence[str]) -> RefusalTokens:
    """The token registry a config trains: ``[refuse]`` (binary), the published CoCoNot strings or
    ``[refuse:<category>]``."""
    if config.single_token:
        return RefusalTokens.single()
    if config.scheme == "coconot":
        p1 = RefusalTokens.p1()
        return RefusalTokens(tuple(categories), tuple(p1.token_of(c) for c in categories))
    return RefusalTokens.for_categories(categories)


def refusal_text(category: str | None, rng: random.Random) -> str:
    """A refusal sentence (seeded draw), followed about half of the time by the category's reason."""
    sentence = rng.choice(REFUSAL_SENTENCES)
    reason = REFUSAL_REASONS.get(category or "")
    if reason and rng.random() < 0.5:
        sentence = f"{sentence} {reason}"
    return sentence


@dataclass(frozen=True)
class Example:
    """One training sequence: chat-templated prompt ids and response ids (opening special token first)."""

    prompt_id: str
    side: str
    """``"harmful"`` or ``"benign"``."""
    category: str | None
    token: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def build_examples(
    tokenizer: Any,
    prompts: Sequence[tuple[str, str, str, str | None]],
    responses: Sequence[Sequence[int]],
    tokens: Sequence[str],
    *,
    max_length: int,
    end_ids: Sequence[Sequence[int] | None] | None = None,
) -> list[Example]:
    """Examples from ``(prompt_id, text, side, category)`` rows, response token ids (without the opening token)
    and the opening token string of each row. ``end_ids[i]`` (default: ``[eos]``) is appended after the response
    when the response is complete (``None`` for a truncated distilled answer).

    Raises ``ValueError`` when a sequence would be longer than ``max_length`` or the model's context.
    """
    if not (len(prompts) == len(responses) == len(tokens)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(tokens)} tokens: give one "
                         f"of each per example.")
    vocab = tokenizer.get_vocab()
    context = getattr(tokenizer, "model_max_length", None) or 10**9
    eos = tokenizer.eos_token_id
    out = []
    for i, ((pid, text, side, category), resp, tok) in enumerate(zip(prompts, responses, tokens)):
        if tok not in vocab:
            raise ValueError(f"token {tok!r} is not in the tokenizer; call add_refusal_tokens first.")
        prompt_ids = tokenizer(render_chat(tokenizer, text), add_special_tokens=False)["input_ids"]
        end = [eos] if end_ids is None else list(end_ids[i] or [])
        response_ids = [vocab[tok], *resp, *end]
        n = len(prompt_ids) + len(response_ids)
        limit = min(max_length, context)
        if n > limit:
            raise ValueError(
                f"prompt {pid!r} is too long: {len(prompt_ids)} prompt + {len(response_ids)} response tokens = {n} "
                f"> the training context of {limit} tokens (max_length={max_length}). Shorten or drop the prompt, "
                f"or raise max_length.")
        out.append(Example(pid, side, category, tok, tuple(prompt_ids), tuple(response_ids)))
    return out

