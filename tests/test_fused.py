"""The per-cell count likelihood (the fused NB / ZINB sweep and Poisson) against the per-entry
formulas and scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

from omicvae_sc.module import VAE
from omicvae_sc.module import _fused_nb as _fused
from omicvae_sc.module._distributions import make_count_distribution
from omicvae_sc.module._fused_nb import DIRECT_MIN_ZI, _digamma
from omicvae_sc.module._likelihood import count_log_likelihood


def _inputs(n_cells=29, n_genes=41, theta_rows=1, zinb=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n_cells, n_genes, generator=g, dtype=torch.float64) * 3)
    x = x * (torch.rand(n_cells, n_genes, generator=g) < 0.4)  # mostly zeros, as in scRNA-seq
    x[0] = 0.0  # a cell with no counts at all
    logits = torch.randn(n_cells, n_genes, generator=g, dtype=torch.float64).requires_grad_()
    library = x.sum(-1, keepdim=True) + 1.0
    theta = (torch.rand(theta_rows, n_genes, generator=g, dtype=torch.float64) * 5 + 0.05)
    zi = torch.randn(n_cells, n_genes, generator=g, dtype=torch.float64) if zinb else None
    return x, logits, library, theta.requires_grad_(), zi if zi is None else zi.requires_grad_()


def _reference(x, logits, library, theta, zi):
    """The distribution path: softmax, mean, ``log_prob``, sum over genes."""
    likelihood = "nb" if zi is None else "zinb"
    mu = torch.softmax(logits, -1) * library
    return make_count_distribution(likelihood, mu, theta, zi).log_prob(x).sum(-1)


@pytest.mark.parametrize("zinb", [False, True])
@pytest.mark.parametrize("theta_rows", [1, 29])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("tile_rows", [4, 10**9])
@pytest.mark.parametrize("zero_path", ["direct", "logs"])
def test_values_and_gradients_match_the_distributions(zinb, theta_rows, sparse, tile_rows,
                                                      zero_path, monkeypatch):
    if zero_path == "logs":  # the softplus path (accelerators, very negative logits)
        if not zinb:
            pytest.skip("NB has no zero-inflation mixture")
        monkeypatch.setattr(_fused, "DIRECT_MIN_ZI", math.inf)
    x, logits, library, theta, zi = _inputs(theta_rows=theta_rows, zinb=zinb)
    upstream = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    params = [logits, theta] + ([zi] if zinb else [])
    got = count_log_likelihood(x, logits, library, theta, zi, sparse=sparse,
                               tile_rows=tile_rows)
    expected = _reference(x, logits, library, theta, zi)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, params, upstream),
                    torch.autograd.grad(expected, params, upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("zinb", [False, True])
@pytest.mark.parametrize("theta_rows", [1, 3 * 29])
@pytest.mark.parametrize("sparse", [True, False])
def test_repeats_score_blocks_of_rows_against_x_as_the_repeated_x(zinb, theta_rows, sparse):
    """K importance samples of each cell, block after block, against one x: the values and
    gradients of scoring against K stacked copies of x."""
    x, _, _, _, _ = _inputs(zinb=zinb)
    _, logits, library, theta, zi = _inputs(n_cells=3 * 29, theta_rows=theta_rows, zinb=zinb,
                                            seed=1)
    params = [logits, theta] + ([zi] if zinb else [])
    got = count_log_likelihood(x, logits, library, theta, zi, sparse=sparse,
                               tile_rows=5, repeats=3)
    expected = count_log_likelihood(x.repeat(3, 1), logits, library, theta, zi, sparse=sparse,
                                    tile_rows=5)
    torch.testing.assert_close(got, _reference(x.repeat(3, 1), logits, library, theta, zi),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), params),
                    torch.autograd.grad(expected.sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zinb", [False, True])
def test_gradcheck(zinb):
    x, logits, library, theta, zi = _inputs(n_cells=7, n_genes=9, zinb=zinb)
    inputs = (logits, theta) + ((zi,) if zinb else ())

    def f(logits, theta, zi=None):
        return count_log_likelihood(x, logits, library, theta, zi, tile_rows=1)

    assert torch.autograd.gradcheck(f, inputs, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile_rows", [None, 1])
def test_zinb_zeros_stay_finite_where_both_probabilities_underflow(dtype, tile_rows):
    """A zero count whose NB(0) and π are both far below float32's range (a strongly expressed
    gene, a very negative zero-inflation logit): the sweep's direct probabilities would give
    log(0); its chunk takes the log path instead, and matches the float64 distributions (with
    one row per chunk, the other chunks stay direct)."""
    x, logits, library, theta, zi = _inputs()
    x[1, 0] = 0.0
    library = library.clone()
    library[1] = 1000.0
    with torch.no_grad():
        theta[0, 0] = 50.0  # log NB(0) = 50 log(50 / 1050) = -152
        logits[1, 0] = 10.0  # nearly all of the cell's expression
        zi[1, 0] = 1.5 * DIRECT_MIN_ZI  # π = sigmoid(-120) < 1e-52
    inputs = [t.detach().to(dtype).requires_grad_() for t in (logits, theta, zi)]
    got = count_log_likelihood(x.to(dtype), inputs[0], library.to(dtype), inputs[1], inputs[2],
                               tile_rows=tile_rows)
    expected = _reference(x, logits, library, theta, zi)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)
    for g in torch.autograd.grad(got.sum(), inputs):
        assert torch.isfinite(g).all()


def test_fast_digamma_matches_torch():
    y = torch.cat([torch.linspace(1.0, 12.0, 5000), torch.logspace(1, 6, 500)]).double()
    torch.testing.assert_close(_digamma(y), torch.digamma(y), rtol=0, atol=1e-8)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_vae_log_px_z_equals_the_generative_distribution(likelihood, dispersion):
    torch.manual_seed(0)
    vae = VAE(30, likelihood=likelihood, dispersion=dispersion, n_categories=(3,),
              has_batch=True).eval()
    x = torch.poisson(torch.rand(16, 30) * 4)
    codes = torch.randint(0, 3, (16, 1))
    z, library = torch.randn(16, 10), x.sum(-1, keepdim=True)
    expected = vae.generative(z, library, codes).distribution().log_prob(x).sum(-1)
    torch.testing.assert_close(vae.log_px_z(x, z[None], codes)[0], expected,
                               rtol=1e-5, atol=1e-3)
    # K draws side by side equal each draw alone
    zs = torch.randn(3, 16, 10)
    alone = torch.stack([vae.log_px_z(x, zk[None], codes)[0] for zk in zs])
    torch.testing.assert_close(vae.log_px_z(x, zs, codes), alone, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("zinb", [False, True])
def test_positions_given_by_the_caller_give_the_same_values_and_gradients(zinb):
    """The loader's positions of the non-zero counts (in any order) replace the search."""
    x, logits, library, theta, zi = _inputs(zinb=zinb)
    params = [logits, theta] + ([zi] if zinb else [])
    rows, genes = torch.nonzero(x).unbind(1)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    shuffled = rows[order], genes[order]
    searched = count_log_likelihood(x, logits, library, theta, zi, tile_rows=4)
    given = count_log_likelihood(x, logits, library, theta, zi, tile_rows=4,
                                 nonzero=shuffled)
    torch.testing.assert_close(given, searched, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(given.sum(), params),
                    torch.autograd.grad(searched.sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    missing = count_log_likelihood(x, logits, library, theta, zi, nonzero=(rows[1:], genes[1:]))
    assert not torch.allclose(missing, searched)  # the positions are really used


@pytest.mark.parametrize("zinb", [False, True])
def test_bfloat16_logits_are_read_in_the_precision_of_theta(zinb):
    """The bfloat16 heads' outputs go in as they are: the result is the float32 result for the
    same (rounded) values, and the gradients come back in bfloat16."""
    x, logits, library, theta, zi = _inputs(zinb=zinb)
    x, library = x.float(), library.float()
    theta = theta.detach().float().requires_grad_()
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (logits, zi) if t is not None]
    high = [t.detach().float().requires_grad_() for t in low]
    got = count_log_likelihood(x, low[0], library, theta, low[1] if zinb else None)
    assert got.dtype == torch.float32
    expected = count_log_likelihood(x, high[0], library, theta, high[1] if zinb else None)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)
    grads_low = torch.autograd.grad(got.sum(), low)
    grads_high = torch.autograd.grad(expected.sum(), high)
    for a, b in zip(grads_low, grads_high, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.to(torch.bfloat16).float())


def test_log_factorial_reads_integer_counts_from_its_table_and_computes_the_rest(monkeypatch):
    counts = torch.tensor([0.0, 1.0, 2.0, 7.0, 170.0, 16383.0])
    expected = torch.lgamma(counts.double() + 1)
    torch.testing.assert_close(_fused.log_factorial(counts).double(), expected, rtol=1e-7,
                               atol=0)
    dense = torch.tensor([[0.0, 3.0], [5.0, 0.0]])  # the dense path passes 2-D counts
    torch.testing.assert_close(_fused.log_factorial(dense), torch.lgamma(dense + 1))
    # the table is what answers: a poisoned table changes the result
    table = torch.lgamma(torch.arange(_fused.FACTORIAL_TABLE_SIZE, dtype=torch.float64) + 1)
    monkeypatch.setitem(_fused._factorial_tables, (counts.device, counts.dtype),
                        (table + 1.0).float())
    torch.testing.assert_close(_fused.log_factorial(counts).double(), expected + 1.0,
                               rtol=1e-7, atol=0)
    # non-integer values (allow_non_integer=True) and counts past the table: computed
    for other in (torch.tensor([0.5, 2.25, 3.0]), torch.tensor([3.0, 16384.0, 1e5])):
        torch.testing.assert_close(_fused.log_factorial(other), torch.lgamma(other + 1))
    assert _fused.log_factorial(torch.tensor([])).numel() == 0
    # off the CPU nothing is read back from the device (a meta tensor has no values to read)
    assert _fused.log_factorial(torch.empty(5, device="meta")).device.type == "meta"


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
@pytest.mark.parametrize("sparse", [True, False])
def test_per_cell_sums_match_scipy_at_the_limits(likelihood, sparse):
    """Zero counts, tiny means, huge θ and π near 0 and 1, summed over genes per cell, against
    scipy.stats' own pmf (not our per-entry formula)."""
    g = torch.Generator().manual_seed(3)
    genes = 12
    x = torch.poisson(torch.rand(6, genes, generator=g, dtype=torch.float64) * 4)
    x[0] = 0.0  # a cell with no counts
    x[1, :6] = 0.0
    logits = torch.randn(6, genes, generator=g, dtype=torch.float64) * 3
    logits[2, :4] = -30.0  # fractions ~1e-13: tiny means (of zero counts; at x > 0 the eps
    x[2, :4] = 0.0  # inside log(mu + eps) would dominate a mean far below it)
    library = torch.tensor([[1.0], [5.0], [1e4], [50.0], [200.0], [3.0]], dtype=torch.float64)
    theta = torch.tensor([[1e-3, 0.05, 0.5, 1, 2, 5, 10, 100, 1e3, 1e4, 1e6, 3]],
                         dtype=torch.float64)
    zi = torch.randn(6, genes, generator=g, dtype=torch.float64)
    zi[3], zi[4] = -25.0, 25.0  # π near 0 and near 1
    mu = (torch.softmax(logits, -1) * library).numpy()
    xs, th, pi = x.numpy(), theta.numpy(), expit(zi.numpy())
    if likelihood == "poisson":
        expected = stats.poisson.logpmf(xs, mu).sum(-1)
        got = count_log_likelihood(x, logits, library)
    else:
        log_nb = stats.nbinom.logpmf(xs, th, th / (th + mu))
        if likelihood == "zinb":  # log(π [x = 0] + (1 - π) NB(x)), in logs
            log_nb = np.where(xs == 0, logsumexp([np.log(pi), np.log1p(-pi) + log_nb], axis=0),
                              np.log1p(-pi) + log_nb)
        expected = log_nb.sum(-1)
        got = count_log_likelihood(x, logits, library, theta,
                                   zi if likelihood == "zinb" else None, sparse=sparse)
    # the eps inside the logs moves a sum by ~1e-6 relative where means are small
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
