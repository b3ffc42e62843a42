"""Configuration: defaults, TOML file, environment overrides, loud typos, and ranges."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

import pytest

from voiceprint.engine.config import Config, load_config
from voiceprint.engine.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_without_file(tmp_path):
    assert load_config(tmp_path / "missing.toml", environ={}) == Config()


def test_file_then_environment(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[audio]\nmin_speech_s = 2.5\n[scoring]\nverify_far = 0.02\n")
    config = load_config(path, environ={"VOICEPRINT_SCORING__VERIFY_FAR": "0.05", "VOICEPRINT_HOME": "/x"})
    assert config.audio.min_speech_s == 2.5
    assert config.scoring.verify_far == 0.05
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("[audio]\nmin_speach_s = 2\n", "unknown key"),
        ("[audoi]\n", "unknown section"),
        ("[audio]\nmin_speech_s = 'lots'\n", "not a valid float"),
        ("[audio\n", "not valid TOML"),
        ("[refresh]\nfrozen_layers = -1\n", r"\[refresh\] frozen_layers must be at least 0, got -1"),
        ("[refresh]\nl2sp_weight = -0.5\n", r"\[refresh\] l2sp_weight must be at least 0, got -0.5"),
        ("[encoder]\nbatch_windows = 0\n", r"\[encoder\] batch_windows must be at least 1, got 0$"),
        ("[encoder]\nbatch_windows = 2.5\n", "batch_windows=2.5 is not a valid int"),  # not quietly 2
        ("[refresh]\nsteps = inf\n", "steps=inf is not a valid int"),
        ("[refresh]\ntime_budget_s = -60\n", r"\[refresh\] time_budget_s must be above 0, got -60"),
        ("[refresh]\ntime_budget_s = 8.64e15\n", r"\[refresh\] time_budget_s must be at most 604800"),  # 1e11 days
        ("[refresh]\nlr = 0\n", r"\[refresh\] lr must be above 0"),
        ("[refresh]\nholdout_fraction = 1.5\n", r"\[refresh\] holdout_fraction must be below 1, got 1.5"),
        ("[audio]\nmax_duration_s = -1\n", r"\[audio\] max_duration_s must be above 0"),
        ("[audio]\nvad_threshold = nan\n", r"\[audio\] vad_threshold must be a finite number, got nan"),
        ("[service]\nport = 70000\n", r"\[service\] port must be at most 65535, got 70000"),
        ("[service]\nmax_request_bytes = -1\n", r"\[service\] max_request_bytes must be at least 1"),
        ("[scoring]\nverify_far = 1\n", r"\[scoring\] verify_far must be below 1"),
    ],
)
def test_mistakes_are_errors(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_a_mistake_in_an_environment_variable_names_the_variable_not_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[refresh]\nsteps = 10\n")
    cases = {
        "VOICEPRINT_AUDIO__NOPE": ("1", r"^environment variable VOICEPRINT_AUDIO__NOPE: unknown key\(s\) \['nope'\]"),
        "VOICEPRINT_NOPE__STEPS": ("1", r"^environment variable VOICEPRINT_NOPE__STEPS: no section \[nope\]"),
        "VOICEPRINT_REFRESH__STEPS": ("many", r"^environment variable VOICEPRINT_REFRESH__STEPS: steps='many' is not a valid int"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            load_config(path, environ={name: value})
        assert str(path) not in str(caught.value)
    # The file's own mistakes still name the file.
    path.write_text("[refresh]\nstepz = 10\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} \[refresh\]: unknown key"):
        load_config(path, environ={})


# -- ranges: every numeric key declares one, and values outside it are refused by name ----


def numeric_keys() -> list[tuple[str, dataclasses.Field]]:
    return [
        (section.name, f)
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory)
        if type(f.default) in (int, float)
    ]


def test_every_numeric_key_declares_its_range():
    assert numeric_keys(), "no numeric keys found"
    undeclared = [f"[{section}] {f.name}" for section, f in numeric_keys() if "bounds" not in f.metadata]
    assert undeclared == [], "declare these with config.key(default, at_least=..., ...)"


def test_section_names_follow_their_classes():
    # Range errors name the section from the class (AudioConfig -> [audio]).
    for section in dataclasses.fields(Config):
        assert section.default_factory.__name__.removesuffix("Config").lower() == section.name


def _outside(f: dataclasses.Field) -> list:
    """Values just past each side of a key's range (and non-finite ones for floats)."""
    bounds, kind = f.metadata["bounds"], type(f.default)
    if kind is int:
        below, above = (lambda x: math.ceil(x) - 1), (lambda x: math.floor(x) + 1)
        values = [2**64]
    else:
        below, above = (lambda x: math.nextafter(x, -math.inf)), (lambda x: math.nextafter(x, math.inf))
        values = [math.nan, math.inf, -math.inf]
    values += [below(bounds.at_least)] if bounds.at_least is not None else []
    values += [bounds.above] if bounds.above is not None else []
    values += [above(bounds.at_most)] if bounds.at_most is not None else []
    values += [bounds.below] if bounds.below is not None else []
    return [kind(v) if math.isfinite(v) else v for v in values]


OUTSIDE = [(section, f.name, value) for section, f in numeric_keys() for value in _outside(f)]


@pytest.mark.parametrize("section, key, value", OUTSIDE, ids=[f"{s}.{k}={v!r}" for s, k, v in OUTSIDE])
def test_values_outside_a_range_are_refused_naming_the_key(section, key, value):
    environ = {f"VOICEPRINT_{section.upper()}__{key.upper()}": repr(value) if isinstance(value, float) else str(value)}
    with pytest.raises(ConfigError, match=rf"^environment variable {next(iter(environ))}: \[{section}\] {key} must be "):
        load_config(None, environ=environ)


@pytest.mark.parametrize("section, key", [(s, f.name) for s, f in numeric_keys()])
def test_the_edges_of_a_closed_range_are_accepted(section, key):
    # e.g. replay_size = 0 and drift_delta = 0 mean "off", port = 0 "a free port".
    f = next(f for s, f in numeric_keys() if (s, f.name) == (section, key))
    bounds = f.metadata["bounds"]
    for edge in (bounds.at_least, bounds.at_most):
        if edge is not None:
            config = Config.from_dict({section: {key: type(f.default)(edge)}})
            assert getattr(getattr(config, section), key) == edge


def test_ranges_hold_for_replace_and_the_defaults_pass():
    config = Config()
    assert load_config(None, environ={}) == config
    with pytest.raises(ConfigError, match=r"\[audio\] min_speech_s must be at least 0, got -1"):
        dataclasses.replace(config.audio, min_speech_s=-1)


def test_the_configuration_shown_in_the_readme_loads():
    block = re.search(r"## Configuration\n.*?```toml\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no ```toml block under ## Configuration"
    shown = tomllib.loads(block.group(1))
    assert sum(map(len, shown.values())) > 30  # the whole table, not a fragment
    Config.from_dict(shown, origin="README")
