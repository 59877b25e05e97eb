"""The training loop: plain torch, one screen.

Adam on the negative ELBO, a linear KL warm-up measured in optimizer steps so it always reaches
``beta`` (a fraction of the total steps, not a fixed number of epochs), optional early stopping on
a validation split, and a per-epoch history. Losses are accumulated on the device and read back
once per epoch, so there is no host synchronisation inside the step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from omicvae_sc.module import VAE
from omicvae_sc.train._history import History


class Minibatches(Protocol):
    """What the loop needs from the data: a cell count and shuffled minibatches."""

    n_cells: int

    def n_batches(self, batch_size: int) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...


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


def default_max_epochs(n_cells: int) -> int:
    """About 400 epochs for 20k cells or fewer, falling as 1/n above (at least 20)."""
    return int(min(400, max(20, round(20_000 / max(n_cells, 1) * 400))))


def kl_weight_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up from 0 to ``beta`` over ``warmup_fraction`` of all steps."""
    warmup = config.warmup_fraction * total_steps
    if warmup <= 0:
        return config.beta
    return config.beta * min(1.0, step / warmup)


def _epoch_sums(
    module: VAE, data: Minibatches, config: TrainConfig, *, train: bool,
    optimizer: torch.optim.Optimizer | None, step: int, total_steps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, int, float]:
    """One pass over ``data``.

    Returns the sums of [distortion, rate] over cells, the step count and the last KL weight.
    """
    module.train(train)
    sums = None
    kl_weight = kl_weight_at(step, total_steps, config)
    with torch.set_grad_enabled(train):
        for x, codes in data.batches(config.batch_size, shuffle=train, generator=generator):
            if train:
                kl_weight = kl_weight_at(step, total_steps, config)
            out = module.loss(x, codes, kl_weight=kl_weight if train else 1.0)
            if train:
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                step += 1
            batch_sums = torch.stack([out.distortion.sum(), out.rate.sum()]).detach()
            sums = batch_sums if sums is None else sums + batch_sums
    return sums, step, kl_weight


def fit(
    module: VAE, train_data: Minibatches, validation_data: Minibatches | None,
    config: TrainConfig, *, generator: torch.Generator, first_epoch: int = 0,
) -> History:
    """Train ``module`` in place and return its history.

    Randomness (shuffling, dropout, the reparameterization noise) must be seeded by the caller;
    ``generator`` drives the shuffling.
    """
    params = list(module.parameters())
    # fused: one kernel for all parameters instead of a dozen small ops per tensor
    optimizer = torch.optim.Adam(params, lr=config.lr, eps=0.01, weight_decay=config.weight_decay,
                                 fused=True)
    total_steps = config.max_epochs * train_data.n_batches(config.batch_size)
    rows: dict[str, list] = {k: [] for k in History.__dataclass_fields__ if k not in
                             ("stopped_early", "best_epoch")}
    best = (float("-inf"), -1, None)  # (validation elbo, epoch, state)
    stopped_early, step = False, 0
    bar = tqdm(range(config.max_epochs), disable=not config.progress_bar, desc="training",
               unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        sums, step, kl_weight = _epoch_sums(
            module, train_data, config, train=True, optimizer=optimizer, step=step,
            total_steps=total_steps, generator=generator,
        )
        distortion, rate = (sums / train_data.n_cells).tolist()  # one host sync per epoch
        val = (float("nan"),) * 2
        if validation_data is not None:
            vsums, _, _ = _epoch_sums(
                module, validation_data, config, train=False, optimizer=None, step=step,
                total_steps=total_steps, generator=generator,
            )
            val = tuple((vsums / validation_data.n_cells).tolist())
        _append(rows, first_epoch + epoch, distortion, rate, val, kl_weight,
                time.perf_counter() - t0)
        bar.set_postfix(elbo=f"{-(distortion + rate):.1f}", kl_weight=f"{kl_weight:.2f}")
        if validation_data is not None and config.early_stopping:
            val_elbo = -(val[0] + val[1])
            if val_elbo > best[0]:
                best = (val_elbo, epoch, copy.deepcopy(module.state_dict()))
            elif epoch - best[1] >= config.patience and kl_weight >= config.beta:
                stopped_early = True
                break
    bar.close()
    if best[2] is not None:
        module.load_state_dict(best[2])
    module.eval()
    last = len(rows["epoch"]) - 1
    best_epoch = first_epoch + (best[1] if best[2] is not None else last)
    return History(**{k: tuple(v) for k, v in rows.items()}, stopped_early=stopped_early,
                   best_epoch=best_epoch)


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
