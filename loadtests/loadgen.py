"""Load generator for `POST /v1/generate` of a llada-server on this machine.

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --max-seconds 120
    python -m loadtests.loadgen --url http://127.0.0.1:8000 --rate 2.5 --max-in-flight 16 \
        --requests 100 --max-seconds 300 \
        --mix "prompt=16-96,gen=64,steps=32,block=32,stream=1,weight=3;prompt=200,gen=128,steps=64,stream=0"

Safety: only loopback targets (127.0.0.1, localhost, ::1) are accepted, and every run is bounded
by both a request count and a wall-clock limit (both required). At the limit the run stops hard:
requests not yet sent are not sent and requests in flight are cancelled (reported as `aborted`).

Modes
  fixed concurrency (`--concurrency N`): N workers, each sends its next request as soon as the
      previous one has finished (a closed loop);
  Poisson arrivals (`--rate λ`): exponential inter-arrival times with mean 1/λ seconds (an open
      loop), at most `--max-in-flight` requests outstanding; an arrival that finds no free slot
      waits for one and that wait is reported (`client_wait`), so overload is visible.

Request mix (`--mix`): entries separated by `;`, each `key=value` pairs separated by `,`:
  prompt   prompt length in tokens, `48` or a range `16-96` (uniform); sent as `input_ids` so the
           length is exact whatever the tokenizer (ids cycle through printable ASCII bytes)
  gen, steps, block   gen_length, steps, block_length (block omitted: server default)
  stream   1/0: SSE stream or one JSON response
  weight   relative frequency of the entry (default 1)
The plan (which request is which) is drawn up front from `--seed`, so two runs with the same
arguments send the same requests in the same order.

Report: requests/s and generated tokens/s (sum of gen_length of successful responses / wall
time), time to first step p50/p99 (streamed requests only: time from sending to the first
`event: step`; not observable for JSON requests, shown as - (the server's
`llada_time_to_first_step_seconds` histogram covers those)), end-to-end latency p50/p99
(successful requests) and errors by status (`429`, `500`, ...; `stream:<code>` for an
`event: error` inside a 200 stream; `exc:<Name>` for transport errors; `aborted` at the hard stop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from httpx_sse import aconnect_sse

from loadtests.report import render

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
GENERATE_PATH = "/v1/generate"


# ---------------------------------------------------------------------------------------------
# request mix and plan


@dataclass(frozen=True)
class MixEntry:
    prompt_min: int
    prompt_max: int
    gen_length: int
    steps: int
    block_length: int | None = None
    stream: bool = False
    weight: float = 1.0

    def describe(self) -> str:
        prompt = str(self.prompt_min) if self.prompt_min == self.prompt_max else f"{self.prompt_min}-{self.prompt_max}"
        block = "" if self.block_length is None else f",block={self.block_length}"
        return (
            f"prompt={prompt},gen={self.gen_length},steps={self.steps}{block},"
            f"stream={int(self.stream)},weight={self.weight:g}"
        )


def parse_mix(spec: str) -> list[MixEntry]:
    """`prompt=16-96,gen=64,steps=32,block=32,stream=1,weight=2;prompt=8,gen=16,steps=16`."""
    entries = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        values: dict[str, str] = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"mix entry {part!r}: expected key=value, got {item!r}")
            values[key.strip()] = value.strip()
        unknown = set(values) - {"prompt", "gen", "steps", "block", "stream", "weight"}
        if unknown:
            raise ValueError(f"mix entry {part!r}: unknown keys {sorted(unknown)}")
        try:
            low, _, high = values.get("prompt", "32").partition("-")
            prompt_min, prompt_max = int(low), int(high or low)
            entry = MixEntry(
                prompt_min=prompt_min,
                prompt_max=prompt_max,
                gen_length=int(values.get("gen", "64")),
                steps=int(values.get("steps", "32")),
                block_length=int(values["block"]) if "block" in values else None,
                stream=values.get("stream", "0").lower() in ("1", "true", "yes", "on"),
                weight=float(values.get("weight", "1")),
            )
        except ValueError as exc:
            raise ValueError(f"mix entry {part!r}: {exc}") from None
        if (
            not 1 <= entry.prompt_min <= entry.prompt_max
            or entry.gen_length < 1
            or entry.steps < 1
            or entry.weight <= 0
            or (entry.block_length is not None and entry.block_length < 1)
        ):
            raise ValueError(f"mix entry {part!r}: lengths, steps and weight must be positive")
        entries.append(entry)
    if not entries:
        raise ValueError("empty request mix")
    return entries


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    payload: dict
    stream: bool
    gen_length: int
    prompt_tokens: int


def prompt_ids(length: int, offset: int) -> list[int]:
    """`length` token ids cycling through printable ASCII (32..126): valid for the demo's byte
    tokenizer and for LLaDA's vocabulary alike."""
    return [32 + (offset + i) % 95 for i in range(length)]


def make_payload(
    prompt_tokens: int, gen_length: int, steps: int, block_length: int | None, stream: bool, offset: int = 0, **extra
) -> dict:
    payload = {
        "input_ids": prompt_ids(prompt_tokens, offset),
        "gen_length": gen_length,
        "steps": steps,
        "temperature": 0.0,
        "stream": stream,
        **extra,
    }
    if block_length is not None:
        payload["block_length"] = block_length
    return payload


def plan_requests(mix: list[MixEntry], count: int, seed: int = 0) -> list[PlannedRequest]:
    rng = random.Random(seed)
    weights = [e.weight for e in mix]
    plan = []
    for i in range(count):
        entry = rng.choices(mix, weights)[0]
        length = rng.randint(entry.prompt_min, entry.prompt_max)
        payload = make_payload(length, entry.gen_length, entry.steps, entry.block_length, entry.stream, offset=i)
        plan.append(PlannedRequest(i, payload, entry.stream, entry.gen_length, length))
    return plan


def planned(payloads: list[dict]) -> list[PlannedRequest]:
    """Wrap ready-made payloads (as `make_payload` builds them) into a plan."""
    return [
        PlannedRequest(i, p, bool(p.get("stream")), int(p["gen_length"]), len(p.get("input_ids") or []))
        for i, p in enumerate(payloads)
    ]


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class RequestResult:
    index: int
    stream: bool
    gen_length: int
    prompt_tokens: int
    sent_s: float  # since the run started
    latency_s: float | None = None  # send -> full response (JSON) or `event: done` (stream)
    ttfs_s: float | None = None  # send -> first `event: step` (stream only)
    client_wait_s: float = 0.0  # Poisson: arrival -> send (waiting for an in-flight slot)
    status: int | None = None  # HTTP status
    error: str | None = None  # None when the request succeeded
    steps_seen: int = 0
    completion_tokens: int | None = None
    nfe: int | None = None
    server_total_s: float | None = None
    server_queue_s: float | None = None
    token_ids: list[int] | None = None  # the answer

    @property
    def ok(self) -> bool:
        return self.error is None


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return xs[low] + (xs[high] - xs[low]) * (pos - low)


@dataclass
class LoadReport:
    mode: str
    url: str
    planned: int
    sent: int
    ok: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    generated_tokens: int
    ttfs_p50_s: float | None
    ttfs_p99_s: float | None
    ttfs_samples: int
    latency_p50_s: float | None
    latency_p99_s: float | None
    latency_mean_s: float | None
    server_total_p50_s: float | None
    client_wait_p99_s: float | None
    errors: dict[str, int]
    hard_stopped: bool
    results: list[RequestResult] = field(repr=False, default_factory=list)

    def to_dict(self, with_requests: bool = False) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "results"}
        if with_requests:
            out["requests"] = [asdict(r) for r in self.results]
        return out


def summarize(
    mode: str, url: str, planned_count: int, results: list[RequestResult], wall_s: float, hard_stopped: bool
) -> LoadReport:
    ok = [r for r in results if r.ok]
    ttfs = [r.ttfs_s for r in ok if r.stream and r.ttfs_s is not None]
    latency = [r.latency_s for r in ok if r.latency_s is not None]
    server_total = [r.server_total_s for r in ok if r.server_total_s is not None]
    tokens = sum(r.gen_length for r in ok)
    wall = max(wall_s, 1e-9)
    errors = Counter(r.error for r in results if not r.ok)
    return LoadReport(
        mode=mode,
        url=url,
        planned=planned_count,
        sent=len(results),
        ok=len(ok),
        wall_s=wall_s,
        requests_per_s=len(ok) / wall,
        tokens_per_s=tokens / wall,
        generated_tokens=tokens,
        ttfs_p50_s=percentile(ttfs, 50),
        ttfs_p99_s=percentile(ttfs, 99),
        ttfs_samples=len(ttfs),
        latency_p50_s=percentile(latency, 50),
        latency_p99_s=percentile(latency, 99),
        latency_mean_s=sum(latency) / len(latency) if latency else None,
        server_total_p50_s=percentile(server_total, 50),
        client_wait_p99_s=percentile([r.client_wait_s for r in results], 99),
        errors=dict(sorted(errors.items())),
        hard_stopped=hard_stopped,
        results=results,
    )


# ---------------------------------------------------------------------------------------------
# sending


def check_loopback(url: str) -> str:
    """The generate endpoint's URL for a loopback base URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http:// or https:// URLs")
    host = (parts.hostname or "").lower()
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"{url!r}: the load generator only targets this machine "
            f"(host must be one of {', '.join(sorted(LOOPBACK_HOSTS))}, got {host or 'none'!r})"
        )
    path = parts.path.rstrip("/")
    if not path.endswith(GENERATE_PATH):
        path += GENERATE_PATH
    return f"{parts.scheme}://{parts.netloc}{path}"


def _fill_from_response(result: RequestResult, body: dict) -> None:
    usage = body.get("usage") or {}
    timing = body.get("timing") or {}
    result.completion_tokens = usage.get("completion_tokens")
    result.nfe = usage.get("nfe")
    result.server_total_s = timing.get("total_s")
    result.server_queue_s = timing.get("queue_s")
    result.token_ids = body.get("token_ids")


def _error_code(text: str) -> str:
    try:
        return json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unknown"


async def send_one(
    client: httpx.AsyncClient, url: str, req: PlannedRequest, result: RequestResult, clock=time.perf_counter
) -> None:
    """Send one request and fill `result` (latency, time to first step, status, error)."""
    start = clock()
    try:
        if req.stream:
            async with aconnect_sse(client, "POST", url, json=req.payload) as source:
                result.status = source.response.status_code
                if result.status != 200:
                    await source.response.aread()
                    result.error = str(result.status)
                    return
                done = False
                async for event in source.aiter_sse():
                    if event.event == "step":
                        result.steps_seen += 1
                        if result.ttfs_s is None:
                            result.ttfs_s = clock() - start
                    elif event.event == "done":
                        _fill_from_response(result, json.loads(event.data))
                        done = True
                        break
                    elif event.event == "error":
                        result.error = f"stream:{_error_code(event.data)}"
                        return
                if not done:
                    result.error = "stream:no_done_event"
                    return
        else:
            response = await client.post(url, json=req.payload)
            result.status = response.status_code
            if response.status_code != 200:
                result.error = str(response.status_code)
                return
            _fill_from_response(result, response.json())
        result.latency_s = clock() - start
    except asyncio.CancelledError:
        result.error = "aborted"
        raise
    except (httpx.HTTPError, ValueError) as exc:  # transport errors, bad JSON, SSE content-type
        result.error = f"exc:{type(exc).__name__}"


def _client(max_connections: int, timeout_s: float, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        headers=headers,
        trust_env=False,  # never route loopback traffic through a proxy
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


async def _stop_at(tasks: list[asyncio.Task], deadline: float) -> bool:
    """Wait for tasks until the loop-clock deadline; cancel what is left. True if it had to stop."""
    loop = asyncio.get_running_loop()
    pending = [t for t in tasks if not t.done()]
    if pending:
        _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return bool(pending)


async def run_load(
    url: str,
    plan: list[PlannedRequest],
    *,
    max_requests: int,
    max_seconds: float,
    concurrency: int | None = None,
    rate: float | None = None,
    max_in_flight: int = 16,
    seed: int = 0,
    timeout_s: float | None = None,
    api_key: str | None = None,
) -> LoadReport:
    """Send (at most `max_requests` of) `plan` to a loopback server and summarize.

    Exactly one of `concurrency` (closed loop) and `rate` (Poisson arrivals per second, at most
    `max_in_flight` outstanding) must be given. The run stops hard after `max_seconds`.
    """
    endpoint = check_loopback(url)
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    if max_requests < 1 or max_seconds <= 0:
        raise ValueError("max_requests must be >= 1 and max_seconds > 0")
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if rate is not None and (rate <= 0 or max_in_flight < 1):
        raise ValueError("rate must be > 0 and max_in_flight >= 1")
    plan = plan[:max_requests]
    loop = asyncio.get_running_loop()
    results: list[RequestResult] = []
    width = concurrency or max_in_flight
    async with _client(width + 2, timeout_s or max_seconds, api_key) as client:
        t0 = time.perf_counter()
        deadline = loop.time() + max_seconds

        def new_result(req: PlannedRequest) -> RequestResult:
            r = RequestResult(req.index, req.stream, req.gen_length, req.prompt_tokens, time.perf_counter() - t0)
            results.append(r)
            return r

        if concurrency is not None:
            mode = f"concurrency {concurrency}"
            queue = iter(plan)

            async def worker() -> None:
                for req in queue:  # one shared iterator: each request is taken by one worker
                    if loop.time() >= deadline:
                        return
                    await send_one(client, endpoint, req, new_result(req))

            tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(plan)))]
            stopped = await _stop_at(tasks, deadline)
        else:
            mode = f"poisson {rate:g}/s, max in flight {max_in_flight}"
            rng = random.Random(seed)
            slots = asyncio.Semaphore(max_in_flight)
            tasks: list[asyncio.Task] = []

            async def fire(req: PlannedRequest, arrival: float) -> None:
                try:
                    result = new_result(req)
                    result.client_wait_s = max(0.0, time.perf_counter() - arrival)
                    await send_one(client, endpoint, req, result)
                finally:
                    slots.release()

            async def arrivals() -> None:
                due = time.perf_counter()
                for req in plan:
                    due += rng.expovariate(rate)
                    delay = due - time.perf_counter()
                    if loop.time() + max(delay, 0.0) >= deadline:
                        return
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await slots.acquire()
                    tasks.append(asyncio.create_task(fire(req, due)))

            feeder = asyncio.create_task(arrivals())
            stopped = await _stop_at([feeder], deadline)
            stopped = await _stop_at(tasks, deadline) or stopped
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return summarize(mode, endpoint, len(plan), results, wall, stopped)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL on this machine, e.g. http://127.0.0.1:8000")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="closed loop: N workers sending back to back")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--max-in-flight", type=int, default=16, help="Poisson mode: most outstanding requests (default 16)")
    p.add_argument("--requests", type=int, required=True, help="number of requests to send (hard bound)")
    p.add_argument("--max-seconds", type=float, required=True, help="wall-clock bound; the run stops hard at it")
    p.add_argument(
        "--mix",
        default="prompt=48,gen=32,steps=16,block=32,stream=1",
        help="request mix, see above (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the plan and the Poisson arrivals")
    p.add_argument("--timeout", type=float, default=None, help="per-request timeout in s (default: --max-seconds)")
    p.add_argument("--api-key", default=None, help="Bearer key, when the server requires one")
    p.add_argument("--json", dest="json_path", default=None, help="write the report (with every request) here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_loopback(args.url)
        mix = parse_mix(args.mix)
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    plan = plan_requests(mix, args.requests, args.seed)
    try:
        report = asyncio.run(
            run_load(
                args.url,
                plan,
                max_requests=args.requests,
                max_seconds=args.max_seconds,
                concurrency=args.concurrency,
                rate=args.rate,
                max_in_flight=args.max_in_flight,
                seed=args.seed,
                timeout_s=args.timeout,
                api_key=args.api_key,
            )
        )
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    summary = {"mix": [e.describe() for e in mix], **report.to_dict()}
    print(render(summary))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report.to_dict(with_requests=True) | summary, indent=2))
        print(f"report written to {args.json_path}")
    return 0 if report.ok == report.sent else 1


if __name__ == "__main__":
    sys.exit(main())
