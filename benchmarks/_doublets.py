"""Artificial heterotypic doublets for any labelled count matrix: the truth sets of issue 26.

``heterotypic_doublets(adata, label_key, rate=0.05, seed=0)`` returns a new AnnData holding
every cell of ``adata`` and ``round(rate * n_cells)`` doublets appended after them, with
``obs['is_doublet']`` the truth. Each doublet is made from a pair of distinct cells with
different labels (drawn uniformly among such pairs: two cells at random, redrawn while the labels
agree), and its raw counts are the two cells' counts summed, so its library is the sum of
theirs, as in a droplet holding both cells. Cells whose label is missing, empty or
``"unannotated"`` are kept as singlets but never paired. With ``batch_key``, both cells of a
pair come from one batch (doublets form within one loading) and the doublet carries it. The
pairing is seeded with ``numpy.random.default_rng(seed)``; the same call gives the same set.
``obs`` holds ``label_key`` (``"<label a>+<label b>"`` for a doublet), ``is_doublet`` and the
batch; other columns are dropped.

Used by ``anomaly.py`` on pbmc3k, pancreas, worm neurons and CellBench (one row per set).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

UNLABELLED = {"", "nan", "none", "unannotated", "unknown"}


def heterotypic_doublets(adata: ad.AnnData, label_key: str, *, rate: float = 0.05,
                         seed: int = 0, layer: str | None = None,
                         batch_key: str | None = None) -> ad.AnnData:
    """``adata`` plus ``round(rate * n_cells)`` heterotypic doublets (see the module text)."""
    if not 0 < rate < 0.5:
        msg = f"rate must be in (0, 0.5), got {rate!r}."
        raise ValueError(msg)
    labels = adata.obs[label_key].astype(str).to_numpy()
    usable = np.flatnonzero(~np.isin(np.char.lower(labels.astype(str)), list(UNLABELLED)))
    if len(np.unique(labels[usable])) < 2:
        msg = f"obs[{label_key!r}] needs at least two labels to make heterotypic doublets."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    n_dbl = round(rate * adata.n_obs)
    first, second = np.empty(n_dbl, dtype=np.int64), np.empty(n_dbl, dtype=np.int64)
    batch = (np.zeros(adata.n_obs, dtype=object) if batch_key is None
             else adata.obs[batch_key].astype(str).to_numpy())
    for k in range(n_dbl):
        i, j = rng.choice(usable, 2, replace=False)
        while labels[i] == labels[j] or batch[i] != batch[j]:
            i, j = rng.choice(usable, 2, replace=False)
        first[k], second[k] = i, j
    counts = sp.csr_matrix(adata.X if layer is None else adata.layers[layer])
    doublets = (counts[first] + counts[second]).tocsr()
    obs = pd.DataFrame(
        {label_key: np.r_[labels, [f"{labels[i]}+{labels[j]}" for i, j in zip(first, second,
                                                                          strict=True)]],
         "is_doublet": np.r_[np.zeros(adata.n_obs, bool), np.ones(n_dbl, bool)]},
        index=[*adata.obs_names.astype(str), *(f"doublet{k}" for k in range(n_dbl))])
    if batch_key is not None:
        obs[batch_key] = pd.Categorical(np.r_[batch, batch[first]])
    out = ad.AnnData(sp.vstack([counts, doublets]).tocsr(), obs=obs, var=adata.var.copy())
    out.uns["doublets"] = {"label_key": label_key, "rate": float(rate), "seed": int(seed),
                           "n_doublets": int(n_dbl), "pairs": np.c_[first, second]}
    return out
