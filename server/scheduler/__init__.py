"""Iteration-level scheduler: which jobs share each forward pass of the engine worker.

Pure Python (no torch, no FastAPI) so it can be unit-tested without a model. See
``scheduler.py`` for the worker loop it is written for and ``policy.py`` for the rules.
"""

from .admission import AdmissionQueue, DepartureRate
from .jobs import Batch, Job, JobKind, QueueFull, SchedulerClosed
from .scheduler import Scheduler

__all__ = [
    "AdmissionQueue",
    "Batch",
    "DepartureRate",
    "Job",
    "JobKind",
    "QueueFull",
    "Scheduler",
    "SchedulerClosed",
]
