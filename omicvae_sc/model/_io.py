"""Model files: ``model.pt`` (tensors only, loaded with ``weights_only=True``) and
``metadata.json`` (hyperparameters, setup, genes, history, format version, SHA-256 of the
weights). Saving writes a temporary folder and renames it into place, so a crash mid-save leaves
the previous model intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from omicvae_sc.model._omicvae import OmicVAE

FORMAT = "omicvae_sc.model"
FORMAT_VERSION = 1
WEIGHTS, METADATA = "model.pt", "metadata.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_model(model: OmicVAE, path: Path, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=True to replace it."
        raise FileExistsError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "hparams": model.hparams, "setup": model.setup.to_dict(),
            "var_names": model.var_names.tolist(), "is_trained": model.is_trained,
            "history": model.history.to_dict(),
        }
        (tmp / METADATA).write_text(json.dumps(_jsonable(meta)))
        if path.exists():  # swap: old -> backup, new -> path, drop backup
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, backup / "m")
            os.replace(tmp, path)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_model(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a saved model, after checking format, version and checksum."""
    if not (path / METADATA).is_file() or not (path / WEIGHTS).is_file():
        msg = f"{path} is not an omicvae_sc model folder (expected {METADATA} and {WEIGHTS})."
        raise FileNotFoundError(msg)
    try:
        meta = json.loads((path / METADATA).read_text())
    except json.JSONDecodeError as err:
        msg = f"{path / METADATA} is not valid JSON ({err}); the file is damaged."
        raise ValueError(msg) from err
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        msg = (f"{path} holds format {meta.get('format')!r} version {meta.get('format_version')}; "
               f"this omicvae_sc reads {FORMAT!r} up to version {FORMAT_VERSION}.")
        raise ValueError(msg)
    if _sha256(path / WEIGHTS) != meta.get("weights_sha256"):
        msg = f"{path / WEIGHTS} does not match the checksum in {METADATA}: truncated or altered."
        raise ValueError(msg)
    state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    return meta, state
