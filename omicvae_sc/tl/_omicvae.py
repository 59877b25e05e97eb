"""``tl.omicvae``: fit and write back in one call, scanpy style."""

from __future__ import annotations

from anndata import AnnData

from omicvae_sc.data import build_setup, check_key_added
from omicvae_sc.model import OmicVAE
from omicvae_sc.model._scores import check_rate


def omicvae(
    adata: AnnData, *, layer: str | None = None, batch_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None, n_latent: int = 10,
    likelihood: str = "zinb", max_epochs: int | None = None, seed: int = 0,
    device: str = "auto", key_added: str = "omicvae", layers: bool = False,
    anomaly: bool = True, contamination: float | None = None, doublets: bool = True,
    doublet_rate: float | None = None, progress_bar: bool = True, model_kwargs: dict | None = None,
    train_kwargs: dict | None = None, allow_non_integer: bool = False, copy: bool = False,
) -> AnnData | None:
    """Fit an :class:`~omicvae_sc.OmicVAE` to raw counts and write what it learns into ``adata``.

    Parameters
    ----------
    adata
        Cells x genes with raw integer counts in ``adata.X`` or ``adata.layers[layer]``.
    layer
        Layer with the raw counts (``None``: ``adata.X``).
    batch_key
        ``adata.obs`` column with the batch, explained by the decoder rather than the latent.
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
    anomaly
        Score and flag anomalous cells (:meth:`~omicvae_sc.OmicVAE.get_anomaly_score`).
    contamination
        Anomaly rule: ``None`` flags scores above median + 3 x 1.4826 MAD (robust cutoff); a
        fraction flags that share of cells with the highest scores.
    doublets
        Score and flag doublets (:meth:`~omicvae_sc.OmicVAE.get_doublet_score`).
    doublet_rate
        Share of cells flagged as doublets (highest scores first); ``None``: 0.8% per 1,000
        cells, at most 25%.
    progress_bar
        Show the training progress bar.
    model_kwargs, train_kwargs
        Further arguments of :class:`OmicVAE` and :meth:`OmicVAE.train`.
    allow_non_integer
        Accept non-integer values with a warning instead of an error (the NB/ZINB likelihood
        is then an approximation).
    copy
        Work on and return a copy instead of writing into ``adata``.

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
        Only with ``layers=True``.
    ``adata.uns['omicvae']``
        ``params``, ``setup``, ``history`` (per-epoch ELBO, rate, distortion, KL weight, time),
        ``latent_diagnostics`` (per-dimension KL, active units, I(x; z); see
        ``ov.pl.latent_diagnostics``), and ``anomaly`` / ``doublet``: the flag rule, its
        value, the threshold and the number of cells flagged.
    """
    check_key_added(key_added)
    check_rate("contamination", contamination)
    check_rate("doublet_rate", doublet_rate)
    given = {"model_kwargs": (model_kwargs, {"n_latent", "likelihood", "seed", "device"}),
             "train_kwargs": (train_kwargs, {"max_epochs", "seed", "progress_bar"})}
    for name, (kwargs, own) in given.items():
        clash = sorted(own & set(kwargs or {}))
        if clash:
            msg = (f"{name} repeats {clash}, which tl.omicvae takes directly; pass them as "
                   "arguments instead.")
            raise ValueError(msg)
    setup = build_setup(adata, layer=layer, batch_key=batch_key,
                        categorical_covariate_keys=categorical_covariate_keys,
                        allow_non_integer=allow_non_integer)
    model = OmicVAE._from_setup(adata, setup, device=device, n_latent=n_latent,
                                likelihood=likelihood, seed=seed, **(model_kwargs or {}))
    model.train(max_epochs, seed=seed, progress_bar=progress_bar, **(train_kwargs or {}))
    target = adata.copy() if copy else adata
    model.write_results(target, key_added=key_added, layers=layers, anomaly=anomaly,
                        contamination=contamination, doublets=doublets,
                        doublet_rate=doublet_rate, seed=seed)
    return target if copy else None
