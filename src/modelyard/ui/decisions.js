// The Decisions page: a timeline of the scheduler's loads, evictions, unloads, expiries, kills, failures,
// drains and refusals with its reason for each (live from /decisions/sse), and every waiting request with why
// it waits, what blocks it and when it gives up (re-read every two seconds: waiting times move all the time).
// Behind a cluster's front each decision and waiting request names its node (a request number is its node's).

import { apiJson } from "./api.js";
import { clock, fill, h, placeholder, seconds } from "./dom.js";

const LIMIT = 200;
const WAITING_MS = 2000;
const NODE_SHOWN = 8; // characters of a Ray node id, as on the Models page

function onNode(record) {
  return record.node ? h("span", { class: "hint", title: record.node }, ` on ${record.node.slice(0, NODE_SHOWN)}`) : null;
}

export function mount(root, page) {
  const waitingBody = h("tbody");
  const timeline = h("ol", { id: "decisions", class: "timeline" });
  const message = placeholder("Reading the decisions…");
  root.append(
    h("div", { class: "toolbar" }, h("h1", {}, "Decisions")),
    h("h2", {}, "Waiting requests"),
    h("table", { id: "waiting" }, h("thead", {}, h("tr", {},
      ["Request", "Model", "Position", "Waited", "Why", "Blocked by", "Gives up in"].map((t) => h("th", {}, t)))),
    waitingBody),
    h("h2", {}, "Timeline"),
    timeline, message);

  let decisions = [];
  let served = true; // false once the server answers 404: no poll then

  async function load(withTimeline) {
    if (!served) return;
    try {
      const answer = await apiJson(`/decisions?limit=${LIMIT}`);
      if (withTimeline) {
        decisions = answer.data;
        renderTimeline();
      }
      renderWaiting(answer.waiting);
    } catch (error) {
      served = error.status !== 404;
      fill(message, error.status === 404 ? "This server does not record decisions (no /decisions route)." : error.message);
      message.hidden = false;
    }
  }

  function renderTimeline() {
    message.hidden = decisions.length > 0;
    fill(message, "No decisions yet: nothing was loaded or unloaded since the server started.");
    fill(timeline, decisions.map(item));
  }

  function renderWaiting(waiting) {
    fill(waitingBody, waiting.map((w) => h("tr", { dataset: { request: w.request } },
      h("td", {}, `#${w.request}`, onNode(w)), h("td", {}, w.model), h("td", { class: "num" }, w.position ?? "–"),
      h("td", { class: "num" }, seconds(w.waited)), h("td", {}, w.reason),
      h("td", {}, (w.blocked_by ?? []).join(", ") || "–"), h("td", { class: "num" }, seconds(w.gives_up_in)))));
    if (!waiting.length) fill(waitingBody, h("tr", {}, h("td", { colspan: 7, class: "placeholder" }, "none")));
  }

  page.stream("/decisions/sse", (name, data) => {
    if (name !== "decision") return;
    decisions = [JSON.parse(data), ...decisions].slice(0, LIMIT);
    renderTimeline();
  });
  page.every(WAITING_MS, () => load(false));
  load(true);
}

function item(decision) {
  return h("li", { dataset: { kind: decision.kind, model: decision.model } },
    h("time", {}, clock(decision.time)),
    h("span", { class: `badge kind-${decision.kind}`, title: decision.cause ?? "" }, decision.kind),
    h("strong", {}, decision.model), onNode(decision),
    h("span", { class: "reason" }, decision.reason),
    // the scheduler's request number (as on the waiting list), not an activity record's id
    decision.request !== null && decision.request !== undefined
      ? h("span", { class: "request hint" }, `request #${decision.request}`) : null);
}
