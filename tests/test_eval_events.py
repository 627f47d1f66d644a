"""`soundfleet eval`'s events: the same events `/v1/classify` returns, counted per clip.

The evaluation runs the product's path in-process; these tests hold it to the running
cloud app (same events for the same clip) and check what is counted as detected,
false and negative-pool time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import torch

from cloud.events import label_policies
from edge.encoder import EdgeEncoder
from shared_models import bundle
from shared_models.detector import load_cloud_models
from shared_models.wavio import read_wav, write_wav
from soundfleet.config import CloudConfig
from training.eval import evaluate_bundle
from training.eval_events import clip_probabilities, event_metrics
from training.sources import load_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def shipped():
    bundle_dir = bundle.default_bundle_dir()
    manifest, code_lm, classifier, centroids = load_cloud_models(bundle_dir)
    return bundle_dir, manifest, code_lm, classifier, centroids


def test_eval_raises_the_events_the_cloud_raises_for_the_same_clip(cloud_app):
    from cloud.classify import clip_events

    bundle_dir, manifest, code_lm, classifier, centroids = shipped()
    audio, _ = read_wav(FIXTURES / "siren_street.wav")
    window, context = classifier.config.window_frames, manifest["code_lm_config"]["context_frames"]
    windows, probs = clip_probabilities(EdgeEncoder(bundle_dir), code_lm, classifier, centroids, audio, window,
                                        context)
    policies = label_policies(cloud_app.config, manifest)
    ours = [(label, e.start_ns, e.end_ns) for label, e in clip_events(windows, list(probs), manifest["labels"],
                                                                      policies, window)]
    response = httpx.post(f"{cloud_app.http_url}/v1/classify", content=(FIXTURES / "siren_street.wav").read_bytes(),
                          headers={"content-type": "audio/wav"}, timeout=60)
    assert response.status_code == 200, response.text
    cloud = [(e["label"], e["start_ns"], e["end_ns"]) for e in response.json()["events"]]
    assert ours == cloud
    assert "siren" in {label for label, _, _ in ours}


def test_detections_false_events_and_the_negative_pool_are_counted_per_clip(tmp_path):
    for folder, name in [("siren", "siren_street.wav"), ("smoke_alarm", "siren_street.wav"),
                         ("_none", "quiet_room.wav"), ("speech", "smoke_alarm_kitchen.wav")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        shutil.copy(FIXTURES / name, tmp_path / folder / f"{folder}-{name}")
    siren, rate = read_wav(FIXTURES / "siren_street.wav")
    write_wav(tmp_path / "siren" / "short.wav", siren[int(2.5 * rate) : int(2.9 * rate)], rate)  # 0.4 s
    dataset = load_dataset(tmp_path)
    bundle_dir, manifest, code_lm, classifier, centroids = shipped()
    policies = label_policies(CloudConfig(), manifest)
    report = event_metrics(dataset.clips, tuple(manifest["labels"]), policies, EdgeEncoder(bundle_dir), code_lm,
                           classifier, centroids, manifest["code_lm_config"]["context_frames"])

    assert report["recall"]["siren"]["clips"] == 2 and report["clips_padded"] == 1  # the 0.4 s clip too
    # the siren clip filed under smoke_alarm: a miss, and its siren is a false event there
    assert report["recall"]["smoke_alarm"] == {"clips": 1, "detected": 0, "recall": 0.0}
    assert report["false_events"]["siren"] >= 1
    # the pool: the unlabelled 4 s clip and the 8 s "speech" clip, whose smoke alarm is false there
    pool = report["negative_pool"]
    assert pool["hours"] == round(12 / 3600, 3)
    assert pool["false_events_by_label"].get("smoke_alarm", 0) >= 1
    assert pool["false_events_per_24h"] == round(pool["false_events"] / (12 / 86400), 2)


def test_the_eval_report_carries_the_events_and_the_policies_it_used(tmp_path):
    (tmp_path / "siren").mkdir()
    shutil.copy(FIXTURES / "siren_street.wav", tmp_path / "siren" / "a.wav")
    config = CloudConfig()
    config.on_threshold = 0.99
    with torch.no_grad():
        report = evaluate_bundle(bundle.default_bundle_dir(), tmp_path, config)
    assert report["events"]["recall"]["siren"]["clips"] == 1
    assert {p["on_threshold"] for p in report["events"]["policies"].values()} == {0.99}
