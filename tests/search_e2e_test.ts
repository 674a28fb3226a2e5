/**
 * @file End-to-end tests of `deno task search`: a tiny DiffNAS search in-process through `runSearch`, and the
 * command line as a real process: killed with SIGKILL in the middle of a trial and resumed, refused while
 * another process holds the folder, and refused on bad input.
 *
 * Everything is tiny so the file runs in about a minute on a loaded machine: 8×8 procedural images, 64
 * reference images, RFID-8 with 2 Heun steps, 16 training images per candidate (4 steps of 4), at most 16
 * channels and one block per level, 3 trials, report grids of 4 samples, the CPU reference kernels (no Vulkan start-up per process).
 * Reference statistics go to a temporary cache folder (the `cacheDir` setting), so nothing is written to
 * the working directory.
 */

import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  notStrictEqual,
  ok as assert,
} from "node:assert";
import { DatabaseSync } from "node:sqlite";
import { runSearch } from "../search/diffnas.ts";
import type { SearchConfigInput } from "../search/config.ts";
import { SqliteStorage } from "../search/sqlite_storage.ts";
import { weightsPath } from "../search/runner.ts";
import type { Trial } from "../search/types.ts";
import { tempDir } from "./util.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const CLI = `${ROOT}cli.ts`;
/** Shared by every search of this file: the reference statistics are computed once. */
const CACHE = await tempDir("search-e2e-cache-");
const TRIALS = 3;

/** The settings of a tiny search in `out`. */
function tiny(out: string): SearchConfigInput {
  return {
    data: { kind: "procedural", resolution: 8, length: 256 },
    out,
    trials: TRIALS,
    refN: 64,
    proxyN: 8,
    proxySteps: 2,
    gridImages: 4,
    cacheDir: CACHE,
    training: { kimg: 0.016, batch: 4, logEvery: 2 },
    space: { maxChannels: 16, maxBlocks: 1 },
    backend: "cpu",
  };
}

/** Writes `config` to a JSON file in a fresh temporary folder; returns its path. */
async function configFile(config: Record<string, unknown>): Promise<string> {
  const dir = await tempDir("search-e2e-config-");
  const path = `${dir}/search.json`;
  await Deno.writeTextFile(path, JSON.stringify(config));
  return path;
}

/** `deno run -A cli.ts search ARGS` as a child process (not through `deno task`: its PID is the search's). */
function spawnSearch(args: string[]): Deno.ChildProcess {
  Deno.mkdirSync("/tmp/xdg", { recursive: true });
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, "search", ...args],
    cwd: ROOT,
    env: { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp/xdg", NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** Runs a search to its end; returns its exit code and output. */
async function runCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await spawnSearch(args).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** The memory of a finished search (opened, read, closed). */
async function readMemory(dir: string): Promise<Trial[]> {
  const storage = SqliteStorage.inRunFolder(dir);
  try {
    return await storage.listTrials();
  } finally {
    await storage.close();
  }
}

/** Trials that cost training and finished (done, pruned or failed). */
const trained = (ts: readonly Trial[]) => ts.filter((t) => ["done", "pruned", "failed"].includes(t.status));

/** Checks a finished search's memory, report and weights; returns the trials. */
async function checkFinished(dir: string): Promise<Trial[]> {
  const trials = await readMemory(dir);
  for (const t of trials) {
    assert(["done", "pruned", "failed", "rejected"].includes(t.status), `trial ${t.id} is ${t.status}`);
  }
  assertEquals(trained(trials).length, TRIALS);
  const baseline = trials.filter((t) => t.proposer === "baseline");
  assertEquals(baseline.length, 1);
  assertEquals(baseline[0].status, "done");
  const done = trials.filter((t) => t.status === "done");
  assert(done.length >= 2, `only ${done.length} trials done: ${JSON.stringify(trials.map((t) => t.error))}`);
  for (const t of done) {
    assert(
      Number.isFinite(t.scores.proxyFid) && t.scores.proxyFid! >= 0,
      `trial ${t.id}: ${t.scores.proxyFid}`,
    );
    assertEquals(t.scores.proxyName, "RFID-8");
    assert(t.costs.macs! > 0 && t.costs.params! > 0, `trial ${t.id} costs ${JSON.stringify(t.costs)}`);
    assert((await Deno.stat(weightsPath(dir, t.id))).size > 0, `trial ${t.id} has no weights`);
  }
  assert((await Deno.stat(`${dir}/report.html`)).size > 0);
  const report = JSON.parse(await Deno.readTextFile(`${dir}/report.json`));
  const top = report.top as { id: number; proxyFid: number }[];
  assertEquals(top.length, done.length);
  for (let i = 1; i < top.length; i++) assert(top[i - 1].proxyFid <= top[i].proxyFid, "top is not sorted");
  assertEquals(top[0].proxyFid, Math.min(...done.map((t) => t.scores.proxyFid!)));
  const grids = report.grids as { trialId: number; path: string }[];
  assert(grids.length >= 1 && grids.length <= 3, JSON.stringify(grids));
  for (const g of grids) assert((await Deno.stat(`${dir}/${g.path}`)).size > 0, g.path);
  return trials;
}

/** The id in the first row of the terminal summary table ("rank id proposer …"). */
function summaryBest(summary: string): number {
  const row = summary.split("\n").find((l) => /^\s*1\s+\d+\s/.test(l));
  assert(row, `no rank-1 row in the summary:\n${summary}`);
  return Number(row.trim().split(/\s+/)[1]);
}

Deno.test({
  name: "search e2e: a tiny DiffNAS search in-process keeps the baseline and candidates, writes the report",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const out = `${await tempDir("search-e2e-")}/run`;
    const events: string[] = [];
    const r = await runSearch(tiny(out), { onEvent: (e) => events.push(e.type) });
    assertEquals(r.stoppedBy, "trials");
    const trials = await checkFinished(out);
    assertEquals(r.trials.map((t) => [t.id, t.status]), trials.map((t) => [t.id, t.status]));
    assertEquals(r.reportJson, `${out}/report.json`);
    const best = trials.filter((t) =>
      t.status === "done"
    ).sort((a, b) => a.scores.proxyFid! - b.scores.proxyFid!)[0];
    assertEquals(summaryBest(r.summary), best.id);
    assertEquals(events.filter((e) => e === "trial-end").length, TRIALS);
    assertEquals(events[events.length - 1], "report");
    // The lock is released with the search.
    await Deno.stat(`${out}/lock`).then(() => assert(false, "lock left behind"), () => {});
  },
});

/** Reads the memory file without taking any lock (the search writes it meanwhile). */
function peek(dir: string): { id: number; status: string; proxyFid: number | null }[] {
  let db: DatabaseSync;
  try {
    db = new DatabaseSync(`${dir}/memory.sqlite`, { readOnly: true });
  } catch {
    return []; // not created yet
  }
  try {
    return db.prepare("SELECT id, status, json_extract(scores, '$.proxyFid') AS fid FROM trials ORDER BY id")
      .all().map((r) => ({
        id: Number(r.id),
        status: String(r.status),
        proxyFid: r.fid === null ? null : Number(r.fid),
      }));
  } catch {
    return []; // tables not there yet
  } finally {
    db.close();
  }
}

/** Waits until `cond` holds (polling every 50 ms) or the child exits (an error naming its output). */
async function waitFor(child: Deno.ChildProcess, what: string, cond: () => boolean | Promise<boolean>) {
  let exited = false;
  child.status.then(() => exited = true);
  const t0 = Date.now();
  while (!(await cond())) {
    if (exited) throw new Error(`the search ended before ${what}`);
    if (Date.now() - t0 > 300_000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

Deno.test({
  name:
    "search e2e: a live search refuses a second process; killed with SIGKILL it resumes without rerunning " +
    "finished trials",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const out = `${await tempDir("search-e2e-kill-")}/run`;
    const config = await configFile(tiny(out) as Record<string, unknown>);
    const first = spawnSearch(["--config", config, "--out", out]);
    // Drain the first process's output (a full pipe would block it).
    const firstOutput = first.output();
    let killed = false;
    try {
      // While it runs (holding the lock, its memory created), a second process is refused, naming the PID.
      await waitFor(first, "the memory exists", () => peek(out).length > 0);
      const second = await runCli(["--config", config, "--out", out, "--resume"]);
      notStrictEqual(second.code, 0);
      assertMatch(second.stderr, new RegExp(`in use by process ${first.pid}\\b`));

      // One trial done, another running: kill -9.
      let before: ReturnType<typeof peek> = [];
      await waitFor(first, "one trial is done and another runs", () => {
        before = peek(out);
        return before.some((t) => t.status === "done") && before.some((t) => t.status === "running");
      });
      first.kill("SIGKILL");
      killed = true;
      const status = await first.status;
      assertEquals(status.signal, "SIGKILL");
      await firstOutput;
      const atKill = peek(out);
      const running = atKill.filter((t) => t.status === "running");
      assertEquals(running.length, 1, JSON.stringify(atKill));
      const killedId = running[0].id;
      const finishedBefore = atKill.filter((t) => t.status === "done");
      for (const t of before.filter((t) => t.status === "done")) {
        assertEquals(finishedBefore.find((u) => u.id === t.id)?.proxyFid, t.proxyFid);
      }

      // Without --resume the folder is refused (the dead holder's lock does not matter).
      const refused = await runCli(["--config", config, "--out", out]);
      assertEquals(refused.code, 2, refused.stderr);
      assertMatch(refused.stderr, /--resume/);
      assertEquals(peek(out), atKill);

      // With --resume it finishes the budget; nothing runs twice to completion.
      const resumed = await runCli(["--config", config, "--out", out, "--resume"]);
      assertEquals(resumed.code, 0, resumed.stderr);
      assertMatch(resumed.stdout, /resuming search/);
      const trials = await checkFinished(out);
      assertEquals(new Set(trials.map((t) => t.key)).size, trials.length);
      for (const t of trials) {
        const completions = t.attempts.filter((a) => a.end !== null && a.error === null);
        assert(completions.length <= 1, `trial ${t.id} completed ${completions.length} times`);
        assert(t.attempts.every((a) => a.end !== null && a.lateResult === undefined), `trial ${t.id}`);
      }
      for (const b of finishedBefore) {
        const t = trials.find((t) => t.id === b.id)!;
        assertEquals([t.status, t.scores.proxyFid, t.attempts.length], ["done", b.proxyFid, 1]);
      }
      const k = trials.find((t) => t.id === killedId)!;
      assertEquals(k.attempts.length, 2, JSON.stringify(k.attempts));
      assert(k.attempts[0].error, "the killed attempt is closed without an error");
      assertEquals(k.attempts[1].error, null);
      assert(["done", "pruned"].includes(k.status), `the killed trial ended ${k.status}: ${k.error}`);
      // The resumed process reran the killed trial (its line in the log), and only the trials not yet done.
      assertMatch(resumed.stdout, new RegExp(`^trial +${killedId} `, "m"));
      for (const b of finishedBefore) assert(!new RegExp(`^trial +${b.id} `, "m").test(resumed.stdout));
    } finally {
      if (!killed) {
        try {
          first.kill("SIGKILL");
        } catch { /* already gone */ }
        await first.status;
      }
    }
  },
});

Deno.test({
  name: "search e2e: bad input is refused with exit 2 naming the key, the file, or what the folder holds",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const dir = await tempDir("search-e2e-bad-");
    const aFile = `${dir}/a-file`;
    await Deno.writeTextFile(aFile, "not a folder");
    const other = `${dir}/other`;
    await Deno.mkdir(other);
    await Deno.writeTextFile(`${other}/notes.txt`, "someone's notes");
    const unknownKey = await configFile({ ...tiny(`${dir}/x`), trails: 5 });
    const good = await configFile(tiny(`${dir}/unused`) as Record<string, unknown>);
    const [unknown, file, foreign] = await Promise.all([
      runCli(["--config", unknownKey]),
      runCli(["--config", good, "--out", aFile]),
      runCli(["--config", good, "--out", other]),
    ]);
    assertEquals(unknown.code, 2, unknown.stderr);
    assertMatch(unknown.stderr, /trails/);
    assertEquals(file.code, 2, file.stderr);
    assertMatch(file.stderr, /a-file is a file/);
    assertEquals(foreign.code, 2, foreign.stderr);
    assertMatch(foreign.stderr, /notes\.txt/);
    // Nothing was written into the refused folders.
    assertEquals([...Deno.readDirSync(other)].map((e) => e.name), ["notes.txt"]);
    await Deno.stat(`${dir}/x`).then(() => assert(false, "created the folder of a bad config"), () => {});
  },
});
