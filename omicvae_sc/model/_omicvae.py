"""``OmicVAE``: the user-facing model, where data/, module/ and train/ meet."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from omicvae_sc.data import (
    SETUP_KEY,
    AnnDataSetup,
    CountTensors,
    Results,
    build_setup,
    check_anndata_object,
    check_counts,
    covariate_codes,
    get_counts,
    read_setup,
    write_results,
)
from omicvae_sc.data._writeback import check_key_added, write_keys
from omicvae_sc.model import _diagnostics, _generate, _io, _scores
from omicvae_sc.model._checks import (
    batch_code_of,
    check_count,
    check_hyperparameters,
    check_same_genes,
    gene_columns,
    validation_split,
)
from omicvae_sc.model._refine import RefinedLatent, check_refine_args, refine_cells
from omicvae_sc.module import VAE, CellEvaluation
from omicvae_sc.train import (
    CheckpointPlan,
    History,
    TrainConfig,
    TrainingDiverged,
    default_max_epochs,
    fit,
    read_checkpoint,
)

CHUNK_ELEMENTS = 2**19
"""Outputs (latents, expression, log p(x)) work on chunks of at most about this many numbers
(cells x genes x samples): 2 MB of float32 per tensor stays in cache. On the project's 2-core
CPU that made log p(x) with K=100 about 2.5x faster than chunks of 2**25 (a scratch timing on
pbmc3k, see benchmarks/README.md)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore the caller's RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class OmicVAE:
    """A variational autoencoder for single-cell counts with an NB, ZINB or Poisson likelihood.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent, n_hidden, n_layers
        Latent width, hidden width, number of hidden layers (defaults as in scvi-tools).
    dropout_rate
        Dropout in the encoder.
    likelihood
        ``"zinb"`` (default), ``"nb"`` or ``"poisson"``. See the README for the measurements
        behind the default.
    dispersion
        ``"gene"`` or ``"gene-batch"``.
    encode_covariates
        Also give the covariates to the encoder.
    seed
        Seeds the weight initialisation, and training unless ``train`` gets its own seed.
    device
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
    """

    def __init__(
        self, adata: AnnData, *, n_latent: int = 10, n_hidden: int = 128, n_layers: int = 1,
        dropout_rate: float = 0.1, likelihood: str = "zinb", dispersion: str = "gene",
        encode_covariates: bool = False, seed: int = 0, device: str | torch.device = "auto",
    ):
        hparams = dict(n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers,
                       dropout_rate=dropout_rate, likelihood=likelihood, dispersion=dispersion,
                       encode_covariates=encode_covariates, seed=seed)
        check_anndata_object(adata)
        self._build(adata, read_setup(adata), hparams, device)

    @classmethod
    def _from_setup(cls, adata: AnnData, setup: AnnDataSetup, device="auto", **hparams) -> OmicVAE:
        """Build without reading ``adata.uns`` (used by ``tl.omicvae`` and ``load``)."""
        obj = cls.__new__(cls)
        defaults = dict(n_latent=10, n_hidden=128, n_layers=1, dropout_rate=0.1,
                        likelihood="zinb", dispersion="gene", encode_covariates=False, seed=0)
        obj._build(adata, setup, defaults | hparams, device)
        return obj

    def _build(self, adata: AnnData, setup: AnnDataSetup, hparams: dict, device) -> None:
        check_hyperparameters(hparams, setup)
        self.adata = adata
        self.setup = setup
        self.hparams = hparams
        self.var_names = np.asarray(adata.var_names, dtype=str)
        self.device = resolve_device(device)
        with seeded(hparams["seed"], self.device):
            module_args = {k: v for k, v in hparams.items() if k != "seed"}
            self.module = VAE(len(self.var_names), n_categories=setup.n_categories,
                              has_batch=setup.batch_key is not None, **module_args)
        self.module.to(self.device).eval()
        self.history = History()
        self.is_trained = False
        self.diagnostics: _diagnostics.LatentDiagnostics | None = None

    def __repr__(self) -> str:
        h = self.hparams
        return (f"OmicVAE({len(self.var_names)} genes, n_latent={h['n_latent']}, "
                f"likelihood={h['likelihood']!r}, covariates={list(self.setup.covariate_keys)}, "
                f"trained={self.is_trained}, device={self.device})")

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def setup_anndata(
        adata: AnnData, *, layer: str | None = None, batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None, allow_non_integer: bool = False,
    ) -> None:
        """Validate ``adata`` and record which counts and covariates to model.

        Writes one small plain dict, ``adata.uns['omicvae_setup']``; on bad input it raises and
        leaves ``adata`` untouched.

        Parameters
        ----------
        adata
            Cells x genes, raw integer counts in ``adata.X`` or ``adata.layers[layer]``.
        layer
            Layer with the raw counts (``None``: ``adata.X``).
        batch_key
            ``adata.obs`` column with the batch; the decoder sees it, so batch effects are
            explained by the covariate rather than the latent.
        categorical_covariate_keys
            Further categorical ``adata.obs`` columns given to the decoder.
        allow_non_integer
            Accept non-integer values (e.g. ambient-corrected counts) with a warning instead of
            an error; the NB/ZINB likelihood is then an approximation.
        """
        setup = build_setup(adata, layer=layer, batch_key=batch_key,
                            categorical_covariate_keys=categorical_covariate_keys,
                            allow_non_integer=allow_non_integer)
        adata.uns[SETUP_KEY] = setup.to_dict()

    def _host_data(
        self, adata: AnnData | None, *, writing: bool = False
    ) -> tuple[np.ndarray | sp.spmatrix, np.ndarray | None]:
        """Validated counts and covariate codes of ``adata`` (default: the training AnnData).

        A view is read (getters) but not written into (``writing``).
        """
        adata = self.adata if adata is None else adata
        check_anndata_object(adata, allow_view=not writing)
        check_same_genes(self.var_names, adata.var_names)
        counts = get_counts(adata, self.setup.layer)
        check_counts(adata, counts, self.setup.counts_where,
                     allow_non_integer=self.setup.allow_non_integer)
        return counts, covariate_codes(adata, self.setup)

    def _tensors(self, adata: AnnData | None, *, writing: bool = False) -> CountTensors:
        return CountTensors(*self._host_data(adata, writing=writing), self.device)

    # ------------------------------------------------------------------ training
    def train(
        self, max_epochs: int | None = None, *, batch_size: int = 128, lr: float = 1e-3,
        beta: float = 1.0, warmup_fraction: float = 0.25, validation_fraction: float = 0.1,
        early_stopping: bool | None = None, patience: int = 25, seed: int | None = None,
        progress_bar: bool = True, checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10, resume: bool = False,
    ) -> History:
        """Fit by maximizing the ELBO with Adam; returns (and keeps) the per-epoch history.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; ``None`` scales with the data (400 up to 20k cells,
            falling as 1/n above, at least 20).
        batch_size
            Cells per minibatch.
        lr
            Adam learning rate.
        beta
            Weight of the KL term (rate) once warmed up; 1 gives the ELBO.
        warmup_fraction
            Fraction of all optimizer steps over which the KL weight rises linearly to ``beta``.
        validation_fraction
            Share of cells held out to record validation ELBO (and for early stopping); 0 for none.
        early_stopping
            Stop when the validation ELBO has not improved for ``patience`` epochs after warm-up,
            and keep the best weights. ``None`` (default): on whenever there is a validation
            split. Small data overfits before the default epoch count (on the embedded 700
            PBMCs the best validation ELBO comes at epoch 207 of 400).
        patience
            Epochs without improvement of the validation ELBO before early stopping.
        seed
            Seeds shuffling, dropout and sampling (default: the model's seed). Same seed, same
            result on the CPU.
        progress_bar
            Show a tqdm bar with the ELBO.
        checkpoint_dir
            Folder for a training checkpoint (weights, optimizer, random state, history),
            replaced every ``checkpoint_every`` epochs.
        checkpoint_every
            Epochs between checkpoints.
        resume
            Continue the run checkpointed in ``checkpoint_dir`` (same settings, data and seed;
            on the CPU the result is bitwise that of an uninterrupted run). Build the model as
            before (same ``seed``) and call ``train`` with the same arguments.

        Returns
        -------
        The whole history of this model (earlier ``train`` calls included), also kept as
        ``model.history``. Ctrl-C ends training early: the model keeps what it learned (the
        best validation weights with early stopping), ``history.interrupted`` is set, and a
        warning says so.

        Raises
        ------
        TrainingDiverged
            (a ``FloatingPointError``) when the loss becomes NaN or infinite; the message names
            the epoch and step, and the model keeps its last good weights and history.
        """
        if batch_size < 2:
            msg = (f"batch_size must be at least 2 (BatchNorm cannot normalize one cell), got "
                   f"{batch_size}.")
            raise ValueError(msg)
        check_count("checkpoint_every", checkpoint_every)
        if resume and checkpoint_dir is None:
            msg = "resume=True needs checkpoint_dir=, the folder holding the checkpoint."
            raise ValueError(msg)
        seed = self.hparams["seed"] if seed is None else seed
        n = self.adata.n_obs
        max_epochs = default_max_epochs(n) if max_epochs is None else max_epochs
        train_idx, val_idx = validation_split(n, validation_fraction, bool(early_stopping), seed)
        early_stopping = len(val_idx) > 0 if early_stopping is None else early_stopping
        config = TrainConfig(max_epochs=max_epochs, batch_size=batch_size, lr=lr, beta=beta,
                             warmup_fraction=warmup_fraction, early_stopping=early_stopping,
                             patience=patience, progress_bar=progress_bar)
        counts, codes = self._host_data(None)
        train_data, val_data = (
            CountTensors(counts, codes, self.device, cells=idx) if len(idx) else None
            for idx in (train_idx, val_idx)
        )
        plan = resume_from = None
        if checkpoint_dir is not None:
            run = {k: v for k, v in vars(config).items() if k != "progress_bar"}
            run |= {"seed": seed, "n_train": len(train_idx), "n_validation": len(val_idx),
                    "n_genes": len(self.var_names), "hparams": dict(self.hparams)}
            plan = CheckpointPlan(Path(checkpoint_dir), checkpoint_every, run)
            resume_from = read_checkpoint(plan.directory, run) if resume else None
        generator = torch.Generator().manual_seed(seed)
        try:
            with seeded(seed, self.device):
                history = fit(self.module, train_data, val_data, config, generator=generator,
                              first_epoch=len(self.history), checkpoint=plan,
                              resume_from=resume_from)
        except TrainingDiverged as err:
            self.history = self.history.concat(err.history)
            self.is_trained = len(err.history) > 0
            raise
        self.history = self.history.concat(history)
        self.is_trained = True
        self._diagnose()
        if history.interrupted:
            msg = (f"Training interrupted (Ctrl-C) after {len(history)} of {max_epochs} epochs; "
                   "the model keeps what it learned so far and model.history the completed "
                   "epochs.")
            warnings.warn(msg, UserWarning, stacklevel=2)
        return self.history

    # ------------------------------------------------------------------ outputs
    def _chunks(self, data: CountTensors, n_samples: int = 1, batch_size: int | None = None):
        if batch_size is None:
            batch_size = max(2, CHUNK_ELEMENTS // max(1, n_samples * data.n_genes))
        yield from data.batches(batch_size, shuffle=False)

    @torch.inference_mode()
    def get_latent_representation(
        self, adata: AnnData | None = None, *, give_mean: bool = True, seed: int = 0,
    ) -> np.ndarray:
        """Latent coordinates of each cell.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        give_mean
            The posterior mean (default), or one draw from q(z|x).
        seed
            Seeds the draw when ``give_mean=False``.

        Returns
        -------
        ``(n_cells, n_latent)`` float32 array.
        """
        return self._latent(self._tensors(adata), give_mean=give_mean, seed=seed)

    @torch.inference_mode()
    def _latent(self, data: CountTensors, *, give_mean: bool = True, seed: int = 0) -> np.ndarray:
        out = []
        with seeded(seed, self.device):
            for x, codes in self._chunks(data):
                mean, var = self.module.inference(x, codes)
                out.append(mean if give_mean else mean + var.sqrt() * torch.randn_like(mean))
        return torch.cat(out).cpu().numpy()

    def get_latent_diagnostics(
        self, adata: AnnData | None = None, *, n_cells: int = _diagnostics.MI_CELLS,
        seed: int = 0,
    ) -> _diagnostics.LatentDiagnostics:
        """Posterior-collapse diagnostics: per-dimension KL, active units and I(x; z).

        A dimension d is active when the variance across cells of its posterior mean E_q[z_d]
        exceeds 0.01. The mutual information between cells and latents under the aggregate
        posterior q(z) is estimated by Monte Carlo, I = E_x[KL(q(z|x) || p(z))] - KL(q(z) || p(z)),
        with q(z) the mixture of the posteriors of ``n_cells`` random cells (one draw per cell,
        log q(z) by a chunked logsumexp over those cells; at most log ``n_cells``).

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        n_cells
            Cells in the estimate of the mutual information (all cells count for the rest).
        seed
            Seeds the choice of cells and the draws.

        Returns
        -------
        A frozen ``LatentDiagnostics`` (``kl_per_dim``, ``posterior_mean_variance``, ``active``,
        ``n_active``, ``mutual_information``; ``to_dict()`` for h5ad). After :meth:`train` the
        diagnostics of the training cells are also kept as ``model.diagnostics``.
        """
        check_count("n_cells", n_cells, minimum=2)
        return _diagnostics.latent_diagnostics(self.module, self._tensors(adata),
                                               n_cells=n_cells, seed=seed)

    def _diagnose(self) -> None:
        """Keep the training cells' diagnostics and warn when most dimensions collapsed."""
        self.diagnostics = self.get_latent_diagnostics()
        msg = _diagnostics.collapse_message(self.diagnostics)
        if msg is not None:
            warnings.warn(msg, UserWarning, stacklevel=3)

    @torch.inference_mode()
    def get_normalized_expression(
        self, adata: AnnData | None = None, *, library_size: float | str = 1e4,
        gene_list: list[str] | None = None, transform_batch: str | None = None,
    ) -> np.ndarray:
        """Denoised expression ``(n_cells, n_genes_selected)`` from the posterior mean.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        library_size
            Scale each cell to this total (default 1e4, as ``sc.pp.normalize_total``), or
            ``"observed"`` for the cell's own library size (denoised counts).
        gene_list
            Genes to return (default all); only these columns are ever materialized.
        transform_batch
            Decode every cell as if it came from this batch category (counterfactual expression).

        Returns
        -------
        ``(n_cells, len(gene_list))`` float32 array, computed in chunks of cells.
        """
        cols = gene_columns(self.var_names, gene_list)
        batch_code = batch_code_of(self.setup, transform_batch)
        return self._expression(self._tensors(adata), library_size, cols, batch_code)

    @torch.inference_mode()
    def _expression(self, data: CountTensors, library_size: float | str, cols: np.ndarray,
                    batch_code: int | None) -> np.ndarray:
        out = []
        for x, codes in self._chunks(data):
            mean, _ = self.module.inference(x, codes)
            dec_codes = codes
            if batch_code is not None:
                dec_codes = codes.clone()
                dec_codes[:, 0] = batch_code
            frac = self.module.expression_fractions(mean, dec_codes)[:, cols]
            scale = x.sum(-1, keepdim=True) if library_size == "observed" else float(library_size)
            out.append((frac * scale).cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def _evaluate(self, data: CountTensors, n_samples: int, seed: int) -> CellEvaluation:
        parts = []
        with seeded(seed, self.device):
            for x, codes in self._chunks(data, n_samples):
                parts.append(self.module.evaluate(x, codes, n_samples=n_samples))
        return CellEvaluation(*(torch.cat([getattr(p, f) for p in parts]).double().cpu()
                                for f in ("log_likelihood", "distortion", "rate")))

    def get_marginal_ll(
        self, adata: AnnData | None = None, *, n_samples: int = 100, seed: int = 0
    ) -> np.ndarray:
        """Per-cell importance-weighted estimate of the marginal log-likelihood log p(x).

        log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, with the K
        draws of each cell vectorized and cells processed in chunks.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        n_samples
            K, importance samples per cell; the estimate tightens as K grows.
        seed
            Seeds the draws.

        Returns
        -------
        ``(n_cells,)`` float64 array, nats (negative; higher is better).
        """
        return self._evaluate(self._tensors(adata), n_samples, seed).log_likelihood.numpy()

    def get_elbo(
        self, adata: AnnData | None = None, *, n_samples: int = 10, seed: int = 0
    ) -> np.ndarray:
        """Per-cell evidence lower bound, E_q[log p(x|z)] - KL(q(z|x) || p(z)).

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        n_samples
            Draws from q(z|x) averaged for the reconstruction term.
        seed
            Seeds the draws.

        Returns
        -------
        ``(n_cells,)`` float64 array, nats (higher is better; -(rate + distortion)).
        """
        ev = self._evaluate(self._tensors(adata), n_samples, seed)
        return -(ev.distortion + ev.rate).numpy()

    def refine_latent(
        self, adata: AnnData | None = None, *, steps: int = 100, lr: float = 0.05,
        n_samples: int = 8, seed: int = 0, key_added: str | None = None,
    ) -> RefinedLatent:
        """Semi-amortized inference: refine each cell's q(z|x) against its own ELBO.

        Starting from the encoder's posterior mean and log variance, each cell's own Gaussian
        posterior is optimized with Adam (``n_samples`` reparameterized draws per step, KL
        analytic) while every weight of the model stays frozen and BatchNorm runs in eval
        mode. The ELBO gain measures the amortization gap: what the shared encoder leaves on
        the table for each cell. Cells are refined in chunks, independently.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        steps
            Adam steps per cell, at least 1.
        lr
            Adam learning rate in latent units (positive).
        n_samples
            Draws per step for the reconstruction term of the ELBO.
        seed
            Seeds the draws (the scores before and after use the same draws).
        key_added
            Also write the refined posterior mean to ``adata.obsm[key_added]`` (``None``: write
            nothing).

        Returns
        -------
        A frozen ``RefinedLatent``: refined ``mean`` and ``var``, per-cell ``elbo_before`` /
        ``elbo_after``, importance-weighted log p(x) with the encoder's and with the refined
        posterior as proposal (``log_likelihood_before`` / ``_after``, K=100), and ``gain``.
        """
        check_refine_args(steps, lr, n_samples)
        if key_added is not None:
            check_key_added(key_added)
        adata = self.adata if adata is None else adata
        data = self._tensors(adata, writing=key_added is not None)
        refined = refine_cells(self.module, data, steps=steps, lr=lr, n_samples=n_samples,
                               seed=seed)
        if key_added is not None:
            write_keys(adata, obsm={key_added: refined.mean})
        return refined

    def get_anomaly_score(
        self, adata: AnnData | None = None, *, n_draws: int = _scores.ANOMALY_DRAWS,
        n_samples: int = _scores.ANOMALY_SAMPLES, seed: int = 0,
    ) -> np.ndarray:
        """Per-cell anomaly score: how unexpected the cell is for a cell of its depth.

        A raw log p(x) mostly follows sequencing depth: a deep cell has more counts to explain.
        Here each cell's importance-weighted log p(x) is compared with log p(x~) of ``n_draws``
        cells x~ the model generates itself (z ~ N(0, I)) at the same library size and
        covariates: score = (mean log p(x~) - log p(x)) / sd(log p(x~)). Depth moves both sides
        alike, so the score is in standard deviations of what the model expects at that depth;
        it is high for cells the model cannot explain (types absent from training, damaged
        cells, doublets) whether the misfit is in the counts or in an unusual latent state.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        n_draws
            Generated cells per cell, at least 2 (they give the mean and spread).
        n_samples
            Importance samples per log p estimate (vectorized, cells in chunks).
        seed
            Seeds the draws.

        Returns
        -------
        ``(n_cells,)`` float64 array; higher is more anomalous.
        """
        return self._anomaly(self._tensors(adata), n_draws, n_samples, seed)

    def _anomaly(self, data: CountTensors, n_draws: int, n_samples: int, seed: int) -> np.ndarray:
        check_count("n_draws", n_draws, minimum=2)
        check_count("n_samples", n_samples)
        with seeded(seed, self.device):
            scores = _scores.anomaly_scores(self.module, data, n_draws=n_draws,
                                            n_samples=n_samples)
        return scores.double().cpu().numpy()

    def get_doublet_score(
        self, adata: AnnData | None = None, *, expected_rate: float | None = None,
        sim_ratio: float = 2.0, n_neighbors: int | None = None, library_weight: float = 1.0,
        seed: int = 0,
    ) -> np.ndarray:
        """Per-cell doublet probability from doublets simulated out of the cells themselves.

        Random pairs of cells of the same batch are combined into doublets by the model: the
        equal mixture of the two cells' decoded expression at the summed observed library,
        counts drawn from the fitted likelihood. Real and simulated cells pass through the same
        encoder and decoder; in a PCA of the decoded log expression (covariate effects removed)
        with the log library size as one more axis, a cell whose neighbourhood is rich in
        simulated doublets is doublet-like. The share of
        simulated doublets among the ``n_neighbors`` nearest neighbours becomes a posterior
        probability with the prior ``expected_rate``.

        Parameters
        ----------
        adata
            The cells to score, as loaded together (doublets form within one loading);
            default: the AnnData the model was built on.
        expected_rate
            Prior doublet rate; ``None``: 0.8% per 1,000 cells (10x Genomics), at most 25%.
        sim_ratio
            Simulated doublets per real cell.
        n_neighbors
            Neighbours per cell; ``None``: the square root of real plus simulated cells.
        library_weight
            Weight of the depth axis, in units of the mean spread of a principal component.
            Simulated doublets carry the summed library of their two cells, so depth helps where
            doublets are deeper than singlets (droplet data); 0 compares expression only.
        seed
            Seeds the pairing and the simulated counts.

        Returns
        -------
        ``(n_cells,)`` float64 array of probabilities; higher is more doublet-like.
        """
        return self._doublets(self._tensors(adata), expected_rate, seed, sim_ratio=sim_ratio,
                              n_neighbors=n_neighbors, library_weight=library_weight)

    def _doublets(self, data: CountTensors, expected_rate: float | None, seed: int, *,
                  sim_ratio: float = 2.0, n_neighbors: int | None = None,
                  library_weight: float = 1.0) -> np.ndarray:
        _scores.check_rate("expected_rate", expected_rate)
        if not sim_ratio > 0 or (n_neighbors is not None and n_neighbors < 1) \
                or not library_weight >= 0:
            msg = (f"sim_ratio must be positive, n_neighbors a positive integer or None and "
                   f"library_weight non-negative; got sim_ratio={sim_ratio!r}, "
                   f"n_neighbors={n_neighbors!r}, library_weight={library_weight!r}.")
            raise ValueError(msg)
        rate = _scores.default_doublet_rate(data.n_cells) if expected_rate is None \
            else expected_rate
        with seeded(seed, self.device):
            return _scores.doublet_scores(self.module, data, sim_ratio=sim_ratio,
                                          n_neighbors=n_neighbors, expected_rate=rate,
                                          library_weight=library_weight)

    @torch.inference_mode()
    def posterior_predictive_sample(
        self, adata: AnnData | None = None, *, gene_list: list[str] | None = None, seed: int = 0,
    ) -> sp.csr_matrix:
        """One draw of counts from p(x | z) with z ~ q(z|x), at each cell's own library size.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        gene_list
            Genes to return (default all).
        seed
            Seeds the draw; the same seed gives the same counts.

        Returns
        -------
        ``(n_cells, n_genes_selected)`` CSR matrix of counts.
        """
        data = self._tensors(adata)
        cols = torch.as_tensor(gene_columns(self.var_names, gene_list), device=self.device)
        parts = []
        with seeded(seed, self.device):
            for x, codes in self._chunks(data):
                mean, var = self.module.inference(x, codes)
                z = mean + var.sqrt() * torch.randn_like(mean)
                px = self.module.generative(z, x.sum(-1, keepdim=True), codes)
                parts.append(sp.csr_matrix(px.sample()[:, cols].cpu().numpy()))
        return sp.vstack(parts, format="csr")

    @torch.inference_mode()
    def sample(
        self, n_cells: int, *, batch: str | None = None,
        library_size: float | np.ndarray | None = None, seed: int = 0,
    ) -> AnnData:
        """Generate new cells from the prior: z ~ N(0, I), decoded, counts from the likelihood.

        Each generated cell takes the library size and covariates of a training cell drawn at
        random (with replacement, with ``seed``), so batches and depths come in the proportions
        of the training data.

        Parameters
        ----------
        n_cells
            Cells to generate.
        batch
            Generate every cell in this batch (a category of the model's batch key), at the
            library sizes of that batch's training cells; ``None``: batches as in training.
        library_size
            Library size of every cell, or one per cell (``None``: resampled training cells').
        seed
            Seeds the choice of training cells, z and the counts; same seed, same cells.

        Returns
        -------
        A new AnnData ``(n_cells, n_genes)`` with the model's ``var_names``, counts (CSR) in
        ``X`` and ``layers['counts']``, ``obs['library_size']`` (the library the decoder mean
        was scaled to) and a column per covariate of the model (the batch key first).
        """
        check_count("n_cells", n_cells)
        counts, codes = self._host_data(None)
        library = np.asarray(counts.sum(1), dtype=np.float64).ravel()
        plan = _generate.plan_cells(self.setup, library, codes, n_cells=n_cells, batch=batch,
                                    library_size=library_size, seed=seed)
        with seeded(seed, self.device):
            x = _generate.sample_counts(self.module, plan, self.device)
        return _generate.as_anndata(x, plan, self.setup, self.var_names)

    def posterior_predictive_check(
        self, adata: AnnData | None = None, *, n_cells: int | None = None, seed: int = 0,
    ) -> pd.DataFrame:
        """Compare per-gene mean, variance and zero fraction of observed and generated cells.

        For each observed cell one cell is generated from the prior, z ~ N(0, I), at the
        observed cell's library size and covariates, so differences come from the model's
        latent and likelihood rather than from depth or batch.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        n_cells
            Compare a random subset of this many cells (``None``: all).
        seed
            Seeds the subset and the generated cells.

        Returns
        -------
        DataFrame indexed by gene with ``observed_<m>`` and ``generated_<m>`` for ``m`` in
        ``mean``, ``variance``, ``zero_fraction``; ``df.attrs`` holds the mean absolute errors
        over genes ``'zero_fraction_mae'``, ``'log_mean_mae'`` and ``'log_variance_mae'`` (of
        log1p values) and ``'n_cells'``.
        """
        counts, codes = self._host_data(adata)
        cells = None
        if n_cells is not None:
            check_count("n_cells", n_cells)
            if n_cells < counts.shape[0]:
                rng = np.random.default_rng(seed)
                cells = np.sort(rng.choice(counts.shape[0], size=n_cells, replace=False))
        data = CountTensors(counts, codes, self.device, cells=cells)
        with seeded(seed, self.device):
            df = _generate.predictive_moments(self.module, data)
        df.index = pd.Index(self.var_names, name="gene")
        _generate.summarize(df)
        df.attrs["n_cells"] = data.n_cells
        return df

    # ------------------------------------------------------------------ writeback, files
    def write_results(
        self, adata: AnnData | None = None, *, key_added: str = "omicvae", layers: bool = False,
        n_samples: int = 25, anomaly: bool = True, contamination: float | None = None,
        n_mads: float = 3.0, doublets: bool = True, doublet_rate: float | None = None,
        seed: int = 0,
    ) -> None:
        """Write latents, per-cell scores, flags and parameters into ``adata`` (README table).

        Adds ``obsm['X_<key>']``, ``obs['<key>_log_likelihood' | '_rate' | '_distortion']``,
        with ``anomaly`` ``obs['<key>_anomaly_score' | '_is_anomaly']``, with ``doublets``
        ``obs['<key>_doublet_score' | '_is_doublet']``, ``uns['<key>']`` (the posterior-collapse
        diagnostics in ``uns['<key>']['latent_diagnostics']``) and, with
        ``layers=True``, ``layers['<key>_denoised']``.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was built on).
        key_added
            Prefix of every key written.
        layers
            Also write the denoised expression (expected counts at each cell's own depth).
        n_samples
            Posterior draws per cell for the log-likelihood, rate and distortion (the anomaly
            score uses the defaults of :meth:`get_anomaly_score`).
        anomaly
            Score (:meth:`get_anomaly_score`) and flag anomalous cells.
        contamination
            Anomaly rule: ``None`` flags scores above median + ``n_mads`` x 1.4826 MAD (a robust
            cutoff); a fraction flags that share of cells with the highest scores.
        n_mads
            Width of the robust cutoff, in robust standard deviations.
        doublets
            Score (:meth:`get_doublet_score`) and flag doublets.
        doublet_rate
            Doublet rule: flag this share of cells with the highest doublet scores (also the
            prior of the score); ``None``: 0.8% per 1,000 cells loaded, at most 25%.
        seed
            Seeds the draws.
        """
        _scores.check_rate("contamination", contamination)
        _scores.check_rate("doublet_rate", doublet_rate)
        _scores.check_n_mads(n_mads)
        check_count("n_samples", n_samples)
        adata = self.adata if adata is None else adata
        data = self._tensors(adata, writing=True)  # validated, on the device once for all
        ev = self._evaluate(data, n_samples, seed)
        obs = {"log_likelihood": ev.log_likelihood.numpy(), "rate": ev.rate.numpy(),
               "distortion": ev.distortion.numpy()}
        uns = {"params": {**self.hparams, "n_samples": n_samples, "device": str(self.device)},
               "setup": self.setup.to_dict(), "history": self.history.to_dict()}
        if anomaly:
            score = self._anomaly(data, _scores.ANOMALY_DRAWS, _scores.ANOMALY_SAMPLES, seed)
            flags = (_scores.flag_robust(score, n_mads) if contamination is None
                     else _scores.flag_top_fraction(score, contamination))
            obs |= {"anomaly_score": score, "is_anomaly": flags.flagged}
            uns["anomaly"] = flags.to_dict()
        if doublets:
            rate = doublet_rate or _scores.default_doublet_rate(data.n_cells)
            score = self._doublets(data, rate, seed)
            flags = _scores.flag_top_fraction(score, rate)
            obs |= {"doublet_score": score, "is_doublet": flags.flagged}
            uns["doublet"] = flags.to_dict()
        uns["latent_diagnostics"] = _diagnostics.latent_diagnostics(
            self.module, data, seed=seed).to_dict()
        results = Results(
            latent=self._latent(data), obs=obs, uns=uns,
            denoised=self._expression(data, "observed", gene_columns(self.var_names, None), None)
            if layers else None,
        )
        write_results(adata, results, key_added=key_added)

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights (tensors only) and JSON metadata into the folder ``path``, atomically.

        A crash or kill mid-save leaves the previous model whole.

        Parameters
        ----------
        path
            Folder to create.
        overwrite
            Replace an existing folder (the old model stays intact until the new one is complete).
        """
        _io.save_model(self, Path(path), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, adata: AnnData, *, device: str = "auto") -> OmicVAE:
        """Load a model saved with :meth:`save`. Tensors only: nothing is unpickled.

        Parameters
        ----------
        path
            Folder written by :meth:`save`; its format, version and checksum are checked.
        adata
            AnnData with the model's genes, in the same order, and its covariate columns.
        device
            ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...

        Returns
        -------
        The model, with its training history.
        """
        meta, state = _io.read_model(Path(path))
        model = cls._from_setup(adata, AnnDataSetup.from_dict(meta["setup"]), device=device,
                                **meta["hparams"])
        check_same_genes(np.asarray(meta["var_names"], dtype=str), adata.var_names)
        model.module.load_state_dict(state)
        model.module.eval()
        model.history = History.from_dict(meta["history"])
        model.is_trained = bool(meta["is_trained"])
        return model
