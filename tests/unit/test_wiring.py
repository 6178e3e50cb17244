"""The daemon wires its objects once, through their constructors: no module of the package
assigns an attribute of the gate, the fleet or the window manager from outside (a reload goes
through `Gate.reconfigure`, a lost store through `Gate.fleet_switch_unreadable`)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "supervisor"
WIRED = {"gate", "fleet", "windows", "approvals"}  # names the daemon holds these objects by


def _patches(tree: ast.AST) -> list[str]:
    """`x.attr = ...` (or augmented) where x is a wired object's name or `self.<name>`."""
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if not isinstance(target, ast.Attribute):
                continue
            owner = target.value
            if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name):
                name = owner.attr if owner.value.id == "self" else None
            elif isinstance(owner, ast.Name):
                name = owner.id
            else:
                name = None
            if name in WIRED:
                found.append(f"line {node.lineno}: {name}.{target.attr} = ...")
    return found


def test_no_module_patches_the_gate_fleet_or_windows_after_building_them() -> None:
    patched = {
        path.name: found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("gate.py", "fleet.py", "sessions.py", "approvals.py")
        and (found := _patches(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert patched == {}


def test_the_check_sees_a_patch() -> None:
    source = "def wire(self, gate):\n    gate.host = 'h'\n    self.fleet.on_alert = None\n"
    assert _patches(ast.parse(source)) == [
        "line 2: gate.host = ...",
        "line 3: fleet.on_alert = ...",
    ]
