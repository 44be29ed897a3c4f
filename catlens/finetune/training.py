"""The training loop: the seeded batch schedule, collation, the response-only loss, the learning-rate schedule
and :func:`train` (atomic checkpoints, exact resumption, a stop on a non-finite loss)."""

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from catlens.errors import NonFiniteLossError
from catlens.finetune.config import FinetuneConfig
from catlens.finetune.targets import Example
from catlens.runs import atomic_path

log = logging.getLogger(__name__)


def make_schedule(sides: Sequence[str], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Batches of example indices for ``steps`` steps. Each epoch shuffles each side (``"harmful"``/``"benign"``)
    with a seeded generator and interleaves them in proportion, so every batch holds both sides in about the
    training ratio (batches of one side make the first-token decision oscillate)."""
    if not sides:
        raise ValueError("no training examples.")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sides):
        groups.setdefault(s, []).append(i)
    n = len(sides)
    batches: list[list[int]] = []
    while len(batches) < steps:
        queues = {k: rng.sample(v, len(v)) for k, v in sorted(groups.items())}
        taken = dict.fromkeys(queues, 0)
        order = []
        for j in range(n):  # proportional merge: next from the side furthest behind its share
            k = min(queues, key=lambda k: ((taken[k] + 0.5) / len(queues[k]), k))
            order.append(queues[k][taken[k]])
            taken[k] += 1
        batches += [order[j:j + batch_size] for j in range(0, n - batch_size + 1, batch_size)] or [order]
    return batches[:steps]


def collate(examples: Sequence[Example], first_token_weight: float, pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 outside responses), loss ``weights`` and
    ``first`` (the position that predicts the opening special token)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    weights = torch.zeros((len(examples), width))
    first = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, e in enumerate(examples):
        seq = [*e.prompt_ids, *e.response_ids]
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        # position t predicts token t+1: response token j sits at len(prompt)+j, predicted from the position before
        start = len(e.prompt_ids) - 1
        labels[b, start:start + len(e.response_ids)] = torch.tensor(e.response_ids)
        weights[b, start:start + len(e.response_ids)] = 1.0
        weights[b, start] = first_token_weight
        first[b, start] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights, "first": first}


def response_loss(model: Any, batch: Mapping[str, Tensor], special_ids: Sequence[int], *,
                  detach_inputs: bool = False) -> tuple[Tensor, dict[str, float]]:
    """Weighted cross-entropy over the response tokens; the logits are computed only at labelled positions.

    ``detach_inputs`` stops the gradient at the input embeddings (the new token rows then learn only as output
    rows), so the backward pass ends at the first trainable block: what makes ``last-k`` cheaper than ``full``."""
    decoder = model.get_decoder()  # the blocks and final norm without the output layer (any architecture)
    if detach_inputs:
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
        hidden = decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    sel = batch["labels"] != -100
    logits = model.get_output_embeddings()(hidden[sel])
    targets = batch["labels"][sel]
    w = batch["weights"][sel]
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    loss = (ce * w).sum() / w.sum()
    with torch.no_grad():
        first = batch["first"][sel]
        rest = ~first
        pred = logits.argmax(-1)
        special = torch.tensor(list(special_ids), device=pred.device)
        stats = {
            "loss": float(loss),
            "first_token_loss": float(ce[first].mean()),
            "first_token_acc": float((pred[first] == targets[first]).float().mean()),
            "rest_loss": float(ce[rest].mean()) if bool(rest.any()) else float("nan"),
            "special_elsewhere": float(torch.isin(pred[rest], special).float().mean()) if bool(rest.any()) else 0.0,
        }
    return loss, stats


def lr_scale(step: int, config: FinetuneConfig) -> float:
    """Multiplier of every peak learning rate at ``step``: linear warm-up, then linear decay to 0.1."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    return 1.0 - 0.9 * (step - config.warmup_steps) / span


@dataclass
class TrainResult:
    log: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None


def train(
    model: Any,
    examples: Sequence[Example],
    config: FinetuneConfig,
    *,
    special_ids: Sequence[int],
    pad_id: int,
    work_dir: Path | None = None,
    resume: bool = False,
    run_key: str = "",
    show_progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run ``config.steps`` optimiser steps on ``examples`` (trainable parameters already marked).

    With ``work_dir``, a checkpoint (trainable parameters, optimiser state, step, log) is written there atomically
    every ``config.checkpoint_every`` steps; with ``resume`` the loop continues from it. ``run_key`` must match the
    checkpoint's (it encodes the config and data hashes). ``callback(step, stats)`` runs after each step.
    """
    from tqdm.auto import tqdm

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("no trainable parameters: call set_trainable first.")
    # The new token rows learn at their own rate (config.new_token_lr): their gradient is routed from the (tied)
    # embedding matrix into a separate parameter, whose values are copied back after every step. Rows with an
    # always-zero gradient stay exactly unchanged under AdamW without weight decay.
    emb = model.get_input_embeddings().weight
    rows = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=emb.device)
    groups = [{"params": list(params.values()), "lr": config.learning_rate, "base_lr": config.learning_rate}]
    hook = None
    if emb.requires_grad:
        new_rows = torch.nn.Parameter(emb.detach()[rows].clone())

        def route(grad: Tensor) -> Tensor:
            new_rows.grad = grad[rows].clone()
            grad = grad.clone()
            grad[rows] = 0
            return grad

        hook = emb.register_hook(route)
        params = {**params, "new_token_rows": new_rows}
        groups.append({"params": [new_rows], "lr": config.new_token_lr, "base_lr": config.new_token_lr})
    # the fused kernel: one pass over each tensor instead of a Python loop of elementwise ops (about 9x faster on the
    # CPU for this model; the same update up to float rounding, bench/bench_finetune.py --only adam)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=fused)
    schedule = make_schedule([e.side for e in examples], config.steps, config.batch_size, config.seed)
    start, history, resumed_from = 0, [], None
    ckpt = work_dir / "checkpoint.pt" if work_dir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        import pickle

        try:  # tensors, numbers, strings and containers only: no code runs while reading
            state = torch.load(ckpt, weights_only=True, map_location=emb.device)
        except pickle.UnpicklingError as e:
            raise ValueError(f"the checkpoint {str(ckpt)!r} holds more than tensors and numbers, so it was not "
                             f"written by this trainer and is not loaded ({str(e).splitlines()[0]}); delete "
                             f"{str(work_dir)!r} or pass --overwrite to start afresh.") from None
        if state["run_key"] != run_key:
            raise ValueError(f"the checkpoint in {str(work_dir)!r} belongs to a different run (config or data changed);"
                             f" pass --overwrite to start afresh.")
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t)
            if hook is not None:
                emb[rows] = new_rows
        opt.load_state_dict(state["optimizer"])
        start, history, resumed_from = state["step"], state["log"], state["step"]
        log.info("resuming from step %d", start)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc="fine-tune", disable=not show_progress, initial=start,
               total=config.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale(step, config)
        batch = collate([examples[i] for i in schedule[step]], config.first_token_weight, pad_id)
        batch = {k: v.to(emb.device) for k, v in batch.items()}
        loss, stats = response_loss(model, batch, special_ids, detach_inputs=config.method == "last-k")
        if not math.isfinite(stats["loss"]):
            if hook is not None:
                hook.remove()
            raise NonFiniteLossError(
                f"the training loss became {stats['loss']} at step {step + 1} of {config.steps} (learning rate "
                f"{opt.param_groups[0]['lr']:.3g}); training stopped. Lower lr/new_token_lr (--set lr=...) or "
                f"use dtype='float32'.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hook is not None:
            with torch.no_grad():
                emb[rows] = new_rows
        stats = {"step": step + 1, "lr": opt.param_groups[0]["lr"], **stats,
                 "seconds": round(time.perf_counter() - t0, 2)}
        history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", first_acc=f"{stats['first_token_acc']:.2f}")
        if (step + 1) % 10 == 0 or step + 1 == config.steps:
            log.info("step %d/%d loss %.4f first-token loss %.4f acc %.2f", step + 1, config.steps, stats["loss"],
                     stats["first_token_loss"], stats["first_token_acc"])
        if ckpt is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < config.steps:
            with atomic_path(ckpt) as tmp:
                torch.save({"run_key": run_key, "step": step + 1, "log": history, "optimizer": opt.state_dict(),
                            "params": {n: p.detach().clone() for n, p in params.items()}}, tmp)
        if callback is not None:
            callback(step + 1, stats)
    if hook is not None:
        hook.remove()
    model.eval()
    return TrainResult(history, time.perf_counter() - t0, resumed_from)

