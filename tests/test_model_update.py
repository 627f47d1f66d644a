"""Edge model rollout on real files, a real local HTTP server and the real broker.

The shipped bundle is the source: packed, served over file:// and http://, fetched,
verified and installed. Every refusal leaves the models dir exactly as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import logging
import queue
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.encoder import EdgeEncoder
from edge.model_update import (
    EDGE_ARCHIVE_MEMBERS,
    ModelUpdateError,
    announcement_for,
    clear_announcement,
    fetch_model,
    installed_name,
    pack_edge_archive,
    prune_models,
    publish_announcement,
    read_current,
    write_current,
)
from shared_models import bundle
from shared_models.constants import PATCH_SAMPLES
from shared_models.wire import MODELS_EDGE_TOPIC, WIRE_VERSION, ModelAnnouncement

BUNDLE = bundle.default_bundle_dir()
log = logging.getLogger(__name__)


# --- helpers and fixtures ---------------------------------------------------------------


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory and records each GET path on the server (to count downloads)."""

    def do_GET(self) -> None:
        self.server.requested_paths.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: nothing outlives a test

    def handle_error(self, request: object, client_address: object) -> None:
        # a client that refuses an archive hangs up mid-response; that is expected here
        log.debug("http: client %s hung up", client_address, exc_info=True)


@dataclasses.dataclass
class Served:
    root: Path  # files here are served at base_url
    base_url: str
    requested_paths: list[str]


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[Served]:
    """A real ThreadingHTTPServer on 127.0.0.1, port 0, serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_CountingHandler, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    server.requested_paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield Served(root, f"http://127.0.0.1:{server.server_address[1]}",
                 server.requested_paths)  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def archive(http_dir: Served) -> tuple[Path, ModelAnnouncement]:
    """The shipped bundle packed into the served dir, announced with a file:// URL."""
    path = http_dir.root / "edge.tar"
    pack_edge_archive(BUNDLE, path)
    return path, announcement_for(BUNDLE, path)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A models dir that already holds one installed model (which no failure may touch)."""
    models = tmp_path / "models"
    previous = models / "sf0-previous-000000000000"
    previous.mkdir(parents=True)
    for name in EDGE_ARCHIVE_MEMBERS:
        shutil.copy(BUNDLE / name, previous / name)
    return models


def _tree(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too) -> sha256 of files, "dir" for directories."""
    return {str(p.relative_to(root)):
            "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _assert_refused(announcement: ModelAnnouncement, models: Path, reason: str,
                    **kwargs: object) -> ModelUpdateError:
    """fetch_model raises with ``reason`` and leaves ``models`` exactly as it was."""
    before = _tree(models)
    with pytest.raises(ModelUpdateError) as info:
        fetch_model(announcement, models, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == reason, info.value
    assert _tree(models) == before  # no new model dir, no temp leftovers, old model untouched
    return info.value


def _copy_edge_bundle(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in EDGE_ARCHIVE_MEMBERS:
        shutil.copy(BUNDLE / name, dest / name)
    return dest


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A hand-made tar, for archives pack_edge_archive would never write."""
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _edge_members(source: Path = BUNDLE) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [_reg(name, (source / name).read_bytes()) for name in EDGE_ARCHIVE_MEMBERS]


def _encode(bundle_dir: Path):
    rng = np.random.default_rng(0)
    gains = np.logspace(-3, -0.3, 64, dtype=np.float32)[:, None]  # quiet to loud, varied codes
    patches = np.clip(rng.standard_normal((64, PATCH_SAMPLES)).astype(np.float32) * gains, -1, 1)
    return EdgeEncoder(bundle_dir).encode(patches)


def test_model_update_loads_without_torch_ray_or_requests() -> None:
    code = ("import sys, edge.model_update\n"
            "print(','.join(sorted(m for m in sys.modules\n"
            "      if m.split('.')[0] in ('torch', 'ray', 'requests', 'pydantic'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"edge.model_update pulled in: {out.stdout.strip()}"


# --- pack and announce --------------------------------------------------------------------


def test_pack_is_deterministic_and_holds_exactly_the_edge_files(tmp_path: Path) -> None:
    copy = _copy_edge_bundle(tmp_path / "copy")  # fresh mtimes and inodes: must not matter
    first = pack_edge_archive(BUNDLE, tmp_path / "a.tar")
    second = pack_edge_archive(copy, tmp_path / "b.tar")
    assert first == second
    assert first == (bundle.file_sha256(tmp_path / "a.tar"), (tmp_path / "a.tar").stat().st_size)
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(EDGE_ARCHIVE_MEMBERS)
        for m in members:
            assert m.isreg() and (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o644)
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            assert data == (BUNDLE / m.name).read_bytes()


def test_pack_refuses_a_bundle_whose_files_do_not_match_its_manifest(tmp_path: Path) -> None:
    copy = _copy_edge_bundle(tmp_path / "copy")
    (copy / bundle.CODEBOOK).write_bytes(b"\0" + (copy / bundle.CODEBOOK).read_bytes()[1:])
    with pytest.raises(bundle.BundleError, match="sha256"):
        pack_edge_archive(copy, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_announcement_describes_the_archive_and_the_manifest(archive) -> None:
    path, announcement = archive
    manifest = bundle.load_manifest(BUNDLE)
    assert announcement.model_version == manifest["model_version"]
    assert announcement.codebook_id == manifest["codebook_id"]
    assert announcement.wire_version == WIRE_VERSION
    assert announcement.sha256 == bundle.file_sha256(path)
    assert announcement.size == path.stat().st_size
    assert announcement.url == path.resolve().as_uri() and announcement.t_ns > 0


# --- fetch and install ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_fetch_installs_a_model_that_encodes_like_the_shipped_one(
        scheme: str, archive, http_dir: Served, models_dir: Path) -> None:
    _path, announcement = archive
    if scheme == "http":
        announcement = dataclasses.replace(announcement, url=f"{http_dir.base_url}/edge.tar")
    installed = fetch_model(announcement, models_dir)
    assert installed == models_dir / installed_name(announcement)
    assert installed.name == f"sf1-a9143974-{announcement.sha256[:12]}"
    assert sorted(p.name for p in installed.iterdir()) == sorted(EDGE_ARCHIVE_MEMBERS)
    assert [p.name for p in models_dir.iterdir() if p.name.startswith(".")] == []
    expected, got = _encode(BUNDLE), _encode(installed)
    assert len(set(expected.codes.tolist())) > 1  # the comparison is not trivially one code
    np.testing.assert_array_equal(got.codes, expected.codes)
    np.testing.assert_allclose(got.embeddings, expected.embeddings, rtol=0, atol=1e-6)
    assert http_dir.requested_paths == (["/edge.tar"] if scheme == "http" else [])


def test_second_fetch_uses_the_installed_copy_and_repairs_a_damaged_one(
        archive, http_dir: Served, models_dir: Path) -> None:
    announcement = dataclasses.replace(archive[1], url=f"{http_dir.base_url}/edge.tar")
    first = fetch_model(announcement, models_dir)
    assert fetch_model(announcement, models_dir) == first
    assert len(http_dir.requested_paths) == 1  # no second download

    (first / bundle.EDGE_MODEL).write_bytes(b"damaged")
    assert fetch_model(announcement, models_dir) == first
    assert len(http_dir.requested_paths) == 2
    bundle.verify_bundle(first, files=(bundle.EDGE_MODEL, bundle.CODEBOOK))
    assert [p.name for p in models_dir.iterdir() if p.name.startswith(".")] == []


def test_wrong_sha256_is_refused_and_names_both_hashes(archive, models_dir: Path) -> None:
    wrong = dataclasses.replace(archive[1], sha256="0" * 64)
    err = _assert_refused(wrong, models_dir, "sha256")
    assert "000000000000" in str(err) and archive[1].sha256[:12] in str(err)


@pytest.mark.parametrize("scheme", ["file", "http"])
@pytest.mark.parametrize("size_delta", [-1, +1])
def test_wrong_size_is_refused(scheme: str, size_delta: int, archive, http_dir: Served,
                               models_dir: Path) -> None:
    announcement = archive[1]
    url = f"{http_dir.base_url}/edge.tar" if scheme == "http" else announcement.url
    wrong = dataclasses.replace(announcement, size=announcement.size + size_delta, url=url)
    _assert_refused(wrong, models_dir, "size")


def test_archive_over_the_size_limit_is_refused_without_downloading(
        archive, http_dir: Served, models_dir: Path) -> None:
    announcement = dataclasses.replace(archive[1], url=f"{http_dir.base_url}/edge.tar")
    _assert_refused(announcement, models_dir, "size", max_bytes=announcement.size - 1)
    assert http_dir.requested_paths == []


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


BAD_ARCHIVES = {
    "extra member": lambda: _edge_members() + [_reg("notes.txt", b"hello")],
    "parent path": lambda: _edge_members() + [_reg("../evil", b"owned")],
    "path instead of name": lambda: [(_reg(f"sub/{info.name}", data) if info.name == bundle.CODEBOOK
                                      else (info, data)) for info, data in _edge_members()],
    "symlink member": lambda: [m for m in _edge_members() if m[0].name != bundle.EDGE_MODEL]
    + [_symlink(bundle.EDGE_MODEL, "/etc/passwd")],
    "directory member": lambda: [_dir("models")] + _edge_members(),
    "missing member": lambda: _edge_members()[:2],
    "duplicate member": lambda: _edge_members() + [_reg(bundle.CODEBOOK, b"second copy")],
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_unsafe_or_unexpected_archive_is_refused(case: str, tmp_path: Path,
                                                 models_dir: Path) -> None:
    path = _write_tar(tmp_path / "bad.tar", BAD_ARCHIVES[case]())
    _assert_refused(announcement_for(BUNDLE, path), models_dir, "archive")
    assert not (tmp_path / "evil").exists() and not (models_dir.parent / "evil").exists()


def test_a_file_that_is_not_a_tar_is_refused(tmp_path: Path, models_dir: Path) -> None:
    path = tmp_path / "noise.tar"
    path.write_bytes(np.random.default_rng(1).bytes(20_000))
    _assert_refused(announcement_for(BUNDLE, path), models_dir, "archive")


def test_tampered_model_file_fails_the_manifest_check(tmp_path: Path, models_dir: Path) -> None:
    copy = _copy_edge_bundle(tmp_path / "tampered")
    onnx = bytearray((copy / bundle.EDGE_MODEL).read_bytes())
    onnx[-1] ^= 0xFF
    (copy / bundle.EDGE_MODEL).write_bytes(bytes(onnx))
    path = _write_tar(tmp_path / "tampered.tar", _edge_members(copy))
    err = _assert_refused(announcement_for(BUNDLE, path), models_dir, "manifest")
    assert bundle.EDGE_MODEL in str(err)


def test_manifest_that_is_not_json_fails_the_manifest_check(tmp_path: Path,
                                                            models_dir: Path) -> None:
    members = [m for m in _edge_members() if m[0].name != bundle.MANIFEST]
    path = _write_tar(tmp_path / "broken.tar", members + [_reg(bundle.MANIFEST, b"{not json")])
    _assert_refused(announcement_for(BUNDLE, path), models_dir, "manifest")


@pytest.mark.parametrize("field, value", [("model_version", "sf1-someother"),
                                          ("codebook_id", 12345)])
def test_announcement_that_does_not_match_the_manifest_is_incompatible(
        field: str, value: object, archive, models_dir: Path) -> None:
    err = _assert_refused(dataclasses.replace(archive[1], **{field: value}), models_dir,
                          "incompatible")
    assert field in str(err)


@pytest.mark.parametrize("field, value", [("wire_version", WIRE_VERSION + 1),
                                          ("model_version", "../escape")])
def test_unusable_announcement_is_refused_before_downloading(
        field: str, value: object, archive, http_dir: Served, models_dir: Path) -> None:
    bad = dataclasses.replace(archive[1], url=f"{http_dir.base_url}/edge.tar", **{field: value})
    _assert_refused(bad, models_dir, "incompatible")
    assert http_dir.requested_paths == []
    assert not (models_dir.parent / "escape").exists()


def test_manifest_wire_version_other_than_ours_is_incompatible(tmp_path: Path,
                                                               models_dir: Path) -> None:
    copy = _copy_edge_bundle(tmp_path / "newer")
    manifest = json.loads((copy / bundle.MANIFEST).read_text())
    manifest["wire_version"] = WIRE_VERSION + 1
    (copy / bundle.MANIFEST).write_text(json.dumps(manifest))
    path = tmp_path / "newer.tar"
    pack_edge_archive(copy, path)
    announcement = dataclasses.replace(announcement_for(copy, path), wire_version=WIRE_VERSION)
    err = _assert_refused(announcement, models_dir, "incompatible")
    assert "wire_version" in str(err)


def _dead_port_url() -> str:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/edge.tar"


@pytest.mark.parametrize("where", ["http 404", "dead port", "missing file"])
def test_unreachable_archive_is_a_download_error(where: str, archive, http_dir: Served,
                                                 tmp_path: Path, models_dir: Path) -> None:
    url = {"http 404": f"{http_dir.base_url}/missing.tar",
           "dead port": _dead_port_url(),
           "missing file": (tmp_path / "missing.tar").as_uri()}[where]
    _assert_refused(dataclasses.replace(archive[1], url=url), models_dir, "download", timeout_s=5.0)


# --- housekeeping and the current-model pointer -----------------------------------------------


def test_prune_keeps_only_the_named_models(archive, models_dir: Path) -> None:
    current = fetch_model(archive[1], models_dir)
    previous = models_dir / "sf0-previous-000000000000"
    stale = shutil.copytree(previous, models_dir / "sf0-stale-111111111111")
    (models_dir / ".download-inflight.tar").write_bytes(b"partial")  # a fetch in progress
    (models_dir / "README").write_text("not a model")
    assert prune_models(models_dir, keep={current, previous}) == [stale]
    assert sorted(p.name for p in models_dir.iterdir()) == sorted(
        [".download-inflight.tar", "README", current.name, previous.name])


def test_current_model_pointer_survives_a_restart_until_the_model_goes(
        archive, models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    assert read_current(state) is None
    installed = fetch_model(archive[1], models_dir)
    write_current(state, installed)
    assert read_current(state) == installed.resolve()
    assert [p.name for p in state.iterdir()] == ["current_model"]  # no tmp left behind

    (installed / bundle.CODEBOOK).write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING, logger="edge.model_update"):
        assert read_current(state) is None
    assert "no longer verifies" in caplog.text

    shutil.rmtree(installed)
    assert read_current(state) is None


# --- announcing on the real broker ---------------------------------------------------------


def test_published_announcement_is_retained_and_round_trips(
        archive, mqtt_client_factory, clear_retained) -> None:
    clear_retained(MODELS_EDGE_TOPIC)  # safety net: other tests share the broker
    announcement = archive[1]
    publisher = mqtt_client_factory(f"test-model-announcer-{uuid.uuid4().hex[:8]}")
    try:
        publish_announcement(publisher, announcement)
        received: queue.Queue = queue.Queue()
        subscriber = mqtt_client_factory(on_message=lambda _c, _u, msg: received.put(msg))
        subscriber.subscribe(MODELS_EDGE_TOPIC, qos=1)
        msg = received.get(timeout=5)
        assert msg.retain
        assert ModelAnnouncement.from_bytes(msg.payload) == announcement
    finally:
        clear_announcement(publisher)

    marker_topic = f"test/model-update/{uuid.uuid4().hex}"
    after: queue.Queue = queue.Queue()
    late = mqtt_client_factory(on_message=lambda _c, _u, msg: after.put(msg))
    late.subscribe([(MODELS_EDGE_TOPIC, 1), (marker_topic, 1)])
    late.publish(marker_topic, b"marker", qos=1)  # arrives after any retained message would
    assert after.get(timeout=5).topic == marker_topic


def test_publish_on_a_disconnected_client_raises(archive, mqtt_client_factory) -> None:
    client = mqtt_client_factory()
    client.disconnect()
    client.loop_stop()
    with pytest.raises(ConnectionError, match="could not publish"):
        publish_announcement(client, archive[1], timeout_s=1.0)
