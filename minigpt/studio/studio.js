// minigpt studio: build a GPT as a graph of nodes, see its size, train it, and talk to it.
// Plain JavaScript, no frameworks. The server does every computation (parameter counts,
// memory, training); this page only draws what the server says. API: chapters/appendix-studio.md and minigpt/studio.py.

"use strict";

const NODE_WIDTH = 170;
const PORT_Y = 31; // the vertical centre of a port, from the top of its node box
const SUMMARY_DELAY_MS = 250;
const GRID_X = 220; // spacing of the tidy layout (Arrange)
const GRID_Y = 170;

const state = {
  schema: null, // {order, types} from GET /api/schema
  presets: [], // [{name, description, graph}]
  dataSources: [], // [{source, label}] from GET /api/data
  graph: { version: 1, name: "my-model", nodes: [], edges: [] },
  selectedId: null,
  armedPort: null, // id of the node whose output port was clicked, waiting for an input port
  summary: null, // the last 200 answer of /api/graph/summary
  summaryRequest: 0, // counts requests so that a slow, stale answer is ignored
  summaryTimer: null,
  run: null, // {id, source: EventSource, lastEventId, status}
  chart: { totalSteps: 0, batch: [], train: [], val: [], points: 0 },
  samples: new Map(), // epoch -> {step, text}
  runs: [],
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// Small helpers

async function fetchJson(url, options = {}) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = { error: `the server answered ${response.status} without JSON` };
  }
  return { ok: response.ok, status: response.status, body };
}

function postJson(url, data) {
  return fetchJson(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(data),
  });
}

function formatInt(n) {
  return Number(n).toLocaleString("en-US");
}

function formatMib(mib) {
  if (mib == null) return "–";
  return mib >= 1024 ? `${(mib / 1024).toFixed(2)} GiB` : `${mib.toFixed(1)} MiB`;
}

function formatSi(x) {
  if (x == null) return "–";
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [size, name] of units) {
    if (Math.abs(x) >= size) return `${(x / size).toFixed(1)} ${name}`;
  }
  return x.toFixed(0);
}

function errorText(body) {
  if (body && Array.isArray(body.errors)) return body.errors.map((e) => e.message).join("; ");
  if (body && body.error) return body.error;
  return "unknown error";
}

function makeElement(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text != null) element.textContent = text;
  return element;
}

function nodeById(id) {
  return state.graph.nodes.find((node) => node.id === id);
}

function typeInfo(type) {
  return state.schema.types[type] || { label: type, help: "", params: [] };
}

function paramVisible(param, params) {
  if (!param.when) return true;
  return Object.entries(param.when).every(([name, wanted]) =>
    Array.isArray(wanted) ? wanted.includes(params[name]) : params[name] === wanted);
}

// ---------------------------------------------------------------------------------------------
// The graph: load, add, remove

function setGraph(graph) {
  const copy = JSON.parse(JSON.stringify(graph));
  state.graph = {
    version: copy.version || 1,
    name: copy.name || "my-model",
    nodes: copy.nodes || [],
    edges: copy.edges || [],
  };
  state.selectedId = null;
  state.armedPort = null;
  state.summary = null;
  if (!layoutFits()) arrangeNodes();
  renderNodes();
  renderSidePanel();
  graphChanged();
}

/** True when every node has a position and lies inside the visible part of the canvas. */
function layoutFits() {
  const view = document.querySelector(".canvas-wrap");
  return state.graph.nodes.every((node) => Number.isFinite(node.x) && Number.isFinite(node.y)
    && node.x + NODE_WIDTH + 20 <= view.clientWidth && node.y + 100 <= view.clientHeight);
}

/** Lay the nodes out in reading order: along the chain, left to right, in rows that fit the view. */
function arrangeNodes() {
  const view = document.querySelector(".canvas-wrap");
  const perRow = Math.max(1, Math.floor((view.clientWidth - 30) / GRID_X));
  const order = state.schema.order;
  const rank = (node) => (order.includes(node.type) ? order.indexOf(node.type) : order.length);
  const nodes = [...state.graph.nodes].sort((a, b) => rank(a) - rank(b));
  nodes.forEach((node, i) => {
    node.x = 30 + (i % perRow) * GRID_X;
    node.y = 30 + Math.floor(i / perRow) * GRID_Y;
  });
}

function addNode(type) {
  const params = {};
  for (const param of typeInfo(type).params) params[param.name] = param.default;
  let id = type;
  for (let n = 2; nodeById(id); n++) id = `${type}-${n}`;
  const { x, y } = freeSpot();
  state.graph.nodes.push({ id, type, x, y, params });
  renderNodes();
  selectNode(id);
  graphChanged();
}

function removeNode(id) {
  state.graph.nodes = state.graph.nodes.filter((node) => node.id !== id);
  state.graph.edges = state.graph.edges.filter((edge) => edge.from !== id && edge.to !== id);
  if (state.selectedId === id) state.selectedId = null;
  renderNodes();
  renderSidePanel();
  graphChanged();
}

function connect(fromId, toId) {
  if (fromId === toId) return;
  // The graph is one chain: a node has at most one edge out and one edge in.
  state.graph.edges = state.graph.edges.filter((edge) => edge.from !== fromId && edge.to !== toId);
  state.graph.edges.push({ from: fromId, to: toId });
  drawEdges();
  graphChanged();
}

function removeEdge(edge) {
  state.graph.edges = state.graph.edges.filter((e) => e !== edge);
  drawEdges();
  graphChanged();
}

// ---------------------------------------------------------------------------------------------
// Drawing nodes and edges

function renderPalette() {
  const list = $("palette-list");
  list.replaceChildren();
  for (const type of state.schema.order) {
    const button = makeElement("button", "palette-item", typeInfo(type).label);
    button.type = "button";
    button.title = typeInfo(type).help || "";
    button.dataset.type = type;
    button.addEventListener("click", () => addNode(type));
    list.append(button);
  }
}

function renderNodes() {
  const layer = $("nodes");
  layer.replaceChildren();
  const first = state.schema.order[0];
  const last = state.schema.order[state.schema.order.length - 1];
  for (const node of state.graph.nodes) {
    const box = makeElement("div", "node");
    box.dataset.nodeId = node.id;
    box.dataset.type = node.type;
    if (node.type !== first) box.append(makePort(node, "in"));
    box.append(makeElement("div", "node-title", typeInfo(node.type).label));
    box.append(makeElement("div", "node-kind"));
    box.append(makeElement("div", "node-params"));
    box.append(makeElement("div", "node-note"));
    box.append(makeElement("div", "node-error"));
    if (node.type !== last) box.append(makePort(node, "out"));
    box.addEventListener("pointerdown", (event) => startDrag(event, node, box));
    layer.append(box);
    updateNodeBox(node);
  }
  drawEdges();
}

/** The first place on the layout grid that no node covers, for a new node. */
function freeSpot() {
  const view = document.querySelector(".canvas-wrap");
  const perRow = Math.max(1, Math.floor((view.clientWidth - 30) / GRID_X));
  for (let i = 0; ; i++) {
    const x = 30 + (i % perRow) * GRID_X;
    const y = 30 + Math.floor(i / perRow) * GRID_Y;
    const taken = state.graph.nodes.some((node) =>
      Math.abs(node.x - x) < NODE_WIDTH + 20 && Math.abs(node.y - y) < GRID_Y - 20);
    if (!taken) return { x, y };
  }
}

/** Grow the canvas so that every node, wherever it was dragged, can be scrolled to. */
function fitCanvas() {
  const view = document.querySelector(".canvas-wrap");
  const right = Math.max(0, ...state.graph.nodes.map((node) => node.x + NODE_WIDTH + 60));
  const bottom = Math.max(0, ...state.graph.nodes.map((node) => node.y + 160));
  $("canvas").style.width = `${Math.max(view.clientWidth, right)}px`;
  $("canvas").style.height = `${Math.max(view.clientHeight, bottom)}px`;
}

function makePort(node, direction) {
  const port = makeElement("div", `port ${direction}`);
  port.title = direction === "out" ? "Click, then click an input port to connect" : "Input";
  port.addEventListener("pointerdown", (event) => event.stopPropagation());
  port.addEventListener("click", (event) => {
    event.stopPropagation();
    clickPort(node.id, direction);
  });
  return port;
}

function clickPort(nodeId, direction) {
  if (direction === "out") {
    state.armedPort = state.armedPort === nodeId ? null : nodeId;
  } else if (state.armedPort) {
    connect(state.armedPort, nodeId);
    state.armedPort = null;
  }
  document.querySelectorAll(".port.out").forEach((port) =>
    port.classList.toggle("armed", port.parentElement.dataset.nodeId === state.armedPort));
  drawEdges();
}

/** Refresh one node box: position, its key settings, the server's parameter count and errors. */
function updateNodeBox(node) {
  const box = document.querySelector(`.node[data-node-id="${CSS.escape(node.id)}"]`);
  if (!box) return;
  box.style.left = `${node.x}px`;
  box.style.top = `${node.y}px`;
  box.classList.toggle("selected", node.id === state.selectedId);

  const shown = typeInfo(node.type).params
    .filter((param) => paramVisible(param, node.params) && node.params[param.name] != null)
    .slice(0, 3)
    .map((param) => `${param.name} ${node.params[param.name]}`);
  box.querySelector(".node-kind").textContent = shown.join(" · ");

  const counted = state.summary && state.summary.per_node.find((entry) => entry.node === node.id);
  box.querySelector(".node-params").textContent = counted && counted.params > 0 ? `${formatInt(counted.params)} params` : "";
  const note = counted && counted.note ? counted.note : "";
  box.querySelector(".node-note").textContent = shown.some((line) => line.endsWith(` ${note}`)) ? "" : note;

  const messages = (state.nodeErrors && state.nodeErrors.get(node.id)) || [];
  box.classList.toggle("has-error", messages.length > 0);
  box.querySelector(".node-error").textContent = messages.join("\n");
}

function updateAllNodeBoxes() {
  state.graph.nodes.forEach(updateNodeBox);
  drawEdges(); // boxes may have grown or shrunk
}

/** An SVG path from an output port (x1, y1) to an input port (x2, y2). An edge that goes back
    to the left (the next row of the layout) runs through the gap at `returnY` instead. */
function edgePath(x1, y1, x2, y2, returnY) {
  if (x2 >= x1 + 20 || returnY == null) {
    const bend = Math.max(30, Math.abs(x2 - x1) / 2);
    return `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`;
  }
  return `M ${x1} ${y1} C ${x1 + 40} ${y1}, ${x1 + 40} ${returnY}, ${x1} ${returnY} `
    + `L ${x2} ${returnY} C ${x2 - 40} ${returnY}, ${x2 - 40} ${y2}, ${x2} ${y2}`;
}

function boxHeight(node) {
  const box = document.querySelector(`.node[data-node-id="${CSS.escape(node.id)}"]`);
  return box ? box.offsetHeight : 70;
}

function drawEdges(mouse) {
  fitCanvas();
  const svg = $("edges");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  for (const edge of state.graph.edges) {
    const from = nodeById(edge.from);
    const to = nodeById(edge.to);
    if (!from || !to) continue;
    const below = from.y + boxHeight(from);
    const returnY = to.y > below ? (below + to.y) / 2 : Math.max(below, to.y + boxHeight(to)) + 20;
    const d = edgePath(from.x + NODE_WIDTH, from.y + PORT_Y, to.x, to.y + PORT_Y, returnY);
    // A wide invisible path under the visible one makes the edge easy to click.
    for (const className of ["hit", "line"]) {
      const path = document.createElementNS(ns, "path");
      path.setAttribute("d", d);
      path.setAttribute("class", className);
      path.dataset.from = edge.from;
      path.dataset.to = edge.to;
      path.addEventListener("click", () => removeEdge(edge));
      const title = document.createElementNS(ns, "title");
      title.textContent = "Click to remove this connection";
      path.append(title);
      svg.append(path);
    }
  }
  const armed = state.armedPort && nodeById(state.armedPort);
  if (armed && mouse) {
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", edgePath(armed.x + NODE_WIDTH, armed.y + PORT_Y, mouse.x, mouse.y));
    path.setAttribute("class", "pending");
    svg.append(path);
  }
}

function startDrag(event, node, box) {
  if (event.button !== 0) return;
  selectNode(node.id);
  const startX = event.clientX - node.x;
  const startY = event.clientY - node.y;
  box.setPointerCapture(event.pointerId);
  box.style.cursor = "grabbing";
  const move = (e) => {
    node.x = Math.max(0, Math.round(e.clientX - startX));
    node.y = Math.max(0, Math.round(e.clientY - startY));
    box.style.left = `${node.x}px`;
    box.style.top = `${node.y}px`;
    drawEdges();
  };
  const stop = () => {
    box.style.cursor = "";
    box.removeEventListener("pointermove", move);
    box.removeEventListener("pointerup", stop);
    box.removeEventListener("pointercancel", stop);
  };
  box.addEventListener("pointermove", move);
  box.addEventListener("pointerup", stop);
  box.addEventListener("pointercancel", stop);
}

function selectNode(id) {
  if (state.selectedId === id) return;
  state.selectedId = id;
  document.querySelectorAll(".node").forEach((box) =>
    box.classList.toggle("selected", box.dataset.nodeId === id));
  renderSidePanel();
}

// ---------------------------------------------------------------------------------------------
// The side panel: a form built from the schema for the selected node

function renderSidePanel() {
  const form = $("side-form");
  form.replaceChildren();
  const node = state.selectedId && nodeById(state.selectedId);
  $("delete-node").hidden = !node;
  if (!node) {
    $("side-title").textContent = "No node selected";
    $("side-help").textContent = "Click a node to edit its settings.";
    return;
  }
  const info = typeInfo(node.type);
  $("side-title").textContent = info.label;
  $("side-help").textContent = info.help || "";
  if (info.params.length === 0) form.append(makeElement("p", "hint", "This node has no settings."));
  for (const param of info.params) {
    if (!paramVisible(param, node.params)) continue;
    form.append(makeField(node, param));
    if (node.type === "data" && param.name === "source") form.append(makeUpload(node));
  }
  showFieldErrors();
}

function choicesFor(node, param) {
  const choices = [...(param.choices || [])];
  if (node.type === "data" && param.name === "source") {
    for (const entry of state.dataSources) if (!choices.includes(entry.source)) choices.push(entry.source);
  }
  const current = node.params[param.name];
  if (current != null && !choices.includes(current)) choices.push(current);
  return choices;
}

function makeField(node, param) {
  const value = node.params[param.name];
  const label = makeElement("label");
  label.dataset.field = param.name;
  const caption = param.label || param.name;
  let input;

  if (param.kind === "bool") {
    label.className = "check";
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(value);
    input.addEventListener("change", () => setParam(node, param, input.checked));
    label.append(input, caption);
  } else if (param.kind === "choice") {
    input = document.createElement("select");
    if (param.optional) input.append(new Option("(none)", ""));
    for (const choice of choicesFor(node, param)) {
      const entry = state.dataSources.find((source) => source.source === choice);
      input.append(new Option(entry && entry.label ? entry.label : choice, choice));
    }
    input.value = value == null ? "" : value;
    input.addEventListener("change", () => setParam(node, param, input.value === "" ? null : input.value));
    label.append(caption, input);
  } else {
    input = document.createElement("input");
    if (param.kind === "int" || param.kind === "float") {
      input.type = "number";
      input.step = param.kind === "int" ? "1" : "any";
      if (param.min != null) input.min = param.min;
      if (param.max != null) input.max = param.max;
    } else {
      input.type = "text";
    }
    input.value = value == null ? "" : value;
    if (param.optional) input.placeholder = "empty = automatic";
    input.addEventListener("input", () => setParam(node, param, readInput(input, param)));
    label.append(caption, input);
  }
  input.name = param.name;
  input.id = `param-${param.name}`;
  label.append(makeElement("div", "field-error"));
  return label;
}

function readInput(input, param) {
  const text = input.value.trim();
  if (text === "") return null; // optional fields: empty = null; required ones: the server says so
  if (param.kind === "int" || param.kind === "float") {
    const number = Number(text);
    return Number.isNaN(number) ? text : number;
  }
  return text;
}

function setParam(node, param, value) {
  node.params[param.name] = value;
  updateNodeBox(node);
  drawEdges();
  // Another field may appear or disappear with this value (`when`).
  const controlsOthers = typeInfo(node.type).params.some((p) => p.when && param.name in p.when);
  if (controlsOthers) renderSidePanel();
  graphChanged();
}

function makeUpload(node) {
  const wrap = makeElement("div", "upload");
  const input = document.createElement("input");
  input.type = "file";
  input.accept = ".txt,text/plain";
  input.id = "upload-file";
  const message = makeElement("div", "hint", "or upload a UTF-8 text file (at most 10 MB)");
  input.addEventListener("change", async () => {
    if (!input.files.length) return;
    const form = new FormData();
    form.append("file", input.files[0]);
    message.textContent = "uploading…";
    const answer = await fetchJson("/api/uploads", { method: "POST", body: form });
    if (!answer.ok) {
      message.textContent = errorText(answer.body);
      message.className = "error-text";
      return;
    }
    await loadDataSources();
    node.params.source = answer.body.source;
    renderSidePanel();
    updateNodeBox(node);
    graphChanged();
  });
  wrap.append(input, message);
  return wrap;
}

function showFieldErrors() {
  const errors = state.graphErrors || [];
  for (const error of errors) {
    if (error.node !== state.selectedId || !error.field) continue;
    const label = document.querySelector(`#side-form label[data-field="${CSS.escape(error.field)}"]`);
    if (label) label.querySelector(".field-error").textContent = error.message;
  }
}

// ---------------------------------------------------------------------------------------------
// The summary: ask the server after every change

function graphChanged() {
  clearTimeout(state.summaryTimer);
  state.summaryTimer = setTimeout(refreshSummary, SUMMARY_DELAY_MS);
}

async function refreshSummary() {
  const request = ++state.summaryRequest;
  let answer;
  try {
    answer = await postJson("/api/graph/summary", state.graph);
  } catch (error) {
    answer = { ok: false, body: { error: `cannot reach the server (${error.message})` } };
  }
  if (request !== state.summaryRequest) return; // a newer request is on its way
  if (answer.ok) {
    state.summary = answer.body;
    showErrors([]);
  } else {
    state.summary = null;
    const errors = answer.body.errors || [{ node: null, field: null, message: errorText(answer.body) }];
    showErrors(errors);
  }
  showSummary();
  updateAllNodeBoxes();
}

function showErrors(errors) {
  state.graphErrors = errors;
  state.nodeErrors = new Map();
  for (const error of errors) {
    if (!error.node) continue;
    const text = error.field ? `${error.field}: ${error.message}` : error.message;
    state.nodeErrors.set(error.node, [...(state.nodeErrors.get(error.node) || []), text]);
  }
  const list = $("summary-errors");
  list.replaceChildren(...errors.map((error) => {
    const label = error.node ? `${error.node}: ` : "";
    return makeElement("li", null, label + error.message);
  }));
  document.querySelectorAll("#side-form .field-error").forEach((div) => { div.textContent = ""; });
  showFieldErrors();
}

function showSummary() {
  const summary = state.summary;
  if (!summary) {
    for (const id of ["total-params", "tied-status", "weights-mib", "step-mib", "flops", "vocab"]) $(id).textContent = "–";
    return;
  }
  $("total-params").textContent = formatInt(summary.params);
  const tied = summary.params === summary.params_tied && summary.params_tied !== summary.params_untied;
  $("tied-status").textContent = tied
    ? `tied (untied would be ${formatInt(summary.params_untied)})`
    : `untied (tied would be ${formatInt(summary.params_tied)})`;
  $("weights-mib").textContent = formatMib(summary.memory.weights_mib);
  $("step-mib").textContent = formatMib(summary.memory.training_step_mib);
  $("flops").textContent = formatSi(summary.flops_per_token);
  $("vocab").textContent = formatInt(summary.vocab_size);
}

// ---------------------------------------------------------------------------------------------
// Header: presets, import, export, config dialog

function renderPresets() {
  const bar = $("presets");
  bar.replaceChildren();
  for (const preset of state.presets) {
    const button = makeElement("button", null, preset.name);
    button.type = "button";
    button.dataset.preset = preset.name;
    button.title = preset.description || "";
    button.addEventListener("click", () => loadPreset(preset.name));
    bar.append(button);
  }
}

function loadPreset(name) {
  const preset = state.presets.find((p) => p.name === name);
  if (!preset) return;
  document.querySelectorAll("[data-preset]").forEach((button) =>
    button.classList.toggle("active", button.dataset.preset === name));
  setGraph(preset.graph);
}

async function importGraph(file) {
  try {
    const graph = JSON.parse(await file.text());
    if (!Array.isArray(graph.nodes) || !Array.isArray(graph.edges)) {
      throw new Error("a graph JSON needs a list of \"nodes\" and a list of \"edges\"");
    }
    document.querySelectorAll("[data-preset]").forEach((button) => button.classList.remove("active"));
    setGraph(graph);
  } catch (error) {
    showErrors([{ node: null, field: null, message: `could not import ${file.name}: ${error.message}` }]);
  }
}

function exportGraph() {
  const blob = new Blob([JSON.stringify(state.graph, null, 2) + "\n"], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${state.graph.name || "my-model"}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function showConfig() {
  const summary = state.summary;
  const problem = "Fix the errors in the summary panel first.";
  $("config-settings").textContent = summary ? summary.settings : problem;
  $("config-command").textContent = summary ? summary.command : problem;
  $("config-dialog").showModal();
}

async function copyText(id, button) {
  const text = $(id).textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) {
    const range = document.createRange(); // clipboard API needs https or localhost: select instead
    range.selectNodeContents($(id));
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    document.execCommand("copy");
  }
  const before = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = before; }, 1200);
}

// ---------------------------------------------------------------------------------------------
// Training: start a run, follow its events, draw the loss chart

async function startTraining() {
  $("train-button").disabled = true;
  const answer = await postJson("/api/runs", { graph: state.graph });
  if (!answer.ok) {
    $("train-button").disabled = false;
    setRunStatus("could not start: " + errorText(answer.body), "failed");
    if (answer.body.errors) {
      showErrors(answer.body.errors);
      updateAllNodeBoxes();
    }
    return;
  }
  resetChart();
  followRun(answer.body.run_id);
  refreshRuns();
}

function setRunStatus(text, status) {
  const element = $("run-status");
  element.textContent = text;
  element.className = `status ${status || ""}`;
  element.dataset.status = status || "";
}

function followRun(runId) {
  if (state.run && state.run.source) state.run.source.close();
  state.run = { id: runId, source: null, lastEventId: -1, status: "running" };
  $("run-status").dataset.runId = runId;
  setRunStatus(`${runId}: starting…`, "running");
  listen();
}

/** Open the event stream of the current run. A new EventSource replays the stream from the
    beginning, so events we have already drawn (by id) are skipped. */
function listen() {
  const run = state.run;
  if (run.source) run.source.close();
  const source = new EventSource(`/api/runs/${encodeURIComponent(run.id)}/events`);
  run.source = source;
  source.onmessage = (message) => {
    const id = Number(message.lastEventId);
    if (message.lastEventId !== "" && !Number.isNaN(id)) {
      if (id <= run.lastEventId) return;
      run.lastEventId = id;
    }
    handleEvent(run, JSON.parse(message.data));
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED && state.run === run && run.status === "running") {
      setRunStatus(`${run.id}: lost the event stream`, "failed");
      updateRunButtons();
    }
  };
  updateRunButtons();
}

function handleEvent(run, event) {
  const chart = state.chart;
  if (event.type === "start") {
    run.status = "running";
    chart.totalSteps = event.total_steps || chart.totalSteps;
    setRunStatus(`${run.id}: running`, "running");
  } else if (event.type === "step") {
    chart.batch.push({ step: event.step, loss: event.batch_loss });
    if (event.train_loss != null) chart.train.push({ step: event.step, loss: event.train_loss });
    if (event.val_loss != null) chart.val.push({ step: event.step, loss: event.val_loss });
    chart.points += 1;
    $("loss-chart").dataset.points = String(chart.points);
    const total = chart.totalSteps ? `/${chart.totalSteps}` : "";
    if (run.status === "running") setRunStatus(`${run.id}: step ${event.step}${total}, epoch ${event.epoch}`, "running");
    if (event.tokens_per_sec != null) $("tokens-per-sec").textContent = `${formatInt(Math.round(event.tokens_per_sec))} tokens/s`;
    drawChart();
  } else if (event.type === "sample") {
    state.samples.set(event.epoch, { step: event.step, text: event.text });
    renderSamples();
  } else if (event.type === "end") {
    run.status = event.status;
    run.source.close();
    const metrics = event.metrics || {};
    const valLoss = metrics.final_val_loss != null ? metrics.final_val_loss : metrics.val_loss;
    const loss = valLoss != null ? ` (validation loss ${Number(valLoss).toFixed(3)})` : "";
    const error = event.error ? `: ${event.error}` : "";
    setRunStatus(`${event.status}${loss}${error}`, event.status);
    updateRunButtons();
    refreshRuns().then(() => {
      if (event.status !== "failed") $("chat-model").value = run.id;
    });
  }
}

function updateRunButtons() {
  const status = state.run ? state.run.status : null;
  $("train-button").disabled = status === "running" || status === "stopping";
  $("stop-button").disabled = status !== "running";
  $("resume-button").disabled = status !== "stopped";
}

async function stopRun() {
  if (!state.run) return;
  const answer = await postJson(`/api/runs/${encodeURIComponent(state.run.id)}/stop`, {});
  if (!answer.ok) return setRunStatus(errorText(answer.body), "failed");
  state.run.status = "stopping";
  setRunStatus(`${state.run.id}: stopping after this step…`, "stopping");
  updateRunButtons();
}

async function resumeRun() {
  if (!state.run) return;
  const answer = await postJson(`/api/runs/${encodeURIComponent(state.run.id)}/resume`, {});
  if (!answer.ok) return setRunStatus(errorText(answer.body), "failed");
  state.run.status = "running";
  setRunStatus(`${state.run.id}: resuming…`, "running");
  listen();
}

function resetChart() {
  state.chart = { totalSteps: 0, batch: [], train: [], val: [], points: 0 };
  state.samples = new Map();
  $("loss-chart").dataset.points = "0";
  $("tokens-per-sec").textContent = "";
  renderSamples();
  drawChart();
}

function renderSamples() {
  const box = $("samples");
  const epochs = [...state.samples.keys()].sort((a, b) => a - b);
  box.replaceChildren(...epochs.map((epoch) => {
    const sample = state.samples.get(epoch);
    const row = makeElement("div");
    row.append(makeElement("b", null, `epoch ${epoch}, step ${sample.step}: `), sample.text);
    return row;
  }));
  if (!epochs.length) box.append(makeElement("span", "muted", "A sample of generated text appears at the end of each epoch."));
}

/** Round numbers for axis ticks: 1, 2 or 5 times a power of ten. */
function niceTicks(min, max, count) {
  const rough = (max - min) / count || 1;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
  const ticks = [];
  for (let t = Math.ceil(min / step) * step; t <= max + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function drawChart() {
  const canvas = $("loss-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 560;
  const height = canvas.clientHeight || 240;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";

  const chart = state.chart;
  const plot = { left: 48, right: width - 12, top: 26, bottom: height - 34 };
  const all = [...chart.batch, ...chart.train, ...chart.val];
  const lastStep = all.reduce((m, p) => Math.max(m, p.step), 0);
  const xMax = Math.max(chart.totalSteps, lastStep, 1);
  let yMin = all.length ? Math.min(...all.map((p) => p.loss)) : 0;
  let yMax = all.length ? Math.max(...all.map((p) => p.loss)) : 1;
  if (yMax - yMin < 1e-6) { yMin -= 0.5; yMax += 0.5; }
  const pad = (yMax - yMin) * 0.08;
  yMin -= pad;
  yMax += pad;
  const x = (step) => plot.left + (step / xMax) * (plot.right - plot.left);
  const y = (loss) => plot.bottom - ((loss - yMin) / (yMax - yMin)) * (plot.bottom - plot.top);

  // Axes, grid lines, ticks and labels.
  ctx.strokeStyle = "#e3e7ec";
  ctx.fillStyle = "#616e7c";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const yTicks = niceTicks(yMin, yMax, 5);
  const yStep = yTicks.length > 1 ? yTicks[1] - yTicks[0] : 1;
  const decimals = Math.max(0, -Math.floor(Math.log10(yStep) + 1e-9)); // 0.5 apart: one decimal
  for (const tick of yTicks) {
    ctx.beginPath();
    ctx.moveTo(plot.left, y(tick));
    ctx.lineTo(plot.right, y(tick));
    ctx.stroke();
    ctx.fillText(tick.toFixed(decimals), plot.left - 6, y(tick));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const tick of niceTicks(0, xMax, 6).filter((t) => Number.isInteger(t))) {
    ctx.beginPath();
    ctx.moveTo(x(tick), plot.bottom);
    ctx.lineTo(x(tick), plot.bottom + 4);
    ctx.strokeStyle = "#8a97a8";
    ctx.stroke();
    ctx.fillText(String(tick), x(tick), plot.bottom + 6);
  }
  ctx.strokeStyle = "#8a97a8";
  ctx.beginPath();
  ctx.moveTo(plot.left, plot.top);
  ctx.lineTo(plot.left, plot.bottom);
  ctx.lineTo(plot.right, plot.bottom);
  ctx.stroke();
  ctx.fillText("step", (plot.left + plot.right) / 2, height - 14);
  ctx.save();
  ctx.translate(12, (plot.top + plot.bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText("loss", 0, 0);
  ctx.restore();

  // The three series: batch loss (thin line), train and validation loss (lines with points).
  const series = [
    { name: "batch loss", points: chart.batch, color: "#a9b8cc", width: 1, dots: false },
    { name: "train loss", points: chart.train, color: "#2f6fde", width: 2, dots: true },
    { name: "validation loss", points: chart.val, color: "#e8590c", width: 2, dots: true },
  ];
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = s.width;
    ctx.beginPath();
    s.points.forEach((p, i) => (i ? ctx.lineTo(x(p.step), y(p.loss)) : ctx.moveTo(x(p.step), y(p.loss))));
    ctx.stroke();
    if (s.dots) {
      for (const p of s.points) {
        ctx.beginPath();
        ctx.arc(x(p.step), y(p.loss), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  // Legend, top right.
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let legendX = plot.right - 290;
  for (const s of series) {
    ctx.fillStyle = s.color;
    ctx.fillRect(legendX, 9, 14, s.width + 1);
    ctx.fillStyle = "#1f2933";
    ctx.fillText(s.name, legendX + 18, 10);
    legendX += ctx.measureText(s.name).width + 34;
  }
  if (!all.length) {
    ctx.fillStyle = "#616e7c";
    ctx.textAlign = "center";
    ctx.fillText("Press Train: the loss curve draws here as the model learns.", (plot.left + plot.right) / 2, (plot.top + plot.bottom) / 2);
  }
}

// ---------------------------------------------------------------------------------------------
// Past runs

async function refreshRuns() {
  const answer = await fetchJson("/api/runs");
  if (!answer.ok) return;
  state.runs = answer.body.runs;
  const list = $("runs-list");
  list.replaceChildren();
  for (const run of state.runs) {
    const item = makeElement("li");
    item.dataset.runId = run.run_id;
    const loss = run.final_val_loss != null ? `val ${Number(run.final_val_loss).toFixed(3)}` : "";
    item.append(makeElement("span", null, run.run_id), makeElement("span", "muted", `${run.status} ${loss}`.trim()));
    item.addEventListener("click", () => selectRun(run.run_id));
    list.append(item);
  }
  if (!state.runs.length) list.append(makeElement("li", "muted", "No runs yet."));
  renderChatModels();
}

async function selectRun(runId) {
  document.querySelectorAll("#runs-list li").forEach((li) => li.classList.toggle("selected", li.dataset.runId === runId));
  $("chat-model").value = runId;
  const answer = await fetchJson(`/api/runs/${encodeURIComponent(runId)}`);
  const details = $("run-details");
  details.hidden = false;
  details.replaceChildren();
  if (!answer.ok) {
    details.append(makeElement("dt", null, "error"), makeElement("dd", null, errorText(answer.body)));
    return;
  }
  // The numbers of the run; the long per-step lists are what the chart draws, so they are left out.
  const shown = { run: answer.body.run_id, status: answer.body.status, ...(answer.body.metrics || {}) };
  if (answer.body.error) shown.error = answer.body.error;
  for (const [name, value] of Object.entries(shown)) {
    if (value === null || typeof value === "object") continue;
    const text = typeof value === "number" && !Number.isInteger(value) ? value.toFixed(4) : String(value);
    details.append(makeElement("dt", null, name.replaceAll("_", " ")), makeElement("dd", null, text));
  }
}

// ---------------------------------------------------------------------------------------------
// Chat: stream generated text from a trained run or GPT-2

function renderChatModels() {
  const select = $("chat-model");
  const before = select.value;
  select.replaceChildren();
  for (const run of state.runs) {
    if (run.status === "failed" || run.status === "running") continue;
    select.append(new Option(`${run.run_id} (${run.status})`, run.run_id));
  }
  select.append(new Option("gpt2 (downloaded GPT-2 weights)", "pretrained:gpt2"));
  if ([...select.options].some((option) => option.value === before)) select.value = before;
}

async function sendChat() {
  const output = $("chat-output");
  const error = $("chat-error");
  const prompt = $("chat-prompt").value;
  const model = $("chat-model").value;
  const topP = $("chat-top-p").value.trim();
  const body = {
    prompt,
    max_new_tokens: Number($("chat-max-tokens").value) || 60,
    temperature: Number($("chat-temperature").value),
    top_k: $("chat-top-k").value.trim() === "" ? null : Number($("chat-top-k").value),
    top_p: topP === "" ? null : Number(topP),
  };
  if (model === "pretrained:gpt2") body.pretrained = "gpt2";
  else body.run_id = model;

  error.textContent = "";
  output.replaceChildren(makeElement("span", "prompt", prompt));
  const generated = makeElement("span", "generated");
  output.append(generated);
  $("chat-send").disabled = true;
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      let message = `the server answered ${response.status}`;
      try { message = errorText(await response.json()); } catch (e) { /* not JSON: keep the status */ }
      error.textContent = message;
      output.replaceChildren();
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      generated.textContent += decoder.decode(value, { stream: true });
    }
    generated.textContent += decoder.decode();
  } catch (e) {
    error.textContent = `generation failed: ${e.message}`;
  } finally {
    $("chat-send").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Start up

async function loadDataSources() {
  const answer = await fetchJson("/api/data");
  if (answer.ok) state.dataSources = answer.body.sources;
}

function wireControls() {
  $("import-file").addEventListener("change", (event) => {
    if (event.target.files.length) importGraph(event.target.files[0]);
    event.target.value = "";
  });
  $("export-button").addEventListener("click", exportGraph);
  $("config-button").addEventListener("click", showConfig);
  document.querySelectorAll("[data-copy]").forEach((button) =>
    button.addEventListener("click", () => copyText(button.dataset.copy, button)));
  $("arrange-button").addEventListener("click", () => {
    arrangeNodes();
    renderNodes();
  });
  $("delete-node").addEventListener("click", () => state.selectedId && removeNode(state.selectedId));
  $("train-button").addEventListener("click", startTraining);
  $("stop-button").addEventListener("click", stopRun);
  $("resume-button").addEventListener("click", resumeRun);
  $("chat-send").addEventListener("click", sendChat);
  $("chat-temperature").addEventListener("input", (event) => { $("temperature-value").textContent = event.target.value; });

  const canvas = $("canvas");
  canvas.addEventListener("pointermove", (event) => {
    if (!state.armedPort) return;
    const rect = canvas.getBoundingClientRect();
    drawEdges({ x: event.clientX - rect.left, y: event.clientY - rect.top });
  });
  canvas.addEventListener("pointerdown", (event) => {
    if (event.target === canvas || event.target.id === "edges") {
      state.armedPort = null; // a click on empty canvas cancels a half-made connection
      document.querySelectorAll(".port.armed").forEach((port) => port.classList.remove("armed"));
      drawEdges();
      selectNode(null);
    }
  });
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
    if ((event.key === "Delete" || event.key === "Backspace") && !typing && state.selectedId) {
      event.preventDefault();
      removeNode(state.selectedId);
    }
  });
}

async function main() {
  wireControls();
  resetChart();
  const [schema, presets] = await Promise.all([fetchJson("/api/schema"), fetchJson("/api/presets"), loadDataSources()]);
  if (!schema.ok || !presets.ok) {
    showErrors([{ node: null, field: null, message: "could not load the schema or presets from the server" }]);
    return;
  }
  state.schema = schema.body;
  state.presets = presets.body.presets;
  renderPalette();
  renderPresets();
  const first = state.presets.find((p) => p.name === "gpt-mini") || state.presets[0];
  if (first) loadPreset(first.name);
  await refreshRuns();
  // After a reload, follow a run that is still training (its stream replays what it has done so far).
  const training = state.runs.find((run) => run.status === "running" || run.status === "stopping");
  if (training) followRun(training.run_id);
  document.body.dataset.ready = "true";
}

main();
