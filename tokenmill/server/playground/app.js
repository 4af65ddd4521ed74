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
  const constraint = $("steps-constraint").value.trim();  // structured output: a JSON schema or a regex
  if (constraint) {
    body.structured_outputs = constraint.startsWith("{") ? { json: constraint } : { regex: constraint };
  }
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
    const row = el("div", { class: "cand" + (c.id === chosenId ? " chosen" : "") + (c.masked ? " masked" : "") },
      el("span", { class: "t", text: visible(c.text) }), bar, el("span", { class: "p", text: fmtPct(c.prob) }));
    row.title = `id ${c.id}` + (c.logprob !== undefined ? `  logprob ${c.logprob.toFixed(3)}` : "") +
      (c.masked ? "  (masked by the grammar)" : "");
    box.append(row);
  }
  return box;
}

function stepRow(ev) {
  const row = el("div", { class: "step", id: "step-" + ev.index },
    el("span", { class: "idx", text: "#" + (ev.index + 1) }),
    el("div", {}, el("span", { class: "chosen-tok", text: visible(ev.text) }),
      el("div", { class: "muted", text: ev.rank ? `raw rank ${ev.rank}` : "" }),
      ev.grammar_allowed != null ? el("div", { class: "muted", text: `grammar allows ${ev.grammar_allowed} tokens` }) : "",
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

// after every script of the page has run (the views live in their own files)
window.addEventListener("DOMContentLoaded", init);
