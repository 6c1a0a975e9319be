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
import sys
import tempfile
import time
from pathlib import Path

from loadtests.bench_server import add_request_args, load_run, one_request, requests_of, server_flags, write_bench_model
from loadtests.common import finish, machine_info
from loadtests.loadgen import make_payload
from server.engine.devices import resolve_device
from tests.ray_serve import RayServer, replica_label
from tests.support import Scrape, ServerProcess, scrape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_args(p, requests=32, clients=16)
    p.add_argument("--replicas", type=int, default=2, help="replicas of the scale-out run (default 2)")
    p.add_argument("--cpus-per-replica", type=int, default=1, help="CPUs (torch threads) per replica (default 1)")
    p.add_argument("--overhead-repeats", type=int, default=5)
    p.add_argument("--json", dest="json_path", default=None, help="write the figures to this file")
    return p.parse_args(argv)


def ray_server(args: argparse.Namespace, replicas: int, model: Path, log: Path) -> RayServer:
    flags = ["--model", str(model), *server_flags(args), "--cpus-per-replica", str(args.cpus_per_replica)]
    server = RayServer(replicas, flags, log)
    server.wait_ready(timeout=300)
    return server


def overhead(args: argparse.Namespace, plain_url: str, ray_url: str) -> dict:
    payload = make_payload(args.prompt_tokens, args.gen_length, args.steps, args.block_length, stream=False)
    times: dict[str, list[float]] = {"plain_json": [], "ray_json": [], "plain_stream": [], "ray_stream": []}
    answers = {}
    for url in (plain_url, ray_url):  # warm-up
        one_request(url, payload)
    for _ in range(args.overhead_repeats):  # interleaved, so drift in machine load hits both
        for name, url in (("plain", plain_url), ("ray", ray_url)):
            for kind, body in (("json", payload), ("stream", {**payload, "stream": True})):
                result = one_request(url, body)
                answers[f"{name}_{kind}"] = result.token_ids
                times[f"{name}_{kind}"].append(result.latency_s)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "median_s": {
            name: {"median": round(x, 4), "samples": [round(v, 4) for v in times[name]]} for name, x in medians.items()
        },
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
        load_run(server.url, requests_of(args, [args.prompt_tokens] * args.clients, steps=2), args.clients)  # warm-up
        before = per_replica(server)
        report = load_run(server.url, requests_of(args, [args.prompt_tokens] * args.requests), args.clients)
        return {
            "replicas": replicas,
            "ok": report.ok,
            "wall_s": round(report.wall_s, 2),
            "tokens_per_s": round(report.tokens_per_s, 2),
            "latency_p50_s": report.latency_p50_s and round(report.latency_p50_s, 3),
            "latency_p99_s": report.latency_p99_s and round(report.latency_p99_s, 3),
            "per_replica": replica_moves(before, per_replica(server)),
        }
    finally:
        server.stop()
        server.kill_leftovers()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    result = {
        "command": "python -m loadtests.bench_ray " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(resolve_device(args.device)),
    }
    settings = ("replicas", "cpus_per_replica", "max_batch_rows", "requests", "clients", "prompt_tokens")
    result["settings"] = {name: getattr(args, name) for name in (*settings, "gen_length", "steps", "block_length")}
    with tempfile.TemporaryDirectory(prefix="llada-bench-ray-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "bench-llada"
        result["model"] = write_bench_model(args, folder)
        threads = str(args.cpus_per_replica)
        plain = ServerProcess(
            ["--model", str(folder), *server_flags(args)],
            tmp / "plain.log",
            {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
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
        runs = [scale_run(args, n, folder, tmp) for n in (1, args.replicas)]
    result["scale"] = runs
    result["replicas_over_one"] = round(runs[-1]["tokens_per_s"] / runs[0]["tokens_per_s"], 2)
    finish(result, started, args.json_path)


if __name__ == "__main__":
    main()
