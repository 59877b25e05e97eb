"""Which default batch size? Held-out log p(x) and training time of OmicVAE with every other
default (validation split, early stopping, epochs by data size) at each ``--batch-sizes`` entry,
the learning rate scaled as 1e-3 x sqrt(batch / 128), on real datasets from ../shared/data.

Each dataset is prepared as in ``_prep.py`` (genes in >= 3 cells, 2,000 HVGs, 10% of cells held
out with seed 0); the fits see identical cells and seed. Higher log p(x) is better.

    python benchmarks/default_batch.py --batch-sizes 128 512
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _prep import data_path, prepare
from speed import scaled_lr

from omicvae_sc import OmicVAE

DATASETS = {  # file -> batch key (or None)
    "pbmc3k.h5ad": None,
    "pbmc_3batch_10x_chemistries.h5ad": "batch",
    "bastidasponce2019_pancreas_endocrine_2000hvg.h5ad": None,
    "cao2017_worm_neuron_sciRNAseq.h5ad": None,
    "cellbench_3celllines_celseq2_dropseq.h5ad": "batch",
    "mouse_neuron10k_first1000genes.h5ad": None,
}


def fit(train, test, batch_key, batch_size: int, seed: int) -> tuple[float, float, int]:
    OmicVAE.setup_anndata(train, layer="counts", batch_key=batch_key)
    model = OmicVAE(train, seed=seed)
    t0 = time.perf_counter()
    history = model.train(batch_size=batch_size, lr=scaled_lr(batch_size), seed=seed,
                          progress_bar=False)
    seconds = time.perf_counter() - t0
    ll = float(np.mean(model.get_marginal_ll(test, n_samples=100)))
    return ll, seconds, len(history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("held-out log p(x) (nats/cell, K=100) / train seconds / epochs run, all other "
          f"defaults, seed {args.seed}")
    print(f"{'dataset':52s} {'cells':>6s}" + "".join(f"{f'batch {b}':>26s}"
                                                   for b in args.batch_sizes))
    for name in args.datasets:
        train, test = (part[np.asarray(part.layers["counts"].sum(1)).ravel() > 0].copy()
                       for part in prepare(data_path(name)))  # one empty cell in neuron10k
        cells = []
        for bs in args.batch_sizes:
            ll, seconds, epochs = fit(train.copy(), test, DATASETS.get(name), bs, args.seed)
            cells.append(f"{ll:10.2f} {seconds:7.1f} s {epochs:4d} ep")
        print(f"{name:52s} {train.n_obs:6d}" + "".join(f"{c:>26s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
