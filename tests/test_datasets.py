from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

from omicvae_sc.datasets import pbmc68k_reduced, synthetic_counts
from omicvae_sc.datasets._pbmc import _recover_counts


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _nearest_centroid_accuracy(counts: np.ndarray, labels) -> float:
    logged = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    codes = np.asarray(labels.cat.codes)
    centroids = np.stack([logged[codes == k].mean(axis=0) for k in np.unique(codes)])
    distances = ((logged[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == codes).mean())


def test_pbmc_counts_are_integer_csr_with_expected_shape():
    adata = pbmc68k_reduced()
    assert adata.shape == (700, 765)
    assert sparse.isspmatrix_csr(adata.X)
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.data, np.rint(adata.X.data))
    assert (adata.X.data > 0).all()
    np.testing.assert_array_equal(_dense(adata.layers["counts"]), _dense(adata.X))
    assert adata.obs["cell_type"].cat.categories.size == 10
    assert set(adata.obs.columns) == {"cell_type", "total_counts_all_genes"}
    assert not adata.obsm and not adata.obsp and list(adata.uns) == ["provenance"]
    assert isinstance(adata.uns["provenance"], str)


def test_pbmc_counts_reproduce_scanpy_lognormalized_profile():
    adata = pbmc68k_reduced()
    reference = sc.datasets.pbmc68k_reduced()
    assert list(adata.obs_names) == list(reference.obs_names)
    assert list(adata.var_names) == list(reference.raw.var_names)
    n_counts = adata.obs["total_counts_all_genes"].to_numpy()[:, None]
    relogged = np.log1p(_dense(adata.X) / n_counts * 1e4)
    np.testing.assert_allclose(relogged, _dense(reference.raw.X), atol=0.05)


def test_pbmc_recovery_rejects_non_integer_counts():
    n_counts = np.array([1e4, 1e4])
    half_counts = sparse.csr_matrix(np.log1p([[2.5, 0.0], [1.0, 3.0]]))
    match = r"residual of 0\.500 before rounding \(expected < 0\.25\)"
    with pytest.raises(RuntimeError, match=match):
        _recover_counts(half_counts, n_counts)


def test_pbmc_returns_independent_copies():
    first = pbmc68k_reduced()
    expected = _dense(first.X).copy()
    first.X.data[:] = -1.0
    first.obs["cell_type"] = "corrupted"
    first.uns["provenance"] = "corrupted"
    second = pbmc68k_reduced()
    np.testing.assert_array_equal(_dense(second.X), expected)
    assert second.obs["cell_type"].nunique() == 10
    assert second.uns["provenance"] != "corrupted"


def test_synthetic_counts_are_integer_with_no_empty_cells():
    adata = synthetic_counts(300, 50, seed=1)
    assert adata.shape == (300, 50)
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.data, np.rint(adata.X.data))
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()
    np.testing.assert_array_equal(_dense(adata.layers["counts"]), _dense(adata.X))
    assert list(adata.obs["group"].cat.categories) == ["group0", "group1", "group2", "group3"]
    assert list(adata.obs["batch"].cat.categories) == ["batch0", "batch1"]
    assert adata.var_names[0] == "gene0"


def test_synthetic_counts_no_empty_cells_even_when_tiny():
    adata = synthetic_counts(200, 2, dropout=0.9, seed=3)
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()


def test_synthetic_counts_seeded():
    same = _dense(synthetic_counts(200, 40, seed=7).X)
    np.testing.assert_array_equal(same, _dense(synthetic_counts(200, 40, seed=7).X))
    assert not np.array_equal(same, _dense(synthetic_counts(200, 40, seed=8).X))


def test_synthetic_groups_and_batches_are_separable():
    adata = synthetic_counts(seed=0)
    counts = _dense(adata.X)
    assert _nearest_centroid_accuracy(counts, adata.obs["group"]) > 0.9
    assert _nearest_centroid_accuracy(counts, adata.obs["batch"]) > 0.9


def test_synthetic_without_effects_is_not_separable():
    # Guards the separability test above: the classifier must not succeed on noise.
    adata = synthetic_counts(group_effect=0.0, batch_effect=0.0, seed=0)
    assert _nearest_centroid_accuracy(_dense(adata.X), adata.obs["group"]) < 0.7


def test_synthetic_zinb_has_more_zeros_than_nb():
    nb = synthetic_counts(likelihood="nb", seed=2)
    zinb = synthetic_counts(likelihood="zinb", dropout=0.2, seed=2)
    assert zinb.X.nnz < 0.9 * nb.X.nnz
    assert nb.uns["provenance"]["likelihood"] == "nb"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_cells": 1}, r"n_cells=1; expected an integer >= 2"),
        ({"n_genes": 0}, r"n_genes=0; expected an integer >= 2"),
        ({"n_groups": 0}, r"n_groups=0; expected an integer >= 1"),
        ({"n_batches": 0}, r"n_batches=0; expected an integer >= 1"),
        ({"likelihood": "poisson"}, r"likelihood='poisson'; expected 'nb' or 'zinb'"),
        ({"dropout": 1.0}, r"dropout=1.0; expected a probability"),
        ({"dropout": -0.1}, r"dropout=-0.1; expected a probability"),
        ({"theta": 0.0}, r"theta=0.0; expected a positive"),
        ({"batch_effect": -1.0}, r"batch_effect=-1.0; expected a standard deviation"),
    ],
)
def test_synthetic_counts_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_counts(**kwargs)
