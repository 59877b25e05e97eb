"""The count VAE: ``inference`` (the posterior q(z|x)), ``generative`` (the parameters of
p(x|z)) and ``loss`` (the negative ELBO, built from both with :mod:`._objective`).

Pure torch. Counts ``x`` are ``(batch, genes)`` float tensors of non-negative integers; ``codes``
are ``(batch, n_covariates)`` integer codes of the categorical covariates (batch first, when
present).
The prior is N(0, I); the cell's observed library size is the exposure offset of the decoder mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from omicvae_sc.module._distributions import make_count_distribution
from omicvae_sc.module._likelihood import count_log_likelihood
from omicvae_sc.module._nn import CountDecoder, GaussianEncoder, one_hot_covariates
from omicvae_sc.module._objective import (
    Posterior,
    elbo_terms,
    importance_weighted_log_likelihood,
)
from omicvae_sc.module._parallel import randn_rows

LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch")
MISSING_LOGIT = -1e4
"""The logit of a gene left out of the likelihood: exp(-1e4) is 0 in float32, so the gene's
mean is 0, its zero count has probability 1 and its gradient is 0."""


class CountParams(NamedTuple):
    """p(x | z): the likelihood's parameters for each row (a cell, or one draw of it).

    The NB / ZINB / Poisson mean is ``softmax(logits) * library``; ``logits`` and
    ``zi_logits`` may be in the decoder heads' low precision during training (read in float32).
    """

    likelihood: str  # "nb", "zinb" or "poisson"
    logits: torch.Tensor  # (..., rows, genes) logits of the expression fractions
    library: torch.Tensor  # (rows, 1) the exposure: the observed library size
    theta: torch.Tensor | None  # (1 or rows, genes) inverse dispersion; None for Poisson
    zi_logits: torch.Tensor | None  # (..., rows, genes) zero-inflation logits (ZINB)

    def log_likelihood(
        self, x: torch.Tensor, *, nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
        repeats: int = 1,
    ) -> torch.Tensor:
        """log p(x | z) summed over genes, one value per row (2-D parameters): the package's
        one likelihood, :func:`.count_log_likelihood`. With ``repeats`` = K the rows are K
        blocks of ``x``'s cells; ``nonzero`` as there."""
        return count_log_likelihood(x, self.logits, self.library, self.theta, self.zi_logits,
                                    nonzero=nonzero, repeats=repeats)

    def distribution(self) -> torch.distributions.Distribution:
        """The count distribution of every entry, for draws and per-entry probabilities."""
        dtype = self.library.dtype
        mu = torch.softmax(self.logits.to(dtype), dim=-1) * self.library
        zi = None if self.zi_logits is None else self.zi_logits.to(dtype)
        return make_count_distribution(self.likelihood, mu, theta=self.theta, zi_logits=zi)


@dataclass(frozen=True)
class LossOutput:
    """Per-cell terms of one minibatch. ``loss`` is what the optimizer minimizes."""

    loss: torch.Tensor  # () mean over cells of distortion + kl_weight * rate
    distortion: torch.Tensor  # (batch,) -log p(x | z), one reparameterized sample
    rate: torch.Tensor  # (batch,) KL(q(z|x) || N(0, I)), analytic


@dataclass(frozen=True)
class CellEvaluation:
    """Per-cell importance-weighted evaluation with K posterior samples."""

    log_likelihood: torch.Tensor  # (batch,) IWAE estimate of log p(x)
    distortion: torch.Tensor  # (batch,) mean over samples of -log p(x | z_k)
    rate: torch.Tensor  # (batch,) analytic KL to the prior


@dataclass(frozen=True)
class PredictiveCheck:
    """How likely a cell's counts are next to counts the model generates for the same cell."""

    observed: torch.Tensor  # (batch,) importance-weighted log p(x)
    generated: torch.Tensor  # (batch,) mean of log p(x~) over cells x~ generated at x's depth
    spread: torch.Tensor  # (batch,) standard deviation of those log p(x~)

    @property
    def z_score(self) -> torch.Tensor:
        """(generated - observed) / spread: > 0 when the cell is less likely than the cells the
        model generates at the same library size."""
        return (self.generated - self.observed) / self.spread.clamp_min(1e-6)


class VAE(nn.Module):
    """A variational autoencoder for count data with an NB, ZINB or Poisson likelihood.

    Parameters
    ----------
    n_genes
        Number of genes (input and output width).
    n_latent, n_hidden, n_layers
        Latent width, hidden width and number of hidden layers of encoder and decoder.
    dropout_rate
        Dropout in the encoder's hidden layers.
    likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (one inverse dispersion per gene) or ``"gene-batch"`` (per gene and batch).
    n_categories
        Number of categories of each categorical covariate; the batch, if any, comes first.
    has_batch
        Whether the first covariate is the batch (needed for ``dispersion="gene-batch"``).
    encode_covariates
        Also feed the covariates to the encoder (by default only the decoder sees them).
    """

    def __init__(
        self, n_genes: int, *, n_latent: int = 10, n_hidden: int = 128, n_layers: int = 1,
        dropout_rate: float = 0.1, likelihood: str = "zinb", dispersion: str = "gene",
        n_categories: tuple[int, ...] = (), has_batch: bool = False,
        encode_covariates: bool = False,
    ):
        super().__init__()
        if dispersion == "gene-batch" and not has_batch:
            msg = "dispersion='gene-batch' needs a batch covariate; pass batch_key= at setup."
            raise ValueError(msg)
        self.likelihood = likelihood
        self.dispersion = dispersion
        self.n_categories = tuple(n_categories)
        self.n_latent = n_latent
        self.encode_covariates = encode_covariates
        n_cov = sum(self.n_categories)
        self.encoder = GaussianEncoder(
            n_genes, n_latent, n_hidden=n_hidden, n_cov=n_cov if encode_covariates else 0,
            n_layers=n_layers, dropout=dropout_rate,
        )
        self.decoder = CountDecoder(
            n_latent, n_genes, n_hidden=n_hidden, n_cov=n_cov, n_layers=n_layers,
            zero_inflated=likelihood == "zinb",
        )
        n_rows = self.n_categories[0] if dispersion == "gene-batch" else 1
        # log inverse dispersion; theta = exp(log_theta) starts at 1
        self.log_theta = nn.Parameter(torch.zeros(n_rows, n_genes))
        self.missing_genes: torch.Tensor | None = None  # see mask_genes
        self.set_frozen(partial=(), norms=())

    # ------------------------------------------------------------------ query surgery
    def mask_genes(self, missing: torch.Tensor | None) -> None:
        """Leave the genes ``missing`` (a boolean ``(genes,)`` mask: genes a query did not
        measure, zero-filled in its counts) out of the likelihood: their expected count is
        zero, so they add nothing to log p(x | z) and the library size is shared among the
        measured genes alone. The encoder still reads them (as zeros); the denoised expression
        (``expression_fractions``) still predicts them. ``None`` undoes it."""
        self.missing_genes = None if missing is None or not bool(missing.any()) else (
            missing.to(torch.bool))

    def set_frozen(self, *, partial: tuple[str, ...], norms: tuple[str, ...]) -> None:
        """Record what query surgery froze (:func:`~._surgery.freeze`): the names of the
        partly frozen parameters (their frozen entries' gradients are masked), and the
        BatchNorm layers that stay in evaluation mode while training."""
        self.frozen_partial = tuple(partial)
        self.frozen_norms = tuple(norms)

    def train(self, mode: bool = True) -> VAE:
        super().train(mode)
        for name in self.frozen_norms:  # the reference's statistics, kept as they are
            self.get_submodule(name).eval()
        return self

    @contextlib.contextmanager
    def matmul_dtype(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Inside the block, the gene-sized matrix products (the encoder's first layer, the
        decoder's output heads: nearly all the arithmetic) run in ``dtype``; ``None`` leaves
        them float32. Everything else, the likelihood included, stays float32."""
        layers = [self.encoder.body.net[0], self.decoder.fraction_logits, self.decoder.zi_logits]
        layers = [layer for layer in layers if layer is not None]
        for layer in layers:
            layer.compute_dtype = dtype
        try:
            yield
        finally:
            for layer in layers:
                layer.compute_dtype = None

    @property
    def uses_nonzero_positions(self) -> bool:
        """Whether :meth:`loss` reads ``nonzero``: NB / ZINB on the CPU, where the fused
        likelihood gathers the non-zero counts (elsewhere it runs dense, and Poisson does not
        use it)."""
        device = self.log_theta.device
        return self.likelihood != "poisson" and device.type == "cpu"

    # ------------------------------------------------------------------ model
    def inference(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> Posterior:
        """The posterior q(z | x), a :class:`~._objective.Posterior` of ``(batch, n_latent)``
        means and variances."""
        cov = one_hot_covariates(codes, self.n_categories) if self.encode_covariates else None
        return Posterior(*self.encoder(x, cov))

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, codes: torch.Tensor | None = None
    ) -> CountParams:
        """The parameters of p(x | z) with mean ``softmax(logits) * library``.

        ``z`` is ``(..., batch, n_latent)`` (leading sample dimensions allowed), ``library`` is
        ``(batch, 1)`` and ``codes`` ``(batch, n_covariates)``.
        """
        lead = z.shape[:-2]
        n_cells = z.shape[-2]
        flat = z.reshape(-1, z.shape[-1])  # (samples * batch, latent): BatchNorm wants 2-D
        cov = one_hot_covariates(codes, self.n_categories)
        if cov is not None and lead:
            cov = cov.repeat(math.prod(lead), 1)
        # in the heads' compute dtype: the likelihood reads low-precision logits tile by tile
        logits, zi = self.decoder.logits(flat, cov, keep_dtype=True)
        if self.missing_genes is not None:  # unmeasured genes: a zero expected count
            missing = self.missing_genes.to(logits.device)
            logits = logits.masked_fill(missing, MISSING_LOGIT)
        logits = logits.reshape(*lead, n_cells, -1)  # (..., batch, genes)
        if zi is not None:
            zi = zi.reshape(*lead, n_cells, -1)
        theta = None if self.likelihood == "poisson" else self._theta(codes)
        return CountParams(self.likelihood, logits, library, theta, zi)

    def _theta(self, codes: torch.Tensor | None) -> torch.Tensor:
        if self.dispersion == "gene-batch":
            # index_select, not log_theta[codes]: the backward of advanced indexing adds the
            # cells' gradients in a thread-dependent order on the CPU (not reproducible)
            return torch.exp(self.log_theta.index_select(0, codes[:, 0]))  # (batch, genes)
        return torch.exp(self.log_theta)  # (1, genes)

    def expression_fractions(self, z: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """Decoder expression fractions ``softmax(logits)``, ``(batch, genes)``; rows sum to 1."""
        cov = one_hot_covariates(codes, self.n_categories)
        return self.decoder(z, cov)[0]

    def log_px_z(
        self, x: torch.Tensor, z: torch.Tensor, codes: torch.Tensor | None = None, *,
        nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """log p(x | z_k) summed over genes for K latent draws of each cell: ``z`` is
        ``(K, batch, n_latent)``, the result ``(K, batch)``. The K draws go through the
        decoder side by side and are scored against ``x`` without copying it K times;
        ``nonzero`` (``(rows, genes)`` of the non-zero counts of ``x``) saves a search."""
        n_samples, n_cells = z.shape[:2]
        library = x.sum(-1, keepdim=True)  # (batch, 1) observed exposure
        if n_samples > 1:
            library = library.repeat(n_samples, 1)
            codes = None if codes is None else codes.repeat(n_samples, 1)
        params = self.generative(z.reshape(-1, z.shape[-1]), library, codes)
        return params.log_likelihood(x, nonzero=nonzero, repeats=n_samples).reshape(
            n_samples, n_cells)

    # ------------------------------------------------------------------ objective
    def loss(
        self, x: torch.Tensor, codes: torch.Tensor | None = None, *, kl_weight: float = 1.0,
        nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LossOutput:
        """Negative ELBO with a weight on the KL term (beta), from one reparameterized draw.

        ``nonzero``: ``(rows, genes)`` of the non-zero counts of ``x``, when known.
        """
        posterior = self.inference(x, codes)
        z = posterior.sample(randn_rows(posterior.mean))  # reparameterization trick
        terms = elbo_terms(self.log_px_z(x, z[None], codes, nonzero=nonzero), posterior)
        return LossOutput(loss=terms.loss(kl_weight), distortion=terms.distortion,
                          rate=terms.rate)

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, codes: torch.Tensor | None = None, *, n_samples: int = 100
    ) -> CellEvaluation:
        """Importance-weighted log p(x) with ``n_samples`` draws from q(z|x), all in one pass,
        with the ELBO's distortion and rate from the same draws."""
        posterior = self.inference(x, codes)
        eps = torch.randn((n_samples, *posterior.mean.shape), device=x.device,
                          dtype=posterior.mean.dtype)
        log_px_z = self.log_px_z(x, posterior.sample(eps), codes)  # (K, batch)
        terms = elbo_terms(log_px_z, posterior)
        return CellEvaluation(
            log_likelihood=importance_weighted_log_likelihood(log_px_z, posterior, eps),
            distortion=terms.distortion, rate=terms.rate)

    @torch.no_grad()
    def predictive_check(
        self, x: torch.Tensor, codes: torch.Tensor | None = None, *, n_draws: int = 10,
        n_samples: int = 10,
    ) -> PredictiveCheck:
        """Compare log p(x) with log p(x~) of cells the model generates at the same library size.

        ``n_draws`` cells x~ are drawn for each cell from the model itself, z ~ N(0, I) and
        x~ ~ p(x | z, library of x, covariates of x); every log p is the importance-weighted
        estimate with ``n_samples`` draws from q(z|x). Sequencing depth moves both sides alike,
        so the difference in units of the spread of log p(x~) measures how unexpected the cell
        is for a cell of its depth, the prior term (an unusual latent state) included.
        """
        observed = self.evaluate(x, codes, n_samples=n_samples).log_likelihood  # (batch,)
        z = torch.randn((n_draws, x.shape[0], self.n_latent), device=x.device)
        library = x.sum(-1, keepdim=True)
        fake = self.generative(z, library, codes).distribution().sample()  # (M, batch, genes)
        fake_codes = None if codes is None else codes.repeat(n_draws, 1)
        generated = self.evaluate(fake.reshape(-1, x.shape[-1]), fake_codes,
                                  n_samples=n_samples).log_likelihood.reshape(n_draws, -1)
        return PredictiveCheck(observed=observed, generated=generated.mean(0),
                               spread=generated.std(0))
