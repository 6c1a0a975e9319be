"""The README's settings table names every flag and environment variable the CLI has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from server.config import ServerConfig, build_parser, env_name

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented_with_its_flag_and_variable():
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        assert f"`{flag}`" in README, flag
        assert f"`{env_name(field.name)}`" in README, env_name(field.name)


def test_every_cli_flag_is_a_setting():
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    settings = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(ServerConfig)}
    # a setting on by default also has its --no- form
    negations = {"--no-" + f.name.replace("_", "-") for f in dataclasses.fields(ServerConfig) if f.default is True}
    assert flags - {"-h", "--help"} == settings | negations
