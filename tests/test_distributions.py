"""Count likelihoods against scipy.stats, at their limits, on samples and under autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit

from omicvae_sc.module._distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    make_count_distribution,
)

# broadcast grid: x (201, 1, 1), mu (1, 11, 1), theta (1, 1, 9)
X_GRID = np.arange(201.0)[:, None, None]
MU_GRID = np.logspace(-2, 3, 11)[None, :, None]
THETA_GRID = np.logspace(-2, 2, 9)[None, None, :]


def _t(a: np.ndarray | float) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def _scipy_nb_logpmf(x, mu, theta):
    return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


def _scipy_zinb_logpmf(x, mu, theta, zi_logits):
    pi = expit(zi_logits)
    return np.log(pi * (x == 0) + (1 - pi) * stats.nbinom.pmf(x, n=theta, p=theta / (theta + mu)))


def _sample_moments(dist, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draws = dist.sample((n,))  # (n, *batch_shape)
    return draws.mean(0), draws.var(0)


def test_nb_log_prob_matches_scipy():
    got = NegativeBinomial(_t(MU_GRID), _t(THETA_GRID)).log_prob(_t(X_GRID))
    expected = _scipy_nb_logpmf(X_GRID, MU_GRID, THETA_GRID)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_poisson_log_prob_matches_scipy():
    rate = MU_GRID[..., 0]  # (1, 11)
    got = Poisson(_t(rate)).log_prob(_t(X_GRID[..., 0]))
    np.testing.assert_allclose(got.numpy(), stats.poisson.logpmf(X_GRID[..., 0], rate), rtol=1e-6)


@pytest.mark.parametrize("zi_logits", [-3.0, 0.0, 2.5])
def test_zinb_log_prob_matches_scipy_mixture(zi_logits):
    mu, theta = MU_GRID[:, ::2], THETA_GRID[..., ::2]  # keep every pmf term above underflow
    zinb = ZeroInflatedNegativeBinomial(_t(mu), _t(theta), _t(zi_logits))
    got = zinb.log_prob(_t(X_GRID[:60]))
    expected = _scipy_zinb_logpmf(X_GRID[:60], mu, theta, zi_logits)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_zinb_without_inflation_equals_nb():
    mu, theta, x = _t(MU_GRID), _t(THETA_GRID), _t(X_GRID)
    zinb_log_p = ZeroInflatedNegativeBinomial(mu, theta, _t(-30.0)).log_prob(x)
    nb_log_p = NegativeBinomial(mu, theta).log_prob(x)  # (201, 11, 9)
    # at x = 0 the ZINB adds pi = e^-30, negligible only where the NB's own zero mass dwarfs it
    keep = torch.ones_like(nb_log_p, dtype=torch.bool)
    keep[0] = nb_log_p[0] > -16.0
    assert keep[0].sum() > 50
    torch.testing.assert_close(zinb_log_p[keep], nb_log_p[keep], rtol=1e-6, atol=1e-10)


def test_zinb_with_full_inflation_puts_all_mass_at_zero():
    zinb = ZeroInflatedNegativeBinomial(_t(MU_GRID), _t(THETA_GRID), _t(30.0))
    log_p = zinb.log_prob(_t(X_GRID))  # (201, 11, 9)
    torch.testing.assert_close(log_p[0], torch.zeros_like(log_p[0]), rtol=0, atol=1e-12)
    assert (log_p[1:] < -29.0).all()


@pytest.mark.parametrize(("mu", "theta"), [(0.1, 0.5), (10.0, 1.0), (100.0, 10.0), (5.0, 50.0)])
def test_nb_and_zinb_pmf_sum_to_one(mu, theta):
    x = _t(np.arange(5000.0))
    for dist in (
        NegativeBinomial(_t(mu), _t(theta)),
        ZeroInflatedNegativeBinomial(_t(mu), _t(theta), _t(0.7)),
    ):
        total = dist.log_prob(x).exp().sum()
        # the 1e-8 kept inside the logs biases the mass by ~1e-8, far below this tolerance
        torch.testing.assert_close(total, _t(1.0), rtol=0, atol=1e-6)


def test_zinb_mean_and_variance_match_exact_moments():
    mu, theta, zi_logits = _t([0.5, 5.0, 50.0]), _t([0.5, 2.0, 10.0]), _t([-1.0, 0.0, 1.5])
    zinb = ZeroInflatedNegativeBinomial(mu[:, None], theta[:, None], zi_logits[:, None])
    x = _t(np.arange(20000.0))
    pmf = zinb.log_prob(x).exp()  # (3, 20000)
    mean = (pmf * x).sum(-1)
    torch.testing.assert_close(mean, zinb.mean[:, 0], rtol=1e-6, atol=0)
    variance = (pmf * (x - mean[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(variance, zinb.variance[:, 0], rtol=1e-6, atol=0)


# 200k draws: relative standard errors (from the exact pmf) are at most 0.55% for the sample
# mean and 1.0% for the sample variance, so 3% and 5% are at least five standard errors.
SAMPLED = [
    NegativeBinomial(_t([0.5, 5.0, 50.0]), _t([0.5, 2.0, 10.0])),
    ZeroInflatedNegativeBinomial(_t([0.5, 5.0, 50.0]), _t([0.5, 2.0, 10.0]), _t([-1.0, 0.0, 1.5])),
    Poisson(_t([0.5, 5.0, 50.0])),
]


@pytest.mark.parametrize("dist", SAMPLED, ids=lambda d: type(d).__name__)
def test_sample_moments_match_mean_and_variance(dist):
    mean, var = _sample_moments(dist, n=200_000)
    torch.testing.assert_close(mean, dist.mean, rtol=0.03, atol=0)
    torch.testing.assert_close(var, dist.variance, rtol=0.05, atol=0)


@pytest.mark.parametrize("dist", SAMPLED, ids=lambda d: type(d).__name__)
def test_samples_are_counts_with_extended_shape(dist):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = dist.sample((4, 2))
    assert draws.shape == (4, 2, 3)
    assert (draws >= 0).all()
    assert (draws == draws.round()).all()


@pytest.mark.parametrize(("mu", "theta"), [(0.01, 0.5), (0.3, 2.0), (1.0, 1.0), (2.0, 0.3),
                                           (50.0, 3.0), (500.0, 200.0)])
def test_nb_draws_follow_the_nb_pmf(mu, theta):
    """The CPU sampler (a Poisson-stopped sum of log-series variates) against scipy's pmf: the
    frequency of each count 0 to 5 and of the count at the mean, within 5 standard errors of
    400k draws, for mu far below, near and far above θ."""
    nb = NegativeBinomial(_t([mu]), _t([theta]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = nb.sample((400_000,))[:, 0].numpy()
    for k in [0, 1, 2, 3, 4, 5, int(mu)]:
        expected = stats.nbinom.pmf(k, theta, theta / (theta + mu))
        se = np.sqrt(expected * (1 - expected) / len(draws))
        assert abs((draws == k).mean() - expected) <= 5 * se + 1e-6, (k, expected)


def test_nb_sample_with_tiny_theta_stays_finite():
    nb = NegativeBinomial(_t([1e4]), _t([1e-3]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        draws = nb.sample((10_000,))
    assert torch.isfinite(draws).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_gradients_are_finite_at_extremes(dtype):
    # x (5, 1, 1, 1) with zeros and large counts; mu (4, 1, 1); theta (3, 1); zi_logits (2,)
    x = torch.tensor([0.0, 1.0, 7.0, 1e3, 1e5], dtype=dtype).reshape(5, 1, 1, 1)
    mu = torch.tensor([1e-8, 1e-3, 10.0, 1e6], dtype=dtype).reshape(4, 1, 1).requires_grad_()
    theta = torch.tensor([1e-4, 1.0, 1e4], dtype=dtype).reshape(3, 1).requires_grad_()
    zi_logits = torch.tensor([-20.0, 20.0], dtype=dtype).requires_grad_()
    cases = [
        (NegativeBinomial(mu, theta), [mu, theta]),
        (ZeroInflatedNegativeBinomial(mu, theta, zi_logits), [mu, theta, zi_logits]),
        (Poisson(mu), [mu]),
    ]
    for dist, params in cases:
        name = type(dist).__name__
        log_p = dist.log_prob(x)
        assert torch.isfinite(log_p).all(), name
        grads = torch.autograd.grad(log_p.sum(), params)
        assert all(torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize(
    ("likelihood", "expected"),
    [("nb", NegativeBinomial), ("zinb", ZeroInflatedNegativeBinomial), ("poisson", Poisson)],
)
def test_factory_builds_named_distribution(likelihood, expected):
    mu, theta, zi_logits = torch.ones(2, 3), torch.ones(3), torch.zeros(2, 3)
    dist = make_count_distribution(likelihood, mu, theta=theta, zi_logits=zi_logits)
    assert type(dist) is expected
    assert dist.batch_shape == (2, 3)


def test_factory_rejects_unknown_likelihood():
    with pytest.raises(ValueError, match=r"likelihood='gaussian'.*'nb', 'zinb', 'poisson'"):
        make_count_distribution("gaussian", torch.ones(3))


def test_factory_rejects_missing_zero_inflation_logits():
    with pytest.raises(ValueError, match="needs zi_logits"):
        make_count_distribution("zinb", torch.ones(3), theta=torch.ones(3))


def test_validate_args_rejects_non_counts():
    nb = NegativeBinomial(torch.ones(3), torch.ones(3), validate_args=True)
    with pytest.raises(ValueError, match="support"):
        nb.log_prob(torch.tensor([0.0, 1.5, 2.0]))
