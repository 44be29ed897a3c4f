"""analyses/geometry.py (its steps: catlens/recipes/geometry_tables.py) end to end on planted synthetic activations
(no model), then every figure script on the run folder it wrote, so the figures are exercised on tables from the
analysis's own writer."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _scripts import load_script

from catlens.directions import Directions
from catlens.recipes import geometry_tables

REPO = Path(__file__).resolve().parents[2]
CATS = ("cyber", "fraud", "privacy")
LAYERS = (0, 1, 2)
D_MODEL = 24


def _load(path: Path):
    return load_script(path.stem, path.parent.name, f"_catlens_{path.stem}")


@pytest.fixture(scope="module")
def analysis():
    return _load(REPO / "analyses" / "geometry.py")


def _synthetic(seed: int, rotate: bool = False):
    """3 harmful categories x 14 prompts, 8 benign look-alikes per category, 12 ordinary benign prompts.

    Harmful prompts of category c sit at 2*h + 3*u_c, look-alikes at 3*u_c, ordinary benign at 0 (plus noise), with
    h a shared 'harmfulness' axis and u_c category axes. A massive dimension (dim 0) is planted at every layer.
    """
    basis = torch.linalg.qr(torch.randn(D_MODEL, 4, generator=torch.Generator().manual_seed(0)))[0].T
    gen = torch.Generator().manual_seed(seed)
    h, u = basis[0], dict(zip(CATS, basis[1:]))
    if rotate:  # a "second model": category axes partly rotated
        u = {c: (v + 0.5 * torch.randn(D_MODEL, generator=gen) / D_MODEL ** 0.5) for c, v in u.items()}
    rows, vecs = [], []
    splits = ["train", "train", "val", "test"]
    for c in CATS:
        for i in range(14):
            rows.append({"id": f"h/{c}/{i}", "text": f"harmful {c} {i}", "label": "harmful", "category": c,
                         "source": "synthetic", "split": splits[i % 4]})
            vecs.append(2 * h + 3 * u[c])
        for i in range(8):
            rows.append({"id": f"l/{c}/{i}", "text": f"lookalike {c} {i}", "label": "benign", "category": c,
                         "source": "synthetic", "split": splits[i % 4]})
            vecs.append(3 * u[c])
    for i in range(12):
        rows.append({"id": f"o/{i}", "text": f"ordinary {i}", "label": "benign", "category": None,
                     "source": "synthetic", "split": splits[i % 4]})
        vecs.append(torch.zeros(D_MODEL))
    base = torch.stack(vecs)
    acts = base[:, None, :] * torch.tensor([0.5, 1.0, 1.5])[None, :, None]
    acts = acts + 0.2 * torch.randn(len(rows), len(LAYERS), D_MODEL, generator=gen)
    acts[:, :, 0] += 30.0
    return acts, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def run_dir(analysis, tmp_path_factory):
    out = tmp_path_factory.mktemp("geometry") / "run"

    def fake_load(args, *, model_spec, acts_path, models=None):
        other = model_spec == "other-model"
        acts, index = _synthetic(seed=1 if other else 0, rotate=other)
        return geometry_tables.Activations(acts=acts, index=index, layers=LAYERS,
                                           model={"name": model_spec, "n_layers": 3, "d_model": D_MODEL},
                                           data={"prompts": "synthetic", "positions": ["last"], "fmt": "chat"})

    args = analysis.parse_args(["--out", str(out), "--model", "main-model", "--other-model", "other-model",
                                "--tsne-layers", "1,2", "--cv-folds", "3", "--pca-dims", "8"])
    with pytest.MonkeyPatch.context() as mp:  # the recipe's one loader, replaced by planted activations
        mp.setattr(geometry_tables, "load_activations", fake_load)
        analysis.run_args(args)
    return out


def test_analysis_writes_every_table_with_its_keys(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["models"]["model"]["name"] == "main-model"
    assert manifest["models"]["other_model"]["name"] == "other-model"
    expected = {
        "separability": {"task", "layer", "metric", "value"},
        "cosine": {"direction", "layer", "space", "category_a", "category_b", "cosine"},
        "basis_alignment": {"direction", "layer", "category", "cos_basis_whitened", "off_span_share"},
        "probe_cosine": {"direction", "layer", "category", "cosine"},
        "anisotropy": {"subset", "layer", "measure", "value"},
        "spectrum": {"subset", "layer", "index", "eigenvalue"},
        "massive_dims": {"layer", "dim", "mean_share", "massive"},
        "whitening": {"layer", "rank", "rank_deficient"},
        "projections": {"method", "layer", "x", "y", "group", "id"},
        "direction_norms": {"direction", "category", "layer", "norm"},
        "model_diff": {"direction", "category", "layer", "cosine"},
    }
    for name, columns in expected.items():
        table = pd.read_parquet(run_dir / f"{name}.parquet")
        assert columns <= set(table.columns), name
        assert len(table) > 0, name
        assert f"{name}.parquet" in manifest["outputs"]
    assert set(pd.read_parquet(run_dir / "separability.parquet")["task"]) == {
        "harmful_vs_benign", "harmful_category", "harmful_vs_lookalike"}
    assert manifest["summary"]["best_layer_auroc_harmful_category"]["auroc"] > 0.9


def test_analysis_recovers_the_planted_structure(run_dir):
    sep = pd.read_parquet(run_dir / "separability.parquet")
    auroc = sep[(sep["metric"] == "probe_auroc") & (sep["layer"] == 2)].set_index("task")["value"]
    assert auroc["harmful_category"] > 0.95 and auroc["harmful_vs_benign"] > 0.95
    massive = pd.read_parquet(run_dir / "massive_dims.parquet")
    assert massive.loc[massive["massive"], "dim"].unique().tolist() == [0]
    # p2_matched (safe = look-alikes of the same category) isolates the shared harmfulness axis: the category
    # directions are nearly parallel; one_vs_rest isolates the category axes: nearly orthogonal / negative.
    cos = pd.read_parquet(run_dir / "cosine.parquet")
    off = cos[(cos["category_a"] != cos["category_b"]) & (cos["space"] == "raw") & (cos["layer"] == 2)]
    mean = off.groupby("direction")["cosine"].mean()
    assert mean["p2_matched"] > 0.9 and mean["one_vs_rest"] < 0.0
    basis = cos[(cos["space"] == "basis_whitened") & (cos["direction"] == "p1")]
    eye = np.where(basis["category_a"] == basis["category_b"], 1.0, 0.0)
    assert np.allclose(basis["cosine"], eye, atol=1e-5)
    diff = pd.read_parquet(run_dir / "model_diff.parquet")
    # the "other model" shares the harmfulness axis and has partly rotated category axes
    by_dir = diff.groupby("direction")["cosine"].mean()
    assert diff["cosine"].between(-1, 1).all() and by_dir["one_vs_benign"] > 0.8
    assert by_dir["one_vs_rest"] < by_dir["one_vs_benign"]
    d = Directions.load(run_dir / "directions" / "p1")
    assert d.categories == CATS and d.layers == LAYERS and d.provenance["direction_splits"] == ["train"]


FIGURES = ("fig_separability", "fig_cosine", "fig_anisotropy", "fig_projection", "fig_model_diff")


@pytest.mark.parametrize("name", FIGURES)
def test_figure_scripts_draw_from_the_run_folder(run_dir, tmp_path, name):
    module = _load(REPO / "figures" / f"{name}.py")
    for section in ("Usage:", "Reads:", "Writes:"):
        assert section in module.__doc__
    written = module.main(run_dir, out_dir=tmp_path, png=False)
    assert written["html"].exists() and written["csv"].exists() and "png" not in written
    assert len(pd.read_csv(written["csv"])) > 0
    assert "plotly" in written["html"].read_text()[:5000].lower()


def test_figure_scripts_reject_what_is_not_there(run_dir, tmp_path):
    with pytest.raises(ValueError, match="direction 'nope'"):
        _load(REPO / "figures" / "fig_cosine.py").main(run_dir, out_dir=tmp_path, png=False, direction="nope")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="--other-model"):
        _load(REPO / "figures" / "fig_model_diff.py").main(empty, out_dir=tmp_path, png=False)


def test_args_validation(analysis, tmp_path):
    with pytest.raises(ValueError, match="unknown direction set"):
        analysis.parse_args(["--out", str(tmp_path), "--directions", "p1,p3"])
