// The dashboard's shell: the hash router that mounts one page at a time (#/models, #/activity, #/decisions,
// #/logs/<model>, #/playground/<model>), the header's live indicator and key button, and the per-page context
// through which pages open streams and timers, so leaving a page ends everything it started.

import { askForKey, forgetKey, storedKey, subscribe } from "./api.js";
import * as activity from "./activity.js";
import * as decisions from "./decisions.js";
import * as logs from "./logs.js";
import * as models from "./models.js";
import * as playground from "./playground.js";

const PAGES = { models, activity, decisions, logs, playground };

// What a page gets: streams and timers that end when the page is left, and the live indicator.
class PageContext {
  constructor() {
    this.cleanups = [];
    this.streams = new Map();
  }

  stream(path, onEvent) {
    const name = path.split("?")[0];
    this.streams.set(name, "connecting");
    this.showLive();
    const stop = subscribe(path, onEvent, (connected, error) => {
      const missing = error?.status === 404;
      this.streams.set(name, connected ? "live" : missing ? "missing" : "down");
      this.showLive();
    });
    this.cleanups.push(stop);
    return () => {
      stop();
      this.streams.delete(name);
    };
  }

  every(ms, callback) {
    const timer = setInterval(callback, ms);
    this.cleanups.push(() => clearInterval(timer));
  }

  onCleanup(callback) {
    this.cleanups.push(callback);
  }

  showLive() {
    const states = [...this.streams.values()];
    const live = document.getElementById("live");
    let text = "live";
    if (!states.length) text = "static";
    else if (states.includes("missing")) text = "not served";
    else if (states.some((s) => s !== "live")) text = "reconnecting";
    live.textContent = text;
    live.className = `live ${text === "live" ? "on" : "off"}`;
  }

  close() {
    for (const cleanup of this.cleanups.splice(0)) cleanup();
  }
}

let current = null;

function route() {
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const page = PAGES[name] ? name : "models";
  current?.close();
  current = new PageContext();
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  const root = document.getElementById("page");
  root.replaceChildren();
  root.dataset.page = page;
  PAGES[page].mount(root, current, rest.map(decodeURIComponent).join("/"));
}

function showKeyButton() {
  const button = document.getElementById("forget-key");
  button.hidden = false;
  button.textContent = storedKey() ? "Forget key" : "API key";
}

document.getElementById("forget-key").addEventListener("click", () => {
  if (storedKey()) {
    forgetKey();
    showKeyButton();
  } else {
    askForKey("Enter this server's API key.").then(route, () => {});
  }
});
// A key entered in the prompt: the calls that asked for it retry themselves; the button now offers to forget it.
document.addEventListener("modelyard:key", showKeyButton);
window.addEventListener("hashchange", route);
showKeyButton();
route();
