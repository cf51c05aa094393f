// Mask Studio attention viewer: the js_on_load of a gr.HTML block (element, trigger, props, watch).
// Draws a run's recorded attention (attention_viewer.py's payload) in the page; every look (layer,
// head, focus token, cell) is drawn here with no server request. Only in "layer" mode does a click
// on another layer ask the server for that layer's maps (server.viewer_layer({run, layer})).
(function () {
  const F16 = new Float32Array(65536);           // float16 bits -> float32, once
  for (let i = 0; i < 65536; i++) {
    const s = i & 0x8000 ? -1 : 1, e = (i >> 10) & 31, f = i & 1023;
    F16[i] = e === 0 ? s * f * 2 ** -24 : e === 31 ? (f ? NaN : s * Infinity) : s * (1 + f / 1024) * 2 ** (e - 15);
  }
  const MAGMA = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                 [250, 193, 39], [252, 253, 191]];
  const LUT = new Uint8ClampedArray(256 * 3);    // magma, 256 steps
  for (let i = 0; i < 256; i++) {
    const x = i / 255 * (MAGMA.length - 1), j = Math.min(Math.floor(x), MAGMA.length - 2), t = x - j;
    for (let c = 0; c < 3; c++) LUT[i * 3 + c] = MAGMA[j][c] * (1 - t) + MAGMA[j + 1][c] * t;
  }
  const MASKED = [236, 236, 241];
  const bytes = (b64) => { const s = atob(b64), a = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i); return a; };
  const headColor = (h, H) => `hsl(${Math.round(h * 360 / Math.max(H, 1))}, 72%, 42%)`;
  const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text; return e; };   // text only: token labels are user data

  let P = null, S = null, D = null, runKey = "";
  const layers = {}, maskCache = {};

  function layerData(l) {                         // Uint16Array [H, N, N] of layer l, or null
    if (layers[l]) return layers[l];
    const b64 = P.maps[String(l)];
    if (!b64) return null;
    return (layers[l] = new Uint16Array(bytes(b64).buffer));
  }
  function maskBits(i) {                          // Uint8Array [N * N], 1 = may attend
    if (maskCache[i]) return maskCache[i];
    const packed = bytes(P.masks[i]), n2 = P.n * P.n, out = new Uint8Array(n2);
    for (let j = 0; j < n2; j++) out[j] = (packed[j >> 3] >> (7 - (j & 7))) & 1;
    return (maskCache[i] = out);
  }
  function matrix() {                             // Float32Array [N, N]: the mean of the shown heads
    const data = layerData(S.layer);
    if (!data || !S.heads.size) return null;
    const key = S.layer + ":" + [...S.heads].join(",");
    if (S.mkey === key) return S.m;
    const n2 = P.n * P.n, m = new Float32Array(n2), w = 1 / S.heads.size;
    for (const h of S.heads) { const o = h * n2; for (let j = 0; j < n2; j++) m[j] += F16[data[o + j]] * w; }
    S.mkey = key; S.m = m;
    return m;
  }
  function segmentOf(i) { return P.segments.find((s) => i >= s.start && i < s.start + s.size) || P.segments[0]; }
  function label(i) { const s = segmentOf(i); return `${i}: ${P.tokens[i]} (${s.name}[${i - s.start}])`; }

  // ------------------------------------------------------------ building the page
  function build() {
    const root = element.querySelector(".av-root");
    if (!root) return;
    root.textContent = "";
    if (!P) { root.dataset.empty = "1"; root.append(el("div", "av-empty", "Run the design: its attention can then be explored here with the mouse.")); return; }
    delete root.dataset.empty;
    const key = [P.model, P.design, P.n, P.layers, P.heads, P.tokens.join("\u0001")].join("|");
    if (key !== runKey) {                          // a new run: fresh state and caches
      runKey = key;
      for (const k in layers) delete layers[k];
      for (const k in maskCache) delete maskCache[k];
      S = { layer: P.layer, heads: new Set([...Array(P.heads).keys()]), fq: P.n - 1, fk: P.n - 1, pinned: false,
            dir: "from", mkey: null, m: null, waiting: null };
    } else {
      for (const k in layers) delete layers[k];
      if (!P.maps[String(S.layer)] && P.mode !== "off") S.layer = P.layer;
      S.waiting = null; S.mkey = null;
    }
    D = { root };
    root.append(el("div", "av-info", `${P.model} · ${P.design} · ${P.n} tokens · ${P.layers} layers × ${P.heads} heads. ${P.bound}`));
    const help = el("details", "av-help"); help.append(el("summary", "", "How to read this viewer"), el("div", "", P.help || ""));
    root.append(help);
    const bar = el("div", "av-bar");
    D.layerLabel = el("span", "av-layer");
    bar.append(D.layerLabel, el("span", "av-sep", "heads:"));
    D.chips = [];
    const all = el("button", "av-chip av-all", "all");
    all.onclick = () => { S.heads = new Set([...Array(P.heads).keys()]); render(); };
    bar.append(all);
    for (let h = 0; h < P.heads; h++) {
      const c = el("button", "av-chip", String(h));
      c.style.setProperty("--c", headColor(h, P.heads));
      c.onclick = (ev) => { if (ev.shiftKey || ev.ctrlKey || ev.metaKey) S.heads = new Set([h]);
        else if (S.heads.has(h) && S.heads.size > 1) S.heads.delete(h); else S.heads.add(h); render(); };
      D.chips.push(c); bar.append(c);
    }
    D.dir = {};
    for (const [d, text] of [["from", "row: what the focus attends to"], ["to", "column: what attends to the focus"]]) {
      const b = el("button", "av-dir", text); b.onclick = () => { S.dir = d; render(); }; D.dir[d] = b; bar.append(b);
    }
    root.append(bar);
    const body = el("div", "av-body");
    const gridBox = el("div", "av-gridbox");
    gridBox.append(el("div", "av-cap", "every layer (columns) × head (rows): click a map"));
    D.grid = el("canvas", "av-grid"); gridBox.append(D.grid);
    const mapBox = el("div", "av-mapbox");
    D.mapCap = el("div", "av-cap");
    D.map = el("canvas", "av-map"); D.over = el("canvas", "av-over");
    const stack = el("div", "av-stack"); stack.append(D.map, D.over);
    mapBox.append(D.mapCap, stack);
    const linesBox = el("div", "av-linesbox");
    linesBox.append(el("div", "av-cap", "query (attending) → key (attended), one colour per head"));
    D.linesScroll = el("div", "av-linescroll");
    D.lines = el("canvas", "av-lines"); D.linesScroll.append(D.lines); linesBox.append(D.linesScroll);
    body.append(gridBox, mapBox, linesBox);
    root.append(body);
    D.status = el("div", "av-status");
    root.append(D.status);
    D.text = el("div", "av-text");
    D.spans = [];
    let seg = -1;
    for (let i = 0; i < P.n; i++) {
      const s = P.segments.indexOf(segmentOf(i));
      if (s !== seg) { seg = s; const tag = el("span", "av-seg", P.segments[s].name); tag.style.borderColor = P.segments[s].color; D.text.append(tag); }
      const t = el("span", "av-tok", P.tokens[i]);
      t.dataset.i = i;
      D.spans.push(t); D.text.append(t);
    }
    D.text.onmousemove = (ev) => { const i = ev.target.dataset && ev.target.dataset.i; if (i !== undefined) focus(+i, +i); };
    D.text.onclick = (ev) => { const i = ev.target.dataset && ev.target.dataset.i; if (i !== undefined) { S.pinned = !S.pinned; focus(+i, +i, true); } };
    root.append(el("div", "av-cap", "the text coloured by attention from / to the focus token (hover a token; click pins it)"));
    root.append(D.text);
    setupGrid(); setupMap(); setupLines();
    render();
  }

  function focus(q, k, force) {
    if (S.pinned && !force) return;
    if (q === S.fq && k === S.fk && !force) return;
    S.fq = q; S.fk = k; render();
  }

  // ------------------------------------------------------------ the layers x heads grid
  function setupGrid() {
    const c = P.cells, gap = 2, cell = 22, pad = 18, th = bytes(P.thumbs);
    const mosaic = document.createElement("canvas");
    mosaic.width = P.layers * c; mosaic.height = P.heads * c;
    const mctx = mosaic.getContext("2d"), img = mctx.createImageData(mosaic.width, mosaic.height);
    for (let l = 0; l < P.layers; l++) for (let h = 0; h < P.heads; h++) for (let y = 0; y < c; y++) for (let x = 0; x < c; x++) {
      const v = th[((l * P.heads + h) * c + y) * c + x], o = ((h * c + y) * mosaic.width + l * c + x) * 4;
      img.data[o] = LUT[v * 3]; img.data[o + 1] = LUT[v * 3 + 1]; img.data[o + 2] = LUT[v * 3 + 2]; img.data[o + 3] = 255;
    }
    mctx.putImageData(img, 0, 0);
    D.gridGeom = { c, gap, cell, pad, mosaic };
    D.grid.width = pad + P.layers * (cell + gap); D.grid.height = pad + P.heads * (cell + gap);
    const at = (ev) => { const r = D.grid.getBoundingClientRect(), sx = D.grid.width / r.width;
      const l = Math.floor(((ev.clientX - r.left) * sx - pad) / (cell + gap)), h = Math.floor(((ev.clientY - r.top) * sx - pad) / (cell + gap));
      return l >= 0 && l < P.layers && h >= 0 && h < P.heads ? [l, h] : null; };
    D.grid.onclick = (ev) => { const p = at(ev); if (!p) return; S.heads = new Set([p[1]]); setLayer(p[0]); };
    D.grid.onmousemove = (ev) => { const p = at(ev); D.grid.title = p ? `layer ${p[0]}, head ${p[1]}: click to show it` : ""; };
  }
  function setLayer(l) {
    if (P.mode === "layer" && !P.maps[String(l)]) {  // the one server trip: this layer's maps
      S.waiting = l; render();
      server.viewer_layer({ run: P.run, layer: l }).then((res) => {
        if (!res || !res.maps || !res.maps[String(l)] || S.waiting !== l) return;
        P.maps = res.maps; for (const k in layers) delete layers[k];   // one layer in the page at a time
        S.layer = l; S.waiting = null; S.mkey = null; render();
      }).catch(() => { S.waiting = null; render(); });
      return;
    }
    S.layer = l; S.waiting = null; render();
  }
  function drawGrid() {
    const g = D.gridGeom, ctx = D.grid.getContext("2d");
    ctx.clearRect(0, 0, D.grid.width, D.grid.height);
    ctx.imageSmoothingEnabled = false;
    for (let l = 0; l < P.layers; l++) for (let h = 0; h < P.heads; h++)
      ctx.drawImage(g.mosaic, l * g.c, h * g.c, g.c, g.c, g.pad + l * (g.cell + g.gap), g.pad + h * (g.cell + g.gap), g.cell, g.cell);
    ctx.fillStyle = "#555"; ctx.font = "10px sans-serif"; ctx.textAlign = "center";
    for (let l = 0; l < P.layers; l += (P.layers > 16 ? 5 : 1)) ctx.fillText(String(l), g.pad + l * (g.cell + g.gap) + g.cell / 2, 12);
    ctx.textAlign = "right";
    for (let h = 0; h < P.heads; h++) ctx.fillText(String(h), g.pad - 3, g.pad + h * (g.cell + g.gap) + g.cell / 2 + 4);
    ctx.lineWidth = 2;
    for (const h of S.heads) { ctx.strokeStyle = headColor(h, P.heads);
      ctx.strokeRect(g.pad + S.layer * (g.cell + g.gap) - 1, g.pad + h * (g.cell + g.gap) - 1, g.cell + 2, g.cell + 2); }
  }

  // ------------------------------------------------------------ the map with the mask outlined
  function setupMap() {
    const size = Math.max(360, Math.min(560, P.n * 8));
    D.size = size;
    D.map.width = P.n; D.map.height = P.n;
    D.map.style.width = D.map.style.height = D.over.style.width = D.over.style.height = size + "px";
    const dpr = window.devicePixelRatio || 1;
    D.over.width = D.over.height = Math.round(size * dpr);
    const at = (ev) => { const r = D.over.getBoundingClientRect();
      const k = Math.floor((ev.clientX - r.left) / r.width * P.n), q = Math.floor((ev.clientY - r.top) / r.height * P.n);
      return q >= 0 && q < P.n && k >= 0 && k < P.n ? [q, k] : null; };
    D.over.onmousemove = (ev) => { const p = at(ev); if (p) focus(p[0], p[1]); };
    D.over.onclick = (ev) => { const p = at(ev); if (p) { S.pinned = !S.pinned; focus(p[0], p[1], true); } };
  }
  function outline(mi) {                          // Path2D of the mask's allowed / masked boundaries
    const key = "path" + mi;
    if (maskCache[key]) return maskCache[key];
    const m = maskBits(mi), n = P.n, s = D.over.width / n, path = new Path2D();
    for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
      const a = m[q * n + k];
      if (k + 1 < n ? a !== m[q * n + k + 1] : a) { path.moveTo((k + 1) * s, q * s); path.lineTo((k + 1) * s, (q + 1) * s); }
      if (k === 0 && a) { path.moveTo(0, q * s); path.lineTo(0, (q + 1) * s); }
      if (q + 1 < n ? a !== m[(q + 1) * n + k] : a) { path.moveTo(k * s, (q + 1) * s); path.lineTo((k + 1) * s, (q + 1) * s); }
      if (q === 0 && a) { path.moveTo(k * s, 0); path.lineTo((k + 1) * s, 0); }
    }
    return (maskCache[key] = path);
  }
  function maskIndex() { return P.mask_of[S.layer][Math.min(...S.heads)]; }
  function drawMap(m) {
    const n = P.n, ctx = D.map.getContext("2d"), img = ctx.createImageData(n, n), mk = maskBits(maskIndex());
    for (let j = 0; j < n * n; j++) {
      const o = j * 4;
      if (!mk[j]) { img.data[o] = MASKED[0]; img.data[o + 1] = MASKED[1]; img.data[o + 2] = MASKED[2]; }
      else { const v = Math.min(255, Math.round(Math.sqrt(Math.max(m[j], 0)) * 255)) * 3;
        img.data[o] = LUT[v]; img.data[o + 1] = LUT[v + 1]; img.data[o + 2] = LUT[v + 2]; }
      img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    const o = D.over.getContext("2d"), s = D.over.width / n;
    o.clearRect(0, 0, D.over.width, D.over.height);
    o.lineWidth = Math.max(1, s / 6); o.strokeStyle = "#17a2b8"; o.stroke(outline(maskIndex()));
    o.lineWidth = Math.max(1.5, s / 4);
    o.strokeStyle = "#2ec4d6"; o.strokeRect(0, S.fq * s, D.over.width, s);
    o.strokeStyle = "#5ee05e"; o.strokeRect(S.fk * s, 0, s, D.over.height);
  }

  // ------------------------------------------------------------ lines between tokens (BertViz head view)
  function setupLines() {
    D.rowH = 15;
    D.linesOn = P.n <= P.lines_max;
    if (!D.linesOn) { D.linesScroll.textContent = `lines are drawn up to ${P.lines_max} tokens (this run has ${P.n}); the map and the text show every token`; return; }
    D.lines.width = 380; D.lines.height = P.n * D.rowH + 6;
    const at = (ev) => { const r = D.lines.getBoundingClientRect(), i = Math.floor((ev.clientY - r.top - 3) / D.rowH);
      return i >= 0 && i < P.n ? [i, ev.clientX - r.left < r.width / 2 ? "from" : "to"] : null; };
    D.lines.onmousemove = (ev) => { const p = at(ev); if (!p || S.pinned) return;
      if (S.dir !== p[1] || S.fq !== p[0] || S.fk !== p[0]) { S.dir = p[1]; S.fq = S.fk = p[0]; render(); } };
    D.lines.onclick = (ev) => { const p = at(ev); if (p) { S.pinned = !S.pinned; S.dir = p[1]; focus(p[0], p[0], true); } };
  }
  function drawLines(data) {
    if (!D.linesOn) return;
    const ctx = D.lines.getContext("2d"), n = P.n, n2 = n * n, h = D.rowH, xl = 150, xr = 230;
    ctx.clearRect(0, 0, D.lines.width, D.lines.height);
    ctx.font = "11px monospace";
    for (let i = 0; i < n; i++) {
      const y = 3 + i * h + h / 2 + 4, t = P.tokens[i].slice(0, 18);
      const onL = S.dir === "from" && i === S.fq, onR = S.dir === "to" && i === S.fk;
      ctx.fillStyle = onL ? "#0a7d8c" : "#333"; ctx.textAlign = "right"; ctx.fillText(t, xl - 6, y);
      ctx.fillStyle = onR ? "#2c8a2c" : "#333"; ctx.textAlign = "left"; ctx.fillText(t, xr + 6, y);
    }
    if (!data) return;
    ctx.lineWidth = 2;
    for (const hd of S.heads) {
      ctx.strokeStyle = headColor(hd, P.heads);
      const o = hd * n2;
      for (let j = 0; j < n; j++) {
        const q = S.dir === "from" ? S.fq : j, k = S.dir === "from" ? j : S.fk, w = F16[data[o + q * n + k]];
        if (!(w > 0.01)) continue;
        ctx.globalAlpha = Math.min(1, w ** 0.6);
        ctx.beginPath(); ctx.moveTo(xl, 3 + q * h + h / 2); ctx.lineTo(xr, 3 + k * h + h / 2); ctx.stroke();
      }
    }
    ctx.globalAlpha = 1;
  }

  // ------------------------------------------------------------ the text coloured by attention
  function drawText(m) {
    const n = P.n;
    let top = 0;
    const v = new Float32Array(n);
    for (let i = 0; i < n; i++) { v[i] = m ? (S.dir === "from" ? m[S.fq * n + i] : m[i * n + S.fk]) : 0; if (v[i] > top) top = v[i]; }
    const f = S.dir === "from" ? S.fq : S.fk;
    for (let i = 0; i < n; i++) {
      const a = top > 0 ? Math.sqrt(v[i] / top) : 0;
      D.spans[i].style.backgroundColor = `rgba(200, 66, 74, ${a.toFixed(3)})`;
      D.spans[i].style.color = a > 0.6 ? "#fff" : "";
      D.spans[i].classList.toggle("av-focus", i === f);
      D.spans[i].title = `${label(i)}: ${v[i].toFixed(4)}`;
    }
  }

  function render() {
    if (!P || !D) return;
    const t0 = performance.now(), root = D.root;
    const data = layerData(S.layer), m = matrix();
    D.layerLabel.textContent = S.waiting !== null ? `layer ${S.waiting}: loading from the server…` : `layer ${S.layer}`;
    D.chips.forEach((c, h) => c.classList.toggle("on", S.heads.has(h)));
    for (const d in D.dir) D.dir[d].classList.toggle("on", S.dir === d);
    drawGrid();
    const heads = S.heads.size === P.heads ? "mean over heads" : S.heads.size === 1 ? `head ${[...S.heads][0]}` : `mean of heads ${[...S.heads].join(", ")}`;
    D.mapCap.textContent = `layer ${S.layer}, ${heads} (sqrt colour scale; grey = masked by the design, outlined in teal); cyan row = focus query, green column = focus key`;
    if (m) drawMap(m);
    drawLines(data);
    drawText(m);
    const p = m ? m[S.fq * P.n + S.fk] : NaN, allowed = maskBits(maskIndex())[S.fq * P.n + S.fk];
    D.status.textContent = !m ? (P.mode === "off" ? P.bound : "loading this layer…") :
      `focus: query ${label(S.fq)} → key ${label(S.fk)}: p = ${p.toFixed(4)}, ${allowed ? "allowed" : "masked"} by the design` +
      (S.pinned ? "  · pinned (click again to release)" : "  · hover to move, click to pin");
    Object.assign(root.dataset, { layer: S.layer, heads: [...S.heads].join(","), fq: S.fq, fk: S.fk, dir: S.dir,
      pinned: S.pinned ? "1" : "0", mode: P.mode, renderMs: (performance.now() - t0).toFixed(2),
      renders: String(+(root.dataset.renders || 0) + 1) });
    requestAnimationFrame(() => { root.dataset.paintedAt = performance.now().toFixed(2); });
  }

  function load() { P = props.value && typeof props.value === "object" && props.value.v === 1 ? props.value : null; build(); }
  watch("value", load);
  load();
})();
