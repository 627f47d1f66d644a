"""The Serve application: HTTP API ingress composed with ingest and the two models.

    build_app(config) = Api(Ingest(CodeLM, Classifier), CodeLM, Classifier)

The Api holds handles to the same model deployments the ingest uses, so an
uploaded clip (``POST /v1/classify``) is classified exactly like a device's
stream, batched together with it. Routes (docs/API.md has curl examples;
FastAPI serves the OpenAPI document at /openapi.json and /docs):

    GET  /healthz            liveness and ingest state
    GET  /readyz             MQTT + Redis + both models answer, else 503
    GET  /v1/devices         known devices
    GET  /v1/events          recent events, filtered
    GET  /v1/events/stream   server-sent events, live and resumable
    POST /v1/classify        events in an uploaded WAV
    GET  /metrics            Prometheus text exposition

``run_cloud`` starts it on a running Ray cluster (``soundfleet cloud up``).
"""

# `serve.ingress` pickles the routes when the class is defined: everything they use must be
# defined above the class, and annotations must be real objects (no `from __future__ import
# annotations`: FastAPI would resolve `request: Request` in the replica and fail).
import asyncio
import logging
import re
import time
from pathlib import Path

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from cloud import exposition, sse
from cloud.classify import MAX_UPLOAD_BYTES, ClipClassifier, ClipError, upload_bytes
from cloud.device_log import DeviceLog
from cloud.ingest import Ingest, device_readiness, ingest_readiness, label_policies
from cloud.models import Classifier, CodeLM
from cloud.schemas import (
    STREAM_ID_RE,
    ClassifyResult,
    Device,
    Event,
    Health,
    Problem,
    Readiness,
    parse_stream_start,
    parse_time_ns,
)
from cloud.store import CloudStore, persistence_warning
from shared_models import bundle
from soundfleet.config import CloudConfig

log = logging.getLogger(__name__)

APP_NAME = "soundfleet"
READY_TIMEOUT_S = 5.0
"""Longest a readiness check (or the ingest stats of a scrape) may take."""
API_MAX_ONGOING_REQUESTS = 1000
"""Requests one Api replica holds at once: every open event stream holds one for its lifetime."""

api = FastAPI(
    title="soundfleet",
    version="1",
    description="Sound events detected from the fleet's code streams: query, stream (SSE), "
                "classify an uploaded clip, and metrics. Times are unix ns unless named _s.",
)
SINCE_DOC = "only events ending at or after this time: ISO 8601 (UTC if no zone) or unix ns"
_ERRORS = {400: {"model": Problem}, 422: {"model": Problem}}


def _problem(status_code: int, message: str) -> HTTPException:
    return HTTPException(status_code=status_code, detail=message)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = ClipError(413, f"upload too large: the limit is {limit // (1024 * 1024)} MiB")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(max_ongoing_requests=API_MAX_ONGOING_REQUESTS)
@serve.ingress(api)
class Api:
    def __init__(self, config: CloudConfig, bundle_dir: str, ingest, code_lm, classifier):
        self.config = config
        self.ingest = ingest
        self.store = CloudStore(config.redis_url, config.key_prefix)
        self.device_log = DeviceLog(self.store.r, self.store.key, config.events_maxlen)  # /readyz reads it
        manifest = bundle.verify_bundle(bundle_dir)
        self.clips = ClipClassifier(bundle_dir, manifest, label_policies(config, manifest), code_lm, classifier)
        # one Redis client name for this app's event streams, so an operator can see them (CLIENT LIST)
        self.sse_client_name = "soundfleet-sse:" + re.sub(r"[^A-Za-z0-9:_.-]", "_", config.key_prefix)

    # --- health ------------------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness and ingest state", response_model=Health,
             responses={503: {"description": "the ingest is not connected to the MQTT broker"}})
    async def healthz(self) -> dict:
        stats = await self.ingest.stats.remote()
        if not stats["mqtt_connected"]:
            raise HTTPException(status_code=503, detail={"status": "mqtt disconnected", **stats})
        return {"status": "ok", **stats}

    @api.get("/readyz", summary="Ready to serve: MQTT connected, ingest rounds finishing, Redis answers, both models answer",
             response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
    async def readyz(self):
        async def mqtt_and_ingest() -> dict:
            stats = await self.ingest.stats.remote()
            ready, notes = ingest_readiness(stats, self.config)
            warnings.extend(notes)
            return {"mqtt": True if stats["mqtt_connected"] else "ingest not connected to the broker", "ingest": ready}

        async def redis() -> dict:
            await asyncio.to_thread(self.store.ping)
            persistence = await asyncio.to_thread(self.store.persistence)
            if persistence in ("none", "rdb"):
                warnings.append(persistence_warning(persistence))
            return {"redis": True}

        async def devices() -> dict:
            longest = await asyncio.to_thread(self.device_log.waiting_longest, time.time_ns())
            return {"devices": device_readiness(longest, self.config)}

        warnings: list[str] = []
        names = (("mqtt", "ingest"), ("redis",), ("devices",), ("code_lm", "classifier"))
        checks = (mqtt_and_ingest(), redis(), devices(), self.clips.probe())
        results = await asyncio.gather(*(asyncio.wait_for(c, READY_TIMEOUT_S) for c in checks),
                                       return_exceptions=True)
        outcome: dict[str, bool | str] = {}
        for keys, result in zip(names, results, strict=True):
            for key in keys:
                if isinstance(result, BaseException):
                    outcome[key] = f"{type(result).__name__}: {result}" if str(result) else type(result).__name__
                else:
                    outcome[key] = result[key]
        reasons = [f"{key}: {value}" for key, value in outcome.items() if value is not True]
        body = {"status": "not ready" if reasons else "ready", "reason": "; ".join(reasons),
                "checks": {key: value is True for key, value in outcome.items()}, "warnings": warnings}
        return JSONResponse(body, status_code=503 if reasons else 200)

    # --- devices and events --------------------------------------------------------------------
    @api.get("/v1/devices", summary="Known devices with their status and counters", response_model=list[Device])
    async def devices(self) -> list[dict]:
        return await asyncio.to_thread(self.store.devices)

    @api.get("/v1/events", summary="Recent events, newest first", response_model=list[Event], responses=_ERRORS)
    async def events(
        self,
        site: str | None = Query(None, description="only this site"),
        device: str | None = Query(None, description="only this device"),
        label: str | None = Query(None, description='only this label, e.g. "siren"'),
        since: str | None = Query(None, description=SINCE_DOC, examples=["2026-01-01T12:00:00Z"]),
        since_ns: int = Query(0, description="only events ending at or after this unix time (ns); "
                                             "the larger of since and since_ns applies"),
        limit: int = Query(100, ge=1, le=1000, description="maximum number of events"),
    ) -> list[dict]:
        if since is not None:
            try:
                since_ns = max(since_ns, parse_time_ns(since))
            except ValueError as exc:
                raise _problem(422, str(exc)) from None
        return await asyncio.to_thread(self.store.events, site, device, label, since_ns, limit)

    @api.get(
        "/v1/events/stream",
        summary="Server-sent events: each new event as it is stored; resumable",
        response_class=StreamingResponse,
        responses={200: {"description": "an endless text/event-stream; each message has id (the "
                                         "Redis Stream entry id), event: sound_event and data (the event JSON)",
                         "content": {"text/event-stream": {"example": (
                             'id: 1767225606123-0\nevent: sound_event\ndata: {"event_id":"4f1c...",'
                             '"site":"street","device":"pole-7","label":"siren",...}\n\n: heartbeat\n\n')}}},
                   **_ERRORS, 503: {"model": Problem, "description": "Redis unreachable"}},
    )
    async def event_stream(
        self,
        site: str | None = Query(None, description="only this site"),
        device: str | None = Query(None, description="only this device"),
        label: str | None = Query(None, description="only this label"),
        since: str | None = Query(None, description="replay from here first: a stream entry id (events "
                                  "after it), or a time, ISO 8601 or unix ns (events stored since then); "
                                  "default: only new events", examples=["1767225606123-0"]),
        heartbeat_s: float = Query(sse.HEARTBEAT_S, ge=1, le=300,
                                   description="seconds without a message before a ': heartbeat' comment"),
        last_event_id: str | None = Header(None, alias="Last-Event-ID",
                                           description="resume after this entry id (EventSource sends it "
                                                       "on reconnect); wins over since"),
    ):
        if last_event_id is not None and not STREAM_ID_RE.fullmatch(last_event_id.strip()):
            raise _problem(400, f"Last-Event-ID {last_event_id!r} is not a stream entry id (<ms>-<seq>)")
        try:
            start = last_event_id.strip() if last_event_id else (parse_stream_start(since) if since else None)
        except ValueError as exc:
            raise _problem(422, str(exc)) from None
        where = sse.StreamFilter(site, device, label)
        try:
            body = await sse.open_event_stream(self.config.redis_url, self.store.key("events"), start, where,
                                               heartbeat_s, self.sse_client_name)
        except Exception as exc:  # redis-py connection errors: the stream cannot start
            raise _problem(503, f"event stream unavailable: {exc}") from None
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    # --- clips ----------------------------------------------------------------------------------
    @api.post(
        "/v1/classify",
        summary="Sound events in an uploaded clip, by the fleet's own models and event logic",
        response_model=ClassifyResult,
        responses={**_ERRORS, 413: {"model": Problem, "description": "body over 20 MiB"},
                   415: {"model": Problem, "description": "not a WAV / audio file, or wrong Content-Type"}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "WAV (or FLAC/OGG), any rate and channels, 1 s to 10 min"}}}},
            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
        }}},
    )
    async def classify(
        self,
        request: Request,
        site: str = Query("upload", description="site id written into the returned events"),
        device: str = Query("clip", description="device id written into the returned events"),
    ) -> dict:
        try:
            body = await _read_body(request, MAX_UPLOAD_BYTES)
            data = upload_bytes(request.headers.get("content-type", ""), body)
            return await self.clips.classify(data, site, device)
        except ClipError as exc:
            raise _problem(exc.status_code, str(exc)) from None

    # --- metrics --------------------------------------------------------------------------------
    @api.get("/metrics", summary="Prometheus metrics (text exposition 0.0.4)", response_class=PlainTextResponse,
             responses={200: {"content": {exposition.CONTENT_TYPE: {"example": (
                 "# HELP soundfleet_received_total MQTT messages the ingest received\n"
                 "# TYPE soundfleet_received_total counter\nsoundfleet_received_total 1234\n")}}}})
    async def metrics(self) -> PlainTextResponse:
        try:
            stats = await asyncio.wait_for(self.ingest.stats.remote(), READY_TIMEOUT_S)
        except Exception as exc:  # the scrape still reports what Redis has, with ingest_up 0
            log.warning("metrics: the ingest did not answer: %s", exc)
            stats = None

        def read() -> tuple[dict, dict]:
            return self.store.metrics(), {name: self.store.histogram(name) for name in exposition.HISTOGRAMS}

        counters, histograms = await asyncio.to_thread(read)
        text = exposition.render(counters, stats and {k: v for k, v in stats.items() if k != "metrics"}, histograms)
        return PlainTextResponse(text, media_type=exposition.CONTENT_TYPE)


def _gpu_options() -> dict:
    import ray

    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    return {"num_gpus": 0.5 if has_gpu else 0, "num_cpus": 0.5}


def _model_scaling(config: CloudConfig) -> dict:
    """A fixed replica, or Serve autoscaling between 1 and ``model_max_replicas`` replicas, aiming
    at about one full batch waiting per replica."""
    if config.model_max_replicas <= 1:
        return {"num_replicas": 1}
    return {"autoscaling_config": {"min_replicas": 1, "initial_replicas": 1,
                                   "max_replicas": config.model_max_replicas,
                                   "target_ongoing_requests": config.max_batch_size}}


def build_app(config: CloudConfig, event_settings: dict | None = None):
    """Compose the application; models get half a GPU each when Ray has one.

    The models take as many requests at once as the ingest workers can send (a large round goes
    out in a few chunks) plus two full batches, so a batch can form while the previous one runs
    (Serve's default of 5 would cap every batch at 5, and its router backs off at the cap).
    ``event_settings``
    is the ingest's Serve ``user_config`` (event-logic knobs, see `cloud.events.EVENT_KNOBS`).
    Changing only it in the config of `serve deploy` (infra/serve.yaml) is a lightweight update:
    Serve calls ``Ingest.reconfigure`` on the running replicas instead of replacing them."""
    bundle_dir = str(Path(config.bundle_dir) if config.bundle_dir else bundle.default_bundle_dir())
    bundle.verify_bundle(Path(bundle_dir))
    model_args = (bundle_dir, config.max_batch_size, config.batch_wait_timeout_s, config.redis_url, config.key_prefix)
    in_flight = 2 * config.max_batch_size + 4 * config.ingest_workers * config.ingest_replicas
    model_options = {"ray_actor_options": _gpu_options(), "max_ongoing_requests": in_flight,
                     **_model_scaling(config)}
    code_lm = CodeLM.options(**model_options).bind(*model_args)
    classifier = Classifier.options(**model_options).bind(*model_args)
    ingest = Ingest.options(num_replicas=config.ingest_replicas, ray_actor_options={"num_cpus": 0.5},
                            user_config=event_settings or {}).bind(config, bundle_dir, code_lm, classifier)
    return Api.options(ray_actor_options={"num_cpus": 0.25}).bind(config, bundle_dir, ingest, code_lm, classifier)


def run_cloud(config: CloudConfig, blocking: bool = False):
    """Start Serve's HTTP proxy on the configured address and deploy the app."""
    serve.start(http_options={"host": config.http_host, "port": config.http_port})
    handle = serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=blocking)
    log.info("cloud app up: http://%s:%d", config.http_host, config.http_port)
    return handle


def app_builder(args: dict) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` YAML: ``import_path: cloud.app:app_builder``.

    ``args`` are CloudConfig fields (see infra/serve.yaml); unknown ones are a clear error.
    """
    from soundfleet.config import ConfigError

    known = {f for f in CloudConfig.__dataclass_fields__}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown cloud config fields in Serve args: {', '.join(unknown)}")
    config = CloudConfig(**args)
    config.validate()
    return build_app(config)
