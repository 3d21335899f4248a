// minigpt studio: wire typed blocks into a graph, see its shapes and size, train it, and talk to it.
// Plain JavaScript, no frameworks, no build step. The server does every computation (checking the
// graph, shapes, parameter counts, memory, training); this page edits the graph JSON and draws what
// the server says. The graph format and the API: minigpt/graph.py, minigpt/studio.py.

"use strict";

const CSRF_HEADER = "X-Minigpt-Studio"; // minigpt/studio.py's CSRF_HEADER: every request that changes something
const NODE_WIDTH = 210;
const SUMMARY_DELAY_MS = 250;
const HISTORY_LIMIT = 200;
const COALESCE_MS = 1200; // keystrokes in one field within this time are one undo step
const DRAG_THRESHOLD = 4; // pixels a pointer moves before a press becomes a drag
const CANVAS_MARGIN = 160; // room to drag beyond the last node
const ZOOM_MIN = 0.4;
const ZOOM_MAX = 1.5;
const LOG_LINES = 400; // the training log keeps its last lines
const TRAINING = ["running", "stopping"];
const RESUMABLE = ["stopped", "interrupted"];

const state = {
  schema: null, // {types, kinds, version} from GET /api/schema
  presets: [], // [{name, description, graph}]
  dataSources: [], // [{source, label}] from GET /api/data
  graph: { version: 2, name: "my-model", nodes: [], edges: [], templates: [] },
  selection: new Set(), // ids of the selected nodes
  selectedEdge: null, // the selected edge object
  summary: null, // the last 200 answer of /api/graph/summary
  errors: [], // the last 400 answer's errors
  summaryRequest: 0, // counts requests so that a slow, stale answer is ignored
  summaryTimer: null,
  history: [], // graph snapshots (JSON text) before each edit
  future: [], // snapshots undone, for redo
  lastEdit: null, // {key, time}: coalesces typing into one undo step
  savedText: "", // the graph as last loaded or exported: "unsaved changes" compares with it
  zoom: 1,
  gesture: null, // the pointer drag in progress: palette item, node move, connection or selection box
  armed: null, // a port clicked (not dragged), waiting for a second click on a port to connect
  justDragged: false,
  quietUntil: 0, // keyboard deletes are ignored until then (right after a dialog closes)
  tab: "node",
  run: null, // {id, status, source: EventSource | null, lastEventId}
  runs: [],
  runsTimer: null,
  chart: null,
  speed: null,
  samples: new Map(), // epoch -> {step, text}
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// Small helpers: requests, numbers, elements

/** fetch, with the studio's header on every request that is not a GET (the server refuses it otherwise). */
function request(url, { method = "GET", json, body, headers = {} } = {}) {
  const options = { method, headers: { ...headers } };
  if (method !== "GET" && method !== "HEAD") options.headers[CSRF_HEADER] = "1";
  if (json !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(json);
  } else if (body !== undefined) {
    options.body = body;
  }
  return fetch(url, options);
}

/** {ok, status, body}: the answer as JSON, or a body with an error that says what happened. */
async function fetchJson(url, options = {}) {
  let response;
  try {
    response = await request(url, options);
  } catch (error) {
    return { ok: false, status: 0, body: { error: `cannot reach the studio server (${error.message}); is it still running?` } };
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (body === null || typeof body !== "object") body = { error: `the server answered ${response.status} without JSON` };
  return { ok: response.ok, status: response.status, body };
}

function postJson(url, data) {
  return fetchJson(url, { method: "POST", json: data });
}

function errorText(body) {
  if (body && Array.isArray(body.errors)) return body.errors.map((e) => e.message).join("; ");
  if (body && body.error) return body.error;
  return "unknown error";
}

function formatInt(n) {
  return Number(n).toLocaleString("en-US");
}

/** 1234 -> "1.2k", 6_400_000 -> "6.4M": parameter counts on the node faces. */
function formatCompact(n) {
  const units = [[1e9, "B"], [1e6, "M"], [1e3, "k"]];
  for (const [size, name] of units) {
    if (Math.abs(n) >= size) return `${Number((n / size).toPrecision(3))}${name}`;
  }
  return String(n);
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

function makeElement(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text != null) element.textContent = text;
  return element;
}

function makeButton(text, onClick, className) {
  const button = makeElement("button", className, text);
  button.type = "button";
  button.addEventListener("click", onClick);
  return button;
}

/** A file name from the graph's name, as the server makes it (studio.py's file_stem). */
function fileStem(name) {
  const stem = String(name || "").replace(/[^\p{L}\p{N}_.-]+/gu, "-").replace(/^[-.]+|[-.]+$/g, "").slice(0, 40);
  return stem || "model";
}

function download(blob, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 2000);
}

// ---------------------------------------------------------------------------------------------
// Messages: a banner under the tools, a toast on the canvas, a confirm dialog

function showBanner(text, kind = "error", actions = []) {
  const banner = $("banner");
  banner.className = `banner ${kind}`;
  $("banner-text").textContent = text;
  $("banner-actions").replaceChildren(...actions);
  banner.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

function showToast(text, { kind = "", actions = [], seconds = 5 } = {}) {
  const toast = $("toast");
  clearTimeout(state.toastTimer);
  toast.className = `toast ${kind}`;
  toast.replaceChildren(makeElement("span", null, text), ...actions);
  toast.hidden = false;
  if (seconds) state.toastTimer = setTimeout(() => { toast.hidden = true; }, seconds * 1000);
}

function hideToast() {
  $("toast").hidden = true;
}

/** A yes/no question in a modal dialog (never the browser's blocking confirm); resolves true for OK. */
function askConfirm(text, okLabel = "OK") {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// ---------------------------------------------------------------------------------------------
// Node types (from the server's schema) and the values of a node's settings

function typeInfo(type) {
  return state.schema.types[type] || {
    label: `unknown: ${type}`, group: "unknown", help: `the server has no node type ${type}`,
    inputs: [], outputs: [], params: [],
  };
}

function nodeById(id) {
  return state.graph.nodes.find((node) => node.id === id);
}

/** A setting's value: the node's own, else the type's default (a graph file may leave defaults out). */
function paramValue(node, name) {
  const params = node.params || {};
  if (name in params) return params[name];
  const spec = typeInfo(node.type).params.find((param) => param.name === name);
  return spec ? spec.default : undefined;
}

function paramVisible(param, node) {
  if (!param.when) return true;
  return Object.entries(param.when).every(([name, wanted]) =>
    (Array.isArray(wanted) ? wanted.includes(paramValue(node, name)) : paramValue(node, name) === wanted));
}

function portSpec(node, direction, name) {
  const ports = direction === "in" ? typeInfo(node.type).inputs : typeInfo(node.type).outputs;
  return ports.find((port) => port.name === name);
}

/** "memory (an encoder's output)" -> "memory": the words on the node; the whole label is its tooltip. */
function shortLabel(port) {
  return (port.label || port.name).replace(/\s*\(.*\)$/, "");
}

function kindWords(kind) {
  return (state.schema.kinds && state.schema.kinds[kind]) || kind;
}

function sourceLabel(source) {
  const entry = state.dataSources.find((s) => s.source === source);
  return entry ? entry.label : String(source);
}

/** The key settings of a node in a few words, so that graphs are told apart at a glance. */
function faceText(node) {
  const p = (name) => paramValue(node, name);
  const parts = [];
  switch (node.type) {
    case "data":
      return sourceLabel(p("source"));
    case "tokenizer":
      if (p("kind") === "bpe") return `BPE trained here · ${p("vocab_size")} tokens`;
      return p("kind") === "char" ? "one token per character" : "GPT-2 BPE";
    case "token_embedding":
      return `width ${p("emb_dim")}`;
    case "positional_encoding":
      return p("kind") === "rope" ? `rope · base ${p("rope_base")}` : p("kind");
    case "transformer_block":
      parts.push(`× ${p("n_layers")} blocks`, `${p("n_heads")} heads`);
      if (p("n_kv_heads")) parts.push(`${p("n_kv_heads")} kv heads`);
      parts.push(p("norm"), p("ffn"));
      if (p("ffn") === "moe") parts.push(`${p("n_experts")} experts, top ${p("moe_top_k")}`);
      if (p("ffn_hidden")) parts.push(`hidden ${p("ffn_hidden")}`);
      if (p("attn_rank")) parts.push(`rank ${p("attn_rank")}`);
      if (p("attn_tau")) parts.push("tau-gated");
      if (p("halting")) parts.push("halting");
      if (p("drop_rate")) parts.push(`dropout ${p("drop_rate")}`);
      return parts.join(" · ");
    case "attention":
      return `${p("n_heads")} heads · ${p("causal") ? "causal" : "sees the whole window"}`;
    case "feed_forward":
      return [p("ffn"), p("ffn_hidden") ? `hidden ${p("ffn_hidden")}` : null].filter(Boolean).join(" · ");
    case "encoder_layer":
      return `${p("n_heads")} heads · ${p("norm")} · ${p("causal") ? "causal" : "bidirectional"}`;
    case "decoder_layer":
      return `${p("n_heads")} heads · ${p("norm")} · cross-attention`;
    case "norm":
      return p("kind");
    case "dropout":
      return `rate ${p("rate")}`;
    case "linear":
      return `→ width ${p("out_features")}${p("activation") !== "none" ? ` · ${p("activation")}` : ""}`;
    case "conv1d":
      return `→ width ${p("out_channels")} · kernel ${p("kernel_size")} · ${p("causal") ? "causal" : "centred"}`;
    case "add":
      return "a + b";
    case "output_head":
      return p("tie_weights") ? "tied to the token embedding" : "its own matrix";
    case "next_token_loss":
      return `weight ${p("weight")}`;
    case "training_goal":
      parts.push(`context ${p("context_length")}`, `batch ${p("batch_size")}`, `lr ${p("learning_rate")}`);
      parts.push(p("max_steps") ? `${p("max_steps")} steps` : `${p("num_epochs")} epoch${p("num_epochs") === 1 ? "" : "s"}`);
      return parts.join(" · ");
    case "template":
      return `${p("template") || "(pick a template)"} × ${p("repeat")}`;
    default:
      return typeInfo(node.type).params.filter((param) => paramVisible(param, node)).slice(0, 3)
        .map((param) => `${param.name} ${p(param.name)}`).join(" · ");
  }
}

// ---------------------------------------------------------------------------------------------
// The graph: reading a file, new graphs, ids

/** A graph object checked for structure (not meaning: the server checks that), with every edge
    naming its ports; throws an Error whose message says what is wrong with the file. */
function checkedGraph(data) {
  const what = data === null ? "null" : Array.isArray(data) ? "a list" : typeof data;
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new Error(`a graph is a JSON object with "nodes" and "edges", but this file holds ${what}`);
  }
  if (!Array.isArray(data.nodes)) throw new Error("it has no list of \"nodes\": is it a graph exported by the studio?");
  if (data.edges != null && !Array.isArray(data.edges)) throw new Error("its \"edges\" must be a list");
  if (data.templates != null && !Array.isArray(data.templates)) throw new Error("its \"templates\" must be a list");
  const ids = new Set();
  data.nodes.forEach((node, i) => {
    if (node === null || typeof node !== "object" || typeof node.id !== "string" || !node.id || typeof node.type !== "string") {
      throw new Error(`node ${i + 1} needs an "id" and a "type" (text)`);
    }
    if (ids.has(node.id)) throw new Error(`two nodes have the id "${node.id}"`);
    ids.add(node.id);
    if (node.params != null && (typeof node.params !== "object" || Array.isArray(node.params))) {
      throw new Error(`node "${node.id}": its "params" must be an object`);
    }
  });
  (data.edges || []).forEach((edge, i) => {
    if (edge === null || typeof edge !== "object" || typeof edge.from !== "string" || typeof edge.to !== "string") {
      throw new Error(`edge ${i + 1} needs "from" and "to" node ids`);
    }
  });
  (data.templates || []).forEach((template, i) => {
    if (template === null || typeof template !== "object" || typeof template.name !== "string" || !Array.isArray(template.nodes)) {
      throw new Error(`template ${i + 1} needs a "name" and a list of "nodes"`);
    }
  });
  const graph = JSON.parse(JSON.stringify(data));
  graph.version = graph.version == null ? state.schema.version : graph.version;
  graph.name = typeof graph.name === "string" && graph.name.trim() ? graph.name : "my-model";
  graph.edges = graph.edges || [];
  graph.templates = graph.templates || [];
  for (const node of graph.nodes) node.params = node.params || {};
  return graph;
}

/** The ports an edge joins: a graph file may leave them out (version 1 always does), which means
    the first output and the first input of the two nodes' types, as the server reads it. */
function fromPort(edge) {
  const node = nodeById(edge.from);
  return edge.from_port || (node && typeInfo(node.type).outputs.length ? typeInfo(node.type).outputs[0].name : "");
}

function toPort(edge) {
  const node = nodeById(edge.to);
  return edge.to_port || (node && typeInfo(node.type).inputs.length ? typeInfo(node.type).inputs[0].name : "");
}

/** A fresh id for a node of `type`: the type's name, then name-2, name-3 ... */
function newNodeId(type) {
  let id = type;
  for (let n = 2; nodeById(id); n++) id = `${type}-${n}`;
  return id;
}

function defaultParams(type) {
  const params = {};
  for (const param of typeInfo(type).params) params[param.name] = param.default;
  return params;
}

/** The smallest graph that New gives: the three nodes every graph has, to wire the rest between. */
function emptyGraph() {
  const node = (type, x, y) => ({ id: type, type, x, y, params: defaultParams(type) });
  return {
    version: state.schema.version,
    name: "my-model",
    nodes: [node("data", 40, 30), node("tokenizer", 40, 130), node("training_goal", 40, 420)],
    edges: [],
    templates: [],
  };
}

function sameEdge(a, b) {
  return a.from === b.from && a.to === b.to && fromPort(a) === fromPort(b) && toPort(a) === toPort(b);
}

// ---------------------------------------------------------------------------------------------
// Undo and redo: a stack of graph snapshots, one taken before every edit

function snapshot() {
  return JSON.stringify(state.graph);
}

/** Call before changing the graph. Edits with the same `key` (typing in one field) within
    COALESCE_MS are one step. */
function recordEdit(key = null) {
  const now = Date.now();
  if (key && state.lastEdit && state.lastEdit.key === key && now - state.lastEdit.time < COALESCE_MS) {
    state.lastEdit.time = now;
    return;
  }
  state.history.push(snapshot());
  if (state.history.length > HISTORY_LIMIT) state.history.shift();
  state.future = [];
  state.lastEdit = key ? { key, time: now } : null;
  updateUndoButtons();
}

function undo() {
  if (!state.history.length) return;
  state.future.push(snapshot());
  restoreSnapshot(state.history.pop());
}

function redo() {
  if (!state.future.length) return;
  state.history.push(snapshot());
  restoreSnapshot(state.future.pop());
}

function restoreSnapshot(text) {
  hideToast(); // a question about the graph before this one
  state.graph = JSON.parse(text);
  state.lastEdit = null;
  state.selection = new Set([...state.selection].filter((id) => nodeById(id)));
  state.selectedEdge = null;
  renderAll();
  graphChanged();
}

function updateUndoButtons() {
  $("undo-button").disabled = !state.history.length;
  $("redo-button").disabled = !state.future.length;
}

function isDirty() {
  return snapshot() !== state.savedText;
}

/** Replace the whole graph (a preset, an import, New): one undo step, selection cleared. */
function setGraph(graph, { record = true } = {}) {
  if (record) recordEdit();
  state.graph = graph;
  state.selection = new Set();
  state.selectedEdge = null;
  state.armed = null;
  state.summary = null;
  state.errors = [];
  placeUnplacedNodes();
  state.savedText = snapshot();
  renderAll();
  fitView(true);
  graphChanged();
}

function renderAll() {
  $("graph-name").value = state.graph.name;
  renderPalette();
  renderNodes();
  renderSidePanel();
  updateUndoButtons();
}

// ---------------------------------------------------------------------------------------------
// Editing: add, remove, connect

function addNode(type, x, y, params = null) {
  recordEdit();
  const id = newNodeId(type === "template" ? `template-${params.template}`.replace(/[^A-Za-z0-9_-]+/g, "-") : type);
  const spot = x == null ? freeSpot() : { x: Math.max(0, Math.round(x)), y: Math.max(0, Math.round(y)) };
  state.graph.nodes.push({ id, type, x: spot.x, y: spot.y, params: params || defaultParams(type) });
  state.selection = new Set([id]);
  state.selectedEdge = null;
  renderNodes();
  renderSidePanel();
  graphChanged();
  return id;
}

function deleteSelection() {
  if (state.selectedEdge) {
    removeEdge(state.selectedEdge);
    return;
  }
  const ids = [...state.selection];
  if (!ids.length) return;
  recordEdit();
  state.graph.nodes = state.graph.nodes.filter((node) => !state.selection.has(node.id));
  state.graph.edges = state.graph.edges.filter((edge) => !state.selection.has(edge.from) && !state.selection.has(edge.to));
  state.selection = new Set();
  renderNodes();
  renderSidePanel();
  graphChanged();
  const what = ids.length === 1 ? `node ${ids[0]}` : `${ids.length} nodes`;
  showToast(`Deleted ${what}.`, { actions: [makeButton("Undo", () => { undo(); hideToast(); })] });
}

function removeEdge(edge) {
  recordEdit();
  state.graph.edges = state.graph.edges.filter((e) => e !== edge);
  state.selectedEdge = null;
  drawEdges();
  updateAllNodeBoxes();
  renderSidePanel();
  graphChanged();
}

/** Join an output port to an input port, after checking that their kinds match. An input that
    takes one edge and has one already is only replaced when the user says so. */
function tryConnect(source, target) {
  const fromNode = nodeById(source.node);
  const toNode = nodeById(target.node);
  const out = portSpec(fromNode, "out", source.port);
  const inp = portSpec(toNode, "in", target.port);
  const where = (node, port) => `${typeInfo(node.type).label}'s ${shortLabel(port)}`;
  if (fromNode === toNode) {
    showToast("A node cannot feed its own input.", { kind: "error" });
    return;
  }
  if (out.kind !== inp.kind) {
    showToast(`Cannot connect: ${where(toNode, inp)} takes ${kindWords(inp.kind)}, but ${where(fromNode, out)} `
      + `gives ${kindWords(out.kind)}.`, { kind: "error", seconds: 7 });
    return;
  }
  const edge = { from: fromNode.id, from_port: out.name, to: toNode.id, to_port: inp.name };
  if (state.graph.edges.some((e) => sameEdge(e, edge))) {
    showToast("These ports are connected already.");
    return;
  }
  const taken = state.graph.edges.filter((e) => e.to === toNode.id && toPort(e) === inp.name);
  const join = () => { // (the graph may have changed while the question was open: look again)
    recordEdit();
    if (!inp.multiple) state.graph.edges = state.graph.edges.filter((e) => !(e.to === toNode.id && toPort(e) === inp.name));
    state.graph.edges.push(edge);
    state.selectedEdge = null;
    drawEdges();
    updateAllNodeBoxes();
    graphChanged();
  };
  if (taken.length && !inp.multiple) {
    showToast(`${where(toNode, inp)} already comes from ${taken[0].from}. Replace that connection?`, {
      seconds: 0,
      actions: [makeButton("Replace", () => { hideToast(); join(); }, "primary"), makeButton("Keep it", hideToast)],
    });
    return;
  }
  join();
}

// ---------------------------------------------------------------------------------------------
// The palette: every node type by group, and the graph's templates

/** The node types in the order data flows through them: by the kinds they read and give
    (text, then token ids, hidden states, logits, losses), so the palette reads top to bottom like a model. */
function typesInFlowOrder() {
  const kinds = ["text", "ids", "hidden", "logits", "loss"];
  const rank = (ports) => (ports.length ? Math.min(...ports.map((port) => kinds.indexOf(port.kind))) + 1 : 0);
  const weight = (type) => {
    const info = typeInfo(type);
    return rank(info.inputs) * 10 + (info.outputs.length ? rank(info.outputs) : kinds.length + 1);
  };
  const types = Object.keys(state.schema.types);
  return types.map((type, i) => ({ type, i })).sort((a, b) => weight(a.type) - weight(b.type) || a.i - b.i).map((e) => e.type);
}

function renderPalette() {
  const list = $("palette-list");
  list.replaceChildren();
  const groups = new Map();
  for (const type of typesInFlowOrder()) {
    const info = typeInfo(type);
    if (type === "template") continue; // placed through a saved template, below
    if (!groups.has(info.group)) groups.set(info.group, []);
    groups.get(info.group).push(type);
  }
  for (const [group, types] of groups) {
    list.append(makeElement("h2", null, group));
    for (const type of types) {
      const info = typeInfo(type);
      const item = paletteItem(info.label, info.help || "", { type });
      item.dataset.type = type;
      list.append(item);
    }
  }
  list.append(makeElement("h2", null, "templates"));
  if (!state.graph.templates.length) {
    list.append(makeElement("p", "hint", "Select nodes and Save as template to reuse them here."));
  }
  for (const template of state.graph.templates) {
    const item = paletteItem(template.name, `${template.nodes.length} nodes: drag to place, repeat it N times`,
      { type: "template", template: template.name });
    item.dataset.template = template.name;
    const remove = makeElement("span", "remove", "×");
    remove.title = "Remove this template from the graph";
    remove.addEventListener("pointerdown", (event) => event.stopPropagation());
    remove.addEventListener("click", (event) => {
      event.stopPropagation();
      removeTemplate(template.name);
    });
    item.append(remove);
    list.append(item);
  }
}

function paletteItem(label, help, what) {
  const item = makeElement("button", "palette-item");
  item.type = "button";
  item.title = help;
  item.append(makeElement("span", null, label));
  item.addEventListener("pointerdown", (event) => startPaletteDrag(event, what, label));
  item.addEventListener("click", () => {
    if (state.justDragged) return;
    placeFromPalette(what);
  });
  return item;
}

function placeFromPalette(what, x, y) {
  const params = what.type === "template" ? { ...defaultParams("template"), template: what.template } : null;
  addNode(what.type, x, y, params);
}

function removeTemplate(name) {
  const users = state.graph.nodes.filter((node) => node.type === "template" && paramValue(node, "template") === name);
  if (users.length) {
    showToast(`Template ${name} is placed as ${users.map((n) => n.id).join(", ")}; delete those nodes first.`, { kind: "error" });
    return;
  }
  recordEdit();
  state.graph.templates = state.graph.templates.filter((t) => t.name !== name);
  renderPalette();
  graphChanged();
}

// ---------------------------------------------------------------------------------------------
// Drawing nodes

function nodeBox(node) {
  return document.querySelector(`.node[data-node-id="${CSS.escape(node.id)}"]`);
}

function renderNodes() {
  const layer = $("nodes");
  layer.replaceChildren();
  for (const node of state.graph.nodes) layer.append(makeNodeBox(node));
  updateAllNodeBoxes();
}

function makeNodeBox(node) {
  const info = typeInfo(node.type);
  const box = makeElement("div", "node");
  box.dataset.nodeId = node.id;
  box.dataset.type = node.type;
  box.title = `${node.id}: ${info.help || ""}`;
  const head = makeElement("div", "node-head");
  head.append(makeElement("span", "node-title", node.type === "template" ? "Template" : info.label),
    makeElement("span", "node-params"));
  // Inputs down the left edge, outputs down the right, the key settings between them.
  const body = makeElement("div", "node-body");
  const ins = makeElement("div", "ports-in");
  const outs = makeElement("div", "ports-out");
  for (const port of info.inputs) ins.append(makePortRow(node, "in", port));
  for (const port of info.outputs) outs.append(makePortRow(node, "out", port));
  body.append(ins, makeElement("div", "node-face"), outs);
  box.append(head, body, makeElement("div", "node-error"));
  box.addEventListener("pointerdown", (event) => startNodeGesture(event, node.id));
  return box;
}

function makePortRow(node, direction, port) {
  const row = makeElement("div", `port-row ${direction}`);
  row.dataset.port = port.name;
  const dot = makeElement("span", `port ${direction}`);
  dot.dataset.port = port.name;
  dot.dataset.kind = port.kind;
  dot.dataset.direction = direction;
  dot.dataset.nodeId = node.id;
  dot.title = `${port.label}: ${kindWords(port.kind)}${port.multiple ? " (takes several)" : ""}`
    + (direction === "out" ? ". Drag to an input port to connect." : ". Drag from an output port to here.");
  dot.addEventListener("pointerdown", (event) => startConnectGesture(event, node.id, direction, port));
  row.append(dot, makeElement("span", "port-label", shortLabel(port)));
  row.title = dot.title;
  return row;
}

/** Refresh one node box: position, selection, its key settings, the server's count and errors. */
function updateNodeBox(node) {
  const box = nodeBox(node);
  if (!box) return;
  box.style.left = `${node.x}px`;
  box.style.top = `${node.y}px`;
  box.classList.toggle("selected", state.selection.has(node.id));
  box.querySelector(".node-face").textContent = faceText(node);

  const counted = state.summary ? state.summary.per_node.filter((entry) => entry.node === node.id) : [];
  const params = counted.reduce((sum, entry) => sum + (entry.params || 0), 0);
  const countText = box.querySelector(".node-params");
  countText.textContent = params > 0 ? formatCompact(params) : "";
  countText.title = counted.length ? `${formatInt(params)} parameters${counted[0].note ? `; ${counted[0].note}` : ""}` : "";

  const mine = state.errors.filter((error) => error.node === node.id);
  box.classList.toggle("has-error", mine.length > 0);
  box.querySelector(".node-error").textContent = mine.map((error) => error.message).join("\n");
  box.querySelectorAll(".port").forEach((dot) => {
    const direction = dot.dataset.direction;
    const name = dot.dataset.port;
    const connected = state.graph.edges.some((edge) => (direction === "in"
      ? edge.to === node.id && toPort(edge) === name : edge.from === node.id && fromPort(edge) === name));
    dot.classList.toggle("connected", connected);
    const portError = mine.find((error) => error.port === name && (direction === "in"
      || !portSpec(node, "in", name)));
    dot.classList.toggle("port-error", Boolean(portError));
    dot.parentElement.classList.toggle("port-error", Boolean(portError));
  });
}

function updateAllNodeBoxes() {
  state.graph.nodes.forEach(updateNodeBox);
  drawEdges(); // boxes may have grown or shrunk
}

// ---------------------------------------------------------------------------------------------
// Drawing edges: a curve from an output port to an input port, labelled with its shape

/** The centre of a port's dot in canvas coordinates (before the zoom). */
function portPoint(nodeId, direction, portName) {
  const node = nodeById(nodeId);
  const box = node && nodeBox(node);
  const dot = box && box.querySelector(`.port.${direction}[data-port="${CSS.escape(portName)}"]`);
  if (!dot) return null;
  let x = dot.offsetWidth / 2;
  let y = dot.offsetHeight / 2;
  for (let element = dot; element && element !== box; element = element.offsetParent) {
    x += element.offsetLeft;
    y += element.offsetTop;
  }
  return { x: node.x + box.clientLeft + x, y: node.y + box.clientTop + y };
}

function boxExtent(nodeId) {
  const node = nodeById(nodeId);
  const box = node && nodeBox(node);
  return { top: node.y, bottom: node.y + (box ? box.offsetHeight : 60) };
}

/** A path from `a` (an output, on a node's right) to `b` (an input, on a node's left) and the
    point to put its label at. An edge that runs backwards (to a node left of its source) goes
    around, through the gap between the two boxes. */
function edgeGeometry(a, b, fromId, toId) {
  if (b.x >= a.x + 36) {
    const bend = Math.max(30, (b.x - a.x) / 2);
    const d = `M ${a.x} ${a.y} C ${a.x + bend} ${a.y}, ${b.x - bend} ${b.y}, ${b.x} ${b.y}`;
    return { d, label: { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 5, anchor: "middle" } };
  }
  if (b.x >= a.x + 10) { // a node just right of its source, above or below it: one step
    const middle = (a.x + b.x) / 2;
    const d = roundedPath([[a.x, a.y], [middle, a.y], [middle, b.y], [b.x, b.y]], 5);
    return { d, label: { x: middle + 5, y: (a.y + b.y) / 2 + 3, anchor: "start" } };
  }
  const source = boxExtent(fromId);
  const target = toId ? boxExtent(toId) : { top: b.y, bottom: b.y };
  let gapY;
  if (target.top >= source.bottom + 8) gapY = (source.bottom + target.top) / 2;
  else if (source.top >= target.bottom + 8) gapY = (target.bottom + source.top) / 2;
  else gapY = Math.max(source.bottom, target.bottom) + 16;
  const right = a.x + 16;
  const left = b.x - 16;
  const d = roundedPath([[a.x, a.y], [right, a.y], [right, gapY], [left, gapY], [left, b.y], [b.x, b.y]], 6);
  return { d, label: { x: (right + left) / 2, y: gapY - 4, anchor: "middle" } };
}

/** An SVG path through `points` with corners rounded to `radius`. */
function roundedPath(points, radius) {
  let d = `M ${points[0][0]} ${points[0][1]}`;
  for (let i = 1; i < points.length - 1; i++) {
    const [x0, y0] = points[i - 1];
    const [x1, y1] = points[i];
    const [x2, y2] = points[i + 1];
    const r = Math.min(radius, Math.hypot(x1 - x0, y1 - y0) / 2, Math.hypot(x2 - x1, y2 - y1) / 2);
    const before = [x1 - Math.sign(x1 - x0) * r, y1 - Math.sign(y1 - y0) * r];
    const after = [x1 + Math.sign(x2 - x1) * r, y1 + Math.sign(y2 - y1) * r];
    d += ` L ${before[0]} ${before[1]} Q ${x1} ${y1}, ${after[0]} ${after[1]}`;
  }
  const last = points[points.length - 1];
  return `${d} L ${last[0]} ${last[1]}`;
}

/** The shape the server gives an edge ("B x T x 128"). The server names a template's copies
    "<template node>/<copy>/<inner node>", so an edge into or out of a template node is matched by
    that prefix; failing that, by its source (an output's value is the same whichever input it feeds). */
function edgeShape(edge) {
  if (!state.summary || !state.summary.edges) return null;
  const shapes = state.summary.edges;
  const end = (id, canvasId) => id === canvasId || id.startsWith(`${canvasId}/`);
  const found = shapes.find((e) => end(e.from, edge.from) && end(e.to, edge.to)
      && (e.from !== edge.from || e.from_port === fromPort(edge)) && (e.to !== edge.to || e.to_port === toPort(edge)))
    || shapes.find((e) => e.from === edge.from && e.from_port === fromPort(edge));
  return found || null;
}

function kindColor(kind) {
  return getComputedStyle(document.documentElement).getPropertyValue(`--kind-${kind}`).trim() || "#8a97a8";
}

function drawEdges() {
  sizeCanvas();
  const svg = $("edges");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  for (const edge of state.graph.edges) {
    const a = portPoint(edge.from, "out", fromPort(edge));
    const b = portPoint(edge.to, "in", toPort(edge));
    if (!a || !b) continue;
    const fromNode = nodeById(edge.from);
    const spec = portSpec(fromNode, "out", fromPort(edge));
    const { d, label } = edgeGeometry(a, b, edge.from, edge.to);
    const group = document.createElementNS(ns, "g");
    group.setAttribute("class", `edge${edge === state.selectedEdge ? " selected" : ""}`);
    group.dataset.from = edge.from;
    group.dataset.to = edge.to;
    group.dataset.fromPort = fromPort(edge);
    group.dataset.toPort = toPort(edge);
    const hit = document.createElementNS(ns, "path");
    hit.setAttribute("d", d);
    hit.setAttribute("class", "hit");
    hit.addEventListener("pointerdown", (event) => {
      event.stopPropagation();
      event.preventDefault();
      selectEdge(edge);
    });
    const title = document.createElementNS(ns, "title");
    title.textContent = `${edge.from}.${fromPort(edge)} → ${edge.to}.${toPort(edge)}: click to select, Delete to remove`;
    hit.append(title);
    const line = document.createElementNS(ns, "path");
    line.setAttribute("d", d);
    line.setAttribute("class", "line");
    line.setAttribute("stroke", kindColor(spec ? spec.kind : "hidden"));
    group.append(hit, line);
    const shape = edgeShape(edge);
    if (shape) {
      const text = document.createElementNS(ns, "text");
      text.setAttribute("x", label.x);
      text.setAttribute("y", label.y);
      text.setAttribute("text-anchor", label.anchor);
      text.setAttribute("class", "edge-shape");
      text.textContent = shape.shape;
      group.append(text);
    }
    svg.append(group);
  }
  const gesture = state.gesture;
  if (gesture && gesture.kind === "connect" && gesture.moved && gesture.pointer) {
    const start = portPoint(gesture.node, gesture.direction, gesture.port.name);
    const [a, b] = gesture.direction === "out" ? [start, gesture.pointer] : [gesture.pointer, start];
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", edgeGeometry(a, b, gesture.direction === "out" ? gesture.node : null, null).d);
    path.setAttribute("class", "pending");
    svg.append(path);
  }
}

// ---------------------------------------------------------------------------------------------
// The canvas: its size, zoom, and laying nodes out

/** Grow the canvas so that every node, wherever it was dragged, can be scrolled to. */
function sizeCanvas() {
  const view = $("canvas-wrap");
  let right = 0;
  let bottom = 0;
  for (const node of state.graph.nodes) {
    const box = nodeBox(node);
    right = Math.max(right, node.x + NODE_WIDTH);
    bottom = Math.max(bottom, node.y + (box ? box.offsetHeight : 70));
  }
  const width = Math.max(view.clientWidth / state.zoom, right + CANVAS_MARGIN);
  const height = Math.max(view.clientHeight / state.zoom, bottom + CANVAS_MARGIN);
  const canvas = $("canvas");
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  canvas.style.transform = `scale(${state.zoom})`;
  $("edges").setAttribute("width", width);
  $("edges").setAttribute("height", height);
  $("canvas-sizer").style.width = `${Math.ceil(width * state.zoom)}px`;
  $("canvas-sizer").style.height = `${Math.ceil(height * state.zoom)}px`;
}

function setZoom(zoom) {
  state.zoom = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, zoom));
  drawEdges();
}

/** Zoom so that the whole graph shows; with `onlyShrink`, a graph that fits stays at 100%. */
function fitView(onlyShrink = false) {
  const view = $("canvas-wrap");
  if (!state.graph.nodes.length) return setZoom(1);
  const right = Math.max(...state.graph.nodes.map((node) => node.x + NODE_WIDTH)) + 30;
  const bottom = Math.max(...state.graph.nodes.map((node) => node.y + (nodeBox(node) ? nodeBox(node).offsetHeight : 70))) + 30;
  const fit = Math.min(view.clientWidth / right, view.clientHeight / bottom);
  setZoom(onlyShrink ? Math.min(1, fit) : Math.min(1.2, fit));
  view.scrollTo(0, 0);
}

/** Canvas coordinates (before the zoom) of a point on the screen. */
function canvasPoint(clientX, clientY) {
  const rect = $("canvas").getBoundingClientRect();
  return { x: (clientX - rect.left) / state.zoom, y: (clientY - rect.top) / state.zoom };
}

/** The first place on a grid, inside the part of the canvas in view, that no node covers. */
function freeSpot() {
  const view = $("canvas-wrap");
  const left = view.scrollLeft / state.zoom + 30;
  const top = view.scrollTop / state.zoom + 20;
  const columns = Math.max(1, Math.floor((view.clientWidth / state.zoom - 40) / (NODE_WIDTH + 30)));
  for (let i = 0; ; i++) {
    const x = left + (i % columns) * (NODE_WIDTH + 30);
    const y = top + Math.floor(i / columns) * 90;
    const taken = state.graph.nodes.some((node) => Math.abs(node.x - x) < NODE_WIDTH + 10 && Math.abs(node.y - y) < 80);
    if (!taken) return { x: Math.round(x), y: Math.round(y) };
  }
}

/** Nodes of a graph file that has no positions: all of them laid out, or a few put beside a
    node they are joined to (an upgraded version-1 graph gains a loss node). */
function placeUnplacedNodes() {
  const placed = (node) => Number.isFinite(node.x) && Number.isFinite(node.y);
  const missing = state.graph.nodes.filter((node) => !placed(node));
  if (!missing.length) return;
  if (missing.length === state.graph.nodes.length) {
    arrangeNodes();
    return;
  }
  for (const node of missing) {
    const edge = state.graph.edges.find((e) => (e.to === node.id && placed(nodeById(e.from) || {}))
      || (e.from === node.id && placed(nodeById(e.to) || {})));
    const neighbour = edge && nodeById(edge.to === node.id ? edge.from : edge.to);
    const x = neighbour ? neighbour.x + NODE_WIDTH + 40 : 40;
    let y = neighbour ? neighbour.y : 20;
    while (state.graph.nodes.some((other) => other !== node && placed(other) && Math.abs(other.x - x) < NODE_WIDTH
      && Math.abs(other.y - y) < 70)) y += 80;
    node.x = x;
    node.y = y;
  }
}

/** Lay the nodes out in rows by how far data has flowed to reach them (each row below the rows it reads). */
function arrangeNodes() {
  const depth = new Map(state.graph.nodes.map((node) => [node.id, 0]));
  for (let pass = 0; pass < state.graph.nodes.length; pass++) { // longest path; a cycle stops after n passes
    let changed = false;
    for (const edge of state.graph.edges) {
      if (!depth.has(edge.from) || !depth.has(edge.to)) continue;
      if (depth.get(edge.to) < depth.get(edge.from) + 1) {
        depth.set(edge.to, depth.get(edge.from) + 1);
        changed = true;
      }
    }
    if (!changed) break;
  }
  const rows = new Map();
  for (const node of state.graph.nodes) {
    const row = depth.get(node.id);
    if (!rows.has(row)) rows.set(row, []);
    rows.get(row).push(node);
  }
  for (const [row, nodes] of rows) {
    nodes.forEach((node, i) => {
      node.x = 40 + i * (NODE_WIDTH + 40) + (row % 2) * 60;
      node.y = 20 + row * 95;
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Pointer gestures: drag from the palette, move nodes, connect ports, select with a box.
// Pointer events (not HTML5 drag and drop) so that mouse, pen, touch and test drivers all work.

function beginGesture(event, gesture) {
  state.gesture = { startX: event.clientX, startY: event.clientY, moved: false, ...gesture };
  window.addEventListener("pointermove", moveGesture);
  window.addEventListener("pointerup", endGesture);
  window.addEventListener("pointercancel", cancelGesture);
}

function finishGesture() {
  window.removeEventListener("pointermove", moveGesture);
  window.removeEventListener("pointerup", endGesture);
  window.removeEventListener("pointercancel", cancelGesture);
  document.querySelectorAll(".port.compatible, .port.incompatible").forEach((dot) =>
    dot.classList.remove("compatible", "incompatible"));
  const ghost = document.querySelector(".palette-ghost");
  if (ghost) ghost.remove();
  $("select-box").hidden = true;
  state.gesture = null;
}

function cancelGesture() {
  finishGesture();
  drawEdges();
}

function moveGesture(event) {
  const gesture = state.gesture;
  if (!gesture) return;
  if (!gesture.moved && Math.hypot(event.clientX - gesture.startX, event.clientY - gesture.startY) < DRAG_THRESHOLD) return;
  const first = !gesture.moved;
  gesture.moved = true;
  if (gesture.kind === "palette") {
    let ghost = document.querySelector(".palette-ghost");
    if (!ghost) {
      ghost = makeElement("div", "palette-ghost", gesture.label);
      document.body.append(ghost);
    }
    ghost.style.left = `${event.clientX + 6}px`;
    ghost.style.top = `${event.clientY + 6}px`;
  } else if (gesture.kind === "move") {
    if (first) recordEdit();
    const dx = (event.clientX - gesture.startX) / state.zoom;
    const dy = (event.clientY - gesture.startY) / state.zoom;
    for (const [id, start] of gesture.starts) {
      const node = nodeById(id);
      node.x = Math.max(0, Math.round(start.x + dx));
      node.y = Math.max(0, Math.round(start.y + dy));
      updateNodeBox(node);
    }
    drawEdges();
  } else if (gesture.kind === "connect") {
    if (first) markCompatiblePorts(gesture);
    gesture.pointer = canvasPoint(event.clientX, event.clientY);
    drawEdges();
  } else if (gesture.kind === "box") {
    const now = canvasPoint(event.clientX, event.clientY);
    const box = $("select-box");
    gesture.rect = {
      left: Math.min(now.x, gesture.origin.x), top: Math.min(now.y, gesture.origin.y),
      right: Math.max(now.x, gesture.origin.x), bottom: Math.max(now.y, gesture.origin.y),
    };
    Object.assign(box.style, {
      left: `${gesture.rect.left}px`, top: `${gesture.rect.top}px`,
      width: `${gesture.rect.right - gesture.rect.left}px`, height: `${gesture.rect.bottom - gesture.rect.top}px`,
    });
    box.hidden = false;
  }
}

function endGesture(event) {
  const gesture = state.gesture;
  finishGesture();
  if (!gesture) return;
  if (gesture.kind === "palette" && gesture.moved) {
    state.justDragged = true; // the click that may follow this release is not a click-to-add
    setTimeout(() => { state.justDragged = false; }, 0);
    // A drop anywhere over the canvas area counts (the problems list above it too), at the nearest point of the canvas.
    const area = document.querySelector(".canvas-area").getBoundingClientRect();
    const view = $("canvas-wrap").getBoundingClientRect();
    const inside = event.clientX >= area.left && event.clientX <= area.right
      && event.clientY >= area.top && event.clientY <= area.bottom;
    if (inside) {
      const at = canvasPoint(Math.min(Math.max(event.clientX, view.left + 20), view.right - 20),
        Math.min(Math.max(event.clientY, view.top + 12), view.bottom - 12));
      placeFromPalette(gesture.what, at.x - 20, at.y - 12);
      $("canvas-wrap").focus({ preventScroll: true });
    }
  } else if (gesture.kind === "move" && gesture.moved) {
    graphChanged({ summary: false }); // positions are part of the graph (its export), not of its numbers
  } else if (gesture.kind === "connect") {
    endConnect(gesture, event);
  } else if (gesture.kind === "box") {
    if (gesture.moved && gesture.rect) {
      const r = gesture.rect;
      const inside = state.graph.nodes.filter((node) => {
        const box = nodeBox(node);
        const height = box ? box.offsetHeight : 60;
        return node.x < r.right && node.x + NODE_WIDTH > r.left && node.y < r.bottom && node.y + height > r.top;
      });
      const chosen = gesture.additive ? new Set(state.selection) : new Set();
      inside.forEach((node) => chosen.add(node.id));
      setSelection(chosen);
    } else if (!gesture.additive) {
      setSelection(new Set());
      state.armed = null;
    }
  }
  drawEdges();
}

function startPaletteDrag(event, what, label) {
  if (event.button !== 0) return;
  event.preventDefault();
  beginGesture(event, { kind: "palette", what, label });
}

function startNodeGesture(event, nodeId) {
  if (event.button !== 0) return;
  state.quietUntil = 0; // a press on the canvas: the keyboard is the user's again
  event.preventDefault();
  $("canvas-wrap").focus({ preventScroll: true });
  if (event.shiftKey || event.ctrlKey || event.metaKey) { // add to (or take from) the selection
    const chosen = new Set(state.selection);
    if (chosen.has(nodeId)) chosen.delete(nodeId);
    else chosen.add(nodeId);
    setSelection(chosen);
    return;
  }
  if (!state.selection.has(nodeId)) setSelection(new Set([nodeId]));
  else if (state.selectedEdge) selectEdge(null);
  showTab("node");
  const starts = new Map([...state.selection].map((id) => [id, { x: nodeById(id).x, y: nodeById(id).y }]));
  beginGesture(event, { kind: "move", starts });
}

function startConnectGesture(event, nodeId, direction, port) {
  if (event.button !== 0) return;
  state.quietUntil = 0; // a press on the canvas: the keyboard is the user's again
  event.preventDefault();
  event.stopPropagation();
  $("canvas-wrap").focus({ preventScroll: true });
  beginGesture(event, { kind: "connect", node: nodeId, direction, port });
}

function startBoxGesture(event) {
  if (event.button !== 0) return;
  const onBackground = event.target === $("canvas-wrap") || event.target === $("canvas-sizer")
    || event.target === $("canvas") || event.target === $("edges") || event.target === $("nodes");
  if (!onBackground) return;
  event.preventDefault();
  state.quietUntil = 0;
  $("canvas-wrap").focus({ preventScroll: true });
  hideToast();
  beginGesture(event, { kind: "box", origin: canvasPoint(event.clientX, event.clientY), additive: event.shiftKey });
}

/** While a connection is dragged: ports of the other direction and the same kind light up, the rest fade. */
function markCompatiblePorts(gesture) {
  const wanted = gesture.direction === "out" ? "in" : "out";
  document.querySelectorAll(".port").forEach((dot) => {
    const { nodeId, port, direction, kind } = dot.dataset;
    if (nodeId === gesture.node && port === gesture.port.name && direction === gesture.direction) return;
    const fits = direction === wanted && kind === gesture.port.kind && nodeId !== gesture.node;
    dot.classList.toggle("compatible", fits);
    dot.classList.toggle("incompatible", !fits);
  });
}

/** The port a connection was dropped on: a dot or its label, or else the first fitting port of the
    node box under the pointer (an unconnected one first). */
function dropTarget(gesture, event) {
  const wanted = gesture.direction === "out" ? "in" : "out";
  const element = document.elementFromPoint(event.clientX, event.clientY);
  if (!element) return null;
  const row = element.closest(".port-row");
  if (row) {
    const dot = row.querySelector(".port");
    return { node: dot.dataset.nodeId, direction: dot.dataset.direction, port: dot.dataset.port };
  }
  const box = element.closest(".node");
  if (!box) return null;
  const node = nodeById(box.dataset.nodeId);
  const ports = wanted === "in" ? typeInfo(node.type).inputs : typeInfo(node.type).outputs;
  const fitting = ports.filter((port) => port.kind === gesture.port.kind);
  const free = fitting.find((port) => !state.graph.edges.some((edge) => (wanted === "in"
    ? edge.to === node.id && toPort(edge) === port.name : edge.from === node.id && fromPort(edge) === port.name)));
  const port = free || fitting[0] || ports[0];
  return port ? { node: node.id, direction: wanted, port: port.name } : null;
}

function endConnect(gesture, event) {
  const start = { node: gesture.node, direction: gesture.direction, port: gesture.port.name };
  if (!gesture.moved) { // a click: remember the port, and connect on a click on a second one
    if (state.armed && state.armed.direction !== start.direction) {
      connectEnds(state.armed, start);
      state.armed = null;
    } else {
      state.armed = start;
      showToast("Now click (or drag to) a port on another node to connect it.", { seconds: 4 });
    }
    markArmed();
    return;
  }
  state.armed = null;
  markArmed();
  const target = dropTarget(gesture, event);
  if (!target) return;
  if (target.node === start.node && target.port === start.port && target.direction === start.direction) return;
  if (target.direction === start.direction) {
    const both = start.direction === "in" ? "inputs" : "outputs";
    showToast(`Connect an output (on a node's right) to an input (on a node's left), not two ${both}.`, { kind: "error" });
    return;
  }
  connectEnds(start, target);
}

function connectEnds(a, b) {
  const [source, target] = a.direction === "out" ? [a, b] : [b, a];
  tryConnect(source, target);
}

function markArmed() {
  const armed = state.armed;
  document.querySelectorAll(".port").forEach((dot) => dot.classList.toggle("armed", Boolean(armed)
    && dot.dataset.nodeId === armed.node && dot.dataset.port === armed.port && dot.dataset.direction === armed.direction));
}

// ---------------------------------------------------------------------------------------------
// Selection and the keyboard

function setSelection(ids) {
  state.selection = ids;
  state.selectedEdge = null;
  state.graph.nodes.forEach(updateNodeBox);
  drawEdges();
  renderSidePanel();
}

function selectEdge(edge) {
  state.selectedEdge = edge;
  state.selection = new Set();
  state.graph.nodes.forEach(updateNodeBox);
  drawEdges();
  renderSidePanel();
  if (edge) showTab("node");
  $("canvas-wrap").focus({ preventScroll: true });
}

function isTyping(element) {
  return Boolean(element) && (["INPUT", "TEXTAREA", "SELECT"].includes(element.tagName) || element.isContentEditable);
}

function onKeyDown(event) {
  const typing = isTyping(document.activeElement);
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && (key === "z" || key === "y")) {
    if (typing || document.querySelector("dialog[open]")) return; // a field's own undo
    event.preventDefault();
    if (key === "y" || event.shiftKey) redo();
    else undo();
    return;
  }
  if (event.key === "Escape") {
    if (state.gesture) cancelGesture();
    state.armed = null;
    markArmed();
    closePresetMenu();
    return;
  }
  if (event.key !== "Delete" && event.key !== "Backspace") return;
  // Deleting nodes only when the canvas itself has the focus: never from a text field, a button,
  // or the key press that closed a dialog.
  if (typing || document.activeElement !== $("canvas-wrap") || Date.now() < state.quietUntil) return;
  if (!state.selection.size && !state.selectedEdge) return;
  event.preventDefault();
  deleteSelection();
}

// ---------------------------------------------------------------------------------------------
// The Node tab: a form built from the schema for one node; templates from several

function renderSidePanel() {
  const form = $("side-form");
  form.replaceChildren();
  const actions = $("side-actions");
  actions.replaceChildren();
  $("template-form").hidden = true;
  const ids = [...state.selection].filter((id) => nodeById(id));
  if (state.selectedEdge) {
    const edge = state.selectedEdge;
    const shape = edgeShape(edge);
    $("side-title").textContent = "Connection";
    $("side-help").textContent = `${edge.from} (${fromPort(edge)}) → ${edge.to} (${toPort(edge)})`
      + (shape ? `: ${shape.shape}` : "");
    actions.append(makeButton("Delete connection", () => removeEdge(edge), "danger"));
    return;
  }
  if (!ids.length) {
    $("side-title").textContent = "No node selected";
    $("side-help").textContent = "Click a node to edit its settings; shift-click or drag a box on the empty canvas to select "
      + "several (and save them as a template). Click a connection to select it. Delete removes what is selected; "
      + "Ctrl+Z undoes, Ctrl+Shift+Z redoes.";
    return;
  }
  if (ids.length === 1) {
    const node = nodeById(ids[0]);
    const info = typeInfo(node.type);
    $("side-title").textContent = `${info.label} · ${node.id}`;
    $("side-help").textContent = info.help || "";
    const shown = info.params.filter((param) => paramVisible(param, node));
    if (!shown.length) form.append(makeElement("p", "hint", "This node has no settings."));
    for (const param of shown) {
      form.append(makeField(node, param));
      if (node.type === "data" && param.name === "source") form.append(makeUpload(node));
    }
    if (node.type === "template") form.append(templateContents(paramValue(node, "template")));
    actions.append(makeButton("Delete node", deleteSelection, "danger"));
    showFieldErrors();
  } else {
    $("side-title").textContent = `${ids.length} nodes selected`;
    $("side-help").textContent = "Shift-click a node to add it to the selection or take it out.";
    const list = makeElement("ul", "selection-list");
    for (const id of ids) list.append(makeElement("li", null, `${id} (${typeInfo(nodeById(id).type).label})`));
    form.append(list);
    actions.append(makeButton(`Delete ${ids.length} nodes`, deleteSelection, "danger"));
  }
  renderTemplateForm(ids);
}

function choicesFor(node, param) {
  const choices = [...(param.choices || [])];
  if (node.type === "data" && param.name === "source") {
    for (const entry of state.dataSources) if (!choices.includes(entry.source)) choices.push(entry.source);
  }
  if (node.type === "template" && param.name === "template") {
    for (const template of state.graph.templates) if (!choices.includes(template.name)) choices.push(template.name);
  }
  const current = paramValue(node, param.name);
  if (current != null && current !== "" && !choices.includes(current)) choices.push(current);
  return choices;
}

function makeField(node, param) {
  const value = paramValue(node, param.name);
  const label = makeElement("label");
  label.dataset.field = param.name;
  const caption = param.label || param.name;
  let input;
  const listed = param.kind === "choice" || (node.type === "template" && param.name === "template");
  if (param.kind === "bool") {
    label.className = "check";
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(value);
    input.addEventListener("change", () => setParam(node, param, input.checked));
    label.append(input, caption);
  } else if (listed) {
    input = document.createElement("select");
    if (param.optional) input.append(new Option("(none)", ""));
    for (const choice of choicesFor(node, param)) input.append(new Option(sourceLabel(choice), choice));
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
  recordEdit(`param ${node.id} ${param.name}`);
  node.params[param.name] = value;
  updateNodeBox(node);
  drawEdges();
  // Another field may appear or disappear with this value (`when`).
  if (typeInfo(node.type).params.some((p) => p.when && param.name in p.when)) renderSidePanel();
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
    const file = input.files[0];
    message.className = "hint";
    message.textContent = "uploading…";
    const send = (replace) => {
      const form = new FormData();
      form.append("file", file);
      return fetchJson(`/api/uploads${replace ? "?replace=1" : ""}`, { method: "POST", body: form });
    };
    let answer = await send(false);
    if (answer.status === 409 && await askConfirm(`${errorText(answer.body)} Replace it with this file?`, "Replace")) {
      answer = await send(true);
    }
    input.value = "";
    if (!answer.ok) {
      message.textContent = errorText(answer.body);
      message.className = "error-text";
      return;
    }
    await loadDataSources();
    setParam(node, { name: "source" }, answer.body.source);
    renderSidePanel();
  });
  wrap.append(input, message);
  return wrap;
}

function showFieldErrors() {
  for (const error of state.errors) {
    if (!state.selection.has(error.node) || state.selection.size !== 1 || !error.field) continue;
    const label = document.querySelector(`#side-form label[data-field="${CSS.escape(error.field)}"]`);
    if (label) label.querySelector(".field-error").textContent = error.message;
  }
}

// Templates: the selected nodes saved under a name, placed again from the palette, repeated N times.

/** Node types a template may hold: layers from hidden states to hidden states. */
function templatable(node) {
  const info = typeInfo(node.type);
  return node.type !== "template" && info.inputs.length > 0 && info.inputs.every((port) => port.kind === "hidden")
    && info.outputs.length === 1 && info.outputs[0].kind === "hidden";
}

function renderTemplateForm(ids) {
  const form = $("template-form");
  const nodes = ids.map(nodeById);
  const refused = nodes.filter((node) => !templatable(node));
  form.hidden = refused.length === nodes.length; // nothing here could be a template: no form to distract
  $("template-error").textContent = refused.length
    ? `A template holds layers from hidden states to hidden states; take ${refused.map((n) => n.id).join(", ")} out of the selection.`
    : "";
  $("template-save").disabled = refused.length > 0;
  const chosen = new Set(ids);
  const withInput = nodes.filter((node) => portSpec(node, "in", "in"));
  const withOutput = nodes.filter((node) => portSpec(node, "out", "out"));
  // The input: the node an edge from outside the selection comes into; the output: the node an edge leaves from.
  const into = (node) => state.graph.edges.filter((e) => e.to === node.id && toPort(e) === "in");
  const outOf = (node) => state.graph.edges.filter((e) => e.from === node.id);
  const fromOutside = withInput.find((node) => into(node).some((e) => !chosen.has(e.from)));
  const toOutside = withOutput.find((node) => outOf(node).some((e) => !chosen.has(e.to)));
  const firstInside = withInput.find((node) => !into(node).some((e) => chosen.has(e.from)));
  const lastInside = withOutput.find((node) => !outOf(node).some((e) => chosen.has(e.to)));
  fillSelect($("template-input"), withInput, (fromOutside || firstInside || withInput[0] || {}).id);
  fillSelect($("template-output"), withOutput, (toOutside || lastInside || withOutput[withOutput.length - 1] || {}).id);
  if (!$("template-name").value) $("template-name").value = suggestTemplateName();
}

/** What a template holds, in words: its nodes in the order its edges join them. */
function templateContents(name) {
  const template = state.graph.templates.find((t) => t.name === name);
  if (!template) return makeElement("p", "error-text", `The graph has no template named ${name}.`);
  const label = (id) => {
    const inner = template.nodes.find((node) => node.id === id);
    return inner ? `${typeInfo(inner.type).label} (${faceText(inner)})` : id;
  };
  const box = makeElement("div", "hint");
  box.append(makeElement("p", null, `${name} holds ${template.nodes.length} node${template.nodes.length === 1 ? "" : "s"}; `
    + `its input goes into ${template.input}, its output comes from ${template.output}:`));
  const list = makeElement("ul", "selection-list");
  for (const inner of template.nodes) list.append(makeElement("li", null, label(inner.id)));
  box.append(list);
  return box;
}

function fillSelect(select, nodes, chosen) {
  select.replaceChildren(...nodes.map((node) => new Option(`${node.id} (${typeInfo(node.type).label})`, node.id)));
  if (chosen) select.value = chosen;
}

function suggestTemplateName() {
  let name = "my-block";
  for (let n = 2; state.graph.templates.some((t) => t.name === name); n++) name = `my-block-${n}`;
  return name;
}

function saveTemplate() {
  const ids = [...state.selection].filter((id) => nodeById(id));
  const name = $("template-name").value.trim();
  const input = $("template-input").value;
  const output = $("template-output").value;
  const problem = !name ? "Give the template a name."
    : state.graph.templates.some((t) => t.name === name) ? `The graph has a template named ${name} already; pick another name.`
      : !input ? "Pick the node whose input is the template's input."
        : !output ? "Pick the node whose output is the template's output." : "";
  if (problem) {
    $("template-error").textContent = problem;
    return;
  }
  const chosen = new Set(ids);
  const left = Math.min(...ids.map((id) => nodeById(id).x));
  const top = Math.min(...ids.map((id) => nodeById(id).y));
  const nodes = ids.map((id) => {
    const node = JSON.parse(JSON.stringify(nodeById(id)));
    return { ...node, x: node.x - left, y: node.y - top };
  });
  const edges = state.graph.edges.filter((e) => chosen.has(e.from) && chosen.has(e.to)).map((e) => ({ ...e }));
  recordEdit();
  state.graph.templates.push({ name, nodes, edges, input, output });
  $("template-name").value = "";
  renderPalette();
  renderSidePanel();
  graphChanged();
  showToast(`Saved template ${name}: drag it from the palette's templates onto the canvas, and set how many times it repeats.`,
    { seconds: 7 });
}

// ---------------------------------------------------------------------------------------------
// The summary: ask the server after every change

const STORAGE_KEY = "minigpt-studio-graph"; // the graph being edited, kept across reloads of the page

function keepGraph() {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify({ graph: state.graph, saved: state.savedText }));
  } catch (error) { /* storage full or off: the graph lives on in this page only */ }
}

/** After every edit: keep the graph, and ask the server about it (moving a node changes no number). */
function graphChanged({ summary = true } = {}) {
  keepGraph();
  if (!summary) return;
  clearTimeout(state.summaryTimer);
  state.summaryTimer = setTimeout(refreshSummary, SUMMARY_DELAY_MS);
}

async function refreshSummary() {
  const ticket = ++state.summaryRequest;
  const answer = await postJson("/api/graph/summary", state.graph);
  if (ticket !== state.summaryRequest) return; // a newer request is on its way
  if (answer.ok) {
    state.summary = answer.body;
    showErrors([]);
  } else {
    state.summary = null;
    showErrors(answer.body.errors || [{ node: null, port: null, field: null, message: errorText(answer.body) }]);
  }
  showSummary();
  updateAllNodeBoxes();
  if (state.selectedEdge) renderSidePanel();
}

/** The problems of the last check: on their nodes and ports, in the field they name, and at the
    top of the canvas, where the user is looking (the first one, and the whole list on demand). */
function showErrors(errors) {
  state.errors = errors;
  const label = (error) => (error.node ? `${error.node}: ` : "") + error.message;
  const list = $("problems-list");
  list.replaceChildren(...errors.map((error) => {
    const item = makeElement("li", null, label(error));
    if (error.node && nodeById(error.node)) {
      item.title = "Show this node";
      item.addEventListener("click", () => revealNode(error.node));
    }
    return item;
  }));
  if (!errors.length) showProblemList(false);
  const toggle = $("problems-toggle");
  toggle.hidden = errors.length < 2 && !(errors.length === 1 && label(errors[0]).length > 90);
  toggle.textContent = $("problems").hidden ? `Show all ${errors.length}` : "Hide";
  if (errors.length) {
    $("checkbar").dataset.state = "problems";
    $("check-text").textContent = `${errors.length === 1 ? "1 problem" : `${errors.length} problems`}: ${label(errors[0])}`;
    $("check-text").title = errors.map(label).join("\n");
  }
  $("summary-errors").replaceChildren(...errors.map((error) => makeElement("li", null, label(error))));
  document.querySelectorAll("#side-form .field-error").forEach((div) => { div.textContent = ""; });
  showFieldErrors();
}

function showProblemList(show) {
  $("problems").hidden = !show || !state.errors.length;
  $("problems-toggle").textContent = $("problems").hidden ? `Show all ${state.errors.length}` : "Hide";
  $("problems-toggle").setAttribute("aria-expanded", String(!$("problems").hidden));
}

function revealNode(id) {
  setSelection(new Set([id]));
  showTab("node");
  const node = nodeById(id);
  const view = $("canvas-wrap");
  view.scrollTo({ left: Math.max(0, node.x * state.zoom - 60), top: Math.max(0, node.y * state.zoom - 60), behavior: "smooth" });
}

function showSummary() {
  const summary = state.summary;
  const table = $("per-node");
  table.replaceChildren();
  if (!summary) {
    for (const id of ["total-params", "weights-mib", "step-mib", "flops", "vocab", "standard"]) $(id).textContent = "–";
    return;
  }
  $("total-params").textContent = formatInt(summary.params);
  $("checkbar").dataset.state = "ok";
  $("check-text").textContent = `✓ ${formatInt(summary.params)} parameters · ${summary.standard
    ? "the standard GPT chain" : "a free graph"} · ${formatMib(summary.memory.training_step_mib)} a training step`;
  $("check-text").title = "";
  $("weights-mib").textContent = formatMib(summary.memory.weights_mib);
  $("step-mib").textContent = formatMib(summary.memory.training_step_mib)
    + (summary.memory.exact === false ? " (an estimate)" : "");
  $("flops").textContent = formatSi(summary.flops_per_token);
  $("vocab").textContent = formatInt(summary.vocab_size);
  $("standard").textContent = summary.standard ? "the standard GPT chain (exactly GPTModel)" : "a free graph (GraphModel)";
  for (const entry of summary.per_node) {
    const row = makeElement("tr");
    row.append(makeElement("td", null, entry.node), makeElement("td", "num", formatInt(entry.params)),
      makeElement("td", "note", entry.note || ""));
    table.append(row);
  }
}

// ---------------------------------------------------------------------------------------------
// Header: name, presets, New, import, export, script, config

function renderPresets() {
  const menu = $("presets");
  menu.replaceChildren();
  for (const preset of state.presets) {
    const button = makeElement("button");
    button.type = "button";
    button.dataset.preset = preset.name;
    button.setAttribute("role", "menuitem");
    button.append(makeElement("b", null, preset.name), makeElement("span", null, preset.description || ""));
    button.addEventListener("click", () => {
      closePresetMenu();
      loadPreset(preset.name);
    });
    menu.append(button);
  }
}

function togglePresetMenu() {
  const open = $("presets").hidden;
  $("presets").hidden = !open;
  $("presets-button").setAttribute("aria-expanded", String(open));
}

function closePresetMenu() {
  $("presets").hidden = true;
  $("presets-button").setAttribute("aria-expanded", "false");
}

function loadPreset(name, { record = true } = {}) {
  const preset = state.presets.find((p) => p.name === name);
  if (!preset) return;
  document.querySelectorAll("[data-preset]").forEach((button) =>
    button.classList.toggle("active", button.dataset.preset === name));
  $("presets-button").textContent = `Preset: ${name} ▾`;
  setGraph(checkedGraph(preset.graph), { record });
}

/** The example graph the README's first step loads (minigpt/studio/example-graph.json). */
async function loadExample() {
  const answer = await fetchJson("/api/example");
  if (!answer.ok) {
    showBanner(`Could not load the example: ${errorText(answer.body)}`);
    return;
  }
  document.querySelectorAll("[data-preset]").forEach((button) => button.classList.remove("active"));
  $("presets-button").textContent = "Presets ▾";
  setGraph(checkedGraph(answer.body));
}

async function newGraph() {
  if (isDirty() && !await askConfirm(`Start a new graph? The unsaved changes to "${state.graph.name}" are lost `
    + "(Undo still brings them back while this page is open).", "New graph")) return;
  document.querySelectorAll("[data-preset]").forEach((button) => button.classList.remove("active"));
  $("presets-button").textContent = "Presets ▾";
  setGraph(emptyGraph());
}

async function importGraph(file) {
  let graph;
  try {
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch (error) {
      throw new Error(`it is not valid JSON (${error.message})`);
    }
    if (data && typeof data === "object" && !Array.isArray(data) && data.version === 1) data = await upgradedGraph(data);
    graph = checkedGraph(data);
  } catch (error) {
    showBanner(`Could not import ${file.name}: ${error.message}.`);
    return;
  }
  hideBanner();
  const unknown = [...new Set(graph.nodes.filter((node) => !state.schema.types[node.type]).map((node) => node.type))];
  if (unknown.length) {
    showBanner(`${file.name} has nodes of types this page does not know (${unknown.join(", ")}); they are drawn `
      + "without ports, and the summary above says what the server makes of them.", "info");
  }
  document.querySelectorAll("[data-preset]").forEach((button) => button.classList.remove("active"));
  $("presets-button").textContent = "Presets ▾";
  setGraph(graph);
  showToast(`Imported ${file.name}.`);
}

/** A version-1 graph (an older studio's export) in today's form, as the server upgrades it
    (POST /api/graph/upgrade); the graph unchanged if the server cannot read it. */
async function upgradedGraph(graph) {
  const answer = await postJson("/api/graph/upgrade", graph);
  return answer.ok && answer.body && Array.isArray(answer.body.nodes) ? answer.body : graph;
}

function exportGraph() {
  const text = `${JSON.stringify(state.graph, null, 2)}\n`;
  download(new Blob([text], { type: "application/json" }), `${fileStem(state.graph.name)}.json`);
  state.savedText = snapshot();
  keepGraph();
}

async function exportScript() {
  let response;
  try {
    response = await request("/api/graph/script", { method: "POST", json: state.graph });
  } catch (error) {
    showBanner(`Could not make the script: cannot reach the studio server (${error.message}).`);
    return;
  }
  if (!response.ok) {
    let body = {};
    try { body = await response.json(); } catch (error) { body = { error: `the server answered ${response.status}` }; }
    if (Array.isArray(body.errors)) showErrors(body.errors);
    showBanner(`Could not make the script: ${errorText(body)}`);
    return;
  }
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename\*=UTF-8''([^;]+)/i.exec(disposition) || /filename="?([^";]+)"?/i.exec(disposition);
  const filename = match ? decodeURIComponent(match[1]) : `${fileStem(state.graph.name)}.py`;
  download(await response.blob(), filename);
}

function showConfig() {
  const summary = state.summary;
  const note = $("config-note");
  if (!summary) {
    note.textContent = "";
    $("config-settings").textContent = "Fix the problems listed at the top of the canvas first.";
    $("config-command").textContent = "–";
  } else if (summary.standard && summary.settings) {
    note.textContent = "This graph is the standard GPT chain: config_run.py can describe it, or the exported graph file can.";
    $("config-settings").textContent = summary.settings;
    $("config-command").textContent = summary.command;
  } else {
    note.textContent = "config_run.py settings are for the standard chain only (data → tokenizer → embedding → "
      + "positions → blocks → norm → head → loss); this graph is wired differently. Export it, then train the "
      + "exported file with the command below.";
    $("config-settings").textContent = "(settings are for the standard chain only)";
    $("config-command").textContent = summary.command;
  }
  $("config-dialog").showModal();
}

async function copyText(id, button) {
  const text = $(id).textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) {
    const range = document.createRange(); // the clipboard API needs https or localhost: select instead
    range.selectNodeContents($(id));
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    document.execCommand("copy");
  }
  const before = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = before; }, 1200);
}

function showTab(name) {
  state.tab = name;
  document.querySelectorAll(".tabs button").forEach((button) => button.classList.toggle("active", button.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((section) => { section.hidden = section.id !== `tab-${name}`; });
  if (name === "training") drawChart();
}

// ---------------------------------------------------------------------------------------------
// Training: start a run, follow its events, Stop and Resume

async function startTraining() {
  const button = $("train-button");
  button.disabled = true;
  const answer = await postJson("/api/runs", { graph: state.graph });
  button.disabled = false;
  if (answer.status === 409) {
    showBusy(errorText(answer.body), answer.body.run_id || answer.body.running);
    return;
  }
  if (!answer.ok) {
    setRunStatus(`could not start: ${errorText(answer.body)}`, "failed");
    if (answer.body.errors) {
      showErrors(answer.body.errors);
      showProblemList(true);
      updateAllNodeBoxes();
    }
    return;
  }
  $("busy").hidden = true;
  showTab("training");
  followRun(answer.body.run_id, "running");
  refreshRuns();
}

/** The server trains one run at a time: say which one trains, with a button that stops it. */
function showBusy(message, runId) {
  const box = $("busy");
  box.replaceChildren(makeElement("span", null, message));
  if (runId) {
    box.append(makeButton(`Stop ${runId}`, async () => {
      await stopRun(runId);
      box.hidden = true;
    }, "danger"));
    box.append(makeButton("Show it", () => {
      box.hidden = true;
      showTab("training");
      followRun(runId, "running");
    }));
  }
  box.append(makeButton("Close", () => { box.hidden = true; }));
  box.hidden = false;
}

function setRunStatus(text, status) {
  const element = $("run-status");
  element.textContent = text;
  element.className = `status ${status || ""}`;
  element.dataset.status = status || "";
}

/** Make `runId` the page's current run: draw its curve from its events (a run training now) or
    from its metrics (a run that ended), and point Stop and Resume at it. */
function followRun(runId, status) {
  if (state.run && state.run.source) state.run.source.close();
  state.run = { id: runId, status, source: null, lastEventId: 0 };
  $("run-status").dataset.runId = runId;
  resetChart();
  document.querySelectorAll("#runs-list li").forEach((li) => li.classList.toggle("selected", li.dataset.runId === runId));
  if (TRAINING.includes(status)) {
    setRunStatus(`${runId}: starting…`, status);
    listen();
  } else {
    setRunStatus(`${runId}: ${status}`, status);
    drawFromMetrics(runId);
  }
  updateRunButtons();
}

/** Open the event stream of the current run from the first event not drawn yet. */
function listen() {
  const run = state.run;
  if (run.source) run.source.close();
  const source = new EventSource(`/api/runs/${encodeURIComponent(run.id)}/events?after=${run.lastEventId}`);
  run.source = source;
  source.onmessage = (message) => {
    const id = Number(message.lastEventId);
    if (message.lastEventId !== "" && !Number.isNaN(id)) {
      if (id <= run.lastEventId) return; // already drawn
      run.lastEventId = id;
    }
    let event;
    try {
      event = JSON.parse(message.data);
    } catch (error) {
      return;
    }
    handleEvent(run, event);
  };
  source.onerror = () => {
    if (state.run !== run) {
      source.close();
      return;
    }
    // No stream (the run did not train in this server's lifetime), or one the server ended without an
    // "end" event because the run no longer trains: the runs list has its status. (Else the browser
    // reconnects by itself, and the stream goes on from the last event.)
    const listed = state.runs.find((r) => r.run_id === run.id);
    if (source.readyState === EventSource.CLOSED || (listed && !TRAINING.includes(listed.status))) {
      source.close();
      run.source = null;
      refreshRuns();
    }
  };
}

function handleEvent(run, event) {
  if (state.run !== run) return;
  if (event.type === "start") {
    run.status = "running";
    state.chart.totalSteps = event.total_steps || state.chart.totalSteps;
    state.speed.startStep = event.step || 0;
    state.speed.lastTokens = null;
    setRunStatus(`${run.id}: running`, "running");
    if (event.step) addLogLine(`resumed at step ${event.step}`, "note");
  } else if (event.type === "step") {
    addStep(event);
    const total = state.chart.totalSteps ? `/${state.chart.totalSteps}` : "";
    if (run.status === "running") setRunStatus(`${run.id}: step ${event.step}${total}, epoch ${event.epoch}`, "running");
  } else if (event.type === "sample") {
    state.samples.set(event.epoch, { step: event.step, text: event.text });
    renderSamples();
  } else if (event.type === "end") {
    run.status = event.status;
    run.endedAt = Date.now();
    if (run.source) run.source.close(); // else the browser reconnects to a stream that has ended
    run.source = null;
    const metrics = event.metrics || {};
    const valLoss = metrics.final_val_loss != null ? metrics.final_val_loss : metrics.val_loss;
    const loss = valLoss != null ? ` (validation loss ${Number(valLoss).toFixed(3)})` : "";
    const error = event.error ? `: ${event.error}` : "";
    setRunStatus(`${run.id}: ${event.status}${loss}${error}`, event.status);
    if (metrics.tokens_per_sec != null) {
      $("tokens-per-sec").textContent = `${formatInt(Math.round(metrics.tokens_per_sec))} tokens/s `
        + "(the run's metrics: its tokens over its training time)";
    }
    addLogLine(`${event.status}${loss}${error}`, event.status === "failed" ? "eval" : "note");
    refreshRuns().then(() => {
      if (event.status !== "failed") $("chat-model").value = run.id;
    });
  }
  updateRunButtons();
}

function updateRunButtons() {
  const run = state.run;
  const listed = run && state.runs.find((r) => r.run_id === run.id);
  const status = run ? run.status : null;
  $("stop-button").disabled = status !== "running";
  $("resume-button").disabled = !run || TRAINING.includes(status) || !canResume(listed || { status });
  $("stop-button").title = run ? `Stop ${run.id} after its current step (it saves a checkpoint)` : "";
  $("resume-button").title = run ? `Resume ${run.id} from its last checkpoint` : "";
}

/** A stopped (or interrupted) run with a checkpoint resumes; a finished one has nothing left to train. */
function canResume(run) {
  if (typeof run.resumable === "boolean") return run.resumable;
  return RESUMABLE.includes(run.status);
}

async function stopRun(runId = state.run && state.run.id) {
  if (!runId) return;
  const answer = await postJson(`/api/runs/${encodeURIComponent(runId)}/stop`, {});
  if (!answer.ok) {
    setRunStatus(`could not stop ${runId}: ${errorText(answer.body)}`, "failed");
    return;
  }
  if (state.run && state.run.id === runId) {
    state.run.status = "stopping";
    setRunStatus(`${runId}: stopping after this step…`, "stopping");
    if (!state.run.source) listen();
  }
  updateRunButtons();
  refreshRuns();
}

async function resumeRun(runId = state.run && state.run.id) {
  if (!runId) return;
  const answer = await postJson(`/api/runs/${encodeURIComponent(runId)}/resume`, {});
  if (answer.status === 409 && (answer.body.running || answer.body.run_id) && (answer.body.running || answer.body.run_id) !== runId) {
    showBusy(errorText(answer.body), answer.body.running || answer.body.run_id);
    return;
  }
  if (!answer.ok) {
    setRunStatus(`could not resume ${runId}: ${errorText(answer.body)}`, "failed");
    return;
  }
  showTab("training");
  if (!state.run || state.run.id !== runId) {
    followRun(runId, "running");
  } else {
    state.run.status = "running";
    setRunStatus(`${runId}: resuming…`, "running");
    listen(); // the same run's stream goes on from the last event drawn
  }
  updateRunButtons();
  refreshRuns();
}

async function deleteRun(runId) {
  if (!await askConfirm(`Delete run ${runId}? Its folder (checkpoint, metrics, log) is removed from disk.`, "Delete")) return;
  const answer = await fetchJson(`/api/runs/${encodeURIComponent(runId)}`, { method: "DELETE" });
  if (!answer.ok) {
    showBanner(`Could not delete ${runId}: ${errorText(answer.body)}`);
    return;
  }
  if (state.run && state.run.id === runId) {
    if (state.run.source) state.run.source.close();
    state.run = null;
    setRunStatus("idle", "");
    resetChart();
  }
  refreshRuns();
}

// ---------------------------------------------------------------------------------------------
// The loss chart, the log and the speed

function resetChart() {
  state.chart = { totalSteps: 0, batch: [], train: [], val: [], points: 0 };
  state.speed = { tokens: 0, seconds: 0, lastTokens: null, startStep: 0 };
  state.samples = new Map();
  $("loss-chart").dataset.points = "0";
  $("tokens-per-sec").textContent = "";
  $("train-log").replaceChildren();
  $("train-log").dataset.lines = "0";
  renderSamples();
  drawChart();
}

/** One logged step: a point of the chart, a line of the log, and the speed so far. */
function addStep(event) {
  const chart = state.chart;
  chart.batch.push({ step: event.step, loss: event.batch_loss });
  if (event.train_loss != null) chart.train.push({ step: event.step, loss: event.train_loss });
  if (event.val_loss != null) chart.val.push({ step: event.step, loss: event.val_loss });
  chart.points += 1;
  $("loss-chart").dataset.points = String(chart.points);
  const lr = event.lr != null ? `  lr ${Number(event.lr).toExponential(2)}` : "";
  addLogLine(`step ${String(event.step).padStart(5)}  loss ${event.batch_loss.toFixed(3)}  ppl ${perplexity(event.batch_loss)}${lr}`);
  if (event.val_loss != null) {
    const train = event.train_loss != null ? `train ${event.train_loss.toFixed(3)} (ppl ${perplexity(event.train_loss)})  ` : "";
    addLogLine(`   eval  ${train}val ${event.val_loss.toFixed(3)} (ppl ${perplexity(event.val_loss)})`, "eval");
  }
  updateSpeed(event);
  drawChart();
}

function perplexity(loss) {
  const value = Math.exp(loss);
  return value >= 1000 ? formatInt(Math.round(value)) : value.toFixed(value >= 100 ? 0 : 2);
}

function addLogLine(text, className) {
  const log = $("train-log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.append(makeElement("div", className, text));
  while (log.childElementCount > LOG_LINES) log.firstElementChild.remove();
  log.dataset.lines = String(Number(log.dataset.lines) + 1);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

/** Tokens per second over the training steps so far: each step event says how many tokens it
    added and at what rate, so its time is tokens / rate. Times between events arriving are not
    used: events can arrive together, which made such a rate wildly high. */
function updateSpeed(event) {
  const speed = state.speed;
  if (!(event.tokens_per_sec > 0) || event.tokens_seen == null) return;
  let added;
  if (speed.lastTokens != null) added = event.tokens_seen - speed.lastTokens;
  else added = event.step > 0 ? event.tokens_seen * (event.step - speed.startStep) / event.step : 0;
  speed.lastTokens = event.tokens_seen;
  if (!(added > 0)) return;
  speed.tokens += added;
  speed.seconds += added / event.tokens_per_sec;
  $("tokens-per-sec").textContent = `${formatInt(Math.round(speed.tokens / speed.seconds))} tokens/s (training steps so far)`;
}

/** A run that is not training now: its curve from metrics.json (evaluations) and its speed. */
async function drawFromMetrics(runId) {
  const answer = await fetchJson(`/api/runs/${encodeURIComponent(runId)}`);
  if (!answer.ok || !state.run || state.run.id !== runId) return;
  const metrics = answer.body.metrics || {};
  const steps = metrics.eval_steps || [];
  state.chart.train = steps.map((step, i) => ({ step, loss: (metrics.train_losses || [])[i] })).filter((p) => p.loss != null);
  state.chart.val = steps.map((step, i) => ({ step, loss: (metrics.val_losses || [])[i] })).filter((p) => p.loss != null);
  state.chart.totalSteps = metrics.steps || 0;
  if (metrics.tokens_per_sec != null) {
    $("tokens-per-sec").textContent = `${formatInt(Math.round(metrics.tokens_per_sec))} tokens/s (the run's metrics)`;
  }
  const error = answer.body.error ? `: ${answer.body.error}` : "";
  const loss = metrics.final_val_loss != null ? ` (validation loss ${Number(metrics.final_val_loss).toFixed(3)})` : "";
  setRunStatus(`${runId}: ${answer.body.status}${loss}${error}`, answer.body.status);
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
  const width = canvas.clientWidth || 356;
  const height = canvas.clientHeight || 190;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";

  const chart = state.chart;
  const plot = { left: 40, right: width - 10, top: 24, bottom: height - 30 };
  const all = [...chart.batch, ...chart.train, ...chart.val].filter((p) => Number.isFinite(p.loss));
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
  const yTicks = niceTicks(yMin, yMax, 4);
  const yStep = yTicks.length > 1 ? yTicks[1] - yTicks[0] : 1;
  const decimals = Math.max(0, -Math.floor(Math.log10(yStep) + 1e-9));
  for (const tick of yTicks) {
    ctx.beginPath();
    ctx.moveTo(plot.left, y(tick));
    ctx.lineTo(plot.right, y(tick));
    ctx.stroke();
    ctx.fillText(tick.toFixed(decimals), plot.left - 5, y(tick));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.strokeStyle = "#8a97a8";
  for (const tick of niceTicks(0, xMax, 5).filter((t) => Number.isInteger(t))) {
    ctx.beginPath();
    ctx.moveTo(x(tick), plot.bottom);
    ctx.lineTo(x(tick), plot.bottom + 4);
    ctx.stroke();
    ctx.fillText(String(tick), x(tick), plot.bottom + 6);
  }
  ctx.beginPath();
  ctx.moveTo(plot.left, plot.top);
  ctx.lineTo(plot.left, plot.bottom);
  ctx.lineTo(plot.right, plot.bottom);
  ctx.stroke();
  ctx.fillText("step", (plot.left + plot.right) / 2, height - 13);

  // Train loss at each step (markers too while there are few), and train and validation loss at
  // each evaluation (always with markers: a run may have one or two).
  const series = [
    { name: "train loss (step)", points: chart.batch, color: "#8fa3bf", width: 1.5, dots: chart.batch.length <= 40, radius: 2 },
    { name: "train (eval)", points: chart.train, color: "#2f6fde", width: 2, dots: true, radius: 3.5 },
    { name: "validation (eval)", points: chart.val, color: "#e8590c", width: 2, dots: true, radius: 3.5 },
  ];
  for (const s of series) {
    const points = s.points.filter((p) => Number.isFinite(p.loss));
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = s.width;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.step), y(p.loss)) : ctx.moveTo(x(p.step), y(p.loss))));
    ctx.stroke();
    if (s.dots) {
      for (const p of points) {
        ctx.beginPath();
        ctx.arc(x(p.step), y(p.loss), s.radius, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  // Legend, along the top.
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let legendX = plot.left;
  for (const s of series) {
    ctx.fillStyle = s.color;
    ctx.fillRect(legendX, 8, 12, 3);
    ctx.fillStyle = "#1f2933";
    ctx.fillText(s.name, legendX + 16, 10);
    legendX += ctx.measureText(s.name).width + 30;
  }
  if (!all.length) {
    ctx.fillStyle = "#616e7c";
    ctx.textAlign = "center";
    const middle = [(plot.left + plot.right) / 2, (plot.top + plot.bottom) / 2];
    ctx.fillText("Press Train: the loss curve draws here as the model learns.", ...middle);
  }
}

// ---------------------------------------------------------------------------------------------
// The runs: listed from their first moment, after a reload too

async function refreshRuns() {
  clearTimeout(state.runsTimer);
  const asked = Date.now();
  const answer = await fetchJson("/api/runs");
  if (answer.ok) {
    state.runs = answer.body.runs;
    renderRuns();
    syncCurrentRun(asked);
  }
  // While a run trains, its status and the list follow it closely; otherwise a slow look for runs
  // started elsewhere (another tab, main.py).
  const active = state.runs.some((run) => TRAINING.includes(run.status));
  state.runsTimer = setTimeout(refreshRuns, active ? 1500 : 8000);
}

/** The current run's status from the list, for what its events cannot say (a server restarted
    since, a run resumed in another tab); a list asked for before the run's end event is older news. */
function syncCurrentRun(asked) {
  const run = state.run;
  if (!run) return;
  const listed = state.runs.find((r) => r.run_id === run.id);
  if (!listed) return;
  if (!run.source && listed.status !== run.status && !(run.endedAt && asked < run.endedAt)) {
    run.status = listed.status;
    const error = listed.error ? `: ${listed.error}` : "";
    setRunStatus(`${run.id}: ${listed.status}${error}`, listed.status);
    if (TRAINING.includes(listed.status)) listen();
  }
  updateRunButtons();
}

function renderRuns() {
  const list = $("runs-list");
  list.replaceChildren();
  for (const run of state.runs) {
    const item = makeElement("li");
    item.dataset.runId = run.run_id;
    item.dataset.status = run.status;
    item.classList.toggle("selected", Boolean(state.run) && state.run.id === run.run_id);
    const line = makeElement("div", "run-line");
    const loss = run.final_val_loss != null ? ` · val ${Number(run.final_val_loss).toFixed(3)}` : "";
    const status = makeElement("span", "run-status", `${run.status}${loss}`);
    status.dataset.status = run.status;
    line.append(makeElement("span", "run-id", run.run_id), status);
    line.title = "Show this run's curve";
    line.addEventListener("click", () => showRun(run.run_id));
    item.append(line);
    if (run.error) item.append(makeElement("div", "run-error", run.error));
    if (run.note) item.append(makeElement("div", "muted", run.note));
    const actions = makeElement("div", "run-actions");
    const training = TRAINING.includes(run.status);
    const stop = makeButton("Stop", () => stopRun(run.run_id), "small run-stop");
    stop.disabled = run.status !== "running";
    const resume = makeButton("Resume", () => resumeRun(run.run_id), "small run-resume");
    resume.disabled = !canResume(run);
    resume.title = run.status === "finished" ? "This run finished all its steps: there is nothing to resume" : "";
    const remove = makeButton("Delete", () => deleteRun(run.run_id), "small danger run-delete");
    remove.disabled = training;
    actions.append(stop, resume, remove);
    item.append(actions);
    list.append(item);
  }
  if (!state.runs.length) list.append(makeElement("li", "muted", "No runs yet: press Train."));
  renderChatModels();
}

async function showRun(runId) {
  const run = state.runs.find((r) => r.run_id === runId);
  if (!run) return;
  if (!state.run || state.run.id !== runId) followRun(runId, run.status);
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
    if (run.status === "failed" || TRAINING.includes(run.status)) continue;
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
    const response = await request("/api/generate", { method: "POST", json: body });
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
  $("graph-name").addEventListener("input", (event) => {
    recordEdit("name");
    state.graph.name = event.target.value;
    graphChanged();
  });
  $("presets-button").addEventListener("click", togglePresetMenu);
  document.addEventListener("pointerdown", (event) => {
    if (!event.target.closest("#presets-menu")) closePresetMenu();
  });
  $("example-button").addEventListener("click", loadExample);
  $("new-button").addEventListener("click", newGraph);
  $("undo-button").addEventListener("click", undo);
  $("redo-button").addEventListener("click", redo);
  $("import-file").addEventListener("change", (event) => {
    if (event.target.files.length) importGraph(event.target.files[0]);
    event.target.value = "";
  });
  $("export-button").addEventListener("click", exportGraph);
  $("script-button").addEventListener("click", exportScript);
  $("config-button").addEventListener("click", showConfig);
  $("banner-close").addEventListener("click", hideBanner);
  $("problems-toggle").addEventListener("click", () => showProblemList($("problems").hidden));
  document.querySelectorAll("[data-copy]").forEach((button) =>
    button.addEventListener("click", () => copyText(button.dataset.copy, button)));
  document.querySelectorAll("dialog").forEach((dialog) => dialog.addEventListener("close", () => {
    state.quietUntil = Date.now() + 400; // the key that closed it must not delete a node
  }));
  document.querySelectorAll(".tabs button").forEach((button) =>
    button.addEventListener("click", () => showTab(button.dataset.tab)));
  $("template-save").addEventListener("click", saveTemplate);

  $("zoom-in").addEventListener("click", () => setZoom(state.zoom * 1.2));
  $("zoom-out").addEventListener("click", () => setZoom(state.zoom / 1.2));
  $("zoom-fit").addEventListener("click", () => fitView(false));
  $("arrange-button").addEventListener("click", () => {
    recordEdit();
    arrangeNodes();
    updateAllNodeBoxes();
    fitView(true);
    graphChanged();
  });
  $("canvas-wrap").addEventListener("pointerdown", startBoxGesture);
  document.addEventListener("keydown", onKeyDown);
  window.addEventListener("resize", () => { drawEdges(); drawChart(); });

  $("train-button").addEventListener("click", startTraining);
  $("stop-button").addEventListener("click", () => stopRun());
  $("resume-button").addEventListener("click", () => resumeRun());
  $("chat-send").addEventListener("click", sendChat);
  $("chat-temperature").addEventListener("input", (event) => { $("temperature-value").textContent = event.target.value; });
  window.addEventListener("beforeunload", () => {
    if (state.run && state.run.source) state.run.source.close();
  });
}

/** The graph this browser was editing before a reload, if any; false when there is none to restore. */
function restoreGraph() {
  let kept;
  try {
    kept = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
    if (!kept) return false;
    setGraph(checkedGraph(kept.graph), { record: false });
  } catch (error) {
    return false; // a graph from an older page, or not a graph: start from the first preset
  }
  state.savedText = typeof kept.saved === "string" ? kept.saved : "";
  keepGraph();
  return true;
}

async function main() {
  wireControls();
  showTab("node");
  resetChart();
  const [schema, presets] = await Promise.all([fetchJson("/api/schema"), fetchJson("/api/presets"), loadDataSources()]);
  if (!schema.ok || !presets.ok) {
    showBanner(`Could not load the node types or presets from the server: ${errorText((schema.ok ? presets : schema).body)}`);
    return;
  }
  state.schema = schema.body;
  state.presets = presets.body.presets;
  renderPresets();
  if (!restoreGraph()) {
    if (state.presets.length) loadPreset(state.presets[0].name, { record: false });
    else setGraph(emptyGraph(), { record: false });
  }
  await refreshRuns();
  // After a reload: follow a run that still trains (its stream replays what it has done so far),
  // else point Stop and Resume at the newest run.
  const training = state.runs.find((run) => TRAINING.includes(run.status));
  if (training) {
    followRun(training.run_id, training.status);
    showTab("training");
  } else if (state.runs.length) {
    followRun(state.runs[0].run_id, state.runs[0].status);
  }
  document.body.dataset.ready = "true";
}

main();
