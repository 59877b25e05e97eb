"""Differential expression from a fitted model (the numbers; ``OmicVAE.differential_expression``
checks the request and ``data._writeback`` writes scanpy's layout).

What is compared is each group's **mean normalized expression**. Its posterior is drawn
``n_samples`` times; each draw weighs the group's cells by Bayesian-bootstrap weights
(Dirichlet(1, ..., 1): a small group is uncertain, a large one is not) and reads every cell as
counts drawn from p(x | z) at its own library, z a draw of its latent state from q(z | x).
Counts, not the decoder's mean: the decoder's mean is smooth over a group's cells, and a
bootstrap over it is far too sure of a mean that real cells would make noisy. With
``batch_correction`` every cell is drawn in each batch of the comparison and the draws
averaged, so that groups from different batches are compared at one batch mixture.

The log2 fold change of the two means, per draw, gives each gene an estimate and a standard
error; :mod:`._shrink` shrinks them by a prior fitted to all genes, and its posterior gives the
probability of a change (``mode="change"``: |LFC| > delta; ``"vanilla"``: the more likely
sign), the interval and the posterior expected false discovery rule.

scvi-tools pairs single cells' draws instead, so its probability measures how two random cells
differ, not the groups: two random halves of one population differ there for every gene whose
expression varies from cell to cell. Here a null split calls almost nothing (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from omicvae_sc.data import count_source
from omicvae_sc.model._outputs import cell_chunks
from omicvae_sc.model._runtime import seeded
from omicvae_sc.model._shrink import shrink
from omicvae_sc.module import VAE

LATENT_DRAWS = 20  # latent draws per cell; the group-mean draw s reads each cell's draw s % 20
MODES = ("change", "vanilla")
CREDIBLE = (0.025, 0.975)  # the LFC interval: 95% posterior
PSEUDOCOUNT_COUNTS = 0.1  # pseudocount of the LFC: a tenth of a count in a cell of median depth

COLUMNS = {
    "proba_de": "posterior probability of a change (|LFC| > delta; vanilla: of the LFC's sign)",
    "proba_not_de": "1 - proba_de",
    "lfc_mean": "posterior mean of log2(group1 / group2) of the groups' mean expression",
    "lfc_raw": "the same before shrinkage (mean of the draws)",
    "lfc_median": "its posterior median",
    "lfc_std": "its posterior standard deviation",
    "lfc_low": "lower end of its 95% credible interval",
    "lfc_high": "upper end of its 95% credible interval",
    "mean1": "group1's mean normalized expression (per 10,000 counts), posterior mean",
    "mean2": "group2's (or the rest's) mean normalized expression, likewise",
    "pct_nonzero1": "share of group1's cells (those read) with a non-zero count",
    "pct_nonzero2": "share of group2's cells (those read) with a non-zero count",
    "qvalue": "posterior expected FDR of calling this gene and every gene ranked above it",
    "is_de": "called differentially expressed: qvalue <= fdr",
}


@dataclass(frozen=True)
class GroupDraws:
    """Posterior draws of one group's mean expression fractions and what was read."""

    draws: np.ndarray  # (n_samples, n_genes) float64
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


def _predictive(module: VAE, z: torch.Tensor, library: torch.Tensor,
                codes: torch.Tensor | None, batch_codes: tuple[int, ...] | None
                ) -> torch.Tensor:
    """Normalized counts (count / library) drawn from p(x | z) at each cell's library for the
    latent draws ``z`` ``(draws, cells, latent)`` -> ``(draws, cells, genes)``: in the cells'
    own covariates, or averaged over the batches ``batch_codes``. Drawn counts, not the
    decoder's mean: their spread over a group's cells is the spread of real cells, so the
    bootstrap of the group's mean is as uncertain as the data make it."""
    draws, cells = z.shape[:2]
    flat = z.reshape(draws * cells, -1)
    lib = library.repeat(draws, 1)  # (draws * cells, 1), draw-major as ``flat``
    rep = None if codes is None else codes.repeat(draws, 1)
    settings = [rep] if batch_codes is None else []
    for b in batch_codes or ():
        in_b = rep.clone()
        in_b[:, 0] = b
        settings.append(in_b)
    total = None
    for cov in settings:
        counts = module.generative(flat, lib, cov).distribution().sample()
        total = counts if total is None else total.add_(counts)
    return total.div_(lib * len(settings)).reshape(draws, cells, -1)


@torch.inference_mode()
def group_draws(module: VAE, data, n_cells: int, n_samples: int, seed: int,
                batch_codes: tuple[int, ...] | None) -> GroupDraws:
    """Draws of the mean normalized expression of the cells ``data`` serves (a subset of a
    group of ``n_cells``), chunk by chunk of cells: memory holds ``n_samples x n_genes`` sums
    and one chunk's draws."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_gamma(1.0, size=(n_samples, data.n_cells)).astype(np.float32)
    device = data.device
    draws = min(LATENT_DRAWS, n_samples)
    sums = torch.zeros(n_samples, data.n_genes, dtype=torch.float64, device=device)
    nonzero = torch.zeros(data.n_genes, dtype=torch.float64, device=device)
    libraries, lo = [], 0
    per_cell = draws * (3 if batch_codes else 2)
    with seeded(seed, device):
        for x, codes in cell_chunks(data, per_cell):
            hi = lo + x.shape[0]
            posterior = module.inference(x, codes)
            z = posterior.sample(torch.randn((draws, *posterior.mean.shape), device=device))
            library = x.sum(1, keepdim=True).clamp_min(1.0)  # (c, 1)
            norm = _predictive(module, z, library, codes, batch_codes)  # (d, c, g)
            w = torch.as_tensor(weights[:, lo:hi], device=device)  # (n_samples, c)
            for j in range(draws):  # draws j, j + d, j + 2d, ... read latent draw j
                sums[j::draws] += (w[j::draws] @ norm[j]).double()
            nonzero += (x > 0).sum(0).double()
            libraries.append(x.sum(1).cpu().numpy())
            lo = hi
    total = torch.as_tensor(weights.sum(1, dtype=np.float64), device=device)[:, None]
    return GroupDraws((sums / total).cpu().numpy(), n_cells, nonzero.cpu().numpy(), lo,
                      np.concatenate(libraries))


def pooled(groups: list[GroupDraws], seed: int) -> GroupDraws:
    """The draws of the union of ``groups`` (the rest): each draw weighs group k by a
    Gamma(n_k) total, which is what Bayesian-bootstrap weights over all their cells add up to
    (so a group read from a subset of its cells still counts with all of them)."""
    rng = np.random.default_rng(seed)
    n_samples = groups[0].draws.shape[0]
    totals = np.stack([rng.standard_gamma(g.n_cells, size=n_samples) for g in groups])
    totals /= totals.sum(0)  # (groups, n_samples)
    draws = sum(t[:, None] * g.draws for t, g in zip(totals, groups, strict=True))
    return GroupDraws(draws, sum(g.n_cells for g in groups),
                      sum(g.nonzero for g in groups), sum(g.n_read for g in groups),
                      np.concatenate([g.libraries for g in groups]))


def ranking(proba: np.ndarray, lfc_mean: np.ndarray) -> np.ndarray:
    """Gene positions, most probable change first, ties by the larger |mean LFC|."""
    return np.lexsort((-np.abs(lfc_mean), -proba))


def compare(one: GroupDraws, two: GroupDraws, genes: np.ndarray, *, mode: str, delta: float,
            fdr: float) -> pd.DataFrame:
    """The table of :data:`COLUMNS` for ``one`` against ``two``, one row per gene, ranked by
    :func:`ranking`."""
    libraries = np.concatenate([one.libraries, two.libraries])
    eps = PSEUDOCOUNT_COUNTS / max(float(np.median(libraries)), 1.0)
    draws = np.log2(one.draws + eps) - np.log2(two.draws + eps)  # (n_samples, genes)
    raw = draws.mean(0)
    post = shrink(raw, draws.std(0))
    if mode == "change":
        proba = post.prob_outside(delta)
    else:
        proba = np.maximum(post.prob_positive(), post.prob_negative())
    table = pd.DataFrame({
        "proba_de": proba, "proba_not_de": 1.0 - proba, "lfc_mean": post.posterior_mean(),
        "lfc_median": post.quantile(0.5), "lfc_std": post.posterior_sd(),
        "lfc_low": post.quantile(CREDIBLE[0]), "lfc_high": post.quantile(CREDIBLE[1]),
        "lfc_raw": raw, "mean1": one.draws.mean(0) * 1e4, "mean2": two.draws.mean(0) * 1e4,
        "pct_nonzero1": one.nonzero / max(one.n_read, 1),
        "pct_nonzero2": two.nonzero / max(two.n_read, 1),
    }, index=pd.Index(np.asarray(genes).astype(str), name="gene"))
    order = ranking(proba, table["lfc_mean"].to_numpy())
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


def differential_tables(module: VAE, counts, codes: np.ndarray | None, device: torch.device,
                        groups: list[str], asked: list[tuple[str, str | None]],
                        members: dict[str, np.ndarray], genes: np.ndarray,
                        request: DERequest, *, batch_codes: tuple[int, ...] | None,
                        progress_bar: bool = True) -> dict[str, pd.DataFrame]:
    """One table (:func:`compare`) per comparison in ``asked``, keyed by its first group.
    Each group's cells are read once; its draws depend only on the seed and the group, so a
    group against the rest gives the same table asked alone or with every group."""
    picked = {}
    for g, cells in members.items():
        rng = np.random.default_rng(group_seed(request.seed, 0, groups.index(g)))
        picked[g] = pick_cells(cells, request.max_cells, rng)
    total = sum(len(c) for c in picked.values())
    draws = {}
    with tqdm(total=total, desc="differential expression", unit="cell",
              disable=not progress_bar or total < 20_000) as bar:
        for g, cells in picked.items():
            data = count_source(counts, codes, device, cells=cells)
            draws[g] = group_draws(module, data, len(members[g]), request.n_samples,
                                   group_seed(request.seed, 1, groups.index(g)), batch_codes)
            bar.update(len(cells))
    tables = {}
    for g1, g2 in asked:
        if g2 is None:
            rest = [d for g, d in draws.items() if g != g1]
            other = pooled(rest, group_seed(request.seed, 2, groups.index(g1)))
        else:
            other = draws[g2]
        tables[g1] = compare(draws[g1], other, genes, mode=request.mode,
                             delta=request.delta, fdr=request.fdr)
    return tables
