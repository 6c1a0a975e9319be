"""Bounded soak run against the real server on loopback.

Starts `python -m server` on a free port, then for --seconds keeps --concurrency clients busy
(above --max-queue, so 429s happen) with a mix of JSON generations, streams read to the end,
streams cancelled after their first step, OpenAI chat streams, scoring calls and bad requests;
generations pick a fast-decoding mode (none, threshold, prefix or dual cache) at random. Reports
requests sent, answers by kind and status, requests lost (no HTTP answer, or a stream that ended
without `done`/`error`, or an OpenAI stream without `[DONE]` or an error), 5xx, and the server's
RSS over time, then checks that the queue, running and KV-cache gauges are back at zero.

    python -m loadtests.soak --seconds 120 --concurrency 12 --max-queue 4 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from loadtests.common import finish, machine_info
from server.engine.demo import DEMO_NAME
from server.engine.devices import resolve_device
from tests.support import ServerProcess, scrape, wait_for

BAD_BODIES = [
    {"prompt": "x", "gen_length": 0},
    {"prompt": "x", "steps": "many"},
    {"prompt": "", "gen_length": 8},
    {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
    {"input_ids": [126336, 5], "gen_length": 8},
    {"prompt": "x", "gen_length": 8, "block_length": 16},
    {"prompt": "x", "remasking": "sideways"},
    {"prompt": "x", "gen_length": 8, "constraints": [{"position": 9, "token_id": 5}]},
]
KINDS = ("generate", "stream", "cancel", "openai", "score", "bad")
WEIGHTS = (3, 2, 1, 1, 2, 1)
FAST_MODES = (
    {},
    {"threshold": 0.9, "early_stop": True},
    {"cache": "prefix"},
    {"cache": "dual", "threshold": 0.9},
)
GAUGES = ("llada_queue_depth", "llada_running_jobs", "llada_kv_cache_bytes")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def generation_body(rng: random.Random) -> dict:
    gen = rng.choice([8, 16, 32])
    return {
        "prompt": "soak " * rng.randint(1, 40),
        "gen_length": gen,
        "steps": gen,
        "block_length": min(gen, 8),
        "temperature": rng.choice([0.0, 0.7]),
        "seed": rng.randint(0, 1000),
        "cfg_scale": rng.choice([0.0, 0.5]),
        **rng.choice(FAST_MODES),
    }


def score_body(rng: random.Random) -> dict:
    pair = {"context": "soak " * rng.randint(1, 20), "continuation": " test" * rng.randint(1, 3)}
    return {"requests": [pair], "mc_num": 8, "batch_size": 4, "greedy": rng.random() < 0.5}


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Counter) -> float:
    """Sends one request; returns how long to back off (the 429's Retry-After, jittered)."""
    tally[f"sent:{kind}"] += 1
    try:
        if kind == "score":
            response = await client.post("/v1/loglikelihood", json=score_body(rng))
        elif kind == "openai":
            return await one_openai_stream(client, rng, tally)
        elif kind in ("generate", "bad"):
            body = rng.choice(BAD_BODIES) if kind == "bad" else generation_body(rng)
            response = await client.post("/v1/generate", json=body)
        else:
            return await one_stream(client, kind, rng, tally)
        tally[f"status:{response.status_code}"] += 1
        tally[f"{kind}:{response.status_code}"] += 1
        return backoff(response, rng)
    except httpx.HTTPError as exc:
        tally["lost"] += 1
        tally[f"transport:{type(exc).__name__}"] += 1
    return 0.0


async def one_stream(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Counter) -> float:
    async with aconnect_sse(client, "POST", "/v1/generate", json={**generation_body(rng), "stream": True}) as source:
        tally[f"status:{source.response.status_code}"] += 1
        tally[f"{kind}:{source.response.status_code}"] += 1
        if source.response.status_code != 200:
            await source.response.aread()
            return backoff(source.response, rng)
        last = None
        async for event in source.aiter_sse():
            last = event.event
            if kind == "cancel" and last == "step":
                return 0.0  # leaving the stream cancels the job
        if last not in ("done", "error"):
            tally["lost"] += 1
        elif last == "error":
            tally["stream_error_events"] += 1
    return 0.0


async def one_openai_stream(client: httpx.AsyncClient, rng: random.Random, tally: Counter) -> float:
    body = generation_body(rng)
    messages = [{"role": "user", "content": body.pop("prompt")}]
    body.update(model=DEMO_NAME, messages=messages, max_tokens=body.pop("gen_length"), stream=True, stop=[". "])
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        tally[f"status:{response.status_code}"] += 1
        tally[f"openai:{response.status_code}"] += 1
        if response.status_code != 200:
            await response.aread()
            return backoff(response, rng)
        last = None
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                last = line.removeprefix("data: ")
        if last is None or (last != "[DONE]" and "error" not in json.loads(last)):
            tally["lost"] += 1
        elif last != "[DONE]":
            tally["openai_error_chunks"] += 1
    return 0.0


def backoff(response: httpx.Response, rng: random.Random) -> float:
    if response.status_code != 429:
        return 0.0
    return min(float(response.headers.get("retry-after", "1")), 2.0) * rng.uniform(0.5, 1.0)


async def client_loop(url: str, deadline: float, seed: int, tally: Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            wait = await one_request(client, rng.choices(KINDS, weights=WEIGHTS)[0], rng, tally)
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))


async def sample_memory(pid: int, deadline: float, samples: list[dict], every: float) -> None:
    start = time.monotonic()
    while time.monotonic() < deadline:
        samples.append({"at_s": round(time.monotonic() - start, 1), "rss_mb": rss_mb(pid)})
        await asyncio.sleep(every)


def gauges(url: str) -> dict[str, float]:
    metrics = scrape(url)
    return {name: metrics.value(name) for name in GAUGES}


async def load(args: argparse.Namespace, url: str, pid: int) -> tuple[Counter, list[dict]]:
    """The clients' tally and the server's RSS samples."""
    tally: Counter = Counter()
    samples: list[dict] = []
    deadline = time.monotonic() + args.seconds
    await asyncio.gather(
        sample_memory(pid, deadline, samples, every=max(1.0, args.seconds / 30)),
        *(client_loop(url, deadline, seed, tally) for seed in range(args.concurrency)),
    )
    return tally, samples


def report(args: argparse.Namespace, url: str, tally: Counter, samples: list[dict]) -> dict:
    try:
        wait_for(lambda: not any(gauges(url).values()), timeout=30, what="the gauges to be 0")
    except AssertionError:
        pass  # gauges_after below shows which one is left, and the exit status fails
    third = max(1, len(samples) // 3)
    return {
        "settings": {"seconds": args.seconds, "concurrency": args.concurrency, "max_queue": args.max_queue},
        "sent": sum(v for k, v in tally.items() if k.startswith("sent:")),
        "lost": tally["lost"],
        "server_errors_5xx": sum(v for k, v in tally.items() if k.startswith("status:5")),
        "tally": dict(sorted(tally.items())),
        "gauges_after": gauges(url),
        "rss_mb_first_third_mean": round(statistics.mean(s["rss_mb"] for s in samples[:third]), 1),
        "rss_mb_last_third_mean": round(statistics.mean(s["rss_mb"] for s in samples[-third:]), 1),
        "rss_mb": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--max-batch-rows", type=int, default=8)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    started = time.perf_counter()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    server_args = ["--max-queue", str(args.max_queue), "--max-batch-rows", str(args.max_batch_rows)]
    server = ServerProcess([*server_args, "--log-level", "warning"], Path(log.name))
    try:
        server.wait_ready()
        result = {
            "command": "python -m loadtests.soak " + " ".join(sys.argv[1:]),
            "machine": machine_info(resolve_device("auto")),
            **report(args, server.url, *asyncio.run(load(args, server.url, server.proc.pid))),
        }
    finally:
        exit_code = server.stop(timeout=60)
    result["server_exit_code"] = exit_code
    result["server_log"] = log.name
    finish(result, started, args.json_path)
    healthy = result["lost"] == 0 and result["server_errors_5xx"] == 0 and not any(result["gauges_after"].values())
    return 0 if healthy and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
