"""megatron_plugins/ is the bottom layer: glue with megatron-core that imports nothing from
`neon` (neon may import megatron_plugins, never the reverse).

Every module under megatron_plugins/ is parsed with `ast` and every import is checked, absolute
or relative, at module level or inside a function, class or `if TYPE_CHECKING:` block.
`importlib.import_module("neon...")` / `__import__("neon...")` with a literal name count too.
"""

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "megatron_plugins"
PACKAGE = "megatron_plugins"
FORBIDDEN = "neon"


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute name of `from <level dots><module> import ...` inside `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[:len(parts) - (level - 1)] if level - 1 < len(parts) else []
    return ".".join(base + ([module] if module else []))


def imported_names(source: str, package: str = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package`.
    `from X import y` yields X and X.y (y may be a submodule)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, package)
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}" if module else alias.name) for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "id", None) == "__import__"
                   or getattr(node.func, "attr", None) == "import_module")):
            found.append((node.lineno, node.args[0].value))
    return found


def reaches(name: str, top: str = FORBIDDEN) -> bool:
    return name == top or name.startswith(top + ".")


def violations(source: str, package: str = PACKAGE) -> list[str]:
    return sorted({f"line {line}: {name}" for line, name in imported_names(source, package) if reaches(name)})


def test_megatron_plugins_import_nothing_from_neon():
    modules = sorted(PLUGINS.rglob("*.py"))
    assert len(modules) >= 4, f"expected the plugin modules under {PLUGINS}, found {modules}"
    bad = {}
    for path in modules:
        rel = path.relative_to(PLUGINS.parent)
        package = ".".join(rel.parent.parts)
        found = violations(path.read_text(), package)
        if found:
            bad[str(rel)] = found
    assert not bad, f"megatron_plugins/ must not import neon (move the code into neon/ instead): {bad}"


@pytest.mark.parametrize("source", [
    "import neon",
    "import neon.model",
    "import os, neon.config as c",
    "from neon import model",
    "from neon.flaming.losses import set_aux_loss_scale",
    "def f():\n    from neon.ngpt import NORM_DIM_ATTR\n    return NORM_DIM_ATTR",
    "class A:\n    def m(self):\n        import neon.training.step",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from neon.config import NeonConfig",
    "try:\n    import neon\nexcept ImportError:\n    pass",
    "import importlib\nimportlib.import_module('neon.model')",
    "__import__('neon')",
])
def test_the_check_flags_an_import_of_neon(source):
    assert violations(source), source


@pytest.mark.parametrize("source,package", [
    ("from .. import neon", "megatron_plugins"),  # megatron_plugins sits at the top: ..neon is neon
    ("from ..neon import model", "megatron_plugins"),
    ("from ...neon.config import NeonConfig", "megatron_plugins.sub"),
])
def test_the_check_resolves_relative_imports(source, package):
    assert violations(source, package), (source, package)


@pytest.mark.parametrize("source", [
    "import megatron.core",
    "from megatron_plugins import cpu_runtime",
    "from . import cpu_runtime",
    "from .norm import RMSNorm",
    "import neonlight",
    "from torch import neon",  # an attribute of another package, not the neon package
])
def test_the_check_passes_other_imports(source):
    assert not violations(source), source
