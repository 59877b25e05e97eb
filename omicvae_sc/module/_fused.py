"""log p(x | z) per cell, straight from the decoder's logits, in one sweep with its gradients.

The training loss needs only ``sum_g log NB(x_cg | mu_cg, θ_g)`` (or ZINB) per cell, with
``mu = softmax(logits) * library``. Built from separate torch operations, that sum allocates a
dozen fresh ``(batch, genes)`` tensors per step forward and as many backward; on a CPU, at
large batches, the page faults of those allocations cost more than the arithmetic. Here:

- Every entry is first treated as a zero count: the dense terms (softmax, log NB(0), the
  zero-inflation mixture) run over a few rows at a time (``chunk_elements`` numbers, which stay
  in cache), with no indexing inside the chunk loop.
- The entries with non-zero counts are then corrected in one vectorized pass over all of them
  (``sparse``, the CPU default): their lgamma / digamma terms, and the difference between their
  true terms and the zero-count terms the dense sweep gave them. Doing it once per batch, not
  per chunk, keeps the number of operations small and the vectors long enough for threads.
- A zero's ZINB probability ``π + (1 - π) NB(0)`` is computed as it is and its log taken once
  (in logs it takes two softplus, the costliest functions of the sweep), unless a logit is
  so negative that π and NB(0) could both underflow (``DIRECT_MIN_ZI``).
- When a gradient will be needed, the same sweep writes the gradients' per-entry factors, so
  backward is a scaling by the upstream gradient: nothing is computed twice.

Per entry the terms are those of :mod:`omicvae_sc.module._nb_kernel` (same ``EPS``).
Gradient of a cell's sum with respect to its logits, with ``h = mu * dlogp/dmu``:
``d/dlogits_g = h_g - p_g * sum_k h_k``, where at x = 0 ``h = -w θ mu / (θ + mu)`` (``w`` the
posterior weight of the NB component, 1 for NB) and at x > 0
``h = x mu / (mu + eps) - (θ + x) mu / (θ + mu + eps)``. The factors are kept negated where
that saves a pass (``hn = -h``); backward scales them by the negated upstream gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from omicvae_sc.module._nb_kernel import EPS

LOG2E, LN2 = 1.0 / math.log(2.0), math.log(2.0)
# exp and log go through exp2 and log2, which torch runs 4x and 1.3x faster on the CPU (float32,
# AVX512): exp(t) = exp2(t log2(e)), log(t) = ln(2) log2(t)

DIRECT_MIN_ZI = -80.0
"""Above this smallest zero-inflation logit of a chunk, the sweep computes a zero's ZINB
probability directly: π = sigmoid(z) > 1e-35 cannot underflow, so neither can π + (1 - π) NB(0)."""

CHUNK_ELEMENTS = 2**18
"""Entries per chunk on the CPU: 1 MiB of float32 (131 rows of 2,000 genes), split between the
threads, so a chunk's temporaries stay near the per-core L2 cache while the chunks stay few
(each costs a few dozen operations to dispatch). Against 2**17, in paired training steps on the
project's 2-core CPU: 0.98x at batch 512, 0.985x at 128, equal at 256; 2**19 was slower at 512
and 2**15 1.11x slower at 128."""


def count_log_likelihood(
    x: torch.Tensor, logits: torch.Tensor, library: torch.Tensor, theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None, *, sparse: bool | None = None,
    chunk_elements: int | None = None,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None, repeats: int = 1,
) -> torch.Tensor:
    """``log p(x | z)`` summed over genes, ``(batch,)``, for NB (or ZINB with ``zi_logits``).

    With ``repeats`` = K, ``logits``, ``library``, ``zi_logits`` (and a per-cell ``theta``)
    hold K blocks of ``x``'s rows (K importance samples of each cell, block after block), each
    block scored against ``x``: ``(K * batch,)``, as if ``x`` were repeated, without the copy.

    Parameters
    ----------
    x
        ``(batch, genes)`` counts.
    logits
        ``(batch, genes)`` decoder logits; the NB mean is ``softmax(logits) * library``.
    library
        ``(batch, 1)`` library sizes (the exposure).
    theta
        ``(1, genes)`` or ``(batch, genes)`` inverse dispersion.
    zi_logits
        ``(batch, genes)`` zero-inflation logits, or ``None`` for NB.
    sparse
        Compute the count-dependent terms at the non-zero counts only (default: on the CPU).
        Finding them synchronizes with the device, so elsewhere every term is dense.
    chunk_elements
        Entries per chunk of rows (default: ``CHUNK_ELEMENTS`` on the CPU, the whole batch
        elsewhere).
    nonzero
        ``(rows, genes)`` of the non-zero counts of ``x`` (int64 vectors, any order), when the
        caller knows them (the minibatch loader does); searched for otherwise. Used by
        ``sparse`` only.
    """
    on_cpu = x.device.type == "cpu"
    sparse = on_cpu if sparse is None else sparse
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS if on_cpu else x.numel()
    rows = max(1, chunk_elements // max(1, x.shape[-1]))
    # inside forward() autograd is off and needs_input_grad ignores it: pass it along
    grads = torch.is_grad_enabled()
    if repeats > 1 and not sparse:
        x = x.repeat(repeats, 1)  # the dense path reads every entry
        repeats = 1
    return _CountLogLikelihood.apply(x, logits, library, theta, zi_logits, sparse, rows, grads,
                                     (nonzero, repeats))


class _Counts:
    """The entries with non-zero counts: gathered into vectors (sparse), or all entries with a
    mask (dense, where finding them would synchronize with the device)."""

    def __init__(self, x: torch.Tensor, theta_shared: bool, sparse: bool,
                 nonzero: tuple[torch.Tensor, torch.Tensor] | None = None, repeats: int = 1):
        self.sparse = sparse
        if sparse:
            if nonzero is None:
                nonzero = torch.nonzero(x).unbind(1)
            row, genes = nonzero
            if row.numel() > 1 and not bool((row[1:] >= row[:-1]).all()):
                order = torch.argsort(row, stable=True)  # grouped by cell, for row_sums
                row, genes = row[order], genes[order]
            flat = row * x.shape[1] + genes  # row-major positions
            values = x.reshape(-1).index_select(0, flat)
            if repeats > 1:  # block k holds the rows k * batch + row, scored against x
                offsets = torch.arange(repeats, device=row.device) * x.shape[0]
                row = (row + offsets[:, None]).reshape(-1)
                genes, values = genes.repeat(repeats), values.repeat(repeats)
                flat = row * x.shape[1] + genes
            self.row = row
            # entries per cell: the rows are grouped, so per-cell sums are segment sums
            bounds = torch.arange(repeats * x.shape[0] + 1, device=row.device)
            self.lengths = torch.diff(torch.searchsorted(row, bounds))
            self.flat = flat
            self.theta_pos = genes if theta_shared else self.flat
            self.x = values
        else:
            self.mask, self.x = x > 0, x

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """A ``(batch, genes)`` tensor at the non-zero counts."""
        return t.reshape(-1).index_select(0, self.flat) if self.sparse else t

    def thetas_at(self, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Several θ-shaped tensors at the non-zero counts, gathered in one pass."""
        if not self.sparse:
            return ts
        return torch.stack([t.reshape(-1) for t in ts]).index_select(1, self.theta_pos).unbind(0)

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


def _theta_logs(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log(θ + eps), θ log(θ + eps) and lgamma(θ), once per pass on θ's own shape."""
    log_theta = torch.log(theta + EPS)
    return log_theta, theta * log_theta, torch.lgamma(theta)


def _log_softmax_normalizer(logits: torch.Tensor, rows: int, dtype: torch.dtype
                            ) -> torch.Tensor:
    """logsumexp over genes in ``dtype``, ``(batch, 1)``, by chunks of rows (twice as fast as
    torch's)."""
    lse = torch.empty(logits.shape[0], 1, dtype=dtype, device=logits.device)
    for lo in range(0, logits.shape[0], rows):
        sl = slice(lo, lo + rows)
        chunk = logits[sl]
        top = chunk.amax(-1, keepdim=True).to(dtype)
        # log2(e) (chunk - top) in one pass, read in ``dtype`` whatever the logits' own
        e = torch.add(top * -LOG2E, chunk, alpha=LOG2E).exp2_()
        torch.sum(e, -1, keepdim=True, out=lse[sl]).log_().add_(top)
    return lse


def _scaled(f: torch.Tensor, by: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``f * by`` written straight into a tensor of ``dtype`` (the input's, for its gradient)."""
    return torch.mul(f, by, out=torch.empty(f.shape, dtype=dtype, device=f.device))


class _CountLogLikelihood(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, logits, library, theta, zi, sparse, rows, grads, counts_at):
        _, need_logits, _, need_theta, need_zi = (grads and n for n in ctx.needs_input_grad[:5])
        need_zi = need_zi and zi is not None
        # low-precision logits (the bfloat16 heads' own outputs) are read a chunk at a time in
        # the precision of θ; their gradients go back in their own dtype
        dtype = torch.promote_types(logits.dtype, theta.dtype)
        ctx.dtypes = logits.dtype, None if zi is None else zi.dtype
        log_theta, theta_log_theta, lgamma_theta = _theta_logs(theta)
        lse = _log_softmax_normalizer(logits, rows, dtype)  # (batch, 1)
        nz = _Counts(x, theta.shape[0] == 1, sparse, *counts_at)  # (nonzero, repeats)
        grads = need_logits or need_theta or need_zi
        # -d lnb0 / dθ = lt + θ / total - theta_term
        theta_term = log_theta + theta / (theta + EPS) if grads else None
        corr = _correction(nz, logits, lse, library, theta, zi, theta_log_theta, lgamma_theta,
                           theta_term)
        # gradient factors, written by the sweep: d/dlogits = -go * f_logits, d/dzi = go * f_zi,
        # d/dθ = -go * f_theta (summed over cells when θ is shared)
        f_logits, f_zi, f_theta = (
            torch.empty(logits.shape, dtype=dtype, device=logits.device) if need else None
            for need in (need_logits, need_zi, need_theta))
        theta_eps, theta_log2_theta = theta + EPS, theta_log_theta * LOG2E
        nlse2 = lse * -LOG2E
        # a zero's ZINB probability computed as it is, unless π = sigmoid(z) could underflow
        # together with NB(0) (checked chunk by chunk); only on the CPU, where the check costs
        # no wait for a device and the softplus it saves are the sweep's costliest functions
        on_cpu = x.device.type == "cpu"
        n_rows = logits.shape[0]  # x's rows, or repeats of them
        out = torch.empty(n_rows, dtype=dtype, device=logits.device)
        for lo in range(0, n_rows, rows):
            sl = slice(lo, min(lo + rows, n_rows))
            zc = None if zi is None else zi[sl].to(dtype, copy=True)
            # on the chunk's copy, in cache: no separate pass over all of zi (0.993x the step)
            direct = zc is None or (on_cpu and bool(zc.amin() > DIRECT_MIN_ZI))
            _sweep(
                out[sl], logits[sl], nlse2[sl], library[sl], _rows(theta, sl),
                _rows(theta_eps, sl), zc, _rows(theta_log2_theta, sl),
                _rows(theta_term, sl) if need_theta else None,
                corr["hn_sum"][sl] if need_logits else None,
                *(None if f is None else f[sl] for f in (f_logits, f_zi, f_theta)),
                direct=direct)
        out += corr["value"]
        for f, key in ((f_logits, "hn"), (f_zi, "zi"), (f_theta, "theta")):
            if f is not None:
                nz.add_into(f, corr[key])
        ctx.save_for_backward(f_logits, f_zi, f_theta)
        ctx.theta_shape = theta.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        f_logits, f_zi, f_theta = ctx.saved_tensors
        go = grad[:, None]  # (batch, 1) upstream gradient of each cell's sum
        g_logits = None if f_logits is None else _scaled(f_logits, -go, ctx.dtypes[0])
        g_zi = None if f_zi is None else _scaled(f_zi, go, ctx.dtypes[1])
        g_theta = None
        if f_theta is not None:
            g_theta = -go.reshape(1, -1) @ f_theta if ctx.theta_shape[0] == 1 else f_theta * -go
        return None, g_logits, None, g_theta, g_zi, None, None, None, None


def _rows(t: torch.Tensor, sl: slice) -> torch.Tensor:
    """A chunk's rows of a θ-shaped tensor (all of it when θ is shared by the rows)."""
    return t if t.shape[0] == 1 else t[sl]


def _sweep(out, logits, nlse2, library, theta, theta_eps, zi, theta_log2_theta,
           theta_term, hn_corr, f_logits, f_zi, f_theta, *, direct) -> None:
    """One chunk of rows, every entry taken as a zero count: the rows' log-likelihood written
    into ``out`` ``(c,)``, and the gradient factors into the ``f_*`` slices that are given.
    ``nlse2`` is minus the softmax normalizer in base 2, ``theta_eps`` θ + eps,
    ``theta_log2_theta`` θ log2(θ + eps), ``zi`` a copy the sweep may overwrite. ``direct``:
    the zero-inflation mixture in probabilities, one log where its logs take two softplus."""
    p = torch.add(nlse2, logits, alpha=LOG2E).exp2_()  # (c, genes) expression fractions
    mu = p * library
    total = mu + theta_eps  # θ + mu + eps
    l2t = torch.log2(total)  # log(total) / ln(2)
    lnb0 = torch.addcmul(theta_log2_theta, l2t, theta, value=-1.0)  # log2 NB(0)
    w = None
    grads = f_logits is not None or f_zi is not None or f_theta is not None
    if zi is None:
        torch.sum(lnb0, -1, out=out).mul_(LN2)
    elif direct:  # log(π + (1 - π) NB(0)), π = sigmoid(z); NB's weight w = (1 - π) NB(0) / q
        nb0 = lnb0.exp2_()
        q = zi.sigmoid_()  # π
        # 1 - π: one subtraction where sigmoid(-z) took a second sigmoid; where π rounds to 1
        # (z > 17 in float32) it is 0, which moves the mixture and its factors by < 1e-7
        not_pi = torch.rsub(q, 1.0)
        q.addcmul_(not_pi, nb0)
        if grads:
            w = nb0.mul_(not_pi).div_(q)
        torch.sum(q.log2_(), -1, out=out).mul_(LN2)
        if f_zi is not None:  # sigmoid(-z) - w
            torch.sub(not_pi, w, out=f_zi)
    else:  # the same in logs: softplus(lnb0 - z) - softplus(-z)
        a = lnb0.mul_(LN2).sub_(zi)
        nzi = zi.neg_()
        torch.sum(F.softplus(a).sub_(F.softplus(nzi)), -1, out=out)
        if grads:
            w = a.sigmoid_()
        if f_zi is not None:
            torch.sub(nzi.sigmoid_(), w, out=f_zi)
    if f_logits is None and f_theta is None:
        return
    r = torch.div(theta, total)  # θ / (θ + mu + eps)
    if f_theta is not None:  # -d lnb0 / dθ = lt + θ / total - (log(θ + eps) + θ / (θ + eps))
        torch.add(r, l2t, alpha=LN2, out=f_theta).sub_(theta_term)
        if w is not None:
            f_theta.mul_(w)
    if f_logits is not None:  # hn = -h = w θ mu / total
        hn = r.mul_(mu) if w is None else r.mul_(mu).mul_(w)
        s = hn.sum(-1, keepdim=True).add_(hn_corr)  # (c, 1), sum_k hn_k with the counts' terms
        torch.addcmul(hn, p, s, value=-1.0, out=f_logits)


def _correction(nz: _Counts, logits, lse, library, theta, zi, theta_log_theta, lgamma_theta,
                theta_term) -> dict[str, torch.Tensor]:
    """What the entries with non-zero counts add to the zero-count sweep: per-cell value
    ``value`` ``(batch,)``, and when gradients are needed (``theta_term`` given) per-cell
    ``hn_sum`` ``(batch, 1)`` and per-entry corrections of the gradient factors ``hn``, ``zi``
    and ``theta``."""
    xv = nz.x
    grads = theta_term is not None
    per_theta = [theta, theta_log_theta, lgamma_theta]
    if grads:
        per_theta += [torch.digamma(theta), theta_term]
    tv, tlt, lgt, *grad_terms = nz.thetas_at(*per_theta)
    mu = torch.sub(nz.at(logits).to(lse.dtype), nz.row_at(lse)).exp_().mul_(nz.row_at(library))
    total = torch.add(mu, tv).add_(EPS)
    lt = torch.log(total)
    lnb0 = torch.addcmul(tlt, tv, lt, value=-1.0)
    mu_eps, y = mu + EPS, xv + tv
    # log NB(x) = lnb0 + x (log(mu + eps) - lt) + lgamma(x + θ) - lgamma(θ) - lgamma(x + 1)
    nb = torch.addcmul(lnb0, xv, torch.log(mu_eps).sub_(lt))
    nb.add_(torch.lgamma(y)).sub_(lgt).sub_(_log_factorial(xv))
    if zi is None:
        out = {"value": nz.row_sums(nb.sub_(lnb0))}
        w1 = None
    else:  # x > 0 gives NB(x) - softplus(z) in place of the zero term the sweep gave
        zv = nz.at(zi).to(lse.dtype)
        a = lnb0.sub_(zv)
        # NB(x) - softplus(z) - (softplus(a) - softplus(-z)), and softplus(z) - softplus(-z) = z
        out = {"value": nz.row_sums(nb.sub_(zv).sub_(F.softplus(a)))}
        w1 = a.neg_().sigmoid_()  # 1 - w, w the NB weight the sweep used
    if not grads:
        return out
    inv = torch.reciprocal(total)
    # hn at x > 0, minus the sweep's w θ mu / total: mu ((x + θ (1 - w)) / total - x / (mu + eps))
    hn = torch.mul(xv, inv) if w1 is None else torch.addcmul(xv, tv, w1).mul_(inv)
    out["hn"] = hn.sub_(xv / mu_eps).mul_(mu)
    out["hn_sum"] = nz.row_sums(hn)[:, None]
    # θ: the true factor is base - extra, extra = ψ(x + θ) - ψ(θ) - x / total; the sweep wrote
    # base * w, base = log(total) + θ / total - theta_term
    digamma_tv, theta_term = grad_terms
    neg_extra = torch.addcmul(digamma_tv, xv, inv).sub_(nz.digamma(y))
    if w1 is None:
        out["theta"] = neg_extra
    else:
        base = torch.addcmul(lt, tv, inv).sub_(theta_term)
        out["theta"] = base.mul_(w1).add_(neg_extra)
        out["zi"] = w1.neg()  # sigmoid(-z) - 1 in place of sigmoid(-z) - w
    return out


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


def _log_factorial(x: torch.Tensor) -> torch.Tensor:
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
