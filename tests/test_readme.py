"""The README's Python examples run as pasted, in order, in one namespace (as a user pastes them
into one session), and the demo figures it quotes are those of the fit its quickstart makes."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_python_blocks_are_found():
    blocks = python_blocks("text\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb\n```\n")
    assert blocks == ["a = 1\n", "b\n"]


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # scanpy
@pytest.mark.filterwarnings("ignore::anndata.ImplicitModificationWarning")  # the view example
def test_readme_python_blocks_run_as_pasted(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)  # model.save("my_model") writes here
    text = README.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "__main__"}
    # one torch thread: the examples' small minibatches are what suffers most when two test
    # workers' thread pools share the two cores (43 s alone, 218 to 705 s in the suite)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, source in enumerate(blocks):
            try:
                exec(compile(source, f"README.md, python block {i}", "exec"), namespace)
            except Exception as err:
                err.add_note(f"while running python block {i} of README.md:\n{source}")
                raise
            if i == 0:  # the quickstart: the demo's fit (every default, seed 0)
                _check_demo_figures(text, namespace["adata"].uns["omicvae"]["history"])
    finally:
        torch.set_num_threads(threads)
        plt.close("all")
    assert (tmp_path / "my_model" / "metadata.json").is_file()
    assert namespace["cf"].shape == (600, 200)
    assert not namespace["hvg"].is_view and "X_omicvae" in namespace["hvg"].obsm


def _check_demo_figures(text: str, history: dict) -> None:
    quoted = re.search(r'prints, on this project.s CPU, "(\d+) epochs \(stopped\s+early, weights '
                       r"of epoch (\d+) kept: \.\.\. validation −(\d+\.\d)\)", text)
    assert quoted, "the README no longer quotes the demo's figures where this test looks"
    epochs, kept, elbo = int(quoted[1]), int(quoted[2]), -float(quoted[3])
    best = int(history["best_epoch"])
    assert (len(history["epoch"]), best + 1) == (epochs, kept)
    assert round(float(history["validation_elbo"][best]), 1) == elbo
