// Following one generation until it ends: the API's progress stream where it exists
// (GET /v1/generations/{id}/events, read with fetch so the key travels in a header, never in
// the URL), else a GET every second. Either way `onUpdate` gets the generation as it changes.

import { ApiError, call, features, get, session } from "./api.js";
import { TERMINAL } from "./words.js";

const POLL_MS = 1000;
const MAX_EVENT_CHARS = 1_000_000;

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); reject(new DOMException("aborted", "AbortError")); },
      { once: true });
  });
}

function isWholeGeneration(data) {
  return data && typeof data === "object" && "id" in data && "credits" in data && "status" in data;
}

// A progress event carries a few fields; a final one the whole generation object.
function merge(current, data) {
  if (isWholeGeneration(data)) return { ...data };
  const next = { ...current };
  for (const field of ["status", "stage", "model", "attempt", "queue_position", "eta_s", "attempts", "error"]) {
    if (field in data) next[field] = data[field];
  }
  if ("progress" in data) next.progress = data.progress;
  else if ("percent" in data) next.progress = data.percent;
  if (data.error_code && !next.error) next.error = { code: data.error_code, message: "" };
  return next;
}

async function* sseEvents(body, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { data: [], id: null, type: "message" };
  try {
    while (true) {
      if (signal?.aborted) return;
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      if (buffer.length > MAX_EVENT_CHARS) throw new Error("event too large");
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") {
          if (event.data.length) yield { ...event, data: event.data.join("\n") };
          event = { data: [], id: event.id, type: "message" };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") event.data.push(value);
          else if (field === "id") event.id = value;
          else if (field === "event") event.type = value;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Reads the stream until the generation ends; returns it, or null when the stream is not there.
async function stream(id, state, onUpdate, signal) {
  let lastId = null;
  let failures = 0;
  while (!signal.aborted) {
    const headers = { Accept: "text/event-stream", Authorization: `Bearer ${session.key}` };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await fetch(`/v1/generations/${encodeURIComponent(id)}/events`,
        { headers, signal, cache: "no-store", credentials: "omit" });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      response = null;
    }
    if (response && (response.status === 404 || response.status === 405 || response.status === 501)) {
      // No stream on this server (or not for this id): polling tells which.
      onUpdate(state.current);
      return null;
    }
    if (response && response.status === 401) throw new ApiError(401, "Unauthorized", "");
    if (response && response.status === 204) {
      // Resumed after the final event: nothing more will come; the generation says how it ended.
      state.current = await get(`/v1/generations/${encodeURIComponent(id)}`, { signal });
      return state.current;
    }
    if (response && response.ok && response.body) {
      failures = 0;
      try {
        for await (const event of sseEvents(response.body, signal)) {
          if (event.id !== null) lastId = event.id;
          let data;
          try { data = JSON.parse(event.data); } catch { continue; }
          state.current = { ...merge(state.current, data), connection: "live" };
          onUpdate(state.current);
          if (TERMINAL.has(state.current.status)) {
            // The final event carries the whole object; fetch it where it did not.
            if (!isWholeGeneration(data)) state.current = await get(`/v1/generations/${encodeURIComponent(id)}`, { signal });
            return state.current;
          }
        }
      } catch (err) {
        if (err.name === "AbortError") throw err;
      }
    }
    // The stream broke or the server is busy: resume where it stopped, after a pause.
    failures += 1;
    if (failures > 5) return null;
    onUpdate({ ...state.current, connection: "reconnecting" });
    await sleep(Math.min(8000, 500 * 2 ** failures), signal);
  }
  return null;
}

async function poll(id, state, onUpdate, signal) {
  let failures = 0;
  while (!signal.aborted) {
    try {
      const next = await get(`/v1/generations/${encodeURIComponent(id)}`, { signal });
      failures = 0;
      state.current = { ...next, connection: "polling" };
      onUpdate(state.current);
      if (TERMINAL.has(next.status)) return next;
    } catch (err) {
      if (err.name === "AbortError" || !(err instanceof ApiError) || !err.transient) throw err;
      failures += 1;
      onUpdate({ ...state.current, connection: "reconnecting" });
    }
    await sleep(failures ? Math.min(8000, POLL_MS * 2 ** failures) : POLL_MS, signal);
  }
  throw new DOMException("aborted", "AbortError");
}

export async function follow(id, onUpdate, signal) {
  const first = await get(`/v1/generations/${encodeURIComponent(id)}`, { signal });
  const state = { current: first };
  const streamed = (await features()).events;
  // A stream replays every change from the start: showing this first look too would list a step twice.
  if (!streamed || TERMINAL.has(first.status)) onUpdate(first);
  if (TERMINAL.has(first.status)) return first;
  if (streamed) {
    const done = await stream(id, state, onUpdate, signal);
    if (done) return done;
  }
  return poll(id, state, onUpdate, signal);
}

export async function cancel(id) {
  return (await call(`/v1/generations/${encodeURIComponent(id)}/cancel`, { method: "POST" })).body;
}
