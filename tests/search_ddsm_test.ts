/**
 * @file Tests of DDSM's step-aware width search (search/ga.ts, search/ddsm.ts): the GA operators (length and
 * gene range kept, elitism, no duplicates), the MACs of a schedule against hand-computed values, the fitness
 * cache (a resumed GA computes nothing it has), and tiny searches end to end: in-process, resumed, with a
 * `--supernet` checkpoint, and through the command line killed with SIGKILL and resumed.
 *
 * The searches are tiny: 8×8 procedural images, a supernet trained on 16 images (or a micro checkpoint),
 * population 4, 2 generations, RFID-8 with 4 Heun steps, the CPU reference kernels.
 */

import fc from "fast-check";
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { DatabaseSync } from "node:sqlite";
import {
  crossover,
  type GaSettings,
  type Genome,
  genomeKey,
  type Individual,
  initialGenomes,
  mutate,
  offspring,
  runGa,
  survive,
  uniformGenomes,
} from "../search/ga.ts";
import {
  averageMacs,
  datasetSlice,
  ddsmSeedGenomes,
  doneWhen,
  GA_PROPOSER,
  heunEvaluations,
  macsPerWidth,
  nearestUniform,
  profileGenome,
  runDdsmSearch,
  SUPERNET_FILE,
  switchGenomes,
  switchSeedGenomes,
} from "../search/ddsm.ts";
import { SqliteStorage } from "../search/sqlite_storage.ts";
import { DdsmSettingsSchema, type SearchConfigInput } from "../search/config.ts";
import type { Trial } from "../search/types.ts";
import { unetCost } from "../models/cost.ts";
import { parseUNetSpec } from "../models/unet.ts";
import { openDataset } from "../models/data.ts";
import { train } from "../models/train.ts";
import { DDSM_WIDTHS } from "../models/slimmable.ts";
import { Rng } from "../util/random.ts";
import { MICRO_TRAINING, MICRO_UNET, tempDir } from "./util.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const CACHE = await tempDir("ddsm-cache-");

// ---------------------------------------------------------------------------------------------------------------
// GA operators.

const genomeArb = (length: number, choices: number) =>
  fc.array(fc.integer({ min: 0, max: choices - 1 }), { minLength: length, maxLength: length });
const inRange = (g: Genome, length: number, choices: number) =>
  g.length === length && g.every((v) => Number.isInteger(v) && v >= 0 && v < choices);

Deno.test("ddsm ga: crossover and mutation keep the genome length and the gene range", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 30 }),
      fc.integer({ min: 1, max: 6 }),
      fc.integer({ min: 0, max: 0xffffffff }),
      fc.double({ min: 0, max: 1, noNaN: true }),
      (length, choices, seed, rate) => {
        const rng = new Rng(seed);
        const a = Array.from({ length }, () => rng.int(choices));
        const b = Array.from({ length }, () => rng.int(choices));
        const [c, d] = crossover(a, b, rng);
        assert(inRange(c, length, choices) && inRange(d, length, choices));
        // Single point: every gene of a child comes from the same position of a parent, the cut swaps tails.
        for (let i = 0; i < length; i++) {
          assert((c[i] === a[i] && d[i] === b[i]) || (c[i] === b[i] && d[i] === a[i]));
        }
        const m = mutate(a, rate, choices, rng);
        assert(inRange(m, length, choices));
      },
    ),
  );
});

Deno.test("ddsm ga: mutation rate 0 changes nothing, rate 1 redraws genes; crossover cuts once", () => {
  fc.assert(fc.property(genomeArb(12, 4), fc.integer({ min: 0, max: 1e6 }), (g, seed) => {
    assertEquals(mutate(g, 0, 4, new Rng(seed)), g);
  }));
  const rng = new Rng(7);
  const a = new Array(8).fill(0), b = new Array(8).fill(1);
  for (let t = 0; t < 50; t++) {
    const [c] = crossover(a, b, rng);
    const k = c.indexOf(1);
    assert(k >= 1 && k <= 7 && c.slice(k).every((v) => v === 1) && c.slice(0, k).every((v) => v === 0));
  }
  // Rate 1 over many genes draws every value.
  assertEquals(new Set(mutate(new Array(200).fill(0), 1, 4, new Rng(3))).size, 4);
});

Deno.test("ddsm ga: survival keeps the best, removes duplicates and returns the population size", () => {
  const ind = (g: Genome, fitness: number): Individual => ({ genome: g, key: genomeKey(g), fitness });
  fc.assert(
    fc.property(
      fc.array(fc.tuple(genomeArb(3, 3), fc.double({ min: -10, max: 10, noNaN: true })), { minLength: 1 }),
      fc.integer({ min: 1, max: 10 }),
      (pairs, size) => {
        // The same genome keeps one fitness (a cache would give the same value).
        const first = new Map<string, number>();
        const union = pairs.map(([g, f]) =>
          ind(g, first.get(genomeKey(g)) ?? (first.set(genomeKey(g), f), f))
        );
        const kept = survive(union, size);
        const keys = kept.map((i) => i.key);
        assertEquals(new Set(keys).size, keys.length);
        assertEquals(kept.length, Math.min(size, first.size));
        assertEquals(kept[0].fitness, Math.min(...union.map((i) => i.fitness)));
        for (let i = 1; i < kept.length; i++) assert(kept[i - 1].fitness <= kept[i].fitness);
        // Everything left out is no better than the worst kept.
        const worst = kept[kept.length - 1].fitness;
        for (const u of union) if (!keys.includes(u.key)) assert(u.fitness >= worst);
      },
    ),
  );
});

Deno.test("ddsm ga: the initial population holds the uniform genomes; offspring are new and distinct", () => {
  const s: GaSettings = { length: 6, choices: 4, population: 8, generations: 3, mutationRate: 0.2, seed: 1 };
  const init = initialGenomes(s);
  assertEquals(init.length, 8);
  for (const u of uniformGenomes(6, 4)) assert(init.some((g) => genomeKey(g) === genomeKey(u)));
  assertEquals(new Set(init.map(genomeKey)).size, 8);
  const pop = init.map((g, i) => ({ genome: g, key: genomeKey(g), fitness: i }));
  const kids = offspring(pop, s, 1);
  assertEquals(kids.length, 8);
  const keys = kids.map(genomeKey);
  assertEquals(new Set(keys).size, keys.length);
  for (const k of keys) assert(!pop.some((p) => p.key === k), `child ${k} is a member of the population`);
  for (const k of kids) assert(inRange(k, 6, 4));
  // Reproducible from (seed, generation).
  assertEquals(offspring(pop, s, 1), kids);
});

Deno.test("ddsm ga: seed genomes follow the uniform ones in the initial population, deduplicated", () => {
  const s: GaSettings = {
    length: 4,
    choices: 4,
    population: 7,
    generations: 1,
    mutationRate: 0.1,
    seed: 3,
    seeds: [[3, 3, 0, 0], [0, 0, 0, 0], [3, 3, 0, 0], [1, 2, 3, 0]],
  };
  const init = initialGenomes(s);
  // The uniform genomes, the two new seeds (a uniform one and a repeat dropped), then one random genome.
  assertEquals(init.slice(0, 6), [...uniformGenomes(4, 4), [3, 3, 0, 0], [1, 2, 3, 0]]);
  assertEquals(init.length, 7);
  assertEquals(new Set(init.map(genomeKey)).size, 7);
  // A population too small for the seeds keeps the uniform genomes first.
  assertEquals(initialGenomes({ ...s, population: 5 }), [...uniformGenomes(4, 4), [3, 3, 0, 0]]);
  let threw = false;
  try {
    initialGenomes({ ...s, seeds: [[0, 4, 0, 0]] });
  } catch {
    threw = true;
  }
  assert(threw, "a seed gene out of range");
});

/** A fitness with a known optimum: distance of the genome from a target. */
const target = [3, 3, 2, 1, 0, 0];
const synthetic = (g: Genome) => g.reduce((a, v, i) => a + Math.abs(v - target[i]), 0);

Deno.test("ddsm ga: elitism: the best fitness never gets worse across generations", async () => {
  const s: GaSettings = { length: 6, choices: 4, population: 6, generations: 8, mutationRate: 0.2, seed: 5 };
  const r = await runGa(s, (g) => Promise.resolve(synthetic(g)));
  assertEquals(r.history.length, 9);
  for (let i = 1; i < r.history.length; i++) assert(r.history[i].best <= r.history[i - 1].best);
  assertEquals(r.best.fitness, Math.min(...r.history.map((h) => h.best)));
  assert(r.best.fitness < r.history[0].best, "the GA improved on the initial population");
});

Deno.test("ddsm ga: fitness cache: a GA killed mid-generation and run again computes nothing it has", async () => {
  const s: GaSettings = { length: 6, choices: 4, population: 5, generations: 4, mutationRate: 0.2, seed: 9 };
  // The unbroken run.
  const full: string[] = [];
  const unbroken = await runGa(s, (g, k) => (full.push(k), Promise.resolve(synthetic(g))));
  // A run killed after 11 evaluations, its evaluations kept in a cache (the search memory's role).
  const cache = new Map<string, number>();
  const computed: string[] = [];
  const cached = (limit: number) => (g: Genome, k: string) => {
    const hit = cache.get(k);
    if (hit !== undefined) return Promise.resolve(hit);
    if (computed.length >= limit) throw new Error("killed");
    computed.push(k);
    cache.set(k, synthetic(g));
    return Promise.resolve(cache.get(k)!);
  };
  await runGa(s, cached(11)).then(
    () => assert(false, "not killed"),
    (e) => assertEquals(e.message, "killed"),
  );
  assertEquals(computed.length, 11);
  const resumed = await runGa(s, cached(Infinity));
  // Every genome computed once; the resumed run is the unbroken one.
  assertEquals(new Set(computed).size, computed.length);
  assertEquals(computed, full);
  assertEquals(resumed.history, unbroken.history);
  assertEquals(resumed.best.key, unbroken.best.key);
});

Deno.test("ddsm ga: the time budget drops the unfinished generation; a resumed run completes it", async () => {
  const s: GaSettings = { length: 5, choices: 4, population: 4, generations: 3, mutationRate: 0.3, seed: 2 };
  const unbroken = await runGa(s, (g) => Promise.resolve(synthetic(g)));
  const cache = new Map<string, number>();
  let calls = 0;
  const evaluate = (g: Genome, k: string) => {
    calls++;
    if (!cache.has(k)) cache.set(k, synthetic(g));
    return Promise.resolve(cache.get(k)!);
  };
  // Out of time after 6 genomes: the initial population (4) is whole, generation 1 is dropped after 2.
  const cut = await runGa(s, evaluate, { shouldStop: () => calls >= 6 });
  assertEquals(cut.complete, false);
  assertEquals(cut.history.length, 1);
  assertEquals(cache.size, 6);
  const resumed = await runGa(s, evaluate);
  assertEquals(resumed.complete, true);
  assertEquals(resumed.history, unbroken.history);
});

// ---------------------------------------------------------------------------------------------------------------
// MACs of a schedule.

Deno.test("ddsm macs: average MACs per Heun evaluation, against hand-computed values", () => {
  assertEquals(heunEvaluations(4), [2, 2, 2, 1]);
  assertEquals(heunEvaluations(18).reduce((a, b) => a + b), 35);
  const macsAt = [100, 60, 30, 10];
  // Steps 0..2 take two evaluations, the last one: (2·100 + 2·60 + 2·30 + 1·10) / 7.
  assertEquals(averageMacs([0, 1, 2, 3], macsAt), 390 / 7);
  assertEquals(averageMacs([3, 3, 3, 0], macsAt), (6 * 10 + 100) / 7);
  assertEquals(averageMacs([2, 2], macsAt), 30);
  // On a real spec: the uniform schedules cost what one forward at their width costs.
  const spec = parseUNetSpec(MICRO_UNET);
  const per = macsPerWidth(spec, DDSM_WIDTHS);
  assertEquals(per, DDSM_WIDTHS.map((w) => unetCost(spec, w).macs));
  for (let j = 0; j < per.length; j++) assertEquals(averageMacs(new Array(5).fill(j), per), per[j]);
  // Non-increasing with the width (the micro net's 8 channels round to 8 at widths 1 and 0.75, and at 0.5 and
  // 0.25: the slimmable rounding to multiples of 8), width 1 above 0.25.
  assert(per[0] >= per[1] && per[1] >= per[2] && per[2] >= per[3] && per[0] > per[3]);
  // Switch at step 2 of 3 steps, width 1 then 0.25: (2·M1 + 2·M1 + 1·M0.25) / 5.
  assertEquals(averageMacs([0, 0, 3], per), (4 * per[0] + per[3]) / 5);
});

Deno.test("ddsm profile genome: per step the cheapest width within (1 + δ) of width 1's loss", () => {
  const profile = {
    widths: [1, 0.75, 0.5, 0.25],
    sigmas: [80, 5, 0.5, 0.01],
    // loss[w][i]
    loss: [
      [1.0, 0.5, 0.2, 1.0],
      [1.03, 0.52, 0.21, 1.0],
      [1.2, 0.6, 0.4, 1.02],
      [1.1, 0.54, 0.4, 1.01],
    ],
    images: 8,
  };
  const macsAt = [100, 60, 30, 10];
  assertEquals(profileGenome(profile, macsAt, 0), [0, 0, 0, 1]);
  assertEquals(profileGenome(profile, macsAt, 0.05), [1, 1, 1, 3]);
  assertEquals(profileGenome(profile, macsAt, 0.1), [3, 3, 1, 3]);
  assertEquals(profileGenome(profile, macsAt, 1), [3, 3, 3, 3]);
});

Deno.test("ddsm switch seeds: per saving and width, the fewest noisy narrow steps that save it", () => {
  // 4 steps (2, 2, 2, 1 evaluations): width j for k steps saves 2k(100 − m_j)/700 of width 1's MACs, so
  // 0.75 (60) saves 11%, 23%, 34%; 0.5 (30) 20%, 40%, 60%; 0.25 (10) 26%, 51%, 77%.
  const macsAt = [100, 60, 30, 10];
  assertEquals(switchSeedGenomes(4, macsAt, [0.3]), [[1, 1, 1, 0], [2, 2, 0, 0], [3, 3, 0, 0]]);
  // Exactly 40% counts as 40%; 0.75 cannot save it.
  assertEquals(switchSeedGenomes(4, macsAt, [0.4]), [[2, 2, 0, 0], [3, 3, 0, 0]]);
  // Repeats (0.5 for three steps serves 50% and 55%) are kept once.
  assertEquals(switchSeedGenomes(4, macsAt, [0.5, 0.55]), [[2, 2, 2, 0], [3, 3, 0, 0], [3, 3, 3, 0]]);
  assertEquals(switchSeedGenomes(4, macsAt, [0.9]), []);
  assertEquals(switchSeedGenomes(4, macsAt, []), []);
  fc.assert(
    fc.property(fc.array(fc.double({ min: 0.01, max: 0.99, noNaN: true }), { maxLength: 4 }), (savings) => {
      const all = new Set(switchGenomes(4, 4).map(genomeKey));
      for (const g of switchSeedGenomes(4, macsAt, savings)) {
        assert(inRange(g, 4, 4) && all.has(genomeKey(g)) && g[3] === 0 && g[0] > 0);
        assert(savings.some((s) => 1 - averageMacs(g, macsAt) / macsAt[0] >= s - 1e-9));
      }
    }),
  );
});

Deno.test("ddsm seeds: the default initial population holds the 40% and 55% switch schedules", () => {
  // MACs per forward of the default network (16×16 shapes) at widths 1, 0.75, 0.5, 0.25.
  const macsAt = [18994400, 13263248, 4876320, 2361040];
  const profile = { widths: [1, 0.75, 0.5, 0.25], sigmas: new Array(18).fill(1), loss: [], images: 0 };
  const d = DdsmSettingsSchema.parse({});
  const ga = (seeds: Genome[]): GaSettings => ({
    length: 18,
    choices: 4,
    population: d.population,
    generations: d.generations,
    mutationRate: d.mutationRate,
    seed: 0,
    seeds,
  });
  const switchAt = (j: number, k: number) => Array.from({ length: 18 }, (_, i) => i < k ? j : 0);
  const init = initialGenomes(ga(ddsmSeedGenomes(d, profile, macsAt)));
  // The uniform genomes, then 0.5 for 10 steps (42.5%), 0.25 for 8 (40.0%), 0.5 for 13 (55.2%), 0.25 for 11
  // (55.0%): the population of 8 holds all four, no random genome.
  assertEquals(init, [
    ...uniformGenomes(18, 4),
    switchAt(2, 10),
    switchAt(3, 8),
    switchAt(2, 13),
    switchAt(3, 11),
  ]);
  for (const g of init) assert(inRange(g, 18, 4));
  assert(Math.abs(1 - averageMacs(switchAt(3, 8), macsAt) / macsAt[0] - 0.4003) < 1e-4);
  // Both lists empty: the official start, uniform and random genomes only.
  const official = initialGenomes(
    ga(ddsmSeedGenomes({ ...d, switchSeeds: [], profileSeeds: [] }, profile, macsAt)),
  );
  assertEquals(official.slice(0, 4), uniformGenomes(18, 4));
  assertEquals(official.length, d.population);
  assertEquals(official.slice(4), initialGenomes(ga([])).slice(4));
  // Profile seeds follow the switch seeds.
  const withProfile = ddsmSeedGenomes(
    { switchSeeds: [0.4], profileSeeds: [0] },
    { ...profile, loss: [1, 2, 3, 4].map(() => new Array(18).fill(1)) },
    macsAt,
  );
  assertEquals(withProfile, [switchAt(2, 10), switchAt(3, 8), new Array(18).fill(3)]);
});

Deno.test("ddsm verdict: the nearest uniform schedule below width 1 and the done-when test", () => {
  // The default network's MACs per width (M): 18.99, 13.26, 4.88, 2.36.
  const macsAt = [18.99, 13.26, 4.88, 2.36];
  assertEquals(nearestUniform(11, macsAt), 1);
  assertEquals(nearestUniform(8, macsAt), 2);
  assertEquals(nearestUniform(3, macsAt), 3);
  // Width 1 is never the competitor, even for a schedule that costs as much.
  assertEquals(nearestUniform(18.99, macsAt), 1);
  const row = (label: string, saving: number, fid: number | null) => ({
    label,
    widths: [],
    macs: 0,
    saving,
    proxyFid: 0,
    fid,
    fidName: fid === null ? null : "FID-2048",
    fitness: 0,
  });
  const full = row("uniform 1", 0, 20);
  const v = doneWhen(row("GA best", 0.45, 20.9), full, row("uniform 0.75", 0.3, 22));
  assertEquals(v.met, true);
  assert(Math.abs(v.fidRatio! - 1.045) < 1e-12);
  assertEquals(v.nearestUniform, "uniform 0.75");
  // Each target fails on its own: the saving, the 5% margin, the nearest uniform schedule.
  assertEquals(doneWhen(row("GA best", 0.39, 20), full, row("uniform 0.75", 0.3, 22)).met, false);
  assertEquals(doneWhen(row("GA best", 0.45, 21.1), full, row("uniform 0.75", 0.3, 22)).met, false);
  assertEquals(doneWhen(row("GA best", 0.45, 20.5), full, row("uniform 0.75", 0.3, 20.4)).met, false);
  // Without FID-n there is no verdict.
  assertEquals(doneWhen(row("GA best", 0.45, null), full, row("uniform 0.75", 0.3, null)).met, null);
});

Deno.test("ddsm: switch schedules and data slices", async () => {
  const sw = switchGenomes(4, 4);
  assertEquals(sw.length, 4 * 3 * 3);
  assertEquals(new Set(sw.map(genomeKey)).size, sw.length);
  assert(sw.some((g) => genomeKey(g) === "0-0-3-3"));
  const ds = await openDataset({ kind: "procedural", resolution: 8, length: 10 });
  const tail = datasetSlice(ds, 7, 10);
  assertEquals(tail.length, 3);
  assertEquals(tail.bytes(1), ds.bytes(8));
  let threw = false;
  try {
    tail.get(3);
  } catch {
    threw = true;
  }
  assert(threw, "index past the slice");
});

// ---------------------------------------------------------------------------------------------------------------
// Tiny searches.

/** The settings of a tiny DDSM search in `out`. */
function tiny(out: string, ddsm: Record<string, unknown> = {}): SearchConfigInput {
  return {
    method: "ddsm",
    data: { kind: "procedural", resolution: 8, length: 256 },
    out,
    refN: 64,
    proxyN: 8,
    proxySteps: 4,
    gridImages: 4,
    cacheDir: CACHE,
    training: { logEvery: 2 },
    backend: "cpu",
    ddsm: {
      supernetKimg: 0.016,
      supernetBatch: 4,
      profileN: 8,
      population: 4,
      generations: 2,
      switchCandidates: 2,
      fidN: 16,
      ...ddsm,
    },
  };
}

async function readMemory(dir: string): Promise<Trial[]> {
  const storage = SqliteStorage.inRunFolder(dir);
  try {
    return await storage.listTrials();
  } finally {
    await storage.close();
  }
}

/** Checks a finished tiny search's outputs; returns schedule.json. */
async function checkFinished(
  dir: string,
  trials: readonly Trial[],
  fidName: string | null,
): Promise<Record<string, unknown>> {
  const keys = trials.map((t) => t.key);
  assertEquals(new Set(keys).size, keys.length);
  for (const t of trials) {
    assertEquals(t.status, "done");
    assertEquals(t.scores.proxyName, "RFID-8");
    assert(Number.isFinite(t.scores.proxyFid));
    const widths = (t.spec as { widths: number[] }).widths;
    assertEquals(widths.length, 4);
    for (const w of widths) assert(DDSM_WIDTHS.includes(w));
  }
  // The initial population is the four uniform schedules.
  for (const u of uniformGenomes(4, 4)) {
    assert(trials.some((t) => t.key === genomeKey(u) && t.proposer === GA_PROPOSER));
  }
  const schedule = JSON.parse(await Deno.readTextFile(`${dir}/schedule.json`));
  assertEquals((schedule.widths as number[]).length, 4);
  assertEquals((schedule.sigmas as number[]).length, 4);
  assert(schedule.saving >= 0 && schedule.saving < 1);
  assertEquals(schedule.history.length, 3);
  const rows = schedule.comparison as { label: string; fid: number | null; fidName: string }[];
  assertEquals(rows.map((r) => r.label).filter((l) => l.startsWith("uniform")).length, 4);
  assert(rows.some((r) => r.label.startsWith("best switch")));
  // FID-n of the GA's best, the best switch, width 1 and the nearest uniform schedule (the others have none
  // unless their genome is one of these).
  const verdict = schedule.verdict as { nearestUniform: string; met: boolean | null };
  const measured = ["GA best", "uniform 1", verdict.nearestUniform];
  for (const r of rows) {
    if (measured.includes(r.label) || r.label.startsWith("best switch")) assertEquals(r.fidName, fidName);
  }
  assert(verdict.nearestUniform !== "uniform 1" && verdict.nearestUniform.startsWith("uniform"));
  assertEquals(verdict.met === null, fidName === null);
  const profile = JSON.parse(await Deno.readTextFile(`${dir}/profile.json`));
  assertEquals(profile.loss.length, 4);
  for (const l of profile.loss) assertEquals(l.length, 4);
  const html = await Deno.readTextFile(`${dir}/report.html`);
  for (const s of ["DDSM schedule", "Step-importance profile", "Genetic search"]) assert(html.includes(s), s);
  return schedule;
}

Deno.test({
  name: "ddsm e2e: a tiny search writes the schedule, profile and report; resumed, it computes nothing",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const out = `${await tempDir("ddsm-e2e-")}/run`;
    const r = await runDdsmSearch(tiny(out));
    assertEquals(r.stoppedBy, "trials");
    const trials = await readMemory(out);
    const schedule = await checkFinished(out, trials, "FID-16");
    assertEquals(schedule.widths, r.best.widths);
    assert((await Deno.stat(`${out}/${SUPERNET_FILE}`)).size > 0);
    // Resumed: the supernet is loaded, every genome comes from the memory, the outcome is the same.
    const events: string[] = [];
    const again = await runDdsmSearch(tiny(out), {
      resume: true,
      onEvent: (e) => {
        events.push(e.type);
        if (e.type === "supernet") assert(e.loaded, "the supernet was trained again");
      },
    });
    assert(!events.includes("trial-start"), "a genome was scored again");
    const after = await readMemory(out);
    assertEquals(after.length, trials.length);
    for (const t of after) assertEquals(t.attempts.length, 1);
    assertEquals(again.best, r.best);
    // Another search takes this one's supernet.safetensors: nothing is trained, the same genomes score the same.
    const other = `${await tempDir("ddsm-e2e-file-")}/run`;
    const loaded: string[] = [];
    await runDdsmSearch(
      tiny(other, {
        supernet: `${out}/${SUPERNET_FILE}`,
        generations: 0,
        fidN: 0,
        population: 5,
        switchSeeds: [0.4],
      }),
      { onEvent: (e) => e.type === "supernet" && e.loaded && loaded.push(e.loaded) },
    );
    assertEquals(loaded, [`${out}/${SUPERNET_FILE}`]);
    const reused = await readMemory(other);
    // Its initial population: the uniform genomes and the first switch seed (MACs read off the uniform trials).
    const macsAt = uniformGenomes(4, 4).map((u) => reused.find((t) => t.key === genomeKey(u))!.costs.macs!);
    const seeds = switchSeedGenomes(4, macsAt, [0.4]);
    assert(seeds.length > 0, "no switch seed saves 40% on this network");
    const gaKeys = reused.filter((t) => t.proposer === GA_PROPOSER).map((t) => t.key).sort();
    assertEquals(gaKeys, [...uniformGenomes(4, 4), seeds[0]].map(genomeKey).sort());
    for (const t of reused) {
      const same = after.find((u) => u.key === t.key);
      if (same) assertEquals(t.scores.proxyFid, same.scores.proxyFid);
    }
    assert(reused.some((t) => after.some((u) => u.key === t.key)), "no genome in common");
    // A new search in the folder needs --resume.
    await runDdsmSearch(tiny(out)).then(
      () => assert(false, "accepted"),
      (e) => assert(/--resume/.test(e.message), e.message),
    );
  },
});

Deno.test({
  name: "ddsm e2e: --supernet takes a trained checkpoint instead of training one",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const run = `${await tempDir("ddsm-supernet-")}/train`;
    await train({
      ...MICRO_TRAINING,
      sandwich: true,
      kimg: 0.016,
      checkpointKimg: 0,
      out: run,
      backend: "cpu",
    });
    const out = `${await tempDir("ddsm-e2e-ck-")}/run`;
    const loaded: string[] = [];
    const r = await runDdsmSearch(
      { ...tiny(out, { supernet: run, generations: 1, switchCandidates: 1, fidN: 0 }) },
      { onEvent: (e) => e.type === "supernet" && e.loaded && loaded.push(e.loaded) },
    );
    assert(loaded.length === 1 && loaded[0].startsWith(`${run}/checkpoints/`), JSON.stringify(loaded));
    let trained = true;
    await Deno.stat(`${out}/${SUPERNET_FILE}`).catch(() => trained = false);
    assert(!trained, "a supernet was trained although --supernet was given");
    const trials = await readMemory(out);
    const uniform1 = trials.find((t) => t.key === "0-0-0-0")!;
    // MACs of the micro network, not of the default one.
    assertEquals(uniform1.costs.macs, unetCost(parseUNetSpec(MICRO_UNET), 1).macs);
    assertEquals(r.best.widths.length, 4);
  },
});

/** Trials of a live search's memory (read-only; none while it is being created). */
function peek(dir: string): { status: string }[] {
  let db: DatabaseSync;
  try {
    db = new DatabaseSync(`${dir}/memory.sqlite`, { readOnly: true });
  } catch {
    return [];
  }
  try {
    return db.prepare("SELECT status FROM trials ORDER BY id").all().map((r) => ({
      status: String(r.status),
    }));
  } catch {
    return [];
  } finally {
    db.close();
  }
}

Deno.test({
  name: "ddsm e2e: the command line killed with SIGKILL mid-GA resumes without rescoring and ends like an " +
    "unbroken search",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const base = await tempDir("ddsm-kill-");
    const out = `${base}/run`;
    const config = `${base}/search.json`;
    const settings = tiny(out, { fidN: 0 });
    await Deno.writeTextFile(config, JSON.stringify(settings));
    Deno.mkdirSync("/tmp/xdg", { recursive: true });
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", `${ROOT}cli.ts`, "search", "--config", config],
      cwd: ROOT,
      env: { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp/xdg", NO_COLOR: "1" },
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const stderr = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
    let errText = "";
    (async () => {
      for (;;) {
        const { value, done } = await stderr.read();
        if (done) break;
        errText += value;
      }
    })();
    let exited = false;
    child.status.then(() => exited = true);
    const t0 = Date.now();
    // Past the initial population, in the first generation.
    while (peek(out).filter((t) => t.status === "done").length < 5) {
      if (exited) throw new Error(`the search ended before it was killed: ${errText}`);
      if (Date.now() - t0 > 300_000) throw new Error("timed out waiting for 5 scored genomes");
      await new Promise((r) => setTimeout(r, 50));
    }
    child.kill("SIGKILL");
    assertEquals((await child.status).signal, "SIGKILL");
    const before = await readMemory(out);
    const doneBefore = before.filter((t) => t.status === "done");

    const resumed = await runDdsmSearch(settings, { resume: true });
    const after = await readMemory(out);
    // Finished genomes were not scored again (one attempt, same score); the interrupted one was rerun.
    for (const t of doneBefore) {
      const a = after.find((x) => x.id === t.id)!;
      assertEquals(a.attempts.length, 1);
      assertEquals(a.scores, t.scores);
    }
    await checkFinished(out, after, null);

    // The unbroken search with the same settings scores the same genomes and finds the same schedule.
    const out2 = `${base}/unbroken`;
    const unbroken = await runDdsmSearch({ ...settings, out: out2 });
    const keys = (ts: Trial[]) => ts.map((t) => t.key).sort();
    assertEquals(keys(after), keys(await readMemory(out2)));
    assertEquals(resumed.best, unbroken.best);
  },
});
