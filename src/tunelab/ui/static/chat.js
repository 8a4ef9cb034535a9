// The playground: 1-3 panes answer one prompt side by side, each streamed from the chat API
// (/ui/api/chat/completions is the API's own chat route on the session), with time to first token
// and tokens per second. The models and settings live in the URL, the transcripts in this tab's
// sessionStorage, so a reload shows the same playground.
import { csrfToken } from "./console.js";

const MAX_PANES = 3;
const STORE = "tunelab.playground";
const root = document.getElementById("playground");
const panesBox = document.getElementById("panes");
const template = document.getElementById("pane-template");
const controls = document.getElementById("chat-settings");
const promptBox = document.getElementById("prompt");
const sendButton = document.getElementById("send");

const saved = JSON.parse(sessionStorage.getItem(STORE) || "{}");
const panes = [];

function settings() {
  const value = (name) => controls.querySelector(`[name=${name}]`).value.trim();
  const params = { temperature: Number(value("temperature")), top_p: Number(value("top_p")) };
  if (value("max_tokens")) params.max_tokens = Number(value("max_tokens"));
  if (value("seed")) params.seed = Number(value("seed"));
  return params;
}

function save() {
  const url = new URL(location.href);
  url.searchParams.delete("model");
  for (const pane of panes) url.searchParams.append("model", pane.select.value);
  history.replaceState(null, "", url);
  const transcripts = Object.fromEntries(panes.map((p, i) => [i, p.history]));
  sessionStorage.setItem(STORE, JSON.stringify({ transcripts, system: controls.querySelector("[name=system]").value }));
}

function bubble(pane, role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  pane.transcript.append(div);
  pane.transcript.scrollTop = pane.transcript.scrollHeight;
  return div;
}

function addPane(model, history = []) {
  if (panes.length >= MAX_PANES) return;
  const el = template.content.firstElementChild.cloneNode(true);
  const pane = {
    el,
    select: el.querySelector("select"),
    transcript: el.querySelector(".transcript"),
    stats: el.querySelector(".stats"),
    history,
  };
  if (model) pane.select.value = model;
  pane.select.addEventListener("change", save);
  el.querySelector("[data-remove]").addEventListener("click", () => {
    if (panes.length === 1) return;
    panes.splice(panes.indexOf(pane), 1);
    el.remove();
    layout();
    save();
  });
  for (const m of history) bubble(pane, m.role, m.content);
  panes.push(pane);
  panesBox.append(el);
  layout();
}

function layout() {
  panesBox.style.setProperty("--panes", panes.length);
  document.getElementById("add-pane").disabled = panes.length >= MAX_PANES;
  panes.forEach((p, i) => (p.el.dataset.pane = i));
}

// One streamed chat completion; calls onText with each piece as it arrives.
export async function streamChat(body, onText) {
  const started = performance.now();
  const response = await fetch("/ui/api/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": csrfToken() },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let first = null;
  let usage = null;
  let finish = null;
  let chunks = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) {
          if (choice.delta?.content) {
            first ??= performance.now();
            chunks += 1;
            onText(choice.delta.content);
          }
          finish = choice.finish_reason ?? finish;
        }
      }
    }
  }
  const ended = performance.now();
  const tokens = usage?.completion_tokens ?? chunks;
  // Decoding speed after the first token (the first one's wait is the time to first token).
  const decoding = first !== null && ended > first ? (tokens - 1) / ((ended - first) / 1000) : null;
  return { ttft: first === null ? null : (first - started) / 1000, tokens, tokensPerSecond: decoding, finish, chunks };
}

async function complete(body) {
  const response = await fetch("/ui/api/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": csrfToken() },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return (await response.json()).choices[0].message.content;
}

async function errorMessage(response) {
  const body = await response.json().catch(() => null);
  if (response.status === 401) return "Your console session has ended: reload the page to log in again.";
  return body?.error?.message ?? `${response.status} ${response.statusText}`;
}

async function ask(pane, prompt, system, params) {
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...pane.history, { role: "user", content: prompt }];
  bubble(pane, "user", prompt);
  const answer = bubble(pane, "assistant", "");
  pane.el.dataset.state = "streaming";
  pane.stats.textContent = "waiting for the first token…";
  try {
    const result = await streamChat({ model: pane.select.value, messages, ...params }, (text) => {
      answer.textContent += text;
      pane.transcript.scrollTop = pane.transcript.scrollHeight;
    });
    pane.history.push({ role: "user", content: prompt }, { role: "assistant", content: answer.textContent });
    const rate = result.tokensPerSecond === null ? "—" : result.tokensPerSecond.toFixed(1);
    const ttft = result.ttft === null ? "—" : `${result.ttft.toFixed(2)} s`;
    pane.stats.textContent = `time to first token ${ttft} · ${result.tokens} tokens · ${rate} tokens/s · ${result.finish}`;
    pane.el.dataset.chunks = result.chunks;
    pane.el.dataset.state = "done";
  } catch (error) {
    answer.classList.add("error");
    answer.textContent = error.message;
    pane.stats.textContent = "";
    pane.el.dataset.state = "error";
  }
}

async function send() {
  const prompt = promptBox.value.trim();
  if (!prompt || sendButton.disabled) return;
  sendButton.disabled = true;
  const system = controls.querySelector("[name=system]").value.trim();
  const params = settings();
  promptBox.value = "";
  await Promise.all(panes.map((pane) => ask(pane, prompt, system, params)));
  sendButton.disabled = false;
  save();
}

// "Run the validation prompts": each prompt of a chat file through every pane, beside its reference answer.
async function runPrompts() {
  const file = document.getElementById("prompts-file").value;
  const limit = document.getElementById("prompts-limit").value;
  const table = document.getElementById("prompt-results");
  const status = document.getElementById("prompts-status");
  const button = document.getElementById("run-prompts");
  if (!file) return;
  button.disabled = true;
  status.textContent = "Reading the prompts…";
  try {
    const response = await fetch(`/ui/api/files/${encodeURIComponent(file)}/prompts?limit=${limit}`);
    if (!response.ok) throw new Error(await errorMessage(response));
    const prompts = (await response.json()).data;
    const head = table.querySelector("thead tr");
    head.replaceChildren(...["line", "prompt", "reference", ...panes.map((p) => p.select.value)].map(cell("th")));
    const body = table.querySelector("tbody");
    body.replaceChildren();
    table.hidden = false;
    const params = settings();
    for (const [i, p] of prompts.entries()) {
      status.textContent = `Prompt ${i + 1} of ${prompts.length}…`;
      const lastUser = [...p.messages].reverse().find((m) => m.role === "user");
      const row = document.createElement("tr");
      row.append(...[String(p.line), lastUser?.content ?? "", p.reference ?? ""].map(cell("td")));
      const cells = panes.map(() => cell("td")("…"));
      row.append(...cells);
      body.append(row);
      await Promise.all(
        panes.map(async (pane, k) => {
          try {
            cells[k].textContent = await complete({ model: pane.select.value, messages: p.messages, ...params });
          } catch (error) {
            cells[k].textContent = error.message;
            cells[k].classList.add("level-error");
          }
        }),
      );
    }
    status.textContent = `${prompts.length} prompts answered.`;
  } catch (error) {
    status.textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

const cell = (tag) => (text) => {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
};

if (root) {
  const models = JSON.parse(root.dataset.panes);
  models.forEach((model, i) => addPane(model, saved.transcripts?.[i] ?? []));
  if (saved.system !== undefined) controls.querySelector("[name=system]").value = saved.system;
  document.getElementById("add-pane").addEventListener("click", () => {
    addPane(panes.at(-1)?.select.value ?? "");
    save();
  });
  sendButton.addEventListener("click", send);
  promptBox.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send();
  });
  document.getElementById("clear").addEventListener("click", () => {
    for (const pane of panes) {
      pane.history = [];
      pane.transcript.replaceChildren();
      pane.stats.textContent = "";
    }
    save();
  });
  document.getElementById("run-prompts").addEventListener("click", runPrompts);
  root.dataset.ready = "true";
}
