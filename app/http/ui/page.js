// camserve page: talks to the public API only (/models, /models/{name}, /explain).
//
// The server is asked for each map as a grey heatmap PNG (output=heatmap, colormap=gray,
// image_format=png): one byte per pixel holds the map's level, and transparency marks where the
// map does not reach (outside the model's crop). The page colours the levels through the
// server's own colour tables (/ui/colormaps.json) and blends them with the image in a canvas,
// exactly as the server draws an overlay: alpha * image + (1 - alpha) * colour. Opacity and
// colour map therefore change the picture without a new request.
"use strict";

const KEY_STORAGE = "camserve-api-key";
const TOP_K = 5;

const $ = (id) => document.getElementById(id);
const state = {
  models: [],
  detail: null, // /models/{name} of the chosen model
  file: null,
  image: null, // the chosen image, decoded (HTMLImageElement)
  classIdx: null, // null: the top-1 of the answer
  colormaps: {},
  cards: [], // {canvas, levels, mask, width, height}
  busy: false,
};

// ------------------------------------------------------------------ requests

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error ? body.error : {};
    if (response.status === 401) askForKey(error.message);
    throw new ApiError(
      response.status,
      error.code || "http_error",
      error.message || `The server answered ${response.status} ${response.statusText}.`,
    );
  }
  return body;
}

// ------------------------------------------------------------------ messages

function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const code = error instanceof ApiError ? ` (${error.status} ${error.code})` : "";
  box.textContent = `${error.message}${code}`;
  box.hidden = false;
}

function setStatus(text) {
  $("status").textContent = text;
}

function askForKey(message) {
  const box = $("key-box");
  const wasHidden = box.hidden;
  box.hidden = false;
  if (wasHidden) $("api-key").focus();
  if (message) setStatus(message);
}

function saveKey() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  showError(null);
  loadModels();
}

// ------------------------------------------------------------------ models, methods, layers

async function loadModels() {
  try {
    const list = await api("models");
    state.models = list.models;
    const select = $("model");
    const previous = select.value || list.default_model;
    select.replaceChildren();
    for (const model of list.models) {
      const option = new Option(
        model.status === "ready" ? model.name : `${model.name} (${model.status})`,
        model.name,
      );
      option.disabled = model.status !== "ready";
      select.add(option);
    }
    const ready = list.models.filter((m) => m.status === "ready").map((m) => m.name);
    select.value = ready.includes(previous) ? previous : ready[0] || "";
    if (!ready.length) setStatus("No model is ready yet; reload the page in a moment.");
    await loadModel();
  } catch (error) {
    showError(error);
  }
}

function checkbox(container, name, value, checked, title) {
  const label = document.createElement("label");
  const input = document.createElement("input");
  input.type = "checkbox";
  input.name = name;
  input.value = value;
  input.checked = checked;
  label.append(input, ` ${value}`);
  if (title) label.title = title;
  container.append(label);
}

async function loadModel() {
  const name = $("model").value;
  $("methods").replaceChildren();
  $("layers").replaceChildren();
  state.detail = null;
  state.classIdx = null;
  updateClassChoice();
  if (!name) return;
  try {
    const detail = await api(`models/${encodeURIComponent(name)}`);
    state.detail = detail;
    for (const method of detail.methods) {
      checkbox($("methods"), "method", method, method === detail.default_method);
    }
    for (const layer of detail.candidate_layers) {
      checkbox($("layers"), "target_layer", layer, detail.target_layers.includes(layer));
    }
    setStatus(`${detail.name}: ${detail.description || detail.architecture}, ` +
      `${detail.num_classes} classes, on ${detail.device}.`);
  } catch (error) {
    showError(error);
  }
}

function checked(containerId) {
  return [...$(containerId).querySelectorAll("input:checked")].map((input) => input.value);
}

// ------------------------------------------------------------------ the image

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.classIdx = null;
  updateClassChoice();
  const url = URL.createObjectURL(file);
  const preview = $("preview");
  preview.hidden = false;
  preview.alt = `preview of ${file.name}`;
  preview.src = url;
  const image = new Image();
  image.onload = () => {
    state.image = image;
  };
  // Not an image the browser can show: the server says why once asked to explain it.
  image.onerror = () => {
    state.image = null;
    preview.hidden = true;
  };
  image.src = url;
}

function updateClassChoice() {
  const labels = state.detail ? state.detail.labels : [];
  $("class-choice").textContent = state.classIdx === null
    ? "top-1 of the answer"
    : `${labels[state.classIdx] ?? state.classIdx} (class ${state.classIdx})`;
  $("class-reset").hidden = state.classIdx === null;
}

// ------------------------------------------------------------------ explain

async function explain(event) {
  if (event) event.preventDefault();
  if (state.busy) return;
  showError(null);
  if (!state.file) {
    showError(new Error("Choose an image first."));
    $("file").focus();
    return;
  }
  const methods = checked("methods");
  if (!methods.length) {
    showError(new Error("Choose at least one method."));
    return;
  }
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("model", $("model").value);
  form.append("method", methods.join(","));
  for (const layer of checked("layers")) form.append("target_layer", layer);
  if (state.classIdx !== null) form.append("class_idx", String(state.classIdx));
  form.append("top_k", String(TOP_K));
  form.append("output", "heatmap");
  form.append("colormap", "gray");
  form.append("image_format", "png");

  state.busy = true;
  $("explain").disabled = true;
  setStatus(`Explaining ${state.file.name} with ${methods.join(", ")}…`);
  try {
    const answer = await api("explain", { method: "POST", body: form });
    await showAnswer(answer);
  } catch (error) {
    setStatus("");
    showError(error);
  } finally {
    state.busy = false;
    $("explain").disabled = false;
  }
}

function decodePng(base64) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("The server sent a picture this browser cannot read."));
    image.src = `data:image/png;base64,${base64}`;
  });
}

function pixels(source, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(source, 0, 0, width, height);
  return context.getImageData(0, 0, width, height).data;
}

async function showAnswer(answer) {
  const result = answer.results[0];
  state.cards = [];
  const results = $("results");
  results.replaceChildren();
  const base = state.image;
  for (const explanation of result.explanations) {
    const method = explanation.method || answer.method;
    const camMs = (answer.timings.cam_ms_by_method || {})[method] ?? answer.timings.cam_ms;
    for (const map of explanation.maps) {
      const heat = await decodePng(map.heatmap);
      const { width, height } = map;
      const grey = pixels(heat, width, height);
      const levels = new Uint8ClampedArray(width * height);
      const mask = new Uint8Array(width * height);
      for (let i = 0; i < levels.length; i++) {
        levels[i] = grey[4 * i];
        mask[i] = grey[4 * i + 3] > 0 ? 1 : 0;
      }
      // Without a decodable image (a format this browser cannot show) the map is drawn alone.
      const image = base ? pixels(base, width, height) : null;
      const card = makeCard(answer, explanation, method, map, camMs);
      results.append(card.figure);
      state.cards.push({ ...card, levels, mask, image, width, height });
    }
  }
  renderAll();
  showPredictions(result);
  $("view").hidden = false;
  const t = answer.timings;
  setStatus(`${result.filename}: ${result.predictions[0].label} ` +
    `(${(100 * result.predictions[0].probability).toFixed(1)} %), ` +
    `${answer.model} on ${answer.device}, ${t.total_ms.toFixed(1)} ms in all.`);
}

function makeCard(answer, explanation, method, map, camMs) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.method = method;
  figure.dataset.layer = map.layer;
  const canvas = document.createElement("canvas");
  canvas.width = map.width;
  canvas.height = map.height;
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label",
    `${method} map of ${explanation.label} at ${map.layer} over the image`);
  const caption = document.createElement("figcaption");
  const title = document.createElement("strong");
  title.textContent = `${method} · ${map.layer}`;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = explanation.label;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = ` · ${camMs.toFixed(1)} ms`;
  caption.append(title, document.createElement("br"), "class ", label,
    ` (${(100 * explanation.probability).toFixed(1)} %)`, time);
  const download = document.createElement("button");
  download.type = "button";
  download.className = "link";
  download.textContent = "Download PNG";
  download.setAttribute("aria-label", `Download the ${method} ${map.layer} picture as PNG`);
  const stem = (answer.results[0].filename || "image").replace(/\.[^.]*$/, "");
  download.addEventListener("click", () => downloadCanvas(canvas,
    `${stem}-${method}-${map.layer}-${explanation.label}.png`));
  figure.append(canvas, caption, download);
  return { figure, canvas };
}

function renderAll() {
  const alpha = Number($("opacity").value);
  $("opacity-value").textContent = alpha.toFixed(2);
  const lut = state.colormaps[$("colormap").value] || state.colormaps.jet;
  if (!lut) return;
  for (const card of state.cards) {
    const context = card.canvas.getContext("2d");
    const out = context.createImageData(card.width, card.height);
    const o = out.data;
    for (let i = 0, p = 0; i < card.levels.length; i++, p += 4) {
      const c = 3 * card.levels[i];
      if (card.image) {
        const a = card.mask[i] ? alpha : 1;
        // Math.round as the server's rint, up to ties (x.5 only at alpha 0.5 with odd sums).
        o[p] = Math.round(a * card.image[p] + (1 - a) * lut[c]);
        o[p + 1] = Math.round(a * card.image[p + 1] + (1 - a) * lut[c + 1]);
        o[p + 2] = Math.round(a * card.image[p + 2] + (1 - a) * lut[c + 2]);
      } else {
        o[p] = lut[c];
        o[p + 1] = lut[c + 1];
        o[p + 2] = lut[c + 2];
      }
      o[p + 3] = 255;
    }
    context.putImageData(out, 0, 0);
  }
}

function downloadCanvas(canvas, name) {
  canvas.toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name.replace(/[^\w.-]+/g, "_");
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }, "image/png");
}

function showPredictions(result) {
  const list = $("topk");
  list.replaceChildren();
  const explained = new Set(result.explanations.map((e) => e.class_idx));
  for (const prediction of result.predictions) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.classIdx = prediction.class_idx;
    button.setAttribute("aria-pressed", String(explained.has(prediction.class_idx)));
    button.textContent =
      `${prediction.label} ${(100 * prediction.probability).toFixed(1)} %`;
    button.addEventListener("click", () => {
      state.classIdx = prediction.class_idx;
      updateClassChoice();
      explain();
    });
    item.append(button);
    list.append(item);
  }
  $("predictions").hidden = false;
}

// ------------------------------------------------------------------ start

async function loadColormaps() {
  try {
    state.colormaps = await api("ui/colormaps.json");
  } catch (error) {
    showError(error);
    return;
  }
  const select = $("colormap");
  for (const name of Object.keys(state.colormaps)) select.add(new Option(name, name));
  select.value = "jet" in state.colormaps ? "jet" : select.options[0].value;
}

function wireDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) chooseFile(file);
  });
}

function start() {
  $("api-key").value = apiKey();
  $("key-save").addEventListener("click", saveKey);
  $("api-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      saveKey();
    }
  });
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  $("model").addEventListener("change", loadModel);
  $("controls").addEventListener("submit", explain);
  $("class-reset").addEventListener("click", () => {
    state.classIdx = null;
    updateClassChoice();
    explain();
  });
  $("opacity").addEventListener("input", renderAll);
  $("colormap").addEventListener("change", renderAll);
  wireDrop();
  loadColormaps();
  loadModels();
}

start();
