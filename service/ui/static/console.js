// The peer-service console: what changes while an operator looks, and the actions.
// Everything goes to the service's JSON API from the same origin, as the signed-in session (its cookie, which
// this script cannot read: no key is ever kept in the page), and shows the API's message when refused.
"use strict";
(() => {
  const SEGMENT_COLOURS = ["#e8590c", "#1c7ed6", "#d6336c", "#2b8a3e", "#7048e8", "#0c8599"];
  const ACTIVE_STATES = new Set(["queued", "running", "cancelling"]);
  const $ = (selector, root = document) => root.querySelector(selector);
  const esc = (value) => String(value ?? "").replace(/[&<>"']/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const page = document.body.dataset.page;

  // ---- the API ------------------------------------------------------------------------------------

  function apiMessage(status, data) {
    const detail = data && typeof data === "object" ? (data.detail ?? data.error?.message) : data;
    const text = typeof detail === "string" ? detail : JSON.stringify(detail ?? "no answer");
    return `${status}: ${text}`;
  }

  async function api(method, path, body) {
    const init = {method, headers: {}};
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = text; }
    if (!response.ok) {
      const error = new Error(apiMessage(response.status, data));
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function flash(message, kind = "error") {
    const box = $("#flash");
    box.textContent = message;
    box.className = `flash ${kind}`;
    box.hidden = false;
    clearTimeout(flash.timer);
    if (kind !== "error") flash.timer = setTimeout(() => { box.hidden = true; }, 8000);
  }

  // ---- header: status, banner -----------------------------------------------------------------------

  $("#flash").addEventListener("click", (event) => { event.currentTarget.hidden = true; });

  function applyStatus(status) {
    const banner = $("#banner");
    banner.textContent = status.warning || "";
    banner.hidden = !status.warning;
    $("#active-version").textContent = status.active_version ? `v${status.active_version}` : "none";
    $("#served-version").textContent = status.served_version ? `v${status.served_version}` : "none";
    if (status.base && $("#served-base")) $("#served-base").textContent = status.base.name;
    $("#job-counts").textContent = `${status.jobs.running + status.jobs.cancelling} running, ${status.jobs.queued} queued`;
  }

  async function refreshStatus() {
    try { applyStatus(await api("GET", "/v1/status")); } catch { /* keep what is shown; retried */ }
  }
  setInterval(refreshStatus, page === "jobs" ? 1000 : 3000);

  // Replace an element with its fresh server rendering (the page is fetched again; one renderer).
  async function refreshFragment(selector) {
    const response = await fetch(location.pathname + location.search);
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html").querySelector(selector);
    const current = $(selector);
    if (fresh && current) current.replaceWith(fresh);
  }

  function setBar(bar, fraction) {
    const percent = Math.max(0, Math.min(100, Math.floor(fraction * 100)));
    bar.setAttribute("aria-valuenow", String(percent));
    bar.querySelector("span").style.width = `${percent}%`;
    bar.querySelector("em").textContent = `${percent}%`;
  }

  function barHtml(fraction, state) {
    const percent = Math.max(0, Math.min(100, Math.floor(fraction * 100)));
    return `<div class="bar state-${esc(state)}" role="progressbar" aria-valuemin="0" aria-valuemax="100" ` +
      `aria-valuenow="${percent}"><span style="width: ${percent}%"></span><em>${percent}%</em></div>`;
  }

  function duration(seconds) {
    if (seconds == null || !isFinite(seconds)) return "—";
    seconds = Math.round(seconds);
    if (seconds < 60) return `${seconds} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  }

  // ---- versions: activate / roll back --------------------------------------------------------------

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button.activate");
    if (!button) return;
    button.disabled = true;
    try {
      const version = await api("POST", `/v1/versions/${button.dataset.version}/activate`,
                                {reason: "activated from the console"});
      await refreshFragment("#version-tree");
      await refreshStatus();
      flash(`v${version.id} is active and served`, "ok");  // once the page shows it
    } catch (error) {
      flash(error.message);
      button.disabled = false;
    }
  });

  // ---- jobs: live table ----------------------------------------------------------------------------

  function lossSvg(metrics) {
    const points = (metrics && metrics.loss_history) || [];
    if (points.length < 2) return metrics && metrics.loss != null ? `loss ${Number(metrics.loss).toFixed(3)}` : "";
    const width = 140, height = 36;
    const steps = points.map((p) => p[0]), losses = points.map((p) => p[1]);
    const x0 = Math.min(...steps), x1 = Math.max(...steps), y0 = Math.min(...losses), y1 = Math.max(...losses);
    const line = points.map(([step, loss]) =>
      `${((step - x0) / ((x1 - x0) || 1) * (width - 4) + 2).toFixed(1)},` +
      `${(height - 3 - (loss - y0) / ((y1 - y0) || 1) * (height - 6)).toFixed(1)}`).join(" ");
    const last = losses[losses.length - 1];
    return `<svg class="loss" viewBox="0 0 ${width} ${height}" width="${width}" height="${height}" role="img" ` +
      `aria-label="loss curve"><title>loss ${y1.toFixed(3)} → ${last.toFixed(3)} over steps ${x0}–${x1}</title>` +
      `<polyline points="${line}"/></svg><small>${last.toFixed(3)}</small>`;
  }

  function jobCells(job, names) {
    const corpora = job.corpus_ids.map((c) => `${esc(names[c] ?? "corpus")} <small>#${c}</small>`).join(", ");
    const base = job.base_version_id ? `v${job.base_version_id}` : "active";
    const result = job.result_version_id
      ? ` → <a href="/ui/versions#version-${job.result_version_id}">v${job.result_version_id}</a>` : "";
    const active = ACTIVE_STATES.has(job.state);
    const took = job.finished_at && job.started_at
      ? (Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000 : null;
    let last;
    if (active) {
      last = job.state === "cancelling" ? "cancelling…"
        : `<button class="cancel" data-job="${job.id}">Cancel</button>`;
    } else if (job.error) {
      last = `<span class="error">${esc(job.error)}</span>`;
    } else if (job.kind === "ingest") {
      last = job.next_job_id ? `training: <a href="#job-${job.next_job_id}">job ${job.next_job_id}</a>` : "ingested";
    } else {
      last = job.metrics && job.metrics.gate
        ? `${job.metrics.activated ? "activated" : "not activated"}: ${esc(job.metrics.gate)}` : "";
    }
    return [
      `<a href="#job-${job.id}">${job.id}</a>`, esc(job.kind),
      `<span class="state state-${esc(job.state)}">${esc(job.state)}</span>`
        + (job.attempts > 1 ? ` <small>attempt ${job.attempts}</small>` : ""),
      corpora, `${base}${result}`, barHtml(job.progress, job.state),
      job.tokens_per_s != null ? Math.round(job.tokens_per_s).toLocaleString("en") : "—",
      active ? duration(job.eta_s) : duration(took), lossSvg(job.metrics), last,
    ];
  }

  function renderJobTable(table, jobs, names) {
    const body = table.tBodies[0];
    body.querySelectorAll("tr.empty").forEach((row) => row.remove());
    const keep = new Set(jobs.map((job) => `job-${job.id}`));
    for (const row of [...body.rows]) if (!keep.has(row.id)) row.remove();
    jobs.forEach((job, index) => {
      let row = document.getElementById(`job-${job.id}`);
      if (row && row.parentElement !== body) { row.remove(); row = null; }
      if (!row) {
        row = document.createElement("tr");
        row.id = `job-${job.id}`;
        for (let i = 0; i < 10; i++) row.insertCell();
      }
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
      row.dataset.state = job.state;
      row.dataset.progress = String(job.progress);
      jobCells(job, names).forEach((html, i) => {
        if (row.cells[i]._html !== html) { row.cells[i].innerHTML = html; row.cells[i]._html = html; }
      });
    });
    if (!jobs.length) {
      const row = body.insertRow();
      row.className = "empty";
      row.innerHTML = `<td colspan="10">${table.id === "active-jobs" ? "Nothing queued or running." : "No finished job yet."}</td>`;
    }
  }

  let targetShown = false;
  async function pollJobs() {
    try {
      const names = JSON.parse($("#corpus-names").textContent);
      const jobs = await api("GET", "/v1/jobs?limit=50");
      renderJobTable($("#active-jobs"), jobs.filter((job) => ACTIVE_STATES.has(job.state)), names);
      renderJobTable($("#finished-jobs"), jobs.filter((job) => !ACTIVE_STATES.has(job.state)), names);
      if (!targetShown && location.hash.startsWith("#job-")) {
        targetShown = true;
        const row = document.getElementById(location.hash.slice(1));
        if (row) { row.classList.add("target"); row.scrollIntoView({block: "center"}); }
      }
    } catch (error) {
      flash(`could not read the jobs: ${error.message}`);
    } finally {
      setTimeout(pollJobs, 1000);
    }
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button.cancel");
    if (!button) return;
    button.disabled = true;
    try {
      const job = await api("POST", `/v1/jobs/${button.dataset.job}/cancel`);
      flash(`job ${job.id}: ${job.state}`, "ok");
    } catch (error) {
      flash(error.message);
      button.disabled = false;
    }
  });

  // ---- corpora: upload with progress, then follow the ingest ---------------------------------------

  function corpusSummary(corpus) {
    const sizes = corpus.train_bytes != null
      ? `, ${corpus.train_bytes.toLocaleString("en")} B train / ${corpus.val_bytes.toLocaleString("en")} B validation` : "";
    const dups = corpus.duplicates_removed != null ? `, ${corpus.duplicates_removed} duplicate paragraphs removed` : "";
    return `corpus #${corpus.id} <b>${esc(corpus.name)}</b>: <span class="state state-${esc(corpus.state)}">` +
      `${esc(corpus.state)}</span>, ${corpus.raw_bytes.toLocaleString("en")} B in ${corpus.documents} ` +
      `document${corpus.documents === 1 ? "" : "s"}${dups}${sizes}` +
      (corpus.error ? `<div class="error">${esc(corpus.error)}</div>` : "");
  }

  async function followIngest(accepted) {
    const box = $("#upload-result");
    box.hidden = false;
    let ingestDone = false, trainingDone = false;
    for (;;) {
      try {
        const [corpus, ingest] = await Promise.all([api("GET", `/v1/corpora/${accepted.corpus.id}`),
                                                    api("GET", `/v1/jobs/${accepted.job.id}`)]);
        let html = `<p>${corpusSummary(corpus)}</p><p>ingest <a href="/ui/jobs#job-${ingest.id}">job ${ingest.id}</a>: ` +
          `<span class="state state-${esc(ingest.state)}">${esc(ingest.state)}</span></p>`;
        let training = null;
        if (ingest.next_job_id) {
          training = await api("GET", `/v1/jobs/${ingest.next_job_id}`);
          html += `<p>training <a href="/ui/jobs#job-${training.id}">job ${training.id}</a>: ` +
            `<span class="state state-${esc(training.state)}">${esc(training.state)}</span>` +
            (training.result_version_id ? ` → <a href="/ui/versions#version-${training.result_version_id}">v${training.result_version_id}</a>` : "") +
            `</p>${barHtml(training.progress, training.state)}` +
            (training.error ? `<div class="error">${esc(training.error)}</div>` : "");
        }
        box.innerHTML = html;
        const ingestFinal = !ACTIVE_STATES.has(ingest.state);
        const trainingFinal = !ingest.next_job_id || (training && !ACTIVE_STATES.has(training.state));
        if ((ingestFinal && !ingestDone) || (ingestFinal && trainingFinal && !trainingDone)) {
          await refreshFragment("#corpora-table");
        }
        ingestDone = ingestFinal;
        trainingDone = ingestFinal && trainingFinal;
        if (trainingDone) return;
      } catch (error) {
        flash(`could not follow the upload: ${error.message}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  function upload(event) {
    event.preventDefault();
    const file = $("#upload-file").files[0];
    if (!file) { flash("choose a file first"); return; }
    const form = new FormData();
    form.append("file", file);
    form.append("name", $("#upload-name").value.trim() || file.name);
    form.append("format", $("#upload-format").value);
    form.append("train", $("#upload-train").checked ? "true" : "false");
    const bar = $("#upload-progress"), button = $("#upload-button");
    bar.hidden = false;
    setBar(bar, 0);
    button.disabled = true;
    $("#upload-result").hidden = true;
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/corpora");
    request.upload.addEventListener("progress", (e) => { if (e.lengthComputable) setBar(bar, e.loaded / e.total); });
    request.addEventListener("load", () => {
      button.disabled = false;
      let data = null;
      try { data = JSON.parse(request.responseText); } catch { data = request.responseText; }
      if (request.status === 202) {
        setBar(bar, 1);
        flash(`uploaded: corpus #${data.corpus.id}, ingest job ${data.job.id}`, "ok");
        followIngest(data);
      } else {
        flash(apiMessage(request.status, data));
      }
    });
    request.addEventListener("error", () => { button.disabled = false; flash("upload failed: the connection broke"); });
    request.send(form);
  }

  // ---- playground: streamed generation -------------------------------------------------------------

  function parseEvent(raw) {
    let name = "message";
    const data = [];
    for (const line of raw.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    return {name, data: data.length ? JSON.parse(data.join("\n")) : null};
  }

  let controller = null;
  async function generate(event) {
    event.preventDefault();
    const number = (id) => ($(`#${id}`).value === "" ? undefined : Number($(`#${id}`).value));
    const stop = $("#stop").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
    const body = {prompt: $("#prompt").value, max_tokens: number("max_tokens"), temperature: number("temperature"),
                  top_k: number("top_k"), top_p: number("top_p"), seed: number("seed"),
                  stop: stop ? [stop] : undefined, stream: true};
    const out = $("#output-text"), version = $("#answer-version"), stats = $("#answer-stats");
    const warning = $("#answer-warning");
    $("#output-prompt").textContent = body.prompt;
    out.textContent = "";
    out.dataset.events = "0";
    version.textContent = "…";
    stats.textContent = "";
    warning.hidden = true;
    $("#generate-button").disabled = true;
    $("#stop-button").disabled = false;
    controller = new AbortController();
    try {
      const response = await fetch("/v1/generate", {method: "POST", signal: controller.signal,
        headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        throw new Error(apiMessage(response.status, data));
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const {name, data} = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (name === "token") {
            out.append(data.text);
            out.dataset.events = String(Number(out.dataset.events) + 1);
            version.textContent = `v${data.version}`;
          } else if (name === "done") {
            version.textContent = `v${data.version}`;
            stats.textContent = `${data.completion_tokens} tokens (${data.finish_reason}) after ` +
              `${data.prompt_tokens} prompt tokens in ${Math.round(data.latency_ms)} ms`;
            if (data.warning) { warning.textContent = data.warning; warning.hidden = false; }
            out.dataset.done = "true";
          } else if (name === "error") {
            flash(data.message);
          }
        }
      }
    } catch (error) {
      if (error.name === "AbortError") stats.textContent = "stopped";
      else flash(error.message);
    } finally {
      $("#generate-button").disabled = false;
      $("#stop-button").disabled = true;
      controller = null;
    }
  }

  // ---- experts: the product-key grid as a heat map -------------------------------------------------

  const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function heatColour(value, max) {
    if (!value) return "#eef0f3";
    const t = Math.log1p(value) / Math.log1p(max) * (RAMP.length - 1);
    const i = Math.min(RAMP.length - 2, Math.floor(t)), f = t - i;
    const [r, g, b] = RAMP[i].map((c, k) => Math.round(c + (RAMP[i + 1][k] - c) * f));
    return `rgb(${r},${g},${b})`;
  }

  // The expert id of grid cell (i, j): the inverse of ExpertGrid.id_to_cell (peer_model/pool.py).
  function cellToId(i, j, segments) {
    let prevRows = 0, prevCols = 0;
    for (let k = 0; k < segments.length; k++) {
      const s = segments[k];
      if (i < s.rows && j < s.cols) {
        const newCols = s.cols - prevCols;
        const local = i < prevRows ? i * newCols + (j - prevCols) : prevRows * newCols + (i - prevRows) * s.cols + j;
        return [s.start + local, k];
      }
      prevRows = s.rows; prevCols = s.cols;
    }
    return [null, null];
  }

  async function drawHeatmap(box) {
    const {version, layer, full, bins} = box.dataset;
    const query = full === "true" ? "cells=true&bins=1" : `bins=${bins}`;
    let info;
    try {
      info = (await api("GET", `/v1/experts/utilization?version=${version}&layer=${layer}&top=1&${query}`)).layers[layer];
    } catch (error) {
      box.textContent = `could not read the usage: ${error.message}`;
      return;
    }
    const matrix = full === "true" ? info.cells : info.heatmap;
    const rows = matrix.length, cols = matrix[0].length;
    const size = Math.max(2, Math.min(28, Math.floor(520 / Math.max(rows, cols))));
    const max = Math.max(1, ...matrix.map((row) => Math.max(...row)));
    const sy = rows / info.rows, sx = cols / info.cols;  // cells per sub-key (1 unless binned)
    const labels = JSON.parse($("#segment-labels").textContent);
    const parts = [`<svg class="grid" viewBox="0 0 ${cols * size} ${rows * size}" width="${cols * size}" ` +
                   `height="${rows * size}" shape-rendering="crispEdges">`];
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) {
        parts.push(`<rect class="cell" x="${j * size}" y="${i * size}" width="${size}" height="${size}" ` +
                   `fill="${heatColour(matrix[i][j], max)}"/>`);
      }
    }
    let prevRows = 0, prevCols = 0;
    info.segments.forEach((s, k) => {
      const X = (c) => (c * sx * size).toFixed(1), Y = (r) => (r * sy * size).toFixed(1);
      const colour = SEGMENT_COLOURS[k % SEGMENT_COLOURS.length];
      const outline = prevRows === 0 && prevCols === 0
        ? `M0,0 H${X(s.cols)} V${Y(s.rows)} H0 Z`
        : `M${X(prevCols)},0 H${X(s.cols)} V${Y(s.rows)} H0 V${Y(prevRows)} H${X(prevCols)} Z`;
      parts.push(`<path class="segment" d="${outline}" stroke="${colour}"/>`);
      // the label sits at the top of the segment's new columns (or the left of its new rows); where that
      // arm is too narrow for the corpus name, only the segment's number (the table beside names it)
      const columnArm = s.cols > prevCols && prevCols > 0;
      const [lx, ly] = columnArm ? [X(prevCols), 0] : [0, Y(prevRows)];
      const room = columnArm ? (s.cols - prevCols) * sx * size : cols * size;
      const named = `${k}: ${labels[k] ?? s.tag}`;
      parts.push(`<text class="segment-label" x="${Number(lx) + 3}" y="${Number(ly) + 13}" fill="${colour}">` +
                 `${esc(named.length * 7 + 6 <= room ? named : String(k))}</text>`);
      prevRows = s.rows; prevCols = s.cols;
    });
    parts.push("</svg>");
    box.innerHTML = parts.join("");
    box.dataset.cells = String(rows * cols);
    const svg = box.querySelector("svg"), infoLine = $("#heat-info");
    svg.addEventListener("mousemove", (e) => {
      const rect = svg.getBoundingClientRect();
      const j = Math.floor((e.clientX - rect.left) / rect.width * cols);
      const i = Math.floor((e.clientY - rect.top) / rect.height * rows);
      if (i < 0 || j < 0 || i >= rows || j >= cols) return;
      if (full === "true") {
        const [id, k] = cellToId(i, j, info.segments);
        infoLine.textContent = `expert ${id} · sub-keys (${i}, ${j}) · ${matrix[i][j].toLocaleString("en")} ` +
          `selections · segment ${k}: ${labels[k] ?? ""}`;
      } else {
        infoLine.textContent = `block (${i}, ${j}) · ${matrix[i][j].toLocaleString("en")} selections`;
      }
    });
  }

  // ---- start ---------------------------------------------------------------------------------------

  if (page === "jobs") pollJobs();
  if (page === "corpora") $("#upload-form").addEventListener("submit", upload);
  if (page === "playground") {
    $("#generate-form").addEventListener("submit", generate);
    $("#stop-button").addEventListener("click", () => controller && controller.abort());
  }
  if (page === "experts" && $("#heatmap")) drawHeatmap($("#heatmap"));
})();
