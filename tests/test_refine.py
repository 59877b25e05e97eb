"""``OmicVAE.refine_latent``: semi-amortized inference closes part of the amortization gap."""

from __future__ import annotations

import functools

import anndata as ad
import numpy as np
import pytest
import torch

import omicvae_sc as ov
from omicvae_sc import OmicVAE
from omicvae_sc.module._refine import refine_posterior


@functools.cache
def _trained() -> OmicVAE:
    adata = ov.datasets.synthetic_counts(n_cells=300, n_genes=60, n_groups=3, seed=0)
    OmicVAE.setup_anndata(adata)
    model = OmicVAE(adata, device="cpu", seed=0)
    model.train(30, progress_bar=False)
    return model


@pytest.fixture
def model() -> OmicVAE:
    """A briefly trained model on a fresh copy of the synthetic data (weights shared, unchanged
    by refinement as test_weights_and_batchnorm_unchanged checks)."""
    cached = _trained()
    model = OmicVAE.__new__(OmicVAE)
    model.__dict__.update(cached.__dict__)
    model.adata = cached.adata.copy()
    return model


def test_refinement_raises_the_elbo_and_more_steps_raise_it_more(model):
    few = model.refine_latent(steps=5, seed=0)
    many = model.refine_latent(steps=60, seed=0)
    # the same scoring draws: "before" is the same number for both
    np.testing.assert_array_equal(few.elbo_before, many.elbo_before)
    assert few.mean_gain > 0.5
    assert many.mean_gain > few.mean_gain + 1.0
    assert np.mean(many.gain > 0) > 0.9
    np.testing.assert_allclose(many.gain, many.elbo_after - many.elbo_before)
    assert many.mean.shape == many.var.shape == (model.adata.n_obs, 10)
    assert np.all(many.var > 0)


def test_marginal_likelihood_under_the_refined_posterior(model):
    r = model.refine_latent(steps=60, seed=0)
    # with the encoder's q as proposal the estimate is get_marginal_ll's, up to sampling noise
    reference = model.get_marginal_ll(n_samples=100, seed=1)
    assert abs(r.log_likelihood_before.mean() - reference.mean()) < 0.3
    # a better proposal gives a tighter importance-weighted bound
    assert r.log_likelihood_after.mean() > r.log_likelihood_before.mean() + 0.2
    # and every ELBO lies below the log-likelihood it bounds (same draws, Jensen)
    assert np.mean(r.elbo_after <= r.log_likelihood_after + 1e-3) > 0.95


def test_weights_and_batchnorm_unchanged(model):
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    for p in model.module.parameters():
        p.grad = None  # training leaves gradients behind; refinement must add none
    reference = model.refine_latent(steps=10, seed=3)
    model.module.train()  # even a module left in training mode is refined in eval mode
    try:
        again = model.refine_latent(steps=10, seed=3)
        assert model.module.training  # the caller's mode is restored
    finally:
        model.module.eval()
    after = model.module.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # BatchNorm running statistics included
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.module.parameters())
    np.testing.assert_array_equal(reference.mean, again.mean)


def test_obsm_written_only_with_key_added(model, adata_fingerprint):
    adata = model.adata
    fp = adata_fingerprint(adata)
    r = model.refine_latent(steps=3)
    assert adata_fingerprint(adata) == fp
    keys = set(adata.obsm)
    r = model.refine_latent(steps=3, key_added="X_refined")
    assert set(adata.obsm) - keys == {"X_refined"}
    np.testing.assert_allclose(adata.obsm["X_refined"], r.mean)


def test_refines_other_cells_and_writes_into_a_view_as_anndata_does(model, adata_fingerprint):
    parent = model.adata
    before = adata_fingerprint(parent)
    other = parent[:40]
    r = model.refine_latent(other, steps=3)
    assert r.elbo_after.shape == (40,)
    with pytest.warns(ad.ImplicitModificationWarning):
        model.refine_latent(other, steps=3, key_added="X_refined")
    assert "X_refined" in other.obsm and not other.is_view
    assert adata_fingerprint(parent) == before


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, r"steps must be an integer >= 1 .*got 0"),
    ({"steps": 2.5}, r"steps must be an integer >= 1"),
    ({"lr": 0.0}, r"lr must be a positive, finite learning rate .*got 0.0"),
    ({"lr": -1e-2}, r"lr must be a positive"),
    ({"lr": float("nan")}, r"lr must be a positive"),
    ({"n_samples": 0}, r"n_samples must be an integer >= 1"),
    ({"key_added": ""}, r"key_added must be a non-empty string"),
])
def test_bad_arguments_raise_and_leave_adata_unchanged(model, adata_fingerprint, kwargs, match):
    fp = adata_fingerprint(model.adata)
    with pytest.raises(ValueError, match=match):
        model.refine_latent(**kwargs)
    assert adata_fingerprint(model.adata) == fp


def test_refine_posterior_scores_a_chunk_with_common_draws(model):
    x = torch.as_tensor(model.adata.X[:50].toarray(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    r = refine_posterior(model.module, x, steps=20, lr=0.05, n_samples=4, n_eval=30,
                         generator=gen)
    assert r.mean.shape == (50, 10) and not r.mean.requires_grad
    assert float((r.after.elbo - r.before.elbo).mean()) > 0.5
