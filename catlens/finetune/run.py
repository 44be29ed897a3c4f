"""The driver: :func:`prepare` (load, self-distil, build examples, add and initialise the tokens, mark the
trainable parameters), :func:`finetune` (validate, train with resumable checkpoints, save) and
:func:`ensure_refusal_model` (the cached fine-tune of a config, trained first when missing)."""

import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catlens.finetune.config import FinetuneConfig, default_name, get_config
from catlens.finetune.data import TrainingData, resolve_origin, assemble_data
from catlens.finetune.distill import distill_answers, model_key
from catlens.finetune.manifest import build_manifest, read_manifest, save_finetune
from catlens.finetune.surgery import add_refusal_tokens, apply_lora, init_new_embeddings, merge_lora, set_trainable
from catlens.finetune.targets import Example, build_examples, refusal_text, refusal_tokens_for
from catlens.finetune.training import train
from catlens.model import DTYPES, cache_dir, embedded_checkpoint, render_chat, resolve_spec
from catlens.prompts import PromptSet
from catlens.refusal import RefusalTokens
from catlens.runs import sha256_text, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
"""The resumable checkpoint inside a run's work folder."""
OWNER = "owner.json"
"""pid and host of the process working in a work folder (a live owner's folder is never removed)."""


def _base_folder(spec: str, cache: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(local folder, kind) of the base model: the converted checkpoint of an embedded model, else the folder."""
    kind, where = resolve_spec(spec, cache)
    if kind == "embedded":
        return str(embedded_checkpoint(where, cache)), kind
    return where, kind


def _live_owner(work: Path) -> int | None:
    """The pid of another live process on this host that owns the work folder ``work``, else ``None``."""
    try:
        owner = json.loads((work / OWNER).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if owner.get("host") != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def check_inputs(config: FinetuneConfig, *, cache: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None) -> None:
    """Fail early (before any folder is made or any model loaded) on a base model that does not resolve, a data
    directory that does not exist and a device that is not available."""
    resolve_spec(config.base, cache)
    if data_dir is not None:  # an explicit folder must exist, even for data="builtin" (which does not read it)
        from catlens.datasets import resolve_data_dir

        resolve_data_dir(data_dir)
    if config.data == "datasets":
        resolve_origin(config, data_dir)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r}: CUDA is not available on this machine (use device='cpu').")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={config.device!r}: MPS is not available on this machine (use device='cpu').")


def finetune(
    config: FinetuneConfig | str = "default",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    cache: str | os.PathLike[str] | None = None,
    data: TrainingData | None = None,
    show_progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Fine-tune ``config`` and return the checkpoint folder (see the module docstring).

    ``out`` defaults to ``cache_dir()/finetunes/<default_name(config)>``. An existing folder with the same config
    and data hashes is reused as is; a different one needs ``overwrite``. An interrupted run leaves a work folder
    ``.<name>.work`` beside it: pass ``resume`` to continue it (or ``overwrite`` to discard it). ``data`` replaces
    :func:`assemble_data` (tests, custom data).
    """
    if isinstance(config, str):
        config = get_config(config)
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: choose one.")
    target = Path(out) if out is not None else cache_dir(cache) / "finetunes" / default_name(config)
    work = target.parent / f".{target.name}.work"
    t_start = time.perf_counter()

    # everything that can be checked is checked before any folder is created
    check_inputs(config, cache=cache, data_dir=None if data is not None else data_dir)
    data = data or assemble_data(config, data_dir)
    existing = read_manifest(target) if target.exists() else None
    if target.exists() and any(target.iterdir()):
        if existing and existing.get("config_hash") == config.hash and \
                existing.get("data_hash") == data.content_hash and not overwrite:
            log.info("reusing the fine-tune in %s (same config and data)", target)
            return target
        if not overwrite:
            why = "a different config or data" if existing else "no catlens fine-tune manifest"
            raise FileExistsError(f"output folder {str(target)!r} already exists ({why}). Pass --overwrite to "
                                  f"replace it, or choose another --out.")
    owner = _live_owner(work)
    if owner is not None:
        raise FileExistsError(f"another fine-tune (pid {owner}) is running in {str(work)!r}; wait for it to finish "
                              f"or choose another --out.")
    if work.exists() and not (work / CHECKPOINT).exists():
        shutil.rmtree(work)  # a work folder without a checkpoint (a killed run) holds nothing to resume
    if work.exists() and not resume:
        if not overwrite:
            raise FileExistsError(f"an interrupted fine-tune is in {str(work)!r}. Pass --resume to continue it or "
                                  f"--overwrite to start afresh.")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        write_json_atomic(work / OWNER, {"pid": os.getpid(), "host": socket.gethostname()})
        prep = prepare(config, data, cache=cache, show_progress=show_progress)
        run_key = sha256_text(config.hash + data.content_hash)
        write_json_atomic(work / "run.json", {"config": config.to_dict(), "config_hash": config.hash,
                                              "data_hash": data.content_hash})
        result = train(prep.model, prep.examples, config, special_ids=prep.special_ids,
                       pad_id=prep.tokenizer.pad_token_id, work_dir=work, resume=resume, run_key=run_key,
                       show_progress=show_progress, callback=callback)
    except BaseException:
        if not (work / CHECKPOINT).exists():  # failed before the first checkpoint: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    model = merge_lora(prep.model)
    for p in model.parameters():
        p.requires_grad_(False)
    manifest = build_manifest(config, data, prep, result, target.name, time.perf_counter() - t_start)
    save_finetune(model, prep.tokenizer, target, manifest, result.log,
                  {"harmful": prep.harmful.ids, "benign": prep.benign.ids})
    shutil.rmtree(work, ignore_errors=True)
    log.info("fine-tune saved to %s (%.0f s in total)", target, time.perf_counter() - t_start)
    return target


@dataclass
class Prepared:
    """Everything :func:`train` needs, built by :func:`prepare`."""

    model: Any
    """The Hugging Face model with the new tokens, initialised and with its trainable parameters marked (a peft
    model for ``method="lora"``: :func:`catlens.finetune.surgery.merge_lora` gives the plain model)."""
    tokenizer: Any
    tokens: RefusalTokens
    special_ids: list[int]
    examples: list[Example]
    harmful: PromptSet
    """Harmful training prompts actually used (over-long ones left out)."""
    benign: PromptSet
    finished_answers: int
    distill_seconds: float
    init_summary: dict[str, Any]
    trainable: list[str]
    base_folder: str
    base_source: dict[str, Any]
    versions: dict[str, Any]


def prepare(config: FinetuneConfig, data: TrainingData, *, cache: str | os.PathLike[str] | None = None,
            show_progress: bool = True) -> Prepared:
    """Load the base model, self-distil the benign answers, build the examples, add and initialise the new tokens
    and mark the trainable parameters (deterministic given the config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from catlens.model import folder_source
    from catlens.runs import package_version as _version

    base_folder, kind = _base_folder(config.base, cache)
    source = folder_source(base_folder, config.base, kind)
    versions = {p: _version(p) for p in ("catlens", "transformer-lens", "transformers", "torch")}
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=DTYPES[config.dtype]).to(config.device).eval()

    # -- drop over-long prompts, then self-distil the benign answers (the stock model, before the new tokens)
    def short(ps: PromptSet) -> PromptSet:
        return ps.filter(lambda p: len(tokenizer(render_chat(tokenizer, p.text), add_special_tokens=False)
                                       ["input_ids"]) <= config.max_prompt_tokens, "max_prompt_tokens")

    harmful, benign = short(data.harmful), short(data.benign)
    if len(harmful) < len(data.harmful) or len(benign) < len(data.benign):
        log.info("left out %d harmful and %d benign prompts longer than %d tokens", len(data.harmful) - len(harmful),
                 len(data.benign) - len(benign), config.max_prompt_tokens)
    t0 = time.perf_counter()
    answers = distill_answers(model, tokenizer, benign.texts, model_key=model_key(source),
                              max_new_tokens=config.answer_tokens, cache=cache, show_progress=show_progress)
    distill_seconds = time.perf_counter() - t0

    tokens = refusal_tokens_for(config, data.categories)
    rng = random.Random(config.seed)
    rows, responses, opening, ends = [], [], [], []
    for p in harmful:
        rows.append((p.id, p.text, "harmful", p.category))
        responses.append(tokenizer(refusal_text(p.category, rng), add_special_tokens=False)["input_ids"])
        opening.append(tokens.refuse[0] if config.single_token else tokens.token_of(p.category))
        ends.append([tokenizer.eos_token_id])
    for p, (ids, finished) in zip(benign, answers):
        rows.append((p.id, p.text, "benign", p.category))
        responses.append(ids)
        opening.append(tokens.respond)
        ends.append([tokenizer.eos_token_id] if finished else None)

    # -- model with the new tokens
    n_old = model.get_input_embeddings().weight.shape[0]
    special_ids = add_refusal_tokens(model, tokenizer, tokens)
    examples = build_examples(tokenizer, rows, responses, opening, max_length=config.max_length, end_ids=ends)
    k = config.prototype_prompts
    groups: dict[str, list[str]] = {}
    for tok in tokens.refuse:
        texts = harmful.texts if config.single_token else harmful.where(category=tokens.category_of(tok)).texts
        groups[tok] = random.Random(f"{config.seed}|{tok}").sample(texts, min(k, len(texts)))
    groups[tokens.respond] = random.Random(f"{config.seed}|respond").sample(benign.texts, min(k, len(benign)))
    init_summary = init_new_embeddings(model, tokenizer, tokens, groups, config.init, n_old,
                                       config.prototype_contrast, config.prototype_anchor)
    if config.method == "lora":
        model = apply_lora(model, config.lora_rank, config.lora_alpha, config.seed)
    trainable = set_trainable(model, config, n_old)
    return Prepared(model=model, tokenizer=tokenizer, tokens=tokens, special_ids=special_ids, examples=examples,
                    harmful=harmful, benign=benign, finished_answers=sum(f for _, f in answers),
                    distill_seconds=distill_seconds, init_summary=init_summary, trainable=trainable,
                    base_folder=base_folder, base_source=source, versions=versions)


def ensure_refusal_model(config: FinetuneConfig | str = "default", cache: str | os.PathLike[str] | None = None,
                         *, data_dir: str | os.PathLike[str] | None = None, show_progress: bool = True) -> Path:
    """The cached fine-tune folder of ``config`` (``cache_dir()/finetunes/refusal-<name>``), trained first when
    missing. An interrupted run of the same config is resumed; a cached folder or work folder from an older version
    of the preset (different config hash) is replaced."""
    if isinstance(config, str):
        config = get_config(config)
    target = cache_dir(cache) / "finetunes" / default_name(config)
    manifest = read_manifest(target) if target.exists() else None
    if manifest and manifest.get("config_hash") == config.hash:
        return target
    if target.exists():
        log.warning("replacing the cached fine-tune %s: it was trained with a different version of the %r config",
                    target, config.name)
        shutil.rmtree(target)
    work = target.parent / f".{target.name}.work"
    resume = False
    owner = _live_owner(work)
    if owner is not None:
        raise FileExistsError(f"another process (pid {owner}) is training {str(target)!r} right now; wait for it "
                              f"to finish, then call again.")
    if work.exists():
        try:
            resume = json.loads((work / "run.json").read_text()).get("config_hash") == config.hash
        except (OSError, json.JSONDecodeError):
            resume = False
        if not resume:
            shutil.rmtree(work)
    return finetune(config, data_dir=data_dir, cache=cache, resume=resume, show_progress=show_progress)

