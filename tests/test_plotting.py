"""Plot builders draw what the table says; save_figure writes HTML + CSV always and PNG when it can."""

import logging

import numpy as np
import pandas as pd
import pytest

from catlens import plotting


@pytest.fixture
def cosines() -> pd.DataFrame:
    cats = ["b", "a", "c"]  # deliberately not alphabetical: the order must be kept
    m = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    rows = [{"space": s, "category_a": x, "category_b": y, "cosine": m[i, j] * (1 if s == "raw" else 0.5)}
            for s in ("raw", "whitened") for i, x in enumerate(cats) for j, y in enumerate(cats)]
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _reset_warning_flag():
    plotting._warned_no_browser = False
    yield
    plotting._warned_no_browser = False


def test_heatmap_keeps_order_and_values(cosines):
    fig = plotting.heatmap(cosines, x="category_b", y="category_a", z="cosine", facet="space", order=["b", "a", "c"],
                           zmin=-1.0, zmax=1.0)
    assert len(fig.data) == 2
    raw, white = fig.data
    assert list(raw.y) == ["b", "a", "c"] and list(raw.x) == ["b", "a", "c"]
    assert raw.z[0][1] == pytest.approx(0.5) and raw.z[2][0] == pytest.approx(-0.2)
    assert white.z[0][1] == pytest.approx(0.25)
    assert [a.text for a in fig.layout.annotations][:2] == ["raw", "whitened"]
    assert raw.zmin == -1 and raw.zmax == 1


def test_line_scatter_bars(cosines):
    table = pd.DataFrame({"layer": [0, 1, 2] * 2, "value": [0.1, 0.5, 0.9, 0.3, 0.2, 0.1],
                          "metric": ["auroc"] * 3 + ["silhouette"] * 3, "task": "x"})
    fig = plotting.line(table, x="layer", y="value", color="task", facet_col="metric")
    assert len(fig.data) == 2 and {a.text for a in fig.layout.annotations} == {"auroc", "silhouette"}
    assert list(fig.data[0].y) == [0.1, 0.5, 0.9]
    pts = pd.DataFrame({"x": [0.0, 1.0, 2.0], "y": [1.0, 0.0, 1.0], "group": ["a", "b", "a"], "layer": [3, 3, 4]})
    sc = plotting.scatter(pts, x="x", y="y", color="group", facet_col="layer")
    assert {t.name for t in sc.data} == {"a", "b"}
    assert {a.text for a in sc.layout.annotations} == {"layer 3", "layer 4"}
    bars = plotting.bars(pd.DataFrame({"category": ["a", "b"], "cosine": [0.3, 0.6], "direction": "p1"}),
                         x="category", y="cosine", color="direction", range_y=(0.0, 1.0))
    assert list(bars.data[0].y) == [0.3, 0.6] and list(bars.layout.yaxis.range) == [0, 1]


def test_builders_reject_bad_tables(cosines):
    with pytest.raises(ValueError, match=r"no column\(s\) \['cos'\]"):
        plotting.heatmap(cosines, x="category_b", y="category_a", z="cos")
    with pytest.raises(ValueError, match="empty"):
        plotting.line(cosines.iloc[:0], x="category_a", y="cosine")


def test_save_figure_without_browser_writes_html_csv_and_warns_once(cosines, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(plotting, "static_export_available", lambda: False)
    fig = plotting.heatmap(cosines, x="category_b", y="category_a", z="cosine", facet="space")
    with caplog.at_level(logging.WARNING, logger="catlens.plotting"):
        first = plotting.save_figure(fig, tmp_path / "figs" / "cos.html", data=cosines)
        second = plotting.save_figure(fig, tmp_path / "figs" / "cos2", data=cosines)
    assert set(first) == {"html", "csv"} and set(second) == {"html", "csv"}
    assert first["html"] == tmp_path / "figs" / "cos.html"
    assert (tmp_path / "figs" / "plotly.min.js").exists()
    assert 'src="plotly.min.js"' in first["html"].read_text()
    pd.testing.assert_frame_equal(pd.read_csv(first["csv"]), cosines)
    warnings = [r for r in caplog.records if "apt-get install -y chromium" in r.getMessage()]
    assert len(warnings) == 1


def test_save_figure_survives_a_failing_export(cosines, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(plotting, "static_export_available", lambda: True)
    fig = plotting.bars(pd.DataFrame({"c": ["a"], "v": [1.0]}), x="c", y="v")

    def broken(*args, **kwargs):
        raise RuntimeError("browser could not start")

    monkeypatch.setattr(fig, "write_image", broken)
    with caplog.at_level(logging.WARNING, logger="catlens.plotting"):
        written = plotting.save_figure(fig, tmp_path / "bars")
    assert set(written) == {"html"} and not (tmp_path / "bars.png").exists()
    assert any("browser could not start" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="unknown"):
        plotting.save_figure(fig, tmp_path / "bars", formats=("gif",))


@pytest.mark.browser
def test_save_figure_png_with_a_browser(cosines, tmp_path):
    if not plotting.static_export_available():
        pytest.skip("no Chrome/Chromium for kaleido (apt-get install -y chromium)")
    fig = plotting.heatmap(cosines, x="category_b", y="category_a", z="cosine", facet="space")
    written = plotting.save_figure(fig, tmp_path / "cos", data=cosines)
    png = written["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.browser
def test_one_browser_session_writes_the_same_pngs_and_closes(cosines, tmp_path):
    """static_export_session keeps kaleido's server open for every PNG in the block: the images equal those written
    one browser per figure, and the server is closed afterwards (also when the block raises)."""
    if not plotting.static_export_available():
        pytest.skip("no Chrome/Chromium for kaleido (apt-get install -y chromium)")
    import kaleido

    fig = plotting.heatmap(cosines, x="category_b", y="category_a", z="cosine", facet="space")
    alone = plotting.save_figure(fig, tmp_path / "alone", formats=("png",))["png"].read_bytes()
    with plotting.static_export_session():
        assert kaleido._global_server.is_running()  # noqa: SLF001 - the singleton the session opens
        shared = [plotting.save_figure(fig, tmp_path / f"s{i}", formats=("png",))["png"].read_bytes()
                  for i in range(2)]
    assert not kaleido._global_server.is_running()  # noqa: SLF001
    assert shared[0] == shared[1] == alone
    with pytest.raises(KeyError), plotting.static_export_session():
        raise KeyError("boom")
    assert not kaleido._global_server.is_running()  # noqa: SLF001
