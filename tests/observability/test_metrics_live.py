"""Against the real server process: after real traffic, /metrics shows every counter moved by
exactly what was done, the gauges back at zero, and the shipped dashboard queries only metrics
the server exports."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from tests.deploy.dashboard_names import dashboard_metric_names, exported_sample_names
from tests.support import scrape, wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "llada.json"
# Long enough (thousands of steps over a 2k-token canvas) to still be running when cancelled.
LONG = {"prompt": "a long one", "gen_length": 2048, "steps": 2048, "block_length": 32, "stream": True}
LIMITS = ("--max-gen-length", "2048", "--max-steps", "2048")


def open_stream(url: str, started: threading.Event, stop: threading.Event) -> None:
    """A long stream that reads until its first step, then holds the connection until told."""
    with httpx.Client(timeout=60) as client, connect_sse(client, "POST", url + "/v1/generate", json=LONG) as source:
        for event in source.iter_sse():
            if event.event == "step":
                started.set()
                stop.wait(30)
                return


def test_counters_and_gauges_after_real_traffic(start_server, tiny_checkpoint):
    server = start_server("--model", str(tiny_checkpoint), "--max-batch-rows", "2", "--max-queue", "1", *LIMITS)
    url = server.url
    before = scrape(url)

    # One JSON generation, one stream, one scoring call, one schema error.
    generated = httpx.post(url + "/v1/generate", json={"prompt": "hello", "gen_length": 16, "steps": 8}, timeout=60)
    assert generated.status_code == 200
    with httpx.Client(timeout=60) as client:
        with connect_sse(
            client, "POST", url + "/v1/generate", json={"prompt": "hi", "gen_length": 8, "steps": 8, "stream": True}
        ) as source:
            events = [e.event for e in source.iter_sse()]
    assert events == ["step"] * 8 + ["done"]
    scored = httpx.post(
        url + "/v1/loglikelihood",
        json={"requests": [{"context": "ab", "continuation": "cd"}], "mc_num": 8, "batch_size": 4},
        timeout=60,
    )
    assert scored.status_code == 200
    assert httpx.post(url + "/v1/generate", json={"prompt": "x", "gen_length": 0}).status_code == 422

    # Fill the two running rows and the one queue slot with streams, then one more is a 429.
    stop = threading.Event()
    threads = []
    for _ in range(2):
        started = threading.Event()
        threads.append(threading.Thread(target=open_stream, args=(url, started, stop), daemon=True))
        threads[-1].start()
        assert started.wait(30)
    queued_answer = {}
    queued = threading.Thread(
        target=lambda: queued_answer.update(
            httpx.post(url + "/v1/generate", json={"prompt": "queued", "gen_length": 8, "steps": 8}, timeout=60).json()
        ),
        daemon=True,
    )
    queued.start()
    wait_for(lambda: scrape(url).value("llada_queue_depth") == 1)
    rejected = httpx.post(url + "/v1/generate", json={"prompt": "x", "gen_length": 8, "steps": 8})
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"]
    stop.set()  # the two streams disconnect: their jobs are cancelled
    for thread in threads:
        thread.join(30)
    queued.join(60)  # the queued request then runs to completion
    assert len(queued_answer["token_ids"]) == 8

    wait_for(lambda: scrape(url).value("llada_running_jobs") == 0 and scrape(url).value("llada_queue_depth") == 0)
    after = scrape(url)

    def moved(name: str, **labels) -> float:
        return after.moved(before, name, **labels)

    # json, stream, the two streams whose clients left (they had started as 200), the queued one
    assert moved("llada_requests_total", endpoint="/v1/generate", status="200") == 5
    assert moved("llada_requests_total", endpoint="/v1/generate", status="429") == 1
    assert moved("llada_requests_total", endpoint="/v1/generate", status="422") == 1
    assert moved("llada_requests_total", endpoint="/v1/loglikelihood", status="200") == 1
    assert moved("llada_rejected_total", reason="queue_full") == 1
    assert moved("llada_rejected_total", reason="invalid") == 1  # the 422
    assert moved("llada_cancelled_total") == 2
    assert moved("llada_loglikelihood_samples_total") == scored.json()["usage"]["forward_rows"]
    assert moved("llada_request_duration_seconds_count", endpoint="/v1/generate") == 7
    # Tokens: the three finished generations reveal every position; the two cancelled streams
    # revealed some before they left.
    assert moved("llada_generated_tokens_total") >= 16 + 8 + 8 + 2
    assert moved("llada_denoise_steps_total") >= generated.json()["usage"]["nfe"] + 8 + 8 + 2
    assert moved("llada_prompt_tokens_total") > 0
    assert moved("llada_time_to_first_step_seconds_count") == 5
    assert moved("llada_engine_errors_total") == 0
    assert after.value("llada_queue_depth") == 0
    assert after.value("llada_running_jobs") == 0


def test_dashboard_queries_only_exported_metrics(start_server, tiny_checkpoint):
    server = start_server("--model", str(tiny_checkpoint))
    httpx.post(server.url + "/v1/generate", json={"prompt": "hello", "gen_length": 8, "steps": 4}, timeout=60)
    exported = exported_sample_names(httpx.get(server.url + "/metrics").text)
    queried = dashboard_metric_names(DASHBOARD)
    assert queried, "the dashboard queries no llada_ metrics"
    assert queried <= exported, f"dashboard queries metrics the server does not export: {queried - exported}"
