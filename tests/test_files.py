"""Model files: a save killed at any moment leaves a loadable model, loading never runs code
from a file, and damaged or foreign files get a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import omicvae_sc as ov
from omicvae_sc import OmicVAE
from omicvae_sc.model._io import _sha256


def _data():
    adata = ov.datasets.synthetic_counts(n_cells=60, n_genes=20, n_groups=2, seed=1)
    OmicVAE.setup_anndata(adata, layer="counts")
    return adata


SAVER = textwrap.dedent("""
    import sys
    import omicvae_sc as ov
    from omicvae_sc import OmicVAE
    adata = ov.datasets.synthetic_counts(n_cells=60, n_genes=20, n_groups=2, seed=1)
    OmicVAE.setup_anndata(adata, layer="counts")
    model = OmicVAE(adata, n_hidden=16, n_latent=2, device="cpu")
    model.save(sys.argv[1], overwrite=True)
    print("ready", flush=True)
    while True:  # every save shifts all of log theta by one: a mix of two saves would show
        model.module.log_theta.data += 1.0
        model.save(sys.argv[1], overwrite=True)
""")


def test_a_save_killed_at_any_moment_leaves_a_whole_model(tmp_path):
    script, path = tmp_path / "saver.py", tmp_path / "model"
    script.write_text(SAVER)
    adata, seen = _data(), set()
    for delay in (0.0, 0.02, 0.05, 0.11):
        proc = subprocess.Popen([sys.executable, str(script), str(path)],
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        model = OmicVAE.load(path, adata, device="cpu")  # whatever moment the kill came
        shift = model.module.log_theta.detach().numpy()
        assert np.all(shift == shift.flat[0]) and shift.flat[0] == round(shift.flat[0])
        seen.add(float(shift.flat[0]))
        weights = [p.name for p in path.iterdir() if p.name.startswith("weights-")]
        assert json.loads((path / "metadata.json").read_text())["weights_file"] in weights
    assert len(seen) > 1  # the kills came after different numbers of saves


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_payload_in_a_model_file_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adata = _data()
    path = tmp_path / "model"
    OmicVAE(adata, device="cpu").save(path)
    meta = json.loads((path / "metadata.json").read_text())
    weights = path / meta["weights_file"]
    torch.save({"decoder.scale.weight": _Payload()}, weights)  # as an attacker would
    meta["weights_sha256"] = _sha256(weights)  # who also fixes the checksum
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"holds objects other than tensors and is refused "
                                         r"\(loading never runs code from a model file\)"):
        OmicVAE.load(path, adata, device="cpu")
    assert not (tmp_path / "PWNED").exists()


def _saved(tmp_path):
    adata = _data()
    path = tmp_path / "model"
    OmicVAE(adata, device="cpu").save(path)
    return adata, path, json.loads((path / "metadata.json").read_text())


def test_a_truncated_weights_file_is_rejected(tmp_path):
    adata, path, meta = _saved(tmp_path)
    weights = path / meta["weights_file"]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"does not match the checksum in metadata\.json: "
                                         "truncated or altered"):
        OmicVAE.load(path, adata, device="cpu")


def test_a_truncated_metadata_file_is_rejected(tmp_path):
    adata, path, _ = _saved(tmp_path)
    text = (path / "metadata.json").read_text()
    (path / "metadata.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"metadata\.json is not valid JSON .*the file is damaged"):
        OmicVAE.load(path, adata, device="cpu")


def test_a_newer_format_version_is_rejected(tmp_path):
    adata, path, meta = _saved(tmp_path)
    meta["format_version"] = 99
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"holds format 'omicvae_sc.model' version 99; this "
                                         r"omicvae_sc reads 'omicvae_sc.model' up to version 2"):
        OmicVAE.load(path, adata, device="cpu")


def test_a_weights_name_outside_the_folder_is_rejected(tmp_path):
    adata, path, meta = _saved(tmp_path)
    meta["weights_file"] = "../elsewhere.pt"
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"names the weights file '\.\./elsewhere\.pt', which "
                                         r"is not a weights name"):
        OmicVAE.load(path, adata, device="cpu")


def test_a_missing_weights_file_is_named(tmp_path):
    adata, path, meta = _saved(tmp_path)
    (path / meta["weights_file"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"not a complete omicvae_sc model folder: "
                                                r"weights-[0-9a-f]{16}\.pt is missing"):
        OmicVAE.load(path, adata, device="cpu")


def test_format_version_1_folders_still_load(tmp_path):
    adata, path = _data(), tmp_path / "model"
    model = OmicVAE(adata, n_hidden=16, n_latent=3, device="cpu")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # weights no fresh model has: a load that skipped them would show
        for p in model.module.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    model.save(path)
    meta = json.loads((path / "metadata.json").read_text())
    os.replace(path / meta.pop("weights_file"), path / "model.pt")
    meta["format_version"] = 1
    (path / "metadata.json").write_text(json.dumps(meta))

    loaded = OmicVAE.load(path, adata, device="cpu")
    saved, read = model.module.state_dict(), loaded.module.state_dict()
    assert read.keys() == saved.keys()
    differ = [k for k in saved if saved[k].dtype != read[k].dtype
              or not torch.equal(saved[k], read[k])]
    assert not differ, f"tensors not restored bitwise from model.pt: {differ}"
    fresh = OmicVAE(adata, n_hidden=16, n_latent=3, device="cpu").module.state_dict()
    assert not torch.equal(fresh["log_theta"], read["log_theta"])  # the file's, not the seed's
    np.testing.assert_array_equal(loaded.get_latent_representation(adata),
                                  model.get_latent_representation(adata))
