"""The activation store: run prompts through a model, read chosen sites, layers and token positions, and keep the
result in memory or stream it to disk in shards.

On disk a store is a folder::

    store.json                 config + model provenance + prompt-set hash + dims; written first
    index.parquet              one row per prompt (id, text, label, category, source, split, n_tokens)
    shards/00000.safetensors   one tensor per site: [prompt pos layer d] for the prompts of that shard

Shards are written atomically (temporary file, then rename), so an interrupted run leaves only complete shards;
calling :func:`collect` again with the same arguments skips them and computes the rest. Only one shard of
activations is held in memory at a time, so peak memory does not grow with the number of prompts.

Positions (``positions=``):

* ``"last"``: the last prompt token after formatting (with the chat template: the final token of the assistant
  header, where the response is decided);
* ``"mean"``: the mean over the tokens of the user's instruction (template tokens excluded);
* ``"mean_all"``: the mean over every non-pad token;
* ``"post_instruction"``: each token after the instruction (the template's assistant header plus any ``append``);
  Arditi et al.'s "post-instruction" positions. The count must be the same for every prompt;
* a sequence of negative offsets, e.g. ``(-3, -2, -1)``: explicit positions from the end of each prompt.
"""

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from catlens.errors import unknown_name_message
from catlens.model import LensModel, Site, hook_name
from catlens.runs import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

_NAMED_POSITIONS = ("last", "mean", "mean_all", "post_instruction")
_STORE_VERSION = 1


@dataclass(frozen=True)
class ActivationStore:
    """Activations of a set of prompts: ``data[site]`` is ``[prompt pos layer d]`` (``d`` = d_model, or
    n_heads*d_head for ``z``). ``index`` has one row per prompt, in the same order."""

    data: dict[str, Tensor]
    index: Any  # pd.DataFrame
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.data)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s}: {tuple(t.shape)}" for s, t in self.data.items())
        return f"ActivationStore(n={len(self)}, layers={len(self.layers)}, positions={self.positions}, {shapes})"

    def _site(self, site: Site | str) -> str:
        key = Site.parse(site).value
        if key not in self.data:
            raise KeyError(f"site {key!r} was not collected; this store has {', '.join(self.data) or 'no sites'}. "
                           f"Collect it with collect(..., sites=[{key!r}]).")
        return key

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not collected; this store has layers {list(self.layers)}.")
        return self.layers.index(layer)

    def get(self, site: Site | str = Site.RESID_POST, pos: int = -1) -> Float[Tensor, "prompt layer d_model"]:
        """All layers at one read position (default: the last of the read positions)."""
        return self.data[self._site(site)][:, pos]

    def get_all(self, site: Site | str = Site.RESID_POST) -> Float[Tensor, "prompt pos layer d_model"]:
        return self.data[self._site(site)]

    def at(self, site: Site | str, layer: int, pos: int = -1) -> Float[Tensor, "prompt d_model"]:
        return self.get(site, pos)[:, self.layer_index(layer)]

    def where(self, **conditions: Any) -> "ActivationStore":
        """Rows whose index columns match: ``store.where(label="harmful", split=["train", "val"])``."""
        import numpy as np

        keep = np.ones(len(self.index), dtype=bool)
        for column, value in conditions.items():
            if column not in self.index.columns:
                raise KeyError(f"unknown index column {column!r}; columns: {', '.join(self.index.columns)}.")
            values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
            col = self.index[column]
            hit = col.isin([v for v in values if v is not None]).to_numpy()
            if any(v is None for v in values):
                hit |= col.isna().to_numpy()
            keep &= hit
        rows = torch.from_numpy(np.flatnonzero(keep))
        return ActivationStore({s: t[rows] for s, t in self.data.items()}, self.index[keep].reset_index(drop=True),
                               self.layers, self.positions, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ActivationStore":
        import pandas as pd
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "store.json").exists():
            raise FileNotFoundError(f"{str(path)!r} is not an activation store (no store.json); create one with "
                                    f"collect(..., out=path) or `catlens cache`.")
        meta = json.loads((path / "store.json").read_text())
        index = pd.read_parquet(path / "index.parquet")
        n_shards = math.ceil(len(index) / meta["shard_size"]) if len(index) else 0
        missing = [k for k in range(n_shards) if not _shard_path(path, k).exists()]
        if missing:
            raise FileNotFoundError(f"store {str(path)!r} is incomplete: {len(missing)} of {n_shards} shards missing "
                                    f"(first: {missing[0]}). Rerun the same collect/`catlens cache` call to resume.")
        data: dict[str, Tensor] = {}
        start = 0
        for k in range(n_shards):  # one shard in memory besides the result: peak = store + one shard
            part = load_file(_shard_path(path, k))
            rows = next(iter(part.values())).shape[0]
            for site, t in part.items():
                if site not in data:
                    data[site] = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype)
                data[site][start:start + rows] = t
            start += rows
        if start != len(index):
            raise ValueError(f"store {str(path)!r} has {start} rows in its shards for {len(index)} prompts in its "
                             f"index; delete it and collect again.")
        if not n_shards:
            data = {s: torch.empty(0) for s in meta["sites"]}
        return cls(data, index, tuple(meta["layers"]), tuple(map(str, meta["positions"])), meta)


def _shard_path(root: Path, k: int) -> Path:
    return root / "shards" / f"{k:05d}.safetensors"


def _parse_positions(positions: str | Sequence[int]) -> tuple[str, ...]:
    if isinstance(positions, str):
        if positions not in _NAMED_POSITIONS:
            raise ValueError(unknown_name_message("positions", positions, _NAMED_POSITIONS,
                                                  "Or give a sequence of negative offsets like (-2, -1)."))
        return (positions,)
    offsets = tuple(int(p) for p in positions)
    if not offsets or any(p >= 0 for p in offsets):
        raise ValueError(f"positions={positions!r}: explicit offsets must be negative (counted from the end of the "
                         f"prompt, -1 = last token), e.g. (-3, -2, -1).")
    return tuple(str(p) for p in offsets)


def collect(model: LensModel, prompts: Any, sites: Sequence[Site | str] = (Site.RESID_POST,),
            layers: Sequence[int] | None = None, positions: str | Sequence[int] = "last", *, fmt: str = "chat",
            system: str | None = None, append: str | Sequence[str] = "", batch_size: int = 16,
            out: str | os.PathLike[str] | None = None, shard_size: int = 256, dtype: str = "float32",
            show_progress: bool = True) -> ActivationStore:
    """Run ``prompts`` (a PromptSet, or a list of strings) through ``model`` and read activations.

    ``layers=None`` reads every layer. With ``out`` the store is streamed to that folder in shards and an
    interrupted call resumes; without it everything stays in memory. Forward passes stop after the last
    requested layer.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    site_list = [Site.parse(s) for s in sites]
    if not site_list:
        raise ValueError("sites is empty; ask for at least one, e.g. sites=['resid_post'].")
    if Site.PATTERN in site_list:
        raise ValueError("the attention pattern has a prompt-dependent shape and is not stored; read it with "
                         "model.bridge.run_with_cache(...) and catlens.model.hook_name('pattern', layer).")
    layer_list = tuple(range(model.n_layers)) if layers is None else tuple(model.layer(l) for l in layers)
    if len(set(layer_list)) != len(layer_list):
        raise ValueError(f"layers={list(layers or [])} has duplicates.")
    pos_names = _parse_positions(positions)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: choose float32, float16 or bfloat16.")
    store_dtype = getattr(torch, dtype)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size} and shard_size={shard_size} must be positive.")

    index = _index_frame(prompts)
    texts = index["text"].tolist()
    appends = [append] * len(texts) if isinstance(append, str) else list(append)
    if len(appends) != len(texts):
        raise ValueError(f"append has {len(appends)} entries for {len(texts)} prompts.")
    rendered = model.format(texts, fmt, system=system, append=appends)
    meta = {
        "version": _STORE_VERSION,
        "model": model.provenance,
        "sites": [s.value for s in site_list],
        "layers": list(layer_list),
        "positions": list(pos_names),
        "fmt": fmt,
        "system": system,
        "append": append if isinstance(append, str) else "per-prompt",
        "dtype": dtype,
        "shard_size": shard_size,
        "n_prompts": len(texts),
        "prompts_sha256": _frame_hash(index[["id", "text"]]) if len(index) else None,
        "prompt_provenance": getattr(prompts, "provenance", None),
        "dims": {s.value: ["prompt", "pos", "layer", "d_head*head" if s is Site.Z else "d_model"] for s in site_list},
    }
    root = Path(out) if out is not None else None
    if root is not None:
        _prepare_folder(root, meta, index)
    n = len(texts)
    shard_ranges = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)] if root is not None else [(0, n)]
    todo = [k for k in range(len(shard_ranges)) if root is None or not _shard_path(root, k).exists()]
    if root is not None and len(todo) < len(shard_ranges):
        log.info("resuming %s: %d of %d shards already done", root, len(shard_ranges) - len(todo), len(shard_ranges))
    n_tokens = [0] * n
    bar = tqdm(total=sum(shard_ranges[k][1] - shard_ranges[k][0] for k in todo), desc="collect", unit="prompt",
               disable=not show_progress)
    memory: list[dict[str, Tensor]] = []
    for k in todo:
        a, b = shard_ranges[k]
        chunks: dict[str, list[Tensor]] = {s.value: [] for s in site_list}
        for start in range(a, b, batch_size):
            stop = min(start + batch_size, b)
            acts, lengths = _forward_batch(model, rendered[start:stop], texts[start:stop], site_list, layer_list,
                                           pos_names, fmt)
            for s in chunks:
                chunks[s].append(acts[s].to(store_dtype))
            n_tokens[start:stop] = lengths
            bar.update(stop - start)
        shard = {s: torch.cat(c).contiguous() for s, c in chunks.items()}
        if root is not None:
            from safetensors.torch import save_file

            with atomic_path(_shard_path(root, k)) as tmp:
                save_file(shard, str(tmp), metadata={"rows": f"{a}:{b}"})
        else:
            memory.append(shard)
    bar.close()
    if root is not None:
        return ActivationStore.load(root)
    data = {s.value: torch.cat([m[s.value] for m in memory]) if memory else torch.empty(0) for s in site_list}
    index = index.assign(n_tokens=n_tokens)
    return ActivationStore(data, index, layer_list, pos_names, meta)


def _prepare_folder(root: Path, meta: dict[str, Any], index: Any) -> None:
    """Write store.json and index.parquet, or check that an existing store was made with the same arguments."""
    if (root / "store.json").exists():
        old = json.loads((root / "store.json").read_text())
        keys = ("sites", "layers", "positions", "fmt", "system", "append", "dtype", "shard_size", "prompts_sha256")
        diff = [k for k in keys if old.get(k) != meta[k]]
        if old.get("model", {}).get("name") != meta["model"].get("name"):
            diff.append("model")
        if diff:
            raise FileExistsError(f"{str(root)!r} holds a store made with different {', '.join(diff)}; choose another "
                                  f"--out or delete it to start afresh.")
        return
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{str(root)!r} is not empty and is not an activation store; choose another --out.")
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / "index.parquet") as tmp:
        index.to_parquet(tmp, index=False)
    write_json_atomic(root / "store.json", meta)


def _index_frame(prompts: Any) -> Any:
    import pandas as pd

    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        return pd.DataFrame({"id": [f"p{i}" for i in range(len(prompts))], "text": list(prompts), "label": None,
                             "category": None, "source": "inline", "split": None})
    if hasattr(prompts, "to_frame"):
        frame = prompts.to_frame()
        return frame[[c for c in ("id", "text", "label", "category", "source", "split") if c in frame.columns]]
    raise TypeError(f"prompts must be a PromptSet or a list of strings, got {type(prompts).__name__}.")


def _frame_hash(frame: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for row in frame.itertuples(index=False):
        h.update(json.dumps(list(row)).encode())
    return h.hexdigest()


def _instruction_masks(model: LensModel, rendered: Sequence[str], texts: Sequence[str], width: int
                       ) -> tuple[Tensor, Tensor]:
    """Left-padded boolean masks ``[batch pos]`` of the instruction tokens and of the tokens after them."""
    enc = model.tokenizer(list(rendered), add_special_tokens=False, return_offsets_mapping=True)
    instr = torch.zeros(len(rendered), width, dtype=torch.bool)
    after = torch.zeros(len(rendered), width, dtype=torch.bool)
    for i, (r, t, offsets) in enumerate(zip(rendered, texts, enc["offset_mapping"])):
        start = r.rfind(t)
        if start < 0 or not t:
            raise ValueError(f"prompt {i}: could not find the instruction text in the formatted prompt.")
        end = start + len(t)
        pad = width - len(offsets)
        for j, (a, b) in enumerate(offsets):
            if a < end and b > start:
                instr[i, pad + j] = True
            elif a >= end:
                after[i, pad + j] = True
    return instr, after


@torch.inference_mode()
def _forward_batch(model: LensModel, rendered: Sequence[str], texts: Sequence[str], sites: Sequence[Site],
                   layers: Sequence[int], positions: Sequence[str], fmt: str) -> tuple[dict[str, Tensor], list[int]]:
    ids, mask = model.tokenize(rendered)
    width = ids.shape[1]
    need_masks = positions[0] in ("mean", "post_instruction")
    if need_masks:
        instr, after = _instruction_masks(model, rendered, texts, width)
    if positions[0] == "post_instruction":
        counts = after.sum(1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise ValueError(f"post_instruction positions need the same number (>0) of tokens after every "
                             f"instruction; got {counts.tolist()}. Use explicit offsets instead.")
        offsets = list(range(-int(counts[0]), 0))
    elif positions[0].lstrip("-").isdigit():
        offsets = [int(p) for p in positions]
        short = (mask.sum(1) < -min(offsets)).nonzero().flatten().tolist()
        if short:
            raise ValueError(f"offset {min(offsets)} reaches before the start of prompt(s) {short} of this batch.")
    else:
        offsets = [-1]
    reduce_mask = {"mean": instr if need_masks else None, "mean_all": mask.bool()}.get(positions[0])

    store: dict[str, list[Tensor]] = {s.value: [None] * len(layers) for s in sites}  # type: ignore[misc]
    slot = {hook_name(s, l): (s.value, i) for s in sites for i, l in enumerate(layers)}

    def reader(site: str, i: int) -> Any:
        # Hook names can be aliases (hook_z is attn.o.hook_in), so each hook gets its own slot by closure.
        def read(act: Tensor, hook: Any) -> Tensor:
            x = act.flatten(2) if act.dim() == 4 else act  # z: [batch pos head d_head] -> [batch pos head*d_head]
            if reduce_mask is not None:
                m = reduce_mask.to(x.dtype).unsqueeze(-1)
                value = ((x * m).sum(1) / m.sum(1).clamp_min(1)).unsqueeze(1)
            else:
                value = x[:, offsets]
            store[site][i] = value.float().cpu()
            return act

        return read

    with model.bridge.hooks(fwd_hooks=[(name, reader(*where)) for name, where in slot.items()]):
        model.bridge(ids, attention_mask=mask, stop_at_layer=max(layers) + 1)
    missing = [name for name, (s, i) in slot.items() if store[s][i] is None]
    if missing:
        raise RuntimeError(f"hooks did not fire for {missing[:3]}: the bridge skipped them. Report this with the model "
                           f"name; catlens checks every read so this cannot pass silently.")
    acts = {s: torch.stack(v, dim=2) for s, v in store.items()}  # [batch pos layer d]
    return acts, mask.sum(1).tolist()
