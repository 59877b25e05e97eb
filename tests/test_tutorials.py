"""Every notebook in tutorials/ runs top to bottom (few epochs, no Jupyter kernel, no windows)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
TUTORIALS = sorted(TUTORIALS_DIR.glob("*.ipynb"))


def load_notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def code_cells(path: Path) -> list[str]:
    """Source of each code cell, with IPython magics and shell escapes (% and ! lines) dropped."""
    cells = []
    for cell in load_notebook(path)["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [line for line in cell_source(cell).splitlines()
                 if not line.lstrip().startswith(("%", "!"))]
        cells.append("\n".join(lines))
    return cells


def test_there_are_tutorials():
    assert TUTORIALS, f"no notebooks found in {TUTORIALS_DIR}"


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_is_stored_without_outputs(notebook):
    nb = load_notebook(notebook)
    assert nb["nbformat"] == 4
    stale = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not stale, f"code cells {stale} of {notebook.name} store outputs; clear them"


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # scanpy
@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(notebook, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    monkeypatch.setenv("OMICVAE_TUTORIAL_EPOCHS", "10")
    shared = TUTORIALS_DIR.parent.parent / "shared" / "data"
    if "OMICVAE_SC_DATA" not in os.environ and shared.is_dir():  # real data, where present
        monkeypatch.setenv("OMICVAE_SC_DATA", str(shared))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    try:
        for i, source in enumerate(code_cells(notebook)):
            try:
                exec(compile(source, f"{notebook.name}, code cell {i}", "exec"), namespace)
            except Exception as err:
                err.add_note(f"while running code cell {i} of {notebook.name}:\n{source}")
                raise
    finally:
        plt.close("all")
