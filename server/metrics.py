"""Every Prometheus metric of the server, in one place.

Each :class:`Metrics` instance owns its own :class:`CollectorRegistry`, so several apps (for
example one per test) can live in one process without "Duplicated timeseries" errors. The app
creates one instance and hands it to the scheduler and engine; ``GET /metrics`` serves
:meth:`Metrics.render`.

All names carry the ``llada_`` prefix. Counters are exported with the ``_total`` suffix,
histograms as ``_bucket``/``_sum``/``_count``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["REJECT_REASONS", "Metrics"]

# Reasons used for llada_rejected_total{reason}.
REJECT_REASONS: tuple[str, ...] = (
    "queue_full",
    "draining",
    "invalid",
    "unauthorized",
    "too_large",
    "timeout",
)

# Whole requests: a short scoring call takes tens of ms, a long generation minutes.
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Time spent in the admission queue: ~0 when idle, minutes under heavy load.
QUEUE_WAIT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# From arrival to the first denoising step's event.
FIRST_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Rows per forward pass (CFG makes a job two rows).
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# One forward: milliseconds for the demo model, up to seconds for 8B on a big batch.
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_NS = "llada"


class Metrics:
    """All server metrics on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        # --- HTTP -------------------------------------------------------------------------
        self.requests_total = Counter(
            "requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            namespace=_NS,
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            "request_duration_seconds",
            "Wall time of a request, arrival to last byte.",
            ["endpoint"],
            namespace=_NS,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.rejected_total = Counter(
            "rejected",
            "Requests refused before running, by reason.",
            ["reason"],
            namespace=_NS,
            registry=r,
        )

        # --- scheduler --------------------------------------------------------------------
        self.queue_wait_seconds = Histogram(
            "queue_wait_seconds",
            "Time a job waited in the admission queue.",
            namespace=_NS,
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.time_to_first_step_seconds = Histogram(
            "time_to_first_step_seconds",
            "Time from arrival to the job's first denoising step.",
            namespace=_NS,
            buckets=FIRST_STEP_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Jobs waiting in the admission queue.",
            namespace=_NS,
            registry=r,
        )
        self.running_jobs = Gauge(
            "running_jobs",
            "Jobs currently in the running batch.",
            namespace=_NS,
            registry=r,
        )
        self.cancelled_total = Counter(
            "cancelled",
            "Jobs cancelled (client disconnect or explicit cancel).",
            namespace=_NS,
            registry=r,
        )

        # --- engine -----------------------------------------------------------------------
        self.batch_rows = Histogram(
            "batch_rows",
            "Rows per forward pass.",
            namespace=_NS,
            buckets=BATCH_ROWS_BUCKETS,
            registry=r,
        )
        self.forward_duration_seconds = Histogram(
            "forward_duration_seconds",
            "Duration of one model forward (one step of a batch).",
            namespace=_NS,
            buckets=FORWARD_BUCKETS,
            registry=r,
        )
        self.loop_iteration_seconds = Histogram(
            "loop_iteration_seconds",
            "One engine loop iteration with work: the forward plus choosing, revealing and handing out "
            "events. forward_duration_seconds_sum / loop_iteration_seconds_sum is the share spent in forwards.",
            namespace=_NS,
            buckets=FORWARD_BUCKETS,
            registry=r,
        )
        self.denoise_steps_total = Counter(
            "denoise_steps",
            "Denoising steps taken, counted per job (one forward of 8 jobs is 8 steps).",
            namespace=_NS,
            registry=r,
        )
        self.generated_tokens_total = Counter(
            "generated_tokens",
            "Answer tokens revealed by denoising steps.",
            namespace=_NS,
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            "prompt_tokens",
            "Prompt tokens of accepted generation requests.",
            namespace=_NS,
            registry=r,
        )
        self.loglikelihood_samples_total = Counter(
            "loglikelihood_samples",
            "Monte Carlo samples evaluated for log-likelihood scoring.",
            namespace=_NS,
            registry=r,
        )
        self.engine_errors_total = Counter(
            "engine_errors",
            "Forward passes or engine operations that raised.",
            namespace=_NS,
            registry=r,
        )
        self.device_memory_bytes = Gauge(
            "device_memory_bytes",
            "Accelerator memory in bytes (CUDA only; 0 elsewhere).",
            ["kind"],
            namespace=_NS,
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "kv_cache_bytes",
            "KV-cache memory held by running requests of the fast decoding modes, in bytes.",
            namespace=_NS,
            registry=r,
        )
        self.kv_cache_capacity_bytes = Gauge(
            "kv_cache_capacity_bytes",
            "The KV-cache budget (--max-cache-memory) in bytes.",
            namespace=_NS,
            registry=r,
        )

        # Export label sets that are known up front, so dashboards show zeros, not gaps.
        for reason in REJECT_REASONS:
            self.rejected_total.labels(reason=reason)
        for kind in ("allocated", "reserved"):
            self.device_memory_bytes.labels(kind=kind).set(0)

    # ------------------------------------------------------------------------------------
    def observe_device_memory(self, allocated: int, reserved: int) -> None:
        """Record CUDA memory (``torch.cuda.memory_allocated()/memory_reserved()``)."""
        self.device_memory_bytes.labels(kind="allocated").set(allocated)
        self.device_memory_bytes.labels(kind="reserved").set(reserved)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        # The 0.0.4 text format: what every Prometheus version scrapes.
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
