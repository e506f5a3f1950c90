// agenthome playground: one chat page over the local functions, proxied on
// this origin under /api/chat-turn/… and /api/provision/… (scripts/playground).
// Plain JS, no build step, nothing fetched from the network.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log");
let busy = false;

function userId() { return $("user").value.trim(); }
function userPath() { return "/v1/users/" + encodeURIComponent(userId()); }

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function scrollDown() { log.scrollTop = log.scrollHeight; }
function add(parent, child) { parent.appendChild(child); scrollDown(); return child; }
const sleepMs = (ms) => new Promise((r) => setTimeout(r, ms));

function fmtDuration(ms) {
  const s = Math.round(ms / 1000);
  return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
}

// The machine panel: provisioning / waking / ready / asleep, awake time.
function showMachine(state, detail) {
  $("machine").dataset.state = state;
  $("state").textContent = detail ? state + " (" + detail + ")" : state;
}

async function refreshMachine() {
  if (!userId()) return;
  let resp;
  try { resp = await fetch("/api/provision" + userPath() + "/machine"); } catch { return; }
  if (resp.status === 404) { showMachine("unknown", "no machine yet"); $("awake").textContent = ""; return; }
  if (!resp.ok) return;
  const m = await resp.json();
  $("awake").textContent = "awake " + fmtDuration(m.awake_ms_total || 0) + " in total";
  if (busy) return; // the turn's own events are fresher
  if (m.state !== "ready") showMachine("provisioning", m.state);
  else if (m.power === "asleep") showMachine("asleep", m.phase || "sleeping");
  else showMachine(m.power === "awake" ? "ready" : m.power, m.phase || "");
}

// Reads a text/event-stream body, calling on(name, data) per event.
async function readEvents(resp, on) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      if (block.startsWith(":")) continue; // keep-alive
      const name = /^event: (.*)$/m.exec(block)?.[1];
      const data = /^data: (.*)$/m.exec(block)?.[1];
      if (name && data) on(name, JSON.parse(data));
    }
  }
}

// One turn's view: status lines, steps with live output, the reply.
function turnView() {
  const box = add(log, el("div", "turn"));
  const steps = new Map();
  let reply = null;
  const replyBox = () => reply || (reply = add(box, el("div", "msg reply streaming")));
  return {
    box,
    note(text, cls) { add(box, el("div", "event " + (cls || ""), text)); },
    on(name, d) {
      switch (name) {
        case "machine":
          showMachine(d.stage, d.phase);
          if (d.stage !== "ready") this.note("machine " + d.stage + " (" + d.phase + ")");
          break;
        case "step_started": {
          // Text the model streamed before a command is its narration.
          if (reply) { reply.classList.replace("reply", "narration"); reply.classList.remove("streaming"); reply = null; }
          const s = add(box, el("div", "step"));
          const cmd = s.appendChild(el("div", "cmd"));
          cmd.appendChild(el("code", "", d.command));
          const exit = cmd.appendChild(el("span", "exit running", "running"));
          const out = s.appendChild(el("pre", "output"));
          steps.set(d.index, { out, exit });
          break;
        }
        case "output": {
          const s = steps.get(d.index);
          if (s) { s.out.textContent += d.chunk; s.out.scrollTop = s.out.scrollHeight; scrollDown(); }
          break;
        }
        case "step_finished": {
          const s = steps.get(d.index);
          if (!s) break;
          if (d.still_running) { s.exit.textContent = "still running"; break; }
          s.exit.textContent = "exit " + d.exit_code + " · " + d.duration_ms + " ms";
          s.exit.className = "exit " + (d.exit_code === 0 ? "ok" : "fail");
          break;
        }
        case "reply_delta":
          replyBox().textContent += d.text;
          scrollDown();
          break;
        case "reply":
          replyBox().textContent = d.text;
          break;
        case "done":
          replyBox().textContent = d.reply;
          reply.classList.remove("streaming");
          box.dataset.status = d.status;
          this.note("turn " + d.status + " · " + d.steps.length + " command(s) · " +
            d.timings.total_ms + " ms" + (d.timings.wake_ms ? " (woke in " + d.timings.wake_ms + " ms)" : ""));
          break;
        case "error":
          box.dataset.status = "error";
          this.note("error: " + d.title + " — " + d.detail, "error");
          break;
      }
    },
  };
}

// Sends a turn, waiting out 202 (provisioning) and 409 (busy) as a chat
// product would (re-sending with the 202's turn_id as Idempotency-Key, so
// the message runs once), then follows its events.
async function sendTurn(message) {
  const view = turnView();
  let key = null;
  for (let tries = 0; tries < 120; tries++) {
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    if (key) headers["Idempotency-Key"] = key;
    const resp = await fetch("/api/chat-turn" + userPath() + "/turns", {
      method: "POST",
      headers,
      body: JSON.stringify({ message }),
    });
    const type = resp.headers.get("content-type") || "";
    if (resp.ok && type.startsWith("text/event-stream")) return readEvents(resp, (n, d) => view.on(n, d));
    const body = type.includes("json") ? await resp.json() : { detail: await resp.text() };
    const after = Number(resp.headers.get("retry-after")) || 2;
    if (resp.status === 202) {
      key = body.turn_id || key;
      showMachine("provisioning", body.status || "provisioning");
      if (tries === 0) view.note("machine provisioning — a first message creates it");
    } else if (resp.status === 409) {
      if (tries === 0) view.note("busy: " + (body.detail || "another turn is running"));
    } else {
      view.box.dataset.status = "error";
      return view.note("HTTP " + resp.status + ": " + (body.detail || body.title || ""), "error");
    }
    await sleepMs(after * 1000);
  }
  view.box.dataset.status = "error";
  view.note("gave up waiting for the machine", "error");
}

$("chat").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const message = $("message").value;
  if (!message.trim() || busy || !$("user").checkValidity()) return;
  busy = true;
  $("send").disabled = true;
  $("message").value = "";
  add(log, el("div", "msg user", message));
  try { await sendTurn(message); } catch (e) { add(log, el("div", "event error", "error: " + e)); }
  busy = false;
  $("send").disabled = false;
  refreshMachine();
});

$("message").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat").requestSubmit(); }
});

$("sleep").addEventListener("click", async () => {
  const resp = await fetch("/api/provision" + userPath() + "/machine/sleep", { method: "POST" });
  const body = await resp.json().catch(() => ({}));
  add(log, el("div", "event", "sleep now: HTTP " + resp.status + " " + (body.status || body.detail || "")));
  refreshMachine();
});

$("who").addEventListener("submit", (ev) => ev.preventDefault());
$("user").addEventListener("change", () => { log.textContent = ""; refreshMachine(); });
refreshMachine();
setInterval(refreshMachine, 3000);
