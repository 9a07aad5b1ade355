// The Models page: every model with its live status (from /models/sse, with the child's load progress), its
// memory against the budget, requests in flight and queued, the keep-alive countdown, pin and priority,
// aliases, and a failed model's reason with the child's last log lines; load, unload and unload all.
// Status changes arrive on the stream; the counts and measured memory, which have no event, are re-read
// every few seconds.

import { STATUS_EVENTS, apiJson, postJson } from "./api.js";
import { bytes, countdown, fill, h, notify, placeholder } from "./dom.js";

const REFRESH_MS = 5000;

export function mount(root, page) {
  const summary = h("section", { class: "summary" });
  const body = h("tbody");
  const table = h("table", { id: "models" },
    h("thead", {}, h("tr", {},
      ["Model", "Status", "Memory", "In flight", "Keep-alive", "Scheduling", ""].map((t) => h("th", {}, t)))),
    body);
  const empty = placeholder("Loading the model list…");
  const unloadAll = h("button", { type: "button", id: "unload-all", onclick: () => act("unload all") }, "Unload all");
  root.append(h("div", { class: "toolbar" }, h("h1", {}, "Models"), unloadAll), summary, table, empty);

  let listing = { data: [], memory: {} };
  let readAt = performance.now();
  const progress = new Map(); // model -> the child's load progress (0..1), from the stream

  async function refresh() {
    try {
      listing = await apiJson("/models");
      readAt = performance.now();
      render();
    } catch (error) {
      fill(empty, error.message);
      empty.hidden = false;
    }
  }

  let pending = null;
  function refreshSoon() { // several events in a burst (a swap) make one read
    clearTimeout(pending);
    pending = setTimeout(refresh, 150);
  }

  async function act(action, model) {
    try {
      if (action === "unload all") await postJson("/models/unload", { all: true });
      else await postJson(`/models/${action}`, { model });
      refreshSoon();
    } catch (error) {
      notify(`${action} ${model ?? ""}: ${error.message}`);
    }
  }

  function render() {
    const { data, memory } = listing;
    empty.hidden = data.length > 0;
    if (!data.length) fill(empty, "No models: add .gguf files to --models-dir or sections to --models-preset.");
    fill(summary,
      budgetLine("Memory", memory.used, memory.budget),
      memory.gpu_budget ? budgetLine("GPU memory", memory.gpu_used, memory.gpu_budget) : null);
    fill(body, data.flatMap((entry) => rows(entry, memory)));
    tick();
  }

  function rows(entry, memory) {
    const status = entry.status.value;
    const busy = status === "loading" || status === "loaded" || status === "sleeping";
    const shown = progress.get(entry.id);
    const row = h("tr", { dataset: { model: entry.id, status } },
      h("td", { class: "name" }, h("strong", {}, entry.id),
        entry.aliases.length ? h("div", { class: "aliases" }, `aka ${entry.aliases.join(", ")}`) : null),
      h("td", {}, h("span", { class: `badge status-${status}`, "data-role": "status" }, status),
        status === "loading" && shown !== undefined ? h("span", { class: "pct" }, ` ${Math.round(shown * 100)}%`) : null),
      h("td", { class: "memory" }, memoryCell(entry.memory, memory)),
      h("td", { class: "num" }, `${entry.in_flight}`, entry.queued ? h("span", { class: "queued" }, ` +${entry.queued} queued`) : null),
      h("td", { class: "keepalive", dataset: { expires: entry.expires_in ?? "" } }, keepAlive(entry, 0)),
      h("td", {}, entry.pinned ? h("span", { class: "badge pinned" }, "pinned") : null,
        entry.priority ? ` priority ${entry.priority}` : entry.pinned ? "" : "–"),
      h("td", { class: "actions" },
        h("button", { type: "button", disabled: busy, onclick: () => act("load", entry.id) }, "Load"),
        h("button", { type: "button", disabled: !busy, onclick: () => act("unload", entry.id) }, "Unload"),
        h("a", { href: `#/logs/${encodeURIComponent(entry.id)}` }, "logs")));
    const failure = entry.status.failed
      ? h("tr", { class: "failure" }, h("td", { colspan: 7 },
        h("div", {}, `failed${entry.status.exit_code !== undefined ? ` (exit code ${entry.status.exit_code})` : ""}`),
        entry.status.failure ? h("pre", {}, entry.status.failure) : null))
      : null;
    return [row, failure].filter(Boolean);
  }

  // the countdowns move every second between reads of the listing
  function tick() {
    const elapsed = (performance.now() - readAt) / 1000;
    for (const cell of body.querySelectorAll("td.keepalive")) {
      const entry = listing.data.find((e) => e.id === cell.parentElement.dataset.model);
      if (entry) cell.textContent = keepAlive(entry, elapsed);
    }
  }

  page.stream("/models/sse", (name, data) => {
    const event = JSON.parse(data);
    if (STATUS_EVENTS.has(event.event)) {
      const entry = listing.data.find((e) => e.id === event.model);
      const value = event.data.progress?.value;
      if (typeof value === "number") progress.set(event.model, value);
      else if (event.data.status !== "loading") progress.delete(event.model);
      if (entry) { // show the change at once, then read the rest of the entry
        entry.status = { ...entry.status, value: event.data.status, failed: event.data.status === "failed" };
        if (event.data.reason) entry.status.failure = event.data.reason;
        render();
      }
    }
    refreshSoon();
  });
  page.every(REFRESH_MS, refresh);
  page.every(1000, tick);
  page.onCleanup(() => clearTimeout(pending));
  refresh();
}

function budgetLine(label, used, budget) {
  return h("div", { class: "budget" }, h("span", { class: "label" }, label),
    bar([{ value: used, kind: "measured" }], budget),
    h("span", {}, `${bytes(used)} used of ${budget ? bytes(budget) : "no limit"}`));
}

// A bar of the model's memory against the budget (or, without one, against itself): measured solid, the
// estimate behind it.
function memoryCell(memory, totals) {
  const host = [{ value: memory.estimated, kind: "estimated" }, { value: memory.measured, kind: "measured" }];
  const text = [memory.measured ? `${bytes(memory.measured)} measured` : null,
    memory.estimated ? `${bytes(memory.estimated)} estimated` : null].filter(Boolean).join(" · ") || "not estimated yet";
  const gpu = memory.estimated_gpu || memory.measured_gpu
    ? h("div", { class: "gpu" }, bar([{ value: memory.estimated_gpu, kind: "estimated" },
      { value: memory.measured_gpu, kind: "measured" }], totals.gpu_budget),
    `GPU ${bytes(memory.measured_gpu ?? memory.estimated_gpu)}`)
    : null;
  const share = totals.budget && (memory.measured || memory.estimated)
    ? ` · ${((100 * (memory.measured || memory.estimated)) / totals.budget).toFixed(1)}% of the budget` : "";
  return [bar(host, totals.budget), h("div", { class: "hint" }, text + share), gpu];
}

function bar(parts, budget) {
  const scale = budget || Math.max(...parts.map((p) => p.value || 0), 1);
  const element = h("div", { class: "bar", title: budget ? `of ${bytes(budget)}` : "no budget" });
  for (const part of parts) {
    if (!part.value) continue;
    const fillPart = h("span", { class: part.kind });
    fillPart.style.width = `${Math.min(100, (100 * part.value) / scale)}%`; // CSSOM: allowed by the CSP
    element.append(fillPart);
  }
  return element;
}

function keepAlive(entry, elapsed) {
  if (entry.pinned) return "pinned";
  if (entry.expires_in !== null && entry.expires_in !== undefined) {
    return `unloads in ${countdown(entry.expires_in - elapsed)}`;
  }
  if (entry.keep_alive === null || entry.keep_alive === undefined || entry.keep_alive < 0) return "kept loaded";
  return `${countdown(entry.keep_alive)} after last use`;
}
