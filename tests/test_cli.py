"""The ``omicvae-sc`` command line: fit writes a new file and never touches its input, bad input
exits 2 with a one-line message, demo writes its h5ad and figures."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import omicvae_sc as ov
from omicvae_sc.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OBS_KEYS = ["omicvae_log_likelihood", "omicvae_rate", "omicvae_distortion",
            "omicvae_anomaly_score", "omicvae_doublet_score"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def counts_h5ad(tmp_path: Path) -> Path:
    path = tmp_path / "in.h5ad"
    ov.datasets.synthetic_counts(n_cells=200, n_genes=50).write_h5ad(path)
    return path


def test_fit_writes_results_and_leaves_the_input_unchanged(counts_h5ad, tmp_path):
    before = sha256(counts_h5ad)
    out = tmp_path / "out" / "fitted.h5ad"
    code = main(["fit", str(counts_h5ad), "-o", str(out), "--layer", "counts", "--epochs", "15",
                 "--n-latent", "4", "--batch-key", "batch", "--no-progress"])
    assert code == 0
    assert sha256(counts_h5ad) == before
    fitted = ad.read_h5ad(out)
    assert fitted.obsm["X_omicvae"].shape == (200, 4)
    assert set(OBS_KEYS) <= set(fitted.obs.columns)
    assert np.isfinite(fitted.obs[OBS_KEYS].to_numpy()).all()
    assert len(fitted.uns["omicvae"]["history"]["epoch"]) == 15
    assert fitted.uns["omicvae"]["params"]["likelihood"] == "zinb"
    assert "omicvae_denoised" not in fitted.layers


def test_fit_save_model_gives_a_model_that_reproduces_the_written_latent(counts_h5ad, tmp_path):
    out, model_dir = tmp_path / "fitted.h5ad", tmp_path / "model"
    code = main(["fit", str(counts_h5ad), "-o", str(out), "--layer", "counts", "--epochs", "15",
                 "--likelihood", "nb", "--denoised", "--save-model", str(model_dir),
                 "--no-progress"])
    assert code == 0
    fitted = ad.read_h5ad(out)
    assert fitted.layers["omicvae_denoised"].shape == fitted.shape
    model = ov.OmicVAE.load(model_dir, fitted, device="cpu")
    assert model.hparams["likelihood"] == "nb"
    np.testing.assert_allclose(model.get_latent_representation(), fitted.obsm["X_omicvae"],
                               rtol=1e-5, atol=1e-5)


def test_fit_with_a_missing_layer_exits_2_without_output(counts_h5ad, tmp_path, capsys):
    before = sha256(counts_h5ad)
    out = tmp_path / "out.h5ad"
    code = main(["fit", str(counts_h5ad), "-o", str(out), "--layer", "nope", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("omicvae-sc: error: adata.layers has no layer 'nope'")
    assert "available layers: ['counts']" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [counts_h5ad]  # no partial file either
    assert sha256(counts_h5ad) == before


def test_fit_flag_rules_from_the_command_line(counts_h5ad, tmp_path, capsys):
    out = tmp_path / "fitted.h5ad"
    code = main(["fit", str(counts_h5ad), "-o", str(out), "--layer", "counts", "--epochs", "5",
                 "--contamination", "0.1", "--no-doublets", "--no-progress"])
    assert code == 0
    fitted = ad.read_h5ad(out)
    assert fitted.obs["omicvae_is_anomaly"].sum() == 20  # 10% of 200 cells
    assert fitted.uns["omicvae"]["anomaly"]["rule"] == "expected_rate"
    assert "omicvae_is_doublet" not in fitted.obs
    assert "20 flagged as anomaly" in capsys.readouterr().out


def test_fit_with_a_bad_doublet_rate_exits_2(counts_h5ad, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    code = main(["fit", str(counts_h5ad), "-o", str(out), "--doublet-rate", "0.9"])
    assert code == 2
    assert ("omicvae-sc: error: --doublet-rate must be a fraction of cells in (0, 0.5), got 0.9"
            in capsys.readouterr().err)
    assert not out.exists()


def test_fit_with_an_existing_model_folder_exits_2_before_training(counts_h5ad, tmp_path,
                                                                    capsys):
    out, folder = tmp_path / "out.h5ad", tmp_path / "model"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    before = counts_h5ad.read_bytes()
    code = main(["fit", str(counts_h5ad), "-o", str(out), "--save-model", str(folder)])
    assert code == 2
    assert (f"omicvae-sc: error: --save-model folder {str(folder)!r} already exists; choose a "
            "new one." in capsys.readouterr().err)
    assert not out.exists() and counts_h5ad.read_bytes() == before
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_fit_with_a_missing_input_exits_2(tmp_path, capsys):
    code = main(["fit", str(tmp_path / "absent.h5ad"), "-o", str(tmp_path / "out.h5ad")])
    assert code == 2
    assert "absent.h5ad' does not exist" in capsys.readouterr().err


def test_fit_refuses_to_overwrite_its_input(counts_h5ad, capsys):
    before = sha256(counts_h5ad)
    assert main(["fit", str(counts_h5ad), "-o", str(counts_h5ad)]) == 2
    assert "is the input file, which fit only reads" in capsys.readouterr().err
    assert sha256(counts_h5ad) == before


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # scanpy
def test_demo_writes_h5ad_and_figures(tmp_path, capsys):
    outdir = tmp_path / "demo"
    code = main(["demo", "-o", str(outdir), "--epochs", "5", "--no-progress"])
    assert code == 0
    for name in ("pbmc68k_omicvae_umap.png", "pbmc68k_omicvae_history.png",
                 "pbmc68k_omicvae_anomaly.png"):
        assert (outdir / name).read_bytes()[:8] == PNG_MAGIC
    adata = ad.read_h5ad(outdir / "pbmc68k_omicvae.h5ad")
    assert adata.obsm["X_umap"].shape == (700, 2)
    assert adata.obsm["X_omicvae"].shape == (700, 10)
    out = capsys.readouterr().out
    assert "700 cells x 765 genes, 5 epochs" in out
    assert str(outdir / "pbmc68k_omicvae_umap.png") in out


def test_version_in_process(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"omicvae-sc {ov.__version__}"


def test_usage_error_exits_2(capsys):
    assert main(["fit"]) == 2
    assert "usage: omicvae-sc fit" in capsys.readouterr().err


def test_module_entry_point_prints_the_version():
    result = subprocess.run([sys.executable, "-m", "omicvae_sc.cli", "--version"],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"omicvae-sc {ov.__version__}"


def test_errors_name_the_command_line_flags(counts_h5ad, tmp_path, capsys):
    adata = ad.read_h5ad(counts_h5ad)
    adata.X = adata.X * 0.5  # normalized-looking values in X
    path = tmp_path / "half.h5ad"
    adata.write_h5ad(path)
    assert main(["fit", str(path), "-o", str(tmp_path / "out.h5ad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "X holds non-integer values" in err and "Pass --layer naming the raw-count" in err
    assert "layer=" not in err and "adata.X" not in err
    assert main(["fit", str(path), "-o", str(tmp_path / "out.h5ad"), "--layer", "counts",
                 "--batch-key", "sample"]) == 2
    assert "adata.obs has no column 'sample' (passed as --batch-key)" in capsys.readouterr().err
    assert main(["fit", str(path), "-o", str(tmp_path / "out.h5ad"), "--layer", "counts",
                 "--n-top-genes", "1"]) == 2
    assert "error: --n-top-genes must be an integer of at least 2" in capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()


def test_fit_logs_to_stdout_and_its_files_follow_the_umask(counts_h5ad, tmp_path):
    """A fresh process, as a user runs it: the 'added' line on stdout, as the help says; the
    h5ad and the model folder get the modes the umask gives (mkstemp alone gives 0600)."""
    out, model_dir = tmp_path / "fitted.h5ad", tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "omicvae_sc.cli", "fit", str(counts_h5ad), "-o", str(out),
         "--layer", "counts", "--epochs", "2", "--n-top-genes", "20", "--save-model",
         str(model_dir), "--no-progress"],
        capture_output=True, text=True, check=True, preexec_fn=lambda: os.umask(0o027))
    assert "omicvae_sc added obsm['X_omicvae']" in result.stdout
    assert "var['omicvae_genes']" in result.stdout
    assert "added" not in result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert stat.S_IMODE(model_dir.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in model_dir.iterdir()} == {0o640}
    assert ad.read_h5ad(out).var["omicvae_genes"].sum() == 20
