// camserve page, detectors and segmenters (loaded before page.js, which calls these functions).
//
// The model's task comes from /models/{name} (`task`). For a detector the page asks /predict for
// the boxes as soon as it has an image and draws them, with label and score, over the image;
// clicking a box (or its button) explains that box (`box=K`). For a segmenter it asks /predict
// for the classes present and the label mask (`output=mask`), draws the mask semi-transparent
// over the image and lists the classes; clicking a class (or a pixel of it) explains its region
// (`class_idx` with `region=mask`). A classifier leaves all of this hidden.
"use strict";

// One colour per class for the masks and boxes, cycled (class 0, the background, stays clear).
const TASK_COLOURS = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40],
];
const MASK_ALPHA = 0.5;

const taskState = {
  seq: 0, // the current /predict of the task view; older answers are dropped
  found: null, // {detections} or {segments, classes: Uint8Array, width, height}
  bitmap: null, // the image, decoded for drawing
  pick: null, // {box: K} or {classIdx: C}: what the next explanation explains
  explained: [], // detection indices or classes of the last explanation
};

function modelTask() {
  return (state.detail && state.detail.task) || "classification";
}

function isTaskModel() {
  return modelTask() !== "classification";
}

function taskColour(classIdx) {
  return TASK_COLOURS[classIdx % TASK_COLOURS.length];
}

// ------------------------------------------------------------------ hooks page.js calls

// A new model or image: forget the old boxes or mask; for a task model, ask for the new ones.
function taskModelChosen() {
  clearTaskView();
  const task = isTaskModel();
  $("class-reset").textContent = !task ? "Back to top-1"
    : modelTask() === "detection" ? "Back to the top box" : "Back to the largest shape";
  if (task) taskPredict();
}

function taskImageChosen() {
  clearTaskView();
  if (isTaskModel()) taskPredict();
}

function clearTaskView() {
  taskState.seq += 1;
  taskState.found = null;
  taskState.bitmap = null;
  taskState.pick = null;
  taskState.explained = [];
  $("task-view").hidden = true;
  $("task-list").replaceChildren();
}

// The form's fields that pick what a task model explains (class_idx is a classifier's).
function taskFields(form) {
  if (!isTaskModel()) return;
  form.delete("class_idx");
  form.delete("top_k");
  const pick = taskState.pick;
  if (modelTask() === "detection") {
    if (pick && pick.box !== undefined) form.append("box", String(pick.box));
  } else if (pick && pick.classIdx !== undefined) {
    form.append("class_idx", String(pick.classIdx));
    form.append("region", "mask");
  }
}

// What the "Class" line says for a task model ({text, picked}); null for a classifier.
function taskChoice() {
  if (!isTaskModel()) return null;
  const pick = taskState.pick;
  if (!pick) {
    return {
      text: modelTask() === "detection" ? "the top detection" : "the largest shape's mask",
      picked: false,
    };
  }
  if (pick.box !== undefined) {
    const found = taskState.found && taskState.found.detections
      ? taskState.found.detections[pick.box] : null;
    return {
      text: found ? `box ${pick.box}: ${found.label} ${found.score.toFixed(2)}` : `box ${pick.box}`,
      picked: true,
    };
  }
  const labels = state.detail ? state.detail.labels : [];
  return {
    text: `${labels[pick.classIdx] ?? pick.classIdx} (class ${pick.classIdx}), its mask`,
    picked: true,
  };
}

function resetTaskPick() {
  taskState.pick = null;
}

// An explanation's line about its box or region, under the card's class; null for a classifier.
function taskCaption(explanation) {
  if (explanation.detection !== null && explanation.detection !== undefined) {
    const [x0, y0, x1, y1] = explanation.box.map((v) => Math.round(v));
    const line = document.createElement("span");
    line.className = "task-line";
    line.textContent = `box ${explanation.detection} · score ${explanation.score.toFixed(2)} · ` +
      `[${x0}, ${y0}, ${x1}, ${y1}]`;
    return line;
  }
  if (explanation.region) {
    const line = document.createElement("span");
    line.className = "task-line";
    line.textContent = `region: ${explanation.region}`;
    return line;
  }
  return null;
}

// The explain answer of a task model: the boxes of its pass (or the classes), with the
// explained ones marked.
function showTaskAnswer(result) {
  if (!taskState.found) return;
  if (result.detections) taskState.found = { detections: result.detections };
  taskState.explained = result.explanations.map((e) =>
    e.detection !== null && e.detection !== undefined ? e.detection : e.class_idx);
  drawTaskView();
  listTaskChoices();
}

// ------------------------------------------------------------------ /predict and drawing

async function taskPredict() {
  const file = state.file;
  if (!file || !state.detail) return;
  const seq = ++taskState.seq;
  const segmenter = modelTask() === "segmentation";
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", state.detail.name);
  if (segmenter) form.append("output", "mask");
  setStatus(`Finding the ${segmenter ? "classes" : "boxes"} of ${file.name}…`);
  try {
    const [answer, bitmap] = await Promise.all([
      api("predict", { method: "POST", body: form }),
      createImageBitmap(file).catch(() => null),
    ]);
    if (seq !== taskState.seq) return;
    const result = answer.results[0];
    taskState.bitmap = bitmap;
    if (segmenter) {
      taskState.found = {
        segments: result.segments,
        ...(await maskClasses(result.mask, result.width, result.height)),
      };
    } else {
      taskState.found = { detections: result.detections };
    }
    if (seq !== taskState.seq) return;
    drawTaskView();
    listTaskChoices();
    $("task-view").hidden = false;
    setStatus(segmenter
      ? `${file.name}: ${result.segments.length} classes; click one to explain its region.`
      : `${file.name}: ${result.detections.length} detections; click a box to explain it.`);
  } catch (error) {
    if (seq === taskState.seq) showError(error);
  }
}

// The label mask (an 8-bit PNG of class indices) as one class per pixel.
async function maskClasses(base64, width, height) {
  const picture = await decodePng(base64);
  const grey = pixels(picture, width, height);
  const classes = new Uint8Array(width * height);
  for (let i = 0; i < classes.length; i++) classes[i] = grey[4 * i];
  return { classes, width, height };
}

function drawTaskView() {
  const found = taskState.found;
  const bitmap = taskState.bitmap;
  if (!found) return;
  const canvas = $("task-canvas");
  const width = bitmap ? bitmap.width : found.width || 256;
  const height = bitmap ? bitmap.height : found.height || 256;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, width, height);
  if (bitmap) context.drawImage(bitmap, 0, 0);
  if (found.segments) {
    drawMask(context, found);
    canvas.setAttribute("aria-label",
      `the image with its predicted mask: ${found.segments.map((s) => s.label).join(", ")}`);
  } else {
    drawBoxes(context, found.detections, width, height);
    canvas.setAttribute("aria-label",
      `the image with ${found.detections.length} detected boxes`);
  }
}

function drawMask(context, found) {
  const { classes, width, height } = found;
  const scaledW = context.canvas.width;
  const scaledH = context.canvas.height;
  const layer = new ImageData(width, height);
  const d = layer.data;
  for (let i = 0; i < classes.length; i++) {
    if (!classes[i]) continue;
    const [r, g, b] = taskColour(classes[i]);
    const strong = taskState.explained.includes(classes[i]);
    d[4 * i] = r;
    d[4 * i + 1] = g;
    d[4 * i + 2] = b;
    d[4 * i + 3] = Math.round(255 * (strong ? 0.75 : MASK_ALPHA));
  }
  const sheet = document.createElement("canvas");
  sheet.width = width;
  sheet.height = height;
  sheet.getContext("2d").putImageData(layer, 0, 0);
  context.drawImage(sheet, 0, 0, scaledW, scaledH);
}

function drawBoxes(context, detections, width, height) {
  const line = Math.max(2, Math.round(Math.max(width, height) / 150));
  const size = Math.max(8, Math.round(Math.max(width, height) / 28));
  context.font = `${size}px system-ui, sans-serif`;
  context.textBaseline = "top";
  detections.forEach((detection, index) => {
    const [x0, y0, x1, y1] = detection.box;
    const [r, g, b] = taskColour(detection.class_idx);
    const strong = taskState.explained.includes(index);
    context.lineWidth = strong ? 2 * line : line;
    context.strokeStyle = `rgb(${r}, ${g}, ${b})`;
    context.strokeRect(x0 + line / 2, y0 + line / 2, x1 - x0 - line, y1 - y0 - line);
    const text = `${index}: ${detection.label} ${detection.score.toFixed(2)}`;
    const textWidth = context.measureText(text).width + 4;
    // Above the box when there is room, and never past the picture's right edge.
    const top = y0 >= size + 2 ? y0 - size - 2 : y0;
    const left = Math.max(0, Math.min(x0, width - textWidth));
    context.fillStyle = `rgb(${r}, ${g}, ${b})`;
    context.fillRect(left, top, textWidth, size + 2);
    context.fillStyle = 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000" : "#fff";
    context.fillText(text, left + 2, top + 1);
  });
}

// One button per box or class, the keyboard's way to what a click on the picture picks.
function listTaskChoices() {
  const list = $("task-list");
  list.replaceChildren();
  const found = taskState.found;
  if (!found) return;
  const detector = Boolean(found.detections);
  $("task-heading").textContent = detector
    ? "Detections (click a box to explain it)"
    : "Classes present (click one to explain its region)";
  const items = detector
    ? found.detections.map((d, index) => ({
      text: `${index}: ${d.label} ${d.score.toFixed(2)}`,
      pick: { box: index },
      key: index,
      colour: taskColour(d.class_idx),
    }))
    : found.segments.map((s) => ({
      text: `${s.label} (${s.pixels} px)`,
      pick: { classIdx: s.class_idx },
      key: s.class_idx,
      colour: taskColour(s.class_idx),
    }));
  for (const item of items) {
    const entry = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.pick = String(item.key);
    button.setAttribute("aria-pressed", String(taskState.explained.includes(item.key)));
    button.style.borderLeftColor = `rgb(${item.colour.join(", ")})`;
    button.textContent = item.text;
    button.addEventListener("click", () => pickTask(item.pick));
    entry.append(button);
    list.append(entry);
  }
}

function pickTask(pick) {
  taskState.pick = pick;
  updateClassChoice();
  explain();
}

// A click on the picture: the smallest box under it, or the class of the pixel under it.
function taskCanvasClick(event) {
  const found = taskState.found;
  if (!found) return;
  const canvas = $("task-canvas");
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * canvas.width;
  const y = ((event.clientY - rect.top) / rect.height) * canvas.height;
  if (found.detections) {
    let best = null;
    found.detections.forEach((d, index) => {
      const [x0, y0, x1, y1] = d.box;
      if (x < x0 || x > x1 || y < y0 || y > y1) return;
      const area = (x1 - x0) * (y1 - y0);
      if (!best || area < best.area) best = { index, area };
    });
    if (best) pickTask({ box: best.index });
    return;
  }
  const px = Math.min(found.width - 1, Math.floor((x / canvas.width) * found.width));
  const py = Math.min(found.height - 1, Math.floor((y / canvas.height) * found.height));
  const classIdx = found.classes[py * found.width + px];
  if (classIdx) pickTask({ classIdx });
}

function wireTasks() {
  $("task-canvas").addEventListener("click", taskCanvasClick);
}
