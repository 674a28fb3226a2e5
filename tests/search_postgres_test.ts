/**
 * @file The PostgreSQL search memory on a real server (tests/postgres.ts starts one on loopback): the storage
 * contract (tests/search_storage_contract.ts, the same tests SQLite passes), and what is PostgreSQL's own: many
 * connections claiming at once never take a trial twice (SKIP LOCKED), a finish racing its re-queue applies
 * once, searches side by side in one database, weights stored in the database, refusing another schema
 * version, the password of the connection string in no error message, and heartbeats from a thread of their
 * own while the main thread is blocked.
 */

import postgres from "postgres";
import { PG_SCHEMA_VERSION, PostgresStorage, redactUrl } from "../search/postgres_storage.ts";
import { storageContract } from "./search_storage_contract.ts";
import { pgTest, startPostgres } from "./postgres.ts";
import { assertEquals, assertRejects } from "./util.ts";

const PG = await startPostgres();
const url = typeof PG === "string" ? "" : PG.url;
let fixtures = 0;

storageContract("PostgresStorage", () => {
  const search = `contract_${++fixtures}`;
  return Promise.resolve({
    open: () => PostgresStorage.open(url, { search }),
    cleanup: () => PostgresStorage.dropSearch(url, search),
  });
}, typeof PG === "string" ? PG : null);

function assert(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Error(what);
}

pgTest(PG, "PostgresStorage: 16 connections claiming 200 trials at once take each exactly once", async () => {
  const search = "claims";
  const stores = await Promise.all(Array.from({ length: 16 }, () => PostgresStorage.open(url, { search })));
  try {
    const n = 200;
    for (let i = 0; i < n; i++) {
      await stores[0].addTrial({ key: `k${i}`, spec: { i }, proposer: "t", seed: i });
    }
    const claimed: number[] = [];
    const t0 = performance.now();
    await Promise.all(stores.map(async (s, w) => {
      for (;;) {
        const t = await s.claimNext(`w${w}`);
        if (!t) return;
        claimed.push(t.id);
        assert(await s.heartbeat(t.id, `w${w}`), "heartbeat of a claimed trial");
        assert(await s.finish(t.id, `w${w}`, { status: "done", scores: { proxyFid: t.id } }), "finish");
      }
    }));
    const ms = (performance.now() - t0) / n;
    console.log(`  claim + heartbeat + finish: ${ms.toFixed(2)} ms per trial over 16 connections`);
    assertEquals(claimed.length, n, "claims");
    assertEquals(new Set(claimed).size, n, "each trial once");
    const all = await stores[0].listTrials();
    assert(all.every((t) => t.status === "done" && t.attempts.length === 1), "all done with one attempt");
  } finally {
    for (const s of stores) await s.close();
    await PostgresStorage.dropSearch(url, search);
  }
});

pgTest(
  PG,
  "PostgresStorage: a result racing its re-queue is applied once or recorded late, never both",
  async () => {
    const search = "race";
    const a = await PostgresStorage.open(url, { search }), b = await PostgresStorage.open(url, { search });
    try {
      for (let i = 0; i < 20; i++) {
        const { trial } = await a.addTrial({ key: `r${i}`, spec: i, proposer: "t", seed: i });
        await a.claimNext("slow");
        // One connection finishes while the other re-queues (as if the heartbeat were long lost).
        const [finished, requeued] = await Promise.all([
          a.finish(trial.id, "slow", { status: "done", scores: { proxyFid: 1 } }),
          b.requeueStale(0, Date.now() + 3_600_000),
        ]);
        const t = (await a.getTrial(trial.id))!;
        if (finished) {
          assertEquals([t.status, requeued], ["done", []], `trial ${i}: finished first`);
        } else {
          assertEquals([t.status, requeued], ["queued", [trial.id]], `trial ${i}: re-queued first`);
          assertEquals(t.attempts[0].lateResult?.status, "done", `trial ${i}: late result recorded`);
          await a.claimNext("other");
          await a.finish(trial.id, "other", { status: "done" });
        }
      }
    } finally {
      await a.close();
      await b.close();
      await PostgresStorage.dropSearch(url, search);
    }
  },
);

pgTest(
  PG,
  "PostgresStorage: searches side by side, weights in the database, names and versions checked",
  async () => {
    const one = await PostgresStorage.open(url, { search: "side_one" });
    const two = await PostgresStorage.open(url, { search: "side_two" });
    try {
      await one.addTrial({ key: "x", spec: 1, proposer: "t", seed: 1 });
      assertEquals((await two.listTrials()).length, 0, "the other search is empty");
      const names = await PostgresStorage.listSearches(url);
      assert(names.includes("side_one") && names.includes("side_two"), `searches: ${names}`);
      const bytes = Uint8Array.from({ length: 70_000 }, (_, i) => (i * 7) & 255);
      assert(!(await one.saveWeights(1, "w", bytes)), "not stored for a trial that is not w's");
      await one.claimNext("w");
      assert(await one.saveWeights(1, "w", bytes), "stored while running under w");
      assertEquals(await one.loadWeights(1), bytes, "weights round trip");
      assertEquals(await one.loadWeights(2), null, "no weights");
      await assertRejects(() => PostgresStorage.open(url, { search: "Bad-Name" }), "Bad-Name", "lower-case");
      const sql = postgres(url, { max: 1, onnotice: () => {} });
      try {
        await sql.unsafe("UPDATE search_side_two.meta SET value = '99' WHERE name = 'schema_version'");
        await sql.unsafe("CREATE SCHEMA search_foreign; CREATE TABLE search_foreign.photos (id int)");
      } finally {
        await sql.end();
      }
      await assertRejects(
        () => PostgresStorage.open(url, { search: "side_two" }),
        "side_two",
        "schema version is 99",
        `version ${PG_SCHEMA_VERSION}`,
      );
      await assertRejects(
        () => PostgresStorage.open(url, { search: "foreign" }),
        "not a search memory",
        "photos",
      );
    } finally {
      await one.close();
      await two.close();
      for (const s of ["side_one", "side_two", "foreign"]) await PostgresStorage.dropSearch(url, s);
    }
  },
);

pgTest(PG, "PostgresStorage: the password is in no message; TLS options reach the client", async (pg) => {
  const secret = "s3cret-Pa55";
  assertEquals(
    redactUrl(`postgres://me:${secret}@db.example:5432/x?sslmode=require`),
    "postgres://me:***@db.example:5432/x?sslmode=require",
    "redacted",
  );
  // Nothing listens on a just-freed port: the connection error must not carry the password.
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  const e1 = await assertRejects(
    () => PostgresStorage.open(`postgres://me:${secret}@127.0.0.1:${port}/x`, { connectTimeoutSeconds: 3 }),
    "me:***@127.0.0.1",
  );
  assert(!e1.message.includes(secret), e1.message);
  // A missing CA file is named; the password is not.
  const e2 = await assertRejects(
    () =>
      PostgresStorage.open(
        `postgres://me:${secret}@127.0.0.1:${pg.port}/x?sslmode=verify-full&sslrootcert=/no/ca.pem`,
      ),
    "sslrootcert=/no/ca.pem",
  );
  assert(!e2.message.includes(secret), e2.message);
  // sslmode=require against a server without TLS: the client asks for TLS and is refused (it got the option).
  const e3 = await assertRejects(
    () => PostgresStorage.open(`postgres://postgres:${secret}@127.0.0.1:${pg.port}/postgres?sslmode=require`),
  );
  assert(/ssl|tls/i.test(e3.message) && !e3.message.includes(secret), e3.message);
  // Trust authentication ignores the password: the storage works, and its label hides the password.
  const s = await PostgresStorage.open(`postgres://postgres:${secret}@127.0.0.1:${pg.port}/postgres`, {
    search: "secret",
  });
  try {
    assert(!s.label.includes(secret) && s.label.includes("***"), s.label);
  } finally {
    await s.close();
    await PostgresStorage.dropSearch(url, "secret");
  }
});

pgTest(PG, "PostgresStorage: the heartbeat thread beats while the main thread is blocked", async () => {
  const search = "beats";
  const s = await PostgresStorage.open(url, { search });
  try {
    await s.addTrial({ key: "k", spec: 1, proposer: "t", seed: 1 });
    const claimed = (await s.claimNext("w"))!;
    const beats = await s.startHeartbeats(claimed.id, "w", 50);
    await new Promise((r) => setTimeout(r, 300)); // the thread connects
    const before = (await s.getTrial(claimed.id))!.heartbeatAt!;
    // A synchronous kernel holding this thread for 1.5 s: no timer of this thread could fire.
    const until = performance.now() + 1500;
    while (performance.now() < until) { /* busy */ }
    const blockedEnd = Date.now();
    const after = (await s.getTrial(claimed.id))!.heartbeatAt!;
    const stats = await beats.stop();
    assert(after > before && after > blockedEnd - 1000, `heartbeat ${after - before} ms later`);
    assert(stats.calls >= 10 && stats.lost === 0, JSON.stringify(stats));
    await s.requeueStale(0, Date.now() + 60_000);
    const late = await s.startHeartbeats(claimed.id, "w", 20);
    await new Promise((r) => setTimeout(r, 200));
    assert((await late.stop()).lost > 0, "heartbeats of a re-queued trial are refused");
  } finally {
    await s.close();
    await PostgresStorage.dropSearch(url, search);
  }
});

pgTest(
  PG,
  "deno task worker / search --storage: bad input exits 2, naming it, never the password",
  async (pg) => {
    const secret = "cli-Secret-71";
    const withPassword = pg.url.replace("postgres@", `postgres:${secret}@`);
    const cli = new URL("../cli.ts", import.meta.url).pathname;
    const run = async (args: string[]) => {
      const r = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", cli, ...args],
        env: { NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const dec = new TextDecoder();
      return { code: r.code, out: dec.decode(r.stdout) + dec.decode(r.stderr) };
    };
    const outDir = await Deno.makeTempDir({ prefix: "search-pg-cli-" });
    const [unknown, notPg] = await Promise.all([
      run(["worker", "--storage", withPassword, "--search", "nope"]),
      run(["search", "--storage", `mysql://root:${secret}@127.0.0.1/x`, "--out", `${outDir}/run`]),
    ]);
    assertEquals(unknown.code, 2, unknown.out);
    assert(unknown.out.includes("no search nope"), unknown.out);
    assertEquals(notPg.code, 2, notPg.out);
    assert(notPg.out.includes("postgres://"), notPg.out);
    for (const r of [unknown, notPg]) assert(!r.out.includes(secret), `the password is printed:\n${r.out}`);
    assert(
      !(await PostgresStorage.listSearches(url)).includes("nope"),
      "a misspelt --search creates nothing",
    );
  },
);
