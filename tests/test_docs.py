"""The documentation builds with warnings as errors, as CI's docs job builds it.

Skipped when the docs extra (``pip install -e ".[docs]"``) is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import omicvae_sc as ov

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("myst_nb")
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
           "-d", str(tmp_path / "doctrees"), "docs", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"

    api = (out / "api.html").read_text()
    for sub in ("tl", "pl", "datasets"):  # every exported function has its entry
        for name in getattr(ov, sub).__all__:
            assert f"omicvae_sc.{sub}.{name}.html" in api, f"ov.{sub}.{name} missing from api"
    model = (out / "generated" / "omicvae_sc.OmicVAE.html").read_text()
    for method in ("get_latent_representation", "train", "setup_anndata", "write_results"):
        assert f'id="omicvae_sc.OmicVAE.{method}"' in model, method
    assert "--n-top-genes" in (out / "cli.html").read_text()
    for notebook in sorted((REPO_ROOT / "tutorials").glob("*.ipynb")):
        assert (out / "tutorials" / f"{notebook.stem}.html").is_file(), notebook.name
