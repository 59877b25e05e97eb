"""NB / ZINB log p(x | z) per cell, straight from the decoder's logits, in one sweep with its
gradients: the fast path of :func:`omicvae_sc.module._likelihood.count_log_likelihood`.

The objectives need only ``sum_g log NB(x_cg | mu_cg, θ_g)`` (or ZINB) per cell, with
``mu = softmax(logits) * library``. Built from separate torch operations, that sum allocates a
dozen fresh ``(batch, genes)`` tensors per step forward and as many backward; on a CPU, at
large batches, the page faults of those allocations cost more than the arithmetic. Here:

- Every entry is first treated as a zero count: the dense terms (softmax, log NB(0), the
  zero-inflation mixture) run over tiles of a few rows (the memory policy's
  ``Pass.LIKELIHOOD_TILE``, which stays in cache), with no indexing inside the tile loop.
- The entries with non-zero counts are then corrected in one vectorized pass over all of them
  (``sparse``, the CPU default): their lgamma / digamma terms, and the difference between their
  true terms and the zero-count terms the sweep gave them. Doing it once per batch, not per
  tile, keeps the number of operations small and the vectors long enough for threads.
- A zero's ZINB probability ``π + (1 - π) NB(0)`` is computed as it is and its log taken once
  (in logs it takes two softplus, the costliest functions of the sweep), unless a logit is
  so negative that π and NB(0) could both underflow (``DIRECT_MIN_ZI``).
- When a gradient will be needed, the same sweep writes the gradients' per-entry factors, so
  backward is a scaling by the upstream gradient: nothing is computed twice.

Per entry the terms are those of :func:`omicvae_sc.module._likelihood.log_prob` (same ``EPS``).
Gradient of a cell's sum with respect to its logits, with ``h = mu * dlogp/dmu``:
``d/dlogits_g = h_g - p_g * sum_k h_k``, where at x = 0 ``h = -w θ mu / (θ + mu)`` (``w`` the
posterior weight of the NB component, 1 for NB) and at x > 0
``h = x mu / (mu + eps) - (θ + x) mu / (θ + mu + eps)``. The sweep keeps ``neg_dmu = -h``
(it saves a pass); backward scales the factors by the negated upstream gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from omicvae_sc.module import _memory as memory

EPS = 1e-8
"""Inside every log: keeps it finite at mu -> 0 or θ -> 0."""

LOG2E, LN2 = 1.0 / math.log(2.0), math.log(2.0)
# exp and log go through exp2 and log2, which torch runs 4x and 1.3x faster on the CPU (float32,
# AVX512): exp(t) = exp2(t log2(e)), log(t) = ln(2) log2(t)

DIRECT_MIN_ZI = -80.0
"""Above this smallest zero-inflation logit of a tile, the sweep computes a zero's ZINB
probability directly: π = sigmoid(z) > 1e-35 cannot underflow, so neither can π + (1 - π) NB(0)."""


def fused_nb_log_likelihood(
    x: torch.Tensor, logits: torch.Tensor, library: torch.Tensor, theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None, *,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None, repeats: int = 1,
    sparse: bool | None = None, tile_rows: int | None = None,
) -> torch.Tensor:
    """NB (or ZINB with ``zi_logits``) ``log p(x | z)`` summed over genes per row of
    ``logits``; the arguments are those of :func:`omicvae_sc.module._likelihood.
    count_log_likelihood`, which is the function to call."""
    on_cpu = x.device.type == "cpu"
    sparse = on_cpu if sparse is None else sparse
    if repeats > 1 and not sparse:
        x = x.repeat(repeats, 1)  # the dense path reads every entry
        repeats = 1
    if tile_rows is None:
        tile_rows = memory.tile_rows(x.shape[-1], logits.shape[0], x.device)
    # inside forward() autograd is off and needs_input_grad ignores it: pass it along
    grads = torch.is_grad_enabled()
    return _FusedNB.apply(x, logits, library, theta, zi_logits, sparse, tile_rows, grads,
                          (nonzero, repeats))


class _NonzeroCounts:
    """The entries with non-zero counts: gathered into vectors (sparse), or all entries with a
    mask (dense, where finding them would synchronize with the device)."""

    def __init__(self, x: torch.Tensor, theta_shared: bool, sparse: bool,
                 nonzero: tuple[torch.Tensor, torch.Tensor] | None = None, repeats: int = 1):
        self.sparse = sparse
        if not sparse:
            self.mask, self.counts = x > 0, x
            return
        if nonzero is None:
            nonzero = torch.nonzero(x).unbind(1)
        row, genes = nonzero
        if row.numel() > 1 and not bool((row[1:] >= row[:-1]).all()):
            order = torch.argsort(row, stable=True)  # grouped by cell, for row_sums
            row, genes = row[order], genes[order]
        flat = row * x.shape[1] + genes  # row-major positions
        counts = x.reshape(-1).index_select(0, flat)
        if repeats > 1:  # block k holds the rows k * batch + row, scored against x
            offsets = torch.arange(repeats, device=row.device) * x.shape[0]
            row = (row + offsets[:, None]).reshape(-1)
            genes, counts = genes.repeat(repeats), counts.repeat(repeats)
            flat = row * x.shape[1] + genes
        self.row = row
        # entries per cell: the rows are grouped, so per-cell sums are segment sums
        bounds = torch.arange(repeats * x.shape[0] + 1, device=row.device)
        self.lengths = torch.diff(torch.searchsorted(row, bounds))
        self.flat = flat
        self.theta_index = genes if theta_shared else flat
        self.counts = counts

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """A ``(batch, genes)`` tensor at the non-zero counts."""
        return t.reshape(-1).index_select(0, self.flat) if self.sparse else t

    def thetas_at(self, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Several θ-shaped tensors at the non-zero counts, gathered in one pass."""
        if not self.sparse:
            return ts
        stacked = torch.stack([t.reshape(-1) for t in ts])
        return stacked.index_select(1, self.theta_index).unbind(0)

    def row_at(self, t: torch.Tensor) -> torch.Tensor:
        """A per-cell ``(batch, 1)`` tensor at the non-zero counts."""
        return t.reshape(-1).index_select(0, self.row) if self.sparse else t

    def _only(self, v: torch.Tensor) -> torch.Tensor:
        """Values computed at the non-zero counts, zero elsewhere (a no-op when gathered)."""
        return v if self.sparse else torch.where(self.mask, v, 0.0)

    def row_sums(self, v: torch.Tensor) -> torch.Tensor:
        """Per-cell sums of values at the non-zero counts, ``(batch,)``."""
        if not self.sparse:
            return self._only(v).sum(-1)
        return torch.segment_reduce(v, "sum", lengths=self.lengths)  # 3x index_add_'s speed

    def add_into(self, full: torch.Tensor, v: torch.Tensor) -> None:
        """``full`` (``(batch, genes)``, contiguous) += v at the non-zero counts."""
        if self.sparse:
            full.view(-1).scatter_add_(0, self.flat, v)  # faster than index_add_ here
        else:
            full.add_(self._only(v))

    def digamma(self, y: torch.Tensor) -> torch.Tensor:
        return _digamma(y) if self.sparse else torch.digamma(y)


class _NonzeroTerms(NamedTuple):
    """What the entries with non-zero counts add to the zero-count sweep."""

    value: torch.Tensor  # (batch,) per-cell log-likelihood correction
    # with gradients only (None otherwise), per non-zero entry unless said:
    neg_dmu: torch.Tensor | None  # correction of -mu dlogp/dmu
    neg_dmu_sum: torch.Tensor | None  # (batch, 1) its per-cell sum
    zi: torch.Tensor | None  # correction of the zero-inflation factor (ZINB)
    theta: torch.Tensor | None  # correction of the θ factor


class _ThetaTerms(NamedTuple):
    """Functions of θ computed once per call on θ's own shape, ``(1 or batch, genes)``."""

    theta: torch.Tensor
    theta_log_theta: torch.Tensor  # θ log(θ + eps)
    lgamma_theta: torch.Tensor
    grad_term: torch.Tensor | None  # log(θ + eps) + θ / (θ + eps), when gradients are needed

    @classmethod
    def of(cls, theta: torch.Tensor, grads: bool) -> _ThetaTerms:
        log_theta = torch.log(theta + EPS)
        grad_term = log_theta + theta / (theta + EPS) if grads else None
        return cls(theta, theta * log_theta, torch.lgamma(theta), grad_term)


def _log_softmax_normalizer(logits: torch.Tensor, tile_rows: int, dtype: torch.dtype
                            ) -> torch.Tensor:
    """logsumexp over genes in ``dtype``, ``(batch, 1)``, tile by tile (twice as fast as
    torch's)."""
    lse = torch.empty(logits.shape[0], 1, dtype=dtype, device=logits.device)
    for lo in range(0, logits.shape[0], tile_rows):
        tile = slice(lo, lo + tile_rows)
        chunk = logits[tile]
        top = chunk.amax(-1, keepdim=True).to(dtype)
        # log2(e) (chunk - top) in one pass, read in ``dtype`` whatever the logits' own
        e = torch.add(top * -LOG2E, chunk, alpha=LOG2E).exp2_()
        torch.sum(e, -1, keepdim=True, out=lse[tile]).log_().add_(top)
    return lse


PRECISE_LIBRARY = 4096.0
"""Without gradients (evaluation, scores, validation) on the CPU, the count terms of cells with
a larger library are computed again in float64. In float32 a deep cell's lgamma and x log(mu)
terms (~1e4 nats each) and its softmax normalizer (which enters times the library) lose up to
0.05 nats of log p(x) at 50k UMIs; below this library the loss is under 0.002 nats."""


def _deep_rows_in_float64(x, logits, library, zi, terms: _ThetaTerms, tile_rows: int,
                          value: torch.Tensor) -> torch.Tensor:
    """``value`` (the per-row count terms) with the rows above :data:`PRECISE_LIBRARY`
    recomputed in float64 (rows of ``logits`` are blocks of ``x``'s rows)."""
    deep = torch.nonzero(library[:, 0] > PRECISE_LIBRARY).squeeze(1)
    if not deep.numel():
        return value
    if terms.theta.shape[0] > 1:  # per-row θ
        terms = _ThetaTerms(*(t.index_select(0, deep) for t in terms[:3]), None)
    sub_logits = logits.index_select(0, deep)
    sub = _NonzeroCounts(x.index_select(0, deep % x.shape[0]), terms.theta.shape[0] == 1,
                         sparse=True)
    precise = _nonzero_terms(
        sub, sub_logits, _log_softmax_normalizer(sub_logits, tile_rows, torch.float64),
        library.index_select(0, deep), None if zi is None else zi.index_select(0, deep), terms)
    return value.index_copy(0, deep, precise.value.to(value.dtype))


def _scaled(f: torch.Tensor, by: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``f * by`` written straight into a tensor of ``dtype`` (the input's, for its gradient)."""
    return torch.mul(f, by, out=torch.empty(f.shape, dtype=dtype, device=f.device))


def _rows(t: torch.Tensor | None, tile: slice) -> torch.Tensor | None:
    """A tile's rows of a θ-shaped tensor (all of it when θ is shared by the rows)."""
    return t if t is None or t.shape[0] == 1 else t[tile]


class _FusedNB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, logits, library, theta, zi, sparse, tile_rows, grads, nonzero_at):
        _, need_logits, _, need_theta, need_zi = (grads and n for n in ctx.needs_input_grad[:5])
        need_zi = need_zi and zi is not None
        # low-precision logits (the bfloat16 heads' own outputs) are read a tile at a time in
        # the precision of θ; their gradients go back in their own dtype
        dtype = torch.promote_types(logits.dtype, theta.dtype)
        ctx.dtypes = logits.dtype, None if zi is None else zi.dtype
        terms = _ThetaTerms.of(theta, need_logits or need_theta or need_zi)
        lse = _log_softmax_normalizer(logits, tile_rows, dtype)  # (batch, 1)
        nonzero = _NonzeroCounts(x, theta.shape[0] == 1, sparse, *nonzero_at)
        corrections = _nonzero_terms(nonzero, logits, lse, library, zi, terms)
        if sparse and terms.grad_term is None and dtype == torch.float32:
            value = _deep_rows_in_float64(x, logits, library, zi, terms, tile_rows,
                                          corrections.value)
            corrections = corrections._replace(value=value)
        # gradient factors, written by the sweep: d/dlogits = -upstream * logits_factor,
        # d/dzi = upstream * zi_factor, d/dθ = -upstream * theta_factor (summed over cells
        # when θ is shared)
        factors = _Factors(*(
            torch.empty(logits.shape, dtype=dtype, device=logits.device) if need else None
            for need in (need_logits, need_zi, need_theta)))
        out = _sweep_tiles(x, logits, library, zi, terms=terms, lse=lse, tile_rows=tile_rows,
                           dtype=dtype, corrections=corrections, factors=factors)
        out += corrections.value
        logits_factor, zi_factor, theta_factor = factors
        for factor, correction in ((logits_factor, corrections.neg_dmu),
                                   (zi_factor, corrections.zi),
                                   (theta_factor, corrections.theta)):
            if factor is not None:
                nonzero.add_into(factor, correction)
        ctx.save_for_backward(logits_factor, zi_factor, theta_factor)
        ctx.theta_shape = theta.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        logits_factor, zi_factor, theta_factor = ctx.saved_tensors
        upstream = grad[:, None]  # (batch, 1) upstream gradient of each cell's sum
        g_logits = None if logits_factor is None \
            else _scaled(logits_factor, -upstream, ctx.dtypes[0])
        g_zi = None if zi_factor is None else _scaled(zi_factor, upstream, ctx.dtypes[1])
        g_theta = None
        if theta_factor is not None:
            g_theta = (-upstream.reshape(1, -1) @ theta_factor if ctx.theta_shape[0] == 1
                       else theta_factor * -upstream)
        return None, g_logits, None, g_theta, g_zi, None, None, None, None


class _Factors(NamedTuple):
    """The gradient factors the sweep writes, ``(rows, genes)`` each (``None``: not needed)."""

    logits: torch.Tensor | None
    zi: torch.Tensor | None
    theta: torch.Tensor | None


def _sweep_tiles(x, logits, library, zi, *, terms: _ThetaTerms, lse, tile_rows, dtype,
                 corrections: _NonzeroTerms, factors: _Factors) -> torch.Tensor:
    """Run :func:`_sweep` over the tiles of rows; the per-row zero-count log-likelihood."""
    theta = terms.theta
    theta_eps, theta_log2_theta = theta + EPS, terms.theta_log_theta * LOG2E
    neg_log2_norm = lse * -LOG2E
    # a zero's ZINB probability computed as it is, unless π = sigmoid(z) could underflow
    # together with NB(0) (checked tile by tile); only on the CPU, where the check costs no
    # wait for a device and the softplus it saves are the sweep's costliest functions
    on_cpu = x.device.type == "cpu"
    n_rows = logits.shape[0]  # x's rows, or repeats of them
    out = torch.empty(n_rows, dtype=dtype, device=logits.device)
    for lo in range(0, n_rows, tile_rows):
        tile = slice(lo, min(lo + tile_rows, n_rows))
        zi_tile = None if zi is None else zi[tile].to(dtype, copy=True)
        # on the tile's copy, in cache: no separate pass over all of zi (0.993x the step)
        direct = zi_tile is None or (on_cpu and bool(zi_tile.amin() > DIRECT_MIN_ZI))
        _sweep(
            out[tile], logits[tile], neg_log2_norm=neg_log2_norm[tile], library=library[tile],
            theta=_rows(theta, tile), theta_eps=_rows(theta_eps, tile), zi=zi_tile,
            theta_log2_theta=_rows(theta_log2_theta, tile),
            theta_grad_term=_rows(terms.grad_term, tile) if factors.theta is not None else None,
            neg_dmu_correction=(corrections.neg_dmu_sum[tile] if factors.logits is not None
                                else None),
            factors=_Factors(*(None if f is None else f[tile] for f in factors)),
            direct=direct)
    return out


def _sweep(out, logits, *, neg_log2_norm, library, theta, theta_eps, zi, theta_log2_theta,
           theta_grad_term, neg_dmu_correction, factors: _Factors, direct: bool) -> None:
    """One tile of rows, every entry taken as a zero count: the rows' log-likelihood written
    into ``out`` ``(c,)``, and the gradient factors into the ``*_factor`` slices that are
    given. ``neg_log2_norm`` is minus the softmax normalizer in base 2, ``theta_eps`` θ + eps,
    ``theta_log2_theta`` θ log2(θ + eps), ``zi`` a copy the sweep may overwrite. ``direct``:
    the zero-inflation mixture in probabilities, one log where its logs take two softplus."""
    logits_factor, zi_factor, theta_factor = factors
    p = torch.add(neg_log2_norm, logits, alpha=LOG2E).exp2_()  # (c, genes) fractions
    mu = p * library
    total = mu + theta_eps  # θ + mu + eps
    log2_total = torch.log2(total)
    log2_nb_zero = torch.addcmul(theta_log2_theta, log2_total, theta, value=-1.0)
    nb_weight = None  # the posterior weight of the NB component at a zero (ZINB)
    grads = logits_factor is not None or zi_factor is not None or theta_factor is not None
    if zi is None:
        torch.sum(log2_nb_zero, -1, out=out).mul_(LN2)
    elif direct:  # log(π + (1 - π) NB(0)), π = sigmoid(z); w = (1 - π) NB(0) / P(0)
        nb_zero = log2_nb_zero.exp2_()
        zero_prob = zi.sigmoid_()  # π, then P(0) = π + (1 - π) NB(0)
        # 1 - π: one subtraction where sigmoid(-z) took a second sigmoid; where π rounds to 1
        # (z > 17 in float32) it is 0, which moves the mixture and its factors by < 1e-7
        not_pi = torch.rsub(zero_prob, 1.0)
        zero_prob.addcmul_(not_pi, nb_zero)
        if grads:
            nb_weight = nb_zero.mul_(not_pi).div_(zero_prob)
        torch.sum(zero_prob.log2_(), -1, out=out).mul_(LN2)
        if zi_factor is not None:  # sigmoid(-z) - w
            torch.sub(not_pi, nb_weight, out=zi_factor)
    else:  # the same in logs: softplus(log NB(0) - z) - softplus(-z)
        a = log2_nb_zero.mul_(LN2).sub_(zi)
        neg_zi = zi.neg_()
        torch.sum(F.softplus(a).sub_(F.softplus(neg_zi)), -1, out=out)
        if grads:
            nb_weight = a.sigmoid_()
        if zi_factor is not None:
            torch.sub(neg_zi.sigmoid_(), nb_weight, out=zi_factor)
    if logits_factor is None and theta_factor is None:
        return
    r = torch.div(theta, total)  # θ / (θ + mu + eps)
    if theta_factor is not None:  # -d log NB(0) / dθ = log(total) + θ / total - grad_term
        torch.add(r, log2_total, alpha=LN2, out=theta_factor).sub_(theta_grad_term)
        if nb_weight is not None:
            theta_factor.mul_(nb_weight)
    if logits_factor is not None:  # -h = w θ mu / total
        neg_dmu = r.mul_(mu) if nb_weight is None else r.mul_(mu).mul_(nb_weight)
        # (c, 1): sum_k -h_k, the non-zero counts' terms included
        s = neg_dmu.sum(-1, keepdim=True).add_(neg_dmu_correction)
        torch.addcmul(neg_dmu, p, s, value=-1.0, out=logits_factor)


def _nonzero_terms(nonzero: _NonzeroCounts, logits, lse, library, zi,
                   terms: _ThetaTerms) -> _NonzeroTerms:
    """What the entries with non-zero counts add to the zero-count sweep: the per-cell value,
    and when gradients are needed (``terms.grad_term`` given) the corrections of the gradient
    factors."""
    work = lse.dtype  # float64 for a precise value without gradients (see forward)
    counts = nonzero.counts.to(work)
    grads = terms.grad_term is not None
    per_theta = [terms.theta, terms.theta_log_theta, terms.lgamma_theta]
    if grads:
        per_theta += [torch.digamma(terms.theta), terms.grad_term]
    theta_at, theta_log_theta_at, lgamma_theta_at, *grad_at = (
        t.to(work) for t in nonzero.thetas_at(*per_theta))
    mu = torch.sub(nonzero.at(logits).to(work), nonzero.row_at(lse)).exp_()
    mu.mul_(nonzero.row_at(library).to(work))
    total = torch.add(mu, theta_at).add_(EPS)
    log_total = torch.log(total)
    log_nb_zero = torch.addcmul(theta_log_theta_at, theta_at, log_total, value=-1.0)
    mu_eps, x_theta = mu + EPS, counts + theta_at
    # log NB(x) = log NB(0) + x (log(mu + eps) - log total) + lgamma(x + θ) - lgamma(θ) - log x!
    log_nb = torch.addcmul(log_nb_zero, counts, torch.log(mu_eps).sub_(log_total))
    log_nb.add_(torch.lgamma(x_theta)).sub_(lgamma_theta_at).sub_(log_factorial(counts))
    if zi is None:
        value = nonzero.row_sums(log_nb.sub_(log_nb_zero))
        not_w = None
    else:  # x > 0 gives NB(x) - softplus(z) in place of the zero term the sweep gave
        zi_at = nonzero.at(zi).to(work)
        a = log_nb_zero.sub_(zi_at)
        # NB(x) - softplus(z) - (softplus(a) - softplus(-z)), and softplus(z) - softplus(-z) = z
        value = nonzero.row_sums(log_nb.sub_(zi_at).sub_(F.softplus(a)))
        not_w = a.neg_().sigmoid_()  # 1 - w, w the NB weight the sweep used
    if not grads:
        return _NonzeroTerms(value, None, None, None, None)
    inv = torch.reciprocal(total)
    # -h at x > 0, minus the sweep's w θ mu / total: mu ((x + θ (1 - w)) / total - x / (mu + eps))
    neg_dmu = torch.mul(counts, inv) if not_w is None \
        else torch.addcmul(counts, theta_at, not_w).mul_(inv)
    neg_dmu.sub_(counts / mu_eps).mul_(mu)
    # θ: the true factor is base - extra, extra = ψ(x + θ) - ψ(θ) - x / total; the sweep wrote
    # base * w, base = log(total) + θ / total - grad_term
    digamma_theta_at, grad_term_at = grad_at
    neg_extra = torch.addcmul(digamma_theta_at, counts, inv).sub_(nonzero.digamma(x_theta))
    zi_term = None
    if not_w is None:
        theta_term = neg_extra
    else:
        base = torch.addcmul(log_total, theta_at, inv).sub_(grad_term_at)
        theta_term = base.mul_(not_w).add_(neg_extra)
        zi_term = not_w.neg()  # sigmoid(-z) - 1 in place of sigmoid(-z) - w
    return _NonzeroTerms(value, neg_dmu, nonzero.row_sums(neg_dmu)[:, None], zi_term,
                         theta_term)


def _digamma(y: torch.Tensor) -> torch.Tensor:
    """digamma(y) for y >= 1, in a few vectorized passes (``torch.digamma`` is scalar code on
    the CPU): ``ψ(y) = ψ(y + 4) - sum_{k<4} 1 / (y + k)``, and the asymptotic series to
    ``w^-8`` at ``w = y + 4 >= 5`` (truncation error below 1e-9)."""
    shift, w, r = torch.reciprocal(y), y + 1.0, torch.empty_like(y)
    for _ in range(3):  # in place: few temporaries, which stay in cache
        shift.add_(torch.reciprocal(w, out=r))
        w.add_(1.0)
    iw = torch.reciprocal(w)  # w = y + 4
    iw2 = iw * iw
    # iw2 (1/12 - iw2 (1/120 - iw2 (1/252 - iw2 / 240)))
    series = torch.mul(iw2, -1.0 / 240).add_(1.0 / 252)
    for c in (1.0 / 120, 1.0 / 12):
        series.mul_(iw2).neg_().add_(c)
    series.mul_(iw2)
    return torch.log(w).sub_(iw.mul_(0.5)).sub_(series).sub_(shift)


FACTORIAL_TABLE_SIZE = 2**14
"""Counts below this read log(x!) from a table (64 KiB of float32, held in cache)."""

_factorial_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def log_factorial(x: torch.Tensor) -> torch.Tensor:
    """lgamma(x + 1): on the CPU looked up when every x is an integer below
    ``FACTORIAL_TABLE_SIZE`` (counts; a third of lgamma's time there), computed otherwise
    (non-integer counts; on an accelerator, where the check would wait for the device)."""
    if x.device.type != "cpu" or not x.numel():
        return torch.lgamma(x + 1)
    n = x.to(torch.int32)
    if not torch.equal(n.to(x.dtype), x) or int(n.amax()) >= FACTORIAL_TABLE_SIZE:
        return torch.lgamma(x + 1)
    key = x.device, x.dtype
    if key not in _factorial_tables:
        k = torch.arange(FACTORIAL_TABLE_SIZE, dtype=torch.float64)
        _factorial_tables[key] = torch.lgamma(k + 1).to(device=x.device, dtype=x.dtype)
    return _factorial_tables[key].index_select(0, n.reshape(-1)).reshape(x.shape)
