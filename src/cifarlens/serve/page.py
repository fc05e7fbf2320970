"""The single page served at ``/`` (inline CSS and JS only, so it works with no network but the
server's) and its icon at ``/favicon.ico``.

Kept as a Python string (not a package-data file) so every install, wheel or editable,
has it. Server-provided text is only ever set through ``textContent``.
"""

import functools


@functools.cache
def favicon_png() -> bytes:
    """A 32x32 PNG icon, a magnifying lens in the page's accent colour (drawn once, on first use)."""
    import io

    from PIL import Image, ImageDraw

    icon = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.line((19, 19, 29, 29), fill=(29, 35, 48, 255), width=5)  # the handle
    draw.ellipse((2, 2, 23, 23), fill=(238, 244, 255, 255), outline=(47, 111, 223, 255), width=4)  # the lens
    buf = io.BytesIO()
    icon.save(buf, format="PNG")
    return buf.getvalue()


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cifarlens</title>
<link rel="icon" type="image/png" href="/favicon.ico">
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d0d5dd; --accent: #2f6fdf; --bad: #b42318; }
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         margin: 0 auto; max-width: 980px; padding: 18px; }
  h1 { font-size: 20px; margin: 0 0 2px; }
  .muted { color: var(--muted); font-size: 13px; }
  #drop { border: 2px dashed var(--line); border-radius: 10px; padding: 22px; text-align: center;
          margin: 14px 0; cursor: pointer; }
  #drop.over { border-color: var(--accent); background: #eef4ff; }
  .row { display: flex; gap: 22px; flex-wrap: wrap; align-items: flex-start; }
  .panel { flex: 1 1 280px; min-width: 260px; }
  .panel h2 { font-size: 15px; margin: 8px 0; }
  .pic { width: 224px; height: 224px; object-fit: contain; image-rendering: pixelated;
         border: 1px solid var(--line); border-radius: 6px; background: #f6f7f9; }
  /* no image yet: a hint in its place, not the browser's broken-image icon and alt text */
  img.pic:not([src]) { display: none; }
  img.pic[src] + .hint { display: none; }
  .hint { width: 224px; height: 224px; display: flex; align-items: center; justify-content: center;
          text-align: center; padding: 18px; border: 1px dashed var(--line); border-radius: 6px;
          color: var(--muted); font-size: 13px; }
  .bar { display: grid; grid-template-columns: 9em 1fr 4.2em; gap: 8px; align-items: center;
         margin: 3px 0; cursor: pointer; }
  .bar .label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .bar .track { background: #eef0f3; border-radius: 4px; height: 16px; }
  .bar .fill { background: var(--accent); height: 16px; border-radius: 4px; min-width: 1px; }
  .bar .prob { text-align: right; font-variant-numeric: tabular-nums; }
  .bar.explained .label { font-weight: 600; }
  #error { color: var(--bad); white-space: pre-wrap; min-height: 1.2em; }
  select, button { font: inherit; }
</style>
</head>
<body>
<h1>cifarlens</h1>
<div class="muted" id="model-name">loading model...</div>

<div id="drop" tabindex="0">
  <strong>Drop an image here</strong> or <label>choose a file
  <input type="file" id="file" accept="image/*,.png,.jpg,.jpeg,.webp,.bmp,.gif,.tif,.tiff"></label>
  <div class="muted">PNG, JPEG, WebP, BMP, GIF (first frame), any size; resized to the model's input</div>
</div>
<div id="error" role="alert"></div>

<div class="row">
  <div class="panel">
    <h2>Image</h2>
    <img id="preview" class="pic" alt="uploaded image">
    <div class="hint">your image will show here</div>
    <div class="muted" id="preview-note"></div>
  </div>
  <div class="panel">
    <h2>Top classes</h2>
    <div id="bars"></div>
    <div class="muted" id="latency"></div>
  </div>
  <div class="panel">
    <h2>Explanation</h2>
    <label>method <select id="method"></select></label>
    <label>class <select id="target"><option value="">(predicted)</option></select></label>
    <div><img id="overlay" class="pic" alt="explanation overlay"><div class="hint">the explanation of its
      prediction will show here</div></div>
    <div class="muted" id="explain-note"></div>
  </div>
</div>
<p class="muted" id="backend-note"></p>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, current = null, overlayUrl = null, previewUrl = null;

function showError(message) { $("error").textContent = message || ""; }

async function call(path, options) {
  const t0 = performance.now();
  const response = await fetch(path, options);
  const ms = performance.now() - t0;
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { const body = await response.json(); if (body.error) message = body.error + " (" + response.status + ")"; }
    catch (e) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return [response, ms];
}

function form(file, fields) {
  const data = new FormData();
  data.append("file", file);
  for (const [k, v] of Object.entries(fields)) data.append(k, v);
  return data;
}

async function loadModel() {
  const [response] = await call("/api/model");
  model = await response.json();
  const m = model.test_metrics;
  $("model-name").textContent = model.model.name + " on " + model.dataset.name + " (run " + model.run + ")" +
    (m && m.accuracy !== undefined ? ", test accuracy " + (100 * m.accuracy).toFixed(2) + "%" : "");
  for (const name of model.methods) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = name;
    opt.selected = name === model.default_method;
    $("method").appendChild(opt);
  }
  model.dataset.classes.forEach((name, i) => {
    const opt = document.createElement("option");
    opt.value = String(i); opt.textContent = name;
    $("target").appendChild(opt);
  });
  const trained = model.trained || {};
  const unfinished = trained.note ? "When the server started, run " + trained.note + ". " : "";
  $("backend-note").textContent = unfinished + "Predictions: " + model.backend + " backend. Explanations: " +
    model.explain_backend + " model" + (model.backend !== model.explain_backend ?
    " (Grad-CAM needs gradients, which onnxruntime does not give)" : "") + ". " +
    (model.probabilities.calibrated ? "Probabilities are calibrated (temperature scaling, T = " +
      model.probabilities.temperature.toFixed(3) + ", fitted on the validation split)." :
      "Probabilities are the raw softmax (not calibrated).");
}

function drawBars(top, explained) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const t of top) {
    const row = document.createElement("div");
    row.className = "bar" + (t.index === explained ? " explained" : "");
    row.title = "explain " + t.label;
    const label = document.createElement("span"); label.className = "label"; label.textContent = t.label;
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill";
    fill.style.display = "block"; fill.style.width = (100 * t.prob).toFixed(1) + "%";
    track.appendChild(fill);
    const prob = document.createElement("span"); prob.className = "prob";
    prob.textContent = (100 * t.prob).toFixed(1) + "%";
    row.append(label, track, prob);
    row.addEventListener("click", () => { $("target").value = String(t.index); explain().catch((e) => showError(e.message)); });
    bars.appendChild(row);
  }
}

let lastTop = [], explainSeq = 0;
// Each answer is shown only while it is still about the image chosen (and, for explanations, the
// last one asked for): a slow answer about an earlier image drew its bars beside the new one.
async function predict() {
  const file = current;
  const [response, ms] = await call("/api/predict", { method: "POST", body: form(file, { topk: model ? model.topk : 5 }) });
  const result = await response.json();
  if (file !== current) return;
  lastTop = result.top;
  drawBars(result.top, null);
  $("latency").textContent = "predict: " + result.latency_ms.toFixed(1) + " ms on the server, " +
    ms.toFixed(0) + " ms round trip (" + result.backend + ")";
}

async function explain() {
  if (!current) return;
  const file = current, seq = ++explainSeq;
  const fields = { method: $("method").value };
  // the class by name: a name always means itself, where an index "1" would mean a class named "1"
  if ($("target").value !== "") fields.target = model.dataset.classes[Number($("target").value)];
  const [response, ms] = await call("/api/explain", { method: "POST", body: form(file, fields) });
  const blob = await response.blob();
  if (file !== current || seq !== explainSeq) return;
  if (overlayUrl) URL.revokeObjectURL(overlayUrl);
  overlayUrl = URL.createObjectURL(blob);
  $("overlay").src = overlayUrl;
  const h = (name) => response.headers.get(name) || "";
  const explained = decodeURIComponent(h("X-Explained-Class"));
  const prob = parseFloat(h("X-Explained-Prob"));
  let note = h("X-Method") + " for \u201c" + explained + "\u201d (p = " + (100 * prob).toFixed(1) + "%), " +
    parseFloat(h("X-Latency-Ms")).toFixed(1) + " ms on the server, " + ms.toFixed(0) + " ms round trip";
  if (h("X-Empty-Map") === "true") note = "No evidence: the map is all zero for this class. " + note;
  $("explain-note").textContent = note;
  drawBars(lastTop, parseInt(h("X-Explained-Index"), 10));
}

async function use(file) {
  if (!file) return;
  current = file;
  showError("");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview-note").textContent = file.name + ", " + (file.size / 1024).toFixed(1) + " KiB";
  $("preview").src = previewUrl;
  $("target").value = "";
  $("bars").replaceChildren(); $("overlay").removeAttribute("src");
  $("latency").textContent = ""; $("explain-note").textContent = "";
  try { await predict(); if (file === current) await explain(); }
  catch (e) { if (file === current) showError(e.message); }
}

$("preview").addEventListener("error", () => {
  if ($("preview").getAttribute("src")) $("preview-note").textContent += " (this browser cannot display it)";
});
$("file").addEventListener("change", (e) => use(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target === drop) $("file").click(); });
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => use(e.dataTransfer.files[0]));
for (const id of ["method", "target"]) {
  $(id).addEventListener("change", () => explain().catch((e) => showError(e.message)));
}
loadModel().catch((e) => showError("cannot load the model description: " + e.message));
</script>
</body>
</html>
"""
