/**
 * @file The contract every `SearchStorage` must meet, as tests any storage can run: add and deduplicate by
 * key, claim in creation order, heartbeats, results from the right and the wrong worker, re-queueing after a
 * lost heartbeat (spec and seed kept, the dead attempt recorded, a late result recorded and not applied),
 * reopening keeps everything, rejected trials are never claimed.
 *
 * `storageContract(name, makeFixture)` registers the tests; a fixture opens the same store as often as asked
 * (a reopen must see what was committed) and removes it afterwards. SQLite runs it in
 * tests/search_storage_test.ts, PostgreSQL in tests/search_postgres_test.ts; `skip` (a reason) registers the
 * tests as ignored, for a storage that cannot run here.
 */

import type { NewTrial, SearchStorage } from "../search/types.ts";
import { assertEquals, assertRejects, test as registerTest } from "./util.ts";

/** One store under test: `open` connects to it (again), `cleanup` removes it. */
export interface StorageFixture {
  open(): Promise<SearchStorage>;
  cleanup(): Promise<void>;
}

const trial = (key: string, extra: Partial<NewTrial> = {}): NewTrial => ({
  key,
  spec: { name: key, channels: [1, 2] },
  proposer: "test",
  seed: 7,
  ...extra,
});

function assert(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Error(what);
}

/** Registers the contract's tests for one storage kind. */
export function storageContract(
  name: string,
  makeFixture: () => Promise<StorageFixture>,
  skip: string | null = null,
): void {
  const test = (title: string, fn: () => Promise<void>) =>
    skip ? Deno.test({ name: `${title} [skipped: ${skip}]`, ignore: true, fn }) : registerTest(title, fn);
  const withStore = (title: string, f: (s: SearchStorage, fx: StorageFixture) => Promise<void>) =>
    test(`${name}: ${title}`, async () => {
      const fx = await makeFixture();
      const s = await fx.open();
      try {
        await f(s, fx);
      } finally {
        await s.close();
        await fx.cleanup();
      }
    });

  withStore("adds trials with increasing ids and deduplicates by key", async (s) => {
    const a = await s.addTrial(trial("a", { costs: { macs: 100 }, prompt: "p", rawReply: "r" }));
    const b = await s.addTrial(trial("b", { parentId: a.trial.id }));
    assert(a.added && b.added, "new keys are added");
    assertEquals([a.trial.id, b.trial.id], [1, 2], "ids");
    assertEquals(a.trial.status, "queued", "status");
    assertEquals(a.trial.costs, { macs: 100 }, "costs");
    assertEquals([a.trial.prompt, a.trial.rawReply], ["p", "r"], "prompt and reply");
    assertEquals(b.trial.parentId, 1, "parentId");
    const again = await s.addTrial(trial("a", { seed: 99, spec: { other: true } }));
    assert(!again.added, "a repeated key is not added");
    assertEquals(
      [again.trial.id, again.trial.seed, again.trial.spec],
      [1, 7, a.trial.spec],
      "the existing trial",
    );
    assertEquals((await s.listTrials()).map((t) => t.key), ["a", "b"], "trials");
    assertEquals((await s.getTrialByKey("b"))?.id, 2, "by key");
    assertEquals(await s.getTrial(3), null, "unknown id");
    assertEquals(await s.getTrialByKey("zz"), null, "unknown key");
    await assertRejects(() => s.addTrial(trial("c", { parentId: 42 })), "parentId", "42");
    await assertRejects(() => s.addTrial(trial("d", { status: "rejected" })), "rejected", "error");
  });

  withStore("settings: null for a new store, then what was written", async (s) => {
    assertEquals(await s.getMeta(), null, "new meta");
    await s.setMeta({ seed: 3, space: { maxLevels: 2 } });
    assertEquals(await s.getMeta(), { seed: 3, space: { maxLevels: 2 } }, "meta");
  });

  withStore("claims the oldest queued trial, never a rejected one", async (s) => {
    await s.addTrial(
      trial("r1", { status: "rejected", error: "channelMult.2: 5 is above the space's maximum 4" }),
    );
    await s.addTrial(trial("q1"));
    await s.addTrial(trial("r2", { status: "rejected", error: "too big" }));
    await s.addTrial(trial("q2"));
    const first = await s.claimNext("w1"), second = await s.claimNext("w2");
    assertEquals([first?.key, second?.key], ["q1", "q2"], "claim order");
    assertEquals(await s.claimNext("w3"), null, "nothing left to claim");
    assertEquals(first!.status, "running", "claimed status");
    assertEquals(first!.attempts.map((a) => [a.worker, a.end, a.error]), [["w1", null, null]], "attempt");
    assert(first!.heartbeatAt !== null, "a claimed trial has a heartbeat");
    const rejected = await s.listTrials({ status: ["rejected"] });
    assertEquals(rejected.map((t) => [t.key, t.error]), [
      ["r1", "channelMult.2: 5 is above the space's maximum 4"],
      ["r2", "too big"],
    ], "rejected trials keep their reasons");
    assertEquals(
      (await s.listTrials({ status: ["running", "queued"] })).map((t) => t.key),
      ["q1", "q2"],
      "filter",
    );
    assertEquals(await s.listTrials({ status: [] }), [], "empty filter");
  });

  withStore("heartbeat: only the running attempt's worker", async (s) => {
    const { trial: t } = await s.addTrial(trial("a"));
    assert(!(await s.heartbeat(t.id, "w1")), "a queued trial has no heartbeat");
    const claimed = (await s.claimNext("w1"))!;
    await new Promise((r) => setTimeout(r, 5));
    assert(await s.heartbeat(t.id, "w1"), "its worker's heartbeat counts");
    assert(!(await s.heartbeat(t.id, "w2")), "another worker's does not");
    assert(!(await s.heartbeat(99, "w1")), "an unknown trial's does not");
    const after = (await s.getTrial(t.id))!;
    assert(after.heartbeatAt! > claimed.heartbeatAt!, "the heartbeat moved forward");
  });

  withStore("finish by the right worker commits; by the wrong one changes nothing", async (s) => {
    const { trial: t } = await s.addTrial(trial("a", { costs: { macs: 5e6, params: 1e4 } }));
    await s.claimNext("w1");
    const result = {
      status: "done" as const,
      scores: { proxyFid: 41.5, proxyName: "RFID-128" },
      costs: { trainSeconds: 12 },
      lossHistory: [{ step: 1, nimg: 32, loss: 0.9 }, { step: 2, nimg: 64, loss: 0.7 }],
    };
    assert(!(await s.finish(t.id, "w2", result)), "the wrong worker's result is refused");
    const still = (await s.getTrial(t.id))!;
    assertEquals([still.status, still.scores, still.attempts.length], ["running", {}, 1], "unchanged");
    assert(await s.finish(t.id, "w1", result), "the right worker's result is committed");
    const done = (await s.getTrial(t.id))!;
    assertEquals(done.status, "done", "status");
    assertEquals(done.scores, result.scores, "scores");
    assertEquals(done.costs, { macs: 5e6, params: 1e4, trainSeconds: 12 }, "costs merged");
    assertEquals(done.lossHistory, result.lossHistory, "loss history");
    assertEquals(done.heartbeatAt, null, "no heartbeat once done");
    assert(done.attempts[0].end !== null && done.attempts[0].error === null, "attempt closed without error");
    assert(!(await s.finish(t.id, "w1", { status: "failed", error: "again" })), "a second finish is refused");
    assertEquals((await s.getTrial(t.id))!.status, "done", "still done");
    const { trial: f } = await s.addTrial(trial("b"));
    await s.claimNext("w1");
    assert(await s.finish(f.id, "w1", { status: "failed", error: "NaN loss at step 3" }), "failed");
    const failed = (await s.getTrial(f.id))!;
    assertEquals([failed.status, failed.error, failed.attempts[0].error], [
      "failed",
      "NaN loss at step 3",
      "NaN loss at step 3",
    ], "failure recorded");
    await assertRejects(() => s.finish(f.id, "w1", { status: "queued" as "done" }), "status");
  });

  withStore(
    "a lost heartbeat re-queues with spec and seed; the late result is recorded, not applied",
    async (s) => {
      const { trial: t } = await s.addTrial(trial("a", { seed: 1234 }));
      await s.addTrial(trial("b"));
      await s.claimNext("dead");
      assertEquals(await s.requeueStale(60_000), [], "a fresh heartbeat is not stale");
      const later = Date.now() + 120_000;
      assertEquals(await s.requeueStale(60_000, later), [t.id], "re-queued");
      const q = (await s.getTrial(t.id))!;
      assertEquals([q.status, q.seed, q.spec, q.heartbeatAt], ["queued", 1234, t.spec, null], "kept");
      assert(q.attempts.length === 1 && q.attempts[0].end === later, "the dead attempt is closed");
      assert(q.attempts[0].error?.includes("heartbeat"), `attempt error: ${q.attempts[0].error}`);
      assert(!(await s.heartbeat(t.id, "dead")), "the dead worker's heartbeat is refused");
      const late = { status: "done" as const, scores: { proxyFid: 1 } };
      assert(!(await s.finish(t.id, "dead", late)), "the late result is not applied");
      const after = (await s.getTrial(t.id))!;
      assertEquals([after.status, after.scores], ["queued", {}], "trial unchanged");
      assertEquals(after.attempts[0].lateResult, late, "late result on its attempt");
      const again = (await s.claimNext("w2"))!;
      assertEquals([again.id, again.seed], [t.id, 1234], "the re-queued trial is claimed first");
      assertEquals(again.attempts.map((a) => a.worker), ["dead", "w2"], "both attempts");
      assert(await s.finish(t.id, "w2", { status: "pruned" }), "the new worker finishes it");
      assertEquals((await s.getTrial(t.id))!.status, "pruned", "pruned");
      assert(!(await s.finish(99, "w2", { status: "done" })), "an unknown trial");
    },
  );

  withStore(
    "the retry limit: a trial that lost its heartbeat on its last allowed attempt fails",
    async (s) => {
      const { trial: t } = await s.addTrial(trial("a", { seed: 5 }));
      const t0 = Date.now();
      await s.claimNext("w1");
      assertEquals(await s.requeueStale(1_000, t0 + 60_000, 2), [t.id], "first loss: re-queued");
      assertEquals((await s.getTrial(t.id))!.status, "queued", "queued again");
      await s.claimNext("w2");
      assertEquals(await s.requeueStale(1_000, t0 + 120_000, 2), [t.id], "second loss");
      const failed = (await s.getTrial(t.id))!;
      assertEquals([failed.status, failed.seed, failed.attempts.map((a) => a.worker)], [
        "failed",
        5,
        ["w1", "w2"],
      ], "failed after two attempts");
      assert(failed.error?.includes("gave up after 2 attempts"), `error: ${failed.error}`);
      assert(failed.attempts.every((a) => a.end !== null && a.error?.includes("heartbeat")), "both closed");
      assertEquals(await s.claimNext("w3"), null, "a failed trial is not claimed");
    },
  );

  test(`${name}: reopening keeps everything committed`, async () => {
    const fx = await makeFixture();
    try {
      let s = await fx.open();
      await s.setMeta({ proposer: "evolutionary" });
      await s.addTrial(trial("a", { costs: { macs: 1 } }));
      await s.addTrial(trial("b", { status: "rejected", error: "why" }));
      await s.addTrial(trial("c"));
      await s.claimNext("w1");
      await s.finish(1, "w1", {
        status: "done",
        scores: { proxyFid: 3 },
        lossHistory: [{ step: 1, nimg: 8, loss: 0.5 }],
      });
      await s.claimNext("w1");
      const before = await s.listTrials();
      await s.close();
      await assertRejects(() => s.listTrials(), "closed");
      s = await fx.open();
      try {
        assertEquals(await s.listTrials(), before, "trials after reopening");
        assertEquals(await s.getMeta(), { proposer: "evolutionary" }, "meta after reopening");
        assert(!(await s.addTrial(trial("a"))).added, "keys still unique");
        assertEquals((await s.addTrial(trial("d"))).trial.id, 4, "ids continue");
        assert(await s.heartbeat(3, "w1"), "the running attempt survives");
      } finally {
        await s.close();
      }
    } finally {
      await fx.cleanup();
    }
  });
}
