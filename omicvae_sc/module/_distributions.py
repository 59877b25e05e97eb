"""Count likelihoods (NB, ZINB, Poisson) as ``torch.distributions.Distribution`` objects.

Every ``log_prob`` is :func:`omicvae_sc.module._likelihood.log_prob`, the package's one
count likelihood, in log space; the zero-inflation enters as logits through ``softplus`` so
that neither probabilities nor gradients underflow.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch.distributions import Distribution, Gamma, constraints
from torch.distributions.constraints import Constraint
from torch.distributions.utils import broadcast_all

from omicvae_sc.module._likelihood import log_prob

__all__ = ["NegativeBinomial", "Poisson", "ZeroInflatedNegativeBinomial", "make_count_distribution"]

_MAX_POISSON_RATE = 1e8  # Gamma draws for tiny theta can overflow torch.poisson
_NO_SAMPLE_SHAPE = torch.Size()  # immutable default for sample(), one draw per batch element


def _nb_sample(mu: torch.Tensor, theta: torch.Tensor, sample_shape: torch.Size) -> torch.Tensor:
    """Draw NB counts, ``sample_shape + mu.shape``.

    On the CPU as a Poisson-stopped sum of log-series variates (an exact representation of the
    NB): N ~ Poisson(θ log(1 + mu / θ)) per entry, and the count is the sum of N draws of the
    log-series law P(L = k) = p^k / (k (-log(1 - p))), p = mu / (mu + θ). Most entries of a
    wide matrix draw N = 0 and need nothing more; the rest take O(1) work per term (Kemp
    1981: given q = 1 - (1 - p)^U, L is geometric, L = 1 + floor(log V / log q)). About twice
    as fast as a Gamma draw per entry. Elsewhere, the Gamma-Poisson mixture, which reads
    nothing back from the device.
    """
    if mu.device.type != "cpu":
        rate = Gamma(theta, theta / mu).sample(sample_shape)  # (*sample_shape, batch, genes)
        return torch.poisson(rate.clamp(max=_MAX_POISSON_RATE))
    shape = torch.Size(sample_shape) + torch.broadcast_shapes(mu.shape, theta.shape)
    mu, theta = mu.expand(shape), theta.expand(shape)
    terms = torch.poisson(theta * torch.log1p(mu / theta)).reshape(-1)  # N per entry
    out = torch.zeros(shape, dtype=mu.dtype, device=mu.device)
    hit = torch.nonzero(terms).squeeze(1)  # the entries with a non-zero count
    if not hit.numel():
        return out
    owner = torch.repeat_interleave(terms[hit].long())  # (all terms,) -> its entry among hit
    m = mu.reshape(-1)[hit].double()[owner]
    t = theta.reshape(-1)[hit].double()[owner]
    u, v = torch.rand((2, len(owner)), dtype=torch.float64, device=mu.device)
    log_q = torch.log1p(-torch.exp(torch.log(t / (t + m)) * u))  # q = 1 - (1 - p)^u
    series = 1.0 + torch.floor(torch.log(v) / log_q.clamp(max=-1e-300))
    sums = torch.zeros(len(hit), dtype=torch.float64, device=mu.device)
    sums.index_add_(0, owner, series.clamp(max=_MAX_POISSON_RATE))
    out.view(-1)[hit] = sums.clamp(max=_MAX_POISSON_RATE).to(mu.dtype)
    return out


class NegativeBinomial(Distribution):
    """Negative binomial parametrised by its mean and inverse dispersion.

    ``Var[x] = mu + mu**2 / theta``; ``theta -> inf`` recovers the Poisson.

    Parameters
    ----------
    mu
        Mean, > 0, e.g. ``(batch, genes)``.
    theta
        Inverse dispersion, > 0, broadcastable against ``mu`` (often ``(genes,)``).
    validate_args
        Check parameters and values against their constraints (off by default: the training
        loop calls ``log_prob`` on every minibatch).
    """

    arg_constraints: ClassVar[dict[str, Constraint]] = {
        "mu": constraints.positive,
        "theta": constraints.positive,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool | None = False
    ) -> None:
        self._theta_given = torch.as_tensor(theta, dtype=mu.dtype, device=mu.device)
        self.mu, self.theta = broadcast_all(mu, theta)  # (batch, genes)
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_prob(value, self.mu, self._theta_given)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> torch.Tensor:
        return _nb_sample(self.mu, self.theta, torch.Size(sample_shape))


class ZeroInflatedNegativeBinomial(Distribution):
    """Mixture of a point mass at zero (probability ``sigmoid(zi_logits)``) and an NB.

    With ``pi = sigmoid(zi_logits)``: ``E[x] = (1 - pi) * mu`` and
    ``Var[x] = (1 - pi) * mu * (1 + mu / theta + pi * mu)``.

    Parameters
    ----------
    mu
        Mean of the NB component, > 0, e.g. ``(batch, genes)``.
    theta
        Inverse dispersion of the NB component, > 0, broadcastable against ``mu``.
    zi_logits
        Logits of the zero-inflation probability, broadcastable against ``mu``.
    validate_args
        Check parameters and values against their constraints (off by default).
    """

    arg_constraints: ClassVar[dict[str, Constraint]] = {
        "mu": constraints.positive,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu: torch.Tensor,
        theta: torch.Tensor,
        zi_logits: torch.Tensor,
        validate_args: bool | None = False,
    ) -> None:
        self._theta_given = torch.as_tensor(theta, dtype=mu.dtype, device=mu.device)
        self.mu, self.theta, self.zi_logits = broadcast_all(mu, theta, zi_logits)
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def zi_probs(self) -> torch.Tensor:
        """Probability of the extra zero, ``sigmoid(zi_logits)``."""
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1 - self.zi_probs) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        pi = self.zi_probs
        return (1 - pi) * self.mu * (1 + self.mu / self.theta + pi * self.mu)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_prob(value, self.mu, self._theta_given, self.zi_logits)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)  # (*sample_shape, batch, genes)
        counts = _nb_sample(self.mu, self.theta, torch.Size(sample_shape))
        is_extra_zero = torch.bernoulli(self.zi_probs.expand(shape)).bool()
        return counts.masked_fill(is_extra_zero, 0.0)


class Poisson(Distribution):
    """Poisson with ``rate >= 0``, with the same ``log_prob`` conventions as the NB.

    Parameters
    ----------
    rate
        Mean and variance, e.g. ``(batch, genes)``.
    validate_args
        Check parameters and values against their constraints (off by default).
    """

    arg_constraints: ClassVar[dict[str, Constraint]] = {"rate": constraints.nonnegative}
    support = constraints.nonnegative_integer

    def __init__(self, rate: torch.Tensor, validate_args: bool | None = False) -> None:
        (self.rate,) = broadcast_all(rate)
        super().__init__(batch_shape=self.rate.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.rate

    @property
    def variance(self) -> torch.Tensor:
        return self.rate

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_prob(value, self.rate)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> torch.Tensor:
        return torch.poisson(self.rate.expand(self._extended_shape(sample_shape)))


_LIKELIHOODS = ("nb", "zinb", "poisson")


def make_count_distribution(
    likelihood: str,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
) -> Distribution:
    """Build the count distribution named by ``likelihood``.

    Parameters
    ----------
    likelihood
        One of ``"nb"``, ``"zinb"``, ``"poisson"``.
    mu
        Mean counts, e.g. ``(batch, genes)``; the Poisson rate for ``"poisson"``.
    theta
        Inverse dispersion; required for ``"nb"`` and ``"zinb"``, ignored for ``"poisson"``.
    zi_logits
        Zero-inflation logits; required for ``"zinb"``, ignored otherwise.

    Returns
    -------
    The distribution, with batch shape the broadcast shape of the parameters it uses.
    """
    if likelihood not in _LIKELIHOODS:
        msg = f"likelihood={likelihood!r} is not supported; expected one of {_LIKELIHOODS}."
        raise ValueError(msg)
    if likelihood == "poisson":
        return Poisson(mu)
    if theta is None:
        msg = f"likelihood={likelihood!r} needs theta (the inverse dispersion); got None."
        raise ValueError(msg)
    if likelihood == "nb":
        return NegativeBinomial(mu, theta)
    if zi_logits is None:
        msg = "likelihood='zinb' needs zi_logits (the zero-inflation logits); got None."
        raise ValueError(msg)
    return ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
