"""`llada-server` / `python -m server`: load the model, then serve it until SIGTERM or SIGINT.
`llada-server SUBCOMMAND ...` runs a subcommand instead (chat, eval: the clients; ray: replicas on
Ray Serve).

Flags are parsed before torch and the app are imported, so `--help` and bad flags answer at once.
"""

from __future__ import annotations

import importlib
import sys

from server.config import load_config
from server.logging_setup import configure_logging

# subcommand -> module whose main(argv) runs it; imported only when named
SUBCOMMANDS = {
    "chat": "server.clients.chat",
    "eval": "server.clients.evaluate",
    "ray": "server.ray_serve.cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    config = load_config(argv)
    configure_logging(config.log_format, config.log_level)
    from server.serve import serve

    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
