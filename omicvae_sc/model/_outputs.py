"""``OmicVAE`` methods that return per-cell outputs: latents, denoised expression, log p(x),
the ELBO and posterior predictive draws. Bound to the class in ``_omicvae.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from omicvae_sc.data import CountTensors, stack_rows
from omicvae_sc.model._checks import (
    batch_code_of,
    gene_columns,
)
from omicvae_sc.model._runtime import seeded
from omicvae_sc.module import CellEvaluation

if TYPE_CHECKING:
    from omicvae_sc.model._omicvae import OmicVAE


@torch.inference_mode()
def get_latent_representation(
    self: OmicVAE, adata: AnnData | None = None, *, give_mean: bool = True, seed: int = 0,
) -> np.ndarray:
    """Latent coordinates of each cell.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    give_mean
        The posterior mean (default), or one draw from q(z|x).
    seed
        Seeds the draw when ``give_mean=False``.

    Returns
    -------
    ``(n_cells, n_latent)`` float32 array.
    """
    return self._latent(self._tensors(adata), give_mean=give_mean, seed=seed)


@torch.inference_mode()
def _latent(self: OmicVAE, data: CountTensors, *, give_mean: bool = True, seed: int = 0
            ) -> np.ndarray:
    def chunks():
        for x, codes in self._chunks(data):
            mean, var = self.module.inference(x, codes)
            yield mean if give_mean else mean + var.sqrt() * torch.randn_like(mean)

    with seeded(seed, self.device):
        return stack_rows(data.n_cells, chunks()).cpu().numpy()


@torch.inference_mode()
def get_normalized_expression(
    self: OmicVAE, adata: AnnData | None = None, *, library_size: float | str = 1e4,
    gene_list: list[str] | None = None, transform_batch: str | None = None,
) -> np.ndarray:
    """Denoised expression ``(n_cells, n_genes_selected)`` from the posterior mean.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    library_size
        Scale each cell to this total (default 1e4, as ``sc.pp.normalize_total``), or
        ``"observed"`` for the cell's own library size (denoised counts).
    gene_list
        Genes to return (default all); only these columns are ever materialized.
    transform_batch
        Decode every cell as if it came from this batch category (counterfactual expression).

    Returns
    -------
    ``(n_cells, len(gene_list))`` float32 array, computed in chunks of cells.
    """
    cols = gene_columns(self.var_names, gene_list)
    batch_code = batch_code_of(self.setup, transform_batch)
    return self._expression(self._tensors(adata), library_size, cols, batch_code)


@torch.inference_mode()
def _expression(self: OmicVAE, data: CountTensors, library_size: float | str, cols: np.ndarray,
                batch_code: int | None) -> np.ndarray:
    out = []
    for x, codes in self._chunks(data):
        mean, _ = self.module.inference(x, codes)
        dec_codes = codes
        if batch_code is not None:
            dec_codes = codes.clone()
            dec_codes[:, 0] = batch_code
        frac = self.module.expression_fractions(mean, dec_codes)[:, cols]
        scale = x.sum(-1, keepdim=True) if library_size == "observed" else float(library_size)
        out.append((frac * scale).cpu().numpy())
    return np.concatenate(out)


@torch.inference_mode()
def _evaluate(self: OmicVAE, data: CountTensors, n_samples: int, seed: int) -> CellEvaluation:
    parts = []
    with seeded(seed, self.device):
        for x, codes in self._chunks(data, n_samples):
            parts.append(self.module.evaluate(x, codes, n_samples=n_samples))
    return CellEvaluation(*(torch.cat([getattr(p, f) for p in parts]).double().cpu()
                            for f in ("log_likelihood", "distortion", "rate")))


def get_marginal_ll(
    self: OmicVAE, adata: AnnData | None = None, *, n_samples: int = 100, seed: int = 0
) -> np.ndarray:
    """Per-cell importance-weighted estimate of the marginal log-likelihood log p(x).

    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, with the K
    draws of each cell vectorized and cells processed in chunks.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    n_samples
        K, importance samples per cell; the estimate tightens as K grows.
    seed
        Seeds the draws.

    Returns
    -------
    ``(n_cells,)`` float64 array, nats (negative; higher is better).
    """
    return self._evaluate(self._tensors(adata), n_samples, seed).log_likelihood.numpy()


def get_elbo(
    self: OmicVAE, adata: AnnData | None = None, *, n_samples: int = 10, seed: int = 0
) -> np.ndarray:
    """Per-cell evidence lower bound, E_q[log p(x|z)] - KL(q(z|x) || p(z)).

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    n_samples
        Draws from q(z|x) averaged for the reconstruction term.
    seed
        Seeds the draws.

    Returns
    -------
    ``(n_cells,)`` float64 array, nats (higher is better; -(rate + distortion)).
    """
    ev = self._evaluate(self._tensors(adata), n_samples, seed)
    return -(ev.distortion + ev.rate).numpy()


@torch.inference_mode()
def posterior_predictive_sample(
    self: OmicVAE, adata: AnnData | None = None, *, gene_list: list[str] | None = None,
    seed: int = 0,
) -> sp.csr_matrix:
    """One draw of counts from p(x | z) with z ~ q(z|x), at each cell's own library size.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    gene_list
        Genes to return (default all).
    seed
        Seeds the draw; the same seed gives the same counts.

    Returns
    -------
    ``(n_cells, n_genes_selected)`` CSR matrix of counts.
    """
    data = self._tensors(adata)
    cols = torch.as_tensor(gene_columns(self.var_names, gene_list), device=self.device)
    parts = []
    with seeded(seed, self.device):
        for x, codes in self._chunks(data):
            mean, var = self.module.inference(x, codes)
            z = mean + var.sqrt() * torch.randn_like(mean)
            px = self.module.generative(z, x.sum(-1, keepdim=True), codes)
            parts.append(sp.csr_matrix(px.sample()[:, cols].cpu().numpy()))
    return sp.vstack(parts, format="csr")
