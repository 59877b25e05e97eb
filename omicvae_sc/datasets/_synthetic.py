"""Simulated NB / ZINB counts with known groups and batches."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

_LIBRARY_MEDIAN = 2000.0  # UMIs per cell
_LIBRARY_SIGMA = 0.3  # log-scale spread of library sizes


def _validate(
    *,
    n_cells: int,
    n_genes: int,
    n_groups: int,
    n_batches: int,
    likelihood: str,
    dropout: float,
    theta: float,
    batch_effect: float,
) -> None:
    checks = [
        (n_cells >= 2, f"n_cells={n_cells!r}", "an integer >= 2"),
        (n_genes >= 2, f"n_genes={n_genes!r}", "an integer >= 2"),
        (n_groups >= 1, f"n_groups={n_groups!r}", "an integer >= 1"),
        (n_batches >= 1, f"n_batches={n_batches!r}", "an integer >= 1"),
        (likelihood in ("nb", "zinb"), f"likelihood={likelihood!r}", "'nb' or 'zinb'"),
        (0 <= dropout < 1, f"dropout={dropout!r}", "a probability with 0 <= dropout < 1"),
        (theta > 0, f"theta={theta!r}", "a positive NB inverse dispersion"),
        (batch_effect >= 0, f"batch_effect={batch_effect!r}", "a standard deviation >= 0"),
    ]
    for ok, found, expected in checks:
        if not ok:
            msg = f"synthetic_counts() got {found}; expected {expected}."
            raise ValueError(msg)


def synthetic_counts(
    n_cells: int = 1000,
    n_genes: int = 200,
    *,
    n_groups: int = 4,
    n_batches: int = 2,
    likelihood: str = "zinb",
    group_effect: float = 1.5,
    batch_effect: float = 1.0,
    dropout: float = 0.2,
    theta: float = 5.0,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate integer counts with known groups and batches from an NB or ZINB model.

    Each gene has a baseline log-mean; each group up-regulates its own disjoint random set of
    ``n_genes // (2 * n_groups)`` genes (at least one) by ``group_effect`` on the log scale;
    each batch multiplies every gene by ``exp(N(0, batch_effect))``, so batch is a strong
    signal unrelated to group. Library sizes are lognormal around 2000 UMIs. Counts are drawn
    gamma-Poisson (NB with inverse dispersion ``theta``); under ``"zinb"`` each entry is then
    zeroed with probability ``dropout``. The NB draw is the same for both likelihoods at one
    seed, so ZINB only adds zeros. A cell left with no counts gets one count in a random gene.

    Parameters
    ----------
    n_cells, n_genes
        Matrix shape, each at least 2.
    n_groups, n_batches
        Number of groups and batches, each at least 1; cells are spread evenly and at random.
    likelihood
        ``"nb"`` or ``"zinb"``.
    group_effect
        Log-fold up-regulation of each group's marker genes.
    batch_effect
        Standard deviation of each batch's per-gene log-scale shift.
    dropout
        Zero-inflation probability under ``"zinb"`` (ignored for ``"nb"``), in ``[0, 1)``.
    theta
        NB inverse dispersion, positive; larger is closer to Poisson.
    seed
        Seed of the ``numpy.random.default_rng`` used for every draw; no global state.

    Returns
    -------
    A new AnnData (``n_cells`` x ``n_genes``) with

    - ``X``: integer counts as a ``scipy.sparse.csr_matrix`` of float32;
    - ``layers['counts']``: a copy of ``X``;
    - ``obs['group']``: ``"group0"``, ... (categorical); ``obs['batch']``: ``"batch0"``, ...;
    - ``var_names``: ``"gene0"``, ``"gene1"``, ...; ``obs_names``: ``"cell0"``, ...;
    - ``uns['provenance']``: a dict of plain strings and numbers recording every parameter.
    """
    _validate(n_cells=n_cells, n_genes=n_genes, n_groups=n_groups, n_batches=n_batches,
              likelihood=likelihood, dropout=dropout, theta=theta, batch_effect=batch_effect)
    rng = np.random.default_rng(seed)

    group = rng.permutation(np.arange(n_cells) % n_groups)  # (cells,)
    batch = rng.permutation(np.arange(n_cells) % n_batches)  # (cells,)

    log_mean = np.tile(rng.normal(0.0, 1.0, size=n_genes), (n_groups, 1))  # (groups, genes)
    n_markers = max(1, n_genes // (2 * n_groups))
    markers = rng.permutation(n_genes)
    for g in range(n_groups):
        # Disjoint marker sets while genes last; wrap around when n_groups is large.
        idx = np.take(markers, np.arange(g * n_markers, (g + 1) * n_markers), mode="wrap")
        log_mean[g, idx] += group_effect
    batch_shift = rng.normal(0.0, batch_effect, size=(n_batches, n_genes))  # (batches, genes)

    logits = log_mean[group] + batch_shift[batch]  # (cells, genes)
    proportions = np.exp(logits - logits.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(_LIBRARY_MEDIAN), _LIBRARY_SIGMA, size=(n_cells, 1))
    mu = library * proportions  # (cells, genes)

    counts = rng.poisson(rng.gamma(shape=theta, scale=mu / theta))  # NB as gamma-Poisson
    if likelihood == "zinb":
        counts[rng.random(counts.shape) < dropout] = 0
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    counts[empty, rng.integers(n_genes, size=empty.size)] = 1

    provenance = {
        "source": "omicvae_sc.datasets.synthetic_counts (gamma-Poisson simulation)",
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "n_groups": int(n_groups),
        "n_batches": int(n_batches),
        "likelihood": str(likelihood),
        "group_effect": float(group_effect),
        "batch_effect": float(batch_effect),
        "dropout": float(dropout),
        "theta": float(theta),
        "seed": int(seed),
        "n_marker_genes_per_group": int(n_markers),
        "library_median": _LIBRARY_MEDIAN,
        "library_log_sigma": _LIBRARY_SIGMA,
    }
    return _as_anndata(counts, group, batch, provenance)


def _as_anndata(counts: np.ndarray, group: np.ndarray, batch: np.ndarray, provenance: dict
                ) -> ad.AnnData:
    """Counts (CSR float32, also in ``layers['counts']``), group and batch labels, provenance."""
    n_cells, n_genes = counts.shape
    n_groups, n_batches = provenance["n_groups"], provenance["n_batches"]
    X = sparse.csr_matrix(counts.astype(np.float32))
    obs = pd.DataFrame(
        {
            "group": pd.Categorical.from_codes(group, [f"group{i}" for i in range(n_groups)]),
            "batch": pd.Categorical.from_codes(batch, [f"batch{i}" for i in range(n_batches)]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    adata = ad.AnnData(X=X, obs=obs, var=var, layers={"counts": X.copy()})
    adata.uns["provenance"] = provenance
    return adata
