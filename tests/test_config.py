"""One typed config: defaults, TOML file, env overrides, and errors that name the field."""

import pytest

from soundfleet.config import ConfigError, load_config


def test_defaults_then_file_then_env(tmp_path):
    path = tmp_path / "sf.toml"
    path.write_text("[cloud]\non_threshold = 0.7\noff_threshold = 0.4\n[edge]\nsite = 'garage'\n")
    config = load_config(path, env={"SOUNDFLEET_CLOUD__ON_THRESHOLD": "0.8", "SOUNDFLEET_EDGE__REALTIME": "false"})
    assert config.cloud.on_threshold == 0.8  # env beats file
    assert config.cloud.off_threshold == 0.4  # file beats default
    assert config.edge.site == "garage" and config.edge.realtime is False
    assert config.train.workers == 2  # default


@pytest.mark.parametrize(
    "text, env, message",
    [
        ("[cloud]\nbogus = 1\n", {}, "unknown field cloud.bogus"),
        ("[nope]\nx = 1\n", {}, "unknown config section 'nope'"),
        ("", {"SOUNDFLEET_TRAIN__WORKERS": "two"}, "train.workers: expected int"),
        ("[cloud]\non_threshold = 0.2\noff_threshold = 0.5\n", {}, "off_threshold <= on_threshold"),
        ("[edge]\nrealtime = 'maybe'\n", {}, "expected a boolean"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(tmp_path, text, env, message):
    path = tmp_path / "sf.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env=env)


def test_file_errors_name_the_line(tmp_path):
    path = tmp_path / "sf.toml"
    path.write_text("# comment\n[train]\nseed = 1\ncodebook_size = 'many'\n")
    with pytest.raises(ConfigError, match=r"sf.toml:4: train.codebook_size"):
        load_config(path, env={})
