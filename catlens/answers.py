"""Whole answers, generated and judged, and what they cost: the steps P1's protocol takes on generated text.

* :func:`generate_and_judge`: generate a prompt set under a policy (a resumable generation folder) and judge every
  answer with every applicable judge, one row per prompt;
* :class:`AnswerScorer`: the mean negative log-likelihood of answers under a reference (unsteered) model, each
  ``(prompt, answer)`` scored once per scorer, and the benign perplexity of a set of answers;
* :func:`three_sides`: one setting's three sides on a prompt set (unsteered, every row steered toward refusal, every
  row steered away), aligned row by row, with their verdicts and :class:`catlens.gate.AnswerCost`. Since a gated
  policy gives each row exactly its side's answer (tested in ``tests/test_gate.py``), any zone choice's verdicts
  and perplexity ratio follow from these with no further forward pass (:func:`catlens.gate.zone_sweep`);
* :func:`bound_rows`: rates of several side assignments (unsteered, every row one way, a gate's zones, an oracle that
  knows each label, the best side per row) with Wilson intervals and perplexity ratios: what bounds a result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

JUDGED_COLUMNS = ("token_ids", "prompt", "dataset", "gate_flagged")
"""Columns :func:`generate_and_judge` adds to :func:`catlens.judges.judge_records`'s table."""


def generate_and_judge(model: Any, prompts: Any, policy: Any, out: str | Path | None, *, max_new_tokens: int,
                       batch_size: int = 32, judges: Sequence[str] | None = None,
                       allow_transfer: bool = False, engine: Any = None) -> Any:
    """Generate ``prompts`` under ``policy`` (``None`` = unsteered; ``out`` a resumable generation folder) and judge
    every answer with ``judges`` (default: the refusal-token judge when the model has refusal tokens, then the
    substring and full-answer judges). A DataFrame, one row per prompt, with ``refused_<judge>`` columns and
    :data:`JUDGED_COLUMNS`. ``engine``: a running engine on ``model``'s checkpoint
    (:class:`catlens.engines.vllm.VLLMEngine`, e.g. from :class:`catlens.engines.EnginePool`) that generates instead
    of :func:`catlens.generation.generate`: the same records and folder; judged the same way."""
    import pandas as pd

    from catlens.generation import generate
    from catlens.judges import judge_records
    from catlens.refusal import refusal_token_ids

    if engine is None:
        recs = generate(model, prompts, policy, max_new_tokens=max_new_tokens, batch_size=batch_size, out=out,
                        allow_transfer=allow_transfer)
    else:
        recs = engine.generate(prompts, policy, max_new_tokens=max_new_tokens, out=out, allow_transfer=allow_transfer)
    if judges is None:
        judges = (("refusal_token",) if refusal_token_ids(model)[0] is not None else ()) + ("substring",
                                                                                           "full_answer")
    judged = judge_records(recs, tuple(judges))
    judged["token_ids"] = [r["token_ids"] for r in recs]
    judged["prompt"] = [r["prompt"] for r in recs]
    judged["dataset"] = [r["source"] for r in recs]
    judged["gate_flagged"] = pd.array([None if not r.get("gate") else bool(r["gate"]["flagged"]) for r in recs],
                                      dtype="boolean")
    return judged


class AnswerScorer:
    """Mean NLL of answers under ``model`` (normally the unsteered model), by teacher forcing
    (:func:`catlens.metrics.perplexity_under`); each ``(prompt, answer ids)`` is scored once per scorer, so the
    unsteered answers compared with every candidate cost one pass."""

    def __init__(self, model: Any, batch_size: int = 16) -> None:
        self.model = model
        self.batch_size = batch_size
        self._seen: dict[tuple[str, tuple[int, ...]], tuple[float, int]] = {}

    def score(self, prompts: Sequence[str], answers: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the answer's mean NLL and its token count (``0.0, 0`` for an empty answer)."""
        keys = [(p, tuple(int(t) for t in a)) for p, a in zip(prompts, answers)]
        todo = sorted({k for k in keys if k[1] and k not in self._seen})
        if todo:
            from catlens.metrics import perplexity_under

            t = perplexity_under(self.model, [k[0] for k in todo], [list(k[1]) for k in todo],
                                 batch_size=self.batch_size)
            self._seen.update({k: (float(nll), int(n)) for k, nll, n in zip(todo, t.nll, t.n_tokens)})
        nll = np.array([self._seen[k][0] if k[1] else 0.0 for k in keys], dtype=np.float64)
        n = np.array([self._seen[k][1] if k[1] else 0 for k in keys], dtype=np.int64)
        return np.nan_to_num(nll), n

    def benign_ppl(self, judged: Any, ids: set[str] | None = None) -> tuple[float, int]:
        """Perplexity of ``judged``'s benign, non-empty answers (restricted to ``ids``): the token-weighted mean NLL,
        exponentiated, and the number of answers (NaN, 0 when none)."""
        part = judged[(judged.label == "benign") & judged.token_ids.map(bool)]
        if ids is not None:
            part = part[part.id.isin(ids)]
        if not len(part):
            return math.nan, 0
        nll, n = self.score(list(part.prompt), list(part.token_ids))
        return float(math.exp(float(np.sum(nll * n)) / float(np.sum(n)))), int(len(part))


def three_sides(model: Any, prompts: Any, base: Any, toward: Any, away: Any, *, judge: str, scorer: AnswerScorer,
                out: str | Path, max_new_tokens: int, batch_size: int = 32, engine: Any = None) -> dict[str, Any]:
    """One setting's three sides on ``prompts``: ``base`` (the unsteered answers, judged, e.g. by
    :func:`generate_and_judge`), and the answers with every row under ``toward`` and under ``away`` (ungated
    policies; generated into ``<out>-toward`` and ``<out>-away``, resumable). Returns ``frames`` (the judged tables
    per side, aligned to ``prompts``'s order), ``verdict`` (0/1 arrays of ``refused_<judge>``), ``ids`` and ``cost``
    (:class:`catlens.gate.AnswerCost`: a benign row counts for the perplexity guard under a side where it was
    answered)."""
    from catlens.gate import SIDES, AnswerCost

    col = f"refused_{judge}"
    ids = [p.id for p in prompts]
    frames = {"none": base.set_index("id").loc[ids].reset_index()}
    for side, policy in (("toward", toward), ("away", away)):
        j = generate_and_judge(model, prompts, policy, Path(f"{out}-{side}"), max_new_tokens=max_new_tokens,
                               batch_size=batch_size, engine=engine)
        frames[side] = j.set_index("id").loc[ids].reset_index()
    if col not in frames["none"]:
        raise ValueError(f"the base table has no column {col!r}; judge it with {judge!r} (it has "
                         f"{[c for c in frames['none'].columns if c.startswith('refused_')]}).")
    verdict = {s: f[col].astype(bool).to_numpy().astype(int) for s, f in frames.items()}
    benign = (frames["none"].label == "benign").to_numpy()
    nll, tok, counts = [], [], []
    for s in SIDES:
        a, n = scorer.score(list(frames[s].prompt), list(frames[s].token_ids))
        nll.append(a)
        tok.append(n)
        counts.append(benign & (verdict[s] == 0) & (n > 0))
    return {"frames": frames, "verdict": verdict, "ids": ids,
            "cost": AnswerCost(np.stack(nll), np.stack(tok), np.stack(counts))}


def bound_rows(verdict: Mapping[str, np.ndarray], sides: Mapping[str, np.ndarray], harmful: np.ndarray,
               benign: np.ndarray, cost: Any = None) -> list[dict[str, Any]]:
    """For each named side assignment in ``sides`` (one side index per row: 0 none, 1 toward, 2 away): pooled harmful
    refusal over the ``harmful`` rows and over-refusal over the ``benign`` rows, with Wilson 95 % intervals, and the
    benign perplexity ratio under ``cost``. ``verdict`` maps ``none``/``toward``/``away`` to 0/1 arrays."""
    from catlens.gate import SIDES, rates_with_interval

    V = np.stack([np.asarray(verdict[s]) for s in SIDES])
    rows = []
    for name, side in sides.items():
        side = np.asarray(side, dtype=np.int64)
        v = V[side, np.arange(len(side))]
        h, b = rates_with_interval(v[harmful]), rates_with_interval(v[benign])
        rows.append({"gate": name, "refusal": h["rate"], "refusal_ci_low": h["ci_low"],
                     "refusal_ci_high": h["ci_high"], "refusal_n": h["n"], "over_refusal": b["rate"],
                     "over_refusal_ci_low": b["ci_low"], "over_refusal_ci_high": b["ci_high"],
                     "over_refusal_n": b["n"], "ppl_ratio": math.nan if cost is None else cost.ratio(side)})
    return rows


def oracle_sides(verdict: Mapping[str, np.ndarray], harmful: np.ndarray) -> dict[str, np.ndarray]:
    """Two reference assignments: the ``oracle gate`` (harmful rows toward, the rest away: a perfect gate with this
    steering) and the ``best side per row`` (the side that refuses a harmful row or answers a benign one: what any
    gate could reach with these answers)."""
    from catlens.gate import SIDES

    V = np.stack([np.asarray(verdict[s]) for s in SIDES])
    harmful = np.asarray(harmful, dtype=bool)
    return {"oracle gate (label)": np.where(harmful, 1, 2),
            "best side per row": np.where(harmful, V.argmax(0), V.argmin(0))}
