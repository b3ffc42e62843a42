"""Configuration: defaults, TOML file, environment overrides, and loud typos."""

from __future__ import annotations

import pytest

from engine.config import Config, load_config
from engine.errors import ConfigError


def test_defaults_without_file(tmp_path):
    assert load_config(tmp_path / "missing.toml", environ={}) == Config()


def test_file_then_environment(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[audio]\nmin_speech_s = 2.5\n[scoring]\nverify_threshold = 0.8\n")
    config = load_config(path, environ={"VOICEPRINT_SCORING__VERIFY_THRESHOLD": "0.9", "VOICEPRINT_HOME": "/x"})
    assert config.audio.min_speech_s == 2.5
    assert config.scoring.verify_threshold == 0.9
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("[audio]\nmin_speach_s = 2\n", "unknown key"),
        ("[audoi]\n", "unknown section"),
        ("[audio]\nmin_speech_s = 'lots'\n", "not a valid float"),
        ("[audio\n", "not valid TOML"),
        ("[refresh]\nfrozen_layers = -1\n", "frozen_layers must be >= 0"),
        ("[refresh]\nl2sp_weight = -0.5\n", "l2sp_weight must be >= 0"),
    ],
)
def test_mistakes_are_errors(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_unknown_environment_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, environ={"VOICEPRINT_AUDIO__NOPE": "1"})
