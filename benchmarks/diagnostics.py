"""Model diagnostics on pbmc3k: collapse by beta, posterior predictive check, latent stability.

pbmc3k with genes in >= 3 cells and 2,000 HVGs (``_prep.py``; 2,430 training cells). Prints:

- active units and I(x; z) (``get_latent_diagnostics``) of models trained with every default
  except ``beta`` in ``--betas``;
- the posterior predictive check of the default model (beta 1): error of the per-gene zero
  fraction, mean and variance of counts generated from the prior at the cells' own depths;
- ``tl.latent_stability`` over ``--seeds``: shared-nearest-neighbour agreement and Procrustes
  disparity between the latents of every pair of seeds.

The amortization gap is measured by ``refine.py``. Run from the project root::

    python benchmarks/diagnostics.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _prep import data_path, prepare

import omicvae_sc as ov
from omicvae_sc import OmicVAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 1.0, 4.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = prepare(data_path("pbmc3k.h5ad"))
    OmicVAE.setup_anndata(train, layer="counts")
    print(f"pbmc3k training cells: {train.n_obs} x {train.n_vars}")
    default = None
    print("beta  epochs  active units  I(x; z) nats  KL per dimension")
    for beta in args.betas:
        model = OmicVAE(train, device="cpu")
        model.train(beta=beta, progress_bar=False)
        d = model.get_latent_diagnostics()
        kl = " ".join(f"{v:.2f}" for v in np.sort(d.kl_per_dim)[::-1])
        print(f"{beta:<5g} {len(model.history):>6}  {d.n_active:>5} of {len(d.active):<4}"
              f"  {d.mutual_information:>12.2f}  {kl}")
        if beta == 1.0:
            default = model
    if default is not None:
        ppc = default.posterior_predictive_check(seed=0)
        err = (ppc["generated_zero_fraction"] - ppc["observed_zero_fraction"]).abs()
        print(f"\nposterior predictive check, default model, {ppc.attrs['n_cells']} cells x "
              f"{len(ppc)} genes: zero fraction MAE {ppc.attrs['zero_fraction_mae']:.4f}, "
              f"max {err.max():.4f}, genes within 0.02: {(err <= 0.02).mean():.1%}; "
              f"log1p mean MAE {ppc.attrs['log_mean_mae']:.3f}, log1p variance MAE "
              f"{ppc.attrs['log_variance_mae']:.3f}")
    start = time.perf_counter()
    stable = train.copy()
    ov.tl.latent_stability(stable, layer="counts", seeds=tuple(args.seeds), device="cpu",
                           progress_bar=False)
    s = stable.uns["omicvae_stability"]
    print(f"\nlatent stability over seeds {list(args.seeds)} ({time.perf_counter() - start:.0f} s):"
          f" mean SNN agreement {float(s['mean_snn_agreement']):.3f} (chance "
          f"{float(s['random_baseline']):.3f}); per pair "
          f"{np.round(np.asarray(s['snn_agreement'], dtype=float), 3).tolist()}; Procrustes "
          f"disparity {np.round(np.asarray(s['procrustes_disparity'], dtype=float), 3).tolist()}")
    per_cell = stable.obs["omicvae_stability"].to_numpy()
    print(f"per-cell SNN agreement 10/50/90th percentiles: "
          f"{np.round(np.percentile(per_cell, [10, 50, 90]), 3).tolist()}")


if __name__ == "__main__":
    main()
