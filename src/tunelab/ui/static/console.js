// Behaviour every console page shares: upload progress, the flash area, copy buttons.
// htmx (vendored, a classic script) does the requests; this module only listens to its events.

// Upload progress: htmx 2 sends with XMLHttpRequest and reports its upload events.
document.addEventListener("htmx:xhr:progress", (event) => {
  const form = event.target.closest("form[data-upload]");
  if (!form || !event.detail.lengthComputable) return;
  const bar = form.querySelector("progress");
  const label = form.querySelector("[data-upload-status]");
  const percent = Math.round((100 * event.detail.loaded) / event.detail.total);
  bar.value = percent;
  label.textContent = percent < 100 ? `Uploading… ${percent}%` : "Validating the file on the server…";
});

document.addEventListener("htmx:beforeRequest", (event) => {
  const form = event.target.closest && event.target.closest("form[data-upload]");
  if (form) {
    form.querySelector("progress").hidden = false;
    form.querySelector("[data-upload-status]").textContent = "Uploading… 0%";
  }
  // A person's new action clears the previous error; a background refresh (polling) does not.
  const cause = event.detail.requestConfig?.triggeringEvent?.type;
  if (["click", "submit", "change", "input", "keyup"].includes(cause)) document.getElementById("flash")?.replaceChildren();
});

document.addEventListener("htmx:afterRequest", (event) => {
  const form = event.target.closest && event.target.closest("form[data-upload]");
  if (form) {
    form.querySelector("[data-upload-status]").textContent = event.detail.successful ? "" : "Upload failed.";
    form.querySelector("progress").hidden = true;
    if (event.detail.successful) form.reset();
  }
});

// Error answers from console routes name where they go (the flash area); anything else is a
// server failure, reported there instead of being swapped into the page.
document.addEventListener("htmx:beforeSwap", (event) => {
  const xhr = event.detail.xhr;
  if (xhr.status >= 400 && !xhr.getResponseHeader("hx-retarget")) {
    event.detail.shouldSwap = false;
    flash("error", `The server could not do that (HTTP ${xhr.status}). See the server log.`);
  }
});

// A request that never got an answer (server down, network): say so instead of doing nothing.
document.addEventListener("htmx:sendError", () => flash("error", "The server did not answer. Is it running?"));

export function flash(kind, message) {
  const box = document.getElementById("flash");
  if (!box) return;
  const div = document.createElement("div");
  div.className = `flash ${kind}`;
  div.textContent = message;
  box.replaceChildren(div);
}

// <button data-copy="#id">: copy that element's text.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  await navigator.clipboard?.writeText(source.textContent);
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
});

// The session's CSRF token, for requests the page scripts send themselves.
export function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]')?.content ?? "";
}
