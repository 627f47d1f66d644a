"""The label-free pretraining switch, the windows every model is scored on, and the
comparison's checks before it trains anything."""

import json
import shutil

import numpy as np
import pytest

from shared_models import bundle
from soundfleet.config import ConfigError, load_config
from training.corpus import synthesize_corpus
from training.dataset import FramedClip, window_targets
from training.pipeline import pretraining_clips, span_targets, window_spans
from training.real_compare import CompareError, bundle_training, run_comparison


def _clip(frames: int, labelled_frames: slice | None = None, weak: bool = False) -> FramedClip:
    labels = np.zeros((frames, 2), np.float32)
    if labelled_frames is not None:
        labels[labelled_frames, 1] = 1.0
    return FramedClip(np.zeros((frames, 400), np.float32), labels, weak)


def test_labelled_pretraining_leaves_out_the_clips_with_no_label():
    clips = [_clip(80, slice(10, 30)), _clip(80), _clip(80, slice(0, 80), weak=True), _clip(80)]
    assert pretraining_clips(clips, [0, 1, 2], "all") == [0, 1, 2]
    assert pretraining_clips(clips, [0, 1, 2, 3], "labelled") == [0, 2]


def test_window_spans_step_weak_clips_by_their_own_stride_and_carry_their_targets():
    clips = [_clip(100, slice(50, 90)), _clip(120, slice(0, 120), weak=True)]
    spans = window_spans(clips, 40, 8, 40)
    assert spans[:3] == [(0, 40), (0, 48), (0, 56)] and spans[-3:] == [(1, 40), (1, 80), (1, 120)]
    assert len(spans) == 8 + 3  # ends 40..96 every 8 frames, then 40, 80, 120
    targets, weights = span_targets(clips, spans, 40)
    for row, (k, end) in enumerate(spans):
        t, w = window_targets(clips[k].labels, end - 40, 40)
        np.testing.assert_array_equal(targets[row], t)
        np.testing.assert_array_equal(weights[row], w)
    assert span_targets(clips, [], 40)[0].shape == (0, 2)


def test_the_config_names_the_pretraining_choices():
    assert load_config(env={}).train.pretrain_on == "all"
    assert load_config(env={"SOUNDFLEET_TRAIN__PRETRAIN_ON": "labelled"}).train.pretrain_on == "labelled"
    with pytest.raises(ConfigError, match="pretrain_on must be 'all' or 'labelled'"):
        load_config(env={"SOUNDFLEET_TRAIN__PRETRAIN_ON": "unlabelled"})


def _bundle_copy(tmp_path, training):
    out = tmp_path / "bundle"
    shutil.copytree(bundle.default_bundle_dir(), out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["training"] = training
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_comparison_refuses_a_bundle_it_cannot_retrain_before_training_anything(tmp_path):
    with pytest.raises(CompareError, match="no training record"):
        bundle_training(_bundle_copy(tmp_path, {"command": "by hand"}))
    # data that is not what the bundle trained on (another corpus at the same path): refused by hash
    synthesize_corpus(tmp_path / "corpus", minutes=0.5, seed=3, clip_seconds=10.0)
    config = bundle.load_manifest(bundle.default_bundle_dir())["training"]["config"]
    shutil.rmtree(tmp_path / "bundle")
    trained = _bundle_copy(tmp_path, {"data_dir": str(tmp_path / "corpus"), "config": config, "data_sha256": "0" * 64})
    data_dirs, cfg, _ = bundle_training(trained)
    assert data_dirs == [tmp_path / "corpus"] and cfg.pretrain_on == "all"  # an older manifest: today's default
    with pytest.raises(CompareError, match="not the data sf1-.* was trained on .*rebuild it"):
        run_comparison(trained, tmp_path / "corpus", tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_source_stays_on_one_side_of_every_split_and_singletons_split_as_before():
    from pathlib import Path

    from soundfleet.config import TrainConfig
    from training.dataset import clip_source, split_clips
    from training.pipeline import train_val_test_split
    from training.sources import Clip

    # 40 clips of package a, 25 of b, 10 of c, and 125 synthetic clips, each its own source
    names = ([f"a__{k}.wav" for k in range(40)] + [f"b__{k}.wav" for k in range(25)]
             + [f"c__x-{k}__{k % 3}.wav" for k in range(10)] + [f"clip_{k:05d}.wav" for k in range(125)])
    clips = [Clip(Path("/data") / name, [], 1.0) for name in names]
    groups = [clip_source(c) for c in clips]
    assert groups[0] == "a" and groups[65] == "c" and groups[-1] == "/data/clip_00124.wav"
    cfg = TrainConfig(seed=4, holdout_fraction=0.2)
    parts = train_val_test_split(len(clips), cfg, groups)
    assert sorted(sum(parts, [])) == list(range(len(clips)))  # disjoint, and nothing left out
    for source in ("a", "b", "c"):
        sides = {k for k, part in enumerate(parts) for i in part if groups[i] == source}
        assert len(sides) == 1, f"{source} split across {sides}"
    assert 0.1 * len(clips) <= len(parts[2]) <= 0.3 * len(clips)  # about its share, within 1.5x
    # with every clip its own source the split is the clip-by-clip one, index for index
    assert split_clips(200, 0.2, 4, [str(i) for i in range(200)]) == split_clips(200, 0.2, 4)
