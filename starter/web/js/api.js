// The API, as the studio uses it. Keys live in this tab's sessionStorage only: never in a URL,
// never in localStorage, never logged.

const USER_KEY = "atelier.key";
const OPERATOR_KEY = "atelier.operator";

export const session = {
  get key() { return sessionStorage.getItem(USER_KEY); },
  set key(value) { value ? sessionStorage.setItem(USER_KEY, value) : sessionStorage.removeItem(USER_KEY); },
  get operator() { return sessionStorage.getItem(OPERATOR_KEY); },
  set operator(value) { value ? sessionStorage.setItem(OPERATOR_KEY, value) : sessionStorage.removeItem(OPERATOR_KEY); },
  clear() { sessionStorage.removeItem(USER_KEY); sessionStorage.removeItem(OPERATOR_KEY); },
};

export class ApiError extends Error {
  constructor(status, code, message, detail = {}, headers = null) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.headers = headers;
  }

  get transient() {
    return this.status === 0 || this.status === 502 || this.status === 503 || this.status === 504;
  }
}

// Fired when the server says the user's key is no longer good (401): the app signs out.
export const events = new EventTarget();

export async function call(path, { method = "GET", json, form, headers = {}, as = "user", signal, key } = {}) {
  const sent = { ...headers };
  const token = key ?? (as === "user" ? session.key : as === "operator" ? session.operator : null);
  if (token) sent.Authorization = `Bearer ${token}`;
  const init = { method, headers: sent, signal, cache: "no-store", credentials: "omit" };
  if (form) init.body = form;
  else if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "Network", "the server could not be reached");
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const error = (body && body.error) || {};
    const problem = new ApiError(response.status, error.code || `HTTP${response.status}`, error.message || "", error,
      response.headers);
    if (response.status === 401 && as === "user" && key === undefined) {
      events.dispatchEvent(new CustomEvent("unauthorized"));
    }
    throw problem;
  }
  return { body, headers: response.headers, status: response.status };
}

export async function get(path, options) {
  return (await call(path, options)).body;
}

// A fresh Idempotency-Key: one per click of a submit button.
export function newKey() {
  if (crypto.randomUUID) return `studio-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `studio-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

// What this server offers, read from its own OpenAPI document: newer routes are used where
// present, and the studio falls back where they are not.
let featuresPromise = null;

export function features() {
  featuresPromise ??= (async () => {
    const found = { events: false, deleteWork: false, thumbnails: false };
    try {
      const response = await fetch("/openapi.json", { cache: "no-store", credentials: "omit" });
      if (!response.ok) return found;
      const paths = (await response.json()).paths || {};
      for (const [path, operations] of Object.entries(paths)) {
        if (/^\/v1\/generations\/\{[^}]+\}\/events$/.test(path) && operations.get) found.events = true;
        if (/^\/v1\/works\/\{[^}]+\}$/.test(path) && operations.delete) found.deleteWork = true;
        if (/^\/v1\/files\/\{[^}]+\}$/.test(path) && operations.get) {
          found.thumbnails = (operations.get.parameters || []).some((p) => p.in === "query" && p.name === "w");
        }
      }
    } catch {
      // No OpenAPI: the oldest routes only.
    }
    return found;
  })();
  return featuresPromise;
}

let limitsPromise = null;

// What a generation accepts and costs, as the server enforces it.
export function limits() {
  limitsPromise ??= get("/v1/limits", { as: "none" }).catch((err) => {
    limitsPromise = null;
    throw err;
  });
  return limitsPromise;
}

export async function upload(file, { signal } = {}) {
  const form = new FormData();
  form.append("file", file, file.name || "photo");
  return (await call("/v1/uploads", { method: "POST", form, signal })).body;
}
