"""Anomaly and doublet scores find what they should on synthetic data with a known answer;
flags follow their documented rules; bad arguments raise before anything is written."""

from __future__ import annotations

import functools
import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

import omicvae_sc as ov
from omicvae_sc import OmicVAE
from omicvae_sc.model._scores import default_doublet_rates

EPOCHS = 80


@functools.cache
def _ood():
    """Train on groups 0-2 of a 4-group simulation; score held-out cells of all four groups."""
    data = ov.datasets.synthetic_counts(n_cells=800, n_genes=100, n_groups=4, n_batches=1,
                                        group_effect=3.0, seed=1)
    scored = np.random.default_rng(0).random(data.n_obs) < 0.25
    novel = (data.obs["group"] == "group3").to_numpy()
    train = data[~scored & ~novel].copy()
    OmicVAE.setup_anndata(train)
    model = OmicVAE(train, n_latent=5, seed=0, device="cpu")
    model.train(EPOCHS, progress_bar=False)
    return model, data[scored].copy(), novel[scored]


@functools.cache
def _with_doublets():
    """600 cells of 3 groups plus 30 doublets (summed counts of two cells of different groups)."""
    data = ov.datasets.synthetic_counts(n_cells=600, n_genes=100, n_groups=3, n_batches=1,
                                        seed=2)
    rng = np.random.default_rng(0)
    group = data.obs["group"].to_numpy()
    first = rng.choice(data.n_obs, 60)
    second = np.array([rng.choice(np.flatnonzero(group != group[i])) for i in first])[:30]
    first = first[:30]
    x = sp.csr_matrix(data.X)
    counts = sp.vstack([x, x[first] + x[second]]).tocsr()
    adata = ad.AnnData(counts)
    adata.obs_names = [*data.obs_names, *(f"dbl{i}" for i in range(30))]
    adata.var_names = data.var_names
    OmicVAE.setup_anndata(adata)
    model = OmicVAE(adata, n_latent=5, seed=0, device="cpu")
    model.train(EPOCHS, progress_bar=False)
    return model, adata, np.r_[np.zeros(data.n_obs, bool), np.ones(30, bool)]


# ---------------------------------------------------------------------------- the model works
def test_cells_of_a_type_absent_in_training_score_as_anomalies():
    model, scored, novel = _ood()
    score = model.get_anomaly_score(scored)
    assert roc_auc_score(novel, score) > 0.9


def test_anomaly_score_does_not_follow_library_size():
    model, scored, novel = _ood()
    score = model.get_anomaly_score(scored)
    library = np.asarray(scored.X.sum(1)).ravel()
    rho_raw = spearmanr(-model.get_marginal_ll(scored)[~novel], library[~novel]).statistic
    rho = spearmanr(score[~novel], library[~novel]).statistic
    assert abs(rho_raw) > 0.5  # what the calibration removes
    assert abs(rho) < abs(rho_raw) - 0.15


def test_novel_cells_score_a_standard_deviation_above_ordinary_ones():
    model, scored, novel = _ood()
    score = model.get_anomaly_score(scored)
    assert abs(np.median(score[~novel])) < 1.5  # in units of the generated cells' spread
    assert np.median(score[novel]) > np.median(score[~novel]) + 1.0


def test_simulated_doublets_score_as_doublets():
    model, adata, truth = _with_doublets()
    score = model.get_doublet_score(seed=0)
    assert score.shape == (adata.n_obs,)
    assert np.all((score >= 0) & (score <= 1))
    assert roc_auc_score(truth, score) > 0.9
    # precision among the 30 highest scores: far above the 5% base rate
    assert truth[np.argsort(score)[-30:]].mean() > 0.5


def test_a_batch_larger_than_a_unit_is_scored_in_parts(monkeypatch):
    """An atlas's batch is scored in parts (the neighbour search is quadratic in the cells
    scored together) and its clusters profiled on a sample of their cells: with units of at
    most 200 cells of 16-row blocks and 50 cells a cluster, the 630 cells are scored in four
    parts, and the doublets still rank far above the singlets."""
    from omicvae_sc.model import _doublets

    model, adata, truth = _with_doublets()
    monkeypatch.setattr(_doublets, "MAX_UNIT_CELLS", 200)
    monkeypatch.setattr(_doublets, "UNIT_BLOCK_ROWS", 16)
    monkeypatch.setattr(_doublets, "PROFILE_CELLS", 50)  # clusters profiled on 50 cells each
    import torch

    units = _doublets.scoring_units(torch.zeros(adata.n_obs, dtype=torch.long), False)
    assert len(units) == 4
    score = model.get_doublet_score(seed=0)
    assert roc_auc_score(truth, score) > 0.85
    assert truth[np.argsort(score)[-30:]].mean() > 0.4


def test_scoring_units_split_batches_into_blocks_and_pack_small_ones():
    import torch

    from omicvae_sc.model._doublets import scoring_units

    torch.manual_seed(0)
    sizes = [50_000, 6_000, 4_000, 30_000]  # the fourth batch interleaved with the first
    codes = np.repeat([0, 1, 2, 3], sizes)
    codes[:60_000:2][:15_000], codes[60_000:][:15_000] = 3, 0
    units = scoring_units(torch.as_tensor(codes), True, max_cells=25_000)
    cells = torch.cat([u.cells for u in units]).sort().values
    assert torch.equal(cells, torch.arange(len(codes)))  # every cell exactly once
    for unit in units:
        assert len(unit.cells) <= 25_000 + 1024  # a part is whole blocks
        assert torch.equal(unit.cells, unit.cells.sort().values)
        for part, batch in enumerate(unit.batches):
            members = unit.cells[unit.groups == part].numpy()
            assert (codes[members] == batch).all()  # a part holds one batch
            blocks = np.unique(members // 1024)
            # a split batch's part is made of its whole blocks
            for b in blocks[:5]:
                in_block = np.arange(b * 1024, min((b + 1) * 1024, len(codes)))
                assert np.isin(in_block[codes[in_block] == batch], members).all()
    # batch 1 and 2 (6,000 and 4,000 cells) share a unit; the 50k and 30k batches are split
    n_parts = {b: sum(bs == b for u in units for bs in u.batches) for b in range(4)}
    assert n_parts == {0: 2, 1: 1, 2: 1, 3: 2}
    assert any(set(u.batches) >= {1, 2} for u in units)


def _homotypic(thin: bool) -> tuple[ad.AnnData, np.ndarray]:
    """The 600 singlets of ``_with_doublets`` plus 30 doublets of two cells of the same group;
    with ``thin``, each doublet's counts are binomially halved back to one cell's depth."""
    data = ov.datasets.synthetic_counts(n_cells=600, n_genes=100, n_groups=3, n_batches=1,
                                        seed=2)
    group = data.obs["group"].to_numpy()
    rng = np.random.default_rng(1)
    first = rng.choice(data.n_obs, 30, replace=False)
    second = np.array([rng.choice(np.flatnonzero(group == group[i])) for i in first])
    x = sp.csr_matrix(data.X)
    doublets = (x[first] + x[second]).toarray()
    if thin:
        doublets = rng.binomial(doublets.astype(np.int64), 0.5).astype(np.float32)
    adata = ad.AnnData(sp.vstack([x, sp.csr_matrix(doublets)]).tocsr())
    adata.var_names = data.var_names
    return adata, np.r_[np.zeros(data.n_obs, bool), np.ones(30, bool)]


def test_depth_finds_doublets_of_one_type():
    """Doublets of two cells of the same group differ from singlets mostly in depth (and a
    little in complexity: two cells' dropouts average out): they rank high, and lower once
    thinned back to one cell's depth."""
    model, _, _ = _with_doublets()
    deep, truth = _homotypic(thin=False)
    thinned, _ = _homotypic(thin=True)
    with_depth = roc_auc_score(truth, model.get_doublet_score(deep))
    without = roc_auc_score(truth, model.get_doublet_score(thinned))
    assert with_depth > 0.8
    assert with_depth > without + 0.05


def test_heterotypic_doublets_of_cells_the_model_never_saw_rank_above_singlets():
    """The model trains on one set of cells; the score is asked of other cells of the same
    types with heterotypic doublets among them (summed counts of two cells of different groups)."""
    model, scored, novel = _ood()
    known = scored[~novel].copy()
    group = known.obs["group"].to_numpy()
    rng = np.random.default_rng(3)
    first = rng.choice(known.n_obs, 12, replace=False)
    second = np.array([rng.choice(np.flatnonzero(group != group[i])) for i in first])
    x = sp.csr_matrix(known.X)
    held_out = ad.AnnData(sp.vstack([x, x[first] + x[second]]).tocsr())
    held_out.var_names = known.var_names
    truth = np.r_[np.zeros(known.n_obs, bool), np.ones(12, bool)]
    score = model.get_doublet_score(held_out, expected_rate=0.05)
    assert roc_auc_score(truth, score) > 0.95
    assert truth[np.argsort(score)[-12:]].mean() > 0.5  # base rate 6%


def test_no_cell_is_scored_by_a_classifier_that_saw_it():
    """On pure-noise features (150 per row, 300 rows) a classifier fitted to every row learns
    the real rows as negatives and scores most of them below zero; out of fold, it cannot, and
    about half fall on each side."""
    import torch

    from omicvae_sc.model._doublets import _fit_logistic, cross_validated_log_odds

    torch.manual_seed(0)
    features = torch.randn(300, 150)
    held_out = cross_validated_log_odds(features, 150, expected_rate=0.05, n_folds=5)
    label = torch.cat([torch.zeros(150), torch.ones(150)])
    standardized = (features - features.mean(0)) / features.std(0)
    seen = _fit_logistic(standardized, label)(standardized[:150])
    assert (seen < 0).float().mean() > 0.8
    assert 0.35 < (held_out < 0).float().mean() < 0.65


def test_classifier_stays_finite_on_features_that_separate_nothing():
    """Constant features and one class only (what two cells of one gene give): the Newton
    steps must not meet a singular Hessian, and every log odds is finite."""
    import torch

    from omicvae_sc.model._doublets import _fit_logistic, cross_validated_log_odds

    features = torch.zeros(40, 11)
    assert torch.isfinite(_fit_logistic(features, torch.ones(40))(features)).all()
    assert torch.isfinite(cross_validated_log_odds(features, 2, expected_rate=0.05,
                                                   n_folds=5)).all()


def test_artificial_doublets_pair_two_clusters_of_one_batch():
    import torch

    from omicvae_sc.model._doublets import make_pairs

    torch.manual_seed(0)
    groups = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    clusters = torch.tensor([0] * 20 + [1] * 20 + [2] * 10 + [0] * 15 + [3] * 15 + [1] * 5)
    pairs = make_pairs(groups, clusters, 850)
    assert len(pairs.first) == 850
    assert torch.equal(groups[pairs.first], groups[pairs.second])
    two = groups[pairs.first] < 2  # batches with two or more clusters
    assert (clusters[pairs.first][two] != clusters[pairs.second][two]).all()
    # pairs of clusters of batch 0 come as often as random cells of them meet: sizes 20, 20
    # and 10 give 400, 200 and 200 pairs of cells, so shares of 1/2, 1/4 and 1/4
    made = [tuple(sorted(p)) for p in torch.stack([clusters[pairs.first], clusters[pairs.second]],
                                                   1)[groups[pairs.first] == 0].tolist()]
    share = {k: made.count(k) / len(made) for k in set(made)}
    assert set(share) == {(0, 1), (0, 2), (1, 2)}
    assert abs(share[(0, 1)] - 0.5) < 0.07 and abs(share[(0, 2)] - 0.25) < 0.07
    # every ordered pair of cells of two clusters is equally likely: of batch 0's 1,600, the
    # 400 that start in cluster 2 (10 cells, each with 40 partners) make a quarter (a first
    # cell drawn uniformly would make a fifth)
    many = make_pairs(groups[:50], clusters[:50], 20_000)
    share_first = torch.bincount(clusters[many.first]).double() / 20_000
    assert torch.allclose(share_first, torch.tensor([0.375, 0.375, 0.25], dtype=torch.float64),
                          atol=0.015)
    # each batch gets doublets in proportion to its cells
    assert (groups[pairs.first] == 2).sum() == 50


def test_doublet_score_is_seeded():
    model, _, _ = _with_doublets()
    np.testing.assert_array_equal(model.get_doublet_score(seed=3),
                                  model.get_doublet_score(seed=3))
    assert not np.array_equal(model.get_doublet_score(seed=3), model.get_doublet_score(seed=4))


def test_expected_rate_is_the_prior_of_the_doublet_probability():
    """The rate is the prior (it raises every probability's odds alike) and the share of cells
    the second round drops from the singlets, which moves the ranking only a little."""
    model, _, truth = _with_doublets()
    low = model.get_doublet_score(expected_rate=0.01)
    high = model.get_doublet_score(expected_rate=0.2)
    assert np.median(high) > 10 * np.median(low)
    assert spearmanr(low, high).statistic > 0.9
    assert roc_auc_score(truth, high) > 0.9


# ---------------------------------------------------------------------------- flags
def _write(model, adata, **kwargs):
    target = adata.copy()
    model.write_results(target, n_samples=10, **kwargs)
    return target


def test_contamination_flags_that_share_of_highest_scores():
    model, scored, _ = _ood()
    out = _write(model, scored, contamination=0.1, doublets=False)
    score = out.obs["omicvae_anomaly_score"].to_numpy()
    flagged = out.obs["omicvae_is_anomaly"].to_numpy()
    assert flagged.sum() == math.ceil(0.1 * scored.n_obs)
    assert score[flagged].min() >= score[~flagged].max()
    rule = out.uns["omicvae"]["anomaly"]
    assert rule["rule"] == "expected_rate" and rule["value"] == 0.1
    assert rule["threshold"] == score[flagged].min()


def test_default_anomaly_rule_is_median_plus_three_robust_sd():
    model, scored, _ = _ood()
    out = _write(model, scored, doublets=False)
    score = out.obs["omicvae_anomaly_score"].to_numpy()
    med = np.median(score)
    cutoff = med + 3 * 1.4826 * np.median(np.abs(score - med))
    np.testing.assert_array_equal(out.obs["omicvae_is_anomaly"].to_numpy(), score > cutoff)
    assert out.uns["omicvae"]["anomaly"]["rule"] == "robust_cutoff"
    assert out.uns["omicvae"]["anomaly"]["threshold"] == pytest.approx(cutoff)


def test_default_doublet_rate_follows_cells_loaded():
    assert default_doublet_rates(np.zeros(1000)) == pytest.approx(np.full(1000, 0.008))
    np.testing.assert_allclose(default_doublet_rates(np.repeat([3, 1], [10_000, 2_000])),
                               np.repeat([0.08, 0.016], [10_000, 2_000]))
    with pytest.warns(UserWarning, match=r"The default doublet rate, 0\.8% per 1,000 cells "
                                         r"loaded together, is capped at 25% for 1 loading of "
                                         r"more than 31,250 cells \(the largest: 1,000,000"):
        assert (default_doublet_rates(np.zeros(10**6)) == 0.25).all()
    model, adata, _ = _with_doublets()
    out = _write(model, adata, anomaly=False)
    rule = out.uns["omicvae"]["doublet"]
    assert rule["value"] == pytest.approx(0.008 * adata.n_obs / 1000)
    assert out.obs["omicvae_is_doublet"].sum() == math.ceil(rule["value"] * adata.n_obs)
    out = _write(model, adata, anomaly=False, doublet_rate=0.05)
    assert out.obs["omicvae_is_doublet"].sum() == math.ceil(0.05 * adata.n_obs)


def test_each_batch_is_a_loading_with_its_own_doublet_rate():
    """With a batch key, a batch of 600 cells and one of 200 get the priors 0.48% and 0.16%
    (0.8% per 1,000 cells loaded together, not 0.64% for all 800), and each flags its own
    share: the probabilities differ from those at one shared rate by exactly the priors' log
    odds; a rate given is each batch's share."""
    data = ov.datasets.synthetic_counts(n_cells=1200, n_genes=60, n_groups=3, n_batches=2,
                                        seed=5)
    batch = data.obs["batch"].astype(str).to_numpy()
    first = batch == batch[0]
    adata = data[first | (np.cumsum(~first) <= 200)].copy()
    batch = adata.obs["batch"].astype(str).to_numpy()
    sizes = {b: int((batch == b).sum()) for b in np.unique(batch)}
    assert sorted(sizes.values()) == [200, 600]
    OmicVAE.setup_anndata(adata, batch_key="batch")
    model = OmicVAE(adata, n_latent=3, n_hidden=16, seed=0, device="cpu")
    model.train(5, progress_bar=False)
    rate = np.array([0.008 * sizes[b] / 1000 for b in batch])
    out = _write(model, adata, anomaly=False)
    flagged = out.obs["omicvae_is_doublet"].to_numpy()
    for b, n in sizes.items():
        assert flagged[batch == b].sum() == math.ceil(0.008 * n / 1000 * n)
    assert out.uns["omicvae"]["doublet"]["value"] == pytest.approx(rate.mean())

    def logit(p):
        return np.log(p / (1 - p))

    shared = model.get_doublet_score(expected_rate=float(rate.mean()))
    np.testing.assert_allclose(logit(out.obs["omicvae_doublet_score"].to_numpy()) - logit(shared),
                               logit(rate) - logit(rate.mean()), atol=1e-6)
    given = _write(model, adata, anomaly=False, doublet_rate=0.05)
    for b, n in sizes.items():
        assert given.obs["omicvae_is_doublet"].to_numpy()[batch == b].sum() == \
            math.ceil(0.05 * n)


def test_flags_survive_h5ad(tmp_path):
    model, adata, _ = _with_doublets()
    out = _write(model, adata)
    out.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for key in ("omicvae_is_anomaly", "omicvae_is_doublet"):
        np.testing.assert_array_equal(back.obs[key].to_numpy(), out.obs[key].to_numpy())
    assert back.uns["omicvae"]["doublet"]["n_flagged"] == out.obs["omicvae_is_doublet"].sum()


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"contamination": 0.0}, r"contamination must be a fraction of cells in \(0, 0.5\), got 0.0"),
    ({"contamination": 0.7}, r"contamination must be a fraction .* got 0.7"),
    ({"doublet_rate": -0.1}, r"doublet_rate must be a fraction .* got -0.1"),
    ({"n_mads": 0}, r"n_mads must be positive, got 0"),
    ({"n_samples": 0}, r"n_samples must be an integer >= 1, got 0"),
])
def test_bad_flag_arguments_raise_and_write_nothing(kwargs, match, adata_fingerprint):
    model, scored, _ = _ood()
    before = adata_fingerprint(scored)
    with pytest.raises(ValueError, match=match):
        model.write_results(scored, **kwargs)
    assert adata_fingerprint(scored) == before


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"expected_rate": 0.5}, r"expected_rate must be a fraction .* got 0.5"),
    ({"sim_ratio": 0}, r"sim_ratio must be positive \(artificial doublets per cell\), got "
                       r"sim_ratio=0"),
    ({"n_repeats": 0}, r"n_repeats must be an integer >= 1, got 0"),
    ({"n_repeats": 1.5}, r"n_repeats must be an integer >= 1, got 1.5"),
])
def test_bad_doublet_arguments_raise(kwargs, match, adata_fingerprint):
    model, adata, _ = _with_doublets()
    before = adata_fingerprint(adata)
    with pytest.raises(ValueError, match=match):
        model.get_doublet_score(adata, **kwargs)
    assert adata_fingerprint(adata) == before


def test_bad_anomaly_draws_raise():
    model, scored, _ = _ood()
    with pytest.raises(ValueError, match=r"n_draws must be an integer >= 2, got 1"):
        model.get_anomaly_score(scored, n_draws=1)


def test_tl_rejects_bad_rates_before_fitting(synthetic, adata_fingerprint):
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=r"doublet_rate must be a fraction .* got 2"):
        ov.tl.omicvae(synthetic, doublet_rate=2, max_epochs=1, progress_bar=False)
    assert adata_fingerprint(synthetic) == before


# ---------------------------------------------------------------------------- plot
def test_plot_rings_the_flagged_cells(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model, scored, _ = _ood()
    out = _write(model, scored, contamination=0.1, doublets=False)
    fig = ov.pl.anomaly(out, kind="anomaly", save=str(tmp_path / "a.png"), show=False)
    ring = fig.axes[0].collections[1]  # the red circles drawn over the score map
    assert len(ring.get_offsets()) == out.obs["omicvae_is_anomaly"].sum()
    assert (tmp_path / "a.png").stat().st_size > 0


def test_plot_errors_name_what_is_missing(synthetic):
    with pytest.raises(ValueError, match=r"kind='cells' is not one of \['anomaly', 'doublet'\]"):
        ov.pl.anomaly(synthetic, kind="cells")
    with pytest.raises(KeyError, match=r"adata holds no doublet results under key 'omicvae'"):
        ov.pl.anomaly(synthetic, kind="doublet")
