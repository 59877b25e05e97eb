"""Rate-distortion frontier on pbmc3k: one omicvae_sc model per beta, held-out rate and distortion.

pbmc3k with genes in >= 3 cells and 2,000 HVGs (``_prep.py``; its train and test files
together), then ``ov.tl.rate_distortion``: 10% of cells held out (seed 0), every beta trained
for the default number of epochs (400 at this size) without early stopping. Prints the
frontier on the training and the held-out cells, whether each is monotone (rate falls and
distortion rises as beta grows), and with ``--figure`` saves ``ov.pl.rate_distortion``.
Run from the project root::

    python benchmarks/rate_distortion.py --figure /tmp/rd.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import torch
from _prep import data_path, prepare

import omicvae_sc as ov
from omicvae_sc.tl._rate_distortion import RateDistortionFrontier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1, 2, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adata = ad.concat(prepare(data_path("pbmc3k.h5ad")))
    start = time.perf_counter()
    ov.tl.rate_distortion(adata, layer="counts", betas=args.betas, seed=args.seed,
                          device="cpu")
    frontier = RateDistortionFrontier.from_dict(adata.uns["omicvae_rate_distortion"])
    print(f"pbmc3k, {adata.n_obs} cells x {adata.n_vars} genes, {frontier.n_train} training and "
          f"{frontier.n_held_out} held out; "
          f"{time.perf_counter() - start:.0f} s")
    print(frontier.to_frame().to_string(index=False, float_format="%.2f"))
    print(f"monotone on the training cells: {frontier.monotone}; "
          f"on the held-out cells: {frontier.held_out_monotone}")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        ov.pl.rate_distortion(adata, save=str(args.figure), show=False)


if __name__ == "__main__":
    main()
