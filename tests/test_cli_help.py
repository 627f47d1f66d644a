"""`soundfleet --help` and every subcommand's --help describe every option."""

import argparse
import subprocess
import sys

from soundfleet.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def test_every_option_of_every_command_has_help():
    missing = []
    commands = list(_walk(build_parser()))
    assert len(commands) >= 8  # soundfleet, data, data synth, train, edge, edge run, cloud, cloud up, demo
    for path, parser in commands:
        assert parser.description or not path, f"{' '.join(path)} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"soundfleet {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without help: " + ", ".join(missing)


def test_help_runs_for_each_subcommand_from_the_console_script():
    for args in ([], ["data", "synth"], ["train"], ["eval"], ["edge", "run"], ["cloud", "up"], ["demo"]):
        out = subprocess.run([sys.executable, "-m", "soundfleet.cli", *args, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "usage: soundfleet" in out.stdout
        assert "--help" in out.stdout


def test_bad_config_value_is_a_clear_error_not_a_traceback(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[cloud]\non_threshold = 'high'\n")
    out = subprocess.run([sys.executable, "-m", "soundfleet.cli", "data", "synth", "--out", str(tmp_path / "x"),
                          "--config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "cloud.on_threshold" in out.stderr and "bad.toml:2" in out.stderr
    assert "Traceback" not in out.stderr
