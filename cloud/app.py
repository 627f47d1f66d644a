"""The Serve application: HTTP API ingress composed with ingest and the two models.

    build_app(config) = Api(Ingest(CodeLM, Classifier))

``run_cloud`` starts it on a running Ray cluster (``soundfleet cloud up``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query
from ray import serve

from cloud.ingest import Ingest
from cloud.models import Classifier, CodeLM
from cloud.store import CloudStore
from shared_models import bundle
from soundfleet.config import CloudConfig

log = logging.getLogger(__name__)

APP_NAME = "soundfleet"
api = FastAPI(title="soundfleet", description="Sound events detected from the fleet's code streams.")


@serve.deployment
@serve.ingress(api)
class Api:
    def __init__(self, config: CloudConfig, ingest):
        self.ingest = ingest
        self.store = CloudStore(config.redis_url, config.key_prefix)

    @api.get("/healthz", summary="Liveness and ingest state")
    async def healthz(self) -> dict:
        stats = await self.ingest.stats.remote()
        if not stats["mqtt_connected"]:
            raise HTTPException(status_code=503, detail={"status": "mqtt disconnected", **stats})
        return {"status": "ok", **stats}

    @api.get("/v1/events", summary="Recent events, newest first")
    async def events(
        self,
        site: str | None = Query(None, description="only this site"),
        device: str | None = Query(None, description="only this device"),
        label: str | None = Query(None, description="only this label"),
        since_ns: int = Query(0, description="only events ending at or after this unix time (ns)"),
        limit: int = Query(100, ge=1, le=1000, description="maximum number of events"),
    ) -> list[dict]:
        return self.store.events(site, device, label, since_ns, limit)

    @api.get("/v1/devices", summary="Known devices with their status and counters")
    async def devices(self) -> list[dict]:
        return self.store.devices()


def _gpu_options() -> dict:
    import ray

    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    return {"num_gpus": 0.5 if has_gpu else 0, "num_cpus": 0.5}


def build_app(config: CloudConfig):
    """Compose the application; models get half a GPU each when Ray has one."""
    bundle_dir = str(Path(config.bundle_dir) if config.bundle_dir else bundle.default_bundle_dir())
    bundle.verify_bundle(Path(bundle_dir))
    model_args = (bundle_dir, config.max_batch_size, config.batch_wait_timeout_s)
    gpu = _gpu_options()
    code_lm = CodeLM.options(ray_actor_options=gpu).bind(*model_args)
    classifier = Classifier.options(ray_actor_options=gpu).bind(*model_args)
    ingest = Ingest.options(num_replicas=config.ingest_replicas, ray_actor_options={"num_cpus": 0.5}).bind(config, bundle_dir, code_lm, classifier)
    return Api.options(ray_actor_options={"num_cpus": 0.25}).bind(config, ingest)


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
