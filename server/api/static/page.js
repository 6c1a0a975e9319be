"use strict";
// The page is a client of the public API and nothing else: POST /v1/generate with stream: true
// (read with fetch and a stream reader, since EventSource cannot POST), /v1/tokenize for the
// positions pinned words cover, and /v1/models to learn the model's name, its family's settings
// and defaults, and whether a key is needed. Each step event repaints only the positions it
// reveals (or edits).

const $ = (id) => document.getElementById(id);

const INTEGER_FIELDS = ["gen_length", "steps", "block_length"];
const NUMBER_FIELDS = ["temperature", "cfg_scale"];
const FLAG_FIELDS = ["logits_eos_inf", "confidence_eos_eot_inf"];
// Fast decoding: each field is sent only when it differs from the server's default (GET /v1/models
// says which), so a request with these untouched gets what the server would choose.
const FAST_DEFAULTS = { cache: "none", threshold: null, early_stop: false };
const SPECIAL_NAMES = { "<|endoftext|>": "EOS", "<|eot_id|>": "EOT" };

// Block-diffusion models (LLaDA2) take these instead of LLaDA's guidance, remasking, pins and cache.
// The thresholds start at the server's defaults, so an emptied one is sent as null (none); the
// others are sent only when filled in.
const BLOCK_THRESHOLDS = ["threshold", "editing_threshold"];
const BLOCK_OPTIONAL = ["max_post_steps", "top_k", "top_p"];

const chat = { history: [], controller: null, blockDiffusion: false };

// ---------------------------------------------------------------------------- requests

class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

function post(path, body, signal) {
  return fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
}

// The server answers every failure with {"error": {message, type, param, code}}.
async function envelope(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return { status: response.status, ...body.error };
  } catch (_) {
    // not JSON: fall through
  }
  return { status: response.status, message: `the server answered ${response.status}`, code: "http_error" };
}

class ApiFailure extends Error {
  constructor(error) {
    super(error.message);
    this.error = error;
  }
}

async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A chunk may end between the \r and \n of one line ending: keep a trailing \r for later.
    const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(cut);
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
        name = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        name = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } // comments (": ping") and other fields carry nothing for us
    }
  }
}

// ---------------------------------------------------------------------------- settings

// The authors' "position:word, position:word" (e.g. "0:Once, 5:upon, 10:time").
function parseConstraints(text) {
  const constraints = [];
  for (const part of text.split(",")) {
    if (!part.trim()) continue;
    const match = part.match(/^\s*(\d+)\s*:\s*(\S.*?)\s*$/);
    if (!match) {
      const example = "for example 0:Once, 5:upon";
      throw new FieldError("constraints", `Pinned words: "${part.trim()}" is not position:word (${example})`);
    }
    constraints.push({ position: Number(match[1]), text: match[2] });
  }
  return constraints;
}

function numberField(id) {
  const input = $(id);
  const label = document.querySelector(`label[for="${id}"]`).textContent;
  if (!input.checkValidity() || input.value.trim() === "") {
    throw new FieldError(id, `${label}: ${input.validationMessage || "enter a number"}`);
  }
  return Number(input.value);
}

// The generation settings as /v1/generate fields; a FieldError names the input to fix.
function readSettings() {
  return chat.blockDiffusion ? readBlockSettings() : readCanvasSettings();
}

function readBlockSettings() {
  const body = { constraints: [] };
  for (const id of INTEGER_FIELDS) body[id] = numberField(id);
  body.temperature = numberField("temperature");
  if ($("seed").value.trim() !== "") body.seed = numberField("seed");
  for (const id of BLOCK_THRESHOLDS) body[id] = $(id).value.trim() === "" ? null : numberField(id);
  for (const id of BLOCK_OPTIONAL) {
    if ($(id).value.trim() !== "") body[id] = numberField(id);
  }
  body.early_stop = $("early_stop").checked;
  return body;
}

function readCanvasSettings() {
  const body = {};
  for (const id of INTEGER_FIELDS) body[id] = numberField(id);
  for (const id of NUMBER_FIELDS) body[id] = numberField(id);
  body.remasking = $("remasking").value;
  for (const id of FLAG_FIELDS) body[id] = $(id).checked;
  body.constraints = parseConstraints($("constraints").value);
  if ($("seed").value.trim() !== "") body.seed = numberField("seed");
  if ($("cache").value !== FAST_DEFAULTS.cache) body.cache = $("cache").value;
  if ($("threshold").value.trim() !== "") {
    const threshold = numberField("threshold");
    if (!(threshold > 0 && threshold <= 1)) {
      throw new FieldError("threshold", "Confidence threshold: leave it empty or give 0 < t <= 1");
    }
    body.threshold = threshold;
  } else if (FAST_DEFAULTS.threshold !== null) {
    body.threshold = null; // emptied: the fixed schedule, not the server's default threshold
  }
  if ($("early_stop").checked !== FAST_DEFAULTS.early_stop) body.early_stop = $("early_stop").checked;
  return body;
}

// Answer position -> the constraint word whose tokens start there ("" for the ones after).
async function pinnedPositions(constraints, signal) {
  const pinned = new Map();
  for (const constraint of constraints) {
    // The server writes " " + word (the authors' rule), so that is what to count.
    const response = await post("/v1/tokenize", { prompt: " " + constraint.text }, signal);
    if (!response.ok) throw new ApiFailure(await envelope(response));
    const { count } = await response.json();
    for (let i = 0; i < count; i++) pinned.set(constraint.position + i, i === 0 ? constraint.text : "");
  }
  return pinned;
}

// ---------------------------------------------------------------------------- the live view

const CONFIDENCE_CLASSES = ["new-low", "new-mid", "new-high"];

function confidenceClass(confidence) {
  return CONFIDENCE_CLASSES[confidence < 0.3 ? 0 : confidence < 0.7 ? 1 : 2];
}

// Special tokens go by a short name, and a newline shows as ↵, so each cell stays one line.
function tokenLabel(text) {
  const special = text.match(/^<\|(.+)\|>$/);
  if (special) return { label: SPECIAL_NAMES[text] || special[1], special: true };
  return { label: text.replace(/\n/g, "↵"), special: false };
}

// LLADA.md "The authors' denoising view": masked grey; newly revealed red / orange / green by
// confidence; revealed in an earlier step blue; a token LLaDA2.1 edited purple.
class AnswerCanvas {
  constructor(element, length, pinned) {
    this.fresh = [];
    const cells = [];
    for (let i = 0; i < length; i++) {
      const cell = document.createElement("span");
      if (pinned.has(i)) {
        cell.className = "tok earlier pinned";
        cell.textContent = pinned.get(i);
        cell.title = `position ${i}: pinned`;
      } else {
        cell.className = "tok masked";
        cell.title = `position ${i}: masked`;
      }
      cells.push(cell);
    }
    element.replaceChildren(...cells);
    this.cells = cells;
  }

  step(event) {
    for (const cell of this.fresh) {
      cell.classList.remove(...CONFIDENCE_CLASSES, "edited");
      cell.classList.add("earlier");
    }
    this.fresh = [];
    for (const reveal of event.unmasked) {
      const cell = this.cells[reveal.index];
      const { label, special } = tokenLabel(reveal.text);
      cell.className = `tok ${reveal.edit ? "edited" : confidenceClass(reveal.confidence)}`;
      cell.classList.toggle("special", special);
      cell.textContent = label;
      const what = reveal.edit ? "edited, " : "";
      cell.title = `position ${reveal.index}: ${what}confidence ${reveal.confidence.toFixed(3)}, step ${event.step}`;
      this.fresh.push(cell);
    }
  }

  masked() {
    return this.cells.filter((cell) => cell.classList.contains("masked")).length;
  }

  // Positions no step revealed (early stop fills them with EOS without decoding them).
  finish() {
    for (const cell of this.cells) {
      if (cell.classList.contains("masked")) {
        cell.className = "tok skipped";
        cell.title += " (not decoded: early stop)";
      }
    }
  }
}

class Figures {
  constructor(started) {
    this.started = started;
    this.revealed = 0;
  }

  show(step, nfe, masked) {
    const seconds = (performance.now() - this.started) / 1000;
    $("fig-step").textContent = step;
    $("fig-nfe").textContent = nfe;
    $("fig-masked").textContent = masked;
    $("fig-rate").textContent = seconds > 0 ? (this.revealed / seconds).toFixed(1) : "0";
  }
}

// ---------------------------------------------------------------------------- chat

function addTurn(role, text, meta) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "LLaDA";
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  if (meta) {
    const line = document.createElement("p");
    line.className = "meta";
    line.textContent = meta;
    item.append(line);
  }
  $("history").append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function setStatus(text) {
  $("status").textContent = text;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function showError(error) {
  const box = $("error");
  box.textContent = [error.status, error.code && `${error.code}:`, error.message].filter(Boolean).join(" ");
  box.hidden = false;
  if (error.status === 401) {
    $("key-row").hidden = false;
    $("api-key").setAttribute("aria-invalid", "true");
    $("api-key").focus();
    return;
  }
  // The envelope's param names the request field: the input of the same id, if there is one.
  const field = error.field || (error.param === "messages" ? "prompt" : (error.param || "").split(".")[0]);
  const input = field && $(field);
  if (input) {
    if ($("settings").contains(input)) $("settings-box").open = true;
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

function setRunning(controller) {
  chat.controller = controller;
  $("send").disabled = Boolean(controller);
  $("new-chat").disabled = Boolean(controller);
  $("stop").disabled = !controller;
}

async function send(prompt) {
  clearError();
  let settings;
  try {
    settings = readSettings();
  } catch (error) {
    showError({ message: error.message, field: error.field });
    return;
  }
  const messages = [...chat.history, { role: "user", content: prompt }];
  const userTurn = addTurn("user", prompt);
  $("prompt").value = "";
  const controller = new AbortController();
  setRunning(controller);
  const figures = new Figures(performance.now());
  let step = 0;
  let nfe = 0;
  try {
    const pinned = await pinnedPositions(settings.constraints, controller.signal);
    const canvas = new AnswerCanvas($("canvas"), settings.gen_length, pinned);
    const blocks = Math.ceil(settings.gen_length / settings.block_length);
    figures.show(0, 0, canvas.masked());
    $("live").hidden = false;
    setStatus("Waiting for the first step…");
    const response = await post("/v1/generate", { messages, ...settings, stream: true }, controller.signal);
    if (!response.ok) throw new ApiFailure(await envelope(response));
    for await (const event of sseEvents(response)) {
      if (event.name === "step") {
        step = event.data.step;
        nfe += 1;
        figures.revealed += event.data.unmasked.filter((reveal) => !reveal.edit).length;
        canvas.step(event.data);
        figures.show(step, nfe, event.data.masked);
        // block diffusion numbers blocks from the sequence's start, not the answer's
        setStatus(chat.blockDiffusion ? `Denoising block ${event.data.block}…` : `Denoising block ${event.data.block + 1} of ${blocks}…`);
      } else if (event.name === "done") {
        const done = event.data;
        canvas.finish();
        figures.show(step, done.usage.nfe, 0);
        const seconds = (performance.now() - figures.started) / 1000;
        const meta = [
          `${done.usage.completion_tokens} tokens`,
          `nfe ${done.usage.nfe}`,
          `${seconds.toFixed(2)} s`,
          done.finish_reason,
          ...(done.approximate ? ["approximate"] : []),
        ].join(" · ");
        chat.history = [...messages, { role: "assistant", content: done.text }];
        addTurn("assistant", done.text, meta);
        setStatus(`Done: ${meta}.`);
        return;
      } else if (event.name === "error") {
        throw new ApiFailure({ status: 0, ...event.data.error });
      }
    }
    throw new ApiFailure({ message: "the stream ended before the answer was done", code: "stream_ended" });
  } catch (error) {
    // The turn did not happen: take the message back out of the chat, into the box.
    userTurn.remove();
    $("prompt").value = prompt;
    if (error.name === "AbortError") {
      setStatus(`Stopped at step ${step}. Your message is back in the box.`);
    } else {
      setStatus("");
      // fetch rejects with a TypeError when the server cannot be reached at all.
      const unreachable = error instanceof TypeError ? "cannot reach the server: " : "";
      showError(error instanceof ApiFailure ? error.error : { message: unreachable + error.message });
    }
  } finally {
    setRunning(null);
  }
}

async function showModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (_) {
    return; // the first send reports an unreachable server
  }
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("model-name").textContent = "";
    return;
  }
  if (response.ok) {
    const models = await response.json();
    if (!models.data.length) return;
    const model = models.data[0];
    $("model-name").textContent = model.id;
    showFamily(model.block_diffusion, model.defaults);
  }
}

// Only the settings the model's family honours are shown, at the family's defaults (a field
// already changed by the time the answer comes keeps its value).
function showFamily(blockDiffusion, defaults) {
  chat.blockDiffusion = blockDiffusion;
  for (const element of document.querySelectorAll(".only-full")) element.hidden = blockDiffusion;
  for (const element of document.querySelectorAll(".only-block")) element.hidden = !blockDiffusion;
  for (const id of [...INTEGER_FIELDS, "threshold", "editing_threshold", "max_post_steps"]) {
    const input = $(id);
    if (defaults[id] !== undefined && input.value === input.defaultValue) {
      input.value = defaults[id] === null ? "" : defaults[id];
    }
  }
  const earlyStop = $("early_stop");
  if (earlyStop.checked === earlyStop.defaultChecked) earlyStop.checked = Boolean(defaults.early_stop);
  if (!blockDiffusion) {
    Object.assign(FAST_DEFAULTS, { cache: defaults.cache, threshold: defaults.threshold, early_stop: defaults.early_stop });
    $("cache").value = defaults.cache;
  }
}

function submit(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (chat.controller) return;
  if (!prompt.trim()) {
    showError({ message: "Write a message first.", field: "prompt" });
    return;
  }
  send(prompt);
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", submit);
  // Enter sends from the message (Shift+Enter: a new line) and from every settings field;
  // Escape stops a running answer.
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && chat.controller) chat.controller.abort();
    if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    const target = event.target;
    if (target.id === "prompt" || (target.tagName === "INPUT" && $("settings").contains(target))) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("new-chat").addEventListener("click", () => {
    chat.history = [];
    $("history").replaceChildren();
    $("live").hidden = true;
    clearError();
    setStatus("");
    $("prompt").focus();
  });
  $("api-key").addEventListener("change", () => {
    $("api-key").removeAttribute("aria-invalid");
    showModel();
  });
  if (window.matchMedia("(max-width: 48rem)").matches) $("settings-box").open = false;
  $("prompt").focus();
  showModel();
});
