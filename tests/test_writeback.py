"""``tl.omicvae`` writes exactly the documented keys, renames them with ``key_added``, leaves the
input alone with ``copy=True``, writes sensible scores, round-trips through h5ad and logs what
it added."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from anndata import AnnData

import omicvae_sc as ov
from omicvae_sc.data import FIELDS, SCHEMA_VERSION, AnnDataSetup, ResultsRecord
from omicvae_sc.train import History

EPOCHS = 3
ATTRS = ("obsm", "obs", "layers", "uns")


def _fit(adata: AnnData, **kwargs) -> AnnData | None:
    kwargs = {"layer": "counts", "batch_key": "batch", "n_latent": 4, "max_epochs": EPOCHS,
              "progress_bar": False, "device": "cpu", "seed": 0, **kwargs}
    return ov.tl.omicvae(adata, **kwargs)


def _keys(adata: AnnData) -> dict[str, set[str]]:
    return {attr: set(getattr(adata, attr).keys()) for attr in ATTRS}


def _expected(key: str, layers: bool) -> dict[str, set[str]]:
    return {
        "obsm": {f"X_{key}"},
        "obs": {f"{key}_log_likelihood", f"{key}_rate", f"{key}_distortion",
                f"{key}_anomaly_score", f"{key}_is_anomaly", f"{key}_doublet_score",
                f"{key}_is_doublet"},
        "layers": {f"{key}_denoised"} if layers else set(),
        "uns": {key},
    }


@functools.cache
def _fitted(layers: bool = False, key_added: str = "omicvae") -> AnnData:
    adata = ov.datasets.synthetic_counts(n_cells=300, n_genes=60, n_groups=3, n_batches=2, seed=0)
    assert _fit(adata, layers=layers, key_added=key_added) is None
    return adata


def fitted(**kwargs) -> AnnData:
    """A copy of the cached result of one short fit."""
    return _fitted(**kwargs).copy()


# ---------------------------------------------------------------------------- keys
@pytest.mark.parametrize("layers", [False, True], ids=["layers=False", "layers=True"])
def test_writes_exactly_the_documented_keys(layers, synthetic, adata_fingerprint):
    before_keys, before = _keys(synthetic), adata_fingerprint(synthetic)
    adata = fitted(layers=layers)
    after = _keys(adata)
    added = {attr: after[attr] - before_keys[attr] for attr in ATTRS}
    assert added == _expected("omicvae", layers)
    assert all(before_keys[attr] <= after[attr] for attr in ATTRS)
    assert set(adata.uns["omicvae"]) == {"params", "setup", "history", "anomaly", "doublet",
                                        "latent_diagnostics", "schema_version"}
    record = ResultsRecord.read(adata)
    assert record.schema_version == SCHEMA_VERSION
    for kind in ("anomaly", "doublet"):
        assert set(record.flag_rule(kind)) == {"rule", "value", "threshold", "n_flagged"}

    for attr, keys in added.items():  # take them away again: nothing else was touched
        for key in keys:
            del getattr(adata, attr)[key]
    assert adata_fingerprint(adata) == before


def test_scores_can_be_switched_off(synthetic):
    adata = synthetic.copy()
    _fit(adata, anomaly=False, doublets=False)
    assert {k for k in adata.obs if k.startswith("omicvae_")} == {
        "omicvae_log_likelihood", "omicvae_rate", "omicvae_distortion"}
    record = ResultsRecord.read(adata)
    assert record.anomaly is None and record.doublet is None
    assert set(adata.uns["omicvae"]) == {"params", "setup", "history", "latent_diagnostics",
                                        "schema_version"}


def test_documented_keys_are_the_written_keys():
    returns = ov.tl.omicvae.__doc__.split("Returns")[1]
    for attr, keys in _expected("omicvae", layers=True).items():
        for key in keys:
            assert f"adata.{attr}['{key}']" in returns


@pytest.mark.parametrize("layers", [False, True], ids=["layers=False", "layers=True"])
def test_key_added_renames_every_key(layers, synthetic):
    before_keys = _keys(synthetic)
    adata = fitted(layers=layers, key_added="foo")
    added = {attr: _keys(adata)[attr] - before_keys[attr] for attr in ATTRS}
    assert added == _expected("foo", layers)
    assert not any("omicvae" in key for keys in added.values() for key in keys)


def test_save_model_writes_a_model_that_loads_onto_the_results(synthetic, tmp_path):
    adata = synthetic.copy()
    _fit(adata, save_model=tmp_path / "model", anomaly=False, doublets=False)
    model = ov.OmicVAE.load(tmp_path / "model", adata)
    np.testing.assert_array_equal(model.get_latent_representation(), adata.obsm["X_omicvae"])


def test_save_model_onto_an_existing_path_is_refused_before_training(synthetic, tmp_path,
                                                                     adata_fingerprint):
    (tmp_path / "model").mkdir()
    before = adata_fingerprint(synthetic)
    with pytest.raises(FileExistsError, match=r"save_model folder '.*model' already exists; "
                                              r"choose a new one"):
        _fit(synthetic, save_model=tmp_path / "model")
    assert adata_fingerprint(synthetic) == before
    assert not any((tmp_path / "model").iterdir())


def test_copy_returns_a_new_anndata_and_leaves_the_input_alone(synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    out = _fit(synthetic, copy=True)
    assert isinstance(out, AnnData)
    assert out is not synthetic
    assert adata_fingerprint(synthetic) == before
    assert _keys(out) == {attr: _keys(synthetic)[attr] | _expected("omicvae", False)[attr]
                          for attr in ATTRS}
    # same seed, same numbers: the copy holds what an in-place call writes (CPU)
    in_place = fitted()
    np.testing.assert_array_equal(out.obsm["X_omicvae"], in_place.obsm["X_omicvae"])
    np.testing.assert_array_equal(out.obs["omicvae_log_likelihood"],
                                  in_place.obs["omicvae_log_likelihood"])


def test_bad_key_added_writes_nothing(synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=r"key_added must be a non-empty string, got ''"):
        _fit(synthetic, max_epochs=1, key_added="")
    assert adata_fingerprint(synthetic) == before


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model_kwargs": {"n_latent": 4}}, r"model_kwargs repeats \['n_latent'\]"),
    ({"train_kwargs": {"seed": 1, "max_epochs": 2}},
     r"train_kwargs repeats \['max_epochs', 'seed'\], which tl\.omicvae takes directly"),
])
def test_repeated_arguments_are_rejected_before_fitting(kwargs, match, synthetic,
                                                        adata_fingerprint):
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        ov.tl.omicvae(synthetic, layer="counts", progress_bar=False, **kwargs)
    assert adata_fingerprint(synthetic) == before


# ---------------------------------------------------------------------------- values
def test_written_values_have_the_documented_shapes():
    adata = fitted(layers=True)
    latent = adata.obsm["X_omicvae"]
    assert latent.shape == (adata.n_obs, 4)
    assert np.isfinite(latent).all()
    for suffix in ("log_likelihood", "rate", "distortion"):
        assert np.isfinite(adata.obs[f"omicvae_{suffix}"]).all()
    assert (adata.obs["omicvae_rate"] >= 0).all()  # a KL divergence
    assert (adata.obs["omicvae_distortion"] >= 0).all()  # -log of a probability mass
    denoised = adata.layers["omicvae_denoised"]
    assert denoised.shape == adata.shape
    assert (denoised >= 0).all()
    library = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    np.testing.assert_allclose(denoised.sum(axis=1), library, rtol=1e-4)  # each cell's own depth


def test_importance_weighted_bound_is_above_the_elbo():
    adata = fitted()
    log_lik = adata.obs["omicvae_log_likelihood"].to_numpy()
    elbo = -(adata.obs["omicvae_distortion"] + adata.obs["omicvae_rate"]).to_numpy()
    # IWAE >= ELBO holds in expectation (Jensen); the written ELBO uses the analytic KL, so
    # compare means with a small tolerance for Monte Carlo noise
    assert log_lik.mean() >= elbo.mean() - 0.1
    assert log_lik.mean() > -1e4  # finite and in a plausible range for 60 genes


def test_params_record_the_call():
    params = fitted().uns["omicvae"]["params"]
    assert params["n_latent"] == 4
    assert params["likelihood"] == "zinb"
    assert params["seed"] == 0
    assert params["device"] == "cpu"
    assert params["n_samples"] > 0


# ---------------------------------------------------------------------------- h5ad
@pytest.mark.parametrize("batch_key", ["batch", None], ids=["batch", "no batch"])
def test_round_trips_through_h5ad(batch_key, tmp_path, synthetic):
    _fit(synthetic, batch_key=batch_key, layers=True)
    path = tmp_path / "fitted.h5ad"
    synthetic.write_h5ad(path)
    back = ad.read_h5ad(path)

    np.testing.assert_array_equal(back.obsm["X_omicvae"], synthetic.obsm["X_omicvae"])
    np.testing.assert_array_equal(back.layers["omicvae_denoised"],
                                  synthetic.layers["omicvae_denoised"])
    for suffix in ("log_likelihood", "rate", "distortion"):
        np.testing.assert_array_equal(back.obs[f"omicvae_{suffix}"],
                                      synthetic.obs[f"omicvae_{suffix}"])
    uns, written = back.uns["omicvae"], synthetic.uns["omicvae"]
    assert uns["params"] == written["params"]
    assert AnnDataSetup.from_dict(uns["setup"]) == AnnDataSetup.from_dict(written["setup"])
    assert AnnDataSetup.from_dict(uns["setup"]).batch_key == batch_key

    history = History.from_dict(uns["history"])
    assert len(history) == EPOCHS
    assert history.epoch == tuple(range(EPOCHS))
    assert len(history.train_elbo) == len(history.kl_weight) == EPOCHS
    assert history == History.from_dict(written["history"])


# ---------------------------------------------------------------------------- logging
def test_logs_the_keys_added(caplog, synthetic):
    with caplog.at_level(logging.INFO, logger="omicvae_sc"):
        _fit(synthetic, max_epochs=2, key_added="bar", layers=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "omicvae_sc"]
    messages = [m for m in lines if " added " in m]
    assert len(messages) == 1
    stages = {m.split(": ", 1)[1].rsplit(" in ", 1)[0] for m in lines if m.endswith(" s")}
    assert stages == {"training", "log-likelihood, rate and distortion", "anomaly scores",
                      "doublet scores", "latent diagnostics and latents", "denoised expression",
                      "write-back"}
    for attr, keys in _expected("bar", layers=True).items():
        for key in keys:
            assert f"{attr}[{key!r}]" in messages[0]


# ---------------------------------------------------------------------------- the schema
def _readme_table_keys() -> set[str]:
    """The first column of the README's "What is written where" table."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## What is written where", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `adata.")]
    return {re.match(r"\| `adata\.(\w+)\[\"([^\"]+)\"\]`", row).groups() for row in rows}


def test_readme_table_lists_exactly_the_schema():
    in_schema = {(f.attribute, f.name("omicvae")) for f in FIELDS}
    assert _readme_table_keys() == in_schema


def test_written_keys_are_the_schema_fields(synthetic):
    adata = fitted(layers=True)
    added = {(attr, key) for attr in ATTRS
             for key in _keys(adata)[attr] - _keys(synthetic)[attr]}
    # var['<key>_genes'] comes only with n_top_genes (tests/test_full_genes.py)
    schema = {(f.attribute, f.name("omicvae")) for f in FIELDS if f.attribute != "var"}
    assert added == schema


def test_results_record_round_trips_through_h5ad_and_refuses_newer_layouts(tmp_path):
    adata = fitted()
    path = tmp_path / "fitted.h5ad"
    adata.write_h5ad(path)
    back = ResultsRecord.read(ad.read_h5ad(path))
    record = ResultsRecord.read(adata)
    assert back.params["likelihood"] == record.params["likelihood"]
    np.testing.assert_array_equal(back.history["train_elbo"], record.history["train_elbo"])
    assert back.doublet["n_flagged"] == record.doublet["n_flagged"]
    newer = {**adata.uns["omicvae"], "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(ValueError, match=r"schema version 2; this omicvae_sc reads up to 1"):
        ResultsRecord.from_uns(newer)
    older = {k: v for k, v in adata.uns["omicvae"].items() if k != "schema_version"}
    assert ResultsRecord.from_uns(older).schema_version == 1  # written before the version


def test_reading_results_that_are_not_there_says_how_to_make_them(synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    with pytest.raises(KeyError, match=r"adata\.uns\['omicvae'\] holds no omicvae results; run "
                                       r"ov\.tl\.omicvae\(adata, key_added='omicvae'\)"):
        ResultsRecord.read(synthetic)
    assert adata_fingerprint(synthetic) == before


def test_long_stages_show_bars_and_the_bars_change_no_result(synthetic, monkeypatch, capsys):
    """On many cells each output stage shows a bar over its cells (doublets: over the units it
    scores), and an epoch of many steps a bar over its steps; the numbers are those of a run
    without bars. Thresholds lowered so that 300 cells count as many."""
    from omicvae_sc.model import _doublets, _runtime
    from omicvae_sc.train import _trainer

    ov.OmicVAE.setup_anndata(synthetic, layer="counts")
    model = ov.OmicVAE(synthetic, seed=0, device="cpu")
    monkeypatch.setattr(_trainer, "STEP_BAR_STEPS", 2)
    model.train(2, progress_bar=True)
    assert re.search(r"epoch: .*/3 \[", capsys.readouterr().err)  # 270 cells in batches of 128
    quiet, loud = synthetic.copy(), synthetic.copy()
    model.write_results(quiet, progress_bar=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_runtime, "PROGRESS_CELLS", 100)
    monkeypatch.setattr(_doublets, "MAX_UNIT_CELLS", 150)
    monkeypatch.setattr(_doublets, "UNIT_BLOCK_ROWS", 16)
    model.write_results(loud, progress_bar=True)
    err = capsys.readouterr().err
    for bar in (r"log p\(x\): .*/300 \[", r"anomaly scores: .*/300 \[", r"latents: .*/600 \[",
                r"doublet scores: .*/6 \["):
        assert re.search(bar, err), bar
    for key in ("omicvae_log_likelihood", "omicvae_anomaly_score"):
        np.testing.assert_array_equal(loud.obs[key], quiet.obs[key])
    np.testing.assert_array_equal(loud.obsm["X_omicvae"], quiet.obsm["X_omicvae"])


def test_a_stage_bar_counts_every_cell_of_every_pass(synthetic, monkeypatch):
    from omicvae_sc.data import CountTensors
    from omicvae_sc.model import _runtime

    monkeypatch.setattr(_runtime, "PROGRESS_CELLS", 100)
    data = CountTensors(synthetic.layers["counts"], None)
    with _runtime.cell_progress(data, "two passes", enabled=True, passes=2) as counted:
        for _ in range(2):
            assert sum(len(x) for x, _ in counted.batches(64, shuffle=False)) == 300
        assert counted._bar.n == counted._bar.total == 600
        assert counted.n_genes == data.n_genes  # the rest is the data's own
    with _runtime.cell_progress(data, "off", enabled=False) as plain:
        assert plain is data
    # a pass shared with other processes: this one computes rows 0:100 of one pass in two
    with _runtime.cell_progress(data, "shared", enabled=True, passes=2) as counted:
        assert sum(len(x) for x, _ in counted.batches(64, shuffle=False)) == 300
        part = counted.part(0, 100)
        assert sum(len(x) for x, _ in part.batches(64, shuffle=False)) == 100
        assert counted._bar.n == counted._bar.total == 400
