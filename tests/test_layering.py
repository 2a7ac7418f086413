"""Dependencies point inward: a wrong-way import fails here, before review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "enforcer": {"sensor", "stream", "controller", "armorstream"},
    "sensor": {"stream", "controller", "armorstream"},
    "stream": {"sensor", "controller", "armorstream"},
    "controller": {"sensor", "stream", "armorstream"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_packages_exist() -> None:
    for pkg in FORBIDDEN:
        assert (ROOT / pkg / "__init__.py").exists(), pkg


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_no_wrong_way_imports(pkg: str) -> None:
    bad = []
    for path in sorted((ROOT / pkg).rglob("*.py")):
        wrong = imported_top_levels(path) & FORBIDDEN[pkg]
        if wrong:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert not bad, "\n".join(bad)


def test_detector_sees_imports(tmp_path: Path) -> None:
    # The check above can only pass honestly if the detector finds imports at all.
    f = tmp_path / "m.py"
    f.write_text("import sensor.x\nfrom stream import y\nfrom . import z\n")
    assert imported_top_levels(f) == {"sensor", "stream"}
