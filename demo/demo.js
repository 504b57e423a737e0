// The demo page: pick or drop an image, see it as the model sees it, and the model's answer.
// It talks to the model server straight from the browser (TorchServe's CORS settings allow this
// page's origin; see config.properties) and needs nothing but this folder.

import { decode, modelPixels, toImageData } from "./preview.js";

const TIMEOUT_MS = 30000;

class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status; // 0: no answer at all
  }
}

async function requestJson(url, options = {}) {
  let response;
  try {
    response = await fetch(url, { ...options, signal: AbortSignal.timeout(TIMEOUT_MS) });
  } catch (error) {
    // A refused connection and a CORS refusal look the same from inside a page.
    throw new ServerError(0, `cannot reach ${url} (${error.message}): is the server running, and does its ` +
      `config.properties allow this page's origin (cors_allowed_origin=${location.origin})?`);
  }
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: reported below */ }
  if (!response.ok) {
    // The kit's handler answers {"code", "error"}; TorchServe's frontend {"code", "type", "message"}.
    const message = (body && (body.error || body.message)) || text.trim() || response.statusText;
    throw new ServerError(response.status, message);
  }
  if (body === null) throw new ServerError(response.status, `the answer is not JSON: ${text.slice(0, 200)}`);
  return body;
}

// How the page talks to a kind of server: list the models, describe one (its spec, or null when
// the server has none), and classify an image. Another protocol (such as the Open Inference
// Protocol) is one more entry with the same three functions.
const PROTOCOLS = {
  torchserve: {
    label: "TorchServe REST",
    async listModels(urls) {
      // Only the management API lists models: TorchServe's inference API has no such route.
      const names = [];
      let token = "0";
      for (let page = 0; page < 50 && token !== undefined; page++) {
        const body = await requestJson(`${urls.management}/models?limit=100&next_page_token=${token}`);
        names.push(...body.models.map((m) => m.modelName));
        token = body.nextPageToken;
      }
      return names;
    },
    async describe(urls, model) {
      // ?customized=true makes TorchServe ask the model's handler; the kit's handler answers with the spec.
      const body = await requestJson(`${urls.management}/models/${encodeURIComponent(model)}?customized=true`);
      const metadata = body[0] && body[0].customizedMetadata;
      return metadata && metadata.format === "image-classifier-metadata/1" ? metadata.spec : null;
    },
    async predict(urls, model, file) {
      // The raw bytes, as `curl -T` sends them; octet-stream so the frontend never parses them as a form.
      return requestJson(`${urls.inference}/predictions/${encodeURIComponent(model)}`, {
        method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
      });
    },
  },
};

const $ = (id) => document.getElementById(id);
const state = { urls: null, protocol: "torchserve", spec: null, file: null, bitmap: null, request: 0, answers: 0 };

function server() { return PROTOCOLS[state.protocol]; }

function setStatus(text, bad = false) {
  $("server-status").textContent = text;
  $("server-status").classList.toggle("bad", bad);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("prediction").hidden = true;
  $("hint").hidden = true;
}

async function defaults() {
  // config.json comes from `python -m demo` (its --inference / --management); query parameters win.
  let config = {};
  try {
    const response = await fetch("config.json");
    if (response.ok) config = await response.json();
  } catch { /* opened from another static server: fall back below */ }
  const query = new URLSearchParams(location.search);
  const host = location.hostname || "127.0.0.1";
  return {
    inference: query.get("inference") || config.inference || `http://${host}:8080`,
    management: query.get("management") || config.management || `http://${host}:8081`,
    protocol: query.get("protocol") || config.protocol || "torchserve",
    model: query.get("model") || "",
  };
}

async function connect() {
  state.urls = { inference: $("inference-url").value.replace(/\/+$/, ""),
                 management: $("management-url").value.replace(/\/+$/, "") };
  state.protocol = PROTOCOLS[$("protocol").value] ? $("protocol").value : "torchserve";
  setStatus(`connecting to ${state.urls.management}…`);
  let names = [];
  try {
    names = await server().listModels(state.urls);
  } catch (error) {
    setStatus(`cannot list the models (${error.message}); type a model name instead`, true);
    $("settings").open = true;
  }
  $("models").replaceChildren(...names.map((name) => new Option(name, name)));
  if (names.length) {
    setStatus(`${server().label} at ${state.urls.inference}: ${names.length} model${names.length > 1 ? "s" : ""} — ` +
              names.join(", "));
    if (!names.includes($("model").value)) $("model").value = names[0];
  }
  document.body.dataset.models = names.join(",");
  if ($("model").value) await chooseModel();
}

async function chooseModel() {
  const model = $("model").value.trim();
  state.spec = null;
  const info = $("model-info");
  info.replaceChildren();
  if (!model) return;
  try {
    state.spec = await server().describe(state.urls, model);
  } catch (error) {
    addInfo("metadata", `none (${error.message})`);
  }
  if (state.spec) {
    const input = state.spec.input;
    addInfo("data set", state.spec.dataset);
    addInfo("classes", `${state.spec.class_names.length}: ${state.spec.class_names.join(", ")}`);
    addInfo("input", `${input.width}×${input.height}, ${input.channels === 1 ? "grey" : "colour"}`);
    addInfo("architecture", state.spec.arch);
  } else if (!info.children.length) {
    addInfo("metadata", "none: export the model again with this kit to see its input and classes here");
  }
  document.body.dataset.model = model;
  document.body.dataset.spec = state.spec ? "yes" : "no";
  if (state.file) await classify(state.file);
}

function addInfo(term, text) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.textContent = text;
  $("model-info").append(dt, dd);
}

async function showImage(file) {
  URL.revokeObjectURL($("original").src);
  $("original").src = URL.createObjectURL(file);
  state.bitmap = null;
  try {
    state.bitmap = await decode(file);
    $("original-size").textContent = `(${state.bitmap.width}×${state.bitmap.height})`;
  } catch {
    $("original-size").textContent = "(the browser cannot decode this file)";
  }
  $("original").hidden = !state.bitmap;
  drawModelView();
}

function drawModelView() {
  const canvas = $("model-view");
  const caption = $("model-view-caption");
  if (!state.bitmap || !state.spec) {
    canvas.width = canvas.height = 0;
    caption.textContent = state.spec ? "As the model sees it: nothing to show" :
      "As the model sees it: unknown (no metadata for this model)";
    return;
  }
  const pixels = modelPixels(state.bitmap, state.spec.input);
  canvas.width = pixels.width;
  canvas.height = pixels.height;
  canvas.getContext("2d").putImageData(toImageData(pixels), 0, 0);
  caption.textContent = `As the model sees it: ${pixels.width}×${pixels.height}, ` +
                        `${pixels.channels === 1 ? "grey" : "colour"}`;
}

async function classify(file) {
  const model = $("model").value.trim();
  if (!model) {
    showError("choose a model first");
    return;
  }
  const request = ++state.request;
  document.body.dataset.state = "predicting";
  await showImage(file);
  const started = performance.now();
  let answer = null;
  let failure = null;
  try {
    answer = await server().predict(state.urls, model, file);
  } catch (error) {
    failure = error;
  }
  if (request !== state.request) return; // a newer image or model took over
  if (failure) {
    const status = failure.status ? `${failure.status}: ` : "";
    showError(`${status}${failure.message}`);
  } else {
    showAnswer(answer, performance.now() - started);
  }
  document.body.dataset.state = failure ? "error" : "done";
  document.body.dataset.answers = String(++state.answers);
}

function showAnswer(answer, milliseconds) {
  const entries = Object.entries(answer.probabilities).sort((a, b) => b[1] - a[1]);
  const known = state.spec ? state.spec.class_names : null;
  const names = Object.keys(answer.probabilities);
  const mismatch = known && (known.length !== names.length || known.some((name, i) => name !== names[i]));
  $("top-label").textContent = answer.label;
  $("top-probability").textContent = percent(answer.probabilities[answer.label]);
  $("timing").textContent = `answered in ${milliseconds.toFixed(0)} ms by ${$("model").value}` +
    (mismatch ? " — its classes differ from the model's metadata!" : "");
  $("bars").replaceChildren(...entries.map(([name, probability]) => {
    const item = document.createElement("li");
    item.dataset.label = name;
    item.dataset.probability = String(probability); // the exact number the server sent
    item.classList.toggle("best", name === answer.label);
    item.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span>' +
                     '<span class="value"></span>';
    item.querySelector(".name").textContent = name;
    item.querySelector(".name").title = name;
    item.querySelector(".fill").style.width = `${(probability * 100).toFixed(2)}%`;
    item.querySelector(".value").textContent = percent(probability);
    return item;
  }));
  $("raw").textContent = JSON.stringify(answer, null, 2);
  $("error").hidden = true;
  $("hint").hidden = true;
  $("prediction").hidden = false;
}

function percent(probability) { return `${(probability * 100).toFixed(2)} %`; }

function pick(files) {
  if (!files || !files.length) return;
  state.file = files[0];
  classify(state.file);
}

async function start() {
  const settings = await defaults();
  $("inference-url").value = settings.inference;
  $("management-url").value = settings.management;
  $("model").value = settings.model;
  $("protocol").replaceChildren(...Object.entries(PROTOCOLS).map(([key, p]) => new Option(p.label, key)));
  $("protocol").value = PROTOCOLS[settings.protocol] ? settings.protocol : "torchserve";
  $("protocol-row").hidden = Object.keys(PROTOCOLS).length < 2;

  $("connect").addEventListener("click", connect);
  $("model").addEventListener("change", chooseModel);
  $("file").addEventListener("change", (event) => pick(event.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    pick(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => pick(event.clipboardData && event.clipboardData.files));
  document.body.dataset.state = "idle";
  await connect();
  document.body.dataset.ready = "yes";
}

start();
