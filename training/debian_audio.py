"""Debian packages as a source of real recordings: fetch a .deb, read the files inside it.

`soundfleet data real` builds its corpus from files shipped in Debian packages
(`training/real_sources.toml` names them). This module does the packaging part with
the standard library only: a .deb is an ``ar`` archive holding ``data.tar.{xz,gz,zst}``;
the files a package installs are that tar's members (``usr/share/...``, no leading
``./``). ``apt-get download`` fetches a package into a cache folder, so a second build
reads the same bytes without the network; a cache filled by hand works the same way.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import logging
import lzma
import posixpath
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

AR_MAGIC = b"!<arch>\n"
AR_HEADER_BYTES = 60
MAX_MEMBER_BYTES = 256 * 1024 * 1024
"""A file inside a package larger than this is skipped, not read (no recording here is near it)."""


class DebianError(RuntimeError):
    """A package cannot be fetched or read; the message names the package and the way out."""


@dataclass(frozen=True)
class DebFile:
    """One fetched package: where its .deb lies and what it is."""

    package: str
    version: str
    path: Path
    sha256: str


def fetch_deb(package: str, cache_dir: Path) -> DebFile:
    """The package's .deb from ``cache_dir``, downloaded there with ``apt-get download`` if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if not cached:
        apt = shutil.which("apt-get")
        if apt is None:
            raise DebianError(f"{package}: not in {cache_dir} and apt-get is not available here: "
                              f"put {package}'s .deb (from any Debian mirror) into {cache_dir}")
        result = subprocess.run([apt, "download", "-q", package], cwd=cache_dir, capture_output=True, text=True)
        cached = sorted(cache_dir.glob(f"{package}_*.deb"))
        if result.returncode != 0 or not cached:
            said = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DebianError(f"{package}: apt-get download failed: {' / '.join(said) or 'no .deb written'}")
    if len(cached) > 1:
        log.warning("%s: %d versions in %s, using %s", package, len(cached), cache_dir, cached[-1].name)
    path = cached[-1]
    _, version, _ = path.stem.split("_", 2)  # name_version_arch, ':' of an epoch written as %3a
    return DebFile(package, unquote(version), path, hashlib.sha256(path.read_bytes()).hexdigest())


def _ar_members(data: bytes, source: str) -> Iterator[tuple[str, bytes]]:
    if not data.startswith(AR_MAGIC):
        raise DebianError(f"{source}: not a Debian package (no ar header)")
    offset = len(AR_MAGIC)
    while offset + AR_HEADER_BYTES <= len(data):
        header = data[offset : offset + AR_HEADER_BYTES]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DebianError(f"{source}: corrupt ar member header at byte {offset}") from None
        start = offset + AR_HEADER_BYTES
        yield name, data[start : start + size]
        offset = start + size + (size % 2)  # members are padded to an even length


def _data_tar(deb: DebFile) -> tarfile.TarFile:
    for name, payload in _ar_members(deb.path.read_bytes(), str(deb.path)):
        if not name.startswith("data.tar"):
            continue
        try:
            if name.endswith(".xz"):
                raw = lzma.decompress(payload)
            elif name.endswith(".gz"):
                raw = gzip.decompress(payload)
            elif name.endswith(".zst"):  # no zstd in the standard library: let dpkg-deb unpack it
                raw = _dpkg_fsys_tarfile(deb)
            elif name == "data.tar":
                raw = payload
            else:
                raise DebianError(f"{deb.path}: unknown compression of {name}")
            return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
        except (lzma.LZMAError, OSError, EOFError, tarfile.TarError, subprocess.CalledProcessError) as exc:
            raise DebianError(f"{deb.path}: {name} is corrupt ({exc}): delete it and fetch the package again") from None
    raise DebianError(f"{deb.path}: no data.tar member")


def _dpkg_fsys_tarfile(deb: DebFile) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise DebianError(f"{deb.path}: data.tar.zst needs dpkg-deb, which is not installed")
    return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb.path)], capture_output=True, check=True).stdout


class PackageFiles:
    """The files a package installs, by path without the leading ``./``; links resolved inside it."""

    def __init__(self, deb: DebFile):
        self.deb = deb
        self._tar = _data_tar(deb)
        self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}

    def paths(self) -> list[str]:
        """Every regular file and link, sorted."""
        return sorted(p for p, m in self._members.items() if m.isfile() or m.issym() or m.islnk())

    def matching(self, pattern: str) -> list[str]:
        return [p for p in self.paths() if fnmatch.fnmatchcase(p, pattern)]

    def read(self, path: str, _depth: int = 0) -> bytes | None:
        """The bytes of ``path``; None for a link that leaves the package or a file over the limit."""
        member = self._members.get(path)
        if member is None or _depth > 8:
            return None
        if member.issym() or member.islnk():
            target = member.linkname.removeprefix("./")
            if member.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname)).lstrip("/")
            return self.read(target, _depth + 1)
        if member.size > MAX_MEMBER_BYTES:
            log.warning("%s: %s is %d bytes, over the %d-byte limit: skipped", self.deb.package, path,
                        member.size, MAX_MEMBER_BYTES)
            return None
        handle = self._tar.extractfile(member)
        return None if handle is None else handle.read()

    def copyright(self) -> str:
        """The package's ``usr/share/doc/<package>/copyright`` (or a note where it is not inside)."""
        text = self.read(f"usr/share/doc/{self.deb.package}/copyright")
        if text is not None:
            return text.decode("utf-8", "replace")
        link = self._members.get(f"usr/share/doc/{self.deb.package}")
        where = f" (usr/share/doc/{self.deb.package} links to {link.linkname})" if link is not None else ""
        return f"{self.deb.package} {self.deb.version}: no copyright file inside the package{where}\n"
