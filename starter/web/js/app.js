// The studio: sign in, create, watch, keep, and the money. One page; the part after '#' says
// which view is shown, so a reload or a shared link comes back to the same generation.

import { ApiError, call, events, features, get, limits, session } from "./api.js";
import { renderCreate } from "./create.js";
import { clear, h, icon, replace } from "./dom.js";
import { releaseImages, showImage } from "./images.js";
import { cancel, follow } from "./watch.js";
import {
  apiProblem, credits, duration, FINAL, generationError, KIND_NAMES, ordinal, stageName, STAGES, TERMINAL, when,
} from "./words.js";

const main = document.getElementById("main");
const nav = document.querySelector(".nav");
const account = document.querySelector(".account");
const balanceValue = document.querySelector(".balance-value");
const noticeArea = document.querySelector(".notice-area");
const NEXT_KEY = "atelier.next";

let balance = null;
let balanceListener = null;
let pageAbort = new AbortController();
let temporalUi = null;
let firstRender = true;

// ---- what every view may use ---------------------------------------------------------------

const ctx = {
  balance: () => balance,
  onBalance(fn) { balanceListener = fn; },
  async refreshBalance() {
    if (!session.key) return;
    try {
      const account = await get("/v1/credits?limit=1");
      setBalance(account.balance);
    } catch {
      // The header keeps the last known balance.
    }
  },
  notify,
  showProblem,
  runningList,
};

function setBalance(value) {
  balance = value;
  balanceValue.textContent = value === null ? "…" : credits(value);
  if (balanceListener) balanceListener();
}

let noticeTimer = null;

function notify(text, kind = "info") {
  clearTimeout(noticeTimer);
  replace(noticeArea, h("p", { class: `notice ${kind}` }, text));
  noticeTimer = setTimeout(() => clear(noticeArea), 8000);
}

function showProblem(root, err, { retry = true } = {}) {
  const [what, next] = apiProblem(err);
  replace(root, h("section", { class: "panel problem-panel", role: "alert" },
    h("h1", { tabindex: "-1" }, icon("alert"), what),
    h("p", {}, next),
    retry ? h("button", { type: "button", class: "secondary", onclick: () => route() }, "Try again") : null));
}

function temporalLink(id) {
  if (!temporalUi || !session.operator) return null;
  const href = temporalUi.workflow_url.replace("{id}", encodeURIComponent(id));
  return h("a", { class: "operator-link", href, target: "_blank", rel: "noopener noreferrer" },
    icon("external"), "Workflow history in Temporal UI", h("span", { class: "visually-hidden" }, " (opens in a new tab)"));
}

function runningList() {
  const box = h("section", { class: "panel running", hidden: true, "aria-labelledby": "running-title" });
  const signal = pageAbort.signal;
  (async () => {
    const found = [];
    for (const status of ["running", "queued"]) {
      try {
        const page = await get(`/v1/generations?status=${status}&limit=10`, { signal });
        found.push(...page.items);
      } catch {
        return;
      }
    }
    if (!found.length || signal.aborted) return;
    replace(box, h("h2", { id: "running-title" }, "In progress"),
      h("ul", { class: "running-list" }, found.map((g) => h("li", {},
        h("a", { href: `#/g/${encodeURIComponent(g.id)}` },
          h("span", { class: "pulse", "aria-hidden": "true" }),
          h("span", {}, h("strong", {}, KIND_NAMES[g.kind] || g.kind),
            h("span", { class: "muted" }, ` · started ${when(g.created_at)}`)))))));
    box.hidden = false;
  })();
  return box;
}

// ---- header and sign-in ---------------------------------------------------------------------

function drawChrome() {
  const user = Boolean(session.key);
  const operator = Boolean(session.operator);
  nav.hidden = !(user || operator);
  account.hidden = !(user || operator);
  for (const link of nav.querySelectorAll("a")) {
    const name = link.dataset.nav;
    link.hidden = name === "operator" ? !operator : !user;
  }
  document.querySelector(".balance").hidden = !user;
  const current = (location.hash.split("/")[1] || "create").replace(/^g$/, "create").replace(/^w$/, "works");
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.nav === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function loadOperator() {
  temporalUi = null;
  if (!session.operator) return;
  try {
    temporalUi = await get("/v1/admin/temporal-ui", { as: "operator" });
  } catch {
    temporalUi = null;
  }
}

function signOut(message) {
  session.clear();
  balance = null;
  temporalUi = null;
  setBalance(null);
  if (message) notify(message);
  if (location.hash && location.hash !== "#/") location.hash = "#/";
  else route();
}

function renderSignIn(root) {
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
    autocapitalize: "off", required: true, "aria-describedby": "api-key-hint",
  });
  const error = h("p", { class: "field-error", id: "api-key-error", role: "alert", hidden: true });
  const button = h("button", { type: "submit", class: "primary big" }, "Sign in");

  async function onSubmit(event) {
    event.preventDefault();
    const key = input.value.trim();
    const fail = (text) => {
      replace(error, icon("alert"), text);
      error.hidden = false;
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", "api-key-error api-key-hint");
      input.focus();
    };
    if (!key) { fail("Paste your API key first."); return; }
    button.disabled = true;
    replace(button, "Checking…");
    try {
      try {
        const account = await get("/v1/credits?limit=1", { key });
        session.key = key;
        setBalance(account.balance);
      } catch (err) {
        if (!(err instanceof ApiError) || err.status !== 401) throw err;
        // Not a user's key: perhaps the operator token.
        await get("/v1/admin/temporal-ui", { key, as: "none" });
        session.operator = key;
        session.key = null;
      }
      input.value = "";
      await loadOperator();
      const next = sessionStorage.getItem(NEXT_KEY);
      sessionStorage.removeItem(NEXT_KEY);
      location.hash = session.key ? (next || "#/create") : "#/operator";
      route();
    } catch (err) {
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
        fail("That key was not accepted. Check that you copied all of it (a user key starts with atl_), " +
          "or ask your operator for a new one.");
      } else {
        const [what, next] = apiProblem(err);
        fail(`${what} ${next}`);
      }
    } finally {
      button.disabled = false;
      replace(button, "Sign in");
    }
  }

  replace(root, h("div", { class: "signin-layout" },
    h("section", { class: "intro" },
      h("h1", { tabindex: "-1" }, "Your photos, made into pictures"),
      h("p", { class: "lede" }, "Turn a photo into a studio portrait, or see a person wearing chosen garments. " +
        "Watch it being made; if it does not finish, every credit comes back."),
      h("ol", { class: "how" },
        h("li", {}, h("strong", {}, "Create"), " Upload a photo and choose a style or garments."),
        h("li", {}, h("strong", {}, "Watch"), " Follow each step live, and cancel any time."),
        h("li", {}, h("strong", {}, "Keep"), " Download the result; your works stay in your gallery."))),
    h("section", { class: "panel signin", "aria-labelledby": "signin-title" },
      h("h2", { id: "signin-title" }, "Sign in"),
      h("form", { method: "post", novalidate: true, onsubmit: onSubmit },
        h("label", { for: "api-key" }, "API key"),
        input,
        h("p", { class: "field-hint", id: "api-key-hint" },
          "Kept in this browser tab only, and forgotten when you close it."),
        error,
        button),
      h("details", { class: "help" },
        h("summary", {}, "Where do I get a key?"),
        h("p", {}, "The person who runs this Atelier gives you one. Operators: sign in with the admin token " +
          "(with make run it is in var/dev-secrets.env) to create users and add credits.")))));
}

// ---- watch ------------------------------------------------------------------------------------

function renderWatch(root, id) {
  const signal = pageAbort.signal;
  const eyebrow = h("p", { class: "eyebrow" });
  const title = h("h1", { tabindex: "-1" }, "Loading…");
  const bar = h("div", { class: "progress-bar" });
  const progress = h("div", {
    class: "progress", role: "progressbar", "aria-label": "Progress", "aria-valuemin": "0", "aria-valuemax": "100",
    "aria-valuenow": "0",
  }, bar);
  const stage = h("p", { class: "stage-name", "aria-live": "polite" });
  const percent = h("p", { class: "percent", "aria-hidden": "true" });
  const queue = h("p", { class: "queue", hidden: true });
  const facts = h("dl", { class: "facts" });
  const steps = h("ol", { class: "steps", "aria-label": "Steps so far" });
  const tries = h("details", { class: "tries", hidden: true });
  const connection = h("p", { class: "connection muted" });
  const cancelButton = h("button", { type: "button", class: "danger" }, icon("x"), "Cancel and refund");
  const actions = h("div", { class: "actions" }, cancelButton);
  const live = h("section", { class: "panel watch", "aria-labelledby": "watch-title" },
    h("h2", { id: "watch-title", class: "visually-hidden" }, "Progress"),
    h("div", { class: "stage-row" }, stage, percent), progress, queue, facts, steps, tries, connection, actions);
  const outcome = h("section", { class: "outcome", hidden: true });
  const layout = h("div", { class: "watch-layout" }, live, outcome);
  replace(root, h("div", { class: "page-head" }, eyebrow, title), layout);

  const seen = [];
  let finished = false;
  let cost = null;
  let kindSeen = null;
  let lastMoney = null;

  function addStep(name, status) {
    if (seen[seen.length - 1] === name) return;
    seen.push(name);
    const items = steps.querySelectorAll("li");
    items.forEach((li) => li.classList.replace("now", "done"));
    const stopped = TERMINAL.has(status) && status !== "completed";
    steps.append(h("li", { class: stopped ? "now stopped" : "now", dataset: { stage: name } },
      h("span", { class: "step-mark", "aria-hidden": "true" }, icon(stopped ? "x" : "check")), name));
  }

  function fact(name, value) {
    return value === null || value === undefined || value === "" ? [] : [h("dt", {}, name), h("dd", {}, value)];
  }

  function update(g) {
    const kind = KIND_NAMES[g.kind] || g.kind;
    if (g.kind && g.kind !== kindSeen) {
      kindSeen = g.kind;
      limits().then((terms) => { cost = terms.kinds[g.kind] ? terms.kinds[g.kind].cost : null; }).catch(() => {});
    }
    replace(eyebrow, `${kind}${g.created_at ? ` · started ${when(g.created_at)}` : ""}`);
    const name = stageName(g);
    const value = Math.max(0, Math.min(100, Number(g.progress) || 0));
    bar.style.width = `${TERMINAL.has(g.status) ? 100 : Math.max(value, 3)}%`;
    progress.setAttribute("aria-valuenow", String(TERMINAL.has(g.status) ? 100 : value));
    progress.setAttribute("aria-valuetext", `${name}, ${value} %`);
    progress.dataset.stage = g.stage;
    progress.classList.toggle("working", !TERMINAL.has(g.status));
    replace(stage, name);
    replace(percent, `${value} %`);
    // The last moment before the final status is not a step of its own.
    if (g.stage !== "done" || TERMINAL.has(g.status)) addStep(name, g.status);
    const waiting = g.stage === "waiting_for_model" || g.queue_position;
    queue.hidden = !waiting || TERMINAL.has(g.status);
    if (waiting) {
      const parts = [];
      if (g.queue_position) parts.push(`You are ${ordinal(g.queue_position)} in line`);
      else parts.push("Waiting for a free model");
      if (g.eta_s !== null && g.eta_s !== undefined) parts.push(`${duration(g.eta_s)} to go`);
      replace(queue, icon("clock"), parts.join(" · "));
    }
    // A stream's progress events carry no credits: past the charge, a running generation has paid its cost.
    const paid = !TERMINAL.has(g.status) && !["queued", "charging"].includes(g.stage) && cost !== null;
    const charged = (g.credits && g.credits.charged) || (paid ? cost : 0);
    // A charge or refund may have happened since the balance was read (a stream's progress events
    // carry no credits, so a new stage counts too): the header follows.
    const money = `${charged}/${g.credits ? g.credits.refunded : 0}/${g.stage}/${g.status}`;
    if (money !== lastMoney) {
      ctx.refreshBalance();
      lastMoney = money;
    }
    const attempts = Array.isArray(g.attempts) ? g.attempts.length : 0;
    const refunded = g.credits ? g.credits.refunded : 0;
    const closed = TERMINAL.has(g.status);
    const stoppedAt = closed && g.status !== "completed" && g.error && STAGES[g.error.stage];
    replace(facts,
      fact("Stopped while", stoppedAt ? stoppedAt.toLowerCase() : null),
      fact("Model", g.model || (closed ? null : "not chosen yet")),
      fact("Attempt", g.attempt ? `${g.attempt}${attempts > 1 ? ` (${attempts} calls so far)` : ""}` : null),
      fact("Credits", charged ? `${credits(charged)} charged${refunded ? `, ${refunded} refunded` : ""}`
        : closed ? "nothing charged" : "not charged yet"));
    progress.dataset.status = g.status;
    const calls = Array.isArray(g.attempts) ? g.attempts : [];
    if (calls.length > 1 || calls.some((a) => a.outcome !== "running" && a.outcome !== "succeeded")) {
      replace(tries, h("summary", {}, `Calls to the image service: ${calls.length}`),
        h("ol", {}, calls.map((a) => h("li", {}, `${a.model}: ${OUTCOMES[a.outcome] || a.outcome}`))));
      tries.hidden = false;
    }
    replace(connection, g.connection === "reconnecting" ? "Connection lost; trying again…"
      : g.connection === "live" ? "Live" : g.connection === "polling" ? "Checking every second" : "");
    if (!TERMINAL.has(g.status)) {
      title.textContent = g.kind === "fitting" ? "Making your try-on" : "Making your portrait";
      document.title = `${value} % · ${name} · Atelier studio`;
    }
    if (!actions.querySelector(".operator-link")) {
      const link = temporalLink(g.id);
      if (link) actions.append(link);
    }
  }

  async function finish(g) {
    if (finished) return;
    finished = true;
    update(g);
    cancelButton.hidden = true;
    connection.textContent = "";
    progress.classList.remove("working");
    ctx.refreshBalance();
    const refunded = g.credits ? g.credits.refunded : 0;
    const charged = g.credits ? g.credits.charged : 0;
    if (g.status === "completed") {
      title.textContent = g.kind === "fitting" ? "Your try-on is ready" : "Your portrait is ready";
      document.title = "Ready · Atelier studio";
      live.classList.add("compact");
      layout.classList.add("done");
      const images = (g.result && g.result.images) || [];
      const gallery = h("div", { class: "result-images" });
      for (const [index, image] of images.entries()) {
        const img = h("img", { class: "result-image", alt: `Result ${index + 1} of ${images.length}: ${KIND_NAMES[g.kind] || g.kind}`,
          width: image.width, height: image.height });
        const download = h("a", { class: "button primary", download: `atelier-${g.id}-${index + 1}.${ext(image.content_type)}` },
          icon("download"), images.length > 1 ? `Download image ${index + 1}` : "Download");
        gallery.append(h("figure", { class: "result" }, img,
          h("figcaption", {}, `${image.width} × ${image.height}`, download)));
        showImage(img, image.url, { link: download });
      }
      replace(outcome, gallery, h("div", { class: "actions" },
        h("a", { class: "button secondary", href: "#/create" }, "Make another"),
        g.result && g.result.work_id ? h("a", { class: "button secondary", href: `#/works/${encodeURIComponent(g.result.work_id)}` }, "Open in your works") : null,
        h("a", { class: "button ghost", href: "#/works" }, "All works")));
    } else {
      const [what, next] = generationError(g);
      title.textContent = FINAL[g.status] === "Canceled" ? "Canceled" : "It did not finish";
      document.title = `${FINAL[g.status]} · Atelier studio`;
      const money = refunded > 0
        ? h("p", { class: "refund-note" }, icon("refund"), h("strong", {}, "Refund"), ` ${credits(refunded)} returned to your balance.`)
        : charged > 0 ? h("p", {}, `${credits(charged)} charged.`) : h("p", { class: "muted" }, "Nothing was charged.");
      replace(outcome, h("div", { class: `panel outcome-panel ${g.status}`, role: "status" },
        h("h2", {}, icon(g.status === "canceled" ? "x" : "alert"), what),
        h("p", {}, next),
        money,
        h("div", { class: "actions" }, h("a", { class: "button primary", href: "#/create" }, "Start a new one"))));
    }
    outcome.hidden = false;
  }

  cancelButton.addEventListener("click", async () => {
    cancelButton.disabled = true;
    replace(cancelButton, "Canceling…");
    try {
      await cancel(id);
      notify("Canceled. Your credits are being returned.");
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) notify("It had already finished.");
      else {
        const [what, next] = apiProblem(err);
        notify(`${what} ${next}`, "error");
        cancelButton.disabled = false;
        replace(cancelButton, icon("x"), "Cancel and refund");
      }
    }
  });

  follow(id, (g) => { if (!finished && !signal.aborted) update(g); }, signal)
    .then((g) => { if (!signal.aborted) finish(g); })
    .catch((err) => { if (err.name !== "AbortError") showProblem(root, err); });
}

const OUTCOMES = {
  running: "working", succeeded: "done", failed: "failed", busy: "busy, waited", timed_out: "took too long",
  canceled: "canceled",
};

function ext(contentType) {
  return { "image/png": "png", "image/webp": "webp" }[contentType] || "jpg";
}

// ---- keep -------------------------------------------------------------------------------------

async function renderWorks(root) {
  const signal = pageAbort.signal;
  const found = await features();
  const grid = h("ul", { class: "works-grid" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Show more");
  replace(root, h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Your works"),
    h("p", { class: "lede" }, "Everything you have made, newest first.")), grid, h("div", { class: "actions center" }, more));
  let cursor = null;

  async function load() {
    more.disabled = true;
    const page = await get(`/v1/works?limit=24${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`, { signal });
    if (!page.items.length && !cursor) {
      grid.replaceWith(h("div", { class: "panel empty" }, h("p", {}, "No works yet."),
        h("a", { class: "button primary", href: "#/create" }, "Create your first")));
    }
    for (const work of page.items) {
      const image = work.images[0];
      const img = h("img", { alt: work.prompt ? `${KIND_NAMES[work.kind]}: ${work.prompt}` : `${KIND_NAMES[work.kind] || work.kind} made ${when(work.created_at)}`,
        loading: "lazy", width: image ? image.width : null, height: image ? image.height : null });
      grid.append(h("li", { class: "work-card" },
        h("a", { href: `#/works/${encodeURIComponent(work.id)}` },
          h("div", { class: "thumb" }, img),
          h("div", { class: "work-text" },
            h("span", { class: `badge ${work.kind}` }, KIND_NAMES[work.kind] || work.kind),
            h("p", { class: "work-prompt" }, work.prompt || h("span", { class: "muted" }, "No prompt")),
            h("p", { class: "work-date muted" }, h("time", { datetime: work.created_at }, when(work.created_at)))))));
      if (image) showImage(img, image.url, { width: found.thumbnails ? 512 : null });
    }
    cursor = page.next_cursor;
    more.hidden = !cursor;
    more.disabled = false;
  }

  more.addEventListener("click", () => load().catch((err) => notify(apiProblem(err).join(" "), "error")));
  await load();
}

async function renderWork(root, id) {
  const signal = pageAbort.signal;
  const [work, found] = await Promise.all([get(`/v1/works/${encodeURIComponent(id)}`, { signal }), features()]);
  const figures = work.images.map((image, index) => {
    const img = h("img", { class: "result-image", alt: work.prompt ? `${KIND_NAMES[work.kind]}: ${work.prompt}` : `Image ${index + 1}`,
      width: image.width, height: image.height });
    const download = h("a", { class: "button primary", download: `atelier-${work.id}-${index + 1}.${ext(image.content_type)}` },
      icon("download"), "Download");
    showImage(img, image.url, { link: download });
    return h("figure", { class: "result" }, img, h("figcaption", {}, `${image.width} × ${image.height}`, download));
  });
  const actions = h("div", { class: "actions" },
    h("a", { class: "button ghost", href: `#/g/${encodeURIComponent(work.generation_id)}` }, "How it was made"));
  const link = temporalLink(work.generation_id);
  if (link) actions.append(link);
  if (found.deleteWork) {
    const confirmBox = h("div", { class: "confirm", hidden: true, role: "group", "aria-label": "Confirm deletion" });
    const del = h("button", { type: "button", class: "danger ghost" }, icon("trash"), "Delete");
    del.addEventListener("click", () => {
      confirmBox.hidden = false;
      del.hidden = true;
      confirmBox.querySelector("button").focus();
    });
    const yes = h("button", { type: "button", class: "danger" }, "Delete for good");
    const no = h("button", { type: "button", class: "secondary" }, "Keep it");
    no.addEventListener("click", () => { confirmBox.hidden = true; del.hidden = false; del.focus(); });
    yes.addEventListener("click", async () => {
      yes.disabled = true;
      try {
        await call(`/v1/works/${encodeURIComponent(work.id)}`, { method: "DELETE" });
        notify("The work and its images were deleted.");
        location.hash = "#/works";
      } catch (err) {
        yes.disabled = false;
        notify(apiProblem(err).join(" "), "error");
      }
    });
    replace(confirmBox, h("p", {}, "Delete this work and its images for good?"), yes, no);
    actions.append(del, confirmBox);
  }
  replace(root,
    h("div", { class: "page-head" },
      h("p", { class: "eyebrow" }, h("a", { href: "#/works" }, "Your works"), ` · ${KIND_NAMES[work.kind] || work.kind}`),
      h("h1", { tabindex: "-1" }, `${KIND_NAMES[work.kind] || work.kind}, ${when(work.created_at)}`)),
    h("div", { class: "work-detail" },
      h("div", { class: "result-images" }, figures),
      h("aside", { class: "panel" },
        h("h2", { class: "small-heading" }, "Prompt"),
        h("p", { class: work.prompt ? "prompt-text" : "prompt-text muted" }, work.prompt || "No prompt"),
        h("dl", { class: "facts" },
          h("dt", {}, "Kind"), h("dd", {}, KIND_NAMES[work.kind] || work.kind),
          h("dt", {}, "Model"), h("dd", {}, work.model)),
        actions)));
}

// ---- money ------------------------------------------------------------------------------------

const REFUND_REASONS = {
  Canceled: "you canceled", DeadlineExceeded: "it took too long", ExpiredBeforeStart: "it waited too long",
  ProviderUnavailable: "the image service was down", ProviderBusy: "the image service was busy",
  NoModelAvailable: "no model was free", ContentBlocked: "the model declined", BadImage: "a photo could not be used",
  DownloadFailed: "a photo could not be fetched", Internal: "an error on our side",
};

function ledgerLine(entry) {
  if (entry.entry === "charge") {
    const kind = /^(\w+) generation$/.exec(entry.reason || "");
    return [`Charge · ${kind ? KIND_NAMES[kind[1]] || kind[1] : "generation"}`, "charge"];
  }
  if (entry.entry === "refund") {
    const why = REFUND_REASONS[entry.reason];
    return [`Refund${why ? ` · ${why}` : ""}`, "refund"];
  }
  if (entry.entry === "grant") return [`Credits added${entry.reason ? ` · ${entry.reason}` : ""}`, "grant"];
  return [entry.entry, "other"];
}

async function renderCredits(root) {
  const signal = pageAbort.signal;
  const account = await get("/v1/credits?limit=100", { signal });
  setBalance(account.balance);
  const rows = account.entries.map((entry) => {
    const [what, type] = ledgerLine(entry);
    const generation = entry.entry === "grant" ? null : entry.generation_id;
    return h("tr", { class: `row-${type}` },
      h("td", { class: "date" }, h("time", { datetime: entry.created_at }, when(entry.created_at))),
      h("td", {}, h("span", { class: `badge ${type}` }, type === "refund" ? "Refund" : type === "charge" ? "Charge" : "Added"),
        " ", what.replace(/^(Refund|Charge|Credits added)( · )?/, ""),
        generation ? " " : null,
        generation ? h("a", { class: "ledger-link", href: `#/g/${encodeURIComponent(generation)}` }, "see it") : null),
      h("td", { class: `amount ${entry.amount < 0 ? "minus" : "plus"}` }, `${entry.amount > 0 ? "+" : "−"}${Math.abs(entry.amount)}`));
  });
  replace(root,
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Credits")),
    h("div", { class: "credits-layout" },
      h("section", { class: "panel balance-card", "aria-labelledby": "balance-title" },
        h("h2", { id: "balance-title" }, "Balance"),
        h("p", { class: "balance-big" }, credits(account.balance)),
        h("p", { class: "muted" }, "A generation is charged when it starts; if it does not finish, the same amount comes back as a refund.")),
      h("section", { class: "panel ledger", "aria-labelledby": "ledger-title" },
        h("h2", { id: "ledger-title" }, "Charges and refunds"),
        rows.length
          ? h("table", {},
            h("caption", { class: "visually-hidden" }, "Your ledger, newest first"),
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "When"), h("th", { scope: "col" }, "What"),
              h("th", { scope: "col", class: "amount" }, "Credits"))),
            h("tbody", {}, rows))
          : h("p", { class: "muted" }, "Nothing yet."))));
}

// ---- operator ---------------------------------------------------------------------------------

function renderOperator(root) {
  const amount = h("input", { id: "new-credits", type: "number", min: "0", max: "1000000", value: "100", inputmode: "numeric" });
  const created = h("div", { class: "created", "aria-live": "polite" });
  const createButton = h("button", { type: "submit", class: "primary" }, "Create user");

  async function createUser(event) {
    event.preventDefault();
    createButton.disabled = true;
    try {
      const user = await get("/v1/admin/users", { method: "POST", as: "operator" });
      const n = Math.max(0, Math.floor(Number(amount.value) || 0));
      if (n > 0) {
        await call(`/v1/admin/users/${encodeURIComponent(user.user_id)}/credits`, {
          method: "POST", as: "operator", json: { amount: n, reason: "added in the studio" },
          headers: { "Idempotency-Key": `studio-grant-${user.user_id}` },
        });
      }
      const keyField = h("input", { id: "new-key", type: "text", readonly: true, value: user.api_key, class: "mono" });
      replace(created, h("div", { class: "panel inset" },
        h("p", {}, `User ${user.user_id} created with ${credits(n)}. Its key is shown once:`),
        h("label", { for: "new-key" }, "API key"), keyField,
        h("div", { class: "actions" },
          h("button", { type: "button", class: "secondary", onclick: async () => {
            try { await navigator.clipboard.writeText(user.api_key); notify("Key copied."); } catch { keyField.select(); }
          } }, "Copy key"),
          h("button", { type: "button", class: "primary", onclick: () => {
            session.key = user.api_key;
            location.hash = "#/create";
            ctx.refreshBalance();
          } }, "Continue as this user"))));
    } catch (err) {
      notify(apiProblem(err).join(" "), "error");
    } finally {
      createButton.disabled = false;
    }
  }

  const grantUser = h("input", { id: "grant-user", type: "text", autocomplete: "off", spellcheck: "false", required: true });
  const grantAmount = h("input", { id: "grant-amount", type: "number", min: "1", value: "50", inputmode: "numeric" });
  const grantResult = h("p", { class: "muted", "aria-live": "polite" });
  async function grant(event) {
    event.preventDefault();
    try {
      const moved = await get(`/v1/admin/users/${encodeURIComponent(grantUser.value.trim())}/credits`, {
        method: "POST", as: "operator", json: { amount: Math.floor(Number(grantAmount.value) || 0), reason: "added in the studio" },
      });
      replace(grantResult, `Done: ${moved.user_id} now has ${credits(moved.balance)}.`);
      ctx.refreshBalance();
    } catch (err) {
      replace(grantResult, apiProblem(err).join(" "));
    }
  }

  replace(root,
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Operator"),
      h("p", { class: "lede" }, "Signed in with the admin token. ",
        temporalUi ? h("a", { href: temporalUi.url, target: "_blank", rel: "noopener noreferrer" }, "Open the Temporal UI") : null)),
    h("div", { class: "operator-grid" },
      h("section", { class: "panel" },
        h("h2", {}, "New user"),
        h("form", { onsubmit: createUser, novalidate: true },
          h("label", { for: "new-credits" }, "Starting credits"), amount, createButton),
        created),
      h("section", { class: "panel" },
        h("h2", {}, "Add credits"),
        h("form", { onsubmit: grant, novalidate: true },
          h("label", { for: "grant-user" }, "User id"), grantUser,
          h("label", { for: "grant-amount" }, "Credits"), grantAmount,
          h("button", { type: "submit", class: "secondary" }, "Add credits")),
        grantResult)));
}

// ---- routing ----------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/g\/([^/]+)$/, (root, id) => renderWatch(root, id), "Generation"],
  [/^#\/works\/([^/]+)$/, (root, id) => renderWork(root, id), "Work"],
  [/^#\/works$/, (root) => renderWorks(root), "Your works"],
  [/^#\/credits$/, (root) => renderCredits(root), "Credits"],
  [/^#\/operator$/, (root) => renderOperator(root), "Operator"],
  [/^(#\/create)?$|^#\/?$/, (root) => renderCreate(root, ctx), "Create"],
];

async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  balanceListener = null;
  releaseImages();
  const hash = location.hash;
  drawChrome();
  main.classList.toggle("signed-out", !session.key && !session.operator);
  if (!session.key && !session.operator) {
    if (hash && hash !== "#/" && hash !== "#/create") sessionStorage.setItem(NEXT_KEY, hash);
    document.title = "Sign in · Atelier studio";
    renderSignIn(main);
    focusHeading();
    return;
  }
  let matched = ROUTES.find(([pattern]) => pattern.test(hash));
  if (!session.key && matched && matched[2] !== "Operator") matched = ROUTES.find(([, , name]) => name === "Operator");
  if (!matched) matched = ROUTES[ROUTES.length - 1];
  const [pattern, render, name] = matched;
  const args = (pattern.exec(hash) || []).slice(1).filter(Boolean).map(decodeURIComponent);
  document.title = `${name} · Atelier studio`;
  replace(main, h("p", { class: "loading", role: "status" }, "Loading…"));
  try {
    await render(main, ...args);
  } catch (err) {
    if (err.name !== "AbortError") showProblem(main, err);
  }
  focusHeading();
}

function focusHeading() {
  // A screen reader hears the new page's title; the first load leaves focus where the browser put it.
  if (firstRender) { firstRender = false; return; }
  const heading = main.querySelector("h1");
  if (heading) heading.focus({ preventScroll: false });
}

events.addEventListener("unauthorized", () => signOut("Your key is no longer accepted. Sign in again."));
document.querySelector(".sign-out").addEventListener("click", () => signOut("Signed out. The key was removed from this tab."));
window.addEventListener("hashchange", route);

(async () => {
  drawChrome();
  if (session.operator) await loadOperator();
  if (session.key) ctx.refreshBalance();
  route();
})();
