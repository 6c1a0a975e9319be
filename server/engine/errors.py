"""Errors the engine raises for things a user can change."""


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
