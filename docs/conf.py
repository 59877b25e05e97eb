"""Sphinx configuration: the API reference from the numpydoc docstrings, and the tutorials.

Build (the command CI runs, warnings are errors)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

No intersphinx: the build runs offline.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))  # nblink: the tutorials/*.ipynb stubs

import omicvae_sc  # noqa: E402

# -- project -------------------------------------------------------------------------------------
project = "omicvae_sc"
author = "omicvae_sc developers"
copyright = "omicvae_sc developers"
release = omicvae_sc.__version__
version = ".".join(release.split(".")[:2])

# -- general -------------------------------------------------------------------------------------
extensions = [
    "myst_nb",  # Markdown pages (myst-parser, which it loads) and the notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "nblink",
]
# .rst first: autosummary writes its stubs (reST) with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "generated/cli_*.txt", "Thumbs.db", ".DS_Store"]
root_doc = "index"
default_role = "literal"

# -- autodoc / autosummary / napoleon ------------------------------------------------------------
autosummary_generate = True  # stubs into docs/generated/ (git-ignored)
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # types are written in the numpydoc text where they matter
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_param = False  # one entry for grouped names ("n_latent, n_hidden, n_layers")
# The package's Returns sections are prose (scanpy's style: "``None``, or the copy when
# ``copy=True``. Keys written: ..."), with no ``name : type`` line. Napoleon would read their
# first line as a type; render them as written instead, under a "Returns" heading.
napoleon_custom_sections = ["Returns"]

# -- MyST / myst-nb ------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the tutorials as committed, never run them
# docs/tutorials/*.nblink name a notebook in ../tutorials; read it from there (no copy, no
# symlink): see docs/_ext/nblink.py
nb_custom_formats = {".nblink": ("nblink.read_nblink", {"root": str(ROOT)}, False)}

# -- HTML ----------------------------------------------------------------------------------------
html_title = f"omicvae_sc {release}"
try:
    import sphinx_book_theme  # noqa: F401
except ImportError:  # the builtin theme, when the docs extra was installed without it
    html_theme = "alabaster"
else:
    html_theme = "sphinx_book_theme"
    html_theme_options = {"use_download_button": False, "show_toc_level": 2}
html_show_sourcelink = False


# -- the command line page: `omicvae-sc [COMMAND] --help`, as the installed CLI prints it -----
def _write_cli_help() -> None:
    from omicvae_sc.cli import main

    out = HERE / "generated"
    out.mkdir(exist_ok=True)
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width: make it fixed
    try:
        for name, argv in (("main", []), ("demo", ["demo"]), ("fit", ["fit"])):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = main([*argv, "--help"])
            if code != 0:
                msg = f"omicvae-sc {' '.join(argv)} --help exited with {code}"
                raise RuntimeError(msg)
            target = out / f"cli_{name}.txt"
            text = buf.getvalue()
            if not target.exists() or target.read_text() != text:  # keep mtimes: no rebuilds
                target.write_text(text)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


_write_cli_help()
