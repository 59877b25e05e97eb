"""Doublet AUPRC with the old exact PCA (genes x genes covariance + ``eigh``) against the
streamed randomized PCA (``model/_pca.py``) that replaced it, on one trained model per case.

The doublet score places cells in a PCA of decoded log expression. Both projections are
applied to the same trained model and the same seeds, so the only difference is the PCA.
Cases: the two doublet truth sets of ``anomaly.py`` (CellBench with demuxlet doublets;
pbmc3k with 8% heterotypic doublets added), 2,000 HVGs as there. ``--full-genes`` also scores
CellBench on all 28,258 genes (genes in >= 3 cells) with the streamed PCA alone: the exact one
needs a 28k x 28k covariance there.

    python benchmarks/doublet_projection.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scanpy as sc
import torch
from anomaly import CASES, hvg_names
from sklearn.metrics import average_precision_score

import omicvae_sc as ov
from omicvae_sc.model import _pca, _scores


def exact_pca(blocks, n_components: int) -> _pca.PCA:
    """The projection as it was before: every row held, covariance, float64 ``eigh``."""
    rows = torch.cat(list(blocks()))
    # the random draws streamed_pca makes, so that both pair the same cells into doublets
    torch.randn(rows.shape[1], min(n_components + _pca.OVERSAMPLES, rows.shape[1]))
    mean = rows.mean(0)
    cov = (rows - mean).T @ (rows - mean) / max(1, len(rows) - 1)
    _, vecs = torch.linalg.eigh(cov.double())  # ascending eigenvalues
    components = vecs[:, -n_components:].flip(1).to(rows.dtype)
    return _pca.PCA(mean=mean, components=components, scores=(rows - mean) @ components)


def score(model, adata, seed: int, pca) -> tuple[np.ndarray, float]:
    original = _scores.streamed_pca
    _scores.streamed_pca = pca
    try:
        start = time.perf_counter()
        out = model.get_doublet_score(adata, seed=seed)
        return out, time.perf_counter() - start
    finally:
        _scores.streamed_pca = original


def run(name: str, adata, truth: np.ndarray, batch_key: str | None, seeds, methods) -> None:
    ov.OmicVAE.setup_anndata(adata, batch_key=batch_key)
    model = ov.OmicVAE(adata, seed=0)
    start = time.perf_counter()
    model.train(seed=0, progress_bar=False)
    print(f"{name}: {adata.n_obs} cells x {adata.n_vars} genes, {len(model.history)} epochs, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    for label, pca in methods.items():
        runs = [score(model, adata, s, pca) for s in seeds]
        auprc = [average_precision_score(truth, r[0]) for r in runs]
        print(f"  {label:>9}: AUPRC {np.mean(auprc):.3f} (seeds {seeds}: "
              f"{', '.join(f'{a:.3f}' for a in auprc)}), {np.mean([r[1] for r in runs]):.1f} s"
              " per score", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-genes", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    both = {"exact": exact_pca, "streamed": _pca.streamed_pca}
    for name in ("cellbench", "pbmc3k+dbl"):
        case = CASES[name]()
        adata = case["train"][:, hvg_names(case["train"])].copy()
        run(name, adata, case["truth"], case["batch_key"], args.seeds, both)
    if args.full_genes:
        case = CASES["cellbench"]()
        adata = case["train"].copy()
        sc.pp.filter_genes(adata, min_cells=3)
        run("cellbench, all genes", adata, case["truth"], case["batch_key"], args.seeds,
            {"streamed": _pca.streamed_pca})


if __name__ == "__main__":
    main()
