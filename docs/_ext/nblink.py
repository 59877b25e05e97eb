"""Render the notebooks of ``../tutorials`` in place, without copying or symlinking them.

Sphinx reads documents from ``docs/`` only. Each ``docs/tutorials/NAME.nblink`` is a one-line
JSON stub, ``{"path": "tutorials/NAME.ipynb"}`` (relative to the repository root); myst-nb reads
it through ``nb_custom_formats`` with :func:`read_nblink`, which returns the real notebook.

:func:`setup` also makes the build fail (a warning, an error under ``-W``) when a notebook in
``tutorials/`` has no stub or a stub names a missing notebook, and records each notebook as a
dependency of its page, so an incremental build redoes the page when the notebook changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from sphinx.util import logging

logger = logging.getLogger(__name__)
SUFFIX = ".nblink"
NOTEBOOKS = "tutorials"  # relative to the repository root, as are the stubs' paths
STUBS = "tutorials"  # relative to the docs source folder


def _target(text: str, root: str | Path) -> Path:
    return Path(root, json.loads(text)["path"])


def read_nblink(text: str, root: str) -> nbformat.NotebookNode:
    """The notebook that a ``.nblink`` stub names (myst-nb's custom-format reader)."""
    return nbformat.read(_target(text, root), as_version=4)


def _check_stubs(app) -> None:
    root = Path(app.config.nb_custom_formats[SUFFIX][1]["root"])
    stubs = sorted(Path(app.srcdir, STUBS).glob(f"*{SUFFIX}"))
    linked = set()
    for stub in stubs:
        target = _target(stub.read_text(), root)
        if not target.is_file():
            logger.warning("%s names %s, which does not exist", stub, target)
        linked.add(target.resolve())
    for notebook in sorted(Path(root, NOTEBOOKS).glob("*.ipynb")):
        if notebook.resolve() not in linked:
            logger.warning(
                "%s has no stub: add %s containing {\"path\": \"%s/%s\"}",
                notebook, Path(app.srcdir, STUBS, notebook.stem + SUFFIX), NOTEBOOKS,
                notebook.name,
            )


def _note_notebook(app, doctree) -> None:
    path = Path(app.env.doc2path(app.env.docname))
    if path.suffix == SUFFIX:
        root = app.config.nb_custom_formats[SUFFIX][1]["root"]
        app.env.note_dependency(str(_target(path.read_text(), root)))


def setup(app):
    app.connect("builder-inited", _check_stubs)
    app.connect("doctree-read", _note_notebook)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
