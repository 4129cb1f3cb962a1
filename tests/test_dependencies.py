"""Every third-party module edgemoe/ imports is declared in pyproject.toml.

A module imported at the top level of a file must come from a base dependency (`pip install .`
alone must be able to import it); one imported only inside a function or a try block may come
from an optional extra. Import names are mapped to distributions through the installed packages
(importlib.metadata), so `yaml` is PyYAML and `llama_cpp` is llama-cpp-python.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def third_party_imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for each absolute import of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try)):
            lazy.update(id(sub) for sub in ast.walk(node) if sub is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) not in lazy) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) not in lazy))
    return [(m, top) for m, top in found if m not in sys.stdlib_module_names and m != "edgemoe"]


def undeclared(package: Path, pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    base = {_requirement(r) for r in project.get("dependencies", [])}
    extras = {_requirement(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    dists = metadata.packages_distributions()
    bad = []
    for f in sorted(package.rglob("*.py")):
        for mod, top in third_party_imports(f):
            provided_by = {_norm(d) for d in dists.get(mod, [])}
            assert provided_by, f"{f}: `import {mod}`: no installed distribution provides it"
            if top and not provided_by & base:
                bad.append(
                    f"{f.relative_to(package.parent)}: `import {mod}` at top level needs a base dependency "
                    f"({', '.join(sorted(provided_by))})"
                )
            elif not top and not provided_by & (base | extras):
                bad.append(
                    f"{f.relative_to(package.parent)}: `import {mod}` is declared in no dependency or extra "
                    f"({', '.join(sorted(provided_by))})"
                )
    return bad


def test_every_import_of_the_package_is_declared():
    assert undeclared(ROOT / "edgemoe", ROOT / "pyproject.toml") == []


def test_an_undeclared_import_is_found(tmp_path):
    """The check itself: xxhash imported at top level but declared nowhere, and rich only in an extra."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("import numpy\nimport xxhash\n\ndef f():\n    import yaml\n")
    (pkg / "b.py").write_text("from rich.text import Text\n")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "p"\ndependencies = ["numpy>=1"]\n[project.optional-dependencies]\nx = ["rich"]\n'
    )
    bad = undeclared(pkg, tmp_path / "pyproject.toml")
    assert len(bad) == 3, bad
    assert any("`import xxhash` at top level" in b for b in bad)
    assert any("`import yaml` is declared in no dependency" in b for b in bad)
    assert any("`import rich` at top level" in b for b in bad)
