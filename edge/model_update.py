"""Edge model rollout: pack a bundle's edge half, announce it, fetch, verify and install it.

The agent swaps models while it runs, so all that can go wrong with a new one (download,
size, hash, archive tricks, manifest, compatibility) fails here, before the swap, with a
short ``reason`` the agent reports while it keeps the old model. stdlib + paho: no torch.
On the edge::

    models_dir/<model_version>-<sha256[:12]>/  an installed model: manifest.json, edge.onnx,
                                               codebook.npy (verified before it got this name)
    models_dir/.download-*, .extract-*         in-flight temp entries, removed on any failure
    state_dir/current_model                    path of the model in use, so a restart keeps it
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import paho.mqtt.client as mqtt

from shared_models import bundle
from shared_models.wire import MODELS_EDGE_TOPIC, WIRE_VERSION, ModelAnnouncement

log = logging.getLogger(__name__)

EDGE_ARCHIVE_MEMBERS = (bundle.MANIFEST, bundle.EDGE_MODEL, bundle.CODEBOOK)
VERIFIED_FILES = (bundle.EDGE_MODEL, bundle.CODEBOOK)  # hashed in the manifest, needed on the edge
MAX_ARCHIVE_BYTES = 64 * 1024 * 1024  # the shipped edge archive is < 1 MiB
MAX_MANIFEST_BYTES = 1024 * 1024  # a manifest is a few KiB of JSON
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation, as urllib applies it
PUBACK_TIMEOUT_S = 10.0
CHUNK_BYTES = 64 * 1024
CURRENT_MODEL_FILE = "current_model"
# model_version becomes a directory name: no "/", no "..", no hidden names
_SAFE_VERSION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
# what verify_bundle raises on a manifest that is missing, not JSON or not the expected dict
_MANIFEST_ERRORS = (bundle.BundleError, KeyError, TypeError, AttributeError, ValueError, OSError)

UpdateFailure = Literal["download", "size", "sha256", "archive", "manifest", "incompatible"]


class ModelUpdateError(RuntimeError):
    """A new model could not be installed; the agent reports ``reason`` and keeps the old one.

    reason: "download" (URL unreachable, HTTP error, local write failed), "size" (larger
    than announced or allowed, or shorter than announced), "sha256" (archive hash differs),
    "archive" (not a tar of exactly the expected regular files), "manifest" (the manifest's
    per-file hashes do not match) or "incompatible" (version, codebook or wire differ)."""

    def __init__(self, reason: UpdateFailure, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# --- the cloud / operator side: pack and announce ------------------------------------


def pack_edge_archive(bundle_dir: str | Path, out_path: str | Path) -> tuple[str, int]:
    """Write the edge half of a bundle as an uncompressed tar; returns (sha256 hex, size bytes).

    Deterministic (sorted members, mtime 0, owner 0, mode 0644, no directories) so the
    same bundle always hashes the same and re-announcing it makes no agent download again.
    """
    bundle_dir, out_path = Path(bundle_dir), Path(out_path)
    bundle.verify_bundle(bundle_dir, files=VERIFIED_FILES)
    with _atomic_file(out_path) as out:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(EDGE_ARCHIVE_MEMBERS):
                info = tarfile.TarInfo(name)
                info.size = (bundle_dir / name).stat().st_size
                info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0  # uname ""
                with open(bundle_dir / name, "rb") as src:
                    tar.addfile(info, src)
    return bundle.file_sha256(out_path), out_path.stat().st_size


def announcement_for(bundle_dir: str | Path, archive_path: str | Path,
                     url: str | None = None) -> ModelAnnouncement:
    """Announce ``archive_path``, packed from ``bundle_dir``; url defaults to its file:// URI."""
    archive_path = Path(archive_path).resolve()
    manifest = bundle.load_manifest(Path(bundle_dir))
    return ModelAnnouncement(
        model_version=manifest["model_version"],
        codebook_id=manifest["codebook_id"],
        wire_version=manifest["wire_version"],
        sha256=bundle.file_sha256(archive_path),
        size=archive_path.stat().st_size,
        url=url or archive_path.as_uri(),
        t_ns=time.time_ns(),
    )


def publish_announcement(client: mqtt.Client, announcement: ModelAnnouncement, *,
                         timeout_s: float = PUBACK_TIMEOUT_S) -> None:
    """Publish ``announcement`` retained at QoS 1 on MODELS_EDGE_TOPIC and wait for the PUBACK.

    ``client`` must be connected with its network loop running (loop_start)."""
    what = f"model {announcement.model_version}"
    _publish_retained(client, announcement.to_bytes(), timeout_s, what)


def clear_announcement(client: mqtt.Client, *, timeout_s: float = PUBACK_TIMEOUT_S) -> None:
    """Remove the retained announcement (an empty retained payload), e.g. after a test."""
    _publish_retained(client, b"", timeout_s, "an empty retained payload")


def _publish_retained(client: mqtt.Client, payload: bytes, timeout_s: float, what: str) -> None:
    info = client.publish(MODELS_EDGE_TOPIC, payload, qos=1, retain=True)
    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
        raise ConnectionError(f"could not publish {what} on {MODELS_EDGE_TOPIC}: "
                              f"{mqtt.error_string(info.rc)}")
    info.wait_for_publish(timeout_s)
    if not info.is_published():
        raise TimeoutError(f"no PUBACK for {what} on {MODELS_EDGE_TOPIC} within {timeout_s:g} s "
                           "(is the client connected with its loop running?)")
    log.info("published %s retained on %s", what, MODELS_EDGE_TOPIC)


# --- the edge side: fetch, verify, install --------------------------------------------


def installed_name(announcement: ModelAnnouncement) -> str:
    """Directory name of an installed model: version for people, hash prefix for uniqueness."""
    return f"{announcement.model_version}-{announcement.sha256[:12]}"


def fetch_model(announcement: ModelAnnouncement, models_dir: str | Path, *,
                max_bytes: int = MAX_ARCHIVE_BYTES, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download, verify and install the announced model; returns its directory.

    Idempotent: an installed copy that still verifies is returned without a download.
    Raises ModelUpdateError; on any failure the temp files are removed and installed
    models are left as they were (a damaged copy of this same model is only replaced
    once its verified replacement is ready).
    """
    models_dir = Path(models_dir)
    _check_announcement(announcement, max_bytes)
    target = models_dir / installed_name(announcement)
    if target.is_dir():
        try:
            _check_bundle(target, announcement)
        except ModelUpdateError as err:
            log.warning("installed model %s does not verify (%s); fetching it again", target, err)
        else:
            log.debug("model %s is already installed at %s", announcement.model_version, target)
            return target
    archive = _download(announcement, models_dir, max_bytes, timeout_s)
    try:
        staged = _extract(archive, models_dir, max_bytes)
    finally:
        archive.unlink(missing_ok=True)
    try:
        _check_bundle(staged, announcement)
        _install(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info("installed model %s at %s", announcement.model_version, target)
    return target


def _check_announcement(announcement: ModelAnnouncement, max_bytes: int) -> None:
    """Refuse what no download could fix, before downloading."""
    version, wire = announcement.model_version, announcement.wire_version
    if wire != WIRE_VERSION:
        raise ModelUpdateError("incompatible", f"wire version {wire} != this agent's {WIRE_VERSION}")
    if _SAFE_VERSION_RE.fullmatch(version) is None:
        raise ModelUpdateError("incompatible", f"model_version {version!r} is no safe dir name")
    if announcement.size > max_bytes:
        raise ModelUpdateError("size", f"archive is {announcement.size} bytes > limit {max_bytes}")


def _check_bundle(bundle_dir: Path, announcement: ModelAnnouncement) -> None:
    """The manifest's per-file hashes hold and it describes the announced, compatible model."""
    try:
        manifest = bundle.verify_bundle(bundle_dir, files=VERIFIED_FILES)
    except _MANIFEST_ERRORS as err:
        raise ModelUpdateError("manifest", str(err)) from err
    expected = {"model_version": announcement.model_version,
                "codebook_id": announcement.codebook_id, "wire_version": WIRE_VERSION}
    problems = [f"manifest {key} {manifest.get(key)!r} != {value!r}"
                for key, value in expected.items() if manifest.get(key) != value]
    if problems:
        raise ModelUpdateError("incompatible", "; ".join(problems))


@contextlib.contextmanager
def _open_url(url: str, timeout_s: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """(stream, declared length or None) for a file://, http:// or https:// URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URL names a remote host {parts.netloc!r}")
        with open(urllib.request.url2pathname(parts.path), "rb") as f:
            yield f, None
        return
    request = urllib.request.Request(url, headers={"User-Agent": "soundfleet-edge"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        length = response.headers.get("Content-Length")
        yield response, int(length) if length and length.isdigit() else None


def _download(announcement: ModelAnnouncement, models_dir: Path, max_bytes: int,
              timeout_s: float) -> Path:
    """Stream the archive into a temp file while hashing; returns the temp file."""
    url, limit_bytes = announcement.url, min(announcement.size, max_bytes)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=models_dir, prefix=".download-", suffix=".tar")
    except OSError as err:
        raise ModelUpdateError("download", f"cannot write to {models_dir}: {err}") from err
    path = Path(tmp_name)
    digest = hashlib.sha256()
    received_bytes = 0
    try:
        try:
            with os.fdopen(fd, "wb") as out, _open_url(url, timeout_s) as (src, declared):
                if declared is not None and declared > limit_bytes:
                    raise ModelUpdateError("size", f"{url} is {declared} bytes > {limit_bytes}")
                while chunk := src.read(CHUNK_BYTES):
                    received_bytes += len(chunk)
                    if received_bytes > limit_bytes:
                        raise ModelUpdateError("size", f"{url} sent over {limit_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, ValueError, http.client.HTTPException) as err:
            raise ModelUpdateError("download", f"{url}: {err}") from err
        if received_bytes != announcement.size:
            raise ModelUpdateError(
                "size", f"{url} sent {received_bytes} bytes, announced {announcement.size}")
        actual, expected = digest.hexdigest(), announcement.sha256
        if actual != expected:
            raise ModelUpdateError(
                "sha256", f"archive sha256 {actual[:12]}.. != announced {expected[:12]}..")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _extract(archive: Path, models_dir: Path, max_bytes: int) -> Path:
    """Extract exactly EDGE_ARCHIVE_MEMBERS into a temp dir under models_dir; returns it.

    Members are copied by hand rather than with extractall, so nothing in a header (path,
    link, mode, owner) can reach anything but the three expected file names."""
    try:
        staged = Path(tempfile.mkdtemp(dir=models_dir, prefix=".extract-"))
    except OSError as err:
        raise ModelUpdateError("archive", f"cannot extract into {models_dir}: {err}") from err
    try:
        try:
            with tarfile.open(archive, mode="r:") as tar:  # uncompressed only: no zip bombs
                for member in _checked_members(tar.getmembers(), max_bytes):
                    src = tar.extractfile(member)
                    if src is None:
                        raise ModelUpdateError("archive", f"cannot read member {member.name!r}")
                    with src, open(staged / member.name, "xb") as out:
                        shutil.copyfileobj(src, out, CHUNK_BYTES)
                        out.flush()
                        os.fsync(out.fileno())  # durable before the rename makes it "installed"
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ModelUpdateError("archive", f"cannot extract {archive.name}: {err}") from err
        os.chmod(staged, 0o755)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _checked_members(members: list[tarfile.TarInfo], max_bytes: int) -> list[tarfile.TarInfo]:
    """The members if they are exactly the expected regular files, else ModelUpdateError."""
    problems = []
    for member in members:
        limit_bytes = MAX_MANIFEST_BYTES if member.name == bundle.MANIFEST else max_bytes
        if member.name not in EDGE_ARCHIVE_MEMBERS:
            problems.append(f"unexpected member {member.name!r}")
        elif member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):  # links, dirs, sparse...
            problems.append(f"member {member.name!r} is not a regular file")
        elif member.size > limit_bytes:
            problems.append(f"member {member.name!r} is {member.size} bytes > limit {limit_bytes}")
    names = [member.name for member in members]
    problems += [f"member {name!r} appears {names.count(name)} times"
                 for name in EDGE_ARCHIVE_MEMBERS if names.count(name) > 1]
    problems += [f"member {name!r} is missing"
                 for name in EDGE_ARCHIVE_MEMBERS if name not in names]
    if problems:
        raise ModelUpdateError("archive", "; ".join(problems))
    return members


def _install(staged: Path, target: Path) -> None:
    """Rename the verified staging dir to its final name (atomic on one filesystem)."""
    trash = target.with_name(f".trash-{uuid.uuid4().hex[:8]}")
    try:
        if target.exists():  # a damaged copy of this model: move it aside, swap, then delete it
            os.rename(target, trash)
        os.rename(staged, target)
    except OSError as err:
        raise ModelUpdateError("archive", f"cannot install at {target}: {err}") from err
    shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` through a hidden temp file + os.replace: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; a file server may be another user
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` survive a power cut (a no-op where directories cannot sync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune_models(models_dir: str | Path, keep: Iterable[str | Path]) -> list[Path]:
    """Delete installed model dirs in ``models_dir`` not in ``keep``; returns those deleted.

    The agent keeps the current and the previous model. Hidden temp entries (a fetch in
    progress), plain files and symlinks are left alone."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    keep_resolved = {Path(path).resolve() for path in keep}
    removed = []
    for entry in sorted(models_dir.iterdir()):
        not_a_model = entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir()
        if not_a_model or entry.resolve() in keep_resolved:
            continue
        try:
            shutil.rmtree(entry)
        except OSError as err:
            log.warning("could not delete old model %s: %s", entry, err)
            continue
        log.info("deleted old model %s", entry)
        removed.append(entry)
    return removed


# --- which model is in use, across restarts -------------------------------------------


def write_current(state_dir: str | Path, bundle_dir: str | Path) -> Path:
    """Record ``bundle_dir`` as the model in use (atomic: tmp + os.replace); returns the pointer."""
    pointer = Path(state_dir) / CURRENT_MODEL_FILE
    with _atomic_file(pointer) as out:
        out.write(f"{Path(bundle_dir).resolve()}\n".encode())
    return pointer


def read_current(state_dir: str | Path) -> Path | None:
    """The model recorded by write_current, or None if there is none or it no longer verifies."""
    pointer = Path(state_dir) / CURRENT_MODEL_FILE
    try:
        text = pointer.read_text(encoding="utf-8").strip("\n")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        log.warning("cannot read %s (%s); using the configured model", pointer, err)
        return None
    bundle_dir = Path(text)
    try:
        bundle.verify_bundle(bundle_dir, files=VERIFIED_FILES)
    except _MANIFEST_ERRORS as err:
        log.warning("%s names %s, which no longer verifies (%s); using the configured model",
                    pointer, bundle_dir, err)
        return None
    return bundle_dir

