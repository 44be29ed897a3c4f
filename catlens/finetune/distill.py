"""The distillation cache: the stock model's own greedy answers to the benign training prompts, cached on disk
per model and prompt text (``cache_dir()/finetunes/.distill/<model_key>.jsonl``)."""

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from catlens.model import cache_dir, render_chat
from catlens.refusal import greedy_batches
from catlens.runs import sha256_text

log = logging.getLogger(__name__)

def model_key(source: Mapping[str, Any]) -> str:
    ident = source.get("file_sha256") or source.get("weights_sha256") or source.get("spec")
    return sha256_text(json.dumps(ident, sort_keys=True))[:16]


def greedy_answers(model: Any, tokenizer: Any, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
                   bar: Any = None) -> list[list[int]]:
    """Greedy chat answers of a plain Hugging Face model (token ids, cut after the end-of-turn token, which is
    kept), in the caller's order: :func:`catlens.refusal.greedy_batches` on the chat-rendered texts."""
    return greedy_batches(model, tokenizer, [render_chat(tokenizer, t) for t in texts],
                          max_new_tokens=max_new_tokens, batch_size=batch_size, bar=bar)


def distill_answers(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    model_key: str,
    max_new_tokens: int,
    cache: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[tuple[list[int], bool]]:
    """The model's own greedy answers (token ids, at most ``max_new_tokens``) to ``texts`` and whether each answer
    ended by itself (end-of-turn token, which is not included). ``model`` is the plain Hugging Face model (1.8x
    faster to generate with than through the bridge; bench/bench_finetune.py).

    Answers are cached in ``cache_dir()/finetunes/.distill/<model_key>.jsonl`` keyed by model and prompt text,
    appended per batch, so reruns and interrupted runs reuse them. A cached answer serves any shorter length
    (greedy decoding: the first n tokens of a longer answer are the n-token answer).
    """
    path = cache_dir(cache) / "finetunes" / ".distill" / f"{model_key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id
    known: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from an interruption
            if len(row["ids"]) >= len(known.get(row["key"], [])) or (row["ids"] and row["ids"][-1] == eos):
                known[row["key"]] = row["ids"]

    def usable(ids: list[int] | None) -> bool:
        return ids is not None and (len(ids) >= max_new_tokens or (bool(ids) and ids[-1] == eos))

    keys = [sha256_text(t) for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if not usable(known.get(k))}.items())
    if todo:
        log.info("self-distillation: %d answers to generate (%d cached)", len(todo), len(set(keys)) - len(todo))
    from tqdm.auto import tqdm

    chunk = batch_size * 2
    with tqdm(total=len(todo), desc="self-distil", unit="answer", disable=not show_progress or not todo) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            ids = greedy_answers(model, tokenizer, [t for _, t in part], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, bar=bar)
            with open(path, "a") as f:
                for (k, _), row in zip(part, ids):
                    f.write(json.dumps({"key": k, "ids": row}) + "\n")
                    known[k] = row
                f.flush()
                os.fsync(f.fileno())
    out = []
    for k in keys:
        ids = list(known[k])
        if eos in ids[:max_new_tokens + 1]:
            out.append((ids[:ids.index(eos)], True))
        else:
            out.append((ids[:max_new_tokens], False))
    return out

