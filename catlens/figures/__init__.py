"""Figure builders: pure functions from run tables to plotly figures (and the plotted tables), one module per
figure family. The figure scripts in ``figures/`` (read the tables, call a builder, write the files) and the report
(:mod:`catlens.report`) draw with the same builders, so a figure file and the report's panel are the same figure.

Modules: :mod:`~catlens.figures.p1_tradeoff`, :mod:`~catlens.figures.p1_safety_table`,
:mod:`~catlens.figures.p1_probe_roc`, :mod:`~catlens.figures.p1_sweeps`, :mod:`~catlens.figures.p2_bars`,
:mod:`~catlens.figures.specificity`, :mod:`~catlens.figures.separability`, :mod:`~catlens.figures.cosine`,
:mod:`~catlens.figures.anisotropy`, :mod:`~catlens.figures.projection`, :mod:`~catlens.figures.model_diff`.
Nothing here imports a model; plotly is imported where a figure is built.
"""
