"""The activation store: run prompts through a model, read chosen sites, layers and token positions, and keep the
result in memory or stream it to disk in shards.

On disk a store is a folder::

    store.json                 format version, config, model identity, prompt/format hashes, dims, and one entry per
                               finished shard (its row range, shapes, sha256, byte size, token counts)
    index.parquet              one row per prompt (id, text, label, category, source, split)
    shards/00000.safetensors   one tensor per site: [prompt pos layer d] for the prompts of that shard

Setup is atomic: the folder is built under a temporary name beside ``out`` and renamed into place, so a kill during
setup leaves either nothing or a complete empty store (temporary folders of a killed setup are removed by the next
run). Each shard's checksum is recorded in ``store.json`` before the shard itself is renamed into place, so an
interrupted run leaves only complete, recorded shards; calling :func:`collect` again with the same arguments
verifies them, skips them and computes the rest. "The same arguments" means: every field of every prompt (id, text,
label, category, split, source, meta), the formatting (``fmt``, ``system``, ``append`` and the rendered strings, so
also the chat template), the sites, layers, positions, dtype and shard size, and the model's identity (name, dtype,
a hash of its weight files from its provenance, and a hash of its parameters as they are in memory, so weights
changed after loading are caught too). Anything else is refused with a message saying what differs.

Memory: ``collect(..., out=...)`` renders, tokenises, checks and hashes the prompts a chunk at a time, fills one
shard at a time and hands freed heap memory back after each shard, so its peak does not grow with the number of
prompts beyond the index (``bench/bench_store.py --tiny``).

:meth:`ActivationStore.load` (and ``collect(..., out=...)``) return a *lazy* store: nothing is read until an
accessor asks, and then only the shards, prompts, positions and layers asked for (through ``safetensors``' memory
map), so a store larger than memory can be opened and sliced. Every shard's sha256, row range and shapes are checked
against ``store.json`` on load; a mismatch is an error naming the file.

Positions (``positions=``):

* ``"last"``: the last prompt token after formatting (with the chat template: the final token of the assistant
  header, where the response is decided);
* ``"mean"``: the mean over the tokens of the user's instruction (template tokens excluded);
* ``"mean_all"``: the mean over every non-pad token;
* ``"post_instruction"``: each token after the instruction (the template's assistant header plus any ``append``);
  Arditi et al.'s "post-instruction" positions. The count must be the same for every prompt;
* a sequence of negative offsets, e.g. ``(-3, -2, -1)``: explicit positions from the end of each prompt.

Every argument (including the positions against every prompt's tokens) is checked before any folder is created.
"""

import hashlib
import json
import logging
import operator
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from catlens.errors import StoreError, unknown_name_message
from catlens.options import parse_read_positions
from catlens.model import LensModel, Site, hook_name
from catlens.runs import atomic_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

_STORE_VERSION = 2
_INDEX_COLUMNS = ("id", "text", "label", "category", "source", "split")
# store.json keys that must match for a rerun to resume (in the order differences are reported)
_RESUME_KEYS = ("version", "model_identity", "n_prompts", "prompts_sha256", "sites", "layers", "positions", "fmt",
                "system", "append", "append_sha256", "rendered_sha256", "dtype", "shard_size")
_CHUNK = 1 << 20
_SCAN_CHUNK = 512  # prompts rendered, tokenised and hashed at a time by the checks before collecting
_FIX = "Rerun the same collect call (`catlens cache`) to recompute it, or pass overwrite=True (--overwrite) to start afresh."


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str)  # what json.dumps(obj, **these) uses


def _sha256_json(obj: Any) -> str:
    return _sha256_bytes(_JSON.encode(obj).encode())


class _JsonListHash:
    """``_sha256_json(list(items))`` fed piece by piece: ``json.dumps`` writes a list as ``[a, b, ...]`` with each
    element encoded on its own, so hashing the pieces gives the same digest without building the whole list or its
    JSON text (the store's hashes of prompts and renderings stay those of earlier stores)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"[")
        self._first = True

    def update(self, items: Any) -> None:
        for x in items:
            if not self._first:
                self._h.update(b", ")
            self._first = False
            self._h.update(_JSON.encode(x).encode())

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(b"]")
        return h.hexdigest()


# --------------------------------------------------------------------------------------------- lazy data
@dataclass(frozen=True)
class _Shard:
    path: Path
    start: int  # first global row
    stop: int  # one past the last global row


class ShardedData(Mapping):
    """The tensors of an on-disk store, read on demand: ``data[site]`` reads the whole site (selected rows only);
    :meth:`read` reads one position and/or one layer. ``rows`` (global row numbers, in order) selects prompts."""

    def __init__(self, shards: Sequence[_Shard], shapes: Mapping[str, tuple[int, ...]],
                 dtypes: Mapping[str, torch.dtype], rows: Any = None) -> None:
        import numpy as np

        self.shards = tuple(shards)
        self.shapes = dict(shapes)  # site -> trailing shape (pos, layer, d)
        self.dtypes = dict(dtypes)
        self.n_total = self.shards[-1].stop if self.shards else 0
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __contains__(self, site: object) -> bool:
        # Mapping's default __contains__ is ``self[site]``, which would read the whole site from disk: every
        # ``store.at(...)`` checked its site that way, so each one-layer read first read all layers of all prompts
        # (peak memory = the whole site; bench/bench_store.py's memory part).
        return site in self.shapes

    def __getitem__(self, site: str) -> Tensor:
        return self.read(site)

    @property
    def n_rows(self) -> int:
        return self.n_total if self.rows is None else len(self.rows)

    def shape(self, site: str) -> tuple[int, ...]:
        return (self.n_rows, *self.shapes[site])

    def subset(self, rows: Any) -> "ShardedData":
        """The rows ``rows`` (positions in this selection) as a new lazy selection."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        chosen = rows if self.rows is None else self.rows[rows]
        return ShardedData(self.shards, self.shapes, self.dtypes, chosen)

    def read(self, site: str, pos: int | None = None, layer: int | None = None) -> Tensor:
        """``[row pos layer d]`` with ``pos`` / ``layer`` (axis indices, >= 0) dropped when given."""
        import numpy as np
        from safetensors import safe_open

        tail = self.shapes[site]
        key = (slice(None) if pos is None else pos, slice(None) if layer is None else layer)
        out_tail = [n for n, k in zip(tail[:2], key) if isinstance(k, slice)] + [tail[2]]
        out = torch.empty((self.n_rows, *out_tail), dtype=self.dtypes[site])
        for shard in self.shards:
            if self.rows is None:
                lo, hi, where, local = 0, shard.stop - shard.start, slice(shard.start, shard.stop), None
            else:
                hit = np.flatnonzero((self.rows >= shard.start) & (self.rows < shard.stop))
                if not len(hit):
                    continue
                local = self.rows[hit] - shard.start
                lo, hi, where = int(local.min()), int(local.max()) + 1, torch.from_numpy(hit)
            try:
                with safe_open(str(shard.path), framework="pt") as f:
                    part = f.get_slice(site)[(slice(lo, hi), *key)]
            except Exception as err:  # noqa: BLE001 - the file changed after load; name it
                raise StoreError(f"could not read {site!r} from {str(shard.path)!r} ({err}); the file changed or was "
                                 f"damaged after the store was opened. {_FIX}") from err
            if local is not None and not (len(local) == hi - lo and bool((np.diff(local) == 1).all())):
                part = part[torch.from_numpy(local - lo)]
            out[where] = part
        return out


# ------------------------------------------------------------------------------------------------ the store
@dataclass(frozen=True)
class ActivationStore:
    """Activations of a set of prompts: ``data[site]`` is ``[prompt pos layer d]`` (``d`` = d_model, or
    n_heads*d_head for ``z``). ``index`` has one row per prompt, in the same order.

    A store from :meth:`load` or ``collect(..., out=...)`` is lazy (``data`` is a :class:`ShardedData`): the
    accessors read only what they return, and :meth:`where` stays lazy. :meth:`to_memory` reads everything."""

    data: Mapping[str, Any]  # site -> Tensor; Any, so that a runtime type checker does not read a lazy site to check it
    index: Any  # pd.DataFrame
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.data)

    @property
    def lazy(self) -> bool:
        return isinstance(self.data, ShardedData)

    def __len__(self) -> int:
        return len(self.index)

    def _shape(self, site: str) -> tuple[int, ...]:
        return self.data.shape(site) if isinstance(self.data, ShardedData) else tuple(self.data[site].shape)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s}: {self._shape(s)}" for s in self.data)
        lazy = ", lazy" if self.lazy else ""
        return f"ActivationStore(n={len(self)}, layers={len(self.layers)}, positions={self.positions}{lazy}, {shapes})"

    def _site(self, site: Site | str) -> str:
        key = Site.parse(site).value
        if key not in self.data:
            raise KeyError(f"site {key!r} was not collected; this store has {', '.join(self.data) or 'no sites'}. "
                           f"Collect it with collect(..., sites=[{key!r}]).")
        return key

    def _pos(self, site: str, pos: int) -> int:
        n = self._shape(site)[1]
        given = pos
        try:
            pos = operator.index(pos)
        except TypeError:
            pos = n  # not an integer: reported below
        if not -n <= pos < n:
            raise IndexError(f"pos={given!r} is out of range: this store read {n} position(s) per prompt "
                             f"({', '.join(self.positions)}); use 0..{n - 1} or -{n}..-1.")
        return pos % n

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not collected; this store has layers {list(self.layers)}.")
        return self.layers.index(layer)

    def _read(self, site: str, pos: int | None, layer: int | None) -> Tensor:
        if isinstance(self.data, ShardedData):
            return self.data.read(site, pos, layer)
        t = self.data[site]
        if pos is not None and layer is not None:
            return t[:, pos, layer]
        return t[:, pos] if pos is not None else t

    def get(self, site: Site | str = Site.RESID_POST, pos: int = -1) -> Float[Tensor, "prompt layer d_model"]:
        """All layers at one read position (default: the last of the read positions)."""
        key = self._site(site)
        return self._read(key, self._pos(key, pos), None)

    def get_all(self, site: Site | str = Site.RESID_POST) -> Float[Tensor, "prompt pos layer d_model"]:
        """Every read position and layer (on a lazy store this reads the whole site)."""
        return self._read(self._site(site), None, None)

    def at(self, site: Site | str, layer: int, pos: int = -1) -> Float[Tensor, "prompt d_model"]:
        """One layer at one read position (a lazy store reads only that slice of each shard)."""
        key = self._site(site)
        return self._read(key, self._pos(key, pos), self.layer_index(layer))

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
        rows = np.flatnonzero(keep)
        if isinstance(self.data, ShardedData):
            data: Mapping[str, Tensor] = self.data.subset(rows)
        else:
            data = {s: t[torch.from_numpy(rows)] for s, t in self.data.items()}
        return ActivationStore(data, self.index[keep].reset_index(drop=True), self.layers, self.positions, self.meta)

    def to_memory(self) -> "ActivationStore":
        """The same store with every tensor read into memory (a no-op on an in-memory store)."""
        if not isinstance(self.data, ShardedData):
            return self
        return ActivationStore({s: self.data.read(s) for s in self.data}, self.index, self.layers, self.positions,
                               self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, lazy: bool = True, verify: bool = True) -> "ActivationStore":
        """Open a store folder. ``lazy=True`` (default) reads tensors only when asked; ``verify=True`` (default)
        checks every shard's sha256 against ``store.json`` (one streaming pass; row ranges, shapes and sites are
        always checked)."""
        store = _load(Path(path), verify=verify, trusted=frozenset())
        return store if lazy else store.to_memory()


def _shard_name(k: int) -> str:
    return f"{k:05d}.safetensors"


def _shard_path(root: Path, k: int) -> Path:
    return root / "shards" / _shard_name(k)


def _shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def _read_store_json(root: Path) -> dict[str, Any]:
    path = root / "store.json"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{str(path)!r} is damaged (not valid JSON: {err}). The store cannot be trusted; pass "
                         f"overwrite=True (--overwrite) to recompute it, or use another folder.") from err
    if not isinstance(meta, dict) or "version" not in meta:
        raise StoreError(f"{str(path)!r} is not an activation store's metadata (no 'version'). Pass overwrite=True "
                         f"(--overwrite) to recompute it, or use another folder.")
    if meta["version"] not in (1, _STORE_VERSION):
        raise StoreError(f"{str(path)!r} has store format version {meta['version']!r}; this catlens reads versions "
                         f"1 and {_STORE_VERSION}. Recompute the store with this catlens (overwrite=True).")
    return meta


def _read_index(root: Path, n_expected: int | None) -> Any:
    import pandas as pd

    path = root / "index.parquet"
    if not path.exists():
        raise StoreError(f"{str(root)!r} has store.json but no index.parquet; the store is damaged. {_FIX}")
    try:
        index = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise StoreError(f"{str(path)!r} is damaged or truncated ({type(err).__name__}: {err}). {_FIX}") from err
    if n_expected is not None and len(index) != n_expected:
        raise StoreError(f"{str(path)!r} has {len(index)} rows but store.json records {n_expected} prompts; the "
                         f"index does not belong to this store. {_FIX}")
    return index


def _interrupted_setup(root: Path) -> bool:
    """``root`` holds only what an interrupted store setup leaves (no store.json): ours to clean."""
    if not root.is_dir() or (root / "store.json").exists():
        return False
    entries = list(root.iterdir())
    if not entries:
        return False
    ours = re.compile(r"^(index\.parquet|shards|\.(index\.parquet|store\.json)\..*\.tmp)$")
    if not all(ours.match(e.name) for e in entries):
        return False
    shards = root / "shards"
    return not shards.exists() or all(p.name.startswith(".") for p in shards.iterdir())


def _shard_entries(meta: dict[str, Any], root: Path, n: int) -> dict[str, dict[str, Any]]:
    entries = meta.get("shards")
    if meta["version"] >= 2 and not isinstance(entries, dict):
        raise StoreError(f"{str(root / 'store.json')!r} has no shard records; the store is damaged. {_FIX}")
    return entries or {}


def _check_shard(root: Path, k: int, a: int, b: int, meta: dict[str, Any], entry: dict[str, Any] | None,
                 verify: bool) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Check one shard file against its record; return its trailing shapes and dtypes per site."""
    from safetensors import safe_open

    path = _shard_path(root, k)
    rel = f"shards/{_shard_name(k)}"
    if entry is not None:
        if list(entry.get("rows", [])) != [a, b]:
            raise StoreError(f"store.json records rows {entry.get('rows')} for {rel} of {str(root)!r}, but with "
                             f"shard_size={meta['shard_size']} it must hold rows {a}:{b}; the store is damaged. {_FIX}")
        if verify:
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise StoreError(f"{rel} of store {str(root)!r} has {size} bytes but {entry['bytes']} were written "
                                 f"(truncated or replaced). {_FIX}")
            digest = sha256_file(path, _CHUNK)
            if digest != entry["sha256"]:
                raise StoreError(f"{rel} of store {str(root)!r} fails its checksum (recorded sha256 "
                                 f"{entry['sha256'][:12]}..., file {digest[:12]}...): it was changed, damaged or "
                                 f"swapped with another shard after it was written. {_FIX}")
    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
            keys = list(f.keys())
            shapes = {s: tuple(f.get_slice(s).get_shape()) for s in keys}
            dtypes = {s: f.get_slice(s).get_dtype() for s in keys}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for damaged headers
        raise StoreError(f"{rel} of store {str(root)!r} is damaged or truncated ({err}). {_FIX}") from err
    if file_meta.get("rows") != f"{a}:{b}":
        raise StoreError(f"{rel} of store {str(root)!r} holds rows {file_meta.get('rows')!r} but the index puts rows "
                         f"{a}:{b} there (swapped or foreign shard). {_FIX}")
    if entry is not None and meta.get("store_id") and file_meta.get("store_id") != meta["store_id"]:
        raise StoreError(f"{rel} of store {str(root)!r} was written by another store (store id "
                         f"{file_meta.get('store_id')!r}, expected {meta['store_id']!r}). {_FIX}")
    if sorted(keys) != sorted(meta["sites"]):
        raise StoreError(f"{rel} of store {str(root)!r} holds sites {sorted(keys)} but store.json lists "
                         f"{sorted(meta['sites'])}. {_FIX}")
    for s, shape in shapes.items():
        expected_tail = tuple(entry["shapes"][s]) if entry is not None else None
        if len(shape) != 4 or shape[0] != b - a or shape[2] != len(meta["layers"]) or (
                expected_tail is not None and shape[1:] != expected_tail):
            raise StoreError(f"{rel} of store {str(root)!r}: {s!r} has shape {list(shape)} but the store needs "
                             f"[{b - a} rows, pos, {len(meta['layers'])} layers, d]"
                             f"{f' = {[b - a, *expected_tail]}' if expected_tail else ''}. {_FIX}")
    torch_dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return {s: shape[1:] for s, shape in shapes.items()}, {s: torch_dtypes.get(d, torch.float32)
                                                            for s, d in dtypes.items()}


def _load(root: Path, *, verify: bool, trusted: frozenset[str]) -> ActivationStore:
    if root.exists() and not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is a file, not an activation store folder.")
    if not (root / "store.json").exists():
        if _interrupted_setup(root):
            raise FileNotFoundError(f"interrupted store: rerun to resume, or pass overwrite=True (--overwrite). The "
                                    f"setup of {str(root)!r} stopped before it finished; rerun the same collect call "
                                    f"(`catlens cache`).")
        raise FileNotFoundError(f"{str(root)!r} is not an activation store (no store.json); create one with "
                                f"collect(..., out=path) or `catlens cache`.")
    meta = _read_store_json(root)
    index = _read_index(root, meta.get("n_prompts") if meta["version"] >= 2 else None)
    n = len(index)
    if meta["version"] == 1:
        log.warning("%s was written by an older catlens (store format 1) without checksums: its shards' row ranges "
                    "and shapes are checked, their contents cannot be. Recompute it (overwrite=True) to get checksums.",
                    root)
    ranges = _shard_ranges(n, int(meta["shard_size"]))
    if not ranges:
        raise StoreError(f"{str(root)!r} holds 0 prompts (an empty store from an older catlens); there is nothing to "
                         f"load. Collect it again from a non-empty prompt set (overwrite=True).")
    entries = _shard_entries(meta, root, n)
    missing = [k for k in range(len(ranges))
               if not _shard_path(root, k).exists() or (meta["version"] >= 2 and _shard_name(k) not in entries)]
    if missing:
        raise FileNotFoundError(f"interrupted store: rerun to resume, or pass overwrite=True (--overwrite). "
                                f"{str(root)!r} is incomplete: {len(missing)} of {len(ranges)} shards missing "
                                f"(first: {_shard_name(missing[0])}); rerun the same collect call (`catlens cache`).")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    shards = []
    n_tokens: list[int] = []
    for k, (a, b) in enumerate(ranges):
        entry = entries.get(_shard_name(k)) if meta["version"] >= 2 else None
        tails, kinds = _check_shard(root, k, a, b, meta, entry, verify and _shard_name(k) not in trusted)
        for s, tail in tails.items():
            if shapes.setdefault(s, tail) != tail or dtypes.setdefault(s, kinds[s]) != kinds[s]:
                raise StoreError(f"shards/{_shard_name(k)} of store {str(root)!r}: {s!r} has trailing shape "
                                 f"{list(tail)} {kinds[s]} but earlier shards have {list(shapes[s])} {dtypes[s]}. {_FIX}")
        shards.append(_Shard(_shard_path(root, k), a, b))
        if entry is not None:
            n_tokens.extend(entry.get("n_tokens", []))
    if len(n_tokens) == n and "n_tokens" not in index.columns:
        index = index.assign(n_tokens=n_tokens)
    data = ShardedData(shards, {s: shapes[s] for s in meta["sites"]}, dtypes)
    return ActivationStore(data, index, tuple(meta["layers"]), tuple(map(str, meta["positions"])), meta)


# ----------------------------------------------------------------------------------------------- arguments
def _resolve_layers(model: LensModel, layers: Sequence[int] | None) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(model.n_layers))
    given = list(layers)
    if not given:
        raise ValueError(f"layers={layers!r} is empty; ask for at least one layer (0..{model.n_layers - 1}, "
                         f"negative values count from the end), or layers=None for all. A range written high to low "
                         f"(like 5-2 or range(5, 2)) is empty: write it low to high.")
    if any(isinstance(l, bool) or not isinstance(l, int) for l in given):
        raise ValueError(f"layers={given!r}: every layer must be an integer (0..{model.n_layers - 1}).")
    out = tuple(model.layer(l) for l in given)
    if len(set(out)) != len(out):
        raise ValueError(f"layers={given} has duplicates; give each layer once.")
    return out


def _check_out(out: str | os.PathLike[str]) -> Path:
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"out={str(root)!r} is a file; the store is a folder. Give a folder path (new or empty).")
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"out={str(root)!r} lies under {str(parent)!r}, which is a file; give a folder "
                                      f"path that is not inside a file.")
            break
    return root


def _prompt_table(prompts: Any) -> tuple[Any, dict[str, str]]:
    """The index frame (``_INDEX_COLUMNS``) and a sha256 of every column of the full prompt table."""
    import pandas as pd

    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        full = pd.DataFrame({"id": [f"p{i}" for i in range(len(prompts))], "text": list(prompts), "label": None,
                             "category": None, "source": "inline", "split": None})
    elif hasattr(prompts, "to_frame"):
        full = prompts.to_frame()
    else:
        raise TypeError(f"prompts must be a PromptSet or a list of strings, got {type(prompts).__name__}"
                        f"{' holding ' + type(next(p for p in prompts if not isinstance(p, str))).__name__ if isinstance(prompts, (list, tuple)) else ''}.")
    if len(full) == 0:
        raise ValueError(f"prompts is empty (0 prompts{', ' + repr(getattr(prompts, 'name', '')) if getattr(prompts, 'name', None) else ''}): "
                         f"there is nothing to collect. Check the prompt file and any split or category filter.")
    columns = {}
    for c in full.columns:  # chunk by chunk: no second copy of a column (or its JSON text) in memory
        h = _JsonListHash()
        for a in range(0, len(full), _SCAN_CHUNK):
            h.update(full[c].iloc[a:a + _SCAN_CHUNK].tolist())
        columns[str(c)] = h.hexdigest()
    index = full[[c for c in _INDEX_COLUMNS if c in full.columns]].reset_index(drop=True)
    return index, columns


def _parameters_sha256(model: LensModel) -> str:
    """sha256 of every parameter as it is in memory now (dtype, shape and bytes, in module order; a tied weight
    once). Zero-copy on the CPU: about 0.7 s for SmolLM2-135M's 135M float32 parameters (measured, SHA-NI CPU)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for p in model.hf.parameters():  # parameters() skips a tied duplicate; names depend on the bridge's wrapping
            t = p.detach()
            t = t.cpu().contiguous() if t.device.type != "cpu" or not t.is_contiguous() else t
            h.update(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _model_identity(model: LensModel) -> dict[str, Any]:
    """Name, dtype, a hash of the weights from the model's provenance (the GGUF file's sha256 for the embedded
    model, the safetensors files' sha256 for a checkpoint folder, the hub commit for a hub id; a model without any
    of these is hashed from its parameters in memory) and ``parameters_sha256``, a hash of the parameters as they
    are in memory, so that weights changed after loading are caught too."""
    prov = model.provenance or {}
    source = prov.get("source") or {}
    if source.get("file_sha256"):
        weights: Any = {"gguf_sha256": source["file_sha256"], "dequantised_to": source.get("dequantised_to")}
    elif source.get("weights_sha256"):
        weights = {"safetensors_sha256": source["weights_sha256"]}
    else:
        commit = getattr(getattr(getattr(model, "hf", None), "config", None), "_commit_hash", None)
        if source.get("kind") == "hub" and commit:
            weights = {"hub": source.get("spec"), "commit": commit}
        elif getattr(model, "hf", None) is None:
            weights = {"spec": source.get("spec")}
        else:
            h = hashlib.sha256()  # (this digest is what stores of such models recorded; kept so they resume)
            for name, t in model.hf.state_dict().items():
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
            weights = {"parameters_sha256": h.hexdigest()}
    if getattr(model, "hf", None) is None:  # an engine's model (catlens.engines): its weights live in the engine
        return {"name": model.name, "dtype": str(model.dtype).removeprefix("torch."),
                "weights_sha256": _sha256_json(weights), "engine": prov.get("backend")}
    return {"name": model.name, "dtype": str(model.dtype).removeprefix("torch."),
            "weights_sha256": _sha256_json(weights), "parameters_sha256": _parameters_sha256(model)}


def _instr_after(offsets: Sequence[tuple[int, int]], rendered: str, text: str) -> tuple[list[int], list[int]] | None:
    """Token indices (unpadded) of the instruction and of the tokens after it; None if the text is not found."""
    start = rendered.rfind(text)
    if start < 0 or not text:
        return None
    end = start + len(text)
    instr = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    after = [j for j, (a, b) in enumerate(offsets) if a >= end and not (a < end and b > start)]
    return instr, after


def _scan_prompts(model: LensModel, texts: Sequence[str], ids: Sequence[Any], render: Any, appends: Any,
                  pos_names: Sequence[str], fmt: str, chunk: int | None = None) -> tuple[str, str]:
    """Render, tokenise and check every prompt, ``chunk`` prompts at a time (memory does not grow with the number
    of prompts); return the sha256 of the rendered prompts and of the appends (as ``_sha256_json`` of the lists).
    ``render(a, b)`` renders prompts ``a:b``, ``appends(a, b)`` gives their appends."""
    chunk = chunk or _SCAN_CHUNK
    check = _PositionCheck(pos_names)
    rendered_hash, append_hash = _JsonListHash(), _JsonListHash()
    for a in range(0, len(texts), chunk):
        b = min(a + chunk, len(texts))
        rendered = render(a, b)
        rendered_hash.update(rendered)
        append_hash.update(appends(a, b))
        check.add(model, rendered, texts[a:b], ids[a:b])
    check.report(fmt)
    return rendered_hash.hexdigest(), append_hash.hexdigest()


class _PositionCheck:
    """Checks the read positions against every prompt's tokens (fed in chunks) before anything is computed or
    created; :meth:`report` raises one error naming the prompts that fail."""

    def __init__(self, pos_names: Sequence[str]) -> None:
        self.kind = pos_names[0]
        self.need_masks = self.kind in ("mean", "post_instruction")
        self.offsets = [int(p) for p in pos_names] if self.kind.lstrip("-").isdigit() else [-1]
        self.empty: list[Any] = []
        self.short: list[Any] = []
        self.unfound: list[Any] = []
        self.no_instr: list[Any] = []
        self.after_counts: dict[int, list[Any]] = {}

    def add(self, model: LensModel, rendered: Sequence[str], texts: Sequence[str], ids: Sequence[Any]) -> None:
        enc = model.tokenizer(list(rendered), add_special_tokens=False, return_offsets_mapping=self.need_masks)
        for j, tok in enumerate(enc["input_ids"]):
            if not tok:
                self.empty.append(ids[j])
            elif len(tok) < -min(self.offsets):
                self.short.append((ids[j], len(tok)))
            if self.need_masks:
                spans = _instr_after(enc["offset_mapping"][j], rendered[j], texts[j])
                if spans is None:
                    self.unfound.append(ids[j])
                elif not spans[0]:
                    self.no_instr.append(ids[j])
                else:
                    self.after_counts.setdefault(len(spans[1]), []).append(ids[j])

    def report(self, fmt: str) -> None:
        kind, offsets, empty, short = self.kind, self.offsets, self.empty, self.short
        unfound, no_instr, after_counts = self.unfound, self.no_instr, self.after_counts

        def some(xs: list[Any]) -> str:
            return ", ".join(map(repr, xs[:5])) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")

        if empty:
            raise ValueError(f"{len(empty)} prompt(s) have no tokens after formatting (fmt={fmt!r}): {some(empty)}. "
                             f"Drop them or give them text.")
        if short:
            raise ValueError(f"positions={tuple(offsets)}: offset {min(offsets)} reaches before the start of "
                             f"{len(short)} prompt(s) ({some([f'{i} ({n} tokens)' for i, n in short])}). Use offsets "
                             f"of at least -{min(n for _, n in short)}, or drop these prompts.")
        if unfound:
            raise ValueError(f"positions={kind!r} needs the instruction text inside the formatted prompt, but it was "
                             f"not found for {len(unfound)} prompt(s): {some(unfound)} (fmt={fmt!r}). Use 'last' or "
                             f"offsets.")
        if no_instr:
            raise ValueError(f"positions={kind!r}: the instruction of {len(no_instr)} prompt(s) covers no token: "
                             f"{some(no_instr)}. Use 'last' or offsets.")
        if kind == "post_instruction" and (len(after_counts) != 1 or 0 in after_counts):
            detail = "; ".join(f"{n} token(s) for {some(v)}" for n, v in sorted(after_counts.items()))
            raise ValueError(f"positions='post_instruction' needs the same number (> 0) of tokens after every "
                             f"instruction; got {detail} (fmt={fmt!r}). Use fmt='chat' or explicit offsets like "
                             f"(-2, -1).")


# --------------------------------------------------------------------------------------------------- collect
def collect(model: LensModel, prompts: Any, sites: Sequence[Site | str] = (Site.RESID_POST,),
            layers: Sequence[int] | None = None, positions: str | Sequence[int] = "last", *, fmt: str = "chat",
            system: str | None = None, append: str | Sequence[str] = "", batch_size: int = 16,
            out: str | os.PathLike[str] | None = None, shard_size: int = 256, dtype: str = "float32",
            show_progress: bool = True, overwrite: bool = False, engine: Any = None) -> ActivationStore:
    """Run ``prompts`` (a PromptSet, or a list of strings) through ``model`` and read activations.

    ``layers=None`` reads every layer. With ``out`` the store is streamed to that folder in shards, an
    interrupted call resumes, and the returned store is lazy (memory-mapped from the shards, so peak memory does not
    grow with the number of prompts); ``overwrite=True`` replaces a store made with other arguments (never a folder
    that is not an activation store). Without ``out`` everything stays in memory. Forward passes stop after the last
    requested layer. Every argument is checked before any folder is created.

    ``engine``: ``None``/``"catlens"`` (this process, the TransformerLens bridge), ``"vllm"`` (start a
    :class:`catlens.engines.vllm.VLLMEngine` on ``model``'s checkpoint for this call; it is shut down before
    ``collect`` returns or raises) or a running ``VLLMEngine``, which ``collect`` uses and leaves running (to reuse
    one engine over several calls: ``with VLLMEngine(spec) as engine: collect(engine.model, ..., engine=engine)``,
    which shuts it down at the end of the block). The store has the same format; its ``model_identity`` names the
    engine, so a store is never resumed with the other engine.
    """
    model, running = _resolve_engine(model, engine)
    try:
        return _collect(model, prompts, sites, layers, positions, fmt=fmt, system=system, append=append,
                        batch_size=batch_size, out=out, shard_size=shard_size, dtype=dtype,
                        show_progress=show_progress, overwrite=overwrite, engine=running)
    finally:
        if running is not None and running is not engine:  # started here (engine="vllm"): shut it down
            running.close()


def _collect(model: LensModel, prompts: Any, sites: Sequence[Site | str], layers: Sequence[int] | None,
             positions: str | Sequence[int], *, fmt: str, system: str | None, append: str | Sequence[str],
             batch_size: int, out: str | os.PathLike[str] | None, shard_size: int, dtype: str, show_progress: bool,
             overwrite: bool, engine: Any) -> ActivationStore:
    """:func:`collect` once the engine is resolved (``engine``: ``None`` or a running engine)."""
    from tqdm.auto import tqdm

    # 1. every check, before anything is created
    site_list = [Site.parse(s) for s in ([sites] if isinstance(sites, (str, Site)) else sites)]
    if not site_list:
        raise ValueError("sites is empty; ask for at least one, e.g. sites=['resid_post'].")
    if len(set(site_list)) != len(site_list):
        raise ValueError(f"sites={[s.value for s in site_list]} has duplicates; give each site once.")
    if Site.PATTERN in site_list:
        raise ValueError("the attention pattern has a prompt-dependent shape and is not stored; read it with "
                         "model.bridge.run_with_cache(...) and catlens.model.hook_name('pattern', layer).")
    pos_names = parse_read_positions(positions)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: choose float32, float16 or bfloat16.")
    store_dtype = getattr(torch, dtype)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer (e.g. 16).")
    index, column_hashes = _prompt_table(prompts)
    layer_list = _resolve_layers(model, layers)
    root = _check_out(out) if out is not None else None
    texts = index["text"].tolist()
    n = len(texts)
    per_prompt = None if isinstance(append, str) else list(append)
    if per_prompt is not None and len(per_prompt) != n:
        raise ValueError(f"append has {len(per_prompt)} entries for {n} prompts; give one string or one per "
                         f"prompt.")

    def appends(a: int, b: int) -> list[str]:
        return [append] * (b - a) if per_prompt is None else per_prompt[a:b]

    def render(a: int, b: int) -> list[str]:
        # rendered a chunk or a batch at a time (never all prompts at once), so memory does not grow with them
        return model.format(texts[a:b], fmt, system=system, append=appends(a, b))

    rendered_sha256, append_sha256 = _scan_prompts(model, texts, index["id"].tolist(), render, appends, pos_names,
                                                   fmt)
    meta = {
        "version": _STORE_VERSION,
        "model": model.provenance,
        "model_identity": _model_identity(model) if root is not None else None,
        "sites": [s.value for s in site_list],
        "layers": list(layer_list),
        "positions": list(pos_names),
        "fmt": fmt,
        "system": system,
        "append": append if isinstance(append, str) else "per-prompt",
        "append_sha256": append_sha256,
        "rendered_sha256": rendered_sha256,
        "dtype": dtype,
        "shard_size": shard_size,
        "n_prompts": n,
        "prompts_sha256": _sha256_json(column_hashes),
        "prompt_fields_sha256": column_hashes,
        "prompt_provenance": getattr(prompts, "provenance", None),
        "dims": {s.value: ["prompt", "pos", "layer", "d_head*head" if s is Site.Z else "d_model"] for s in site_list},
    }

    # 2. set up the folder (atomically) or resume it
    done: set[str] = set()
    if root is not None:
        meta, done = _open_store(root, meta, index, overwrite)
        shard_ranges = _shard_ranges(n, shard_size)
    else:
        shard_ranges = [(0, n)]
    todo = [k for k in range(len(shard_ranges)) if root is None or _shard_name(k) not in done]
    if root is not None and done:
        log.info("resuming %s: %d of %d shards already done", root, len(shard_ranges) - len(todo), len(shard_ranges))
    n_tokens = [0] * (n if root is None else 0)  # in memory: every prompt's; on disk: the shard's (store.json)
    bar = tqdm(total=sum(shard_ranges[k][1] - shard_ranges[k][0] for k in todo), desc="collect", unit="prompt",
               disable=not show_progress)
    memory: list[dict[str, Tensor]] = []
    for k in todo:
        a, b = shard_ranges[k]
        shard: dict[str, Tensor] = {}  # each site's rows a:b, filled batch by batch (no second copy to concatenate)
        shard_tokens: list[int] = []
        for start in range(a, b, batch_size):
            stop = min(start + batch_size, b)
            acts, lengths = _forward_batch(model, render(start, stop), texts[start:stop], site_list, layer_list,
                                           pos_names, fmt, engine=engine)
            for s, t in acts.items():
                if s not in shard:
                    shard[s] = torch.empty((b - a, *t.shape[1:]), dtype=store_dtype)
                shard[s][start - a:stop - a] = t
            del acts
            shard_tokens.extend(lengths)
            bar.update(stop - start)
        if root is not None:
            _write_shard(root, k, a, b, shard, meta, shard_tokens)
            del shard
            _release_freed_memory()
        else:
            n_tokens[a:b] = shard_tokens
            memory.append(shard)
    bar.close()
    if root is not None:
        del index, texts, per_prompt  # _load reads the index back from disk: do not hold two copies
        return _load(root, verify=True, trusted=frozenset(_shard_name(k) for k in range(len(shard_ranges))))
    data = memory[0] if len(memory) == 1 else {s.value: torch.cat([m[s.value] for m in memory]) for s in site_list}
    return ActivationStore(data, index.assign(n_tokens=n_tokens), layer_list, pos_names, meta)


def _write_shard(root: Path, k: int, a: int, b: int, shard: dict[str, Tensor], meta: dict[str, Any],
                 n_tokens: list[int]) -> None:
    """Write the shard to a temporary file, record it (rows, shapes, sha256) in store.json, then rename it into
    place. ``save_file`` writes straight from the tensors (``save`` would build two in-memory copies of the shard)."""
    from safetensors.torch import save_file

    with atomic_path(_shard_path(root, k)) as tmp:
        save_file(shard, str(tmp), metadata={"rows": f"{a}:{b}", "store_id": meta["store_id"]})
        meta["shards"][_shard_name(k)] = {"rows": [a, b], "sha256": sha256_file(tmp, _CHUNK),
                                          "bytes": tmp.stat().st_size,
                                          "shapes": {s: list(t.shape[1:]) for s, t in shard.items()},
                                          "n_tokens": list(n_tokens)}
        write_json_atomic(root / "store.json", meta)


_MALLOC_TRIM: Any = None


def _release_freed_memory() -> None:
    """Hand the heap memory freed since the last shard back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Without it glibc keeps freed blocks of the per-batch tensors in its heap, fragmented, and the process's RSS crept
    up with every shard (measured on a real-width proxy: +46 MiB after 8 shards, flat with this)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes

        try:
            _MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", False)
        except OSError:
            _MALLOC_TRIM = False
        if _MALLOC_TRIM:
            _MALLOC_TRIM.argtypes, _MALLOC_TRIM.restype = [ctypes.c_size_t], ctypes.c_int
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _describe_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    if old.get("version") != new.get("version"):
        return [f"store format (version {old.get('version')!r}, made by another catlens; this catlens writes version "
                f"{new.get('version')}): recompute it"]
    out = []
    for key in _RESUME_KEYS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "prompts_sha256":
            fields = sorted(set(old.get("prompt_fields_sha256") or {}) | set(new["prompt_fields_sha256"]))
            changed = [f for f in fields if (old.get("prompt_fields_sha256") or {}).get(f)
                       != new["prompt_fields_sha256"].get(f)]
            out.append(f"prompts (fields that differ: {', '.join(changed) or 'unknown'})")
        elif key == "model_identity":
            parts = [p for p in ("name", "dtype", "weights_sha256") if (a or {}).get(p) != (b or {}).get(p)]
            if parts or not isinstance(a, dict) or not isinstance(b, dict):
                was, now = ({p: (x or {}).get(p) for p in parts} for x in (a, b))
                out.append(f"model ({', '.join('weights' if p == 'weights_sha256' else p for p in parts)} differ: "
                           f"store {was}, now {now})")
            else:  # same name, dtype and weight files: the parameters were changed in memory after loading
                was, now = (str(x.get("parameters_sha256"))[:12] for x in (a, b))
                out.append(f"model (its weights in memory differ: parameters sha256 {was}... in the store, {now}... "
                           f"now, though both were loaded from the same files; the weights were changed after "
                           f"loading)")
        elif key in ("rendered_sha256", "append_sha256"):
            if not any(o.startswith(("formatting", "fmt", "system", "append")) for o in out):
                out.append("formatting (the rendered prompts differ: chat template, fmt, system or append)")
        elif key == "n_prompts":
            out.append(f"number of prompts (store {a}, now {b})")
        else:
            out.append(f"{key} (store {a!r}, now {b!r})")
    return out


def _clean_stale_temps(root: Path) -> None:
    """Remove temporary files this module (or runs.atomic_path) left in a killed run: ours by name only."""
    tmp_name = re.compile(r"^\.(index\.parquet|store\.json|\d{5}\.safetensors)\..+\.tmp$")
    for folder in (root, root / "shards"):
        if folder.is_dir():
            for p in folder.iterdir():
                if tmp_name.match(p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in root.parent.glob(f".{root.name}.setup-*.tmp") if root.parent.is_dir() else []:
        pid = p.name.removeprefix(f".{root.name}.setup-").split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another live process is setting it up
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_store(root: Path, meta: dict[str, Any], index: Any, overwrite: bool) -> tuple[dict[str, Any], set[str]]:
    """Resume the store at ``root`` (verifying its finished shards) or create it atomically; return its metadata
    and the names of the finished shards that can be kept."""
    _clean_stale_temps(root)
    is_store = (root / "store.json").exists()
    if root.is_dir() and not is_store and any(root.iterdir()):
        if _interrupted_setup(root):
            log.warning("interrupted store: the setup of %s was interrupted; starting it again", root)
            shutil.rmtree(root)
        else:
            raise FileExistsError(f"{str(root)!r} is not empty and is not an activation store; choose another "
                                  f"folder (overwrite=True only replaces activation stores).")
    if is_store:
        try:
            old = _read_store_json(root)
        except StoreError:
            if not overwrite:
                raise
            old = {}
        if overwrite:
            log.warning("overwrite: removing the store at %s", root)
            shutil.rmtree(root)
        else:
            diff = _describe_diff(old, _comparable(old, meta))
            finished = [p for p in (root / "shards").glob("*.safetensors")] if (root / "shards").is_dir() else []
            if diff and not finished:
                log.warning("%s holds an unfinished store with no computed shard, made with different %s; starting "
                            "it again with the new arguments", root, "; ".join(diff))
                shutil.rmtree(root)
            elif diff:
                raise FileExistsError(f"{str(root)!r} holds a store made with different {'; '.join(diff)}. Its "
                                      f"activations do not match these arguments: use a new folder, or pass "
                                      f"overwrite=True (--overwrite) to replace it.")
            else:
                return old, _verified_shards(root, old)
    meta = {**meta, "store_id": uuid.uuid4().hex, "shards": {}}
    tmp = root.parent / f".{root.name}.setup-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        index.to_parquet(tmp / "index.parquet", index=False)
        (tmp / "shards").mkdir()
        write_json_atomic(tmp / "store.json", meta)
        os.replace(tmp, root)  # atomic; replaces an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta, set()


def _comparable(old: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` without what ``old`` (a store from an earlier catlens) did not record: stores made before the
    in-memory parameter hash still resume (their weights are checked through the provenance only)."""
    old_id, new_id = old.get("model_identity"), meta.get("model_identity")
    if isinstance(old_id, dict) and isinstance(new_id, dict) and "parameters_sha256" not in old_id:
        return {**meta, "model_identity": {k: v for k, v in new_id.items() if k != "parameters_sha256"}}
    return meta


def _verified_shards(root: Path, meta: dict[str, Any]) -> set[str]:
    """Names of the finished shards whose file matches its record; others are deleted (and recomputed)."""
    good = set()
    ranges = _shard_ranges(int(meta["n_prompts"]), int(meta["shard_size"]))
    for k, (a, b) in enumerate(ranges):
        name = _shard_name(k)
        path = _shard_path(root, k)
        if not path.exists():
            continue
        entry = meta["shards"].get(name)
        try:
            if entry is None:
                raise StoreError(f"shards/{name} has no record in store.json")
            _check_shard(root, k, a, b, meta, entry, verify=True)
        except StoreError as err:
            log.warning("recomputing shards/%s of %s: %s", name, root, err)
            path.unlink()
            continue
        good.add(name)
    return good


def _instruction_masks(model: LensModel, rendered: Sequence[str], texts: Sequence[str], width: int
                       ) -> tuple[Tensor, Tensor]:
    """Left-padded boolean masks ``[batch pos]`` of the instruction tokens and of the tokens after them."""
    enc = model.tokenizer(list(rendered), add_special_tokens=False, return_offsets_mapping=True)
    instr = torch.zeros(len(rendered), width, dtype=torch.bool)
    after = torch.zeros(len(rendered), width, dtype=torch.bool)
    for i, (r, t, offsets) in enumerate(zip(rendered, texts, enc["offset_mapping"])):
        spans = _instr_after(offsets, r, t)
        if spans is None:
            raise ValueError(f"prompt {i}: could not find the instruction text in the formatted prompt.")
        pad = width - len(offsets)
        instr[i, [pad + j for j in spans[0]]] = True
        after[i, [pad + j for j in spans[1]]] = True
    return instr, after


def _resolve_engine(model: Any, engine: Any) -> tuple[Any, Any]:
    """``(model, engine)`` for :func:`collect`: the model whose tokenizer and identity the store records, and the
    engine that computes the activations (``None``: the model itself)."""
    if engine is None or engine == "catlens":
        return model, None
    if engine == "vllm":
        from catlens.engines import check_engine
        from catlens.engines.vllm import VLLMEngine

        check_engine("vllm")
        source = (getattr(model, "provenance", {}) or {}).get("source", {})
        spec = source.get("folder") or source.get("spec") or model
        engine = VLLMEngine(spec, dtype=str(model.dtype).removeprefix("torch."))
    if isinstance(engine, str):
        raise ValueError(unknown_name_message("engine", engine, ["catlens", "vllm"]))
    if not hasattr(engine, "forward_batch"):
        raise TypeError(f"engine must be 'catlens', 'vllm' or a running engine (VLLMEngine), got "
                        f"{type(engine).__name__}.")
    if model is not None and getattr(model, "name", None) != engine.model.name:
        raise ValueError(f"model {getattr(model, 'name', model)!r} and the engine's model {engine.model.name!r} "
                         f"differ; pass the engine's own model (engine.model) or the same checkpoint.")
    return engine.model, engine


def _left_padded(caps: Sequence[Mapping[str, Tensor]], key: str, width: int) -> Tensor:
    """Per-prompt ``[T d]`` captures as one left-padded ``[batch width d]`` tensor (zeros at the pads)."""
    d = caps[0][key].shape[-1]
    x = torch.zeros(len(caps), width, d)
    for b, c in enumerate(caps):
        t = c[key]
        x[b, width - t.shape[0]:] = t
    return x


@torch.inference_mode()
def _forward_batch(model: LensModel, rendered: Sequence[str], texts: Sequence[str], sites: Sequence[Site],
                   layers: Sequence[int], positions: Sequence[str], fmt: str,
                   engine: Any = None) -> tuple[dict[str, Tensor], list[int]]:
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

    def reduce(x: Tensor) -> Tensor:
        if reduce_mask is not None:
            m = reduce_mask.to(x.dtype).unsqueeze(-1)
            return ((x * m).sum(1) / m.sum(1).clamp_min(1)).unsqueeze(1)
        return x[:, offsets]

    if engine is not None:  # every prompt position from the engine, reduced exactly as below
        caps = engine.forward_batch(rendered, sites, layers)
        for s in sites:
            for i, layer in enumerate(layers):
                store[s.value][i] = reduce(_left_padded(caps, f"{s.value}.{layer % model.n_layers}", width)).float()
        acts = {s: torch.stack(v, dim=2) for s, v in store.items()}
        return acts, mask.sum(1).tolist()

    def reader(site: str, i: int) -> Any:
        # Hook names can be aliases (hook_z is attn.o.hook_in), so each hook gets its own slot by closure.
        def read(act: Tensor, hook: Any) -> Tensor:
            x = act.flatten(2) if act.dim() == 4 else act  # z: [batch pos head d_head] -> [batch pos head*d_head]
            store[site][i] = reduce(x).float().cpu()
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
