"""The package's layering, checked by reading the imports of every module under ``src/medfm``.

Each module is parsed with :mod:`ast` (nothing is imported); every import counts, including those inside
functions and under ``TYPE_CHECKING``, and ``importlib.import_module("...")`` with a literal name. Relative
imports are resolved to absolute module names; ``from package import name`` counts as importing
``package.name`` when that is a module of the tree. The rules are the table :data:`RULES`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "medfm"

# The modules of medfm.models shared by every family; each sub-package of medfm.models is a family.
SHARED_MODEL_MODULES = (
    "medfm.models",
    "medfm.models.registry",
    "medfm.models.modeling_utils",
    "medfm.models.conversion_utils",
)
FAMILY_PACKAGES = tuple(
    sorted(f"medfm.models.{p.name}" for p in (PACKAGE / "models").iterdir() if (p / "__init__.py").is_file())
)


@dataclass(frozen=True)
class Rule:
    """Modules under ``importers`` must not import a module under ``forbidden`` unless it is under ``allowed``
    (each entry names a module and everything below it)."""

    id: str
    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()

    def broken_by(self, importer: str, imported: str) -> bool:
        return (
            _under(importer, self.importers)
            and _under(imported, self.forbidden)
            and not _under(imported, self.allowed)
        )


RULES = (
    Rule(
        "kernels",
        "kernels are the bottom layer: they import nothing of medfm but medfm.kernels",
        importers=("medfm.kernels",),
        forbidden=("medfm",),
        allowed=("medfm.kernels",),
    ),
    Rule(
        "layers",
        "layers never import models, training, pipelines or data",
        importers=("medfm.layers",),
        forbidden=("medfm.models", "medfm.training", "medfm.pipelines", "medfm.data"),
    ),
    Rule(
        "io",
        "io never imports models or processing",
        importers=("medfm.io",),
        forbidden=("medfm.models", "medfm.processing"),
    ),
    Rule(
        "data-training",
        "data and training never import a model family (only registry, modeling_utils, conversion_utils)",
        importers=("medfm.data", "medfm.training"),
        forbidden=FAMILY_PACKAGES,
    ),
    Rule(
        "models",
        "models never import pipelines, training or data",
        importers=("medfm.models",),
        forbidden=("medfm.pipelines", "medfm.training", "medfm.data"),
    ),
)


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # absolute name of the imported module


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    base = package.split(".")
    if node.level - 1 >= len(base):
        raise ValueError(f"relative import beyond the top-level package in {module}, line {node.lineno}")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool, known: set[str], file: Path) -> Iterator[Import]:
    """Every import in ``source`` (the code of ``module``), anywhere in the tree of the file."""
    for node in ast.walk(ast.parse(source, filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(file, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(node, module, is_package)
            yield Import(file, node.lineno, origin)
            for alias in node.names:
                if f"{origin}.{alias.name}" in known:  # `from package import submodule`
                    yield Import(file, node.lineno, f"{origin}.{alias.name}")
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            yield Import(file, node.lineno, node.args[0].value)


def _all_imports() -> list[tuple[str, Import]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(f) for f in files}
    found = []
    for file in files:
        module = _module_name(file)
        source = file.read_text(encoding="utf-8")
        found += [(module, i) for i in imports_of(source, module, file.name == "__init__.py", known, file)]
    return found


ALL_IMPORTS = _all_imports()


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.id)
def test_layering(rule: Rule) -> None:
    violations = sorted(
        {
            f"{i.file.relative_to(SRC.parent)}:{i.line}: imports {i.module} (rule: {rule.name})"
            for module, i in ALL_IMPORTS
            if rule.broken_by(module, i.module)
        }
    )
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_the_rules_cover_real_modules() -> None:
    """Each rule's importers exist, so a renamed package cannot silently switch a rule off."""
    modules = {module for module, _ in ALL_IMPORTS}
    for rule in RULES:
        assert any(_under(m, rule.importers) for m in modules), f"no module under {rule.importers}"
    assert "medfm.models.spad" in FAMILY_PACKAGES
    assert not set(SHARED_MODEL_MODULES) & set(FAMILY_PACKAGES)


def test_the_import_reader() -> None:
    """Relative imports resolve, imports inside functions count, submodules named in ``from`` count."""
    source = (
        "import torch\n"
        "from . import sibling\n"
        "from ..kernels import rope3d\n"
        "from ..io import load_volume\n"
        "def f():\n"
        "    from ..models.spad import SpadViTModel\n"
        "    import importlib\n"
        "    return importlib.import_module('medfm.training.loop')\n"
    )
    known = {"medfm.layers.sibling", "medfm.kernels.rope3d"}
    found = [
        (i.line, i.module)
        for i in imports_of(source, "medfm.layers.example", False, known, Path("example.py"))
    ]
    assert sorted(found) == [
        (1, "torch"),
        (2, "medfm.layers"),
        (2, "medfm.layers.sibling"),
        (3, "medfm.kernels"),
        (3, "medfm.kernels.rope3d"),
        (4, "medfm.io"),
        (6, "medfm.models.spad"),
        (7, "importlib"),
        (8, "medfm.training.loop"),
    ]
    package_source = "from .rope3d import rope3d\nfrom .. import errors\n"
    found = [i.module for i in imports_of(package_source, "medfm.kernels", True, set(), Path("__init__.py"))]
    assert found == ["medfm.kernels.rope3d", "medfm"]
