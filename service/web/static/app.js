// assay's web page: a single page over the read-only JSON API (service/web/app.py).
// No framework and no build step: DOM built with el(), text always set as textContent
// (never innerHTML), so stored labels and texts cannot inject markup.
"use strict";

const $ = (sel) => document.querySelector(sel);
const enc = encodeURIComponent;
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#17becf", "#8cd17d", "#b6992d", "#499894", "#d37295", "#a0cbe8", "#ffbe7d", "#86bcb6", "#f1ce63",
  "#d4a6c8", "#79706e"];
const NULL_COLOUR = "#c3c7d3";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits).replace(/\.?0+(e|$)/, "$1"));
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
const int = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString());

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path) {
  const res = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (res.status === 401) { showLogin(); throw new ApiError(401, "UNAUTHENTICATED", "log in to see this page"); }
  if (!res.ok) {
    const err = (body && body.error) || {};
    throw new ApiError(res.status, err.code || String(res.status), err.message || res.statusText);
  }
  return body;
}

// -- login ---------------------------------------------------------------------------------

function showLogin() { $("#login").hidden = false; $("#token").focus(); }

async function login(token) {
  const res = await fetch("/api/login", { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }) });
  if (!res.ok) {
    let msg = res.statusText;
    try { msg = (await res.json()).error.message; } catch (_) { /* keep statusText */ }
    throw new Error(msg);
  }
}

$("#login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await login($("#token").value);
    $("#token").value = "";
    $("#login").hidden = true;
    $("#login-error").textContent = "";
    await refreshInfo();
    route();
  } catch (e) { $("#login-error").textContent = e.message; }
});

$("#logout").addEventListener("click", async () => {
  await fetch("/api/logout", { method: "POST", credentials: "same-origin" });
  location.hash = "#/";
  await refreshInfo();
  page(el("p", { class: "muted", text: "Logged out." }));
  showLogin();
});

// -- routing -------------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query || "") };
}

function go(path, query) {
  const q = query ? new URLSearchParams(Object.entries(query).filter(([, v]) => v !== "" && v != null)).toString() : "";
  location.hash = "#" + path + (q ? "?" + q : "");
}

function crumbs(...links) {
  $("#crumbs").replaceChildren(...links.map(([text, href]) => (href ? el("a", { href, text }) : el("span", { text }))));
}

function page(...nodes) { $("#main").replaceChildren(...nodes.filter((n) => n !== null && n !== undefined)); }

function failure(e) {
  if (e instanceof ApiError && e.status === 401) return page(el("p", { class: "muted", text: e.message }));
  page(el("div", { class: "panel" }, el("h2", { class: "error", text: e.code ? `${e.code}` : "error" }),
    el("p", { text: e.message })));
}

let routeToken = 0;
async function route() {
  const token = ++routeToken;
  const { parts, query } = parseHash();
  const fresh = () => token === routeToken;
  try {
    if (parts.length === 0) await homePage(fresh);
    else if (parts[0] === "c" && parts[1]) await collectionPage(parts[1], parts[2] || "overview", query, fresh);
    else if (parts[0] === "runs" && parts[1]) await runPage(parts[1], query, fresh);
    else if (parts[0] === "d" && parts[1]) await datasetPage(parts[1], query, fresh);
    else page(el("p", { text: "No such page. " }, el("a", { href: "#/", text: "Collections" })));
  } catch (e) { if (fresh()) failure(e); }
}

// -- the grid (same cards as service/web/gallery.py) ----------------------------------------

function thumbUrl(collection, id, size = 160) { return `/api/thumb?c=${enc(collection)}&id=${enc(id)}&s=${size}`; }

function card(item, collection, kind) {
  let visual;
  if (kind === "image" && item.uri) {
    visual = el("img", { class: "assay-thumb", src: thumbUrl(collection, item.id), alt: item.id, loading: "lazy",
      title: item.uri });
    visual.addEventListener("error", () => visual.replaceWith(el("div", { class: "assay-nothumb",
      text: `image not served: ${item.uri}` })));
  } else if (item.text) visual = el("blockquote", { class: "assay-text", text: item.text });
  else if (item.uri) visual = el("div", { class: "assay-nothumb", text: item.uri });
  else visual = el("div", { class: "assay-nothumb", text: "no image or text" });
  const head = [];
  if (item.rank != null) head.push(el("span", { class: "assay-rank", text: `#${item.rank}` }));
  if (item.score != null) head.push(el("span", { class: "assay-score", text: `score ${fmt(item.score)}` }));
  if (item.distance != null) head.push(el("span", { class: "assay-score", text: `distance ${fmt(item.distance)}` }));
  const pred = item.prediction;
  return el("figure", { class: "assay-card", "data-id": item.id }, visual,
    el("figcaption", {},
      el("div", { class: "assay-head" }, head),
      el("div", { class: "assay-id", title: item.id, text: item.id }),
      el("div", { class: "assay-label" }, "label ", el("b", { text: item.label ?? "–" })),
      pred ? el("div", { class: "assay-pred" }, `${pred.model}: `, el("b", { text: pred.class }),
        ` (${Number(pred.confidence).toFixed(2)})`) : null,
      el("div", { class: "assay-label" }, el("a", { href: `#/c/${enc(collection)}/search?like=${enc(item.id)}`,
        text: "similar items" }))));
}

function grid(items, collection, kind) {
  if (!items.length) return el("p", { class: "muted", text: "Nothing to show." });
  return el("div", { class: "assay-gallery" }, el("div", { class: "assay-grid" }, items.map((it) => card(it, collection, kind))));
}

// -- pages ---------------------------------------------------------------------------------

async function homePage(fresh) {
  crumbs();
  const cols = await api("/api/collections");
  if (!fresh()) return;
  page(el("h1", { text: "Collections" }),
    cols.length ? el("div", { class: "cards" }, cols.map((c) => el("a", { class: "panel", href: `#/c/${enc(c.name)}` },
      el("h3", { text: c.name }),
      el("dl", { class: "kv" },
        el("dt", { text: "rows" }), el("dd", { text: int(c.rows) }),
        el("dt", { text: "kind" }), el("dd", { text: c.kind }),
        el("dt", { text: "spaces" }), el("dd", { text: c.spaces.map((s) => `${s.name} (${s.dim}-d ${s.metric})`).join(", ") || "–" }),
        el("dt", { text: "models" }), el("dd", { text: c.models.map((m) => m.name).join(", ") || "–" }),
        el("dt", { text: "mining runs" }), el("dd", { text: int(c.runs) })))))
      : el("p", { class: "muted", text: "No collections yet. Load some with the client, `assay ingest` or `make demo`." }));
}

const TABS = [["overview", "Overview"], ["runs", "Mining runs"], ["search", "Search"], ["map", "Embedding map"],
  ["quality", "Uncertainty vs quality"], ["boxes", "Boxes"], ["datasets", "Datasets"]];

async function collectionPage(name, tab, query, fresh) {
  crumbs(["collections", "#/"], [name, `#/c/${enc(name)}`]);
  const info = await api(`/api/collections/${enc(name)}`);
  if (!fresh()) return;
  const tabs = el("nav", { class: "tabs" }, TABS.map(([key, text]) =>
    el("a", { href: `#/c/${enc(name)}/${key}`, class: key === tab ? "active" : "", text })));
  const body = el("div", {});
  page(el("h1", { text: name }), tabs, body);
  if (tab === "overview") body.replaceChildren(...overview(info));
  else if (tab === "runs") body.replaceChildren(runsTable(info.runs));
  else if (tab === "datasets") body.replaceChildren(datasetsTable(info.datasets));
  else if (tab === "search") await searchTab(info, query, body, fresh);
  else if (tab === "map") await mapTab(info, query, body, fresh);
  else if (tab === "quality") await qualityTab(info, query, body, fresh);
  else if (tab === "boxes") await boxesTab(info, query, body, fresh);
  else body.replaceChildren(el("p", { text: `No tab '${tab}'.` }));
}

function overview(info) {
  const max = Math.max(1, ...info.labels.map((l) => l.count));
  const spaces = Object.entries(info.spaces);
  return [
    el("div", { class: "panel" }, el("dl", { class: "kv" },
      el("dt", { text: "rows" }), el("dd", { text: int(info.rows) }),
      el("dt", { text: "labeled / unlabeled" }), el("dd", { text: `${int(info.labeled)} / ${int(info.unlabeled)}` }),
      el("dt", { text: "version" }), el("dd", { text: info.version }),
      el("dt", { text: "kind" }), el("dd", { text: info.kind }),
      el("dt", { text: "stored at" }), el("dd", { text: info.uri }))),
    el("h2", { text: "Embedding spaces" }),
    spaces.length ? el("table", {}, el("tr", {}, ["space", "dim", "metric", "model", "index"].map((h) => el("th", { text: h }))),
      spaces.map(([n, s]) => el("tr", {}, el("td", { text: n }), el("td", { class: "num", text: s.dim }), el("td", { text: s.metric }),
        el("td", { text: s.model || "–" }),
        el("td", { text: s.index ? `${s.index.type}, ${int(s.index.indexed_rows)} indexed, ${int(s.index.unindexed_rows)} not yet` : "none (exact search)" }))))
      : el("p", { class: "muted", text: "No spaces." }),
    el("h2", { text: "Models" }),
    Object.keys(info.models).length ? el("table", {}, el("tr", {}, ["model", "task", "classes"].map((h) => el("th", { text: h }))),
      Object.entries(info.models).map(([n, m]) => el("tr", {}, el("td", { text: n }), el("td", { text: m.task }),
        el("td", { text: m.classes.join(", ") })))) : el("p", { class: "muted", text: "No models." }),
    el("h2", { text: `Label distribution (${int(info.label_count)} labels, ${int(info.unlabeled)} unlabeled rows)` }),
    info.labels.length ? el("div", { class: "bars panel" }, info.labels.map((l) => {
      const bar = el("div", { class: "bar" });
      bar.style.width = `${(100 * l.count) / max}%`;
      return [el("span", { text: l.label }), el("div", {}, bar), el("span", { class: "num", text: int(l.count) })];
    })) : el("p", { class: "muted", text: "No labels yet." }),
  ];
}

function runsTable(runs) {
  if (!runs.length) return el("p", { class: "muted", text: "No mining runs yet: start one with col.mine(...) or `assay mine`." });
  return el("table", { class: "runs" },
    el("tr", {}, ["run", "miner", "model / space", "size", "state", "rows scanned", "filter", "started"].map((h) => el("th", { text: h }))),
    runs.map((r) => el("tr", {},
      el("td", {}, el("a", { href: `#/runs/${enc(r.run_id)}`, class: "run-link", text: r.run_id.slice(0, 8) })),
      el("td", { text: r.miner }), el("td", { text: [r.model, r.space].filter(Boolean).join(" / ") || "–" }),
      el("td", { class: "num", text: r.size }), el("td", {}, el("span", { class: `pill state-${r.state}`, text: r.state })),
      el("td", { class: "num", text: int(r.rows_scanned) }), el("td", { text: r.where || "–" }),
      el("td", { text: when(r.created_at) }))));
}

function datasetsTable(datasets) {
  if (!datasets.length) return el("p", { class: "muted", text: "No datasets on this collection: create one with client.dataset(...) or `assay dataset create`." });
  return el("table", {}, el("tr", {}, ["dataset", "members", "head version", "staged", "description"].map((h) => el("th", { text: h }))),
    datasets.map((d) => el("tr", {}, el("td", {}, el("a", { href: `#/d/${enc(d.name)}`, text: d.name })),
      el("td", { class: "num", text: int(d.members) }), el("td", { class: "num", text: d.head }),
      el("td", { text: `+${d.staged_adds} −${d.staged_removes}` }), el("td", { text: d.description || "–" }))));
}

async function runPage(runId, query, fresh) {
  const first = await api(`/api/runs/${enc(runId)}?limit=60`);
  if (!fresh()) return;
  const r = first.run;
  const info = await api(`/api/collections/${enc(r.collection)}`);
  if (!fresh()) return;
  crumbs(["collections", "#/"], [r.collection, `#/c/${enc(r.collection)}`], ["runs", `#/c/${enc(r.collection)}/runs`], [r.run_id.slice(0, 8)]);
  const timings = Object.entries(r.timings || {}).map(([k, v]) => `${k} ${Number(v).toFixed(2)}s`).join(", ");
  const params = Object.entries(r.params || {}).filter(([, v]) => !(Array.isArray(v) && v.length > 8))
    .map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
  const header = el("div", { class: "panel" }, el("dl", { class: "kv" },
    el("dt", { text: "miner" }), el("dd", { text: r.miner }),
    el("dt", { text: "state" }), el("dd", {}, el("span", { class: `pill state-${r.state}`, text: r.state }), r.error || ""),
    el("dt", { text: "model / space" }), el("dd", { text: [r.model, r.space].filter(Boolean).join(" / ") || "–" }),
    el("dt", { text: "selected" }), el("dd", { text: `${int(first.total)} of ${int(r.rows_scanned)} rows scanned (size ${r.size})` }),
    el("dt", { text: "filter" }), el("dd", { text: r.where || "–" }),
    el("dt", { text: "collection version" }), el("dd", { text: first.as_of_version === undefined || first.as_of_version === r.version
      ? `${r.version} (labels and predictions below as the miner read them)`
      : `${r.version} (cleaned up since: labels and predictions below are from version ${first.as_of_version})` }),
    el("dt", { text: "parameters" }), el("dd", { text: params || "–" }),
    el("dt", { text: "timings" }), el("dd", { text: timings || "–" }),
    el("dt", { text: "started" }), el("dd", { text: when(r.created_at) })),
    el("div", { class: "row" }, el("a", { href: `#/c/${enc(r.collection)}/map?run=${enc(r.run_id)}`, text: "show the picks on the embedding map" })));
  const items = [...first.items];
  const holder = el("div", {}, grid(items, r.collection, info.kind));
  const more = el("button", { class: "secondary more", text: "more" });
  more.hidden = items.length >= first.total;
  more.addEventListener("click", async () => {
    const next = await api(`/api/runs/${enc(runId)}?offset=${items.length}&limit=60`);
    items.push(...next.items);
    holder.replaceChildren(grid(items, r.collection, info.kind));
    more.hidden = items.length >= first.total || !next.items.length;
  });
  page(el("h1", { text: `Mining run ${r.run_id.slice(0, 8)} — ${r.miner} on ${r.collection}` }), header, holder, more);
}

async function searchTab(info, query, body, fresh) {
  const spaces = Object.entries(info.spaces);
  const textable = spaces.filter(([, s]) => /^(open_clip|sentence-transformers):/.test(s.model || ""));
  const space = el("select", { name: "space" }, spaces.map(([n, s]) =>
    el("option", { value: n, text: `${n} (${s.model || "no model"})`, selected: n === (query.get("space") || (textable[0] || spaces[0] || [])[0]) })));
  const q = el("input", { type: "search", name: "q", placeholder: textable.length ? "describe what you are looking for" : "no text model in this collection's spaces", value: query.get("q") || "" });
  const where = el("input", { type: "text", name: "where", placeholder: "filter, e.g. label IS NULL", value: query.get("where") || "" });
  const form = el("form", { class: "row" }, q, space, where, el("button", { type: "submit", text: "Search" }));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    go(`/c/${enc(info.name)}/search`, { q: q.value.trim(), space: space.value, where: where.value.trim() });
  });
  const out = el("div", {});
  body.replaceChildren(el("p", { class: "muted", text: textable.length
    ? "Text is embedded by the space's own model (MiniLM, or CLIP's text tower for image spaces). \"similar items\" on a card searches by that item."
    : "This collection has no space with a text model: search by example with \"similar items\" on any card." }), form, out);
  const like = query.get("like");
  if (!query.get("q") && !like) return;
  out.replaceChildren(el("p", { class: "muted", text: "Searching…" }));
  const params = new URLSearchParams({ space: space.value, k: "48" });
  if (like) params.set("like", like); else params.set("q", query.get("q"));
  if (query.get("where")) params.set("where", query.get("where"));
  try {
    const res = await api(`/api/collections/${enc(info.name)}/search?${params}`);
    if (!fresh()) return;
    out.replaceChildren(el("h2", { text: like ? `Nearest to ${like} in '${res.space}' (${res.metric})` : `“${query.get("q")}” in '${res.space}' (${res.metric})` }),
      grid(res.items, info.name, info.kind));
  } catch (e) {
    if (fresh()) out.replaceChildren(el("p", { class: "error", text: `${e.code || "error"}: ${e.message}` }));
  }
}

// -- the embedding map ---------------------------------------------------------------------

function rampColour(t) {
  // blue -> pale yellow -> red, t in [0, 1]
  const stops = [[44, 123, 182], [255, 255, 191], [215, 25, 28]];
  const x = Math.min(1, Math.max(0, t)) * 2;
  const i = Math.min(1, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

async function mapTab(info, query, body, fresh) {
  const spaces = Object.keys(info.spaces);
  if (!spaces.length) return body.replaceChildren(el("p", { class: "muted", text: "No embedding space." }));
  const sel = (name, options, value) => el("select", { name }, options.map(([v, t]) => el("option", { value: v, text: t, selected: v === value })));
  const space = sel("space", spaces.map((s) => [s, s]), query.get("space") || spaces[0]);
  const colour = sel("colour", [["label", "colour by label"], ["pred", "colour by prediction"], ["confidence", "colour by confidence"]], query.get("colour") || "label");
  const n = sel("n", [["1000", "1,000 points"], ["2000", "2,000 points"], ["5000", "5,000 points"]], query.get("n") || "2000");
  const runs = info.runs.filter((r) => r.state === "SUCCEEDED");
  const run = sel("run", [["", "no mining run"], ...runs.map((r) => [r.run_id, `run ${r.run_id.slice(0, 8)} (${r.miner}, ${r.results})`])], query.get("run") || "");
  const form = el("form", { class: "row" }, space, colour, n, run);
  form.addEventListener("change", () => go(`/c/${enc(info.name)}/map`, { space: space.value, colour: colour.value, n: n.value, run: run.value }));
  const canvas = el("canvas", { class: "map" });
  const tip = el("div", { class: "tip" });
  tip.hidden = true;
  const legend = el("div", { class: "legend" });
  const note = el("p", { class: "muted", text: "Projecting…" });
  body.replaceChildren(form, note, el("div", { class: "map-wrap" }, canvas, tip), legend);
  const params = new URLSearchParams({ space: space.value, n: n.value });
  if (run.value) params.set("run", run.value);
  const m = await api(`/api/collections/${enc(info.name)}/map?${params}`);
  if (!fresh()) return;
  const base = m.points.filter((p) => !p.picked);
  const picks = m.points.filter((p) => p.picked);
  note.textContent = `${int(m.sampled)} of ${int(m.total)} rows${m.sampled < m.total ? " (uniform sample)" : ""}, PCA of '${m.space}': ` +
    `the two axes explain ${(100 * m.explained[0]).toFixed(1)}% and ${(100 * m.explained[1]).toFixed(1)}% of the variance` +
    (picks.length ? `; ${picks.length} picks of the run ringed, coloured by score` : "") + ". Click a point for its neighbours.";
  const key = colour.value;
  const cats = new Map();
  const value = (p) => (key === "label" ? p.label : p.pred);
  if (key !== "confidence") {
    const counts = new Map();
    for (const p of base) { const v = value(p); if (v != null) counts.set(v, (counts.get(v) || 0) + 1); }
    [...counts.entries()].sort((a, b) => b[1] - a[1]).forEach(([v], i) => cats.set(v, PALETTE[i % PALETTE.length]));
  }
  const fill = (p) => {
    if (key === "confidence") return p.confidence == null ? NULL_COLOUR : rampColour(p.confidence);
    const v = value(p);
    return v == null ? NULL_COLOUR : cats.get(v) || NULL_COLOUR;
  };
  legend.replaceChildren(...(key === "confidence"
    ? [el("span", {}, "confidence 0", el("span", { class: "gradient" }), "1")]
    : [...[...cats.entries()].slice(0, 24).map(([v, c]) => { const s = el("span", { class: "swatch" }); s.style.background = c; return el("span", {}, s, v); }),
      (() => { const s = el("span", { class: "swatch" }); s.style.background = NULL_COLOUR; return el("span", {}, s, key === "label" ? "unlabeled" : "no prediction"); })()]),
  ...(picks.length ? [el("span", {}, "picks: score low", el("span", { class: "gradient" }), "high")] : []));

  const all = [...base, ...picks];
  const xs = all.map((p) => p.x), ys = all.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const scores = picks.map((p) => p.score);
  const [s0, s1] = [Math.min(...scores), Math.max(...scores)];
  let screen = [];
  function draw() {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    canvas.width = w * dpr; canvas.height = h * dpr;
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    const pad = 16;
    const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (w - 2 * pad);
    const sy = (y) => h - pad - ((y - y0) / (y1 - y0 || 1)) * (h - 2 * pad);
    screen = [];
    ctx.globalAlpha = 0.75;
    for (const p of base) {
      const X = sx(p.x), Y = sy(p.y);
      ctx.fillStyle = fill(p);
      ctx.beginPath(); ctx.arc(X, Y, 3, 0, 2 * Math.PI); ctx.fill();
      screen.push([X, Y, p]);
    }
    ctx.globalAlpha = 1;
    for (const p of picks) {
      const X = sx(p.x), Y = sy(p.y);
      ctx.fillStyle = rampColour(s1 > s0 ? (p.score - s0) / (s1 - s0) : 1);
      ctx.strokeStyle = "#1d2230"; ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.arc(X, Y, 6, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
      screen.push([X, Y, p]);
    }
  }
  draw();
  window.addEventListener("resize", draw, { once: true });
  const nearest = (ev) => {
    const r = canvas.getBoundingClientRect();
    const mx = ev.clientX - r.left, my = ev.clientY - r.top;
    let best = null, bd = 100;
    for (const [X, Y, p] of screen) { const d = (X - mx) ** 2 + (Y - my) ** 2; if (d < bd) { bd = d; best = [X, Y, p]; } }
    return best;
  };
  canvas.addEventListener("mousemove", (ev) => {
    const hit = nearest(ev);
    if (!hit) { tip.hidden = true; return; }
    const [X, Y, p] = hit;
    const lines = [el("b", { text: p.id })];
    if (p.picked) lines.push(el("div", { text: `pick #${p.rank}, score ${fmt(p.score)}` }));
    else lines.push(el("div", { text: `label ${p.label ?? "–"}; prediction ${p.pred ?? "–"}${p.confidence != null ? ` (${p.confidence.toFixed(2)})` : ""}` }));
    if (info.kind === "image") lines.push(el("img", { src: thumbUrl(info.name, p.id, 96), alt: "" }));
    tip.replaceChildren(...lines);
    tip.hidden = false;
    tip.style.left = `${Math.min(X + 12, canvas.clientWidth - 200)}px`;
    tip.style.top = `${Y + 12}px`;
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  canvas.addEventListener("click", (ev) => {
    const hit = nearest(ev);
    if (hit) go(`/c/${enc(info.name)}/search`, { like: hit[2].id, space: space.value });
  });
}

// -- does uncertainty predict errors? ------------------------------------------------------

const UNCERTAINTY = { classification: ["entropy", "margin", "least_confidence", "ratio"], detection: ["entropy", "margin", "one_minus_score"],
  segmentation: ["topq_entropy", "mean_entropy", "bald"] };
const QUALITY = { classification: ["correct", "loss"], detection: ["iou"], segmentation: ["iou"] };

async function qualityTab(info, query, body, fresh) {
  const models = Object.entries(info.models);
  if (!models.length) return body.replaceChildren(el("p", { class: "muted", text: "No model: upsert predictions first." }));
  const sel = (name, options, value) => el("select", { name }, options.map(([v, t]) => el("option", { value: v, text: t, selected: v === value })));
  const modelName = query.get("model") || models[0][0];
  const task = (info.models[modelName] || models[0][1]).task;
  const model = sel("model", models.map(([n, m]) => [n, `${n} (${m.task})`]), modelName);
  const runs = info.runs.filter((r) => r.state === "SUCCEEDED" && r.model === modelName);
  const chosen = query.get("run") ? `run:${query.get("run")}` : (query.get("uncertainty") || UNCERTAINTY[task][0]);
  const uncertainty = sel("uncertainty", [...UNCERTAINTY[task].map((m) => [m, m]),
    ...runs.map((r) => [`run:${r.run_id}`, `run ${r.run_id.slice(0, 8)} (${r.miner}, ${r.results} rows)`])], chosen);
  const quality = sel("quality", QUALITY[task].map((q) => [q, q]), query.get("quality") || QUALITY[task][0]);
  const where = el("input", { type: "text", name: "where", placeholder: "filter, e.g. split = 'val'", value: query.get("where") || "" });
  const form = el("form", { class: "row" }, model, uncertainty, quality, where, el("button", { type: "submit", text: "Report" }));
  const params = () => {
    const u = uncertainty.value;
    return { model: model.value, uncertainty: u.startsWith("run:") ? "" : u, run: u.startsWith("run:") ? u.slice(4) : "",
      quality: quality.value, where: where.value.trim() };
  };
  form.addEventListener("submit", (ev) => { ev.preventDefault(); go(`/c/${enc(info.name)}/quality`, params()); });
  model.addEventListener("change", () => go(`/c/${enc(info.name)}/quality`, { model: model.value }));
  const out = el("div", {}, el("p", { class: "muted", text: "Computing…" }));
  body.replaceChildren(el("p", { class: "muted", text: "On the labeled rows: does the model's uncertainty rank its errors? " +
    "Spearman's rho between the uncertainty and the quality, and the rows split at the medians (correct: right vs wrong)." }), form, out);
  const q = new URLSearchParams(Object.entries(params()).filter(([, v]) => v !== ""));
  q.set("max_ids", "20");
  try {
    const r = await api(`/api/collections/${enc(info.name)}/uncertainty_quality?${q}`);
    if (!fresh()) return;
    out.replaceChildren(qualityReport(r));
  } catch (e) {
    if (fresh()) out.replaceChildren(el("p", { class: "error", text: `${e.code || "error"}: ${e.message}` }));
  }
}

function qualityReport(r) {
  const better = r.higher_is_better ? "higher" : "lower";
  const byName = Object.fromEntries(r.quadrants.map((x) => [x.quadrant, x]));
  const cell = (name, note) => {
    const x = byName[name];
    return el("td", { class: `quadrant ${name}`, "data-quadrant": name },
      el("div", { class: "num" }, el("b", { text: int(x.count) }), ` ${note}`),
      el("div", { class: "ids", text: x.ids.join("  ") + (x.count > x.ids.length ? "  …" : "") }));
  };
  const verdict = r.rho_error === null ? "" : r.rho_error > 0 ? " — the uncertain rows are the bad ones" : " — the uncertain rows are not the bad ones";
  return el("div", {},
    el("div", { class: "panel" }, el("dl", { class: "kv" },
      el("dt", { text: "Spearman rho" }), el("dd", { class: "rho", text: r.rho === null ? "undefined" : `${fmt(r.rho)} (p = ${fmt(r.p_value, 3)})` }),
      el("dt", { text: "rho vs errors" }), el("dd", { class: "rho-error", text: r.rho_error === null ? "–" : `${fmt(r.rho_error)}${verdict}` }),
      el("dt", { text: "rows" }), el("dd", { text: `${int(r.n)} of ${int(r.rows)} labeled rows` +
        (r.missing + r.unknown_label + r.non_finite ? ` (left out: ${int(r.missing)} missing, ${int(r.unknown_label)} unknown label, ${int(r.non_finite)} NaN/inf)` : "") +
        (r.missing_masks ? `; ${int(r.missing_masks)} with a mask file missing or unreadable, e.g. ${r.mask_problem}` : "") }),
      el("dt", { text: "uncertainty" }), el("dd", { text: `${r.uncertainty}: high when > ${fmt(r.uncertainty_threshold)}` }),
      el("dt", { text: "quality" }), el("dd", { text: `${r.quality} (${better} is better): low when ${r.higher_is_better ? "<" : ">"} ${fmt(r.quality_threshold)}` }))),
    el("table", { class: "quadrants" },
      el("tr", {}, el("th", {}), el("th", { text: "low quality" }), el("th", { text: "high quality" })),
      el("tr", {}, el("th", { text: "high uncertainty" }), cell("high_uncertainty_low_quality", "caught errors"),
        cell("high_uncertainty_high_quality", "false alarms")),
      el("tr", {}, el("th", { text: "low uncertainty" }), cell("low_uncertainty_low_quality", "confident errors"),
        cell("low_uncertainty_high_quality", "confident and right"))));
}

// -- boxes: object rows of a detection model or of gt_boxes ------------------------------------

const OBJECT_SHOWN = ["id", "box", "class", "score", "x1", "y1", "x2", "y2", "area"];

function rowsTable(kind, columns, rows) {
  const cell = (v) => (v === null || v === undefined ? el("td", { class: "muted", text: "–" })
    : typeof v === "number" ? el("td", { class: "num", text: Number.isInteger(v) ? int(v) : fmt(v) })
    : el("td", { text: String(v) }));
  return el("table", { class: "box-table", "data-kind": kind },
    el("tr", {}, columns.map((c) => el("th", { class: rows.some((r) => typeof r[c] === "number") ? "num" : null, text: c }))),
    rows.map((r) => el("tr", {}, columns.map((c) => cell(r[c])))));
}

async function boxesTab(info, query, body, fresh) {
  const detectors = Object.entries(info.models).filter(([, m]) => m.task === "detection").map(([n]) => n);
  const sources = [...detectors, "gt"];
  const source = sources.includes(query.get("model")) ? query.get("model") : sources[0];
  const sel = el("select", { name: "model" }, sources.map((s) =>
    el("option", { value: s, text: s === "gt" ? "gt (gt_boxes)" : `${s} (detection)`, selected: s === source })));
  const where = el("input", { type: "text", name: "where", placeholder: "images, e.g. split = 'val'", value: query.get("where") || "" });
  const objectsWhere = el("input", { type: "text", name: "objects_where", placeholder: "boxes, e.g. area < 1e4 AND score < 0.6",
    value: query.get("objects_where") || "" });
  const form = el("form", { class: "row" }, sel, where, objectsWhere, el("button", { type: "submit", text: "Show" }));
  const params = () => Object.fromEntries(Object.entries({ model: sel.value, where: where.value.trim(),
    objects_where: objectsWhere.value.trim() }).filter(([, v]) => v !== ""));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); go(`/c/${enc(info.name)}/boxes`, params()); });
  const out = el("div", {}, el("p", { class: "muted", text: "Computing…" }));
  body.replaceChildren(el("p", { class: "muted", text: "Boxes as rows: one per box of a detection model or of gt_boxes. " +
    "The image filter keeps images; the box filter (SQL over id, source, box, class, score, x1..y2, width, height, area) keeps boxes " +
    "(box confusion matches whole images, so there it keeps the images with such a box)." }), form, out);
  const q = new URLSearchParams(params());
  const get = (kind, extra) => api(`/api/collections/${enc(info.name)}/boxes/${kind}?${q}${extra || ""}`);
  try {
    const isModel = source !== "gt";
    const [classes, objects, confusion, pairs] = await Promise.all([get("object_classes"), get("objects", "&limit=100"),
      isModel ? get("box_confusion") : null, isModel ? get("box_confused_pairs") : null]);
    if (!fresh()) return;
    const max = Math.max(1, ...classes.rows.map((r) => r.count));
    const parts = [
      el("h2", { text: "Box classes" }),
      classes.rows.length ? el("div", { class: "panel bars", "data-kind": "object_classes" }, classes.rows.map((r) => {
        const bar = el("div", { class: "bar" });
        bar.style.width = `${(100 * r.count) / max}%`;  // CSSOM, not a style attribute: the CSP refuses inline styles
        return [el("span", { text: r.class === null ? "(no class)" : r.class }), el("div", {}, bar),
          el("span", { class: "num", text: int(r.count) })];
      })) : el("p", { class: "muted", text: "No boxes." }),
    ];
    if (confusion) parts.push(el("h2", { text: "Box confusion against gt_boxes (IoU ≥ 0.5; – label: spurious, – predicted: missed)" }),
      rowsTable("box_confusion", confusion.columns, confusion.rows));
    if (pairs) parts.push(el("h2", { text: "Confused pairs per box (top-two classes; – classes: boxes without probs)" }),
      rowsTable("box_confused_pairs", pairs.columns, pairs.rows));
    parts.push(el("h2", { text: `Object rows (first ${int(objects.rows.length)})` }),
      rowsTable("objects", OBJECT_SHOWN, objects.rows));
    out.replaceChildren(...parts);
  } catch (e) {
    if (fresh()) out.replaceChildren(el("p", { class: "error", text: `${e.code || "error"}: ${e.message}` }));
  }
}

// -- datasets ------------------------------------------------------------------------------

async function datasetPage(name, query, fresh) {
  const d = await api(`/api/datasets/${enc(name)}`);
  if (!fresh()) return;
  const ds = d.dataset;
  const info = await api(`/api/collections/${enc(ds.collection)}`);
  if (!fresh()) return;
  crumbs(["collections", "#/"], [ds.collection, `#/c/${enc(ds.collection)}`], ["datasets", `#/c/${enc(ds.collection)}/datasets`], [name]);
  const history = el("table", {}, el("tr", {}, ["version", "message", "members", "added", "removed", "collection version", "author", "tags", "committed"].map((h) => el("th", { text: h }))),
    d.history.map((c) => el("tr", {}, el("td", { class: "num", text: c.version }), el("td", { text: c.message }),
      el("td", { class: "num", text: int(c.members) }), el("td", { class: "num", text: `+${int(c.added)}` }),
      el("td", { class: "num", text: `−${int(c.removed)}` }), el("td", { class: "num", text: c.collection_version }),
      el("td", { text: c.author || "–" }), el("td", { text: (c.tags || []).join(", ") || "–" }), el("td", { text: when(c.created_at) }))));
  const versions = d.history.map((c) => c.version);
  const options = (value) => [...versions.map((v) => [String(v), `v${v}`]), ["0", "v0 (empty)"], ["working", "working state"]]
    .map(([v, t]) => el("option", { value: v, text: t, selected: v === value }));
  const v2def = query.get("v2") || (versions.length ? String(versions[0]) : "working");
  const v1def = query.get("v1") || (versions.length > 1 ? String(versions[1]) : "0");
  const v1 = el("select", { name: "v1" }, options(v1def)), v2 = el("select", { name: "v2" }, options(v2def));
  const form = el("form", { class: "row" }, "diff from", v1, "to", v2, el("button", { type: "submit", text: "Compare" }));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); go(`/d/${enc(name)}`, { v1: v1.value, v2: v2.value }); });
  const out = el("div", {});
  page(el("h1", { text: `Dataset ${name}` }),
    el("div", { class: "panel" }, el("dl", { class: "kv" },
      el("dt", { text: "collection" }), el("dd", {}, el("a", { href: `#/c/${enc(ds.collection)}`, text: ds.collection })),
      el("dt", { text: "members at head" }), el("dd", { text: `${int(ds.members)} (version ${ds.head})` }),
      el("dt", { text: "staged" }), el("dd", { text: `+${int(d.status.staged_adds)} −${int(d.status.staged_removes)}` }),
      el("dt", { text: "description" }), el("dd", { text: ds.description || "–" }))),
    el("h2", { text: "History" }), d.history.length ? history : el("p", { class: "muted", text: "No commits yet." }),
    el("h2", { text: "Diff" }), form, out);
  if (!d.history.length) return;
  const diff = await api(`/api/datasets/${enc(name)}/diff?v1=${enc(v1def)}&v2=${enc(v2def)}`);
  if (!fresh()) return;
  const label = (v) => (v === null ? "working" : `v${v}`);
  out.replaceChildren(el("div", {},
    el("p", { class: "diff-summary", text: `${label(diff.v1)} → ${label(diff.v2)}: ${int(diff.added)} added, ${int(diff.removed)} removed, ${int(diff.relabeled)} relabeled` }),
    diff.added ? el("h2", { text: `Added (${int(diff.added)})${diff.added > diff.added_items.length ? `, the first ${diff.added_items.length}` : ""}` }) : null,
    diff.added ? grid(diff.added_items, ds.collection, info.kind) : null,
    diff.removed ? el("h2", { text: `Removed (${int(diff.removed)})` }) : null,
    diff.removed ? el("p", { class: "ids", text: diff.removed_ids.join("  ") + (diff.removed > diff.removed_ids.length ? "  …" : "") }) : null,
    diff.relabeled ? el("h2", { text: `Relabeled (${int(diff.relabeled)})` }) : null,
    diff.relabeled ? el("table", {}, el("tr", {}, ["id", "before", "after"].map((h) => el("th", { text: h }))),
      diff.relabeled_rows.map((r) => el("tr", {}, el("td", { text: r.id }), el("td", { text: r.label_before ?? "–" }), el("td", { text: r.label_after ?? "–" })))) : null));
}

// -- start -----------------------------------------------------------------------------------

async function refreshInfo() {
  const info = await api("/api/info");
  $("#status").textContent = info.authenticated && info.grpc_address ? `gRPC ${info.grpc_address}` : "";
  $("#logout").hidden = !info.auth_required || !info.authenticated;
  return info;
}

async function start() {
  // A link with #token=... logs in once and leaves the token out of the address and history.
  const m = location.hash.match(/^#token=([^&]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname + "#/");
    try { await login(decodeURIComponent(m[1])); } catch (e) { $("#login-error").textContent = e.message; }
  }
  const info = await refreshInfo();
  if (info.auth_required && !info.authenticated) showLogin();
  window.addEventListener("hashchange", route);
  route();
}

start().catch(failure);
