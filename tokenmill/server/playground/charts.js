// tokenmill playground: small SVG line charts for the context and live views.
// Plain JavaScript, no build step; loaded after app.js and uses its helpers ($, el, svgEl,
// postJSON, headers, number, stat, the fmt* formatters).
"use strict";

// ---- charts (small SVG line charts; shared by the context and live views) -----------------------

// series: [{name, points: [[x, y]], cls, markers}]; vlines: [{x, label, cls}]. Each series has a text
// label and its own dash pattern and marker shape, so the chart reads without colour.
function lineChart({ id, title, xLabel, yLabel, series, xMin = 0, xMax, yMax, vlines = [], fmtX = String,
  fmtY = String, yUnit = 1, width = 420, height = 220 }) {
  const L = 62, R = 12, T = 24, B = 40;
  const all = series.flatMap((s) => s.points).filter((p) => p[1] !== null && p[1] !== undefined);
  const xHi = xMax ?? Math.max(1, ...all.map((p) => p[0]), ...vlines.map((v) => v.x));
  const dataMax = Math.max(0, ...all.map((p) => p[1])) || yUnit;  // all zero: still a readable axis
  const yStep = niceStep(yMax ?? dataMax, yUnit);
  // headroom above the highest point keeps it clear of the legend
  const yHi = yMax ?? Math.max(yStep, Math.ceil(1.15 * dataMax / yStep) * yStep);
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
