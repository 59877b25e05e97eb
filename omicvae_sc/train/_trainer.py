"""The training loop: plain torch, one screen.

Adam on the negative ELBO, a linear KL warm-up measured in optimizer steps so it always reaches
``beta`` (a fraction of the total steps, not a fixed number of epochs), optional early stopping on
a validation split, and a per-epoch history. Losses are accumulated on the device and read back
once per epoch, so there is no host synchronisation inside the step; a non-finite loss is caught
on the device too (the optimizer skips every step from it on) and reported at the epoch's end.
Ctrl-C ends training cleanly with what was learned so far; checkpoints let a run resume.
With a :class:`~._distributed.Team`, several processes take each step together (see there).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from omicvae_sc.module import VAE, LossOutput, parameter_groups, shared_step
from omicvae_sc.train._checkpoint import CheckpointPlan, rng_state, set_rng_state, write_checkpoint
from omicvae_sc.train._distributed import Team
from omicvae_sc.train._graph import GraphedStep, batch_sums, cuda_capture
from omicvae_sc.train._heap import steady_heap
from omicvae_sc.train._history import History


class Minibatches(Protocol):
    """What the loop needs from the data: a cell count and shuffled minibatches."""

    n_cells: int

    def n_batches(self, batch_size: int) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
        nonzero: bool = False,
    ) -> Iterator[tuple[torch.Tensor, ...]]: ...


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. See :meth:`omicvae_sc.OmicVAE.train` for their meaning."""

    max_epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    beta: float = 1.0
    warmup_fraction: float = 0.25
    early_stopping: bool = False
    patience: int = 25
    progress_bar: bool = True
    precision: str = "float32"  # of the gene-sized matrix products in training steps
    cuda_graphs: bool = False  # replay full-size training steps as a CUDA graph

    @property
    def matmul_dtype(self) -> torch.dtype | None:
        return None if self.precision == "float32" else getattr(torch, self.precision)


def default_max_epochs(n_cells: int) -> int:
    """About 400 epochs for 20k cells or fewer, falling as 1/n above (at least 20)."""
    return int(min(400, max(20, round(20_000 / max(n_cells, 1) * 400))))


def kl_weight_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up from 0 to ``beta`` over ``warmup_fraction`` of all steps."""
    warmup = config.warmup_fraction * total_steps
    if warmup <= 0:
        return config.beta
    return config.beta * min(1.0, step / warmup)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite. ``history`` holds the epochs completed before it."""

    def __init__(self, message: str, history: History):
        super().__init__(message)
        self.history = history


class _FiniteGuard:
    """Stops weight updates at the first non-finite loss of an epoch without a host sync per
    step: the fused optimizer skips its step while ``found_inf`` is set (on the device), and
    BatchNorm statistics are kept as they were before the bad step. Checked once per epoch."""

    def __init__(self, module: VAE, optimizer: torch.optim.Optimizer):
        self.buffers = list(module.buffers())  # BatchNorm statistics and step counts
        device = self.buffers[0].device if self.buffers else None
        # what a step writes is made once per fit and reset in place each epoch: small tensors
        # made and kept by each step would pin fragments of the heap, and a captured CUDA graph
        # (train/_graph.py) reads and writes fixed addresses
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        optimizer.found_inf = self.found_inf  # read by the fused step
        self.saved = [b.clone() for b in self.buffers]

    def start_epoch(self, n_steps: int) -> None:
        self.halted.zero_()
        self.found_inf.zero_()
        for saved, buf in zip(self.saved, self.buffers, strict=True):
            saved.copy_(buf)
        self.losses = torch.zeros(n_steps, device=self.halted.device)
        self.n_steps = 0

    def before_forward(self) -> None:
        for saved, buf in zip(self.saved, self.buffers, strict=True):
            saved.copy_(torch.where(self.halted, saved, buf))  # frozen once halted

    def check(self, loss: torch.Tensor) -> None:
        """Halt (on the device) if ``loss`` is not finite."""
        torch.logical_or(self.halted, ~torch.isfinite(loss.detach()), out=self.halted)
        self.found_inf.copy_(self.halted)

    def record(self, loss: torch.Tensor) -> None:
        """Keep the step's loss for :meth:`first_bad_step`."""
        self.losses[self.n_steps] = loss.detach()
        self.n_steps += 1

    def first_bad_step(self) -> tuple[int, float] | None:
        """(step within the epoch, loss) of the first non-finite loss, restoring the buffers."""
        if not self.n_steps or not bool(self.halted):
            return None
        losses = self.losses[:self.n_steps]
        i = int((~torch.isfinite(losses)).nonzero()[0, 0])
        for saved, buf in zip(self.saved, self.buffers, strict=True):
            buf.copy_(saved)
        return i, float(losses[i])


STEP_BAR_STEPS = 2000
"""An epoch of at least this many minibatches (256,000 cells at the default batch size) gets
a second bar, over its steps: on an atlas one epoch is minutes."""


def _epoch_sums(
    module: VAE, data: Minibatches, config: TrainConfig, *, train: bool,
    optimizer: torch.optim.Optimizer | None, step: int, total_steps: int,
    generator: torch.Generator, guard: _FiniteGuard | None = None,
    graphed: GraphedStep | None = None, team: Team | None = None,
    objective: nn.Module | None = None,
) -> tuple[torch.Tensor, int, float]:
    """One pass over ``data``; training steps of the captured size go through ``graphed``.
    With ``team``, ``data`` is this process's part (``RankPart``), training steps go through
    ``objective`` (the module in ``DistributedDataParallel``) and the sums are every
    process's.

    Returns the sums of [distortion, rate] over cells, the step count and the last KL weight.
    """
    module.train(train)
    sums = None
    kl_weight = kl_weight_at(step, total_steps, config)
    # the precision is set once per pass; validation runs in float32
    precision = module.matmul_dtype(config.matmul_dtype if train else None)
    nonzero = module.uses_nonzero_positions  # the loader knows where they are
    n_steps = data.n_batches(config.batch_size)
    with torch.set_grad_enabled(train), precision, \
            tqdm(total=n_steps, desc="epoch" if train else "validation", unit="step",
                 leave=False, disable=not config.progress_bar or n_steps < STEP_BAR_STEPS
                 ) as step_bar:
        for x, codes, *positions in data.batches(config.batch_size, shuffle=train,
                                                 generator=generator, nonzero=nonzero):
            step_bar.update()
            nz = positions[0] if positions else None
            if train:
                kl_weight = kl_weight_at(step, total_steps, config)
                step += 1
            if team is not None:
                start, total = data.share
                if train:
                    out = team_step(objective, team, optimizer, guard, x, codes, kl_weight,
                                    share=(start, total), nonzero=nz)
                else:
                    with shared_step(start, total, None):
                        out = module.loss(x, codes, kl_weight=1.0, nonzero=nz)
                step_sums = batch_sums(out)
            elif train and graphed is not None and graphed.takes(x):
                step_sums = graphed.step(x, codes, kl_weight)
            else:
                out = (train_step(module, optimizer, guard, x, codes, kl_weight, nonzero=nz)
                       if train else module.loss(x, codes, kl_weight=1.0, nonzero=nz))
                step_sums = batch_sums(out)
            sums = step_sums if sums is None else sums + step_sums
    if team is not None:
        team.sum_(sums)
    return sums, step, kl_weight


def train_step(module: VAE, optimizer: torch.optim.Optimizer, guard: _FiniteGuard,
               x: torch.Tensor, codes: torch.Tensor | None, kl_weight: float | torch.Tensor,
               record: bool = True, *, nonzero=None):
    """One optimizer step on a minibatch, with nothing read back from the device; returns the
    loss output. ``record=False`` leaves the loss for the caller to record (a CUDA graph)."""
    guard.before_forward()
    out = module.loss(x, codes, kl_weight=kl_weight, nonzero=nonzero)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    guard.check(out.loss)
    if record:
        guard.record(out.loss)
    optimizer.step()
    return out


class _Objective(nn.Module):
    """The module's training loss as a forward pass, for ``DistributedDataParallel`` (which
    averages the gradients of what its forward computed)."""

    def __init__(self, module: VAE):
        super().__init__()
        self.module = module

    def forward(self, x, codes, kl_weight, nonzero):
        out = self.module.loss(x, codes, kl_weight=kl_weight, nonzero=nonzero)
        return out.loss, out.distortion, out.rate


def team_step(objective: nn.Module, team: Team, optimizer: torch.optim.Optimizer,
              guard: _FiniteGuard, x: torch.Tensor, codes: torch.Tensor | None,
              kl_weight: float, *, share: tuple[int, int], nonzero=None) -> LossOutput:
    """One optimizer step of this process's rows ``start:start + len(x)`` of a minibatch of
    ``total`` cells shared by ``team`` (``share = (start, total)``): the step of one process
    on the whole minibatch.

    Each process's mean loss is weighted by its share of the cells (times the number of
    processes, which ``DistributedDataParallel``'s averaging divides out), so the averaged
    gradient is that of the whole minibatch's mean loss. That loss itself is summed over the
    processes, so the non-finite guard halts every process at the same step.
    """
    start, total = share
    guard.before_forward()
    with shared_step(start, total, team.batchnorm_group):
        loss, distortion, rate = objective(x, codes, kl_weight, nonzero)
    optimizer.zero_grad(set_to_none=True)
    (loss * (len(x) * team.world / total)).backward()
    whole = team.sum_(loss.detach() * (len(x) / total))
    guard.check(whole)
    guard.record(whole)
    optimizer.step()
    return LossOutput(loss=whole, distortion=distortion, rate=rate)


@dataclass(frozen=True)
class _Run:
    """What stays fixed through one call of :func:`fit`: the model, data and optimizer."""

    module: VAE
    train_data: Minibatches
    validation_data: Minibatches | None
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    guard: _FiniteGuard
    generator: torch.Generator
    total_steps: int
    first_epoch: int
    bar: tqdm
    graphed: GraphedStep | None = None
    team: Team | None = None
    objective: nn.Module | None = None  # the module in DistributedDataParallel, with a team


@dataclass
class _Progress:
    """What the loop has done so far: all a checkpoint needs besides weights and random state."""

    epoch: int = 0  # next epoch to run
    step: int = 0
    rows: dict[str, list] = field(default_factory=lambda: {
        k: [] for k in History.__dataclass_fields__
        if k not in ("stopped_early", "best_epoch", "interrupted")})
    best_elbo: float = float("-inf")
    best_epoch: int = -1
    best_state: dict | None = None

    def history(self, first_epoch: int, **flags) -> History:
        last = len(self.rows["epoch"]) - 1
        best = first_epoch + (self.best_epoch if self.best_state is not None else last)
        return History(**{k: tuple(v) for k, v in self.rows.items()}, best_epoch=best, **flags)


def _checkpoint_state(progress: _Progress, module: VAE, optimizer: torch.optim.Optimizer,
                      generator: torch.Generator, plan: CheckpointPlan,
                      first_epoch: int) -> dict:
    device = next(module.parameters()).device
    return {"run": plan.run, "first_epoch": first_epoch, "epoch": progress.epoch,
            "step": progress.step, "rows": progress.rows, "best_elbo": progress.best_elbo,
            "best_epoch": progress.best_epoch, "best_state": progress.best_state or {},
            "module": module.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "rng": rng_state(device)}


def _resume(state: dict, module: VAE, optimizer: torch.optim.Optimizer,
            generator: torch.Generator) -> _Progress:
    device = next(module.parameters()).device
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    set_rng_state(state["rng"], device)
    return _Progress(epoch=state["epoch"], step=state["step"], rows=state["rows"],
                     best_elbo=state["best_elbo"], best_epoch=state["best_epoch"],
                     best_state=state["best_state"] or None)


def fit(
    module: VAE, train_data: Minibatches, validation_data: Minibatches | None,
    config: TrainConfig, *, generator: torch.Generator, first_epoch: int = 0,
    checkpoint: CheckpointPlan | None = None, resume_from: dict | None = None,
    team: Team | None = None,
) -> History:
    """Train ``module`` in place and return its history.

    Randomness (shuffling, dropout, the reparameterization noise) must be seeded by the caller;
    ``generator`` drives the shuffling. With ``checkpoint``, the state is written every
    ``checkpoint.every`` epochs; ``resume_from`` (a checkpoint read back) continues that run.
    Raises :class:`TrainingDiverged` on a non-finite loss, the weights left as they were
    before it. Ctrl-C ends training early (``History.interrupted``).

    With ``team``, this process is one of several training together (``train_data`` and
    ``validation_data`` are its parts, ``RankPart``): only rank 0 writes the checkpoint and
    shows bars, and a peer that dies or hangs raises :class:`~._distributed.RankLost`.
    """
    optimizer, guard, graphed = _stepper(module, config)
    capturable = optimizer.param_groups[0]["capturable"]
    steps_per_epoch = train_data.n_batches(config.batch_size)
    total_steps = config.max_epochs * steps_per_epoch
    progress = _Progress()
    if resume_from is not None:
        first_epoch = resume_from["first_epoch"]
        progress = _resume(resume_from, module, optimizer, generator)
        # checkpoints fall between epochs; a run resumed on another number of processes
        # takes another number of steps an epoch, and the KL schedule follows the epochs
        progress.step = progress.epoch * steps_per_epoch
        for group in optimizer.param_groups:  # a checkpoint of the other mode says otherwise
            group["capturable"] = capturable
    leader = team is None or team.leader
    show = config.progress_bar and leader
    stopped_early = interrupted = False
    bar = tqdm(range(progress.epoch, config.max_epochs), disable=not show,
               desc="training", unit="epoch", initial=progress.epoch, total=config.max_epochs)
    objective = None
    if team is not None:  # Poisson has no dispersion: a parameter without a gradient
        objective = team.wrap(_Objective(module), find_unused=module.likelihood == "poisson")
    run = _Run(module, train_data, validation_data, config, optimizer, guard, generator,
               total_steps, first_epoch, bar, graphed, team, objective)
    watch = contextlib.nullcontext() if team is None else team.watch(
        None if checkpoint is None else checkpoint.directory)
    try:
        with steady_heap(), watch:  # freed step memory stays for the next step (_heap.py)
            for epoch in bar:
                stopped_early = _run_epoch(run, progress, epoch)
                if checkpoint is not None and leader and (epoch + 1) % checkpoint.every == 0:
                    write_checkpoint(checkpoint.directory, _checkpoint_state(
                        progress, module, optimizer, generator, checkpoint, first_epoch))
                if stopped_early:
                    break
    except KeyboardInterrupt:
        interrupted = True  # keep what was learned; the caller says so
    finally:
        bar.close()
        del run, objective  # the DistributedDataParallel hooks go with it
    if show and not interrupted:  # a frozen "163/400" looks like a crash
        tqdm.write(_ending(progress, config, stopped_early), file=sys.stderr)  # with the bar
    if progress.best_state is not None:
        module.load_state_dict(progress.best_state)
    module.eval()
    return progress.history(first_epoch, stopped_early=stopped_early, interrupted=interrupted)


def _stepper(module: VAE, config: TrainConfig
             ) -> tuple[torch.optim.Optimizer, _FiniteGuard, GraphedStep | None]:
    """The optimizer, its non-finite guard and, with ``cuda_graphs``, the captured step."""
    # fused: one kernel for all parameters instead of a dozen small ops per tensor
    capturable = config.cuda_graphs and next(module.parameters()).device.type == "cuda"
    # a query model (module/_surgery.py) trains only some tensors, some only in part
    optimizer = torch.optim.Adam(parameter_groups(module, config.weight_decay), lr=config.lr,
                                 eps=0.01, weight_decay=config.weight_decay, fused=True,
                                 capturable=capturable)
    guard = _FiniteGuard(module, optimizer)
    graphed = None
    if config.cuda_graphs:
        if module.uses_nonzero_positions:  # data-dependent shapes cannot be captured
            msg = "cuda_graphs needs the dense likelihood path of an accelerator."
            raise ValueError(msg)
        graphed = GraphedStep(
            lambda x, codes, kl, record: train_step(module, optimizer, guard, x, codes, kl,
                                                    record),
            guard, config.batch_size, capture=cuda_capture)
    return optimizer, guard, graphed


def _ending(progress: _Progress, config: TrainConfig, stopped_early: bool) -> str:
    """One line on why training ended and which weights the model keeps (epochs from 1)."""
    if stopped_early:
        head = (f"training: early stopping after {progress.epoch} of {config.max_epochs} "
                f"epochs (validation ELBO not better for {config.patience} epochs)")
    else:
        head = f"training: all {config.max_epochs} epochs done"
    if progress.best_state is None:
        return head
    return (f"{head}; kept the weights of epoch {progress.best_epoch + 1}, the best validation "
            f"ELBO ({progress.best_elbo:.1f} nats/cell)")


def _run_epoch(run: _Run, progress: _Progress, epoch: int) -> bool:
    """One epoch of training and validation, recorded in ``progress``; True to stop early."""
    t0 = time.perf_counter()
    config, module = run.config, run.module
    run.guard.start_epoch(run.train_data.n_batches(config.batch_size))
    sums, step, kl_weight = _epoch_sums(
        module, run.train_data, config, train=True, optimizer=run.optimizer,
        step=progress.step, total_steps=run.total_steps, generator=run.generator,
        guard=run.guard, graphed=run.graphed, team=run.team, objective=run.objective)
    bad = run.guard.first_bad_step()
    if run.team is not None and not run.team.sync_batchnorm:
        run.team.average_buffers(module)  # per-process BatchNorm statistics: their mean
    if bad is not None:
        module.eval()
        msg = (f"Training stopped: the loss became {bad[1]} at epoch {run.first_epoch + epoch}, "
               f"step {bad[0]} of that epoch (optimizer step {progress.step + bad[0]}). The model "
               "keeps its weights from before that step, and its history the epochs before it. "
               "Lower lr, or check the counts for extreme values.")
        raise TrainingDiverged(msg, progress.history(run.first_epoch))
    progress.step = step
    distortion, rate = (sums / run.train_data.n_cells).tolist()  # one host sync per epoch
    val = (float("nan"),) * 2
    if run.validation_data is not None:
        vsums, _, _ = _epoch_sums(module, run.validation_data, config, train=False,
                                  optimizer=None, step=step, total_steps=run.total_steps,
                                  generator=run.generator, team=run.team)
        val = tuple((vsums / run.validation_data.n_cells).tolist())
    _append(progress.rows, run.first_epoch + epoch, distortion, rate, val, kl_weight,
            time.perf_counter() - t0)
    progress.epoch = epoch + 1
    run.bar.set_postfix(elbo=f"{-(distortion + rate):.1f}", kl_weight=f"{kl_weight:.2f}")
    if run.validation_data is None or not config.early_stopping:
        return False
    val_elbo = -(val[0] + val[1])
    if val_elbo > progress.best_elbo:
        progress.best_elbo, progress.best_epoch = val_elbo, epoch
        progress.best_state = copy.deepcopy(module.state_dict())
        return False
    return epoch - progress.best_epoch >= config.patience and kl_weight >= config.beta


def _append(rows: dict[str, list], epoch: int, distortion: float, rate: float,
            val: tuple[float, float], kl_weight: float, seconds: float) -> None:
    rows["epoch"].append(epoch)
    rows["train_distortion"].append(distortion)
    rows["train_rate"].append(rate)
    rows["train_elbo"].append(-(distortion + rate))
    rows["validation_distortion"].append(val[0])
    rows["validation_rate"].append(val[1])
    rows["validation_elbo"].append(-(val[0] + val[1]))
    rows["kl_weight"].append(kl_weight)
    rows["seconds"].append(seconds)
