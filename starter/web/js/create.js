// The create page: choose a kind, add photos (drag and drop or pick), see them, see the cost,
// submit once. Files are checked here against the server's own limits before any upload.

import { ApiError, call, limits, newKey, upload } from "./api.js";
import { h, icon, replace } from "./dom.js";
import { apiProblem, bytes, credits } from "./words.js";

export const STYLE_PRESETS = [
  { id: "studio", label: "Studio portrait", style: "clean studio portrait, soft key light" },
  { id: "noir", label: "Film noir", style: "black and white film noir, hard light" },
  { id: "golden", label: "Golden hour", style: "outdoor golden hour, warm backlight" },
  { id: "editorial", label: "Editorial", style: "fashion editorial, magazine cover" },
  { id: "pastel", label: "Soft pastel", style: "soft pastel backdrop, airy and bright" },
];

const EXTENSION_TYPES = { jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", webp: "image/webp" };

// The form outlives a visit to another page in the same tab, so a half-made request is kept.
const form = {
  kind: "photography",
  photos: [],
  person: [],
  garments: [],
  preset: "studio",
  customStyle: "",
  prompt: "",
  submitKey: null, // the Idempotency-Key of the click being submitted (kept for its retries)
  busy: false,
};

function typeOf(file) {
  if (file.type) return file.type;
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  return EXTENSION_TYPES[ext] || "";
}

function describeTypes(types) {
  return types.map((t) => t.replace("image/", "").toUpperCase()).join(", ");
}

// Checks one file against the server's limits; fills entry.problem when it cannot be sent.
async function check(entry, terms) {
  const { file } = entry;
  const type = typeOf(file);
  if (!terms.upload.content_types.includes(type)) {
    entry.problem = `${file.name} is not a photo the studio accepts (${describeTypes(terms.upload.content_types)}).`;
    return;
  }
  if (file.size > terms.upload.max_bytes) {
    entry.problem = `${file.name} is ${bytes(file.size)}; the largest photo accepted is ${bytes(terms.upload.max_bytes)}.`;
    return;
  }
  if (file.size === 0) {
    entry.problem = `${file.name} is empty.`;
    return;
  }
  const dims = await new Promise((resolve) => {
    const probe = new Image();
    probe.onload = () => resolve([probe.naturalWidth, probe.naturalHeight]);
    probe.onerror = () => resolve(null);
    probe.src = entry.preview;
  });
  if (!dims) {
    entry.problem = `${file.name} could not be read as an image.`;
    return;
  }
  entry.width = dims[0];
  entry.height = dims[1];
  if (dims[0] * dims[1] > terms.upload.max_pixels) {
    entry.problem = `${file.name} is ${dims[0]} × ${dims[1]} pixels; the largest accepted is ${terms.upload.max_pixels.toLocaleString()} pixels in all.`;
  }
}

function slotsOf(kind) {
  return kind === "photography" ? ["photos"] : ["person", "garments"];
}

function entriesOf(kind) {
  return slotsOf(kind).flatMap((slot) => form[slot]);
}

function countRange(terms, slot) {
  const kind = terms.kinds[form.kind];
  if (slot === "person") return { min: 1, max: 1 };
  if (slot === "garments") return kind.garments || { min: kind.images.min - 1, max: kind.images.max - 1 };
  return kind.images;
}

let onFormChange = null;

function formChanged() {
  form.submitKey = null;
  if (onFormChange) onFormChange();
}

export async function renderCreate(root, ctx) {
  let terms;
  try {
    terms = await limits();
  } catch (err) {
    ctx.showProblem(root, err);
    return;
  }
  const problems = h("div", { class: "problems", role: "alert", tabindex: "-1", hidden: true });
  const submit = h("button", { type: "submit", class: "primary big" });
  const costLine = h("p", { class: "cost-line" });
  const costHint = h("p", { class: "cost-hint" });
  const slotsBox = h("div", { class: "slots" });
  const styleBox = h("fieldset", { class: "field style-field" });

  function refreshCost() {
    const cost = terms.kinds[form.kind].cost;
    const balance = ctx.balance();
    replace(costLine, h("span", { class: "cost-amount" }, credits(cost)),
      balance === null ? null : h("span", { class: "cost-balance" }, `You have ${credits(balance)}.`));
    // The server's own 402 answer is on screen: it says the same, once is enough.
    const answered = !problems.hidden && problems.dataset.kind === "credits";
    if (balance !== null && balance < cost && !answered) {
      costHint.className = "cost-hint warn";
      replace(costHint, icon("alert"), ` This needs ${credits(cost)}, you have ${balance}. Ask your operator to add credits.`);
    } else {
      costHint.className = "cost-hint";
      replace(costHint, "Charged when it starts. If it does not finish, every credit comes back.");
    }
    const verb = form.kind === "photography" ? "Create portrait" : "Create try-on";
    replace(submit, form.busy ? form.busy : verb);
    submit.disabled = Boolean(form.busy);
    submit.setAttribute("aria-busy", form.busy ? "true" : "false");
  }

  function dropzone(slot, { title, hint, multiple }) {
    const id = `file-${slot}`;
    const input = h("input", {
      type: "file", id, class: "visually-hidden", accept: terms.upload.content_types.join(","),
      multiple, "aria-describedby": `${id}-hint`,
    });
    const range = countRange(terms, slot);
    const zone = h("label", { for: id, class: "drop-target" },
      icon("upload"),
      h("span", { class: "drop-title" }, title),
      h("span", { class: "drop-action" }, "Drop here or ", h("span", { class: "fake-link" }, "choose a file")),
    );
    const note = h("p", { class: "field-hint", id: `${id}-hint` },
      `${hint} ${describeTypes(terms.upload.content_types)}, up to ${bytes(terms.upload.max_bytes)}` +
      (range.max > 1 ? `; ${range.min} to ${range.max} of them.` : "."));
    const list = h("ul", { class: "previews", "aria-label": `${title}: chosen files` });
    const box = h("div", { class: "drop", dataset: { slot } }, input, zone, note, list);

    function drawList() {
      replace(list, form[slot].map((entry, index) => h("li", { class: entry.problem ? "preview bad" : "preview" },
        h("img", { src: entry.preview, alt: `Preview of ${entry.file.name}` }),
        h("div", { class: "preview-text" },
          h("span", { class: "preview-name" }, entry.file.name),
          h("span", { class: "preview-meta" }, entry.problem ? entry.problem
            : [bytes(entry.file.size), entry.width ? ` · ${entry.width} × ${entry.height}` : ""].join(""))),
        h("button", {
          type: "button", class: "icon-button", "aria-label": `Remove ${entry.file.name}`,
          onclick: () => {
            URL.revokeObjectURL(entry.preview);
            form[slot].splice(index, 1);
            formChanged();
            drawList();
            input.focus();
          },
        }, icon("x")),
      )));
      box.classList.toggle("has-files", form[slot].length > 0);
    }

    async function add(files) {
      const chosen = Array.from(files);
      if (!chosen.length) return;
      const room = range.max - (multiple ? form[slot].length : 0);
      if (!multiple) {
        for (const old of form[slot]) URL.revokeObjectURL(old.preview);
        form[slot] = [];
      }
      const taken = chosen.slice(0, Math.max(0, room));
      const entries = taken.map((file) => ({ file, preview: URL.createObjectURL(file), problem: null, fileId: null }));
      form[slot].push(...entries);
      formChanged();
      drawList();
      await Promise.all(entries.map((entry) => check(entry, terms)));
      drawList();
      if (onFormChange) onFormChange();
      if (chosen.length > taken.length) {
        ctx.notify(`Only ${range.max} ${range.max === 1 ? "photo fits" : "photos fit"} here; the others were left out.`);
      }
    }

    input.addEventListener("change", () => { add(input.files); input.value = ""; });
    for (const type of ["dragenter", "dragover"]) {
      box.addEventListener(type, (event) => { event.preventDefault(); box.classList.add("dragging"); });
    }
    for (const type of ["dragleave", "drop"]) {
      box.addEventListener(type, (event) => {
        event.preventDefault();
        if (type === "dragleave" && box.contains(event.relatedTarget)) return;
        box.classList.remove("dragging");
      });
    }
    box.addEventListener("drop", (event) => add(event.dataTransfer?.files || []));
    drawList();
    return box;
  }

  function drawSlots() {
    if (form.kind === "photography") {
      replace(slotsBox, dropzone("photos", {
        title: "Your photo", hint: "A clear photo of one person, face visible.", multiple: true,
      }));
    } else {
      replace(slotsBox,
        dropzone("person", { title: "The person", hint: "A photo of the person, head to hips or full length.", multiple: false }),
        dropzone("garments", { title: "The garments", hint: "Each garment on a plain background.", multiple: true }));
    }
  }

  function drawStyle() {
    styleBox.hidden = form.kind !== "photography";
    const custom = h("input", {
      type: "text", id: "custom-style", maxlength: terms.max_style_chars, value: form.customStyle,
      placeholder: "e.g. 1970s album cover, grainy film", autocomplete: "off",
    });
    custom.addEventListener("input", () => { form.customStyle = custom.value; formChanged(); });
    const customWrap = h("div", { class: "custom-style", hidden: form.preset !== "custom" },
      h("label", { for: "custom-style" }, "Describe the style"), custom);
    const options = [...STYLE_PRESETS, { id: "custom", label: "In your own words" }].map((preset) => {
      const radio = h("input", { type: "radio", name: "preset", id: `preset-${preset.id}`, value: preset.id,
        class: "visually-hidden", checked: form.preset === preset.id });
      radio.addEventListener("change", () => {
        form.preset = preset.id;
        formChanged();
        customWrap.hidden = preset.id !== "custom";
        if (preset.id === "custom") custom.focus();
      });
      return h("span", { class: "chip" }, radio, h("label", { for: `preset-${preset.id}` }, preset.label));
    });
    replace(styleBox, h("legend", {}, "Style"), h("div", { class: "chips" }, options), customWrap);
  }

  const kindSwitch = h("fieldset", { class: "field kind-field" },
    h("legend", {}, "What would you like to make?"),
    h("div", { class: "segmented" }, ["photography", "fitting"].map((kind) => {
      const radio = h("input", { type: "radio", name: "kind", id: `kind-${kind}`, value: kind,
        class: "visually-hidden", checked: form.kind === kind });
      radio.addEventListener("change", () => {
        form.kind = kind;
        formChanged();
        drawSlots();
        drawStyle();
        refreshCost();
      });
      return h("span", { class: "segment" }, radio,
        h("label", { for: `kind-${kind}` },
          h("strong", {}, kind === "photography" ? "Portrait" : "Try-on"),
          h("span", {}, kind === "photography" ? "Your photo in a new style" : "A person wearing chosen garments"),
          h("span", { class: "segment-cost" }, credits(terms.kinds[kind].cost))));
    })));

  const prompt = h("textarea", { id: "prompt", rows: 3, maxlength: terms.max_prompt_chars,
    placeholder: "Anything to add: mood, background, light…", "aria-describedby": "prompt-hint" });
  prompt.value = form.prompt;
  prompt.addEventListener("input", () => { form.prompt = prompt.value; formChanged(); });

  function validate() {
    const found = [];
    for (const slot of slotsOf(form.kind)) {
      const range = countRange(terms, slot);
      const n = form[slot].length;
      const name = { photos: "photo", person: "person photo", garments: "garment photo" }[slot];
      if (n < range.min) found.push({ slot, text: `Add ${range.min === 1 ? `a ${name}` : `at least ${range.min} ${name}s`}.` });
      if (n > range.max) found.push({ slot, text: `Use at most ${range.max} ${name}s.` });
      for (const entry of form[slot]) if (entry.problem) found.push({ slot, text: `${entry.problem} Remove it or choose another.` });
    }
    if (form.kind === "photography" && form.preset === "custom" && !form.customStyle.trim()) {
      found.push({ slot: "style", text: "Describe the style, or pick one of the presets." });
    }
    return found;
  }

  function showProblems(list, { focus = true } = {}) {
    if (!list.length) {
      problems.hidden = true;
      return;
    }
    replace(problems, h("h2", {}, icon("alert"), "Before you submit"), h("ul", {}, list.map((p) => h("li", {}, p.text))));
    problems.dataset.kind = "check";
    problems.hidden = false;
    if (focus) problems.focus();
  }

  function showFailure(err) {
    const [what, next] = apiProblem(err);
    replace(problems, h("h2", {}, icon("alert"), what), h("p", {}, next));
    problems.dataset.kind = err.status === 402 ? "credits" : "answer";
    problems.hidden = false;
    problems.focus();
  }

  async function onSubmit(event) {
    event.preventDefault();
    if (form.busy) return;
    const found = validate();
    showProblems(found);
    if (found.length) return;
    // One key per click: a retry of this click (or a second click while it runs) cannot charge twice.
    form.submitKey ??= newKey();
    const submitKey = form.submitKey;
    const entries = entriesOf(form.kind);
    try {
      for (const [index, entry] of entries.entries()) {
        if (entry.fileId) continue;
        form.busy = `Uploading photo ${index + 1} of ${entries.length}…`;
        refreshCost();
        entry.fileId = (await retrying(() => upload(entry.file))).file_id;
      }
      form.busy = "Starting…";
      refreshCost();
      const body = { kind: form.kind, images: entries.map((e) => ({ file_id: e.fileId })), prompt: form.prompt.trim() };
      if (form.kind === "photography") {
        body.style = form.preset === "custom" ? form.customStyle.trim()
          : STYLE_PRESETS.find((p) => p.id === form.preset).style;
      }
      const started = await retrying(() => call("/v1/generations", {
        method: "POST", json: body, headers: { "Idempotency-Key": submitKey },
      }));
      for (const slot of ["photos", "person", "garments"]) {
        for (const entry of form[slot]) URL.revokeObjectURL(entry.preview);
        form[slot] = [];
      }
      form.prompt = "";
      form.submitKey = null;
      form.busy = false;
      ctx.refreshBalance();
      location.hash = `#/g/${encodeURIComponent(started.body.id)}`;
    } catch (err) {
      form.busy = false;
      refreshCost();
      if (err instanceof ApiError && err.code === "UnknownFile") for (const entry of entries) entry.fileId = null;
      showFailure(err);
      refreshCost();
      if (err instanceof ApiError && (err.status === 402 || err.code === "InsufficientCredits")) ctx.refreshBalance();
    }
  }

  const formEl = h("form", { class: "create-form", novalidate: true, onsubmit: onSubmit },
    h("div", { class: "create-main" },
      kindSwitch,
      h("div", { class: "field" }, slotsBox),
      styleBox,
      h("div", { class: "field" },
        h("label", { for: "prompt" }, "Prompt ", h("span", { class: "optional" }, "(optional)")),
        prompt,
        h("p", { class: "field-hint", id: "prompt-hint" }, `Up to ${terms.max_prompt_chars} characters.`))),
    h("aside", { class: "create-side" },
      h("div", { class: "panel summary" },
        h("h2", {}, "Cost"),
        costLine, costHint, problems, submit),
      ctx.runningList()));

  // A list of problems on screen follows the form: fixed ones go away as they are fixed.
  onFormChange = () => {
    if (!problems.hidden && problems.dataset.kind === "check") showProblems(validate(), { focus: false });
  };
  drawSlots();
  drawStyle();
  refreshCost();
  ctx.onBalance(refreshCost);
  replace(root,
    h("div", { class: "page-head" },
      h("h1", { tabindex: "-1" }, "Create"),
      h("p", { class: "lede" }, "Upload a photo, pick a look, and watch it being made.")),
    formEl);
}

// Uploads and the start request are retried on a lost connection or a busy server, with the same key.
async function retrying(action, attempts = 3) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await action();
    } catch (err) {
      if (!(err instanceof ApiError) || !err.transient || attempt >= attempts) throw err;
      await new Promise((resolve) => setTimeout(resolve, 700 * attempt));
    }
  }
}
