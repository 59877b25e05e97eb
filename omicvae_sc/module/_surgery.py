"""Architecture surgery for mapping a query onto a trained reference (scArches' idea, written
for this module): the reference's weights are copied into a module whose covariates have more
categories, and all but the new entries are frozen.

Pure torch. A covariate enters a network as one-hot columns of the first layer's input (the
decoder's, and the encoder's with ``encode_covariates``), so a new category is a new column
of that layer's weight; with ``dispersion="gene-batch"`` a new batch is also a new row of
``log_theta``. New entries start at the mean of the reference categories' entries: a new
batch begins as an average reference batch. Frozen entries of a partly trainable tensor get
a zero gradient (a hook) and no weight decay, so that Adam leaves them bitwise as they were;
frozen BatchNorm layers stay in evaluation mode (their statistics are the reference's).
"""

from __future__ import annotations

import torch
from torch import nn

from omicvae_sc.module._vae import VAE

UNFREEZE = ("new", "encoder_first_layer", "all")
"""What query training may change: only the entries of the new categories (the default),
those and the encoder's first layer, or every weight."""


def covariate_layers(module: VAE) -> list[nn.Linear]:
    """The linear layers whose input ends with the covariates' one-hot columns."""
    layers = [module.decoder.body.net[0]]
    if module.encode_covariates:
        layers.insert(0, module.encoder.body.net[0])
    return layers


def _spread_columns(old: torch.Tensor, old_n: tuple[int, ...], new_n: tuple[int, ...],
                    lead: int) -> torch.Tensor:
    """``old`` (out, lead + sum(old_n)) placed in a weight of ``lead + sum(new_n)`` columns:
    each covariate's block keeps its columns and gains ``new - old`` columns at its end, set
    to the block's mean column."""
    parts = [old[:, :lead]]
    start = lead
    for n_old, n_new in zip(old_n, new_n, strict=True):
        block = old[:, start:start + n_old]
        parts += [block, block.mean(1, keepdim=True).expand(-1, n_new - n_old)]
        start += n_old
    return torch.cat(parts, 1)


def new_entries(module: VAE, old_n: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """For each parameter of ``module`` (by name) that has entries of categories beyond the
    reference's ``old_n``, a boolean mask (its shape) of those entries."""
    new_n = module.n_categories
    names = {id(p): name for name, p in module.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for layer in covariate_layers(module):
        lead = layer.weight.shape[1] - sum(new_n)
        cols = torch.zeros(layer.weight.shape[1], dtype=torch.bool)
        start = lead
        for n_old, n_new in zip(old_n, new_n, strict=True):
            cols[start + n_old:start + n_new] = True
            start += n_new
        if cols.any():
            masks[names[id(layer.weight)]] = cols[None, :].expand(layer.weight.shape).clone()
    if module.dispersion == "gene-batch" and new_n[0] > old_n[0]:
        rows = torch.arange(new_n[0]) >= old_n[0]
        masks[names[id(module.log_theta)]] = rows[:, None].expand(
            module.log_theta.shape).clone()
    return masks


@torch.no_grad()
def graft(module: VAE, reference: VAE) -> dict[str, torch.Tensor]:
    """Copy the weights and BatchNorm statistics of ``reference`` into ``module``, the same
    network whose covariates have at least as many categories; return :func:`new_entries`."""
    old_n, new_n = reference.n_categories, module.n_categories
    if len(new_n) != len(old_n) or any(n < o for n, o in zip(new_n, old_n, strict=True)):
        msg = f"the query's covariates {new_n} do not extend the reference's {old_n}"
        raise ValueError(msg)
    grown = {id(layer.weight) for layer in covariate_layers(module)}
    for new, old in zip(module.parameters(), reference.parameters(), strict=True):
        if id(new) in grown:
            old = _spread_columns(old, old_n, new_n, old.shape[1] - sum(old_n))
        elif new is module.log_theta and new.shape != old.shape:
            extra = old.mean(0, keepdim=True).expand(new.shape[0] - old.shape[0], -1)
            old = torch.cat([old, extra], 0)
        new.copy_(old)
    for new, old in zip(module.buffers(), reference.buffers(), strict=True):
        new.copy_(old)
    return new_entries(module, old_n)


def freeze(module: VAE, entries: dict[str, torch.Tensor], unfreeze: str) -> None:
    """Make only what ``unfreeze`` names trainable (see :data:`UNFREEZE`); the entries of
    ``entries`` (:func:`new_entries`) always are."""
    if unfreeze not in UNFREEZE:
        msg = f"unfreeze={unfreeze!r} is not one of {list(UNFREEZE)}."
        raise ValueError(msg)
    params = dict(module.named_parameters())
    if unfreeze == "all":
        for p in params.values():
            p.requires_grad_(True)
        module.set_frozen(partial=(), norms=())
        return
    whole = set()
    norms = [name for name, m in module.named_modules() if isinstance(m, nn.BatchNorm1d)]
    if unfreeze == "encoder_first_layer":
        whole = {name for name in params if name.startswith(("encoder.body.net.0.",
                                                             "encoder.body.net.1."))}
        norms = [name for name in norms if name != "encoder.body.net.1"]
    partial = []
    for name, p in params.items():
        p.requires_grad_(name in whole or name in entries)
        if name in entries and name not in whole:
            mask = entries[name].to(device=p.device, dtype=p.dtype)
            p.register_hook(lambda grad, mask=mask: grad * mask)
            partial.append(name)
    module.set_frozen(partial=tuple(partial), norms=tuple(norms))


def parameter_groups(module: VAE, weight_decay: float) -> list[dict]:
    """Adam's parameter groups: the trainable tensors with ``weight_decay``, and the partly
    frozen ones (new entries of a reference tensor) without, so that their frozen entries,
    whose gradient is zero, do not move."""
    partial = module.frozen_partial
    whole = [p for name, p in module.named_parameters()
             if p.requires_grad and name not in partial]
    part = [p for name, p in module.named_parameters() if p.requires_grad and name in partial]
    groups = [{"params": whole, "weight_decay": weight_decay}] if whole else []
    if part:
        groups.append({"params": part, "weight_decay": 0.0})
    if not groups:
        msg = ("Nothing to train: every weight is frozen (a query that adds no new batch or "
               "covariate category, with unfreeze='new'). The model can be used as it is; "
               "to adapt it to the query, load it with unfreeze='encoder_first_layer' or "
               "'all'.")
        raise ValueError(msg)
    return groups
