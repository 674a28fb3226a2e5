/**
 * @file The distributed search on a real PostgreSQL server (tests/postgres.ts): a tiny DiffNAS search whose
 * process only proposes (`--propose-only`), three `deno task worker` processes, and one of them killed with
 * `kill -9` in the middle of a trial. Every trial must end done exactly once: the killed worker's trial goes back
 * to the queue after the grace period, with its spec and seed, and another worker finishes it; the lost attempt
 * is recorded. Then `--resume` from a fresh folder (as from another machine) writes the report from the
 * database alone, with the sample grids drawn from the weights stored there and who ran each trial. The
 * connection string carries a password (the test server trusts loopback, so any password works): it must not
 * appear in any output, report or stored setting.
 *
 * The figures (trials, workers, the killed trial and when it was retried, coordination time per trial) are
 * printed; the README's scaling section quotes them. Sized like tests/search_e2e_test.ts: 8×8 images, 16
 * training images per candidate, RFID-8 with 2 steps, the CPU reference kernels.
 */

import postgres from "postgres";
import { PostgresStorage } from "../search/postgres_storage.ts";
import type { SearchConfigInput } from "../search/config.ts";
import type { Trial } from "../search/types.ts";
import { pgTest, startPostgres } from "./postgres.ts";
import { assertEquals, tempDir } from "./util.ts";

const PG = await startPostgres();
const ROOT = new URL("..", import.meta.url).pathname;
const CLI = `${ROOT}cli.ts`;
const TRIALS = 6;
const WORKERS = ["w1", "w2", "w3"];
const SECRET = "pw-Secret-93";
const GRACE_SECONDS = 6;

function assert(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Error(what);
}

/** `deno run -A cli.ts ARGS` as a child process (its PID is the command's, so kill -9 reaches it). */
function spawn(args: string[]): Deno.ChildProcess {
  Deno.mkdirSync("/tmp/xdg", { recursive: true });
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, ...args],
    cwd: ROOT,
    env: { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp/xdg", NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** A child's exit code and output. */
async function finished(
  child: Deno.ChildProcess,
): Promise<{ code: number; signal: string | null; out: string }> {
  const r = await child.output();
  const dec = new TextDecoder();
  return { code: r.code, signal: r.signal, out: dec.decode(r.stdout) + dec.decode(r.stderr) };
}

pgTest(
  PG,
  "distributed search: three workers, one killed with kill -9 mid-trial; every trial done once",
  async (pg) => {
    const url = pg.url.replace("postgres@", `postgres:${SECRET}@`);
    const dir = await tempDir("search-dist-");
    const config: SearchConfigInput = {
      data: { kind: "procedural", resolution: 8, length: 256 },
      trials: TRIALS,
      refN: 64,
      proxyN: 8,
      proxySteps: 2,
      gridImages: 4,
      cacheDir: `${dir}/cache`,
      training: { kimg: 0.016, batch: 4, logEvery: 2 },
      pruning: { enabled: false }, // every trial ends done: "done exactly once" is then exact
      space: { maxChannels: 16, maxBlocks: 1 },
      backend: "cpu",
      queue: {
        depth: 3,
        heartbeatSeconds: 0.5,
        graceSeconds: GRACE_SECONDS,
        maxAttempts: 3,
        pollSeconds: 0.2,
      },
    };
    await Deno.writeTextFile(`${dir}/search.json`, JSON.stringify(config));
    const sql = postgres(pg.url, { max: 1, onnotice: () => {} });
    const children: Deno.ChildProcess[] = [];
    try {
      const t0 = Date.now();
      const search = spawn([
        "search",
        "--config",
        `${dir}/search.json`,
        "--out",
        `${dir}/run`,
        "--storage",
        url,
        "--search",
        "dist",
        "--propose-only",
      ]);
      children.push(search);
      const searchDone = finished(search);
      // Workers start once the search has queued its first trial (its reference statistics are then in the
      // cache the workers share with it on this machine).
      for (;;) {
        const ok = await sql`SELECT 1 FROM search_dist.trials`.catch(() => []);
        if (ok.length) break;
        assert(Date.now() - t0 < 300_000, "the search queued no trial in 5 minutes");
        await new Promise((r) => setTimeout(r, 100));
      }
      const workers = WORKERS.map((name) =>
        spawn(["worker", "--storage", url, "--search", "dist", "--name", name])
      );
      children.push(...workers);
      const workerDone = workers.map(finished);

      // kill -9 w1 in the middle of a trial: its attempt open for a second and its heartbeat thread beating
      // (a heartbeat after the claim's), so the trial is training.
      let killed: { id: number; at: number } | null = null;
      while (!killed) {
        const [r] = await sql`
        SELECT t.id, (extract(epoch from clock_timestamp()) * 1000)::bigint AS now FROM search_dist.trials t
        JOIN search_dist.attempts a ON a.trial_id = t.id
        WHERE t.status = 'running' AND a.worker = 'w1' AND a.ended_at IS NULL
          AND t.heartbeat_at > a.started_at
          AND a.started_at < (extract(epoch from clock_timestamp()) * 1000)::bigint - 1000`;
        if (r) {
          workers[0].kill("SIGKILL");
          killed = { id: Number(r.id), at: Number(r.now) };
        } else {
          assert(Date.now() - t0 < 240_000, "w1 ran no trial in 4 minutes");
          await new Promise((r) => setTimeout(r, 50));
        }
      }
      const w1 = await workerDone[0];
      assertEquals(w1.signal, "SIGKILL", "w1 was killed");

      const s = await searchDone;
      assertEquals(s.code, 0, `search:\n${s.out}`);
      const outs = await Promise.all(workerDone.slice(1));
      for (const [i, w] of outs.entries()) assertEquals(w.code, 0, `${WORKERS[i + 1]}:\n${w.out}`);
      const wall = (Date.now() - t0) / 1000;

      const store = await PostgresStorage.open(pg.url, { search: "dist" });
      let trials: Trial[];
      try {
        trials = await store.listTrials();
      } finally {
        await store.close();
      }
      const trained = trials.filter((t) => t.status !== "rejected");
      assertEquals(trained.length, TRIALS, "trials");
      for (const t of trained) {
        assertEquals(t.status, "done", `trial ${t.id}: ${t.error}`);
        const applied = t.attempts.filter((a) => a.end !== null && a.error === null && !a.lateResult);
        assertEquals(applied.length, 1, `trial ${t.id} completed ${applied.length} times`);
        assert(t.attempts.every((a) => a.end !== null), `trial ${t.id} has an open attempt`);
      }
      const k = trials.find((t) => t.id === killed!.id)!;
      assertEquals(k.attempts[0].worker, "w1", "the killed attempt");
      assert(k.attempts[0].error?.startsWith("heartbeat lost"), `killed attempt: ${k.attempts[0].error}`);
      const retry = k.attempts[k.attempts.length - 1];
      assert(retry.worker === "w2" || retry.worker === "w3", `retried by ${retry.worker}`);
      assertEquals(retry.error, null, "the retry completed");
      const lostAfter = (k.attempts[0].end! - killed.at) / 1000,
        retriedAfter = (retry.start - killed.at) / 1000;
      assert(
        lostAfter >= GRACE_SECONDS - 1,
        `re-queued ${lostAfter} s after the kill (grace ${GRACE_SECONDS} s)`,
      );

      // Coordination per trial, as the workers measured it (every call to the memory while on a trial).
      const per = outs.map((w) => {
        const m = /coordination ([\d.]+) ms per trial \(median ([\d.]+) ms; ([\d.]+)% of ([\d.]+) s\)/.exec(
          w.out,
        );
        assert(m, `no coordination line:\n${w.out}`);
        const calls = /coordination by call: (.*)/.exec(w.out)?.[1] ?? "";
        return {
          ms: Number(m[1]),
          median: Number(m[2]),
          share: Number(m[3]),
          trialSeconds: Number(m[4]),
          calls,
        };
      });
      const byWorker = new Map<string, number>();
      for (const t of trained) {
        const w = t.attempts.find((a) => a.error === null)!.worker;
        byWorker.set(w, (byWorker.get(w) ?? 0) + 1);
      }
      const waits = trained.map((t) => (t.attempts[0].start - t.createdAt) / 1000);
      console.log(
        [
          `  ${TRIALS} trials, ${WORKERS.length} workers (+ the proposing search process), ${
            wall.toFixed(0)
          } s wall`,
          `  trials per worker: ${[...byWorker].map(([w, n]) => `${w} ${n}`).join(", ")}`,
          `  killed w1 on trial ${k.id} (attempt 1 started ${
            ((killed.at - k.attempts[0].start) / 1000).toFixed(1)
          } s earlier); re-queued ${lostAfter.toFixed(1)} s after the kill (grace ${GRACE_SECONDS} s), ` +
          `claimed again by ${retry.worker} ${retriedAfter.toFixed(1)} s after the kill`,
          `  coordination per trial (w2, w3): ${
            per.map((p) => `mean ${p.ms.toFixed(1)} ms, median ${p.median.toFixed(1)} ms`).join("; ")
          } ` +
          `(${per.map((p) => `${p.share.toFixed(2)}%`).join(", ")} of trials of ${
            per.map((p) => `${p.trialSeconds.toFixed(1)} s`).join(", ")
          })`,
          `  queue wait: mean ${(waits.reduce((a, b) => a + b, 0) / waits.length).toFixed(1)} s, max ${
            Math.max(...waits).toFixed(1)
          } s`,
          ...per.map((p, i) => `  ${WORKERS[i + 1]} calls: ${p.calls}`),
        ].join("\n"),
      );

      // Resume from another folder (another machine): the report comes from the database alone.
      const elsewhere = await finished(
        spawn(["search", "--storage", url, "--search", "dist", "--resume", "--out", `${dir}/elsewhere`]),
      );
      assertEquals(elsewhere.code, 0, elsewhere.out);
      const report = JSON.parse(await Deno.readTextFile(`${dir}/elsewhere/report.json`));
      assertEquals(report.counts.done, TRIALS, "report counts");
      assert(report.grids.length >= 1, "grids drawn from the stored weights");
      for (const g of report.grids) assert((await Deno.stat(`${dir}/elsewhere/${g.path}`)).size > 0, g.path);
      for (const row of report.top) {
        assert(
          ["w2", "w3"].includes(row.worker) || (row.worker === "w1" && row.id !== k.id),
          `worker ${row.worker}`,
        );
        assert(row.queueSeconds >= 0, `queue ${row.queueSeconds}`);
      }
      const html = await Deno.readTextFile(`${dir}/elsewhere/report.html`);
      assert(html.includes("Workers and queue") && html.includes("heartbeat lost"), "the workers section");

      // The password: in no output, report or stored setting.
      const settings = (await sql`SELECT value FROM search_dist.meta`).map((r) => String(r.value)).join("\n");
      const texts = {
        search: s.out,
        w1: w1.out,
        w2: outs[0].out,
        w3: outs[1].out,
        elsewhere: elsewhere.out,
        "report.html": html,
        "report.json": JSON.stringify(report),
        "run/report.json": await Deno.readTextFile(`${dir}/run/report.json`),
        settings,
      };
      for (const [where, text] of Object.entries(texts)) {
        assert(
          !text.includes(SECRET),
          `the password is in ${where}`,
        );
      }
      assert(s.out.includes("postgres:***@"), `the search prints the redacted URL:\n${s.out}`);
    } finally {
      for (const c of children) {
        try {
          c.kill("SIGKILL");
        } catch { /* already gone */ }
      }
      await sql.unsafe("DROP SCHEMA IF EXISTS search_dist CASCADE").catch(() => {});
      await sql.end();
    }
  },
);
