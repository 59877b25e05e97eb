"""Generation from the prior: sampled cells look like counts of the model, are reproducible, and
a trained model reproduces per-gene statistics that an untrained one does not."""

from __future__ import annotations

import functools

import matplotlib
import numpy as np
import pytest
import scipy.sparse as sp

import omicvae_sc as ov
from omicvae_sc import OmicVAE

matplotlib.use("Agg")


def _data():
    adata = ov.datasets.synthetic_counts(n_cells=300, n_genes=60, n_groups=3, seed=0)
    OmicVAE.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


@functools.cache
def _trained() -> OmicVAE:
    model = OmicVAE(_data(), seed=0)
    model.train(60, progress_bar=False)
    return model


# ---------------------------------------------------------------------------- sample
def test_sample_returns_counts_of_the_model_genes():
    model = _trained()
    new = model.sample(40, seed=1)
    assert new.shape == (40, 60)
    assert list(new.var_names) == list(model.var_names)
    assert sp.issparse(new.X) and new.X.format == "csr"
    assert (new.X != new.layers["counts"]).nnz == 0
    values = new.X.data
    assert np.all(values >= 0) and np.all(values == np.round(values))
    assert set(new.obs) == {"library_size", "batch"}
    assert set(new.obs["batch"].cat.categories) == {"batch0", "batch1"}
    # resampled training depths: generated totals follow them (NB noise around the mean)
    totals = np.asarray(new.X.sum(1)).ravel()
    assert np.corrcoef(totals, new.obs["library_size"])[0, 1] > 0.5  # zero inflation adds noise


def test_sample_is_seed_reproducible():
    model = _trained()
    a, b, c = model.sample(30, seed=2), model.sample(30, seed=2), model.sample(30, seed=3)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def test_sample_in_one_batch_and_at_a_given_depth():
    model = _trained()
    new = model.sample(100, batch="batch1", library_size=500.0, seed=0)
    deep = model.sample(100, batch="batch1", library_size=5000.0, seed=0)
    assert (new.obs["batch"] == "batch1").all()
    np.testing.assert_array_equal(new.obs["library_size"], 500.0)
    depth, deep_depth = (float(np.asarray(a.X.sum(1)).mean()) for a in (new, deep))
    # ZINB: the NB mean sums to the given depth and the zero inflation removes a share of it
    assert 0.6 * 500 < depth < 1.05 * 500
    assert 8 < deep_depth / depth < 12  # depth scales with library_size


def test_sample_rejects_unknown_batch_and_bad_depths():
    model = _trained()
    with pytest.raises(ValueError, match=r"batch='batch7' is not a known batch; known: "
                                         r"\['batch0', 'batch1'\]"):
        model.sample(5, batch="batch7")
    with pytest.raises(ValueError, match="library_size must be a positive number or 5 positive"):
        model.sample(5, library_size=np.ones(3))
    with pytest.raises(ValueError, match="library_size must be a positive number"):
        model.sample(5, library_size=-1.0)
    with pytest.raises(ValueError, match="n_cells must be an integer >= 1, got 0"):
        model.sample(0)


def test_batch_needs_a_model_with_a_batch():
    adata = ov.datasets.synthetic_counts(n_cells=40, n_genes=20, n_groups=2, seed=0)
    OmicVAE.setup_anndata(adata, layer="counts")
    model = OmicVAE(adata, seed=0)
    with pytest.raises(ValueError, match="batch= needs a model set up with batch_key="):
        model.sample(5, batch="batch0")
    assert set(model.sample(5).obs) == {"library_size"}


# ---------------------------------------------------------------------------- the check
def test_trained_model_reproduces_zero_fractions_and_untrained_does_not():
    trained = _trained().posterior_predictive_check(seed=0)
    untrained = OmicVAE(_data(), seed=0).posterior_predictive_check(seed=0)
    assert list(trained.index) == list(_trained().var_names)
    assert trained.attrs["zero_fraction_mae"] < 0.05
    assert untrained.attrs["zero_fraction_mae"] > 4 * trained.attrs["zero_fraction_mae"]
    assert trained.attrs["log_mean_mae"] < untrained.attrs["log_mean_mae"]
    # the observed side is the data itself
    counts = _data().layers["counts"].toarray()
    np.testing.assert_allclose(trained["observed_mean"], counts.mean(0), rtol=1e-6)
    np.testing.assert_allclose(trained["observed_zero_fraction"], (counts == 0).mean(0))


def test_check_on_a_subset_is_reproducible():
    model = _trained()
    a = model.posterior_predictive_check(n_cells=100, seed=5)
    b = model.posterior_predictive_check(n_cells=100, seed=5)
    assert a.attrs["n_cells"] == 100
    assert a.equals(b)


def test_posterior_predictive_plot():
    fig = ov.pl.posterior_predictive(_trained(), n_cells=100, show=False)
    assert len(fig.axes) == 3
    assert fig.axes[0].get_xscale() == "log" and fig.axes[2].get_xscale() == "linear"
    with pytest.raises(TypeError, match="Expected an OmicVAE or the DataFrame"):
        ov.pl.posterior_predictive(3, show=False)
