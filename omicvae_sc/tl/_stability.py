"""``tl.latent_stability``: do models trained with different seeds find the same latent space?

The N(0, I) prior is rotation-invariant, so two fits can agree perfectly and still have
different axes. Agreement is therefore measured without axes: per cell, the share of its k
nearest neighbours that two latents have in common (shared nearest neighbours, SNN), and
overall the orthogonal-Procrustes disparity after centring and scaling both latents.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from anndata import AnnData
from scipy.spatial import cKDTree, procrustes

from omicvae_sc.data import build_setup, check_anndata_object, check_key_added
from omicvae_sc.data._writeback import write_keys
from omicvae_sc.model import OmicVAE


@dataclass(frozen=True)
class LatentStability:
    """Agreement between the latents of every pair of seeds.

    ``snn_agreement[i]`` and ``procrustes_disparity[i]`` belong to the seeds ``pairs[i]``.
    """

    seeds: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    n_neighbors: int
    procrustes_disparity: np.ndarray  # (n_pairs,) in [0, 1]; 0: equal up to rotation and scale
    snn_agreement: np.ndarray  # (n_pairs,) mean over cells of the SNN fraction
    snn_per_cell: np.ndarray  # (cells,) SNN fraction, mean over pairs

    def to_dict(self) -> dict:
        """Plain, h5ad-serializable summary (per-cell values go to ``obs``)."""
        return {"seeds": np.asarray(self.seeds, dtype=np.int64),
                "pairs": np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2),
                "n_neighbors": int(self.n_neighbors),
                "procrustes_disparity": np.asarray(self.procrustes_disparity, dtype=float),
                "snn_agreement": np.asarray(self.snn_agreement, dtype=float),
                "mean_snn_agreement": float(np.mean(self.snn_per_cell)),
                "random_baseline": float(self.n_neighbors / max(1, len(self.snn_per_cell) - 1))}


def knn_indices(latent: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Indices of each cell's ``n_neighbors`` nearest other cells (Euclidean), ``(cells, k)``."""
    n = latent.shape[0]
    _, idx = cKDTree(latent).query(latent, k=n_neighbors + 1)  # (cells, k + 1), self included
    is_self = idx == np.arange(n)[:, None]
    # a cell with exact duplicates may not be returned first; then drop the farthest instead
    is_self[~is_self.any(axis=1), -1] = True
    return idx[~is_self].reshape(n, n_neighbors)


def snn_agreement(a: np.ndarray, b: np.ndarray, *, n_neighbors: int = 15) -> np.ndarray:
    """Per cell, the share of its k nearest neighbours in ``a`` that are also among them in ``b``.

    Returns ``(cells,)`` values in [0, 1]; k / (cells - 1) is the expectation for unrelated
    latents.
    """
    both = np.sort(np.concatenate([knn_indices(a, n_neighbors),
                                   knn_indices(b, n_neighbors)], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # each set holds distinct cells
    return shared / n_neighbors


def procrustes_disparity(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of squared differences left after centring, scaling to unit norm and the best
    orthogonal transformation of ``b`` onto ``a``; in [0, 1], 0 for equal shapes."""
    return float(procrustes(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[2])


def compare_latents(
    latents: dict[int, np.ndarray], *, n_neighbors: int = 15
) -> LatentStability:
    """SNN agreement and Procrustes disparity of every pair of the latents (keyed by seed)."""
    pairs = tuple(itertools.combinations(latents, 2))
    snn = [snn_agreement(latents[s], latents[t], n_neighbors=n_neighbors) for s, t in pairs]
    return LatentStability(
        seeds=tuple(latents), pairs=pairs, n_neighbors=n_neighbors,
        procrustes_disparity=np.array([procrustes_disparity(latents[s], latents[t])
                                       for s, t in pairs]),
        snn_agreement=np.array([v.mean() for v in snn]), snn_per_cell=np.mean(snn, axis=0),
    )


def check_stability_args(adata: AnnData, seeds, n_neighbors: int) -> tuple[int, ...]:
    """Seeds must be at least two distinct integers, ``n_neighbors`` less than the cells."""
    seeds = tuple(seeds)
    if len(seeds) < 2 or not all(isinstance(s, int | np.integer) for s in seeds):
        msg = (f"seeds must hold at least 2 integers (one model per seed), got {list(seeds)}; "
               "e.g. seeds=(0, 1, 2).")
        raise ValueError(msg)
    if len(set(seeds)) != len(seeds):
        msg = f"seeds must be distinct (equal seeds give identical models), got {list(seeds)}."
        raise ValueError(msg)
    if not isinstance(n_neighbors, int | np.integer) or not 1 <= n_neighbors < adata.n_obs - 1:
        msg = (f"n_neighbors must be an integer in [1, {adata.n_obs - 2}] for {adata.n_obs} "
               f"cells, got {n_neighbors!r}.")
        raise ValueError(msg)
    return tuple(int(s) for s in seeds)


def latent_stability(
    adata: AnnData, *, seeds=(0, 1, 2), layer: str | None = None, batch_key: str | None = None,
    n_neighbors: int = 15, max_epochs: int | None = None, device: str = "auto",
    model_kwargs: dict | None = None, train_kwargs: dict | None = None,
    key_added: str = "omicvae_stability", progress_bar: bool = True, copy: bool = False,
) -> AnnData | None:
    """Train one model per seed and measure how far their latents agree, rotation-invariantly.

    Parameters
    ----------
    adata
        Cells x genes with raw integer counts in ``adata.X`` or ``adata.layers[layer]``.
    seeds
        At least two distinct seeds; one model is trained per seed.
    layer
        Layer with the raw counts (``None``: ``adata.X``).
    batch_key
        ``adata.obs`` column with the batch, explained by the decoder rather than the latent.
    n_neighbors
        k of the shared-nearest-neighbour agreement.
    max_epochs
        Training epochs per model (``None``: scales with the number of cells).
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    model_kwargs, train_kwargs
        Further arguments of :class:`~omicvae_sc.OmicVAE` and
        :meth:`~omicvae_sc.OmicVAE.train` (not ``seed``).
    key_added
        Key of the per-cell values in ``obs`` and of the summary in ``uns``.
    progress_bar
        Show the training progress bars.
    copy
        Work on and return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Keys written (with the default ``key_added``):

    ``adata.obs['omicvae_stability']``
        Per cell, the shared-nearest-neighbour fraction, averaged over seed pairs: the share of
        the cell's ``n_neighbors`` nearest neighbours two seeds' latents have in common (1:
        the same neighbourhood; about k / n_cells for unrelated latents).
    ``adata.uns['omicvae_stability']``
        ``seeds``, ``pairs`` (seed pairs, one row each), ``n_neighbors``,
        ``procrustes_disparity`` and ``snn_agreement`` per pair, ``mean_snn_agreement`` and
        ``random_baseline`` (k / (n_cells - 1)). ``LatentStability``-shaped; nothing is written
        on error.
    """
    check_key_added(key_added)
    check_anndata_object(adata)
    seeds = check_stability_args(adata, seeds, n_neighbors)
    given = {"model_kwargs": (model_kwargs, {"seed", "device"}),
             "train_kwargs": (train_kwargs, {"max_epochs", "seed", "progress_bar"})}
    for name, (kwargs, own) in given.items():
        clash = sorted(own & set(kwargs or {}))
        if clash:
            msg = (f"{name} repeats {clash}, which tl.latent_stability takes directly; pass "
                   "them as arguments instead.")
            raise ValueError(msg)
    setup = build_setup(adata, layer=layer, batch_key=batch_key)
    latents = {}
    for seed in seeds:
        model = OmicVAE.from_setup(adata, setup, device=device, seed=seed,
                                   **(model_kwargs or {}))
        model.train(max_epochs, seed=seed, progress_bar=progress_bar, **(train_kwargs or {}))
        latents[seed] = model.get_latent_representation(adata)
    result = compare_latents(latents, n_neighbors=n_neighbors)
    target = adata.copy() if copy else adata
    write_keys(target, obs={key_added: result.snn_per_cell}, uns={key_added: result.to_dict()})
    return target if copy else None
