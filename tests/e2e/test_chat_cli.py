"""`llada-server chat` against the real server (with an API key, taken from $LLADA_API_KEY): piped
stdin for a multi-turn conversation whose second answer sees the first, and a pseudo-terminal for
the live progress line and Ctrl-C, which stops the answer, cancels its job and returns to the
prompt."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import httpx
import pytest

from server.clients.chat import ANSWER, PROMPT
from tests.support import REPO_ROOT, scrape, wait_for

from . import HTTP_TIMEOUT, running_server

KEY = "chat-key"
FLAGS = ["--gen-length", "16", "--steps", "8", "--block-length", "8"]
SETTINGS = {"gen_length": 16, "steps": 8, "block_length": 8}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    args = ["--model", str(tiny_checkpoint), "--api-key", KEY, "--shutdown-grace", "5"]
    with running_server(args, tmp_path_factory.mktemp("chat")) as process:
        yield process


def chat_command(server, *flags: str) -> list[str]:
    return [sys.executable, "-m", "server", "chat", "--url", server.url, *flags]


def chat_env() -> dict[str, str]:
    return {**os.environ, "LLADA_API_KEY": KEY, "PYTHONPATH": str(REPO_ROOT)}


def generate(server, messages: list[dict]) -> str:
    response = httpx.post(
        server.url + "/v1/generate",
        json={"messages": messages, **SETTINGS},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=HTTP_TIMEOUT,
    )
    assert response.status_code == 200, response.text
    return response.json()["text"]


def prompt_tokens_logged(server) -> list[int]:
    lines = [line for line in server.logs().splitlines() if "endpoint=/v1/generate" in line]
    return [int(re.search(r"prompt_tokens=(\d+)", line).group(1)) for line in lines]


def test_piped_turns_keep_the_history_until_reset(server):
    questions = ["Hello there", "And after that?", "/reset", "A new start"]
    result = subprocess.run(
        chat_command(server, *FLAGS),
        input="\n".join([*questions, "/exit"]) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=chat_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first, second, reset, third, end = result.stdout.split(PROMPT)[1:]
    assert reset == "(history cleared)\n" and end == ""
    answers = [turn.removeprefix(ANSWER).removesuffix("\n") for turn in (first, second, third)]
    assert all(turn.startswith(ANSWER) for turn in (first, second, third)), result.stdout
    assert "denoising" not in result.stdout  # no progress line when stdout is not a terminal

    one = [{"role": "user", "content": questions[0]}]
    two = [*one, {"role": "assistant", "content": answers[0]}, {"role": "user", "content": questions[1]}]
    assert answers[0] == generate(server, one)
    assert answers[1] == generate(server, two)
    # The second request carried the first turn; the one after /reset did not.
    fresh = [{"role": "user", "content": questions[3]}]
    assert answers[2] == generate(server, fresh)
    assert prompt_tokens_logged(server)[:3] == [prompt_size(server, m) for m in (one, two, fresh)]


def prompt_size(server, messages: list[dict]) -> int:
    response = httpx.post(
        server.url + "/v1/tokenize", json={"messages": messages}, headers={"Authorization": f"Bearer {KEY}"}
    )
    return response.json()["count"]


class Terminal:
    """The chat on a pseudo-terminal: what it prints, and keys typed at it."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is SIGINT
            os.execve(command[0], command, env)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} did not appear; the terminal shows:\n{self.seen}")
            if select.select([self.fd], [], [], left)[0]:
                self.seen += os.read(self.fd, 4096).decode(errors="replace")
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_status(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


def test_ctrl_c_stops_the_answer_cancels_its_job_and_returns_to_the_prompt(server):
    long_answer = ["--gen-length", "512", "--steps", "512", "--block-length", "8", "--logits-eos-inf"]
    terminal = Terminal(chat_command(server, *long_answer), chat_env())
    before = scrape(server.url)
    terminal.read_until(PROMPT)
    terminal.type("Tell me a long story\r")
    terminal.read_until("denoising: step")
    terminal.read_until("revealed")  # the status line: step N, revealed / total
    terminal.type("\x03")
    terminal.read_until("(stopped)")
    terminal.read_until(PROMPT)

    def cancelled():
        now = scrape(server.url)
        return now.value("llada_running_jobs") == 0 and now.moved(before, "llada_cancelled_total") == 1

    wait_for(cancelled, timeout=30, what="the stopped answer's job to be cancelled")
    terminal.type("/exit\r")
    assert terminal.exit_status() == 0
