"""Errors the engine raises for things a user can change."""


class CheckpointError(Exception):
    """A model folder that cannot be loaded; the message says what is wrong and where."""


class DeviceError(Exception):
    """A device or dtype that this machine cannot provide."""
