// Every call the dashboard makes to the server: fetch with the API key, one key prompt shared by all calls
// that get a 401, and Server-Sent Events read over fetch. EventSource cannot send an Authorization header, so
// SSE streams are fetched and parsed here instead, and reconnected with a backoff when they end.

const KEY_STORAGE = "modelyard.apiKey";
// The server's path prefix (`--api-prefix`), "" without one: this file is served as {prefix}/ui/api.js, and
// every call below is made under it.
const BASE = new URL("..", import.meta.url).pathname.replace(/\/$/, "");

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function storedKey() {
  return localStorage.getItem(KEY_STORAGE);
}

export function forgetKey() {
  localStorage.removeItem(KEY_STORAGE);
}

function withKey(headers) {
  const key = storedKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
}

// One prompt at a time: the page starts several calls at once, and all of them wait for the same answer. Once
// declined, later 401s fail at once instead of asking again (streams reconnect); the header's key button asks.
let pendingPrompt = null;
let declined = false;

export function askForKey(reason) {
  if (pendingPrompt) return pendingPrompt;
  declined = false;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  pendingPrompt = new Promise((resolve, reject) => {
    dialog.addEventListener("close", () => {
      pendingPrompt = null;
      const key = input.value.trim();
      if (dialog.returnValue === "ok" && key) {
        localStorage.setItem(KEY_STORAGE, key);
        document.dispatchEvent(new Event("modelyard:key"));
        resolve();
      } else {
        declined = true;
        reject(new ApiError("an API key is needed to read this server", 401));
      }
    }, { once: true });
  });
  dialog.showModal();
  return pendingPrompt;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    const error = body.error;
    return typeof error === "string" ? error : (error?.message ?? `HTTP ${response.status}`);
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

// fetch() with the stored key; on a 401 it asks for a key (once for all pending calls) and tries again.
export async function apiFetch(path, options = {}) {
  for (;;) {
    const response = await fetch(BASE + path, { ...options, headers: withKey(options.headers ?? {}) });
    if (response.status !== 401) return response;
    if (declined) throw new ApiError("an API key is needed to read this server", 401);
    const reason = storedKey() ? "The stored API key was refused; enter another one." : await errorMessage(response);
    await askForKey(reason);
  }
}

// The JSON answer of a call, or an ApiError carrying the server's own message (its error envelope).
export async function apiJson(path, options = {}) {
  const response = await apiFetch(path, options);
  if (!response.ok) throw new ApiError(await errorMessage(response), response.status);
  return response.json();
}

export function postJson(path, body) {
  return apiJson(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// The /models/sse events that carry a model's status (router mode's names): model_status when a load starts,
// status_change for every later transition.
export const STATUS_EVENTS = new Set(["model_status", "status_change"]);

// Calls onEvent(name, data) for each event of an SSE body until it ends. Comments (`: keepalive`) are skipped.
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      let name = "message";
      const data = [];
      for (const line of frame.split(/\r?\n/)) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A live SSE subscription: reconnects when the stream ends or fails (a restart, a network blip). onState(true)
// once connected, onState(false, error) when not. Returns a function that ends it.
export function subscribe(path, onEvent, onState = () => {}) {
  const controller = new AbortController();
  (async () => {
    let delay = 500;
    while (!controller.signal.aborted) {
      try {
        const response = await apiFetch(path, { signal: controller.signal, headers: { Accept: "text/event-stream" } });
        if (!response.ok) throw new ApiError(await errorMessage(response), response.status);
        onState(true);
        delay = 500;
        await readEvents(response, onEvent);
        onState(false);
      } catch (error) {
        if (controller.signal.aborted) return;
        onState(false, error);
        if (error instanceof ApiError && error.status === 404) return; // the server has no such stream
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => controller.abort();
}
