"""The package's shape stays readable: short functions, files of a reader's size, few positional
arguments, no string-keyed lookups in the mathematics. Measured on the source with ``ast``.

Lines of code exclude docstrings, comments and blank lines: the numpydoc docstrings of the public
façade are its API reference (``OmicVAE``'s file is mostly docstrings), and counting them would
push documentation out of the code, where it is read.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "omicvae_sc"
MAX_FUNCTION_CODE_LINES = 60
MAX_FILE_CODE_LINES = 400
MAX_POSITIONAL = 7
"""Positional parameters besides self / cls / ctx (an autograd ``forward`` takes what
``apply`` passes, positionally, and is exempt)."""


def _sources() -> list[tuple[Path, ast.Module, list[str]]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        out.append((path, ast.parse(text), text.splitlines()))
    return out


def _docstring_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        scopes = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        if isinstance(node, scopes) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _code_lines(lines: list[str], docstrings: set[int], first: int, last: int) -> int:
    return sum(1 for i in range(first, last + 1)
               if i not in docstrings and lines[i - 1].strip()
               and not lines[i - 1].strip().startswith("#"))


def _functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_function_is_longer_than_a_screen():
    long = []
    for path, tree, lines in _sources():
        docs = _docstring_lines(tree)
        for fn in _functions(tree):
            n = _code_lines(lines, docs, fn.lineno, fn.end_lineno)
            if n > MAX_FUNCTION_CODE_LINES:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name}: {n}")
    assert not long, f"functions over {MAX_FUNCTION_CODE_LINES} lines of code: {long}"


def test_no_file_holds_more_code_than_a_reader_takes_in():
    big = []
    for path, tree, lines in _sources():
        n = _code_lines(lines, _docstring_lines(tree), 1, len(lines))
        if n > MAX_FILE_CODE_LINES:
            big.append(f"{path.relative_to(PACKAGE.parent)}: {n}")
    assert not big, f"files over {MAX_FILE_CODE_LINES} lines of code: {big}"


def test_no_function_takes_a_long_row_of_positional_arguments():
    found = []
    for path, tree, _ in _sources():
        for fn in _functions(tree):
            names = [a.arg for a in fn.args.posonlyargs + fn.args.args
                     if a.arg not in ("self", "cls", "ctx")]
            if len(names) > MAX_POSITIONAL and fn.name != "forward":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name}: "
                             f"{len(names)}")
    assert not found, f"functions with over {MAX_POSITIONAL} positional parameters: {found}"


def test_the_mathematics_looks_nothing_up_by_string():
    """module/ (the likelihood, the objective, the networks) passes named tuples and
    arguments, never ``d["key"]`` dictionaries."""
    found = []
    for path, tree, _ in _sources():
        if path.parent.name != "module":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                    and isinstance(node.slice.value, str):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, f"string-keyed lookups in module/: {found}"


def test_the_measures_can_fail(tmp_path):
    """The helpers count what they should on a file written for the purpose."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_CODE_LINES + 1))
    text = f'def f(a, b, c, d, e, f, g, h):\n    """Doc."""\n    # note\n\n{body}\n'
    tree, lines = ast.parse(text), text.splitlines()
    (fn,) = _functions(tree)
    assert _code_lines(lines, _docstring_lines(tree), fn.lineno, fn.end_lineno) \
        == MAX_FUNCTION_CODE_LINES + 2  # the def line and the body, not the docstring
    assert len(fn.args.args) == MAX_POSITIONAL + 1
