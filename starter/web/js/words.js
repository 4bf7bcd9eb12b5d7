// What the studio says to people: stage names, error explanations, numbers and dates.

export const KIND_NAMES = { photography: "Portrait", fitting: "Try-on" };
export const KIND_LONG = { photography: "Portrait photography", fitting: "Virtual try-on (fitting)" };

// The workflow's stages, in the order they usually come.
export const STAGES = {
  queued: "Waiting to start",
  charging: "Reserving your credits",
  selecting_model: "Choosing a model",
  downloading: "Preparing your photos",
  waiting_for_model: "Waiting for a free model",
  generating: "Creating your image",
  saving: "Saving your picture",
  notifying: "Finishing up",
  refunding: "Returning your credits",
  done: "Finishing up",
};

export const FINAL = {
  completed: "Ready",
  failed: "Did not finish",
  canceled: "Canceled",
  rejected: "Not started",
};

export const TERMINAL = new Set(["completed", "failed", "canceled", "rejected"]);

export function stageName(generation) {
  if (TERMINAL.has(generation.status)) return FINAL[generation.status];
  return STAGES[generation.stage] || "Working";
}

export function credits(n) {
  const value = Number(n) || 0;
  return `${value} credit${Math.abs(value) === 1 ? "" : "s"}`;
}

export function bytes(n) {
  if (n >= 1024 * 1024) return `${Math.round((n / (1024 * 1024)) * 10) / 10} MB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KB`;
  return `${n} bytes`;
}

export function ordinal(n) {
  const tens = n % 100;
  if (tens >= 11 && tens <= 13) return `${n}th`;
  return `${n}${{ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th"}`;
}

export function duration(seconds) {
  const s = Math.max(1, Math.round(Number(seconds) || 0));
  if (s < 60) return `about ${s} s`;
  const m = Math.round(s / 60);
  if (m < 60) return `about ${m} min`;
  return `about ${Math.round((m / 60) * 10) / 10} h`;
}

const DATE = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : DATE.format(date);
}

// Why a generation did not finish, and what to do next: by its error code.
const GENERATION_ERRORS = {
  InsufficientCredits: ["There were not enough credits when it started.", "Ask your operator to add credits, then try again."],
  InvalidRequest: ["The request was not accepted.", "Check the photos and the text, then try again."],
  BadImage: ["One of the photos could not be used as an image.", "Use a clear JPEG, PNG or WebP photo and try again."],
  UrlRefused: ["One of the photos could not be fetched from its address.", "Upload the photo from your device instead."],
  DownloadFailed: ["One of the photos could not be fetched.", "Upload the photo from your device and try again."],
  ContentBlocked: ["The model declined this request under its content rules.", "Try a different photo or wording."],
  ProviderRejected: ["The model could not work with this request.", "Try a different photo or wording."],
  ProviderUnavailable: ["The image service was unavailable.", "Try again in a few minutes."],
  ProviderBusy: ["The image service stayed busy for too long.", "Try again in a few minutes."],
  NoModelAvailable: ["No model was available for this kind of picture.", "Try again later, or tell your operator."],
  DeadlineExceeded: ["It took longer than allowed and was stopped.", "Try again; it usually goes faster."],
  ExpiredBeforeStart: ["It waited too long in line and was not started.", "Try again when it is less busy."],
  Canceled: ["You canceled it.", "Start a new one whenever you like."],
  Internal: ["Something went wrong on our side.", "Try again; if it happens again, tell your operator."],
};

export function generationError(generation) {
  const code = generation.error && generation.error.code;
  if (generation.status === "canceled") return GENERATION_ERRORS.Canceled;
  return GENERATION_ERRORS[code] || ["It did not finish.", "Try again; if it happens again, tell your operator."];
}

// An API answer that was not a success, in words: [what happened, what to do next].
export function apiProblem(err) {
  const code = err.code;
  const status = err.status;
  if (status === 0) return ["The studio cannot reach the server.", "Check that it is running and your connection works, then try again."];
  if (status === 401) return ["Your key was not accepted.", "Sign in again with a valid API key."];
  if (status === 402 || code === "InsufficientCredits") {
    const need = err.detail && err.detail.needed;
    const have = err.detail && err.detail.balance;
    const parsed = /costs (\d+) credits?; your balance is (-?\d+)/.exec(err.message || "");
    const n = need ?? (parsed && Number(parsed[1]));
    const m = have ?? (parsed && Number(parsed[2]));
    if (n !== undefined && n !== null && m !== undefined && m !== null) {
      return [`This needs ${credits(n)}, you have ${m}.`, "Ask your operator to add credits, then try again."];
    }
    return ["You do not have enough credits for this.", "Ask your operator to add credits, then try again."];
  }
  if (status === 403) return ["This key may not do that.", "Sign in with the right key."];
  if (status === 404) return ["That could not be found.", "It may have been deleted. Go back and pick another."];
  if (status === 409 && code === "AlreadyClosed") return ["It had already finished.", "Nothing was changed."];
  if (status === 409) return ["That clashes with an earlier request.", "Reload the page and try again."];
  if (status === 413) return ["That file is too large.", "Choose a smaller photo."];
  if (status === 415) return ["That kind of file is not accepted.", "Use a JPEG, PNG or WebP photo."];
  if (status === 422 && code === "UnknownFile") return ["An uploaded photo is no longer available.", "Remove it and add it again."];
  if (status === 422 && code === "BadImage") return ["That photo could not be read as an image.", "Use a JPEG, PNG or WebP photo."];
  if (status === 422) return [`The request was not accepted: ${plain(err.message)}.`, "Fix it and try again."];
  if (status === 429) return ["Too many requests just now.", "Wait a few seconds and try again."];
  if (status === 503) return ["The service is starting or busy.", "Try again in a moment."];
  const incident = /incident ([0-9a-f]+)/.exec(err.message || "");
  return [
    "Something went wrong on the server.",
    incident ? `Try again; if it keeps happening, tell your operator incident ${incident[1]}.` : "Try again; if it keeps happening, tell your operator.",
  ];
}

function plain(message) {
  // Server messages are for people already, but never show more than a line of them.
  const text = String(message || "invalid request").replace(/\s+/g, " ").trim().replace(/\.$/, "");
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}
