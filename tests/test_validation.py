"""Bad input is rejected with a message that says what was found, and a failed call leaves the
AnnData exactly as it was (same fingerprint before and after)."""

from __future__ import annotations

import copy
import functools

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import omicvae_sc as ov
from omicvae_sc import OmicVAE


# ---------------------------------------------------------------------------- entry points
def _setup(adata, **kwargs):
    return OmicVAE.setup_anndata(adata, **kwargs)


def _tl(adata, **kwargs):
    return ov.tl.omicvae(adata, max_epochs=2, progress_bar=False, device="cpu", **kwargs)


ENTRY_POINTS = pytest.mark.parametrize("entry", [_setup, _tl], ids=["setup_anndata", "tl"])

FORMATS = {
    "dense": np.asarray,
    "csr": sp.csr_matrix,
    "csc": sp.csc_matrix,
}


def _with_x(adata: AnnData, dense: np.ndarray, fmt: str) -> AnnData:
    adata.X = FORMATS[fmt](dense)
    return adata


def _dense(adata: AnnData, dtype=np.float32) -> np.ndarray:
    return adata.layers["counts"].toarray().astype(dtype)


def _assert_rejected(entry, adata, fingerprint, exc, match, **kwargs):
    before = fingerprint(adata)
    with pytest.raises(exc, match=match):
        entry(adata, **kwargs)
    assert fingerprint(adata) == before


# ---------------------------------------------------------------------------- the fingerprint
def _rename_batches(adata):
    adata.obs["batch"] = adata.obs["batch"].cat.rename_categories(["b0", "b1"])


FINGERPRINT_EDITS = {
    "X": lambda a: a.X.data.__setitem__(0, a.X.data[0] + 1),
    "layer": lambda a: a.layers["counts"].data.__setitem__(0, 99),
    "new layer": lambda a: a.layers.__setitem__("extra", a.X.copy()),
    "X format": lambda a: setattr(a, "X", a.X.tocsc()),
    "obs": lambda a: a.obs.__setitem__("new", 1.0),
    "obs category": _rename_batches,
    "obs_names": lambda a: setattr(a, "obs_names", [f"c{i}" for i in range(a.n_obs)]),
    "var": lambda a: a.var.__setitem__("new", 1.0),
    "obsm": lambda a: a.obsm.__setitem__("X_new", np.zeros((a.n_obs, 2))),
    "uns": lambda a: a.uns.__setitem__("new", {"x": [1, 2]}),
    "uns nested": lambda a: a.uns["provenance"].__setitem__("seed", 1),
}


@pytest.mark.parametrize("edit", FINGERPRINT_EDITS.values(), ids=FINGERPRINT_EDITS.keys())
def test_fingerprint_sees_every_change(edit, synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    assert adata_fingerprint(synthetic.copy()) == before
    edit(synthetic)
    assert adata_fingerprint(synthetic) != before


# ---------------------------------------------------------------------------- counts
@ENTRY_POINTS
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_log_normalized_x_is_rejected(entry, fmt, synthetic, adata_fingerprint):
    adata = _with_x(synthetic, np.log1p(_dense(synthetic)), fmt)
    _assert_rejected(entry, adata, adata_fingerprint, ValueError,
                     r"adata\.X holds non-integer values \(first [0-9.]+ at cell 'cell0'")


@ENTRY_POINTS
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_non_integer_value_is_located(entry, fmt, synthetic, adata_fingerprint):
    dense = _dense(synthetic)
    dense[5, 7] = 0.5
    dense[8, 1] = 0.25  # first in column order: the report must still follow row order
    adata = _with_x(synthetic, dense, fmt)
    _assert_rejected(entry, adata, adata_fingerprint, ValueError,
                     r"adata\.X holds non-integer values \(first 0\.5 at cell 'cell5', "
                     r"gene 'gene7'\)\. The NB/ZINB likelihood needs raw counts")


@ENTRY_POINTS
def test_non_integer_layer_is_named(entry, synthetic, adata_fingerprint):
    synthetic.layers["counts"] = synthetic.layers["counts"] * 0.5
    _assert_rejected(entry, synthetic, adata_fingerprint, ValueError,
                     r"adata\.layers\['counts'\] holds non-integer values", layer="counts")


@ENTRY_POINTS
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_negative_values_are_rejected(entry, fmt, dtype, synthetic, adata_fingerprint):
    dense = _dense(synthetic, dtype)
    dense[5, 7] = -1
    dense[8, 1] = -2
    adata = _with_x(synthetic, dense, fmt)
    _assert_rejected(entry, adata, adata_fingerprint, ValueError,
                     r"adata\.X holds negative values \(first -1 at cell 'cell5', gene 'gene7'\)")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("bad", "what"), [(np.nan, "NaN or infinite"), (-3.0, "negative"),
                                           (2.5, "non-integer")])
def test_checks_in_small_blocks_still_find_a_late_bad_value(monkeypatch, fmt, bad, what,
                                                            synthetic, adata_fingerprint):
    """The count checks run a block at a time (their temporaries stay small); a bad value in the
    last block is found and located all the same."""
    from omicvae_sc.module import _memory

    monkeypatch.setattr(_memory, "BUDGET", 4)  # blocks of 8 values (Pass.VALIDATION: 2 budgets)
    dense = _dense(synthetic)
    last = dense.shape[0] - 1
    dense[last, 3] = bad
    adata = _with_x(synthetic, dense, fmt)
    _assert_rejected(_setup, adata, adata_fingerprint, ValueError,
                     rf"adata\.X holds {what} values \(first .* at cell 'cell{last}', "
                     r"gene 'gene3'\)")


@ENTRY_POINTS
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("bad", "shown"), [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_values_are_rejected(entry, fmt, bad, shown, synthetic, adata_fingerprint):
    dense = _dense(synthetic)
    dense[5, 7] = bad
    adata = _with_x(synthetic, dense, fmt)
    _assert_rejected(entry, adata, adata_fingerprint, ValueError,
                     rf"adata\.X holds NaN or infinite values \(first {shown} at cell 'cell5', "
                     r"gene 'gene7'\)")


@ENTRY_POINTS
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cell_with_zero_counts_is_rejected(entry, fmt, synthetic, adata_fingerprint):
    dense = _dense(synthetic)
    dense[3] = 0
    adata = _with_x(synthetic, dense, fmt)
    _assert_rejected(entry, adata, adata_fingerprint, ValueError,
                     r"1 cell\(s\) in adata\.X have zero total counts \(first: 'cell3'\)")


def test_raw_counts_in_a_layer_are_accepted_when_x_is_normalized(synthetic):
    synthetic.X = sp.csr_matrix(np.log1p(_dense(synthetic)))
    OmicVAE.setup_anndata(synthetic, layer="counts", batch_key="batch")
    assert synthetic.uns["omicvae_setup"]["layer"] == "counts"


@ENTRY_POINTS
def test_missing_x_is_rejected(entry, synthetic, adata_fingerprint):
    adata = AnnData(obs=synthetic.obs.copy(), var=synthetic.var.copy())
    _assert_rejected(entry, adata, adata_fingerprint, ValueError,
                     r"adata\.X is empty; pass layer= naming the layer that holds the raw counts")


@ENTRY_POINTS
def test_non_numeric_dtype_is_rejected(entry, synthetic, adata_fingerprint):
    synthetic.X = _dense(synthetic) > 0
    _assert_rejected(entry, synthetic, adata_fingerprint, TypeError,
                     r"adata\.X has dtype bool; expected numeric raw counts")


def test_pbmc_counts_pass_and_its_log_normalized_form_fails(pbmc, adata_fingerprint):
    OmicVAE.setup_anndata(pbmc, layer="counts", batch_key="cell_type")
    assert pbmc.uns["omicvae_setup"]["categories"]["cell_type"] == sorted(
        pbmc.obs["cell_type"].cat.categories)
    logged = pbmc.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    _assert_rejected(_setup, logged, adata_fingerprint, ValueError,
                     r"adata\.X holds non-integer values")


@pytest.mark.slow
def test_real_count_files_pass_validation(shared_data_dir):
    path = shared_data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in {shared_data_dir}")
    adata = ad.read_h5ad(path)
    OmicVAE.setup_anndata(adata, batch_key="batch")
    assert len(adata.uns["omicvae_setup"]["categories"]["batch"]) == 2


# ---------------------------------------------------------------------------- layers, obs
@ENTRY_POINTS
def test_missing_layer_is_rejected(entry, synthetic, adata_fingerprint):
    _assert_rejected(entry, synthetic, adata_fingerprint, KeyError,
                     r"adata\.layers has no layer 'spliced'; available layers: \['counts'\]",
                     layer="spliced")


@ENTRY_POINTS
def test_missing_batch_column_is_rejected(entry, synthetic, adata_fingerprint):
    _assert_rejected(entry, synthetic, adata_fingerprint, KeyError,
                     r"adata\.obs has no column 'donor' \(passed as batch_key\)",
                     batch_key="donor")


@ENTRY_POINTS
def test_missing_covariate_column_is_rejected(entry, synthetic, adata_fingerprint):
    _assert_rejected(entry, synthetic, adata_fingerprint, KeyError,
                     r"adata\.obs has no column 'donor' \(passed as categorical_covariate_keys\)",
                     categorical_covariate_keys=["donor"])


@ENTRY_POINTS
@pytest.mark.parametrize("categorical", [True, False], ids=["categorical", "object"])
def test_batch_with_nan_is_rejected(entry, categorical, synthetic, adata_fingerprint):
    batch = synthetic.obs["batch"].astype(object)
    batch.iloc[4] = np.nan
    synthetic.obs["batch"] = batch.astype("category") if categorical else batch
    _assert_rejected(entry, synthetic, adata_fingerprint, ValueError,
                     r"adata\.obs\['batch'\] \(passed as batch_key\) has missing values "
                     r"\(first at cell 'cell4'\)", batch_key="batch")


@ENTRY_POINTS
def test_repeated_covariate_key_is_rejected(entry, synthetic, adata_fingerprint):
    _assert_rejected(entry, synthetic, adata_fingerprint, ValueError,
                     r"Covariate keys must be distinct", batch_key="batch",
                     categorical_covariate_keys=["batch"])


# ---------------------------------------------------------------------------- the object
def test_a_view_gives_the_results_of_its_copy(synthetic, adata_fingerprint):
    """The scanpy tutorials' `adata = adata[:, adata.var.highly_variable]`, then the tool: the
    view becomes an actual AnnData as anndata does it (with its warning), the parent is
    untouched, and the results are those of the copy."""
    parent_before = adata_fingerprint(synthetic)
    view, copy_ = synthetic[:, 10:], synthetic[:, 10:].copy()
    with pytest.warns(ad.ImplicitModificationWarning, match="initializing view as actual"):
        _tl(view, layer="counts", batch_key="batch")
    _tl(copy_, layer="counts", batch_key="batch")
    assert not view.is_view
    assert adata_fingerprint(synthetic) == parent_before
    np.testing.assert_array_equal(view.obsm["X_omicvae"], copy_.obsm["X_omicvae"])
    for key in ("omicvae_log_likelihood", "omicvae_anomaly_score", "omicvae_doublet_score"):
        np.testing.assert_array_equal(view.obs[key], copy_.obs[key])


def test_setup_anndata_on_a_view(synthetic, adata_fingerprint):
    parent_before = adata_fingerprint(synthetic)
    view = synthetic[:50]
    with pytest.warns(ad.ImplicitModificationWarning):
        OmicVAE.setup_anndata(view, layer="counts")
    assert not view.is_view and "omicvae_setup" in view.uns
    assert adata_fingerprint(synthetic) == parent_before


@ENTRY_POINTS
def test_empty_anndata_is_rejected(entry, synthetic, adata_fingerprint):
    empty = synthetic[:0].copy()
    _assert_rejected(entry, empty, adata_fingerprint, ValueError,
                     r"adata is empty \(0 cells x 60 genes\)")


@ENTRY_POINTS
def test_duplicated_gene_names_are_rejected(entry, synthetic, adata_fingerprint):
    names = synthetic.var_names.tolist()
    names[1] = names[0]
    synthetic.var_names = names
    _assert_rejected(entry, synthetic, adata_fingerprint, ValueError,
                     r"duplicated gene names \(e\.g\. \['gene0'\]\).*var_names_make_unique")


@ENTRY_POINTS
@pytest.mark.parametrize("obj", [np.ones((5, 3)), sp.csr_matrix(np.ones((5, 3))), None],
                         ids=["ndarray", "csr_matrix", "None"])
def test_not_an_anndata_is_rejected(entry, obj):
    kind = type(obj).__name__
    with pytest.raises(TypeError, match=rf"Expected an AnnData object, found {kind}"):
        entry(obj)


# ---------------------------------------------------------------------------- hyperparameters
BAD_HYPERPARAMETERS = [
    ({"likelihood": "gaussian"},
     r"likelihood='gaussian' is not one of \['nb', 'zinb', 'poisson'\]"),
    ({"dispersion": "gene-cell"}, r"dispersion='gene-cell' is not one of"),
    ({"dispersion": "gene-batch"}, r"dispersion='gene-batch' needs a batch; run setup_anndata"),
    ({"n_latent": 0}, r"n_latent must be a positive integer, got 0"),
    ({"n_hidden": 2.5}, r"n_hidden must be a positive integer, got 2\.5"),
    ({"n_layers": -1}, r"n_layers must be a positive integer, got -1"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\), got 1\.0"),
    ({"dropout_rate": -0.1}, r"dropout_rate must be in \[0, 1\), got -0\.1"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_via_model(kwargs, match, synthetic, adata_fingerprint):
    OmicVAE.setup_anndata(synthetic, layer="counts")
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        OmicVAE(synthetic, device="cpu", **kwargs)
    assert adata_fingerprint(synthetic) == before


def _no_gpu(monkeypatch, cuda_build):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)


@pytest.mark.parametrize(("device", "cuda_build", "match"), [
    ("cuda", None, r"device='cuda', but this torch sees no CUDA GPU \(torch .*, a CPU-only "
                   r"build\)\. Use device='auto' to take a GPU when there is one, or "
                   r"device='cpu'"),
    ("cuda:1", "12.4", r"device='cuda:1', but this torch sees no CUDA GPU \(torch .*, built for "
                       r"CUDA 12\.4\)"),
    ("bogus", None, r"device='bogus' is not a device torch knows; use 'auto' \(CUDA when "
                    r"present\), 'cpu', 'cuda' or 'cuda:N'"),
])
def test_a_device_this_torch_cannot_use_is_refused(device, cuda_build, match, monkeypatch,
                                                    synthetic, adata_fingerprint):
    _no_gpu(monkeypatch, cuda_build)
    OmicVAE.setup_anndata(synthetic, layer="counts")
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        OmicVAE(synthetic, device=device)
    with pytest.raises(ValueError, match=match):
        ov.tl.omicvae(synthetic, layer="counts", max_epochs=1, device=device,
                      progress_bar=False)
    assert adata_fingerprint(synthetic) == before


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch, synthetic):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    OmicVAE.setup_anndata(synthetic, layer="counts")
    with pytest.raises(ValueError, match=r"device='cuda:2', but this torch sees 2 CUDA GPU\(s\) "
                                         r"\(cuda:0 to cuda:1\)"):
        OmicVAE(synthetic, device="cuda:2")


def test_mps_where_there_is_none_is_refused(monkeypatch, synthetic):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    OmicVAE.setup_anndata(synthetic, layer="counts")
    with pytest.raises(ValueError, match=r"device='mps', but this torch cannot use an Apple GPU"):
        OmicVAE(synthetic, device="mps")


@pytest.mark.parametrize(("kwargs", "match"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_via_tl(kwargs, match, synthetic, adata_fingerprint):
    # tl.omicvae takes n_latent and likelihood itself, the rest through model_kwargs
    direct = {k: v for k, v in kwargs.items() if k in ("n_latent", "likelihood")}
    model_kwargs = {k: v for k, v in kwargs.items() if k not in direct}
    _assert_rejected(_tl, synthetic, adata_fingerprint, ValueError, match, layer="counts",
                     model_kwargs=model_kwargs, **direct)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\), got 1\.0"),
        ({"validation_fraction": -0.2}, r"validation_fraction must be in \[0, 1\), got -0\.2"),
        ({"validation_fraction": 0.0, "early_stopping": True},
         r"early_stopping=True needs a validation split.*raise validation_fraction"),
    ],
)
def test_bad_training_arguments(kwargs, match, synthetic, adata_fingerprint):
    OmicVAE.setup_anndata(synthetic, layer="counts")
    model = OmicVAE(synthetic, device="cpu")
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        model.train(2, progress_bar=False, **kwargs)
    assert adata_fingerprint(synthetic) == before
    assert len(model.history) == 0
    assert not model.is_trained
    with pytest.raises(ValueError, match=match):
        _tl(synthetic, layer="counts", train_kwargs=kwargs)
    assert adata_fingerprint(synthetic) == before


def test_model_on_anndata_never_set_up(synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    with pytest.raises(KeyError, match=r"adata\.uns has no 'omicvae_setup': this AnnData was not "
                                        r"set up\. Run `OmicVAE\.setup_anndata"):
        OmicVAE(synthetic, device="cpu")
    assert adata_fingerprint(synthetic) == before


def test_model_on_a_view_trains_as_on_its_copy(synthetic):
    OmicVAE.setup_anndata(synthetic, layer="counts")
    view, copy_ = synthetic[:60], synthetic[:60].copy()
    latents = []
    for adata in (view, copy_):
        model = OmicVAE(adata, device="cpu")
        model.train(2, progress_bar=False)
        latents.append(model.get_latent_representation())
    assert view.is_view  # training only reads
    np.testing.assert_array_equal(*latents)


def test_a_view_is_read_and_written_as_its_copy(trained, synthetic, adata_fingerprint):
    parent_before = adata_fingerprint(synthetic)
    view, copy_ = synthetic[:40], synthetic[:40].copy()
    np.testing.assert_array_equal(trained.get_latent_representation(view),
                                  trained.get_latent_representation(copy_))
    assert view.is_view
    with pytest.warns(ad.ImplicitModificationWarning):
        trained.write_results(view, anomaly=False, doublets=False)
    trained.write_results(copy_, anomaly=False, doublets=False)
    assert not view.is_view
    np.testing.assert_array_equal(view.obs["omicvae_log_likelihood"],
                                  copy_.obs["omicvae_log_likelihood"])
    assert adata_fingerprint(synthetic) == parent_before


@ENTRY_POINTS
def test_backed_anndata_is_read_from_disk_and_the_file_left_alone(entry, tmp_path, synthetic):
    """Set-up and ``tl.omicvae`` on an AnnData opened with ``backed="r"`` (the counts layer,
    which anndata has loaded, is read from the file): results land in the object in memory,
    the file is byte for byte what it was."""
    path = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(path)
    on_disk = path.read_bytes()
    backed = ad.read_h5ad(path, backed="r")
    try:
        entry(backed, layer="counts")
        assert "omicvae_setup" in backed.uns or "X_omicvae" in backed.obsm
    finally:
        backed.file.close()
    assert path.read_bytes() == on_disk


@ENTRY_POINTS
def test_one_cell_is_rejected_by_training(entry, synthetic, adata_fingerprint):
    adata = synthetic[:1].copy()
    if entry is _setup:  # setup accepts it; training cannot fit one cell
        entry(adata, layer="counts")
        adata_fingerprint_before = adata_fingerprint(adata)
        with pytest.raises(ValueError, match=r"Training needs at least 2 cells outside the "
                                             r"validation split; found 1"):
            OmicVAE(adata, device="cpu").train(progress_bar=False)
        assert adata_fingerprint(adata) == adata_fingerprint_before
    else:
        _assert_rejected(entry, adata, adata_fingerprint, ValueError,
                         r"Training needs at least 2 cells outside the validation split; found 1")


@ENTRY_POINTS
def test_non_integer_values_are_fitted_with_a_warning_when_allowed(entry, synthetic):
    synthetic.layers["counts"] = synthetic.layers["counts"] * 1.25
    with pytest.warns(UserWarning, match=r"adata\.layers\['counts'\] holds non-integer values "
                                         r"\(first .*\)\. Fitting them as given "
                                         r"\(allow_non_integer=True\)"):
        entry(synthetic, layer="counts", allow_non_integer=True)
    if entry is _setup:
        assert synthetic.uns["omicvae_setup"]["allow_non_integer"]
        model = OmicVAE(synthetic, device="cpu", n_latent=2)
        with pytest.warns(UserWarning, match="allow_non_integer=True"):
            model.train(2, progress_bar=False)
    else:
        assert np.isfinite(synthetic.obsm["X_omicvae"]).all()


@ENTRY_POINTS
def test_genes_without_counts_are_kept_and_said(entry, synthetic):
    dense = _dense(synthetic)
    dense[:, [3, 10]] = 0
    synthetic.layers["counts"] = sp.csr_matrix(dense)
    with pytest.warns(UserWarning, match=r"2 of 60 genes in adata\.layers\['counts'\] have no "
                                         r"counts in any cell \(e\.g\. \['gene3', 'gene10'\]\); "
                                         r"they are kept"):
        entry(synthetic, layer="counts")
    if entry is _tl:
        assert synthetic.layers["counts"].shape[1] == 60 and "X_omicvae" in synthetic.obsm


@ENTRY_POINTS
def test_a_batch_of_one_cell_is_rejected(entry, synthetic, adata_fingerprint):
    batch = synthetic.obs["batch"].astype(str).to_numpy().copy()
    batch[7] = "lonely"
    synthetic.obs["batch"] = batch
    seen = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=r"adata\.obs\['batch'\] \(the batch\) has 1 batch of "
                                         r"a single cell \(\['lonely'\]\)"):
        entry(synthetic, layer="counts", batch_key="batch")
    assert adata_fingerprint(synthetic) == seen


@ENTRY_POINTS
def test_a_covariate_category_of_one_cell_is_said(entry, synthetic):
    synthetic.obs["site"] = np.where(np.arange(synthetic.n_obs) == 7, "lonely", "main")
    with pytest.warns(UserWarning, match=r"adata\.obs\['site'\] has 1 category with a single "
                                         r"cell \(\['lonely'\]\)"):
        entry(synthetic, layer="counts", categorical_covariate_keys=["site"])


# ---------------------------------------------------------------------------- a trained model
@functools.cache
def _trained_model() -> OmicVAE:
    """Trained 3 epochs on float CSR counts in layers['counts'], with a batch. Read-only."""
    adata = ov.datasets.synthetic_counts(n_cells=300, n_genes=60, n_groups=3, n_batches=2, seed=0)
    OmicVAE.setup_anndata(adata, layer="counts", batch_key="batch")
    model = OmicVAE(adata, n_latent=4, seed=0, device="cpu")
    model.train(3, progress_bar=False)
    return model


@pytest.fixture
def trained() -> OmicVAE:
    return _trained_model()


def _assert_all_getters_reject(model, adata, fingerprint, exc, match):
    before = fingerprint(adata)
    calls = [
        lambda: model.get_latent_representation(adata),
        lambda: model.get_normalized_expression(adata),
        lambda: model.get_marginal_ll(adata, n_samples=2),
        lambda: model.posterior_predictive_sample(adata),
        lambda: model.write_results(adata, n_samples=2),
    ]
    for call in calls:
        with pytest.raises(exc, match=match):
            call()
        assert fingerprint(adata) == before


def test_trained_model_rejects_missing_gene(trained, synthetic, adata_fingerprint):
    adata = synthetic[:, 1:].copy()
    _assert_all_getters_reject(trained, adata, adata_fingerprint, ValueError,
                               r"adata has 59 genes but the model was trained on 60\. 1 of the "
                               r"model's genes are not in adata \(e\.g\. \['gene0'\]\), so "
                               r"subsetting cannot help")


def test_trained_model_rejects_reordered_genes(trained, synthetic, adata_fingerprint):
    order = list(synthetic.var_names)
    order[3], order[4] = order[4], order[3]
    adata = synthetic[:, order].copy()
    _assert_all_getters_reject(trained, adata, adata_fingerprint, ValueError,
                               r"adata's genes differ from the model's \(2 positions; first at 3: "
                               r".*Reorder or subset adata to the model's genes first: `adata = "
                               r"adata\[:, model\.var_names\]\.copy\(\)`")


def test_reordered_genes_message_names_genes_plainly(trained, synthetic):
    order = list(synthetic.var_names)
    order[3], order[4] = order[4], order[3]
    with pytest.raises(ValueError, match=r"first at 3: 'gene4' where the model has 'gene3'\)"):
        trained.get_latent_representation(synthetic[:, order].copy())


def test_trained_model_rejects_unseen_batch(trained, synthetic, adata_fingerprint):
    batch = synthetic.obs["batch"].astype(str)
    batch.iloc[:10] = "batch9"
    synthetic.obs["batch"] = batch.astype("category")
    _assert_all_getters_reject(trained, synthetic, adata_fingerprint, ValueError,
                               r"adata\.obs\['batch'\] holds categories the model was not trained "
                               r"on: \['batch9'\]; known categories: \['batch0', 'batch1'\]")


def test_trained_model_rejects_missing_batch_column(trained, synthetic, adata_fingerprint):
    del synthetic.obs["batch"]
    _assert_all_getters_reject(trained, synthetic, adata_fingerprint, KeyError,
                               r"adata\.obs has no column 'batch'")


def test_trained_model_rejects_bad_counts_in_new_data(trained, synthetic, adata_fingerprint):
    synthetic.layers["counts"] = sp.csr_matrix(np.log1p(_dense(synthetic)))
    _assert_all_getters_reject(trained, synthetic, adata_fingerprint, ValueError,
                               r"adata\.layers\['counts'\] holds non-integer values")


def test_unknown_transform_batch_is_rejected(trained):
    with pytest.raises(ValueError, match=r"transform_batch='batch7' is not a known batch; known: "
                                         r"\['batch0', 'batch1'\]"):
        trained.get_normalized_expression(transform_batch="batch7")


def test_unknown_gene_in_gene_list_is_rejected(trained):
    match = r"gene_list names genes the model does not have: \['NOPE'\]"
    with pytest.raises(KeyError, match=match):
        trained.get_normalized_expression(gene_list=["gene1", "NOPE"])
    with pytest.raises(KeyError, match=match):
        trained.posterior_predictive_sample(gene_list=["NOPE"])


def test_transform_batch_without_batch_is_rejected(synthetic):
    OmicVAE.setup_anndata(synthetic, layer="counts")
    model = OmicVAE(synthetic, n_latent=2, device="cpu")
    with pytest.raises(ValueError, match=r"transform_batch needs a model set up with batch_key="):
        model.get_normalized_expression(transform_batch="batch0")


# ---------------------------------------------------------------------------- files
def test_load_of_a_folder_that_is_not_a_model(tmp_path, synthetic):
    (tmp_path / "notes.txt").write_text("not a model")
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match=r"is not an omicvae_sc model folder \("
                                                    r"expected metadata\.json\)"):
            OmicVAE.load(path, synthetic, device="cpu")


def test_load_of_altered_weights_is_rejected(tmp_path, trained, synthetic):
    path = tmp_path / "model"
    trained.save(path)
    (weights,) = path.glob("weights-*.pt")
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"weights-[0-9a-f]{16}\.pt does not match the checksum "
                                         r"in metadata\.json: truncated or altered"):
        OmicVAE.load(path, synthetic, device="cpu")


def test_load_onto_different_genes_is_rejected(tmp_path, trained, synthetic, adata_fingerprint):
    path = tmp_path / "model"
    trained.save(path)
    adata = synthetic[:, ::-1].copy()
    before = adata_fingerprint(adata)
    with pytest.raises(ValueError, match=r"adata's genes differ from the model's .* first: "
                       r"`adata = adata\[:, ov\.OmicVAE\.saved_var_names\('.*model'\)\]"
                       r"\.copy\(\)`") as err:
        OmicVAE.load(path, adata, device="cpu")
    assert adata_fingerprint(adata) == before
    # the line the message suggests works, with only the objects the user has
    fix = str(err.value).rsplit("`", 2)[-2]
    namespace = {"adata": adata, "ov": ov}
    exec(fix, namespace)
    model = OmicVAE.load(path, namespace["adata"], device="cpu")
    np.testing.assert_array_equal(model.get_latent_representation(),
                                  trained.get_latent_representation(synthetic))


def test_save_onto_existing_path_needs_overwrite(tmp_path, trained):
    path = tmp_path / "model"
    path.mkdir()
    (path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"model already exists; pass overwrite=True"):
        trained.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    with pytest.raises(FileExistsError, match=r"model exists and is not an omicvae_sc model "
                                              r"folder \(no metadata\.json\); it is left alone"):
        trained.save(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == ["keep.txt"]


def test_overwrite_replaces_a_model_and_leaves_one_weights_file(tmp_path, trained):
    path = tmp_path / "model"
    trained.save(path)
    other = copy.deepcopy(trained)
    other.module.log_theta.data += 1.0  # a different model under the same path
    other.save(path, overwrite=True)
    names = sorted(p.name for p in path.iterdir())
    assert len(names) == 2 and names[0] == "metadata.json" and names[1].startswith("weights-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------------- formats agree
FORMAT_CASES = [(fmt, dtype) for fmt in FORMATS for dtype in (np.int64, np.float32, np.float64)]


@pytest.mark.parametrize(("fmt", "dtype"), FORMAT_CASES,
                         ids=[f"{f}-{np.dtype(d).name}" for f, d in FORMAT_CASES])
def test_formats_and_dtypes_agree(fmt, dtype, trained, synthetic):
    reference = synthetic.copy()
    OmicVAE.setup_anndata(reference, layer="counts", batch_key="batch")
    expected_latent = trained.get_latent_representation(reference)

    counts = FORMATS[fmt](_dense(synthetic, dtype))
    adata = synthetic.copy()
    adata.X = counts
    adata.layers["counts"] = counts.copy()
    for layer in ("counts", None):
        OmicVAE.setup_anndata(adata, layer=layer, batch_key="batch")
        OmicVAE.setup_anndata(reference, layer=layer, batch_key="batch")
        assert adata.uns["omicvae_setup"] == reference.uns["omicvae_setup"]
    OmicVAE.setup_anndata(adata, layer="counts", batch_key="batch")
    latent = trained.get_latent_representation(adata)
    np.testing.assert_array_equal(latent, expected_latent)
    assert latent.shape == (300, 4)
    np.testing.assert_array_equal(trained.get_normalized_expression(adata, gene_list=["gene2"]),
                                  trained.get_normalized_expression(reference, gene_list=["gene2"]))
