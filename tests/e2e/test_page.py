"""The page at GET / in a real headless browser (Debian's chromium driven by Playwright) against
the real CLI server: it loads with nothing from outside the machine, paints every denoising step
of the SSE stream, keeps a multi-turn chat, stops a running answer, asks for the API key the
server wants, and fits a phone. A screenshot mid-answer is written by every run (the README's
image is this test's, with LLADA_SCREENSHOT_DIR=docs/images)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Request, sync_playwright

from tests import family
from tests.support import ServerProcess, scrape, wait_for

from . import HTTP_TIMEOUT, stream_events

CHROMIUM = Path("/usr/bin/chromium")
# A browser that talks to nothing but the page: no sync, updates, QUIC probes or first-run calls.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_DIR = "LLADA_SCREENSHOT_DIR"
KEY = "page-key-5d1e9a"
UNAUTHORIZED = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"

# Installed in the page by the test: one record per DOM change of the answer canvas (the step
# figure and each position's colour class), so frames replaced within milliseconds are all seen.
COLOURS = ("masked", "new-low", "new-mid", "new-high", "earlier", "edited")
RECORD_FRAMES = """(colours) => {
  window.frames_seen = [];
  const canvas = document.getElementById("canvas");
  new MutationObserver(() => {
    const cells = [...canvas.children];
    window.frames_seen.push({
      step: Number(document.getElementById("fig-step").textContent),
      colours: cells.map((cell) => colours.find((name) => cell.classList.contains(name)) || cell.className),
    });
  }).observe(canvas, { childList: true, subtree: true, attributes: true, characterData: true });
}"""


@dataclass
class PageRun:
    """An open page with everything it logged and requested."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def generate_bodies(self) -> list[dict]:
        return [json.loads(r.post_data) for r in self.requests if urlsplit(r.url).path == "/v1/generate"]

    def frames(self) -> list[dict]:
        """Each painted state of the canvas: the step figure, and each position's colour class."""
        return self.page.evaluate("window.frames_seen")

    def answers(self) -> list[str]:
        return self.page.eval_on_selector_all(".turn.assistant .text", "items => items.map((e) => e.textContent)")

    def ask(self, prompt: str, **settings: object) -> None:
        """Fill the given settings fields and the message, then send it with Enter."""
        for name, value in settings.items():
            self.page.fill(f"#{name}", str(value))
        self.page.fill("#prompt", prompt)
        self.page.press("#prompt", "Enter")

    def wait_for_answers(self, count: int) -> list[str]:
        self.page.wait_for_function(
            "(count) => document.querySelectorAll('.turn.assistant').length >= count", arg=count
        )
        return self.answers()

    def assert_clean(self, server: ServerProcess, expected_errors: tuple[str, ...] = ()) -> None:
        """No console errors but the expected ones, and every request went to the server under test
        (so to this machine)."""
        assert self.console_errors == list(expected_errors), self.console_errors
        origin = urlsplit(server.url)
        elsewhere = [r.url for r in self.requests if urlsplit(r.url)[:2] != origin[:2]]
        assert not elsewhere, elsewhere


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./scripts/test.sh as root, or apt-get install chromium")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint) -> Iterator[ServerProcess]:
    """One server for the tests without keys; each test's answers are exact, whatever ran before."""
    process = ServerProcess(
        ["--model", str(tiny_checkpoint), "--shutdown-grace", "5"], tmp_path_factory.mktemp("page") / "server.log"
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def open_page(browser) -> Iterator[Callable[..., PageRun]]:
    pages: list[Page] = []

    def open_(server: ServerProcess, viewport: dict | None = None) -> PageRun:
        page = browser.new_page()
        pages.append(page)
        if viewport:
            page.set_viewport_size(viewport)
        run = PageRun(page)
        page.on("console", lambda message: message.type == "error" and run.console_errors.append(message.text))
        page.on("pageerror", lambda error: run.console_errors.append(str(error)))
        page.on("request", lambda request: run.requests.append(request))
        response = page.goto(server.url + "/")
        assert response.status == 200, response.status
        page.evaluate(RECORD_FRAMES, list(COLOURS))
        return run

    yield open_
    for page in pages:
        page.close()


def server_answer(server: ServerProcess, body: dict, headers: dict | None = None) -> dict:
    """The server's own JSON answer to a request body the page sent."""
    response = httpx.post(
        server.url + "/v1/generate", json={**body, "stream": False}, headers=headers, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200, response.text
    return response.json()


def token_count(server: ServerProcess, text: str) -> int:
    response = httpx.post(server.url + "/v1/tokenize", json={"prompt": text}, timeout=HTTP_TIMEOUT)
    return response.json()["count"]


def test_the_page_loads_its_own_files_only_and_logs_no_error(server, open_page):
    run = open_page(server)
    run.page.wait_for_function("() => document.getElementById('model-name').textContent !== ''")
    assert run.page.text_content("#model-name") == httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    paths = {urlsplit(r.url).path for r in run.requests}
    assert {"/", "/ui/page.js", "/ui/page.css", "/ui/icon.svg", "/v1/models"} <= paths, paths
    assert run.page.is_hidden("#key-row"), "no keys are set, so the key field stays hidden"
    assert run.page.evaluate("document.activeElement.id") == "prompt"
    run.assert_clean(server)


def colours_after(steps: list[dict], step: int, length: int, pinned: set[int]) -> list[str]:
    """LLADA.md's colours after `step` steps of a stream: pinned and earlier reveals blue, this
    step's reveals by confidence, the rest masked."""
    colours = ["earlier" if i in pinned else "masked" for i in range(length)]
    for event in steps[:step]:
        for reveal in event["unmasked"]:
            if event["step"] < step:
                colours[reveal["index"]] = "earlier"
            else:
                confidence = reveal["confidence"]
                colours[reveal["index"]] = (
                    "new-low" if confidence < 0.3 else "new-mid" if confidence < 0.7 else "new-high"
                )
    return colours


def test_an_answer_paints_each_step_then_shows_the_servers_text(server, open_page):
    run = open_page(server)
    run.ask("Hello there", gen_length=64, steps=32, constraints="0:Once, 10:upon")
    (text,) = run.wait_for_answers(1)

    (body,) = run.generate_bodies()
    assert body == {
        "messages": [{"role": "user", "content": "Hello there"}],
        "gen_length": 64,
        "steps": 32,
        "block_length": 32,
        "temperature": 0,
        "cfg_scale": 0,
        "remasking": "low_confidence",
        "logits_eos_inf": False,
        "confidence_eos_eot_inf": False,
        "constraints": [{"position": 0, "text": "Once"}, {"position": 10, "text": "upon"}],
        "stream": True,
    }, "the settings as the page shows them, and no fast decoding field while they are at their defaults"
    assert text == server_answer(server, body)["text"]

    # The same request's own stream (temperature 0: the same steps) says what each frame must show.
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        steps, terminal, _ = stream_events(client, server.url, body)
    assert terminal == "done" and len(steps) == 32
    pinned = {*range(token_count(server, " Once")), *range(10, 10 + token_count(server, " upon"))}
    frames = run.frames()
    assert frames[0]["step"] == 0, "the canvas is there before the first step"
    for frame in frames:
        assert frame["colours"] == colours_after(steps, frame["step"], 64, pinned), frame
    intermediate = {
        f["step"] for f in frames if "masked" in f["colours"] and {"new-low", "new-mid", "new-high"} & set(f["colours"])
    }
    assert len(intermediate) >= 2, [f["step"] for f in frames]
    assert frames[-1]["step"] == 32 and "masked" not in frames[-1]["colours"]
    assert run.page.text_content("#fig-nfe") == "32"
    run.assert_clean(server)


def test_fast_decoding_settings_go_to_the_server_and_the_answer_says_approximate(server, open_page):
    run = open_page(server)
    run.page.select_option("#cache", "dual")
    run.page.check("#early_stop")
    run.ask("Quick, please", gen_length=64, steps=64, threshold=0.2)
    (text,) = run.wait_for_answers(1)
    (body,) = run.generate_bodies()
    assert (body["cache"], body["threshold"], body["early_stop"]) == ("dual", 0.2, True)
    answer = server_answer(server, body)
    assert text == answer["text"] and answer["approximate"] is True
    assert answer["usage"]["nfe"] < 64  # the threshold revealed several tokens in some steps
    assert run.page.text_content("#fig-nfe") == str(answer["usage"]["nfe"])
    assert "approximate" in run.page.text_content("#status")
    run.assert_clean(server)


def test_the_second_turn_sends_the_history_and_new_chat_clears_it(server, open_page):
    run = open_page(server)
    run.ask("Hello", gen_length=32, steps=16)
    (first,) = run.wait_for_answers(1)
    run.ask("And then?")
    _, second = run.wait_for_answers(2)

    bodies = run.generate_bodies()
    assert first == server_answer(server, bodies[0])["text"]
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    assert second == server_answer(server, bodies[1])["text"]

    run.page.click("#new-chat")
    run.ask("Hi again")
    run.page.wait_for_function("() => document.querySelectorAll('.turn.assistant').length === 1")
    assert run.generate_bodies()[2]["messages"] == [{"role": "user", "content": "Hi again"}]
    run.assert_clean(server)


def test_stop_disconnects_and_the_server_cancels_the_job(server, open_page, tmp_path):
    run = open_page(server)
    before = scrape(server.url)
    run.ask("Tell me about the sea.", gen_length=512, steps=256)
    # A few blocks in: the picture the README shows.
    run.page.wait_for_function(
        "() => window.frames_seen.some((f) => f.colours.filter((c) => c === 'masked').length <= 400)"
    )
    screenshot = Path(os.environ.get(SCREENSHOT_DIR) or tmp_path) / "page.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    run.page.screenshot(path=str(screenshot))
    assert run.page.is_enabled("#stop"), "the answer finished before Stop could be pressed"
    run.page.click("#stop")

    wait_for(lambda: scrape(server.url).moved(before, "llada_cancelled_total") == 1, what="the job's cancellation")
    wait_for(lambda: scrape(server.url).value("llada_running_jobs") == 0, what="no job running")
    status = run.page.text_content("#status")
    assert re.fullmatch(r"Stopped at step \d+\. Your message is back in the box\.", status), status
    assert run.page.input_value("#prompt") == "Tell me about the sea."
    assert run.answers() == [] and run.page.is_enabled("#send")
    assert screenshot.stat().st_size > 10_000
    run.assert_clean(server)


def test_with_an_api_key_the_page_shows_the_401_then_works_with_the_key(start_server, tiny_checkpoint, open_page):
    keyed = start_server("--model", str(tiny_checkpoint), "--api-key", KEY)
    run = open_page(keyed)
    run.page.wait_for_selector("#key-row", state="visible")  # /v1/models answered 401

    run.ask("Hello", gen_length=16, steps=8, block_length=16)
    run.page.wait_for_selector("#error", state="visible")
    assert run.page.text_content("#error").startswith("401 invalid_api_key: missing or wrong API key")
    assert run.page.evaluate("document.activeElement.id") == "api-key"
    assert run.page.input_value("#prompt") == "Hello" and run.answers() == []

    run.page.fill("#api-key", KEY)
    run.page.press("#api-key", "Enter")
    (text,) = run.wait_for_answers(1)
    assert run.page.is_hidden("#error")
    sent = [r for r in run.requests if urlsplit(r.url).path == "/v1/generate"]
    assert [r.headers.get("authorization") for r in sent] == [None, f"Bearer {KEY}"]
    auth = {"Authorization": f"Bearer {KEY}"}
    assert text == server_answer(keyed, run.generate_bodies()[-1], auth)["text"]
    # Chromium logs every 4xx answer to a fetch, which no page can prevent: exactly the two 401s
    # before the key (/v1/models, then the first /v1/generate), and nothing else.
    run.assert_clean(keyed, expected_errors=(UNAUTHORIZED,) * 2)


def test_errors_show_the_envelope_and_point_at_the_field_to_fix(server, open_page):
    run = open_page(server)
    page = run.page
    run.ask("Hello", constraints="0:Once, five:upon")
    page.wait_for_selector("#error", state="visible")
    assert page.text_content("#error") == 'Pinned words: "five:upon" is not position:word (for example 0:Once, 5:upon)'
    assert page.evaluate("document.activeElement.id") == "constraints"
    assert run.generate_bodies() == [], "a malformed setting is caught before anything is sent"

    page.fill("#constraints", "")
    run.ask("Hello", gen_length=16)  # block_length stays 32
    page.wait_for_function("() => document.getElementById('error').textContent.startsWith('400')")
    assert page.text_content("#error") == "400 invalid_value: block_length 32 is larger than gen_length 16"
    assert page.evaluate("document.activeElement.id") == "block_length"
    assert page.get_attribute("#block_length", "aria-invalid") == "true"
    assert page.input_value("#prompt") == "Hello" and run.answers() == []

    page.fill("#block_length", "16")
    page.press("#prompt", "Enter")
    run.wait_for_answers(1)
    assert page.is_hidden("#error") and page.get_attribute("#block_length", "aria-invalid") is None


def test_a_phone_window_and_the_keyboard_alone_are_enough(server, open_page):
    run = open_page(server, viewport={"width": 390, "height": 844})
    page = run.page
    assert not page.evaluate("document.getElementById('settings-box').open"), "settings start folded on a phone"

    # Focus starts in the message; then its buttons (Stop is disabled, so skipped), then the settings.
    page.keyboard.type("Hello from a phone")
    tabs = []
    for _ in range(4):
        page.keyboard.press("Tab")
        tabs.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if tabs[-1] == "SUMMARY":
            page.keyboard.press("Enter")  # unfold the settings
    assert tabs == ["send", "new-chat", "SUMMARY", "gen_length"], tabs
    for value, next_field in (("16", "steps"), ("8", "block_length"), ("8", None)):
        page.keyboard.press("ControlOrMeta+A")
        page.keyboard.type(value)
        if next_field:
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == next_field
    page.keyboard.press("Enter")  # Enter in a settings field sends the message too
    run.wait_for_answers(1)

    (body,) = run.generate_bodies()
    assert body["messages"] == [{"role": "user", "content": "Hello from a phone"}]
    assert (body["gen_length"], body["steps"], body["block_length"]) == (16, 8, 8), body
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "nothing scrolls sideways"
    for selector in ("#prompt", "#send", "#stop", "#canvas", ".turn.assistant"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)
    run.assert_clean(server)


def test_a_llada2_server_gets_its_own_settings_and_edits_show_purple(tmp_path_factory, open_page):
    folder = family.write_llada2_checkpoint(tmp_path_factory.mktemp("page-llada2") / "llada2")
    process = ServerProcess(["--model", str(folder), "--shutdown-grace", "5"], folder.parent / "server.log")
    try:
        process.wait_ready()
        run = open_page(process)
        run.page.wait_for_function("() => document.getElementById('model-name').textContent !== ''")
        assert run.page.is_hidden("#cfg_scale") and run.page.is_hidden("#cache") and run.page.is_hidden("#constraints")
        assert run.page.is_visible("#editing_threshold")
        assert (run.page.input_value("#steps"), run.page.input_value("#threshold")) == ("32", "0.95")
        run.ask("Tell me a story about a fox.", gen_length=48, threshold=0.5, editing_threshold=0, max_post_steps=4)
        (text,) = run.wait_for_answers(1)
        (body,) = run.generate_bodies()
        assert body == {
            "messages": [{"role": "user", "content": "Tell me a story about a fox."}],
            "constraints": [],
            "gen_length": 48,
            "steps": 32,
            "block_length": 32,
            "temperature": 0,
            "threshold": 0.5,
            "editing_threshold": 0,
            "max_post_steps": 4,
            "early_stop": False,
            "stream": True,
        }
        assert text == server_answer(process, body)["text"]
        assert any("edited" in frame["colours"] for frame in run.frames()), "an edit is painted purple"
        colour = run.page.eval_on_selector(".legend .tok.edited", "e => getComputedStyle(e).backgroundColor")
        assert colour == "rgb(176, 124, 216)"  # #b07cd8, as the README says
        run.assert_clean(process)
    finally:
        process.stop()


@pytest.mark.parametrize("member", ["illada", "llada_moe"])
def test_the_page_answers_with_a_full_attention_family_member(tmp_path_factory, open_page, member):
    write = {"illada": family.write_illada_checkpoint, "llada_moe": family.write_llada_moe_checkpoint}[member]
    folder = write(tmp_path_factory.mktemp("page-" + member) / member, seed=1)
    process = ServerProcess(["--model", str(folder), "--shutdown-grace", "5"], folder.parent / "server.log")
    try:
        process.wait_ready()
        run = open_page(process)
        run.page.wait_for_function("() => document.getElementById('model-name').textContent !== ''")
        assert run.page.is_visible("#cfg_scale") and run.page.is_hidden("#editing_threshold")
        run.ask("Hi", gen_length=16, steps=8, block_length=8)
        (text,) = run.wait_for_answers(1)
        (body,) = run.generate_bodies()
        assert text == server_answer(process, body)["text"]
        assert run.frames()[-1]["step"] == 8 and "masked" not in run.frames()[-1]["colours"]
        run.assert_clean(process)
    finally:
        process.stop()
