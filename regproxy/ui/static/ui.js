// regproxy web page: a little progressive enhancement. Every page works without this file.
"use strict";

function human(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? n + " B" : n.toFixed(1) + " " + units[i];
}

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function repoUrl(image) {
  let name = image.split("@")[0];
  const last = name.lastIndexOf("/");
  const colon = name.lastIndexOf(":");
  if (colon > last) name = name.slice(0, colon);
  return "/ui/repositories/" + name.split("/").map(encodeURIComponent).join("/");
}

function showSummary(box, s) {
  box.replaceChildren();
  const card = el("section", null, { class: "card", id: "summary" });
  card.append(el("h2", s.nothing_new ? "Nothing new" : "Imported"));
  const dl = el("dl");
  const rows = [
    ["Images", String(s.images.length)],
    ["New manifests", String(s.manifests_new)],
    ["New blobs", s.blobs_new + " (" + human(s.bytes_new) + ")"],
    ["Already present", String(s.blobs_present)],
    ["Read", human(s.bytes_read) + " in " + s.seconds + " s"],
  ];
  for (const [k, v] of rows) { dl.append(el("dt", k), el("dd", v)); }
  card.append(dl);
  const ul = el("ul", null, { class: "images" });
  for (const image of s.images) {
    const li = el("li");
    li.append(el("a", image, { href: repoUrl(image) }));
    ul.append(li);
  }
  card.append(ul);
  box.append(card);
}

function showError(box, msg) {
  box.replaceChildren(el("div", msg, { class: "banner err", id: "upload-error", role: "alert" }));
}

function setupUpload() {
  const form = document.getElementById("upload-form");
  if (!form || !window.FormData || !window.XMLHttpRequest) return;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const box = document.getElementById("upload-result");
    const wrap = document.getElementById("progress");
    const bar = document.getElementById("progress-bar");
    const text = document.getElementById("progress-text");
    const button = document.getElementById("upload");
    const old = document.getElementById("upload-error");
    if (old) old.remove();
    const data = new FormData(form);  // csrf and name come before the file, in form order
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", data.get("csrf"));
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      const pct = Math.round((e.loaded / e.total) * 100);
      bar.value = pct;
      text.textContent = human(e.loaded) + " of " + human(e.total) + " (" + pct + " %)";
    });
    xhr.upload.addEventListener("load", () => { text.textContent = "Uploaded; importing…"; });
    xhr.addEventListener("load", () => {
      button.disabled = false;
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
      if (xhr.status === 200 && body) {
        bar.value = 100;
        text.textContent = "Done.";
        showSummary(box, body);
      } else {
        bar.value = 0;
        wrap.hidden = true;
        text.textContent = "";
        showError(box, (body && body.error) || ("Upload failed: HTTP " + xhr.status));
      }
    });
    xhr.addEventListener("error", () => {
      button.disabled = false;
      bar.value = 0;
      wrap.hidden = true;
      showError(box, "Upload failed: the connection was lost.");
    });
    wrap.hidden = false;
    bar.value = 0;
    text.textContent = "Starting…";
    button.disabled = true;
    xhr.send(data);
  });
}

// Asked here in a dialog, so the server's confirmation page is skipped (confirm=1); without
// this script the first click shows that page instead.
function setupConfirm() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (ev) => {
      if (!window.confirm(form.dataset.confirm)) { ev.preventDefault(); return; }
      if (!form.querySelector("input[name=confirm]")) {
        form.append(el("input", null, { type: "hidden", name: "confirm", value: "1" }));
      }
    });
  }
}

// Copy buttons (hidden without this script: the commands stay selectable text).
function setupCopy() {
  if (!navigator.clipboard && !document.queryCommandSupported) return;
  for (const button of document.querySelectorAll("button.copy[data-copy]")) {
    button.hidden = false;
    button.addEventListener("click", async () => {
      const text = button.dataset.copy;
      let ok = false;
      try {
        await navigator.clipboard.writeText(text);
        ok = true;
      } catch (e) {
        const area = el("textarea", null, { readonly: "", "aria-hidden": "true" });
        area.value = text;
        document.body.append(area);
        area.select();
        try { ok = document.execCommand("copy"); } catch (e2) { ok = false; }
        area.remove();
      }
      const old = button.textContent;
      button.textContent = ok ? "Copied" : "Select and copy";
      setTimeout(() => { button.textContent = old; }, 1500);
    });
  }
}

// Absolute times in the browser's own time zone (the server writes UTC).
function setupTimes() {
  const fmt = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    second: "2-digit", timeZoneName: "short",
  });
  for (const span of document.querySelectorAll(".abs[data-t]")) {
    const d = new Date(span.dataset.t);
    if (isNaN(d)) continue;
    const prefix = span.textContent.startsWith("since ") ? "since " : "";
    span.textContent = prefix + fmt.format(d);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupUpload(); setupConfirm(); setupCopy(); setupTimes();
});
