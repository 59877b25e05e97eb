"""``tl.omicvae``: fit and write back in one call, scanpy style."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from anndata import AnnData

from omicvae_sc import data as _data
from omicvae_sc.data import build_setup, check_key_added
from omicvae_sc.data._disk import holds_disk_arrays
from omicvae_sc.data._genes import check_n_top_genes, genes_to_model
from omicvae_sc.model import (
    LOG_LIKELIHOOD_SAMPLES,
    OmicVAE,
    ResultOptions,
    check_denoised_target,
    stage,
)


def omicvae(
    adata: AnnData, *, layer: str | None = None, batch_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None, n_latent: int = 10,
    likelihood: str = "zinb", max_epochs: int | None = None, seed: int = 0,
    device: str = "auto", key_added: str = "omicvae", layers: bool = False,
    anomaly: bool = True, contamination: float | None = None, doublets: bool = True,
    doublet_rate: float | None = None, n_top_genes: int | None = None, progress_bar: bool = True,
    model_kwargs: dict | None = None, train_kwargs: dict | None = None,
    allow_non_integer: bool = False, save_model: str | Path | None = None, copy: bool = False,
    denoised_path: str | Path | None = None, n_samples: int = LOG_LIKELIHOOD_SAMPLES,
) -> AnnData | None:
    """Fit an :class:`~omicvae_sc.OmicVAE` to raw counts and write what it learns into ``adata``.

    Parameters
    ----------
    adata
        Cells x genes with raw integer counts in ``adata.X`` or ``adata.layers[layer]``. A view
        (``adata[:, adata.var.highly_variable]``) is accepted: writing the results makes it
        an actual AnnData, as anndata does it, and leaves its parent unchanged.
    layer
        Layer with the raw counts (``None``: ``adata.X``).
    batch_key
        ``adata.obs`` column with the batch, explained by the decoder rather than the latent.
        Early stopping keeps the weights of the best held-out ELBO, which is not the point of
        best batch mixing: to integrate batches, ``train_kwargs={"early_stopping": False}``
        trains for every epoch as scVI does (scIB total 0.864 against 0.816 on CellBench;
        benchmarks/README.md, "Integration").
    categorical_covariate_keys
        Further categorical ``adata.obs`` columns given to the decoder.
    n_latent
        Latent dimensions.
    likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    max_epochs
        Training epochs (``None``: scales with the number of cells).
    seed
        Seeds initialisation, training and the scores; same seed, same result on the CPU.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    key_added
        Prefix of every key written.
    layers
        Also write the denoised expression (expected counts at each cell's depth).
    n_samples
        Importance samples per cell for the written log-likelihood, rate and distortion
        (default 25). Their cost grows with it: on millions of cells, fewer samples give a
        looser estimate sooner.
    anomaly
        Score and flag anomalous cells (:meth:`~omicvae_sc.OmicVAE.get_anomaly_score`).
    contamination
        Anomaly rule: ``None`` flags scores above median + 3 x 1.4826 MAD (robust cutoff); a
        fraction flags that share of cells with the highest scores.
    doublets
        Score and flag doublets (:meth:`~omicvae_sc.OmicVAE.get_doublet_score`).
    doublet_rate
        Share of each batch's cells flagged as doublets (highest scores first); ``None``: 0.8%
        per 1,000 cells of the batch (each batch taken as one loading), at most 25%.
    n_top_genes
        Model only this many genes: the most variable ones of the raw counts, by scanpy's
        ``highly_variable_genes(flavor="seurat_v3")`` (per batch and combined when
        ``batch_key`` is given). Results are still written into the AnnData of all genes; the
        denoised layer then holds NaN for the genes not modelled, and
        ``var['<key_added>_genes']`` marks the genes that were. ``None`` (default): every gene.
        A raw matrix of 30k genes fits several times faster with 2,000. Counts on disk are
        ranked in two passes over blocks of rows (the same genes), and only the chosen
        columns are read for training.
    progress_bar
        Show the training progress bar and, from 20,000 cells on, a bar over the cells of each
        output stage.
    model_kwargs, train_kwargs
        Further arguments of :class:`~omicvae_sc.OmicVAE` and
        :meth:`~omicvae_sc.OmicVAE.train`.
    allow_non_integer
        Accept non-integer values with a warning instead of an error (the NB/ZINB likelihood
        is then an approximation).
    save_model
        Also save the trained model into this new folder (:meth:`~omicvae_sc.OmicVAE.save`);
        an existing path is an error raised before training.
    copy
        Work on and return a copy instead of writing into ``adata``.
    denoised_path
        With ``layers=True``, write the denoised layer chunk by chunk into this new ``.zarr``
        store and place it in ``layers`` as an array on disk; needed when the
        counts are on disk (an AnnData from ``ov.read_lazy`` or ``backed="r"``).

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Keys written (with ``key_added="omicvae"``):

    ``adata.obsm['X_omicvae']``
        Posterior mean of the latent state, ``(n_cells, n_latent)``.
    ``adata.obs['omicvae_log_likelihood']``
        Importance-weighted estimate of log p(x) per cell (nats).
    ``adata.obs['omicvae_rate']``
        KL(q(z|x) || p(z)) per cell (nats).
    ``adata.obs['omicvae_distortion']``
        Expected -log p(x|z) under q(z|x) per cell (nats).
    ``adata.obs['omicvae_anomaly_score']``
        Predictive z-score: misfit of the cell's counts against counts the model generates for
        it, in standard deviations (only with ``anomaly=True``, as the next key).
    ``adata.obs['omicvae_is_anomaly']``
        Boolean flag from the anomaly rule.
    ``adata.obs['omicvae_doublet_score']``
        Posterior doublet probability (only with ``doublets=True``, as the next key).
    ``adata.obs['omicvae_is_doublet']``
        Boolean flag: the ``doublet_rate`` share of cells with the highest doublet scores.
    ``adata.layers['omicvae_denoised']``
        Only with ``layers=True``: expected counts at each cell's depth (NaN for genes not
        modelled, with ``n_top_genes``).
    ``adata.var['omicvae_genes']``
        Only with ``n_top_genes``: True for the genes the model was fitted on.
    ``adata.uns['omicvae']``
        ``params``, ``setup``, ``history`` (per-epoch ELBO, rate, distortion, KL weight, time),
        ``latent_diagnostics`` (per-dimension KL, active units, I(x; z); see
        ``ov.pl.latent_diagnostics``), and ``anomaly`` / ``doublet``: the flag rule, its
        value, the threshold and the number of cells flagged.
    """
    check_key_added(key_added)
    options = ResultOptions(layers=layers, n_samples=n_samples, anomaly=anomaly,
                            contamination=contamination,
                            doublets=doublets, doublet_rate=doublet_rate, seed=seed,
                            denoised_path=denoised_path, progress_bar=progress_bar)
    options.check()  # before training, as the rest of the input
    check_n_top_genes(n_top_genes)
    check_denoised_target(options, adata)
    if holds_disk_arrays(adata):
        if copy:
            msg = ("copy=True cannot copy an AnnData whose counts are on disk (backed, or from "
                   "ov.read_lazy). Leave copy=False: the results go into the object in memory "
                   "and the file is not changed; or load it first with adata.to_memory().")
            raise ValueError(msg)
    if save_model is not None and Path(save_model).exists():
        msg = f"save_model folder {str(save_model)!r} already exists; choose a new one."
        raise FileExistsError(msg)
    given = {"model_kwargs": (model_kwargs, {"n_latent", "likelihood", "seed", "device"}),
             "train_kwargs": (train_kwargs, {"max_epochs", "seed", "progress_bar"})}
    for name, (kwargs, own) in given.items():
        clash = sorted(own & set(kwargs or {}))
        if clash:
            msg = (f"{name} repeats {clash}, which tl.omicvae takes directly; pass them as "
                   "arguments instead.")
            raise ValueError(msg)
    model, genes = prepare(adata, layer=layer, batch_key=batch_key,
                           categorical_covariate_keys=categorical_covariate_keys,
                           n_top_genes=n_top_genes, allow_non_integer=allow_non_integer,
                           device=device, n_latent=n_latent, likelihood=likelihood, seed=seed,
                           **(model_kwargs or {}))
    with stage("training"):
        model.train(max_epochs, seed=seed, progress_bar=progress_bar, **(train_kwargs or {}))
    target = adata.copy() if copy else adata
    write_back(model, target, genes, options, key_added=key_added)
    if save_model is not None:
        model.save(save_model)
    return target if copy else None


def prepare(adata: AnnData, *, layer: str | None, batch_key: str | None,
            categorical_covariate_keys: list[str] | None, n_top_genes: int | None,
            allow_non_integer: bool, device: str, **hparams) -> tuple[OmicVAE, np.ndarray | None]:
    """Validate ``adata``, choose the genes (a mask, or ``None`` for all) and build an
    untrained model on them; nothing is written to ``adata``."""
    genes = genes_to_model(adata, layer=layer, batch_key=batch_key, n_top_genes=n_top_genes,
                           allow_non_integer=allow_non_integer)
    covariates = {"layer": layer, "batch_key": batch_key,
                  "categorical_covariate_keys": categorical_covariate_keys,
                  "allow_non_integer": allow_non_integer}
    if genes is not None and holds_disk_arrays(adata):
        # on disk the model reads the chosen columns of every block itself, and maps its
        # results back onto all genes: no view, no gene mask for write_back
        setup = build_setup(adata, genes=genes, **covariates)
        return OmicVAE.from_setup(adata, setup, device=device, **hparams), None
    fitted = adata if genes is None else adata[:, genes]  # a view: read, never written
    setup = build_setup(fitted, **covariates)
    return OmicVAE.from_setup(fitted, setup, device=device, **hparams), genes


def write_back(model: OmicVAE, adata: AnnData, genes: np.ndarray | None,
               options: ResultOptions, *, key_added: str) -> None:
    """Compute the trained model's results on ``adata``'s cells (on the model's genes) and
    write them into ``adata``, which may hold more genes than the model (``genes``)."""
    fitted = adata if genes is None else adata[:, genes]
    results = model.compute_results(fitted, options)
    if genes is not None:
        results = results.on_genes(genes)
    with stage("write-back"):
        # rank 0 alone writes into a file opened with backed="r+" (torchrun)
        _data.write_results(adata, results, key_added=key_added, to_file=model._leads)
