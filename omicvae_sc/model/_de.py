"""Differential expression from a fitted model (the numbers; ``OmicVAE.differential_expression``
checks the request and ``data._writeback`` writes scanpy's layout).

What is compared is each group's **mean normalized expression**. Its posterior is drawn
``n_samples`` times; each draw weighs the group's cells by Bayesian-bootstrap weights
(Dirichlet(1, ..., 1): a small group is uncertain, a large one is not) and reads every cell at
a draw z of its latent state from q(z | x). The group mean of a draw is the decoder's mean
fraction (with ``batch_correction``: averaged over every compared batch, so that groups from
different batches are compared at one batch mixture) times the group's observed over expected
counts (expected: the model's, in the cells' own batches; cells weighted as the negative
binomial's maximum-likelihood factor weighs them, each count clipped at ``HUBER_K`` standard
deviations from the model's). The decoder alone would miss any
difference its latent does not carry (scvi-tools' test on simulated fold changes in one cell
type: AUPRC 0.13); the counts alone would leave as noise the cell-to-cell variation the model
explains.

The log2 fold change of the two means, per draw, gives each gene an estimate and a standard
error; :mod:`._shrink` shrinks them by a prior fitted to all genes, and its posterior gives the
probability of a change (``mode="change"``: |LFC| > delta; ``"vanilla"``: the more likely
sign), the interval and the posterior expected false discovery rule.

scvi-tools pairs single cells' draws instead, so its probability measures how two random cells
differ, not the groups: two random halves of one population differ there for every gene whose
expression varies from cell to cell. Here a null split calls almost nothing (tested).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from omicvae_sc.data import (
    check_key_added,
    count_source,
    obs_column,
    rank_genes_groups_layout,
    write_uns,
)
from omicvae_sc.model._outputs import cell_chunks
from omicvae_sc.model._runtime import seeded
from omicvae_sc.model._shrink import shrink
from omicvae_sc.module import VAE

LATENT_DRAWS = 20  # latent draws per cell; the group-mean draw s reads each cell's draw s % 20
MODES = ("change", "vanilla")
CREDIBLE = (0.025, 0.975)  # the LFC interval: 95% posterior
PSEUDOCOUNT_COUNTS = 0.1  # pseudocount of the LFC: a tenth of a count in a cell of median depth
# Huber clip, in NB standard deviations: 3, not the Gaussian 1.345, because counts are skewed:
# clipping an NB's long right tail near its mean lowers the mean by an amount that depends on
# mu and theta, so two groups that differ in mu would differ by the clipping alone (on the
# bundled PBMCs with simulated changes, 13% and 15% of the calls false at 1.345 against 9% at 3)
HUBER_K = 3.0
KEEP_BYTES = 2**28  # every group's draws are kept up to this size, else groups are read again


@dataclass(frozen=True)
class GroupDraws:
    """Bootstrap draws of one group's mean expression fraction and what was read."""

    draws: np.ndarray  # (n_samples, n_genes) float32, see :func:`group_draws`
    n_cells: int  # cells of the group (all, not only those read)
    nonzero: np.ndarray  # (n_genes,) cells read with a non-zero count
    n_read: int  # cells read (at most max_cells)
    libraries: np.ndarray  # (n_read,) library sizes of the cells read


def pick_cells(members: np.ndarray, max_cells: int | None, rng: np.random.Generator
               ) -> np.ndarray:
    """``members`` (sorted cell positions), or ``max_cells`` of them chosen at random."""
    if max_cells is None or len(members) <= max_cells:
        return members
    return np.sort(rng.choice(members, size=max_cells, replace=False))


def _fractions(module: VAE, z: torch.Tensor, library: torch.Tensor,
               codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The share of the library the counts are expected to hold, ``(rows, genes)`` (float32)
    for flat draws ``z``: the expression fraction, under ZINB times the chance that an entry
    is not a structural zero (the scale of the counts, which the group means are compared
    on); and the NB inverse dispersion (``None`` under Poisson)."""
    params = module.generative(z, library, codes)
    frac = torch.softmax(params.logits.float(), dim=-1)
    if params.zi_logits is not None:
        frac = frac * torch.sigmoid(-params.zi_logits.float())
    return frac, None if params.theta is None else params.theta.float()


def decoded(module: VAE, z: torch.Tensor, library: torch.Tensor, codes: torch.Tensor | None,
            batch_codes: tuple[int, ...] | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For latent draws ``z`` ``(draws, cells, latent)``: the shares of :func:`_fractions` in
    the cells' own covariates, the same averaged over the batches ``batch_codes`` (without
    them: the same), each ``(draws, cells, genes)``, and the own covariates' inverse
    dispersion (broadcastable to them, or ``None``)."""
    draws, cells = z.shape[:2]
    flat = z.reshape(draws * cells, -1)
    lib = library.repeat(draws, 1)  # (draws * cells, 1), draw-major as ``flat``
    rep = None if codes is None else codes.repeat(draws, 1)
    own, theta = _fractions(module, flat, lib, rep)
    if theta is not None:
        theta = theta.expand_as(own).reshape(draws, cells, -1)
    own = own.reshape(draws, cells, -1)
    if batch_codes is None:
        return own, own, theta
    mixture = None
    for b in batch_codes:
        in_b = rep.clone()
        in_b[:, 0] = b
        frac = _fractions(module, flat, lib, in_b)[0]
        mixture = frac if mixture is None else mixture.add_(frac)
    mixture.div_(len(batch_codes))
    return own, mixture.reshape(draws, cells, -1), theta


@torch.inference_mode()
def group_draws(module: VAE, data, n_cells: int, n_samples: int, seed: int,
                batch_codes: tuple[int, ...] | None) -> GroupDraws:
    """Bootstrap draws of the cells ``data`` serves (a subset of a group of ``n_cells``).

    Draw s weighs the cells by Bayesian-bootstrap weights w and reads each cell at latent
    draw s % 20: the mean fraction sum(w rho~) / sum(w) (rho~ decoded in the compared
    batches), and the means of the counts x and of the expected counts mu = l rho (rho in the
    cell's own batch, l its library), both weighted by w / (1 + mu / theta): then their ratio
    is the negative binomial's maximum-likelihood factor by which the group's counts lie
    above or below the model's (a cell whose count is expected high has a variance quadratic
    in it, and counts less). Each count enters clipped to ``HUBER_K`` (3) standard deviations
    around mu (a Huber M-estimate, as robust GLMs fit), so a few bursting cells do not make a
    difference on their own. ``fraction * observed / expected`` is the model's group mean
    corrected by the counts: a difference the latent does not carry is still in the counts,
    while the cell-to-cell variation the model explains (which cells of which state a group
    holds) is no longer noise. Chunk by chunk of cells; memory holds three
    ``n_samples x n_genes`` sums (float32: sums of at most ``max_cells`` cells); the result
    is ``fraction * observed / expected`` per draw."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_gamma(1.0, size=(n_samples, data.n_cells)).astype(np.float32)
    device = data.device
    draws = min(LATENT_DRAWS, n_samples)
    rounds = -(-n_samples // draws)
    sums = torch.zeros(3, n_samples, data.n_genes, device=device)  # (sums of <= max_cells)
    nonzero = torch.zeros(data.n_genes, dtype=torch.float64, device=device)
    libraries, lo = [], 0
    with seeded(seed, device):
        for x, codes in cell_chunks(data, draws * (3 if batch_codes else 2)):
            hi = lo + x.shape[0]
            posterior = module.inference(x, codes)
            z = posterior.sample(torch.randn((draws, *posterior.mean.shape), device=device))
            library = x.sum(1, keepdim=True)  # (c, 1)
            own, mixed, theta = decoded(module, z, library, codes, batch_codes)  # (d, c, g)
            expected = own * library
            # the NB maximum-likelihood weights of a common factor: a cell whose expected
            # count is high next to theta has a variance quadratic in it and counts less
            nb = 1.0 if theta is None else 1.0 / (1.0 + expected / theta)
            # Huber: a count further than HUBER_K standard deviations (NB: mu + mu^2 / theta)
            # from the model's expectation counts as that far, so a few deep or bursting
            # cells do not move a group's mean (never below 0: a zero is clipped only where
            # mu exceeds HUBER_K standard deviations)
            sd = (expected / nb).sqrt().clamp_min(1e-12)
            robust = expected + ((x - expected) / sd).clamp(-HUBER_K, HUBER_K) * sd
            w = torch.as_tensor(weights[:, lo:hi], device=device)  # (n_samples, c)
            # draw s reads latent draw s % d: weights as (d, rounds, c), one product per draw
            by_draw = torch.zeros(rounds * draws, w.shape[1], device=device)
            by_draw[:n_samples] = w
            by_draw = by_draw.reshape(rounds, draws, -1).transpose(0, 1)
            for k, values in ((0, mixed), (1, nb * robust), (2, nb * expected)):
                part = torch.bmm(by_draw, values).transpose(0, 1).reshape(rounds * draws, -1)
                sums[k] += part[:n_samples]
            nonzero += (x > 0).sum(0).double()
            libraries.append(library[:, 0].cpu().numpy())
            lo = hi
    fraction, observed, expected = sums.double()  # the weights' total cancels in the ratio
    total = torch.as_tensor(weights.sum(1, dtype=np.float64), device=device)[:, None]
    draws = fraction / total * observed / expected.clamp_min(1e-30)
    return GroupDraws(draws.float().cpu().numpy(), n_cells, nonzero.cpu().numpy(), lo,
                      np.concatenate(libraries))


def group_shares(groups: list[str], members: dict[str, np.ndarray], n_samples: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Each group's share of every bootstrap draw over all grouped cells: Gamma(n_k) totals
    (what Bayesian-bootstrap weights over a group's cells add up to, so a group read from a
    subset of its cells still counts with all of them), normalized per draw. Seeded per group,
    so that every request over the same groups draws the same shares."""
    totals = {g: np.random.default_rng(group_seed(seed, 2, groups.index(g))).standard_gamma(
        len(cells), size=n_samples) for g, cells in members.items()}
    whole = sum(totals.values())
    return {g: t / whole for g, t in totals.items()}


def clear_effect(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """How far the credible interval of the LFC lies from 0 (0 when it holds 0): the change
    the data leave no doubt about, signed by its direction."""
    return np.where(low > 0, low, np.where(high < 0, high, 0.0))


def ranking(proba: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Gene positions, most probable change first; ties (many genes are certain between two
    cell types) by the larger clear effect (:func:`clear_effect`), so that a gene with a
    large change measured on many counts comes before a large change measured on few."""
    return np.lexsort((-np.abs(clear_effect(low, high)), -proba))


def scanpy_order(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (of :func:`compare`) in the order scanpy gives a group's genes, with its
    ``scores``: the probability of a change signed by the LFC, up-regulated genes first, ties
    by the signed clear effect (the most down-regulated last)."""
    score = np.sign(table["lfc_mean"].to_numpy()) * table["proba_de"].to_numpy()
    clear = clear_effect(table["lfc_low"].to_numpy(), table["lfc_high"].to_numpy())
    order = np.lexsort((-clear, -score))
    return table.iloc[order].assign(scores=score[order])


def compare(one: GroupDraws, two: GroupDraws, genes: np.ndarray, *, mode: str, delta: float,
            fdr: float) -> pd.DataFrame:
    """The table of ``OmicVAE.differential_expression`` (its columns but ``group``) for
    ``one`` against ``two``, one row per gene, ranked by :func:`ranking`."""
    libraries = np.concatenate([one.libraries, two.libraries])
    eps = PSEUDOCOUNT_COUNTS / max(float(np.median(libraries)), 1.0)
    draws = np.log2(one.draws + eps) - np.log2(two.draws + eps)  # (n_samples, genes)
    raw = draws.mean(0)
    post = shrink(raw, draws.std(0))
    if mode == "change":
        proba = post.prob_outside(delta)
    else:
        proba = np.maximum(post.prob_positive(), post.prob_negative())
    low, median, high = post.quantiles((CREDIBLE[0], 0.5, CREDIBLE[1]))
    table = pd.DataFrame({
        "proba_de": proba, "proba_not_de": 1.0 - proba, "lfc_mean": post.posterior_mean(),
        "lfc_median": median, "lfc_std": post.posterior_sd(), "lfc_low": low, "lfc_high": high,
        "lfc_raw": raw, "mean1": one.draws.mean(0) * 1e4, "mean2": two.draws.mean(0) * 1e4,
        "pct_nonzero1": one.nonzero / max(one.n_read, 1),
        "pct_nonzero2": two.nonzero / max(two.n_read, 1),
    }, index=pd.Index(np.asarray(genes).astype(str), name="gene"))
    order = ranking(proba, table["lfc_low"].to_numpy(), table["lfc_high"].to_numpy())
    table = table.iloc[order]
    # the expected share of false calls among the genes ranked up to each one: a running mean
    # of 1 - p over genes sorted by p, so it never falls down the list
    table["qvalue"] = np.cumsum(table["proba_not_de"].to_numpy()) / np.arange(1, len(table) + 1)
    table["is_de"] = table["qvalue"].to_numpy() <= fdr
    return table


@dataclass(frozen=True)
class DERequest:
    """The settings of one differential expression request, checked before any work."""

    mode: str = "change"
    delta: float = 0.25
    fdr: float = 0.05
    batch_correction: bool = True
    n_samples: int = 500
    max_cells: int | None = 2000
    seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            msg = f"mode={self.mode!r} is not one of {MODES}."
            raise ValueError(msg)
        if not np.isfinite(self.delta) or self.delta < 0:
            msg = (f"delta={self.delta!r}: the log2 fold change threshold must be >= 0 "
                   "(0.25 is about a 1.2-fold change).")
            raise ValueError(msg)
        if not 0 < self.fdr < 1:
            msg = f"fdr={self.fdr!r} must lie strictly between 0 and 1 (e.g. 0.05)."
            raise ValueError(msg)
        if int(self.n_samples) != self.n_samples or self.n_samples < 10:
            msg = f"n_samples={self.n_samples!r} must be an integer >= 10."
            raise ValueError(msg)
        if self.max_cells is not None and (int(self.max_cells) != self.max_cells
                                           or self.max_cells < 2):
            msg = f"max_cells={self.max_cells!r} must be None or an integer >= 2."
            raise ValueError(msg)


def comparisons(labels: pd.Series, groupby: str, group1, group2
                ) -> tuple[list[str], list[tuple[str, str | None]], dict[str, np.ndarray]]:
    """The groups of ``labels`` (cells without a label belong to none), the comparisons asked
    for (``group1=None``: each group, as scanpy's ``rank_genes_groups``; ``group2=None``:
    against the rest) and the cells of each group that takes part; every bad group is an
    error."""
    cat = pd.Categorical(labels)
    codes = np.asarray(cat.codes)
    groups = [str(g) for g in cat.categories]
    sizes = np.bincount(codes[codes >= 0], minlength=len(groups))
    present = [g for g, n in zip(groups, sizes, strict=True) if n > 0]
    where = f"adata.obs[{groupby!r}]"
    for name, group in (("group1", group1), ("group2", group2)):
        if group is not None and str(group) not in present:
            msg = (f"{name}={group!r} is not a group of {where}; its groups: "
                   f"{present[:10]}{' ...' if len(present) > 10 else ''}.")
            raise ValueError(msg)
    if group1 is not None and group2 is not None and str(group1) == str(group2):
        msg = f"group1 and group2 are both {group1!r}; compare two different groups."
        raise ValueError(msg)
    if len(present) < 2:
        msg = f"{where} has {len(present)} group with cells; a comparison needs two."
        raise ValueError(msg)
    second = None if group2 is None else str(group2)
    firsts = [g for g in present if g != second] if group1 is None else [str(group1)]
    asked = [(g, second) for g in firsts]
    for g in {g for pair in asked for g in pair if g is not None}:
        n = int(sizes[groups.index(g)])
        if n < 2:
            msg = (f"Group {g!r} of {where} has {n} cell; a group needs at least 2 cells to "
                   "estimate its mean expression.")
            raise ValueError(msg)
    needed = present if any(b is None for _, b in asked) else sorted({g for p in asked for g in p})
    members = {g: np.flatnonzero(codes == groups.index(g)) for g in needed}
    return present, asked, members


def group_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for one group's draws."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> 1)


def batches_compared(codes: np.ndarray | None, members: dict[str, np.ndarray],
                     batch_correction: bool) -> tuple[int, ...] | None:
    """The batch codes every cell is decoded in (those of the compared cells), or ``None``:
    each cell in its own batch (no batch correction, or a model without batches)."""
    if not batch_correction or codes is None:
        return None
    cells = np.concatenate(list(members.values()))
    return tuple(int(b) for b in np.unique(codes[cells, 0]))


def differential_tables(module: VAE, counts, codes: np.ndarray | None, *,
                        device: torch.device, groups: list[str],
                        asked: list[tuple[str, str | None]], members: dict[str, np.ndarray],
                        genes: np.ndarray, request: DERequest,
                        batch_codes: tuple[int, ...] | None, progress_bar: bool = True,
                        ) -> dict[str, pd.DataFrame]:
    """One table (:func:`compare`) per comparison in ``asked``, keyed by its first group.

    Each group's draws depend only on the seed and the group, so a group against the rest
    gives the same table asked alone or with every group. "The rest" is every other grouped
    cell: the groups' draws pooled by :func:`group_shares`, less the tested group's. Memory
    holds every group's draws while they fit in :data:`KEEP_BYTES`; past that (many groups,
    many genes) a group is read a second time when it is compared, and memory holds two
    ``n_samples x n_genes`` arrays whatever the number of groups."""
    picked = {}
    for g, cells in members.items():
        rng = np.random.default_rng(group_seed(request.seed, 0, groups.index(g)))
        picked[g] = pick_cells(cells, request.max_cells, rng)
    keep = len(members) * request.n_samples * len(genes) * 4 <= KEEP_BYTES
    kept: dict[str, GroupDraws] = {}
    libraries: dict[str, np.ndarray] = {}
    rest_needed = any(g2 is None for _, g2 in asked)
    shares = group_shares(groups, members, request.n_samples, request.seed) \
        if rest_needed else {}
    pooled, nonzero, n_read = 0.0, 0.0, 0
    total = sum(len(c) for c in picked.values()) * (1 if keep else 2)
    with tqdm(total=total, desc="differential expression", unit="cell",
              disable=not progress_bar or total < 20_000) as bar:

        def read(g: str) -> GroupDraws:
            if g in kept:
                return kept[g]
            data = count_source(counts, codes, device, cells=picked[g])
            out = group_draws(module, data, len(members[g]), request.n_samples,
                              group_seed(request.seed, 1, groups.index(g)), batch_codes)
            bar.update(len(picked[g]))
            return out

        for g in picked:  # every group once: the pooled draws and what each read
            d = read(g)
            libraries[g], nonzero, n_read = d.libraries, nonzero + d.nonzero, n_read + d.n_read
            if rest_needed:
                pooled = pooled + shares[g][:, None] * d.draws.astype(np.float64)
            if keep or g in {g2 for _, g2 in asked}:
                kept[g] = d
        tables = {}
        for g1, g2 in asked:
            one = read(g1)
            if g2 is None:
                share = shares[g1][:, None]
                other = GroupDraws(
                    ((pooled - share * one.draws) / np.maximum(1.0 - share, 1e-12)).astype(
                        np.float32),
                    sum(len(c) for c in members.values()) - one.n_cells,
                    nonzero - one.nonzero, n_read - one.n_read,
                    np.concatenate([lib for g, lib in libraries.items() if g != g1]))
            else:
                other = read(g2)
            tables[g1] = compare(one, other, genes, mode=request.mode, delta=request.delta,
                                 fdr=request.fdr)
    return tables


def run(model, adata, groupby: str, group1, group2, request: DERequest, *,
        key_added: str | None, progress_bar: bool) -> pd.DataFrame:
    """``model.differential_expression``: check the request, compute one table per comparison
    and, with ``key_added``, write them in scanpy's layout (nothing is written on an error);
    the tables stacked, each with its ``group``."""
    if not model.is_trained:
        msg = "The model is not trained; call model.train() before differential_expression."
        raise ValueError(msg)
    request.check()
    if key_added is not None:
        check_key_added(key_added)
    labels = obs_column(adata, groupby, "groupby", missing_ok=True)
    groups, asked, members = comparisons(labels, groupby, group1, group2)
    counts, codes = model._host_data(adata)  # model/ reads its own model's data
    batch_codes = batches_compared(codes, members, request.batch_correction
                                   and model.setup.batch_key is not None)
    tables = differential_tables(
        model.module, counts, codes, device=model.device, groups=groups, asked=asked,
        members=members, genes=model.var_names, request=request, batch_codes=batch_codes,
        progress_bar=progress_bar)
    if key_added is not None:
        params = {"groupby": groupby, "reference": "rest" if group2 is None else str(group2),
                  "method": f"omicvae_sc {request.mode}", "use_raw": False,
                  "layer": model.setup.layer, "corr_method": "posterior expected FDR",
                  **dataclasses.asdict(request)}
        params = {k: v for k, v in params.items() if v is not None}  # h5ad has no None
        layout = rank_genes_groups_layout({g: scanpy_order(t) for g, t in tables.items()},
                                          params)
        write_uns(adata, key_added, layout)
    return pd.concat([t.assign(group=g)[["group", *t.columns]] for g, t in tables.items()])
