"""``ov.tl.differential_expression``: every group against the rest (or a reference group)
from a fitted model, written where scanpy's ``rank_genes_groups`` writes, so that
``sc.get.rank_genes_groups_df`` and ``sc.pl.rank_genes_groups_*`` read it."""

from __future__ import annotations

from pathlib import Path

from anndata import AnnData

from omicvae_sc.model import OmicVAE


def differential_expression(
    adata: AnnData, *, groupby: str, group1: str | None = None, group2: str | None = None,
    model: OmicVAE | str | Path, mode: str = "change", delta: float = 0.25, fdr: float = 0.05,
    batch_correction: bool = True, n_samples: int = 500, max_cells: int | None = 2000,
    seed: int = 0, key_added: str = "omicvae_de", progress_bar: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Differentially expressed genes of each group, from a fitted model, in scanpy's layout.

    The test is :meth:`omicvae_sc.OmicVAE.differential_expression` (posterior draws of each
    group's mean expression, the probability that ``|LFC| > delta``, a posterior
    expected FDR rule); see it for every parameter not described here.

    Parameters
    ----------
    adata
        The cells, with the model's genes and covariates and raw counts where the model read
        them.
    groupby
        ``adata.obs`` column with the groups; cells without a value belong to none.
    group1
        Test only this group; ``None`` (default): every group, as ``sc.tl.rank_genes_groups``.
    group2
        The reference group; ``None`` (default): the rest of the cells.
    model
        A trained :class:`~omicvae_sc.OmicVAE`, or the folder one was saved in (e.g. by
        ``ov.tl.omicvae(..., save_model=...)``).
    mode
        ``"change"`` (the probability that ``|LFC| > delta``) or ``"vanilla"`` (of its sign).
    delta
        Smallest absolute log2 fold change that counts as a change.
    fdr
        Target posterior expected false discovery rate of the calls.
    batch_correction
        Compare the groups at one batch mixture (with a model trained with ``batch_key``).
    n_samples
        Posterior draws of each group's mean expression.
    max_cells
        Cells read per group at most (``None``: all).
    seed
        Seeds the draws; the same seed gives the same result.
    progress_bar
        Show a bar over the cells read (from 20,000 on).
    key_added
        ``adata.uns`` key of the results.
    copy
        Work on and return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``adata.uns[key_added]``, in
    ``rank_genes_groups``' layout: ``names``, ``scores`` (the probability of a change, signed
    by the fold change; up-regulated genes first), ``logfoldchanges`` (posterior mean log2
    fold change), ``pvals`` (posterior probability of no change; not a p-value), ``pvals_adj``
    (q-value: the posterior expected FDR of the calls down to the gene), ``pts`` and
    ``pts_rest``, and the model's ``proba_de``, ``lfc_low``, ``lfc_high`` (95% credible
    interval), ``mean1`` and ``mean2`` (mean expression per 10,000 counts) and ``params``.
    ``sc.get.rank_genes_groups_df(adata, group, key=key_added, pval_cutoff=fdr)`` lists the
    calls.
    """
    if not isinstance(model, OmicVAE | str | Path):
        msg = (f"model must be a trained OmicVAE or the folder it was saved in, not "
               f"{type(model).__name__}.")
        raise TypeError(msg)
    target = adata.copy() if copy else adata
    if not isinstance(model, OmicVAE):
        model = OmicVAE.load(Path(model), target)
    model.differential_expression(
        groupby, group1, group2, adata=target, mode=mode, delta=delta, fdr=fdr,
        batch_correction=batch_correction, n_samples=n_samples, max_cells=max_cells,
        seed=seed, key_added=key_added, progress_bar=progress_bar)
    return target if copy else None
