// tokenmill playground: the "Compare tokenizers" view (GET /v1/playground/tokenizers, POST /v1/tokenize).
// Plain JavaScript, no build step; loaded after app.js and uses its helpers ($, el, svgEl,
// postJSON, headers, number, stat, the fmt* formatters).
"use strict";

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
