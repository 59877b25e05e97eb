"""``OmicVAE``: the user-facing model, where data/, module/ and train/ meet."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from omicvae_sc.data import (
    SETUP_KEY,
    AnnDataSetup,
    CountTensors,
    build_setup,
    check_anndata_object,
    check_counts,
    covariate_codes,
    get_counts,
    read_setup,
)
from omicvae_sc.model import (
    _diagnostics,
    _introspection,
    _io,
    _outputs,
    _results,
)
from omicvae_sc.model._checks import (
    check_count,
    check_hyperparameters,
    check_same_genes,
    validation_split,
)
from omicvae_sc.model._runtime import chunk_rows, resolve_device, resolve_precision, seeded
from omicvae_sc.module import VAE
from omicvae_sc.train import (
    CheckpointPlan,
    History,
    TrainConfig,
    TrainingDiverged,
    default_max_epochs,
    fit,
    read_checkpoint,
    steady_heap,
)


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

    def _host_data(self, adata: AnnData | None
                   ) -> tuple[np.ndarray | sp.spmatrix, np.ndarray | None]:
        """Validated counts and covariate codes of ``adata`` (default: the training AnnData);
        a view is read as it is."""
        adata = self.adata if adata is None else adata
        check_anndata_object(adata)
        check_same_genes(self.var_names, adata.var_names)
        counts = get_counts(adata, self.setup.layer)
        check_counts(adata, counts, self.setup.counts_where,
                     allow_non_integer=self.setup.allow_non_integer)
        return counts, covariate_codes(adata, self.setup)

    def _tensors(self, adata: AnnData | None) -> CountTensors:
        return CountTensors(*self._host_data(adata), self.device)

    # ------------------------------------------------------------------ training
    def train(
        self, max_epochs: int | None = None, *, batch_size: int = 128, lr: float = 1e-3,
        beta: float = 1.0, warmup_fraction: float = 0.25, validation_fraction: float = 0.1,
        early_stopping: bool | None = None, patience: int = 25, seed: int | None = None,
        progress_bar: bool = True, checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10, resume: bool = False, precision: str = "auto",
        cuda_graphs: bool = False,
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
            PBMCs the best validation ELBO comes at epoch 182 of 400).
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
        precision
            Number format of the gene-sized matrix products in the training steps (the
            encoder's first layer and the decoder's output heads): ``"float32"``,
            ``"bfloat16"`` (float32 weights, optimizer and likelihood; about twice the matrix
            throughput where the hardware has bfloat16 instructions), or ``"auto"``
            (``"bfloat16"`` on a CUDA GPU that supports it and on a CPU with AVX512-BF16 or
            AMX, else ``"float32"``; the default). Outputs and validation are always computed
            in float32. On pbmc3k (400 epochs, batch 512) bfloat16 ended within 0.6 nats per
            cell of float32 in held-out log p(x), 9.6 nats above scvi-tools.
        cuda_graphs
            On a CUDA GPU, record the training step once as a CUDA graph and replay it: one
            launch per step instead of a few hundred, the same arithmetic. Steps of another
            size than ``batch_size`` (each epoch's last) run as usual. Off by default until
            its speed is measured on a GPU (none was available when it was written).

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
        if cuda_graphs and self.device.type != "cuda":
            msg = (f"cuda_graphs=True needs a CUDA device; this model is on "
                   f"{self.device.type!r}. Leave cuda_graphs off on the CPU.")
            raise ValueError(msg)
        precision = resolve_precision(precision, self.device)
        seed = self.hparams["seed"] if seed is None else seed
        n = self.adata.n_obs
        max_epochs = default_max_epochs(n) if max_epochs is None else max_epochs
        train_idx, val_idx = validation_split(n, validation_fraction, bool(early_stopping), seed)
        early_stopping = len(val_idx) > 0 if early_stopping is None else early_stopping
        config = TrainConfig(max_epochs=max_epochs, batch_size=batch_size, lr=lr, beta=beta,
                             warmup_fraction=warmup_fraction, early_stopping=early_stopping,
                             patience=patience, progress_bar=progress_bar,
                             precision=precision, cuda_graphs=cuda_graphs)
        counts, codes = self._host_data(None)
        train_data, val_data = (
            CountTensors(counts, codes, self.device, cells=idx) if len(idx) else None
            for idx in (train_idx, val_idx)
        )
        plan = resume_from = None
        if checkpoint_dir is not None:
            run = {k: v for k, v in vars(config).items()  # how it runs, not what it computes
                   if k not in ("progress_bar", "cuda_graphs")}
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
        with steady_heap():  # its chunks, like training steps, reuse freed memory
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
            batch_size = chunk_rows(data.device, n_samples * data.n_genes)
        with steady_heap():  # each chunk reuses the memory the last one freed
            yield from data.batches(batch_size, shuffle=False)

    # ------------------------------------------------------------ outputs, scores, self-report
    # One class and no mixins: these methods are written by topic in sibling files and bound
    # here. model/_outputs.py: latents, expression, likelihoods, posterior predictive draws.
    get_latent_representation = _outputs.get_latent_representation
    get_normalized_expression = _outputs.get_normalized_expression
    get_marginal_ll = _outputs.get_marginal_ll
    get_elbo = _outputs.get_elbo
    posterior_predictive_sample = _outputs.posterior_predictive_sample
    _latent = _outputs._latent
    _expression = _outputs._expression
    _evaluate = _outputs._evaluate
    # model/_results.py: anomaly and doublet scores, and the writer of every output
    get_anomaly_score = _results.get_anomaly_score
    get_doublet_score = _results.get_doublet_score
    write_results = _results.write_results
    _compute_results = _results.compute_results
    _anomaly = _results._anomaly
    _doublets = _results._doublets
    # model/_introspection.py: collapse diagnostics, refinement, generation
    get_latent_diagnostics = _introspection.get_latent_diagnostics
    refine_latent = _introspection.refine_latent
    sample = _introspection.sample
    posterior_predictive_check = _introspection.posterior_predictive_check
    _diagnose = _introspection._diagnose

    # ------------------------------------------------------------------ files
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

    @staticmethod
    def saved_var_names(path: str | Path) -> np.ndarray:
        """The genes of a model saved with :meth:`save`, read without loading the model.

        ``adata[:, OmicVAE.saved_var_names(path)].copy()`` gives an AnnData the saved model
        can be loaded onto.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.

        Returns
        -------
        The gene names, in the model's order.
        """
        return np.asarray(_io.read_model(Path(path), weights=False)[0]["var_names"], dtype=str)

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
        check_anndata_object(adata)
        check_same_genes(np.asarray(meta["var_names"], dtype=str), adata.var_names,
                         subset=f"adata = adata[:, ov.OmicVAE.saved_var_names({str(path)!r})]"
                         ".copy()")
        model = cls._from_setup(adata, AnnDataSetup.from_dict(meta["setup"]), device=device,
                                **meta["hparams"])
        model.module.load_state_dict(state)
        model.module.eval()
        model.history = History.from_dict(meta["history"])
        model.is_trained = bool(meta["is_trained"])
        return model
