"""server.metrics: independent registries, exposition that parses, the agreed names."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import REJECT_REASONS, Metrics

HISTOGRAMS = (
    "llada_request_duration_seconds",
    "llada_queue_wait_seconds",
    "llada_time_to_first_step_seconds",
    "llada_batch_rows",
    "llada_forward_duration_seconds",
)
COUNTERS = (
    "llada_requests_total",
    "llada_denoise_steps_total",
    "llada_generated_tokens_total",
    "llada_prompt_tokens_total",
    "llada_loglikelihood_samples_total",
    "llada_rejected_total",
    "llada_cancelled_total",
    "llada_engine_errors_total",
)
GAUGES = (
    "llada_queue_depth",
    "llada_running_jobs",
    "llada_device_memory_bytes",
    "llada_kv_cache_bytes",
    "llada_kv_cache_capacity_bytes",
)


def _samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = m.render()
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _use_everything(m: Metrics) -> None:
    m.requests_total.labels(endpoint="/v1/generate", status="200").inc()
    m.request_duration_seconds.labels(endpoint="/v1/generate").observe(1.5)
    m.queue_wait_seconds.observe(0.01)
    m.time_to_first_step_seconds.observe(0.2)
    m.queue_depth.set(3)
    m.running_jobs.set(2)
    m.batch_rows.observe(4)
    m.forward_duration_seconds.observe(0.02)
    m.denoise_steps_total.inc(64)
    m.generated_tokens_total.inc(128)
    m.prompt_tokens_total.inc(10)
    m.loglikelihood_samples_total.inc(32)
    m.rejected_total.labels(reason="queue_full").inc()
    m.cancelled_total.inc()
    m.engine_errors_total.inc()
    m.observe_device_memory(allocated=1024, reserved=2048)


def test_instances_are_independent():
    a, b = Metrics(), Metrics()  # a shared registry would raise "Duplicated timeseries" here
    assert a.registry is not b.registry
    a.denoise_steps_total.inc(5)
    a.queue_depth.set(7)
    a.requests_total.labels(endpoint="/v1/generate", status="200").inc()
    sa, sb = _samples(a), _samples(b)
    assert sa[("llada_denoise_steps_total", ())] == 5
    assert sb[("llada_denoise_steps_total", ())] == 0
    assert sa[("llada_queue_depth", ())] == 7
    assert sb[("llada_queue_depth", ())] == 0
    assert ("llada_requests_total", (("endpoint", "/v1/generate"), ("status", "200"))) in sa
    assert not any(name == "llada_requests_total" for name, _ in sb)


def test_render_parses_and_exports_every_metric():
    m = Metrics()
    _use_everything(m)
    body, content_type = m.render()
    assert isinstance(body, bytes)
    assert content_type.startswith("text/plain")
    names = {name for name, _ in _samples(m)}
    for h in HISTOGRAMS:
        assert {h + "_bucket", h + "_sum", h + "_count"} <= names, h
    for c in COUNTERS:
        assert c in names, c
    for g in GAUGES:
        assert g in names, g


def test_labels_and_values():
    m = Metrics()
    _use_everything(m)
    s = _samples(m)
    assert s[("llada_requests_total", (("endpoint", "/v1/generate"), ("status", "200")))] == 1
    assert s[("llada_rejected_total", (("reason", "queue_full"),))] == 1
    assert s[("llada_device_memory_bytes", (("kind", "allocated"),))] == 1024
    assert s[("llada_device_memory_bytes", (("kind", "reserved"),))] == 2048
    assert s[("llada_batch_rows_bucket", (("le", "4.0"),))] == 1
    assert s[("llada_batch_rows_bucket", (("le", "2.0"),))] == 0


def test_known_label_sets_are_exported_before_use():
    s = _samples(Metrics())
    for reason in REJECT_REASONS:
        assert s[("llada_rejected_total", (("reason", reason),))] == 0
    for kind in ("allocated", "reserved"):
        assert s[("llada_device_memory_bytes", (("kind", kind),))] == 0
    assert set(REJECT_REASONS) == {
        "queue_full",
        "draining",
        "invalid",
        "unauthorized",
        "too_large",
        "timeout",
    }


def _bucket_bounds(m: Metrics, name: str) -> list[float]:
    return sorted(float(dict(labels)["le"]) for (n, labels), _ in _samples(m).items() if n == name + "_bucket")


def test_bucket_ranges():
    m = Metrics()
    m.request_duration_seconds.labels(endpoint="/v1/generate").observe(1)
    inf = float("inf")
    req = _bucket_bounds(m, "llada_request_duration_seconds")
    assert req[0] <= 0.05 and 600 in req and req[-1] == inf  # seconds to minutes
    rows = _bucket_bounds(m, "llada_batch_rows")
    assert [1, 2, 4, 8, 16, 32, 64, 128, 256] == rows[:-1]
    fwd = _bucket_bounds(m, "llada_forward_duration_seconds")
    assert fwd[0] <= 0.001 and 10 in fwd
    wait = _bucket_bounds(m, "llada_queue_wait_seconds")
    assert wait[0] <= 0.001 and 300 in wait
    ttfs = _bucket_bounds(m, "llada_time_to_first_step_seconds")
    assert ttfs[0] <= 0.005 and 120 in ttfs
