/**
 * @file The final stage of a DiffNAS search (`deno task search --final`, search/final.ts): which trials it
 * retrains (the top by proxy score and the default network once), the relative FID difference, and a tiny end to
 * end run on a tiny search (8×8 procedural images, CPU backend, 32 training images per retraining, FID-16) that
 * checks final.json's rows, that a second run retrains nothing, that a larger `top` adds only the new row, that
 * other settings are refused, and that the report gets the section. Plus the command line's clear refusals.
 */

import { ok as assert } from "node:assert";
import { runSearch } from "../search/diffnas.ts";
import { type FinalEvent, runFinal, selectFinal } from "../search/final.ts";
import { compareToBaseline, type FinalRow } from "../search/final_report.ts";
import { rankTrials } from "../search/report.ts";
import type { Architecture } from "../search/space.ts";
import { SqliteStorage } from "../search/sqlite_storage.ts";
import { assertEquals, assertRejects, cpuDevice, fakeTrial, tempDir, test } from "./util.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const CACHE = await tempDir("search-final-cache-");

/** An architecture that differs from the others by its channels. */
const arch = (c: number): Architecture => ({
  modelChannels: c,
  channelMult: [1, 2],
  numBlocks: 1,
  attnResolutions: [],
  numHeads: 1,
  dropout: 0,
  embedding: "positional",
  resampleProj: true,
  adaptiveScale: false,
});

test("selectFinal: the top trials by proxy score, then the default network once", () => {
  const trials = [
    fakeTrial(1, { proposer: "baseline", key: "base", spec: arch(16), scores: { proxyFid: 30 } }),
    fakeTrial(2, { spec: arch(8), scores: { proxyFid: 20 } }),
    fakeTrial(3, { spec: arch(24), scores: { proxyFid: 25 } }),
    fakeTrial(4, { spec: arch(32), status: "pruned", scores: {} }),
  ];
  const pick = (top: number) => selectFinal(trials, arch(16), top).map((s) => [s.trial?.id, s.baseline]);
  assertEquals(pick(1), [[2, false], [1, true]]);
  assertEquals(pick(2), [[2, false], [3, false], [1, true]]);
  // The default network among the top is not added twice; `top` past the done trials takes them all.
  assertEquals(pick(3), [[2, false], [3, false], [1, true]]);
  assertEquals(pick(10), [[2, false], [3, false], [1, true]]);
  // A memory without a baseline trial: the default network is retrained from its architecture.
  const none = selectFinal(trials.slice(1), arch(16), 1);
  assertEquals(none.map((s) => [s.trial?.id ?? null, s.baseline, s.arch]), [[2, false, arch(8)], [
    null,
    true,
    arch(16),
  ]]);
});

test("compareToBaseline: the best non-default FID against the default's, relative", () => {
  const row = (fid: number | null, baseline = false) => ({ fid, baseline }) as FinalRow;
  assertEquals(compareToBaseline([row(12), row(9), row(10, true)]), { best: 1, baseline: 2, relative: -0.1 });
  assertEquals(compareToBaseline([row(null), row(10, true)]), { best: null, baseline: 1, relative: null });
  assertEquals(compareToBaseline([row(5)]), { best: 0, baseline: null, relative: null });
});

/** A tiny finished search in `out` (three trials, no pruning). */
async function tinySearch(out: string) {
  await runSearch({
    data: { kind: "procedural", resolution: 8, length: 256 },
    out,
    trials: 3,
    refN: 64,
    proxyN: 8,
    proxySteps: 2,
    gridImages: 4,
    cacheDir: CACHE,
    training: { kimg: 0.016, batch: 4, logEvery: 2 },
    pruning: { enabled: false },
    space: { maxChannels: 16, maxBlocks: 1 },
    backend: "cpu",
  }, { device: await cpuDevice() });
}

test("runFinal end to end (tiny): rows, resume without retraining, a larger top, other settings refused", async () => {
  const out = `${await tempDir("search-final-")}/run`;
  await tinySearch(out);
  const storage = SqliteStorage.inRunFolder(out);
  const trials = await storage.listTrials();
  await storage.close();
  const device = await cpuDevice();
  const run = (settings: Record<string, unknown>) => {
    const events: FinalEvent["type"][] = [];
    const r = runFinal(out, settings, { device, onEvent: (e) => events.push(e.type) });
    return r.then((outcome) => ({ outcome, events }));
  };

  const first = await run({ top: 1, kimg: 0.032, fidN: 16 });
  const rows = first.outcome.report.rows;
  const ranked = rankTrials(trials);
  const baselineId = trials.find((t) => t.proposer === "baseline")!.id;
  // The search's best first, the default network once (last unless it is the best).
  assertEquals(rows[0].trialId, ranked[0].id);
  assertEquals(rows.filter((r) => r.baseline).map((r) => r.trialId), [baselineId]);
  assertEquals(rows.length, ranked[0].id === baselineId ? 1 : 2);
  for (const r of rows) {
    assert(r.fid !== null && Number.isFinite(r.fid) && r.fid >= 0, `${r.summary}: ${r.fid} ${r.error}`);
    assertEquals(r.fidName, "FID-16");
    assert(r.macs > 0 && r.params > 0 && r.trainSeconds > 0, JSON.stringify(r));
    assertEquals(r.proxy, trials.find((t) => t.id === r.trialId)!.scores.proxyFid);
    assert((await Deno.stat(`${out}/${r.weights}`)).size > 0, r.weights!);
    assert((await Deno.stat(`${out}/${r.grid}`)).size > 0, r.grid!);
  }
  assertEquals(first.events.filter((e) => e === "row-end").length, rows.length);
  const json = JSON.parse(await Deno.readTextFile(`${out}/final.json`));
  assertEquals([json.complete, json.settings.kimg, json.settings.schedule.lrRampupKimg], [
    true,
    0.032,
    0.5 * 0.032 / 12,
  ]);
  assert((await Deno.readTextFile(`${out}/final.md`)).includes("| FID-16 (0.032 kimg) |"));
  assert(first.outcome.summary.includes("default network"), first.outcome.summary);
  // The report shows the section with the table and the grids.
  const report = JSON.parse(await Deno.readTextFile(`${out}/report.json`));
  const section = report.sections.find((s: { title: string }) => s.title === "Full training of the best");
  assert(section, JSON.stringify(report.sections.map((s: { title: string }) => s.title)));
  assertEquals(section.table.rows.length, rows.length);
  assertEquals(section.grids.map((g: { path: string }) => g.path), rows.map((r) => r.grid));
  assert((await Deno.readTextFile(`${out}/report.html`)).includes("<h2>Full training of the best</h2>"));

  // The same command again: nothing is retrained, the rows are the same.
  const again = await run({ top: 1, kimg: 0.032, fidN: 16 });
  assertEquals(again.events.filter((e) => e === "row-start").length, 0);
  assertEquals(again.events.filter((e) => e === "kept").length, rows.length);
  assertEquals(again.outcome.report.rows, rows);

  // A larger top keeps the finished rows and trains only the new one.
  const more = await run({ top: 2, kimg: 0.032, fidN: 16 });
  const added = more.outcome.report.rows.length - rows.length;
  assertEquals(more.events.filter((e) => e === "row-start").length, added);
  assertEquals(more.outcome.report.rows[0], rows[0]);

  // Other settings are refused, naming the one that differs; the file is left as it was.
  const before = await Deno.readTextFile(`${out}/final.json`);
  await assertRejects(() => runFinal(out, { top: 1, kimg: 0.032, fidN: 32 }, { device }), "fidN", "16", "32");
  await assertRejects(() => runFinal(out, { top: 1, kimg: 0.064, fidN: 16 }, { device }), "kimg");
  assertEquals(await Deno.readTextFile(`${out}/final.json`), before);
});

test("runFinal refuses a folder without a memory and a search without done trials", async () => {
  const dir = await tempDir("search-final-empty-"), device = await cpuDevice();
  await assertRejects(() => runFinal(dir, {}, { device }), "holds no search memory");
  // A memory whose only trial is still queued.
  const storage = SqliteStorage.inRunFolder(dir);
  await storage.setMeta({ version: 1, config: { backend: "cpu" }, createdAt: new Date().toISOString() });
  await storage.addTrial({ key: "k", spec: {}, proposer: "baseline", seed: 0 });
  await storage.close();
  await assertRejects(() => runFinal(dir, {}, { device }), "no done trial");
  await assertRejects(() => runFinal(dir, { top: 0 }), "top");
});

test("search --final on the command line: no memory, and search settings given with it, are refused", async () => {
  const dir = await tempDir("search-final-cli-");
  const cli = async (args: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", `${ROOT}cli.ts`, "search", ...args],
      cwd: ROOT,
      env: { NO_COLOR: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const dec = new TextDecoder();
    return { code: out.code, text: dec.decode(out.stdout) + dec.decode(out.stderr) };
  };
  const none = await cli(["--final", "--out", dir]);
  assertEquals(none.code, 2, none.text);
  assert(none.text.includes("holds no search memory"), none.text);
  const kimg = await cli(["--final", "--out", dir, "--kimg", "3"]);
  assertEquals(kimg.code, 2, kimg.text);
  assert(kimg.text.includes("drop --kimg"), kimg.text);
  const top = await cli(["--final-top", "2", "--out", dir]);
  assertEquals(top.code, 2, top.text);
  assert(top.text.includes("--final-top needs --final"), top.text);
});
