"""The house plan, checked: the rollout and rewards rooms import nothing of the loop, and every module says its job."""

import ast
from pathlib import Path

import pytest

from helpers import REPO

ROOMS = {"morl": REPO / "morl", "morl.rewards": REPO / "rewards", "morl.rollout": REPO / "rollout"}


def modules(room: str) -> list[Path]:
    return sorted(ROOMS[room].rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("room", ["morl.rewards", "morl.rollout"])
def test_a_room_outside_the_loop_never_imports_it(room):
    reaching_in = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules(room)
        for name in imported(path)
        if name == "morl.run" or name.startswith("morl.run.")
    }
    assert not reaching_in


def test_every_module_states_its_job_in_its_first_docstring_line():
    silent = [
        str(path.relative_to(REPO))
        for room in ROOMS
        for path in modules(room)
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    ]
    assert not silent
