// The Models page: every model with its live status (from /models/sse, with the child's load progress), its
// memory against the budget, requests in flight and queued, the keep-alive countdown, pin and priority,
// aliases, and a failed model's reason with the child's last log lines; load, unload and unload all.
// Status changes arrive on the stream; the counts and measured memory, which have no event, are re-read
// every few seconds. Behind a cluster's front (`modelyard serve --ray`) each entry carries `nodes`: a Node
// column then says where the model runs, with its status and requests on each node, and the other columns
// stay the model's (its best status, its requests on all nodes).

import { STATUS_EVENTS, apiJson, postJson } from "./api.js";
import { bytes, countdown, fill, h, notify, placeholder } from "./dom.js";

const REFRESH_MS = 5000;
const NODE_SHOWN = 8; // characters of a Ray node id (56 hex digits; the title has it whole), as `modelyard ps`
// Which status a model on several nodes shows: the one nearest to serving at once (cluster/front.py's order)
const BEST = ["loaded", "loading", "stopping", "failed", "unloaded"];
const COLUMNS = ["Model", "Status", "Memory", "In flight", "Keep-alive", "Scheduling", ""];

export function mount(root, page) {
  const summary = h("section", { class: "summary" });
  const body = h("tbody");
  const head = h("tr");
  const table = h("table", { id: "models" }, h("thead", {}, head), body);
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
    const { data } = listing;
    const memory = listing.memory ?? {}; // a cluster's front has no one budget: each node has its own
    const clustered = data.some((entry) => Array.isArray(entry.nodes));
    empty.hidden = data.length > 0;
    if (!data.length) fill(empty, "No models: add .gguf files to --models-dir or sections to --models-preset.");
    fill(summary,
      listing.memory ? budgetLine("Memory", memory.used, memory.budget) : null,
      memory.gpu_budget ? budgetLine("GPU memory", memory.gpu_used, memory.gpu_budget) : null);
    const columns = clustered ? [...COLUMNS.slice(0, 2), "Node", ...COLUMNS.slice(2)] : COLUMNS;
    fill(head, columns.map((t) => h("th", {}, t)));
    fill(body, data.flatMap((entry) => rows(entry, memory, clustered)));
    tick();
  }

  function rows(entry, memory, clustered) {
    const status = entry.status.value;
    const busy = status === "loading" || status === "loaded" || status === "sleeping";
    const shown = progress.get(entry.id);
    const row = h("tr", { dataset: { model: entry.id, status } },
      h("td", { class: "name" }, h("strong", {}, entry.id),
        entry.aliases.length ? h("div", { class: "aliases" }, `aka ${entry.aliases.join(", ")}`) : null),
      h("td", {}, h("span", { class: `badge status-${status}`, "data-role": "status" }, status),
        status === "loading" && shown !== undefined ? h("span", { class: "pct" }, ` ${Math.round(shown * 100)}%`) : null),
      clustered ? h("td", { class: "nodes" }, nodesCell(entry.nodes ?? [])) : null,
      h("td", { class: "memory" }, memoryCell(entry.memory, memory)),
      inFlightCell(entry.nodes ?? [entry]),
      h("td", { class: "keepalive", dataset: { expires: entry.expires_in ?? "" } }, keepAlive(entry, 0)),
      h("td", {}, entry.pinned ? h("span", { class: "badge pinned" }, "pinned") : null,
        entry.priority ? ` priority ${entry.priority}` : entry.pinned ? "" : "–"),
      h("td", { class: "actions" },
        h("button", { type: "button", disabled: busy, onclick: () => act("load", entry.id) }, "Load"),
        h("button", { type: "button", disabled: !busy, onclick: () => act("unload", entry.id) }, "Unload"),
        h("a", { href: `#/logs/${encodeURIComponent(entry.id)}` }, "logs")));
    const failure = entry.status.failed
      ? h("tr", { class: "failure" }, h("td", { colspan: clustered ? 8 : 7 },
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
        const shownStatus = Array.isArray(entry.nodes) && event.node
          ? onNode(entry, event.node, event.data.status) : event.data.status;
        entry.status = { ...entry.status, value: shownStatus, failed: shownStatus === "failed" };
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

// A node's status change on a cluster entry: that node's line changes, and the model shows its best status.
function onNode(entry, node, status) {
  const where = entry.nodes.find((n) => n.node === node);
  if (where) where.status = status;
  else entry.nodes.push({ node, status, in_flight: 0, queued: 0 });
  const rank = (value) => (BEST.includes(value) ? BEST.indexOf(value) : BEST.length);
  return entry.nodes.map((n) => n.status).sort((x, y) => rank(x) - rank(y))[0];
}

// One line for each node where the model runs (not unloaded there): the node, its status and requests there.
function nodesCell(nodes) {
  const running = nodes.filter((n) => n.status !== "unloaded");
  if (!running.length) return "–";
  return running.map((n) => h("div", { dataset: { node: n.node }, title: n.node },
    h("code", {}, n.node.slice(0, NODE_SHOWN)), " ", h("span", { class: `badge status-${n.status}` }, n.status),
    n.in_flight || n.queued ? h("span", { class: "hint" }, ` ${n.in_flight} in flight`) : null,
    n.queued ? h("span", { class: "queued" }, ` +${n.queued} queued`) : null));
}

// The model's requests: on one node its entry's, on a cluster the sum over its nodes.
function inFlightCell(places) {
  const inFlight = places.reduce((sum, p) => sum + (p.in_flight ?? 0), 0);
  const queued = places.reduce((sum, p) => sum + (p.queued ?? 0), 0);
  return h("td", { class: "num" }, `${inFlight}`, queued ? h("span", { class: "queued" }, ` +${queued} queued`) : null);
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
