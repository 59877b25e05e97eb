"""How well batches mix in a latent, cell by cell: the entropy of the batches among each cell's
nearest neighbours, over the entropy of the batches in the whole data. 1 is a neighbourhood as
mixed as the data; 0 is one of a single batch. A cell type present in one batch only cannot mix,
whatever the integration: read the score per cell type (:func:`omicvae_sc.pl.integration`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree

from omicvae_sc.data import check_anndata_object, check_key_added
from omicvae_sc.data._setup import obs_column
from omicvae_sc.data._writeback import write_keys


def _entropy(shares: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(shares > 0, -shares * np.log(shares), 0.0)
    return terms.sum(axis=-1)


def mixing_scores(z: np.ndarray, batches: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Per-cell batch entropy of the ``n_neighbors`` nearest other cells in ``z``, over the
    entropy of ``batches`` overall (each cell's score in [0, about 1])."""
    codes, names = pd.factorize(batches)
    overall = _entropy(np.bincount(codes, minlength=len(names)) / len(codes))
    tree = cKDTree(np.asarray(z, dtype=np.float64))
    idx = tree.query(z, k=n_neighbors + 1, workers=-1)[1][:, 1:]  # itself left out
    counts = np.zeros((len(codes), len(names)))
    np.add.at(counts, (np.repeat(np.arange(len(codes)), n_neighbors), codes[idx].ravel()), 1.0)
    return _entropy(counts / n_neighbors) / overall


def batch_mixing(
    adata: AnnData, *, batch_key: str, use_rep: str = "X_omicvae", n_neighbors: int = 30,
    key_added: str = "omicvae", copy: bool = False,
) -> AnnData | None:
    """Score how well batches mix around each cell in a latent.

    The score is the entropy of the batches among the cell's ``n_neighbors`` nearest cells in
    ``obsm[use_rep]`` (itself left out), over the entropy of the batches in all of ``adata``:
    about 1 where the neighbourhood holds the batches in the data's proportions, 0 where it
    holds one batch. After an integration, cell types present in several batches should score
    high and the others cannot.

    Parameters
    ----------
    adata
        Cells with a latent and a batch column.
    batch_key
        ``adata.obs`` column of the batch (at least two batches).
    use_rep
        The latent, ``adata.obsm[use_rep]``.
    n_neighbors
        Neighbours of each cell.
    key_added
        Prefix of the keys written.
    copy
        Write into a copy of ``adata`` and return it.

    Returns
    -------
    With ``copy=True`` the copy, else ``None``. Writes ``obs['<key_added>_batch_mixing']`` and
    ``uns['<key_added>_batch_mixing']`` (the settings and the mean score).
    """
    check_anndata_object(adata)
    check_key_added(key_added)
    batches = obs_column(adata, batch_key, "batch_key").astype(str).to_numpy()
    if len(np.unique(batches)) < 2:
        msg = f"adata.obs[{batch_key!r}] holds one batch; mixing needs at least two."
        raise ValueError(msg)
    if use_rep not in adata.obsm:
        msg = (f"adata.obsm has no {use_rep!r}; run ov.tl.omicvae(adata, batch_key=...) first "
               "or name another latent with use_rep=.")
        raise KeyError(msg)
    if not isinstance(n_neighbors, int | np.integer) or not 1 <= n_neighbors < adata.n_obs:
        msg = (f"n_neighbors must be an integer in [1, {adata.n_obs - 1}], got "
               f"{n_neighbors!r}.")
        raise ValueError(msg)
    scores = mixing_scores(np.asarray(adata.obsm[use_rep]), batches, n_neighbors)
    target = adata.copy() if copy else adata
    write_keys(target, obs={f"{key_added}_batch_mixing": scores},
               uns={f"{key_added}_batch_mixing": {"batch_key": batch_key, "use_rep": use_rep,
                                                 "n_neighbors": int(n_neighbors),
                                                 "mean": float(scores.mean())}})
    return target if copy else None
