"""ov.tl.transfer_labels: labels from a reference, and an uncertainty that is a measured error
rate. The calibration is checked on latents whose overlap (and so whose error rate) is known,
the accuracy on a real set, and every bad input leaves the query as it was."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import omicvae_sc as ov
from omicvae_sc.tl._transfer import UNKNOWN, Calibration, expected_calibration_error


def blobs(n: int, *, seed: int, spread: float = 1.2) -> ad.AnnData:
    """Cells of 4 types in a 5-D latent: unit Gaussians whose centres are ``spread`` apart
    in pairs, so that a share of cells sit among another type's."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [spread, 0], [0, 6], [spread, 6]], dtype=float)
    types = rng.integers(0, 4, n)
    z = np.zeros((n, 5))
    z[:, :2] = centres[types]
    z += rng.normal(size=(n, 5))
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
    adata.obsm["X_omicvae"] = z.astype(np.float32)
    adata.obs["cell_type"] = pd.Categorical(np.array(list("ABCD"))[types])
    return adata


def test_the_uncertainty_is_the_share_of_wrong_labels():
    ref, query = blobs(4000, seed=0), blobs(2000, seed=1)
    ov.tl.transfer_labels(ref, query, "cell_type")
    wrong = (query.obs["omicvae_label"].astype(str) != query.obs["cell_type"].astype(str))
    wrong = wrong.to_numpy()
    u = query.obs["omicvae_label_uncertainty"].to_numpy()
    assert 0.1 < wrong.mean() < 0.4  # overlapping types: errors to calibrate
    assert abs(u.mean() - wrong.mean()) < 0.03
    assert expected_calibration_error(u, wrong) < 0.04
    # cells called more uncertain are more often wrong
    assert wrong[u > np.median(u)].mean() > 2 * wrong[u <= np.median(u)].mean()
    record = query.uns["omicvae_label_transfer"]
    assert record["expected_calibration_error"] < 0.04  # measured on held-out reference cells
    assert abs(record["reference_accuracy"] - (1 - wrong.mean())) < 0.05


def test_cells_above_the_threshold_are_unknown_and_labels_keep_the_references_order():
    ref, query = blobs(2000, seed=0), blobs(500, seed=2)
    ref.obs.loc[ref.obs.index[:50], "cell_type"] = np.nan  # unlabelled reference cells
    ov.tl.transfer_labels(ref, query, "cell_type", unknown_above=0.2, key_added="ref")
    labels = query.obs["ref_label"]
    assert list(labels.cat.categories) == ["A", "B", "C", "D", UNKNOWN]
    u = query.obs["ref_label_uncertainty"].to_numpy()
    assert ((labels == UNKNOWN).to_numpy() == (u > 0.2)).all()
    assert 0 < (labels == UNKNOWN).mean() < 0.9
    assert query.uns["ref_label_transfer"]["n_reference"] == 1950


def test_isotonic_calibration_is_monotone_and_matches_block_means():
    raw = np.array([0.0, 0.1, 0.1, 0.2, 0.3, 0.4])
    wrong = np.array([0, 1, 0, 0, 1, 1])
    cal = Calibration.fit(raw, wrong)
    fitted = cal(raw)
    assert (np.diff(fitted) >= 0).all()
    # 0.1 (1/2) then 0.2 (0) violate order: pooled to 1/3; then 0.3 and 0.4 are wrong
    np.testing.assert_allclose(fitted, [0, 1 / 3, 1 / 3, 1 / 3, 1, 1])


@pytest.mark.slow
def test_held_out_reference_cells_get_their_labels_back_on_a_real_set(shared_data_dir):
    adata = ad.read_h5ad(shared_data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    sc.pp.filter_genes(adata, min_cells=3)
    ov.tl.omicvae(adata, n_top_genes=1000, batch_key="batch", max_epochs=100,
                  progress_bar=False, anomaly=False, doublets=False)
    held = np.random.default_rng(0).random(adata.n_obs) < 0.25
    ref, query = adata[~held].copy(), adata[held].copy()
    ov.tl.transfer_labels(ref, query, "cell_line")
    right = query.obs["omicvae_label"].astype(str) == query.obs["cell_line"].astype(str)
    assert right.mean() > 0.9


def test_bad_input_is_an_error_and_the_query_is_unchanged(adata_fingerprint):
    ref, query = blobs(300, seed=0), blobs(100, seed=1)
    before = adata_fingerprint(query), adata_fingerprint(ref)
    other = blobs(100, seed=1)
    other.obsm["X_omicvae"] = other.obsm["X_omicvae"][:, :3]
    nan = blobs(100, seed=1)
    nan.obsm["X_omicvae"][0, 0] = np.nan
    cases = [
        (dict(labels_key="kind"), KeyError, r"adata_ref.obs has no column 'kind'"),
        (dict(use_rep="X_pca"), KeyError, r"adata_ref.obsm has no 'X_pca'"),
        (dict(n_neighbors=0), ValueError, r"n_neighbors must be an integer in \[1, 298\]"),
        (dict(n_neighbors=299), ValueError, r"n_neighbors must be an integer"),
        (dict(unknown_above=0), ValueError, r"unknown_above must be in \(0, 1\]"),
        (dict(key_added=""), ValueError, r"key_added must be a non-empty string"),
    ]
    for kwargs, error, match in cases:
        args = {"labels_key": "cell_type"} | kwargs
        with pytest.raises(error, match=match):
            ov.tl.transfer_labels(ref, query, **args)
    with pytest.raises(ValueError, match=r"has 5 columns in adata_ref and 3 in adata_query"):
        ov.tl.transfer_labels(ref, other, "cell_type")
    with pytest.raises(ValueError, match=r"adata_query.obsm\['X_omicvae'\] holds NaN"):
        ov.tl.transfer_labels(ref, nan, "cell_type")
    assert (adata_fingerprint(query), adata_fingerprint(ref)) == before
    assert "omicvae_label" not in other.obs and "omicvae_label" not in nan.obs


def test_copy_returns_a_labelled_copy_and_leaves_the_query_alone(adata_fingerprint):
    ref, query = blobs(600, seed=0), blobs(100, seed=3)
    before = adata_fingerprint(query)
    out = ov.tl.transfer_labels(ref, query, "cell_type", copy=True)
    assert "omicvae_label" in out.obs and adata_fingerprint(query) == before
    assert ov.tl.transfer_labels(ref, query, "cell_type") is None
    assert (query.obs["omicvae_label"] == out.obs["omicvae_label"]).all()
