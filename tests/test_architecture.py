"""The architecture, checked: which way imports run, and how long a function may be.

Imports (docs/ARCHITECTURE.md) run `recipes -> unlearn -> interventions`, and `benchmarks` may
import anything; a method never imports the training core; only `interventions` imports nnsight
and TransformerLens. Every `import x` and `from x import y` of every module counts, at module
level, inside functions and under `if TYPE_CHECKING:` alike, relative imports resolved, plus
`importlib.import_module("x")` / `__import__("x")` with a literal name. `from x import y` counts
as importing both `x` and `x.y` (y may be a submodule).

Functions and methods in `unlearn/`, `interventions/` and `recipes/` are at most
`MAX_FUNCTION_LINES` long, `def` line to last line, unless their docstring says "Long because"
and why.

Each checker is also run on a synthetic tree written into `tmp_path`, so every rule is shown to
fail when its arrow is reversed.
"""

import ast
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ("nnsight", "transformer_lens")
"""Only `interventions` touches these (benchmarks may: the step-graph benchmark times raw hooks)."""

IMPORT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("unlearn", ("recipes", "benchmarks", *BACKENDS)),
    ("interventions", ("unlearn", "recipes", "benchmarks")),
    ("unlearn.methods", ("unlearn.training", "unlearn.experiment")),
    ("recipes", ("benchmarks", *BACKENDS)),
)
"""(importing package, packages or modules it must not import), both matched as dotted prefixes."""

LENGTH_PACKAGES = ("unlearn", "interventions", "recipes")
MAX_FUNCTION_LINES = 80
LONG_BECAUSE = "Long because"

LENGTH_ALLOWED: dict[str, str] = {
    # Only functions in files that others are editing right now, which this check may not split
    # (unlearn/methods/*, unlearn/experiment.py, recipes/*.py). None is over the limit today.
    # Format: "path/to/file.py::Class.function": "why it is allowed, and until when".
}
"""Functions over the limit that are allowed for now (each entry must still be over it)."""


# --- the checkers ------------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a .py file under `root` ("unlearn/methods/__init__.py" ->
    "unlearn.methods")."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of `from <level dots><node.module> import ...` inside `module`."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _dynamic_import(node: ast.Call) -> str | None:
    """The literal name of `importlib.import_module("x")` or `__import__("x")`, if it is one."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module that the file at `path` imports anywhere in its body (absolute names)."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, module, is_package)
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)):
            found.add(name)
    return found


def _is_within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _is_parent(parent: str, module: str) -> bool:
    return module.startswith(parent + ".")


def import_violations(root: Path) -> list[str]:
    """Every reversed arrow of `IMPORT_RULES` in the packages under `root`, one line each.

    A line reads "<file>: <importer> imports <module> (<owner> must not import <prefix>)"; of
    `from x import y` only `x` is reported when `x` itself is forbidden.
    """
    found = []
    packages = sorted({owner.split(".")[0] for owner, _ in IMPORT_RULES})
    for path in sorted(p for package in packages for p in (root / package).rglob("*.py")):
        importer, modules = module_name(path, root), imported_modules(path, root)
        for owner, forbidden in IMPORT_RULES:
            if not _is_within(importer, owner):
                continue
            for prefix in forbidden:
                hits = [m for m in modules if _is_within(m, prefix)]
                for module in sorted(m for m in hits if not any(_is_parent(h, m) for h in hits)):
                    found.append(
                        f"{path.relative_to(root).as_posix()}: {importer} imports {module} "
                        f"({owner} must not import {prefix})"
                    )
    return found


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def long_functions(root: Path, packages: tuple[str, ...] = LENGTH_PACKAGES) -> dict[str, int]:
    """Lines of every function over `MAX_FUNCTION_LINES` whose docstring does not say "Long
    because", keyed "<file>::<qualified name>"."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, node in _functions(tree):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and LONG_BECAUSE not in (
                    ast.get_docstring(node) or ""
                ):
                    found[f"{path.relative_to(root).as_posix()}::{name}"] = lines
    return found


# --- the real tree -----------------------------------------------------------------------------


def test_imports_run_one_way():
    assert import_violations(REPO_ROOT) == []


def test_the_import_checker_sees_the_real_imports():
    """Not vacuous: the training core's known imports are found, relative or not."""
    imports = imported_modules(REPO_ROOT / "unlearn" / "training.py", REPO_ROOT)
    assert {"interventions", "unlearn.methods.base", "unlearn.methods.plan"} <= imports
    assert "unlearn.methods.plan" in imported_modules(
        REPO_ROOT / "unlearn" / "methods" / "__init__.py", REPO_ROOT
    )


def test_functions_are_short_or_say_why():
    found = long_functions(REPO_ROOT)
    too_long = {name: lines for name, lines in found.items() if name not in LENGTH_ALLOWED}
    assert too_long == {}, (
        f"functions over {MAX_FUNCTION_LINES} lines: split them, or say '{LONG_BECAUSE} ...' "
        "in the docstring"
    )
    stale = sorted(set(LENGTH_ALLOWED) - set(found))
    assert stale == [], "no longer too long (or gone): remove from LENGTH_ALLOWED"


# --- each rule fails on a reversed arrow -------------------------------------------------------


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write `files` (relative path -> source) under `root`, with an empty __init__.py in every
    package directory."""
    for relative, source in files.items():
        path = root / relative
        for parent in [path.parent, *path.parent.parents]:
            if parent == root:
                break
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    return root


CLEAN_TREE = {
    "interventions/graph.py": "import torch\n",
    "unlearn/data.py": "from interventions import graph\nfrom . import toy\n",
    "unlearn/toy.py": "",
    "unlearn/training.py": "from unlearn.methods.base import Method\n",
    "unlearn/experiment.py": "from .training import train\n",
    "unlearn/methods/base.py": "from unlearn.data import Batch\n",
    "unlearn/methods/lens.py": "from .base import Method\nfrom .. import data\n",
    "recipes/run.py": "from unlearn.experiment import run_method\n",
    "benchmarks/bench.py": "import recipes.run\nfrom unlearn import training\n",
}


def test_a_clean_tree_passes(tmp_path):
    assert import_violations(_write_tree(tmp_path, CLEAN_TREE)) == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("unlearn/eval.py", "import recipes.unlearn\n", "unlearn.eval imports recipes.unlearn"),
        (
            "unlearn/eval.py",
            "def f():\n    from benchmarks import leaderboard\n",
            "unlearn.eval imports benchmarks",
        ),
        (
            "interventions/ops.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from unlearn.data import B\n",
            "interventions.ops imports unlearn.data",
        ),
        ("interventions/ops.py", "import recipes\n", "interventions.ops imports recipes"),
        (
            "interventions/ops.py",
            "import importlib\nm = importlib.import_module('benchmarks.run')\n",
            "interventions.ops imports benchmarks.run",
        ),
        (
            "unlearn/methods/lens.py",
            "from ..training import train\n",
            "unlearn.methods.lens imports unlearn.training",
        ),
        (
            "unlearn/methods/lens.py",
            "def build():\n    from unlearn import experiment\n",
            "unlearn.methods.lens imports unlearn.experiment",
        ),
        (
            "unlearn/methods/sub/__init__.py",
            "from ... import training\n",
            "unlearn.methods.sub imports unlearn.training",
        ),
        ("recipes/run.py", "from benchmarks.bench import x\n", "recipes.run imports benchmarks"),
        ("unlearn/eval.py", "from nnsight import Envoy\n", "unlearn.eval imports nnsight"),
        (
            "recipes/run.py",
            "def f():\n    import transformer_lens\n",
            "recipes.run imports transformer_lens",
        ),
    ],
)
def test_a_reversed_arrow_is_reported(tmp_path, path, source, expected):
    root = _write_tree(tmp_path, {**CLEAN_TREE, path: source})
    (violation,) = import_violations(root)
    assert violation.startswith(f"{path}: {expected}")


def test_relative_imports_resolve(tmp_path):
    root = _write_tree(
        tmp_path,
        {
            "unlearn/methods/lens.py": (
                "from .base import M\nfrom .. import data\nfrom ..x.y import z\n"
            ),
            "unlearn/methods/__init__.py": "from . import lens\nfrom .lens import L\n",
        },
    )
    assert imported_modules(root / "unlearn/methods/lens.py", root) == {
        "unlearn.methods.base",
        "unlearn.methods.base.M",
        "unlearn",
        "unlearn.data",
        "unlearn.x.y",
        "unlearn.x.y.z",
    }
    assert imported_modules(root / "unlearn/methods/__init__.py", root) == {
        "unlearn.methods",
        "unlearn.methods.lens",
        "unlearn.methods.lens.L",
    }


def _function(name: str, body_lines: int, docstring: str = "") -> str:
    doc = f'    """{docstring}"""\n' if docstring else ""
    body = "".join(f"    x{i} = {i}\n" for i in range(body_lines - bool(docstring)))
    return f"def {name}():\n{doc}{body}"


def test_a_long_function_is_reported(tmp_path):
    """81 lines fail, 80 pass, "Long because" exempts; methods and nested functions count."""
    method = "class C:\n" + textwrap.indent(_function("method", MAX_FUNCTION_LINES), "    ")
    nested = "def outer():\n" + textwrap.indent(_function("inner", MAX_FUNCTION_LINES), "    ")
    root = _write_tree(
        tmp_path,
        {
            "unlearn/a.py": _function("short", MAX_FUNCTION_LINES - 1),
            "unlearn/b.py": _function("long", MAX_FUNCTION_LINES),
            "unlearn/c.py": _function("why", MAX_FUNCTION_LINES, "Long because: a state machine."),
            "interventions/d.py": method,
            "recipes/e.py": nested,
            "benchmarks/f.py": _function("unchecked", MAX_FUNCTION_LINES),
        },
    )
    assert long_functions(root) == {
        "unlearn/b.py::long": MAX_FUNCTION_LINES + 1,
        "interventions/d.py::C.method": MAX_FUNCTION_LINES + 1,
        "recipes/e.py::outer": MAX_FUNCTION_LINES + 2,
        "recipes/e.py::outer.inner": MAX_FUNCTION_LINES + 1,
    }
