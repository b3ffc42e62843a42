// The voiceprint web console: plain JavaScript over the service's own HTTP and WebSocket
// routes, with the key a person logs in with. Every name shown comes from the server and
// goes into the page as text (never as HTML).
"use strict";

const KEY = "voiceprint.key"; // sessionStorage: gone when the tab closes
const $ = (selector) => document.querySelector(selector);
let who = null; // {key, role, may}: from GET /v1/whoami
let jobTimer = null;

const FEEDBACK = {
  OK: "good: keep talking",
  NO_SPEECH: "no speech heard: speak closer to the microphone",
  TOO_NOISY: "too noisy: move somewhere quieter",
  CLIPPED: "too loud: the signal clips; speak softer or further away",
  INCONSISTENT_SPEAKER: "does not sound like this speaker's profile: it will be held for review",
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// -- small helpers ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const seconds = (s) => (s === null || s === undefined ? "" : `${Number(s).toFixed(1)} s`);
const percent = (x) => `${Math.round(100 * x)}%`;
const score = (x) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(3));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

async function api(method, path, { json, body, raw } = {}) {
  const headers = { "X-API-Key": sessionStorage.getItem(KEY) || "" };
  let payload;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  } else if (body !== undefined) {
    headers["Content-Type"] = body.type || "application/octet-stream";
    payload = body;
  }
  const response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  if (!response.ok) {
    let doc = { error: `http_${response.status}`, message: response.statusText };
    try {
      doc = await response.json();
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 401 && path !== "/v1/whoami") logout("the key is no longer valid; log in again");
    throw new ApiError(response.status, doc.error, doc.message);
  }
  return raw ? response : response.json();
}

async function blobUrl(path) {
  // What an <audio> or <img> shows from a route that needs the key in a header: fetched, not linked.
  return URL.createObjectURL(await (await api("GET", path, { raw: true })).blob());
}

function showError(target, error) {
  target.replaceChildren(el("span", { class: "error" }, error.code ? `${error.code}: ${error.message}` : String(error)));
}

function confirmAction(text, typed = null) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-typed-label").hidden = typed === null;
  $("#confirm-word").textContent = typed || "";
  $("#confirm-typed").value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" && (typed === null || $("#confirm-typed").value === typed));
    }, { once: true });
    dialog.showModal();
  });
}

// -- log in, roles and views -----------------------------------------------------------

async function login(key) {
  sessionStorage.setItem(KEY, key);
  try {
    who = await api("GET", "/v1/whoami");
  } catch (error) {
    sessionStorage.removeItem(KEY);
    throw error;
  }
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `key ${who.key} · ${who.role}`;
  // What the role may not do is not shown at all; the server refuses it anyway.
  for (const node of document.querySelectorAll("[data-needs]")) node.hidden = !who.may.includes(node.dataset.needs);
  show("speak");
}

function logout(message = "") {
  sessionStorage.removeItem(KEY);
  who = null;
  clearInterval(jobTimer);
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login").hidden = false;
  $("#login-error").textContent = message;
}

function show(name) {
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== name;
  for (const tab of document.querySelectorAll("#tabs button")) tab.classList.toggle("current", tab.dataset.view === name);
  clearInterval(jobTimer);
  if (name === "speakers") loadSpeakers();
  if (name === "versions") {
    loadVersions();
    loadJobs();
    jobTimer = setInterval(loadJobs, 1000);
  }
  if (name === "calibration") loadCalibration();
}

// -- live sessions from the microphone ---------------------------------------------------

class LiveSession {
  // One WebSocket session fed by the microphone. `onEvent(doc)` sees each event but
  // `error`; the Start / Stop buttons, errors and the close are handled here, and
  // `onEnd(ok)` is called once the session is over.
  constructor(route, { onEvent, output, buttons, onEnd = () => {} }) {
    Object.assign(this, { route, onEvent, output, buttons, onEnd, started: false, failed: null });
  }

  async start() {
    this.running(true);
    try {
      await this.open();
    } catch (error) {
      showError(this.output, `the microphone could not be opened (${error.message})`);
      this.release();
      this.running(false);
      this.onEnd(false);
    }
  }

  running(on) {
    this.buttons[0].disabled = on;
    this.buttons[1].disabled = !on;
  }

  async open() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    this.context = new AudioContext();
    await this.context.audioWorklet.addModule("capture.js");
    const source = this.context.createMediaStreamSource(this.stream);
    const capture = new AudioWorkletNode(this.context, "capture", {
      processorOptions: { chunk: Math.round(this.context.sampleRate / 10) },
    });
    const silent = this.context.createGain(); // keeps the graph pulled without playing the voice back
    silent.gain.value = 0;
    source.connect(capture).connect(silent).connect(this.context.destination);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.ws = new WebSocket(`${scheme}//${location.host}${this.route}`);
    this.ws.onopen = () => {
      const key = sessionStorage.getItem(KEY);
      this.ws.send(JSON.stringify({ type: "start", rate: this.context.sampleRate, format: "f32le", key }));
      this.started = true;
    };
    capture.port.onmessage = (message) => {
      if (this.started && this.ws.readyState === WebSocket.OPEN) this.ws.send(message.data);
    };
    this.ws.onmessage = (message) => {
      const doc = JSON.parse(message.data);
      if (doc.event === "error") this.failed = doc;
      else this.onEvent(doc);
    };
    this.ws.onclose = (event) => {
      this.release();
      this.running(false);
      if (this.failed) showError(this.output, { code: this.failed.error, message: this.failed.message });
      else if (event.code !== 1000) showError(this.output, closeMessage(event.code, event.reason));
      this.onEnd(!this.failed && event.code === 1000);
    };
  }

  end() {
    // Stop listening, and ask for the answer on what was sent.
    this.release();
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "end" }));
  }

  release() {
    this.started = false;
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    if (this.context && this.context.state !== "closed") this.context.close();
  }
}

function closeMessage(code, reason) {
  if (code === 1000) return "";
  if (code === 1006) return "the connection to the server was lost";
  return `the server ended the session (${code}${reason ? `: ${reason}` : ""})`;
}

// -- enroll ------------------------------------------------------------------------------

let enrolling = null;

async function startEnrollment(event) {
  event.preventDefault();
  const speaker = $("#enroll-speaker").value.trim();
  const bar = $("#enroll-bar");
  const status = $("#enroll-status");
  const result = $("#enroll-result");
  bar.style.width = "0%";
  bar.dataset.progress = "0";
  bar.className = "";
  result.replaceChildren();
  delete result.dataset.feedback;
  status.textContent = "connecting…";
  const update = (progress, speech, feedback, what = "speech") => {
    bar.style.width = percent(Math.min(progress, 1));
    bar.dataset.progress = String(progress);
    bar.className = feedback === "OK" ? "" : "warn";
    status.replaceChildren(
      el("b", {}, percent(Math.min(progress, 1))), ` · ${what} ${seconds(speech)} · `,
      el("span", { class: "feedback", "data-code": feedback }, feedback), ` ${FEEDBACK[feedback] || ""}`,
    );
  };
  enrolling = new LiveSession(`/v1/stream/enroll/${encodeURIComponent(speaker)}`, {
    output: result,
    buttons: [$("#enroll-start"), $("#enroll-stop")],
    onEnd: () => { enrolling = null; },
    onEvent: (doc) => {
      if (doc.event === "ready") {
        const complete = doc.profile_speech_s >= doc.required_speech_s;
        status.textContent = complete
          ? `listening: ${doc.speaker}'s profile is already complete; speak, then press Stop to add this recording`
          : `listening: speak now (${seconds(doc.required_speech_s - doc.profile_speech_s)} of speech to go)`;
      }
      if (doc.event === "progress") update(doc.progress, doc.speech_s, doc.feedback);
      if (doc.event === "result") {
        const r = doc.result;
        update(r.progress, r.profile_speech_s, r.feedback, "profile");
        const held = r.feedback === "INCONSISTENT_SPEAKER";
        result.dataset.feedback = r.feedback;
        result.replaceChildren(held
          ? el("span", { class: "warn" }, `Held for review: utterance ${r.utterance_id} did not sound like ${r.speaker}'s profile (an admin can accept it under Speakers).`)
          : el("span", { class: "ok" }, `Enrolled: utterance ${r.utterance_id} of ${r.speaker}, ${seconds(r.speech_s)} of speech; the profile holds ${seconds(r.profile_speech_s)} (${percent(r.progress)}).`));
      }
    },
  });
  await enrolling.start();
}

// -- identify and verify -------------------------------------------------------------------

let recognizing = null;

function recognition() {
  const task = document.querySelector("input[name=task]:checked").value;
  const claim = $("#claim").value.trim();
  if (task === "verify" && !claim) throw new Error("name the speaker to verify");
  return { task, claim };
}

function showAnswer(doc, final) {
  const out = $("#recognize-result");
  if ("accepted" in doc) { // a verification
    const scores = doc.score === null ? "" : ` (score ${score(doc.score)}, threshold ${score(doc.threshold)} on ${doc.backend})`;
    out.replaceChildren(el("p", { class: doc.accepted ? "ok decision" : "warn decision" },
      `${final ? "" : "so far: "}${doc.accepted ? "accepted" : "rejected"} as ${doc.speaker}${scores}`));
  } else { // an identification
    const decision = doc.decision === null ? `unknown${doc.reason ? ` (${doc.reason})` : ""}` : doc.decision;
    const rows = doc.candidates.map((hit) => el("tr", {},
      el("td", {}, hit.speaker), el("td", {}, score(hit.score)), el("td", {}, score(hit.normalised)), el("td", {}, score(hit.llr))));
    out.replaceChildren(
      el("p", { class: doc.decision === null ? "warn decision" : "ok decision" }, `${final ? "" : "so far: "}${decision}`),
      el("table", { class: "candidates" },
        el("thead", {}, el("tr", {}, el("th", {}, "candidate"), el("th", {}, "cosine"), el("th", {}, "AS-norm"), el("th", {}, "LLR"))),
        el("tbody", {}, rows)),
      el("p", { class: "hint" }, `decided on ${doc.backend}, threshold ${score(doc.threshold)}, version ${doc.version}, ${seconds(doc.speech_s)} of speech`),
      ...doc.notes.map((note) => el("p", { class: "hint" }, note)));
  }
  out.dataset.final = final ? "true" : "false";
}

async function startRecognition() {
  const status = $("#recognize-status");
  const output = $("#recognize-result");
  let ask;
  try {
    ask = recognition();
  } catch (error) {
    showError(output, error.message);
    return;
  }
  output.replaceChildren();
  const route = ask.task === "verify" ? `/v1/stream/verify/${encodeURIComponent(ask.claim)}` : "/v1/stream/identify";
  recognizing = new LiveSession(route, {
    output,
    buttons: [$("#recognize-start"), $("#recognize-stop")],
    onEnd: (ok) => {
      if (!ok) status.textContent = "";
      recognizing = null;
    },
    onEvent: (doc) => {
      if (doc.event === "ready") status.textContent = "listening: speak, then press Stop";
      if (doc.event === "partial") {
        status.textContent = `listening: ${seconds(doc.speech_s)} of speech so far`;
        showAnswer(doc.result, false);
      }
      if (doc.event === "result") {
        status.textContent = "";
        showAnswer(doc.result, true);
      }
    },
  });
  await recognizing.start();
}

async function recognizeFile() {
  const file = $("#recognize-file").files[0];
  if (!file) return;
  const status = $("#recognize-status");
  try {
    const ask = recognition();
    status.textContent = `sending ${file.name}…`;
    const route = ask.task === "verify" ? `/v1/verify/${encodeURIComponent(ask.claim)}` : "/v1/identify";
    showAnswer(await api("POST", route, { body: file }), true);
    status.textContent = file.name;
  } catch (error) {
    status.textContent = "";
    showError($("#recognize-result"), error.code ? error : error.message);
  } finally {
    $("#recognize-file").value = "";
  }
}

// -- speakers and held utterances ----------------------------------------------------------

async function loadSpeakers() {
  const body = $("#speaker-table tbody");
  try {
    const speakers = await api("GET", "/v1/speakers");
    body.replaceChildren(...speakers.map((s) => el("tr", { "data-speaker": s.name },
      el("td", {}, s.name), el("td", {}, s.utterances), el("td", {}, seconds(s.speech_s)),
      el("td", { class: s.pending ? "warn" : "" }, s.pending),
      el("td", {},
        el("button", { type: "button", onclick: () => loadUtterances(s.name) }, "Utterances"),
        who.may.includes("admin") ? el("button", { type: "button", class: "danger", onclick: () => erase(s.name) }, "Erase") : null))));
    if (!speakers.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 5 }, "nobody is enrolled yet")));
  } catch (error) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 5 }, error.message)));
  }
}

async function loadUtterances(speaker) {
  const body = $("#utterance-table tbody");
  $("#utterances").hidden = false;
  $("#utterances").dataset.speaker = speaker;
  $("#utterances-title").textContent = `Utterances of ${speaker}`;
  const admin = who.may.includes("admin");
  try {
    const rows = await api("GET", `/v1/utterances?speaker=${encodeURIComponent(speaker)}&status=all`);
    body.replaceChildren(...rows.map((u) => {
      const held = u.status === "held_for_review";
      const actions = held && admin ? [
        el("button", { type: "button", onclick: (e) => play(u.id, e.target) }, "Play"),
        el("button", { type: "button", onclick: () => review(speaker, "POST", `/v1/utterances/${u.id}/accept`) }, "Accept"),
        el("button", { type: "button", class: "danger", onclick: () => review(speaker, "DELETE", `/v1/utterances/${u.id}`) }, "Remove"),
      ] : [];
      return el("tr", { "data-utterance": u.id, "data-status": u.status },
        el("td", {}, u.id), el("td", {}, u.source), el("td", {}, seconds(u.speech_s)),
        el("td", { class: held ? "warn" : "" }, held ? "held for review" : u.status), el("td", {}, actions));
    }));
  } catch (error) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 5 }, error.message)));
  }
}

async function play(id, button) {
  try {
    const audio = el("audio", { controls: true, src: await blobUrl(`/v1/utterances/${id}/audio`), "data-utterance": id });
    button.replaceWith(audio);
    audio.play().catch(() => {}); // a browser without a sound device still shows the player
  } catch (error) {
    button.replaceWith(el("span", { class: "error" }, error.message));
  }
}

async function review(speaker, method, path) {
  try {
    await api(method, path);
  } catch (error) {
    alert(error.message);
  }
  await loadSpeakers();
  await loadUtterances(speaker);
}

async function erase(speaker) {
  const sure = await confirmAction(
    `Erase everything stored about ${speaker}: recordings, embeddings under every version, the profile. This cannot be undone.`, speaker);
  if (!sure) return;
  try {
    await api("DELETE", `/v1/speakers/${encodeURIComponent(speaker)}`);
  } catch (error) {
    alert(error.message);
  }
  if ($("#utterances").dataset.speaker === speaker) $("#utterances").hidden = true;
  await loadSpeakers();
}

// -- versions, refresh, rollback and jobs --------------------------------------------------

const GROUPS = { overall: "all held-out", old: "old speakers", new: "new speakers", unseen: "unseen speakers" };

function gateTable(metrics) {
  const parent = metrics.parent || {};
  const candidate = metrics.candidate || {};
  const rows = Object.keys(GROUPS).filter((g) => parent[g] && candidate[g]).map((g) => el("tr", {},
    el("td", {}, GROUPS[g]),
    el("td", {}, `${percent(parent[g].accuracy)} → ${percent(candidate[g].accuracy)}`),
    el("td", {}, `${(100 * parent[g].eer).toFixed(1)}% → ${(100 * candidate[g].eer).toFixed(1)}%`),
    el("td", {}, parent[g].d_prime === null ? "" : `${parent[g].d_prime.toFixed(2)} → ${candidate[g].d_prime.toFixed(2)}`)));
  if (!rows.length) return null;
  return el("table", { class: "gate" },
    el("thead", {}, el("tr", {}, el("th", {}, "gate: parent → this"), el("th", {}, "top-1"), el("th", {}, "EER"), el("th", {}, "d′"))),
    el("tbody", {}, rows));
}

async function loadVersions() {
  const list = $("#timeline");
  try {
    const versions = await api("GET", "/v1/versions");
    list.replaceChildren(...versions.slice().reverse().map((v) => el("li", { "data-version": v.number, "data-status": v.status, class: v.active ? "active" : "" },
      el("div", { class: "version-head" },
        el("b", {}, `version ${v.number}`), " ",
        el("span", { class: `badge ${v.status}` }, v.active ? "active" : v.status),
        v.parent ? ` from version ${v.parent}` : " (pretrained)", ` · ${v.encoder} · ${when(v.created_at)}`,
        v.active ? null : el("button", { type: "button", class: "rollback", onclick: () => rollback(v.number) },
          v.parent === null || v.number < versions.find((x) => x.active).number ? `Roll back to ${v.number}` : `Make ${v.number} active`)),
      v.note ? el("p", { class: v.status === "rejected" ? "warn" : "hint" }, v.status === "rejected" ? `rejected: ${v.note}` : v.note) : null,
      (v.metrics || {}).gate_overridden ? el("p", { class: "warn" }, `promoted with the gate off ([refresh] gate = false); it would have been rejected: ${v.metrics.gate_overridden.join("; ")}`) : null,
      gateTable(v.metrics || {}))));
  } catch (error) {
    list.replaceChildren(el("li", { class: "error" }, error.message));
  }
}

function jobProgress(job) {
  const p = (job.result || {}).progress;
  if (job.status === "queued") return "waiting";
  if (!p) return "starting";
  const share = p.total ? p.done / p.total : 0;
  return el("span", {}, el("span", { class: "meter small" }, el("span", { style: `width:${percent(share)}` })), ` ${p.stage} ${p.done}/${p.total}`);
}

function jobOutcome(job) {
  const r = job.result || {};
  if (job.status === "failed") return r.error || "failed";
  if (job.kind === "rollback") return r.changed ? `version ${r.previous} → ${r.version}` : "no change";
  return r.status || "";
}

let lastUnfinished = 0;

async function loadJobs() {
  try {
    const jobs = await api("GET", "/v1/jobs?limit=10");
    $("#job-table tbody").replaceChildren(...jobs.map((j) => el("tr", { "data-job": j.id, "data-status": j.status },
      el("td", {}, j.id), el("td", {}, j.kind + (j.dry_run ? " (dry run)" : "")),
      el("td", { class: `status-${j.status}` }, j.status), el("td", {}, j.finished_at ? jobOutcome(j) : jobProgress(j)),
      el("td", {}, j.version || ""), el("td", {}, j.reason), el("td", {}, when(j.requested_at)))));
    const unfinished = jobs.filter((j) => !j.finished_at).length;
    if (unfinished < lastUnfinished) loadVersions(); // a job ended: the timeline may have changed
    lastUnfinished = unfinished;
  } catch (error) {
    $("#job-table tbody").replaceChildren(el("tr", {}, el("td", { colspan: 7 }, error.message)));
  }
}

async function refreshNow() {
  try {
    await api("POST", "/v1/refresh", { json: { dry_run: $("#refresh-dry").checked, reason: "requested from the console" } });
  } catch (error) {
    alert(error.message);
  }
  await loadJobs();
}

async function rollback(number) {
  if (!(await confirmAction(`Make version ${number} the active version? Identify and verify answer with it at once; utterances it lacks are embedded first.`))) return;
  try {
    await api("POST", `/v1/versions/${number}/activate?reason=${encodeURIComponent("rollback from the console")}`);
  } catch (error) {
    alert(error.message);
  }
  await loadVersions();
  await loadJobs();
}

// -- calibration ---------------------------------------------------------------------------

function pairs(object) {
  return Object.entries(object).map(([name, value]) => el("tr", {}, el("th", {}, name),
    el("td", {}, value === null || value === undefined ? "" : typeof value === "object" ? JSON.stringify(value) : String(value))));
}

async function loadCalibration() {
  const table = $("#decision-table tbody");
  const image = $("#det");
  try {
    const status = await api("GET", "/v1/status");
    const d = status.decisions;
    const c = status.calibration;
    table.replaceChildren(...pairs({
      "active version": status.active_version,
      "decides with": d.backend + (d.why ? ` (${d.why})` : ""),
      "verify threshold": `${score(d.verify_threshold)} (${d.verify_threshold_from})`,
      "identify threshold": `${score(d.identify_threshold)} for ${d.speakers} speakers (${d.identify_threshold_from})`,
      "expected false accepts": Object.entries(d.expected_false_accepts).map(([task, e]) =>
        `${task} ${(100 * e.rate).toFixed(2)}% (at most ${(100 * e.bound).toFixed(2)}%, ${e.trials} trials of ${e.speakers} speakers)`).join("; ") || "not measured yet",
      "calibrated": c ? `${when(c.created_at)} on ${c.speakers_then} speakers (now ${c.speakers_now})` : "not yet",
      "recalibrate due": d.recalibrate ? "yes" : "no",
      "likely duplicate identities": d.duplicates.length ? d.duplicates.map((p) => `${p.speakers.join(" / ")} (${score(p.score)})`).join(", ") : "none",
    }));
  } catch (error) {
    table.replaceChildren(el("tr", {}, el("td", {}, error.message)));
  }
  try {
    const src = await blobUrl("/v1/calibration/det.png");
    if (image.src) URL.revokeObjectURL(image.src);
    image.src = src;
    image.hidden = false;
    $("#det-note").textContent = "Leave-one-out trials of the enrolled speakers, as the calibration is fitted: they flatter the version a little; voiceprint eval on other speakers tells more.";
  } catch (error) {
    image.hidden = true;
    $("#det-note").textContent = `No DET curve yet: ${error.message}`;
  }
}

async function calibrateNow() {
  try {
    await api("POST", "/v1/calibrate");
  } catch (error) {
    alert(error.message);
  }
  await loadCalibration();
}

// -- wiring --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#login-error").textContent = "";
    try {
      await login($("#login-key").value.trim());
      $("#login-key").value = "";
    } catch (error) {
      $("#login-error").textContent = error.status === 401 ? "that key is not valid (unknown or revoked)" : error.message;
    }
  });
  $("#logout").addEventListener("click", () => logout());
  for (const tab of document.querySelectorAll("#tabs button")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("#enroll-form").addEventListener("submit", startEnrollment);
  $("#enroll-stop").addEventListener("click", () => enrolling && enrolling.end());
  $("#recognize-start").addEventListener("click", startRecognition);
  $("#recognize-stop").addEventListener("click", () => recognizing && recognizing.end());
  $("#recognize-file").addEventListener("change", recognizeFile);
  $("#refresh-now").addEventListener("click", refreshNow);
  $("#calibrate-now").addEventListener("click", calibrateNow);
  const saved = sessionStorage.getItem(KEY);
  if (saved) login(saved).catch(() => logout());
});
