"""The fine-tune's record: a checkpoint folder is a :class:`catlens.runs.RunDir` whose ``manifest.json`` holds the
fine-tune's own record (config and data hashes, tokens, data counts, training summary) under ``finetune``.
Checkpoints written before that format carry the same record in ``catlens_finetune.json``; :func:`read_manifest`
(:func:`catlens.runs.read_finetune_manifest`, which the model loader and the report use too) reads both."""

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catlens.finetune.config import FinetuneConfig
from catlens.finetune.data import TrainingData
from catlens.finetune.training import TrainResult
from catlens.runs import FINETUNE_MANIFEST as MANIFEST  # noqa: F401  (the fine-tune package's names for them)
from catlens.runs import LEGACY_FINETUNE_MANIFEST as LEGACY_MANIFEST  # noqa: F401
from catlens.runs import RunDir, atomic_path
from catlens.runs import read_finetune_manifest as read_manifest  # noqa: F401

KIND = "catlens-finetune"


def _git_commit() -> str | None:
    from catlens.runs import git_state

    return git_state().get("git_commit")


def build_manifest(config: FinetuneConfig, data: TrainingData, prep: Any, result: TrainResult, name: str,
                   seconds: float) -> dict[str, Any]:
    harmful, benign = prep.harmful, prep.benign
    log_rows = result.log
    return {
        "name": name,
        "config": config.to_dict(),
        "config_hash": config.hash,
        "data_hash": data.content_hash,
        "learning_rate": config.learning_rate,
        "tokens": prep.tokens.to_dict(),
        "token_ids": dict(zip(prep.tokens.all_tokens, prep.special_ids)),
        "base": {"spec": config.base, "folder": prep.base_folder, "source": prep.base_source},
        "data": {
            "origin": data.origin,
            "categories": list(data.categories),
            "harmful": {"n": len(harmful), "content_hash": harmful.content_hash,
                        "per_category": dict(Counter(harmful.categories_of)),
                        "sources": dict(Counter(p.source for p in harmful))},
            "benign": {"n": len(benign), "content_hash": benign.content_hash,
                       "roles": dict(Counter(p.meta.get("role") for p in benign)),
                       "sources": dict(Counter(p.source for p in benign))},
            "left_out_too_long": {"harmful": len(data.harmful) - len(harmful), "benign": len(data.benign) - len(benign)},
            "form_mix": data.mix().to_dict("records"),
            "eval_sets": {n: {"n": len(s), "content_hash": s.content_hash} for n, s in data.eval_sets.items()},
            "notes": data.notes,
            "distilled_answers": {"n": len(benign), "finished": prep.finished_answers,
                                  "max_new_tokens": config.answer_tokens},
        },
        "init": prep.init_summary,
        "method": {"name": config.method, "trainable_tensors": len(prep.trainable)},
        "training": {
            "steps": config.steps, "examples": len(prep.examples),
            "epochs": round(config.steps * config.batch_size / len(prep.examples), 3),
            "train_seconds": round(result.seconds, 1), "distill_seconds": round(prep.distill_seconds, 1),
            "resumed_from_step": result.resumed_from,
            "final_loss": log_rows[-1]["loss"] if log_rows else None,
            "first_token_acc_last10": float(sum(r["first_token_acc"] for r in log_rows[-10:])
                                            / max(len(log_rows[-10:]), 1)),
        },
        "total_seconds": round(seconds, 1),
        "git_commit": _git_commit(),
        "versions": prep.versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_finetune(model: Any, tokenizer: Any, target: Path, manifest: Mapping[str, Any],
                  train_log: Sequence[Mapping[str, Any]], prompt_ids: Mapping[str, Sequence[str]]) -> Path:
    """Write the checkpoint folder atomically as a :class:`catlens.runs.RunDir`: ``manifest.json`` first (config,
    seed, versions, git state; the fine-tune's own record under ``finetune``), then safetensors weights,
    tokenizer + chat template, ``train_log.csv`` and ``training_prompt_ids.json``, each registered with its
    sha256 under ``outputs``."""
    import pandas as pd

    manifest = dict(manifest)
    with atomic_path(target) as tmp:
        run = RunDir.create(tmp, config=manifest.get("config"), seed=(manifest.get("config") or {}).get("seed"))
        run.update_manifest(kind=KIND, finetune=manifest, models={"base": manifest.get("base", {})})
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pd.DataFrame(list(train_log)).to_csv(tmp / "train_log.csv", index=False)
        (tmp / "training_prompt_ids.json").write_text(json.dumps({k: list(v) for k, v in prompt_ids.items()}))
        for f in sorted(tmp.iterdir()):
            if f.is_file() and f.name != "manifest.json":
                run._register(f)
        run.finish()
    return target
