"""`llada-server` / `python -m server`: load the model, then serve it until SIGTERM or SIGINT.

Flags are parsed before torch and the app are imported, so `--help` and bad flags answer at once.
"""

from __future__ import annotations

import sys

from server.config import load_config
from server.logging_setup import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_format, config.log_level)
    from server.serve import serve

    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
