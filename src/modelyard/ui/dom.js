// Building the page and formatting what it shows. Elements are made with `h`, which sets text with
// textContent only (never innerHTML), so a model name, a reason or a log line is always shown as text.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

// Replaces the element's children (a re-render of one region).
export function fill(element, ...children) {
  element.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

const DASH = "–";

export function bytes(value) {
  if (value === null || value === undefined) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${size >= 100 || unit === 0 ? size.toFixed(0) : size.toFixed(1)} ${units[unit]}`;
}

export function seconds(value) {
  if (value === null || value === undefined) return DASH;
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 60) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  return countdown(value);
}

// 75 -> "1:15", 3700 -> "1:01:40"
export function countdown(value) {
  const total = Math.max(0, Math.round(value));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const rest = String(total % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${rest}` : `${minutes}:${rest}`;
}

export function clock(unixSeconds) {
  if (!unixSeconds) return DASH;
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

export function number(value, digits = 0) {
  return value === null || value === undefined ? DASH : Number(value).toFixed(digits);
}

// A labelled <select> of model ids, with an optional first "all" entry.
export function modelSelect(models, selected, { all = null, onchange } = {}) {
  const options = all === null ? [] : [h("option", { value: "" }, all)];
  for (const model of models) options.push(h("option", { value: model, selected: model === selected }, model));
  return h("select", { onchange: (event) => onchange(event.target.value), "aria-label": "model" }, options);
}

// Shows a short message at the bottom of the page (an action's error, mostly).
export function notify(message, kind = "error") {
  const notice = document.getElementById("notice");
  notice.textContent = message;
  notice.className = kind;
  notice.hidden = false;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => { notice.hidden = true; }, 6000);
}

// An empty-state or error line for a table or list.
export function placeholder(text) {
  return h("p", { class: "placeholder" }, text);
}
