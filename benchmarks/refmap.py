"""Mapping a query onto a reference (issue 21): label transfer, so far.

``--part transfer``: pbmc3k prepared as in every benchmark (genes in >= 3 cells, 2,000 HVGs;
annotated cells), cut at random into a reference (80%) and a query (20%) for each seed: the
query is held-out reference cells, whose labels are known. omicvae_sc: a model trained on the
reference alone (every default), both latents from it, ``ov.tl.transfer_labels``. Beside it
scanpy's ``sc.tl.ingest`` (the reference log-normalized, PCA and neighbours, its kNN labels).
Prints accuracy, macro F1 and, for omicvae_sc, the expected calibration error of the
uncertainty on the query (ten bins) next to that of the raw vote (``1 - winning share``).

    python benchmarks/refmap.py --part transfer --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).parent))


def _split(seed: int) -> tuple[ad.AnnData, ad.AnnData]:
    from _metrics import annotated_mask
    from _prep import data_path, prepare

    train, test = prepare(data_path("pbmc3k.h5ad"))
    cells = ad.concat([train, test])
    cells = cells[annotated_mask(cells.obs["cell_type"].astype(str).to_numpy())].copy()
    query = np.random.default_rng(seed).random(cells.n_obs) < 0.2
    return cells[~query].copy(), cells[query].copy()


def _omicvae(ref: ad.AnnData, query: ad.AnnData, seed: int) -> dict:
    import omicvae_sc as ov
    from omicvae_sc.tl._transfer import expected_calibration_error, neighbour_votes

    start = time.perf_counter()
    ov.OmicVAE.setup_anndata(ref, layer="counts")
    model = ov.OmicVAE(ref, seed=seed, device="cpu")
    model.train(progress_bar=False)
    ref.obsm["X_omicvae"] = model.get_latent_representation()
    query.obsm["X_omicvae"] = model.get_latent_representation(query)
    ov.tl.transfer_labels(ref, query, "cell_type")
    truth = query.obs["cell_type"].astype(str).to_numpy()
    called = query.obs["omicvae_label"].astype(str).to_numpy()
    u = query.obs["omicvae_label_uncertainty"].to_numpy()
    codes, labels = pd.factorize(ref.obs["cell_type"].astype(str), sort=True)
    votes = neighbour_votes(ref.obsm["X_omicvae"].astype(float), codes, len(labels),
                            query.obsm["X_omicvae"].astype(float), 15)
    raw_wrong = np.asarray(labels)[votes.argmax(1)] != truth
    return {"method": "omicvae_sc", "accuracy": float((called == truth).mean()),
            "macro_f1": float(f1_score(truth, called, average="macro")),
            "ece": expected_calibration_error(u, called != truth),
            "ece_raw_vote": expected_calibration_error(1 - votes.max(1), raw_wrong),
            "unknown": float((called == "Unknown").mean()),
            "seconds": time.perf_counter() - start}


def transfer(args: argparse.Namespace) -> None:
    rows = []
    for seed in args.seeds:
        ref, query = _split(seed)
        truth = query.obs["cell_type"].astype(str).to_numpy()
        rows.append({"seed": seed, **_omicvae(ref.copy(), query.copy(), seed)})
        start = time.perf_counter()
        ingested = query.copy()
        _ingest_labels(ref, ingested)
        called = ingested.obs["cell_type"].astype(str).to_numpy()
        rows.append({"seed": seed, "method": "scanpy ingest",
                     "accuracy": float((called == truth).mean()),
                     "macro_f1": float(f1_score(truth, called, average="macro")),
                     "seconds": time.perf_counter() - start})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(table.groupby("method")[["accuracy", "macro_f1", "ece", "ece_raw_vote"]].mean()
          .to_string(float_format=lambda v: f"{v:.3f}"))
    print(json.dumps(rows))


def _ingest_labels(ref: ad.AnnData, query: ad.AnnData) -> None:
    """scanpy's ingest on log-normalized counts; the query's cell_type is replaced by it."""
    ref = ref.copy()
    for a in (ref, query):
        a.X = a.layers["counts"].copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    sc.pp.pca(ref, n_comps=50)
    sc.pp.neighbors(ref, n_neighbors=15)
    # scanpy 1.11.5's ingest rebuilds pynndescent's search forest with n_search_trees, which
    # pynndescent 0.7 leaves None (the option is deprecated there): one tree, its old default
    import pynndescent

    init = pynndescent.NNDescent.__init__

    def one_tree(self, *a, **k):
        init(self, *a, **k)
        if self.n_search_trees is None:
            self.n_search_trees = 1

    pynndescent.NNDescent.__init__ = one_tree
    try:
        sc.tl.ingest(query, ref, obs="cell_type", embedding_method="pca")
    finally:
        pynndescent.NNDescent.__init__ = init


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["transfer"], default="transfer")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    transfer(args)


if __name__ == "__main__":
    main()
