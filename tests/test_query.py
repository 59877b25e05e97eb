"""Query surgery (``OmicVAE.load_query_data``) and ``ov.tl.map_query``: the reference stays
bitwise as it was, only the new batch's parameters learn, the query's missing genes are out of
the likelihood, a withheld cell type is flagged as novel, and every bad query is an error that
leaves the query as it was."""

from __future__ import annotations

import functools

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

import omicvae_sc as ov
from omicvae_sc.model._novelty import combine_novelty, empirical_pvalues, left_out_pvalues


@functools.cache
def _reference() -> tuple[ov.OmicVAE, ad.AnnData, ad.AnnData]:
    """A reference fitted on batches 0 and 1 of synthetic counts (gene-batch dispersion, so a
    new batch also gains dispersions), and batch 2 as the query."""
    adata = ov.datasets.synthetic_counts(n_cells=900, n_genes=80, n_groups=3, n_batches=3,
                                         batch_effect=1.0, seed=3)
    ref = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    ov.OmicVAE.setup_anndata(ref, layer="counts", batch_key="batch")
    model = ov.OmicVAE(ref, dispersion="gene-batch", n_latent=5, device="cpu")
    model.train(max_epochs=40, progress_bar=False)
    return model, ref, query


@pytest.fixture
def reference():
    model, ref, query = _reference()
    return model, ref.copy(), query.copy()


def _state(model: ov.OmicVAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_query_training_changes_only_the_new_batch_and_the_reference_stays_bitwise(reference):
    model, ref, query = reference
    before = _state(model)
    z_ref = model.get_latent_representation(ref)
    shuffled = query[:, query.var_names[::-1]].copy()  # genes found by name, not position
    qm = ov.OmicVAE.load_query_data(shuffled, model)
    assert qm.setup.categories[0] == ("batch0", "batch1", "batch2")
    trainable = {n for n, p in qm.module.named_parameters() if p.requires_grad}
    assert trainable == {"decoder.body.net.0.weight", "log_theta"}
    start = _state(qm)
    qm.train(max_epochs=15, progress_bar=False)
    after = _state(qm)
    # the reference object: every tensor as it was
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    # in the query's model, the reference's entries are bitwise the reference's ...
    n_in = before["decoder.body.net.0.weight"].shape[1]
    assert torch.equal(after["decoder.body.net.0.weight"][:, :n_in],
                       before["decoder.body.net.0.weight"])
    assert torch.equal(after["log_theta"][:2], before["log_theta"])
    for k in before:
        if k not in ("decoder.body.net.0.weight", "log_theta"):
            assert torch.equal(after[k], before[k]), k  # BatchNorm statistics included
    # ... and the new batch's moved
    assert not torch.equal(after["decoder.body.net.0.weight"][:, n_in:],
                           start["decoder.body.net.0.weight"][:, n_in:])
    assert not torch.equal(after["log_theta"][2], start["log_theta"][2])
    # the query's model encodes reference cells exactly as the reference does
    assert np.array_equal(qm.get_latent_representation(ref), z_ref)


def test_query_training_makes_the_new_batch_more_likely(reference):
    model, _, query = reference
    qm = ov.OmicVAE.load_query_data(query, model)
    before = qm.get_marginal_ll(n_samples=20).mean()
    qm.train(max_epochs=30, progress_bar=False)
    after = qm.get_marginal_ll(n_samples=20).mean()
    assert after > before + 1.0, (before, after)


def test_unfreeze_options_open_the_encoders_first_layer_or_everything(reference):
    model, _, query = reference
    before = _state(model)
    first = ov.OmicVAE.load_query_data(query, model, unfreeze="encoder_first_layer")
    trainable = {n for n, p in first.module.named_parameters() if p.requires_grad}
    assert {"encoder.body.net.0.weight", "encoder.body.net.1.weight"} <= trainable
    assert "encoder.mean.weight" not in trainable
    everything = ov.OmicVAE.load_query_data(query, model, unfreeze="all")
    everything.train(max_epochs=3, progress_bar=False)
    assert all(p.requires_grad for p in everything.module.parameters())
    assert not torch.equal(everything.module.encoder.mean.weight, before["encoder.mean.weight"])
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_missing_genes_are_zero_filled_masked_and_counted(reference, tmp_path):
    model, _, query = reference
    dropped = list(model.var_names[:4])
    partial = query[:, [g for g in query.var_names if g not in dropped]].copy()
    with pytest.warns(UserWarning, match="did not measure 4 of the reference's 80 genes"):
        qm = ov.OmicVAE.load_query_data(partial, model)
    assert qm._query.missing == tuple(dropped)
    counts, codes = qm._host_data(None)
    assert counts.shape == (partial.n_obs, 80)
    assert sp.csr_matrix(counts)[:, :4].nnz == 0
    # their expected count is zero, so they add nothing to log p(x | z)
    x = torch.as_tensor(sp.csr_matrix(counts)[:8].toarray())
    c = torch.as_tensor(codes[:8])
    with torch.no_grad():
        z = qm.module.inference(x, c).mean
        params = qm.module.generative(z, x.sum(-1, keepdim=True), c)
    mu = torch.softmax(params.logits.float(), -1) * params.library  # the NB mean
    assert float(mu[:, :4].abs().max()) == 0.0
    np.testing.assert_allclose(mu.sum(-1).numpy(), x.sum(-1).numpy(), rtol=1e-4)
    assert float(params.distribution().mean[:, :4].abs().max()) == 0.0
    # saved and loaded, the query's model reads the query the same way
    qm.train(max_epochs=3, progress_bar=False)
    qm.save(tmp_path / "query_model")
    loaded = ov.OmicVAE.load(tmp_path / "query_model", partial, device="cpu")
    assert loaded._query == qm._query
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  qm.get_latent_representation())


def test_a_query_without_new_categories_has_nothing_to_train(reference):
    model, ref, _ = reference
    qm = ov.OmicVAE.load_query_data(ref[:100].copy(), model)
    assert not any(p.requires_grad for p in qm.module.parameters())
    with pytest.raises(ValueError, match="Nothing to train"):
        qm.train(max_epochs=1, progress_bar=False)


def _bad_queries(query: ad.AnnData) -> list[tuple[str, ad.AnnData, dict, type, str]]:
    lognorm = query.copy()
    del lognorm.layers["counts"]
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm)
    ensembl = query.copy()
    ensembl.var_names = [f"ENSG{i:011d}" for i in range(ensembl.n_vars)]
    few = query[:, query.var_names[:20]].copy()
    no_batch = query.copy()
    del no_batch.obs["batch"]
    renamed = query.copy()
    renamed.obs = renamed.obs.rename(columns={"batch": "sample"})
    return [
        ("no counts", lognorm, {}, ValueError, "non-integer values"),
        ("Ensembl IDs", ensembl, {}, ValueError, "look like Ensembl IDs"),
        ("too few genes", few, {}, ValueError, "shares 20 of the reference's 80 genes"),
        ("no batch column", no_batch, {}, KeyError, "lacks"),
        ("wrong batch column", renamed, {"batch_key": "donor"}, KeyError, "lacks"),
        ("bad unfreeze", query.copy(), {"unfreeze": "decoder"}, ValueError, "unfreeze="),
        ("bad overlap", query.copy(), {"min_gene_overlap": 0}, ValueError, "min_gene_overlap"),
        ("missing layer", query.copy(), {"layer": "raw"}, KeyError, "no layer 'raw'"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_every_bad_query_is_an_error_and_the_query_is_untouched(reference, case,
                                                                 adata_fingerprint):
    model, _, query = reference
    name, bad, kwargs, error, match = _bad_queries(query)[case]
    seen = adata_fingerprint(bad)
    with pytest.raises(error, match=match):
        ov.OmicVAE.load_query_data(bad, model, **kwargs)
    if "unfreeze" not in kwargs:
        with pytest.raises(error, match=match):
            ov.OmicVAE.prepare_query_anndata(bad, model, **kwargs)
    assert adata_fingerprint(bad) == seen, name


def test_a_batch_key_for_a_reference_without_batches_is_an_error(reference, adata_fingerprint):
    _, ref, query = reference
    ov.OmicVAE.setup_anndata(ref, layer="counts")
    plain = ov.OmicVAE(ref, n_latent=3, device="cpu")
    plain.train(max_epochs=2, progress_bar=False)
    seen = adata_fingerprint(query)
    with pytest.raises(ValueError, match="trained without a batch covariate"):
        ov.OmicVAE.load_query_data(query, plain, batch_key="batch")
    with pytest.raises(ValueError, match="never trained"):
        ov.OmicVAE.load_query_data(query, ov.OmicVAE(ref, device="cpu"))
    assert adata_fingerprint(query) == seen


def test_the_query_batch_may_come_from_another_column_and_a_saved_reference(reference,
                                                                            tmp_path):
    model, _, query = reference
    model.save(tmp_path / "ref")
    renamed = query.copy()
    renamed.obs = renamed.obs.rename(columns={"batch": "sample"})
    renamed.obs["sample"] = "lab_x"
    qm = ov.OmicVAE.load_query_data(renamed, tmp_path / "ref", batch_key="sample")
    assert qm.setup.categories[0][-1] == "lab_x"
    aligned = ov.OmicVAE.prepare_query_anndata(renamed, tmp_path / "ref", batch_key="sample")
    assert list(aligned.var_names) == list(model.var_names)
    assert (aligned.obs["batch"] == "lab_x").all()
    assert "batch" not in renamed.obs  # the user's query is left as it was


def test_conformal_pvalues_are_uniform_for_exchangeable_cells():
    rng = np.random.default_rng(0)
    # a calibration set of n cells puts the rate within about sqrt(a (1 - a) / n) of a
    cal, new = rng.normal(size=(5000, 2)), rng.normal(size=(20000, 2))
    p = empirical_pvalues(cal[:, 0], new[:, 0])
    assert abs((p <= 0.05).mean() - 0.05) < 0.01
    assert abs((left_out_pvalues(cal[:, 0]) <= 0.1).mean() - 0.1) < 0.01
    found = combine_novelty(cal, new, alpha=0.05)
    assert abs(found.flagged.mean() - 0.05) < 0.015
    # a novel third of the cells is flagged; the rest, moved by a batch shift, is not
    novel = np.arange(len(new)) < len(new) // 3
    shifted = new + 0.7 + 4.0 * novel[:, None]
    found = combine_novelty(cal, shifted, alpha=0.05)
    assert found.flagged[novel].mean() > 0.9
    assert found.flagged[~novel].mean() < 0.08


def test_pvalues_beyond_a_small_calibration_keep_falling_and_stay_honest():
    rng = np.random.default_rng(1)
    cal = rng.normal(size=40)
    inside = np.linspace(cal.min(), cal.max(), 7)
    ordered = np.sort(cal)
    conformal = (1 + len(cal) - np.searchsorted(ordered, inside)) / 41
    np.testing.assert_allclose(empirical_pvalues(cal, inside), conformal)  # exact in range
    far = np.array([cal.max() + 0.5, cal.max() + 2, cal.max() + 4])
    p = empirical_pvalues(cal, far)
    assert (p < 1 / 41).all() and (np.diff(p) < 0).all()
    # exchangeable cells: flagged at 1% about 1% of the time, over many small calibrations
    rates = [(empirical_pvalues(rng.normal(size=40), rng.normal(size=2000)) <= 0.01).mean()
             for _ in range(200)]
    assert 0.003 < np.mean(rates) < 0.02, np.mean(rates)


@pytest.mark.slow
def test_map_query_flags_a_withheld_type_and_labels_known_cells(shared_data_dir):
    from sklearn.metrics import average_precision_score

    adata = ad.read_h5ad(shared_data_dir / "pbmc3k.h5ad")
    adata = adata[adata.obs["cell_type"].astype(str) != "unannotated"].copy()
    sc.pp.filter_genes(adata, min_cells=3)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=1500)
    adata = adata[:, adata.var["highly_variable"]].copy()
    types = adata.obs["cell_type"].astype(str).to_numpy()
    held = np.random.default_rng(0).random(adata.n_obs) < 0.2
    withheld = types == "B"
    ref = adata[~held & ~withheld].copy()
    query = adata[held | withheld].copy()
    query.obs["batch"] = "query"
    ov.OmicVAE.setup_anndata(ref, layer="counts")
    model = ov.OmicVAE(ref, device="cpu")
    model.train(max_epochs=120, progress_bar=False)
    ov.tl.map_query(query, model, adata_ref=ref, labels_key="cell_type", progress_bar=False)
    novel = query.obs["cell_type"].astype(str).to_numpy() == "B"
    score = query.obs["omicvae_novelty_score"].to_numpy()
    baseline = average_precision_score(novel, -model.get_marginal_ll(query, n_samples=20))
    assert average_precision_score(novel, score) > max(baseline, novel.mean()) + 0.2
    flagged = query.obs["omicvae_is_novel"].to_numpy()
    assert flagged[~novel].mean() <= 0.03  # the default rule: about 1% of known cells
    assert flagged[novel].mean() > 5 * flagged[~novel].mean()
    called = query.obs["omicvae_label"].astype(str).to_numpy()
    assert (called[~novel] == query.obs["cell_type"].astype(str).to_numpy()[~novel]).mean() \
        > 0.8
    assert "X_omicvae" in ref.obsm and query.uns["omicvae_mapping"]["novelty"]["alpha"] == 0.01


def test_map_query_writes_a_shared_latent_labels_and_novelty(reference, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model, ref, query = reference
    mapped = ov.tl.map_query(query, model, adata_ref=ref, labels_key="group", max_epochs=5,
                             progress_bar=False, save_model=tmp_path / "q", copy=True)
    assert "X_omicvae" not in query.obsm and "X_omicvae" not in ref.obsm  # copy=True
    for key in ("omicvae_label", "omicvae_label_uncertainty", "omicvae_novelty_score",
                "omicvae_novelty_pvalue", "omicvae_is_novel"):
        assert key in mapped.obs
    record = mapped.uns["omicvae_mapping"]
    assert record["trained"] and record["epochs"] == 5
    assert record["novelty"]["n_calibration"] == int(model.held_out_cells.sum())
    # the query's groups are the reference's: labels come back, few cells are novel (a
    # strong new batch the frozen encoder never saw: 4-8% flagged at alpha 1%; without the
    # centring on the query's median, 45%)
    right = mapped.obs["omicvae_label"].astype(str) == mapped.obs["group"].astype(str)
    assert right.mean() > 0.9
    assert mapped.obs["omicvae_is_novel"].mean() < 0.1
    loaded = ov.OmicVAE.load(tmp_path / "q", query, device="cpu")
    np.testing.assert_allclose(loaded.get_latent_representation(), mapped.obsm["X_omicvae"])
    # in place, and on one embedding with the reference
    ov.tl.map_query(query, model, adata_ref=ref, max_epochs=2, progress_bar=False)
    both = ad.concat([ref, query], label="dataset", keys=["reference", "query"])
    fig = ov.pl.mapping(both, show=False)
    assert len(fig.axes) >= 2
    with pytest.raises(KeyError, match="no column 'batch_of'"):
        ov.pl.mapping(both, dataset_key="batch_of", show=False)


def test_an_encoder_that_adapts_to_a_strong_new_batch_flags_near_the_nominal_rate(
        reference):
    model, ref, query = reference
    ov.tl.map_query(query, model, adata_ref=ref, labels_key="group", max_epochs=50,
                    unfreeze="encoder_first_layer", progress_bar=False)
    right = query.obs["omicvae_label"].astype(str) == query.obs["group"].astype(str)
    assert right.mean() > 0.95
    assert query.obs["omicvae_is_novel"].mean() < 0.04  # alpha 0.01; 2.0% measured


def test_map_query_rejects_bad_arguments_before_training(reference, tmp_path,
                                                         adata_fingerprint):
    model, ref, query = reference
    seen = adata_fingerprint(query)
    with pytest.raises(ValueError, match="pass them as adata_ref"):
        ov.tl.map_query(query, model, labels_key="group")
    with pytest.raises(KeyError, match="no column 'cell_type'"):
        ov.tl.map_query(query, model, adata_ref=ref, labels_key="cell_type")
    with pytest.raises(ValueError, match="novelty_alpha must be in"):
        ov.tl.map_query(query, model, adata_ref=ref, novelty_alpha=1.5)
    with pytest.raises(ValueError, match="n_neighbors must be an integer"):
        ov.tl.map_query(query, model, adata_ref=ref, labels_key="group", n_neighbors=0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        ov.tl.map_query(query, model, save_model=tmp_path / "taken")
    assert adata_fingerprint(query) == seen
    assert "X_omicvae" not in ref.obsm


def test_a_query_and_a_reference_on_disk_map_as_in_memory(reference, tmp_path):
    model, ref, query = reference
    query.write_h5ad(tmp_path / "query.h5ad")
    ref.write_h5ad(tmp_path / "ref.h5ad")
    on_disk = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    ref_on_disk = ad.read_h5ad(tmp_path / "ref.h5ad", backed="r")
    in_memory = ov.OmicVAE.load_query_data(query, model)
    from_file = ov.OmicVAE.load_query_data(on_disk, model)
    np.testing.assert_array_equal(from_file.get_latent_representation(),
                                  in_memory.get_latent_representation())
    copy = query.copy()
    ov.tl.map_query(copy, model, adata_ref=ref, max_epochs=3, progress_bar=False)
    with pytest.raises(ValueError, match="cannot copy an AnnData whose counts are on disk"):
        ov.tl.map_query(on_disk, model, adata_ref=ref_on_disk, copy=True)
    ov.tl.map_query(on_disk, model, adata_ref=ref_on_disk, max_epochs=3, progress_bar=False)
    np.testing.assert_allclose(on_disk.obs["omicvae_novelty_score"],
                               copy.obs["omicvae_novelty_score"], rtol=1e-5)
    np.testing.assert_array_equal(ref_on_disk.obsm["X_omicvae"], ref.obsm["X_omicvae"])
