"""``OmicVAE`` methods in which the model reports on itself: posterior-collapse diagnostics,
semi-amortized refinement of the latent, generation from the prior and the posterior
predictive check. Bound to the class in ``_omicvae.py``."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from omicvae_sc.data import CountTensors
from omicvae_sc.data._writeback import check_key_added, write_keys
from omicvae_sc.model import _diagnostics, _generate
from omicvae_sc.model._checks import check_count
from omicvae_sc.model._refine import RefinedLatent, check_refine_args, refine_cells
from omicvae_sc.model._runtime import seeded

if TYPE_CHECKING:
    from omicvae_sc.model._omicvae import OmicVAE


def get_latent_diagnostics(
    self: OmicVAE, adata: AnnData | None = None, *, n_cells: int = _diagnostics.MI_CELLS,
    seed: int = 0,
) -> _diagnostics.LatentDiagnostics:
    """Posterior-collapse diagnostics: per-dimension KL, active units and I(x; z).

    A dimension d is active when the variance across cells of its posterior mean E_q[z_d]
    exceeds 0.01. The mutual information between cells and latents under the aggregate
    posterior q(z) is estimated by Monte Carlo, I = E_x[KL(q(z|x) || p(z))] - KL(q(z) || p(z)),
    with q(z) the mixture of the posteriors of ``n_cells`` random cells (one draw per cell,
    log q(z) by a chunked logsumexp over those cells; at most log ``n_cells``).

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    n_cells
        Cells in the estimate of the mutual information (all cells count for the rest).
    seed
        Seeds the choice of cells and the draws.

    Returns
    -------
    A frozen ``LatentDiagnostics`` (``kl_per_dim``, ``posterior_mean_variance``, ``active``,
    ``n_active``, ``mutual_information``; ``to_dict()`` for h5ad). After :meth:`train` the
    diagnostics of the training cells are also kept as ``model.diagnostics``.
    """
    check_count("n_cells", n_cells, minimum=2)
    return _diagnostics.latent_diagnostics(self.module, self._tensors(adata),
                                           n_cells=n_cells, seed=seed)


def _diagnose(self: OmicVAE) -> None:
    """Keep the training cells' diagnostics and warn when most dimensions collapsed."""
    self.diagnostics = self.get_latent_diagnostics()
    msg = _diagnostics.collapse_message(self.diagnostics)
    if msg is not None:
        warnings.warn(msg, UserWarning, stacklevel=3)


def refine_latent(
    self: OmicVAE, adata: AnnData | None = None, *, steps: int = 100, lr: float = 0.05,
    n_samples: int = 8, seed: int = 0, key_added: str | None = None,
) -> RefinedLatent:
    """Semi-amortized inference: refine each cell's q(z|x) against its own ELBO.

    Starting from the encoder's posterior mean and log variance, each cell's own Gaussian
    posterior is optimized with Adam (``n_samples`` reparameterized draws per step, KL
    analytic) while every weight of the model stays frozen and BatchNorm runs in eval
    mode. The ELBO gain measures the amortization gap: what the shared encoder leaves on
    the table for each cell. Cells are refined in chunks, independently.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    steps
        Adam steps per cell, at least 1.
    lr
        Adam learning rate in latent units (positive).
    n_samples
        Draws per step for the reconstruction term of the ELBO.
    seed
        Seeds the draws (the scores before and after use the same draws).
    key_added
        Also write the refined posterior mean to ``adata.obsm[key_added]`` (``None``: write
        nothing).

    Returns
    -------
    A frozen ``RefinedLatent``: refined ``mean`` and ``var``, per-cell ``elbo_before`` /
    ``elbo_after``, importance-weighted log p(x) with the encoder's and with the refined
    posterior as proposal (``log_likelihood_before`` / ``_after``, K=100), and ``gain``.
    """
    check_refine_args(steps, lr, n_samples)
    if key_added is not None:
        check_key_added(key_added)
    adata = self.adata if adata is None else adata
    data = self._tensors(adata)
    refined = refine_cells(self.module, data, steps=steps, lr=lr, n_samples=n_samples,
                           seed=seed)
    if key_added is not None:
        write_keys(adata, obsm={key_added: refined.mean})
    return refined


@torch.inference_mode()
def sample(
    self: OmicVAE, n_cells: int, *, batch: str | None = None,
    library_size: float | np.ndarray | None = None, seed: int = 0,
) -> AnnData:
    """Generate new cells from the prior: z ~ N(0, I), decoded, counts from the likelihood.

    Each generated cell takes the library size and covariates of a training cell drawn at
    random (with replacement, with ``seed``), so batches and depths come in the proportions
    of the training data.

    Parameters
    ----------
    n_cells
        Cells to generate.
    batch
        Generate every cell in this batch (a category of the model's batch key), at the
        library sizes of that batch's training cells; ``None``: batches as in training.
    library_size
        Library size of every cell, or one per cell (``None``: resampled training cells').
    seed
        Seeds the choice of training cells, z and the counts; same seed, same cells.

    Returns
    -------
    A new AnnData ``(n_cells, n_genes)`` with the model's ``var_names``, counts (CSR) in
    ``X`` and ``layers['counts']``, ``obs['library_size']`` (the library the decoder mean
    was scaled to) and a column per covariate of the model (the batch key first).
    """
    check_count("n_cells", n_cells)
    counts, codes = self._host_data(None)
    library = np.asarray(counts.sum(1), dtype=np.float64).ravel()
    plan = _generate.plan_cells(self.setup, library, codes, n_cells=n_cells, batch=batch,
                                library_size=library_size, seed=seed)
    with seeded(seed, self.device):
        x = _generate.sample_counts(self.module, plan, self.device)
    return _generate.as_anndata(x, plan, self.setup, self.var_names)


def posterior_predictive_check(
    self: OmicVAE, adata: AnnData | None = None, *, n_cells: int | None = None, seed: int = 0,
) -> pd.DataFrame:
    """Compare per-gene mean, variance and zero fraction of observed and generated cells.

    For each observed cell one cell is generated from the prior, z ~ N(0, I), at the
    observed cell's library size and covariates, so differences come from the model's
    latent and likelihood rather than from depth or batch.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    n_cells
        Compare a random subset of this many cells (``None``: all).
    seed
        Seeds the subset and the generated cells.

    Returns
    -------
    DataFrame indexed by gene with ``observed_<m>`` and ``generated_<m>`` for ``m`` in
    ``mean``, ``variance``, ``zero_fraction``; ``df.attrs`` holds the mean absolute errors
    over genes ``'zero_fraction_mae'``, ``'log_mean_mae'`` and ``'log_variance_mae'`` (of
    log1p values) and ``'n_cells'``.
    """
    counts, codes = self._host_data(adata)
    cells = None
    if n_cells is not None:
        check_count("n_cells", n_cells)
        if n_cells < counts.shape[0]:
            rng = np.random.default_rng(seed)
            cells = np.sort(rng.choice(counts.shape[0], size=n_cells, replace=False))
    data = CountTensors(counts, codes, self.device, cells=cells)
    with seeded(seed, self.device):
        df = _generate.predictive_moments(self.module, data)
    df.index = pd.Index(self.var_names, name="gene")
    _generate.summarize(df)
    df.attrs["n_cells"] = data.n_cells
    return df
