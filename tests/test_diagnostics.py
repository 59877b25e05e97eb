"""Posterior-collapse diagnostics: known answers for the estimator, a collapsed model reads as
collapsed (and warns), a trained model uses its latent, and the numbers reach the h5ad file."""

from __future__ import annotations

import functools
import math

import anndata as ad
import matplotlib
import numpy as np
import pytest
import torch

import omicvae_sc as ov
from omicvae_sc import OmicVAE
from omicvae_sc.model._diagnostics import (
    LatentDiagnostics,
    latent_diagnostics,
    log_aggregate_posterior,
    mutual_information,
)

matplotlib.use("Agg")


def _data():
    adata = ov.datasets.synthetic_counts(n_cells=300, n_genes=60, n_groups=3, seed=0)
    OmicVAE.setup_anndata(adata, layer="counts")
    return adata


@functools.cache
def _trained() -> OmicVAE:
    model = OmicVAE(_data(), seed=0)
    model.train(60, progress_bar=False)
    return model


@functools.cache
def _collapsed() -> tuple[OmicVAE, list[str]]:
    """A KL weight of 50 from the first step makes any use of z cost more than it explains: the
    decoder learns to ignore z and every posterior falls onto the prior. Training must warn."""
    model = OmicVAE(_data(), seed=0)
    with pytest.warns(UserWarning, match=r"Posterior collapse: only 0 of 10 latent dimensions "
                                         r"are active") as record:
        model.train(30, beta=50.0, warmup_fraction=0.0, lr=1e-2, progress_bar=False)
    return model, [str(w.message) for w in record]


# ---------------------------------------------------------------------------- the estimator
def test_mutual_information_of_two_separated_clusters_is_log_two():
    mean = torch.cat([torch.full((2000, 1), -10.0), torch.full((2000, 1), 10.0)])
    var = torch.ones_like(mean)
    mi = mutual_information(mean, var, torch.Generator().manual_seed(0))
    assert mi == pytest.approx(math.log(2), abs=1e-4)


def test_mutual_information_of_identical_posteriors_is_zero():
    mean, var = torch.zeros(400, 3), torch.full((400, 3), 0.5)
    assert abs(mutual_information(mean, var, torch.Generator().manual_seed(0))) < 1e-5


def test_log_aggregate_posterior_matches_scipy_mixture():
    from scipy.stats import norm

    gen = torch.Generator().manual_seed(1)
    mean, var = torch.randn(7, 2, generator=gen), torch.rand(7, 2, generator=gen) + 0.1
    z = torch.randn(5, 2, generator=gen)
    dens = np.stack([norm.pdf(z.numpy(), mean[j].numpy(), var[j].sqrt().numpy()).prod(-1)
                     for j in range(7)])  # (M, n)
    expected = np.log(dens.mean(0))
    got = log_aggregate_posterior(z.double(), mean.double(), var.double()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------------- models
def test_collapsed_model_has_no_active_units_and_warns():
    model, messages = _collapsed()
    d = model.diagnostics
    assert d.n_active == 0
    assert not d.active.any()
    assert abs(d.mutual_information) < 0.1
    assert d.kl_per_dim.max() < 0.01
    assert any("Lower beta or lengthen the KL warm-up" in m for m in messages)


def test_trained_model_uses_its_latent():
    d = _trained().diagnostics
    assert d.n_active >= 1
    assert d.mutual_information > 0.5
    assert d.mutual_information <= math.log(d.n_cells_mi) + 0.1  # the estimator's ceiling
    assert d.n_active == int((d.posterior_mean_variance > 0.01).sum())
    # the trained model carries much more information than the collapsed one
    assert d.mutual_information > 5 * max(0.1, _collapsed()[0].diagnostics.mutual_information)


def test_kl_per_dim_sums_to_the_rate_and_is_seed_reproducible():
    model = _trained()
    d = model.get_latent_diagnostics(seed=3)
    adata = _data()
    model.write_results(adata, anomaly=False, doublets=False)
    rate = adata.obs["omicvae_rate"].to_numpy().mean()  # analytic KL per cell, summed over dims
    assert d.kl_per_dim.sum() == pytest.approx(rate, rel=1e-4)
    again = model.get_latent_diagnostics(seed=3)
    assert again.mutual_information == d.mutual_information
    assert model.get_latent_diagnostics(seed=4).mutual_information != d.mutual_information


def test_chunked_sums_equal_the_whole_matrix_computation():
    """The diagnostics keep running sums over chunks, not every cell's posterior: the variance
    of the posterior means and the mean KL equal those of the whole matrix."""
    model = _trained()
    adata = _data()
    mean = model.get_latent_representation(adata).astype(np.float64)
    model.write_results(adata, anomaly=False, doublets=False)
    for batch_size in (7, 1024):  # 43 chunks with a remainder of 6, and one chunk
        d = latent_diagnostics(model.module, model._tensors(adata), batch_size=batch_size)
        np.testing.assert_allclose(d.posterior_mean_variance, mean.var(0, ddof=1), rtol=1e-5)
        assert d.kl_per_dim.sum() == pytest.approx(adata.obs["omicvae_rate"].mean(), rel=1e-5)
        assert d.n_cells_mi == 300


def test_n_cells_is_checked():
    with pytest.raises(ValueError, match="n_cells must be an integer >= 2, got 1"):
        _trained().get_latent_diagnostics(n_cells=1)


# ---------------------------------------------------------------------------- writeback, plot
def test_diagnostics_land_in_uns_and_survive_h5ad(tmp_path):
    model = _trained()
    adata = _data()
    model.write_results(adata, anomaly=False, doublets=False)
    stored = adata.uns["omicvae"]["latent_diagnostics"]
    assert stored["n_active"] == model.diagnostics.n_active
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = LatentDiagnostics.from_dict(ad.read_h5ad(tmp_path / "a.h5ad")
                                       .uns["omicvae"]["latent_diagnostics"])
    want = LatentDiagnostics.from_dict(stored)
    np.testing.assert_array_equal(back.kl_per_dim, want.kl_per_dim)
    np.testing.assert_array_equal(back.active, want.active)
    assert back.mutual_information == want.mutual_information
    assert back.n_active == want.n_active


def test_plot_from_model_and_anndata():
    model = _trained()
    fig = ov.pl.latent_diagnostics(model, show=False)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].patches) == 10  # one bar per latent dimension
    adata = _data()
    model.write_results(adata, anomaly=False, doublets=False)
    assert f"{model.diagnostics.n_active} of 10" in \
        ov.pl.latent_diagnostics(adata, show=False)._suptitle.get_text()


def test_plot_without_diagnostics_says_what_to_run():
    with pytest.raises(KeyError, match=r"holds no 'latent_diagnostics'; run ov.tl.omicvae"):
        ov.pl.latent_diagnostics(_data(), show=False)
    with pytest.raises(TypeError, match="Expected an OmicVAE, an AnnData"):
        ov.pl.latent_diagnostics(3, show=False)
