"""Shared data preparation for the benchmarks (numpy, scanpy and anndata only).

Both the omicvae_sc venv and the scvi-tools venv import this file, so it must not import
either package.  Preparation, in order:

1. read the h5ad (raw integer UMI counts in ``X``);
2. drop genes seen in fewer than 3 cells;
3. keep 2,000 highly variable genes, chosen by ``sc.pp.highly_variable_genes(flavor="seurat")``
   on a ``normalize_total(target_sum=1e4)`` + ``log1p`` copy;
4. hold out 10% of cells with ``np.random.default_rng(split_seed).permutation``.

Train and test AnnData both carry the raw counts in ``X`` and in ``layers["counts"]``.

Run alone to write the prepared files for the runners (``_run_scvi.py``, ``_run_omicvae.py``)::

    /work/venvs/dev/bin/python benchmarks/_prep.py --out-dir /tmp/pbmc3k_prep
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident memory, MiB. Unlike
    ``ru_maxrss``, which a child inherits from the parent that forked it, VmHWM starts afresh
    at exec."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> float:
    """Reset this process's ``VmHWM`` to its current resident memory (Linux: ``5`` written to
    ``/proc/self/clear_refs``), so that the peak read afterwards is the peak of what follows and
    not of the reading and set-up before it. Returns the current resident memory, MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def data_path(filename: str = "pbmc3k.h5ad") -> Path:
    """Path of a shared data file: ``$OMICVAE_SC_DATA/<filename>`` or ``../shared/data/...``."""
    folder = Path(os.environ.get("OMICVAE_SC_DATA", DEFAULT_DATA_DIR))
    path = folder / filename
    if not path.exists():
        msg = (
            f"data file {path} not found (folder from "
            f"{'OMICVAE_SC_DATA' if 'OMICVAE_SC_DATA' in os.environ else 'the default'}); "
            "set OMICVAE_SC_DATA to the folder holding the shared .h5ad files."
        )
        raise FileNotFoundError(msg)
    return path


def prepare(
    path: str | Path,
    *,
    n_top_genes: int = 2000,
    min_cells: int = 3,
    test_fraction: float = 0.1,
    split_seed: int = 0,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Read, filter genes, select highly variable genes and split cells into train and test.

    Returns
    -------
    ``(train, test)``: AnnData with raw counts (CSR, float32) in ``X`` and ``layers["counts"]``,
    the original ``obs`` columns, and ``uns["prep"]`` recording the parameters.
    """
    adata = ad.read_h5ad(path)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.filter_genes(adata, min_cells=min_cells)

    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.pp.highly_variable_genes(lognorm, n_top_genes=n_top_genes, flavor="seurat")
    adata = adata[:, lognorm.var["highly_variable"].to_numpy()].copy()
    adata.X = adata.layers["counts"].copy()

    order = np.random.default_rng(split_seed).permutation(adata.n_obs)
    n_test = round(test_fraction * adata.n_obs)
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])

    params = {
        "source": str(path),
        "n_top_genes": n_top_genes,
        "min_cells": min_cells,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    for part in (train, test):
        part.uns = {"prep": dict(params)}
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=None, help="h5ad (default: pbmc3k)")
    args = parser.parse_args()
    train, test = prepare(args.data or data_path())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train.write_h5ad(args.out_dir / "train.h5ad")
    test.write_h5ad(args.out_dir / "test.h5ad")
    print(f"train {train.shape}, test {test.shape} written to {args.out_dir}")


if __name__ == "__main__":
    main()
