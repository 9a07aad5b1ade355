// The Playground page: a chat with any model over /v1/chat/completions, streamed (SSE read over fetch), with
// a stop button. While the model loads for the request it shows the child's load progress from /models/sse,
// then how long the load took; after each reply, the tokens and the speed the engine reports.

import { STATUS_EVENTS, apiFetch, apiJson, readEvents } from "./api.js";
import { fill, h, modelSelect, number, seconds } from "./dom.js";

export function mount(root, page, chosen) {
  const statuses = new Map(); // model -> its status, from the listing and then the stream
  let model = chosen;
  let history = [];
  let running = null; // the AbortController of the reply being streamed
  let loadNote = null; // the note that follows the current load: {model, element, bar, started}

  const picker = h("span");
  const transcript = h("div", { id: "chat", class: "chat", "aria-live": "polite" });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "Say something… (Enter sends, Shift+Enter is a new line)" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, value: 256, "aria-label": "max tokens" });
  const send = h("button", { type: "submit", class: "primary", id: "send" }, "Send");
  const stop = h("button", { type: "button", id: "stop", disabled: true, onclick: () => running?.abort() }, "Stop");
  const clear = h("button", { type: "button", onclick: () => { history = []; transcript.replaceChildren(); } }, "Clear");
  const form = h("form", { class: "composer", onsubmit: (event) => { event.preventDefault(); ask(); } },
    prompt, h("div", { class: "controls" }, h("label", {}, "max tokens ", maxTokens), send, stop, clear));
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  root.append(h("div", { class: "toolbar" }, h("h1", {}, "Playground"), picker), transcript, form);

  apiJson("/models").then((listing) => {
    for (const entry of listing.data) statuses.set(entry.id, entry.status.value);
    const ids = listing.data.map((e) => e.id);
    model = model && ids.includes(model) ? model
      : ids.find((id) => statuses.get(id) === "loaded") ?? ids[0];
    fill(picker, modelSelect(ids, model, { onchange: (value) => { model = value; } }));
  }, (error) => note(error.message, "error"));

  page.stream("/models/sse", (name, data) => {
    const event = JSON.parse(data);
    if (!STATUS_EVENTS.has(event.event)) return;
    statuses.set(event.model, event.data.status);
    if (running && event.model === running.model) followLoad(event.model, event.data);
  });
  page.onCleanup(() => running?.abort());

  function note(text, kind = "") {
    const element = h("div", { class: `note ${kind}` }, text);
    transcript.append(element);
    transcript.scrollTop = transcript.scrollHeight;
    return element;
  }

  function startLoadNote(name) {
    const bar = h("progress", { max: 1 });
    const label = h("span", {}, `Loading ${name}…`);
    loadNote = { model: name, element: note("", "loading"), label, bar, started: performance.now() };
    loadNote.element.append(label, " ", bar);
  }

  function followLoad(name, data) {
    if (data.status === "loading") {
      if (!loadNote || loadNote.model !== name) startLoadNote(name);
      const value = data.progress?.value;
      if (typeof value === "number") loadNote.bar.value = value;
    } else if (loadNote && loadNote.model === name) {
      const took = (performance.now() - loadNote.started) / 1000;
      fill(loadNote.element, data.status === "loaded"
        ? `${name} loaded in ${seconds(took)}` : `${name} is ${data.status}${data.reason ? `: ${data.reason}` : ""}`);
      loadNote.element.className = `note ${data.status === "loaded" ? "loaded" : "error"}`;
      loadNote = null;
    }
  }

  async function ask() {
    const text = prompt.value.trim();
    if (!text || running || !model) return;
    prompt.value = "";
    history.push({ role: "user", content: text });
    transcript.append(h("div", { class: "message user" }, text));
    const thinking = h("div", { class: "thinking", hidden: true }); // a reasoning model's reasoning_content
    const content = h("div", { class: "content" });
    const stats = h("div", { class: "stats" }, "waiting…");
    const bubble = h("div", { class: "message assistant streaming", dataset: { model } }, h("div", { class: "who" }, model), thinking, content, stats);
    running = new AbortController();
    running.model = model;
    if (statuses.get(model) !== "loaded") startLoadNote(model); // above the reply it holds up
    transcript.append(bubble);
    transcript.scrollTop = transcript.scrollHeight;
    send.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    let firstToken = null;
    let reply = "";
    let timings = null;
    let chunks = 0;
    try {
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST",
        signal: running.signal,
        // this page shows the load itself (from /models/sse): no loading messages inside the reply
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", "X-Modelyard-Loading-State": "0" },
        body: JSON.stringify({ model, messages: history, stream: true, max_tokens: Number(maxTokens.value) || 256 }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.error?.message ?? `HTTP ${response.status}`);
      }
      if (loadNote) followLoad(model, { status: "loaded" }); // the answer starts once the model is ready
      await readEvents(response, (name, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message ?? String(chunk.error));
        const thought = chunk.choices?.[0]?.delta?.reasoning_content;
        if (thought) {
          thinking.hidden = false;
          thinking.textContent += thought;
        }
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          firstToken ??= performance.now();
          chunks += 1;
          bubble.dataset.chunks = chunks; // how many pieces the reply came in (1 = not streamed)
          reply += delta;
          content.textContent = reply;
          stats.textContent = `${chunks} chunks…`;
          transcript.scrollTop = transcript.scrollHeight;
        }
        if (chunk.timings) timings = chunk.timings;
      });
      history.push({ role: "assistant", content: reply });
      stats.textContent = summary(timings, chunks, started, firstToken);
    } catch (error) {
      history.pop(); // the question goes unanswered: do not send it again with the next one
      stats.textContent = error.name === "AbortError" ? "stopped" : "";
      if (error.name !== "AbortError") bubble.append(h("div", { class: "error" }, error.message));
      if (loadNote) followLoad(model, { status: "not loaded", reason: error.message });
    } finally {
      bubble.classList.remove("streaming");
      bubble.classList.add("done");
      running = null;
      send.disabled = false;
      stop.disabled = true;
    }
  }
}

function summary(timings, chunks, started, firstToken) {
  const total = (performance.now() - started) / 1000;
  const ttft = firstToken === null ? null : (firstToken - started) / 1000;
  const parts = [];
  if (timings) {
    parts.push(`${timings.prompt_n} tokens in`, `${timings.predicted_n} tokens out`,
      `${number(timings.predicted_per_second, 1)} tokens/s`);
  } else {
    parts.push(`${chunks} chunks`);
  }
  parts.push(`first token ${seconds(ttft)}`, `total ${seconds(total)}`);
  return parts.join(" · ");
}
