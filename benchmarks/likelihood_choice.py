"""Which likelihood should be the default? Held-out marginal log-likelihood of NB, ZINB and
Poisson OmicVAE fits on real datasets from ../shared/data.

Each dataset is prepared as in ``_prep.py`` (genes in >= 3 cells, 2,000 HVGs, 10% of cells held
out with seed 0); each likelihood is trained for the same epochs with the same seed on the
training cells, and the per-cell importance-weighted log p(x) (K=100) is averaged over the
held-out cells. Higher is better; the three fits see identical data.

    /work/venvs/dev/bin/python benchmarks/likelihood_choice.py --epochs 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _prep import data_path, prepare

from omicvae_sc import OmicVAE

DATASETS = {  # file -> batch key (or None)
    "pbmc3k.h5ad": None,
    "pbmc_3batch_10x_chemistries.h5ad": "batch",
    "cao2017_worm_neuron_sciRNAseq.h5ad": None,
    "cellbench_3celllines_celseq2_dropseq.h5ad": "batch",
}


def held_out_ll(train, test, likelihood: str, batch_key: str | None, epochs: int, seed: int):
    OmicVAE.setup_anndata(train, layer="counts", batch_key=batch_key)
    model = OmicVAE(train, likelihood=likelihood, seed=seed)
    t0 = time.perf_counter()
    model.train(epochs, validation_fraction=0.0, seed=seed, progress_bar=False)
    seconds = time.perf_counter() - t0
    return float(np.mean(model.get_marginal_ll(test, n_samples=100))), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    likelihoods = ("nb", "zinb", "poisson")
    print(f"held-out marginal log-likelihood (nats/cell, K=100), {args.epochs} epochs, "
          f"seed {args.seed}")
    print(f"{'dataset':45s}" + "".join(f"{lk:>12s}" for lk in likelihoods) + "   best")
    for name in args.datasets:
        train, test = prepare(data_path(name))
        row = {lk: held_out_ll(train.copy(), test, lk, DATASETS.get(name), args.epochs, args.seed)
               for lk in likelihoods}
        best = max(row, key=lambda lk: row[lk][0])
        print(f"{name:45s}" + "".join(f"{row[lk][0]:12.2f}" for lk in likelihoods)
              + f"   {best}", flush=True)


if __name__ == "__main__":
    main()
