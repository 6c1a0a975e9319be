"""How many replicas run and what each one holds. These are the flags of `llada-server ray` and,
spelled with underscores, the `args` of the application in a Serve config file; both are parsed
together with the server's own flags, which configure every replica. Nothing here imports Ray,
so `llada-server ray --help` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.config import ServerConfig, load_config

DEFAULT_METRICS_PORT = 9500
# Ray gives each GPU replica one GPU of its own (CUDA_VISIBLE_DEVICES), which it sees as cuda:0.
REPLICA_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ReplicaPlan:
    replicas: int = 1
    # Both set: Ray Serve scales between them on ongoing requests, and `replicas` is unused.
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    # Replica i on a node serves its own /metrics on metrics_port + i (its local rank).
    metrics_port: int = DEFAULT_METRICS_PORT

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.autoscaling else self.replicas


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=None, help="fixed number of replicas (default 1)")
    parser.add_argument(
        "--min-replicas", type=int, default=None, help="autoscale on ongoing requests from this many replicas ..."
    )
    parser.add_argument("--max-replicas", type=int, default=None, help="... up to this many")
    parser.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs Ray reserves for each replica; a CPU replica runs that many torch threads (default 1)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="each replica serves its own /metrics on this port plus its rank on the node "
        f"(default {DEFAULT_METRICS_PORT})",
    )


def plan_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if (args.min_replicas is None) != (args.max_replicas is None):
        problems.append("--min-replicas and --max-replicas go together")
    if args.min_replicas is not None and args.replicas is not None:
        problems.append("give either --replicas or --min-replicas/--max-replicas, not both")
    if args.replicas is not None and args.replicas < 1:
        problems.append("--replicas must be at least 1")
    if args.min_replicas is not None and args.max_replicas is not None:
        if not 0 <= args.min_replicas <= args.max_replicas or args.max_replicas < 1:
            problems.append("--min-replicas must be between 0 and --max-replicas, and --max-replicas at least 1")
    if args.cpus_per_replica <= 0:
        problems.append("--cpus-per-replica must be positive")
    if not 1 <= args.metrics_port <= 65535:
        problems.append("--metrics-port must be a port number (1 to 65535)")
    return problems


def parse_replica_args(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, ReplicaPlan, ServerConfig]:
    """The plan's flags (and any others `parser` has), then every remaining flag as the server's.
    Raises SystemExit(2) with a message on a bad value, like `llada-server`."""
    args, server_argv = parser.parse_known_args(argv)
    problems = plan_problems(args)
    if problems:
        parser.error("; ".join(problems))
    config = load_config(server_argv)
    if config.device not in REPLICA_DEVICES:
        parser.error(f"--device {config.device}: each replica is given a GPU of its own; use auto, cpu or cuda")
    plan = ReplicaPlan(
        replicas=args.replicas or 1,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        cpus_per_replica=args.cpus_per_replica,
        metrics_port=args.metrics_port,
    )
    return args, plan, config


def app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada application args", allow_abbrev=False, add_help=False)
    add_plan_args(parser)
    return parser


def args_to_argv(args: Mapping[str, object]) -> list[str]:
    """A Serve config file's `args` ({max_batch_rows: 8, api_key: [a, b], metrics_auth: true}) as flags."""
    argv: list[str] = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def parse_app_args(args: Mapping[str, object]) -> tuple[ReplicaPlan, ServerConfig]:
    """The `args` of a Serve config file; ValueError with argparse's message when one is wrong
    (Ray shows it as the application's deploy error)."""
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            _, plan, config = parse_replica_args(app_parser(), args_to_argv(args))
    except SystemExit:
        raise ValueError(f"bad args for the llada application: {message.getvalue().strip()}") from None
    return plan, config
