"""Full gene sets: nothing of genes x genes size is ever made, the principal components of the
doublet step are right without one, and ``n_top_genes`` models the most variable genes while
the results go into the AnnData of all genes."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import scanpy as sc
import torch
from anndata import AnnData
from torch.utils._python_dispatch import TorchDispatchMode

import omicvae_sc as ov
from omicvae_sc.data._genes import MANY_GENES, genes_to_model
from omicvae_sc.model._pca import streamed_pca


class GenesSquaredGuard(TorchDispatchMode):
    """Fails at the first torch result with two dimensions of at least ``n_genes`` (a genes x
    genes matrix) or with ``n_genes ** 2`` elements, in any op, backward passes included."""

    def __init__(self, n_genes: int):
        super().__init__()
        self.n_genes = n_genes
        self.largest: tuple[int, tuple[int, ...], str] = (0, (), "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            if sum(d >= self.n_genes for d in t.shape) >= 2 or t.numel() >= self.n_genes ** 2:
                msg = f"{func} made a {tuple(t.shape)} tensor with {self.n_genes} genes"
                raise AssertionError(msg)
            if t.numel() > self.largest[0]:
                self.largest = (t.numel(), tuple(t.shape), str(func))
        return out


@functools.cache
def _wide() -> AnnData:
    return ov.datasets.synthetic_counts(n_cells=60, n_genes=20_000, n_groups=3, n_batches=1,
                                        seed=0)


def test_20k_genes_fit_with_doublets_never_makes_a_genes_by_genes_tensor():
    adata = _wide().copy()
    with GenesSquaredGuard(adata.n_vars) as guard:
        ov.tl.omicvae(adata, max_epochs=2, progress_bar=False, device="cpu")
    assert np.isfinite(adata.obs["omicvae_doublet_score"]).all()
    assert adata.obs["omicvae_is_doublet"].sum() >= 1
    assert guard.largest[0] > adata.n_vars  # the guard did see the gene-sized work


def test_the_guard_catches_a_covariance_of_the_genes():
    x = torch.randn(10, 300)
    with pytest.raises(AssertionError, match=r"made a \(300, 300\) tensor"), \
            GenesSquaredGuard(300):
        x.T @ x


# ---------------------------------------------------------------------------- the PCA
def _low_rank(n: int, genes: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3, 0.5, rank)  # a decaying spectrum, as in decoded expression
    signal = (torch.randn(n, rank, generator=g) * scale) @ torch.randn(rank, genes, generator=g)
    return signal + 0.05 * torch.randn(n, genes, generator=g) + 2.0


def test_streamed_pca_finds_the_exact_leading_subspace_from_blocks():
    x = _low_rank(600, 400, rank=12, seed=0)
    calls = []

    def blocks():
        calls.append(1)
        return (x[i:i + 128] for i in range(0, len(x), 128))

    torch.manual_seed(0)
    pca = streamed_pca(blocks, 10)
    centred = (x - x.mean(0)).double()
    exact = torch.linalg.svd(centred, full_matrices=False).Vh[:10].T
    cosines = torch.linalg.svdvals(exact.T @ pca.components.double())  # principal angles
    assert cosines.min() > 0.9999
    np.testing.assert_allclose(pca.mean, x.mean(0), atol=1e-5)
    np.testing.assert_allclose(pca.scores, pca(x), atol=1e-4)  # fitted rows as further rows
    # the leading axis explains the most variance, and so on down
    variance = pca.scores.var(0)
    assert (variance[:-1] >= variance[1:] - 1e-4).all()
    assert len(calls) == 2 * 3 + 3  # passes over the blocks, as documented


# ---------------------------------------------------------------------------- n_top_genes
def test_n_top_genes_models_the_seurat_v3_genes_and_writes_for_all(synthetic, adata_fingerprint):
    expected = sc.pp.highly_variable_genes(synthetic.copy(), flavor="seurat_v3", n_top_genes=20,
                                           layer="counts", batch_key="batch", inplace=False)
    var_before = synthetic.var.copy()
    ov.tl.omicvae(synthetic, layer="counts", batch_key="batch", n_top_genes=20, layers=True,
                  max_epochs=2, progress_bar=False, device="cpu")
    chosen = synthetic.var["omicvae_genes"].to_numpy()
    np.testing.assert_array_equal(chosen, expected["highly_variable"].to_numpy())
    assert chosen.sum() == 20
    assert synthetic.obsm["X_omicvae"].shape == (300, 10)
    denoised = synthetic.layers["omicvae_denoised"]
    assert np.isnan(denoised[:, ~chosen]).all() and np.isfinite(denoised[:, chosen]).all()
    assert synthetic.uns["omicvae"]["params"]["n_top_genes"] == 20
    assert list(synthetic.var.columns) == [*var_before.columns, "omicvae_genes"]


def test_n_top_genes_gives_what_fitting_the_selected_genes_gives(synthetic):
    chosen = genes_to_model(synthetic, layer="counts", batch_key=None, n_top_genes=25)
    subset = synthetic[:, chosen].copy()
    for adata, n_top in ((synthetic, 25), (subset, None)):
        ov.tl.omicvae(adata, layer="counts", n_top_genes=n_top, max_epochs=3,
                      progress_bar=False, device="cpu")
    np.testing.assert_array_equal(synthetic.obsm["X_omicvae"], subset.obsm["X_omicvae"])
    np.testing.assert_array_equal(synthetic.obs["omicvae_doublet_score"],
                                  subset.obs["omicvae_doublet_score"])


@pytest.mark.parametrize(("value", "match"), [
    (1, r"n_top_genes must be an integer of at least 2 or None \(all genes\), got 1"),
    (2.5, r"n_top_genes must be an integer .*got 2\.5"),
    (True, r"n_top_genes must be an integer .*got True"),
])
def test_bad_n_top_genes_is_refused(value, match, synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        ov.tl.omicvae(synthetic, layer="counts", n_top_genes=value, max_epochs=1)
    assert adata_fingerprint(synthetic) == before


def test_cells_without_counts_in_the_selected_genes_are_named(synthetic, adata_fingerprint):
    chosen = genes_to_model(synthetic, layer="counts", batch_key=None, n_top_genes=5)
    counts = synthetic.layers["counts"].tolil()
    counts[3, np.flatnonzero(chosen)] = 0
    counts[3, np.flatnonzero(~chosen)[0]] = 7  # still a cell with counts
    synthetic.layers["counts"] = counts.tocsr()
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=r"1 cell\(s\) have no counts in the 5 selected genes "
                       r"\(first: 'cell3'\).*larger n_top_genes"):
        ov.tl.omicvae(synthetic, layer="counts", n_top_genes=5, max_epochs=1)
    assert adata_fingerprint(synthetic) == before


def test_many_genes_without_selection_name_the_option_once(caplog):
    adata = ov.datasets.synthetic_counts(n_cells=20, n_genes=MANY_GENES + 1, n_batches=1)
    with caplog.at_level(logging.INFO, logger="omicvae_sc"):
        assert genes_to_model(adata, layer=None, batch_key=None, n_top_genes=None) is None
        genes_to_model(adata[:, :MANY_GENES], layer=None, batch_key=None, n_top_genes=None)
    said = [r for r in caplog.records if "n_top_genes=2000" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "--n-top-genes 2000" in said[0].getMessage()


def test_gene_selection_leaves_torchs_thread_count_alone(synthetic):
    # scanpy's seurat_v3 runs numba loops on torch's OpenMP runtime, which set its thread count
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    torch.set_num_threads(wanted)
    try:
        genes_to_model(synthetic, layer="counts", batch_key="batch", n_top_genes=20)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)
