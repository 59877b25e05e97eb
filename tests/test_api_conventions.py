"""scanpy's conventions, checked over the whole public API by introspection; the layer split
(module/ and train/ never see anndata); and an import with no side effects."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import omicvae_sc as ov
from omicvae_sc import OmicVAE

PACKAGE_DIR = Path(ov.__file__).resolve().parent


# ---------------------------------------------------------------------------- the public API
def _public_functions(module) -> list:
    return [getattr(module, name) for name in module.__all__]


TL = _public_functions(ov.tl)
PL = _public_functions(ov.pl)
DATASETS = _public_functions(ov.datasets)
METHODS = [
    getattr(OmicVAE, name)
    for name, member in inspect.getmembers(OmicVAE)
    if not name.startswith("_") and callable(member)
]


def _id(f) -> str:
    return getattr(f, "__qualname__", repr(f))


@pytest.mark.parametrize("module", [ov.tl, ov.pl, ov.datasets])
def test_all_lists_every_public_callable(module):
    public = {name for name, obj in vars(module).items()
              if not name.startswith("_") and callable(obj) and not inspect.ismodule(obj)}
    assert public == set(module.__all__)
    assert len(module.__all__) > 0


def test_top_level_exports():
    assert set(ov.__all__) == {"OmicVAE", "ResultsRecord", "__version__", "datasets", "pl",
                              "read_lazy", "tl"}


# ---------------------------------------------------------------------------- signatures
TWO_DATA_TOOLS = {"transfer_labels": ("adata_ref", "adata_query", "labels_key"),
                  "map_query": ("adata_query", "reference")}
"""Tools between a reference and a query: both AnnData and what to move between them come
first and positionally, as in the issue that asked for them and in scanpy's
``ingest(adata, adata_ref, obs=...)``; the query is the one written into."""


def signature_problems(f, *, tool: bool) -> list[str]:
    """Violations of: data first and positional, everything else keyword-only; for tools also
    ``copy=False``, ``-> AnnData | None`` and ``key_added`` (``TWO_DATA_TOOLS``: their leading
    positional parameters)."""
    params = list(inspect.signature(f).parameters.values())
    problems = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    leading = TWO_DATA_TOOLS.get(getattr(f, "__name__", ""), ("adata",))
    if not params or params[0].kind not in positional:
        problems.append("the data is not the first positional parameter")
    for p in params[1:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY and p.name not in leading:
            problems.append(f"{p.name} is not keyword-only")
    if tool:
        by_name = {p.name: p for p in params}
        if params and params[0].name != leading[0]:
            problems.append(f"first parameter is {params[0].name!r}, not 'adata'")
        if "copy" not in by_name or by_name["copy"].default is not False:
            problems.append("no copy=False")
        if "key_added" not in by_name or not isinstance(by_name["key_added"].default, str):
            problems.append("no key_added with a string default")
        if inspect.signature(f).return_annotation != "AnnData | None":
            problems.append("return annotation is not 'AnnData | None'")
    return problems


@pytest.mark.parametrize("f", TL, ids=_id)
def test_tl_signature(f):
    assert signature_problems(f, tool=True) == []


@pytest.mark.parametrize("f", PL, ids=_id)
def test_pl_signature(f):
    assert signature_problems(f, tool=False) == []


def test_signature_check_catches_violations():
    def bad(data, n=1, *args, copy=True) -> None: ...

    problems = signature_problems(bad, tool=True)
    assert "n is not keyword-only" in problems
    assert "args is not keyword-only" in problems
    assert "no copy=False" in problems
    assert "no key_added with a string default" in problems
    assert "first parameter is 'data', not 'adata'" in problems
    assert "return annotation is not 'AnnData | None'" in problems


# ---------------------------------------------------------------------------- docstrings
NUMPYDOC_SECTIONS = {
    "Parameters", "Returns", "Yields", "Receives", "Other Parameters", "Raises", "Warns",
    "Warnings", "See Also", "Notes", "References", "Examples", "Attributes", "Methods",
}


def numpydoc_sections(doc: str) -> tuple[str, dict[str, list[str]]]:
    """The summary line and the lines of each ``Header\\n------`` section."""
    lines = inspect.cleandoc(doc).splitlines()
    sections: dict[str, list[str]] = {}
    current = None
    i = 0
    while i < len(lines):
        head, under = lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else ""
        if head and under and set(under) == {"-"} and len(under) == len(head):
            current = head
            sections[current] = []
            i += 2
            continue
        if current is not None:
            sections[current].append(lines[i])
        i += 1
    return (lines[0].strip() if lines else ""), sections


def documented_parameters(section: list[str]) -> list[str]:
    """Names in a numpydoc Parameters section (``a, b`` and ``a : type`` both allowed)."""
    names = []
    for line in section:
        if line.strip() and not line[0].isspace():
            names += [n.strip().lstrip("*") for n in line.split(" : ")[0].split(",")]
    return names


def docstring_problems(f) -> list[str]:
    """Violations of numpydoc: a one-line summary ending in a period, known section headers,
    every parameter documented and nothing else, a Returns section when something is returned."""
    doc = f.__doc__
    if not doc or not doc.strip():
        return ["no docstring"]
    summary, sections = numpydoc_sections(doc)
    problems = []
    if not summary.endswith("."):
        problems.append(f"summary line does not end with a period: {summary!r}")
    problems += [f"unknown section {s!r}" for s in sections if s not in NUMPYDOC_SECTIONS]
    sig = inspect.signature(f.__init__ if inspect.isclass(f) else f)
    expected = [p for p in sig.parameters if p not in ("self", "cls")]
    documented = documented_parameters(sections.get("Parameters", []))
    missing = [p for p in expected if p not in documented]
    if missing:
        problems.append(f"parameters not documented: {missing}")
    extra = [p for p in documented if p not in expected]
    if extra:
        problems.append(f"documented but not parameters: {extra}")
    returns = sig.return_annotation
    if not inspect.isclass(f) and returns not in ("None", None) and "Returns" not in sections:
        problems.append(f"returns {returns} but has no Returns section")
    return problems


# Public methods whose docstrings fall short of numpydoc today (reported as package bugs).
UNDOCUMENTED: dict[str, str] = {}  # name -> reason, for a known docstring gap (strict xfail)


def _doc_case(f):
    reason = UNDOCUMENTED.get(_id(f))
    if reason is None:
        return pytest.param(f, id=_id(f))
    return pytest.param(f, id=_id(f), marks=pytest.mark.xfail(
        reason=f"package bug (omicvae_sc/model/_omicvae.py docstring): {reason}", strict=True))


@pytest.mark.parametrize("f", [_doc_case(f) for f in [*TL, *PL, *DATASETS, OmicVAE, *METHODS,
                                                   ov.read_lazy]])
def test_numpydoc_docstring(f):
    assert docstring_problems(f) == []


@pytest.mark.parametrize("f", TL, ids=_id)
def test_tl_docstring_has_returns(f):
    _, sections = numpydoc_sections(f.__doc__)
    assert any(line.strip() for line in sections.get("Returns", []))


def test_docstring_check_catches_violations():
    def f(adata, *, key: str = "x") -> int:
        """Do something

        Parameters
        ----------
        adata
            The data.
        other
            Not a parameter.

        Retuns
        ------
        A number.
        """

    problems = docstring_problems(f)
    assert "summary line does not end with a period: 'Do something'" in problems
    assert "unknown section 'Retuns'" in problems
    assert "parameters not documented: ['key']" in problems
    assert "documented but not parameters: ['other']" in problems
    assert "returns int but has no Returns section" in problems
    assert docstring_problems(lambda x: x) == ["no docstring"]


def test_documented_parameters_reads_grouped_and_typed_names():
    section = ["n_latent, n_hidden", "    Widths.", "seed : int", "    A seed.", "**kwargs"]
    assert documented_parameters(section) == ["n_latent", "n_hidden", "seed", "kwargs"]


# ---------------------------------------------------------------------------- the layer split
FORBIDDEN = ("anndata", "pandas", "scipy.sparse", "scanpy")
PURE_PACKAGES = ("omicvae_sc.module", "omicvae_sc.train")


def imported_modules(source: str, module_name: str, is_package: bool) -> set[str]:
    """Fully qualified names of everything ``source`` imports (relative imports resolved;
    ``from a import b`` yields both ``a`` and ``a.b``)."""
    parts = module_name.split(".")
    package = parts if is_package else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def purity_problems(imports: set[str]) -> list[str]:
    bad = []
    for name in sorted(imports):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            bad.append(name)
        elif name.startswith("omicvae_sc") and name != "omicvae_sc" and not any(
            name == p or name.startswith(p + ".") for p in PURE_PACKAGES
        ):
            bad.append(name)  # reaches anndata through another layer of the package
        elif name == "omicvae_sc":
            bad.append(name)  # the top level imports everything, anndata included
    return bad


def _pure_files() -> list[Path]:
    files = []
    for pkg in PURE_PACKAGES:
        files += sorted((PACKAGE_DIR / pkg.split(".")[1]).rglob("*.py"))
    return files


@pytest.mark.parametrize("path", _pure_files(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_module_and_train_never_import_anndata_pandas_or_scipy_sparse(path):
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    is_package = rel.name == "__init__"
    name = ".".join(rel.parts[:-1] if is_package else rel.parts)
    imports = imported_modules(path.read_text(), name, is_package)
    assert purity_problems(imports) == []


def test_pure_layers_have_source_files():
    names = {p.name for p in _pure_files()}
    assert {"__init__.py", "_vae.py", "_trainer.py"} <= names


def test_import_check_catches_violations():
    source = textwrap.dedent("""
        import anndata as ad
        import scipy.sparse as sp
        from scipy import sparse
        from pandas import DataFrame
        from ..data import get_counts
        from . import _nn
        import torch
        import scipy.special
    """)
    imports = imported_modules(source, "omicvae_sc.module._vae", is_package=False)
    assert "omicvae_sc.module._nn" in imports
    assert purity_problems(imports) == [
        "anndata", "omicvae_sc.data", "omicvae_sc.data.get_counts", "pandas",
        "pandas.DataFrame", "scipy.sparse",
    ]
    assert purity_problems({"omicvae_sc.train._history", "torch", "numpy"}) == []


# ---------------------------------------------------------------------------- import side effects
IMPORT_PROBE = textwrap.dedent("""
    import json, logging, random
    import numpy as np
    import torch

    def handlers():
        out = {"": [repr(h) for h in logging.getLogger().handlers]}
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                out[name] = [repr(h) for h in lg.handlers]
        return out

    def state():
        return {
            "torch_rng": torch.get_rng_state().numpy().tobytes().hex(),
            "default_dtype": str(torch.get_default_dtype()),
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "grad_enabled": torch.is_grad_enabled(),
            "anomaly": torch.is_anomaly_enabled(),
            "numpy_rng": np.random.get_state()[1].tobytes().hex(),
            "python_rng": repr(random.getstate()),
        }

    state0, root0 = state(), handlers()[""]
    # third-party libraries configure their own loggers at import; that is not ours to test
    import anndata, h5py, matplotlib.pyplot, pandas, scanpy, scipy.sparse, tqdm.auto  # noqa
    handlers1 = handlers()
    import omicvae_sc
    handlers2 = handlers()
    print(json.dumps({
        "state0": state0, "state2": state(), "root0": root0, "handlers1": handlers1,
        "handlers2": handlers2, "level": logging.getLogger("omicvae_sc").level,
    }))
""")


@pytest.fixture(scope="module")
def import_probe() -> dict:
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_adds_no_logging_handlers(import_probe):
    before, after = import_probe["handlers1"], import_probe["handlers2"]
    added = {name: hs for name, hs in after.items() if hs != before.get(name, [])}
    assert added == {}
    assert after[""] == import_probe["root0"]
    assert after.get("omicvae_sc", []) == []
    assert import_probe["level"] == 0  # NOTSET: the user decides what is shown


def test_import_leaves_torch_and_rng_state_alone(import_probe):
    before, after = import_probe["state0"], import_probe["state2"]
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert changed == {}
