"""Every notebook in tutorials/ runs top to bottom (few epochs, no Jupyter kernel, no windows)
and produces what its text promises: the objects, figures and printed results it names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
TUTORIALS = sorted(TUTORIALS_DIR.glob("*.ipynb"))


def load_notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def code_cells(path: Path) -> list[str]:
    """Source of each code cell, with IPython magics and shell escapes (% and ! lines) dropped."""
    cells = []
    for cell in load_notebook(path)["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [line for line in cell_source(cell).splitlines()
                 if not line.lstrip().startswith(("%", "!"))]
        cells.append("\n".join(lines))
    return cells


def test_there_are_tutorials():
    assert TUTORIALS, f"no notebooks found in {TUTORIALS_DIR}"


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_is_stored_without_outputs(notebook):
    nb = load_notebook(notebook)
    assert nb["nbformat"] == 4
    stale = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not stale, f"code cells {stale} of {notebook.name} store outputs; clear them"


EPOCHS = 10  # OMICVAE_TUTORIAL_EPOCHS while the suite runs the notebooks


def _finite(values) -> bool:
    return bool(np.all(np.isfinite(np.asarray(values, dtype=float))))


def _rule_applied(obs, score_key: str, flag_key: str, summary: dict) -> None:
    """The flags are the rule recorded in uns applied to the score: flagged cells score at or
    above the recorded threshold, the others at or below it, and the count matches."""
    score, flagged = obs[score_key].to_numpy(), obs[flag_key].to_numpy(dtype=bool)
    assert summary["n_flagged"] == flagged.sum() > 0, (summary, flagged.sum())
    assert score[flagged].min() >= summary["threshold"] >= score[~flagged].max(), summary


def _quickstart(ns: dict, out: str) -> None:
    adata = ns["adata"]
    assert adata.obsm["X_omicvae"].shape == (700, 10) and _finite(adata.obsm["X_omicvae"])
    assert adata.obsm["X_umap"].shape == (700, 2)
    obs = adata.obs
    assert _finite(obs["omicvae_log_likelihood"]) and (obs["omicvae_log_likelihood"] < 0).all()
    assert (obs["omicvae_rate"] >= 0).all() and (obs["omicvae_distortion"] > 0).all()
    assert len(adata.uns["omicvae"]["history"]["epoch"]) == EPOCHS  # the tutorial's epochs
    assert len(ns["history"].epoch) == EPOCHS
    # the class gives the numbers the one-call function wrote (both seed 0), as the text says
    assert "same as tl.omicvae: True" in out
    np.testing.assert_allclose(ns["latent"], adata.obsm["X_omicvae"], atol=1e-5)
    log_px = ns["log_px"]
    assert log_px.shape == (700,) and _finite(log_px) and (log_px < 0).all()
    # "each marker lights up in its type": the robust ones, even after 10 epochs
    means = ns["denoised"].groupby(obs["cell_type"], observed=True).mean()
    assert means.shape == (10, 6) and (means.to_numpy() >= 0).all()
    top = means.idxmax().to_dict()
    assert top["MS4A1"] == top["CD79A"] == "CD19+ B", top
    assert {top["LYZ"], top["CST3"]} <= {"CD14+ Monocyte", "Dendritic"}, top
    assert "metadata.json" in out  # the saved folder's listing
    np.testing.assert_allclose(ns["loaded"].get_latent_representation(), ns["latent"])


def _anomaly_flagging(ns: dict, out: str) -> None:
    adata, truth = ns["adata"], ns["truth"]
    assert adata.n_obs == 735 and truth.sum() == 35
    obs, summary = adata.obs, adata.uns["omicvae"]
    assert _finite(obs["omicvae_anomaly_score"])
    assert obs["omicvae_doublet_score"].between(0, 1).all()
    # the last cell's rules: a fixed share of anomalies, the known share of doublets
    for kind, rate in (("anomaly", 0.02), ("doublet", 0.05)):
        assert summary[kind]["rule"] == "expected_rate" and summary[kind]["value"] == rate
        assert abs(summary[kind]["n_flagged"] - rate * adata.n_obs) < 1, summary[kind]
        _rule_applied(obs, f"omicvae_{kind}_score", f"omicvae_is_{kind}", summary[kind])
    # the doublets are found several times more often than chance (5%), by both routes
    chance = truth.mean()
    flagged = ns["flagged"]
    assert truth[flagged].mean() > 3 * chance, (truth[flagged].sum(), flagged.sum())
    assert truth[ns["top"]].mean() > 3 * chance, truth[ns["top"]].mean()
    assert "precision among the 35 highest doublet scores" in out


def _model_diagnostics(ns: dict, out: str) -> None:
    frontier = ns["frontier"]
    assert list(frontier["beta"]) == [0.1, 0.5, 1, 2, 4]
    # on the training cells, rate falls and distortion rises with beta, as the text says
    assert (np.diff(frontier["rate"]) < 0).all() and (np.diff(frontier["distortion"]) > 0).all()
    assert frontier["monotone"] and "monotone on the training cells: True" in out
    d, strong = ns["d"], ns["strong"].diagnostics
    assert 0 < d.n_active <= 10 and d.mutual_information > 0
    assert strong.mutual_information < d.mutual_information  # beta 8 buys a cheaper latent
    refined, test = ns["refined"], ns["test"]
    assert test.obsm["X_omicvae_refined"].shape == (70, 10)
    assert refined.elbo_after.mean() > refined.elbo_before.mean() and refined.mean_gain > 0
    assert _finite(refined.log_likelihood_before) and _finite(refined.log_likelihood_after)
    stability = ns["s"]
    assert stability["mean_snn_agreement"] > 3 * stability["random_baseline"], stability
    assert ns["stable"].obs["omicvae_stability"].between(0, 1).all()
    fake = ns["fake"]
    assert fake.shape == (500, 765)
    counts = fake.layers["counts"]
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    assert (counts >= 0).all() and (counts == np.round(counts)).all()
    ppc = ns["ppc"]
    assert len(ppc) == 765 and 0 <= ppc.attrs["zero_fraction_mae"] < 0.25, ppc.attrs
    if "three" in ns:  # the real-data section ran
        shift, batches = ns["shift"], ns["batches"]
        assert len(batches) == 3 and _finite(shift)
        assert (shift[batches[0]] == 0).all()  # batch 0 decoded as batch 0: no shift
        assert (shift[batches[1:]].abs().max() > 0.01).all(), shift.abs().max()
    else:
        assert "not found: the counterfactual section needs the real-data folder" in out


def _reference_mapping(ns: dict, out: str) -> None:
    query, ref, novel = ns["query"], ns["ref"], ns["novel"]
    assert novel.sum() == 95 and query.n_vars == 755  # every B cell; ten genes fewer
    assert ns["reference"].held_out_cells.sum() > 0
    record = query.uns["omicvae_mapping"]
    assert record["trained"] and record["n_missing_genes"] == 10
    assert ref.obsm["X_omicvae"].shape == (ref.n_obs, 10)
    assert query.obs["omicvae_label_uncertainty"].between(0, 1).all()
    assert ns["right"][~novel].mean() > 0.5  # after 10 epochs; about 0.8 with the defaults
    # "the B cells should stand out": they score higher and are flagged more often
    score, flagged = ns["score"], ns["flagged"]
    assert np.median(score[novel]) > np.median(score[~novel])
    assert flagged[novel].mean() > flagged[~novel].mean()
    assert ns["both"].obsm["X_umap"].shape == (ref.n_obs + query.n_obs, 2)
    assert "decoder.body.net.0.weight" in out and "genes the query lacks: 10" in out
    assert "reference cells placed as the reference places them: True" in out


EXPECTED = {  # notebook -> (figures it draws at least, what its results must show)
    "01_quickstart.ipynb": (2, _quickstart),
    "02_anomaly_flagging.ipynb": (2, _anomaly_flagging),
    "03_model_diagnostics.ipynb": (4, _model_diagnostics),
    "04_reference_mapping.ipynb": (1, _reference_mapping),
}


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # scanpy
@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(notebook, tmp_path, monkeypatch, capsys):
    assert notebook.name in EXPECTED, f"state in EXPECTED what {notebook.name} should produce"
    min_figures, check = EXPECTED[notebook.name]
    matplotlib.use("Agg")
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    monkeypatch.setenv("OMICVAE_TUTORIAL_EPOCHS", str(EPOCHS))
    shared = TUTORIALS_DIR.parent.parent / "shared" / "data"
    if "OMICVAE_SC_DATA" not in os.environ and shared.is_dir():  # real data, where present
        monkeypatch.setenv("OMICVAE_SC_DATA", str(shared))
    monkeypatch.chdir(tmp_path)
    plt.close("all")
    namespace: dict = {"__name__": "__main__"}
    try:
        for i, source in enumerate(code_cells(notebook)):
            try:
                exec(compile(source, f"{notebook.name}, code cell {i}", "exec"), namespace)
            except Exception as err:
                err.add_note(f"while running code cell {i} of {notebook.name}:\n{source}")
                raise
        figures = [plt.figure(n) for n in plt.get_fignums()]
        drawn = [f for f in figures if any(ax.has_data() for ax in f.axes)]
        assert len(drawn) >= min_figures, f"{len(drawn)} figures with data, {min_figures} expected"
    finally:
        plt.close("all")
    check(namespace, capsys.readouterr().out)
