"""Install soundfleet from its lock, and keep the lock in step with pyproject.toml.

Standard library only: it runs before anything is installed.

    python3.11 scripts/deps.py install dev [--venv .venv]        # what ./scripts/demo and ./scripts/test run
    python3.11 scripts/deps.py install edge --venv /opt/soundfleet  # a device: no torch, no ray
    python3.11 scripts/deps.py lock [--check | --upgrade]        # what scripts/lock runs

The lock is `uv.lock`: one universal resolution (Python 3.11, Linux x86_64 and aarch64) written
by uv from pyproject.toml. `lock` exports it, with hashes, to one pip requirements file per
documented install (LOCKS). `install` feeds such a file to plain pip in hash-checking mode with
--no-deps, so nothing is resolved on the installing machine and every byte is named by the lock;
it works in stages with one line each, because the dev set is a few GB.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "uv.lock"
REQUIREMENTS = ROOT / "requirements"
LOCKS = {  # install name -> what `uv export` puts in requirements/<name>.txt
    "dev": ("everything: cloud, training, tests (./scripts/demo, ./scripts/test)",
            ["--extra", "dev", "--group", "test", "--group", "build"]),
    "edge": ("the edge agent alone: numpy, onnxruntime, paho-mqtt, audio I/O; no torch, no ray",
             ["--extra", "edge", "--group", "build"]),
    "edge-test": ("the edge agent and the test runner (the edge-only test environment)",
                  ["--extra", "edge", "--group", "test", "--group", "build"]),
}
REFRESH_HINT = "run scripts/lock, then commit uv.lock and requirements/"
NOT_SOURCE = (".git", ".venv", "build", "runs", "tmp", "__pycache__", "*.egg-info", ".*_cache")
KEEP = {"pip", "soundfleet"}  # installed in every venv but not named by the lock
# pip warns about each configured local index folder that lacks a package: noise, not news
PIP_NOISE = re.compile(r"^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$")


class DepsError(RuntimeError):
    """Something the user must fix; the message says what."""


# ---- the requirements files -----------------------------------------------------------------


@dataclass(frozen=True)
class Locked:
    """One package of a requirements file: its pinned line, hashes and comments, verbatim."""

    name: str  # normalised (PEP 503)
    version: str
    text: str


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> list[Locked]:
    if not path.is_file():
        raise DepsError(f"{path.relative_to(ROOT)} is missing: {REFRESH_HINT}")
    blocks: list[list[str]] = []
    for line in path.read_text().splitlines():
        if line.startswith((" ", "\t")) and blocks:
            blocks[-1].append(line)  # a hash or a "# via" under the current package
        elif line.strip() and not line.startswith("#"):
            blocks.append([line])
    packages = []
    for block in blocks:
        pin = re.match(r"([A-Za-z0-9._-]+)==([^\s;]+)", block[0])
        if pin is None:
            raise DepsError(f"{path.name}: not an exact pin: {block[0]!r}: {REFRESH_HINT}")
        packages.append(Locked(normalise(pin[1]), pin[2], "\n".join(block)))
    return packages


@functools.cache
def wheel_bytes() -> dict[str, int]:
    """Per package of uv.lock, the size of the file this machine downloads (its matching wheel)."""
    machine = platform.machine()
    sizes = {}
    for package in tomllib.loads(LOCK_FILE.read_text())["package"]:
        matching = [w.get("size", 0) for w in package.get("wheels", [])
                    if re.search(rf"-(cp311|py3|py2\.py3)-[^-]+-(any|.*{machine})\.whl$", w["url"])]
        sizes[package["name"]] = max(matching, default=package.get("sdist", {}).get("size", 0))
    return sizes


def download_bytes(packages: list[Locked]) -> int:
    return sum(wheel_bytes().get(p.name, 0) for p in packages)


# ---- installing -----------------------------------------------------------------------------

# Stages, in order: (title, which packages). The last takes what is left.
STAGES = [
    ("build tools", lambda name: name in {"setuptools", "wheel", "uv"}),
    ("torch, torchaudio and the CUDA libraries torch loads",
     lambda name: name in {"torch", "torchaudio", "triton"} or name.startswith(("nvidia-", "cuda-"))),
    ("the rest", lambda name: True),
]


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def tree_bytes(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def run_quiet(command: list[str], what: str) -> None:
    """Run ``command``; show its output only where it says something, all of it when it fails."""
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if not PIP_NOISE.match(line)]
    if result.returncode != 0:
        raise DepsError(f"{what} failed (exit {result.returncode}):\n" + "\n".join(lines[-60:]))
    for line in lines:
        print(f"      {line}", file=sys.stderr)


def pip(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--no-input"]


def stamp_of(name: str, editable: bool) -> str:
    """What the venv was made from: the requirements file, pyproject.toml and the install mode."""
    digest = hashlib.sha256(f"{name} editable={editable}\n".encode())
    for path in (REQUIREMENTS / f"{name}.txt", ROOT / "pyproject.toml"):
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def install(name: str, venv: Path, editable: bool) -> None:
    stamp = venv / ".soundfleet-lock"
    if stamp.is_file() and stamp.read_text().strip() == stamp_of(name, editable):
        return  # this venv is that lock already
    packages = read_requirements(REQUIREMENTS / f"{name}.txt")
    stages = []
    left = list(packages)
    for title, wanted in STAGES:
        mine = [p for p in left if wanted(p.name)]
        left = [p for p in left if not wanted(p.name)]
        if mine:
            stages.append((title, mine))
    steps = 1 + len(stages) + (name == "dev") + 1
    step = iter(range(1, steps + 1))
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{next(step)}/{steps}] {text}", file=sys.stderr, flush=True)

    if (venv / "bin" / "python").exists():
        say(f"updating {venv} to requirements/{name}.txt")
    else:
        say(f"creating {venv} with Python {platform.python_version()}")
        run_quiet([sys.executable, "-m", "venv", str(venv)], "creating the venv")
    stamp.unlink(missing_ok=True)  # an interrupted install must not look finished

    for title, mine in stages:
        biggest = sorted(mine, key=lambda p: -download_bytes([p]))[:3]
        headline = ", ".join(f"{p.name} {p.version}" for p in biggest) + (", ..." if len(mine) > 3 else "")
        say(f"{title}: {len(mine)} packages ({headline}), {human_bytes(download_bytes(mine))} of wheels")
        t0 = time.monotonic()
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix=f"soundfleet-{name}-") as part:
            part.write("\n".join(p.text for p in mine) + "\n")
            part.flush()
            run_quiet([*pip(venv), "install", "--quiet", "--require-hashes", "--no-deps", "-r", part.name],
                      f"pip install ({title})")
        print(f"      done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        if title == "build tools" and name == "dev":
            say("checking the lock against pyproject.toml")
            check_lock(venv / "bin" / "uv")

    say(f"soundfleet itself ({'editable' if editable else 'a copy'}), then pip check")
    remove_unlocked(venv, {p.name for p in packages})
    with tempfile.TemporaryDirectory(prefix="soundfleet-src-") as scratch:
        source = ROOT
        if not editable:  # setuptools builds in the source tree: keep build/ out of the checkout
            source = Path(scratch) / "soundfleet"
            shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
        run_quiet([*pip(venv), "install", "--quiet", "--no-deps", "--no-build-isolation",
                   *(["-e"] if editable else []), str(source)], "installing soundfleet")
    run_quiet([*pip(venv), "--quiet", "check"], "pip check")
    stamp.write_text(stamp_of(name, editable) + "\n")
    print(f"      {venv}: {human_bytes(tree_bytes(venv))}, ready in {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)


def remove_unlocked(venv: Path, locked: set[str]) -> None:
    """Uninstall what an earlier install left that this lock does not name, so the venv is the lock."""
    listed = subprocess.run([*pip(venv), "list", "--format", "json"], capture_output=True, text=True, check=True)
    extra = sorted({normalise(d["name"]) for d in json.loads(listed.stdout)} - locked - KEEP)
    if extra:
        print(f"      removing what the lock does not name: {', '.join(extra)}", file=sys.stderr)
        run_quiet([*pip(venv), "uninstall", "--quiet", "--yes", *extra], "pip uninstall")


# ---- the lock -------------------------------------------------------------------------------


def find_uv() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise DepsError("uv is not installed: ./scripts/test installs the locked one into .venv "
                    "(or pip install uv)")


def export(uv: str | Path, name: str) -> str:
    """requirements/<name>.txt as uv exports it from uv.lock now."""
    description, args = LOCKS[name]
    result = subprocess.run([str(uv), "export", "--frozen", "--no-emit-project", "--no-header", "--quiet",
                             "--format", "requirements-txt", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise DepsError(f"uv export ({name}) failed:\n{result.stderr}")
    return (f"# soundfleet's {name} install: {description}.\n"
            f"# Written by scripts/lock from uv.lock; do not edit. "
            f"Installed by: python3.11 scripts/deps.py install {name}\n" + result.stdout)


def check_lock(uv: str | Path) -> None:
    """Fail, saying what to run, when uv.lock or an export no longer matches pyproject.toml."""
    result = subprocess.run([str(uv), "lock", "--check", "--offline", "--quiet"], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise DepsError(f"uv.lock does not match pyproject.toml: {REFRESH_HINT}\n"
                        f"(uv lock --check said: {result.stderr.strip()[:2000]})")
    stale = [name for name in LOCKS
             if not (REQUIREMENTS / f"{name}.txt").is_file()
             or (REQUIREMENTS / f"{name}.txt").read_text() != export(uv, name)]
    if stale:
        raise DepsError(f"requirements/{{{','.join(stale)}}}.txt do not match uv.lock: {REFRESH_HINT}")


def refresh_lock(uv: str, upgrade: bool) -> None:
    subprocess.run([uv, "lock", *(["--upgrade"] if upgrade else [])], cwd=ROOT, check=True)
    REQUIREMENTS.mkdir(exist_ok=True)
    for name in LOCKS:
        (REQUIREMENTS / f"{name}.txt").write_text(export(uv, name))
        print(f"wrote requirements/{name}.txt", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p_install = commands.add_parser("install", help="make a venv from one of the locks")
    p_install.add_argument("name", choices=sorted(LOCKS))
    p_install.add_argument("--venv", type=Path, default=ROOT / ".venv")
    p_install.add_argument("--editable", action=argparse.BooleanOptionalAction, default=None,
                           help="install soundfleet as a link to this checkout (default: for dev only)")
    p_lock = commands.add_parser("lock", help="refresh uv.lock and requirements/ from pyproject.toml")
    mode = p_lock.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only check they match; exit 1 if not")
    mode.add_argument("--upgrade", action="store_true", help="take the newest versions pyproject.toml allows")
    args = parser.parse_args(argv)
    if args.command == "install" and sys.version_info[:2] != (3, 11):
        print(f"soundfleet needs Python 3.11, not {platform.python_version()} (set PYTHON=/path/to/python3.11)",
              file=sys.stderr)
        return 1
    try:
        if args.command == "install":
            editable = args.name == "dev" if args.editable is None else args.editable
            install(args.name, args.venv.absolute(), editable)
        elif args.check:
            check_lock(find_uv())
            print("uv.lock and requirements/ match pyproject.toml", file=sys.stderr)
        else:
            refresh_lock(find_uv(), args.upgrade)
    except DepsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
