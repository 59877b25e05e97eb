"""Amortization gap on held-out pbmc3k cells: ELBO and log p(x) before and after refine_latent.

Trains ``OmicVAE`` with every default on the prepared train cells, then on the held-out test
cells refines each cell's posterior (``OmicVAE.refine_latent``) and prints the mean per-cell
ELBO and the importance-weighted marginal log-likelihood (K=100) with the encoder's q(z|x)
and with the refined q as proposal (the same draws of noise for both)::

    /work/venvs/dev/bin/python benchmarks/_prep.py --out-dir /tmp/pbmc3k_prep
    /work/venvs/dev/bin/python benchmarks/refine.py --train /tmp/pbmc3k_prep/train.h5ad \
        --test /tmp/pbmc3k_prep/test.h5ad
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from omicvae_sc import OmicVAE


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, type=Path, help="prepared train .h5ad")
    parser.add_argument("--test", required=True, type=Path, help="prepared held-out .h5ad")
    parser.add_argument("--steps", type=int, nargs="+", default=[100],
                        help="refine_latent steps (one run per value)")
    parser.add_argument("--lr", type=float, default=0.05, help="refine_latent learning rate")
    parser.add_argument("--n-samples", type=int, default=8, help="draws per refinement step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    train, test = ad.read_h5ad(args.train), ad.read_h5ad(args.test)
    OmicVAE.setup_anndata(train, layer="counts")
    model = OmicVAE(train, seed=args.seed, device="cpu")
    start = time.perf_counter()
    model.train(progress_bar=False)
    print(f"trained on {train.n_obs} cells x {train.n_vars} genes, {len(model.history)} epochs, "
          f"{time.perf_counter() - start:.0f} s")
    print(f"held-out cells: {test.n_obs}; lr={args.lr}, n_samples={args.n_samples}; "
          "nats per cell, mean over cells")
    print(f"{'steps':>5} {'ELBO before':>12} {'ELBO after':>11} {'gain':>6} {'cells up':>8} "
          f"{'log p(x) q_enc':>14} {'log p(x) q_ref':>14} {'diff':>6} {'s':>5}")
    for steps in args.steps:
        start = time.perf_counter()
        r = model.refine_latent(test, steps=steps, lr=args.lr, n_samples=args.n_samples,
                                seed=args.seed)
        secs = time.perf_counter() - start
        ll0, ll1 = r.log_likelihood_before.mean(), r.log_likelihood_after.mean()
        print(f"{steps:>5} {r.elbo_before.mean():>12.2f} {r.elbo_after.mean():>11.2f} "
              f"{r.mean_gain:>6.2f} {np.mean(r.gain > 0):>8.1%} {ll0:>14.2f} {ll1:>14.2f} "
              f"{ll1 - ll0:>6.2f} {secs:>5.0f}")


if __name__ == "__main__":
    main()
