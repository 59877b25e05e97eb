"""Counts that stay on disk: read a block of contiguous rows at a time, each block checked as it
is read.

An AnnData opened with ``anndata.read_h5ad(path, backed="r")`` keeps ``X`` on disk (anndata
reads its layers into memory); :func:`read_lazy` opens an ``.h5ad`` file or a ``.zarr`` store
with ``X`` and every layer on disk and only ``obs``, ``var`` and ``uns`` in memory. Either way
the count matrix is an anndata sparse dataset (CSR) or a dense HDF5 / zarr array, and
:class:`RowReader` reads it in row blocks: a contiguous slice is one read of each stored array,
where single rows in random order are thousands.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

_LAZY_SPARSE = (ad.abc.CSRDataset, ad.abc.CSCDataset)


def is_on_disk(matrix) -> bool:
    """Whether ``matrix`` is read from a file when sliced (anndata sparse dataset, HDF5 or zarr
    array) rather than held in memory."""
    if isinstance(matrix, (*_LAZY_SPARSE, h5py.Dataset)):
        return True
    zarr = _zarr()
    return zarr is not None and isinstance(matrix, zarr.Array)


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - anndata installs zarr
        return None
    return zarr


def holds_disk_arrays(adata: AnnData) -> bool:
    """Whether ``adata`` is backed or keeps ``X`` or a layer on disk (it cannot be copied in
    memory as it is). Anything but an AnnData is left to the AnnData check to refuse."""
    if not isinstance(adata, AnnData):
        return False
    return adata.isbacked or is_on_disk(adata.X) or any(
        is_on_disk(adata.layers[k]) for k in adata.layers if k is not None)


def file_of(matrix) -> Path | None:
    """The file (``.h5ad``) or store folder (``.zarr``) ``matrix`` is read from, if known."""
    node = matrix.group if isinstance(matrix, _LAZY_SPARSE) else matrix
    if isinstance(node, (h5py.Dataset, h5py.Group)):
        return Path(node.file.filename)
    root = getattr(getattr(node, "store", None), "root", None)
    return None if root is None else Path(root)


def lazy_counts(adata: AnnData, layer: str | None):
    """The on-disk count matrix of ``adata``'s ``layer`` when ``adata`` is backed (anndata
    loads a backed file's layers into memory: this reopens the layer from the file), else
    ``None``."""
    if not adata.isbacked or layer is None:
        return None
    return _lazy_element(adata.file._file[f"layers/{layer}"])


def _lazy_element(node):
    """An HDF5 / zarr element as a lazily sliced matrix: CSR and CSC groups become anndata
    sparse datasets, arrays stay as they are."""
    if isinstance(node, h5py.Dataset):
        return node
    zarr = _zarr()
    if zarr is not None and isinstance(node, zarr.Array):
        return node
    return ad.io.sparse_dataset(node)


NAMES_PER_READ = 1 << 20
"""Cell names decoded at a time by :func:`read_frame`."""


def read_frame(group) -> pd.DataFrame:
    """An anndata dataframe element (``obs``), equal to ``anndata.io.read_elem``'s, with its
    index (the cell names) read ``NAMES_PER_READ`` at a time into one array. Read whole, the
    names of 10M cells pass through two full copies (bytes, then str): 1,955 MB at the peak
    against 1,364 MB once read, in a process of 435 MB. Elements of another kind, or an index
    that is not a string array, are left to ``read_elem``."""
    attrs = dict(group.attrs)
    key = attrs.get("_index")
    names = group[key] if attrs.get("encoding-type") == "dataframe" and key in group else None
    if names is None or getattr(names, "ndim", 0) != 1 or names.dtype.kind not in "OTSU":
        return ad.io.read_elem(group)
    column_order = [str(c) for c in np.atleast_1d(attrs.get("column-order", []))]
    index = np.empty(names.shape[0], dtype=object)
    strings = names.asstr() if isinstance(names, h5py.Dataset) else names
    for lo in range(0, len(index), NAMES_PER_READ):
        index[lo:lo + NAMES_PER_READ] = np.asarray(strings[lo:lo + NAMES_PER_READ], dtype=object)
    return pd.DataFrame({c: ad.io.read_elem(group[c]) for c in column_order},
                        index=pd.Index(index, name=None if key == "_index" else key, copy=False))


def read_lazy(path: str | Path) -> AnnData:
    """Open an ``.h5ad`` file or a ``.zarr`` store without reading its counts.

    ``obs``, ``var`` and ``uns`` are read into memory; ``X`` and every layer stay on disk and
    are read a block of rows at a time by the model. ``obsm``, ``obsp``, ``varm`` and ``varp``
    are not read (on an atlas they can be as large as the counts). Results the model writes
    (``obsm``, ``obs``, ``uns``) go into the returned object in memory; write them to a file
    with :meth:`~anndata.AnnData.write_h5ad` as usual.

    Parameters
    ----------
    path
        An ``.h5ad`` file or a ``.zarr`` store (a folder).

    Returns
    -------
    An AnnData whose ``X`` and layers are anndata sparse datasets (CSR) or HDF5 / zarr arrays.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path} does not exist; pass the path of an .h5ad file or a .zarr store."
        raise FileNotFoundError(msg)
    if path.is_dir():
        zarr = _zarr()
        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as err:
            msg = f"{path} is a folder but not a zarr store anndata wrote ({err})."
            raise OSError(msg) from err
    else:
        try:
            root = h5py.File(path, "r")
        except OSError as err:
            msg = (f"{path} could not be opened as HDF5 ({err}); the file may be truncated or "
                   "not an .h5ad file.")
            raise OSError(msg) from err
    keys = set(root.keys())
    missing = {"obs", "var"} - keys
    if missing:
        msg = f"{path} has no {sorted(missing)}: it is not an AnnData file (found {sorted(keys)})."
        raise OSError(msg)
    read = ad.io.read_elem
    group = root["layers"] if "layers" in keys else None  # zarr groups have no items()
    layers = {} if group is None else {n: _lazy_element(group[n]) for n in group.keys()}
    x = _lazy_element(root["X"]) if "X" in keys else None
    uns = read(root["uns"]) if "uns" in keys else {}
    return AnnData(X=x, obs=read_frame(root["obs"]), var=read(root["var"]), uns=uns,
                   layers=layers)


def _csr_rows(dataset, lo: int, hi: int) -> sp.csr_matrix:
    """Rows ``lo:hi`` of an anndata CSR dataset, reading only their stretch of ``indptr``:
    anndata's own slicing reads the whole ``indptr`` and keeps it (8 bytes a cell: 80 MB at
    10M cells, more with every reader of the file)."""
    group = dataset.group
    ptr = np.asarray(group["indptr"][lo:hi + 1], dtype=np.int64)
    first, last = int(ptr[0]), int(ptr[-1])
    return sp.csr_matrix((group["data"][first:last], group["indices"][first:last], ptr - first),
                         shape=(hi - lo, int(dataset.shape[1])))


def _watched(matrix, file: Path | None) -> list[Path]:
    """Paths whose size and modification time reveal a change to ``matrix``'s data: the
    ``.h5ad`` file, or for zarr the element's folder and its arrays' folders (zarr writes a
    chunk as a new file, which changes the folder holding it)."""
    if file is None or file.is_file():
        return [] if file is None else [file]
    node = matrix.group if isinstance(matrix, _LAZY_SPARSE) else matrix
    element = file / str(getattr(node, "path", "") or "")
    return [element, *sorted(p for p in element.iterdir() if p.is_dir())]


def _stamp(paths: list[Path]) -> tuple | None:
    try:
        return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    except FileNotFoundError:
        return None


class RowReader:
    """Blocks of contiguous rows of an on-disk count matrix as float32 CSR matrices.

    Every block is checked as it is read: the file unchanged since the reader was made (size
    and modification time), the block's shape, and its values (finite, non-negative, integer
    unless ``allow_non_integer``). Errors name the file and the rows.

    Parameters
    ----------
    matrix
        The on-disk matrix (see :func:`is_on_disk`).
    where
        How messages name it (``"adata.X"``, ``"adata.layers['counts']"``).
    obs_names
        Cell names, for messages.
    allow_non_integer
        Accept non-integer values (the user's choice at set-up).
    columns
        Positions of the genes to read (increasing); ``None``: every gene. Each block is read
        whole and these columns taken from it.
    """

    def __init__(self, matrix, where: str, obs_names, *, allow_non_integer: bool = False,
                 columns: np.ndarray | None = None):
        if isinstance(matrix, ad.abc.CSCDataset):
            msg = (f"{where} is stored as CSC (by gene), so each block of cells would read the "
                   "whole matrix. Rewrite it by cell: `adata = anndata.read_h5ad(path); "
                   "adata.X = adata.X.tocsr(); adata.write_h5ad(new_path)`.")
            raise ValueError(msg)
        self.matrix = matrix
        self.where = where
        self.obs_names = obs_names
        self.allow_non_integer = allow_non_integer
        self.file = file_of(matrix)
        self.n_cells, n_stored = (int(s) for s in matrix.shape)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.n_stored = n_stored
        self.n_genes = n_stored if columns is None else len(self.columns)
        self.saw_non_integer = False  # found, and accepted with allow_non_integer
        self._paths = _watched(matrix, self.file)
        self._stamp = _stamp(self._paths)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_cells, self.n_genes

    @property
    def name(self) -> str:
        return self.where if self.file is None else f"{self.where} of {self.file}"

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        """Rows ``lo:hi`` as a canonical float32 CSR matrix, checked."""
        self.check_unchanged()
        try:
            block = _csr_rows(self.matrix, lo, hi) if isinstance(self.matrix, ad.abc.CSRDataset) \
                else self.matrix[lo:hi]
        except Exception as err:  # h5py / zarr raise many types for a damaged file
            msg = (f"Could not read rows {lo}:{hi} of {self.name} ({type(err).__name__}: "
                   f"{err}); the file may be truncated or damaged.")
            raise OSError(msg) from err
        if block.shape != (hi - lo, self.n_stored):
            msg = (f"Rows {lo}:{hi} of {self.name} came back with shape {block.shape}, not "
                   f"{(hi - lo, self.n_stored)}; the file is damaged or was changed.")
            raise OSError(msg)
        block = sp.csr_matrix(block)
        if self.columns is not None:
            block = block[:, self.columns]
        self._check_values(block, lo, hi)
        if not block.has_canonical_format:
            block.sum_duplicates()
        block.eliminate_zeros()
        if block.data.dtype != np.float32:
            block.data = block.data.astype(np.float32)
        return block

    def check_unchanged(self) -> None:
        """Raise if the file (or the zarr element's folders) changed size or modification time
        since the reader was made."""
        if not self._paths:
            return
        now = _stamp(self._paths)
        if now != self._stamp:
            what = "was removed" if now is None else "changed (size or modification time)"
            msg = (f"{self.file} {what} while its counts were being read; results from a file "
                   "that changes under the model would mix two datasets. Leave it unchanged "
                   "during the run, or open it again and start over.")
            raise OSError(msg)

    def _check_values(self, block: sp.csr_matrix, lo: int, hi: int) -> None:
        values = block.data
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype,
                                                                         np.complexfloating):
            msg = f"{self.name} has dtype {values.dtype}; expected numeric raw counts."
            raise TypeError(msg)
        checks = [(lambda v: ~np.isfinite(v), "NaN or infinite values"),
                  (lambda v: v < 0, "negative values"),
                  (lambda v: v != np.round(v), "non-integer values")]
        for bad, what in checks:
            mask = bad(values)
            if not mask.any():
                continue
            if what == "non-integer values" and self.allow_non_integer:
                self.saw_non_integer = True
                continue
            pos = int(np.flatnonzero(mask)[0])
            row = lo + int(np.searchsorted(block.indptr, pos, side="right") - 1)
            msg = (f"{self.name} holds {what} in rows {lo}:{hi} (first {values[pos]:g} at "
                   f"row {row}, cell {str(self.obs_names[row])!r}). The NB/ZINB likelihood "
                   "needs finite, non-negative integer counts: fix the file, or pass layer= "
                   "naming the raw-count layer.")
            raise ValueError(msg)
        empty = np.flatnonzero(np.asarray(block.sum(axis=1)).ravel() <= 0)
        if empty.size:
            row = lo + int(empty[0])
            msg = (f"{empty.size} cell(s) in rows {lo}:{hi} of {self.name} have zero total "
                   f"counts (first: row {row}, cell {str(self.obs_names[row])!r}); the library "
                   "size is the model's exposure and must be positive. Remove them first "
                   "(write the file again without them).")
            raise ValueError(msg)

    def blocks(self, rows: int):
        """``(lo, hi, block)`` over the whole matrix in order, ``rows`` rows at a time."""
        for lo in range(0, self.n_cells, rows):
            hi = min(lo + rows, self.n_cells)
            yield lo, hi, self.read(lo, hi)

    def scan(self, rows: int, *, progress_bar: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read every block once (each is checked): per-cell library sizes (float64) and, per
        gene, the number of cells with a count."""
        from tqdm.auto import tqdm

        library = np.empty(self.n_cells, dtype=np.float64)
        detected = np.zeros(self.n_genes, dtype=np.int64)
        n_blocks = -(-self.n_cells // rows)
        bar = tqdm(self.blocks(rows), total=n_blocks, desc=f"checking {self.name}",
                   unit="block", disable=not progress_bar or n_blocks < 20, leave=False)
        for lo, hi, block in bar:
            library[lo:hi] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
            detected += np.bincount(block.indices, minlength=self.n_genes)
        return library, detected


OUTPUT_SUFFIXES = (".zarr",)
"""Large outputs are zarr stores. Not HDF5: an HDF5 file that fills the disk cannot be closed
(h5py 3.16 raises at close and the process then dies in HDF5's exit handler, a segmentation
fault), where a zarr chunk that does not fit is one failed write of one file."""


def check_new_output(path: str | os.PathLike, what: str) -> Path:
    """``path`` names a new ``.zarr`` store in an existing folder."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        msg = f"{what} {str(path)!r} must end in .zarr (a zarr store, written chunk by chunk)."
        raise ValueError(msg)
    if path.exists():
        msg = f"{what} {str(path)!r} already exists; choose a new path."
        raise FileExistsError(msg)
    if not path.parent.is_dir():
        msg = f"{what} {str(path)!r}: the folder {str(path.parent)!r} does not exist."
        raise FileNotFoundError(msg)
    return path


def open_dense(path: str | os.PathLike):
    """The array :func:`write_dense` wrote to ``path``, opened read-only."""
    import zarr

    return zarr.open_array(str(path), mode="r")


def write_dense(path: str | os.PathLike, shape: tuple[int, int],
                chunks: Iterable[np.ndarray], *, what: str = "out"):
    """Write the rows ``chunks`` yields, in order, as a float32 ``shape`` array into a new
    ``.zarr`` store, and return it opened read-only.

    The store is written under a temporary name in the same folder and renamed when every row
    is in; if anything fails (a full disk, Ctrl-C) the temporary is removed, so no half-written
    output is left behind.
    """
    import zarr

    path = check_new_output(path, what)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    n_rows, n_cols = shape
    rows_per_chunk = max(1, min(n_rows, 2**22 // max(n_cols, 1)))  # 16 MiB chunks
    try:
        array = zarr.open_array(str(tmp), mode="w", shape=shape, dtype="float32",
                                chunks=(rows_per_chunk, n_cols), zarr_format=2)
        lo = _write_whole_chunks(array, chunks, rows_per_chunk)
        if lo != n_rows:  # pragma: no cover - a bug, not a user error
            msg = f"write_dense: {lo} rows written, not {n_rows}"
            raise RuntimeError(msg)
        tmp.rename(path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            full = err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            msg = (f"Writing {str(path)!r} failed ({err}); "
                   + ("the disk is full or the file too large. " if full else "")
                   + "Nothing was left behind and the input is unchanged; free space or "
                   "choose another folder.")
            raise OSError(err.errno, msg) from err
        raise
    return open_dense(path)


def _write_whole_chunks(array, chunks: Iterable[np.ndarray], rows_per_chunk: int) -> int:
    """Write the rows ``chunks`` yields into ``array`` a whole zarr chunk at a time (rows
    gathered in a buffer of one chunk): a write of part of a chunk reads, decodes and encodes
    the whole chunk again, which for a narrow array (a latent of 10 columns: 419,430 rows a
    chunk) costs that chunk at every chunk of cells. Returns the number of rows written."""
    buffer = np.empty((rows_per_chunk, array.shape[1]), dtype=np.float32)
    lo = held = 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float32)
        while len(chunk):
            take = min(len(chunk), rows_per_chunk - held)
            buffer[held:held + take] = chunk[:take]
            held, chunk = held + take, chunk[take:]
            if held == rows_per_chunk:
                array[lo:lo + held] = buffer
                lo, held = lo + held, 0
    if held:
        array[lo:lo + held] = buffer[:held]
    return lo + held
