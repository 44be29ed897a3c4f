"""Model surgery: new special tokens, their prototype initialisation, LoRA adapters (peft) and the trainable
parameter masks. Modules are reached through ``transformers``' generic accessors (``get_input_embeddings``,
``get_output_embeddings``, ``get_decoder().layers``), not Llama paths, so any causal LM works."""

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from catlens.finetune.config import FinetuneConfig
from catlens.model import decoder_blocks, render_chat, tokenize_left
from catlens.refusal import RefusalTokens

log = logging.getLogger(__name__)


def final_norm(model: Any) -> torch.nn.Module:
    """The norm after the last block (``get_decoder().norm`` / ``final_layernorm`` / ``ln_f``)."""
    decoder = model.get_decoder()
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(decoder).__name__} has no final norm under a known name; use method='full' or 'lora'.")


def add_refusal_tokens(model: Any, tokenizer: Any, tokens: RefusalTokens) -> list[int]:
    """Add the registry's tokens as special tokens and resize the (tied) embeddings; returns their ids in
    ``tokens.all_tokens`` order. Tokens already present are reused."""
    new = [t for t in tokens.all_tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokens.ids(tokenizer)


@torch.inference_mode()
def last_position_hidden(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16
                         ) -> Float[Tensor, "prompt d_model"]:
    """Final (post-norm) hidden state at the first response position of each chat-templated prompt."""
    rows = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize_left(tokenizer, [render_chat(tokenizer, t) for t in texts[start:start + batch_size]],
                                  model.device)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        rows.append(out.hidden_states[-1][:, -1, :].float())
    return torch.cat(rows)


def prototype_rows(
    hidden: Mapping[str, Float[Tensor, "prompt d_model"]],
    top_logit: Mapping[str, Float[Tensor, " prompt"]],
    contrast: float = 1.0,
    anchor: Float[Tensor, " d_model"] | None = None,
) -> dict[str, Float[Tensor, " d_model"]]:
    """Embedding row per token (pure). ``mu_t`` = mean hidden state of the token's prompts, ``mu_bar`` = mean of
    the ``mu_t``, ``p_t = mu_bar + contrast * (mu_t - mu_bar)``; the row is ``anchor + s_t * p_t`` (``anchor`` = 0
    when ``None``) with ``s_t`` chosen so that its mean logit ``mean_i(h_i . row)`` on the token's prompts equals
    their mean top stock logit."""
    mus = {tok: h.mean(dim=0) for tok, h in hidden.items()}
    mu_bar = torch.stack(list(mus.values())).mean(dim=0)
    rows = {}
    for tok, h in hidden.items():
        p = mu_bar + contrast * (mus[tok] - mu_bar)
        base = torch.zeros_like(p) if anchor is None else anchor.to(p)
        mean_dot = float((h @ p).mean())
        if mean_dot <= 0:
            raise ValueError(f"prototype of {tok!r} has a non-positive mean logit on its own prompts "
                             f"({mean_dot:.3g}); lower prototype_contrast={contrast} or use init='mean'.")
        gap = float(top_logit[tok].mean() - (h @ base).mean())
        if gap <= 0:  # the anchor token is already the top token there: add the unanchored prototype row
            log.warning("the anchor already reaches the top logit on the prompts of %r; its prototype is scaled as "
                        "without an anchor", tok)
            gap = float(top_logit[tok].mean())
        rows[tok] = base + p * (gap / mean_dot)
    return rows


def init_new_embeddings(model: Any, tokenizer: Any, tokens: RefusalTokens, groups: Mapping[str, Sequence[str]],
                        init: str, n_old: int, contrast: float = 1.0, anchor: str | None = None) -> dict[str, Any]:
    """Set the new token rows (``init`` = ``"prototype"`` from ``groups[token]`` prompts, or ``"mean"``); returns a
    summary for the manifest. ``anchor`` (a string that is one token, e.g. ``"\\n"``) is added under the
    prototype: as an *input* the new token then reads like the anchor token plus a small category signal, so the
    stock model continues fluently after it before any training (the tied embedding is also the input)."""
    emb = model.get_input_embeddings().weight
    ids = tokens.ids(tokenizer)
    new = [(t, i) for t, i in zip(tokens.all_tokens, ids) if i >= n_old]
    summary: dict[str, Any] = {"init": init, "anchor": anchor}
    with torch.no_grad():
        if init == "mean":
            mean = emb[:n_old].mean(dim=0)
            for _, i in new:
                emb[i] = mean
            return summary
        anchor_row = None
        if anchor is not None:
            anchor_ids = tokenizer(anchor, add_special_tokens=False)["input_ids"]
            if len(anchor_ids) != 1:
                raise ValueError(f"prototype_anchor={anchor!r} is {len(anchor_ids)} tokens; give a string that is "
                                 f"exactly one token (e.g. '\\n'), or None for no anchor.")
            anchor_row = emb[anchor_ids[0]].detach().clone()
        hidden, top = {}, {}
        for t, _ in new:
            texts = list(groups.get(t, []))
            if not texts:
                raise ValueError(f"no training prompts for token {t!r}: cannot build its prototype.")
            h = last_position_hidden(model, tokenizer, texts)
            logits = h @ emb[:n_old].T
            hidden[t], top[t] = h, logits.max(dim=-1).values
        rows = prototype_rows(hidden, top, contrast, anchor_row)
        for t, row in rows.items():
            emb[tokenizer.convert_tokens_to_ids(t)] = row
        summary["prompts_per_token"] = {t: len(groups.get(t, [])) for t, _ in new}
        summary["row_norm"] = {t: round(float(emb[tokenizer.convert_tokens_to_ids(t)].norm()), 4) for t, _ in new}
        if anchor_row is not None:
            summary["anchor_norm"] = round(float(anchor_row.norm()), 4)
        # how often the initialised rows already make the right first-token decision among the new tokens
        right = total = 0
        new_ids = torch.tensor([i for _, i in new])
        for j, (t, _) in enumerate(new):
            pick = (hidden[t] @ emb[new_ids].T).argmax(-1)
            right += int((pick == j).sum())
            total += len(pick)
        summary["initial_first_token_acc_among_new"] = round(right / max(total, 1), 4)
    return summary


LORA_TARGETS = "all-linear"
"""peft's target for every linear layer of the decoder blocks (the output layer excluded), for any architecture."""


def apply_lora(model: Any, rank: int, alpha: float, seed: int) -> Any:
    """Wrap ``model`` in a peft LoRA model (rank ``rank`` adapters on every linear layer of the blocks, scale
    ``alpha / rank``; ``B`` starts at zero). The ``A`` matrices are drawn from a ``torch.Generator`` seeded with
    ``seed`` (Kaiming-uniform, as peft does), so the result does not depend on the global random state."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                            target_modules=LORA_TARGETS, init_lora_weights=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_A." in name:
                init = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=gen)
                p.copy_(init.to(p))
    return lora


def merge_lora(model: Any) -> Any:
    """The plain model with the LoRA updates merged into its weights (a model without adapters is returned as is)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def set_trainable(model: Any, config: FinetuneConfig, n_old: int) -> list[str]:
    """Mark the trainable parameters for ``config.method``; returns their names. For ``last-k`` and ``lora`` only
    the new rows of the (tied) embedding matrix learn (a gradient hook zeroes the other rows)."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        emb.requires_grad_(True)

        def only_new_rows(grad: Tensor) -> Tensor:
            grad = grad.clone()
            grad[:n_old] = 0
            return grad

        emb.register_hook(only_new_rows)
        if config.method == "last-k":
            blocks = decoder_blocks(model)
            k = min(config.last_k, len(blocks))
            for layer in blocks[-k:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
            for p in final_norm(model).parameters():
                p.requires_grad_(True)
        else:
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]

