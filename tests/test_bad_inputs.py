"""Every bad input gets a clear message (issue 12): a table of bad inputs to the CLI and the API.

Each case is classified as
  clear      CLI: exit code 2, no traceback, the message holds every expected fragment (the given value, what is
             allowed / how to fix); API: the expected exception type with every expected fragment;
  vague      the right exit code / exception type, but a fragment is missing (e.g. no file name, first line only);
  traceback  CLI: an exception escaped ``main``; API: an unexpected exception type (a raw parser/library error);
  silent     the bad input was accepted (exit 0, no exception, or the CLI went on to load the model).
Every case must be clear.

Counts (``python tests/test_bad_inputs.py`` prints every case and the counts for the catlens it imports):
  before (commit d86eb43): 96 cases -- clear 46, vague 21, traceback 6, silent 23
                           (CLI 53: clear 27, vague 8, traceback 1, silent 17;
                            API 43: clear 19, vague 13, traceback 5, silent 6)
  after:                   96 cases -- clear 96, vague 0, traceback 0, silent 0
Model loading and GGUF conversion are replaced by a stub that raises, so a bad input that is only noticed after
loading (a file as --cache-dir, device="cuda") counts as "silent" here, though on the old code it ended in a
traceback after the load. Three of the six "traceback" cases call ``catlens.model.resolve_layers``, new in this
change (the layer check that ``collect`` can use instead of failing with ``max() arg is an empty sequence``).
"""

import contextlib
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


class ReachedModel(Exception):
    """Raised by the patched ``load_model``: the CLI accepted the arguments and went on to load a model."""


@dataclass
class Case:
    id: str
    run: Callable[[Path], Any]
    """tmp folder -> ("cli", argv) or a zero-argument callable for API cases."""
    needs: list[str]
    """Fragments the message must contain (case-insensitive)."""
    exc: tuple[type[BaseException], ...] = (ValueError,)
    """API: the exception types that count as a deliberate error."""
    model: str = ""
    """"" (model-free), "tiny" (needs the tiny random model), "offline" (hub access switched off)."""
    marks: list[Any] = field(default_factory=list)


def _w(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _cache(tmp: Path, *args: str) -> tuple[str, list[str]]:
    args_l = list(args)
    if "--out" not in " ".join(args_l):
        args_l += ["--out", str(tmp / "out")]
    return "cli", ["cache", *args_l]


_GOOD_ROW = '{"text": "How do I bake bread?", "label": "benign"}\n'


def _jsonl(tmp: Path, text: str, name: str = "p.jsonl") -> str:
    return str(_w(tmp, name, text))


def _dataset(tmp: Path, rel: str, text: str | bytes) -> Path:
    _w(tmp / "data", rel, text)
    return tmp / "data"


def _fake_model(tmp: Path) -> str:
    """A folder that passes as a checkpoint (config.json) but holds no weights: loading it would fail late."""
    _w(tmp, "fake_model/config.json", "{}")
    return str(tmp / "fake_model")


# ------------------------------------------------------------------------------------------------------ cases
def _cases() -> list[Case]:
    from catlens import datasets as D
    from catlens import geometry as G
    from catlens import model as M
    from catlens import prompts as P
    from catlens import taxonomy as T
    from catlens.options import parse_layers

    def prompt(**kw: Any) -> Any:
        # fields set after construction: under the test suite's runtime type checks (jaxtyping + beartype) a wrong
        # type would already fail in Prompt(...); users run without them, so PromptSet must report it
        p = P.Prompt(id="x/1", text="hello there", label="benign", category=None, source="x")
        for key, value in kw.items():
            object.__setattr__(p, key, value)
        return p

    import torch

    acts = torch.randn(6, 3, 4)
    c: list[Case] = []
    add = c.append

    # --- CLI: layers / positions / sites / formats / sizes (checked before anything is loaded)
    add(Case("cli-layers-reversed", lambda t: _cache(t, "--layers", "5-2"), ["'5-2'", "2-5"]))
    add(Case("cli-layers-letters", lambda t: _cache(t, "--layers", "a-b"), ["'a-b'", "0-5,10,-1"]))
    add(Case("cli-layers-float", lambda t: _cache(t, "--layers", "1.5"), ["'1.5'", "0-5,10,-1"]))
    add(Case("cli-layers-empty-part", lambda t: _cache(t, "--layers", "3,,4"), ["'3,,4'", "0-5,10,-1"]))
    add(Case("cli-layers-duplicate", lambda t: _cache(t, "--layers", "1,1"), ["'1,1'", "more than once"]))
    add(Case("cli-positions-word", lambda t: _cache(t, "--positions", "first"), ["'first'", "last", "mean"]))
    add(Case("cli-positions-bad-offset", lambda t: _cache(t, "--positions", "-3,x"), ["'-3,x'", "-3,-1"]))
    add(Case("cli-positions-zero", lambda t: _cache(t, "--positions", "0"), ["0", "negative"]))
    add(Case("cli-sites-typo", lambda t: _cache(t, "--sites", "resid_pots"), ["'resid_pots'", "resid_post"]))
    add(Case("cli-sites-empty", lambda t: _cache(t, "--sites", ","), ["--sites", "resid_post"]))
    add(Case("cli-fmt-typo", lambda t: _cache(t, "--fmt", "chatt"), ["'chatt'", "chat", "raw"]))
    add(Case("cli-batch-size-zero", lambda t: _cache(t, "--batch-size", "0"), ["--batch-size", "0", "positive"]))
    add(Case("cli-batch-size-negative", lambda t: _cache(t, "--batch-size", "-4"), ["--batch-size", "-4", "positive"]))
    add(Case("cli-batch-size-word", lambda t: _cache(t, "--batch-size", "many"), ["'many'", "int"]))
    add(Case("cli-shard-size-zero", lambda t: _cache(t, "--shard-size", "0"), ["--shard-size", "0", "positive"]))
    add(Case("cli-split-typo", lambda t: _cache(t, "--split", "tset"), ["'tset'", "test"]))
    # --- CLI: model specs
    add(Case("cli-model-typo", lambda t: _cache(t, "--model", "smollm2-135m-instrct"),
             ["'smollm2-135m-instrct'", "did you mean", "smollm2-135m-instruct"]))
    add(Case("cli-model-missing-folder", lambda t: _cache(t, "--model", "/nonexistent/model"),
             ["/nonexistent/model", "checkpoint folder"]))
    add(Case("cli-model-relative-missing", lambda t: _cache(t, "--model", "./no/such/model"),
             ["./no/such/model", "checkpoint folder"]))
    add(Case("cli-model-folder-without-config", lambda t: (t.joinpath("m").mkdir(), _cache(t, "--model", str(t / "m")))[1],
             ["config.json", "save_pretrained"]))
    add(Case("cli-models-load-typo", lambda t: ("cli", ["models", "--load", "smollm2-135m-instrct"]),
             ["'smollm2-135m-instrct'", "smollm2-135m-instruct"]))
    add(Case("cli-models-load-missing", lambda t: ("cli", ["models", "--load", "/nonexistent/model"]),
             ["/nonexistent/model", "checkpoint folder"]))
    add(Case("cli-models-cache-dir-is-file", lambda t: ("cli", ["models", "--cache-dir", str(_w(t, "f", "x"))]),
             ["--cache-dir", str("/f'"), "not a folder"]))
    add(Case("cli-models-load-hub-offline", lambda t: ("cli", ["models", "--load", "HuggingFaceTB/no-such-model"]),
             ["HuggingFaceTB/no-such-model", "hub", "offline", "local folder"], model="offline"))
    # --- CLI: prompt files
    add(Case("cli-prompts-unknown", lambda t: _cache(t, "--prompts", "nosuch"), ["'nosuch'", "builtin", "catqa"]))
    add(Case("cli-prompts-missing-file", lambda t: _cache(t, "--prompts", str(t / "missing.jsonl")),
             ["missing.jsonl", "does not exist"]))
    add(Case("cli-prompts-txt-suffix", lambda t: _cache(t, "--prompts", str(_w(t, "p.txt", _GOOD_ROW))),
             ["p.txt", ".jsonl"]))
    add(Case("cli-prompts-empty-file", lambda t: _cache(t, "--prompts", _jsonl(t, "")), ["p.jsonl", "no prompts"]))
    add(Case("cli-prompts-blank-file", lambda t: _cache(t, "--prompts", _jsonl(t, "\n   \n\n")),
             ["p.jsonl", "no prompts"]))
    add(Case("cli-prompts-empty-csv", lambda t: _cache(t, "--prompts", str(_w(t, "p.csv", ""))),
             ["p.csv", "no prompts"]))
    add(Case("cli-prompts-header-only-csv", lambda t: _cache(t, "--prompts", str(_w(t, "p.csv", "text,label\n"))),
             ["p.csv", "no prompts"]))
    add(Case("cli-prompts-bad-json-line", lambda t: _cache(t, "--prompts", _jsonl(t, _GOOD_ROW + '{"text": "x",\n')),
             ["p.jsonl:2", "not valid json"]))
    add(Case("cli-prompts-bad-label", lambda t: _cache(t, "--prompts", _jsonl(
        t, '{"text": "hi", "label": "harmfull"}\n')), ["'harmfull'", "harmful", "row 0"]))
    add(Case("cli-prompts-bad-category", lambda t: _cache(t, "--prompts", _jsonl(
        t, '{"text": "hi", "label": "harmful", "category": "privcy"}\n')), ["'privcy'", "privacy"]))
    add(Case("cli-prompts-no-label", lambda t: _cache(t, "--prompts", _jsonl(t, '{"text": "hi"}\n')),
             ["row 0", "label", "harmful"]))
    add(Case("cli-prompts-no-text", lambda t: _cache(t, "--prompts", _jsonl(t, '{"body": "hi", "label": "benign"}\n')),
             ["row 0", "'text'", "body"]))
    add(Case("cli-prompts-text-number", lambda t: _cache(t, "--prompts", _jsonl(t, '{"text": 42, "label": "benign"}\n')),
             ["row 0", "must be a string", "int"]))
    add(Case("cli-prompts-json-array-line", lambda t: _cache(t, "--prompts", _jsonl(t, '["hi", "benign"]\n')),
             ["p.jsonl", "line 1", "object"]))
    add(Case("cli-prompts-corrupt-csv", lambda t: _cache(t, "--prompts", str(_w(
        t, "p.csv", 'text,label\n"unterminated,benign\n'))), ["p.csv", "csv"]))
    add(Case("cli-prompts-binary", lambda t: _cache(t, "--prompts", str(_w(t, "p.jsonl", b"\xff\xfe\x00\x01garbage"))),
             ["p.jsonl", "utf-8"]))
    add(Case("cli-split-leaves-nothing", lambda t: _cache(t, "--prompts", _jsonl(t, _GOOD_ROW), "--split", "train"),
             ["--split", "'train'", "no prompts"]))
    # --- CLI: output and cache folders
    add(Case("cli-out-is-file", lambda t: _cache(t, "--out", str(_w(t, "o", "x"))), ["--out", "/o'", "file"]))
    add(Case("cli-out-under-file", lambda t: _cache(t, "--out", str(_w(t, "o", "x") / "sub")),
             ["--out", "/o/sub'", "file"]))
    add(Case("cli-cache-dir-is-file", lambda t: _cache(t, "--cache-dir", str(_w(t, "c", "x"))),
             ["--cache-dir", "/c'", "not a folder"]))
    # --- CLI: data
    add(Case("cli-data-list-missing-dir", lambda t: ("cli", ["data", "list", "--data-dir", "/nonexistent"]),
             ["/nonexistent", "data_dir", "catlens_data_dir"]))
    add(Case("cli-data-validate-missing-dir", lambda t: ("cli", ["data", "validate", "--data-dir", "/nonexistent"]),
             ["/nonexistent", "catlens_data_dir"]))
    add(Case("cli-data-show-unknown", lambda t: ("cli", ["data", "show", "catqq"]), ["'catqq'", "catqa"]))
    add(Case("cli-data-show-no-name", lambda t: ("cli", ["data", "show"]), ["needs a dataset name", "builtin"]))
    add(Case("cli-data-show-missing-dir", lambda t: ("cli", ["data", "show", "catqa", "--data-dir", "/nonexistent"]),
             ["/nonexistent", "catlens_data_dir"]))
    add(Case("cli-data-bad-action", lambda t: ("cli", ["data", "frobnicate"]), ["'frobnicate'", "list"]))
    add(Case("cli-data-show-corrupt", lambda t: ("cli", ["data", "show", "catqa", "--data-dir", str(_dataset(
        t, "catqa/catqa_english.json", '{"Illegal Activity": {"Drug:": ["q1", '))]),
             ["catqa_english.json", "json", "shared/data"]))
    add(Case("cli-unknown-command", lambda t: ("cli", ["frobnicate"]), ["'frobnicate'", "cache"]))
    add(Case("cli-cache-no-out", lambda t: ("cli", ["cache"]), ["--out"]))

    # --- API: prompts
    add(Case("api-text-int", lambda t: lambda: P.PromptSet([prompt(text=5)]), ["must be a string", "int"],
             (TypeError, ValueError)))
    add(Case("api-text-none", lambda t: lambda: P.PromptSet([prompt(text=None)]), ["must be a string", "nonetype"],
             (TypeError, ValueError)))
    add(Case("api-text-blank", lambda t: lambda: P.PromptSet([prompt(text="  ")]), ["'  '", "empty"]))
    add(Case("api-label-typo", lambda t: lambda: P.PromptSet([prompt(label="bening")]), ["'bening'", "benign"]))
    add(Case("api-record-int", lambda t: lambda: P.PromptSet(iter([3])), ["row 0", "int", "Prompt"], (TypeError,)))
    add(Case("api-load-empty", lambda t: lambda: P.PromptSet.load(_jsonl(t, "")), ["p.jsonl", "no prompts"]))
    add(Case("api-load-prompts-blank", lambda t: lambda: D.load_prompts(_jsonl(t, "  \n\n")), ["p.jsonl", "no prompts"]))
    add(Case("api-load-missing", lambda t: lambda: P.PromptSet.load(t / "nope.jsonl"), ["nope.jsonl", "does not exist"],
             (FileNotFoundError,)))
    add(Case("api-load-prompts-unknown", lambda t: lambda: D.load_prompts("catqq"), ["'catqq'", "catqa"]))
    add(Case("api-where-label", lambda t: lambda: D.load_prompts("builtin").where(label="harmfull"),
             ["'harmfull'", "harmful"]))
    add(Case("api-split-fractions", lambda t: lambda: P.split_prompts(D.load_prompts("builtin"), (0.5, 0.5)),
             ["0.5", "summing to 1"]))
    # --- API: datasets (corrupt / truncated / wrong-shape files in a temporary data folder)
    add(Case("api-dataset-unknown", lambda t: lambda: D.load_dataset("catqq"), ["'catqq'", "catqa"]))
    add(Case("api-dataset-option", lambda t: lambda: D.load_dataset("harmbench", colour=1), ["'colour'", "include_"],
             (TypeError,)))
    add(Case("api-data-dir-missing", lambda t: lambda: D.resolve_data_dir("/nonexistent"),
             ["/nonexistent", "CATLENS_DATA_DIR"], (FileNotFoundError,)))
    add(Case("api-catqa-truncated", lambda t: lambda: D.load_dataset("catqa", _dataset(
        t, "catqa/catqa_english.json", '{"Illegal Activity": {"Drug:": ["q1", ')), ["catqa_english.json", "json", "line"]))
    add(Case("api-catqa-empty", lambda t: lambda: D.load_dataset("catqa", _dataset(t, "catqa/catqa_english.json", "")),
             ["catqa_english.json", "empty"]))
    add(Case("api-catqa-wrong-shape", lambda t: lambda: D.load_dataset("catqa", _dataset(
        t, "catqa/catqa_english.json", '["q1", "q2"]')), ["catqa_english.json", "object", "list"]))
    add(Case("api-alpaca-eval-truncated", lambda t: lambda: D.load_dataset("alpaca_eval", _dataset(
        t, "alpaca_eval/model_outputs_text_davinci_003.json", '[{"instruction": "x"')),
             ["model_outputs_text_davinci_003.json", "json"]))
    add(Case("api-coconot-bad-line", lambda t: lambda: D.load_dataset("coconot_pref", _dataset(
        t, "coconot/coconot_pref.jsonl", '{"id": "1", "category": "a", "subcategory": "b", "prompt": "p"}\n{oops\n')),
             ["coconot_pref.jsonl", "line 2", "json"]))
    add(Case("api-xstest-corrupt-csv", lambda t: lambda: D.load_dataset("xstest", _dataset(
        t, "xstest/xstest_prompts.csv", 'id,prompt,type,label\n1,"unterminated,homonyms,safe\n')),
             ["xstest_prompts.csv", "csv"]))
    add(Case("api-xstest-empty-csv", lambda t: lambda: D.load_dataset("xstest", _dataset(
        t, "xstest/xstest_prompts.csv", "")), ["xstest_prompts.csv", "empty"]))
    add(Case("api-xstest-binary", lambda t: lambda: D.load_dataset("xstest", _dataset(
        t, "xstest/xstest_prompts.csv", b"\xff\xfe\x00garbage\x00\n")), ["xstest_prompts.csv", "utf-8"]))
    # --- API: taxonomy
    add(Case("api-taxonomy-missing", lambda t: lambda: T.load_taxonomy(t / "tax.csv"), ["tax.csv", "does not exist"],
             (FileNotFoundError,)))
    add(Case("api-taxonomy-empty", lambda t: lambda: T.load_taxonomy(_w(t, "tax.csv", "")), ["tax.csv", "empty"]))
    add(Case("api-taxonomy-corrupt", lambda t: lambda: T.load_taxonomy(_w(
        t, "tax.csv", 'source,source_category,source_subcategory,category\ncatqa,"Illegal,,\n')), ["tax.csv", "csv"]))
    add(Case("api-taxonomy-columns", lambda t: lambda: T.load_taxonomy(_w(t, "tax.csv", "a,b\n1,2\n")),
             ["tax.csv", "source_category"]))
    add(Case("api-taxonomy-category", lambda t: lambda: T.load_taxonomy(_w(
        t, "tax.csv", "source,source_category,source_subcategory,category\ncatqa,X,,privcy\n")),
             ["'privcy'", "privacy"]))
    # --- API: model-free model helpers and layers
    add(Case("api-model-typo", lambda t: lambda: M.resolve_spec("smollm2-135m-instrct"),
             ["'smollm2-135m-instrct'", "smollm2-135m-instruct"]))
    add(Case("api-hook-site", lambda t: lambda: M.hook_name("resid_pots", 0), ["'resid_pots'", "resid_post"]))
    add(Case("api-hook-layer", lambda t: lambda: M.hook_name("resid_post", 7, n_layers=2), ["layer=7", "0..1"]))
    add(Case("api-dtype", lambda t: lambda: M.load_model(dtype="fp16"), ["'fp16'", "float16"]))
    add(Case("api-device-unknown", lambda t: lambda: M.load_model(_fake_model(t), device="tpu"), ["'tpu'", "cpu"]))
    add(Case("api-device-cuda", lambda t: lambda: M.load_model(_fake_model(t), device="cuda"), ["'cuda'", "cpu", "not available"]))
    add(Case("api-load-cache-is-file", lambda t: lambda: M.load_model(cache=_w(t, "c", "x")), ["/c'", "not a folder"],
             (NotADirectoryError,)))
    add(Case("api-load-hub-offline", lambda t: lambda: M.load_model("HuggingFaceTB/no-such-model"),
             ["HuggingFaceTB/no-such-model", "offline", "local folder"], (ConnectionError,), model="offline"))
    add(Case("api-parse-layers-reversed", lambda t: lambda: parse_layers("5-2"), ["'5-2'", "2-5"]))
    add(Case("api-resolve-layers-empty", lambda t: lambda: M.resolve_layers([], 4), ["layers=[]", "none"]))
    add(Case("api-resolve-layers-range", lambda t: lambda: M.resolve_layers([0, 9], 4), ["layer=9", "0..3"]))
    add(Case("api-geometry-layers-empty", lambda t: lambda: G.separability(acts, ["a", "b"] * 3, layers=[]),
             ["layers=[]", "3 layers"]))
    add(Case("api-geometry-which-empty", lambda t: lambda: G.projections(acts, which=[], show_progress=False),
             ["which=[]", "0, 1, 2"]))
    # --- API with the tiny random model
    add(Case("api-tiny-format", lambda t: lambda m: m.format(["hi"], fmt="chatt"), ["'chatt'", "p1_header"],
             model="tiny"))
    add(Case("api-tiny-layer", lambda t: lambda m: m.layer(5), ["layer=5", "0..1"], model="tiny"))
    add(Case("api-tiny-resolve-layers", lambda t: lambda m: m.resolve_layers([]), ["layers=[]", "0..1"], model="tiny"))
    return c


CASES = _cases()


# ------------------------------------------------------------------------------------------------- running
def _reached(*args: Any, **kwargs: Any) -> Any:
    raise ReachedModel("the call went on to load (or convert) a model")


@contextlib.contextmanager
def _no_loading(case: Case) -> Any:
    """Model loading and GGUF conversion raise :class:`ReachedModel`: a bad input must be caught before them.
    (Not for the offline cases, which must reach the hub code, nor the tiny-model ones.)"""
    import catlens.model as M

    if case.model:
        yield
        return
    saved = M._boot, M.embedded_checkpoint
    M._boot = M.embedded_checkpoint = _reached
    try:
        yield
    finally:
        M._boot, M.embedded_checkpoint = saved


def run_case(case: Case, tmp: Path, tiny: Any = None) -> tuple[str, str]:
    """Run one case; returns (classification, message)."""
    import catlens.model

    spec = case.run(tmp)
    if isinstance(spec, tuple) and spec and spec[0] == "cli":
        from catlens.cli import main

        argv = spec[1]
        err, out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), _no_loading(case):
                try:
                    code = main(argv)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 2
        except ReachedModel:
            return "silent", "accepted; went on to load the model"
        except Exception as e:  # noqa: BLE001
            return "traceback", f"{type(e).__name__}: {e}"
        message = err.getvalue()
        if code == 0:
            return "silent", out.getvalue()[-300:]
        if "Traceback" in message:
            return "traceback", message
        ok = code == 2 and all(n.lower() in message.lower() for n in case.needs)
        return ("clear" if ok else "vague"), f"exit {code}: {message}"
    fn = spec
    try:
        with _no_loading(case):
            fn(tiny) if case.model == "tiny" else fn()
    except ReachedModel:
        return "silent", "accepted; went on to load the model"
    except case.exc as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        ok = all(n.lower() in message.lower() for n in case.needs)
        return ("clear" if ok else "vague"), f"{type(e).__name__}: {message}"
    except Exception as e:  # noqa: BLE001
        return "traceback", f"{type(e).__name__}: {e}"
    return "silent", "no exception"


@contextlib.contextmanager
def offline_hub() -> Any:
    """Switch the Hugging Face hub off for this process (as HF_HUB_OFFLINE=1 at start-up would)."""
    import huggingface_hub.constants as hc

    before_env, before_const = os.environ.get("HF_HUB_OFFLINE"), hc.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = before_const
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def _params() -> list[Any]:
    out = []
    for case in CASES:
        marks = list(case.marks)
        if case.model == "tiny":
            marks.append(pytest.mark.slow)
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.fixture
def _data_env(monkeypatch, tmp_path):
    # a data folder that exists but holds nothing, unless a case points at its own folder
    monkeypatch.setenv("CATLENS_DATA_DIR", str(tmp_path / "no-data-here"))
    monkeypatch.delenv("CATLENS_TAXONOMY", raising=False)


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_reported_clearly(case: Case, tmp_path, _data_env, request):
    tiny = request.getfixturevalue("tiny_model") if case.model == "tiny" else None
    with offline_hub() if case.model == "offline" else contextlib.nullcontext():
        kind, message = run_case(case, tmp_path, tiny)
    assert kind == "clear", f"{case.id}: {kind}\n{message}\nexpected fragments: {case.needs}"


def test_table_is_big_enough():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.model == "" for c in CASES) >= 0.9 * len(CASES)  # mostly model-free


# ------------------------------------------------------------------------------------- single defects of issue 12
def _cli(argv: list[str]) -> tuple[int | str, str]:
    from catlens.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), _no_loading(Case("", id, [])):
        try:
            return main(argv), err.getvalue()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2, err.getvalue()
        except ReachedModel:
            return "reached model", err.getvalue()


def test_every_line_of_a_validation_error_reaches_the_user(tmp_path):
    rows = '{"text": "a", "label": "harmfull"}\n{"text": "b", "label": "benign", "split": "tset"}\n'
    code, err = _cli(["cache", "--prompts", _jsonl(tmp_path, rows), "--out", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in err
    assert "'harmfull'" in err and "'tset'" in err and "row 1" in err, err


@pytest.mark.parametrize("argv", [["--positions", "-3,-1"], ["--positions=-3,-1"], ["--layers", "-2,-1"],
                                  ["--layers", "-1", "--positions", "-1"]])
def test_negative_option_values_in_the_form_the_help_shows(argv, tmp_path):
    from catlens.cli import _join_negative_values, _positions, build_parser

    args = build_parser().parse_args(_join_negative_values(["cache", *argv, "--out", str(tmp_path / "o")]))
    assert args.positions in ("-3,-1", "-1", "last") and args.layers in ("all", "-2,-1", "-1")
    assert _positions("-3,-1") == [-3, -1]
    # the whole command gets past argument checking to model loading
    code, err = _cli(["cache", *argv, "--out", str(tmp_path / "o")])
    assert code == "reached model", err


def test_layer_ranges_must_not_be_empty():
    from catlens.options import parse_layers

    assert parse_layers("2-5") == [2, 3, 4, 5] and parse_layers("-3--1") == [-3, -2, -1]
    with pytest.raises(ValueError, match="'5-2'.*'2-5'"):
        parse_layers("5-2")


def test_nothing_is_created_before_a_bad_prompt_file_is_rejected(tmp_path):
    out = tmp_path / "store"
    code, err = _cli(["cache", "--prompts", _jsonl(tmp_path, "\n"), "--out", str(out)])
    assert code == 2 and "no prompts" in err and not out.exists()


def test_data_list_without_the_default_folder_still_lists(monkeypatch):
    import catlens.datasets as D

    monkeypatch.delenv("CATLENS_DATA_DIR", raising=False)
    monkeypatch.setattr(D, "_default_data_dir", lambda: Path("/nonexistent/shared/data"))
    table = D.list_datasets()
    assert len(table) == len(D.DATASETS) and not table["path_exists"].any()
    monkeypatch.setenv("CATLENS_DATA_DIR", "/nonexistent/elsewhere")
    with pytest.raises(FileNotFoundError, match="/nonexistent/elsewhere"):
        D.list_datasets()


# ------------------------------------------------------------------------------------------ rough edges of issue 19
def test_a_prompt_longer_than_the_context_is_refused_before_any_work(tiny_lm, tmp_path):
    from catlens.generation import generate

    long = "bake bread " * (tiny_lm.n_ctx // 2 + 10)  # two tokens a repeat: well past the tiny model's 512
    with pytest.raises(ValueError, match=r"prompt 'p1' is \d+ tokens .* context of 512 tokens.*1 of 2 prompt"):
        generate(tiny_lm, [{"id": "p0", "text": "hi"}, {"id": "p1", "text": long}], max_new_tokens=2,
                 out=tmp_path / "gen", show_progress=False)
    assert not (tmp_path / "gen").exists()  # nothing was started


def test_max_new_tokens_is_capped_at_the_context(tiny_lm, caplog):
    from catlens.generation import generate

    rendered = tiny_lm.format(["hi"])
    n_prompt = len(tiny_lm.tokenizer(rendered, add_special_tokens=False)["input_ids"][0])
    with caplog.at_level("WARNING", logger="catlens.generation"):
        recs = generate(tiny_lm, ["hi"], max_new_tokens=1_000_000_000, show_progress=False, stop_at_eos=False)
    room = tiny_lm.n_ctx - n_prompt
    assert f"max_new_tokens=1000000000 does not fit the context" in caplog.text and f"capped at {room}" in caplog.text
    assert recs[0]["n_new_tokens"] == room


def test_generate_checks_out_is_writable_before_loading_the_model(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): no read-only folder to test with")
        code, err = _cli(["generate", "--prompts", "builtin", "--out", str(locked / "gen")])
        assert code == 2 and "not writable" in err and str(locked) in err, err
    finally:
        locked.chmod(0o700)
    code, err = _cli(["generate", "--prompts", "builtin", "--out", str(_w(tmp_path, "f.txt", "x") / "gen")])
    assert code == 2 and "which is a file, not a folder" in err, err


def test_check_writable_folder_names_the_folder(tmp_path, monkeypatch):
    from catlens.errors import check_writable_folder

    check_writable_folder(tmp_path / "new" / "deeper", "--out")  # creatable: fine
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(tmp_path))
    with pytest.raises(PermissionError, match=r"--out '.*deeper' would be created in '.*', which is not writable"):
        check_writable_folder(tmp_path / "new" / "deeper", "--out")


def test_generate_does_not_offer_the_llm_judge(tmp_path):
    code, err = _cli(["generate", "--prompts", "builtin", "--judge", "llm", "--out", str(tmp_path / "g")])
    assert code == 2 and "needs a backend" in err and "get_judge('llm'" in err and "substring" in err, err
    assert not (tmp_path / "g").exists()


def test_positions_out_of_reach_in_a_policy_file(tiny_lm, tmp_path):
    import torch

    from catlens.steer import Intervention, SteeringPolicy

    iv = Intervention("resid_post", 1, torch.ones(1, tiny_lm.d_model), positions=(-1,))
    folder = SteeringPolicy((iv,)).save(tmp_path / "policy")
    spec = json.loads((folder / "policy.json").read_text())
    spec["interventions"][0]["positions"] = 100000
    (folder / "policy.json").write_text(json.dumps(spec))
    policy = SteeringPolicy.load(folder)  # a bare number is one offset, as in the API
    with pytest.raises(ValueError, match=r"positions=\(100000,\) has offset\(s\) \[100000\] beyond .*context of 512"):
        policy.check_model(tiny_lm)
    spec["interventions"][0]["positions"] = {"not": "positions"}
    (folder / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"policy.json': interventions\[0\] cannot be read: (?s:.*)positions"):
        SteeringPolicy.load(folder)


def test_a_second_generate_into_the_same_out_is_refused(tiny_lm, tmp_path):
    from catlens.generation import _lock_out, generate

    out = tmp_path / "gen"
    held = _lock_out(out)  # another process's generate holds the folder
    try:
        with pytest.raises(FileExistsError, match=r"--out '.*gen' is being written by another catlens generate \(pid"):
            generate(tiny_lm, ["hi"], max_new_tokens=1, out=out, show_progress=False)
    finally:
        held.release()
    assert len(generate(tiny_lm, ["hi"], max_new_tokens=1, out=out, show_progress=False)) == 1
    assert not (tmp_path / ".gen.lock").exists()  # released and removed after the run


def test_the_lock_is_per_process(tmp_path):
    """A lock taken by another process (flock) refuses this one."""
    import subprocess

    out = tmp_path / "gen"
    code = ("import sys, time; from catlens.generation import _lock_out; l = _lock_out(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert child.stdout.readline().strip() == "locked"
        from catlens.generation import _lock_out

        with pytest.raises(FileExistsError, match=f"pid {child.pid}"):
            _lock_out(out)
    finally:
        child.kill()
        child.wait()
    _lock_out(out).release()  # the lock went with the process


def _report_run(root: Path, summary: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"status": "done", "config": {"x": 1}, "stages": {}}))
    if summary:
        (root / "summary.json").write_text(json.dumps({"model": "m", "seconds": 3}))
    return root


def test_report_exit_codes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli(["report", str(empty)])
    assert code == 1 and "holds none of the tables" in err, err
    run = _report_run(tmp_path / "run")
    code, err = _cli(["report", str(run)])
    assert code == 0, err
    code, err = _cli(["report", str(run), "--strict"])
    assert code == 1 and "--strict" in err and "incomplete" in err, err


def test_report_fails_when_a_section_fails(tmp_path):
    run = _report_run(tmp_path / "run")
    (run / "geometry").mkdir()
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"task": ["a"], "layer": [0]}).to_parquet(run / "geometry" / "separability.parquet")  # no metric
    code, err = _cli(["report", str(run)])
    assert code == 1 and "separability" in err and "could not be drawn" in err, err


def test_report_says_when_summary_is_missing(tmp_path):
    from catlens.report import build_report

    rep = build_report(_report_run(tmp_path / "run", summary=False))
    run = next(s for s in rep.sections if s.id == "run")
    assert "summary.json" in run.missing and "summary.json is missing" in run.body


def test_one_helper_for_package_versions():
    from catlens import runs

    versions = runs.package_versions(["torch", "no-such-distribution-catlens"])
    assert versions["torch"] and versions["no-such-distribution-catlens"] is None and "python" in versions


@pytest.mark.slow
def test_collect_rejects_an_empty_layer_list(tiny_model):
    from catlens.cache import collect

    with pytest.raises(ValueError, match=r"layers=\[\] (selects no layer|is empty)"):
        collect(tiny_model, ["hello"], layers=[], show_progress=False)


if __name__ == "__main__":  # print the classification of every case and the counts (used for the table above)
    import collections
    import tempfile

    import catlens

    print("catlens from", catlens.__file__, file=sys.stderr)
    skip_tiny = "--no-tiny" in sys.argv
    tiny_model = None
    if not skip_tiny:
        from catlens.model import load_model

        folder = Path(tempfile.mkdtemp())
        from transformers import LlamaConfig, LlamaForCausalLM

        real = load_model()
        cfg = LlamaConfig(vocab_size=len(real.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        real.tokenizer.save_pretrained(folder)
        tiny_model = load_model(folder)
    counts: collections.Counter[str] = collections.Counter()
    for case in CASES:
        if case.model == "tiny" and skip_tiny:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["CATLENS_DATA_DIR"] = str(Path(tmp) / "no-data-here")
            with offline_hub() if case.model == "offline" else contextlib.nullcontext():
                kind, message = run_case(case, Path(tmp), tiny_model)
        counts[kind] += 1
        print(f"{kind:<10} {case.id:<36} {' '.join(message.split())[:230]}")
    print(json.dumps({"cases": sum(counts.values()), **counts}))
