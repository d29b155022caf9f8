// The playground talks to this server's public API only, exactly as any client would:
// GET /v1/models, POST /v1/images/{generations,edits,variations}, server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "serve_app_api_key";
const state = { models: {}, files: [], image: null, mask: null, painted: false, controller: null };

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

// ---- errors: the server's message beside the field it names ----
function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
}

function showError(envelope, status) {
  const error = (envelope && envelope.error) || { message: `HTTP ${status}` };
  const param = (error.param || "").replace(/\[\]$/, "");
  const target = param && $(`${param}-error`);
  (target || $("error")).textContent = error.message;
  if (!target && param) $("error").textContent = `${param}: ${error.message}`;
  $("status").textContent = status ? `Failed (HTTP ${status})` : "Failed";
}

async function errorFrom(response) {
  try { return await response.json(); } catch { return null; }
}

// ---- models and their limits ----
async function loadModels() {
  clearErrors();
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (exc) {
    $("error").textContent = `Cannot reach the server: ${exc}`;
    return;
  }
  if (!response.ok) { showError(await errorFrom(response), response.status); return; }
  const models = (await response.json()).data;
  state.models = Object.fromEntries(models.map((m) => [m.id, m]));
  const select = $("model");
  const current = select.value;
  select.replaceChildren(...models.map((m) => {
    const option = new Option(m.family ? `${m.id} (${m.family})` : m.id, m.id);
    option.title = `serves ${endpointsOf(m).join(", ")}`;
    return option;
  }));
  if (current in state.models) select.value = current;
  $("status").textContent = `${models.length} model(s) available`;
  updateMode();
}

// ---- what each model serves: the picker offers, per mode, only the models that serve it ----
const ENDPOINT = { generate: "generations", edit: "edits", variation: "variations" };

function endpointsOf(model) {
  return (model && model.endpoints) || ["generations", "edits", "variations"];
}

function chooseServingModel() {
  const wanted = ENDPOINT[mode()];
  const select = $("model");
  for (const option of select.options) {
    const serves = endpointsOf(state.models[option.value]).includes(wanted);
    option.disabled = !serves;
    option.textContent = option.textContent.replace(/ — not for .*$/, "") +
      (serves ? "" : ` — not for ${wanted}`);
  }
  if (select.selectedOptions.length && select.selectedOptions[0].disabled) {
    const serving = [...select.options].find((o) => !o.disabled);
    if (serving) select.value = serving.value;
  }
  showLimits();
}

function modelInfo(model) {
  if (!model) return "";
  const limits = model.limits || {};
  const parts = [`serves ${endpointsOf(model).join(", ")}`];
  if (limits.masked_edits === false) parts.push("no masks");
  if (limits.multi_image_edits === false) parts.push("one input image");
  return (model.family ? `${model.family}: ` : "") + parts.join("; ");
}

function showLimits() {
  const model = state.models[$("model").value];
  const limits = model && model.limits;
  $("model-info").textContent = modelInfo(model);
  const size = $("size");
  const previous = size.value;
  const sizes = limits ? limits.sizes : [];
  size.replaceChildren(new Option("auto", "auto"), ...sizes.map((s) => new Option(s, s)),
    new Option("custom…", "custom"));
  size.value = previous && [...size.options].some((o) => o.value === previous) ? previous : "auto";
  $("size-custom").hidden = size.value !== "custom";
  if (limits) {
    const megapixels = (limits.max_pixels / 1e6).toFixed(1);
    $("limits").textContent = `sides ${limits.min_side}–${limits.max_side} px, up to ` +
      `${megapixels} MP; auto = ${limits.default_size} (edits: the input's shape); ` +
      `n ≤ ${limits.max_n}`;
    $("n").max = limits.max_n;
  }
}

function chosenSize() {
  return $("size").value === "custom" ? $("size-custom").value.trim() : $("size").value;
}

// ---- modes ----
function updateMode() {
  const current = mode();
  chooseServingModel();
  const model = state.models[$("model").value];
  const masks = !(model && model.limits && model.limits.masked_edits === false);
  $("prompt-field").hidden = current === "variation";
  $("images-field").hidden = current === "generate";
  $("mask-field").hidden = current !== "edit" || !state.image || !masks;
  $("partials").disabled = current === "variation"; // variations do not stream
  $("submit").textContent = { generate: "Generate", edit: "Edit", variation: "Make variations" }[current];
}

// ---- images and the mask painter ----
function setFiles(files) {
  state.files = [...files].filter((f) => f.type.startsWith("image/"));
  state.image = null;
  state.mask = null; // a mask belongs to the image it was painted on
  state.painted = false;
  $("image-error").textContent = "";
  updateMode();
  if (!state.files.length) return;
  const file = state.files[0];
  const image = new Image();
  image.onload = () => {
    if (state.files[0] !== file) return; // another choice came since
    state.image = image;
    resetMask();
    updateMode();
  };
  image.onerror = () => { $("image-error").textContent = `${file.name}: not an image this browser can show.`; };
  image.src = URL.createObjectURL(file);
}

function resetMask() {
  const canvas = $("mask-canvas");
  canvas.width = state.image.naturalWidth;
  canvas.height = state.image.naturalHeight;
  // The mask OpenAI expects: opaque where the image is kept, transparent where it may change.
  state.mask = document.createElement("canvas");
  state.mask.width = canvas.width;
  state.mask.height = canvas.height;
  const ctx = state.mask.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  state.painted = false;
  drawMask();
}

function drawMask() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  ctx.globalCompositeOperation = "source-over";
  ctx.drawImage(state.image, 0, 0);
  // Show the painted (transparent) area as a red veil over the image.
  const veil = document.createElement("canvas");
  veil.width = canvas.width;
  veil.height = canvas.height;
  const v = veil.getContext("2d");
  v.fillStyle = "rgba(220, 0, 0, 0.45)";
  v.fillRect(0, 0, veil.width, veil.height);
  v.globalCompositeOperation = "destination-out";
  v.drawImage(state.mask, 0, 0);
  ctx.drawImage(veil, 0, 0);
}

// Paint from the previous point of the stroke to this one (round brush), so fast strokes
// have no gaps; `from` is null at the start of a stroke.
function paintAt(event, from) {
  const canvas = $("mask-canvas");
  const rect = canvas.getBoundingClientRect();
  const point = {
    x: ((event.clientX - rect.left) / rect.width) * canvas.width,
    y: ((event.clientY - rect.top) / rect.height) * canvas.height,
  };
  const start = from || point;
  const ctx = state.mask.getContext("2d");
  ctx.globalCompositeOperation = "destination-out";
  ctx.lineWidth = Number($("brush").value) * (canvas.width / rect.width);
  ctx.lineCap = "round";
  ctx.beginPath();
  ctx.moveTo(start.x, start.y);
  ctx.lineTo(point.x + (from ? 0 : 0.01), point.y);
  ctx.stroke();
  state.painted = true;
  drawMask();
  return point;
}

function maskBlob() {
  return new Promise((resolve) => state.mask.toBlob(resolve, "image/png"));
}

// ---- results ----
function dataUrl(b64, format) {
  return `data:image/${format};base64,${b64}`;
}

function figure(b64, format, caption, seed) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = dataUrl(b64, format);
  img.alt = caption;
  fig.append(img);
  const cap = document.createElement("figcaption");
  if (seed !== undefined && seed !== null) {
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "seed";
    reuse.textContent = `seed ${seed}`;
    reuse.title = "Use this seed";
    reuse.addEventListener("click", () => { $("seed").value = seed; $("n").value = 1; });
    const download = document.createElement("a");
    download.href = img.src;
    download.download = `image-${seed}.${format}`;
    download.textContent = "download";
    cap.append(reuse, download);
  } else {
    cap.textContent = caption;
  }
  fig.append(cap);
  return fig;
}

function showPreview(event) {
  const id = `preview-${event.image_index}`;
  const fig = figure(event.b64_json, event.output_format,
    `image ${event.image_index + 1}, preview ${event.partial_image_index + 1}`);
  fig.id = id;
  fig.dataset.partial = event.partial_image_index;
  const old = $(id);
  if (old) old.replaceWith(fig); else $("previews").append(fig);
}

function addToGallery(item, format, index) {
  const fig = figure(item.b64_json, format, `image ${index + 1}`, item.seed);
  fig.classList.add("result");
  $("gallery").prepend(fig);
}

function showUsage(usage, timings) {
  const parts = [];
  if (usage) parts.push(`usage: ${usage.input_tokens} input / ${usage.output_tokens} output tokens`);
  if (timings.first !== undefined) parts.push(`first preview ${timings.first.toFixed(2)} s`);
  parts.push(`total ${timings.total.toFixed(2)} s`);
  $("usage").textContent = parts.join(" · ");
}

// Server-sent events from a fetch response: {event, data} objects.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event: name, data: JSON.parse(data) };
    }
  }
}

// ---- requests ----
function commonFields() {
  const fields = {
    model: $("model").value,
    size: chosenSize(),
    n: Number($("n").value || 1),
    output_format: $("output-format").value,
  };
  if ($("seed").value !== "") fields.seed = Number($("seed").value);
  if ($("steps").value !== "") fields.num_inference_steps = Number($("steps").value);
  return fields;
}

async function buildRequest() {
  const current = mode();
  const seed = $("seed").value.trim();
  if (seed !== "" && !(/^[0-9]+$/.test(seed) && Number.isSafeInteger(Number(seed)))) {
    // JavaScript numbers would change a larger seed; the API itself takes up to 2^63 - 1.
    return { error: { error: { message: "Use a whole seed up to 9007199254740991 here.", param: "seed" } } };
  }
  const fields = commonFields();
  if (current !== "variation") {
    Object.assign(fields, {
      prompt: $("prompt").value,
      quality: $("quality").value,
      stream: true,
      partial_images: Number($("partials").value),
    });
  }
  if (current === "generate") {
    return { url: "/v1/images/generations", body: JSON.stringify(fields), json: true, stream: true };
  }
  if (!state.files.length) {
    return { error: { error: { message: "Choose an image first.", param: "image" } } };
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  if (current === "variation") {
    form.append("image", state.files[0]);
    return { url: "/v1/images/variations", body: form, stream: false };
  }
  for (const file of state.files) form.append(state.files.length > 1 ? "image[]" : "image", file);
  if (state.painted && !$("mask-field").hidden) form.append("mask", await maskBlob(), "mask.png");
  return { url: "/v1/images/edits", body: form, stream: true };
}

function requestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const request = await buildRequest();
  if (request.error) { showError(request.error); return; }
  const id = requestId();
  state.controller = new AbortController();
  $("submit").disabled = true;
  $("cancel").disabled = false;
  $("previews").replaceChildren();
  $("usage").textContent = "";
  $("status").textContent = `Working… (request ${id})`;
  document.body.dataset.request = id;
  const started = performance.now();
  const timings = {};
  const extra = { "x-request-id": id, ...(request.json ? { "Content-Type": "application/json" } : {}) };
  try {
    const response = await fetch(request.url, {
      method: "POST", headers: headers(extra), body: request.body, signal: state.controller.signal,
    });
    if (!response.ok) { showError(await errorFrom(response), response.status); return; }
    let usage = null;
    let count = 0;
    if (request.stream) {
      for await (const { event: name, data } of events(response)) {
        if (name === "error") { showError(data); return; }
        if (name.endsWith(".partial_image")) {
          if (timings.first === undefined) timings.first = (performance.now() - started) / 1000;
          showPreview(data);
        } else if (name.endsWith(".completed")) {
          addToGallery(data, data.output_format, data.image_index);
          usage = data.usage;
          count += 1;
        }
      }
    } else {
      const body = await response.json();
      body.data.forEach((item, i) => addToGallery(item, body.output_format || "png", i));
      usage = body.usage;
      count = body.data.length;
    }
    if (count === 0) {
      showError({ error: { message: "The server ended the response without an image." } });
      return;
    }
    timings.total = (performance.now() - started) / 1000;
    showUsage(usage, timings);
    $("status").textContent = `Done: ${count} image(s) (request ${id})`;
  } catch (exc) {
    if (exc.name === "AbortError") $("status").textContent = `Cancelled (request ${id})`;
    else { $("error").textContent = String(exc); $("status").textContent = "Failed"; }
  } finally {
    $("submit").disabled = false;
    $("cancel").disabled = true;
    state.controller = null;
  }
}

// ---- wiring ----
function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModels();
  });
  $("model").addEventListener("change", updateMode);
  $("size").addEventListener("change", () => { $("size-custom").hidden = $("size").value !== "custom"; });
  document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", updateMode));
  $("images").addEventListener("change", (e) => setFiles(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFiles(e.dataTransfer.files);
  });
  const canvas = $("mask-canvas");
  let last = null; // the stroke's previous point while the pointer is down
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = paintAt(e, null);
  });
  canvas.addEventListener("pointermove", (e) => { if (last) last = paintAt(e, last); });
  canvas.addEventListener("pointerup", (e) => { if (last) paintAt(e, last); last = null; });
  canvas.addEventListener("pointercancel", () => { last = null; });
  $("clear-mask").addEventListener("click", () => { if (state.image) resetMask(); });
  $("cancel").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("form").addEventListener("submit", submit);
  updateMode();
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
