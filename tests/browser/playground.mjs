// End-to-end test of the playground in a real browser: headless Chromium,
// driven over the DevTools protocol on a pipe (--remote-debugging-pipe; no
// extra packages, no network). Run by scripts/test-playground:
//
//   node tests/browser/playground.mjs URL SCREENSHOT.png [shell|agent]
//
// shell (the default): it picks a user id, sends a message that prints three
// lines a second apart, and checks that the first line appears in the page
// while the command still runs (streamed), that the turn then finishes with
// exit code 0 and the reply, and that "sleep now" puts the machine to sleep.
// agent (the stack runs against the scripted model, tests/src/bin/
// scripted-llm.rs): the model's command runs and shows its output, and the
// reply grows in the page piece by piece (reply_delta events) before the turn
// finishes. It saves a screenshot of the finished turn. Exit code 0 only if
// every check passed.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, screenshot, mode = "shell"] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: playground.mjs URL SCREENSHOT.png");
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TOTAL_LIMIT_MS = 150_000;
const USER = "browser-" + process.pid;
const MESSAGE = 'for i in 1 2 3; do echo "tick $i"; sleep 1; done; echo finished';

const profile = mkdtempSync(join(tmpdir(), "agenthome-chromium-"));
const browser = spawn(CHROMIUM, [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
  "--remote-debugging-pipe", "--user-data-dir=" + profile, "--window-size=1280,860",
  "about:blank",
], { stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"] });
let stderr = "";
browser.stderr.on("data", (d) => { stderr = (stderr + d).slice(-4000); });

// Closes Chromium (gracefully, then by force), removes its profile, exits
// (once).
let finishing = null;
function finish(code) {
  finishing ??= closeAndExit(code);
  return finishing;
}
async function closeAndExit(code) {
  clearTimeout(overall);
  browser.removeAllListeners("exit");
  if (browser.exitCode === null && browser.signalCode === null) {
    const exited = new Promise((r) => browser.once("exit", r));
    toBrowser.write(JSON.stringify({ id: 0, method: "Browser.close" }) + "\0");
    const forced = setTimeout(() => browser.kill("SIGKILL"), 3_000);
    await exited;
    clearTimeout(forced);
  }
  try { rmSync(profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 }); } catch { /* best effort */ }
  process.exit(code);
}
// A failed check: reports it, starts closing, and stops the test's steps.
class Failed extends Error {}
function fail(msg) {
  console.error("   ✗ " + msg);
  if (stderr) console.error("chromium stderr (tail):\n" + stderr);
  finish(1);
  throw new Failed(msg);
}
const failLater = (msg) => { try { fail(msg); } catch { /* finishing */ } };
const overall = setTimeout(() => failLater("the test took longer than " + TOTAL_LIMIT_MS / 1000 + " s"), TOTAL_LIMIT_MS);
browser.on("exit", (code) => failLater("chromium exited early (code " + code + ")"));
const toBrowser = browser.stdio[3];

// The DevTools protocol over fds 3 (to Chromium) and 4 (from it): JSON
// messages, each ended by a NUL byte.
const fromBrowser = browser.stdio[4];
let nextId = 1;
const pending = new Map();
let inbox = Buffer.alloc(0);
fromBrowser.on("data", (chunk) => {
  inbox = Buffer.concat([inbox, chunk]);
  let end;
  while ((end = inbox.indexOf(0)) >= 0) {
    const msg = JSON.parse(inbox.subarray(0, end).toString("utf8"));
    inbox = inbox.subarray(end + 1);
    const p = msg.id && pending.get(msg.id);
    if (!p) continue;
    pending.delete(msg.id);
    if (msg.error) p.reject(new Error(p.method + ": " + msg.error.message));
    else p.resolve(msg.result);
  }
});
function send(method, params = {}, sessionId) {
  const id = nextId++;
  toBrowser.write(JSON.stringify({ id, method, params, sessionId }) + "\0");
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject, method }));
}

let session;
async function evaluate(expression) {
  const r = await send("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true }, session);
  if (r.exceptionDetails) throw new Error("page script failed: " + JSON.stringify(r.exceptionDetails));
  return r.result.value;
}
async function waitFor(what, expression, limitMs) {
  const until = Date.now() + limitMs;
  for (;;) {
    const v = await evaluate(expression);
    if (v) return v;
    if (Date.now() > until) {
      const page = await evaluate("document.getElementById('log')?.innerText ?? document.body.innerText");
      fail("timed out waiting for " + what + "; the page shows:\n" + page);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
function check(ok, msg) {
  if (!ok) fail(msg);
  console.log("   ✓ " + msg);
}
async function typeInto(selector, text) {
  await evaluate(`(() => { const e = document.querySelector(${JSON.stringify(selector)}); e.focus(); e.select?.(); })()`);
  await send("Input.insertText", { text }, session);
}
async function press(key, code, keyCode) {
  const base = { key, code, windowsVirtualKeyCode: keyCode, nativeVirtualKeyCode: keyCode };
  await send("Input.dispatchKeyEvent", { type: "keyDown", ...base }, session);
  await send("Input.dispatchKeyEvent", { type: "keyUp", ...base }, session);
}
async function click(selector) {
  const box = await evaluate(`(() => { const r = document.querySelector(${JSON.stringify(selector)}).getBoundingClientRect();
    return { x: r.x + r.width / 2, y: r.y + r.height / 2 }; })()`);
  for (const type of ["mousePressed", "mouseReleased"])
    await send("Input.dispatchMouseEvent", { type, x: box.x, y: box.y, button: "left", clickCount: 1 }, session);
}

const t0 = Date.now();
const secs = () => ((Date.now() - t0) / 1000).toFixed(1) + " s";

try {
  await main();
  await finish(0);
} catch (e) {
  if (!(e instanceof Failed)) console.error("   ✗ the test broke: " + (e?.stack || e));
  await finish(1);
}

async function main() {
  const { targetId } = await send("Target.createTarget", { url });
  ({ sessionId: session } = await send("Target.attachToTarget", { targetId, flatten: true }));
  await send("Runtime.enable", {}, session);
  await waitFor("the page to load", "document.readyState === 'complete' && !!document.getElementById('send')", 20_000);
  check(true, "the page loaded from " + url + " (" + secs() + ")");
  if (mode === "agent") await agentMode();
  else await shellMode();
}

async function pickUserAndSend(message) {
  await typeInto("#user", USER);
  await evaluate("document.getElementById('user').dispatchEvent(new Event('change'))");
  await typeInto("#message", message);
  await press("Enter", "Enter", 13);
  await waitFor("the message in the chat", `[...document.querySelectorAll('.msg.user')].some(e => e.textContent === ${JSON.stringify(message)})`, 5_000);
  check(true, "the message was sent as user " + USER);
}

async function saveScreenshot() {
  const shot = await send("Page.captureScreenshot", { format: "png" }, session);
  writeFileSync(screenshot, Buffer.from(shot.data, "base64"));
  console.log("     screenshot: " + screenshot);
}

async function agentMode() {
  // Every text the reply bubble shows while it streams.
  await evaluate(`window.replySeen = [];
    new MutationObserver(() => { const r = document.querySelector('.msg.reply.streaming');
      if (r) window.replySeen.push(r.textContent); })
      .observe(document.getElementById('log'), { childList: true, subtree: true, characterData: true })`);
  await pickUserAndSend("What is six times seven? Use the machine.");
  await waitFor("the model's command output", "document.querySelector('.step .output')?.textContent.includes('agent-mode-42')", 90_000);
  check(true, "the model's command ran and its output showed (" + secs() + ")");
  const status = await waitFor("the finished turn", "document.querySelector('.turn[data-status]')?.dataset.status", 30_000);
  check(status === "completed", "the turn finished with status " + status + " (" + secs() + ")");
  const reply = await evaluate("document.querySelector('.msg.reply').textContent");
  check(reply === "I ran the command on your machine: it printed agent-mode-42, which is six times seven.",
    "the reply is the model's text: " + JSON.stringify(reply));
  const seen = await evaluate("window.replySeen");
  const partial = [...new Set(seen)].filter((t) => t.length > 0 && t.length < reply.length && reply.startsWith(t));
  check(partial.length >= 3, "the reply grew in the page piece by piece (" + partial.length + " partial states seen)");
  await saveScreenshot();
}

async function shellMode() {
  // Pick a user id, send the message with Enter.
  await pickUserAndSend(MESSAGE);

  // The first output line shows while the command still runs.
  const streamed = await waitFor("the streamed output line",
    `(() => { const o = document.querySelector('.step .output');
       return o && o.textContent.includes('tick 1')
         ? { finished: !!document.querySelector('.turn[data-status]'), text: o.textContent } : null; })()`, 90_000);
  check(!streamed.finished && !streamed.text.includes("finished"),
    "the output line 'tick 1' appeared while the command was still running (" + secs() + ")");

  // The turn finishes: exit code, reply, status, machine ready.
  const status = await waitFor("the finished turn", "document.querySelector('.turn[data-status]')?.dataset.status", 30_000);
  check(status === "completed", "the turn finished with status " + status + " (" + secs() + ")");
  const exit = await evaluate("document.querySelector('.step .exit').textContent");
  check(/^exit 0 /.test(exit), "the step shows its exit code: " + exit);
  const reply = await evaluate("document.querySelector('.msg.reply').textContent");
  check(reply.includes("tick 3") && reply.includes("finished"), "the reply shows the command's output");
  const state = await waitFor("the machine state ready", "document.getElementById('machine').dataset.state === 'ready'", 10_000);
  check(state, "the machine panel shows ready");

  await saveScreenshot();

  // Sleep now: the machine goes to sleep (the local emulator has no hold window).
  await click("#sleep");
  await waitFor("the sleep answer", "[...document.querySelectorAll('.event')].some(e => e.textContent.startsWith('sleep now: HTTP'))", 15_000);
  const answer = await evaluate("[...document.querySelectorAll('.event')].find(e => e.textContent.startsWith('sleep now:')).textContent");
  check(/HTTP 20[02]/.test(answer), "sleep now was accepted (" + answer.trim() + ")");
  await waitFor("the machine state asleep", "document.getElementById('machine').dataset.state === 'asleep'", 15_000);
  check(true, "the machine panel shows asleep (" + secs() + ")");
}
