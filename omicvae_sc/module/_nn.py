"""Encoder and decoder building blocks (pure torch).

Categorical covariates enter as one-hot codes concatenated to the input of the first layer,
so the decoder can explain batch effects without routing them through the latent.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from omicvae_sc.module._parallel import BatchNorm, rand_rows, shared_dropout_active


def one_hot_covariates(
    codes: torch.Tensor | None, n_categories: tuple[int, ...]
) -> torch.Tensor | None:
    """Concatenate one-hot encodings of several categorical covariates.

    Parameters
    ----------
    codes
        Integer codes, shape ``(batch, n_covariates)``, or ``None`` when there are none.
    n_categories
        Number of categories of each covariate.

    Returns
    -------
    Float tensor of shape ``(batch, sum(n_categories))``, or ``None``.
    """
    if codes is None or not n_categories:
        return None
    parts = [
        nn.functional.one_hot(codes[:, i], n).to(torch.float32)
        for i, n in enumerate(n_categories)
    ]
    return torch.cat(parts, dim=-1)  # (batch, sum(n_categories))


class Linear(nn.Linear):
    """``nn.Linear`` whose product can run in a lower precision, float32 in and out.

    With ``compute_dtype`` set (``torch.bfloat16``), input, weight and bias are rounded to it
    for the matrix product only; the weights (and Adam's state) stay float32, and so does
    everything around the product. ``None`` (the default) is a plain float32 layer.
    """

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, *, keep_dtype: bool = False) -> torch.Tensor:
        """``keep_dtype``: return the product in ``compute_dtype``, for a consumer that reads
        it chunk by chunk in float32 (the training likelihood): no full-size float32 copy
        forward, and its gradient comes back in ``compute_dtype``."""
        dtype = self.compute_dtype
        if dtype is None or dtype == x.dtype:
            return super().forward(x)
        out = nn.functional.linear(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype))
        return out if keep_dtype else out.to(x.dtype)


class Dropout(nn.Module):
    """Dropout (inverted, as ``nn.Dropout``). On the CPU its mask is drawn by ``torch.rand``,
    half the time of the Bernoulli draws ``nn.Dropout`` makes there; elsewhere it is
    ``nn.functional.dropout``, one fused kernel, except in a step shared by several processes,
    where each takes its rows of one mask (:mod:`._parallel`)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p  # in [0, 1), checked with the model's settings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" and not shared_dropout_active():
            return nn.functional.dropout(x, self.p, training=True)
        keep = rand_rows(x.shape, device=x.device).ge_(self.p)  # 1.0 with probability 1 - p
        return x * keep.mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Fully connected layers: Linear -> BatchNorm -> ReLU -> Dropout, repeated ``n_layers`` times.

    Covariates (already one-hot) are concatenated to the input of the first layer only.
    """

    def __init__(self, n_in: int, n_out: int, *, n_cov: int, n_layers: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [n_in + n_cov] + [n_out] * n_layers
        for d_in, d_out in itertools.pairwise(dims):
            layers += [
                Linear(d_in, d_out),
                # momentum/eps as in scvi-tools so comparisons are like for like
                BatchNorm(d_out, momentum=0.01, eps=1e-3),
                nn.ReLU(),
            ]
            if dropout > 0:
                layers.append(Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        if cov is not None:
            x = torch.cat([x, cov], dim=-1)
        return self.net(x)


class GaussianEncoder(nn.Module):
    """q(z | x): log1p(counts) -> MLP -> (mean, variance) of a diagonal Gaussian."""

    def __init__(
        self, n_genes: int, n_latent: int, *, n_hidden: int, n_cov: int, n_layers: int,
        dropout: float, var_eps: float = 1e-4,
    ):
        super().__init__()
        self.body = MLP(n_genes, n_hidden, n_cov=n_cov, n_layers=n_layers, dropout=dropout)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.log_var = nn.Linear(n_hidden, n_latent)
        self.var_eps = var_eps

    def forward(
        self, x: torch.Tensor, cov: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.log1p(x), cov)  # (batch, hidden)
        # exp keeps the variance positive; var_eps keeps it away from 0 for stable gradients
        return self.mean(h), torch.exp(self.log_var(h)) + self.var_eps


class CountDecoder(nn.Module):
    """p(x | z): z -> MLP -> per-gene expression fractions (softmax) and zero-inflation logits."""

    def __init__(
        self, n_latent: int, n_genes: int, *, n_hidden: int, n_cov: int, n_layers: int,
        zero_inflated: bool,
    ):
        super().__init__()
        self.body = MLP(n_latent, n_hidden, n_cov=n_cov, n_layers=n_layers, dropout=0.0)
        self.fraction_logits = Linear(n_hidden, n_genes)  # softmax: expression fractions
        self.zi_logits = Linear(n_hidden, n_genes) if zero_inflated else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the head was named fraction_logits called it "scale"
        for name in ("weight", "bias"):
            old = f"{prefix}scale.{name}"
            if old in state_dict:
                state_dict[f"{prefix}fraction_logits.{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def logits(
        self, z: torch.Tensor, cov: torch.Tensor | None, *, keep_dtype: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the expression fractions and zero-inflation logits, each ``(..., genes)``;
        with ``keep_dtype``, in the heads' compute dtype (see :class:`Linear`)."""
        h = self.body(z, cov)  # (..., hidden)
        zi = None if self.zi_logits is None else self.zi_logits(h, keep_dtype=keep_dtype)
        return self.fraction_logits(h, keep_dtype=keep_dtype), zi

    def forward(
        self, z: torch.Tensor, cov: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, zi = self.logits(z, cov)
        return torch.softmax(logits, dim=-1), zi  # (..., genes), rows sum to 1
