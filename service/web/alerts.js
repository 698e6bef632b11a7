// Polls /alerts/api/recent once a second and keeps the newest rows on top. Every value goes into the
// page as text (textContent), never as markup: excerpts are model output and may contain anything.
"use strict";

const POLL_MS = 1000;
const MAX_ROWS = 200;
let key = "";
let tenant = "";
let after = null; // id of the newest alert shown; null until the first answer
let timer = null;
let generation = 0; // bumps on every (re)connect so a stale poll's answer is dropped

const byId = (id) => document.getElementById(id);

function setStatus(text, kind) {
  const el = byId("status");
  el.textContent = text;
  el.className = kind;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function fmt(x) {
  if (x === null || x === undefined) return "–";
  return Math.abs(x) >= 1e4 ? Number(x).toExponential(2) : Number(x).toFixed(3);
}

function addRow(alert, fresh) {
  const tbody = byId("alerts").tBodies[0];
  const row = document.createElement("tr");
  row.dataset.alertId = alert.id;
  row.className = "action-" + alert.action + (fresh ? " fresh" : "");
  cell(row, new Date(alert.timestamp_ms).toLocaleTimeString(), "time");
  cell(row, alert.monitor, "monitor");
  cell(row, alert.action, "action");
  cell(row, fmt(alert.peak_score) + " / " + fmt(alert.threshold), "score");
  cell(row, alert.token_start + "–" + alert.token_end, "span");
  cell(row, alert.phase, "phase");
  cell(row, alert.excerpt, "excerpt");
  cell(row, alert.policy, "policy");
  cell(row, alert.request_id, "request");
  tbody.insertBefore(row, tbody.firstChild);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
}

async function poll(mine) {
  const params = new URLSearchParams();
  if (tenant) params.set("tenant", tenant);
  if (after !== null) params.set("after", after);
  let body;
  try {
    const resp = await fetch("api/recent?" + params.toString(), {
      headers: { Authorization: "Bearer " + key }, cache: "no-store",
    });
    body = await resp.json();
    if (mine !== generation) return;
    if (!resp.ok) {
      setStatus("Error " + resp.status + ": " + body.error, "error");
      if (resp.status === 401 || resp.status === 403 || resp.status === 400) return; // needs new input
    } else {
      const first = after === null;
      for (const alert of body.alerts) addRow(alert, !first);
      after = body.last_id;
      const n = byId("alerts").tBodies[0].rows.length;
      setStatus("Live · tenant " + body.tenant + " · " + n + " shown · updated " +
                new Date().toLocaleTimeString(), "live");
    }
  } catch (err) {
    if (mine !== generation) return;
    setStatus("Connection problem, retrying: " + err, "error");
  }
  timer = setTimeout(() => poll(mine), POLL_MS);
}

byId("connect").addEventListener("submit", (ev) => {
  ev.preventDefault();
  clearTimeout(timer);
  generation += 1;
  key = byId("key").value.trim();
  tenant = byId("tenant").value.trim();
  after = null;
  byId("alerts").tBodies[0].replaceChildren();
  setStatus("Connecting…", "idle");
  poll(generation);
});
