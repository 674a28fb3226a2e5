/**
 * @file The SQLite search memory: the storage contract (tests/search_storage_contract.ts) on a file in a
 * temporary run folder, and what is SQLite's own: WAL mode and the schema version on disk, refusing a file of
 * another version or a database that is not a memory, and two connections to one file (two processes) that
 * neither add a key twice nor claim one trial twice.
 */

import { DatabaseSync } from "node:sqlite";
import { MEMORY_FILE, SCHEMA_VERSION, SqliteStorage } from "../search/sqlite_storage.ts";
import { storageContract } from "./search_storage_contract.ts";
import { assertEquals, assertThrows, test } from "./util.ts";

storageContract("SqliteStorage", async () => {
  const dir = await Deno.makeTempDir({ prefix: "search_storage_" });
  return {
    open: () => Promise.resolve(SqliteStorage.inRunFolder(dir)),
    cleanup: () => Deno.remove(dir, { recursive: true }),
  };
});

/** Runs `f` with a fresh temporary folder, removed afterwards. */
async function inTempDir(f: (dir: string) => Promise<void> | void): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "search_storage_" });
  try {
    await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

test("SqliteStorage: the file is in WAL mode with its schema version in meta", () =>
  inTempDir(async (dir) => {
    const s = SqliteStorage.inRunFolder(`${dir}/`);
    assertEquals(s.path, `${dir}/${MEMORY_FILE}`, "path");
    await s.addTrial({ key: "k", spec: {}, proposer: "t", seed: 0 });
    await s.close();
    const db = new DatabaseSync(`${dir}/${MEMORY_FILE}`);
    try {
      assertEquals(db.prepare("PRAGMA journal_mode").get()?.journal_mode, "wal", "journal mode");
      assertEquals(
        db.prepare("SELECT value FROM meta WHERE name = 'schema_version'").get()?.value,
        String(SCHEMA_VERSION),
        "schema version",
      );
      assertThrows(
        () =>
          db.prepare(
            "INSERT INTO trials(key, spec, proposer, seed, status, scores, costs, loss_history, created_at)" +
              " VALUES ('k', '{}', 't', 0, 'queued', '{}', '{}', '[]', 0)",
          ).run(),
        "UNIQUE",
      );
      assertThrows(
        () =>
          db.prepare(
            "INSERT INTO trials(key, spec, proposer, seed, status, scores, costs, loss_history, created_at)" +
              " VALUES ('k2', '{', 't', 0, 'queued', '{}', '{}', '[]', 0)",
          ).run(),
        "CHECK",
      );
    } finally {
      db.close();
    }
  }));

test("SqliteStorage: refuses another schema version, a foreign database and a file that is not SQLite", () =>
  inTempDir(async (dir) => {
    const path = `${dir}/${MEMORY_FILE}`;
    await SqliteStorage.open(path).close();
    const db = new DatabaseSync(path);
    db.exec("UPDATE meta SET value = '99' WHERE name = 'schema_version'");
    db.close();
    assertThrows(() => SqliteStorage.open(path), path, "schema version is 99", `version ${SCHEMA_VERSION}`);
    const other = new DatabaseSync(`${dir}/other.sqlite`);
    other.exec("CREATE TABLE photos (id INTEGER)");
    other.close();
    assertThrows(() => SqliteStorage.open(`${dir}/other.sqlite`), "not a search memory", "photos");
    await Deno.writeTextFile(
      `${dir}/text.sqlite`,
      "this is not a database, just some text of some length\n".repeat(40),
    );
    assertThrows(() => SqliteStorage.open(`${dir}/text.sqlite`), `${dir}/text.sqlite`);
    assertThrows(() => SqliteStorage.open(`${dir}/missing/folder/memory.sqlite`), "missing/folder");
  }));

test("SqliteStorage: two connections to one file never add a key twice or claim a trial twice", () =>
  inTempDir(async (dir) => {
    const a = SqliteStorage.inRunFolder(dir), b = SqliteStorage.inRunFolder(dir);
    try {
      for (let i = 0; i < 6; i++) {
        const [x, y] = [
          await a.addTrial({ key: `k${i}`, spec: i, proposer: "a", seed: i }),
          await b.addTrial({
            key: `k${i}`,
            spec: -i,
            proposer: "b",
            seed: 100 + i,
          }),
        ];
        assertEquals([x.added, y.added, y.trial.id, y.trial.seed], [true, false, x.trial.id, i], `key k${i}`);
      }
      const claimed: number[] = [];
      for (let i = 0; i < 4; i++) {
        for (const [s, w] of [[a, "wa"], [b, "wb"]] as const) {
          const t = await s.claimNext(w);
          if (t) claimed.push(t.id);
        }
      }
      assertEquals(claimed, [1, 2, 3, 4, 5, 6], "each trial claimed once, in order");
      assertEquals((await a.listTrials({ status: ["running"] })).length, 6, "all running");
      // A result through the other connection is seen by the first.
      await b.finish(2, "wb", { status: "done", scores: { proxyFid: 9 } });
      assertEquals((await a.getTrial(2))?.scores, { proxyFid: 9 }, "visible across connections");
    } finally {
      await a.close();
      await b.close();
    }
  }));

test("SqliteStorage: the clock option times claims, heartbeats and re-queues", () =>
  inTempDir(async (dir) => {
    let now = 1_000_000;
    const s = SqliteStorage.inRunFolder(dir, { now: () => now });
    try {
      await s.addTrial({ key: "k", spec: {}, proposer: "t", seed: 0 });
      const t = (await s.claimNext("w"))!;
      assertEquals([t.createdAt, t.heartbeatAt, t.attempts[0].start], [now, now, now], "times");
      now += 30_000;
      await s.heartbeat(t.id, "w");
      now += 50_000;
      assertEquals(await s.requeueStale(60_000), [], "heartbeat 50 s ago, grace 60 s");
      now += 20_000;
      assertEquals(await s.requeueStale(60_000), [t.id], "70 s ago");
      const q = (await s.getTrial(t.id))!;
      assertEquals(q.attempts[0].error, "heartbeat lost: none for 70.0 s (grace 60 s)", "reason");
    } finally {
      await s.close();
    }
  }));
