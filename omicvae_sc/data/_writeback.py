"""Every write into ``adata.obsm`` / ``obs`` / ``layers`` / ``uns`` happens here, after
validation."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from omicvae_sc.data._disk import is_on_disk
from omicvae_sc.data._schema import ResultsRecord, field

logger = logging.getLogger("omicvae_sc")


@dataclass(frozen=True)
class Results:
    """Everything one fit writes back. Per-cell arrays have one row per cell of the AnnData."""

    latent: np.ndarray  # (cells, n_latent)
    obs: dict[str, np.ndarray]  # suffix -> (cells,), e.g. "log_likelihood"
    record: ResultsRecord  # what goes into uns
    denoised: np.ndarray | None = None  # (cells, genes), in memory or an array on disk
    var: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # suffix -> (genes,)

    def on_genes(self, genes: np.ndarray, n_genes: int | None = None) -> Results:
        """These results, fitted on the genes ``genes`` selects (a boolean mask over the
        AnnData's genes, or the positions of the model's genes among its ``n_genes``), for the
        AnnData of all genes: the denoised expression is NaN for the genes not modelled, and
        ``var['<key>_genes']`` says which genes were."""
        genes = np.asarray(genes)
        mask = genes.astype(bool) if genes.dtype == bool else np.zeros(n_genes, dtype=bool)
        if genes.dtype != bool:
            mask[genes] = True
        denoised = self.denoised
        if denoised is not None:
            denoised = np.full((len(denoised), len(mask)), np.nan, dtype=np.float32)
            denoised[:, genes] = self.denoised
        params = {**self.record.params, "n_top_genes": int(np.sum(mask))}
        return dataclasses.replace(self, denoised=denoised,
                                   var={**self.var, "genes": mask},
                                   record=dataclasses.replace(self.record, params=params))


def output_keys(key_added: str, results: Results) -> dict[str, list[str]]:
    """The keys :func:`write_results` adds, by AnnData attribute, named by the schema
    (:data:`omicvae_sc.data._schema.FIELDS`; a suffix outside it is a ``KeyError``)."""
    present = {"obsm": ["latent"], "obs": list(results.obs), "uns": [""],
               "layers": ["denoised"] if results.denoised is not None else [],
               "var": list(results.var)}
    return {attribute: [field(attribute, suffix).name(key_added) for suffix in suffixes]
            for attribute, suffixes in present.items()}


def check_key_added(key_added: str) -> None:
    """``key_added`` must be a non-empty string (checked before any work is done)."""
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}."
        raise ValueError(msg)


def write_results(adata: AnnData, results: Results, *, key_added: str,
                  to_file: bool = True) -> dict[str, list[str]]:
    """Validate shapes, then write ``results`` into ``adata`` and log the keys added; into
    its file too when it was opened with ``backed="r+"``, unless ``to_file`` is False (the
    processes of a distributed job other than rank 0)."""
    n = adata.n_obs
    bad = [name for name, arr in [("latent", results.latent), *results.obs.items()]
           if arr.shape[0] != n]
    if results.denoised is not None and results.denoised.shape != adata.shape:
        bad.append("denoised")
    bad += [name for name, arr in results.var.items() if arr.shape[0] != adata.n_vars]
    if bad:
        msg = (f"Results {bad} do not match adata's {n} cells x {adata.n_vars} genes; "
               "nothing written.")
        raise ValueError(msg)
    check_key_added(key_added)
    keys = output_keys(key_added, results)
    backing = _writable_backing_file(adata) if to_file else None
    if backing is not None:
        _check_room(backing, results)  # before anything is written, in memory or on disk
    adata.obsm[keys["obsm"][0]] = np.asarray(results.latent, dtype=np.float32)
    for name, suffix in zip(keys["obs"], results.obs, strict=True):
        adata.obs[name] = np.asarray(results.obs[suffix])
    if results.denoised is not None:
        denoised = results.denoised  # an array on disk is placed as it is, never loaded
        adata.layers[keys["layers"][0]] = denoised if is_on_disk(denoised) \
            else np.asarray(denoised, dtype=np.float32)
    for name, suffix in zip(keys["var"], results.var, strict=True):
        adata.var[name] = np.asarray(results.var[suffix])
    adata.uns[key_added] = results.record.to_uns()
    added = ", ".join(f"{attr}[{k!r}]" for attr, ks in keys.items() for k in ks)
    logger.info("omicvae_sc added %s", added)
    if backing is not None:
        _write_through(adata, backing, keys, key_added)
        logger.info("omicvae_sc wrote them to %s too (opened with backed='r+'; the "
                    "denoised layer, if any, stays in its zarr store)", adata.filename)
    return keys


def _writable_backing_file(adata: AnnData):
    """The open HDF5 file of an AnnData opened with ``backed="r+"``, else ``None``."""
    if not adata.isbacked:
        return None
    handle = getattr(adata.file, "_file", None)  # anndata's h5py.File; no public accessor
    return handle if handle is not None and handle.mode == "r+" else None


def _check_room(handle, results: Results) -> None:
    """Refuse, before writing, when the file's disk lacks twice the bytes the per-cell results
    take: an HDF5 file that fills its disk cannot be closed cleanly."""
    import shutil

    need = 2 * (np.asarray(results.latent).nbytes
                + sum(np.asarray(a).nbytes for a in results.obs.values())
                + sum(np.asarray(a).nbytes for a in results.var.values()) + (1 << 20))
    free = shutil.disk_usage(Path(handle.filename).parent).free
    if free < need:
        msg = (f"Writing the results into {handle.filename} (opened with backed='r+') needs "
               f"about {need / 2**20:.0f} MB free on its disk; {free / 2**20:.0f} MB are. "
               "Nothing was written, in memory or to the file; free space, or open the file "
               "with backed='r' to keep the results in memory only.")
        raise OSError(msg)


def _write_through(adata: AnnData, handle, keys: dict[str, list[str]], key_added: str) -> None:
    """The keys just written into ``adata``, also into its backing file: obs and var columns
    one by one (the rest of the table is not rewritten: HDF5 does not give space back),
    the latent and the uns entry."""
    from anndata.io import write_elem

    for attr, table in (("obs", adata.obs), ("var", adata.var)):
        group = handle[attr]
        for name in keys[attr]:
            write_elem(group, name, np.asarray(table[name]))
        order = [str(c) for c in group.attrs.get("column-order", [])]
        group.attrs["column-order"] = np.array(
            order + [n for n in keys[attr] if n not in order], dtype=object)
    write_elem(handle.require_group("obsm"), keys["obsm"][0], adata.obsm[keys["obsm"][0]])
    write_elem(handle.require_group("uns"), key_added, adata.uns[key_added])
    handle.flush()


def write_uns(adata: AnnData, key: str, value: dict) -> None:
    """Write one plain dict into ``adata.uns[key]`` and log it (a view becomes actual)."""
    check_key_added(key)
    adata.uns[key] = value
    logger.info("omicvae_sc added uns[%r]", key)


def write_keys(
    adata: AnnData, *, obs: dict[str, np.ndarray] | None = None,
    obsm: dict[str, np.ndarray] | None = None, uns: dict[str, dict] | None = None,
) -> None:
    """Validate every key and per-cell array first, then write them all (a view becomes
    actual, as anndata does it).

    ``obs`` and ``obsm`` map full key names to arrays with one row per cell; ``uns`` maps keys
    to plain, h5ad-serializable dicts. On bad input nothing is written.
    """
    arrays = {**(obs or {}), **(obsm or {})}
    for key in [*arrays, *(uns or {})]:
        check_key_added(key)
    bad = {k: np.shape(a) for k, a in arrays.items() if np.shape(a)[:1] != (adata.n_obs,)}
    if bad:
        msg = (f"Arrays {bad} do not have one row per cell of adata ({adata.n_obs} cells); "
               "nothing written.")
        raise ValueError(msg)
    for key, arr in (obs or {}).items():
        adata.obs[key] = np.asarray(arr)
    for key, arr in (obsm or {}).items():
        adata.obsm[key] = np.asarray(arr, dtype=np.float32)
    for key, value in (uns or {}).items():
        adata.uns[key] = value
    added = [f"{attr}[{k!r}]" for attr, d in (("obs", obs), ("obsm", obsm), ("uns", uns))
             for k in (d or {})]
    logger.info("omicvae_sc added %s", ", ".join(added))


def rank_genes_groups_layout(tables: dict[str, pd.DataFrame], params: dict) -> dict:
    """Tables of :mod:`omicvae_sc.model._de` (one per group, against its reference, each in
    scanpy's order with its ``scores``: :func:`omicvae_sc.model._de.scanpy_order`) as scanpy's
    ``rank_genes_groups`` stores its results, so that ``sc.get.rank_genes_groups_df`` and
    ``sc.pl.rank_genes_groups_*`` read them: ``logfoldchanges`` the posterior mean LFC,
    ``pvals`` the posterior probability of no change and ``pvals_adj`` the q-value (the
    posterior expected FDR rule); ``pts`` and ``pts_rest`` the shares of cells with the gene
    detected. The model's own columns follow under their names (``proba_de``, ``lfc_low``,
    ``lfc_high``, ``mean1``, ``mean2``)."""
    fields = {"names": None, "scores": "scores", "logfoldchanges": "lfc_mean",
              "pvals": "proba_not_de", "pvals_adj": "qvalue", "proba_de": "proba_de",
              "lfc_low": "lfc_low", "lfc_high": "lfc_high", "mean1": "mean1", "mean2": "mean2"}
    out: dict = {"params": params}
    for name, column in fields.items():
        frame = pd.DataFrame({g: (t.index.to_numpy(dtype=object) if column is None
                                  else t[column].to_numpy(dtype=np.float32))
                              for g, t in tables.items()})
        out[name] = frame.to_records(index=False,
                                     column_dtypes="O" if column is None else "float32")
    first = next(iter(tables.values()))
    out["pts"] = pd.DataFrame({g: t["pct_nonzero1"] for g, t in tables.items()},
                              index=first.index.copy())
    out["pts_rest"] = pd.DataFrame({g: t["pct_nonzero2"] for g, t in tables.items()},
                                   index=first.index.copy())
    return out
