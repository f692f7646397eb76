"""The house plan, checked: the rooms the loop uses import nothing of it, no modules import each other in a circle,
and every module says its job."""

import ast
from pathlib import Path

import pytest

from helpers import REPO

ROOMS = {"morl": REPO / "morl", "morl.rewards": REPO / "rewards", "morl.rollout": REPO / "rollout"}  # package-dir


def modules(room: str) -> list[Path]:
    """The files of a room: a package of ROOMS, or a folder of morl (`morl.toy`: morl/toy)."""
    return sorted(ROOMS.get(room, REPO.joinpath(*room.split("."))).rglob("*.py"))


def module_name(room: str, path: Path) -> str:
    parts = path.relative_to(ROOMS[room]).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((room, *parts))


def imported(path: Path) -> set[str]:
    """Every name an import of the file may load as a module, at module level or in a function (`from a import b`
    loads a.b when b is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def packages_of(name: str) -> list[str]:
    """`a.b.c` -> [a, a.b]: what importing a.b.c runs first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules its imports run (its own packages left out: they run first)."""
    paths = {module_name(room, path): path for room in ROOMS for path in modules(room)}
    return {
        module: {
            target
            for name in imported(path)
            for target in (*packages_of(name), name)
            if target in paths and target != module and target not in packages_of(module)
        }
        for module, path in paths.items()
    }


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk closes, each as the modules along it; none exactly when there is no circle."""
    circles: list[list[str]] = []
    on_path: list[str] = []
    done: set[str] = set()

    def walk(module: str) -> None:
        on_path.append(module)
        for target in sorted(graph[module]):
            if target in on_path:
                circles.append(on_path[on_path.index(target):] + [target])
            elif target not in done:
                walk(target)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            walk(module)
    return circles


@pytest.mark.parametrize("room", ["morl.algo", "morl.data", "morl.learner", "morl.toy", "morl.rewards", "morl.rollout"])
def test_a_room_the_loop_uses_never_imports_the_loop(room):
    reaching_in = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules(room)
        for name in imported(path)
        if name == "morl.run" or name.startswith("morl.run.")
    }
    assert not reaching_in


def test_no_modules_import_each_other_in_a_circle():
    assert [" -> ".join(circle) for circle in import_circles(import_graph())] == []


def test_every_module_states_its_job_in_its_first_docstring_line():
    silent = [
        str(path.relative_to(REPO))
        for room in ROOMS
        for path in modules(room)
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    ]
    assert not silent



def engine_compares(source: str) -> list[int]:
    """The lines that compare `rollout.engine` by name: an engine's name against anything, or an `engine` against
    a string (`engine == "vllm"`, `rc.engine in ("hf",)`)."""
    from morl.rollout.engines import ENGINES

    def strings(node: ast.expr) -> set[str]:
        elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}

    def is_engine(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id == "engine") or (
            isinstance(node, ast.Attribute) and node.attr == "engine"
        )

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = set().union(*map(strings, operands))
            if named & set(ENGINES) or (named and any(map(is_engine, operands))):
                lines.append(node.lineno)
    return sorted(lines)


def test_only_the_engine_registry_compares_engine_names():
    """Every difference between engines is declared in rollout/engines.py (`ENGINES`), never `engine == ...`."""
    registry = ROOMS["morl.rollout"] / "engines.py"
    compares = [
        f"{path.relative_to(REPO)}:{line}"
        for room in ROOMS
        for path in modules(room)
        if path != registry
        for line in engine_compares(path.read_text())
    ]
    assert compares == []


def test_the_engine_compare_check_finds_each_kind_of_compare():
    source = """
if cfg.rollout.engine == "vllm":
    pass
keep = engine != "sglang"
sent = "hf" in (name,)
fine = cfg.rollout.colocate and self.engine is None
"""
    assert engine_compares(source) == [2, 4, 5]
