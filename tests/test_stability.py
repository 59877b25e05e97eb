"""``tl.latent_stability`` and its rotation-invariant agreement measures."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import omicvae_sc as ov
from omicvae_sc.tl._stability import (
    compare_latents,
    knn_indices,
    procrustes_disparity,
    snn_agreement,
)


def _clusters(n: int = 300, dim: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(3, dim))
    return centres[rng.integers(0, 3, n)] + rng.normal(size=(n, dim))


def test_rotated_and_scaled_copy_agrees_perfectly():
    a = _clusters()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))  # random orthogonal
    b = 3.7 * a @ q + 2.0
    np.testing.assert_array_equal(snn_agreement(a, b, n_neighbors=15), 1.0)
    assert procrustes_disparity(a, b) < 1e-10
    result = compare_latents({0: a, 1: b, 2: -a}, n_neighbors=10)
    assert result.pairs == ((0, 1), (0, 2), (1, 2))
    np.testing.assert_allclose(result.snn_agreement, 1.0)
    np.testing.assert_allclose(result.procrustes_disparity, 0.0, atol=1e-10)


def test_random_latent_agrees_little_with_a_structured_one():
    a = _clusters()
    b = np.random.default_rng(2).normal(size=a.shape)
    snn = snn_agreement(a, b, n_neighbors=15)
    assert snn.mean() < 3 * 15 / 299  # the chance level is k / (n - 1)
    assert procrustes_disparity(a, b) > 0.8
    # within-cluster shuffles keep far more than chance but less than everything
    assert 0.1 < snn_agreement(a, a + np.random.default_rng(3).normal(size=a.shape),
                               n_neighbors=15).mean() < 0.9


def test_neighbours_exclude_the_cell_itself_even_with_duplicates():
    x = np.array([[0.0], [0.0], [0.0], [1.0], [5.0]])
    idx = knn_indices(x, 2)
    assert idx.shape == (5, 2)
    assert not np.any(idx == np.arange(5)[:, None])
    assert set(idx[0]) == {1, 2}


def test_seeds_agree_on_synthetic_groups(tmp_path):
    adata = ov.datasets.synthetic_counts(n_cells=300, n_genes=60, n_groups=3, seed=0)
    ov.tl.latent_stability(adata, seeds=(0, 1), max_epochs=25, device="cpu",
                           progress_bar=False, n_neighbors=15)
    snn = adata.obs["omicvae_stability"].to_numpy()
    summary = adata.uns["omicvae_stability"]
    assert snn.shape == (300,) and np.all((snn >= 0) & (snn <= 1))
    assert summary["mean_snn_agreement"] > 3 * summary["random_baseline"]  # 0.32 vs 0.05
    assert summary["procrustes_disparity"].shape == (1,)
    assert 0 <= summary["procrustes_disparity"][0] < 0.5
    np.testing.assert_array_equal(summary["pairs"], [[0, 1]])
    adata.write_h5ad(tmp_path / "s.h5ad")  # the summary is h5ad-serializable
    back = ad.read_h5ad(tmp_path / "s.h5ad").uns["omicvae_stability"]
    np.testing.assert_allclose(back["snn_agreement"], summary["snn_agreement"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seeds": (0,)}, r"seeds must hold at least 2 integers .*got \[0\]"),
    ({"seeds": (1, 1)}, r"seeds must be distinct .*got \[1, 1\]"),
    ({"seeds": (0, 1.5)}, r"seeds must hold at least 2 integers"),
    ({"n_neighbors": 0}, r"n_neighbors must be an integer in \[1, 298\] for 300 cells"),
    ({"n_neighbors": 299}, r"n_neighbors must be an integer in \[1, 298\]"),
    ({"key_added": ""}, r"key_added must be a non-empty string"),
    ({"model_kwargs": {"seed": 3}}, r"model_kwargs repeats \['seed'\]"),
    ({"train_kwargs": {"max_epochs": 3}}, r"train_kwargs repeats \['max_epochs'\]"),
])
def test_bad_input_raises_and_leaves_adata_unchanged(synthetic, adata_fingerprint, kwargs,
                                                     match):
    fp = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        ov.tl.latent_stability(synthetic, max_epochs=1, progress_bar=False, **kwargs)
    assert adata_fingerprint(synthetic) == fp


def test_a_view_is_written_as_anndata_does_it(synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    view = synthetic[:100]
    with pytest.warns(ad.ImplicitModificationWarning):
        ov.tl.latent_stability(view, seeds=(0, 1), max_epochs=1, progress_bar=False)
    assert "omicvae_stability" in view.obs and not view.is_view
    assert adata_fingerprint(synthetic) == before
    assert "omicvae_stability" not in synthetic.obs
