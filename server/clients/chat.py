"""`llada-server chat --url URL`: a multi-turn chat in the terminal with a running server, the
authors' chat.py over HTTP. Each answer streams from /v1/generate; while it denoises, a status line
shows the step and how many answer positions are revealed. Ctrl-C stops the answer (the stream is
closed, and the server cancels the job) and returns to the prompt; `/reset` starts over, `/exit`
or end of input quits. The API key comes from $LLADA_API_KEY."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable
from typing import TextIO

import httpx
from httpx_sse import connect_sse

from server.api.schemas import GenerateRequest
from server.clients.server_api import GENERATION_SETTINGS, ServerError, auth_headers, check, error_of

PROMPT = "you> "
ANSWER = "llada> "
CLEAR_LINE = "\r\x1b[2K"


def flag_kind(annotation: object) -> tuple[type, list[str] | None]:
    """The argparse type (and choices) of a request field: X | None is X, Literal is a choice."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    return annotation, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llada-server chat",
        description="Chat with a running llada-server in the terminal (the API key comes from $LLADA_API_KEY).",
        epilog="In the chat: /reset clears the history, /exit quits, Ctrl-C stops the answer being denoised.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--system", default=None, help="a system message that opens every conversation")
    group = parser.add_argument_group("generation settings (left out: the server's defaults)")
    for name in GENERATION_SETTINGS:
        field = GenerateRequest.model_fields[name]
        kind, choices = flag_kind(field.annotation)
        flag = "--" + name.replace("_", "-")
        help_text = field.description or (
            f"default {field.default}" if field.default is not None else "unset by default"
        )
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)
    return parser


class Progress:
    """The status line while an answer denoises; only on a terminal."""

    def __init__(self, out: TextIO):
        self.out = out
        self.live = out.isatty()
        self.revealed = 0

    def step(self, step: dict) -> None:
        self.revealed += sum(not reveal["edit"] for reveal in step["unmasked"])  # an edit rewrites a revealed one
        if self.live:
            total = self.revealed + step["masked"]
            self.out.write(f"{CLEAR_LINE}denoising: step {step['step']}, {self.revealed}/{total} revealed")
            self.out.flush()

    def clear(self) -> None:
        if self.live:
            self.out.write(CLEAR_LINE)
            self.out.flush()


def answer(client: httpx.Client, messages: list[dict], settings: dict, progress: Progress) -> str:
    """One streamed answer's text (the server already cut it at the first EOS/EOT)."""
    body = {**settings, "messages": messages, "stream": True}
    with connect_sse(client, "POST", "/v1/generate", json=body) as source:
        if source.response.status_code != 200:
            source.response.read()
            check(source.response)
        for event in source.iter_sse():
            if event.event == "step":
                progress.step(event.json())
            elif event.event == "done":
                return event.json()["text"]
            elif event.event == "error":
                raise error_of(500, event.json())
    raise ServerError(502, "the stream ended without an answer")


class Chat:
    def __init__(self, client: httpx.Client, settings: dict, system: str | None, out: TextIO):
        self.client = client
        self.settings = settings
        self.system = system
        self.out = out
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def turn(self, question: str) -> None:
        """Ask; the question and answer join the history only when an answer comes."""
        asked = [*self.messages, {"role": "user", "content": question}]
        progress = Progress(self.out)
        try:
            text = answer(self.client, asked, self.settings, progress)
        except KeyboardInterrupt:
            progress.clear()
            self.say("(stopped)")
            return
        except ServerError as error:
            progress.clear()
            self.say(f"error: {error.message}")
            return
        except httpx.HTTPError as error:
            progress.clear()
            self.say(f"error: cannot reach the server: {error}")
            return
        progress.clear()
        self.say(ANSWER + text)
        self.messages = [*asked, {"role": "assistant", "content": text}]

    def run(self, read: Callable[[str], str]) -> int:
        while True:
            try:
                line = read(PROMPT).strip()
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:
                self.say("\n(/exit or end of input quits)")
                continue
            if line == "/exit":
                return 0
            if line == "/reset":
                self.reset()
                self.say("(history cleared)")
            elif line:
                self.turn(line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {name: getattr(args, name) for name in GENERATION_SETTINGS if getattr(args, name) is not None}
    with httpx.Client(base_url=args.url, headers=auth_headers(), timeout=httpx.Timeout(60.0)) as client:
        try:
            models = check(client.get("/v1/models")).json()
        except (ServerError, httpx.HTTPError) as error:
            print(f"llada-server chat: cannot use {args.url}: {error}", file=sys.stderr)
            return 1
        print(f"connected to {args.url} ({models['data'][0]['id']}); /reset clears the history, /exit quits")
        return Chat(client, settings, args.system, sys.stdout).run(input)
