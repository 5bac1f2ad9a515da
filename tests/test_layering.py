"""Import layering that the code's structure depends on: ``kernels/`` below ``serving/``, and the
attention interface apart from its implementations (read from the sources, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]


def imported_modules(path: Path) -> set[str]:
    """Modules ``path`` imports, relative ones as written (``..engine``, ``.cpu_backend``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_kernels_import_nothing_of_the_engine_package():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        above = [
            m
            for m in imported_modules(path)
            if m.startswith("..") or (m.startswith("prefixserve") and "kernels" not in m)
        ]
        assert not above, f"{path.name} imports {above} from the package above kernels/"


def test_attention_interface_imports_none_of_its_implementations():
    imports = imported_modules(ROOT / "serving" / "attention.py")
    for implementation in (".cpu_backend", ".triton_backend", ".backends", ".cuda_graphs"):
        assert implementation not in imports
