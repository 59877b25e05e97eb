"""The ``omicvae-sc`` command line: ``demo`` on the bundled PBMCs, ``fit`` on an h5ad file.

Every run logs to stdout through the ``omicvae_sc`` logger; bad input ends with
``omicvae-sc: error: <message>`` on stderr and exit status 2, without a traceback, and leaves
the input file untouched.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

import omicvae_sc as ov
from omicvae_sc.data import ResultsRecord
from omicvae_sc.train import History, temp_file

PROG = "omicvae-sc"
EXIT_USAGE = 2


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (default: the package default, 400 up to 20k cells)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random step (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="NB / ZINB variational autoencoder for single-cell RNA-seq counts.")
    parser.add_argument("--version", action="version", version=f"{PROG} {ov.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="fit the bundled 700 PBMCs, write h5ad, UMAP and history",
                          description="Fit the bundled 700 PBMCs (ov.datasets.pbmc68k_reduced), "
                          "write the AnnData, a UMAP figure, the training history and the "
                          "anomaly scores.")
    demo.add_argument("-o", "--outdir", type=Path, default=Path("omicvae_demo"),
                      help="output folder (default ./omicvae_demo)")
    _add_common(demo)

    fit = sub.add_parser("fit", help="fit an h5ad file and write the results to a new h5ad",
                         description="Fit OmicVAE to the raw counts of IN.h5ad and write the "
                         "AnnData with the results added to OUT.h5ad; IN.h5ad is only read.")
    fit.add_argument("input", type=Path, metavar="IN.h5ad", help="AnnData with raw counts")
    fit.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.h5ad",
                     help="new h5ad: the input plus the results (must differ from IN.h5ad)")
    fit.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    fit.add_argument("--batch-key", default=None, help="obs column with the batch")
    fit.add_argument("--n-latent", type=_positive_int, default=10,
                     help="latent dimensions (default 10)")
    fit.add_argument("--likelihood", choices=("zinb", "nb", "poisson"), default="zinb",
                     help="count likelihood (default zinb)")
    fit.add_argument("--denoised", action="store_true",
                     help="also write layers['omicvae_denoised'] (dense cells x genes)")
    fit.add_argument("--contamination", type=float, default=None, metavar="FRACTION",
                     help="flag this share of cells with the highest anomaly scores (default: "
                     "a robust cutoff, median + 3 x 1.4826 MAD)")
    fit.add_argument("--doublet-rate", type=float, default=None, metavar="FRACTION",
                     help="flag this share of each batch's cells as doublets (default: "
                     "0.8%% per 1,000 cells of each batch)")
    fit.add_argument("--n-top-genes", type=_positive_int, default=None, metavar="N",
                     help="model only the N most variable genes of the counts (scanpy's "
                     "seurat_v3 flavour, per batch with --batch-key); results are written for "
                     "all genes. Default: every gene (slow on a raw 30k-gene matrix; 2000 is "
                     "usual)")
    fit.add_argument("--no-anomaly", action="store_true", help="skip anomaly scores and flags")
    fit.add_argument("--no-doublets", action="store_true", help="skip doublet scores and flags")
    fit.add_argument("--save-model", type=Path, default=None, metavar="DIR",
                     help="also save the trained model into this new folder")
    _add_common(fit)
    return parser


def _summary(adata, seconds: float) -> str:
    record = ResultsRecord.read(adata, "omicvae")
    history = History.from_dict(record.history)
    kept = history.epoch.index(history.best_epoch)  # the weights the model keeps
    val = history.validation_elbo[kept]
    val_text = "" if val != val else f", validation {val:.1f}"  # NaN: no validation split
    ending = "stopped early, " if history.stopped_early else ""
    flags = "".join(f", {record.flag_rule(kind)['n_flagged']} flagged as {kind}"
                    for kind in ("anomaly", "doublet") if record.flag_rule(kind) is not None)
    elbo = history.train_elbo[kept]
    return (f"{adata.n_obs} cells x {adata.n_vars} genes, {len(history)} epochs ({ending}"
            f"weights of epoch {history.best_epoch + 1} kept: ELBO {elbo:.1f} nats/cell, "
            f"train{val_text}){flags}, {seconds:.0f} s")


# ---------------------------------------------------------------------- demo
def _umap_figure(adata, path: Path) -> None:
    import matplotlib.pyplot as plt
    import scanpy as sc

    # wide gap: the cell-type legend sits to the right of the first panel
    fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"wspace": 0.8})
    sc.pl.umap(adata, color="cell_type", ax=axes[0], show=False, frameon=False,
               title="cell type")
    sc.pl.umap(adata, color="omicvae_log_likelihood", ax=axes[1], show=False, frameon=False,
               color_map="viridis", title="log p(x) per cell (nats)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # a command line never opens a window
    import matplotlib.pyplot as plt
    import scanpy as sc

    outdir: Path = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adata = ov.datasets.pbmc68k_reduced()
    ov.tl.omicvae(adata, layer="counts", max_epochs=args.epochs, seed=args.seed,
                  progress_bar=not args.no_progress)
    sc.pp.neighbors(adata, use_rep="X_omicvae", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    seconds = time.perf_counter() - start

    paths = {name: outdir / f"pbmc68k_omicvae{name}"
             for name in (".h5ad", "_umap.png", "_history.png", "_anomaly.png")}
    adata.write_h5ad(paths[".h5ad"])
    _umap_figure(adata, paths["_umap.png"])
    plt.close(ov.pl.training_history(adata, save=str(paths["_history.png"]), show=False))
    plt.close(ov.pl.anomaly(adata, save=str(paths["_anomaly.png"]), show=False))
    for path in paths.values():
        print(f"wrote {path}")
    print(f"demo: {_summary(adata, seconds)}")
    return 0


# ---------------------------------------------------------------------- fit
def _read_input(path: Path, output: Path):
    import anndata as ad

    if not path.is_file():
        msg = f"input file {str(path)!r} does not exist"
        raise CliError(msg)
    if output.resolve() == path.resolve() or (output.exists() and output.samefile(path)):
        msg = f"output {str(output)!r} is the input file, which fit only reads; choose another -o"
        raise CliError(msg)
    try:
        return ad.read_h5ad(path)
    except (OSError, ValueError, KeyError) as err:
        msg = f"cannot read {str(path)!r} as an h5ad file ({err})"
        raise CliError(msg) from err


def _write_atomic(adata, output: Path) -> None:
    """Write next to ``output`` and rename into place, so a failed write leaves no partial file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(output.parent, prefix=f".{output.name}.", suffix=".h5ad")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_fit(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    adata = _read_input(args.input, args.output)
    try:  # bad input is reported in one line; tl.omicvae checks all of it before training
        ov.tl.omicvae(
            adata, layer=args.layer, batch_key=args.batch_key, n_latent=args.n_latent,
            likelihood=args.likelihood, max_epochs=args.epochs, seed=args.seed,
            layers=args.denoised, anomaly=not args.no_anomaly, contamination=args.contamination,
            doublets=not args.no_doublets, doublet_rate=args.doublet_rate,
            n_top_genes=args.n_top_genes, progress_bar=not args.no_progress,
            save_model=args.save_model)
    except (ValueError, KeyError, TypeError, FileExistsError) as err:
        raise CliError(as_cli_message(_message(err))) from err
    seconds = time.perf_counter() - start
    if not _writes_files():  # under torchrun every process has every result; rank 0 writes
        return 0
    _write_atomic(adata, args.output)
    print(f"wrote {args.output}")
    if args.save_model is not None:
        print(f"wrote {args.save_model}")
    print(f"fit: {_summary(adata, seconds)}")
    return 0


def _writes_files() -> bool:
    """Whether this process writes the output: alone, or rank 0 of a ``torchrun`` job."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


CLI_FLAGS = {"layer": "--layer", "batch_key": "--batch-key", "n_top_genes": "--n-top-genes",
             "n_latent": "--n-latent", "likelihood": "--likelihood",
             "contamination": "--contamination", "doublet_rate": "--doublet-rate",
             "save_model": "--save-model"}
"""The package's parameter names and the flags that set them on the command line."""


def as_cli_message(text: str) -> str:
    """An error message of the Python API as the command line says it: ``Pass layer= naming
    the raw-count layer`` becomes ``Pass --layer naming ...``, ``adata.X`` becomes ``X``."""
    text = text.replace("layer=None to use adata.X", "leave out --layer to use X")
    for name, flag in CLI_FLAGS.items():
        text = re.sub(rf"\b{name}=(?![\w'\"(\[{{])", flag, text)  # "layer= naming" (no value)
        text = re.sub(rf"\b{name}=", f"{flag} ", text)  # "n_top_genes=2000"
        text = text.replace(f"passed as {name}", f"passed as {flag}")
        text = re.sub(rf"^{name}\b", flag, text)  # "n_top_genes must", "save_model folder"
    return re.sub(r"\badata\.X\b", "X", text)


def _message(err: BaseException) -> str:
    # str(KeyError("x")) is "'x'": show the message itself.
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def main(argv: list[str] | None = None) -> int:
    """Run the ``omicvae-sc`` command line with ``argv`` (default ``sys.argv[1:]``).

    Returns
    -------
    The exit status: 0 on success, 2 on bad input or bad arguments.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: return, don't exit
        code = exit_.code
        return 0 if code is None else code if isinstance(code, int) else EXIT_USAGE
    # stdout, as the help says; a library's own handlers are left alone
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    command = {"demo": run_demo, "fit": run_fit}[args.command]
    try:
        return command(args)
    except CliError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
