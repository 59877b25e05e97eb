"""Doublet scores of pyscdblfinder (the Python port of scDblFinder) and DoubletDetection on one
h5ad of raw counts; runs in the peers' own venv (never a dependency of omicvae_sc)::

    /work/venvs/peers/bin/python benchmarks/_run_peers.py --score cells.h5ad --out peers.json

The venv: ``python3 -m venv /work/venvs/peers && pip install torch==2.13.0 && pip install
scvi-tools==1.4.2 scanpy scikit-learn scikit-image pyscdblfinder doubletdetection``. Writes
``{"<method>": {"score": [...], "seconds": s}}``; a method that fails is recorded with its error
instead of a score. Per batch where ``--batch-key`` is given (each sample scored alone, as both
tools expect), higher is more doublet-like.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import anndata as ad
import numpy as np
import scipy.sparse as sp


def _scdblfinder(counts: sp.csr_matrix, seed: int) -> np.ndarray:
    import pyscdblfinder

    result = pyscdblfinder.sc_dbl_finder(counts.T.tocsr(), random_state=seed, progress=False)
    table = result.table
    real = table.iloc[: result.n_real] if len(table) > result.n_real else table
    column = next(c for c in ("score", "scDblFinder.score") if c in real.columns)
    return real[column].to_numpy(dtype=float)


def _doubletdetection(counts: sp.csr_matrix, seed: int) -> np.ndarray:
    import doubletdetection

    clf = doubletdetection.BoostClassifier(n_iters=10, random_state=seed, verbose=False,
                                           standard_scaling=True)
    clf.fit(counts)
    clf.predict()
    return np.asarray(clf.doublet_score(), dtype=float)


METHODS = {"scDblFinder (pyscdblfinder)": _scdblfinder, "DoubletDetection": _doubletdetection}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--score", required=True, help="h5ad with raw counts in X")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    adata = ad.read_h5ad(args.score)
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    groups = (np.zeros(adata.n_obs, dtype=int) if args.batch_key is None
              else adata.obs[args.batch_key].astype("category").cat.codes.to_numpy())
    out = {}
    for name, method in METHODS.items():
        start = time.perf_counter()
        try:
            score = np.empty(adata.n_obs)
            for g in np.unique(groups):
                cells = np.flatnonzero(groups == g)
                score[cells] = method(counts[cells], args.seed)
            out[name] = {"score": score.tolist(), "seconds": time.perf_counter() - start}
        except Exception:  # a peer's own failure is recorded, not fatal to the run
            out[name] = {"error": traceback.format_exc(limit=3)}
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
