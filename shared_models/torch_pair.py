"""torch and torchaudio must be one release: checked before torchaudio's C++ library loads.

torchaudio's wheels ask only for ``torch>=X.Y``, so an installer left to float can put
torchaudio 2.11.1 beside torch 2.11.0. torchaudio's library is built against one torch and
then fails to load with an ``OSError`` that names a ``.so`` file and neither version. The lock
(``uv.lock``, ``requirements/*.txt``) pins the pair; this check names both versions and the fix
when an environment has drifted from it. Standard library only: it reads installed metadata and
imports nothing heavy.
"""

from __future__ import annotations

from importlib import metadata
from types import ModuleType

REINSTALL_HINT = "reinstall from the lock: python3.11 scripts/deps.py install dev (what ./scripts/test runs)"


class TorchPairError(ImportError):
    """torch and torchaudio are installed from two different releases."""


def release(version: str) -> str:
    """A version without its local build label: ``'2.11.0+cu130'`` -> ``'2.11.0'``."""
    return version.split("+", 1)[0]


def check_torch_pair(torch_version: str | None = None, torchaudio_version: str | None = None) -> str:
    """The pair's release (``'2.11.0'``); :class:`TorchPairError` when the two differ.

    Versions default to the installed distributions' metadata.
    """
    torch_version = torch_version or metadata.version("torch")
    torchaudio_version = torchaudio_version or metadata.version("torchaudio")
    if release(torch_version) != release(torchaudio_version):
        raise TorchPairError(
            f"torchaudio {torchaudio_version} is installed beside torch {torch_version}: torchaudio is "
            f"built for one torch release and loads only beside it; {REINSTALL_HINT}")
    return release(torch_version)


def torchaudio_functional() -> ModuleType:
    """``torchaudio.functional``, after checking the pair (its import loads the C++ library)."""
    check_torch_pair()
    import torchaudio.functional

    return torchaudio.functional
