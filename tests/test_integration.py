"""Batch integration: with ``batch_key`` the latent mixes batches of a known, strong batch effect
while keeping the groups apart, and without it does not; ``tl.batch_mixing`` and
``pl.integration`` measure and show it; bad batches are errors that leave the AnnData as it
was."""

from __future__ import annotations

import functools

import anndata as ad
import numpy as np
import pytest
from scipy.spatial import cKDTree

import omicvae_sc as ov
from omicvae_sc.tl._mixing import mixing_scores


@functools.cache
def _fitted(batch_key: str | None) -> ad.AnnData:
    """900 cells, 3 groups, 3 batches with a gene-wise batch effect of sd 1 (log scale)."""
    adata = ov.datasets.synthetic_counts(n_cells=900, n_genes=100, n_groups=3, n_batches=3,
                                         batch_effect=1.0, seed=0)
    ov.tl.omicvae(adata, layer="counts", batch_key=batch_key, max_epochs=60, seed=0,
                  progress_bar=False, anomaly=False, doublets=False, device="cpu")
    return adata


def _group_purity(adata: ad.AnnData, k: int = 15) -> float:
    z, groups = adata.obsm["X_omicvae"], adata.obs["group"].to_numpy()
    idx = cKDTree(z).query(z, k=k + 1)[1][:, 1:]
    return float((groups[idx] == groups[:, None]).mean())


def test_the_batch_covariate_mixes_batches_and_keeps_groups_apart():
    with_batch, without = _fitted("batch").copy(), _fitted(None).copy()
    for adata in (with_batch, without):
        ov.tl.batch_mixing(adata, batch_key="batch")
    mixed = with_batch.obs["omicvae_batch_mixing"].mean()
    apart = without.obs["omicvae_batch_mixing"].mean()
    # measured 0.44 against 0.00 (3 batches, 60 epochs): the bound leaves room for noise
    assert mixed > 0.3, mixed
    assert apart < 0.1, apart
    assert _group_purity(with_batch) > 0.95  # and the groups stay apart
    assert with_batch.uns["omicvae_batch_mixing"]["mean"] == pytest.approx(mixed)


def test_mixing_scores_are_one_for_a_mixed_neighbourhood_and_zero_for_a_single_batch():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 2))
    mixed = rng.integers(0, 2, 600).astype(str)
    apart = np.where(z[:, 0] > 0, "a", "b")  # batches in two halves of the space
    assert mixing_scores(z, mixed, 30).mean() > 0.9
    assert mixing_scores(z, apart, 30).mean() < 0.3


def test_the_integration_plot_shows_batch_label_and_mixing(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    adata = _fitted("batch").copy()
    fig = ov.pl.integration(adata, batch_key="batch", labels_key="group",
                            save=str(tmp_path / "integration.png"), show=False)
    assert len(fig.axes) == 3 and (tmp_path / "integration.png").is_file()
    with pytest.raises(KeyError, match="no column 'cell_type' \\(passed as labels_key\\)"):
        ov.pl.integration(adata, batch_key="batch", labels_key="cell_type", show=False)


def test_bad_mixing_requests_are_errors_and_leave_the_anndata_as_it_was(adata_fingerprint):
    adata = _fitted("batch").copy()
    seen = adata_fingerprint(adata)
    one = adata.copy()
    one.obs["batch"] = "only"
    with pytest.raises(ValueError, match="holds one batch; mixing needs at least two"):
        ov.tl.batch_mixing(one, batch_key="batch")
    with pytest.raises(KeyError, match=r"adata\.obsm has no 'X_pca'"):
        ov.tl.batch_mixing(adata, batch_key="batch", use_rep="X_pca")
    with pytest.raises(ValueError, match="n_neighbors must be an integer"):
        ov.tl.batch_mixing(adata, batch_key="batch", n_neighbors=0)
    assert adata_fingerprint(adata) == seen


def test_bad_batches_are_errors_and_leave_the_anndata_as_it_was(adata_fingerprint):
    adata = ov.datasets.synthetic_counts(n_cells=200, n_genes=40, n_batches=2, seed=1)
    lonely = adata.copy()
    batch = lonely.obs["batch"].astype(str).to_numpy().copy()
    batch[3] = "lonely"
    lonely.obs["batch"] = batch
    missing = adata.copy()
    missing.obs["batch"] = missing.obs["batch"].astype(object)
    missing.obs.iloc[5, missing.obs.columns.get_loc("batch")] = np.nan
    for bad, match in ((lonely, r"has 1 batch of a single cell \(\['lonely'\]\)"),
                       (missing, "has missing values")):
        seen = adata_fingerprint(bad)
        with pytest.raises(ValueError, match=match):
            ov.tl.omicvae(bad, layer="counts", batch_key="batch", max_epochs=2,
                          progress_bar=False, device="cpu")
        assert adata_fingerprint(bad) == seen
    ov.OmicVAE.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ov.OmicVAE(adata, n_latent=3, device="cpu")
    model.train(max_epochs=2, progress_bar=False)
    seen = adata_fingerprint(adata)
    with pytest.raises(ValueError, match="transform_batch='batch9' is not a known batch"):
        model.get_normalized_expression(transform_batch="batch9")
    assert adata_fingerprint(adata) == seen
