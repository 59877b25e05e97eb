"""Same seed, same numbers: record a fitted model's outputs on pbmc3k, or compare two records.

A refactor that moves code must not move the numbers. This script fits the model on the shared
pbmc3k counts (the 2,000 genes with the most counts, 90% of cells; fixed seeds, the CPU) and
records, through the public API only (so any two commits can be compared):

- the per-epoch training and validation ELBO,
- the latent (posterior means) of every cell,
- the per-cell ELBO and the held-out cells' importance-weighted log p(x),
- the anomaly and doublet scores, the refined latent's ELBO and a posterior predictive draw.

Usage::

    python benchmarks/equivalence.py record before.npz      # on the old commit
    python benchmarks/equivalence.py record after.npz       # on the new one
    python benchmarks/equivalence.py compare before.npz after.npz

``record`` takes ``--likelihood``, ``--dispersion``, ``--data`` (a file of ../shared/data) and
``--batch-key`` to cover the other likelihoods and batch covariates, e.g.
``--data pbmc_3batch_10x_chemistries.h5ad --batch-key batch --dispersion gene-batch``.

``compare`` prints, per output, whether the arrays are bitwise equal and otherwise the largest
absolute and relative difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
N_GENES = 2000
EPOCHS = 30
SEED = 0


def record(out: Path, args: argparse.Namespace) -> None:
    import omicvae_sc as ov

    torch.set_num_threads(2)
    adata = ad.read_h5ad(DATA / args.data)
    counts = np.asarray(adata.X.sum(0)).ravel()
    genes = np.sort(np.argsort(-counts, kind="stable")[:N_GENES])
    adata = adata[:, genes].copy()
    rng = np.random.default_rng(SEED)
    held_out = np.zeros(adata.n_obs, dtype=bool)
    held_out[rng.choice(adata.n_obs, adata.n_obs // 10, replace=False)] = True
    train, test = adata[~held_out].copy(), adata[held_out].copy()
    ov.OmicVAE.setup_anndata(train, batch_key=args.batch_key)
    model = ov.OmicVAE(train, seed=SEED, device="cpu", likelihood=args.likelihood,
                       dispersion=args.dispersion)
    history = model.train(EPOCHS, progress_bar=False, early_stopping=False)
    ov.OmicVAE.setup_anndata(test, batch_key=args.batch_key)
    refined = model.refine_latent(test, steps=20, seed=SEED)
    arrays = {
        "train_elbo": np.asarray(history.train_elbo, dtype=np.float64),
        "validation_elbo": np.asarray(history.validation_elbo, dtype=np.float64),
        "latent": model.get_latent_representation(),
        "elbo": model.get_elbo(seed=SEED),
        "held_out_log_px": model.get_marginal_ll(test, seed=SEED),
        "anomaly": model.get_anomaly_score(test, seed=SEED),
        "doublet": model.get_doublet_score(seed=SEED),
        "refined_elbo": refined.elbo_after,
        "predictive_draw": model.posterior_predictive_sample(test, seed=SEED).toarray(),
    }
    np.savez(out, **arrays)
    print(f"recorded {', '.join(arrays)} to {out}; mean held-out log p(x) "
          f"{arrays['held_out_log_px'].mean():.4f}")


def compare(a: Path, b: Path) -> int:
    before, after = np.load(a), np.load(b)
    width = max(map(len, before.files))
    unequal = 0
    for name in before.files:
        x, y = before[name], after[name]
        if x.shape != y.shape:
            print(f"{name:<{width}}  shapes differ: {x.shape} vs {y.shape}")
            unequal += 1
            continue
        if np.array_equal(x, y):
            print(f"{name:<{width}}  bitwise equal {x.shape}")
            continue
        unequal += 1
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        rel = diff / np.maximum(np.abs(x.astype(np.float64)), 1e-12)
        print(f"{name:<{width}}  max |diff| {diff.max():.3g}, max relative {rel.max():.3g}, "
              f"mean before {x.mean():.6g} after {y.mean():.6g}")
    return unequal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--data", default="pbmc3k.h5ad", help="file in ../shared/data")
    rec.add_argument("--batch-key", default=None)
    rec.add_argument("--likelihood", default="zinb", choices=["zinb", "nb", "poisson"])
    rec.add_argument("--dispersion", default="gene", choices=["gene", "gene-batch"])
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.out, args)
        return 0
    return 1 if compare(args.before, args.after) else 0


if __name__ == "__main__":
    sys.exit(main())
