"""Wall-clock cost of the geometry functions over every layer, on planted synthetic activations of the size of the
embedded model (default 30 layers x 500 prompts x 576 dims, 8 categories). No model is loaded.

Usage:  python analyses/geometry_benchmark.py --out runs/geometry_benchmark [--prompts 500 --layers 30 --d-model 576]
Writes: <out>/manifest.json, timings.parquet (+ .csv): step, seconds, n_prompts, n_layers, d_model, threads
"""

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from catlens import directions as D
from catlens import geometry as G
from catlens.runs import RunDir, configure_process

log = logging.getLogger("analyses.geometry_benchmark")


def planted(n: int, n_layers: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    labels = np.array([f"c{i % k}" for i in range(n)])
    centers = torch.randn(k, d, generator=gen) * 0.3
    acts = torch.randn(n, n_layers, d, generator=gen) + centers[torch.arange(n) % k][:, None, :]
    acts[:, :, 0] += 20.0  # a massive dimension, as in real residual streams
    return acts, labels


def main(out: Path, n: int = 500, n_layers: int = 30, d: int = 576, k: int = 8, threads: int | None = 1,
         overwrite: bool = False, seed: int = 0) -> pd.DataFrame:
    run = RunDir.create(out, config={"n": n, "n_layers": n_layers, "d_model": d, "k": k, "threads": threads},
                        overwrite=overwrite, seed=seed)
    configure_process(threads=threads, seed=seed)  # entry point: process-wide threads and seeds, once
    acts, labels = planted(n, n_layers, d, k, seed)
    rows = []

    def timed(step: str, fn) -> object:
        t0 = time.perf_counter()
        result = fn()
        rows.append({"step": step, "seconds": round(time.perf_counter() - t0, 3)})
        log.info("%-28s %.2f s", step, rows[-1]["seconds"])
        return result

    by_cat = {c: acts[torch.from_numpy(labels == c)] for c in sorted(set(labels))}
    benign = acts[: n // 2]
    dirs = timed("directions (3 methods)", lambda: [D.one_vs_benign(by_cat, benign), D.one_vs_rest(by_cat),
                                                    D.p1_mean_difference(by_cat, benign)][0])
    timed("separability (8 classes)", lambda: G.separability(acts, labels, show_progress=False))
    binary = np.where(np.arange(n) % 2 == 0, "harmful", "benign")
    timed("separability (binary)", lambda: G.separability(acts, binary, show_progress=False))
    timed("anisotropy", lambda: G.anisotropy(acts, show_progress=False))
    timed("projections (pca)", lambda: G.projections(acts, method="pca", show_progress=False))
    timed("projections (tsne, 1 layer)", lambda: G.projections(acts, which=[n_layers // 2], method="tsne",
                                                               show_progress=False))

    def whiten_all() -> None:
        for j, layer in enumerate(dirs.layers):
            w = G.fit_whitener(acts[:, j], warn=False)
            G.whitened_cosine_matrix(dirs.at(layer), w)
            G.orthonormal_basis(dirs.at(layer), w)

    timed("whitening + QR basis", whiten_all)
    timed("probe weights", lambda: G.probe_weights(acts, binary, positive="harmful",
                                                   show_progress=False))
    table = pd.DataFrame(rows).assign(n_prompts=n, n_layers=n_layers, d_model=d, threads=threads)
    run.save_table("timings", table)
    run.finish(total_seconds=round(float(table["seconds"].sum()), 2))
    return table


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=500)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--categories", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(main(a.out, a.prompts, a.layers, a.d_model, a.categories, a.threads, a.overwrite, a.seed).to_string())
