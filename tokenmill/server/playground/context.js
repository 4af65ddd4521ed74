// tokenmill playground: the "Context length" view (GET|POST /v1/playground/context).
// Plain JavaScript, no build step; loaded after app.js and uses its helpers ($, el, svgEl,
// postJSON, headers, number, stat, the fmt* formatters).
"use strict";

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
