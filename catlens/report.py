"""One self-contained ``report.html`` per run folder, rebuilt from the saved tables alone (no model is loaded).

    catlens report runs/main                 # writes runs/main/report.html
    catlens report runs/main --out /tmp/r.html --screenshot docs/report.png

The page has one section per result. Each section is a small function that looks for its tables, and draws its
figure (plotly, built with :mod:`catlens.plotting`) next to the table it summarises; when the tables are absent the
section says "not run" and gives the command that produces them. plotly.js is inlined once in the page head, so
the file opens without network. Every text on the page is HTML-escaped; every number in the text is read from a
table. A metric that stands in for something it does not measure directly (a proxy) is shown with what it stands
for: a ``stands_for`` column in long tables, a caption under wide ones (see :data:`STANDS_FOR`).

Where tables are looked for: ``<run>/<stage>/<name>.parquet`` (or ``.csv``), and ``<run>/<name>.parquet`` so a
stage folder can be given directly (the stage folders are those ``analyses/main.py`` lays out). Sections and their
tables:

====================  ======================  ===================================================================
section               stage folder            tables
====================  ======================  ===================================================================
what was run          ``.``, every stage      ``manifest.json`` (run and stages), ``summary.json``
fine-tune results     ``eval/``               ``per_category``, ``over_refusal``, ``auroc``, ``fluency``,
                                              ``summary.json`` (``analyses/finetune_eval.py``)
separability          ``geometry/``           ``separability`` (``analyses/geometry.py``)
cosines               ``geometry/``           ``cosine`` (+ ``separability`` to choose the layer)
anisotropy            ``geometry/``           ``anisotropy``
whitening             ``geometry/``           ``whitening``, ``basis_alignment``
model diffing         ``geometry/``           ``model_diff`` (geometry with ``--other-model``)
P1 Figure 1, safety   ``p1/``                 ``headline``, ``test_rates`` (+ ``test_rates_substring``,
                                              ``transfer`` when present) (``analyses/p1_steering.py``)
probe ROC             ``p1/``                 ``auroc``, ``test_first_position`` (per prompt),
                                              ``policies/<policy>/policy.json`` (the threshold), ``gate_errors``
sweeps                ``p1/``                 ``sweep``, ``candidates``, ``headline`` (the region),
                                              ``lowrank_curve`` when trained; or ``sweep/sweep`` as
                                              ``analyses/steer_sweep.py`` writes it
P2 per category       ``p2/``                 ``p2_test`` (Parquet), ``p2_test_summary`` (``analyses/p2_steering.py``)
specificity           ``specificity/``        ``specificity``, ``summary`` (``analyses/specificity.py``)
judge agreement       ``p1/``, ``p2/``, any   ``p1/agreement``, ``p2/p2_agreement``, ``<stage>/judge_agreement``
                                              (``catlens.judges.agreement_table``'s columns)
====================  ======================  ===================================================================

The P1, P2 and specificity sections draw with the builders of :mod:`catlens.figures` (``p1_tradeoff``,
``p1_safety_table``, ``p1_probe_roc``, ``p1_sweeps``, ``p2_bars``, ``specificity``), the ones the ``figures/``
scripts call, so the page and the figure files show the same figures from the same tables. The report reads run
folders only, never the repository's files.
"""

import dataclasses
import html
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from catlens.formatting import as_float, fmt

log = logging.getLogger(__name__)

__all__ = ["build_report", "Report", "SectionResult", "STANDS_FOR", "SECTIONS", "screenshot"]

REPORT_NAME = "report.html"
MAX_TABLE_ROWS = 60

# What a proxy column or metric stands for. Keys are column names (wide tables) or metric names (long tables).
STANDS_FOR: dict[str, str] = {
    # eval/ (analyses/finetune_eval.py)
    "refused_first_token": "refusal of the generated answer (decided at the first response position: the most "
                           "probable refusal token beats [respond])",
    "right_category_first_token": "the generated answer opening with the right category token (first-token "
                                  "argmax among the refusal tokens)",
    "refused_generated": "refusal as a reader would judge it (the greedy answer opens with a refusal token)",
    "right_category_generated": "the right category named in the refusal (token the greedy answer opens with)",
    "over_refusal_first_token": "over-refusal of the generated answer (first-token decision)",
    "over_refusal_generated": "over-refusal as a reader would judge it (greedy answer opens with a refusal token)",
    "mean_refusal_score": "the model's propensity to refuse (summed refusal-token probability at the first "
                          "response position)",
    "auroc": "how well the logit refusal score ranks harmful above benign prompts (threshold-free detector quality)",
    "perplexity_finetuned_answers_under_stock": "fluency of the fine-tune's answers (perplexity under the stock "
                                                "model; compare with the stock model's own answers)",
    "perplexity_stock_answers_under_stock": "reference fluency: the stock model's own answers under itself",
    "swallowed_first_word_rate": "damaged answers (text after [respond] starts with whitespace or punctuation)",
    "first_token_agreement": "check of the generated decision: the share of answers generated in full that open "
                             "with the first-position argmax (from which every scored prompt's decision is read)",
    # geometry/ (analyses/geometry.py, definitions in catlens/geometry.py)
    "probe_accuracy": "linear decodability (cross-validated logistic probe on the top principal components); "
                      "presence of the information, not its use by the model",
    "probe_auroc": "linear decodability, threshold-free (cross-validated probe AUROC)",
    "silhouette": "how well the prompts cluster by class in raw activations (Euclidean)",
    "davies_bouldin": "cluster overlap (lower = better separated)",
    "fisher_ratio": "between-class over within-class spread",
    "calinski_harabasz": "between- over within-class dispersion, scaled by class and prompt counts",
    "cosine": "overlap (entanglement) of two category directions",
    "mean_offdiag_cosine": "entanglement of the category directions (mean cosine between different categories)",
    "mean_pairwise_cosine": "anisotropy: the common direction all activations share (0 when isotropic)",
    "top1_variance_share": "anisotropy: variance in the top principal direction",
    "top10_variance_share": "anisotropy: variance in the top 10 principal directions",
    "effective_rank": "how many dimensions the activations really use (exp of the spectral entropy)",
    "condition_number": "ill-conditioning of the covariance the whitener inverts",
    "log10_condition_number": "ill-conditioning of the covariance the whitener inverts (log10)",
    "mean_norm_ratio": "anisotropy as a common offset (norm of the mean over mean norm)",
    "max_dim_share": "massive activations (largest single-dimension share of the squared norm)",
    "cos_basis_residual": "how much P1's orthonormal basis vector (mapped back to the residual stream) still "
                          "points along its category direction",
    "off_span_share": "share of a direction outside the span the whitener was fitted on",
    "model_diff_cosine": "how little the fine-tune changed a category direction (1 = unchanged)",
    # placeholders
    "harmful_refusal": "safety: refusal rate on held-out harmful prompts",
    "right_category": "category-specific refusal: the refusal names the prompt's harm category",
    "alpaca_over_refusal": "over-refusal of ordinary requests (Alpaca test set, generated decision)",
    "xstest_safe_over_refusal": "over-refusal of safe prompts that look harmful (XSTest safe, generated decision)",
    "benign_refusal": "over-refusal: refusal rate on benign prompts (the helpfulness cost)",
    "agreement": "how far one refusal decision can stand in for the other (share of equal decisions)",
    "kappa": "agreement beyond chance (Cohen's kappa)",
}


# ------------------------------------------------------------------------------------------------ helpers
def esc(value: Any) -> str:
    """Escaped text of any value (numbers formatted)."""
    return html.escape(fmt(value), quote=True)


def _interval(value: Any, low: Any, high: Any) -> str:
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


@dataclasses.dataclass
class Tables:
    """Finds tables under a run folder: ``<run>/<stage>/<name>`` or ``<run>/<name>``, Parquet before CSV."""

    root: Path

    def path(self, stage: str, name: str) -> Path | None:
        for folder in (self.root / stage, self.root) if stage not in ("", ".") else (self.root,):
            for suffix in (".parquet", ".csv"):
                candidate = folder / f"{name}{suffix}"
                if candidate.is_file():
                    return candidate
        return None

    def load(self, stage: str, name: str) -> Any:
        import pandas as pd

        p = self.path(stage, name)
        if p is None:
            return None
        return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)

    def json(self, stage: str, name: str) -> dict[str, Any] | None:
        for folder in (self.root / stage, self.root) if stage not in ("", ".") else (self.root,):
            p = folder / f"{name}.json"
            if p.is_file():
                try:
                    return json.loads(p.read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p} is not valid JSON ({e}).") from None
        return None

    def rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)


@dataclasses.dataclass
class SectionResult:
    """One rendered section: ``status`` is ``ok``, ``partial`` (some tables missing), ``not run`` or ``error``."""

    id: str
    title: str
    status: str
    body: str
    figures: list[Any] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    command: str = ""


class _Section:
    """Collects the blocks of one section; figures are kept as objects and rendered once the page knows their
    order (plotly.js is inlined once in the head)."""

    def __init__(self, sid: str, title: str, command: str) -> None:
        self.id, self.title, self.command = sid, title, command
        self.parts: list[str] = []
        self.figures: list[Any] = []
        self.missing: list[str] = []

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def block(self, *, figure: Any = None, table: Any = None, caption: str = "", table_title: str = "",
              stands_for: Mapping[str, str] | None = None) -> None:
        """A figure next to the table it summarises (either may be None)."""
        inner = []
        if figure is not None:
            self.figures.append(figure)
            inner.append(f'<div class="fig" data-figure="{len(self.figures) - 1}">{{FIGURE:{self.id}:'
                         f'{len(self.figures) - 1}}}</div>')
        if table is not None:
            rendered = table_html(table, title=table_title, caption=caption, stands_for=stands_for)
            inner.append(f'<div class="tbl">{rendered}</div>')
        self.parts.append(f'<div class="block">{"".join(inner)}</div>')

    def result(self, status: str | None = None) -> SectionResult:
        if status is None:
            status = "ok" if not self.missing else ("partial" if self.parts else "not run")
        body = "".join(self.parts)
        if self.missing:
            body += _missing_html(self.missing, self.command)
        return SectionResult(self.id, self.title, status, body, self.figures, self.missing, self.command)


def _missing_html(missing: Sequence[str], command: str) -> str:
    items = "".join(f"<li><code>{html.escape(m)}</code></li>" for m in missing)
    if command.startswith("TODO: "):
        cmd = f'<p class="todo">{html.escape(command[len("TODO: "):])}.</p>'
    else:
        cmd = f'<p>Produce with: <code class="cmd">{html.escape(command)}</code></p>' if command else ""
    return f'<div class="missing"><p><b>not run</b>: missing</p><ul>{items}</ul>{cmd}</div>'


def table_html(df: Any, *, title: str = "", caption: str = "", stands_for: Mapping[str, str] | None = None,
               max_rows: int = MAX_TABLE_ROWS) -> str:
    """An escaped HTML table of a DataFrame. Proxy columns (in ``stands_for`` or :data:`STANDS_FOR`) get a caption
    line each; a long table with a ``metric`` column and no ``stands_for`` column gets one, filled from
    :data:`STANDS_FOR` ("–" for a metric it does not know)."""
    lookup = {**STANDS_FOR, **(stands_for or {})}
    df = df.reset_index(drop=True)
    if "metric" in df.columns and "stands_for" not in df.columns:  # long table: say it per row ("–": not stated)
        df = df.assign(stands_for=[lookup.get(str(m), "–") for m in df["metric"]])
    notes = [(c, lookup[c]) for c in df.columns if c in lookup]
    shown = df.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    rows = []
    for rec in shown.itertuples(index=False):
        cells = []
        for c, v in zip(shown.columns, rec):
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{esc(v)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    more = f"<p class='note'>{len(df) - max_rows} more rows in the table file.</p>" if len(df) > max_rows else ""
    cap = []
    if caption:
        cap.append(f"<p>{html.escape(caption)}</p>")
    if notes:
        cap.append("<p class='stands'>" + "<br>".join(
            f"<code>{html.escape(str(c))}</code> stands for {html.escape(t)}" for c, t in notes) + "</p>")
    ttl = f"<h4>{html.escape(title)}</h4>" if title else ""
    return (f"{ttl}<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"</div>{more}<div class='caption'>{''.join(cap)}</div>")


def _kv_table(pairs: Iterable[tuple[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame([{"field": k, "value": fmt(v)} for k, v in pairs if v not in (None, "", {}, [])])


def _require(df: Any, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table {name!r} has no column(s) {missing}; it has {list(df.columns)} (schemas: "
                         f"catlens/report.py docstring).")


def _need(t: Tables, sec: _Section, stage: str, names: Sequence[str]) -> dict[str, Any]:
    """Load the named tables; record the absent ones in the section."""
    out = {}
    for name in names:
        df = t.load(stage, name)
        if df is None:
            sec.missing.append(f"{stage}/{name}.parquet" if stage not in ("", ".") else f"{name}.parquet")
        else:
            out[name] = df
    return out


# ------------------------------------------------------------------------------------------------ sections
def section_run(t: Tables) -> SectionResult:
    """What was run: model, data, config, git commit, timings (manifests and summary.json)."""
    import pandas as pd

    sec = _Section("run", "What was run", "python analyses/main.py --out <run folder>")
    manifest = t.json(".", "manifest")
    summary = t.json(".", "summary")
    if manifest is None:
        sec.missing.append("manifest.json")
        return sec.result("not run")
    versions = manifest.get("versions") or {}
    commit = manifest.get("git_commit")
    dirty = " (uncommitted changes)" if manifest.get("git_dirty") else ""
    if summary is None and "stages" in manifest:  # the main job's folder (a stage folder has no summary)
        sec.missing.append("summary.json")
        sec.text("summary.json is missing: the main job did not finish (or this folder was not written by "
                 "analyses/main.py), so the total time and the summary's model are not shown; the rest comes from "
                 "the manifests.")
    model = (summary or {}).get("model") or (manifest.get("models") or {}).get("model", {}).get("name")
    pairs = [("status", manifest.get("status")), ("command", " ".join(map(str, manifest.get("command") or []))),
             ("model", model), ("git commit", f"{commit}{dirty}" if commit else None),
             ("created", manifest.get("created")), ("finished", manifest.get("finished")),
             ("resumed", manifest.get("resumed")), ("seed", manifest.get("seed")),
             ("total seconds", (summary or {}).get("seconds"))]
    pairs += [(f"version {k}", v) for k, v in versions.items()]
    sec.block(table=_kv_table(pairs), table_title="Run")
    config = manifest.get("config")
    if isinstance(config, Mapping) and config:
        sec.block(table=_kv_table(config.items()), table_title="Configuration")

    # stages: timings from the run manifest, status/model/data from each stage's own manifest
    stage_rows, data_rows, model_rows, finetune_pairs = [], [], [], []

    def models_and_data(name: str, m_: Mapping[str, Any]) -> None:
        for role, m in (m_.get("models") or {}).items():
            if isinstance(m, Mapping):
                src = m.get("source") or {}
                model_rows.append({"stage": name, "role": role, "name": m.get("name") or m.get("spec"),
                                   "source": f"{src.get('kind', '')}: {src.get('spec', src.get('path', ''))}"
                                   if isinstance(src, Mapping) else str(src),
                                   "n_layers": m.get("n_layers"), "d_model": m.get("d_model"), "dtype": m.get("dtype"),
                                   "device": m.get("device")})
        for dname, d in (m_.get("data") or {}).items():
            if isinstance(d, Mapping):
                data_rows.append({"stage": name, "data": dname, "n": d.get("n", d.get("n_prompts")),
                                  "hash": str(d.get("content_hash") or d.get("prompts_sha256") or "")[:12],
                                  "prompts": d.get("prompts") or ""})

    for name, info in (manifest.get("stages") or {}).items():
        folder = str(info.get("folder", ""))
        sub = t.root / folder
        stage_manifest = {}
        if sub.is_dir() and (sub / "manifest.json").is_file():
            stage_manifest = json.loads((sub / "manifest.json").read_text())
        models = stage_manifest.get("models") or {}
        models_and_data(name, stage_manifest)
        f = _finetune_record(sub)  # a fine-tune folder (the finetune stage points into the model cache)
        if f is not None and not finetune_pairs:
            tr, data = f.get("training") or {}, f.get("data") or {}
            finetune_pairs = [("name", f.get("name")), ("folder", str(sub)), ("base", (f.get("base") or {}).get("spec")),
                              ("method", (f.get("method") or {}).get("name")), ("data origin", data.get("origin")),
                              ("categories", data.get("categories")),
                              ("harmful prompts", (data.get("harmful") or {}).get("n")),
                              ("benign prompts", (data.get("benign") or {}).get("n")),
                              ("steps", tr.get("steps")), ("epochs", tr.get("epochs")),
                              ("final loss", tr.get("final_loss")),
                              ("distill seconds", tr.get("distill_seconds")),
                              ("train seconds", tr.get("train_seconds")), ("total seconds", f.get("total_seconds")),
                              ("config hash", f.get("config_hash")), ("data hash", f.get("data_hash")),
                              ("git commit", f.get("git_commit"))]
        stage_rows.append({"stage": name, "folder": folder, "seconds": info.get("seconds"),
                           "status": stage_manifest.get("status", "present" if sub.exists() else "missing"),
                           "git_commit": (stage_manifest.get("git_commit") or "")[:12],
                           "models": ", ".join(f"{k}: {(v or {}).get('name', '?')}" for k, v in models.items()
                                               if isinstance(v, Mapping))})
    if not stage_rows:  # a single stage's folder (e.g. runs/main/geometry): its own models and data
        models_and_data(".", manifest)
    if stage_rows:
        stages = pd.DataFrame(stage_rows)
        timed = stages[pd.to_numeric(stages["seconds"], errors="coerce").notna()]
        fig = None
        if len(timed):
            from catlens import plotting

            fig = plotting.bars(timed.assign(minutes=pd.to_numeric(timed["seconds"]) / 60), x="stage", y="minutes",
                                title="Stage wall time (minutes)", text_format=".1f")
            fig.update_layout(width=460, height=340)
        sec.block(figure=fig, table=stages, table_title="Stages")
    else:
        sec.text("The manifest records no stages (a single analysis's folder, or a run still in its first stage).")
    figures = manifest.get("figures")
    if isinstance(figures, Mapping):  # the figure scripts' own pages (analyses/main.py records them)
        links = []
        for key, path in figures.items():
            p = Path(str(path))
            if p.suffix == ".html":  # link relative to the page, wherever the job was started from
                local = t.root / "figures" / p.name
                href = f"figures/{p.name}" if local.is_file() else p.resolve().as_uri()
                links.append(f'<li><a href="{html.escape(href)}">{html.escape(str(key))}</a></li>')
        if links:
            sec.parts.append(f"<h4>Figure pages (figures/)</h4><ul class='links'>{''.join(links)}</ul>")
    if model_rows:
        sec.block(table=pd.DataFrame(model_rows), table_title="Models (from the stage manifests)")
    if finetune_pairs:
        sec.block(table=_kv_table(finetune_pairs), table_title="Fine-tune (its folder's manifest)")
    if data_rows:
        sec.block(table=pd.DataFrame(data_rows), table_title="Data (from the stage manifests)")
    return sec.result()


def _finetune_record(folder: Path) -> dict[str, Any] | None:
    """A fine-tune folder's record (:func:`catlens.runs.read_finetune_manifest`); None when ``folder`` is none."""
    from catlens.runs import read_finetune_manifest

    record = read_finetune_manifest(folder)
    return record if record is not None and ("training" in record or "base" in record) else None


def section_finetune(t: Tables) -> SectionResult:
    """Fine-tune results: held-out refusal per category, over-refusal, AUROC, fluency (eval/)."""
    import pandas as pd

    from catlens import plotting

    sec = _Section("finetune", "Fine-tune results (held-out evaluation)",
                   "python analyses/finetune_eval.py --config default --out <run folder>/eval")
    tabs = _need(t, sec, "eval", ["per_category", "over_refusal", "auroc", "fluency"])
    if "auroc" in tabs and "benign" not in tabs["auroc"].columns and t.path("eval", "auroc").parent == t.root:
        del tabs["auroc"]  # a P1 folder given directly: its auroc table is the probe comparison, not the eval's
        sec.missing.append("eval/auroc.parquet")
    if not tabs:
        return sec.result()
    summary = t.json("eval", "summary") or {}
    if "per_category" in tabs:
        pc = tabs["per_category"]
        _require(pc, ["category", "refused_first_token", "right_category_first_token"], "per_category")
        allrow = pc[pc["category"] == "ALL"]
        if len(allrow):
            r = allrow.iloc[0]
            sec.text(f"Held-out harmful prompts: refused {fmt(r['refused_first_token'])} (first token, "
                     f"n={fmt(r.get('n_scored'))}) and {fmt(r.get('refused_generated'))} (generated, "
                     f"n={fmt(r.get('n_generated'))}); right category {fmt(r['right_category_first_token'])} "
                     f"(first token) and {fmt(r.get('right_category_generated'))} (generated).")
        cols = [c for c in ("refused_first_token", "right_category_first_token", "refused_generated",
                            "right_category_generated") if c in pc.columns]
        long = pc[pc["category"] != "ALL"].melt(id_vars=["category"], value_vars=cols, var_name="metric",
                                                 value_name="rate")
        fig = plotting.bars(long, x="category", y="rate", color="metric", range_y=(0.0, 1.05),
                            title="Held-out harmful prompts: refusal and right category, per category")
        sec.block(figure=fig, table=pc, table_title="per_category")
    if "over_refusal" in tabs:
        o = tabs["over_refusal"]
        _require(o, ["set"], "over_refusal")
        cols = [c for c in ("over_refusal_first_token", "over_refusal_generated") if c in o.columns]
        long = o.melt(id_vars=["set"], value_vars=cols, var_name="metric", value_name="rate")
        fig = plotting.bars(long, x="set", y="rate", color="metric", range_y=(0.0, 1.05),
                            title="Over-refusal on benign sets") if len(long) else None
        sec.block(figure=fig, table=o, table_title="over_refusal")
    if "auroc" in tabs:
        a = tabs["auroc"]
        _require(a, ["benign", "auroc"], "auroc")
        fig = plotting.bars(a, x="benign", y="auroc", range_y=(0.0, 1.05),
                            title="AUROC of the logit refusal score: held-out harmful vs each benign set")
        sec.block(figure=fig, table=a, table_title="auroc")
    if "fluency" in tabs:
        f = tabs["fluency"]
        long = pd.DataFrame([{"metric": k, "value": v} for k, v in f.to_dict("records")[0].items()],
                            dtype=object) if len(f) else f
        sec.block(table=long, table_title="fluency")
    targets = summary.get("targets")
    if isinstance(targets, Mapping):
        rows = [{"metric": k, "value": summary.get(k), "target": v} for k, v in targets.items()]
        note = ("harmful_refusal and right_category targets are read against the generated decisions "
                "(harmful_refusal_generated, right_category_generated) where the summary has no plain value.")
        for r in rows:
            if r["value"] is None:
                alt = summary.get(f"{r['metric']}_generated")
                if alt is None and r["metric"] == "repeated_special_rate":
                    alt = summary.get("repeated_special_rate_gated")
                r["value"] = alt
            r["met"] = _target_met(r["value"], str(r["target"]))
        sec.block(table=pd.DataFrame(rows), table_title="Targets (eval/summary.json)", caption=note)
    return sec.result()


def _target_met(value: Any, target: str) -> str:
    """``"yes"``/``"no"`` for a target written like ``">= 0.95"``, ``"aim <= 0.40"`` or ``"== 0"``; ``"?"`` else."""
    import operator
    import re

    m = re.search(r"(>=|<=|==|>|<)\s*(-?[0-9.]+)", target)
    if m is None or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(float(value)):
        return "?"
    ops = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}
    return "yes" if ops[m.group(1)](float(value), float(m.group(2))) else "no"


def _best_layers(sep: Any) -> Any:
    import pandas as pd

    rows = []
    for (task, metric), g in sep.groupby(["task", "metric"], sort=False):
        g = g.dropna(subset=["value"])
        if not len(g):
            continue
        lower = metric == "davies_bouldin"
        best = g.loc[g["value"].idxmin() if lower else g["value"].idxmax()]
        rows.append({"task": task, "metric": metric, "best_layer": int(best["layer"]), "value": best["value"],
                     "better": "lower" if lower else "higher"})
    return pd.DataFrame(rows)


def section_separability(t: Tables) -> SectionResult:
    from catlens.figures import separability as fsep

    sec = _Section("separability", "Separability by layer", "python analyses/geometry.py --out <run folder>/geometry")
    tabs = _need(t, sec, "geometry", ["separability"])
    if not tabs:
        return sec.result()
    sep = tabs["separability"]
    _require(sep, ["task", "layer", "metric", "value"], "separability")
    data = sep[sep["metric"].isin(fsep.METRICS)]
    best = _best_layers(data)
    sil = best[(best["task"] == "harmful_category") & (best["metric"] == "silhouette")]
    if len(sil):
        r = sil.iloc[0]
        sec.text(f"Harm categories cluster best at layer {fmt(r['best_layer'])} (silhouette {fmt(r['value'])}).")
    auc = best[(best["task"] == "harmful_vs_benign") & (best["metric"] == "probe_auroc")]
    if len(auc):
        r = auc.iloc[0]
        sec.text(f"Harmful vs benign is most linearly decodable at layer {fmt(r['best_layer'])} "
                 f"(probe AUROC {fmt(r['value'])}).")
    sec.block(figure=fsep.make_figure(sep), table=best, table_title="Best layer per task and metric")
    return sec.result()


def section_cosine(t: Tables) -> SectionResult:
    from catlens.figures import cosine as fcos

    sec = _Section("cosine", "Cosines between category directions (raw, whitened, orthonormal basis)",
                   "python analyses/geometry.py --out <run folder>/geometry")
    tabs = _need(t, sec, "geometry", ["cosine"])
    if not tabs:
        return sec.result()
    cos = tabs["cosine"]
    _require(cos, ["direction", "layer", "space", "category_a", "category_b", "cosine"], "cosine")
    layer = fcos.default_layer(cos, t.load("geometry", "separability"))
    direction = "one_vs_benign" if "one_vs_benign" in set(cos["direction"]) else sorted(cos["direction"].unique())[0]
    by_layer = fcos.by_layer(cos)
    at = by_layer[by_layer["layer"] == layer].pivot_table(index="direction", columns="space",
                                                          values="mean_offdiag_cosine").reset_index()
    at.columns.name = None
    row = by_layer[(by_layer["layer"] == layer) & (by_layer["direction"] == direction)]
    if len(row):
        vals = {r["space"]: r["mean_offdiag_cosine"] for _, r in row.iterrows()}
        sec.text(f"At layer {layer} (best category silhouette), {direction}: mean off-diagonal cosine "
                 + ", ".join(f"{k} {fmt(v)}" for k, v in vals.items()) + ".")
    sec.block(figure=fcos.make_figure(cos, direction, layer), table=at,
              table_title=f"Mean off-diagonal cosine at layer {layer}",
              stands_for={c: STANDS_FOR["mean_offdiag_cosine"] for c in fcos.SPACES if c in at.columns})
    fig2 = fcos.make_layer_figure(cos)
    summary = by_layer.groupby(["direction", "space"])["mean_offdiag_cosine"].agg(["min", "mean", "max"]).reset_index()
    summary = summary.rename(columns={"min": "min_over_layers", "mean": "mean_over_layers",
                                      "max": "max_over_layers"})
    sec.block(figure=fig2, table=summary, table_title="Mean off-diagonal cosine over layers",
              caption="Each value is a mean off-diagonal cosine (entanglement of the category directions).")
    return sec.result()


def section_anisotropy(t: Tables) -> SectionResult:
    from catlens.figures import anisotropy as fan

    sec = _Section("anisotropy", "Anisotropy by layer", "python analyses/geometry.py --out <run folder>/geometry")
    tabs = _need(t, sec, "geometry", ["anisotropy"])
    if not tabs:
        return sec.result()
    an = tabs["anisotropy"]
    _require(an, ["subset", "layer", "measure", "value"], "anisotropy")
    data = fan.plotted(an)
    fig = fan.make_figure(an)
    layers = sorted(data["layer"].unique())
    picks = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    subset = "all" if "all" in set(data["subset"]) else sorted(data["subset"].unique())[0]
    tab = data[(data["subset"] == subset) & data["layer"].isin(picks)].pivot_table(
        index="measure", columns="layer", values="value").reset_index()
    tab.columns = ["metric", *[f"layer {c}" for c in tab.columns[1:]]]
    mpc = data[(data["subset"] == subset) & (data["measure"] == "mean_pairwise_cosine")]
    if len(mpc):
        top = mpc.loc[mpc["value"].idxmax()]
        sec.text(f"Mean pairwise cosine of the {subset} prompts peaks at layer {fmt(int(top['layer']))} "
                 f"({fmt(top['value'])}; 0 for isotropic activations).")
    sec.block(figure=fig, table=tab, table_title=f"Subset {subset!s} at the first, middle and last layer")
    return sec.result()


def section_whitening(t: Tables) -> SectionResult:
    from catlens import plotting

    sec = _Section("whitening", "Whitening and P1's orthonormal basis",
                   "python analyses/geometry.py --out <run folder>/geometry")
    tabs = _need(t, sec, "geometry", ["whitening", "basis_alignment"])
    if not tabs:
        return sec.result()
    if "whitening" in tabs:
        w = tabs["whitening"]
        _require(w, ["layer", "rank"], "whitening")
        first = w.iloc[0]
        n_def = int(w["rank_deficient"].astype(bool).sum()) if "rank_deficient" in w else 0
        sec.text(f"Whitener: {fmt(first.get('method'))}, eps {fmt(first.get('eps'))}, shrinkage "
                 f"{fmt(first.get('shrinkage'))}, fitted on {fmt(first.get('n_samples'))} benign prompts; rank "
                 f"{fmt(int(w['rank'].min()))}–{fmt(int(w['rank'].max()))} of d_model {fmt(first.get('d_model'))}; "
                 f"rank-deficient at {n_def} of {len(w)} layers.")
        long = w.melt(id_vars=["layer"], value_vars=[c for c in ("rank", "n_samples", "d_model") if c in w],
                      var_name="quantity", value_name="count")
        fig = plotting.line(long, x="layer", y="count", color="quantity", title="Whitener rank by layer")
        fig.update_layout(width=560, height=380)
        sec.block(figure=fig, table=w, table_title="whitening")
    if "basis_alignment" in tabs:
        b = tabs["basis_alignment"]
        _require(b, ["direction", "layer", "cos_basis_residual"], "basis_alignment")
        value_cols = [c for c in ("cos_basis_residual", "off_span_share") if c in b.columns]
        mean = b.groupby(["direction", "layer"], as_index=False)[value_cols].mean()
        long = mean.melt(id_vars=["direction", "layer"], value_vars=value_cols, var_name="metric",
                         value_name="mean")
        fig = plotting.line(long, x="layer", y="mean", color="direction", facet_col="metric",
                            title="P1 basis vs category directions, mean over categories, by layer")
        tab = b.groupby("direction")[value_cols].agg(["min", "mean"])
        tab.columns = [f"{a}_{s}" for a, s in tab.columns]
        tab = tab.reset_index()
        sec.block(figure=fig, table=tab, table_title="basis_alignment over layers and categories",
                  stands_for={f"{c}_{s}": STANDS_FOR[c] for c in value_cols for s in ("min", "mean")})
    return sec.result()


def section_model_diff(t: Tables) -> SectionResult:
    from catlens.figures import model_diff as fmd

    sec = _Section("model_diff", "Model diffing: the category directions of two models",
                   "python analyses/geometry.py --model <fine-tune> --other-model smollm2-135m-instruct "
                   "--out <run folder>/geometry")
    tabs = _need(t, sec, "geometry", ["model_diff"])
    if not tabs:
        return sec.result()
    md = tabs["model_diff"]
    _require(md, ["direction", "category", "layer", "cosine"], "model_diff")
    at, layer = fmd.at_layer(md, None)
    a_name, b_name = ((str(at["model_a"].iloc[0]), str(at["model_b"].iloc[0]))
                      if {"model_a", "model_b"} <= set(md.columns) else ("model A", "model B"))
    names = f"{a_name} vs {b_name}"
    sec.text(f"The two models' directions differ most at layer {layer} (mean cosine "
             f"{fmt(float(at['cosine'].mean()))} over directions and categories; {names}).")
    fig = fmd.make_figure(md, layer)
    tab = at.pivot_table(index="category", columns="direction", values="cosine").reset_index()
    tab.columns.name = None
    sec.block(figure=fig, table=tab, table_title=f"cos(v_c of {a_name}, v_c of {b_name}) at layer {layer}",
              caption="Every value is a model-diffing cosine.",
              stands_for={c: STANDS_FOR["model_diff_cosine"] for c in tab.columns if c != "category"})
    fig2 = fmd.make_layer_figure(md)
    summ = md.groupby("direction")["cosine"].agg(["min", "mean", "max"]).reset_index()
    summ["layer_of_min"] = [int(md[md["direction"] == d].groupby("layer")["cosine"].mean().idxmin())
                            for d in summ["direction"]]
    sec.block(figure=fig2, table=summ, table_title="Over layers and categories",
              stands_for={c: STANDS_FOR["model_diff_cosine"] for c in ("min", "mean", "max")})
    return sec.result()


def _with_interval(df: Any, value: str, low: str, high: str, name: str) -> Any:
    if low in df.columns and high in df.columns:
        df = df.assign(**{name: [_interval(v, lo, hi) for v, lo, hi in zip(df[value], df[low], df[high])]})
    return df


# ------------------------------------------------------------------------------ P1, P2, specificity, judges


def _folder_of(t: Tables, stage: str, name: str) -> Path | None:
    """The folder that holds table ``name`` of ``stage`` (``<run>/<stage>`` or the run folder itself)."""
    p = t.path(stage, name)
    return None if p is None else p.parent


def _judge(rates: Any) -> str | None:
    if rates is None or "judge" not in rates.columns or not len(rates):
        return None
    return ", ".join(dict.fromkeys(str(j) for j in rates["judge"].dropna()))


P1_COMMAND = "python analyses/p1_steering.py --model <refusal-tuned folder> --out <run folder>/p1"


def section_p1(t: Tables) -> SectionResult:
    """P1 Figure 1 (``p1/headline``) and the safety table (``p1/test_rates``), the transfer table when present."""
    sec = _Section("p1", "P1: refusal vs over-refusal (Figure 1) and the safety table", P1_COMMAND)
    tabs = _need(t, sec, "p1", ["headline", "test_rates"])
    if not tabs:
        return sec.result()
    judge = _judge(tabs.get("test_rates"))
    judged = f"as decided by {judge}" if judge else "as the analysis decided it"
    if "headline" in tabs:
        from catlens.figures import p1_tradeoff as fig1
        head = tabs["headline"]
        data = fig1.tradeoff_data(head)
        region = fig1.region(head)
        fig = fig1.tradeoff_figure(head, judge)
        shown = _with_interval(data, "over_refusal", "over_refusal_ci_low", "over_refusal_ci_high",
                               "over_refusal_interval")
        shown = _with_interval(shown, "refusal", "refusal_ci_low", "refusal_ci_high", "refusal_interval")
        for key in ("over_refusal", "refusal", "ppl_ratio"):
            target = f"target_{key}"
            if target in head.columns and key in head.columns:
                shown[f"{key}_target_met"] = [_target_met(v, str(tg)) for v, tg in zip(head[key], head[target])]
        keep = [c for c in ("policy", "over_refusal_interval", "over_refusal_n", "refusal_interval", "refusal_n",
                            "ppl_ratio", "over_refusal_target_met", "refusal_target_met", "ppl_ratio_target_met",
                            "in_region") if c in shown.columns]
        base = data[data["policy"] == "unsteered"]
        if len(base):
            b = base.iloc[0]
            sec.text(f"Unsteered: over-refusal {_interval(b['over_refusal'], b['over_refusal_ci_low'], b['over_refusal_ci_high'])}"
                     f", refusal {_interval(b['refusal'], b['refusal_ci_low'], b['refusal_ci_high'])} (test prompts, "
                     f"pooled, Wilson 95 %).")
        steered = data[data["policy"] != "unsteered"]
        if len(steered):
            best = steered.loc[(steered["refusal"] - steered["over_refusal"]).idxmax()]
            sec.text(f"Widest gap among the steered policies: {best['policy']}, over-refusal "
                     f"{_interval(best['over_refusal'], best['over_refusal_ci_low'], best['over_refusal_ci_high'])}, "
                     f"refusal {_interval(best['refusal'], best['refusal_ci_low'], best['refusal_ci_high'])}"
                     + (f", perplexity ratio {fmt(best['ppl_ratio'])}" if "ppl_ratio" in best else "") + ".")
        inside = [str(p) for p in data.loc[data["in_region"], "policy"]]
        sec.text(f"Desirable region (over-refusal <= {fmt(region['over_refusal_max'])} and refusal >= "
                 f"{fmt(region['refusal_min'])}, from the table's targets): "
                 + (", ".join(inside) if inside else "no policy reaches it") + ".")
        notes = {"over_refusal_interval": f"over-refusal: benign prompts refused, pooled over XSTest safe, CoCoNot "
                                          f"contrast, JBB benign and the lookalikes, {judged} (stands for a reader's "
                                          f"verdict on the answer)",
                 "refusal_interval": f"safety: harmful prompts refused, pooled over the harmful test sets, {judged}",
                 "ppl_ratio": "coherence: perplexity of benign answers under the unsteered model, relative to the "
                              "unsteered answers (the same prompts)"}
        sec.block(figure=fig, table=shown[keep], table_title="headline (test prompts; Wilson 95 % intervals)",
                  stands_for=notes)
    if "test_rates" in tabs:
        from catlens.figures import p1_safety_table as fst
        substring = t.load("p1", "test_rates_substring")
        rows = fst.safety_rows(tabs["test_rates"], substring, tabs.get("headline"))
        wide = fst.safety_wide(rows)
        sec.block(figure=fst.safety_bars(rows), table=wide,
                  table_title="Safety table: % refused ± SE per dataset and policy (test prompts)",
                  caption="Cells are formatted from test_rates (percent ± binomial SE; pooled = every prompt of the "
                          "side, macro = mean of the dataset rates); 95 % intervals as whiskers in the figure. "
                          + fst.judges_note(rows) + ".")
    transfer = t.load("p1", "transfer")
    if transfer is not None and len(transfer):
        _require(transfer, ["policy", "label", "rate", "ci_low", "ci_high"], "transfer")
        shown = _with_interval(transfer, "rate", "ci_low", "ci_high", "rate_interval")
        keep = [c for c in ("policy", "model", "label", "rate_interval", "n", "judge", "reused") if c in shown]
        tj = _judge(transfer) or "the second judge"
        sec.block(table=shown[keep], table_title="Transfer to the stock model (no retraining)",
                  stands_for={"rate_interval": f"refusal (harmful rows) or over-refusal (benign rows) of the stock "
                                               f"model's generated answers, judged by {tj}"})
    return sec.result()


def section_probe_roc(t: Tables) -> SectionResult:
    """The probe gate's score vs the first-position refusal-token probability (``p1/test_first_position``,
    ``p1/auroc``)."""
    sec = _Section("probe_roc", "Probe gate vs refusal token: ROC", P1_COMMAND)
    tabs = _need(t, sec, "p1", ["auroc", "test_first_position"])
    folder = _folder_of(t, "p1", "test_first_position")
    if sec.missing and not tabs:
        return sec.result()
    auroc = tabs.get("auroc")
    if auroc is not None and not len(auroc):  # written empty when no gated policy was chosen
        auroc = None
        sec.text("The auroc table is empty: no gated policy passed the perplexity guard in this run.")
    scores = None
    if folder is not None:
        from catlens.figures import p1_probe_roc as roc
        scores = roc.load_scores(folder)
        if not scores["gate_score"].notna().any():
            sec.text("No policy in test_first_position has gate scores, so there is no probe ROC to draw.")
            scores = None
    if scores is not None:
        gate_from = roc.gated_policy(scores, auroc)
        threshold = roc.gate_threshold(folder, gate_from)
        curves, points = roc.roc_data(scores, gate_from, threshold)
        fig = roc.roc_figure(curves, points, auroc, gate_from, threshold)
        pts = points.assign(operating_point=[f"FPR {fmt(f)}, TPR {fmt(r)}" for f, r in zip(points["fpr"],
                                                                                           points["tpr"])])
        sec.block(figure=fig, table=pts[["pair", "score", "point", "operating_point", "threshold", "what"]],
                  table_title="Operating points (test prompts)",
                  caption=f"Gate from {gate_from}" + (f", threshold {fmt(threshold)} (its policy file)"
                                                      if threshold is not None else "") + ".")
    if auroc is not None:
        _require(auroc, ["pair", "score", "auroc", "ci_low", "ci_high"], "auroc")
        shown = _with_interval(auroc, "auroc", "ci_low", "ci_high", "auroc_interval")
        for pair, g in auroc.groupby("pair", sort=False):
            by = {str(s): r for s, r in zip(g["score"], g.itertuples(index=False))}
            probe = next((r for s, r in by.items() if s.startswith("probe")), None)
            token = next((r for s, r in by.items() if not s.startswith("probe")), None)
            if probe is None or token is None:
                continue
            if probe.ci_low > token.ci_high:
                verdict = "the probe separates better (intervals do not overlap)"
            elif token.ci_low > probe.ci_high:
                verdict = "the refusal token separates better (intervals do not overlap); see the gate's errors below"
            else:
                verdict = "the intervals overlap: no clear winner"
            sec.text(f"{pair}: probe AUROC {_interval(probe.auroc, probe.ci_low, probe.ci_high)} vs refusal token "
                     f"{_interval(token.auroc, token.ci_low, token.ci_high)}: {verdict}.")
        keep = [c for c in ("pair", "score", "auroc_interval", "n_pos", "n_neg", "gate_from", "method", "stands_for")
                if c in shown.columns]
        sec.block(table=shown[keep], table_title="auroc (bootstrap 95 % intervals)")
    errors = t.load("p1", "gate_errors")
    if errors is not None and len(errors):
        _require(errors, ["dataset", "label", "n", "gate_errors", "error_rate"], "gate_errors")
        worst = errors.loc[errors["error_rate"].idxmax()]
        sec.text(f"The gate errs most on {worst['dataset']} ({worst['label']}): {fmt(int(worst['gate_errors']))} of "
                 f"{fmt(int(worst['n']))} prompts ({fmt(worst['error_rate'])}).")
        sec.block(table=errors, table_title="Where the gate's errors fall (test prompts)",
                  caption="An error is a benign prompt the gate flags or a harmful prompt it does not flag.")
    return sec.result()


def section_sweep(t: Tables) -> SectionResult:
    """P1's validation sweep (``p1/sweep``, ``p1/candidates``; strength and layer curves, the low-rank training
    curve), or the table ``analyses/steer_sweep.py`` writes (``sweep/sweep``)."""
    sec = _Section("sweep", "Sweeps: strength, layer and the validation cloud", P1_COMMAND)
    sw = t.load("p1", "sweep")
    if sw is None or "gate_rule" not in sw.columns:
        legacy = t.load("sweep", "sweep")
        if legacy is not None and "gate_rule" not in legacy.columns:
            sec.command = ("python analyses/steer_sweep.py --model <refusal-tuned folder> --out <run folder>/sweep")
            _require(legacy, ["method", "layer", "refusal", "over_refusal"], "sweep")
            _steer_sweep(sec, legacy)
            return sec.result()
        sw = legacy if legacy is not None and "gate_rule" in legacy.columns else sw
    if sw is None:
        sec.missing.append("p1/sweep.parquet")
        return sec.result()
    from catlens.figures import p1_tradeoff as fig1
    from catlens.figures import p1_sweeps as fsw
    candidates = t.load("p1", "candidates")
    headline = t.load("p1", "headline")
    region = fig1.region(headline) if headline is not None else None
    rule = fsw.best_gate_rule(sw)
    if candidates is not None and "mode" in candidates.columns:  # today's table: zones chosen on judged answers
        candidates = candidates.rename(columns={"mode": "gate_rule", "refusal": "val_refusal",
                                                "over_refusal": "val_over_refusal"})
    chosen = candidates[candidates["chosen"].astype(bool)] if candidates is not None and "chosen" in candidates else None
    if chosen is not None:
        for r in chosen.to_dict("records"):
            where = f", positions {r['positions']}" if r.get("positions") else ""
            judged = f" ({r['judge']} judge on generated answers)" if r.get("judge") else ""
            toward, away = as_float(r["toward"], 0.0), as_float(r["away"], 0.0)  # missing: not steered on that side
            sec.text(f"Chosen for gate rule {r['gate_rule']}{where}: {r['method']}, layer {fmt(r['layer'])}, toward "
                     f"{fmt(toward)}, away {fmt(away)}: val refusal {fmt(r['val_refusal'])}, "
                     f"over-refusal {fmt(r['val_over_refusal'])}{judged}, perplexity ratio {fmt(r['ppl_ratio'])}.")
    keep = [c for c in ("gate_rule", "positions", "method", "layer", "toward", "away", "val_objective", "val_refusal",
                        "val_over_refusal", "judge", "ppl_ratio", "ppl_n", "admissible", "chosen", "stands_for")
            if candidates is not None and c in candidates.columns]
    sec.block(figure=fig1.sweep_figure(sw, candidates, region),
              table=candidates[keep] if candidates is not None else None,
              table_title="Candidates after the perplexity guard (val)",
              stands_for={"val_refusal": "safety on val: harmful prompts refused (first-position refusal token), "
                                         "macro over datasets",
                          "val_over_refusal": STANDS_FOR["benign_refusal"] + " (val, macro over datasets)",
                          "ppl_ratio": "coherence: perplexity of benign val answers under the unsteered model, "
                                       "relative to the unsteered answers"})
    sec.block(figure=fsw.strength_figure(sw, rule))
    layers = fsw.layer_data(sw, rule)
    wide = layers.pivot_table(index=["method", "layer"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    sec.block(figure=fsw.layer_figure(sw, rule), table=wide,
              table_title=f"Best setting per layer (val, gate rule {rule})",
              stands_for={"refusal": "safety on val (first-position refusal token, macro over datasets)",
                          "over_refusal": STANDS_FOR["benign_refusal"] + " (val, macro over datasets)",
                          "objective": "the selection objective: refusal minus over-refusal on val"})
    curve = t.load("p1", "lowrank_curve")
    if curve is None:
        sec.text("No low-rank training curve (p1/lowrank_curve): the low-rank combination was not trained in this "
                 "run.")
    else:
        data = fsw.lowrank_data(curve)
        last = data.sort_values("step", kind="stable").groupby(["run", "metric"], sort=False).agg(
            first=("value", "first"), last=("value", "last"), steps=("step", "max")).reset_index()
        last["stands_for"] = last["metric"].map(LOWRANK_TERMS).fillna("–")
        sec.block(figure=fsw.lowrank_figure(curve), table=last, table_title="Low-rank training: first and last value")
    return sec.result()


LOWRANK_TERMS = {"loss": "the training objective (harm + KL terms)",
                 "harm": "refusal-token loss on harmful training prompts (how far the map is from making them refused)",
                 "kl": "KL to the unsteered model on benign prompts (how much benign behaviour the map changes)"}


P2_COMMAND = "python analyses/p2_steering.py --model <model> --out <run folder>/p2"


def section_p2(t: Tables) -> SectionResult:
    """P2's per-category bars (``p2/p2_test``) and the tested settings (``p2/p2_test_summary``)."""
    sec = _Section("p2", "P2: category-wise steering, per category (test prompts)", P2_COMMAND)
    tabs = _need(t, sec, "p2", ["p2_test", "p2_test_summary"])
    if "p2_test" not in tabs:
        return sec.result()
    folder = _folder_of(t, "p2", "p2_test")
    if t.path("p2", "p2_test").suffix != ".parquet":
        raise ValueError(f"{t.rel(t.path('p2', 'p2_test'))}: the P2 figure reads p2_test.parquet (analyses/"
                         f"p2_steering.py writes it next to the CSV).")
    test = tabs["p2_test"]
    _require(test, ["metric", "judge", "row", "category", "method", "group", "setting", "value", "ci_low", "ci_high"],
             "p2_test")
    from catlens.figures import p2_bars as fb
    data = fb.load_runs([folder])
    stands = {str(m): str(s) for m, s in zip(test["metric"], test["stands_for"])} if "stands_for" in test else {}
    unsafe = fb.unsafe_table(data)
    wide = _with_interval(unsafe, "value", "ci_low", "ci_high", "cell").pivot_table(
        index="category", columns="label", values="cell", aggfunc="first").reset_index()
    wide.columns.name = None
    judge = ", ".join(sorted(set(map(str, unsafe["primary_judge"]))))
    sec.block(figure=fb.make_figure(data), table=wide,
              table_title=f"Harmful prompts answered, per category [Wilson 95 %] (judge {judge})",
              caption="Every cell is a share of harmful prompts answered: "
                      + stands.get("harmful_answered_rate", "not refused by the judge, non-empty, not degenerate")
                      + ".")
    sec.block(figure=fb.make_helpfulness_figure(data))
    summary = tabs.get("p2_test_summary")
    if summary is not None:
        _require(summary, ["setting", "harmful_answered", "benign_answered"], "p2_test_summary")
        shown = _with_interval(summary, "harmful_answered", "harmful_answered_ci_low", "harmful_answered_ci_high",
                               "harmful_answered_interval")
        shown = _with_interval(shown, "benign_answered", "benign_answered_ci_low", "benign_answered_ci_high",
                               "benign_answered_interval")
        keep = [c for c in ("group", "setting", "harmful_answered_interval", "harmful_answered_ratio",
                            "harmful_answered_halved", "benign_answered_interval", "benign_answered_ratio",
                            "benign_answered_within_tol", "ppl_ratio", "within_ppl_guard", "judge")
                if c in shown.columns]
        if {"harmful_answered_halved", "benign_answered_within_tol"} <= set(summary.columns):
            halved = summary["harmful_answered_halved"].astype("boolean").fillna(False).astype(bool)
            ok = halved & summary["benign_answered_within_tol"].astype(bool)
            if "within_ppl_guard" in summary:
                ok &= summary["within_ppl_guard"].astype("boolean").fillna(False).astype(bool)
            met = summary[ok & (summary["setting"] != "unsteered")]
            ratio = "harmful_answered_ratio"
            if len(met):
                best = met.loc[met[ratio].idxmin()] if ratio in met else met.iloc[0]
                sec.text(f"Target met (share of harmful prompts answered at least halved, share of benign prompts "
                         f"answered within tolerance) by {len(met)} of {len(summary)} tested settings; lowest "
                         f"ratio: {best['setting']} (harmful answered "
                         f"{_interval(best['harmful_answered'], best.get('harmful_answered_ci_low'), best.get('harmful_answered_ci_high'))}, "
                         f"ratio {fmt(best.get(ratio))}).")
            elif ratio in summary:
                steered = summary[summary["setting"] != "unsteered"].dropna(subset=[ratio])
                if len(steered):
                    best = steered.loc[steered[ratio].idxmin()]
                    sec.text(f"Target missed: no tested setting halves the share of harmful prompts answered with "
                             f"the share of benign prompts answered within tolerance; lowest ratio "
                             f"{fmt(best[ratio])} ({best['setting']}, benign answered ratio "
                             f"{fmt(best.get('benign_answered_ratio'))}).")
                else:
                    sec.text("Target undefined: the unsteered model answers none of the harmful test prompts, so "
                             "there is nothing to halve.")
        sec.block(table=shown[keep], table_title="p2_test_summary (pooled, test prompts)",
                  stands_for={"harmful_answered_interval": stands.get("harmful_answered_rate",
                                                                      "harmful prompts answered"),
                              "benign_answered_interval": stands.get("benign_answered_rate",
                                                                     "benign prompts answered"),
                              "ppl_ratio": "coherence: perplexity of benign answers under the unsteered model, "
                                           "relative to the unsteered answers"})
    return sec.result()


SPECIFICITY_COMMAND = ("python analyses/specificity.py --model <refusal-tuned folder> --policy <run folder>/p1/"
                       "policies/categorical_global --out <run folder>/specificity")


def section_specificity(t: Tables) -> SectionResult:
    """The category-specificity matrices (``specificity/specificity``) and their summary (``specificity/summary``)."""
    sec = _Section("specificity", "Specificity of category steering", SPECIFICITY_COMMAND)
    tabs = _need(t, sec, "specificity", ["specificity", "summary"])
    if len(tabs) < 2:
        return sec.result()
    from catlens.figures import specificity as fs
    cells, summary = tabs["specificity"], tabs["summary"]
    _require(summary, ["variant", "set", "sign", "metric", "rows", "mean_diag", "mean_offdiag", "ratio",
                       "diag_minus_offdiag"], "summary")
    rate = summary[summary["metric"] == "rate"]
    for variant, s, sign in (("raw", "harmful", "away"), ("raw", "lookalike", "toward"),
                             ("orthogonalised", "harmful", "away"), ("orthogonalised", "lookalike", "toward")):
        r = rate[(rate["variant"] == variant) & (rate["set"] == s) & (rate["sign"] == sign)]
        if len(r):
            r = r.iloc[0]
            sec.text(f"{variant}, {s} prompts, steering {sign}: mean diagonal effect {fmt(r['mean_diag'])}, mean "
                     f"off-diagonal {fmt(r['mean_offdiag'])}, ratio "
                     f"{_interval(r['ratio'], r.get('ratio_ci_low'), r.get('ratio_ci_high'))}, difference "
                     f"{_interval(r['diag_minus_offdiag'], r.get('diag_minus_offdiag_ci_low'), r.get('diag_minus_offdiag_ci_high'))}.")
    shown = rate.copy()
    for col in ("mean_diag", "mean_offdiag", "ratio", "diag_minus_offdiag", "mean_all"):
        shown = _with_interval(shown, col, f"{col}_ci_low", f"{col}_ci_high", f"{col}_interval")
    keep = [c for c in ("variant", "set", "sign", "rows", "mean_diag_interval", "mean_offdiag_interval",
                        "ratio_interval", "diag_minus_offdiag_interval", "mean_all_interval") if c in shown.columns]
    ci = str(cells["ci_method"].iloc[0]) if "ci_method" in cells.columns and len(cells) else "bootstrap"
    what = "change in the refusal rate at the first response position (steered − unsteered; stands for the change in " \
           "a judge's refusal verdicts)"
    sec.block(figure=fs.make_figure(cells, summary, "rate"), table=shown[keep],
              table_title=f"Summary (refusal-rate change; intervals: {ci})",
              stands_for={"mean_diag_interval": f"on-target effect: {what}, own category",
                          "mean_offdiag_interval": f"off-target effect: {what}, other categories",
                          "ratio_interval": "category specificity (1 = one shared refusal knob; large = specific)",
                          "diag_minus_offdiag_interval": "category specificity as a difference (0 = shared knob)",
                          "mean_all_interval": f"control directions' mean effect: {what}"})
    sec.block(figure=fs.make_figure(cells, summary, "score"),
              caption="The same matrices for the mean refusal-score change (summed refusal-token probability at the "
                      "first response position), the less saturated companion.")
    return sec.result()


AGREEMENT_TABLES = (("p1", "agreement", "policy"), ("p2", "p2_agreement", "setting"))
"""(stage, table, context column) of the agreement tables the analyses write; ``*/judge_agreement`` is read too."""


def _agreement_figure(ja: Any) -> Any:
    """Horizontal bars, agreement and kappa per comparison (P2's val comparisons are left to the table)."""
    import numpy as np
    import plotly.graph_objects as go

    from catlens import plotting

    shown = ja
    if "split" in ja.columns and (ja["split"].astype(str) == "val").any():
        shown = ja[ja["split"].astype(str) != "val"]
    several_pairs = len({frozenset(p) for p in zip(shown["judge_a"], shown["judge_b"])}) > 1
    labels = [(f"{a} vs {b} · " if several_pairs else "") + (f"{c} " if c else "") + (f"[{s}]" if s != "." else "")
              for a, b, c, s in zip(shown["judge_a"], shown["judge_b"], shown["context"], shown["stage"])]
    fig = go.Figure()
    colours = plotting.template().layout.colorway
    for k, metric in enumerate(("agreement", "kappa")):
        fig.add_trace(go.Bar(y=labels, x=shown[metric], orientation="h", name=metric, marker_color=colours[k],
                             text=[fmt(v) for v in shown[metric]], textposition="auto"))
    low = min(0.0, float(np.nanmin(shown["kappa"]))) if shown["kappa"].notna().any() else 0.0
    pairs = "; ".join(dict.fromkeys(" vs ".join(sorted(map(str, p))) for p in zip(shown["judge_a"],
                                                                                   shown["judge_b"])))
    fig.update_layout(template=plotting.template(), barmode="group", width=1100, height=180 + 46 * len(shown),
                      title=f"Agreement between refusal decisions (test comparisons)<br><sup>{pairs}; kappa – where "
                            f"undefined</sup>", xaxis={"range": [low, 1.05], "title": "share equal / Cohen's kappa"},
                      yaxis={"autorange": "reversed", "automargin": True}, margin={"l": 40})
    return fig


def section_judges(t: Tables) -> SectionResult:
    """Agreement between the judges: ``p1/agreement`` (per policy), ``p2/p2_agreement`` (per setting and split) and
    any ``<stage>/judge_agreement`` (``catlens.judges.agreement_table``'s columns)."""
    import pandas as pd

    sec = _Section("judges", "Judge agreement", f"{P1_COMMAND}; {P2_COMMAND}")
    frames = []
    for stage, name, context in AGREEMENT_TABLES:
        p = t.path(stage, name)
        if p is None:
            continue
        df = t.load(stage, name)
        frames.append((p, df, context))
    found = sorted({p for pat in ("judge_agreement.parquet", "*/judge_agreement.parquet", "judge_agreement.csv",
                                  "*/judge_agreement.csv") for p in t.root.glob(pat)})
    seen: set[Path] = set()
    for p in found:  # parquet before its csv twin
        if p.with_suffix("") in seen:
            continue
        seen.add(p.with_suffix(""))
        frames.append((p, pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p), "set"))
    if not frames:
        sec.missing += ["p1/agreement.parquet", "p2/p2_agreement.parquet"]
        return sec.result()
    parts = []
    for p, df, context in frames:
        if "kappa" not in df.columns and "cohen_kappa" in df.columns:
            df = df.rename(columns={"cohen_kappa": "kappa"})
        _require(df, ["judge_a", "judge_b", "n", "agreement", "kappa"], t.rel(p))
        stage = str(p.parent.relative_to(t.root)) if p.parent != t.root else "."
        ctx = df[context].astype(str) if context in df.columns else pd.Series([""] * len(df), index=df.index)
        if "split" in df.columns:
            ctx = ctx + " (" + df["split"].astype(str) + ")"
        parts.append(df.assign(stage=stage, context=ctx.to_numpy()))
    ja = pd.concat(parts, ignore_index=True)
    fig = _agreement_figure(ja)
    for stage, g in ja.groupby("stage", sort=False):
        sec.text(f"{stage}: agreement {fmt(float(g['agreement'].min()))} to {fmt(float(g['agreement'].max()))} over "
                 f"{len(g)} comparisons (n per comparison {fmt(int(g['n'].min()))} to {fmt(int(g['n'].max()))}).")
    if ja["kappa"].notna().any():
        worst = ja.loc[ja["kappa"].idxmin()]
        sec.text(f"Lowest agreement beyond chance: {worst['judge_a']} vs {worst['judge_b']} ({worst['context']}, "
                 f"{worst['stage']}): kappa {fmt(worst['kappa'])}, agreement {fmt(worst['agreement'])}, "
                 f"n={fmt(worst['n'])}.")
    if ja["kappa"].isna().any():
        sec.text(f"Kappa is undefined (–) in {int(ja['kappa'].isna().sum())} comparisons where both judges gave one "
                 f"verdict only.")
    keep = ["stage", "context", *[c for c in ("judge_a", "judge_b", "n", "agreement", "kappa", "both", "only_a",
                                              "only_b", "neither") if c in ja.columns]]
    sec.block(figure=fig, table=ja[keep], table_title="Judge agreement")
    return sec.result()


def _steer_sweep(sec: _Section, sw: Any) -> None:
    """analyses/steer_sweep.py's table (one row per method, layer, toward, away; Wilson intervals): refusal on
    harmful against over-refusal on benign validation prompts, one point per setting, the chosen one marked."""
    import plotly.graph_objects as go

    from catlens import plotting

    fig = go.Figure()
    for (method, layer), g in sw.groupby(["method", "layer"], sort=False):
        ex = ({"type": "data", "symmetric": False, "array": g["over_refusal_ci_high"] - g["over_refusal"],
               "arrayminus": g["over_refusal"] - g["over_refusal_ci_low"]} if "over_refusal_ci_low" in g else None)
        ey = ({"type": "data", "symmetric": False, "array": g["refusal_ci_high"] - g["refusal"],
               "arrayminus": g["refusal"] - g["refusal_ci_low"]} if "refusal_ci_low" in g else None)
        fig.add_trace(go.Scatter(x=g["over_refusal"], y=g["refusal"], mode="markers", name=f"{method}, layer {layer}",
                                 error_x=ex, error_y=ey,
                                 text=[f"toward {fmt(a)}, away {fmt(b)}" for a, b in zip(g["toward"], g["away"])]))
    chosen = sw[sw["chosen"].astype(bool)] if "chosen" in sw.columns else sw.iloc[:0]
    if len(chosen):
        fig.add_trace(go.Scatter(x=chosen["over_refusal"], y=chosen["refusal"], mode="markers", name="chosen",
                                 marker={"symbol": "star", "size": 16, "color": "black"}))
        c = chosen.iloc[0]
        sec.text(f"Chosen on {c.get('split', 'val')}: {c['method']}, layer {c['layer']}, toward {fmt(c['toward'])}, "
                 f"away {fmt(c['away'])}: refusal {_interval(c['refusal'], c.get('refusal_ci_low'), c.get('refusal_ci_high'))}"
                 f", over-refusal {_interval(c['over_refusal'], c.get('over_refusal_ci_low'), c.get('over_refusal_ci_high'))}"
                 f" (judge {c.get('judge', '?')}).")
    fig.update_layout(template=plotting.template(), width=640, height=480,
                      title="Steering sweep: refusal (harmful) vs over-refusal (benign), validation prompts",
                      xaxis={"title": "over-refusal (benign)"}, yaxis={"title": "refusal (harmful)"})
    shown = sw[sw["pareto"].astype(bool) | sw.get("chosen", False).astype(bool)] if "pareto" in sw.columns else sw
    shown = _with_interval(shown, "refusal", "refusal_ci_low", "refusal_ci_high", "refusal_interval")
    shown = _with_interval(shown, "over_refusal", "over_refusal_ci_low", "over_refusal_ci_high",
                           "over_refusal_interval")
    keep = [c for c in ("method", "layer", "toward", "away", "refusal_interval", "over_refusal_interval", "ppl_ratio",
                        "admissible", "chosen", "judge") if c in shown.columns]
    notes = {"refusal_interval": "safety: refusal on harmful validation prompts, as the judge decides",
             "over_refusal_interval": STANDS_FOR["benign_refusal"]}
    if "ppl_stands_for" in sw.columns:
        notes["ppl_ratio"] = str(sw["ppl_stands_for"].iloc[0]) + " (ratio to the unsteered answers)"
    sec.block(figure=fig, table=shown[keep], table_title="Pareto-optimal and chosen settings", stands_for=notes)


def section_bound(t: Tables) -> SectionResult:
    """What bounds P1's result (``p1/bound``, ``p1/test_frontier``, ``p1/gate_roc``): the chosen zones beside an
    oracle gate and the best side per row, the test frontier of every zone pair and the gate's ROC."""
    sec = _Section("bound", "P1: what bounds the result (gate or steering)", P1_COMMAND)
    tabs = _need(t, sec, "p1", ["bound", "test_frontier", "gate_roc"])
    if len(tabs) < 3:
        return sec.result()
    from catlens.figures.p1_bound import bound_figure

    bound = tabs["bound"]
    _require(bound, ["gate", "refusal", "over_refusal", "refusal_ci_low", "refusal_ci_high", "over_refusal_ci_low",
                     "over_refusal_ci_high"], "bound")
    by = bound.set_index("gate")
    if {"chosen zones (offline)", "oracle gate (label)"} <= set(by.index):
        ch, orc = by.loc["chosen zones (offline)"], by.loc["oracle gate (label)"]
        sec.text(f"Chosen zones: over-refusal {_interval(ch.over_refusal, ch.over_refusal_ci_low, ch.over_refusal_ci_high)}"
                 f", refusal {_interval(ch.refusal, ch.refusal_ci_low, ch.refusal_ci_high)}; a gate that knew each "
                 f"prompt's label, with the same steering: over-refusal "
                 f"{_interval(orc.over_refusal, orc.over_refusal_ci_low, orc.over_refusal_ci_high)}, refusal "
                 f"{_interval(orc.refusal, orc.refusal_ci_low, orc.refusal_ci_high)} (test answers).")
    shown = _with_interval(bound, "over_refusal", "over_refusal_ci_low", "over_refusal_ci_high", "over_refusal_interval")
    shown = _with_interval(shown, "refusal", "refusal_ci_low", "refusal_ci_high", "refusal_interval")
    keep = [c for c in ("gate", "over_refusal_interval", "over_refusal_n", "refusal_interval", "refusal_n", "ppl_ratio",
                        "agreement_with_offline") if c in shown.columns]
    sec.block(figure=bound_figure(bound, tabs["test_frontier"], tabs["gate_roc"]), table=shown[keep],
              table_title="Bounds (test answers; Wilson 95 % intervals)",
              caption="The gap from the chosen zones to the oracle gate is the gate's; what is left at the oracle is "
                      "the steering's. The frontier is every zone pair on the test answers (reported, nothing "
                      "chosen on it).")
    return sec.result()


SECTIONS: tuple[Callable[[Tables], SectionResult], ...] = (
    section_run, section_finetune, section_separability, section_cosine, section_anisotropy, section_whitening,
    section_model_diff, section_p1, section_probe_roc, section_bound, section_sweep, section_p2, section_specificity,
    section_judges,
)
_TITLES = {"section_run": ("run", "What was run"), "section_finetune": ("finetune", "Fine-tune results"),
           "section_separability": ("separability", "Separability by layer"),
           "section_cosine": ("cosine", "Cosines between category directions"),
           "section_anisotropy": ("anisotropy", "Anisotropy by layer"),
           "section_whitening": ("whitening", "Whitening and P1's orthonormal basis"),
           "section_model_diff": ("model_diff", "Model diffing"),
           "section_p1": ("p1", "P1: refusal vs over-refusal (Figure 1) and the safety table"),
           "section_probe_roc": ("probe_roc", "Probe gate vs refusal token: ROC"),
           "section_bound": ("bound", "P1: what bounds the result (gate or steering)"),
           "section_sweep": ("sweep", "Sweeps: strength, layer and the validation cloud"),
           "section_p2": ("p2", "P2 per category"), "section_specificity": ("specificity", "Specificity"),
           "section_judges": ("judges", "Judge agreement")}


# ------------------------------------------------------------------------------------------------ the page
@dataclasses.dataclass
class Report:
    path: Path
    sections: list[SectionResult]
    n_figures: int

    @property
    def missing(self) -> dict[str, list[str]]:
        return {s.id: s.missing for s in self.sections if s.missing}

    def __repr__(self) -> str:
        states = ", ".join(f"{s.id}={s.status}" for s in self.sections)
        return f"Report({str(self.path)!r}, figures={self.n_figures}, {states})"


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#2d3e50;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;font-size:13px;opacity:.85}
nav{padding:8px 28px;background:#eef1f4;font-size:13px;line-height:1.9}
nav a{margin-right:14px;color:#2d3e50;text-decoration:none;white-space:nowrap}
.badge{display:inline-block;font-size:11px;padding:1px 6px;border-radius:8px;margin-left:4px;color:#fff}
.badge.ok{background:#55A868}.badge.partial{background:#CCB974}.badge.not-run{background:#8C8C8C}
.badge.error{background:#C44E52}
main{padding:0 28px 40px}section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:18px 0;
padding:6px 18px 14px}section h2{font-size:18px;margin:10px 0}
section.not-run{background:#f4f4f4;color:#666}
.block{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start;margin:10px 0;
border-top:1px solid #eee;padding-top:10px}.fig{flex:0 0 auto;max-width:100%;overflow-x:auto}
.tbl{flex:0 1 auto;max-width:100%}
.scroll{max-height:520px;overflow:auto}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;
font-variant-numeric:tabular-nums}
h4{margin:4px 0 6px;font-size:13px;max-width:560px}.caption{font-size:12px;color:#555;max-width:560px}
.stands code{color:#333}
.missing{font-size:13px}.missing code.cmd{background:#eee;padding:2px 4px}.error{color:#C44E52}
.note{font-size:12px;color:#777}.todo{font-size:13px;color:#555}
"""


def _render_section(s: SectionResult, figure_html: list[str]) -> str:
    body = s.body
    for k, fh in enumerate(figure_html):
        body = body.replace(f"{{FIGURE:{s.id}:{k}}}", fh)
    cls = s.status.replace(" ", "-")
    return (f'<section id="{html.escape(s.id)}" class="section {cls}" data-status="{html.escape(s.status)}" '
            f'data-figures="{len(s.figures)}"><h2>{html.escape(s.title)} <span class="badge {cls}">'
            f'{html.escape(s.status)}</span></h2>{body}</section>')


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 sections: Sequence[Callable[[Tables], SectionResult]] = SECTIONS) -> Report:
    """Build ``report.html`` (or ``out``) for the run folder ``run_dir`` from its saved tables.

    Never loads a model. A section whose tables are absent says so (with the command that produces them); a
    section whose tables cannot be drawn shows the error and the rest of the page is still written.
    """
    from catlens.runs import write_text_atomic

    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"run folder {str(root)!r} does not exist; give a folder written by "
                                f"analyses/main.py (e.g. runs/main).")
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is a file, not a run folder; give the folder that holds "
                                f"manifest.json and the stage folders (e.g. runs/main).")
    t = Tables(root)
    results: list[SectionResult] = []
    for fn in sections:
        try:
            results.append(fn(t))
        except Exception as e:  # noqa: BLE001 - one broken table must not lose the page
            sid, title = _TITLES.get(fn.__name__, (fn.__name__, fn.__name__))
            log.warning("report section %s failed: %s: %s", sid, type(e).__name__, e)
            results.append(SectionResult(sid, title, "error",
                                         f"<p class='error'>could not be drawn: {html.escape(type(e).__name__)}: "
                                         f"{html.escape(str(e))}</p>"))
    for s in results:  # the commands name this run folder
        s.body = s.body.replace(html.escape("<run folder>"), html.escape(str(root)))
    n_fig = sum(len(s.figures) for s in results)
    page_sections = []
    k_global = 0
    for s in results:
        fhtml = []
        for fig in s.figures:
            fhtml.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{s.id}-{k_global}",
                                     config={"displaylogo": False, "responsive": False}))
            k_global += 1
        page_sections.append(_render_section(s, fhtml))
    plotly_js = ""
    if n_fig:
        from plotly.offline import get_plotlyjs

        plotly_js = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    manifest = t.json(".", "manifest") or {}
    counts = {st: sum(1 for s in results if s.status == st) for st in ("ok", "partial", "not run", "error")}
    subtitle = (f"{root.resolve()} · built from the saved tables · git commit "
                f"{(manifest.get('git_commit') or 'unknown')[:12]} · sections: "
                + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    nav = "".join(f'<a href="#{html.escape(s.id)}">{html.escape(s.title)}<span class="badge '
                  f'{s.status.replace(" ", "-")}">{html.escape(s.status)}</span></a>' for s in results)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>catlens report: "
            f"{html.escape(root.resolve().name)}</title><style>{_CSS}</style>{plotly_js}</head><body>"
            f"<header><h1>catlens report: {html.escape(root.resolve().name)}</h1><p>{html.escape(subtitle)}</p>"
            f"</header><nav>{nav}</nav><main>{''.join(page_sections)}</main></body></html>\n")
    target = Path(out) if out is not None else root / REPORT_NAME
    write_text_atomic(target, page)
    return Report(target, results, n_fig)


def screenshot(html_path: str | os.PathLike[str], png: str | os.PathLike[str], *, width: int = 1500,
               executable: str | None = None, timeout_ms: int = 60_000) -> list[str]:
    """Full-page PNG of a report with headless Chromium (Playwright driving the system browser, e.g. Debian's
    ``/usr/bin/chromium``; nothing is downloaded). Returns the browser console errors (empty when clean)."""
    from catlens.browser import headless_chromium, page_errors

    with headless_chromium(executable) as browser:
        page = browser.new_page(viewport={"width": width, "height": 900})
        errors = page_errors(page)
        page.goto(Path(html_path).resolve().as_uri(), timeout=timeout_ms)
        page.wait_for_load_state("load")
        page.screenshot(path=str(png), full_page=True, timeout=timeout_ms)
    return errors
