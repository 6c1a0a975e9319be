"""Settings as an operator gives them: the KV-cache budget that `--max-cache-memory` leaves the
engine (auto is a fixed budget on CPU), and bad fast-decoding settings, by flag or environment
variable, refused at startup with a message naming the setting."""

from __future__ import annotations

import pytest

from server.api.app import engine_settings
from server.config import load_config
from server.engine.engine import Engine


def cache_capacity(loaded, argv: list[str]) -> float:
    engine = Engine(loaded, engine_settings(load_config(argv, environ={})))  # never started
    return engine.metrics.registry.get_sample_value("llada_kv_cache_capacity_bytes")


def test_max_cache_memory_is_auto_by_default_a_fixed_budget_on_cpu(tiny_model):
    assert load_config([], environ={}).max_cache_memory == "auto"
    assert cache_capacity(tiny_model, []) == 2 * 2**30  # "2G on CPU", as --help says
    assert cache_capacity(tiny_model, ["--max-cache-memory", "512M"]) == 512 * 2**20


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-cache-memory", "lots"], {}, "--max-cache-memory 'lots' is not a size"),
        (["--max-cache-memory=-1G"], {}, "--max-cache-memory '-1G' is not a size"),
        (["--max-cache-memory", "inf"], {}, "--max-cache-memory 'inf' is not a size"),
        ([], {"LLADA_MAX_CACHE_MEMORY": "8X"}, "--max-cache-memory '8X' is not a size"),
        (["--default-threshold", "0"], {}, "--default-threshold must be in (0, 1]"),
        (["--default-threshold", "1.5"], {}, "--default-threshold must be in (0, 1]"),
        ([], {"LLADA_DEFAULT_THRESHOLD": "high"}, "LLADA_DEFAULT_THRESHOLD: could not convert"),
        (["--default-factor", "0"], {}, "--default-factor must be positive"),
        (["--default-threshold", "0.9", "--default-factor", "1"], {}, "cannot both be set"),
        (["--default-cache", "full"], {}, "--default-cache: invalid choice: 'full'"),
        ([], {"LLADA_DEFAULT_CACHE": "full"}, "LLADA_DEFAULT_CACHE: choose from none, prefix, dual"),
    ],
)
def test_bad_cache_settings_stop_startup_with_a_message_naming_them(capsys, argv, environ, message):
    with pytest.raises(SystemExit) as exit_:
        load_config(argv, environ=environ)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
