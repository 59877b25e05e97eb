"""NB and ZINB log-probabilities with hand-written gradients.

Autograd through the textbook formula records about 25 elementwise operations on every
``(batch, genes)`` entry and as many again in the backward pass; on a CPU that, not the matrix
products, bounds a training step. :class:`NBLogProb` computes the same values with the
gradients in closed form: about ten elementwise passes backward. The lgamma / digamma terms
vanish where x = 0 and run on the non-zero counts only (most counts are 0).

Notation per entry: x count, mu NB mean, θ inverse dispersion, z zero-inflation logit,
``inv = 1 / (θ + mu + eps)``, ``lt = log(θ + mu + eps)``, ``lnb0 = θ (log(θ + eps) - lt)``
(log NB(0)).

- NB: ``f = lnb0 + x (log(mu + eps) - lt) + B(x, θ)``, B the log binomial coefficient.
- ZINB, x > 0: ``f = -z - softplus(-z) + NB``; x = 0: ``f = softplus(lnb0 - z) - softplus(-z)``.

With ``w = 1`` for NB and for x > 0, and ``w = sigmoid(lnb0 - z)`` for a ZINB zero:

- ``df/dmu = x / (mu + eps) - (w θ + x) inv``
- ``df/dθ = w (log(θ + eps) - lt + θ / (θ + eps) - θ inv) - x inv + dB/dθ``
- ``df/dz = sigmoid(-z) - w`` (ZINB).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

EPS = 1e-8  # keeps log() finite at mu -> 0 or theta -> 0


def _pick(t: torch.Tensor, idx: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Elements of ``t`` at ``idx`` (indices into a broadcast shape), without materializing
    the broadcast: size-1 dimensions are indexed at 0."""
    t = t.reshape((1,) * (len(idx) - t.dim()) + t.shape)
    return t[tuple(i if n > 1 else 0 for i, n in zip(idx, t.shape, strict=True))]


def _flat_at(t: torch.Tensor, shape: torch.Size, n_lead: int, flat: torch.Tensor
             ) -> torch.Tensor:
    """Entries of ``t`` (broadcast to ``shape``) at the flat positions ``flat`` of the
    dimensions after the first ``n_lead`` (the sample dimensions x lacks): ``(*lead, nnz)``."""
    return t.expand(shape).reshape(*shape[:n_lead], -1).index_select(-1, flat)


def _mul_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b``, in place in ``a`` (no new allocation) where the result has ``a``'s shape."""
    return a.mul_(b) if torch.broadcast_shapes(a.shape, b.shape) == a.shape else a * b


def _log_binom_at(xv: torch.Tensor, theta: torch.Tensor, idx) -> torch.Tensor:
    """log C(x + θ - 1, x) = lgamma(x + θ) - lgamma(θ) - lgamma(x + 1) at the non-zero counts
    ``xv`` (positions ``idx``); the term is 0 where x = 0."""
    # lgamma(θ) on θ's own (small) shape, then picked: not once per non-zero count
    tv = _pick(theta, idx)
    return torch.lgamma(xv + tv) - _pick(torch.lgamma(theta), idx) - torch.lgamma(xv + 1)


def _sum_into(shape: torch.Size, idx: tuple[torch.Tensor, ...], values: torch.Tensor
              ) -> torch.Tensor:
    """Sum ``values`` (one per index of ``idx``) into a tensor of ``shape`` (size-1 dimensions
    of ``shape`` collect every index)."""
    padded = (1,) * (len(idx) - len(shape)) + tuple(shape)
    flat = torch.zeros_like(idx[-1])
    for i, n in zip(idx, padded, strict=True):
        flat = flat * n + (i if n > 1 else 0)
    out = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    return out.index_add_(0, flat, values).view(shape)


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,
                zi_logits: torch.Tensor | None = None, *, sparse: bool | None = None
                ) -> torch.Tensor:
    """Elementwise log NB(x | mu, θ), or log ZINB when ``zi_logits`` is given (see
    :class:`NBLogProb`).

    ``sparse`` (default: on the CPU only) computes the x-dependent terms at the non-zero counts
    only. Finding them costs a host synchronisation, and on an accelerator the dense passes are
    cheap, so there every term is computed densely and nothing waits for the device.
    """
    if sparse is None:
        sparse = x.device.type == "cpu"
    return NBLogProb.apply(x, mu, theta, zi_logits, sparse)


class NBLogProb(torch.autograd.Function):
    """Elementwise log NB(x | mu, θ), or log ZINB(x | mu, θ, z) when ``zi_logits`` is given.

    ``mu`` (and ``zi_logits``) may carry leading sample dimensions that ``x`` lacks; ``theta``
    keeps its own (small) shape and its gradient is summed to it. With ``sparse``, terms that
    need x are computed at the non-zero counts only (gathered by flat position) and dense
    passes cover the x = 0 case; without, every term is dense (no data-dependent shapes).
    """

    @staticmethod
    def forward(ctx, x, mu, theta, zi_logits, sparse=True):
        total = mu + (theta + EPS)  # θ + mu + eps
        lt = torch.log(total)
        lnb0 = theta * (torch.log(theta + EPS) - lt)  # log NB(0)
        ctx.sparse = sparse
        want_w = zi_logits is not None and any(ctx.needs_input_grad)
        if not sparse:
            lnb = (lnb0 + x * (torch.log(mu + EPS) - lt) + torch.lgamma(x + theta)
                   - torch.lgamma(theta) - torch.lgamma(x + 1))
            w = None
            if zi_logits is None:
                f = lnb
            else:
                a, pos = lnb0 - zi_logits, x > 0
                f = torch.where(pos, lnb - zi_logits, F.softplus(a)) - F.softplus(-zi_logits)
                w = torch.where(pos, 1.0, torch.sigmoid(a)) if want_w else None
            ctx.save_for_backward(x, mu, theta, zi_logits, total, lt, w)
            return f
        full = torch.broadcast_shapes(*(t.shape for t in (x, mu, theta, zi_logits)
                                        if t is not None))
        if x.shape != full[len(full) - x.dim():] or theta.dim() > x.dim():
            x = x.expand(full).contiguous()  # general broadcasting: x gets every dimension
        n_lead = len(full) - x.dim()  # sample dimensions of mu that x lacks
        # positions of the non-zero counts, per dimension of x and flat (row-major) within x;
        # an n-d nonzero is cheaper than a flat one plus integer division (unravel_index)
        idx = torch.nonzero(x > 0).unbind(1)
        flat = idx[0]
        for i, n in zip(idx[1:], x.shape[1:], strict=True):
            flat = flat * n + i  # (nnz,)
        xv = x.reshape(-1).index_select(0, flat)  # (nnz,)
        at = functools.partial(_flat_at, shape=full, n_lead=n_lead, flat=flat)
        nz = (at(lnb0) + xv * (torch.log(at(mu) + EPS) - at(lt))
              + _log_binom_at(xv, theta, idx))  # (*lead, nnz) log NB(x) at x > 0
        w = None
        if zi_logits is None:
            f = lnb0.expand(full).contiguous()  # lnb0 is not needed again: filled in place
        else:
            a = lnb0 - zi_logits
            sp_neg_z = F.softplus(-zi_logits)
            f = (F.softplus(a) - sp_neg_z).expand(full).contiguous()
            nz = nz - at(zi_logits + sp_neg_z)
            if want_w:  # the weights of the gradient, not of the value
                w = torch.sigmoid(a).expand(full).contiguous()
                w.view(*full[:n_lead], -1).index_fill_(-1, flat, 1.0)
        f.view(*full[:n_lead], -1).index_copy_(-1, flat, nz)
        ctx.n_lead = n_lead
        ctx.save_for_backward(mu, theta, zi_logits, total, lt, w, xv, flat, *idx)
        return f

    @staticmethod
    def backward(ctx, grad):
        if not ctx.sparse:
            return (None, *_dense_backward(ctx, grad), None)
        mu, theta, zi_logits, total, lt, w, xv, flat, *idx = ctx.saved_tensors
        full, n_lead = grad.shape, ctx.n_lead
        at = functools.partial(_flat_at, shape=full, n_lead=n_lead, flat=flat)
        inv = torch.reciprocal(total)
        r = theta * inv  # θ / (θ + mu + eps)
        g_nz, inv_nz = at(grad), at(inv)  # (*lead, nnz)
        grad_mu = torch.mul(r if w is None else w * r, grad).neg_()  # x = 0 entries
        if grad_mu.shape != full:
            grad_mu = grad_mu.expand(full).contiguous()
        tv = _pick(theta, idx)
        grad_mu.view(*full[:n_lead], -1).index_copy_(
            -1, flat, g_nz * (xv / (at(mu) + EPS) - (tv + xv) * inv_nz))
        grad_mu = grad_mu.sum_to_size(mu.shape)
        grad_theta = grad_zi = None
        if ctx.needs_input_grad[2]:
            d_lnb0 = ((torch.log(theta + EPS) + theta / (theta + EPS)) - lt).sub_(r)
            if w is not None:
                d_lnb0 = _mul_(d_lnb0, w)
            dense = _mul_(d_lnb0, grad).sum_to_size(theta.shape)
            digamma_diff = torch.digamma(xv + tv) - _pick(torch.digamma(theta), idx)
            extra = g_nz * (digamma_diff - xv * inv_nz)
            extra = extra.reshape(-1, extra.shape[-1]).sum(0)  # over sample dimensions
            grad_theta = dense + _sum_into(theta.shape, idx, extra)
        if zi_logits is not None and ctx.needs_input_grad[3]:
            grad_zi = _mul_(torch.sigmoid(-zi_logits) - w, grad).sum_to_size(zi_logits.shape)
        return None, grad_mu, grad_theta, grad_zi, None


def _dense_backward(ctx, grad):
    """Gradients for mu, θ and z of the dense forward: the same formulas, every entry."""
    x, mu, theta, zi_logits, total, lt, w = ctx.saved_tensors
    inv = torch.reciprocal(total)
    w_theta = theta if w is None else w * theta
    grad_mu = (grad * (x / (mu + EPS) - (w_theta + x) * inv)).sum_to_size(mu.shape)
    grad_theta = grad_zi = None
    if ctx.needs_input_grad[2]:
        d_lnb0 = torch.log(theta + EPS) + theta / (theta + EPS) - lt - theta * inv
        if w is not None:
            d_lnb0 = d_lnb0 * w
        d_theta = d_lnb0 + torch.digamma(x + theta) - torch.digamma(theta) - x * inv
        grad_theta = (grad * d_theta).sum_to_size(theta.shape)
    if zi_logits is not None and ctx.needs_input_grad[3]:
        grad_zi = (grad * (torch.sigmoid(-zi_logits) - w)).sum_to_size(zi_logits.shape)
    return grad_mu, grad_theta, grad_zi
