"""``OmicVAE``: the user-facing model, a thin façade where data/, module/ and train/ meet.

Each method validates its input (through data/) and calls a plain function over the module
and the data: model/_outputs.py (latents, expression, likelihoods, predictive draws),
model/_results.py (scores, flags and everything written back), model/_diagnostics.py,
model/_refine.py, model/_generate.py, model/_training.py and model/_io.py. None of those
files knows this class.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from omicvae_sc.data import (
    BLOCK_ROWS,
    BUFFER_BLOCKS,
    SETUP_KEY,
    AnnDataSetup,
    Results,
    build_setup,
    check_anndata_object,
    check_key_added,
    check_new_output,
    checked_counts,
    count_source,
    covariate_codes,
    read_setup,
    write_keys,
    write_results,
)
from omicvae_sc.model import _de, _generate, _io, _outputs, _query, _results, _training
from omicvae_sc.model._checks import (
    batch_code_of,
    check_count,
    check_hyperparameters,
    check_same_genes,
    gene_columns,
    model_columns,
    validation_mask,
)
from omicvae_sc.model._diagnostics import (
    MI_CELLS,
    LatentDiagnostics,
    collapse_message,
    latent_diagnostics,
)
from omicvae_sc.model._query import MIN_GENE_OVERLAP, HeldOut, QueryRecord
from omicvae_sc.model._refine import RefinedLatent, check_refine_args, refine_cells
from omicvae_sc.model._results import LOG_LIKELIHOOD_SAMPLES, N_MADS, ResultOptions
from omicvae_sc.model._runtime import resolve_device, seeded
from omicvae_sc.model._scores import ANOMALY_DRAWS, ANOMALY_SAMPLES
from omicvae_sc.model._training import TrainRequest, train_module, training_team
from omicvae_sc.module import VAE, graft
from omicvae_sc.train import History, TrainingDiverged, steady_heap
from omicvae_sc.train._distributed import DEFAULT_TIMEOUT, Team


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
        ``"zinb"`` (default), ``"nb"`` or ``"poisson"``; the measurements behind the default
        are in benchmarks/README.md ("Choosing the default likelihood").
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
    def from_setup(cls, adata: AnnData, setup: AnnDataSetup, *, device: str | torch.device = "auto",
                   var_names: np.ndarray | None = None, **hparams) -> OmicVAE:
        """Build a model from a setup, without reading or writing ``adata.uns``.

        The setup comes from :func:`omicvae_sc.data.build_setup` (as in ``tl.omicvae``) or
        from a saved model (as in :meth:`load`).

        Parameters
        ----------
        adata
            Cells x genes with the counts and covariates the setup names.
        setup
            The counts layer and covariates to model.
        device
            ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
        var_names
            The model's genes, when they are not ``adata``'s (or the setup's ``genes``): a
            query's model has its reference's.
        **hparams
            The hyperparameters of :class:`OmicVAE` (``n_latent``, ``likelihood``, ``seed``,
            ...); the rest take their defaults.

        Returns
        -------
        An untrained model.
        """
        obj = cls.__new__(cls)
        defaults = dict(n_latent=10, n_hidden=128, n_layers=1, dropout_rate=0.1,
                        likelihood="zinb", dispersion="gene", encode_covariates=False, seed=0)
        obj._build(adata, setup, defaults | hparams, device, var_names)
        return obj

    def _build(self, adata: AnnData, setup: AnnDataSetup, hparams: dict, device,
               var_names: np.ndarray | None = None) -> None:
        check_hyperparameters(hparams, setup)
        self.adata = adata
        self.setup = setup
        self.hparams = hparams
        if var_names is None:
            var_names = adata.var_names if setup.genes is None else setup.genes
        self.var_names = np.asarray(var_names, dtype=str)
        self.device = resolve_device(device)
        with seeded(hparams["seed"], self.device):
            module_args = {k: v for k, v in hparams.items() if k != "seed"}
            self.module = VAE(len(self.var_names), n_categories=setup.n_categories,
                              has_batch=setup.batch_key is not None, **module_args)
        self.module.to(self.device).eval()
        self.history = History()
        self.is_trained = False
        self.diagnostics: LatentDiagnostics | None = None
        self._team: Team | None = None  # the processes it was trained with (torchrun)
        self._query: QueryRecord | None = None  # set when it maps a query onto a reference
        self._aligned: tuple[AnnData, AnnData] | None = None  # a query and its aligned copy
        self._held_out: HeldOut | None = None  # the cells its last training did not fit

    @property
    def held_out_cells(self) -> np.ndarray | None:
        """Which cells its last :meth:`train` held out (the validation split) and did not fit:
        a boolean mask over the cells it trained on, also after :meth:`save` and
        :meth:`load`; ``None`` before training or for a model saved before it was kept."""
        return None if self._held_out is None else self._held_out.mask.copy()

    @property
    def missing_genes(self) -> tuple[str, ...]:
        """For a query's model (:meth:`load_query_data`), the reference's genes the query did
        not measure (zero-filled, out of the likelihood); empty otherwise."""
        return () if self._query is None else self._query.missing

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
        genes: str | list[str] | np.ndarray | None = None,
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
        genes
            Model only these genes: the name of a boolean ``adata.var`` column (e.g.
            ``"highly_variable"``), a boolean mask or a list of gene names (``None``: every
            gene). Their columns are taken from the counts a block of cells at a time, so an
            AnnData on disk is never read whole; results are written into the AnnData of all
            genes, ``var['<key>_genes']`` marking the genes modelled.
        """
        setup = build_setup(adata, layer=layer, batch_key=batch_key,
                            categorical_covariate_keys=categorical_covariate_keys,
                            allow_non_integer=allow_non_integer, genes=genes)
        adata.uns[SETUP_KEY] = setup.to_dict()

    def _host_data(self, adata: AnnData | None):
        """Counts and covariate codes of ``adata`` (default: the training AnnData), ready to
        read: a matrix in memory, checked whole, or counts on disk as a ``RowReader`` that
        checks each block as it reads it. A view is read as it is."""
        adata = self.adata if adata is None else adata
        check_anndata_object(adata)
        adata = self._readable(adata)
        counts = checked_counts(adata, self.setup.layer, self.setup.counts_where,
                                allow_non_integer=self.setup.allow_non_integer,
                                columns=self._columns(adata))
        return counts, covariate_codes(adata, self.setup)

    def _readable(self, adata: AnnData) -> AnnData:
        """``adata`` as this model reads it: itself, or for a query's model a new AnnData with
        the reference's genes in order (the unmeasured ones zero-filled) and the covariates
        under the reference's names (kept for the last AnnData asked for)."""
        if self._query is None:
            return adata
        if self._aligned is not None and self._aligned[0] is adata:
            return self._aligned[1]
        out = _query.readable(adata, self.setup, self.var_names, self._query)
        self._aligned = (adata, out)
        return out

    def _columns(self, adata: AnnData) -> np.ndarray | None:
        """Where the model's genes are in ``adata`` (``None``: they are its genes, in order).
        A model set up with ``genes=`` finds its genes by name among more; otherwise the
        genes must be the model's."""
        if self.setup.genes is None:
            check_same_genes(self.var_names, adata.var_names)
            return None
        return model_columns(self.var_names, adata.var_names)

    def _tensors(self, adata: AnnData | None):
        return count_source(*self._host_data(adata), self.device)

    @property
    def _leads(self) -> bool:
        """Whether this process writes files: alone, or rank 0 of the processes it trained
        with."""
        return self._shared is None or self._shared.leader

    @property
    def _shared(self) -> Team | None:
        """The processes that share out the per-cell outputs: those it was trained with,
        while their process group lasts."""
        team = self._team
        return team if team is not None and torch.distributed.is_initialized() else None

    # ------------------------------------------------------------------ training
    def train(
        self, max_epochs: int | None = None, *, batch_size: int = 128, lr: float = 1e-3,
        beta: float = 1.0, warmup_fraction: float = 0.25, validation_fraction: float = 0.1,
        early_stopping: bool | None = None, patience: int = 25, seed: int | None = None,
        progress_bar: bool = True, checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10, resume: bool | str = False, precision: str = "auto",
        cuda_graphs: bool = False, block_rows: int = BLOCK_ROWS,
        buffer_blocks: int = BUFFER_BLOCKS, distributed: bool | None = None,
        sync_batchnorm: bool = False, dist_timeout: float = DEFAULT_TIMEOUT,
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
            before (same ``seed``) and call ``train`` with the same arguments. ``"auto"``:
            continue when ``checkpoint_dir`` holds a checkpoint, else start (one script for
            the first start and for restarts, e.g. ``torchrun --max-restarts=3``).
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
        block_rows, buffer_blocks
            Only for counts on disk (an AnnData opened with ``backed="r"`` or
            :func:`omicvae_sc.read_lazy`): each epoch reads blocks of ``block_rows``
            contiguous cells in a random order, ``buffer_blocks`` blocks at a time, and
            shuffles the cells of those blocks together; the next blocks are read while the
            model trains. Memory holds about two buffers. Larger buffers mix more of the file
            into each minibatch; their effect on quality and speed is measured in
            benchmarks/README.md ("Streaming from disk"). With K processes a block holds at
            most a 4K-th of the cells, so that every process has blocks of its own.
        distributed
            Train together with the other processes of a ``torchrun`` job (or any launcher
            that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``): each
            step is one step over ``batch_size`` cells of every process (``batch_size`` is
            per process, as in PyTorch Lightning), gradients averaged with
            ``DistributedDataParallel`` (NCCL between GPUs, gloo on the CPU). ``None`` (the
            default): whenever the launcher started more than one process; ``False``: every
            process trains its own model. Every process must load the same data and call
            ``train`` with the same arguments (checked). Early stopping, the KL warm-up and
            the non-finite-loss guard decide the same in every process; rank 0 writes the
            checkpoint, which resumes on any number of processes. See the README,
            "Several GPUs or machines".
        sync_batchnorm
            With several processes, each normalises by the BatchNorm statistics of its own
            ``batch_size`` cells, as one process does, and the running statistics are
            averaged every epoch (the default). ``True``: by those of the whole step's
            minibatch, summed over the processes, so that two processes at ``batch_size``
            take exactly the steps of one at twice that; it costs two exchanges a layer
            every step (on pbmc3k both end within 0.2 to 0.7 nats of one process and 0.01
            of its 15-NN purity; with 2 CPU processes the default trains 1.3x faster:
            benchmarks/README.md, "Several processes").
        dist_timeout
            With several processes, seconds a process may go silent (died, hung) before the
            others stop with an error naming it (:class:`omicvae_sc.train.RankLost`; a process
            stuck in a collective exits with status 75). Also the process group's timeout
            when ``train`` sets it up.

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
        request = TrainRequest(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, beta=beta,
            warmup_fraction=warmup_fraction, validation_fraction=validation_fraction,
            early_stopping=early_stopping, patience=patience,
            seed=self.hparams["seed"] if seed is None else seed, progress_bar=progress_bar,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
            precision=precision, cuda_graphs=cuda_graphs, block_rows=block_rows,
            buffer_blocks=buffer_blocks, distributed=distributed,
            sync_batchnorm=sync_batchnorm, dist_timeout=dist_timeout)
        request.check(self.device)
        counts, codes = self._host_data(None)
        team = training_team(request, self.device)
        held_out = validation_mask(counts.shape[0], validation_fraction, bool(early_stopping),
                                   request.seed)
        try:
            history = train_module(self.module, counts, codes, request, held_out=held_out,
                                   hparams=self.hparams, first_epoch=len(self.history),
                                   team=team)
        except TrainingDiverged as err:
            self.history = self.history.concat(err.history)
            self.is_trained = len(err.history) > 0
            raise
        self.history = self.history.concat(history)
        self.is_trained = True
        self._team = team
        self._held_out = HeldOut(held_out)
        with steady_heap():  # its chunks, like training steps, reuse freed memory
            self.diagnostics = self.get_latent_diagnostics()
        for msg in (collapse_message(self.diagnostics),
                    _training.interrupted_message(history, request, counts.shape[0])):
            if msg is not None:
                warnings.warn(msg, UserWarning, stacklevel=2)
        return self.history

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def get_latent_representation(
        self, adata: AnnData | None = None, *, give_mean: bool = True, seed: int = 0,
        out: str | Path | None = None,
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
        out
            A new ``.zarr`` store: write the latent there chunk by chunk instead of holding it
            in memory (for atlases: 40 bytes a cell at 10 dimensions, 2.4 GB at 60M cells).
            It appears only when complete; if writing fails nothing is left.

        Returns
        -------
        ``(n_cells, n_latent)`` float32 array; with ``out``, the same numbers on disk (a zarr
        array), opened read-only.
        """
        return _outputs.latent(self.module, self._tensors(adata), give_mean=give_mean,
                               seed=seed, team=self._shared, out=out)

    @torch.inference_mode()
    def get_normalized_expression(
        self, adata: AnnData | None = None, *, library_size: float | str = 1e4,
        gene_list: list[str] | None = None, transform_batch: str | None = None,
        out: str | Path | None = None,
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
        out
            A new ``.zarr`` store: write the expression there chunk by chunk
            instead of returning it in memory (for atlases: 1M cells x 2,000 genes is 8 GB).
            It appears only when complete; if writing fails (a full disk) nothing is left.

        Returns
        -------
        ``(n_cells, len(gene_list))`` float32 array, computed in chunks of cells; with ``out``,
        that array on disk (a zarr array), opened read-only.
        """
        cols = gene_columns(self.var_names, gene_list)
        batch_code = batch_code_of(self.setup, transform_batch)
        if out is not None:
            check_new_output(out, "out")
        data = self._tensors(adata)
        if out is None:
            return _outputs.expression(self.module, data, library_size, cols, batch_code)
        chunks = _outputs.expression_chunks(self.module, data, library_size, cols, batch_code)
        return _outputs.dense_file(self._shared, out, (data.n_cells, len(cols)), chunks)

    def differential_expression(
        self, groupby: str, group1: str | None, group2: str | None = None, *,
        adata: AnnData | None = None, mode: str = "change", delta: float = 0.25,
        fdr: float = 0.05, batch_correction: bool = True, n_samples: int = 500,
        max_cells: int | None = 2000, seed: int = 0, key_added: str | None = "omicvae_de",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Genes whose mean expression differs between groups, with posterior probabilities.

        The calls follow a posterior expected false discovery rate rule.

        Each group's mean normalized expression is drawn ``n_samples`` times: a Bayesian
        bootstrap over the group's cells, each cell at a draw of its latent state; the mean is
        the decoder's mean expression (in the compared batches) times how far the group's
        counts lie above or below the counts the model expects for those cells (the negative
        binomial's maximum-likelihood factor, each count clipped at 3 standard deviations from
        the model's so a few bursting cells do not decide it). A difference
        the latent does not carry is still in the counts, and found; the cell-to-cell
        variation the model explains is no longer noise. The draws give each gene's log2
        fold change and its standard error; an empirical-Bayes prior shared by all genes
        (adaptive shrinkage: a point mass at no change and normals of several widths, fitted
        to the genes) turns them into the posterior probability of a change and its interval.
        Among thousands of genes that mostly do not change, a chance difference of two
        standard errors is then not called.
        Genes are called, most probable first, while the expected share of false calls among
        them (the posterior expected FDR) stays at most ``fdr``. Two random halves of one
        population differ in almost no gene (scvi-tools compares single cells' draws, and
        calls every gene that varies from cell to cell).

        Parameters
        ----------
        groupby
            ``adata.obs`` column with the groups; cells without a value belong to none.
        group1
            The group tested; ``None``: each group in turn (the other groups against
            ``group2``), as scanpy's ``rank_genes_groups``.
        group2
            The group it is compared with; ``None`` (default): every other cell with a group.
        adata
            AnnData with the model's genes and covariates (default: the one the model was built
            on); its results are written there.
        mode
            ``"change"``: the probability that ``|LFC| > delta``; ``"vanilla"``: the
            probability of the more likely sign of the LFC (``delta`` unused).
        delta
            Smallest absolute log2 fold change that counts as a change (0.25: about 1.19-fold).
        fdr
            Target posterior expected false discovery rate of the calls.
        batch_correction
            With a model trained with ``batch_key``, decode every cell in each batch of the
            compared cells and average, so that groups from different batches are compared at
            the same batch mixture; ``False``: each cell in its own batch.
        n_samples
            Posterior draws of each group's mean (at least 10; the probabilities' resolution
            is 1 / ``n_samples``). Each cell is read at 20 latent draws, reused in turn.
        max_cells
            Read at most this many cells of a group, chosen at random with ``seed`` (its weight
            in "the rest" still counts all its cells); ``None``: every cell (the bootstrap
            weights then hold ``n_samples`` numbers per cell of a group). Above 2,000 cells
            the group mean moves by about 2% of a cell-to-cell standard deviation, far below
            ``delta``, while the work grows with the cells read.
        seed
            Seeds the cells read, the latent draws and the bootstrap; the same seed gives the
            same table, and a group gives the same table against the rest whether asked alone
            or by :func:`omicvae_sc.tl.differential_expression` with every group.
        key_added
            Also write the result into ``adata.uns[key_added]`` in scanpy's
            ``rank_genes_groups`` layout (``sc.get.rank_genes_groups_df(adata, group1,
            key=key_added)``, ``sc.pl.rank_genes_groups_dotplot(adata, key=key_added)``);
            ``None``: write nothing.
        progress_bar
            Show a bar over the cells read (from 20,000 on).

        Returns
        -------
        A DataFrame indexed by gene, most probable change first (group after group when
        ``group1`` is ``None``), with the columns ``group`` (the tested group), ``proba_de``,
        ``proba_not_de``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_low`` and
        ``lfc_high`` (the 95% credible interval of log2(group1 / group2)), ``lfc_raw`` (before
        shrinkage), ``mean1`` and ``mean2`` (mean normalized expression per 10,000 counts),
        ``pct_nonzero1`` and ``pct_nonzero2`` (share of the cells read with the gene
        detected), ``qvalue`` (the posterior expected FDR of calling the genes down to this
        one) and ``is_de`` (``qvalue <= fdr``).
        """
        return _de.run(self, self.adata if adata is None else adata, groupby, group1, group2,
                       _de.DERequest(mode, delta, fdr, batch_correction, n_samples, max_cells,
                                     seed), key_added=key_added, progress_bar=progress_bar)

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
        ev = _outputs.evaluate(self.module, self._tensors(adata), n_samples, seed,
                               team=self._shared)
        return ev.log_likelihood.numpy()

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
        ev = _outputs.evaluate(self.module, self._tensors(adata), n_samples, seed,
                               team=self._shared)
        return -(ev.distortion + ev.rate).numpy()

    def get_rate_distortion(
        self, adata: AnnData | None = None, *, n_samples: int = 10, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-cell rate and distortion, the two terms of the negative ELBO.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates (default: the one the model was
            built on).
        n_samples
            Draws from q(z|x) averaged for the distortion.
        seed
            Seeds the draws.

        Returns
        -------
        ``(rate, distortion)``, each ``(n_cells,)`` float64, nats: KL(q(z|x) || N(0, I)) (what
        the latent encodes) and E_q[-log p(x|z)] (what the reconstruction misses).
        """
        ev = _outputs.evaluate(self.module, self._tensors(adata), n_samples, seed,
                               team=self._shared)
        return ev.rate.numpy(), ev.distortion.numpy()

    def posterior_predictive_sample(
        self, adata: AnnData | None = None, *, gene_list: list[str] | None = None,
        seed: int = 0,
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
        return _outputs.predictive_draw(self.module, data, cols, seed)

    # ------------------------------------------------------------------ scores and results
    def get_anomaly_score(
        self, adata: AnnData | None = None, *, n_draws: int = ANOMALY_DRAWS,
        n_samples: int = ANOMALY_SAMPLES, seed: int = 0,
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
        return _results.anomaly(self.module, self._tensors(adata), n_draws, n_samples, seed,
                                team=self._shared)

    def get_doublet_score(
        self, adata: AnnData | None = None, *, expected_rate: float | None = None,
        sim_ratio: float = 1.0, n_repeats: int = 3, seed: int = 0,
    ) -> np.ndarray:
        """Per-cell doublet probability from artificial doublets and a cross-validated classifier.

        Artificial doublets are made by summing the raw counts of two cells of the same batch
        from two different clusters of the model's latent. Every cell, real or artificial, is
        described by features: how many artificial doublets are among its nearest neighbours (in
        a PCA of the batch's log-normalized counts, at several neighbourhood sizes), how much
        better a mixture of two clusters' decoded expression explains its counts than any one
        cluster does (the model's mixture test), how many genes it detects for its depth, and
        how much deeper than usual it is. A logistic regression learns to tell artificial
        doublets from real cells in cross-validation, so that no cell is scored by a classifier
        that saw it; cells it calls doublets in a first round are dropped from the singlets in
        a second. The log odds, averaged over ``n_repeats`` sets of artificial doublets, become a
        posterior probability with the prior ``expected_rate``. The details and the reasons
        are in ``omicvae_sc.model._doublets``.

        On many cells the work is split so that its time grows linearly with the cells and its
        memory does not: cells are scored in units of at most 25,000 (a larger batch is split
        into random sets of 1,024 consecutive cells, which on disk are single reads; smaller
        batches are scored together), and above that size each cluster's decoded profile is
        the mean of up to 2,000 of its cells. On an atlas, set up the model with the sample
        (the loading) as ``batch_key``: doublets form within a loading.

        Parameters
        ----------
        adata
            The cells to score, as loaded together (doublets form within one loading; with a
            ``batch_key`` at setup, within each batch); default: the AnnData the model was
            built on.
        expected_rate
            Prior doublet rate; ``None``: 0.8% per 1,000 cells of the cell's batch (10x
            Genomics; each batch taken as one loading), at most 25%. Also the share of cells
            the first round drops from the singlets.
        sim_ratio
            Artificial doublets per real cell (at least 1,500 are made).
        n_repeats
            Independent sets of artificial doublets whose log odds are averaged; more repeats
            give a steadier ranking and cost proportionally more time.
        seed
            Seeds the clusters, the pairing, the folds and the classifier.

        Returns
        -------
        ``(n_cells,)`` float64 array of probabilities; higher is more doublet-like.
        """
        return _results.doublets(self.module, self._tensors(adata), expected_rate, seed,
                                 by_batch=self.setup.batch_key is not None,
                                 sim_ratio=sim_ratio, n_repeats=n_repeats)

    def write_results(
        self, adata: AnnData | None = None, *, key_added: str = "omicvae",
        layers: bool = False, n_samples: int = LOG_LIKELIHOOD_SAMPLES, anomaly: bool = True,
        contamination: float | None = None, n_mads: float = N_MADS, doublets: bool = True,
        doublet_rate: float | None = None, seed: int = 0,
        denoised_path: str | Path | None = None, progress_bar: bool = True,
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
            Doublet rule: flag this share of each batch's cells with the highest doublet
            scores (also the prior of the score); ``None``: 0.8% per 1,000 cells of the batch
            (each batch taken as one loading), at most 25%.
        seed
            Seeds the draws.
        denoised_path
            With ``layers=True``, write the denoised layer chunk by chunk into this new
            ``.zarr`` store and place it in ``layers`` as an array on disk
            (needed when the counts are on disk; the file appears only when complete).
        progress_bar
            From 20,000 cells on, show a bar over the cells (the units, for doublets) of each
            stage.
        """
        check_key_added(key_added)
        adata = self.adata if adata is None else adata
        options = ResultOptions(layers=layers, n_samples=n_samples, anomaly=anomaly,
                                contamination=contamination, n_mads=n_mads, doublets=doublets,
                                doublet_rate=doublet_rate, seed=seed,
                                denoised_path=denoised_path, progress_bar=progress_bar)
        write_results(adata, self.compute_results(adata, options), key_added=key_added,
                      to_file=self._leads)

    def compute_results(self, adata: AnnData, options: ResultOptions | None = None) -> Results:
        """What :meth:`write_results` writes, computed from ``adata`` and not yet written.

        Parameters
        ----------
        adata
            AnnData with the model's genes and covariates.
        options
            What to compute (:class:`~omicvae_sc.model.ResultOptions`, the arguments of
            :meth:`write_results`; default: its defaults).

        Returns
        -------
        The results, for :func:`omicvae_sc.data.write_results`.
        """
        options = ResultOptions() if options is None else options
        options.check()
        readable = self._readable(adata)
        if readable is not adata and options.layers:
            msg = ("The denoised layer of a query's model holds the reference's genes, not "
                   "adata's; write it with model.get_normalized_expression(adata, "
                   "out='denoised.zarr') or pass layers=False.")
            raise ValueError(msg)
        _results.check_denoised_target(options, adata, len(self.var_names))
        columns = self._columns(readable)
        if columns is not None and options.layers and options.denoised_path is not None:
            msg = (f"The denoised layer on disk would hold the model's {len(columns)} genes, "
                   f"not adata's {adata.n_vars}; write it with "
                   "model.get_normalized_expression(adata, out='denoised.zarr') instead.")
            raise ValueError(msg)
        results = _results.compute_results(
            self.module, self._tensors(adata), options, team=self._shared,
            params=dict(self.hparams),
            setup=self.setup.to_dict(), history=self.history.to_dict())
        return results if columns is None else results.on_genes(columns, adata.n_vars)

    # ------------------------------------------------------------------ self-report
    def get_latent_diagnostics(
        self, adata: AnnData | None = None, *, n_cells: int = MI_CELLS, seed: int = 0,
    ) -> LatentDiagnostics:
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
        return latent_diagnostics(self.module, self._tensors(adata), n_cells=n_cells, seed=seed)

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
        refined = refine_cells(self.module, self._tensors(adata), steps=steps, lr=lr,
                               n_samples=n_samples, seed=seed)
        if key_added is not None:
            write_keys(adata, obsm={key_added: refined.mean})
        return refined

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
        return _generate.sample_cells(self.module, self.setup, self.var_names, counts, codes,
                                      self.device, n_cells=n_cells, batch=batch,
                                      library_size=library_size, seed=seed)

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
        data = count_source(counts, codes, self.device, cells=cells)
        return _generate.posterior_predictive_check(self.module, data, self.var_names, seed)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights (tensors only) and JSON metadata into the folder ``path``, atomically.

        A crash or kill mid-save leaves the previous model whole. After training on several
        processes (torchrun), call it on every process: rank 0 writes, the others wait.

        Parameters
        ----------
        path
            Folder to create.
        overwrite
            Replace an existing folder (the old model stays intact until the new one is complete).
        """
        record = {"hparams": self.hparams, "setup": self.setup.to_dict(),
                  "var_names": self.var_names.tolist(), "is_trained": self.is_trained,
                  "history": self.history.to_dict()}
        if self._query is not None:
            record["query"] = self._query.to_dict()
        if self._held_out is not None:
            record["held_out"] = self._held_out.to_dict()

        def save() -> None:
            _io.save_model(Path(path), self.module, record, overwrite=overwrite)

        team = self._shared  # after training on several processes, rank 0 writes
        if team is None:
            save()
        else:
            team.leader_writes(save, f"the model to {path}")

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
        setup = AnnDataSetup.from_dict(meta["setup"])
        saved = np.asarray(meta["var_names"], dtype=str)
        query = "query" in meta  # a query's model reads its cells on the reference's genes
        if not query and setup.genes is None:
            check_same_genes(saved, adata.var_names,
                             subset=f"adata = adata[:, ov.OmicVAE.saved_var_names("
                             f"{str(path)!r})].copy()")
        elif not query:  # a model of selected genes finds them by name
            model_columns(saved, adata.var_names)
        model = cls.from_setup(adata, setup, device=device, var_names=saved if query else None,
                               **meta["hparams"])
        model.module.load_state_dict(state)
        if query:
            model._become_query(QueryRecord.from_dict(meta["query"]))
            model._readable(adata)  # its genes and covariates checked now
        model.module.eval()
        model.history = History.from_dict(meta["history"])
        model.is_trained = bool(meta["is_trained"])
        if "held_out" in meta:
            model._held_out = HeldOut.from_dict(meta["held_out"])
        return model

    # ------------------------------------------------------------------ query mapping
    @staticmethod
    def prepare_query_anndata(
        adata_query: AnnData, reference: OmicVAE | str | Path, *, layer: str | None = "auto",
        batch_key: str | None = None, min_gene_overlap: float = MIN_GENE_OVERLAP,
    ) -> AnnData:
        """A new AnnData of the query's cells on the reference's genes.

        As :meth:`load_query_data` reads them; ``adata_query`` is left as it is.

        The genes are put in the reference's order, genes the query did not measure are
        zero-filled (a warning counts them) and genes the reference does not model are left
        out. ``obs`` holds the reference's covariates, under the reference's names.

        Parameters
        ----------
        adata_query
            The query's cells with raw counts, its genes named as the reference's (symbols,
            or Ensembl IDs, as the reference has them).
        reference
            A trained :class:`OmicVAE`, or the folder it was saved to.
        layer
            The query's layer of raw counts (``None``: ``X``); ``"auto"``: the reference's
            counts layer when the query has one of that name, else ``X``.
        batch_key
            The query's ``obs`` column with its batch, when not named as the reference's
            batch key (a reference trained without a batch takes none).
        min_gene_overlap
            Least share of the reference's genes the query must have measured.

        Returns
        -------
        A new AnnData, counts as CSR in ``layers[layer]`` (or ``X``).
        """
        return _query.plan_query(adata_query, reference, layer=layer, batch_key=batch_key,
                                 min_gene_overlap=min_gene_overlap).aligned

    @classmethod
    def load_query_data(
        cls, adata_query: AnnData, reference: OmicVAE | str | Path, *,
        layer: str | None = "auto", batch_key: str | None = None,
        min_gene_overlap: float = MIN_GENE_OVERLAP, unfreeze: str = "new",
        device: str | torch.device = "auto",
    ) -> OmicVAE:
        """A model of the query's cells grafted onto a trained reference.

        Architecture surgery, as scArches: the reference's weights, with new batch (and
        covariate) categories of the query as new, trainable parameters.

        The query's genes are found by name: put in the reference's order, those it did not
        measure zero-filled for the encoder and left out of the likelihood (a warning counts
        them). Categories the reference knows keep its parameters; each new one is a new
        one-hot column of the decoder's first layer (and the encoder's, with
        ``encode_covariates``) and, with ``dispersion="gene-batch"``, a new row of
        dispersions, starting at the mean of the reference's. :meth:`train` then fits only
        what ``unfreeze`` allows, with no weight decay on the reference's part: the
        reference (a model or a saved folder) is never changed, and with the default the
        query's model encodes reference cells exactly as the reference does.

        ``adata_query`` is left as it is; the model reads an aligned copy of it
        (:meth:`prepare_query_anndata`).

        Parameters
        ----------
        adata_query
            The query's cells with raw counts, genes named as the reference's.
        reference
            A trained :class:`OmicVAE`, or the folder it was saved to.
        layer
            The query's layer of raw counts (``None``: ``X``); ``"auto"``: the reference's
            counts layer when the query has one of that name, else ``X``.
        batch_key
            The query's ``obs`` column with its batch, when not named as the reference's
            batch key. A reference trained without a batch takes none.
        min_gene_overlap
            Least share of the reference's genes the query must have measured (default 0.5);
            fewer is an error that names the count and, when the two name genes differently
            (Ensembl IDs against symbols), says so.
        unfreeze
            What training on the query may change: ``"new"`` (the new categories' entries,
            the default), ``"encoder_first_layer"`` (also the encoder's first layer and its
            BatchNorm, so the encoder can adapt to the query's technology) or ``"all"``.
        device
            ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...

        Returns
        -------
        The query's model, usable as it is (``is_trained`` is true: its weights are the
        reference's) and trained further with :meth:`train`.
        """
        plan = _query.plan_query(adata_query, reference, layer=layer, batch_key=batch_key,
                                 min_gene_overlap=min_gene_overlap, unfreeze=unfreeze)
        model = cls.from_setup(adata_query, plan.setup, device=device,
                               var_names=plan.reference.var_names, **plan.reference.hparams)
        graft(model.module, plan.reference.module)
        model._become_query(plan.record)
        model._aligned = (adata_query, plan.aligned)
        model.is_trained = True
        return model

    def _become_query(self, record: QueryRecord) -> None:
        """Mask the query's unmeasured genes and freeze what ``record.unfreeze`` keeps."""
        self._query = record
        _query.make_query(self.module, self.var_names, record)
