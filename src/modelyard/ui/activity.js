// The Activity page: the last requests (time, client, model, route, status, queue wait, time to first token,
// duration, tokens in and out, tokens/s), filterable by model, kept live by /activity/sse; and the requests in
// flight, each with a cancel button (POST /activity/{id}/cancel). Behind a cluster's front each record names
// its node, and its id is the front's (a string, `NODE:ID`), passed back as it came.

import { apiJson, postJson } from "./api.js";
import { clock, fill, h, modelSelect, notify, number, placeholder, seconds } from "./dom.js";

const NODE_SHOWN = 8; // characters of a Ray node id, as on the Models page

const LIMIT = 100;
const COLUMNS = ["Time", "Client", "Model", "Route", "Status", "Queue wait", "TTFT", "Duration", "Tokens in",
  "Tokens out", "Tokens/s"];

export function mount(root, page, filter) {
  let model = filter || "";
  const picker = h("span");
  const flightBody = h("tbody");
  const recentBody = h("tbody");
  const message = placeholder("Reading the activity…");
  root.append(
    h("div", { class: "toolbar" }, h("h1", {}, "Activity"), picker),
    h("h2", {}, "In flight"),
    h("table", { id: "in-flight" }, h("thead", {}, h("tr", {},
      ["Since", "Client", "Model", "Route", "State", "Queue wait", ""].map((t) => h("th", {}, t)))), flightBody),
    h("h2", {}, `Last ${LIMIT} requests`),
    h("table", { id: "activity" }, h("thead", {}, h("tr", {}, COLUMNS.map((t) => h("th", {}, t)))), recentBody),
    message);

  let recent = [];
  let inFlight = new Map();

  apiJson("/models").then((listing) => {
    fill(picker, modelSelect(listing.data.map((e) => e.id), model, {
      all: "all models",
      onchange: (value) => { location.hash = value ? `#/activity/${encodeURIComponent(value)}` : "#/activity"; },
    }));
  }, () => {});

  const query = model ? `?model=${encodeURIComponent(model)}` : "";

  async function load() {
    try {
      const answer = await apiJson(`/activity${query}${query ? "&" : "?"}limit=${LIMIT}`);
      recent = answer.data;
      inFlight = new Map(answer.in_flight.map((r) => [r.id, r]));
      render();
    } catch (error) {
      fill(message, error.status === 404 ? "This server does not record activity (no /activity route)." : error.message);
    }
  }

  function onRecord(name, data) {
    if (name !== "request") return;
    const record = JSON.parse(data);
    if (record.state === "done") {
      inFlight.delete(record.id);
      recent = [record, ...recent.filter((r) => r.id !== record.id)].slice(0, LIMIT);
    } else {
      inFlight.set(record.id, record);
    }
    render();
  }

  async function cancel(id) {
    try {
      await postJson(`/activity/${encodeURIComponent(id)}/cancel`, {});
    } catch (error) {
      notify(`cancel request ${id}: ${error.message}`);
    }
  }

  function render() {
    message.hidden = recent.length > 0;
    fill(message, "No requests yet.");
    fill(flightBody, [...inFlight.values()].map((r) => h("tr", { dataset: { id: r.id, state: r.state } },
      h("td", {}, clock(r.time)), clientCell(r), h("td", {}, r.model ?? "–"),
      h("td", { class: "route" }, `${r.method ?? ""} ${r.route}`), h("td", {}, h("span", { class: `badge state-${r.state}` }, r.state)),
      h("td", { class: "num" }, seconds(r.queue_wait)),
      h("td", {}, h("button", { type: "button", onclick: () => cancel(r.id) }, "Cancel")))));
    if (!inFlight.size) fill(flightBody, h("tr", {}, h("td", { colspan: 7, class: "placeholder" }, "none")));
    fill(recentBody, recent.map((r) => h("tr", { dataset: { id: r.id, status: r.status ?? "" } },
      h("td", {}, clock(r.time)), clientCell(r), h("td", {}, r.model ?? "–"),
      h("td", { class: "route" }, r.route),
      h("td", { class: "status" }, h("span", { class: `badge http-${String(r.status ?? 0)[0]}` }, r.status ?? "–"),
        r.error ? h("div", { class: "error", title: r.error }, r.error) : null),
      h("td", { class: "num" }, seconds(r.queue_wait)), h("td", { class: "num" }, seconds(r.ttft)),
      h("td", { class: "num" }, seconds(r.duration)), h("td", { class: "num" }, number(r.tokens_in)),
      h("td", { class: "num" }, number(r.tokens_out)), h("td", { class: "num" }, number(r.tokens_per_s, 1)))));
  }

  // the client, and under it the node that served the request (a cluster's)
  function clientCell(r) {
    return h("td", {}, r.client ?? "–",
      r.node ? h("div", { class: "hint", title: r.node }, `node ${r.node.slice(0, NODE_SHOWN)}`) : null);
  }

  // subscribe first, then read: a request that ends in between is in the stream, not lost
  page.stream(`/activity/sse${query}`, onRecord);
  load();
}
