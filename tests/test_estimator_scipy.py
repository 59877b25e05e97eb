"""The numbers the scores rest on, checked independently: each cell's importance-weighted
log p(x) recomputed from the fitted decoder's parameters with ``scipy.stats`` in float64 (NB /
ZINB log-pmf, Gaussian log-densities, log-sum-exp over the same draws) equals
``get_marginal_ll``, deep cells and counts above the log-factorial table included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

import omicvae_sc as ov

K = 16
SEED = 3


def _deep_counts() -> ov.OmicVAE:
    adata = ov.datasets.synthetic_counts(n_cells=60, n_genes=25, n_groups=2, n_batches=1,
                                         seed=0)
    x = adata.layers["counts"].toarray()
    x[0, :3] = [20_000.0, 17_000.0, 16_384.0]  # above the 2**14-entry log x! table
    x[1] *= 60.0  # a cell of > 50k UMIs
    adata.X = x
    adata.layers["counts"] = x.copy()
    return adata


def _scipy_log_px(model: ov.OmicVAE, x: np.ndarray) -> np.ndarray:
    """log p(x) by importance sampling, recomputed in float64 with scipy from the draws and
    decoder parameters the model uses (one chunk of cells: the same noise)."""
    module = model.module
    xt = torch.as_tensor(x, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        posterior = module.inference(xt)
        eps = torch.randn((K, *posterior.mean.shape))
        z = posterior.sample(eps)  # (K, cells, latent)
        params = module.generative(z, xt.sum(-1, keepdim=True))
        mu = (torch.softmax(params.logits.double(), -1) * params.library.double()).numpy()
        theta = params.theta.double().numpy()
        zi = None if params.zi_logits is None else params.zi_logits.double().numpy()
    log_nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))  # (K, cells, genes)
    if zi is not None:
        pi = expit(zi)
        log_nb = np.where(x == 0, np.logaddexp(np.log(pi), np.log1p(-pi) + log_nb),
                          np.log1p(-pi) + log_nb)
    mean, std = posterior.mean.double().numpy(), posterior.var.double().sqrt().numpy()
    zd = mean + std * eps.double().numpy()
    log_w = (log_nb.sum(-1) + stats.norm.logpdf(zd).sum(-1)
             - stats.norm.logpdf(zd, mean, std).sum(-1))
    return logsumexp(log_w, axis=0) - np.log(K)


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_marginal_ll_equals_a_scipy_recomputation(likelihood):
    adata = _deep_counts()
    ov.OmicVAE.setup_anndata(adata, layer="counts")
    model = ov.OmicVAE(adata, likelihood=likelihood, n_latent=4, seed=0, device="cpu")
    model.train(3, progress_bar=False)
    got = model.get_marginal_ll(n_samples=K, seed=SEED)
    expected = _scipy_log_px(model, adata.layers["counts"])
    assert adata.layers["counts"].sum(1)[1] > 50_000
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.01)


def test_the_recomputation_agrees_on_ordinary_cells():
    """The same check on the cells of ordinary depth (all but the two deep ones): 0.01 nats."""
    adata = _deep_counts()
    ov.OmicVAE.setup_anndata(adata, layer="counts")
    model = ov.OmicVAE(adata, n_latent=4, seed=0, device="cpu")
    model.train(3, progress_bar=False)
    got = model.get_marginal_ll(n_samples=K, seed=SEED)
    expected = _scipy_log_px(model, adata.layers["counts"])
    np.testing.assert_allclose(got[2:], expected[2:], rtol=0, atol=0.01)
    # float32 rounding, and the model itself depends on torch's thread count (the order of its
    # sums): 1.0e-3 trained on two threads, 1.3e-3 on one
    assert np.abs(got[2:] - expected[2:]).max() < 2e-3
