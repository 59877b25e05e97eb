"""Training checkpoints: everything a resumed run needs to continue bit for bit on the CPU.

One file, ``checkpoint.pt`` in the checkpoint folder, replaced atomically (written beside it,
then renamed), holding only tensors, numbers, strings and containers of them: it is read with
``torch.load(weights_only=True)``, so a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from omicvae_sc.train._files import temp_file

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "omicvae_sc.checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointPlan:
    """Where and how often :func:`omicvae_sc.train.fit` writes checkpoints.

    ``run`` identifies the run (settings, seed, cell counts): a checkpoint resumes only a run
    with the same identity.
    """

    directory: Path
    every: int
    run: dict


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global torch random state that dropout and the reparameterization noise draw from."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def write_checkpoint(directory: Path, state: dict) -> None:
    """Write ``state`` to ``directory/checkpoint.pt``; the previous file stays whole until the
    new one is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(directory, prefix=f".{CHECKPOINT_FILE}.")
    try:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(directory: Path, run: dict) -> dict:
    """The checkpoint in ``directory``, after checking it belongs to a run like ``run``."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        msg = (f"No checkpoint to resume from: {path} does not exist. Train with "
               "checkpoint_dir= first, or call train() without resume=True.")
        raise FileNotFoundError(msg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        msg = (f"{path} is not a readable omicvae_sc checkpoint (truncated, altered or holding "
               f"objects other than tensors): {err}")
        raise ValueError(msg) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        msg = f"{path} is not an omicvae_sc checkpoint."
        raise ValueError(msg)
    saved = state.get("run", {})
    for key in sorted(set(run) | set(saved)):
        if saved.get(key) != run.get(key):
            msg = (f"The checkpoint in {directory} was written by a run with {key}="
                   f"{saved.get(key)!r}; this call has {key}={run.get(key)!r}. Resume with the "
                   "same settings, data and seed, or train without resume=True.")
            raise ValueError(msg)
    return state
