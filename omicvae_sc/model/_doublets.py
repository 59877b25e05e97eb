"""Doublet probability per cell: artificial doublets, features of every cell, and a classifier
trained with cross-validation, in the manner of scDblFinder (Germain et al. 2022), with the
fitted model's own contribution, a mixture likelihood test.

1. **Clusters.** k-means on the posterior means of the latent (the model's batch-corrected space),
   ``clamp(round(sqrt(n / 40)), 2, 20)`` clusters.
2. **Artificial doublets.** ``max(1500, sim_ratio * n)`` pairs of cells of one loading group
   (the batch), the two cells from two different clusters, every such pair of cells equally
   likely, so that pairs of clusters are made as often as random cells of them would meet in
   a droplet (drawing pairs of clusters uniformly, as before, scored lower on every truth
   set); raw counts summed, so the library is the sum of the two libraries. A group with a
   single cluster pairs cells at random.
3. **Features**, computed the same way for real cells and artificial doublets, within each
   group:

   - neighbourhood: the share of artificial doublets among the 3, 10, 20 and 50 nearest
     neighbours, a distance-weighted share, and the distances to the nearest artificial and
     nearest real cell, in a PCA (20 components) of the group's log-normalized counts;
   - mixture test: how much better the cell's counts are explained by an equal or 1:3 mixture
     of two clusters' decoded expression than by the best single cluster (multinomial
     log-likelihood ratio per count and in total). The model decodes each cluster in the
     group's batch, so the profiles are denoised and batch-specific;
   - complexity: log detected genes minus what a quadratic in the log library predicts for
     the group's real cells (a mixture of two cells detects more genes at a given depth);
   - depth: the log library above the group's median, zero below it (deeper than usual is
     evidence of a doublet; shallow is not evidence against one).

   The model's per-cell likelihood terms and its predictive z-score are left out on purpose:
   real cells were fitted by the model and artificial doublets were not, so those terms
   separate the two for the wrong reason (measured in issue 26: AUPRC fell on every set).
4. **Classifier.** A logistic regression on the standardized features (real cells against
   artificial doublets, classes weighted equally), trained in ``n_folds`` folds so that no
   cell is scored by a model that saw it; in a second round the real cells that the first
   round ranks in the top ``expected_rate`` are dropped from the negatives.
5. Steps 2-4 run ``n_repeats`` times with fresh artificial doublets; the out-of-fold log odds
   are averaged and turned into a posterior probability with the prior ``expected_rate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from omicvae_sc.data import CountTensors, stack_rows
from omicvae_sc.model._pca import streamed_pca
from omicvae_sc.module import VAE, Pass, chunk_rows

MIN_DOUBLETS = 1500
"""Fewest artificial doublets made, however few the cells (scDblFinder's minimum)."""

NEIGHBOURS = (3, 10, 20, 50)
N_COMPONENTS = 20
MIX_WEIGHTS = (0.25, 0.5, 0.75)
"""Shares of the first cell in the mixtures the mixture test tries."""

ROUNDS = 2
RIDGE = 1e-2
"""L2 penalty on the classifier's weights (features standardized, loss a mean over rows): it
keeps the fit finite where artificial doublets separate perfectly."""
NEWTON_STEPS = 50


@dataclass(frozen=True)
class DoubletSettings:
    """How :func:`doublet_probability` runs (see ``OmicVAE.get_doublet_score``)."""

    rates: torch.Tensor  # (n_cells,) float64: each cell's prior doublet rate
    sim_ratio: float = 1.0
    n_repeats: int = 3
    n_folds: int = 5
    progress_bar: bool = False  # a bar over the units scored, when there are several


class _Pairs(NamedTuple):
    first: torch.Tensor  # (n_sim,) cell indices
    second: torch.Tensor  # (n_sim,)


def _chunk(width: int, device: torch.device) -> int:
    return chunk_rows(width, device, Pass.SCORES)


# ---------------------------------------------------------------------------- clusters and pairs
def n_clusters(n_cells: int) -> int:
    return int(min(20, max(2, round(math.sqrt(n_cells / 40)))))


def kmeans(x: torch.Tensor, k: int, iterations: int = 30) -> torch.Tensor:
    """Cluster labels ``(n,)`` of Lloyd's k-means from ``k`` distinct random rows."""
    k = min(k, len(x))
    centres = x[torch.randperm(len(x), device=x.device)[:k]].clone()
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    step = 1 << 18  # (rows, k) distances a chunk: flat memory on an atlas's millions of cells
    for _ in range(iterations):
        labels = torch.cat([torch.cdist(x[lo:lo + step], centres).argmin(1)
                            for lo in range(0, len(x), step)])
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        sizes = torch.bincount(labels, minlength=k).unsqueeze(1)
        centres = torch.where(sizes > 0, sums / sizes.clamp_min(1), centres)
    # renumber so that labels are 0..k'-1 with no empty cluster
    return torch.unique(labels, return_inverse=True)[1]


def _heterotypic(members: torch.Tensor, local: torch.Tensor, count: int) -> _Pairs:
    """``count`` pairs of ``members`` from two different clusters (``local``: each member's
    cluster, numbered 0..k-1), every such pair of cells equally likely: as random cells meet in
    a droplet, so a pair of clusters is made in proportion to the product of their sizes."""
    order = torch.argsort(local, stable=True)
    by_cluster, sizes = members[order], torch.bincount(local)
    starts = torch.cumsum(sizes, 0) - sizes
    # the first cell in proportion to the cells outside its cluster, the second uniformly
    # among those: together, uniform over the pairs of cells of two clusters
    others = (len(members) - sizes[local]).double()
    first = torch.multinomial(others, count, replacement=True)
    own = local[first]
    u = (torch.rand(count, device=members.device) * others[first]).long()
    u = torch.minimum(u, (others[first] - 1).long())
    u = u + sizes[own] * (u >= starts[own]).long()  # skip the first cell's own cluster
    return _Pairs(members[first], by_cluster[u])


def make_pairs(groups: torch.Tensor, clusters: torch.Tensor, n_sim: int) -> _Pairs:
    """Pairs of cells of one group from two different clusters, every such pair of cells
    equally likely (random cells where the group has one cluster); each group gets doublets in
    proportion to its cells."""
    firsts, seconds = [], []
    for g in torch.unique(groups):
        members = torch.nonzero(groups == g).ravel()
        count = max(1, round(n_sim * len(members) / len(groups)))
        local = torch.unique(clusters[members], return_inverse=True)[1]
        if int(local.max()) == 0:  # one cluster
            pick = torch.randint(len(members), (2, count), device=groups.device)
            firsts.append(members[pick[0]])
            seconds.append(members[pick[1]])
            continue
        pairs = _heterotypic(members, local, count)
        firsts.append(pairs.first)
        seconds.append(pairs.second)
    return _Pairs(torch.cat(firsts), torch.cat(seconds))


# ---------------------------------------------------------------------------- features
def _log_normalized(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(x * (1e4 / x.sum(-1, keepdim=True).clamp_min(1)))


@torch.no_grad()
def _cluster_profiles(module: VAE, z: torch.Tensor, clusters: torch.Tensor,
                      codes: torch.Tensor | None, batch: int | None) -> torch.Tensor:
    """Mean decoded expression fractions of each cluster, ``(k, genes)``: every cell decoded
    with its own covariates, its batch set to ``batch`` (``None``: left as it is)."""
    k = int(clusters.max()) + 1
    sums = None
    step = _chunk(module.log_theta.shape[1], z.device)
    for lo in range(0, len(z), step):
        c = None if codes is None else codes[lo:lo + step].clone()
        if c is not None and batch is not None:
            c[:, 0] = batch
        fractions = module.expression_fractions(z[lo:lo + step], c).float()
        if sums is None:
            sums = torch.zeros(k, fractions.shape[1], device=z.device)
        sums.index_add_(0, clusters[lo:lo + step], fractions)
    return sums / torch.bincount(clusters, minlength=k).unsqueeze(1).clamp_min(1)


class _MixtureTest:
    """Multinomial log-likelihood of counts under the best two-cluster mixture profile minus
    that under the best single-cluster profile."""

    def __init__(self, profiles: torch.Tensor):
        self.single = profiles.clamp_min(1e-12).log().T  # (genes, k)
        first, second = torch.triu_indices(len(profiles), len(profiles), 1,
                                           device=profiles.device)
        self.mixtures = torch.cat([
            (w * profiles[first] + (1 - w) * profiles[second]).clamp_min(1e-12).log()
            for w in MIX_WEIGHTS]).T if len(first) else None  # (genes, pairs x weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(rows, 2)``: the log-likelihood ratio per count and log1p of its positive part."""
        best_single = (x @ self.single).max(1).values
        if self.mixtures is None:
            ratio = torch.zeros_like(best_single)
        else:
            ratio = (x @ self.mixtures).max(1).values - best_single
        return torch.stack([ratio / x.sum(1).clamp_min(1), ratio.clamp_min(0).log1p()], 1)


def _neighbourhood(points: torch.Tensor, n_real: int) -> torch.Tensor:
    """Per point (real first, then artificial): the share of artificial points among the k
    nearest others for each k of ``NEIGHBOURS``, a distance-weighted share over the largest k,
    and log1p distances to the nearest artificial and nearest real point, ``(n, 7)``."""
    ks = [min(k, len(points) - 1) for k in NEIGHBOURS]
    out = []
    step = _chunk(len(points), points.device)
    for lo in range(0, len(points), step):
        d = torch.cdist(points[lo:lo + step], points)
        rows = torch.arange(len(d), device=d.device)
        d[rows, rows + lo] = math.inf  # a point is not its own neighbour
        dist, idx = d.topk(max(ks), largest=False)
        artificial = idx >= n_real
        share = [artificial[:, :k].float().mean(1) for k in ks]
        weight = 1.0 / (dist + dist[:, :1].clamp_min(1e-6))
        share.append((weight * artificial).sum(1) / weight.sum(1))
        far = 2 * dist[:, -1]  # stands in where no such neighbour is among the nearest
        for kind in (artificial, ~artificial):
            near = torch.where(kind, dist, math.inf).min(1).values
            share.append(torch.minimum(near, far).log1p())
        out.append(torch.stack(share, 1))
    return torch.cat(out)


class _Group(NamedTuple):
    """One loading group: its real cells and its artificial doublets (as pairs of cells)."""

    cells: torch.Tensor  # (n_g,) indices into the data
    pairs: _Pairs  # (m_g,) each
    batch: int | None  # the batch code its cells are decoded in, None without a batch


def _row_blocks(data: CountTensors, group: _Group, artificial: bool):
    """Dense counts of the group's real cells or artificial doublets, a block at a time."""
    step = _chunk(data.n_genes, data.device)
    n = len(group.pairs.first) if artificial else len(group.cells)
    for lo in range(0, n, step):
        if artificial:
            yield (data.rows(group.pairs.first[lo:lo + step])
                   + data.rows(group.pairs.second[lo:lo + step]))
        else:
            yield data.rows(group.cells[lo:lo + step])


def _depth_features(library: torch.Tensor, detected: torch.Tensor, n_real: int) -> torch.Tensor:
    """Complexity (log detected genes minus a quadratic fit in log library over real cells) and
    depth (log library above the real cells' median, else 0), ``(n, 2)``."""
    log_lib, log_det = library.clamp_min(1).log().double(), detected.clamp_min(1).log().double()
    centred = log_lib - log_lib[:n_real].median()
    design = torch.stack([torch.ones_like(centred), centred, centred**2], 1)
    real = design[:n_real]
    # a slightly ridged normal equation: well posed on every device, even for a few cells
    gram = real.T @ real + 1e-6 * n_real * torch.eye(3, dtype=real.dtype, device=real.device)
    coef = torch.linalg.solve(gram, real.T @ log_det[:n_real])
    complexity = log_det - design @ coef
    return torch.stack([complexity, centred.clamp_min(0)], 1).float()


@torch.no_grad()
def _group_features(data: CountTensors, profiles: torch.Tensor, group: _Group) -> torch.Tensor:
    """Features of the group's real cells then its artificial doublets, ``(n_g + m_g, 11)``."""
    n_components = max(1, min(N_COMPONENTS, data.n_genes, len(group.cells) - 1))
    pca = streamed_pca(lambda: (_log_normalized(x) for x in _row_blocks(data, group, False)),
                       n_components)
    test = _MixtureTest(profiles)
    coords, mixture, library, detected = [pca.scores.float()], [], [], []
    for artificial in (False, True):
        for x in _row_blocks(data, group, artificial):
            if artificial:
                coords.append(pca(_log_normalized(x)).float())
            mixture.append(test(x))
            library.append(x.sum(1))
            detected.append((x > 0).sum(1).float())
    n_real = len(group.cells)
    return torch.cat([_neighbourhood(torch.cat(coords), n_real), torch.cat(mixture),
                      _depth_features(torch.cat(library), torch.cat(detected), n_real)], 1)


# ---------------------------------------------------------------------------- classifier
class _Logistic(NamedTuple):
    weights: torch.Tensor  # (features,)
    intercept: torch.Tensor  # ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Log odds of the rows of ``x``, ``(rows,)``."""
        return (x.double() @ self.weights + self.intercept).float()


def _fit_logistic(x: torch.Tensor, y: torch.Tensor) -> _Logistic:
    """Logistic regression on standardized ``x`` with the two classes weighted equally and a
    small ridge (``RIDGE``) on the weights, fitted by Newton's method in float64."""
    design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64,
                                               device=x.device)], 1)
    y = y.double()
    positive = y.mean().clamp(1e-6, 1 - 1e-6)
    sample = torch.where(y > 0, 0.5 / positive, 0.5 / (1 - positive)) / len(y)
    penalty = torch.full((design.shape[1],), RIDGE, dtype=torch.float64, device=x.device)
    # the intercept is all but unshrunk: enough to keep the Hessian invertible when a fold's
    # features cannot separate anything (one gene, a handful of cells) and p saturates
    penalty[-1] = RIDGE * 1e-6
    beta = torch.zeros(design.shape[1], dtype=torch.float64, device=x.device)
    for _ in range(NEWTON_STEPS):
        p = torch.sigmoid(design @ beta)
        gradient = design.T @ (sample * (p - y)) + penalty * beta
        hessian = (design * (sample * p * (1 - p)).unsqueeze(1)).T @ design + torch.diag(penalty)
        step = torch.linalg.solve(hessian, gradient)
        beta = beta - step
        if float(step.abs().max()) < 1e-7:
            break
    return _Logistic(beta[:-1], beta[-1])


def cross_validated_log_odds(features: torch.Tensor, n_real: int, expected_rate: float,
                             n_folds: int) -> torch.Tensor:
    """Out-of-fold log odds of 'artificial doublet' for the first ``n_real`` rows (real cells)
    against the rest, ``(n_real,)``: each row is scored by a classifier trained on the other
    folds; the second round drops the real cells ranked in the top ``expected_rate`` by the
    first round from the negatives."""
    n = len(features)
    label = torch.zeros(n, device=features.device)
    label[n_real:] = 1
    fold = torch.randperm(n, device=features.device) % n_folds
    negatives = torch.ones(n, dtype=torch.bool, device=features.device)
    out = torch.zeros(n, device=features.device)
    for _ in range(ROUNDS):
        for f in range(n_folds):
            train, held_out = (fold != f) & negatives, fold == f
            mean = features[train].mean(0)
            spread = features[train].std(0).clamp_min(1e-6)
            model = _fit_logistic((features[train] - mean) / spread, label[train])
            out[held_out] = model((features[held_out] - mean) / spread)
        called = out[:n_real].topk(math.ceil(expected_rate * n_real)).indices
        negatives = torch.ones(n, dtype=torch.bool, device=features.device)
        negatives[called] = False
    return out[:n_real]


# ---------------------------------------------------------------------------- entry point
MAX_UNIT_CELLS = 25_000
"""Most real cells scored together (one set of artificial doublets, neighbours and classifier).
A batch with more is split into random sets of ``UNIT_BLOCK_ROWS``-row blocks, and batches with
fewer are packed together up to it: the neighbour search is quadratic in a unit's cells, so
this keeps the cost linear in an atlas's cells and the memory flat. Every set in
benchmarks/README.md (up to 3,881 cells) is one unit."""

UNIT_BLOCK_ROWS = 1024
"""Rows of the file that stay together when a batch is split: on disk each block is one read
(random single cells would read the file once per unit), and a random set of blocks mixes
the cell types of a file sorted by them, as training's buffers do."""


PROFILE_CELLS = 2000
"""Cells per cluster whose decoded expression is averaged into the cluster's profile for the
mixture test, when there are more than ``MAX_UNIT_CELLS`` cells (below, every cell)."""


def _profiled_cells(clusters: torch.Tensor) -> torch.Tensor | None:
    """Up to ``PROFILE_CELLS`` random cells of each cluster, sorted; ``None`` (every cell)
    for at most ``MAX_UNIT_CELLS`` cells. The profiles are means: a few thousand cells fix
    them, and decoding an atlas's every cell once per batch would cost more than the rest."""
    n = len(clusters)
    if n <= MAX_UNIT_CELLS:
        return None
    order = torch.randperm(n, device=clusters.device)
    by_cluster = order[torch.argsort(clusters[order], stable=True)]
    sizes = torch.bincount(clusters)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n, device=clusters.device) - starts.repeat_interleave(sizes)
    return by_cluster[rank < PROFILE_CELLS].sort().values


class _Unit(NamedTuple):
    cells: torch.Tensor  # (n_u,) indices into the data, sorted
    groups: torch.Tensor  # (n_u,) the part of a batch each cell is in, 0..parts-1
    batches: list[int | None]  # the batch code of each part


def scoring_units(groups: torch.Tensor, by_batch: bool, max_cells: int | None = None
                  ) -> list[_Unit]:
    """The cells of each batch (``groups``: a batch code per cell), split into parts of at most
    about ``max_cells`` made of random blocks of ``UNIT_BLOCK_ROWS`` consecutive cells, and the
    parts packed in order into units of at most ``max_cells`` (a part never split; default
    ``MAX_UNIT_CELLS``)."""
    max_cells = MAX_UNIT_CELLS if max_cells is None else max_cells
    parts: list[tuple[torch.Tensor, int | None]] = []
    for g in torch.unique(groups):
        members = torch.nonzero(groups == g).ravel()
        batch = int(g) if by_batch else None
        n_parts = math.ceil(len(members) / max_cells)
        if n_parts == 1:
            parts.append((members, batch))
            continue
        # the batch's blocks in a random order, cut into runs of about len / n_parts cells
        block = torch.unique(members // UNIT_BLOCK_ROWS, return_inverse=True)[1]
        sizes = torch.bincount(block)
        order = torch.randperm(len(sizes), device=groups.device)
        before = torch.cumsum(sizes[order], 0) - sizes[order]
        part_of_block = torch.empty_like(order)
        part_of_block[order] = before * n_parts // len(members)
        part_of = part_of_block[block]
        parts += [(members[part_of == p], batch) for p in range(n_parts)]
    units, pending, size = [], [], 0
    for part in parts:
        if pending and size + len(part[0]) > max_cells:
            units.append(_pack(pending))
            pending, size = [], 0
        pending.append(part)
        size += len(part[0])
    units.append(_pack(pending))
    return units


def _pack(parts: list[tuple[torch.Tensor, int | None]]) -> _Unit:
    cells = torch.cat([c for c, _ in parts])
    label = torch.cat([torch.full_like(c, i) for i, (c, _) in enumerate(parts)])
    order = torch.argsort(cells)
    return _Unit(cells[order], label[order], [b for _, b in parts])


@torch.no_grad()
def doublet_probability(module: VAE, data: CountTensors, settings: DoubletSettings, *,
                        by_batch: bool) -> np.ndarray:
    """Posterior doublet probability per cell, ``(n_cells,)`` float64 (module text).
    ``by_batch``: the first covariate is the batch, the group within which doublets form.
    Cells are scored in units of at most ``MAX_UNIT_CELLS`` (:func:`scoring_units`)."""
    step = _chunk(data.n_genes, data.device)
    z = stack_rows(data.n_cells, (module.inference(x, c).mean.float()
                                  for x, c in data.batches(step, shuffle=False)))
    clusters = kmeans(z, n_clusters(data.n_cells))
    groups = data.codes[:, 0] if by_batch else torch.zeros(data.n_cells, dtype=torch.long,
                                                           device=z.device)
    units = scoring_units(groups, by_batch)
    del groups
    profiled = _profiled_cells(clusters)
    codes = data.codes
    if profiled is not None:
        z_p, clusters_p = z[profiled], clusters[profiled]
        codes = None if codes is None else codes[profiled]
    else:
        z_p, clusters_p = z, clusters
    profiles: dict[int | None, torch.Tensor] = {}  # by the batch the clusters are decoded in

    def profiles_in(batch: int | None) -> torch.Tensor:
        if batch not in profiles:
            profiles[batch] = _cluster_profiles(module, z_p, clusters_p, codes, batch)
        return profiles[batch]

    log_odds = torch.zeros(data.n_cells, device=z.device)
    with tqdm(total=settings.n_repeats * len(units), desc="doublet scores", unit="unit",
              leave=False, disable=not settings.progress_bar or len(units) < 2) as bar:
        for _ in range(settings.n_repeats):
            for unit in units:
                log_odds[unit.cells] += _unit_log_odds(data, clusters, unit, settings,
                                                       profiles_in)
                bar.update()
    prior = torch.log(settings.rates / (1 - settings.rates))
    return torch.sigmoid(log_odds.double() / settings.n_repeats + prior).cpu().numpy()


def _unit_log_odds(data: CountTensors, clusters: torch.Tensor, unit: _Unit,
                   settings: DoubletSettings, profiles_in) -> torch.Tensor:
    """One repeat on one unit: fresh artificial doublets, the features of each of its parts,
    and the cross-validated log odds of its real cells, ``(n_u,)``."""
    n_real = len(unit.cells)
    n_sim = max(MIN_DOUBLETS, round(settings.sim_ratio * n_real))
    local = make_pairs(unit.groups, clusters[unit.cells], n_sim)
    pairs = _Pairs(unit.cells[local.first], unit.cells[local.second])
    part_of_pair = unit.groups[local.first]
    real, artificial = None, []
    for g in torch.unique(unit.groups):
        mine = torch.nonzero(unit.groups == g).ravel()
        group = _Group(unit.cells[mine], _Pairs(*(p[part_of_pair == g] for p in pairs)),
                       unit.batches[int(g)])
        features = _group_features(data, profiles_in(group.batch), group)
        if real is None:
            real = features.new_empty(n_real, features.shape[1])
        real[mine] = features[:len(mine)]
        artificial.append(features[len(mine):])
    return cross_validated_log_odds(torch.cat([real, *artificial]), n_real,
                                    float(settings.rates[unit.cells].mean()), settings.n_folds)
