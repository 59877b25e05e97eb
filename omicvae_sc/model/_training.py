"""What ``OmicVAE.train`` does between checking its arguments and calling the training loop:
split the cells, build the run's configuration and checkpoint plan, and run ``train.fit``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from omicvae_sc.data import BLOCK_ROWS, BUFFER_BLOCKS, RankPart, RowReader, count_source
from omicvae_sc.model._checks import check_count
from omicvae_sc.model._runtime import resolve_precision, seeded
from omicvae_sc.module import VAE
from omicvae_sc.train import (
    CheckpointPlan,
    History,
    TrainConfig,
    default_max_epochs,
    fit,
    read_checkpoint,
)
from omicvae_sc.train._checkpoint import CHECKPOINT_FILE
from omicvae_sc.train._distributed import DEFAULT_TIMEOUT, Team, from_environment


@dataclass(frozen=True)
class TrainRequest:
    """The arguments of ``OmicVAE.train`` (see there for their meaning)."""

    max_epochs: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    warmup_fraction: float = 0.25
    validation_fraction: float = 0.1
    early_stopping: bool | None = None
    patience: int = 25
    seed: int = 0
    progress_bar: bool = True
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 10
    resume: bool | str = False
    precision: str = "auto"
    cuda_graphs: bool = False
    block_rows: int = BLOCK_ROWS
    buffer_blocks: int = BUFFER_BLOCKS
    distributed: bool | None = None
    sync_batchnorm: bool = False
    dist_timeout: float = DEFAULT_TIMEOUT

    def check(self, device: torch.device) -> None:
        """Raise on arguments that cannot work, before anything is computed."""
        if self.batch_size < 2:
            msg = (f"batch_size must be at least 2 (BatchNorm cannot normalize one cell), got "
                   f"{self.batch_size}.")
            raise ValueError(msg)
        check_count("checkpoint_every", self.checkpoint_every)
        check_count("block_rows", self.block_rows)
        check_count("buffer_blocks", self.buffer_blocks)
        if self.resume not in (True, False, "auto"):
            msg = f"resume must be True, False or 'auto', got {self.resume!r}."
            raise ValueError(msg)
        if self.resume and self.checkpoint_dir is None:
            msg = (f"resume={self.resume!r} needs checkpoint_dir=, the folder holding the "
                   "checkpoint.")
            raise ValueError(msg)
        if not self.dist_timeout > 0:
            msg = f"dist_timeout must be a positive number of seconds, got {self.dist_timeout}."
            raise ValueError(msg)
        if self.cuda_graphs and device.type != "cuda":
            msg = (f"cuda_graphs=True needs a CUDA device; this model is on "
                   f"{device.type!r}. Leave cuda_graphs off on the CPU.")
            raise ValueError(msg)


def training_team(request: TrainRequest, device: torch.device) -> Team | None:
    """This process's team when it trains with others (``torchrun``), else ``None``."""
    team = from_environment(device, distributed=request.distributed,
                            timeout=request.dist_timeout, sync_batchnorm=request.sync_batchnorm)
    if team is not None and request.cuda_graphs:
        msg = ("cuda_graphs=True is for one process; with several (torchrun) leave it off: "
               "gradients are exchanged between the kernels a graph would replay.")
        raise ValueError(msg)
    return team


def train_module(module: VAE, counts: np.ndarray | sp.spmatrix | RowReader,
                 codes: np.ndarray | None,
                 request: TrainRequest, *, held_out: np.ndarray, hparams: dict,
                 first_epoch: int, team: Team | None = None) -> History:
    """Train ``module`` in place on the validated ``counts`` (in memory, or on disk behind a
    ``RowReader``) and ``codes``, holding out the cells ``held_out`` marks (a boolean mask,
    :func:`~omicvae_sc.model._checks.validation_mask`); the history of this call (``request``
    checked by the caller). With ``team`` (:func:`training_team`) every process of the job
    calls this and they train together, each on its part of every minibatch. Raises
    ``TrainingDiverged`` as :func:`omicvae_sc.train.fit` does."""
    device = next(module.parameters()).device
    n = counts.shape[0]
    max_epochs = default_max_epochs(n) if request.max_epochs is None else request.max_epochs
    n_val = int(held_out.sum())
    early_stopping = n_val > 0 if request.early_stopping is None else request.early_stopping
    config = TrainConfig(
        max_epochs=max_epochs, batch_size=request.batch_size, lr=request.lr, beta=request.beta,
        warmup_fraction=request.warmup_fraction, early_stopping=early_stopping,
        patience=request.patience, progress_bar=request.progress_bar,
        precision=resolve_precision(request.precision, device),
        cuda_graphs=request.cuda_graphs)
    on_disk = isinstance(counts, RowReader)
    block_rows = request.block_rows
    if on_disk and team is not None:  # a few blocks for every process, even on small files
        block_rows = min(block_rows, max(1, n // (4 * team.world)))
    stream = {"block_rows": block_rows, "buffer_blocks": request.buffer_blocks}
    # on disk the split stays a mask (a byte a cell); in memory, indices
    train_cells = (None if n_val == 0 else ~held_out) if on_disk else np.flatnonzero(~held_out)
    val_cells = held_out if on_disk else np.flatnonzero(held_out)
    train_data = count_source(counts, codes, device, cells=train_cells, **stream)
    val_data = count_source(counts, codes, device, cells=val_cells, **stream) if n_val else None
    if team is not None:
        team.agree(cells=n, genes=counts.shape[1], validation_cells=n_val,
                   seed=request.seed, epochs=max_epochs, batch_size=request.batch_size)
        train_data = RankPart(train_data, team.rank, team.world)
        val_data = None if val_data is None else RankPart(val_data, team.rank, team.world)
    plan = resume_from = None
    if request.checkpoint_dir is not None:
        run = {k: v for k, v in vars(config).items()  # how it runs, not what it computes
               if k not in ("progress_bar", "cuda_graphs")}
        run |= {"seed": request.seed, "n_train": n - n_val, "n_validation": n_val,
                "n_genes": counts.shape[1], "hparams": dict(hparams)}
        if on_disk:  # the order cells are read in is part of what a run computes
            run |= {"stream": {"block_rows": request.block_rows,
                               "buffer_blocks": request.buffer_blocks}}
        plan = CheckpointPlan(Path(request.checkpoint_dir), request.checkpoint_every, run)
        found = (plan.directory / CHECKPOINT_FILE).is_file()
        if request.resume is True or (request.resume == "auto" and found):
            resume_from = read_checkpoint(plan.directory, run)
    generator = torch.Generator().manual_seed(request.seed)
    with seeded(request.seed, device):
        return fit(module, train_data, val_data, config, generator=generator,
                   first_epoch=first_epoch, checkpoint=plan, resume_from=resume_from, team=team)


def interrupted_message(history: History, request: TrainRequest, n_cells: int) -> str | None:
    """The warning for a training run ended by Ctrl-C (``None`` when it was not)."""
    if not history.interrupted:
        return None
    planned = request.max_epochs or default_max_epochs(n_cells)
    return (f"Training interrupted (Ctrl-C) after {len(history)} of {planned} epochs; the model "
            "keeps what it learned so far and model.history the completed epochs.")
