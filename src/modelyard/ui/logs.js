// The Logs page: one model's recent child output (GET /logs/{model}, kept across restarts of that model) and a
// live tail of it (/logs/sse?model=), which follows the bottom unless the reader has scrolled up. Behind a
// cluster's front the lines of every node that serves the model come merged by time, each naming its node.

import { apiJson } from "./api.js";
import { clock, fill, h, modelSelect, placeholder } from "./dom.js";

const LINES = 200;
const KEEP = 2000; // lines kept on the page; older ones are dropped
const NODE_SHOWN = 8; // characters of a Ray node id, as on the Models page

export function mount(root, page, model) {
  const picker = h("span");
  const output = h("pre", { id: "log", class: "log", tabindex: 0 });
  const message = placeholder("");
  root.append(h("div", { class: "toolbar" }, h("h1", {}, "Logs"), picker), message, output);

  apiJson("/models").then((listing) => {
    const ids = listing.data.map((e) => e.id);
    const chosen = model || ids[0] || "";
    fill(picker, modelSelect(ids, chosen, {
      onchange: (value) => { location.hash = `#/logs/${encodeURIComponent(value)}`; },
    }));
    if (!chosen) fill(message, "No models.");
    else if (!model) location.replace(`#/logs/${encodeURIComponent(chosen)}`); // the route names it
  }, (error) => fill(message, error.message));
  if (!model) return;

  function append(lines) {
    const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
    for (const line of lines) {
      output.append(h("div", { class: "line", dataset: line.node ? { node: line.node } : {} },
        h("time", {}, clock(line.time)), " ", line.node ? `[${line.node.slice(0, NODE_SHOWN)}] ` : "", line.line));
    }
    while (output.childElementCount > KEEP) output.firstElementChild.remove();
    if (atBottom) output.scrollTop = output.scrollHeight;
    message.hidden = output.childElementCount > 0;
    fill(message, "No output from this model's child yet.");
  }

  let lastSeen = 0; // the stream may repeat lines the first read already had
  page.stream(`/logs/sse?model=${encodeURIComponent(model)}`, (name, data) => {
    if (name !== "log") return;
    const line = JSON.parse(data);
    if (line.time >= lastSeen) append([line]);
  });
  apiJson(`/logs/${encodeURIComponent(model)}?lines=${LINES}`).then((answer) => {
    output.replaceChildren();
    append(answer.lines);
    lastSeen = answer.lines.length ? answer.lines[answer.lines.length - 1].time : 0;
  }, (error) => {
    fill(message, error.status === 404 && !error.message.includes(model)
      ? "This server keeps no logs (no /logs route)." : error.message);
    message.hidden = false;
  });
}
