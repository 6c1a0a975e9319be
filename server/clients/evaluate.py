"""`llada-server eval [lm-eval's arguments]`: lm-eval's own command line with the backend
`llada-server` registered (and chosen when no --model is given). The installed lm-eval (0.4.x)
finds models only in its own registry, with no plugin discovery, so a plain `lm_eval --model
llada-server` does not know this backend; this command is the way in."""

from __future__ import annotations

import sys

LM_EVAL_COMMANDS = ("ls", "validate")  # lm-eval subcommands that take no --model


def main(argv: list[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        from server.clients.lm_eval_backend import MODEL_NAME  # importing it registers the model
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("lm_eval"):
            raise
        print("llada-server eval needs lm-eval: pip install 'llada-server[eval]'", file=sys.stderr)
        return 2
    names_model = any(arg in ("--model", "-M") or arg.startswith("--model=") for arg in argv)
    if argv and not names_model and argv[0] not in LM_EVAL_COMMANDS:
        argv = [*argv, "--model", MODEL_NAME]
    sys.argv = ["llada-server eval", *argv]
    cli_evaluate()
    return 0
