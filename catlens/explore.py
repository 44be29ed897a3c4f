"""``catlens explore``: a local web page to type a prompt, steer it and compare the answers side by side.

    catlens explore --model <refusal-tuned folder> [--policy runs/sweep/policy] [--port 8050]

    >>> from catlens.explore import create_app, serve
    >>> app = create_app(model, policy=None)
    >>> server = serve(app, port=0)      # a background thread on a free port (the command line uses 8050)
    >>> server.url.startswith("http://127.0.0.1:")
    True
    >>> server.stop()

The page (Dash; everything is served from this machine, no network is used) takes a prompt (typed, or picked from
the built-in prompts, the ``--prompts`` sets and the benchmark sets found in the data folder) and the steering
controls:

* **method**: the loaded policy as it is (``policy``), or directions made from the built-in prompts' ``train`` split
  with a constructor of :mod:`catlens.directions` (``one_vs_benign``, ``one_vs_rest``, ``p1_mean_difference``; unit
  vectors, read at the last prompt token of the chat-formatted prompt, like ``analyses/steer_sweep.py``);
* **edit**: ``add`` (``x + c v`` at the last prompt token and every generated token) or ``ablate`` (remove the
  selected directions at every position; the coefficient is ignored);
* **categories**: which directions (several: their sum, or with **route** the router picks one per prompt: the
  policy's router, else the refusal-token router when the model has a token for each, else a probe router fitted on
  the built-in ``train`` prompts);
* **coefficients**: one coefficient for every prompt, or ``toward``/``away`` for the rows a harmful-vs-benign gate
  flags / passes (the policy's gate, else a probe fitted on ``train`` with its threshold chosen on ``val``); with
  **scale** ``norm`` a coefficient is a fraction of the site's mean activation norm at that layer;
* **layers**, **site** (``resid_post``, ``resid_pre``, ``attn_out``, ``mlp_out``) and **max new tokens**.

Output: the unsteered and steered answers (greedy, :func:`catlens.generate`) side by side, the gate and router
decisions, the refusal-token probabilities at the first response position (refusal-token models) and the prompt's
place in a PCA of the built-in prompts' activations at the chosen site and (first) layer.

The built-in prompts' activations (about a minute on the embedded model) are collected in a background thread from
the moment the page is served and kept on disk (``<catlens cache>/explore``, keyed by the model's provenance, the
rendered prompts and the site), so the first answer never waits for the map: the answers are shown as soon as they
are generated, the map's place says "Preparing the map ... n/N prompts" until it is ready, and then the prompt's
point is drawn in it (or the reason the map could not be prepared). Only a request that needs directions, a gate or
a router made from the built-in prompts (a method other than ``policy``, or a gate the policy lacks) collects the
activations still missing itself (with progress); with a warm disk cache nothing is collected. Every request
generates the unsteered answer first and shows it at once, the steered column saying what is being prepared
("Preparing the directions: built-in activations (resid_post, train prompts) 48/378 prompts", then the steered
answer's tokens), so without a policy the first answer does not wait for the directions; the steered answer follows
once they are made. Directions and routers read the train prompts and gates the train and val prompts, which are
collected first, so they do not wait for the rest of the map either.

Generation runs in a worker thread (one model, one job at a time) with progress in the page; a new request cancels
the running one between two decoding steps (``generate(should_stop=...)``), and a result is only shown if its
request is still the newest. Bad input (an empty prompt, a coefficient that is not a number or out of range, an
unknown category, a layer out of range) is shown as a message in the page; no traceback reaches the browser.

Logic and page are separate: :class:`Explorer` (parse, build the policy, run, submit/status) is plain Python and
testable without a browser; :func:`create_app` wraps it in a ``dash.Dash`` app. The server is one process for one
user: several tabs share the model, and a request from one cancels another's.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from catlens.errors import Cancelled, unknown_name_message

log = logging.getLogger(__name__)

SITES = ("resid_post", "resid_pre", "attn_out", "mlp_out")
CONSTRUCTORS = ("one_vs_benign", "one_vs_rest", "p1_mean_difference")
METHODS = ("policy", *CONSTRUCTORS)
EDITS = ("add", "ablate")
MODES = ("single", "gated")
SCALES = ("norm", "raw")
COEFF_LIMITS = {"norm": 10.0, "raw": 1e4}
"""Largest |coefficient| the page accepts: 10 residual norms (``norm``) or 10^4 (``raw``)."""
MAX_NEW_TOKENS = 512
ADD_POSITIONS = "last_prompt"
"""Where ``add`` edits: the last prompt token and every generated token (P1, as in the steering sweep)."""
ACTS_CHUNK = 16
"""Reference prompts per step when collecting their activations (one ``collect`` batch): the background thread holds
the model for one step at a time, so a request waits at most one step, and a request's cancel is checked between
steps."""
ACTS_CACHE_VERSION = 1
"""Bumped when what the on-disk reference activations hold changes (the cache key includes it)."""


FIELDS = ("prompt", "method", "edit", "categories", "route", "mode", "coeff", "toward", "away", "scale", "layers",
          "site", "max_new_tokens")
"""The page's controls, in the order of the main callback's states."""


@dataclass(frozen=True)
class Request:
    """One checked request from the page (see :meth:`Explorer.parse`)."""

    prompt: str
    method: str
    categories: tuple[str, ...]
    route: bool
    mode: str
    coeff: float | None
    toward: float | None
    away: float | None
    scale: str
    layers: tuple[int, ...]
    site: str
    edit: str
    max_new_tokens: int


@dataclass
class _Job:
    id: int
    request: Request
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued | running | done | error | cancelled | superseded
    phase: str = "queued"
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    partial: dict[str, Any] | None = None  # {"request", "unsteered"} once the unsteered answer exists
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)


# ------------------------------------------------------------------------------------------------ parsing
def _number(name: str, value: Any, limit: float, scale: str, *, allow_empty: bool = False) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_empty:
            return None
        raise ValueError(f"{name} is empty; give a number such as 0.2 (or -0.2 to steer the other way).")
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a number; give a number such as 0.2.")
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number; give a number such as 0.2 (or -0.2 to steer the "
                         f"other way).") from None
    unit = "fractions of the residual norm" if scale == "norm" else "raw activation units"
    if not math.isfinite(v):
        raise ValueError(f"{name} {value!r} is not finite; give a number between {-limit:g} and {limit:g} "
                         f"({unit}).")
    if abs(v) > limit:
        raise ValueError(f"{name} {v:g} is out of range for scale {scale!r}: allowed {-limit:g} to {limit:g} "
                         f"({unit}).")
    return v


def _positive_int(name: str, value: Any, hi: int) -> int:
    try:
        v = float(str(value).strip()) if not isinstance(value, (int, float)) or isinstance(value, bool) else value
        if isinstance(value, bool) or v != int(v):
            raise ValueError
        v = int(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} {value!r} is not a whole number; give one from 1 to {hi}.") from None
    if not 1 <= v <= hi:
        raise ValueError(f"{name} {v} is out of range; give a whole number from 1 to {hi}.")
    return v


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


# --------------------------------------------------------------------------------------------- the logic
class Explorer:
    """The explorer's state and logic, without any web code.

    ``model``: a loaded :class:`catlens.model.LensModel` (loaded once by the caller). ``policy``: an optional
    :class:`catlens.steer.SteeringPolicy` (or a saved policy folder). ``prompts``: extra prompt sets for the picker
    (a PromptSet, a name/path for :func:`catlens.datasets.load_prompts`, or a list/mapping of those); the built-in
    prompts are always there and the benchmark sets present in ``data_dir`` (or the default data folder) are
    offered, loaded when first picked. ``reference``: the prompts the directions, the gate, the router and the PCA
    are made from (default: the built-in prompts; it needs ``train`` and ``val`` splits, harmful prompts with
    categories and benign prompts). ``initial``: starting values of the page's controls (keys of :data:`FIELDS`,
    values as typed, e.g. ``{"layers": "18", "categories": "cybercrime,privacy", "prompt": "..."}``); checked here.
    ``cache``: the folder where the reference prompts' activations are kept between runs, keyed by the model's
    provenance (weights hash, dtype, versions), the chat-rendered reference prompts and the site (default:
    ``explore/`` in catlens's cache folder, :func:`catlens.model.cache_dir`; ``False``: memory only).

    The reference activations (the map, the directions, the gate and the router read them) take about a minute
    for the built-in prompts on the embedded model. :meth:`start_preparing` (called by :func:`create_app`) collects
    them in a background thread that gives the model to a request between two steps of :data:`ACTS_CHUNK` prompts;
    a request answers without waiting for the map (its result says the map is pending, and :meth:`complete_map`
    fills it in once the map is ready); only a request that needs directions, a gate or a router made from the
    reference prompts collects what is still missing of the prompts these read itself, after generating its
    unsteered answer and publishing it as the job's partial result (:meth:`status`). The reference prompts are
    kept in split order, train first, then val, then the rest: directions and routers (train) and gates (train and
    val) are made as soon as those prompts are done, without waiting for the rest of the map.
    """

    def __init__(self, model: Any, policy: Any = None, prompts: Any = None, *,
                 data_dir: Any = None, allow_transfer: bool = False, discover_datasets: bool = True,
                 reference: Any = None, initial: Mapping[str, Any] | None = None, cache: Any = None) -> None:
        from catlens.datasets import load_builtin
        from catlens.refusal import refusal_token_ids
        from catlens.steer import as_policy

        self.model = model
        self.policy = as_policy(policy)
        self.allow_transfer = allow_transfer
        if self.policy is not None:
            self.policy.check_model(model, allow_transfer=allow_transfer)
        self.tokens, _ = refusal_token_ids(model)
        self.builtin = load_builtin()
        reference = self.builtin if reference is None else reference
        frame = reference.to_frame().reset_index(drop=True)
        if not {"train", "val"} <= set(frame.split.dropna()) or frame.label.nunique() < 2:
            raise ValueError(f"reference prompt set {reference.name!r} needs 'train' and 'val' splits with "
                             f"both harmful and benign prompts (like the built-in set).")
        # train first, then val, then the rest (each in its own order): the activations are collected in that
        # order, so directions and routers (train) and gates (train + val) are made before the map (all) is ready
        order = list(frame.split.map({"train": 0, "val": 1}).fillna(2).sort_values(kind="stable").index)
        self.reference = reference[order]
        self._frame = frame.loc[order].reset_index(drop=True)
        self._n_train = int((self._frame.split == "train").sum())
        self._n_fit = self._n_train + int((self._frame.split == "val").sum())
        harm = self._frame[self._frame.label == "harmful"]
        self.builtin_categories = tuple(sorted(harm.category.dropna().unique()))
        self.data_dir = data_dir
        self._sets: dict[str, Any] = {"builtin": self.builtin}
        self._set_loaders: dict[str, Callable[[], Any]] = {}
        self._add_prompt_sets(prompts)
        if discover_datasets:
            self._discover_datasets(data_dir)
        self._lock = threading.Lock()  # job table
        self._model_lock = _model_lock(model)  # one computation per model at a time (hooks live on the model)
        self._threads: list[threading.Thread] = []
        self._unsteered: dict[tuple[str, int], dict[str, Any]] = {}
        self._cache_lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        self._current: _Job | None = None
        self._acts: dict[str, Any] = {}  # site -> [prompt layer d] float32 (every layer, last prompt token)
        self._acts_parts: dict[str, dict[int, Any]] = {}  # site -> {first row: [rows layer d]} while being collected
        self._disk_tried: set[str] = set()
        self._cache_root = self._check_cache(cache)
        self._map_sites: list[str] = []  # the sites the background thread prepares, in order
        self._map_errors: dict[str, str] = {}
        self._map_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._waiting = 0  # requests waiting for the model (the background thread lets them go first)
        self._dirs: dict[tuple[str, str], Any] = {}
        self._gates: dict[int, Any] = {}
        self._routers: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._pca: dict[tuple[str, int], Any] = {}
        self._initial = self._check_initial(initial or {})

    def _check_initial(self, initial: Mapping[str, Any]) -> dict[str, Any]:
        for key in initial:
            if key not in FIELDS:
                raise ValueError(unknown_name_message("page field", key, FIELDS))
        out = dict(initial)
        if "categories" in out:
            out["categories"] = _as_list(out["categories"])
        if "route" in out and isinstance(out["route"], str):
            if out["route"].lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"route={out['route']!r}: give true or false.")
            out["route"] = out["route"].lower() in ("true", "1", "yes")
        if "method" in out and out["method"] != self.methods[0] and "categories" not in out:
            out["categories"] = list(self.categories_for(out["method"])[:1])
        probe = {**self.defaults(out), "prompt": out.get("prompt") or "x"}
        try:
            self.parse(probe)
        except ValueError as e:
            raise ValueError(f"starting values {dict(initial)}: {e}") from None
        return out

    # --------------------------------------------------------------------------------------- prompt sets
    def _add_prompt_sets(self, prompts: Any) -> None:
        from catlens.datasets import load_prompts

        if prompts is None:
            return
        if isinstance(prompts, Mapping):
            items = list(prompts.items())
        elif isinstance(prompts, (str, bytes)) or hasattr(prompts, "to_frame") or hasattr(prompts, "__fspath__"):
            items = [(None, prompts)]
        else:
            items = [(None, p) for p in prompts]
        for name, p in items:
            ps = p if hasattr(p, "to_frame") else load_prompts(p, data_dir=self.data_dir)
            if not len(ps):
                raise ValueError(f"prompt set {name or ps.name!r} holds no prompts; give a set with at least one.")
            self._sets[str(name or ps.name)] = ps

    def _discover_datasets(self, data_dir: Any) -> None:
        from catlens.datasets import DATASETS, load_dataset, resolve_data_dir

        try:
            root = resolve_data_dir(data_dir)
        except FileNotFoundError:
            if data_dir is not None:
                raise
            return
        for name, spec in DATASETS.items():
            if name not in self._sets and all((root / p).is_file() for p in spec.paths):
                self._set_loaders[name] = (lambda n=name: load_dataset(n, data_dir=root))

    @property
    def prompt_sets(self) -> list[str]:
        """Names of the prompt sets the picker offers (loaded or loadable)."""
        return [*self._sets, *[n for n in self._set_loaders if n not in self._sets]]

    def prompt_set(self, name: str) -> Any:
        """A prompt set by name (loaded on first use)."""
        if name not in self._sets:
            if name not in self._set_loaders:
                raise ValueError(unknown_name_message("prompt set", name, self.prompt_sets))
            self._sets[name] = self._set_loaders[name]()
        return self._sets[name]

    # ------------------------------------------------------------------------------------------- choices
    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self.policy is not None else CONSTRUCTORS

    def categories_for(self, method: str) -> tuple[str, ...]:
        """The categories the page offers for ``method``: the policy's direction labels (and router categories),
        or the built-in prompts' harmful categories (the refusal-default model's refusal-token categories)."""
        if method == "policy":
            if self.policy is None:
                return ()
            labels = [lab for iv in self.policy.interventions for lab in iv.labels]
            if self.policy.router is not None:
                labels += list(self.policy.router.categories)
            return tuple(dict.fromkeys(labels))
        return self.builtin_categories

    def defaults(self, initial: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The page's initial control values (``initial`` or those given to the constructor on top)."""
        initial = getattr(self, "_initial", {}) if initial is None else initial
        method = initial.get("method", self.methods[0])
        cats = self.categories_for(method)
        values: dict[str, Any] = {
            "prompt": "", "method": method, "categories": list(cats[:1]), "route": False, "mode": "single",
            "coeff": "0.2", "toward": "0.2", "away": "-0.1", "scale": "norm",
            "layers": str(max(0, round(2 * self.model.n_layers / 3) - 1)), "site": "resid_post", "edit": "add",
            "max_new_tokens": "32"}
        if method == "policy":
            values.update(self.policy_values())
        values.update(initial)
        return values

    def policy_values(self) -> dict[str, Any]:
        """The loaded policy's own settings, as control values."""
        p = self.policy
        iv = p.interventions[0]
        out: dict[str, Any] = {
            "layers": ",".join(str(i.layer) for i in p.interventions), "site": iv.site.value,
            "scale": iv.scale if iv.scale in SCALES else "raw", "edit": "ablate" if iv.kind == "ablate" else "add",
            "route": p.router is not None, "mode": "gated" if p.gate is not None else "single",
            "coeff": f"{iv.coeff:g}"}
        if p.gate is not None:
            out["toward"] = "" if p.toward is None else f"{p.toward:g}"
            out["away"] = "" if p.away is None else f"{p.away:g}"
        labels = self.categories_for("policy")
        out["categories"] = list(labels[:1]) if p.router is None else list(labels)
        return out

    # --------------------------------------------------------------------------------------------- parse
    def parse(self, values: Mapping[str, Any]) -> Request:
        """Check the page's raw values (strings as typed) and return a :class:`Request`; a ``ValueError`` with a
        message for the page otherwise."""
        prompt = values.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty: type a prompt, or pick one from a prompt set.")
        method = values.get("method") or self.methods[0]
        if method not in self.methods:
            fix = "" if self.policy is not None else "Start with --policy to use a saved policy."
            raise ValueError(unknown_name_message("method", method, self.methods, fix))
        policy_mode = method == "policy"
        edit = values.get("edit") or "add"
        site = values.get("site") or "resid_post"
        scale = values.get("scale") or "norm"
        mode = values.get("mode") or "single"
        if policy_mode:  # the policy's own edit, site, layers and scale
            pv = self.policy_values()
            edit, site, scale = pv["edit"], pv["site"], pv["scale"]
            layers = tuple(iv.layer % self.model.n_layers for iv in self.policy.interventions)
        for name, value, allowed in (("edit", edit, EDITS), ("site", site, SITES), ("scale", scale, SCALES),
                                     ("coefficient mode", mode, MODES)):
            if value not in allowed and not (policy_mode and name in ("site", "edit")):
                raise ValueError(unknown_name_message(name, value, allowed))
        route = bool(values.get("route"))
        if not policy_mode:
            layers = self._layers(values.get("layers"))
        allowed_cats = self.categories_for(method)
        cats = _as_list(values.get("categories"))
        for c in cats:
            if c not in allowed_cats:
                raise ValueError(unknown_name_message("category", c, allowed_cats))
        cats = list(dict.fromkeys(cats))
        if not cats and not (policy_mode and (route or not allowed_cats)):
            raise ValueError(f"No category chosen: choose one or more of {', '.join(allowed_cats)}.")
        limit = COEFF_LIMITS[scale]
        coeff = toward = away = None
        if edit == "ablate":
            if mode == "gated" or route:
                raise ValueError("ablate removes every selected direction from every prompt: choose coefficient "
                                 "mode 'single' and untick 'route' (the coefficient is not used).")
        elif mode == "single":
            coeff = _number("coefficient", values.get("coeff"), limit, scale)
        else:
            toward = _number("toward coefficient", values.get("toward"), limit, scale, allow_empty=True)
            away = _number("away coefficient", values.get("away"), limit, scale, allow_empty=True)
            if toward is None and away is None:
                raise ValueError("Gated mode needs a toward and/or an away coefficient (an empty one leaves that "
                                 "side unsteered); give e.g. toward 0.2, away -0.1.")
        max_new = _positive_int("max new tokens", values.get("max_new_tokens", 32), MAX_NEW_TOKENS)
        return Request(prompt=prompt.strip(), method=method, categories=tuple(cats), route=route, mode=mode,
                       coeff=coeff, toward=toward, away=away, scale=scale, layers=tuple(layers), site=site,
                       edit=edit, max_new_tokens=max_new)

    def _layers(self, text: Any) -> tuple[int, ...]:
        from catlens.options import parse_layers

        n = self.model.n_layers
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"No layer given: give one or more layers from 0 to {n - 1}, e.g. '{n // 2}' or "
                             f"'1,3' or '0-2' (negative ones count from the end).")
        try:
            layers = parse_layers(text)
        except ValueError as e:
            raise ValueError(str(e).replace("--layers", "layers")) from None
        if layers is None:
            layers = list(range(n))
        bad = [x for x in layers if not -n <= x < n]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range for {self.model.name!r}, which has {n} layers: give "
                             f"layers from 0 to {n - 1} (or -{n} to -1 counting from the end).")
        out = list(dict.fromkeys(x % n for x in layers))
        return tuple(out)

    # ------------------------------------------------------------------------------- cached activations
    def builtin_acts(self, site: str, stop: Callable[[str, int, int], None] | None = None) -> Any:
        """Every reference (built-in) prompt's activation at ``site`` (all layers, last prompt token, chat format):
        ``[prompt layer d_model]``, rows in :attr:`reference`'s order (train, val, then the rest), computed once per
        site (in steps of :data:`ACTS_CHUNK` prompts, so a cancel can stop it; steps the background thread already
        did are kept) or read from the disk cache."""
        return self._first_acts(site, len(self.reference), None, stop)

    def _first_acts(self, site: str, rows: int, what: str | None,
                    stop: Callable[[str, int, int], None] | None = None) -> Any:
        """The activations of the first ``rows`` reference prompts (``[rows layer d_model]``), collecting only the
        steps that cover them: the train prompts come first (``rows = self._n_train``), then val. With ``what``
        ("train", "train and val"), the progress counts those rows only, named by it."""
        import torch

        if stop is not None and what is not None:
            outer = stop

            def stop(phase: str, done: int, total: int) -> None:
                outer(f"built-in activations ({site}, {what} prompts)", min(done, rows), rows)

        while True:
            if site in self._acts:
                return self._acts[site][:rows]
            with self._model_lock:
                parts = self._acts_parts.get(site) or {}
                need = range(0, rows, ACTS_CHUNK)
                if site not in self._acts and all(a in parts for a in need):
                    return torch.cat([parts[a] for a in need])[:rows]
            acts = self._acts_step(site, stop)
            if acts is not None:
                return acts[:rows]

    def _acts_step(self, site: str, stop: Callable[[str, int, int], None] | None = None) -> Any:
        """One step towards ``builtin_acts(site)``: the activations when complete (from memory, the disk cache or
        the last missing chunk, which this call computes), else ``None`` after computing one more chunk."""
        import torch

        from catlens.cache import collect

        if site in self._acts:
            return self._acts[site]
        with self._model_lock:
            if site in self._acts:
                return self._acts[site]
            self._load_from_disk(site)
            if site in self._acts:
                return self._acts[site]
            n = len(self.reference)
            parts = self._acts_parts.setdefault(site, {})
            todo = [a for a in range(0, n, ACTS_CHUNK) if a not in parts]
            if todo:
                if stop is not None:
                    stop(f"built-in activations ({site})", self._rows_done(site), n)
                a = todo[0]
                store = collect(self.model, self.reference[a:a + ACTS_CHUNK], sites=[site], layers=None,
                                show_progress=False)
                parts[a] = store.get(site).float()
                if len(todo) > 1:
                    return None
            acts = torch.cat([parts[a] for a in sorted(parts)])
            with self._cache_lock:
                self._acts[site] = acts
                self._acts_parts.pop(site, None)
            self._write_cached(site, acts)
            return acts

    def _rows_done(self, site: str) -> int:
        if site in self._acts:
            return len(self.reference)
        parts = self._acts_parts.get(site) or {}
        return min(len(parts) * ACTS_CHUNK, len(self.reference))

    # ------------------------------------------------------------------------- the disk cache of activations
    @staticmethod
    def _check_cache(cache: Any) -> Path | None:
        from catlens.model import cache_dir

        if cache is False:
            return None
        if cache is None or cache is True:
            return cache_dir() / "explore"
        if not isinstance(cache, (str, Path)) and not hasattr(cache, "__fspath__"):
            raise ValueError(f"cache={cache!r}: give a folder, None (catlens's cache folder) or False (memory "
                             f"only).")
        path = Path(cache)
        if path.exists() and not path.is_dir():
            raise ValueError(f"cache={str(path)!r} is a file; give a folder for the explorer's activations.")
        return path

    def _cache_key(self, site: str) -> dict[str, Any] | None:
        """What the reference activations at ``site`` depend on, or ``None`` when the model's weights have no hash
        in its provenance (then nothing is cached on disk)."""
        prov = {k: v for k, v in (self.model.provenance or {}).items() if k != "load_seconds"}
        source = prov.get("source") or {}
        if not (source.get("weights_sha256") or source.get("file_sha256")):
            return None
        rendered = self.model.format(list(self.reference.texts), "chat")
        return {"version": ACTS_CACHE_VERSION, "model": prov, "site": site, "position": "last", "fmt": "chat",
                "chunk": ACTS_CHUNK, "dtype": "float32", "n_prompts": len(rendered),
                "rendered_sha256": hashlib.sha256(json.dumps(rendered).encode()).hexdigest()}

    def _cache_file(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self._cache_root / f"acts-{key['site']}-{digest}.safetensors"

    def _read_cached(self, site: str) -> Any:
        if self._cache_root is None:
            return None
        try:
            key = self._cache_key(site)
            if key is None:
                return None
            path = self._cache_file(key)
            if not path.is_file():
                return None
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                acts = f.get_tensor("acts")
            want = (len(self.reference), self.model.n_layers, self.model.d_model)
            if json.loads(meta.get("key", "null")) != json.loads(json.dumps(key, default=str)) or \
                    tuple(acts.shape) != want:
                log.info("explore: %s does not match this model and prompt set; recomputing", path)
                return None
            log.info("explore: reference activations at %s read from %s", site, path)
            return acts
        except Exception as e:  # noqa: BLE001 -- a damaged cache file is recomputed, never fatal
            log.warning("explore: could not read the activation cache (%s); recomputing", e)
            return None

    def _write_cached(self, site: str, acts: Any) -> None:
        if self._cache_root is None:
            return
        try:
            key = self._cache_key(site)
            if key is None:
                return
            from safetensors.torch import save_file

            from catlens.runs import atomic_path

            with atomic_path(self._cache_file(key)) as tmp:
                save_file({"acts": acts.contiguous()}, str(tmp),
                          metadata={"key": json.dumps(key, sort_keys=True, default=str)})
        except Exception as e:  # noqa: BLE001 -- the cache only saves time
            log.warning("explore: could not write the activation cache in %s (%s)", self._cache_root, e)

    # ------------------------------------------------------------------------------ the map, in the background
    def start_preparing(self, sites: Sequence[str] | None = None) -> None:
        """Collect the reference activations at ``sites`` (default: the page's starting site) in a background
        thread, one step of :data:`ACTS_CHUNK` prompts at a time, letting any waiting request have the model
        first. Returns at once; :meth:`map_status` reports the progress."""
        with self._lock:
            if self._closing.is_set():
                return
            for site in sites if sites is not None else [self.defaults()["site"]]:
                if site not in self._map_sites:
                    self._map_sites.append(site)
                self._map_errors.pop(site, None)  # a site that failed is tried again (its done steps are kept)
            if self._map_thread is None:
                self._map_thread = threading.Thread(target=self._prepare_loop, name="catlens-explore-map",
                                                    daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [self._map_thread]
                self._map_thread.start()

    def _prepare_loop(self) -> None:
        try:
            self._prepare_sites()
        finally:
            with self._lock:
                if self._map_thread is threading.current_thread():
                    self._map_thread = None

    def _prepare_sites(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                site = next((s for s in self._map_sites if s not in self._acts and s not in self._map_errors),
                            None)
                if site is None:
                    self._map_thread = None
                    return
                waiting = self._waiting
            if waiting:
                time.sleep(0.01)
                continue
            try:
                self._acts_step(site)
            except BaseException as e:  # shown in the page where the map would be, then the next site
                log.warning("explore: preparing the map at %s failed", site, exc_info=True)
                with self._lock:
                    self._map_errors[site] = _message(e)
                if not isinstance(e, Exception):
                    raise

    def map_status(self, site: str) -> dict[str, Any]:
        """The reference activations at ``site``: ``ready``, ``done``/``total`` prompts and ``error`` (why the
        background thread stopped before the map was ready, else None)."""
        with self._lock:
            idle = self._map_thread is None or not self._map_thread.is_alive()
            error = self._map_errors.get(site)
        ready = site in self._acts  # read after idle: a thread that has ended left its site ready or failed
        if ready:
            error = None
        elif error is None and self._closing.is_set():
            error = "the explorer was closed before the map was ready."
        elif error is None and idle:
            error = "nothing is preparing it (run the request again to start)."
        return {"site": site, "ready": ready, "done": self._rows_done(site), "total": len(self.reference),
                "error": error}

    @contextlib.contextmanager
    def _model_for_request(self) -> Any:
        """Hold the model for a request; the background thread does not start another step while one waits."""
        with self._lock:
            self._waiting += 1
        try:
            self._model_lock.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            yield
        finally:
            self._model_lock.release()

    def _masks(self) -> dict[str, Any]:
        import torch

        f = self._frame
        return {"train": torch.tensor((f.split == "train").to_numpy()),
                "val": torch.tensor((f.split == "val").to_numpy()),
                "harmful": torch.tensor((f.label == "harmful").to_numpy())}

    def directions(self, method: str, site: str, stop: Any = None) -> Any:
        """Unit directions of every built-in category at every layer, from the ``train`` split, with ``ref_norm``
        (mean activation norm of the train prompts per layer)."""
        from catlens import directions as D

        key = (method, site)
        if key in self._dirs:
            return self._dirs[key]
        n = self._n_train
        acts = self._first_acts(site, n, "train", stop)
        harmful = self._masks()["harmful"][:n]
        cats = self._frame.category[:n]
        harm_by_cat = {c: acts[harmful & _mask(cats == c)] for c in self.builtin_categories}
        benign = acts[~harmful]
        common = {"site": site, "provenance": {"prompts": "builtin train split", "position": "last", "fmt": "chat"}}
        if method not in CONSTRUCTORS:
            raise ValueError(unknown_name_message("direction constructor", method, CONSTRUCTORS))
        dirs = D.fit_directions(harm_by_cat, method, benign=benign, normalize=True, **common)
        dirs = dirs.with_ref_norm(acts)
        with self._cache_lock:
            self._dirs[key] = dirs
        return dirs

    def gate(self, layer: int, stop: Any = None) -> Any:
        """A harmful-vs-benign probe at ``resid_post`` of ``layer`` (fitted on train, threshold on val)."""
        from catlens.probes import fit_gate

        if layer not in self._gates:
            n = self._n_fit
            acts = self._first_acts("resid_post", n, "train and val", stop)[:, layer]
            m = {k: v[:n] for k, v in self._masks().items()}
            tr, va, h = m["train"], m["val"], m["harmful"]
            g = fit_gate(acts[tr & h], acts[tr & ~h], layer=layer, val=(acts[va & h], acts[va & ~h]),
                         name=f"explorer probe L{layer}")
            with self._cache_lock:
                self._gates[layer] = g
        return self._gates[layer]

    def router(self, categories: Sequence[str], layer: int, stop: Any = None) -> Any:
        """The refusal-token router when the model has a token for every category, else a probe router at
        ``resid_post`` of ``layer`` fitted on the built-in train prompts of those categories."""
        from catlens.probes import fit_router_probe
        from catlens.steer import Router

        cats = tuple(sorted(categories))
        if self.tokens is not None and all(c in self.tokens.categories for c in cats):
            return Router("refusal_tokens", cats)
        key = (layer, cats)
        if key not in self._routers:
            n = self._n_train
            acts = self._first_acts("resid_post", n, "train", stop)[:, layer]
            f = self._frame[:n]
            rows = self._masks()["harmful"][:n] & _mask(f.category.isin(cats))
            labels = list(f.category[rows.numpy()])
            if len(cats) == 2:  # fit_router_probe assumes >= 3 classes (sklearn's binary coef_ has one row)
                router = _binary_router(acts[rows], labels, cats, layer)
            else:
                router = fit_router_probe(acts[rows], labels, layer=layer)
            with self._cache_lock:
                self._routers[key] = router
        return self._routers[key]

    # ----------------------------------------------------------------------------------------- policy
    def build_policy(self, req: Request, stop: Any = None) -> tuple[Any, dict[str, Any] | None, str]:
        """The steering policy of a request, per-row overrides for :func:`catlens.generate` (or None) and a
        one-line description."""
        import torch

        from catlens.steer import Intervention, SteeringPolicy, with_coeff

        rows = None
        if req.method == "policy":
            pol = self.policy
            if req.mode == "single":
                pol = replace(pol, gate=None, toward=None, away=None)
                if req.coeff is not None:
                    pol = with_coeff(pol, req.coeff)
            else:
                first = pol.interventions[0].layer % self.model.n_layers
                gate = pol.gate if pol.gate is not None else self.gate(first, stop)
                pol = replace(pol, gate=gate, toward=req.toward, away=req.away)
            if req.route:
                if pol.router is None:
                    raise ValueError(f"policy {pol.name!r} has no router: untick 'route' and choose one category.")
            else:
                pol = replace(pol, router=None)
                if any(iv.kind != "low_rank" and iv.n_directions > 1 for iv in pol.interventions):
                    if len(req.categories) != 1:
                        raise ValueError(f"policy {pol.name!r} steers one of several directions per prompt: choose "
                                         f"exactly one category (or tick 'route' to let its router choose).")
                    rows = {"direction": [req.categories[0]]}
            what = f"policy {pol.name!r} as loaded"
            return pol, rows, self._describe(pol, what)
        dirs = self.directions(req.method, req.site, stop).select(categories=list(req.categories))
        ivs = []
        for layer in req.layers:
            vecs = dirs.at(layer)
            ref = float(dirs.ref_norm[dirs.layer_index(layer)])
            common = {"scale": req.scale, "ref_norm": ref}
            if req.edit == "ablate":
                q, _ = torch.linalg.qr(vecs.double().T)  # orthonormal basis of the selected directions
                for j in range(q.shape[1]):
                    ivs.append(Intervention(req.site, layer, q[:, j].float(), kind="ablate", positions="all",
                                            label=f"ablate {j}", **common))
            elif req.route and len(req.categories) > 1:
                ivs.append(Intervention(req.site, layer, vecs, labels=req.categories, positions=ADD_POSITIONS,
                                        coeff=req.coeff or 0.0, **common))
            else:
                ivs.append(Intervention(req.site, layer, vecs.sum(0), labels=("+".join(req.categories),),
                                        positions=ADD_POSITIONS, coeff=req.coeff or 0.0, **common))
        gate = router = None
        if req.mode == "gated":
            gate = self.gate(req.layers[0], stop)
        if req.route and len(req.categories) > 1 and req.edit == "add":
            router = self.router(req.categories, req.layers[0], stop)
        pol = SteeringPolicy(tuple(ivs), gate=gate, router=router, toward=req.toward if gate else None,
                             away=req.away if gate else None, name=f"explore-{req.method}")
        what = f"{req.method} directions from the built-in train prompts ({', '.join(req.categories)})"
        return pol, rows, self._describe(pol, what)

    @staticmethod
    def _describe(pol: Any, what: str) -> str:
        iv = pol.interventions[0]
        layers = sorted({i.layer for i in pol.interventions})
        if iv.kind == "ablate":
            how = f"ablate {len(pol.interventions)} direction(s) at every position"
        elif pol.gate is not None:
            how = f"add, toward {pol.toward} / away {pol.away}" + (" × residual norm" if iv.scale == "norm" else "")
        else:
            how = f"add {iv.coeff:g}" + (" × residual norm" if iv.scale == "norm" else " (raw)")
        pos = iv.positions if isinstance(iv.positions, str) else ",".join(map(str, iv.positions))
        extra = []
        if pol.gate is not None:
            extra.append(f"gate {pol.gate.name!r} at layer {pol.gate.layer}")
        if pol.router is not None:
            extra.append(f"{pol.router.kind} router")
        return (f"{what}: {how}; {iv.site.value} layer(s) {', '.join(map(str, layers))}; positions {pos}"
                + (f"; {'; '.join(extra)}" if extra else "") + ".")

    # -------------------------------------------------------------------------------------------- run
    def run(self, req: Request, job: _Job | None = None) -> dict[str, Any]:
        """Everything one request shows, computed synchronously: the unsteered and steered records, the policy's
        description and the prompt's place in the PCA of the reference prompts (``pca``; when their activations at
        the site are not ready yet, ``{"pending": True, ...}`` with the prompt's own activation, and the background
        thread is asked to prepare them: :meth:`complete_map` fills it in later). With ``job``, progress goes there
        and its cancel flag stops the work (:class:`Cancelled`).

        The unsteered answer is generated first (or reused: same prompt and length) and, with ``job``, published at
        once as the job's partial result (``{"request", "unsteered"}``, see :meth:`status`); then the policy is made
        (which may collect the reference activations first, with progress) and the steered answer generated."""
        from catlens.errors import GenerationCancelled
        from catlens.generation import generate

        def stop(phase: str, done: int, total: int) -> None:
            if job is not None:
                job.phase, job.done, job.total = phase, done, total
                if job.cancel.is_set():
                    raise Cancelled(job.id)

        def gen_stop(phase: str) -> Callable[[int], bool]:
            def should_stop(n: int) -> bool:
                if job is None:
                    return False
                job.phase, job.done, job.total = phase, n, req.max_new_tokens
                return job.cancel.is_set()

            return should_stop

        t0 = time.perf_counter()
        with self._model_for_request():
            stop("preparing", 0, 0)
            try:
                kw = {"max_new_tokens": req.max_new_tokens, "batch_size": 1, "show_progress": False,
                      "allow_transfer": self.allow_transfer}
                key = (req.prompt, req.max_new_tokens)
                unsteered = self._unsteered.get(key)
                if unsteered is None:  # the same prompt and length: the unsteered answer is reused
                    unsteered = generate(self.model, [req.prompt], None, should_stop=gen_stop("unsteered answer"),
                                         **{k: v for k, v in kw.items() if k != "allow_transfer"})[0]
                    if len(self._unsteered) >= 64:
                        self._unsteered.pop(next(iter(self._unsteered)))
                    self._unsteered[key] = unsteered
                if job is not None:  # shown while the policy is made (it may collect the reference activations)
                    self._publish_partial(job, {"request": req, "unsteered": unsteered})
                stop("preparing the steering", 0, 0)
                policy, rows, summary = self.build_policy(req, stop)
                steered = generate(self.model, [req.prompt], policy, rows=rows,
                                   should_stop=gen_stop("steered answer"), **kw)[0]
                stop("projection", 0, 0)
                pca = self._pca_or_pending(req.prompt, req.site, req.layers[0])
            except GenerationCancelled:
                raise Cancelled(job.id if job else 0) from None
        if pca.get("pending"):
            self.start_preparing([req.site])
        return {"request": req, "unsteered": unsteered, "steered": steered, "summary": summary, "pca": pca,
                "seconds": time.perf_counter() - t0}

    def pca_point(self, prompt: str, site: str, layer: int, stop: Any = None) -> dict[str, Any]:
        """The PCA of the built-in prompts at ``(site, layer)`` (fitted once, cached) and ``prompt``'s place in it
        (collecting the reference activations first if needed)."""
        self.builtin_acts(site, stop)
        h = self._prompt_act(prompt, site, layer)
        return {"site": site, "layer": layer, **self._project(self._map_fit(site, layer), h)}

    def _prompt_act(self, prompt: str, site: str, layer: int) -> Any:
        from catlens.cache import collect

        with self._model_lock:
            return collect(self.model, [prompt], sites=[site], layers=[layer], show_progress=False).get(site)[0, 0]

    def _map_fit(self, site: str, layer: int) -> dict[str, Any]:
        """The PCA of the reference activations at ``(site, layer)`` (which must be complete), fitted once."""
        from sklearn.decomposition import PCA

        key = (site, layer)
        if key not in self._pca:
            x = self._acts[site][:, layer].double().numpy()
            pca = PCA(n_components=2, random_state=0).fit(x)
            f = self._frame
            group = [c if lab == "harmful" else "benign" for c, lab in zip(f.category, f.label)]
            with self._cache_lock:
                self._pca.setdefault(key, {"pca": pca, "xy": pca.transform(x), "group": group,
                                           "text": list(f.text)})
        return self._pca[key]

    @staticmethod
    def _project(fit: Mapping[str, Any], h: Any) -> dict[str, Any]:
        xy = fit["pca"].transform(h.double().numpy()[None])[0]
        return {"xy": fit["xy"], "group": fit["group"], "text": fit["text"], "point": (float(xy[0]), float(xy[1])),
                "var": fit["pca"].explained_variance_ratio_.tolist()}

    def _pca_or_pending(self, prompt: str, site: str, layer: int) -> dict[str, Any]:
        """The prompt's place in the map when the reference activations at ``site`` are in memory or on disk;
        otherwise a pending record holding the prompt's activation (never waits for the reference prompts)."""
        h = self._prompt_act(prompt, site, layer)
        if site not in self._acts and site not in self._disk_tried:
            self._load_from_disk(site)
        if site in self._acts:
            return {"site": site, "layer": layer, **self._project(self._map_fit(site, layer), h)}
        return {"site": site, "layer": layer, "pending": True, "h": h}

    def _load_from_disk(self, site: str) -> None:
        """Read the reference activations at ``site`` from the disk cache (tried once per site)."""
        with self._model_lock:
            if site in self._acts or site in self._disk_tried:
                return
            self._disk_tried.add(site)
            cached = self._read_cached(site)
            if cached is not None:
                with self._cache_lock:
                    self._acts[site] = cached
                    self._acts_parts.pop(site, None)

    def complete_map(self, result: dict[str, Any]) -> bool:
        """Fill in ``result["pca"]`` (a result from :meth:`run` whose map was pending) once the reference
        activations at its site are ready; True when the result holds the map (now or already)."""
        pca = result["pca"]
        if not pca.get("pending"):
            return True
        site, layer = pca["site"], pca["layer"]
        if site not in self._acts:
            return False
        full = {"site": site, "layer": layer, **self._project(self._map_fit(site, layer), pca["h"])}
        with self._cache_lock:
            result["pca"] = full
        return True

    # -------------------------------------------------------------------------------- jobs (a thread)
    def submit(self, req: Request) -> int:
        """Start ``req`` in a worker thread, cancelling the running request; returns the new job's id."""
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()
            job = _Job(next(self._ids), req)
            self._jobs[job.id] = job
            for old in sorted(self._jobs)[:-20]:  # keep the last 20
                del self._jobs[old]
            self._current = job
        thread = threading.Thread(target=self._work, args=(job,), name=f"catlens-explore-{job.id}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return job.id

    def _work(self, job: _Job) -> None:
        job.state = "running"
        try:
            result = self.run(job.request, job)
        except Cancelled:
            job.state = "cancelled"
            return
        except Exception as e:  # noqa: BLE001 -- every failure becomes a message in the page
            log.warning("explore job %d failed", job.id, exc_info=True)
            job.error, job.state = _message(e), "error"
            return
        self._publish(job, result)

    def _live(self, job: _Job | None) -> bool:
        """``job`` is the newest request and not cancelled: what it computes may be shown (call under the lock)."""
        return job is not None and self._current is job and not job.cancel.is_set()

    def _publish_partial(self, job: _Job, partial: dict[str, Any]) -> bool:
        """Store the unsteered answer on ``job`` while it is the newest request and not cancelled (as
        :meth:`_publish`); a superseded job's partial result is dropped (its work stops at the next step)."""
        with self._lock:
            if not self._live(job):
                return False
            job.partial = partial
            return True

    def _publish(self, job: _Job, result: dict[str, Any]) -> bool:
        """Store ``result`` on ``job`` unless a newer request has started (then the job is 'superseded')."""
        with self._lock:
            if not self._live(job):
                job.state = "superseded"
                return False
            job.result, job.state = result, "done"
            return True

    def cancel(self) -> None:
        """Cancel the running request (if any)."""
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running request, stop preparing the map and wait for every worker thread to end."""
        self._closing.set()
        self.cancel()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)

    def status(self, job_id: int) -> dict[str, Any]:
        """A job's ``state`` (queued, running, done, error, cancelled, superseded), ``phase``, ``done``/``total``,
        ``error``, ``result`` (when done), ``partial`` (``{"request", "unsteered"}`` once the unsteered answer
        exists, while the job is the newest and not cancelled; else None) and ``newest`` (no newer request
        exists)."""
        with self._lock:
            job = self._jobs.get(job_id)
            newest = self._current is job
            partial = job.partial if self._live(job) else None
        if job is None:
            return {"id": job_id, "state": "unknown", "phase": "", "done": 0, "total": 0, "error": None,
                    "result": None, "partial": None, "newest": False}
        state = job.state
        if not newest and state in ("queued", "running"):
            state = "superseded"
        return {"id": job.id, "state": state, "phase": job.phase, "done": job.done, "total": job.total,
                "error": job.error, "result": job.result if state == "done" and newest else None,
                "partial": partial, "newest": newest,
                "seconds": time.perf_counter() - job.started}

    def wait(self, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
        """Block until a job has finished (for tests and notebooks); its :meth:`status`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.status(job_id)
            if st["state"] not in ("queued", "running"):
                return st
            time.sleep(0.02)
        raise TimeoutError(f"explore job {job_id} did not finish within {timeout} s.")


def _binary_router(acts: Any, labels: Sequence[str], cats: tuple[str, str], layer: int) -> Any:
    """A two-category probe router: the logistic regression's ``w·h + b`` split as ``±(w·h + b)/2``."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from catlens.steer import Router

    clf = LogisticRegression(max_iter=5000).fit(acts.numpy(), labels)
    sign = 1.0 if clf.classes_[1] == cats[1] else -1.0
    w = torch.from_numpy(clf.coef_[0].astype(np.float32)) * sign / 2
    b = float(clf.intercept_[0]) * sign / 2
    return Router("probe", cats, weight=torch.stack([-w, w]), bias=torch.tensor([-b, b]), layer=layer)


_MODEL_LOCKS: dict[int, tuple[Any, Any]] = {}
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Any) -> Any:
    """One (re-entrant) lock per model object, shared by every Explorer on it (its hooks are global to the
    model)."""
    with _MODEL_LOCKS_GUARD:
        entry = _MODEL_LOCKS.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, threading.RLock())
            _MODEL_LOCKS[id(model)] = entry
        return entry[1]


def _mask(series: Any) -> Any:
    import torch

    return torch.tensor(series.to_numpy(dtype=bool))


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return text or type(e).__name__


# ------------------------------------------------------------------------------------------------ figures
def probs_figure(unsteered: Mapping[str, Any], steered: Mapping[str, Any]) -> Any:
    """Grouped bars: the refusal-token probabilities at the first response position, unsteered and steered."""
    import plotly.graph_objects as go

    from catlens.plotting import template

    fig = go.Figure()
    for name, rec in (("unsteered", unsteered), ("steered", steered)):
        probs = rec.get("first_probs") or {}
        fig.add_bar(name=name, x=list(probs), y=list(probs.values()),
                    hovertemplate="%{x}: %{y:.3f}<extra>" + name + "</extra>")
    fig.update_layout(template=template(), barmode="group", height=420, margin=dict(l=50, r=10, t=40, b=40),
                      title="Refusal-token probabilities, first response position",
                      yaxis=dict(title="probability", range=[0, 1]),
                      legend=dict(orientation="h", y=-0.25, x=0.5, xanchor="center"))
    return fig


def pca_figure(pca: Mapping[str, Any]) -> Any:
    """The built-in prompts' PCA at the chosen site and layer (harmful by category, benign in grey) with the
    prompt marked."""
    import numpy as np
    import plotly.graph_objects as go

    from catlens.plotting import template

    fig = go.Figure()
    xy, group, text = np.asarray(pca["xy"]), np.asarray(pca["group"], dtype=object), pca["text"]
    order = ["benign"] + sorted(g for g in set(group.tolist()) if g != "benign")
    for g in order:
        idx = np.flatnonzero(group == g)
        fig.add_scatter(x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=g,
                          marker=dict(size=6, opacity=0.65, **({"color": "#BBBBBB"} if g == "benign" else {})),
                          text=[text[i][:90] for i in idx], hovertemplate="%{text}<extra>" + g + "</extra>")
    px, py = pca["point"]
    fig.add_scatter(x=[px], y=[py], mode="markers", name="this prompt", hovertemplate="this prompt<extra></extra>",
                    marker=dict(symbol="star", size=20, color="black", line=dict(width=1, color="white")))
    var = pca["var"]
    fig.update_layout(template=template(), height=420, margin=dict(l=50, r=10, t=40, b=40),
                      title=f"Built-in prompts, PCA at {pca['site']} layer {pca['layer']}",
                      xaxis_title=f"PC1 ({var[0]:.0%})", yaxis_title=f"PC2 ({var[1]:.0%})")
    return fig


def _decision_text(rec: Mapping[str, Any]) -> list[str]:
    out = []
    g = rec.get("gate")
    if g:
        out.append(f"gate: score {g['score']:.3f} vs threshold {g['threshold']:.3f} -> "
                   f"{'flagged (toward)' if g['flagged'] else 'passed (away)'}, coefficient {g['coeff']}")
    else:
        out.append("gate: none (every prompt gets the coefficient)")
    r = rec.get("route")
    if r:
        detail = f" (p={r['p']:.3f})" if "p" in r else (f" (logit {r['logit']:.2f})" if "logit" in r else "")
        out.append(f"router ({r['kind']}): {r['category']}{detail}")
    else:
        out.append("router: none")
    if rec.get("refusal_score") is not None:
        out.append(f"refusal score (first position): {rec['refusal_score']:.3f}")
    return out


# ------------------------------------------------------------------------------------------------ the page
_BOX = {"border": "1px solid #ddd", "borderRadius": "6px", "padding": "10px", "background": "#fff"}
_LABEL = {"fontWeight": "600", "fontSize": "13px", "display": "block", "marginTop": "8px"}
_ERROR = {"color": "#8a1f11", "background": "#fde8e4", "border": "1px solid #e0a89c", "borderRadius": "4px",
          "padding": "8px 10px", "margin": "8px 0"}
_ANSWER = {"whiteSpace": "pre-wrap", "fontFamily": "monospace", "fontSize": "14px", "minHeight": "3em",
           "margin": "0", "background": "#f7f7f7", "padding": "8px", "borderRadius": "4px"}


def _control(label: str, component: Any, hint: str = "") -> Any:
    from dash import html

    kids = [html.Label(label, style=_LABEL), component]
    if hint:
        kids.append(html.Div(hint, style={"fontSize": "11px", "color": "#666"}))
    return html.Div(kids)


def layout(ex: Explorer) -> Any:
    from dash import dcc, html

    d = ex.defaults()
    opts = lambda xs: [{"label": x, "value": x} for x in xs]  # noqa: E731
    controls = html.Div([
        _control("prompt set", dcc.Dropdown(id="prompt-set", options=opts(ex.prompt_sets), value="builtin",
                                            clearable=False)),
        _control("pick a prompt", dcc.Dropdown(id="prompt-pick", options=[], placeholder="search the set...")),
        html.Div(id="set-message"),
        _control("method", dcc.RadioItems(id="method", options=opts(ex.methods), value=d["method"]),
                 ("policy: as loaded; the others make " if ex.policy is not None else "")
                 + "unit directions from the built-in train prompts"),
        _control("edit", dcc.RadioItems(id="edit", options=opts(EDITS), value=d["edit"], inline=True)),
        _control("categories", dcc.Dropdown(id="categories", options=opts(ex.categories_for(d["method"])),
                                            value=d["categories"], multi=True)),
        dcc.Checklist(id="route", options=[{"label": " route: the router picks one category per prompt",
                                            "value": "route"}], value=["route"] if d["route"] else []),
        _control("coefficients", dcc.RadioItems(id="mode", options=[
            {"label": "one coefficient", "value": "single"},
            {"label": "gated: toward / away", "value": "gated"}], value=d["mode"], inline=True)),
        html.Div([
            _control("coefficient", dcc.Input(id="coeff", type="text", value=d["coeff"], debounce=False,
                                              style={"width": "90px"})),
            _control("toward", dcc.Input(id="toward", type="text", value=d["toward"], style={"width": "90px"})),
            _control("away", dcc.Input(id="away", type="text", value=d["away"], style={"width": "90px"})),
        ], style={"display": "flex", "gap": "10px"}),
        _control("scale", dcc.RadioItems(id="scale", options=[
            {"label": "fraction of the residual norm", "value": "norm"}, {"label": "raw", "value": "raw"}],
            value=d["scale"], inline=True)),
        html.Div([
            _control("layer(s)", dcc.Input(id="layers", type="text", value=d["layers"], style={"width": "90px"}),
                     f"0..{ex.model.n_layers - 1}, e.g. 2 or 1,3"),
            _control("site", dcc.Dropdown(id="site", options=opts(SITES), value=d["site"], clearable=False,
                                          style={"width": "150px"})),
            _control("max new tokens", dcc.Input(id="max-new", type="text", value=d["max_new_tokens"],
                                                 style={"width": "70px"})),
        ], style={"display": "flex", "gap": "10px", "alignItems": "flex-start"}),
        html.Div(id="policy-note", style={"fontSize": "12px", "color": "#555", "marginTop": "6px"}),
    ], style={**_BOX, "flex": "0 0 360px"})

    main = html.Div([
        dcc.Textarea(id="prompt", value=d["prompt"], placeholder="Type a prompt...",
                     style={"width": "100%", "height": "80px", "fontSize": "15px"}),
        html.Div([html.Button("Run", id="run", n_clicks=0,
                              style={"fontSize": "15px", "padding": "6px 24px", "cursor": "pointer"}),
                  html.Div(id="progress", style={"fontSize": "13px", "color": "#444"})],
                 style={"display": "flex", "gap": "14px", "alignItems": "center", "margin": "8px 0"}),
        html.Div(id="message", role="alert"),
        html.Div(id="results", children=html.Div("Type a prompt and press Run.", style={"color": "#666"})),
    ], style={"flex": "1 1 auto", "minWidth": "0"})

    return html.Div([
        html.H2("catlens explore", style={"margin": "4px 0"}),
        html.Div(f"model {ex.model.name} · {ex.model.n_layers} layers · d_model {ex.model.d_model}"
                 + (f" · refusal tokens for {len(ex.tokens.categories)} categories" if ex.tokens is not None
                    else " · no refusal tokens")
                 + (f" · policy {ex.policy.name!r}" if ex.policy is not None else ""),
                 style={"color": "#555", "fontSize": "13px", "marginBottom": "8px"}),
        html.Div([controls, main], style={"display": "flex", "gap": "16px", "alignItems": "flex-start"}),
        dcc.Store(id="job", data=None),
        dcc.Store(id="shown", data=None),
        dcc.Interval(id="poll", interval=250, disabled=True),
    ], style={"fontFamily": "system-ui, sans-serif", "padding": "10px 16px", "background": "#fafafa"})


def render_result(result: Mapping[str, Any], map_status: Mapping[str, Any] | None = None) -> Any:
    """The results panel of a finished request (``map_status``: :meth:`Explorer.map_status` of a pending map)."""
    from dash import dcc, html

    un, st = result["unsteered"], result["steered"]
    same = un["token_ids"] == st["token_ids"]
    kids = [
        html.Div(result["summary"], id="summary", style={"fontSize": "13px", "margin": "4px 0 8px"}),
        html.Div([_column("unsteered", un, "unsteered"), _column("steered", st, "steered")],
                 style={"display": "flex", "gap": "12px"}),
        html.Div("The steered answer is identical to the unsteered one." if same else
                 "The steered answer differs from the unsteered one.", id="same",
                 style={"fontSize": "13px", "margin": "6px 0", "color": "#555"}),
    ]
    graphs = []
    if un.get("first_probs") is not None:
        graphs.append(dcc.Graph(id="probs", figure=probs_figure(un, st), config={"displaylogo": False},
                                style={"flex": "1 1 0", "minWidth": "0"}))
    else:
        graphs.append(html.Div("Not a refusal-token model: no first-position refusal-token probabilities.",
                               style={**_BOX, "flex": "1 1 0"}))
    if result["pca"].get("pending"):
        graphs.append(html.Div(_map_pending_text(result["pca"], map_status), id="pca-pending",
                               style={**_BOX, "flex": "1 1 0", "color": "#555", "fontSize": "13px"}))
    else:
        graphs.append(dcc.Graph(id="pca", figure=pca_figure(result["pca"]), config={"displaylogo": False},
                                style={"flex": "1 1 0", "minWidth": "0"}))
    kids.append(html.Div(graphs, style={"display": "flex", "gap": "12px"}))
    return html.Div(kids)


def _column(title: str, rec: Mapping[str, Any], ident: str, extra: Sequence[Any] = ()) -> Any:
    from dash import html

    return html.Div([html.H4(title, style={"margin": "0 0 6px"}),
                     html.Pre(rec["response"] or "(empty answer)", id=ident, style=_ANSWER),
                     html.Div(_n_tokens(rec), style={"fontSize": "12px", "color": "#666", "marginTop": "4px"}),
                     html.Ul([html.Li(t) for t in _decision_text(rec)],
                             style={"fontSize": "13px", "paddingLeft": "18px"}), *extra],
                    style={**_BOX, "flex": "1 1 0", "minWidth": "0"})


def render_partial(partial: Mapping[str, Any], status: Mapping[str, Any] | None = None,
                   note: str | None = None) -> Any:
    """The results panel while only the unsteered answer exists (:meth:`Explorer.status`'s ``partial``): the
    unsteered column (answer, first-position refusal-token probabilities) and, in the steered column, the job's
    progress (``status``) or ``note`` (e.g. why no steered answer will come)."""
    from dash import html

    un, req = partial["unsteered"], partial["request"]
    extra = []
    probs = un.get("first_probs")
    if probs:
        top = sorted(probs.items(), key=lambda kv: -kv[1])[:6]
        extra.append(html.Div("refusal-token probabilities (first position): "
                              + ", ".join(f"{t} {p:.3f}" for t, p in top), id="unsteered-probs",
                              style={"fontSize": "12px", "color": "#444"}))
    text = note if note is not None else _steered_pending_text(req, status)
    steered = html.Div([html.H4("steered", style={"margin": "0 0 6px"}),
                        html.Div(text, id="steered-pending", style={**_ANSWER, "fontFamily": "inherit",
                                                                     "color": "#555"})],
                       style={**_BOX, "flex": "1 1 0", "minWidth": "0"})
    return html.Div([html.Div([_column("unsteered", un, "unsteered", extra), steered],
                              style={"display": "flex", "gap": "12px"})])


def _steered_pending_text(req: Request, st: Mapping[str, Any] | None) -> str:
    """What the steered column says while the job makes the policy and generates (from its phase/done/total)."""
    what = "the gate" if req.method == "policy" else "the directions"
    if st is None:
        return f"Preparing {what} and the steered answer..."
    phase, done, total = st["phase"], st["done"], st["total"]
    if phase.startswith("built-in activations"):
        return f"Preparing {what}: {phase} {done}/{total} prompts"
    if phase == "steered answer":
        return f"Generating the steered answer: {done}/{total} tokens"
    if phase == "projection":
        return "The steered answer is ready; placing the prompt in the map..."
    return "Preparing the steering..."


def _map_pending_text(pca: Mapping[str, Any], st: Mapping[str, Any] | None) -> str:
    where = f"{pca['site']} layer {pca['layer']}"
    if st is not None and st.get("error"):
        return f"The map of the built-in prompts at {where} could not be prepared: {st['error']}"
    return (f"Preparing the map of the built-in prompts at {where} (its progress is next to the Run button). This "
            f"prompt's place in it appears here when the map is ready; the answers above are final.")


def _n_tokens(rec: Mapping[str, Any]) -> str:
    n = rec["n_new_tokens"]
    return f"{n} token{'' if n == 1 else 's'}" + ("" if rec["finished"] else " (cut at the limit)")


def _progress(st: Mapping[str, Any]) -> Any:
    from dash import html

    phase, done, total = st["phase"], st["done"], st["total"]
    bar = html.Progress(value=str(done), max=str(total)) if total else html.Progress()
    text = f"{phase}: {done}/{total}" if total else f"{phase}..."
    return html.Span([bar, " ", text], id="progress-text")




def on_event(ex: Explorer, trigger: str | None, values: Mapping[str, Any], job_id: int | None,
             shown: str | None = None) -> dict[str, Any]:
    """The page's main callback as a plain function: ``trigger`` is ``"run"`` (the button) or ``"poll"`` (the
    progress timer); ``shown`` is what the page shows of the job (``"<job>:unsteered"``: only the unsteered answer,
    the steered column shows the job's progress, redrawn at every poll; ``"<job>:answers"``: both answers while
    the map is pending; ``"<job>:map"``; ``"<job>:failed"``: both answers, the map could not be prepared; kept in
    the page, so a poll's answer that the browser dropped is sent again). Returns the outputs that change
    (``message``, ``job``, ``poll_disabled``, ``progress``, ``results``, ``dim``, ``shown``); never raises, every
    failure becomes ``message``."""
    from dash import html

    def error(text: str) -> Any:
        return html.Div(text, className="error", style=_ERROR)

    try:
        if trigger == "run":
            req = ex.parse(values)
            new = ex.submit(req)
            return {"message": "", "job": new, "poll_disabled": False, "shown": None,
                    "progress": _progress({"phase": "queued", "done": 0, "total": 0}), "dim": True}
        if trigger == "poll":
            if job_id is None:
                return {"poll_disabled": True}
            st = ex.status(job_id)
            state, partial = st["state"], st["partial"]
            if state in ("queued", "running"):
                if partial is None:
                    return {"progress": _progress(st)}
                return {"progress": _progress(st), "results": render_partial(partial, st), "dim": False,
                        "shown": f"{job_id}:unsteered"}
            if state == "done" and st["result"] is not None:
                # the answers are shown at once; a pending map keeps the timer going and is drawn when ready
                r = st["result"]
                complete = ex.complete_map(r)
                map_st = None if complete else ex.map_status(r["pca"]["site"])
                failed = map_st is not None and map_st["error"] is not None
                view = f"{job_id}:" + ("map" if complete else ("failed" if failed else "answers"))
                done = html.Span(f"done in {r['seconds']:.1f} s", id="progress-text")
                pending = view.endswith(":answers")
                if pending:
                    done = html.Span([done, f" · preparing the map: {map_st['done']}/{map_st['total']} prompts"])
                if shown == view:  # the page shows this already: the map's progress only
                    return {"progress": done} if pending else {"poll_disabled": True}
                return {"poll_disabled": not pending, "results": render_result(r, map_st), "dim": False,
                        "progress": done, "shown": view}
            if state == "error":
                out = {"poll_disabled": True, "message": error(st["error"]), "progress": "", "dim": False}
                if partial is not None:  # the unsteered answer stays; the steered one will not come
                    out.update(results=render_partial(partial, note="No steered answer: see the message above."),
                               shown=f"{job_id}:unsteered")
                return out
            out = {"poll_disabled": True, "progress": html.Span("replaced by a newer request", id="progress-text")}
            if shown == f"{job_id}:unsteered":  # its unfinished answers are greyed (the newer request's follow)
                out["dim"] = True
            return out
        return {}
    except Exception as e:  # noqa: BLE001 -- bad input and failures are shown in the page, never as a traceback
        log.debug("explore: %s", e, exc_info=True)
        return {"message": error(_message(e)), "dim": False}


def create_app(model: Any, policy: Any = None, prompts: Any = None, *, data_dir: Any = None,
               allow_transfer: bool = False, explorer: Explorer | None = None) -> Any:
    """The explorer page as a ``dash.Dash`` app around one loaded ``model`` (see the module docstring);
    ``app.explorer`` is its :class:`Explorer`. Serve it with :func:`serve` (a background thread) or
    ``app.run(host="127.0.0.1", port=8050)``."""
    import dash
    from dash import Input, Output, State, ctx, no_update

    ex = explorer or Explorer(model, policy, prompts, data_dir=data_dir, allow_transfer=allow_transfer)
    ex.start_preparing()  # the map of the starting site, in the background (a request never waits for it)
    app = dash.Dash(__name__, title="catlens explore", update_title=None, serve_locally=True)
    app.layout = layout(ex)
    app.explorer = ex

    outputs = ("message", "job", "poll_disabled", "progress", "results", "dim", "shown")

    @app.callback(
        Output("message", "children"), Output("job", "data"), Output("poll", "disabled"),
        Output("progress", "children"), Output("results", "children"), Output("results", "style"),
        Output("shown", "data"),
        Input("run", "n_clicks"), Input("poll", "n_intervals"),
        State("prompt", "value"), State("method", "value"), State("edit", "value"), State("categories", "value"),
        State("route", "value"), State("mode", "value"), State("coeff", "value"), State("toward", "value"),
        State("away", "value"), State("scale", "value"), State("layers", "value"), State("site", "value"),
        State("max-new", "value"), State("job", "data"), State("shown", "data"),
        prevent_initial_call=True)
    def _main(_clicks: Any, _ticks: Any, *states: Any) -> tuple[Any, ...]:
        values = dict(zip(FIELDS, states[:-2]))
        out = on_event(ex, ctx.triggered_id, values, states[-2], states[-1])
        if "dim" in out:
            out["dim"] = {"opacity": "0.45"} if out["dim"] else {"opacity": "1"}
        return tuple(out.get(k, no_update) for k in outputs)

    @app.callback(Output("prompt-pick", "options"), Output("prompt-pick", "value"),
                  Output("set-message", "children"), Input("prompt-set", "value"))
    def _set(name: Any) -> tuple[Any, ...]:
        try:
            ps = ex.prompt_set(name)
            return [{"label": f"[{p.label}{'/' + p.category if p.category else ''}] {p.text[:110]}", "value": i}
                    for i, p in enumerate(ps)][:5000], None, ""
        except Exception as e:  # noqa: BLE001
            return [], None, html_error(_message(e))

    @app.callback(Output("prompt", "value"), Input("prompt-pick", "value"), State("prompt-set", "value"),
                  prevent_initial_call=True)
    def _pick(index: Any, name: Any) -> Any:
        if index is None:
            return no_update
        try:
            return ex.prompt_set(name)[int(index)].text
        except Exception:  # noqa: BLE001
            return no_update

    @app.callback(Output("categories", "options"), Output("categories", "value"),
                  Output("policy-note", "children"), Output("layers", "disabled"), Output("site", "disabled"),
                  Output("scale", "options"),
                  Output("edit", "options"), Output("layers", "value"), Output("site", "value"),
                  Output("edit", "value"), Output("scale", "value"),
                  Input("method", "value"), State("categories", "value"), prevent_initial_call=True)
    def _method(method: Any, current: Any) -> tuple[Any, ...]:
        cats = ex.categories_for(method) if method in ex.methods else ()
        keep = [c for c in (current or []) if c in cats] or list(cats[:1])
        policy_mode = method == "policy"
        scale_opts = [{"label": "fraction of the residual norm", "value": "norm", "disabled": policy_mode},
                      {"label": "raw", "value": "raw", "disabled": policy_mode}]
        edit_opts = [{"label": e, "value": e, "disabled": policy_mode} for e in EDITS]
        if policy_mode:
            pv = ex.policy_values()
            note = "Site, layers, edit and scale come from the policy as loaded."
            return (_opts(cats), pv["categories"], note, True, True, scale_opts, edit_opts, pv["layers"],
                    pv["site"], pv["edit"], pv["scale"])
        return (_opts(cats), keep, "", False, False, scale_opts, edit_opts, *[no_update] * 4)

    return app


def _opts(xs: Sequence[str]) -> list[dict[str, str]]:
    return [{"label": x, "value": x} for x in xs]


def html_error(text: str) -> Any:
    from dash import html

    return html.Div(text, className="error", style=_ERROR)


# ------------------------------------------------------------------------------------------------ serving
class Server:
    """A running explorer: ``url``, ``stop()``; the page is served by a werkzeug server in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class _Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:  # no line per poll
                pass

        self.app = app
        self._server = make_server(host, port, app.server, threaded=True, request_handler=_Quiet)
        self.host, self.port = host, self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="catlens-explore-server",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
        explorer = getattr(self.app, "explorer", None)
        if explorer is not None:
            explorer.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(app: Any, host: str = "127.0.0.1", port: int = 0) -> Server:
    """Serve ``app`` in a background thread (``port=0``: a free port); returns the :class:`Server`."""
    return Server(app, host, port)


def screenshot(url: str, png: Any, *, run: bool = True, width: int = 1500, executable: str | None = None,
               timeout_s: float = 600.0) -> list[str]:
    """Open the explorer at ``url`` in headless Chromium (Playwright driving the system browser), press Run when
    ``run`` and the prompt box is filled (the page's starting values), wait for the answers (or the message) and
    save a full-page PNG. Returns the browser console errors (empty when clean)."""
    from catlens.browser import headless_chromium, page_errors

    with headless_chromium(executable) as browser:
        page = browser.new_page(viewport={"width": width, "height": 1000})
        errors = page_errors(page)
        page.goto(url, timeout=timeout_s * 1000)
        page.wait_for_selector("#run", timeout=timeout_s * 1000)
        if run and page.input_value("#prompt").strip():
            page.click("#run")
            page.wait_for_selector("#steered, #message .error", timeout=timeout_s * 1000)
            if page.query_selector("#steered") is not None:  # the map may still be in preparation: wait for it
                page.wait_for_selector("#pca .main-svg, #pca-pending:has-text('could not be prepared')",
                                       timeout=timeout_s * 1000)
            page.wait_for_timeout(800)  # let the figures draw
        page.screenshot(path=str(png), full_page=True)
    return errors


# ------------------------------------------------------------------------------------------------ CLI
def add_cli(sub: Any) -> None:
    """Register ``catlens explore`` on the CLI's subparsers (dash is imported only when the command runs)."""
    import argparse

    from catlens.model import DEFAULT_MODEL, add_model_options

    p = sub.add_parser(
        "explore", help="a local web page: type a prompt, steer it, compare the answers",
        description="Serve the steering explorer on this machine (Dash; no network is used). The model is loaded\n"
                    "once; open the printed address in a browser.\n\nExamples:\n"
                    "  catlens explore --model ~/.cache/catlens/finetunes/refusal-default\n"
                    "  catlens explore --model <folder> --policy runs/sweep/policy --prompts xstest,catqa\n"
                    "  catlens explore --model <folder> --set layers=18 --set categories=cybercrime,privacy\n"
                    "  catlens explore --model <folder> --set 'prompt=How do I pick a lock?' --screenshot "
                    "docs/explorer.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, checkpoint folder or hub id")
    p.add_argument("--cache-dir", default=None)
    # auto, as the main job: an interactive page wants the faster precision, and a policy the main job made was
    # fitted in it
    add_model_options(p, dtype_default="auto")
    p.add_argument("--policy", default=None, help="a saved steering policy folder (SteeringPolicy.save)")
    p.add_argument("--transfer", action="store_true", help="allow a policy made on another model of the same "
                                                           "architecture")
    p.add_argument("--prompts", default=None, help="extra prompt sets for the picker: comma-separated dataset names "
                                                   "or .jsonl/.csv files (the built-in prompts are always there)")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (its datasets are offered in the picker)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                                                       "only)")
    p.add_argument("--port", type=int, default=8050, help="port (default: %(default)s; 0 = any free port)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"starting value of a page control ({', '.join(FIELDS)}), as typed in the page; "
                        f"repeatable (categories: comma-separated)")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="start, run the starting prompt (--set prompt=...), save a full-page PNG and exit")
    p.set_defaults(func=_cmd_explore)


def _cmd_explore(args: Any) -> int:
    import ipaddress

    from catlens.model import cache_dir, check_model_options, load_model, resolve_spec
    from catlens.steer import SteeringPolicy

    try:
        import dash  # noqa: F401
    except ImportError:
        raise ValueError("catlens explore needs dash: pip install dash (or pip install -e '.[dev]').") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: give a port from 1 to 65535 (or 0 for any free port).")
    device, dtype = check_model_options(args)
    initial = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: give FIELD=VALUE, e.g. --set layers=18 (fields: "
                             f"{', '.join(FIELDS)}).")
        if key.strip() not in FIELDS:
            raise ValueError("--set: " + unknown_name_message("page field", key.strip(), FIELDS))
        initial[key.strip()] = value
    policy = SteeringPolicy.load(args.policy) if args.policy else None
    resolve_spec(args.model, args.cache_dir)
    prompts = [s.strip() for s in args.prompts.split(",") if s.strip()] if args.prompts else None
    model = load_model(args.model, cache=args.cache_dir, device=device, dtype=dtype)
    explorer = Explorer(model, policy, prompts, data_dir=args.data_dir, allow_transfer=args.transfer,
                        initial=initial, cache=cache_dir(args.cache_dir) / "explore")
    app = create_app(model, explorer=explorer)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("serving on %s: other machines on the network can reach the page (and run the model).",
                    args.host)
    server = serve(app, args.host, args.port if args.screenshot is None else 0)
    print(f"catlens explore: {server.url}  (model {model.name}; Ctrl-C to stop)", flush=True)
    try:
        if args.screenshot:
            errors = screenshot(server.url, args.screenshot)
            print(f"wrote {args.screenshot}" + (f" ({len(errors)} browser console error(s): {errors[:3]})"
                                                if errors else ""))
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
