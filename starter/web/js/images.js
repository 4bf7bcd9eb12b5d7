// Showing the API's images. A signed link (it carries a query string) loads as it is, in an
// <img> or a download link; a plain /v1/files/ link needs the key, so it is fetched with the
// Authorization header into an object URL. A signed link that fails (expired) falls back the same way.

import { session } from "./api.js";

const objectUrls = new Set();

export function releaseImages() {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls.clear();
}

function signed(url) {
  try {
    return new URL(url, location.href).search.length > 1;
  } catch {
    return false;
  }
}

function loaded(img) {
  return new Promise((resolve) => {
    if (img.complete && img.naturalWidth > 0) { resolve(true); return; }
    img.addEventListener("load", () => resolve(true), { once: true });
    img.addEventListener("error", () => resolve(false), { once: true });
  });
}

async function fetched(url) {
  const path = new URL(url, location.href);
  // Bearer access to /v1/files/{key} is always there: with the key, no signature is needed.
  const target = path.origin === location.origin ? path.pathname.replace(/^\/v1\/images\//, "/v1/files/") : url;
  const response = await fetch(target, {
    headers: { Authorization: `Bearer ${session.key}` }, cache: "default", credentials: "omit",
  });
  if (!response.ok) throw new Error(`image answered ${response.status}`);
  const objectUrl = URL.createObjectURL(await response.blob());
  objectUrls.add(objectUrl);
  return objectUrl;
}

function thumbnail(url, width) {
  const u = new URL(url, location.href);
  u.searchParams.set("w", String(width));
  return u.href;
}

// Fills `img` (and `link`, a download anchor) from the API's image link.
export async function showImage(img, url, { link = null, width = null } = {}) {
  img.dataset.apiUrl = url;
  if (signed(url)) {
    img.src = width ? thumbnail(url, width) : url;
    img.dataset.source = "link";
    if (link) link.href = url;
    if (await loaded(img)) return true;
    if (width) {
      img.src = url;
      if (await loaded(img)) return true;
    }
  }
  try {
    const objectUrl = await fetched(url);
    img.src = objectUrl;
    img.dataset.source = "fetched";
    if (link) link.href = objectUrl;
    return await loaded(img);
  } catch {
    img.dataset.source = "failed";
    img.classList.add("broken");
    return false;
  }
}
