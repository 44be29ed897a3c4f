"""Train P1's low-rank steering map on the built-in train split and save a gated policy (catlens.combine).

    python docs/examples/low_rank.py --model ~/.cache/catlens/finetunes/refusal-default --layer 20 --out runs/low_rank_L20
    python docs/examples/low_rank.py ... --basis verbatim       # P1's Q used verbatim instead of W^-1 Q
    python docs/examples/low_rank.py ... --quick                # dry run: 48 train / 16 val prompts, 1 epoch

Writes <out>/ (manifest, checkpoints/, loss_curve.parquet/.csv, low_rank/ = ungated policy) and
<out>/policy_gated (probe gate at the layer, Youden threshold on val, toward/away coefficients on the map).
A rerun with the same arguments resumes (or loads the finished run).
"""

import argparse
import json
import os

import torch

import catlens as cl
from catlens.combine import evaluate_low_rank, init_basis, train_low_rank
from catlens.directions import one_vs_benign
from catlens.geometry import fit_whitener
from catlens.probes import fit_gate

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--layer", type=int, default=20)
ap.add_argument("--basis", choices=["residual", "verbatim"], default="residual")
ap.add_argument("--variant", choices=["fixed_z", "input"], default="fixed_z")
ap.add_argument("--rank", type=int, default=None)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--epochs", type=int, default=5)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--toward", type=float, default=4.0)
ap.add_argument("--away", type=float, default=-6.0)
ap.add_argument("--quick", action="store_true")
a = ap.parse_args()

cl.configure_process(threads=1)
m = cl.load_model(os.path.expanduser(a.model))
P = cl.load_prompts("builtin")
tr, va = P.where(split="train"), P.where(split="val")
if a.quick:
    tr, va = tr.sample(48, seed=0), va.sample(16, seed=0)
L = a.layer
A, V = cl.collect(m, tr, layers=[L]), cl.collect(m, va, layers=[L])
X, XV, f, fv = A.get("resid_post"), V.get("resid_post"), tr.to_frame(), va.to_frame()
h, hv = torch.tensor((f.label == "harmful").to_numpy()), torch.tensor((fv.label == "harmful").to_numpy())
cats = sorted(f[h.numpy()].category.unique())
dirs = one_vs_benign({c: X[torch.tensor(((f.label == "harmful") & (f.category == c)).to_numpy())] for c in cats},
                     X[~h], normalize=True, layers=[L])
W = fit_whitener(X[~h, 0])  # benign prompts, last prompt token (P1 uses raw prompts; see PAPERS §2.3 I)
basis = init_basis(dirs, W, layer=L, mode=a.basis)
res = train_low_rank(m, tr.where(label="harmful"), tr.where(label="benign"), layer=L, basis=basis, out=a.out,
                     variant=a.variant, rank=a.rank, epochs=1 if a.quick else a.epochs, batch_size=a.batch_size,
                     lr=a.lr)
print(res.forward, res.curve[["step", "loss", "harm", "kl", "delta_norm"]].iloc[[0, -1]].to_string())
ev = {c: evaluate_low_rank(m, res.intervention, va.where(label="harmful"), va.where(label="benign"), coeff=c)
      for c in (a.away, 1.0, a.toward)}
print(json.dumps(ev, indent=1))
gate = fit_gate(X[h, 0], X[~h, 0], layer=L, val=(XV[hv, 0], XV[~hv, 0]))
res.policy(gate, toward=a.toward, away=a.away, model=m).save(f"{a.out}/policy_gated", overwrite=True)
print(f"catlens generate --model {a.model} --policy {a.out}/policy_gated ...")
