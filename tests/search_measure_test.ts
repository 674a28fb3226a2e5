/**
 * @file The search's two measurement modes: trials-to-target (search/compare.ts) on hand-made trial lists,
 * including runs that never reach the target and failed or pruned trials that count as trained, the spread of
 * architectures for proxy validation (search/validate_proxy.ts), and one tiny end-to-end run of each mode (8×8
 * procedural images, a few steps, CPU backend) that checks the files written and that ρ is a correlation or
 * undefined with a reason.
 */

import type { Trial } from "../search/types.ts";
import {
  bestProxy,
  bestSoFar,
  COMPARE_DEFAULTS,
  compareHtml,
  compareRuns,
  compareSearchInput,
  runCompare,
  summarizeRuns,
  trialsToTarget,
} from "../search/compare.ts";
import { type RunScore, spreadArchitectures, validateProxy } from "../search/validate_proxy.ts";
import { createSearchSpace, type SearchSpaceConfigInput } from "../search/space.ts";
import { baseNetwork } from "../search/diffnas.ts";
import { openDataset } from "../models/data.ts";
import { assertEquals, cpuDevice, test } from "./util.ts";
import { ok as assert } from "node:assert";

/** A trial with only the fields trials-to-target reads. */
const t = (id: number, status: Trial["status"], proxyFid?: number) =>
  ({ id, status, scores: proxyFid === undefined ? {} : { proxyFid } }) as Trial;

test("trialsToTarget counts trained trials in id order up to the first finished one at or below the target", () => {
  // Listed out of order; the rejected and queued ones cost no training and are not counted.
  const trials = [
    t(4, "done", 9),
    t(1, "done", 12),
    t(2, "rejected"),
    t(3, "pruned"),
    t(5, "done", 10.1),
    t(6, "queued"),
  ];
  assertEquals(trialsToTarget(trials, 10.2), { trials: 3, reached: true, trained: 4 });
  assertEquals(trialsToTarget(trials, 12), { trials: 1, reached: true, trained: 4 });
  // A failed trial counts as trained but never reaches it.
  assertEquals(trialsToTarget([t(1, "failed"), t(2, "done", 5)], 5), {
    trials: 2,
    reached: true,
    trained: 2,
  });
});

test("trialsToTarget: a run that never reaches the target counts as its trained trials + 1", () => {
  assertEquals(trialsToTarget([t(1, "done", 11), t(2, "pruned"), t(3, "done", 10.5)], 10), {
    trials: 4,
    reached: false,
    trained: 3,
  });
  assertEquals(trialsToTarget([], 10), { trials: 1, reached: false, trained: 0 });
  // A run that stopped short of its budget of 6 counts as the budget + 1, not as quicker.
  assertEquals(trialsToTarget([t(1, "done", 11)], 10, 6), { trials: 7, reached: false, trained: 1 });
  assertEquals(trialsToTarget([t(1, "done", 9)], 10, 6), { trials: 1, reached: true, trained: 1 });
});

test("compareRuns: the target is 2% above the best of all runs; mean and sample spread per proposer", () => {
  const run = (proposer: string, seed: number, trials: Trial[]) => ({
    proposer,
    seed,
    dir: `${proposer}-${seed}`,
    stoppedBy: "trials",
    trials,
  });
  const c = compareRuns([
    run("evolutionary", 0, [t(1, "done", 20), t(2, "done", 10)]), // best 10 → target 10.2; reached at 2
    run("random", 0, [t(1, "done", 20), t(2, "done", 15), t(3, "done", 13)]), // never: 3 + 1
    run("evolutionary", 1, [t(1, "done", 10.2)]), // at the target exactly: 1
    run("random", 1, [t(1, "failed"), t(2, "done", 10.1)]), // 2
  ]);
  assertEquals(c.best, 10);
  assert(Math.abs(c.target! - 10.2) < 1e-12);
  assertEquals(c.runs.map((r) => [r.toTarget.trials, r.toTarget.reached]), [
    [2, true],
    [4, false],
    [1, true],
    [
      2,
      true,
    ],
  ]);
  assertEquals(c.summary.map((s) => s.proposer), ["evolutionary", "random"]);
  const [evo, rnd] = c.summary;
  assertEquals([evo.mean, evo.min, evo.max, evo.notReached], [1.5, 1, 2, 0]);
  assert(Math.abs(evo.std - Math.SQRT1_2) < 1e-12, `std ${evo.std}`);
  assertEquals([rnd.mean, rnd.notReached], [3, 1]);
  assert(Math.abs(rnd.std - Math.SQRT2) < 1e-12);
  // One run per proposer: no spread; no finished trial anywhere: no target, nobody reaches it.
  assertEquals(
    summarizeRuns([{ proposer: "x", toTarget: { trials: 3, reached: true, trained: 3 } }])[0].std,
    0,
  );
  const none = compareRuns([run("random", 0, [t(1, "failed")])]);
  assertEquals([none.best, none.target, none.runs[0].toTarget.reached], [null, null, false]);
  assertEquals(bestProxy([t(1, "pruned", 1), t(2, "done", 3)]), 3, "only finished trials count");
  assertEquals(c.runs[1].bestSoFar, [20, 15, 13]);
  assertEquals(c.runs[3].bestSoFar, [null, 10.1], "a failed first trial has no best yet");
  assertEquals(bestSoFar([t(2, "done", 5), t(1, "pruned", 1), t(3, "rejected", 0), t(4, "done", 7)]), [
    null,
    5,
    5,
  ]);
  // The page: self-contained, the chart, every run and the escaped folder names.
  const html = compareHtml({
    complete: true,
    seeds: 2,
    trials: 3,
    proxyName: "RFID-128",
    best: c.best,
    target: c.target,
    tolerance: 0.02,
    runs: c.runs.map((r) => ({ ...r, dir: `<out>/${r.proposer}-seed${r.seed}` })),
    summary: c.summary,
    seconds: 90,
  });
  assert(!/<(script|link|iframe|object|embed)\b/i.test(html), "no script or embedded document");
  assertEquals((html.match(/<svg/g) ?? []).length, 1);
  assert(html.includes("&#60;out&#62;/random-seed1") && !html.includes("<out>"), "folders escaped");
  assert(
    html.includes("random seed 1") && html.includes("target (best + 2%)"),
    "legend names runs and target",
  );
});

/** Tiny settings shared by the end-to-end runs. */
const TINY_SPACE: SearchSpaceConfigInput = {
  minChannels: 4,
  maxChannels: 16,
  channelStep: 4,
  maxLevels: 2,
  maxMult: 2,
  maxBlocks: 1,
  heads: [1],
};
const TINY = {
  data: { kind: "procedural", resolution: 8, length: 256 },
  space: TINY_SPACE,
  training: { kimg: 0.016, batch: 4, logEvery: 2 },
  refN: 64,
  proxyN: 8,
  proxySteps: 2,
  lossN: 16,
  backend: "cpu",
} as const;

test("spreadArchitectures: distinct, sorted by MACs, the default network among them, the same for a seed", async () => {
  const dataset = await openDataset(TINY.data);
  const space = createSearchSpace(TINY.space, baseNetwork(dataset));
  const a = spreadArchitectures(space, 5, 7);
  assertEquals(a.length, 5);
  assertEquals(new Set(a.map((p) => JSON.stringify(p.arch))).size, 5);
  for (let i = 1; i < a.length; i++) assert(a[i - 1].macs <= a[i].macs);
  assertEquals(a.filter((p) => p.baseline).length, 1);
  assertEquals(spreadArchitectures(space, 5, 7), a);
  // A ceiling below the default network leaves it out; an impossible request names the flag.
  const small = spreadArchitectures(space, 3, 7, { maxMacs: a.find((p) => p.baseline)!.macs - 1 });
  assertEquals(small.filter((p) => p.baseline).length, 0);
  let error = "";
  try {
    // One channel count, level, block and option each: only attention at 8×8 on or off remains to vary.
    const narrow = createSearchSpace({
      ...TINY_SPACE,
      maxChannels: 4,
      maxLevels: 1,
      maxMult: 1,
      dropout: [0, 0],
      embedding: ["positional"],
      resampleProj: [false],
      adaptiveScale: [false],
    }, baseNetwork(dataset));
    spreadArchitectures(narrow, 5, 0);
  } catch (e) {
    error = (e as Error).message;
  }
  assert(/--architectures 5: the space .* gave only 3 /.test(error), error);
});

const rhoOk = (c: { rho: number | null; reason?: string }) =>
  c.rho === null ? typeof c.reason === "string" && c.reason.length > 0 : c.rho >= -1 && c.rho <= 1;

test("validateProxy end to end (tiny): writes the JSON and table, ρ with and without inheritance", async () => {
  const dir = await Deno.makeTempDir({ prefix: "validate-proxy-" });
  try {
    const phases: string[] = [];
    const r = await validateProxy({ ...TINY, out: `${dir}/out` }, { architectures: 3, fullN: 16 }, {
      device: await cpuDevice(),
      cacheDir: `${dir}/cache`,
      onEvent: (e) => {
        if (e.type === "run-end") phases.push(`${e.index}:${e.phase}`);
      },
    });
    // The first architecture has no earlier one to inherit from: its inherit run is its short run.
    assertEquals(phases, [
      "0:short",
      "0:long",
      "1:short",
      "1:long",
      "1:inherit",
      "2:short",
      "2:long",
      "2:inherit",
    ]);
    const json = JSON.parse(await Deno.readTextFile(`${dir}/out/validate-proxy.json`));
    assertEquals(json.complete, true);
    assertEquals(json.rows.length, 3);
    assertEquals([json.settings.shortKimg, json.settings.longKimg, json.settings.full.n], [0.016, 0.064, 16]);
    for (const row of r.report.rows) {
      assertEquals([row.short?.name, row.long?.name, row.inherit?.name], ["RFID-8", "FID-16", "RFID-8"]);
      assert(row.short!.value !== null || row.short!.error, "a score or the reason there is none");
      // The loss proxy of the same network: the mean of its losses at the grid's two noise levels.
      if (row.short!.value !== null) {
        assertEquals([row.short!.lossName, row.short!.lossBySigma!.length], ["loss-16", 2]);
        assertEquals(row.short!.loss, (row.short!.lossBySigma![0] + row.short!.lossBySigma![1]) / 2);
      }
    }
    assertEquals(r.report.rows[0].inherit!.parent, null);
    assert(r.report.rows[2].inherit!.parent !== null && r.report.rows[2].inherit!.parent < 2);
    assert(rhoOk(r.report.shortVsLong), JSON.stringify(r.report.shortVsLong));
    assert(rhoOk(r.report.inheritVsLong!), JSON.stringify(r.report.inheritVsLong));
    const md = await Deno.readTextFile(`${dir}/out/validate-proxy.md`);
    assert(md.includes("Spearman ρ(short RFID-8, long FID-16)"), md);
    assert(md.includes("Spearman ρ(inherited short RFID-8, long FID-16)"), md);
    assert(md.includes("Spearman ρ(short loss-16, long FID-16)"), md);
    assert(rhoOk(r.report.shortLossVsLong), JSON.stringify(r.report.shortLossVsLong));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

test("validateProxy resumes: finished architectures are kept, the rest measured, other settings refused", async () => {
  const dir = await Deno.makeTempDir({ prefix: "validate-proxy-resume-" });
  try {
    const out = `${dir}/out`, device = await cpuDevice();
    const opts = (phases: string[]) => ({
      device,
      cacheDir: `${dir}/cache`,
      onEvent: (e: { type: string; index?: number; phase?: string; kept?: string }) => {
        if (e.type === "run-end") phases.push(`${e.index}:${e.phase}`);
        if (e.type === "resumed") phases.push(e.kept === "all" ? `${e.index}:kept` : `${e.index}:long kept`);
      },
    });
    const first = await validateProxy({ ...TINY, out }, { architectures: 3, fullN: 16 }, opts([]));
    // As if killed during architecture 3: its row is unfinished in the file.
    const path = `${out}/validate-proxy.json`;
    const json = JSON.parse(await Deno.readTextFile(path));
    delete json.rows[2].long;
    delete json.rows[2].inherit;
    json.complete = false;
    await Deno.writeTextFile(path, JSON.stringify(json));
    const phases: string[] = [];
    const again = await validateProxy({ ...TINY, out }, { architectures: 3, fullN: 16 }, opts(phases));
    // Architecture 3's parent finished before the restart: its weights are retrained from the start of its
    // inherit chain (architecture 1's short run, then each inherit run down to the parent).
    const chain: number[] = [];
    for (
      let j: number | null = again.report.rows[2].inherit!.parent;
      j !== null;
      j = again.report.rows[j].inherit!.parent
    ) {
      chain.unshift(j);
    }
    const rebuilt = chain.map((j) =>
      again.report.rows[j].inherit!.parent === null ? `${j}:short` : `${j}:inherit`
    );
    assertEquals(phases, ["0:kept", "1:kept", "2:short", "2:long", ...rebuilt, "2:inherit"]);
    assertEquals(again.report.complete, true);
    assertEquals(again.report.rows.slice(0, 2), first.report.rows.slice(0, 2));
    // Seeded training on one device: the rebuilt parent gives the same inherited score as the first time.
    assertEquals(again.report.rows[2].inherit!.value, first.report.rows[2].inherit!.value);
    let error = "";
    try {
      await validateProxy({ ...TINY, out }, { architectures: 3, fullN: 32 }, opts([]));
    } catch (e) {
      error = (e as Error).message;
    }
    assert(error.includes("was measured with full") && error.includes("another --out"), error);

    // A row measured before the loss proxy existed (no loss on its short and inherit runs) keeps its long run
    // and measures the rest again.
    const old = JSON.parse(await Deno.readTextFile(path));
    delete old.rows[1].short.loss;
    delete old.rows[1].inherit.loss;
    await Deno.writeTextFile(path, JSON.stringify(old));
    const phases3: string[] = [];
    const third = await validateProxy({ ...TINY, out }, { architectures: 3, fullN: 16 }, opts(phases3));
    assertEquals(phases3[0], "0:kept");
    assert(
      phases3.includes("1:short") && phases3.includes("1:inherit") && phases3.includes("2:kept"),
      String(phases3),
    );
    assert(!phases3.includes("1:long") && phases3.includes("1:long kept"), String(phases3));
    assertEquals(third.report.rows[1].long, again.report.rows[1].long);
    // Seeded: the remeasured short run gives the same scores (its timings differ).
    const scores = (r: RunScore | undefined) => [r?.value, r?.loss, r?.lossBySigma];
    assertEquals(scores(third.report.rows[1].short), scores(again.report.rows[1].short));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

test("compareSearchInput: the comparison's sizes unless given, field by field", () => {
  const d = COMPARE_DEFAULTS;
  assertEquals(compareSearchInput({}), {
    trials: d.trials,
    maxMacs: d.maxMacs,
    gridImages: d.gridImages,
    training: { kimg: d.kimg },
  });
  const given = compareSearchInput({ trials: 10, maxMacs: 60e6, training: { batch: 16 }, seed: undefined });
  assertEquals([given.trials, given.maxMacs, given.gridImages], [10, 60e6, d.gridImages]);
  assertEquals(given.training, { kimg: d.kimg, batch: 16 }, "a training object keeps the default kimg");
  assertEquals(compareSearchInput({ training: { kimg: 6 } }).training, { kimg: 6 });
  assertEquals(compareSearchInput({ training: "fast" }).training, "fast", "left for the schema to name");
});

test("runCompare end to end (tiny): a search folder per proposer and seed, compare.json, resumable", async () => {
  const dir = await Deno.makeTempDir({ prefix: "compare-" });
  const cwd = Deno.cwd();
  // The search caches reference statistics under the working directory's .cache/fid.
  Deno.chdir(dir);
  try {
    const device = await cpuDevice();
    const input = { ...TINY, out: `${dir}/out`, trials: 2, pruning: { enabled: false } };
    const r = await runCompare(input, { seeds: 2 }, { device });
    assertEquals(r.interrupted, false);
    const json = JSON.parse(await Deno.readTextFile(`${dir}/out/compare.json`));
    assertEquals(json.complete, true);
    assertEquals(
      json.runs.map((x: { proposer: string; seed: number }) => `${x.proposer}-${x.seed}`),
      ["evolutionary-0", "random-0", "evolutionary-1", "random-1"],
    );
    for (const name of ["evolutionary-seed0", "random-seed0", "evolutionary-seed1", "random-seed1"]) {
      await Deno.stat(`${dir}/out/${name}/memory.sqlite`);
    }
    for (const run of r.report.runs) {
      assertEquals(run.toTarget.trained, 2);
      assert(run.toTarget.trials >= 1 && run.toTarget.trials <= 3);
    }
    assertEquals(r.report.summary.map((s) => [s.proposer, s.runs]), [["evolutionary", 2], ["random", 2]]);
    assert(r.report.runs.some((x) => x.toTarget.reached), "the best run reaches its own best");
    assert((await Deno.readTextFile(`${dir}/out/compare.md`)).includes("trials-to-target"));
    assert((await Deno.readTextFile(`${dir}/out/compare.html`)).includes("<svg"));
    // Run again: every folder is resumed as it is, nothing retrained, the same report.
    const again = await runCompare(input, { seeds: 2 }, { device });
    assertEquals(again.report.runs, r.report.runs);
  } finally {
    Deno.chdir(cwd);
    await Deno.remove(dir, { recursive: true });
  }
});
