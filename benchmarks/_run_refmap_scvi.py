"""scvi-tools' reference mapping on one split (issue 21), in the peers' own venv::

    /work/venvs/peers/bin/python benchmarks/_run_refmap_scvi.py --ref ref.h5ad \
        --query query.h5ad --labels cell_type --out scvi.json

The reference is trained as scvi-tools' scArches tutorial sets it up for query mapping
(``use_layer_norm="both"``, ``use_batch_norm="none"``, ``encode_covariates=True``,
``dropout_rate=0.2``, ``n_layers=2``; every other setting its default), then
``SCVI.prepare_query_anndata`` / ``SCVI.load_query_data`` and query training as the tutorial
does (200 epochs, ``weight_decay=0``). Labels: a distance-weighted vote of the 15 nearest
reference cells in its latent. Novelty scores: the mean distance to those 15 cells, and the
negated marginal log-likelihood under the query's model. Writes labels, scores and seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import numpy as np
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import scvi
    import torch

    torch.set_num_threads(2)
    scvi.settings.seed = args.seed
    ref, query = ad.read_h5ad(args.ref), ad.read_h5ad(args.query)
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ref, layer="counts", batch_key="batch")
    vae = scvi.model.SCVI(ref, use_layer_norm="both", use_batch_norm="none",
                          encode_covariates=True, dropout_rate=0.2, n_layers=2)
    vae.train(enable_progress_bar=False, logger=False, enable_checkpointing=False)
    ref_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scvi.model.SCVI.prepare_query_anndata(query, vae)
    vq = scvi.model.SCVI.load_query_data(query, vae)
    vq.train(max_epochs=200, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False,
             logger=False, enable_checkpointing=False)
    z_query = vq.get_latent_representation()
    query_seconds = time.perf_counter() - start
    z_ref = vae.get_latent_representation()
    labels = ref.obs[args.labels].astype(str).to_numpy()
    knn = KNeighborsClassifier(n_neighbors=15, weights="distance").fit(z_ref, labels)
    distance = NearestNeighbors(n_neighbors=15).fit(z_ref).kneighbors(z_query)[0].mean(1)
    marginal = vq.get_marginal_ll(query, n_mc_samples=100, return_mean=False)
    out = {"labels": knn.predict(z_query).tolist(), "knn_distance": distance.tolist(),
           "neg_marginal_ll": (-np.asarray(marginal, dtype=float)).tolist(),
           "reference_seconds": ref_seconds, "query_seconds": query_seconds}
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
