"""log p(x | z) per cell, straight from the decoder's logits, in cache-sized row chunks.

The training loss needs only ``sum_g log NB(x_cg | mu_cg, θ_g)`` (or ZINB) per cell, with
``mu = softmax(logits) * library``. Built from separate torch operations, that sum allocates a
dozen fresh ``(batch, genes)`` tensors per step forward and as many backward; on a CPU, at
large batches, the page faults of those allocations cost more than the arithmetic. Here the
softmax, the likelihood and their gradients run over a few rows at a time (``chunk_elements``
numbers, which stay in cache), the backward pass recomputes what it needs instead of keeping
it, and only the per-cell sums and the gradients of the inputs have the full shape.

Per entry the terms are those of :mod:`omicvae_sc.module._nb_kernel` (same ``EPS``), and the
lgamma / digamma terms run on the non-zero counts only (``sparse``, the CPU default).
Gradient of a cell's sum with respect to its logits, with ``h = mu * dlogp/dmu``:
``d/dlogits_g = h_g - p_g * sum_k h_k``, where at x = 0 ``h = -w θ mu / (θ + mu)`` (``w`` the
posterior weight of the NB component, 1 for NB) and at x > 0
``h = x mu / (mu + eps) - (θ + x) mu / (θ + mu + eps)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omicvae_sc.module._nb_kernel import EPS

CHUNK_ELEMENTS = 2**17
"""Entries per chunk on the CPU: 512 KiB of float32 (64 rows of 2,000 genes), so a chunk's
temporaries stay in the per-core L2 cache (of 2**15 to 2**20, 2**17 was fastest at batch 512
on the project's CPU)."""


def count_log_likelihood(
    x: torch.Tensor, logits: torch.Tensor, library: torch.Tensor, theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None, *, sparse: bool | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """``log p(x | z)`` summed over genes, ``(batch,)``, for NB (or ZINB with ``zi_logits``).

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
    """
    on_cpu = x.device.type == "cpu"
    sparse = on_cpu if sparse is None else sparse
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS if on_cpu else x.numel()
    rows = max(1, chunk_elements // max(1, x.shape[-1]))
    return _CountLogLikelihood.apply(x, logits, library, theta, zi_logits, sparse, rows)


class _Chunk:
    """The shared quantities of one chunk of rows ``[lo, hi)``, computed once per pass."""

    def __init__(self, x, logits, library, theta, zi, lo, hi, sparse, theta_logs, nz=None):
        self.x, self.z = x[lo:hi], None if zi is None else zi[lo:hi]
        self.lo, self.hi = lo, hi
        self.theta = self.rows_of(theta)  # (1 or c, genes)
        self.p = torch.softmax(logits[lo:hi], dim=-1)  # (c, genes) expression fractions
        self.mu = self.p * library[lo:hi]
        self.total = self.mu + (self.theta + EPS)  # θ + mu + eps
        # log(θ + eps), θ log(θ + eps) and lgamma(θ), computed once per pass on θ's own shape
        self.log_theta, self.theta_log_theta, self.lgamma_theta = (
            self.rows_of(t) for t in theta_logs)
        self.sparse = sparse
        if sparse and nz is None:  # the forward pass finds the non-zeros, backward reuses them
            r, g = torch.nonzero(self.x > 0).unbind(1)
            flat = r * self.x.shape[1] + g  # row-major positions in the chunk
            nz = (r, flat, g if self.theta.shape[0] == 1 else flat)
            nz += (self.x.reshape(-1).index_select(0, flat),)
        self.nz = nz
        self.row, self.flat, self.theta_pos, self.xv = nz if sparse else (None,) * 3 + (self.x,)

    def lnb0(self, lt: torch.Tensor) -> torch.Tensor:
        """log NB(0) = θ log(θ + eps) - θ lt, ``(c, genes)``, in one pass."""
        return torch.addcmul(self.theta_log_theta, lt, self.theta, value=-1.0)

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """This chunk's rows of a θ-shaped tensor (all of it when θ is shared by the rows)."""
        return t if t.shape[0] == 1 else t[self.lo:self.hi]

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """Entries of a chunk-shaped (or θ-shaped) tensor at the non-zero counts, ``(nnz,)``."""
        if not self.sparse:
            return t.expand(self.x.shape)
        if t.shape[0] == 1 and self.x.shape[0] > 1:
            return t.reshape(-1).index_select(0, self.theta_pos)
        return t.reshape(-1).index_select(0, self.flat)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Sums of values at the non-zero counts, per row, ``(c,)``."""
        if not self.sparse:
            return values.sum(-1)
        out = torch.zeros(self.x.shape[0], dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.row, values)


def _theta_logs(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_theta = torch.log(theta + EPS)
    return log_theta, theta * log_theta, torch.lgamma(theta)


class _CountLogLikelihood(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, logits, library, theta, zi, sparse, rows):
        ctx.save_for_backward(x, logits, library, theta, zi)
        ctx.sparse, ctx.rows = sparse, rows
        logs = _theta_logs(theta)
        out = torch.empty(x.shape[0], dtype=logits.dtype, device=logits.device)
        ctx.nz = []
        for lo in range(0, x.shape[0], rows):
            hi = min(lo + rows, x.shape[0])
            ch = _Chunk(x, logits, library, theta, zi, lo, hi, sparse, logs)
            out[lo:hi] = _chunk_value(ch)
            if any(ctx.needs_input_grad):
                ctx.nz.append(ch.nz)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, logits, library, theta, zi = ctx.saved_tensors
        _, need_logits, _, need_theta, need_zi = ctx.needs_input_grad[:5]
        logs = _theta_logs(theta)
        digamma_theta = torch.digamma(theta) if need_theta else None
        g_logits = torch.empty_like(logits) if need_logits else None
        g_zi = torch.empty_like(zi) if zi is not None and need_zi else None
        g_theta = torch.zeros_like(theta) if need_theta else None
        for i, lo in enumerate(range(0, x.shape[0], ctx.rows)):
            hi = min(lo + ctx.rows, x.shape[0])
            ch = _Chunk(x, logits, library, theta, zi, lo, hi, ctx.sparse, logs, ctx.nz[i])
            go = grad[lo:hi, None]  # (c, 1) upstream gradient of each cell's sum
            _chunk_grads(ch, go, g_logits, g_zi, g_theta, digamma_theta, lo, hi)
        return None, g_logits, None, g_theta, g_zi, None, None


def _chunk_value(ch: _Chunk) -> torch.Tensor:
    """Per-row log-likelihood of one chunk, ``(c,)``."""
    lt = torch.log(ch.total)
    lnb0 = ch.lnb0(lt)
    xv, tv = ch.xv, ch.at(ch.theta)
    # log NB(x) = lnb0 + x (log(mu + eps) - lt) + lgamma(x + θ) - lgamma(θ) - lgamma(x + 1)
    nb = (ch.at(lnb0) + xv * (torch.log(ch.at(ch.mu) + EPS) - ch.at(lt))
          + torch.lgamma(xv + tv) - ch.at(ch.lgamma_theta) - torch.lgamma(xv + 1))
    if ch.z is None:
        if not ch.sparse:
            return nb.sum(-1)
        return lnb0.sum(-1) + ch.per_row(nb - ch.at(lnb0))
    # ZINB: x = 0 gives softplus(lnb0 - z) - softplus(-z); x > 0 gives NB(x) - softplus(z)
    zero = F.softplus(lnb0.sub_(ch.z)).sub_(F.softplus(-ch.z))  # lnb0 is not needed again
    pos = nb - F.softplus(ch.at(ch.z))
    if not ch.sparse:
        return torch.where(ch.x > 0, pos, zero).sum(-1)
    return zero.sum(-1) + ch.per_row(pos - ch.at(zero))


def _chunk_grads(ch: _Chunk, go, g_logits, g_zi, g_theta, digamma_theta, lo, hi) -> None:
    """Write the gradients of one chunk's rows into the full-size gradient tensors.

    Dense terms are built negated where that saves a pass, and the sign goes into the
    upstream gradient (``neg_go``), a ``(c, 1)`` column.
    """
    inv = torch.reciprocal(ch.total)
    lt = torch.log(ch.total)
    neg_go = -go
    w = None
    if ch.z is not None:  # weight of the NB component in a zero; 1 at a non-zero count
        w = ch.lnb0(lt).sub_(ch.z).sigmoid_()
        if ch.sparse:
            w.view(-1).index_fill_(0, ch.flat, 1.0)
        else:
            w = torch.where(ch.x > 0, 1.0, w)
    r = ch.theta * inv  # θ / (θ + mu + eps)
    xv, muv, invv, tv = ch.xv, ch.at(ch.mu), ch.at(inv), ch.at(ch.theta)
    if g_logits is not None:
        hn = r * ch.mu  # -h; x = 0: h = -w θ mu / total
        if w is not None:
            hn.mul_(w)
        hn_pos = (tv + xv) * muv * invv - xv * muv / (muv + EPS)
        if ch.sparse:
            hn.view(-1).index_copy_(0, ch.flat, hn_pos)
        else:
            hn = torch.where(ch.x > 0, hn_pos, hn)
        s = hn.sum(-1, keepdim=True)  # (c, 1), -sum_k h_k
        # go (h - p sum h) = -go (hn - p s)
        torch.mul(torch.addcmul(hn, ch.p, s, value=-1.0), neg_go, out=g_logits[lo:hi])
    if g_zi is not None:  # sigmoid(-z) - w, i.e. -sigmoid(z) at a non-zero count
        torch.mul(torch.neg(ch.z).sigmoid_().sub_(w), go, out=g_zi[lo:hi])
    if g_theta is not None:
        # -d lnb0 / dθ = lt + θ / total - (log(θ + eps) + θ / (θ + eps)), weighted by w
        dn = torch.add(lt, r).sub_(ch.log_theta + ch.theta / (ch.theta + EPS))
        if w is not None:
            dn.mul_(w)
        digamma = _digamma if ch.sparse else torch.digamma
        extra = digamma(xv + tv) - ch.at(ch.rows_of(digamma_theta)) - xv * invv
        if not ch.sparse:
            dn = dn - torch.where(ch.x > 0, extra, 0.0)
        if g_theta.shape[0] == 1:  # one θ per gene: weighted sum over rows
            g_theta.add_(neg_go.reshape(1, -1) @ dn)
            if ch.sparse:
                g_theta.view(-1).index_add_(0, ch.theta_pos, extra * go.reshape(-1)[ch.row])
        else:
            dn.mul_(neg_go)
            if ch.sparse:
                dn.view(-1).index_add_(0, ch.flat, extra * go.reshape(-1)[ch.row])
            g_theta[lo:hi] = dn


def _digamma(y: torch.Tensor) -> torch.Tensor:
    """digamma(y) for y >= 1, in a few vectorized passes (``torch.digamma`` is scalar code on
    the CPU): ``ψ(y) = ψ(y + 6) - sum_{k<6} 1 / (y + k)``, and the asymptotic series at
    ``y + 6 >= 7`` (truncation error below 1e-9)."""
    shift = torch.reciprocal(y)
    for k in range(1, 6):
        shift += torch.reciprocal(y + k)
    w = y + 6.0
    iw = torch.reciprocal(w)
    iw2 = iw * iw
    series = iw2 * (1.0 / 12 - iw2 * (1.0 / 120 - iw2 * (1.0 / 252)))
    return torch.log(w) - 0.5 * iw - series - shift
