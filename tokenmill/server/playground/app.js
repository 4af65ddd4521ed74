// tokenmill playground: plain JavaScript, no build step, no external network.
// Data comes from the public HTTP API: POST /v1/tokenize, POST /v1/playground/steps (SSE),
// POST /v1/playground/beam, GET /v1/playground/tokenizers, GET|POST /v1/playground/context,
// GET /v1/playground/live, GET /v1/models (see docs/playground.md, "API reference").
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// Make whitespace visible inside token chips: a space as a middle dot, newline as a return sign.
function visible(text) {
  if (text === "") return "\u2205";
  return text.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
}

const fmtMs = (s) => (s === null || s === undefined ? "–" : (1000 * s).toFixed(1) + " ms");
const fmtRate = (r) => (r === null || r === undefined ? "–" : r.toFixed(1) + " tok/s");
const fmtPct = (p) => (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function postJSON(path, body, signal, withModel = true) {
  const model = $("model-select").value;  // several served models: the picker chooses; else the default
  if (model && withModel) body = { ...body, model };
  const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp;
}

async function errorMessage(resp) {
  try {
    const data = await resp.json();
    if (data.error && data.error.message) return `${resp.status}: ${data.error.message}`;
    return `${resp.status}: ${JSON.stringify(data)}`;
  } catch (e) {
    return `${resp.status} ${resp.statusText}`;
  }
}

// Yields the JSON payload of each server-sent event of a streaming response.
async function* readEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function stat(label, value) {
  return el("span", {}, label + " ", el("b", { text: value }));
}

// ---- tabs -------------------------------------------------------------------------------------

const VIEWS = ["tokenizer", "compare", "steps", "beam", "context", "live"];
const onShow = { compare: () => loadTokenizers(), context: () => loadContext(), live: () => startLive() };

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    const on = tab.dataset.view === name;
    tab.classList.toggle("active", on);
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;  // one tab stop for the tab list; arrow keys move between tabs
  }
  for (const view of document.querySelectorAll(".view")) view.classList.toggle("active", view.id === "view-" + name);
  history.replaceState(null, "", "#" + name);
  if (name !== "live") stopLive();
  if (onShow[name]) onShow[name]();
}

// The tab list's keyboard pattern: Left / Right (and Home / End) move to a tab and show it.
function tabKeys(event) {
  const tabs = [...document.querySelectorAll(".tab")];
  const i = tabs.indexOf(document.activeElement);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (i < 0 || next === undefined) return;
  event.preventDefault();
  const tab = tabs[(next + tabs.length) % tabs.length];
  tab.focus();
  showView(tab.dataset.view);
}

// ---- 1. tokenizer -----------------------------------------------------------------------------

// GPT-2 style byte-level BPE spells each byte as one printable character; this maps it back,
// so a token holding part of a UTF-8 character can be shown as its bytes (e.g. <E6 9D>).
const BYTE_OF_CHAR = (() => {
  const map = new Map();
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    map.set(String.fromCharCode(printable ? b : 256 + extra++), b);
  }
  return map;
})();

function tokenBytes(token) {
  const chars = [...token];
  if (!chars.every((c) => BYTE_OF_CHAR.has(c))) return token;
  return "<" + chars.map((c) => BYTE_OF_CHAR.get(c).toString(16).toUpperCase().padStart(2, "0")).join(" ") + ">";
}

function tokenChip(tok, i, extraClass = "") {
  const special = /^<\|.*\|>$|^<\/?s>$/.test(tok.token);
  const cls = `tok c${i % 6}` + (special ? " special" : "") + (tok.text === "" ? " partial" : "") + extraClass;
  const shown = tok.text === "" ? tokenBytes(tok.token) : visible(tok.text);
  const span = el("span", { class: cls, text: shown });
  span.title = `#${i}  id ${tok.id}  ${JSON.stringify(tok.token)}` + (tok.start !== undefined ? `  chars ${tok.start}–${tok.end}` : "");
  span.dataset.id = tok.id;
  return span;
}

let tokenizeTimer = null;
let tokenizeSeq = 0;

async function runTokenize() {
  const seq = ++tokenizeSeq;
  $("tok-error").textContent = "";
  try {
    const resp = await postJSON("/v1/tokenize", { text: $("tok-text").value, chat_template: $("tok-chat").checked });
    const data = await resp.json();
    if (seq !== tokenizeSeq) return; // a newer request is on its way
    const box = $("tok-tokens");
    box.replaceChildren(...data.tokens.map((t, i) => tokenChip(t, i)));
    $("tok-stats").replaceChildren(stat("tokens", String(data.count)), stat("characters", String(data.num_chars)),
      stat("characters per token", data.chars_per_token.toFixed(2)));
    $("tok-ids").textContent = JSON.stringify(data.tokens.map((t) => t.id));
    box.dataset.count = data.count;
  } catch (e) {
    $("tok-error").textContent = String(e.message || e);
  }
}

function scheduleTokenize() {
  clearTimeout(tokenizeTimer);
  tokenizeTimer = setTimeout(runTokenize, 250);
}

// ---- 2. step-by-step decoding -----------------------------------------------------------------

let stepsAbort = null;

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function stepsBody() {
  const stop = $("steps-stop").value.split("\n").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length > 0);
  const body = { prompt: $("steps-prompt").value, chat_template: $("steps-chat").checked, stop };
  for (const f of ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]) {
    body[f] = number("steps-" + f);
  }
  for (const f of ["top_k", "max_tokens", "top_n", "seed"]) body[f] = number("steps-" + f);
  for (const [k, v] of Object.entries(body)) if (v === null) delete body[k];
  return body;
}

function candidateRows(title, cands, chosenId) {
  const box = el("div", { class: "dist" }, el("h4", { text: title }));
  if (!cands) {
    box.append(el("div", { class: "muted", text: "not available" }));
    return box;
  }
  for (const c of cands) {
    const bar = el("div", { class: "bar" }, el("span"));
    bar.firstChild.style.width = Math.max(0.5, 100 * c.prob).toFixed(1) + "%";
    const row = el("div", { class: "cand" + (c.id === chosenId ? " chosen" : "") },
      el("span", { class: "t", text: visible(c.text) }), bar, el("span", { class: "p", text: fmtPct(c.prob) }));
    row.title = `id ${c.id}` + (c.logprob !== undefined ? `  logprob ${c.logprob.toFixed(3)}` : "");
    box.append(row);
  }
  return box;
}

function stepRow(ev) {
  const row = el("div", { class: "step", id: "step-" + ev.index },
    el("span", { class: "idx", text: "#" + (ev.index + 1) }),
    el("div", {}, el("span", { class: "chosen-tok", text: visible(ev.text) }),
      el("div", { class: "muted", text: ev.rank ? `raw rank ${ev.rank}` : "" }),
      ev.drafted ? el("div", { class: "drafted-note", text: "drafted, accepted" }) : ""),
    candidateRows("raw model distribution", ev.raw_top, ev.id),
    candidateRows("after the sampling controls", ev.processed_top, ev.id));
  return row;
}

function selectStep(index) {
  for (const n of document.querySelectorAll(".step.selected, #steps-output .tok.selected")) n.classList.remove("selected");
  const row = $("step-" + index);
  if (row) {
    row.classList.add("selected");
    row.scrollIntoView({ block: "nearest" });
  }
  const chip = document.querySelector(`#steps-output .tok[data-index="${index}"]`);
  if (chip) chip.classList.add("selected");
}

function showMetrics(target, m, extra = []) {
  $(target).replaceChildren(stat("TTFT", fmtMs(m.ttft_s)), stat("TPOT", fmtMs(m.tpot_s)),
    stat("throughput", fmtRate(m.tokens_per_s)), stat("prompt", `${m.prompt_tokens} tokens`),
    stat("generated", `${m.generated_tokens} tokens`), ...extra);
}

function finishText(ev) {
  switch (ev.stop_kind) {
    case "eos": return `Stopped: the model emitted its end-of-sequence token ${JSON.stringify(ev.last_token || "")}`;
    case "stop_string": return `Stopped: stop string ${JSON.stringify(ev.stop_reason)} matched (cut from the text)`;
    case "stop_token": return `Stopped: stop token id ${ev.stop_reason}`;
    case "length": return `Stopped: length limit (max tokens or the context length) reached`;
    case "abort": return "Stopped: aborted";
    default: return `Stopped: ${ev.finish_reason}`;
  }
}

async function runSteps() {
  $("steps-error").textContent = "";
  $("steps-finish").textContent = "";
  $("steps-output").replaceChildren();
  $("steps-list").replaceChildren();
  $("steps-metrics").replaceChildren(stat("status", "waiting for the first token…"));
  stepsAbort = new AbortController();
  $("steps-run").disabled = true;
  $("steps-stop-btn").disabled = false;
  let lastText = "";
  try {
    const resp = await postJSON("/v1/playground/steps", stepsBody(), stepsAbort.signal);
    for await (const ev of readEvents(resp)) {
      if (ev.type === "token") {
        // A byte token that ends mid-character decodes to U+FFFD: show its bytes instead.
        const shown = ev.text.includes("\ufffd") ? "" : ev.text;
        // speculative decoding: a draft token the model accepted is underlined
        const chip = tokenChip({ id: ev.id, token: ev.token, text: shown }, ev.index, ev.drafted ? " drafted" : "");
        if (ev.drafted) chip.title += "  (drafted, accepted)";
        chip.dataset.index = ev.index;
        chip.tabIndex = 0;  // keyboard: Tab to a token, Enter shows its step
        chip.addEventListener("click", () => selectStep(ev.index));
        chip.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectStep(ev.index); } });
        $("steps-output").append(chip);
        $("steps-list").append(stepRow(ev));
        showMetrics("steps-metrics", ev.metrics, [stat("status", "generating…")]);
        lastText = ev.text;
      } else if (ev.type === "done") {
        const drafted = document.querySelectorAll("#steps-output .tok.drafted").length;
        showMetrics("steps-metrics", ev.metrics,
          drafted ? [stat("accepted drafts", `${drafted} of ${ev.token_ids.length} tokens (underlined)`)] : []);
        $("steps-finish").textContent = finishText({ ...ev, last_token: lastText });
        $("steps-finish").dataset.kind = ev.stop_kind;
      } else if (ev.type === "error") {
        throw new Error(ev.error.message);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("steps-error").textContent = String(e.message || e);
    else $("steps-finish").textContent = "Stopped by you.";
  } finally {
    $("steps-run").disabled = false;
    $("steps-stop-btn").disabled = true;
    stepsAbort = null;
  }
}

// ---- 3. beam search ---------------------------------------------------------------------------

const NODE_W = 128, NODE_H = 34, COL_GAP = 44, ROW_GAP = 8, PAD = 12;

// Lays the trace out as columns (one per step) and draws nodes and parent -> child edges in SVG.
function drawTree(data) {
  const steps = data.trace || [];
  const columns = [[{ status: "root", text: "prompt", beam: 0 }]];
  for (const step of steps) {
    // Group children under their parent's row so that edges do not cross; best score first.
    const prev = columns[columns.length - 1];
    const rowOf = (c) => (columns.length === 1 ? 0 : prev.findIndex((p) => p.status === "kept" && p.beam === c.parent));
    columns.push([...step.candidates].sort((a, b) => rowOf(a) - rowOf(b) || b.score - a.score));
  }
  const maxRows = Math.max(...columns.map((c) => c.length));
  const width = PAD * 2 + columns.length * (NODE_W + COL_GAP);
  const height = PAD * 2 + 24 + maxRows * (NODE_H + ROW_GAP);
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, id: "beam-svg" });
  const pos = columns.map((col, ci) => col.map((_, ri) => ({
    x: PAD + ci * (NODE_W + COL_GAP), y: PAD + 24 + ri * (NODE_H + ROW_GAP) })));
  columns.forEach((_, ci) => {
    const label = svgEl("text", { x: pos[ci][0].x, y: PAD + 10, class: "muted" });
    label.textContent = ci === 0 ? "" : `step ${ci}`;
    svg.append(label);
  });
  // Edges first so that nodes paint over them.
  for (let ci = 1; ci < columns.length; ci++) {
    columns[ci].forEach((cand, ri) => {
      const prev = columns[ci - 1];
      const pi = ci === 1 ? 0 : prev.findIndex((p) => p.status === "kept" && p.beam === cand.parent);
      if (pi < 0) return;
      const a = pos[ci - 1][pi], b = pos[ci][ri];
      const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
      const mid = (x1 + x2) / 2;
      svg.append(svgEl("path", { class: "edge " + cand.status, d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}` }));
    });
  }
  columns.forEach((col, ci) => col.forEach((cand, ri) => {
    const { x, y } = pos[ci][ri];
    const g = svgEl("g", { class: "node " + cand.status, transform: `translate(${x},${y})` });
    g.append(svgEl("rect", { width: NODE_W, height: NODE_H, rx: 4 }));
    const t1 = svgEl("text", { x: 6, y: 14 });
    t1.textContent = ci === 0 ? "prompt" : clip(visible(cand.text), 15);
    const t2 = svgEl("text", { x: 6, y: 28 });
    t2.textContent = ci === 0 ? "" : `${cand.status} ${cand.score.toFixed(2)}`;
    g.append(t1, t2);
    if (ci > 0) {
      const tip = svgEl("title");
      tip.textContent = `token ${JSON.stringify(cand.text)} (id ${cand.token_id}) from beam ${cand.parent}\n` +
        `cumulative logprob ${cand.cumulative_logprob.toFixed(3)}, score ${cand.score.toFixed(3)}, ${cand.status}`;
      g.append(tip);
    }
    svg.append(g);
  }));
  return svg;
}

function clip(s, n) {
  return s.length > n ? s.slice(0, n - 1) + "\u2026" : s;
}

function drawRanking(data) {
  const table = $("beam-ranking");
  const head = el("tr", {}, ...["rank", "text", "tokens", "cumulative logprob", "finish"].map((h) => el("th", { text: h })));
  const rows = data.ranking.map((r) => el("tr", {},
    el("td", { class: "num", text: String(r.rank) }), el("td", { text: r.text }),
    el("td", { class: "num", text: String(r.token_ids.length) }),
    el("td", { class: "num", text: r.cumulative_logprob.toFixed(3) }),
    el("td", { text: r.stop_kind || r.finish_reason })));
  table.replaceChildren(head, ...rows);
  $("beam-ranking-title").hidden = false;
}

async function runBeam() {
  $("beam-error").textContent = "";
  $("beam-tree").replaceChildren();
  $("beam-ranking").replaceChildren();
  $("beam-run").disabled = true;
  $("beam-metrics").replaceChildren(stat("status", "searching…"));
  try {
    const body = { prompt: $("beam-prompt").value, chat_template: $("beam-chat").checked,
      num_beams: number("beam-num_beams"), max_tokens: number("beam-max_tokens"),
      length_penalty: number("beam-length_penalty") };
    const data = await (await postJSON("/v1/playground/beam", body)).json();
    showMetrics("beam-metrics", data.metrics);
    if (data.trace) $("beam-tree").replaceChildren(drawTree(data));
    else $("beam-tree").replaceChildren(el("p", { class: "muted", text: "this engine reports no beam trace" }));
    drawRanking(data);
  } catch (e) {
    $("beam-error").textContent = String(e.message || e);
    $("beam-metrics").replaceChildren();
  } finally {
    $("beam-run").disabled = false;
  }
}

// ---- charts (small SVG line charts; shared by the context and live views) -----------------------

// series: [{name, points: [[x, y]], cls, markers}]; vlines: [{x, label, cls}]. Each series has a text
// label and its own dash pattern and marker shape, so the chart reads without colour.
function lineChart({ id, title, xLabel, yLabel, series, xMin = 0, xMax, yMax, vlines = [], fmtX = String,
  fmtY = String, yUnit = 1, width = 420, height = 220 }) {
  const L = 62, R = 12, T = 24, B = 40;
  const all = series.flatMap((s) => s.points).filter((p) => p[1] !== null && p[1] !== undefined);
  const xHi = xMax ?? Math.max(1, ...all.map((p) => p[0]), ...vlines.map((v) => v.x));
  const yStep = niceStep(yMax ?? Math.max(0, ...all.map((p) => p[1])), yUnit);
  // headroom above the highest point keeps it clear of the legend
  const yHi = yMax ?? Math.max(yStep, Math.ceil(1.15 * Math.max(0, ...all.map((p) => p[1])) / yStep) * yStep);
  const xStep = niceStep(xHi - xMin);
  const X = (x) => L + ((x - xMin) / ((xHi - xMin) || 1)) * (width - L - R);
  const Y = (y) => height - B - (y / (yHi || 1)) * (height - T - B);
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  if (id) svg.id = id;
  svg.setAttribute("aria-label", `${title}: ${yLabel} against ${xLabel}`);
  const text = (x, y, s, cls = "", anchor = "start") => {
    const t = svgEl("text", { x, y, class: cls, "text-anchor": anchor });
    t.textContent = s;
    svg.append(t);
  };
  text(L, 14, title, "title");
  svg.append(svgEl("line", { x1: L, y1: height - B, x2: width - R, y2: height - B, class: "axis" }));
  svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: height - B, class: "axis" }));
  for (let y = 0; y <= yHi + 1e-9; y += yStep) {
    svg.append(svgEl("line", { x1: L, x2: width - R, y1: Y(y), y2: Y(y), class: "grid" }));
    text(L - 4, Y(y) + 4, fmtY(y), "tick", "end");
  }
  for (let x = Math.ceil(xMin / xStep) * xStep; x <= xHi + 1e-9; x += xStep) text(X(x), height - B + 14, fmtX(x), "tick", "middle");
  text((L + width - R) / 2, height - 6, xLabel, "axis-label", "middle");
  for (const v of vlines) {
    if (v.x < xMin || v.x > xHi) continue;
    svg.append(svgEl("line", { x1: X(v.x), x2: X(v.x), y1: T, y2: height - B, class: "vline " + (v.cls || "") }));
    text(X(v.x) - 3, height - B - 4, v.label, "vlabel", "end");
  }
  series.forEach((s, si) => {  // legend, top left inside the plot: a sample of the line (same dash) and its name
    const ly = T + 6 + si * 14, lx = L + 8;
    svg.append(svgEl("rect", { x: lx - 2, y: ly - 7, width: 7 * s.name.length + 30, height: 14, class: "legend-bg" }));
    svg.append(svgEl("line", { x1: lx, x2: lx + 18, y1: ly, y2: ly, class: `line s${si} ${s.cls || ""}` }));
    text(lx + 22, ly + 4, s.name, "legend");
  });
  series.forEach((s, si) => {
    const pts = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
    if (pts.length > 1) {
      svg.append(svgEl("polyline", { class: `line s${si} ${s.cls || ""}`,
        points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ") }));
    }
    // markers on measured points, and on a lone point (no line to draw)
    for (const p of s.markers || pts.length === 1 ? pts : []) {
      const m = si % 2 === 0 ? svgEl("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, class: `pt s${si} ${s.cls || ""}` })
        : svgEl("rect", { x: X(p[0]) - 3.5, y: Y(p[1]) - 3.5, width: 7, height: 7, class: `pt s${si} ${s.cls || ""}` });
      const tip = svgEl("title");
      tip.textContent = `${s.name}: ${fmtY(p[1])} at ${fmtX(p[0])}`;
      m.append(tip);
      svg.append(m);
    }
  });
  return svg;
}

// A round tick step (1, 2 or 5 x a power of ten, in ``unit``s) that cuts ``span`` into about 4 parts.
function niceStep(span, unit = 1) {
  const raw = Math.max(span / unit, 1e-9) / 4;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag * unit;
}

const fmtBytes = (b) => (b >= 2 ** 30 ? +(b / 2 ** 30).toFixed(2) + " GiB" : b >= 2 ** 20 ? +(b / 2 ** 20).toFixed(1) + " MiB"
  : b >= 1024 ? +(b / 1024).toFixed(1) + " KiB" : Math.round(b) + " B");
const fmtAxisMs = (v) => (v >= 1000 ? (v / 1000).toFixed(v % 1000 ? 1 : 0) + " s" : +v.toFixed(2) + " ms");
const fmtTokens = (n) => (n >= 10000 ? (n / 1000).toFixed(0) + "k" : String(Math.round(n)));

// ---- 4. tokenizers side by side ---------------------------------------------------------------

let tokenizerList = null;
let compareTimer = null;
let compareSeq = 0;

async function loadTokenizers() {
  if (tokenizerList) return runCompare();
  try {
    const resp = await fetch("/v1/playground/tokenizers", { headers: headers() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    tokenizerList = (await resp.json()).tokenizers;
    const pick = $("cmp-pick");
    pick.replaceChildren(el("legend", { text: "Tokenizers" }), ...tokenizerList.map((t, i) => {
      const box = el("input", { type: "checkbox", id: "cmp-use-" + i });
      box.checked = t.loaded;
      box.disabled = !t.loaded;
      box.addEventListener("change", runCompare);
      return el("label", { class: "check", for: "cmp-use-" + i }, box,
        ` ${t.name} `, el("span", { class: "muted", text: `(${t.kind === "model" ? "served model" : t.kind})` }));
    }));
    runCompare();
  } catch (e) {
    $("cmp-error").textContent = String(e.message || e);
  }
}

function scheduleCompare() {
  clearTimeout(compareTimer);
  compareTimer = setTimeout(runCompare, 300);
}

async function runCompare() {
  if (!tokenizerList) return;
  const seq = ++compareSeq;
  $("cmp-error").textContent = "";
  const text = $("cmp-text").value;
  const chosen = tokenizerList.filter((_, i) => $("cmp-use-" + i).checked);
  try {
    const results = await Promise.all(chosen.map(async (t) =>
      (await postJSON("/v1/tokenize", { text, tokenizer: t.name }, undefined, false)).json()));
    if (seq !== compareSeq) return;  // a newer comparison is on its way
    drawCompare(text, chosen, results);
  } catch (e) {
    $("cmp-error").textContent = String(e.message || e);
  }
}

// Cut the text (as code points, the way the server counts characters) into the segments each token
// covers. A character several byte tokens share belongs to the last of them; tokens that cover no
// character of their own (the first bytes of a character, BOS / [CLS]) become zero-width marks.
function segments(chars, tokens) {
  const owner = new Array(chars.length).fill(-1);
  tokens.forEach((t, i) => {
    if (!t.source || t.added) return;
    for (let c = t.source[0]; c < t.source[1]; c++) owner[c] = i;
  });
  const owned = new Set(owner);
  const firstOwned = owner.find((i) => i >= 0) ?? tokens.length;
  const marks = (where) => tokens.flatMap((t, j) => (owned.has(j) ? [] : where(t, j) ? [{ mark: j }] : []));
  // added tokens (BOS, [CLS] / [SEP]) and tokens without a known span: before or after the text
  const out = marks((t, j) => (t.added || !t.source) && j < firstOwned);
  for (let c = 0; c < chars.length;) {
    let e = c + 1;
    while (e < chars.length && owner[e] === owner[c]) e++;
    out.push(...marks((t) => !t.added && t.source && t.source[0] === c), { token: owner[c], start: c, end: e });
    c = e;
  }
  out.push(...marks((t, j) => (t.added || !t.source) && j >= firstOwned));
  return out;
}

function drawCompare(text, chosen, results) {
  const chars = Array.from(text);
  const segs = results.map((r) => segments(chars, r.tokens));
  // a token is split alike when every other tokenizer has a token over exactly the same characters
  const spans = segs.map((ss) => new Set(ss.filter((s) => s.token !== undefined && s.token >= 0).map((s) => `${s.start}-${s.end}`)));
  const table = $("cmp-table");
  table.replaceChildren(el("tr", {}, ...["tokenizer", "kind", "vocabulary", "tokens", "characters per token",
    "split like every other"].map((h) => el("th", { text: h }))));
  const rows = $("cmp-rows");
  rows.replaceChildren();
  results.forEach((r, k) => {
    let same = 0, total = 0;
    const line = el("div", { class: "tokens aligned", id: "cmp-line-" + k });
    line.setAttribute("aria-label", `${chosen[k].name}: ${r.count} tokens`);
    let color = 0;
    for (const s of segs[k]) {
      if (s.mark !== undefined) {
        const t = r.tokens[s.mark];
        const m = el("span", { class: "mark" + (t.added ? " added" : ""), text: "" });
        m.title = `#${s.mark}  id ${t.id}  ${JSON.stringify(t.token)}` + (t.added ? "  (added by the tokenizer)" : "  (part of a character)");
        line.append(m);
        continue;
      }
      const piece = visible(chars.slice(s.start, s.end).join(""));
      if (s.token < 0) {  // characters no token covers (e.g. spaces a WordPiece tokenizer drops)
        line.append(el("span", { class: "uncovered", text: piece, title: "in no token" }));
        continue;
      }
      const shared = spans.every((set) => set.has(`${s.start}-${s.end}`));
      total++;
      if (shared) same++;
      const t = r.tokens[s.token];
      const chip = el("span", { class: `tok c${color++ % 6}` + (shared ? "" : " differs"), text: piece });
      chip.title = `#${s.token}  id ${t.id}  ${JSON.stringify(t.token)}  chars ${s.start}–${s.end}` + (shared ? "" : "  (split differently elsewhere)");
      chip.dataset.id = t.id;
      line.append(chip);
    }
    const count = el("td", { class: "num", text: String(r.count) });
    count.id = "cmp-count-" + k;
    count.dataset.count = r.count;
    table.append(el("tr", {}, el("td", { text: chosen[k].name }),
      el("td", { text: chosen[k].kind === "model" ? "served model" : chosen[k].kind }),
      el("td", { class: "num", text: chosen[k].vocab_size ? String(chosen[k].vocab_size) : "–" }), count,
      el("td", { class: "num", text: r.count ? (chars.length / r.count).toFixed(2) : "–" }),
      el("td", { class: "num", text: `${same} of ${total}` })));
    rows.append(el("div", { class: "cmp-row" }, el("div", { class: "cmp-name" }, el("b", { text: chosen[k].name }),
      el("span", { class: "muted", text: ` ${r.count} tokens, ${total - same} split differently (≠)` })), line));
  });
}

// ---- 5. context length --------------------------------------------------------------------------

async function loadContext() {
  $("ctx-error").textContent = "";
  try {
    const model = $("model-select").value;
    const resp = await fetch("/v1/playground/context" + (model ? "?model=" + encodeURIComponent(model) : ""), { headers: headers() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    drawContext(await resp.json());
  } catch (e) {
    $("ctx-error").textContent = String(e.message || e);
  }
}

async function runContext() {
  $("ctx-error").textContent = "";
  $("ctx-run").disabled = true;
  $("ctx-status").textContent = "measuring… (one request per context length)";
  try {
    const body = { points: number("ctx-points"), max_context_len: number("ctx-max"), refresh: $("ctx-refresh").checked };
    for (const [k, v] of Object.entries(body)) if (v === null) delete body[k];
    drawContext(await (await postJSON("/v1/playground/context", body)).json());
  } catch (e) {
    $("ctx-error").textContent = String(e.message || e);
    $("ctx-status").textContent = "";
  } finally {
    $("ctx-run").disabled = false;
  }
}

function drawContext(data) {
  const kv = data.kv, cap = data.capacity, cal = data.calibration;
  const scale = kv.scale_bytes_per_token ? ` + ${kv.scale_bytes_per_token} bytes of int8 scales` : "";
  $("ctx-kv").replaceChildren(stat("KV bytes per token", String(kv.bytes_per_token)),
    el("span", { id: "ctx-formula", text: `= 2 (K and V) × ${kv.num_layers} layers × ${kv.num_kv_heads} KV heads × ` +
      `${kv.head_dim} head dim × ${kv.element_size} bytes (${kv.dtype})${scale}` }));
  $("ctx-kv").dataset.bytesPerToken = kv.bytes_per_token;
  const concurrent = Math.min(cap.full_context_requests, cap.max_num_seqs);
  $("ctx-capacity").replaceChildren(stat("max context", `${data.max_model_len} tokens`),
    stat("KV cache", `${fmtBytes(cap.bytes)} = ${cap.tokens} tokens (${cap.num_blocks} blocks of ${cap.block_size})`),
    stat("full-context requests that fit at once", `${cap.full_context_requests}` +
      (cap.full_context_requests > cap.max_num_seqs ? ` (the engine runs at most ${cap.max_num_seqs}: ${concurrent})` : "")));
  const maxLen = data.max_model_len;
  const kvLine = [[0, 0], [maxLen, maxLen * kv.bytes_per_token]];
  const vlines = [{ x: maxLen, label: `max context ${maxLen}`, cls: "max" }];
  const plots = [lineChart({ id: "ctx-kv-plot", title: "KV cache per request", xLabel: "context length (tokens)",
    yLabel: "bytes", series: [{ name: "KV bytes = tokens × bytes per token", points: kvLine }], xMax: maxLen * 1.02, vlines, fmtX: fmtTokens, fmtY: fmtBytes,
    yUnit: maxLen * kv.bytes_per_token > 2 ** 20 ? 2 ** 20 : 1024 })];
  if (cal) {
    const xMax = cal.max_context_len * 1.05;  // the measured range (the max context is marked when inside it)
    const pts = cal.points;
    plots.push(lineChart({ id: "ctx-prefill-plot", title: "Prefill time (measured)", xLabel: "prompt length (tokens)",
      yLabel: "ms", series: [{ name: "prefill", points: pts.map((p) => [p.context_len, 1000 * p.prefill_s]), markers: true }],
      xMax, vlines, fmtX: fmtTokens, fmtY: fmtAxisMs }));
    plots.push(lineChart({ id: "ctx-decode-plot", title: "Decode time per token (measured)", xLabel: "context length (tokens)",
      yLabel: "ms per token", series: [{ name: "decode / token", points: pts.map((p) => [p.context_len, 1000 * p.decode_s_per_token]),
        markers: true, cls: "alt" }], xMax, vlines, fmtX: fmtTokens, fmtY: fmtAxisMs }));
    const when = new Date(cal.measured_at * 1000).toLocaleTimeString();
    $("ctx-status").textContent = `measured at ${when} in ${cal.duration_s.toFixed(1)} s, ${pts.length} points, ` +
      `${cal.decode_tokens} tokens decoded each` + (cal.busy_requests ? `; ${cal.busy_requests} other request(s) were running` : "") +
      " (cached: tick “measure again” to redo it)";
    $("ctx-table").replaceChildren(el("tr", {}, ...["context (tokens)", "KV bytes", "prefill", "prefill per token",
      "decode per token"].map((h) => el("th", { text: h }))), ...pts.map((p) => el("tr", { class: "ctx-point" },
      el("td", { class: "num", text: String(p.context_len) }), el("td", { class: "num", text: fmtBytes(p.kv_bytes) }),
      el("td", { class: "num", text: fmtMs(p.prefill_s) }), el("td", { class: "num", text: fmtMs(p.prefill_s / p.context_len) }),
      el("td", { class: "num", text: fmtMs(p.decode_s_per_token) }))));
  } else {
    $("ctx-status").textContent = "not measured yet: press Measure";
    $("ctx-table").replaceChildren();
  }
  $("ctx-plots").replaceChildren(...plots);
}

// ---- 6. the engine at work ----------------------------------------------------------------------

let liveTimer = null;
const LIVE_POLL_MS = 1000;

function startLive() {
  stopLive();
  if ($("live-pause").checked) return;
  pollLive();
  liveTimer = setInterval(pollLive, LIVE_POLL_MS);
}

function stopLive() {
  clearInterval(liveTimer);
  liveTimer = null;
}

let livePolling = false;

async function pollLive() {
  if (livePolling) return;  // a slow answer: skip a beat rather than pile up requests
  livePolling = true;
  try {
    const model = $("model-select").value;
    const resp = await fetch("/v1/playground/live" + (model ? "?model=" + encodeURIComponent(model) : ""), { headers: headers() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    drawLive(await resp.json());
    $("live-error").textContent = "";
  } catch (e) {
    $("live-error").textContent = String(e.message || e);
  } finally {
    livePolling = false;
  }
}

const fmtQ = (a, b, c) => [a, b, c].map((v) => (v === null || v === undefined ? "–" : (1000 * v).toFixed(v < 0.1 ? 1 : 0))).join(" / ") + " ms";

function drawLive(data) {
  const c = data.current;
  $("live-running").textContent = String(c.running);
  $("live-waiting").textContent = String(c.waiting);
  $("live-tps").textContent = c.tokens_per_s === null || c.tokens_per_s === undefined ? "–" : c.tokens_per_s.toFixed(1);
  $("live-ttft").textContent = fmtQ(c.ttft_p50, c.ttft_p90, c.ttft_p99);
  $("live-tpot").textContent = fmtQ(c.tpot_p50, c.tpot_p90, c.tpot_p99);
  $("live-hit").textContent = c.prefix_cache_hit_rate === null ? "–" : fmtPct(c.prefix_cache_hit_rate);
  // KV blocks as one bar of three parts, each with its name and count written out
  const part = (cls, n, label) => {
    const p = el("div", { class: "part " + cls, title: `${label}: ${n} blocks` });
    p.style.flexGrow = String(n);
    return p;
  };
  $("live-kv").replaceChildren(el("div", { class: "bar3" }, part("used", c.kv_used, "used"),
    part("cached", c.kv_cached, "cached prefix (reusable)"), part("free", c.kv_free, "free")),
  el("div", { class: "kvlegend" }, el("span", { class: "key used", text: `▮ used ${c.kv_used}` }),
    el("span", { class: "key cached", text: `▨ cached prefixes, reusable ${c.kv_cached}` }),
    el("span", { class: "key free", text: `▯ free ${c.kv_free}` }),
    el("span", { class: "muted", text: `of ${c.kv_total} blocks (${data.block_size} tokens each)` })));
  const h = data.history;
  const x = (p) => p.t - data.now;  // seconds, negative: the past
  const xMin = Math.min(-60, ...h.map(x));
  const opts = { xMin, xMax: 0, width: 340, height: 180, fmtX: (v) => (v === 0 ? "now" : `${Math.round(v)} s`), xLabel: "seconds ago" };
  const series = (key, name, cls = "") => ({ name, cls, points: h.map((p) => [x(p), p[key]]) });
  const ms = (v) => fmtAxisMs(1000 * v);
  $("live-charts").replaceChildren(
    lineChart({ ...opts, id: "live-chart-requests", title: "Requests", yLabel: "requests",
      series: [series("running", "running"), series("waiting", "waiting", "alt")], fmtY: (v) => v.toFixed(0) }),
    lineChart({ ...opts, id: "live-chart-kv", title: "KV cache blocks", yLabel: "blocks", yMax: c.kv_total,
      series: [series("kv_used", "used"), series("kv_cached", "cached prefixes", "alt")], fmtY: (v) => v.toFixed(0) }),
    lineChart({ ...opts, id: "live-chart-tps", title: "Throughput", yLabel: "tokens/s",
      series: [series("tokens_per_s", "generated tokens/s"), series("prompt_tokens_per_s", "prompt tokens/s", "alt")],
      fmtY: (v) => v.toFixed(0) }),
    lineChart({ ...opts, id: "live-chart-ttft", title: "TTFT (last minute)", yLabel: "seconds",
      series: [series("ttft_p50", "p50"), series("ttft_p90", "p90", "alt")], fmtY: ms }),
    lineChart({ ...opts, id: "live-chart-tpot", title: "TPOT (last minute)", yLabel: "seconds",
      series: [series("tpot_p50", "p50"), series("tpot_p90", "p90", "alt")], fmtY: ms }));
  $("live-status").textContent = `${h.length} samples, updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
}

// ---- start ------------------------------------------------------------------------------------

async function loadModelName() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) return;
    const data = await resp.json();
    if (!data.data || !data.data.length) return;
    $("model-name").textContent = data.data[0].id;
    if (data.data.length > 1) {  // a model picker when the server serves several
      const select = $("model-select");
      select.replaceChildren(...data.data.map((m) => new Option(m.id, m.id)));
      select.addEventListener("change", () => {
        $("model-name").textContent = select.value;
        scheduleTokenize();
        const view = document.querySelector(".tab.active").dataset.view;
        if (onShow[view]) onShow[view]();  // the context and live views show the chosen model
      });
      $("model-name").hidden = true;
      $("model-picker").hidden = false;
    }
  } catch (e) {
    // the name is decoration; the views report their own errors
  }
}

function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  document.querySelector("nav").addEventListener("keydown", tabKeys);
  $("cmp-run").addEventListener("click", runCompare);
  $("cmp-text").addEventListener("input", scheduleCompare);
  $("ctx-run").addEventListener("click", runContext);
  $("live-pause").addEventListener("change", () => ($("live-pause").checked ? stopLive() : startLive()));
  $("tok-run").addEventListener("click", runTokenize);
  $("tok-text").addEventListener("input", scheduleTokenize);
  $("tok-chat").addEventListener("change", runTokenize);
  $("steps-run").addEventListener("click", runSteps);
  $("steps-stop-btn").addEventListener("click", () => stepsAbort && stepsAbort.abort());
  $("beam-run").addEventListener("click", runBeam);
  const view = location.hash.slice(1);
  showView(VIEWS.includes(view) ? view : "tokenizer");
  loadModelName();
  runTokenize();
}

init();
