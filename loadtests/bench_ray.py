"""Ray Serve replicas against the plain server, in one run.

    python -m loadtests.bench_ray --json bench_ray.json

What it does
  1. Writes the bench model of loadtests/bench_server.py into a temporary folder.
  2. Overhead of Ray's proxy at batch 1: the plain server (`python -m server`) and one Ray
     replica (`python -m server ray --replicas 1`), both up, each with --cpus-per-replica torch
     threads; the same request (the fixed shape of bench_server, temperature 0) as JSON and
     streamed, sent to one then the other, `--overhead-repeats` times interleaved; medians.
     The answers of both are compared.
  3. Scale-out: the fixed set of `--requests` requests from `--clients` concurrent clients
     against 1 replica, then against `--replicas` replicas (a new Ray each), each replica with
     --cpus-per-replica CPUs, so N replicas use N times the CPUs, as N GPUs would. Each
     replica's /metrics is scraped before and after: requests and forwards per replica.
Every Ray process is started by `llada-server ray` itself and gone when it exits.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.bench_server import (
    fixed_payloads,
    load_average,
    load_run,
    run_header,
    server_args,
    timed_http,
    write_model,
)
from loadtests.common import add_model_args, add_request_set_args, finish
from loadtests.loadgen import format_report, make_payload
from tests.ray_serve import RayServer, replica_label
from tests.support import Scrape, ServerProcess, scrape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_request_set_args(p, requests=32, clients=16)
    p.add_argument("--replicas", type=int, default=2, help="replicas of the scale-out run (default 2)")
    p.add_argument("--cpus-per-replica", type=int, default=1, help="CPUs (torch threads) per replica (default 1)")
    p.add_argument("--overhead-repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=600.0, help="hard bound of each load run")
    p.add_argument("--json", dest="json_path", default=None, help="write the figures to this file")
    return p.parse_args(argv)


def ray_server(args: argparse.Namespace, replicas: int, model: Path, log: Path) -> RayServer:
    server = RayServer(replicas, [*server_args(args, model), "--cpus-per-replica", str(args.cpus_per_replica)], log)
    server.wait_ready(timeout=300)
    return server


def overhead(args: argparse.Namespace, plain_url: str, ray_url: str) -> dict:
    payload = make_payload(args.prompt_tokens, args.gen_length, args.steps, args.block_length, stream=False)
    times: dict[str, list[float]] = {"plain_json": [], "ray_json": [], "plain_stream": [], "ray_stream": []}
    answers = {}
    with httpx.Client(trust_env=False, timeout=args.max_seconds) as client:
        for url in (plain_url, ray_url):  # warm-up
            timed_http(client, url, payload)
        for _ in range(args.overhead_repeats):  # interleaved, so drift in machine load hits both
            for name, url in (("plain", plain_url), ("ray", ray_url)):
                for kind, body in (("json", payload), ("stream", {**payload, "stream": True})):
                    seconds, answers[f"{name}_{kind}"], _ = timed_http(client, url, body)
                    times[f"{name}_{kind}"].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "request": {k: payload[k] for k in ("gen_length", "steps", "block_length")}
        | {"prompt_tokens": args.prompt_tokens},
        "seconds": {name: [round(x, 4) for x in values] for name, values in times.items()},
        "medians_s": {name: round(x, 4) for name, x in medians.items()},
        "ray_over_plain_json": round(medians["ray_json"] / medians["plain_json"] - 1, 4),
        "ray_over_plain_stream": round(medians["ray_stream"] / medians["plain_stream"] - 1, 4),
        "answers_equal": len({tuple(a) for a in answers.values()}) == 1,
    }


def per_replica(server: RayServer) -> list[Scrape]:
    return [scrape(server.metrics_url(rank)) for rank in range(server.replicas)]


def replica_moves(before: list[Scrape], after: list[Scrape]) -> list[dict]:
    out = []
    for b, a in zip(before, after):
        label = replica_label(a.samples)
        forwards = a.moved(b, "llada_batch_rows_count", replica=label)
        rows = a.moved(b, "llada_batch_rows_sum", replica=label)
        served = a.moved(b, "llada_requests_total", endpoint="/v1/generate", status="200", replica=label)
        out.append(
            {
                "replica": label,
                "requests": int(served),
                "forwards": int(forwards),
                "mean_rows_per_forward": round(rows / forwards, 2) if forwards else None,
            }
        )
    return out


def scale_run(args: argparse.Namespace, replicas: int, model: Path, tmp: Path) -> dict:
    print(f"starting {replicas} replica(s) ...", flush=True)
    server = ray_server(args, replicas, model, tmp / f"ray-{replicas}.log")
    try:
        load_run(server.url, fixed_payloads(args, args.clients, steps=2), args.clients, args.max_seconds)  # warm-up
        before = per_replica(server)
        load_before = load_average()
        report = load_run(server.url, fixed_payloads(args, args.requests), args.clients, args.max_seconds)
        print("    " + format_report(report).replace("\n", "\n    "), flush=True)
        return {
            "replicas": replicas,
            "load": report.to_dict(),
            "per_replica": replica_moves(before, per_replica(server)),
            "load_average": [load_before, load_average()],
        }
    finally:
        server.stop()
        server.kill_leftovers()


def print_report(result: dict) -> None:
    print("\n== machine")
    for k, v in result["machine"].items():
        print(f"  {k:15s} {v}")
    print(f"  load average    {result['load_average_start']} at start, {result['load_average_end']} at end")
    print(f"  CPU busy before the start (2 s sample of /proc/stat): {result['cpu_busy_before_start']}")
    print("\n== bench configuration: " + ", ".join(f"{k}={v}" for k, v in result["config"].items()))
    print(f"  settings: {result['settings']}")
    ov = result["overhead"]
    print(f"\n== overhead of Ray's proxy at batch 1 (medians of {len(ov['seconds']['ray_json'])}), {ov['request']}")
    for name, seconds in ov["seconds"].items():
        print(f"  {name:13s} {ov['medians_s'][name]:.3f} s   {seconds}")
    print(
        f"  Ray over plain: JSON {ov['ray_over_plain_json']:+.1%}, stream {ov['ray_over_plain_stream']:+.1%}; "
        f"answers equal: {ov['answers_equal']}"
    )
    print(f"\n== {result['settings']['clients']} clients, {result['settings']['requests']} requests")
    print(f"  {'replicas':>8s} {'ok':>6s} {'wall s':>7s} {'req/s':>7s} {'tok/s':>7s} {'lat p50':>8s} {'lat p99':>8s}")
    for run in result["scale"]:
        ld = run["load"]
        print(
            f"  {run['replicas']:8d} {ld['ok']:3d}/{ld['sent']:<3d} {ld['wall_s']:7.2f} {ld['requests_per_s']:7.3f} "
            f"{ld['tokens_per_s']:7.2f} {ld['latency_p50_s']:8.3f} {ld['latency_p99_s']:8.3f}  "
            f"per replica: {run['per_replica']}  load average {run['load_average']}"
        )
    runs = result["scale"]
    n = runs[-1]["replicas"]
    ratio = runs[-1]["load"]["tokens_per_s"] / runs[0]["load"]["tokens_per_s"]
    print(f"  {n} replicas / 1: {ratio:.2f}x the tokens/s with {n}x the CPUs (ideal {n}x)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run_header("bench_ray", args, argv)
    settings = ("replicas", "cpus_per_replica", "max_batch_rows", "requests", "clients", "prompt_tokens")
    settings += ("gen_length", "steps", "block_length", "stream_share")
    result["settings"] = {name: getattr(args, name) for name in settings}
    with tempfile.TemporaryDirectory(prefix="llada-bench-ray-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "bench-llada"
        print("writing the bench model ...", flush=True)
        result["config"] = write_model(args, folder)
        threads = str(args.cpus_per_replica)
        plain = ServerProcess(
            server_args(args, folder), tmp / "plain.log", {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        )
        try:
            plain.wait_ready(timeout=180)
            print("plain server ready; starting 1 replica for the overhead run ...", flush=True)
            one = ray_server(args, 1, folder, tmp / "ray-overhead.log")
            try:
                result["overhead"] = overhead(args, plain.url, one.url)
            finally:
                one.stop()
                one.kill_leftovers()
        finally:
            plain.stop()
        result["scale"] = [scale_run(args, n, folder, tmp) for n in (1, args.replicas)]
    result["load_average_end"] = load_average()
    finish(result, t0, args.json_path, print_report)


if __name__ == "__main__":
    main()
