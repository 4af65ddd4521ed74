// tokenmill playground: the "Engine live" view (GET /v1/playground/live, polled every second).
// Plain JavaScript, no build step; loaded after app.js and uses its helpers ($, el, svgEl,
// postJSON, headers, number, stat, the fmt* formatters).
"use strict";

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
let liveHistory = [];  // the points seen so far (the server sends the new ones each time)
let liveModel = null;

async function pollLive() {
  if (livePolling) return;  // a slow answer: skip a beat rather than pile up requests
  livePolling = true;
  try {
    const model = $("model-select").value;
    if (model !== liveModel) liveHistory = [];  // another model: its own history
    liveModel = model;
    const query = new URLSearchParams();
    if (model) query.set("model", model);
    if (liveHistory.length) query.set("since", String(liveHistory[liveHistory.length - 1].t));  // only what is new
    const resp = await fetch("/v1/playground/live?" + query, { headers: headers() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const data = await resp.json();
    liveHistory = liveHistory.concat(data.history).filter((p) => p.t >= data.now - data.history_s);
    drawLive({ ...data, history: liveHistory });
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
  el("div", { class: "kvlegend" }, el("span", { class: "key used", text: `▮ used ${c.kv_used} (shared by several requests: ${c.kv_shared})` }),
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
      series: [series("kv_used", "used"), series("kv_shared", "shared (used by several)", "alt"),
        series("kv_cached", "cached prefixes", "alt")], fmtY: (v) => v.toFixed(0) }),
    lineChart({ ...opts, id: "live-chart-tps", title: "Throughput", yLabel: "tokens/s",
      series: [series("tokens_per_s", "generated tokens/s"), series("prompt_tokens_per_s", "prompt tokens/s", "alt")],
      fmtY: (v) => v.toFixed(0) }),
    lineChart({ ...opts, id: "live-chart-ttft", title: "TTFT (last minute)", yLabel: "seconds",
      series: [series("ttft_p50", "p50"), series("ttft_p90", "p90", "alt")], fmtY: ms }),
    lineChart({ ...opts, id: "live-chart-tpot", title: "TPOT (last minute)", yLabel: "seconds",
      series: [series("tpot_p50", "p50"), series("tpot_p90", "p90", "alt")], fmtY: ms }));
  $("live-status").textContent = `${h.length} samples, updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
}
