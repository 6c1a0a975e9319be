"""Errors the engine raises for things a user can change, and the checks of a checkpoint's
JSON files that raise them."""

import json
from pathlib import Path


class CheckpointError(Exception):
    """A model folder that cannot be loaded; the message says what is wrong and where."""


class DeviceError(Exception):
    """A device or dtype that this machine cannot provide."""


class RequestTooLarge(ValueError):
    """A request that this engine could never run (the API answers 400 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class PoolTooLarge(DeviceError):
    """The KV-cache pool could not be allocated at start-up (the message says to lower
    --max-cache-memory)."""


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, tokenizer_config.json) that must hold an object."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


def refuse_unsupported(raw: dict, supported: dict[str, tuple], path: Path) -> None:
    """A config.json key whose value this server does not implement stops the load, named."""
    for key, accepted in supported.items():
        if key in raw and raw[key] not in accepted:
            raise CheckpointError(
                f"{path}: {key}={raw[key]!r} is not supported (this server implements {key} "
                f"{' or '.join(repr(a) for a in accepted)})"
            )
