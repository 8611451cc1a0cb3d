// camserve page: talks to the public API only (/models, /models/{name}, /explain, /jobs).
//
// The server is asked for each map as a grey heatmap PNG (output=heatmap, colormap=gray,
// image_format=png): one byte per pixel holds the map's level, and transparency marks where the
// map does not reach (outside the model's crop). The page colours the levels through the
// server's own colour tables (/ui/colormaps.json) and blends them with the image in a canvas,
// exactly as the server draws an overlay: alpha * image + (1 - alpha) * colour. Opacity and
// colour map therefore change the picture without a new request.
//
// Which methods are slow is the server's word (/models/{name} method_info): fast ones go to
// /explain in one request, each slow one runs as a job (/jobs) whose progress events drive the
// progress bar, and whose maps are shown as soon as it ends (with the Faithfulness box ticked,
// the fast ones run as one job too: the scores are many forwards). One press of Explain is a
// "run"; a new file, a new model or a new run makes the answers of the old one count for nothing.
"use strict";

const KEY_STORAGE = "camserve-api-key";
const TOP_K = 5;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);
const state = {
  models: [],
  detail: null, // /models/{name} of the chosen model
  file: null,
  image: null, // the chosen image, decoded (HTMLImageElement)
  classIdx: null, // null: the top-1 of the answer
  colormaps: {},
  cards: [], // {canvas, levels, mask, width, height}
  concepts: [], // the concept cards of a method that finds concepts, drawn like the maps but not counted as maps
  busy: false,
  run: 0, // the current run; answers of older ones are dropped
  abort: null, // AbortController of the current run's requests
  job: null, // the job now running: {id, label, cancelled}
  predictionsRun: 0, // the run whose classes the top-k buttons show
};

// ------------------------------------------------------------------ requests

class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

class Unreachable extends Error {
  constructor() {
    super("The server could not be reached: is it still running? Your choices are kept; " +
      "press Explain to try again.");
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function withKey(headers = {}) {
  const all = new Headers(headers);
  const key = apiKey();
  if (key) all.set("X-API-Key", key);
  return all;
}

async function send(path, options = {}) {
  try {
    return await fetch(path, { ...options, headers: withKey(options.headers) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Unreachable();
  }
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && body.error ? body.error : {};
  if (response.status === 401) askForKey();
  return new ApiError(
    response.status,
    error.code || "http_error",
    error.message || `The server answered ${response.status} ${response.statusText}.`,
    error.details || null,
  );
}

async function api(path, options = {}) {
  const response = await send(path, options);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// ------------------------------------------------------------------ messages

// The server's messages say what to change, but a few speak to an API client (headers,
// settings, other routes): those get words for a person at this page.
function forPerson(error) {
  if (!(error instanceof ApiError)) return error.message;
  const details = error.details || {};
  switch (error.code) {
    case "unauthorized":
      return apiKey()
        ? "The server refused this API key: check it in the API key field above."
        : "This server asks for an API key: enter it in the API key field above.";
    case "job_not_found":
      // Its stream broke and the server no longer knows the job: it restarted, or the job's
      // store was emptied.
      return "The server no longer has this job: it may have restarted. Your choices are " +
        "kept; press Explain to run it again.";
    case "timeout":
      return "The server stopped this explanation at its time limit for one request. " +
        "Choose fewer methods or target layers and try again.";
    case "over_budget":
      return `That would run ${details.forwards ?? "too many"} forwards of the model` +
        `${details.limit ? `, more than the ${details.limit} this server allows` : ""}. ` +
        "Choose fewer target layers, or fewer slow methods at once.";
    default:
      return error.message;
  }
}

function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const code = error instanceof ApiError
    ? ` (${[error.status, error.code].filter(Boolean).join(" ")})`
    : "";
  box.textContent = `${forPerson(error)}${code}`;
  box.hidden = false;
}

function setStatus(text) {
  $("status").textContent = text;
}

function askForKey() {
  const box = $("key-box");
  const wasHidden = box.hidden;
  box.hidden = false;
  if (wasHidden) $("api-key").focus();
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

function info(method) {
  const known = state.detail && state.detail.method_info ? state.detail.method_info[method] : null;
  return known || { summary: "", forwards: 0, slow: false };
}

// The summary starts with the method's written name, then its paper: "Name (Authors, venue)."
function methodLabel(method) {
  const head = info(method).summary.split(/ \(|[,:]/)[0].trim();
  return head || method;
}

// A form checkbox: the methods' and the layers' choices are made alike.
function checkbox(name, value, checked) {
  const input = document.createElement("input");
  input.type = "checkbox";
  input.name = name;
  input.value = value;
  input.checked = checked;
  return input;
}

function methodChoice(method, checked) {
  const { summary, forwards, slow } = info(method);
  const item = document.createElement("div");
  item.className = "method";
  const label = document.createElement("label");
  const input = checkbox("method", method, checked);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = methodLabel(method);
  const cost = document.createElement("span");
  cost.className = `cost ${slow ? "slow" : "fast"}`;
  cost.textContent = slow ? "slow" : "fast";
  label.append(input, " ", name, " ", cost);
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.id = `hint-${method}`;
  hint.textContent = slow ? `${summary} About ${forwards} extra forwards per image.` : summary;
  input.setAttribute("aria-describedby", hint.id);
  item.append(label, hint);
  return item;
}

// The methods' switches (boolean options: eigen_smooth, aug_smooth), each once, as the server
// declares them; a switch goes with a request only to the methods that take it.
function switches(detail) {
  const found = new Map();
  for (const options of Object.values(detail.method_options || {})) {
    for (const option of options) {
      if (option.type === "boolean" && !found.has(option.name)) found.set(option.name, option);
    }
  }
  return [...found.values()];
}

function switchChoice(option) {
  const item = document.createElement("div");
  item.className = "method";
  const label = document.createElement("label");
  const input = checkbox("switch", option.name, false);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = option.name;
  label.append(input, " ", name);
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.id = `hint-switch-${option.name}`;
  hint.textContent = option.help;
  input.setAttribute("aria-describedby", hint.id);
  item.append(label, hint);
  return item;
}

function takes(method, name) {
  const options = (state.detail && state.detail.method_options[method]) || [];
  return options.some((option) => option.name === name);
}

function layerChoice(layer, checked, shape) {
  const label = document.createElement("label");
  const input = checkbox("target_layer", layer, checked);
  label.append(input, ` ${layer}`);
  if (shape && shape.length >= 2) {
    const hint = document.createElement("span");
    hint.className = "hint";
    hint.textContent = `${shape[0]} channels, ${shape.slice(1).join("×")}`;
    label.append(" ", hint);
  }
  return label;
}

function describeModel(detail) {
  const about = (detail.description || detail.architecture || "").trim().replace(/[.\s]+$/, "");
  return `Model ${detail.name}, ${detail.num_classes} classes, on ${detail.device}` +
    `${about ? `: ${about}` : ""}.`;
}

async function loadModel() {
  stopRun();
  const name = $("model").value;
  $("methods").replaceChildren();
  $("layers").replaceChildren();
  $("switches").replaceChildren();
  state.detail = null;
  state.classIdx = null;
  clearResults();
  if (!name) return;
  try {
    const detail = await api(`models/${encodeURIComponent(name)}`);
    state.detail = detail;
    for (const method of detail.methods) {
      $("methods").append(methodChoice(method, method === detail.default_method));
    }
    for (const option of switches(detail)) $("switches").append(switchChoice(option));
    const shapes = detail.layer_shapes || {};
    for (const layer of detail.candidate_layers) {
      $("layers").append(layerChoice(layer, detail.target_layers.includes(layer), shapes[layer]));
    }
    setStatus(describeModel(detail));
    taskModelChosen();
  } catch (error) {
    showError(error);
  }
}

function checked(containerId) {
  return [...$(containerId).querySelectorAll("input:checked")].map((input) => input.value);
}

function checkAll(containerId, on) {
  for (const input of $(containerId).querySelectorAll("input[type=checkbox]")) input.checked = on;
}

// ------------------------------------------------------------------ the image

function sizeText(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function chooseFile(file) {
  if (!file) return;
  stopRun();
  state.file = file;
  state.image = null;
  state.classIdx = null;
  clearResults();
  showError(null);
  $("file-name").textContent = `Chosen: ${file.name} (${sizeText(file.size)}).`;
  const url = URL.createObjectURL(file);
  const preview = $("preview");
  preview.hidden = false;
  preview.alt = `preview of ${file.name}`;
  preview.src = url;
  const image = new Image();
  image.onload = () => {
    if (state.file === file) state.image = image;
  };
  // Not an image the browser can show: the server says why once asked to explain it.
  image.onerror = () => {
    if (state.file === file) preview.hidden = true;
  };
  image.src = url;
  taskImageChosen();
}

function updateClassChoice() {
  const labels = state.detail ? state.detail.labels : [];
  const task = taskChoice(); // a detector's box or a segmenter's class (tasks.js)
  $("class-choice").textContent = task ? task.text : state.classIdx === null
    ? "top-1 of the answer"
    : `${labels[state.classIdx] ?? state.classIdx} (class ${state.classIdx})`;
  $("class-reset").hidden = task ? !task.picked : state.classIdx === null;
}

// Whatever the page shows of an earlier answer goes: maps, classes, the chosen class.
function clearResults() {
  state.cards = [];
  state.concepts = [];
  $("results").replaceChildren();
  $("view").hidden = true;
  $("topk").replaceChildren();
  $("predictions").hidden = true;
  state.predictionsRun = 0;
  state.classIdx = null;
  clearTaskView();
  updateClassChoice();
}

// ------------------------------------------------------------------ explain

function explainForm(methods) {
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("model", $("model").value);
  form.append("method", methods.join(","));
  for (const layer of checked("layers")) form.append("target_layer", layer);
  if (state.classIdx !== null) form.append("class_idx", String(state.classIdx));
  for (const name of checked("switches")) {
    if (methods.some((method) => takes(method, name))) form.append(name, "true");
  }
  form.append("top_k", String(TOP_K));
  form.append("output", "heatmap");
  form.append("colormap", "gray");
  form.append("image_format", "png");
  if ($("faithfulness").checked) form.append("faithfulness", "deletion,insertion,confidence");
  taskFields(form);
  return form;
}

function labels(methods) {
  return methods.map(methodLabel).join(", ");
}

// Ends the run in flight: its answers are dropped and its job (if any) is cancelled.
function stopRun() {
  if (!state.busy) return;
  state.run += 1;
  if (state.abort) state.abort.abort();
  cancelJob();
  finishRun();
}

function finishRun() {
  const focusInJob = $("job").contains(document.activeElement);
  state.busy = false;
  state.abort = null;
  state.job = null;
  $("explain").disabled = false;
  $("job").hidden = true;
  if (focusInJob) $("explain").focus(); // the panel goes: the keyboard keeps a place
}

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
  const slow = methods.filter((m) => info(m).slow);
  const fast = methods.filter((m) => !info(m).slow);
  // Each slow method is a job of its own. Faithfulness scores add 2 x 17 + 2 forwards of the
  // model per map, slow by the server's own rule (slow_forwards): with them the fast methods run as
  // one job too, sharing their forward, with its progress (a detector's scores take a minute on
  // a CPU, past a request's deadline).
  const scored = $("faithfulness").checked;
  const jobs = [...(scored && fast.length ? [fast] : []), ...slow.map((m) => [m])];
  const direct = scored ? [] : fast;
  const run = ++state.run;
  const started = performance.now();
  state.busy = true;
  state.abort = new AbortController();
  const signal = state.abort.signal;
  $("explain").disabled = true;
  // Old maps go at once; the classes stay, dimmed, until this run answers (a class button
  // that started this run keeps its place for the keyboard).
  state.cards = [];
  state.concepts = [];
  $("results").replaceChildren();
  $("view").hidden = true;
  $("predictions").classList.add("stale");
  // On a phone the answer comes below the whole form: bring it into view.
  if (window.matchMedia("(max-width: 700px)").matches) $("output").scrollIntoView();
  let last = null;
  try {
    if (direct.length) {
      setStatus(`Explaining ${state.file.name} with ${labels(direct)}…`);
      const answer = await api("explain", { method: "POST", body: explainForm(direct), signal });
      if (run !== state.run) return;
      await showAnswer(answer, run);
      last = answer;
    }
    for (const [index, group] of jobs.entries()) {
      const view = await runJob(group, index, jobs.length, run, signal);
      if (run !== state.run) return;
      if (view.status === "cancelled") {
        const p = view.progress;
        const rest = jobs.slice(index + 1).flat();
        setStatus(`Cancelled ${labels(group)}` +
          `${p.total ? ` after ${p.done} of ${p.total} forwards` : ""}.` +
          `${rest.length ? ` Not run: ${labels(rest)}.` : ""}` +
          `${state.cards.length ? " The maps shown are from the methods that finished." : ""}`);
        return;
      }
      await showAnswer(view.result, run);
      last = view.result;
    }
    const result = last.results[0];
    const top = result.predictions[0] || result.explanations[0]; // a task model's: its target
    setStatus(`${result.filename}: ${top.label} (${(100 * top.probability).toFixed(1)} %), ` +
      `${last.model} on ${last.device}; ${state.cards.length} map(s) in ` +
      `${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (error) {
    if (run !== state.run || error.name === "AbortError") return;
    // Nothing of an earlier answer may stay beside the error: classes included.
    if (state.predictionsRun !== run) {
      $("topk").replaceChildren();
      $("predictions").hidden = true;
      state.classIdx = null;
      updateClassChoice();
    }
    setStatus(state.cards.length ? "The maps shown are from the methods that finished." : "");
    showError(error);
  } finally {
    if (run === state.run) finishRun();
  }
}

// ------------------------------------------------------------------ jobs

// One job for `methods` (one slow method, or the fast ones with their faithfulness scores).
async function runJob(methods, index, count, run, signal) {
  const label = `${labels(methods)}${count > 1 ? ` (${index + 1} of ${count})` : ""}`;
  setStatus(`Explaining ${state.file.name} with ${labels(methods)}, as a job…`);
  showJob(label, null);
  // Until there is a job to cancel. aria-disabled, not disabled: that would drop the focus.
  $("cancel").setAttribute("aria-disabled", "true");
  const created = await api("jobs", { method: "POST", body: explainForm(methods), signal });
  if (run !== state.run) return { status: "cancelled", progress: { done: 0, total: 0 } };
  state.job = { id: created.id, label, cancelled: false };
  $("cancel").removeAttribute("aria-disabled");
  const view = await followJob(state.job, signal);
  const job = state.job;
  state.job = null;
  if (view.status === "succeeded") return view;
  if (view.status === "cancelled" && job && job.cancelled) return view;
  const error = view.error || {};
  // A job's error carries its code but no HTTP status: the job's own request succeeded.
  throw new ApiError(
    null,
    error.code || `job_${view.status}`,
    error.message || `The job ${view.status}.`,
    error.details || null,
  );
}

// Follows /jobs/{id}/events (fetch, not EventSource, so the API key goes in a header) until the
// final event; a stream that ends early is resumed after the last event seen.
async function followJob(job, signal) {
  let lastId = null;
  const path = `jobs/${encodeURIComponent(job.id)}`;
  for (;;) {
    const headers = lastId ? { "Last-Event-ID": lastId } : {};
    const response = await send(`${path}/events`, { headers, signal, cache: "no-store" });
    if (!response.ok) throw await failure(response);
    const final = await readEvents(response.body, (name, data, id) => {
      if (id) lastId = id;
      const view = JSON.parse(data);
      if (FINAL.has(name)) return view;
      if (name === "progress") showJob(job.label, view);
      return null;
    });
    if (final) return final;
    const view = await api(path, { signal });
    if (FINAL.has(view.status)) return view;
    showJob(job.label, view);
  }
}

// The final event's answer, or null when the stream ends or breaks before it (the server
// restarted or a proxy cut the connection): the caller then asks for the job itself.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      return null;
    }
    const { value, done } = chunk;
    if (done) return null;
    buffer += value;
    let end = buffer.indexOf("\n\n");
    while (end >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      end = buffer.indexOf("\n\n");
      let name = "message";
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // keep-alive comments
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "id") id = text;
        else if (field === "data") data.push(text);
      }
      if (!data.length) continue;
      const result = onEvent(name, data.join("\n"), id);
      if (result) {
        drain(reader); // the server ends the stream after the final event
        return result;
      }
    }
  }
}

async function drain(reader) {
  try {
    while (!(await reader.read()).done);
  } catch {
    // aborted with its run: nothing was waiting for it
  }
}

function timeLeft(seconds) {
  if (seconds === null || seconds === undefined) return "estimating the time left";
  if (seconds < 1) return "less than a second left";
  if (seconds < 90) return `about ${Math.round(seconds)} s left`;
  return `about ${Math.round(seconds / 60)} min left`;
}

function showJob(label, view) {
  $("job").hidden = false;
  const bar = $("job-progress");
  const progress = view && view.progress;
  let text;
  if (!view || view.status === "queued") {
    bar.removeAttribute("value"); // indeterminate: the job waits for the model
    text = `${label}: waiting for the model…`;
  } else if (!progress || !progress.total) {
    bar.removeAttribute("value");
    text = `${label}: starting…`;
  } else {
    bar.max = progress.total;
    bar.value = progress.done;
    text = `${label}: ${progress.done} of ${progress.total} forwards, ` +
      `${timeLeft(progress.eta_s)}.`;
  }
  if (!(state.job && state.job.cancelled)) $("job-text").textContent = text;
}

async function cancelJob() {
  const job = state.job;
  if (!job || job.cancelled) return;
  job.cancelled = true;
  $("cancel").setAttribute("aria-disabled", "true");
  $("job-text").textContent = `${job.label}: cancelling…`;
  try {
    await api(`jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) showError(error);
  }
}

// A closed or reloaded tab cancels its job: no one is left to see its maps, and the model's
// time goes to the next request (the job would otherwise run to its end for nobody).
function cancelJobOnLeave() {
  const job = state.job;
  if (!job || job.cancelled) return;
  const path = `jobs/${encodeURIComponent(job.id)}`;
  fetch(path, { method: "DELETE", headers: withKey(), keepalive: true }).catch(() => {});
}

// ------------------------------------------------------------------ answers

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

// A grey heatmap's levels (its red channel) and where it covers the picture (alpha > 0).
function heatLevels(heat, width, height) {
  const grey = pixels(heat, width, height);
  const levels = new Uint8ClampedArray(width * height);
  const mask = new Uint8Array(width * height);
  for (let i = 0; i < levels.length; i++) {
    levels[i] = grey[4 * i];
    mask[i] = grey[4 * i + 3] > 0 ? 1 : 0;
  }
  return { levels, mask };
}

async function showAnswer(answer, run) {
  const result = answer.results[0];
  const results = $("results");
  const base = state.image;
  for (const explanation of result.explanations) {
    const method = explanation.method || answer.method;
    const camMs = (answer.timings.cam_ms_by_method || {})[method] ?? answer.timings.cam_ms;
    for (const map of explanation.maps) {
      const heat = await decodePng(map.heatmap);
      if (run !== state.run) return;
      const { width, height } = map;
      const { levels, mask } = heatLevels(heat, width, height);
      if (!results.querySelector("figure.original")) {
        results.prepend(originalCard(result.filename, base, width, height, mask));
      }
      // Without a decodable image (a format this browser cannot show) the map is drawn alone.
      const image = base ? pixels(base, width, height) : null;
      const card = makeCard(answer, explanation, method, map, camMs);
      results.append(card.figure);
      state.cards.push({ ...card, levels, mask, image, width, height });
    }
    if (explanation.concepts) await showConcepts(explanation, method, run);
  }
  renderAll();
  if (isTaskModel()) showTaskAnswer(result);
  else if (state.predictionsRun !== run) showPredictions(result, run);
  $("view").hidden = false;
}

// ------------------------------------------------------------------ concepts

// Under the card of a method that finds concepts: each concept's map, drawn like the maps
// (colour map, opacity), and the classes the model's head gives it. The map above is the
// concept that scores highest for the explained class.
async function showConcepts(explanation, method, run) {
  const section = document.createElement("section");
  section.className = "concepts";
  section.dataset.conceptsOf = method;
  const heading = document.createElement("h3");
  heading.textContent = `${methodLabel(method)}: ${explanation.concepts.length} concepts`;
  const hint = document.createElement("p");
  hint.className = "hint";
  hint.textContent = "The parts of the image the factorization found, each with the classes " +
    "the model's head gives it. The map above is the concept that scores highest for " +
    `${explanation.label}.`;
  const grid = document.createElement("div");
  grid.className = "concept-grid";
  section.append(heading, hint, grid);
  for (const concept of explanation.concepts) {
    const { map } = concept;
    const heat = await decodePng(map.heatmap);
    if (run !== state.run) return;
    const { width, height } = map;
    const figure = document.createElement("figure");
    figure.className = "concept";
    figure.dataset.concept = String(concept.index);
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.setAttribute("role", "img");
    const names = concept.top_labels.map((top) => top.label);
    canvas.setAttribute("aria-label",
      `Concept ${concept.index + 1} of ${methodLabel(method)} over the image: ${names.join(", ")}`);
    const caption = document.createElement("figcaption");
    const title = document.createElement("strong");
    title.textContent = `Concept ${concept.index + 1}`;
    const tops = document.createElement("ol");
    tops.className = "concept-labels";
    for (const top of concept.top_labels) {
      const item = document.createElement("li");
      item.textContent = `${top.label} (${(100 * top.probability).toFixed(1)} %)`;
      tops.append(item);
    }
    caption.append(title, tops);
    figure.append(canvas, caption);
    grid.append(figure);
    const image = state.image ? pixels(state.image, width, height) : null;
    state.concepts.push({ figure, canvas, ...heatLevels(heat, width, height), image, width, height });
  }
  $("results").append(section);
}

// The part of the picture the maps cover: the model's centre crop.
function covered(mask, width, height) {
  let left = width;
  let right = -1;
  let top = height;
  let bottom = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!mask[y * width + x]) continue;
      if (x < left) left = x;
      if (x > right) right = x;
      if (y < top) top = y;
      if (y > bottom) bottom = y;
    }
  }
  return { left, top, right, bottom };
}

function originalCard(filename, image, width, height, mask) {
  const figure = document.createElement("figure");
  figure.className = "card original";
  const caption = document.createElement("figcaption");
  const title = document.createElement("strong");
  title.textContent = "Original";
  caption.append(title, document.createElement("br"), filename || "image");
  const note = document.createElement("span");
  note.className = "note";
  if (image) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.setAttribute("role", "img");
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0, width, height);
    const box = covered(mask, width, height);
    const framed = box.right >= box.left &&
      (box.left > 0 || box.top > 0 || box.right < width - 1 || box.bottom < height - 1);
    caption.append(` (${image.naturalWidth}×${image.naturalHeight})`);
    if (framed) {
      const line = Math.max(2, Math.round(Math.max(width, height) / 200));
      context.lineWidth = line;
      context.setLineDash([4 * line, 3 * line]);
      context.strokeStyle = "#fff";
      context.strokeRect(box.left + line / 2, box.top + line / 2,
        box.right - box.left + 1 - line, box.bottom - box.top + 1 - line);
      context.strokeStyle = "#000";
      context.lineDashOffset = 4 * line;
      context.strokeRect(box.left + line / 2, box.top + line / 2,
        box.right - box.left + 1 - line, box.bottom - box.top + 1 - line);
      const crop = state.detail ? state.detail.preprocess.crop : null;
      note.textContent = "The model sees only the centre crop inside the dashed frame" +
        `${crop ? `, scaled to ${crop[1]}×${crop[0]} pixels` : ""}: the maps cover that part, ` +
        "and show the image alone outside it.";
      canvas.setAttribute("aria-label", `${filename}, with the model's centre crop framed`);
    } else {
      canvas.setAttribute("aria-label", `${filename}, as uploaded`);
    }
    figure.append(canvas);
  } else {
    note.textContent = "This browser cannot show this image format; the server could read it.";
  }
  if (note.textContent) caption.append(note);
  figure.append(caption);
  return figure;
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
    `${methodLabel(method)} map of ${explanation.label} at ${map.layer} over the image`);
  const caption = document.createElement("figcaption");
  const title = document.createElement("strong");
  title.textContent = `${methodLabel(method)} · ${map.layer}`;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = explanation.label;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = ` · ${camMs.toFixed(1)} ms`;
  caption.append(title, document.createElement("br"), "class ", label,
    ` (${(100 * explanation.probability).toFixed(1)} %)`, time);
  if (map.faithfulness) caption.append(document.createElement("br"), scores(map.faithfulness));
  const target = taskCaption(explanation);
  if (target) caption.append(document.createElement("br"), target);
  const download = document.createElement("button");
  download.type = "button";
  download.className = "link";
  download.textContent = "Download PNG";
  download.setAttribute("aria-label",
    `Download the ${methodLabel(method)} ${map.layer} picture as PNG`);
  const stem = (answer.results[0].filename || "image").replace(/\.[^.]*$/, "");
  download.addEventListener("click", () => downloadCanvas(canvas,
    `${stem}-${method}-${map.layer}-${explanation.label}.png`));
  figure.append(canvas, caption, download);
  return { figure, canvas };
}

// A map's faithfulness scores, each with the direction that is better.
function scores(faithfulness) {
  const line = document.createElement("span");
  line.className = "faithfulness";
  const parts = [];
  if (faithfulness.deletion_auc !== null && faithfulness.deletion_auc !== undefined) {
    parts.push(`deletion AUC ${faithfulness.deletion_auc.toFixed(3)} (lower is better)`);
  }
  if (faithfulness.insertion_auc !== null && faithfulness.insertion_auc !== undefined) {
    parts.push(`insertion AUC ${faithfulness.insertion_auc.toFixed(3)} (higher is better)`);
  }
  if (faithfulness.confidence_drop !== null && faithfulness.confidence_drop !== undefined) {
    const drop = (100 * faithfulness.confidence_drop).toFixed(1);
    parts.push(`confidence drop ${drop} % (lower is better)`);
  }
  line.textContent = parts.join(" · ");
  line.title = `${faithfulness.steps} steps per curve`;
  return line;
}

function renderAll() {
  const alpha = Number($("opacity").value);
  $("opacity-value").textContent = alpha.toFixed(2);
  const lut = state.colormaps[$("colormap").value] || state.colormaps.jet;
  if (!lut) return;
  for (const card of [...state.cards, ...state.concepts]) {
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

function showPredictions(result, run) {
  const list = $("topk");
  const focused = document.activeElement && list.contains(document.activeElement)
    ? document.activeElement.dataset.classIdx : null;
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
    if (focused === String(prediction.class_idx)) button.focus();
  }
  state.predictionsRun = run;
  $("predictions").classList.remove("stale");
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
    const files = event.dataTransfer.files;
    if (!files.length) return;
    // The picker then names the dropped file, as if it had been chosen there.
    $("file").files = files;
    chooseFile(files[0]);
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
  $("methods-all").addEventListener("click", () => checkAll("methods", true));
  $("methods-none").addEventListener("click", () => checkAll("methods", false));
  $("cancel").addEventListener("click", cancelJob);
  window.addEventListener("pagehide", cancelJobOnLeave);
  $("class-reset").addEventListener("click", () => {
    state.classIdx = null;
    resetTaskPick();
    updateClassChoice();
    explain();
  });
  $("opacity").addEventListener("input", renderAll);
  $("colormap").addEventListener("change", renderAll);
  wireDrop();
  wireTasks();
  loadColormaps();
  loadModels();
}

start();
