"""The server's one typed configuration. Every field is a CLI flag (`--max-queue`) and an
environment variable (`LLADA_MAX_QUEUE`); a flag wins over the environment."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = setting(None, "LLaDA-format model folder; the built-in demo model when unset")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = setting("auto", "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32")
    batch_invariant: bool = setting(
        True,
        "on CUDA, each answer independent of what shares its batch (cuBLAS without split-K); "
        "--no-batch-invariant for the fastest kernels. CPU is batch-invariant either way",
    )
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    max_batch_rows: int = setting(16, "rows that step together (a CFG request counts two)")
    max_queue: int = setting(64, "requests waiting beyond the running batch; past it, 429")
    max_prompt_tokens: int = setting(4096, "longest prompt, in tokens")
    max_gen_length: int = setting(1024, "largest gen_length")
    max_steps: int = setting(1024, "largest steps")
    max_mc_num: int = setting(1024, "largest mc_num for /v1/loglikelihood")
    max_score_requests: int = setting(64, "most (context, continuation) pairs in one scoring call")
    max_body_bytes: int = setting(1_000_000, "largest request body; past it, 413")
    max_cache_memory: str = setting(
        "auto",
        "KV-cache memory of the fast decoding modes, e.g. 8G or 512M; past it, cached requests wait (auto: 40%% "
        "of the device's free memory on CUDA, 2G on CPU)",
    )
    default_cache: str = setting("none", "KV cache of requests that give none: none, prefix or dual")
    default_threshold: float | None = setting(
        None, "confidence threshold of requests that give neither threshold nor factor"
    )
    default_factor: float | None = setting(None, "factor of requests that give neither threshold nor factor")
    default_early_stop: bool = setting(False, "early stop for requests that do not say")
    default_editing_threshold: float | None = setting(
        None, "block-diffusion models: token editing of requests that do not say (set 0.5 for LLaDA2.1; unset: none)"
    )
    request_timeout: float = setting(600.0, "seconds a request may take, queue time included; past it, 504")
    shutdown_grace: float = setting(30.0, "seconds SIGTERM waits for accepted work before answering it with an error")
    api_key: tuple[str, ...] = setting((), "accepted Bearer key (repeatable; env LLADA_API_KEYS, comma-separated)")
    metrics_auth: bool = setting(False, "require the API key on /metrics too")
    cors_origin: tuple[str, ...] = setting(
        (), "allowed CORS origin (repeatable; env LLADA_CORS_ORIGINS, comma-separated); CORS is off when unset"
    )
    no_ui: bool = setting(False, "do not serve the page at GET / (then / is a 404 like any unknown path)")
    log_format: str = setting("text", "text or json")
    log_level: str = setting("info", "debug, info, warning or error")
    inject_faults: str | None = setting(
        None, "TEST ONLY: fail forwards, e.g. 'error@3,oom@5-9:head' (see server/engine/faults.py)"
    )

    @property
    def api_keys(self) -> tuple[str, ...]:
        return self.api_key


# Plural environment names read better for the comma-separated lists.
ENV_NAMES = {"api_key": "LLADA_API_KEYS", "cors_origin": "LLADA_CORS_ORIGINS"}
CACHE_MODES = ("none", "prefix", "dual")
CHOICES = {
    "log_format": ("text", "json"),
    "log_level": ("debug", "info", "warning", "error"),
    "default_cache": CACHE_MODES,
}
SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int | None:
    """Bytes of a size like 512M, 8G, 1.5GiB or 1000000; None for auto. ValueError if unreadable."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    if value == "AUTO":
        return None
    unit = value[-1:] if value[-1:] in SIZE_UNITS and not value[-1:].isdigit() else ""
    number = float(value[: len(value) - len(unit)])
    if not 0 <= number < math.inf:  # negative, infinite or NaN
        raise ValueError(text)
    return int(number * SIZE_UNITS[unit])


def env_name(name: str) -> str:
    return ENV_NAMES.get(name, "LLADA_" + name.upper())


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _from_env(f: dataclasses.Field, raw: str):
    if f.type in ("tuple[str, ...]",):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if f.type == "bool":
        return _parse_bool(raw)
    if f.type == "int":
        return int(raw)
    if f.type == "float":
        return float(raw)
    if f.type == "float | None":
        return float(raw) if raw.strip() else None
    return raw or None if f.type == "str | None" else raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llada-server",
        description="HTTP inference server for LLaDA masked diffusion language models.",
        epilog="Every flag can also be set by its environment variable, shown in brackets. "
        "Clients of a running server: llada-server chat --help, llada-server eval --help.",
    )
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [{env_name(f.name)}]"
        if f.type == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, action=action, default=None, help=help_text)
        elif f.type == "tuple[str, ...]":
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=None, choices=CHOICES.get(f.name), help=help_text)
    return parser


def load_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Flags, then LLADA_* variables, then defaults. Raises SystemExit(2) with a message on a bad value."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(ServerConfig):
        if args[f.name] is not None:
            values[f.name] = tuple(args[f.name]) if f.type == "tuple[str, ...]" else args[f.name]
        elif env_name(f.name) in environ:
            try:
                values[f.name] = _from_env(f, environ[env_name(f.name)])
            except ValueError as exc:
                parser.error(f"{env_name(f.name)}: {exc}")
            if f.name in CHOICES and values[f.name] not in CHOICES[f.name]:
                parser.error(f"{env_name(f.name)}: choose from {', '.join(CHOICES[f.name])}")
    config = ServerConfig(**values)
    problems = check_config(config)
    if problems:
        parser.error("; ".join(problems))
    return config


def check_config(config: ServerConfig) -> list[str]:
    problems = []
    for name in (
        "port",
        "max_batch_rows",
        "max_queue",
        "max_prompt_tokens",
        "max_gen_length",
        "max_steps",
        "max_mc_num",
        "max_score_requests",
        "max_body_bytes",
    ):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("request_timeout", "shutdown_grace"):
        if getattr(config, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    try:
        parse_size(config.max_cache_memory)
    except ValueError:
        problems.append(f"--max-cache-memory {config.max_cache_memory!r} is not a size: use auto, or e.g. 8G, 512M")
    if config.default_threshold is not None and not 0 < config.default_threshold <= 1:
        problems.append("--default-threshold must be in (0, 1]")
    if config.default_editing_threshold is not None and not 0 <= config.default_editing_threshold <= 1:
        problems.append("--default-editing-threshold must be in [0, 1]")
    if config.default_factor is not None and config.default_factor <= 0:
        problems.append("--default-factor must be positive")
    if config.default_threshold is not None and config.default_factor is not None:
        problems.append("--default-threshold and --default-factor cannot both be set")
    if config.max_batch_rows < 2:
        problems.append("--max-batch-rows must be at least 2 so that a CFG request (two rows) fits")
    return problems
