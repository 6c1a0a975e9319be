"""HTTP server benchmark: the real server under concurrent load against the same requests sent one
after another, and against the engine's own time, in one run.

    python -m loadtests.bench_server --json bench_server.json      # CPU, float32 (about 100 s on 2 cores)
    python -m loadtests.bench_server --device cuda --requests 32 --mixed-requests 32 --overhead-repeats 15

The bench model (bench_engine's: random weights, LLaDA's vocabulary) is written to a temporary
folder and served by `python -m server --model <folder> --max-batch-rows 16 --max-queue 256` on a
free loopback port; the load generator is loadtests/loadgen.py. After a warm-up:
  sequential, concurrent: --requests requests of --prompt-tokens tokens (as input_ids, every other
      one streamed, temperature 0) one after another, then from --clients clients back to back;
  mixed_prompt_lengths: --mixed-requests requests with prompts of 16 to 96 tokens, --clients clients.
  Each run is bracketed by scrapes of /metrics: forward share of the loop = delta
  llada_forward_duration_seconds_sum / delta llada_loop_iteration_seconds_sum; rows per forward =
  delta llada_batch_rows_sum / delta llada_batch_rows_count.
  overhead: one request at a time, --overhead-repeats times interleaved: as JSON, streamed, and in
      this process through `generate_batch` on the same weights; each HTTP request also against
      the server's own step-loop time for it (delta llada_loop_iteration_seconds_sum). Then
      --clients requests in one in-process `generate_batch`: the engine's own batching gain, which
      bounds what the concurrent run can gain over the sequential one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loadtests.common import add_model_args, bench_config, describe_model, finish, machine_info
from loadtests.loadgen import LoadReport, RequestResult, make_payload, planned, run_load
from server.engine.demo import build_demo, save_checkpoint
from server.engine.denoiser import generate_batch
from server.engine.devices import resolve_device
from server.engine.loader import load_checkpoint
from server.engine.sampling_params import SamplingParams
from tests.support import ServerProcess, scrape

MIXED_PROMPTS = (16, 96)  # prompt lengths of the mixed run, shortest and longest
MAX_SECONDS = 600.0  # hard bound of each load run
LOOP_SUM = "llada_loop_iteration_seconds_sum"


def add_request_args(p: argparse.ArgumentParser, requests: int, clients: int) -> None:
    """The model, the server's batch bound and the fixed request set (bench_ray takes them too)."""
    add_model_args(p)
    p.add_argument("--max-batch-rows", type=int, default=16)
    p.add_argument("--requests", type=int, default=requests, help="requests of the sequential and the concurrent run")
    p.add_argument("--clients", type=int, default=clients, help="concurrent clients")
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompt length of those requests")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_args(p, requests=16, clients=8)
    p.add_argument("--mixed-requests", type=int, default=16, help="requests of the mixed-length run (0: no such run)")
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--json", dest="json_path", default=None, help="write the figures to this file")
    return p.parse_args(argv)


def requests_of(args: argparse.Namespace, prompt_lengths: list[int], steps: int | None = None) -> list[dict]:
    """One request per prompt length, every other one streamed (those give the time to first step)."""
    return [
        make_payload(length, args.gen_length, steps or args.steps, args.block_length, stream=i % 2 == 1, offset=i)
        for i, length in enumerate(prompt_lengths)
    ]


def mixed_lengths(n: int) -> list[int]:
    """n lengths evenly over MIXED_PROMPTS, short and long interleaved."""
    low, high = MIXED_PROMPTS
    lengths = [low + (high - low) * i // max(1, n - 1) for i in range(n)]
    stride = next(s for s in (7, 5, 3, 1) if math.gcd(s, n) == 1)
    return [lengths[i * stride % n] for i in range(n)]


def load_run(url: str, payloads: list[dict], concurrency: int) -> LoadReport:
    plan = planned(payloads)
    return asyncio.run(run_load(url, plan, max_requests=len(plan), max_seconds=MAX_SECONDS, concurrency=concurrency))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def measured_run(name: str, url: str, payloads: list[dict], concurrency: int, server_pid: int) -> dict:
    print(f"  {name}: {len(payloads)} requests from {concurrency} client(s) ...", flush=True)
    before, server_cpu, client_cpu = scrape(url), cpu_seconds(server_pid), time.process_time()
    report = load_run(url, payloads, concurrency)
    after = scrape(url)
    forward, loop = after.moved(before, "llada_forward_duration_seconds_sum"), after.moved(before, LOOP_SUM)
    forwards = after.moved(before, "llada_batch_rows_count")
    return {
        "clients": concurrency,
        "ok": report.ok,
        "wall_s": round(report.wall_s, 2),
        "requests_per_s": round(report.requests_per_s, 3),
        "tokens_per_s": round(report.tokens_per_s, 2),
        "first_step_p50_s": _rounded(report.ttfs_p50_s, 3),
        "first_step_p99_s": _rounded(report.ttfs_p99_s, 3),
        "latency_p50_s": _rounded(report.latency_p50_s, 3),
        "latency_p99_s": _rounded(report.latency_p99_s, 3),
        "rows_per_forward": round(after.moved(before, "llada_batch_rows_sum") / forwards, 2) if forwards else None,
        "forward_share_of_loop": round(forward / loop, 3) if loop else None,
        "server_cpu_s": round(cpu_seconds(server_pid) - server_cpu, 1),
        "loadgen_cpu_s": round(time.process_time() - client_cpu, 2),
        "errors": ", ".join(f"{code}: {n}" for code, n in report.errors.items()) or "none",
    }


def one_request(url: str, payload: dict) -> RequestResult:
    result = load_run(url, [payload], 1).results[0]
    if result.error:
        raise RuntimeError(f"a request of the overhead measure failed: {result.error}")
    return result


def overhead(args: argparse.Namespace, url: str, model_folder: Path) -> dict:
    print(f"  overhead: {args.overhead_repeats} x (HTTP JSON, HTTP stream, in process) ...", flush=True)
    loaded = load_checkpoint(model_folder, args.device, args.dtype)
    payload = make_payload(args.prompt_tokens, args.gen_length, args.steps, args.block_length, stream=False)
    prompt = payload["input_ids"]
    params = SamplingParams(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length, temperature=0.0
    )
    samples: dict[str, list[float]] = {"http_json": [], "http_stream": [], "engine": []}
    own_loop: dict[str, list[float]] = {"http_json": [], "http_stream": []}
    answers: dict[str, list[int] | None] = {}
    with torch.inference_mode():
        generate_batch(loaded, [prompt], [params])  # warm-up of this process
        for _ in range(args.overhead_repeats):  # interleaved, so drift in the machine's load hits all three
            for name, stream in (("http_json", False), ("http_stream", True)):
                loop_before = scrape(url).value(LOOP_SUM)
                result = one_request(url, {**payload, "stream": stream})
                own_loop[name].append(scrape(url).value(LOOP_SUM) - loop_before)
                samples[name].append(result.latency_s)
                answers[name] = result.token_ids
            start = time.perf_counter()
            answers["engine"] = generate_batch(loaded, [prompt], [params])[0]
            samples["engine"].append(time.perf_counter() - start)
        # the engine's own batching gain: `clients` requests in one generate_batch (after a warm-up
        # at that shape) against `clients` times batch 1
        prompts = [p["input_ids"] for p in requests_of(args, [args.prompt_tokens] * args.clients)]
        short = SamplingParams(gen_length=args.gen_length, steps=2, block_length=args.block_length, temperature=0.0)
        generate_batch(loaded, prompts, [short] * len(prompts))
        start = time.perf_counter()
        generate_batch(loaded, prompts, [params] * len(prompts))
        batch_wall = time.perf_counter() - start
    del loaded
    gc.collect()
    engine = statistics.median(samples["engine"])
    at_batch_1 = {}
    for name, values in samples.items():
        row = {"median_s": round(statistics.median(values), 4)}
        if name in own_loop:
            row["over_engine"] = round(row["median_s"] / engine - 1, 4)
            row["over_own_loop"] = round(statistics.median(h / e - 1 for h, e in zip(values, own_loop[name])), 4)
        row["samples_s"] = [round(v, 4) for v in values]
        at_batch_1[name] = row
    return {
        "at_batch_1": at_batch_1,
        "answers_equal": answers["engine"] == answers["http_json"] == answers["http_stream"],
        "engine_batch_gain": {
            "batch": args.clients,
            "wall_s": round(batch_wall, 4),
            "over_batch_1": round(args.clients * engine / batch_wall, 2),
        },
    }


def goals(result: dict) -> list[dict]:
    runs, overhead_, clients = result["runs"], result["overhead"], result["settings"]["clients"]
    sequential = runs["sequential"]["tokens_per_s"]
    ratio = round(runs["concurrent"]["tokens_per_s"] / sequential, 2) if sequential else 0.0
    gain = overhead_["engine_batch_gain"]["over_batch_1"]
    over = overhead_["at_batch_1"]["http_json"]
    share = runs["concurrent"]["forward_share_of_loop"]
    return [
        {
            "goal": f"{clients} concurrent clients at least 3x the sequential tokens/s",
            "measured": f"{ratio}x (the engine's own gain from batch 1 to batch {clients}: {gain}x)",
            "met": ratio >= 3,
        },
        {
            "goal": "the server adds under 10 % to the engine's own time at batch 1 (JSON)",
            "measured": f"{over['over_engine']:+.1%} (over the server's own step loop for the same request: "
            f"{over['over_own_loop']:+.1%})",
            "met": over["over_engine"] < 0.10,
        },
        {
            "goal": f"at least 90 % of the step loop inside forwards at {clients} clients",
            "measured": share,
            "met": share is not None and share >= 0.90,
        },
    ]


def server_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype, "--max-batch-rows", str(args.max_batch_rows)]
    return flags + ["--max-queue", "256", "--log-level", "warning"]


def write_bench_model(args: argparse.Namespace, folder: Path) -> dict:
    """The bench model as a checkpoint folder for the server; its description."""
    print("writing the bench model ...", flush=True)
    loaded = build_demo(bench_config(args), seed=args.model_seed)
    description = describe_model(loaded.model, loaded.config)
    save_checkpoint(loaded, folder)
    del loaded
    gc.collect()
    return description


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {
        "command": "python -m loadtests.bench_server " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(resolve_device(args.device)),
    }
    flags = server_flags(args)
    result["server_command"] = "python -m server --model <bench model folder> " + " ".join(flags)
    result["settings"] = {
        "requests": args.requests,
        "clients": args.clients,
        "prompt_tokens": args.prompt_tokens,
        "gen_length": args.gen_length,
        "steps": args.steps,
        "block_length": args.block_length,
        "temperature": 0.0,
        "streamed": "every other request",
        "mixed_requests": args.mixed_requests,
        "mixed_prompt_tokens": "{}-{}".format(*MIXED_PROMPTS),
    }
    with tempfile.TemporaryDirectory(prefix="llada-bench-server-") as tmp:
        folder = Path(tmp) / "bench-llada"
        result["model"] = write_bench_model(args, folder)
        threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
        server = ServerProcess(["--model", str(folder), *flags], Path(tmp) / "server.log", threads)
        try:
            server.wait_ready(timeout=180)
            url, pid = server.url, server.proc.pid
            print(f"server ready at {url}; warming up ...", flush=True)
            load_run(url, requests_of(args, [args.prompt_tokens]), 1)
            load_run(url, requests_of(args, [args.prompt_tokens] * args.clients, steps=2), args.clients)
            fixed = requests_of(args, [args.prompt_tokens] * args.requests)
            result["runs"] = {
                "sequential": measured_run("sequential", url, fixed, 1, pid),
                "concurrent": measured_run("concurrent", url, fixed, args.clients, pid),
            }
            if args.mixed_requests:
                mixed = requests_of(args, mixed_lengths(args.mixed_requests))
                result["runs"]["mixed_prompt_lengths"] = measured_run("mixed", url, mixed, args.clients, pid)
            result["overhead"] = overhead(args, url, folder)
        finally:
            code = result["server_exit_code"] = server.stop()
            if code != 0:
                print(f"server exited with {code}; its log ends:\n{server.log_path.read_text()[-3000:]}")
    result["goals"] = goals(result)
    finish(result, started, args.json_path)


if __name__ == "__main__":
    main()
