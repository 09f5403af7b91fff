// The model page: the loaded versions and their cards, and an image classified
// in the browser through the same /v2 REST endpoint any caller uses.
"use strict";

const TOKEN_KEY = "tlserve_token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";

function $(id) { return document.getElementById(id); }

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function pct(value) {
  return value === null || value === undefined ? "n/a" : (100 * value).toFixed(1) + "%";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function askForToken() {
  $("status").textContent = "this server needs a bearer token";
  $("token-form").hidden = false;
}

function modelPath(model) {
  return "/v2/models/" + encodeURIComponent(model.name) +
    "/versions/" + encodeURIComponent(model.version);
}

function renderCard(model) {
  const card = el("div", null, "card");
  card.dataset.model = model.name;
  card.appendChild(el("h3", model.name + " \u00b7 version " + model.version));
  const facts = el("dl");
  const rows = [
    ["backbone", model.backbone || "n/a"],
    ["strategy", model.strategy || "n/a"],
    ["held-out accuracy", pct(model.accuracy)],
    ["variant served", model.variant],
    ["runs on", model.provider],
    ["OOD threshold", model.ood_threshold === null ? "none (no OOD score)" : model.ood_threshold.toFixed(3)],
  ];
  for (const [key, value] of rows) {
    facts.appendChild(el("dt", key));
    facts.appendChild(el("dd", value));
  }
  card.appendChild(facts);
  const chips = el("div", null, "chips");
  for (const label of model.labels) chips.appendChild(el("span", label));
  card.appendChild(chips);
  if (model.report) {
    const link = el("a", "training report");
    link.href = "/ui/models/" + encodeURIComponent(model.name) + "/versions/" +
      encodeURIComponent(model.version) + "/report";
    card.appendChild(link);
  }
  return card;
}

async function loadModels() {
  const response = await fetch("/ui/models", { headers: authHeaders() });
  if (response.status === 401) { askForToken(); return; }
  const doc = await response.json();
  if (!response.ok) { $("status").textContent = doc.error || response.statusText; return; }
  $("token-form").hidden = true;
  $("status").textContent = (doc.ready ? "ready" : "not ready") + " \u00b7 " +
    doc.models.length + " model version" + (doc.models.length === 1 ? "" : "s");
  const list = $("models");
  list.replaceChildren(...doc.models.map(renderCard));
  const select = $("model");
  const usable = doc.models.filter((m) => m.classifies);
  select.replaceChildren(...usable.map((m) => {
    const option = el("option", m.name + " (version " + m.version + ")");
    option.value = JSON.stringify({ name: m.name, version: m.version });
    return option;
  }));
  $("try").hidden = usable.length === 0;
}

async function classify(file) {
  showError("");
  if (!file) return;
  const model = JSON.parse($("model").value);
  const topK = Math.max(1, parseInt($("top-k").value, 10) || 5);
  const type = file.type === "image/png" || file.type === "image/jpeg" ? file.type : "application/octet-stream";
  document.body.dataset.state = "classifying";
  try {
    const response = await fetch(modelPath(model) + "/classify?top_k=" + topK, {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": type },
      body: file,
    });
    const doc = await response.json();
    if (response.status === 401) { askForToken(); }
    if (!response.ok) { showError(response.status + ": " + (doc.error || response.statusText)); return; }
    showAnswer(file, doc.results[0]);
  } catch (err) {
    showError("the request failed: " + err);
  } finally {
    document.body.dataset.state = "done";
  }
}

function showAnswer(file, result) {
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  $("top-label").textContent = result.labels.length ? result.labels[0].label : "";
  const flag = $("ood-flag");
  if (result.ood_score === null || result.ood_score === undefined) {
    flag.textContent = "n/a";
    flag.className = "";
    $("ood-score").textContent = "(this model has no OOD score)";
  } else {
    flag.textContent = result.out_of_distribution ? "yes" : "no";
    flag.className = result.out_of_distribution ? "flag-out" : "flag-in";
    $("ood-score").textContent = "(score " + result.ood_score.toFixed(3) + ")";
  }
  const body = $("scores").tBodies[0];
  body.replaceChildren(...result.labels.map((p, i) => {
    const row = el("tr");
    row.appendChild(el("td", i + 1, "num"));
    row.appendChild(el("td", p.label));
    row.appendChild(el("td", p.score.toFixed(4), "num"));
    return row;
  }));
  $("answer").hidden = false;
}

function setUp() {
  const drop = $("drop");
  const input = $("file");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => classify(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classify(e.dataTransfer.files[0]);
  });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    // Reports and figures are plain links: they carry the token as a cookie.
    document.cookie = TOKEN_KEY + "=" + encodeURIComponent(token) + "; path=/; SameSite=Strict";
    loadModels();
  });
  loadModels().catch((err) => { $("status").textContent = "cannot load models: " + err; });
}

document.addEventListener("DOMContentLoaded", setUp);
