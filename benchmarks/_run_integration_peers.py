"""scVI, Harmony and unintegrated PCA on one prepared set, then scib-metrics' ``Benchmarker``
over every embedding (omicvae_sc's arrive in ``obsm['X_omicvae*']``); runs in the peers' venv
(scvi-tools 1.4.2, harmonypy, scib-metrics 0.5.10: never dependencies of omicvae_sc)::

    /work/venvs/peers/bin/python benchmarks/_run_integration_peers.py --h5ad set.h5ad \
        --out results.csv --plot-dir figures/ --seed 0

The input holds raw counts in ``layers['counts']`` (the chosen HVGs), ``obs['batch']`` and
``obs['label']``. PCA: 50 components of the log-normalized counts (``normalize_total`` 1e4,
``log1p``), the pre-integration embedding of the PCR comparison. Harmony: harmonypy on those
PCs, its defaults. scVI: its defaults with ``batch_key``, default training. The Benchmarker
runs every metric with its defaults (never tuned per method); the table is written with and
without min-max scaling.
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plot-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import harmonypy
    import scanpy as sc
    import scvi
    import torch
    from scib_metrics.benchmark import Benchmarker

    torch.set_num_threads(2)
    adata = ad.read_h5ad(args.h5ad)
    seconds = {}
    norm = adata.copy()
    norm.X = norm.layers["counts"].copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=50, random_state=args.seed)
    adata.obsm["X_pca"] = norm.obsm["X_pca"]
    start = time.perf_counter()
    harmony = harmonypy.run_harmony(adata.obsm["X_pca"], adata.obs, "batch",
                                    random_state=args.seed)
    z = np.asarray(harmony.Z_corr)
    adata.obsm["X_harmony"] = z if z.shape[0] == adata.n_obs else z.T
    seconds["Harmony"] = time.perf_counter() - start
    scvi.settings.seed = args.seed
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = scvi.model.SCVI(adata)
    model.train(enable_progress_bar=False, logger=False, enable_checkpointing=False)
    adata.obsm["X_scvi"] = model.get_latent_representation()
    seconds["scVI"] = time.perf_counter() - start
    keys = ["X_pca", "X_harmony", "X_scvi", *sorted(k for k in adata.obsm
                                                     if k.startswith("X_omicvae"))]
    bench = Benchmarker(adata, batch_key="batch", label_key="label", embedding_obsm_keys=keys,
                        pre_integrated_embedding_obsm_key="X_pca", n_jobs=2,
                        progress_bar=False)
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    table.to_csv(args.out)
    bench.get_results(min_max_scale=True).to_csv(args.out.replace(".csv", "_scaled.csv"))
    if args.plot_dir:
        import os

        os.makedirs(args.plot_dir, exist_ok=True)
        bench.plot_results_table(min_max_scale=False, show=False, save_dir=args.plot_dir)
    print(table.to_string())
    print("seconds", seconds)


if __name__ == "__main__":
    main()
