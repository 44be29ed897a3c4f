"""The shared harm taxonomy: 13 category names and one table mapping each benchmark's labels onto them.

The mapping ships as data (``catlens/data/taxonomy.csv``, columns
``source, source_category, source_subcategory, category``) following ``shared/data/TAXONOMY.md``. One row
maps a source label to a shared category name; an empty ``category`` means "deliberately unmapped" (the
prompt gets category ``None``). A row with a non-empty ``source_subcategory`` overrides the category-level
row of the same source and category, which is how mixed source categories (CatQA "Physical Harm",
Do-Not-Answer "Assisting illegal activities", XSTest types by trigger word) are split.

``source`` names a *taxonomy source*, not a dataset: several loaders share one (``jbb`` for the harmful and
benign JailbreakBench files, ``coconot`` for the three CoCoNot files, ``harmbench`` also for the
refusal_direction splits that keep HarmBench labels).

Users can replace the table: pass ``table=`` / ``path=``, or set the environment variable
``CATLENS_TAXONOMY`` to a CSV with the same columns. Category names in a user table must be shared names
from :data:`CATEGORIES`. Nothing is read at import time.
"""

import functools
import io
import logging
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pandas as pd

from catlens.errors import reading, unknown_name_message  # unknown_name_message: also imported from here

log = logging.getLogger(__name__)

ENV_VAR = "CATLENS_TAXONOMY"
COLUMNS = ("source", "source_category", "source_subcategory", "category")

CATEGORIES: dict[str, str] = {
    "hate_harassment": "Hate speech, harassment, discrimination, stereotypes, threats and bullying.",
    "violence_terrorism": "Physical violence, assault, murder, terrorism, extremism and graphic violence.",
    "self_harm": "Suicide, self-injury and eating disorders.",
    "weapons_drugs": "Weapons, explosives, chemical/biological/nuclear agents, drugs, regulated goods.",
    "cybercrime": "Hacking, malware, intrusion and other computer crime.",
    "fraud_financial_crime": "Fraud, scams, phishing, theft, counterfeiting, money laundering and other "
    "financial or property crime.",
    "privacy": "Doxxing, surveillance, stalking, leaking or inferring private or confidential information.",
    "sexual_content": "Sexually explicit or adult content.",
    "child_abuse": "Abuse, exploitation, neglect or endangerment of children.",
    "misinformation": "Misinformation, disinformation, propaganda and deceptive persuasion.",
    "politics_controversial": "Political campaigning, lobbying, partisan or controversial political content.",
    "expert_advice": "Tailored financial, legal or medical advice that needs a regulated professional.",
    "other_unethical": "Other unethical or unsafe behaviour, including animal abuse and risky practices.",
}
"""Shared category name -> one-line description (S1..S13 in TAXONOMY.md order)."""

CATEGORY_IDS: dict[str, str] = {name: f"S{i}" for i, name in enumerate(CATEGORIES, start=1)}
"""Shared category name -> short id ``S1`` .. ``S13``."""


def validate_taxonomy(table: pd.DataFrame, *, origin: str = "taxonomy table") -> pd.DataFrame:
    """Check a taxonomy table and return a normalised copy (strings, stripped, empty category = '').

    Raises ``ValueError`` for missing columns, empty ``source``/``source_category``, category names that are
    not shared names, and keys ``(source, source_category, source_subcategory)`` listed twice.
    """
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{origin} is missing column(s) {missing}; it has {list(table.columns)}. A taxonomy table needs "
            f"the columns {list(COLUMNS)} (source_subcategory and category may be empty)."
        )
    out = table.loc[:, list(COLUMNS)].copy()
    for col in COLUMNS:
        out[col] = out[col].map(lambda v: "" if v is None or pd.isna(v) else str(v).strip())
    out = out.astype(str)
    for col in ("source", "source_category"):
        empty = out.index[out[col] == ""].tolist()
        if empty:
            raise ValueError(
                f"{origin}: column {col!r} is empty in row(s) {empty[:10]} (0-based data rows). Every row "
                f"needs a source and a source_category."
            )
    for i, name in enumerate(out["category"]):
        if name and name not in CATEGORIES:
            raise ValueError(
                f"{origin}, row {i} ({out.at[out.index[i], 'source']!r}, "
                f"{out.at[out.index[i], 'source_category']!r}): "
                + unknown_name_message(
                    "shared category", name, CATEGORIES,
                    "Use one of the shared names, or leave category empty to leave the label unmapped.",
                )
            )
    dup = out.duplicated(subset=["source", "source_category", "source_subcategory"], keep=False)
    if dup.any():
        rows = out[dup].head(6).to_dict("records")
        raise ValueError(
            f"{origin}: {int(dup.sum())} rows share a (source, source_category, source_subcategory) key, "
            f"e.g. {rows}. Keep one row per key."
        )
    return out.reset_index(drop=True)


@functools.lru_cache(maxsize=1)
def _packaged_table() -> pd.DataFrame:
    text = resources.files("catlens").joinpath("data/taxonomy.csv").read_text(encoding="utf-8")
    raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    return validate_taxonomy(raw, origin="packaged catlens/data/taxonomy.csv")


def load_taxonomy(path: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """The taxonomy table: ``path`` if given, else ``$CATLENS_TAXONOMY`` if set, else the packaged one."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
        origin = f"${ENV_VAR}={path}"
    else:
        origin = str(path)
    if path is None:
        return _packaged_table().copy()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Taxonomy table {origin!r} does not exist. Pass the path of a CSV with columns {list(COLUMNS)}, "
            f"or unset {ENV_VAR} to use the packaged table."
        )
    fix = (f"A taxonomy table is a UTF-8 CSV with the header {','.join(COLUMNS)}; fix the file, or unset "
           f"{ENV_VAR} to use the packaged table.")
    with reading(path, "taxonomy table", fix):
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    log.info("Using user taxonomy table %s (%d rows)", path, len(raw))
    return validate_taxonomy(raw, origin=f"taxonomy table {origin}")


def category_mapper(table: pd.DataFrame | None = None) -> Callable[..., str | None]:
    """Build a fast ``(source, source_category, source_subcategory=None) -> category | None`` function.

    ``table=None`` loads the default table (:func:`load_taxonomy`). A subcategory row wins over the
    category row; labels with no row, or an empty category, map to ``None``.
    """
    table = load_taxonomy() if table is None else validate_taxonomy(table)
    lookup: dict[tuple[str, str, str], str | None] = {
        (s, c, sub): (cat or None)
        for s, c, sub, cat in table.itertuples(index=False, name=None)
    }
    sources = {key[0] for key in lookup}

    def mapper(source: str, source_category: str | None, source_subcategory: str | None = None) -> str | None:
        if source not in sources:
            raise ValueError(
                unknown_name_message(
                    "taxonomy source", source, sources,
                    "Add rows for this source to the taxonomy table (see catlens/data/taxonomy.csv).",
                )
            )
        if source_category is None:
            return None
        c = str(source_category).strip()
        if source_subcategory is not None:
            key = (source, c, str(source_subcategory).strip())
            if key[2] and key in lookup:
                return lookup[key]
        return lookup.get((source, c, ""))

    return mapper


def map_category(
    source: str,
    source_category: str | None,
    source_subcategory: str | None = None,
    table: pd.DataFrame | None = None,
) -> str | None:
    """Shared category for one source label, or ``None`` when the label is unmapped or unknown.

    ``map_category("catqa", "Physical Harm", "Self-harm") == "self_harm"``. For many rows build the mapper
    once with :func:`category_mapper`.
    """
    return category_mapper(table)(source, source_category, source_subcategory)

