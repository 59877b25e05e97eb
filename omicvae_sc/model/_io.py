"""Model files: a folder with ``metadata.json`` (hyperparameters, setup, genes, history, format
version, the name and SHA-256 of the weights file) and the weights ``weights-<sha>.pt`` (tensors
only, loaded with ``weights_only=True``, so loading never runs code from the file).

Saving is atomic. A new folder is written under a temporary name and renamed into place. Over
an existing model, the new weights go to a new file first and ``metadata.json``, which names
them, is replaced in one rename: a crash at any moment leaves either the old model or the new
one, never a mix. Format version 1 (weights in ``model.pt``) is still read."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from omicvae_sc.train import temp_dir, temp_file

FORMAT = "omicvae_sc.model"
FORMAT_VERSION = 2
METADATA = "metadata.json"
WEIGHTS_V1 = "model.pt"
WEIGHTS_NAME = re.compile(r"weights-[0-9a-f]{16}\.pt")


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


def _write_json(path: Path, meta: dict) -> None:
    """Write ``path`` atomically: a temporary file beside it, flushed, then renamed."""
    tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(_jsonable(meta)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_weights(module: nn.Module, folder: Path) -> tuple[str, str]:
    """Save the weights into ``folder`` under a name of their own; (name, SHA-256)."""
    tmp = temp_file(folder, prefix=".weights.")
    try:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
        digest = _sha256(Path(tmp))
        name = f"weights-{digest[:16]}.pt"
        os.replace(tmp, folder / name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return name, digest


def save_model(path: Path, module: nn.Module, record: dict, *, overwrite: bool) -> None:
    """Write ``module``'s weights and ``record`` (hyperparameters, setup, genes, training
    state and history: plain values) into the folder ``path``, atomically."""
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=True to replace it."
        raise FileExistsError(msg)
    if path.exists() and not (path / METADATA).is_file():
        msg = (f"{path} exists and is not an omicvae_sc model folder (no {METADATA}); it is "
               "left alone. Choose another path.")
        raise FileExistsError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    folder = temp_dir(path.parent, prefix=f".{path.name}.") if fresh else path
    try:
        name, digest = _write_weights(module, folder)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights_file": name,
                "weights_sha256": digest, **record}
        _write_json(folder / METADATA, meta)  # the switch from the old model to the new one
        if fresh:
            os.replace(folder, path)
    finally:
        if fresh and folder.exists():
            shutil.rmtree(folder)
    for old in path.iterdir():  # weights no longer named by the metadata
        if old.name != name and (old.name == WEIGHTS_V1 or WEIGHTS_NAME.fullmatch(old.name)):
            old.unlink()


def read_model(path: Path, *, weights: bool = True
               ) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Metadata and tensors of a saved model, after checking format, version and checksum
    (``weights=False``: the checked metadata alone, and ``None``)."""
    if not (path / METADATA).is_file():
        msg = f"{path} is not an omicvae_sc model folder (expected {METADATA})."
        raise FileNotFoundError(msg)
    try:
        meta = json.loads((path / METADATA).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{path / METADATA} is not valid JSON ({err}); the file is damaged."
        raise ValueError(msg) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT \
            or not isinstance(meta.get("format_version"), int) \
            or meta["format_version"] > FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        version = meta.get("format_version") if isinstance(meta, dict) else None
        msg = (f"{path} holds format {found!r} version {version}; this omicvae_sc reads "
               f"{FORMAT!r} up to version {FORMAT_VERSION}.")
        raise ValueError(msg)
    if not weights:
        return meta, None
    name = meta.get("weights_file", WEIGHTS_V1)
    if name != WEIGHTS_V1 and not (isinstance(name, str) and WEIGHTS_NAME.fullmatch(name)):
        msg = f"{path / METADATA} names the weights file {name!r}, which is not a weights name."
        raise ValueError(msg)
    weights = path / name
    if not weights.is_file():
        msg = f"{path} is not a complete omicvae_sc model folder: {name} is missing."
        raise FileNotFoundError(msg)
    if _sha256(weights) != meta.get("weights_sha256"):
        msg = f"{weights} does not match the checksum in {METADATA}: truncated or altered."
        raise ValueError(msg)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        msg = (f"{weights} holds objects other than tensors and is refused (loading never runs "
               f"code from a model file): {err}")
        raise ValueError(msg) from err
    return meta, state
