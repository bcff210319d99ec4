// End to end in a real browser: `rls-relay demo` (the built binary) on a free port, its
// page in headless Chromium, two users side by side. Checks that each pane receives only
// its user's accounts, that stopping and restarting a share takes effect at its place in
// the commit stream, that a dropped socket resumes without duplicates, and that tokens
// are refreshed before they expire. Leaves artifacts/demo.png and artifacts/demo.log.
//
// Run: tests/browser/run.sh (installs Chromium and the npm packages when missing).
// Every wait is for a condition, with a timeout; nothing is asserted after a fixed sleep.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "../..");
const BINARY = process.env.RLS_RELAY_BIN ?? path.join(ROOT, "target/debug/rls-relay");
const ARTIFACTS = path.join(ROOT, "artifacts");
const CHROMIUM = process.env.CHROMIUM_PATH ?? ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find(existsSync);
const PATIENCE = 30_000; // bounds a failure; not a timing assertion
const TOKEN_TTL_SECONDS = 12; // short, so that a refresh happens during the test

let demo; // the child process
let demoExit; // resolves with its exit code
let url; // the page
let browser;
let page;
let world; // /demo/state: credentials and owners
let screenshotTaken = false;
const pageErrors = [];

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  assert.ok(existsSync(BINARY), `no binary at ${BINARY}: build it first (cargo test --no-run)`);
  assert.ok(CHROMIUM, "no Chromium: run tests/browser/setup.sh");
  const log = createWriteStream(path.join(ARTIFACTS, "demo.log"));
  demo = spawn(
    BINARY,
    ["demo", "--listen-addr", "127.0.0.1:0", "--trades-per-second", "8", "--token-ttl", `${TOKEN_TTL_SECONDS}s`],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RELAY_LOG: "info" } },
  );
  demoExit = new Promise((resolve) => demo.on("exit", (code, signal) => resolve({ code, signal })));
  demo.stderr.pipe(log);
  url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the demo printed no URL within 90 s (see artifacts/demo.log)")), 90_000);
    let out = "";
    demo.stdout.on("data", (chunk) => {
      out += chunk;
      log.write(chunk);
      const match = out.match(/rls-relay demo: (http:\/\/\S+\/)/);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    demo.on("exit", (code) => reject(new Error(`the demo exited (${code}) before printing its URL`)));
  });
  world = await (await fetch(`${url}demo/state`)).json();

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  await page.goto(url);
});

after(async () => {
  if (page && !screenshotTaken) {
    await page.screenshot({ path: path.join(ARTIFACTS, "demo.png"), fullPage: true }).catch(() => {});
  }
  await browser?.close();
  if (demo && demo.exitCode === null) {
    demo.kill("SIGINT");
    const stopped = await Promise.race([demoExit, sleep(20_000).then(() => null)]);
    if (!stopped) demo.kill("SIGKILL");
  }
});

// ---- helpers -------------------------------------------------------------------------

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const summary = (user) => page.evaluate((u) => window.demo.summary(u), user);

/** Polls `check` (on summaries of both users) until it returns true. */
async function waitUntil(what, check, timeout = PATIENCE) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = { alice: await summary("alice"), bob: await summary("bob") };
    if (check(last)) return last;
    if (Date.now() > deadline) {
      const brief = (s) => ({ ...s, events: `${s.events.length} events, last ${JSON.stringify(s.events.at(-1))}` });
      assert.fail(`timed out waiting for: ${what}\nalice: ${JSON.stringify(brief(last.alice))}\nbob: ${JSON.stringify(brief(last.bob))}`);
    }
    await sleep(100);
  }
}

const ids = (owner, { except } = {}) =>
  world.credentials.filter((c) => c.owner_id === owner && c.id !== except).map((c) => c.id);
const onCredential = (s, credential, after = 0) => s.events.filter((e) => e.credential_id === credential && e.id > after);

/** Clicks the share toggle (shared → not shared or back), waits until the page shows the
 * new state, and returns the outbox position after the change. */
async function toggleShare(from) {
  await page.waitForSelector(`#share-toggle[data-shared="${from}"]:not([disabled])`, { timeout: PATIENCE });
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith("/demo/share")),
    page.click("#share-toggle"),
  ]);
  await page.waitForSelector(`#share-toggle[data-shared="${!from}"]`, { timeout: PATIENCE });
  return (await response.json()).after;
}

// ---- the tests ------------------------------------------------------------------------

test("each user sees their own accounts' updates live, and nobody else's", async () => {
  const shared = world.shared_credential;
  const aliceOnly = ids("alice", { except: shared });
  const bobOnly = ids("bob");
  assert.equal(aliceOnly.length, 2);
  assert.equal(bobOnly.length, 1);
  await waitUntil("both panes live", (s) => s.alice.status === "live" && s.bob.status === "live");
  const seen = await waitUntil("updates of every account each user may see", (s) =>
    [...aliceOnly, shared].every((c) => onCredential(s.alice, c).length > 0) &&
    [...bobOnly, shared].every((c) => onCredential(s.bob, c).length > 0));

  for (const event of seen.alice.events) assert.ok(!bobOnly.includes(event.credential_id), `alice got ${JSON.stringify(event)}`);
  for (const event of seen.bob.events) assert.ok(!aliceOnly.includes(event.credential_id), `bob got ${JSON.stringify(event)}`);
  // Nothing of the other user anywhere in a pane: not in the accounts, tables or feed.
  const alicePane = await page.innerHTML("#pane-alice");
  const bobPane = await page.innerHTML("#pane-bob");
  for (const id of bobOnly) assert.ok(!alicePane.includes(id), `bob's credential ${id} shows in alice's pane`);
  for (const id of aliceOnly) assert.ok(!bobPane.includes(id), `alice's credential ${id} shows in bob's pane`);
  assert.ok(bobPane.includes(shared), "the shared credential shows in bob's pane");
});

test("stopping the share cuts bob off from what commits after it; sharing again brings him back", async () => {
  const shared = world.shared_credential;
  const revokedAt = await toggleShare(true);
  // Alice keeps receiving the shared account's updates...
  const later = await waitUntil("three updates of the shared account for alice after the revocation", (s) =>
    onCredential(s.alice, shared, revokedAt).length >= 3);
  // ...and bob got none of those committed after the revocation.
  assert.deepEqual(onCredential(later.bob, shared, revokedAt), [], "bob received updates committed after the revocation");
  await waitUntil("bob's accounts (over REST) no longer list the shared account", (s) =>
    !s.bob.credentials.includes(shared));

  const grantedAt = await toggleShare(false);
  await waitUntil("bob receives the shared account again after the grant", (s) =>
    onCredential(s.bob, shared, grantedAt).length > 0 && s.bob.credentials.includes(shared));
});

test("a dropped connection reconnects and resumes without duplicates", async () => {
  const before = await summary("bob");
  await page.click("#pane-bob button.drop");
  const resumed = await waitUntil("bob reconnected and received more updates", (s) =>
    s.bob.welcomes > before.welcomes && s.bob.status === "live" && s.bob.events.length > before.events.length + 4);
  const received = resumed.bob.events.map((e) => e.id);
  assert.equal(new Set(received).size, received.length, "an event was delivered twice");
});

test("tokens are refreshed before they expire, on the same socket", async () => {
  const refreshed = await waitUntil("both users refreshed their token", (s) =>
    s.alice.refreshes >= 1 && s.bob.refreshes >= 1, (TOKEN_TTL_SECONDS + 10) * 1000);
  assert.equal(refreshed.alice.welcomes, 1, "alice's socket was replaced instead of refreshed");
});

test("client.js: a resume_gap subscribes live again and asks for a refetch", async () => {
  const outcome = await page.evaluate(async () => {
    const { RelayClient } = await import("/client.js");
    const token = async () => (await (await fetch("/demo/token/alice", { method: "POST" })).json()).token;
    return new Promise((resolve, reject) => {
      const seen = { resyncs: [], events: 0, errors: [] };
      const client = new RelayClient({
        getToken: token,
        onResync: (why) => seen.resyncs.push(why),
        onMessage: (m) => m.type === "error" && seen.errors.push(m.code),
        onEvent: () => {
          seen.events += 1;
          if (seen.resyncs.length > 0) { client.stop(); resolve(seen); }
        },
      });
      // A cursor this relay never handed out: answered with resume_gap.
      client.lastEventId = 1e15;
      client.start();
      setTimeout(() => { client.stop(); reject(new Error(JSON.stringify(seen))); }, 20_000);
    });
  });
  assert.deepEqual(outcome.errors, ["resume_gap"]);
  assert.equal(outcome.resyncs.length, 1);
  assert.ok(outcome.events >= 1);
});

test("client.js: a refused token (4001) is replaced by a new one and the client goes live", async () => {
  const statuses = await page.evaluate(async () => {
    const { RelayClient } = await import("/client.js");
    let calls = 0;
    const getToken = async () => {
      calls += 1;
      if (calls === 1) return "not.a.token";
      return (await (await fetch("/demo/token/bob", { method: "POST" })).json()).token;
    };
    return new Promise((resolve, reject) => {
      const statuses = [];
      const client = new RelayClient({
        getToken,
        initialBackoffMs: 100,
        onStatus: (status, detail) => {
          statuses.push(detail?.code ? `${status}:${detail.code}` : status);
          if (status === "live") { client.stop(); resolve(statuses); }
        },
      });
      client.start();
      setTimeout(() => { client.stop(); reject(new Error(statuses.join(","))); }, 20_000);
    });
  });
  assert.ok(statuses.includes("reconnecting:4001"), statuses.join(","));
  assert.equal(statuses.filter((s) => s === "live").length, 1, statuses.join(","));
});

test("over the whole run, neither pane received the other user's private accounts", async () => {
  const shared = world.shared_credential;
  const final = await waitUntil("both live", (s) => s.alice.status === "live" && s.bob.status === "live");
  const aliceOnly = ids("alice", { except: shared });
  const bobOnly = ids("bob");
  assert.deepEqual(final.alice.events.filter((e) => bobOnly.includes(e.credential_id)), []);
  assert.deepEqual(final.bob.events.filter((e) => aliceOnly.includes(e.credential_id)), []);
  assert.deepEqual(pageErrors, [], "the page threw");
});

test("Ctrl-C stops the demo cleanly", async () => {
  await page.screenshot({ path: path.join(ARTIFACTS, "demo.png"), fullPage: true });
  screenshotTaken = true;
  demo.kill("SIGINT");
  const exit = await Promise.race([demoExit, sleep(20_000).then(() => ({ code: "timeout" }))]);
  assert.deepEqual(exit, { code: 0, signal: null });
});
