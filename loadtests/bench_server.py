"""HTTP server benchmark: the real server under concurrent load against the same requests sent one
after another, and against the engine's own time, in one run.

    python -m loadtests.bench_server                      # CPU, float32
    python -m loadtests.bench_server --json bench_server.json

What it does
  1. Writes a bench model (the demo architecture at the bench configuration of
     loadtests/bench_engine.py: random weights, LLaDA's vocabulary) with `build_demo` +
     `save_checkpoint` into a temporary folder, and starts `python -m server --model <folder>
     --max-batch-rows 16` in a subprocess on a free loopback port.
  2. Warm-up: one request alone, then one round of `--clients` requests together (fewer steps).
  3. (a) sequential: the fixed request set (same prompt length, sent as input_ids, same
     gen_length/steps/block_length) one request after another (concurrency 1);
     (b) concurrent: the same set from `--clients` clients sending back to back;
     mixed: a set with prompt lengths drawn from `--mixed-prompts` at `--clients` clients,
     reported separately (the padding policy may split such a batch).
     Each run is bracketed by scrapes of /metrics: per run, the share of the engine's step loop
     inside forwards = delta llada_forward_duration_seconds_sum / delta
     llada_loop_iteration_seconds_sum (the worker times `denoiser.step(...)` - the model forward
     plus each job's LM head and token choice - inside each loop iteration with work), and mean
     rows per forward = delta llada_batch_rows_sum / delta llada_batch_rows_count.
  4. (c) overhead: one request of the fixed shape as JSON over HTTP at concurrency 1 (and once
     streamed), interleaved with the same request run in this process through `generate_batch`
     (batch 1) on the same weights loaded with `load_checkpoint`, same settings; medians of
     `--overhead-repeats`; overhead = server median / engine median - 1. Then, in process, the first
     `--clients` requests of the fixed set in one `generate_batch`: the engine's own batching gain
     on this machine, which bounds what the server's concurrent run can gain over the sequential one.
Requests use temperature 0; `--stream-share` of the fixed-set requests are streamed (SSE), which
gives the time to first step; the others are JSON.

Goals reported (met / not met, with the measured number): 8 concurrent clients >= 3x the
sequential generated tokens/s; the server adds < 10% to the engine's own time at batch 1; >= 90%
of the step loop's time inside forwards at 8 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from httpx_sse import connect_sse

from loadtests.common import add_model_args, add_request_set_args, bench_config, finish, machine_info, print_goals
from loadtests.loadgen import LoadReport, format_report, make_payload, planned, run_load
from server.engine.demo import build_demo, save_checkpoint
from server.engine.denoiser import generate_batch
from server.engine.loader import load_checkpoint
from server.engine.sampling_params import SamplingParams
from tests.support import ServerProcess, scrape

# ---------------------------------------------------------------------------------------------
# setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_request_set_args(p, requests=16, clients=8)
    p.add_argument("--mixed-prompts", default="16-96", help="prompt length range of the mixed-length run ('' skips it)")
    p.add_argument("--mixed-requests", type=int, default=16)
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=300.0, help="hard bound of each load run")
    p.add_argument("--json", dest="json_path", default=None, help="write the figures to this file")
    return p.parse_args(argv)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_busy_share(seconds: float = 2.0) -> float | None:
    """Share of all cores busy over `seconds`, from /proc/stat (Linux): other work on the machine."""

    def sample() -> tuple[int, int]:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def run_header(script: str, args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The command, the machine and how busy it was: the start of every HTTP benchmark's figures."""
    return {
        "command": f"python -m loadtests.{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(torch.device(args.device)),
        "load_average_start": load_average(),
        "cpu_busy_before_start": cpu_busy_share(),
    }


def write_model(args: argparse.Namespace, folder: Path) -> dict:
    config = bench_config(args)
    loaded = build_demo(config, seed=args.model_seed)
    params = sum(p.numel() for p in loaded.model.parameters())
    save_checkpoint(loaded, folder)
    del loaded
    gc.collect()
    return {
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "mlp_hidden_size": config.mlp_hidden_size,
        "vocab_size": config.vocab_size,
        "parameters": params,
    }


def server_args(args: argparse.Namespace, model: Path) -> list[str]:
    return [
        "--model",
        str(model),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max-batch-rows",
        str(args.max_batch_rows),
        "--max-queue",
        "256",
        "--log-level",
        "warning",
    ]


HISTOGRAMS = ("llada_forward_duration_seconds", "llada_loop_iteration_seconds", "llada_batch_rows")


def engine_sums(url: str) -> dict[str, float]:
    """`{histogram}_sum` and `{histogram}_count` of the engine histograms, from GET /metrics."""
    metrics = scrape(url)
    return {f"{h}_{part}": metrics.value(f"{h}_{part}") for h in HISTOGRAMS for part in ("sum", "count")}


def engine_share(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    fwd, loop = d.get("llada_forward_duration_seconds_sum", 0.0), d.get("llada_loop_iteration_seconds_sum", 0.0)
    forwards = d.get("llada_forward_duration_seconds_count", 0.0)
    batches = d.get("llada_batch_rows_count", 0.0)
    return {
        "forwards": int(forwards),
        "forward_sum_s": round(fwd, 3),
        "loop_iteration_sum_s": round(loop, 3),
        "forward_share_of_loop": round(fwd / loop, 4) if loop else None,
        "loop_busy_share_of_wall": round(loop / wall_s, 4) if wall_s else None,
        "mean_forward_s": round(fwd / forwards, 4) if forwards else None,
        "mean_rows_per_forward": round(d.get("llada_batch_rows_sum", 0.0) / batches, 2) if batches else None,
    }


# ---------------------------------------------------------------------------------------------
# the runs


def fixed_payloads(
    args,
    count: int,
    prompt_lengths: list[int] | None = None,
    stream_share: float | None = None,
    steps: int | None = None,
) -> list[dict]:
    share = args.stream_share if stream_share is None else stream_share
    out = []
    for i in range(count):
        stream = int((i + 1) * share) > int(i * share)  # spread streamed requests evenly
        length = prompt_lengths[i] if prompt_lengths else args.prompt_tokens
        out.append(make_payload(length, args.gen_length, steps or args.steps, args.block_length, stream, offset=i))
    return out


def load_run(url: str, payloads: list[dict], concurrency: int, max_seconds: float) -> LoadReport:
    return asyncio.run(
        run_load(url, planned(payloads), max_requests=len(payloads), max_seconds=max_seconds, concurrency=concurrency)
    )


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measured_run(
    name: str, url: str, payloads: list[dict], concurrency: int, max_seconds: float, server_pid: int
) -> dict:
    print(f"  running {name}: {len(payloads)} requests at concurrency {concurrency} ...", flush=True)
    load_before, server_cpu, client_cpu = load_average(), process_cpu_s(server_pid), time.process_time()
    before = engine_sums(url)
    report = load_run(url, payloads, concurrency, max_seconds)
    after = engine_sums(url)
    client_cpu = time.process_time() - client_cpu
    server_cpu = (process_cpu_s(server_pid) or 0.0) - (server_cpu or 0.0)
    print("    " + format_report(report).replace("\n", "\n    "), flush=True)
    requests = [
        {
            "index": r.index,
            "stream": r.stream,
            "prompt_tokens": r.prompt_tokens,
            "sent_s": round(r.sent_s, 3),
            "latency_s": r.latency_s and round(r.latency_s, 4),
            "ttfs_s": r.ttfs_s and round(r.ttfs_s, 4),
            "server_queue_s": r.server_queue_s and round(r.server_queue_s, 4),
            "error": r.error,
        }
        for r in report.results
    ]
    return {
        "load": report.to_dict(),
        "engine": engine_share(before, after, report.wall_s),
        "cpu_s": {"server": round(server_cpu, 2), "load_generator": round(client_cpu, 2)},
        "load_average": [load_before, load_average()],
        "prompt_lengths": sorted({len(p["input_ids"]) for p in payloads}),
        "requests": requests,
    }


def timed_http(client: httpx.Client, url: str, payload: dict) -> tuple[float, list[int], float | None]:
    """(end-to-end seconds, token_ids, time to first step) of one request."""
    start = time.perf_counter()
    if not payload.get("stream"):
        response = client.post(url + "/v1/generate", json=payload)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["token_ids"], None
    first = None
    with connect_sse(client, "POST", url + "/v1/generate", json=payload) as source:
        source.response.raise_for_status()
        for event in source.iter_sse():
            if event.event == "step" and first is None:
                first = time.perf_counter() - start
            elif event.event == "done":
                return time.perf_counter() - start, json.loads(event.data)["token_ids"], first
            elif event.event == "error":
                raise RuntimeError(f"stream error: {event.data}")
    raise RuntimeError("stream ended without a done event")


def overhead(args, url: str, model_folder: Path) -> dict:
    print(
        f"  measuring overhead: {args.overhead_repeats} x (HTTP JSON, HTTP stream, in-process generate_batch), "
        f"then in-process batch {args.clients} ...",
        flush=True,
    )
    loaded = load_checkpoint(model_folder, args.device, args.dtype)
    payload = make_payload(args.prompt_tokens, args.gen_length, args.steps, args.block_length, stream=False)
    prompt = payload["input_ids"]
    params = SamplingParams(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length, temperature=0.0
    )
    engine_times, json_times, stream_times, ttfs = [], [], [], []
    # the server's own step-loop time for each HTTP request (from /metrics): what the HTTP layer,
    # queueing and event delivery add to that same request, free of the run-to-run spread
    json_loop_times, stream_loop_times = [], []
    with httpx.Client(trust_env=False, timeout=args.max_seconds) as client, torch.inference_mode():
        generate_batch(loaded, [prompt], [params])  # warm-up of this process
        answer_engine = answer_json = answer_stream = None
        for _ in range(args.overhead_repeats):  # interleaved, so drift in machine load hits all three
            loop_before = scrape(url).value("llada_loop_iteration_seconds_sum")
            seconds, answer_json, _ = timed_http(client, url, payload)
            json_times.append(seconds)
            loop_after = scrape(url).value("llada_loop_iteration_seconds_sum")
            json_loop_times.append(loop_after - loop_before)
            seconds, answer_stream, first = timed_http(client, url, {**payload, "stream": True})
            stream_times.append(seconds)
            stream_loop_times.append(scrape(url).value("llada_loop_iteration_seconds_sum") - loop_after)
            ttfs.append(first)
            start = time.perf_counter()
            answer_engine = generate_batch(loaded, [prompt], [params])[0]
            engine_times.append(time.perf_counter() - start)
        # the engine's own batching gain on this machine: the first `clients` requests of the fixed
        # set in one generate_batch (warm-up at that shape first) against `clients` x batch 1
        prompts = [p["input_ids"] for p in fixed_payloads(args, args.clients)]
        short = SamplingParams(gen_length=args.gen_length, steps=2, block_length=args.block_length, temperature=0.0)
        generate_batch(loaded, prompts, [short] * len(prompts))
        start = time.perf_counter()
        generate_batch(loaded, prompts, [params] * len(prompts))
        engine_batch_n = time.perf_counter() - start
    del loaded
    gc.collect()
    engine, http_json, http_stream = (statistics.median(x) for x in (engine_times, json_times, stream_times))
    return {
        "request": {
            "prompt_tokens": len(prompt),
            "gen_length": args.gen_length,
            "steps": args.steps,
            "block_length": args.block_length,
            "temperature": 0.0,
        },
        "engine_s": [round(x, 4) for x in engine_times],
        "http_json_s": [round(x, 4) for x in json_times],
        "http_stream_s": [round(x, 4) for x in stream_times],
        "http_stream_ttfs_s": [round(x, 4) for x in ttfs if x is not None],
        "engine_median_s": round(engine, 4),
        "http_json_median_s": round(http_json, 4),
        "http_stream_median_s": round(http_stream, 4),
        "overhead_json": round(http_json / engine - 1, 4),
        "overhead_stream": round(http_stream / engine - 1, 4),
        "in_server": {
            "json_loop_s": [round(x, 4) for x in json_loop_times],
            "stream_loop_s": [round(x, 4) for x in stream_loop_times],
            "json_over_own_loop": round(statistics.median(h / e - 1 for h, e in zip(json_times, json_loop_times)), 4),
            "stream_over_own_loop": round(
                statistics.median(h / e - 1 for h, e in zip(stream_times, stream_loop_times)), 4
            ),
        },
        "answers_equal": answer_engine == answer_json == answer_stream,
        "engine_batch_n": {
            "batch": args.clients,
            "wall_s": round(engine_batch_n, 4),
            "gain_vs_batch_1": round(args.clients * engine / engine_batch_n, 3),
        },
    }


# ---------------------------------------------------------------------------------------------
# report


def goals(result: dict) -> list[dict]:
    out = []
    runs = result.get("runs", {})
    seq, conc = runs.get("sequential"), runs.get("concurrent")
    if seq and conc and seq["load"]["tokens_per_s"] > 0:
        ratio = conc["load"]["tokens_per_s"] / seq["load"]["tokens_per_s"]
        result["throughput_ratio"] = round(ratio, 3)
        measured = f"{ratio:.2f}x"
        ov = result.get("overhead")
        if ov:
            measured += (
                f" (the engine's own in-process gain from batch 1 to batch {ov['engine_batch_n']['batch']} "
                f"on this machine: {ov['engine_batch_n']['gain_vs_batch_1']:.2f}x)"
            )
        out.append(
            {
                "goal": f"{result['settings']['clients']} concurrent clients >= 3x sequential tokens/s",
                "met": ratio >= 3.0,
                "measured": measured,
            }
        )
    ov = result.get("overhead")
    if ov:
        out.append(
            {
                "goal": "server adds < 10% to the engine's own time at batch 1 (JSON, concurrency 1)",
                "met": ov["overhead_json"] < 0.10,
                "measured": f"{ov['overhead_json']:+.1%} (streamed: {ov['overhead_stream']:+.1%}; over the "
                f"server's own step loop for the same request: JSON {ov['in_server']['json_over_own_loop']:+.1%})",
            }
        )
    if conc and conc["engine"]["forward_share_of_loop"] is not None:
        share = conc["engine"]["forward_share_of_loop"]
        clients = result["settings"]["clients"]
        out.append(
            {
                "goal": f">= 90% of the step loop's time inside forwards at {clients} clients",
                "met": share >= 0.90,
                "measured": f"{share:.1%}",
            }
        )
    return out


def _s(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def print_report(result: dict) -> None:
    print("\n== machine")
    for k, v in result["machine"].items():
        print(f"  {k:15s} {v}")
    print(f"  load average    {result['load_average_start']} at start, {result['load_average_end']} at end")
    busy = result.get("cpu_busy_before_start")
    print(f"  CPU busy before the start (2 s sample of /proc/stat): {'n/a' if busy is None else f'{busy:.0%}'}")
    if busy is not None and busy > 0.1:
        print("  WARNING: other processes were using these cores at the start: the timings may be disturbed")
    print("\n== bench configuration (demo architecture, random weights, float32 unless --dtype)")
    print("  " + ", ".join(f"{k}={v}" for k, v in result["config"].items()))
    s = result["settings"]
    print(f"  server: {' '.join(result['server_command'][1:])}")
    print(
        f"  fixed set: {s['requests']} requests, prompt {s['prompt_tokens']} tokens (input_ids), gen_length "
        f"{s['gen_length']}, steps {s['steps']}, block_length {s['block_length']}, temperature 0, "
        f"{s['stream_share']:.0%} streamed"
    )
    print("\n== load runs")
    print(
        f"  {'run':12s} {'conc':>4s} {'ok':>5s} {'wall s':>7s} {'req/s':>7s} {'tok/s':>7s} {'ttfs p50':>8s} "
        f"{'ttfs p99':>8s} {'lat p50':>8s} {'lat p99':>8s} {'fwd/loop':>8s} {'rows/fwd':>8s} {'ms/fwd':>7s}  errors"
    )
    for name, run in result["runs"].items():
        ld, en = run["load"], run["engine"]
        share = "n/a" if en["forward_share_of_loop"] is None else f"{en['forward_share_of_loop']:.1%}"
        ms = "n/a" if en["mean_forward_s"] is None else f"{en['mean_forward_s'] * 1000:.0f}"
        errors = ", ".join(f"{k}: {v}" for k, v in ld["errors"].items()) or "none"
        print(
            f"  {name:12s} {run['concurrency']:4d} {ld['ok']:2d}/{ld['sent']:<2d} {ld['wall_s']:7.2f} "
            f"{ld['requests_per_s']:7.3f} {ld['tokens_per_s']:7.2f} {_s(ld['ttfs_p50_s']):>8s} "
            f"{_s(ld['ttfs_p99_s']):>8s} {_s(ld['latency_p50_s']):>8s} {_s(ld['latency_p99_s']):>8s} "
            f"{share:>8s} {str(en['mean_rows_per_forward']):>8s} {ms:>7s}  {errors}"
        )
    print(
        "  tok/s = sum of gen_length of successful responses / wall; ttfs = send -> first `event: step` "
        "(streamed requests only); lat = send -> full response"
    )
    print(
        "  fwd/loop = delta llada_forward_duration_seconds_sum / delta llada_loop_iteration_seconds_sum, from "
        "/metrics scraped before and after the run; rows/fwd = delta llada_batch_rows_sum / _count"
    )
    print(
        f"  CPU seconds during each run ({os.cpu_count()} cores = {os.cpu_count()} CPU-s per wall second): "
        + "; ".join(
            f"{name} server {run['cpu_s']['server']:.1f}, load generator {run['cpu_s']['load_generator']:.1f}"
            f" (wall {run['load']['wall_s']:.1f}, load average {run['load_average'][0][0]} -> "
            f"{run['load_average'][1][0]})"
            for name, run in result["runs"].items()
        )
    )
    if "mixed" in result["runs"]:
        print(f"  mixed: prompt lengths {result['runs']['mixed']['prompt_lengths']}")
    ov = result.get("overhead")
    if ov:
        print(
            "\n== overhead at batch 1 (one request, concurrency 1, medians of "
            f"{len(ov['engine_s'])}; prompt {ov['request']['prompt_tokens']}, "
            f"gen_length {ov['request']['gen_length']}, steps {ov['request']['steps']})"
        )
        print(f"  engine in-process (generate_batch) {ov['engine_median_s']:.3f} s   {ov['engine_s']}")
        print(
            f"  HTTP JSON                          {ov['http_json_median_s']:.3f} s   {ov['http_json_s']}"
            f"   overhead {ov['overhead_json']:+.1%}"
        )
        print(
            f"  HTTP stream                        {ov['http_stream_median_s']:.3f} s   {ov['http_stream_s']}"
            f"   overhead {ov['overhead_stream']:+.1%}"
        )
        ins = ov["in_server"]
        print(
            "  HTTP latency over the server's own step-loop time for the same request (from /metrics), "
            f"median: JSON {ins['json_over_own_loop']:+.1%}, stream {ins['stream_over_own_loop']:+.1%}"
        )
        print(f"  answers equal (engine, JSON, stream): {ov['answers_equal']}")
        bn = ov["engine_batch_n"]
        print(
            f"  engine in-process, {bn['batch']} requests in one generate_batch: {bn['wall_s']:.3f} s -> "
            f"{bn['gain_vs_batch_1']:.2f}x the tokens/s of batch 1 (the engine's own batching gain here, "
            f"the ceiling for the concurrent/sequential ratio)"
        )
    print_goals(result)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run_header("bench_server", args, argv)
    with tempfile.TemporaryDirectory(prefix="llada-bench-server-") as tmp:
        folder = Path(tmp) / "bench-llada"
        print("writing the bench model ...", flush=True)
        result["config"] = write_model(args, folder)
        print("bench configuration:", result["config"], flush=True)
        threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
        server = ServerProcess(server_args(args, folder), Path(tmp) / "server.log", threads)
        result["server_command"] = ["python", "-m", "server", *server_args(args, Path("<bench model folder>"))]
        result["settings"] = {
            "requests": args.requests,
            "clients": args.clients,
            "prompt_tokens": args.prompt_tokens,
            "gen_length": args.gen_length,
            "steps": args.steps,
            "block_length": args.block_length,
            "stream_share": args.stream_share,
            "max_batch_rows": args.max_batch_rows,
            "mixed_prompts": args.mixed_prompts,
            "mixed_requests": args.mixed_requests,
        }
        try:
            server.wait_ready(timeout=180)
            url = server.url
            print(f"server ready at {url}; warming up ...", flush=True)
            load_run(url, fixed_payloads(args, 1, stream_share=0.0), 1, args.max_seconds)
            load_run(url, fixed_payloads(args, args.clients, steps=2), args.clients, args.max_seconds)
            fixed = fixed_payloads(args, args.requests)
            runs = {}
            runs["sequential"] = {
                "concurrency": 1,
                **measured_run("sequential", url, fixed, 1, args.max_seconds, server.proc.pid),
            }
            runs["concurrent"] = {
                "concurrency": args.clients,
                **measured_run("concurrent", url, fixed, args.clients, args.max_seconds, server.proc.pid),
            }
            if args.mixed_prompts:
                low, _, high = args.mixed_prompts.partition("-")
                lo, hi = int(low), int(high or low)
                lengths = [lo + (hi - lo) * i // max(1, args.mixed_requests - 1) for i in range(args.mixed_requests)]
                order = [(i * 7) % args.mixed_requests for i in range(args.mixed_requests)]  # interleave lengths
                if len(set(order)) != len(order):
                    order = list(range(args.mixed_requests))
                mixed = fixed_payloads(args, args.mixed_requests, prompt_lengths=[lengths[i] for i in order])
                runs["mixed"] = {
                    "concurrency": args.clients,
                    **measured_run("mixed", url, mixed, args.clients, args.max_seconds, server.proc.pid),
                }
            result["runs"] = runs
            result["overhead"] = overhead(args, url, folder)
        finally:
            server.stop()
            log_tail = Path(tmp, "server.log").read_text()[-3000:]
        if server.proc.returncode not in (0, None):
            print(f"server exited with {server.proc.returncode}; log tail:\n{log_tail}")
    result["load_average_end"] = load_average()
    result["goals"] = goals(result)
    finish(result, t0, args.json_path, print_report)


if __name__ == "__main__":
    main()
