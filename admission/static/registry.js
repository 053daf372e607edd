// Refresh the registry in place: fetch a freshly rendered fragment and swap it in.
(function () {
  const root = document.getElementById("registry");
  if (!root) return;
  const every = parseInt(root.dataset.refreshMs || "5000", 10);
  async function refresh() {
    try {
      const resp = await fetch("/registry?partial=true", { credentials: "same-origin", cache: "no-store" });
      if (resp.status === 401) { window.location.assign("/registry/login"); return; }
      if (resp.ok) root.innerHTML = await resp.text();
    } catch (e) { /* coordinator briefly unreachable: keep the last view */ }
    setTimeout(refresh, every);
  }
  setTimeout(refresh, every);
})();

// The Requests section: figures and queues from /registry/metrics every 15 s, and the last 24 hours drawn by
// the vendored uPlot (/static/vendor/uplot), in UTC like the rest of the page.
(function () {
  const section = document.getElementById("requests");
  const chartEl = document.getElementById("requests-chart");
  if (!section || !chartEl) return;
  const every = parseInt(section.dataset.refreshMs || "15000", 10);
  const css = getComputedStyle(document.documentElement);
  const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const ms = (v) => (v === null || v === undefined ? "–"
    : v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(1) + " s");
  const set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };
  let plot = null;

  function chartWidth() { return Math.max(320, chartEl.clientWidth || 800); }

  function draw(s) {
    const data = [s.t, s.requests, s.errors, s.p99_ms];
    if (plot) { plot.setData(data); return; }
    if (typeof uPlot === "undefined") return;
    const axis = { stroke: color("--muted", "#8a96a3"), grid: { stroke: "#2a333d", width: 1 },
                   ticks: { stroke: "#2a333d", width: 1 } };
    const bars = uPlot.paths.bars({ size: [0.8, 40] });
    const per = s.step_s >= 3600 ? "hour" : (s.step_s / 60) + " min";
    plot = new uPlot({
      width: chartWidth(), height: 220,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      cursor: { drag: { x: false, y: false } },
      scales: { n: { range: (u, min, max) => [0, Math.max(5, max)] },
                ms: { range: (u, min, max) => [0, Math.max(10, max || 10)] } },
      series: [
        {},
        { label: "requests / " + per, scale: "n", stroke: color("--accent", "#58a6ff"),
          fill: "rgba(88,166,255,0.35)", paths: bars, points: { show: false } },
        { label: "errors", scale: "n", stroke: color("--bad", "#f85149"), fill: "rgba(248,81,73,0.6)",
          paths: bars, points: { show: false } },
        { label: "p99", scale: "ms", stroke: color("--warn", "#d29922"), width: 2, spanGaps: false,
          value: (u, v) => ms(v) },
      ],
      axes: [
        axis,
        Object.assign({}, axis, { scale: "n", size: 50,
                                  values: (u, vals) => vals.map((v) => (Number.isInteger(v) ? v : "")) }),
        Object.assign({}, axis, { scale: "ms", side: 1, size: 64, grid: { show: false },
                                  values: (u, vals) => vals.map(ms) }),
      ],
    }, data, chartEl);
    window.addEventListener("resize", () => plot.setSize({ width: chartWidth(), height: 220 }));
  }

  // rows of a table in the section: [data attributes, [text, class] cells] each, or the empty line
  function fill(selector, rows, empty, width) {
    const body = document.querySelector(selector + " tbody");
    if (!body) return;
    body.replaceChildren();
    if (!rows.length) {
      const tr = body.insertRow(); tr.className = "empty";
      const td = tr.insertCell(); td.colSpan = width; td.className = "muted";
      td.textContent = empty;
      return;
    }
    for (const [data, cells] of rows) {
      const tr = body.insertRow();
      Object.assign(tr.dataset, data);
      for (const [text, cls] of cells) {
        const td = tr.insertCell(); td.textContent = String(text); if (cls) td.className = cls;
      }
    }
  }

  function queues(rows) {
    fill("#queues", rows.map((q) => [
      { deployment: q.application + "/" + q.deployment, cluster: q.cluster },
      [[q.cluster, "cluster"], [q.application, ""], [q.deployment, ""],
       [Math.round(q.queued), "queued" + (q.queued ? " warn" : "")], [Math.round(q.ongoing), ""]],
    ]), "No Serve deployment has reported yet.", 5);
  }

  function apps(rows) {
    fill("#request-apps", rows.map((a) => [
      { app: a.cluster + "/" + a.application, cluster: a.cluster, requests: String(a.requests) },
      [[a.cluster, "cluster"], [a.application || "(no route)", ""], [a.requests.toLocaleString("en-US"), ""],
       [a.errors_4xx, ""], [a.errors_5xx, a.errors_5xx ? "alert" : ""], [ms(a.p50_ms), ""], [ms(a.p99_ms), ""]],
    ]), "No request counted today.", 7);
  }

  function show(m) {
    set("req-today", m.today.requests.toLocaleString("en-US"));
    set("queued-now", String(Math.round(m.queued_total)));
    set("p50-hour", ms(m.last_hour.p50_ms));
    set("p99-hour", ms(m.last_hour.p99_ms));
    set("p50-today", ms(m.today.p50_ms));
    set("p99-today", ms(m.today.p99_ms));
    set("errors-today", String(m.today.errors_4xx + m.today.errors_5xx));
    set("errors-4xx", String(m.today.errors_4xx));
    set("errors-5xx", String(m.today.errors_5xx));
    const errs = document.getElementById("errors-today");
    if (errs) errs.classList.toggle("alert", m.today.errors_5xx > 0);
    apps(m.applications);
    queues(m.queues);
    const st = document.getElementById("metrics-status");
    if (st && section.dataset.wired === "true") {
      const c = m.collector;
      const missed = (c.unreachable || []).length;
      const unlisted = c.unlisted || [];
      st.textContent = c.error ? c.error : c.at
        ? "Scraped " + (c.targets - missed) + " of " + c.targets + " Ray metrics endpoint(s) at "
          + c.at.slice(11, 19) + " UTC, every " + Math.round(c.interval_s) + " s."
          + (missed ? " " + missed + " did not answer." : "")
          + (unlisted.length ? " " + unlisted.length + " cluster(s) could not be listed." : "")
        : "Waiting for the first scrape of Serve's metrics…";
      st.title = [...(c.unreachable || []), ...unlisted].join("; ");
      st.classList.toggle("alert", !!c.error);
    }
    draw(m.series);
  }

  async function refresh() {
    try {
      const resp = await fetch("/registry/metrics", { credentials: "same-origin", cache: "no-store" });
      if (resp.status === 401) { window.location.assign("/registry/login"); return; }
      if (resp.ok) show(await resp.json());
    } catch (e) { /* coordinator briefly unreachable: keep the last view */ }
    setTimeout(refresh, every);
  }
  refresh();
})();
