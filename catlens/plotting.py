"""Plotly figures from tidy tables, and one way to save them.

Builders take a tidy ``pandas.DataFrame`` and column names and return a ``plotly.graph_objects.Figure``; they do
no I/O. :func:`save_figure` writes ``<path>.html`` (plotly.js is written once as ``plotly.min.js`` next to it,
so the page works offline), ``<path>.csv`` (the plotted data) and a static ``<path>.png`` through kaleido.

Kaleido >= 1.0 drives a Chrome/Chromium binary (Debian: ``apt-get install -y chromium``; kaleido finds
``/usr/bin/chromium`` itself). Without one, :func:`save_figure` writes the HTML and CSV, logs one warning with that
command, and carries on. catlens never lets kaleido download a browser.

plotly is imported inside the functions, so importing this module is cheap.
"""

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["template", "heatmap", "line", "scatter", "bars", "save_figure", "static_export_available"]

_TEMPLATE_NAME = "catlens"
_COLORWAY = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
             "#CCB974", "#64B5CD"]
_warned_no_browser = False
_INSTALL_HINT = "apt-get install -y chromium"


def template() -> Any:
    """The catlens plotly template (white background, light grid, a colour-blind-friendly palette); registered
    as ``plotly.io.templates["catlens"]`` on first use."""
    import plotly.graph_objects as go
    import plotly.io as pio

    if _TEMPLATE_NAME not in pio.templates:
        base = pio.templates["plotly_white"]
        t = go.layout.Template(base)
        t.layout.colorway = _COLORWAY
        t.layout.font = {"family": "Helvetica, Arial, sans-serif", "size": 13}
        t.layout.title = {"x": 0.02, "xanchor": "left"}
        t.layout.margin = {"l": 70, "r": 30, "t": 70, "b": 60}
        t.layout.legend = {"bgcolor": "rgba(255,255,255,0.7)"}
        pio.templates[_TEMPLATE_NAME] = t
    return pio.templates[_TEMPLATE_NAME]


def _check_columns(df: Any, *columns: str | None) -> None:
    missing = [c for c in columns if c is not None and c not in df.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing}; it has {list(df.columns)}.")
    if len(df) == 0:
        raise ValueError("the table is empty: nothing to plot.")


def _ordered(values: Any, order: Sequence[Any] | None) -> list[Any]:
    seen = list(dict.fromkeys(values))
    if order is None:
        return seen
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def _facet_label(text: str) -> str:
    """``"metric=probe_auroc"`` -> ``"probe_auroc"``; numeric values keep their name: ``"layer=7"`` -> ``"layer 7"``."""
    name, _, value = text.partition("=")
    if not _:
        return text
    try:
        float(value)
    except ValueError:
        return value
    return f"{name} {value}"


def _n_facets(df: Any, column: str | None, wrap: int | None) -> tuple[int, int]:
    """(columns, rows) of a facet grid for ``column`` wrapped at ``wrap``."""
    n = 1 if column is None else int(df[column].nunique())
    cols = min(n, wrap) if wrap else n
    return cols, -(-n // cols)


def _size(fig: Any, cols: int, rows: int, *, panel_w: int = 330, panel_h: int = 290) -> None:
    fig.update_layout(width=panel_w * cols + 280, height=panel_h * rows + 150)
    fig.for_each_annotation(lambda a: a.update(text=_facet_label(a.text)))


def heatmap(
    df: Any,
    *,
    x: str,
    y: str,
    z: str,
    facet: str | None = None,
    order: Sequence[Any] | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    zmid: float | None = None,
    colorscale: str = "RdBu_r",
    text_format: str | None = ".2f",
    title: str | None = None,
    facet_cols: int | None = None,
    height_per_row: int = 420,
) -> Any:
    """Matrix heatmap(s) from a long table: one panel per value of ``facet`` (in order of appearance).

    ``order`` fixes the order of the ``x``/``y`` labels (e.g. the category order); the y axis runs top-down, so
    a symmetric matrix looks like one. Cells are annotated with ``text_format`` (None: no text).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    _check_columns(df, x, y, z, facet)
    panels = _ordered(df[facet], None) if facet else [None]
    cols = facet_cols or min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[str(p) for p in panels] if facet else None,
                        horizontal_spacing=0.12, vertical_spacing=0.18 if rows > 1 else 0.1)
    lo = float(df[z].min()) if zmin is None else zmin
    hi = float(df[z].max()) if zmax is None else zmax
    for k, panel in enumerate(panels):
        part = df if panel is None else df[df[facet] == panel]
        xs, ys = _ordered(part[x], order), _ordered(part[y], order)
        mat = part.pivot_table(index=y, columns=x, values=z, aggfunc="first").reindex(index=ys, columns=xs)
        fig.add_trace(go.Heatmap(
            z=mat.to_numpy(), x=[str(v) for v in xs], y=[str(v) for v in ys], zmin=lo, zmax=hi, zmid=zmid,
            colorscale=colorscale, showscale=(k == 0), colorbar={"title": z},
            texttemplate=f"%{{z:{text_format}}}" if text_format else None, hovertemplate=f"{y}=%{{y}}<br>{x}=%{{x}}"
            f"<br>{z}=%{{z:.3f}}<extra></extra>"), row=k // cols + 1, col=k % cols + 1)
        fig.update_yaxes(autorange="reversed", showticklabels=(k % cols == 0), row=k // cols + 1, col=k % cols + 1)
    fig.update_layout(template=template(), title=title, height=height_per_row * rows + 80,
                      width=max(520, 460 * cols))
    return fig


def line(
    df: Any,
    *,
    x: str,
    y: str,
    color: str | None = None,
    facet_col: str | None = None,
    facet_row: str | None = None,
    facet_col_wrap: int | None = None,
    error_y: str | None = None,
    log_y: bool = False,
    independent_y: bool = True,
    title: str | None = None,
    labels: dict[str, str] | None = None,
) -> Any:
    """Lines with markers, e.g. a metric by layer; one line per ``color`` value, panels by the facets.

    ``independent_y`` gives each facet its own y range (metrics on different scales).
    """
    import plotly.express as px

    _check_columns(df, x, y, color, facet_col, facet_row, error_y)
    wrap = None if facet_row else facet_col_wrap
    fig = px.line(df.sort_values(x), x=x, y=y, color=color, facet_col=facet_col, facet_row=facet_row,
                  facet_col_wrap=wrap or 0, error_y=error_y, log_y=log_y, markers=True, labels=labels,
                  title=title, template=template(), facet_col_spacing=0.07, facet_row_spacing=0.12)
    if independent_y and (facet_col or facet_row):
        fig.update_yaxes(matches=None, showticklabels=True)
    cols, rows = _n_facets(df, facet_col, wrap)
    _size(fig, cols, rows * (int(df[facet_row].nunique()) if facet_row else 1))
    return fig


def scatter(
    df: Any,
    *,
    x: str,
    y: str,
    color: str,
    facet_col: str | None = None,
    facet_row: str | None = None,
    facet_col_wrap: int | None = None,
    symbol: str | None = None,
    hover_data: Sequence[str] | None = None,
    title: str | None = None,
    labels: dict[str, str] | None = None,
) -> Any:
    """Scatter coloured by ``color`` (e.g. a 2-D projection coloured by category), panels by the facets.

    Each facet keeps its own axes (projection coordinates of different layers are not comparable).
    """
    import plotly.express as px

    _check_columns(df, x, y, color, facet_col, facet_row, symbol, *(hover_data or []))
    data = df.assign(**{color: df[color].astype(str)})
    wrap = None if facet_row else facet_col_wrap
    fig = px.scatter(data, x=x, y=y, color=color, symbol=symbol, facet_col=facet_col, facet_row=facet_row,
                     facet_col_wrap=wrap or 0, hover_data=list(hover_data or []), title=title,
                     labels=labels, template=template(), opacity=0.8, facet_col_spacing=0.06,
                     facet_row_spacing=0.1)
    if facet_col or facet_row:
        fig.update_xaxes(matches=None, showticklabels=True, title_text="")
        fig.update_yaxes(matches=None, showticklabels=True, title_text="")
    cols, rows = _n_facets(df, facet_col, wrap)
    _size(fig, cols, rows * (int(df[facet_row].nunique()) if facet_row else 1), panel_w=340, panel_h=320)
    fig.update_traces(marker={"size": 6})
    return fig


def bars(
    df: Any,
    *,
    x: str,
    y: str,
    color: str | None = None,
    facet_col: str | None = None,
    facet_col_wrap: int | None = None,
    barmode: str = "group",
    range_y: Sequence[float] | None = None,
    text_format: str | None = ".2f",
    title: str | None = None,
    labels: dict[str, str] | None = None,
) -> Any:
    """Bars (grouped by ``color``), e.g. one cosine per category; values written on the bars."""
    import plotly.express as px

    _check_columns(df, x, y, color, facet_col)
    data = df if color is None else df.assign(**{color: df[color].astype(str)})
    fig = px.bar(data, x=x, y=y, color=color, facet_col=facet_col, facet_col_wrap=facet_col_wrap or 0,
                 barmode=barmode, range_y=list(range_y) if range_y is not None else None, title=title,
                 labels=labels, template=template(), text_auto=text_format if text_format else False)
    cols, rows = _n_facets(df, facet_col, facet_col_wrap)
    n_groups = int(df[x].nunique()) * (int(df[color].nunique()) if color and barmode == "group" else 1)
    _size(fig, cols, rows, panel_w=max(420, 22 * n_groups), panel_h=380)
    return fig


# ------------------------------------------------------------------------------------------------- saving
def static_export_available() -> bool:
    """True when kaleido can find a Chrome/Chromium binary (a system one, or one kaleido downloaded earlier);
    never downloads anything."""
    try:
        from choreographer.browsers.chromium import Chromium  # kaleido >= 1.0 drives the browser through it

        return Chromium.find_browser(skip_local=False) is not None
    except Exception:  # noqa: BLE001 - another kaleido/choreographer layout: fall back to PATH
        import shutil

        return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


@contextmanager
def static_export_session() -> Iterator[None]:
    """Keep one browser open for every static figure written inside the block (kaleido's sync server) instead of
    starting one per figure; without a browser, or with a kaleido that has no server, each figure goes on as before.

        with static_export_session():
            for fig, path in figures:
                save_figure(fig, path)
    """
    started = False
    if static_export_available():
        try:
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
            started = True
        except Exception as e:  # noqa: BLE001 - an older kaleido, or a browser that does not start
            log.info("static export: one browser per figure (%s: %s)", type(e).__name__, e)
    try:
        yield
    finally:
        if started:
            try:
                kaleido.stop_sync_server(silence_warnings=True)
            except Exception as e:  # noqa: BLE001 - closing must not hide the block's own error
                log.info("static export: closing the browser failed (%s: %s)", type(e).__name__, e)


def _warn_no_browser(reason: str) -> None:
    global _warned_no_browser
    if not _warned_no_browser:
        log.warning("static figure export (PNG) skipped: %s. Install a browser for kaleido with `%s` (as root), "
                    "then rerun the figure script; HTML and CSV were written.", reason, _INSTALL_HINT)
        _warned_no_browser = True


def save_figure(
    fig: Any,
    path: str | os.PathLike[str],
    *,
    data: Any = None,
    formats: Sequence[str] = ("png",),
    include_plotlyjs: str | bool = "directory",
    scale: float = 2.0,
) -> dict[str, Path]:
    """Write ``<path>.html``, ``<path>.csv`` (``data``, when given) and each static format in ``formats``.

    ``path`` has no suffix (one is stripped if given). Static formats (``png``, ``pdf``, ``svg``) need kaleido
    and a Chrome/Chromium binary; without a browser they are skipped with one warning per process. Files are
    written atomically. Returns ``{format: path}`` of what was written.
    """
    from catlens.runs import atomic_path

    base = Path(path)
    if base.suffix in (".html", ".png", ".pdf", ".svg", ".csv"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    html = base.with_name(base.name + ".html")
    with atomic_path(html) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=include_plotlyjs)
    if include_plotlyjs == "directory":  # plotly wrote plotly.min.js into the temp folder: keep one beside the html
        _ensure_plotlyjs(base.parent)
    written["html"] = html
    if data is not None:
        csv = base.with_name(base.name + ".csv")
        with atomic_path(csv) as tmp:
            data.to_csv(tmp, index=False)
        written["csv"] = csv
    static = [f for f in formats if f in ("png", "pdf", "svg", "jpg", "jpeg", "webp")]
    unknown = [f for f in formats if f not in static]
    if unknown:
        raise ValueError(f"formats={list(formats)}: unknown {unknown}; static formats are png, pdf, svg, jpg, webp.")
    if static and not static_export_available():
        _warn_no_browser("no Chrome/Chromium found")
        return written
    for fmt in static:
        target = base.with_name(base.name + f".{fmt}")
        try:
            with atomic_path(target) as tmp:
                fig.write_image(str(tmp), format=fmt, scale=scale)
        except Exception as e:  # noqa: BLE001 - kaleido raises several types when the browser cannot start
            _warn_no_browser(f"kaleido failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            break
        written[fmt] = target
    return written


def _ensure_plotlyjs(folder: Path) -> None:
    target = folder / "plotly.min.js"
    if target.exists():
        return
    from plotly.offline import get_plotlyjs

    from catlens.runs import write_text_atomic

    write_text_atomic(target, get_plotlyjs())


def figure_cli(main: Any, doc: str | None, argv: Sequence[str] | None = None) -> Any:
    """The command line of a figure script whose ``main(run_dir, out_dir=None, png=True)`` takes nothing else:
    ``python figures/fig_x.py <run folder> [--out-dir D] [--no-png]``."""
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args(argv)
    return main(a.run_dir, a.out_dir, png=not a.no_png)
