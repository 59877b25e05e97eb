"""Integration measured as the field measures it (issue 22): scib-metrics' ``Benchmarker`` on
omicvae_sc, scVI, Harmony and unintegrated PCA, on every labelled multi-batch set.

- ``cellbench``: CellBench's two protocols (CEL-seq2, Drop-seq) of three cell lines; demuxlet's
  doublets left out.
- ``pbmc3k_simulated``: pbmc3k's annotated cells, half of them (chosen with the seed) given a
  known batch effect: each count binomially thinned with a per-gene probability
  ``min(1, 0.5 * exp(N(0, 0.5^2)))``, drawn once per gene: half the depth, and a gene-wise
  multiplicative distortion of about 1.6-fold (one standard deviation), integer counts kept.

Genes: 2,000 highly variable (seurat flavour on log-normalized counts, ``batch_key="batch"``),
the same for every method. omicvae_sc: ``ov.tl.omicvae(adata, layer="counts",
batch_key="batch")``, trained for the 400 epochs scVI trains by default on these sizes, without
early stopping (``X_omicvae``: the epochs the issue asks to be the same), and with every default
(``X_omicvae_default``: early stopping on the validation ELBO). The peers and the metrics run
in their own venv (``_run_integration_peers.py``, ``--peers-python``). Prints every metric and
the totals (0.6 bio conservation + 0.4 batch correction, unscaled), writes the tables and the
scib-style plot under ``--out-dir``.

    python benchmarks/integration.py --peers-python /work/venvs/peers/bin/python \\
        --out-dir /tmp/integration --seed 0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def _hvgs(adata: ad.AnnData, n_genes: int = 2000) -> ad.AnnData:
    adata = adata[:, np.asarray((adata.layers["counts"] > 0).sum(0)).ravel() >= 3].copy()
    norm = adata.copy()
    norm.X = norm.layers["counts"].copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=n_genes, flavor="seurat", batch_key="batch")
    return adata[:, norm.var["highly_variable"].to_numpy()].copy()


def simulated_batch(counts: sp.csr_matrix, cells: np.ndarray, seed: int) -> sp.csr_matrix:
    """``counts`` with the rows ``cells`` thinned gene by gene (see the module docstring)."""
    rng = np.random.default_rng(seed)
    keep = np.minimum(1.0, 0.5 * np.exp(rng.normal(0.0, 0.5, counts.shape[1])))
    out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    rows = np.repeat(np.arange(out.shape[0]), np.diff(out.indptr))
    thinned = np.isin(rows, np.flatnonzero(cells))
    out.data[thinned] = rng.binomial(out.data[thinned].astype(np.int64),
                                     keep[out.indices[thinned]]).astype(np.float32)
    out.eliminate_zeros()
    return out


def sets(seed: int):
    """(name, AnnData with layers['counts'], obs['batch'] and obs['label'])."""
    from _metrics import annotated_mask
    from _prep import data_path

    bench = ad.read_h5ad(data_path("cellbench_3celllines_celseq2_dropseq.h5ad"))
    bench = bench[~bench.obs["is_doublet_demuxlet"].to_numpy(dtype=bool)].copy()
    bench.obs["label"] = bench.obs["cell_line"].astype(str)
    bench.obs["batch"] = bench.obs["batch"].astype(str)
    pbmc = ad.read_h5ad(data_path("pbmc3k.h5ad"))
    pbmc = pbmc[annotated_mask(pbmc.obs["cell_type"].astype(str).to_numpy())].copy()
    half = np.random.default_rng(seed).random(pbmc.n_obs) < 0.5
    pbmc.X = simulated_batch(sp.csr_matrix(pbmc.X), half, seed)
    pbmc.obs["label"] = pbmc.obs["cell_type"].astype(str)
    pbmc.obs["batch"] = np.where(half, "thinned", "original")
    keep = np.asarray(pbmc.X.sum(1)).ravel() > 0
    pbmc = pbmc[keep].copy()
    for name, adata in (("cellbench", bench), ("pbmc3k_simulated", pbmc)):
        adata.layers["counts"] = sp.csr_matrix(adata.X, dtype=np.float32)
        adata = _hvgs(adata)
        yield name, ad.AnnData(X=adata.layers["counts"].copy(),
                               obs=adata.obs[["batch", "label"]].copy(), var=adata.var[[]],
                               layers={"counts": adata.layers["counts"]})


def main() -> None:
    import warnings

    import omicvae_sc as ov

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers-python", required=True)
    p.add_argument("--out-dir", default="/tmp/integration")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for name, adata in sets(args.seed):
        latents = {}
        for key, epochs, train in (("X_omicvae", 400, {"early_stopping": False}),
                                   ("X_omicvae_default", None, {})):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ov.tl.omicvae(adata, layer="counts", batch_key="batch", seed=args.seed,
                              max_epochs=epochs, progress_bar=False, anomaly=False,
                              doublets=False, device="cpu", train_kwargs=train)
            latents[key] = adata.obsm["X_omicvae"].copy()
            print(f"{name}: {adata.n_obs} cells, {key} {time.perf_counter() - start:.1f} s, "
                  f"{len(adata.uns['omicvae']['history']['epoch'])} epochs", flush=True)
        path = out / f"{name}.h5ad"
        ad.AnnData(X=adata.layers["counts"], obs=adata.obs[["batch", "label"]],
                   var=adata.var[[]], layers={"counts": adata.layers["counts"]},
                   obsm=latents).write_h5ad(path)
        csv = out / f"{name}.csv"
        subprocess.run([args.peers_python, str(HERE / "_run_integration_peers.py"), "--h5ad",
                        str(path), "--out", str(csv), "--plot-dir", str(out / name),
                        "--seed", str(args.seed)], check=True)
        table = pd.read_csv(csv, index_col=0)
        table.insert(0, "set", name)
        tables.append(table)
    both = pd.concat(tables)
    pd.set_option("display.width", 250)
    print(both.to_string())
    print(both[["set", "Bio conservation", "Batch correction", "Total"]].to_string())


if __name__ == "__main__":
    main()
