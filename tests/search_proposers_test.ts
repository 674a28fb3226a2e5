/**
 * @file The random and evolutionary proposers: proposals are architectures of the space, deterministic per
 * seed, never a key the memory already holds (nor twice in one batch); the evolutionary proposer samples at
 * random until it has `minParents` done trials (by default one: it mutates the baseline at once), then breeds
 * from the best: with a memory in which one region of the space scores well, its children concentrate there,
 * and each child's parent is one of the best trials, the one closest to it.
 */

import { EvolutionaryProposer, mutate } from "../search/proposers/evolutionary.ts";
import { RandomProposer } from "../search/proposers/random.ts";
import {
  type Architecture,
  ARCHITECTURE_FIELDS,
  architectureKey,
  createSearchSpace,
  distance,
  parseArchitecture,
  sampleArchitecture,
  type SearchSpace,
} from "../search/space.ts";
import type { Proposal, Trial } from "../search/types.ts";
import { Rng } from "../util/random.ts";
import { assertEquals, assertThrows, fakeTrial, test } from "./util.ts";

function assert(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Error(what);
}

/** A stored trial of `arch` (done with `fid`, or another status). */
function trialOf(
  id: number,
  arch: Architecture,
  fid: number | null,
  status: Trial["status"] = "done",
): Trial {
  return fakeTrial(id, {
    key: architectureKey(arch),
    spec: arch,
    status,
    scores: fid === null ? {} : { proxyFid: fid },
    error: status === "rejected" ? "too big" : null,
  });
}

/** `n` random trials of the space, scored by `score`. */
function memory(space: SearchSpace, n: number, seed: number, score: (a: Architecture) => number): Trial[] {
  const rng = new Rng(seed), seen = new Set<string>(), out: Trial[] = [];
  while (out.length < n) {
    const a = sampleArchitecture(space, rng);
    if (seen.has(architectureKey(a))) continue;
    seen.add(architectureKey(a));
    out.push(trialOf(out.length + 1, a, score(a)));
  }
  return out;
}

const archs = (ps: Proposal[]) => ps.map((p) => p.spec as Architecture);

function assertValidAndNew(space: SearchSpace, ps: Proposal[], trials: readonly Trial[]): void {
  const keys = new Set(trials.map((t) => t.key));
  for (const a of archs(ps)) {
    const r = parseArchitecture(a, space);
    assert(r.ok, `proposal refused: ${!r.ok && r.reason}`);
    assertEquals(r.value, a, "proposals are canonical");
    const k = architectureKey(a);
    assert(!keys.has(k), `duplicate key ${k}`);
    keys.add(k);
  }
}

test("random proposer: valid, new, deterministic per seed", async () => {
  const space = createSearchSpace();
  const trials = memory(space, 20, 1, () => 50);
  const p = new RandomProposer(space);
  assertEquals(p.name, "random", "name");
  const a = await p.propose({ trials, count: 30, seed: 11 });
  assertEquals(a.length, 30, "count");
  assertValidAndNew(space, a, trials);
  assertEquals(a, await p.propose({ trials, count: 30, seed: 11 }), "same seed");
  assert(
    JSON.stringify(a) !== JSON.stringify(await p.propose({ trials, count: 30, seed: 12 })),
    "other seed",
  );
  assert(a.every((x) => x.parentId === null), "no parents");
});

test("proposers: in a tiny space they return only what the memory lacks", async () => {
  // Three architectures in all: 8, 16 or 24 base channels, everything else fixed.
  const space = createSearchSpace({
    minChannels: 8,
    maxChannels: 24,
    maxLevels: 1,
    maxMult: 1,
    maxBlocks: 1,
    heads: [1],
    dropout: [0, 0],
    maxAttnResolution: 1,
    embedding: ["positional"],
    resampleProj: [false],
    adaptiveScale: [false],
  });
  const base = { channelMult: [1], numBlocks: 1, attnResolutions: [], numHeads: 1, dropout: 0 };
  const fixed = { embedding: "positional" as const, resampleProj: false, adaptiveScale: false };
  const trials = [8, 16].map((c, i) => trialOf(i + 1, { ...base, ...fixed, modelChannels: c }, 10 + i));
  for (const p of [new RandomProposer(space), new EvolutionaryProposer(space, { topK: 2 })]) {
    const got = archs(await p.propose({ trials, count: 3, seed: 4 }));
    assertEquals(got.map((a) => a.modelChannels), [24], `${p.name}: the one left`);
    const none = await p.propose({
      trials: [...trials, trialOf(3, got[0], null, "rejected")],
      count: 2,
      seed: 4,
    });
    assertEquals(none, [], `${p.name}: nothing left`);
  }
});

test("evolutionary proposer: random samples until minParents trials are done", async () => {
  const space = createSearchSpace();
  const trials = memory(space, 4, 2, () => 20);
  trials.push(
    ...memory(space, 3, 3, () => 0).map((t, i) => ({ ...t, id: 5 + i, status: "failed" as const })),
  );
  const evo = new EvolutionaryProposer(space, { topK: 5, minParents: 5 });
  const got = await evo.propose({ trials, count: 6, seed: 9 });
  assertEquals(
    got,
    await new RandomProposer(space).propose({ trials, count: 6, seed: 9 }),
    "random fallback",
  );
  // One more done trial and it breeds: every child names a parent.
  const five = [...trials, trialOf(8, sampleArchitecture(space, new Rng(77)), 15)];
  for (const p of await evo.propose({ trials: five, count: 6, seed: 9 })) {
    assert(p.parentId !== null, "a bred child has a parent");
  }
  assertThrows(() => new EvolutionaryProposer(space, { topK: 3, minParents: 4 }), "minParents");
});

test("evolutionary proposer: by default the first children are mutations of the one done trial", async () => {
  const space = createSearchSpace();
  const [baseline] = memory(space, 1, 5, () => 30);
  const queued = memory(space, 3, 6, () => 0).map((t, i) => ({ ...t, id: 2 + i, status: "queued" as const }));
  const trials = [baseline, ...queued];
  const ps = await new EvolutionaryProposer(space).propose({ trials, count: 8, seed: 3 });
  assertEquals(ps.length, 8, "count");
  assertValidAndNew(space, ps, trials);
  for (const p of ps) {
    assertEquals(p.parentId, baseline.id, "the parent is the baseline");
    const child = p.spec as Architecture, parent = baseline.spec as Architecture;
    // One or two fields mutated (and the attention a removed level took with it); no crossover with one parent.
    const changed = ARCHITECTURE_FIELDS.filter((f) => JSON.stringify(child[f]) !== JSON.stringify(parent[f]));
    assert(changed.length >= 1 && changed.length <= 3, `changed ${changed.join(", ")}`);
  }
});

test("evolutionary proposer: children concentrate where the memory scores well, parents are the closest best", async () => {
  const space = createSearchSpace();
  // Good region: 48 base channels (1/8 of the space); everything else scores badly.
  const score = (a: Architecture) => (a.modelChannels === 48 ? 10 + a.numBlocks : 100 + a.numBlocks);
  const trials = memory(space, 60, 5, score);
  const good = trials.filter((t) => (t.spec as Architecture).modelChannels === 48);
  assert(good.length >= 5, `the memory has ${good.length} good trials`);
  const evo = new EvolutionaryProposer(space, { topK: 5 });
  const ps = await evo.propose({ trials, count: 60, seed: 21 });
  assertEquals(ps.length, 60, "count");
  assertValidAndNew(space, ps, trials);
  assertEquals(ps, await evo.propose({ trials, count: 60, seed: 21 }), "deterministic per seed");
  const inRegion = archs(ps).filter((a) => a.modelChannels === 48).length;
  assert(inRegion >= 40, `${inRegion} of 60 children in the good region (random: about 8)`);
  const top = [...good].sort((a, b) => a.scores.proxyFid! - b.scores.proxyFid! || a.id - b.id).slice(0, 5);
  const topIds = new Set(top.map((t) => t.id));
  for (const p of ps) assert(topIds.has(p.parentId!), `parent ${p.parentId} is one of the 5 best`);
  // Without crossover a child has one parent and differs from it in one or two fields (and the attention a
  // removed level took with it).
  const mutOnly = new EvolutionaryProposer(space, { topK: 5, crossoverRate: 0 });
  for (const p of await mutOnly.propose({ trials, count: 30, seed: 22 })) {
    const child = p.spec as Architecture, parent = trials[p.parentId! - 1].spec as Architecture;
    const changed = ARCHITECTURE_FIELDS.filter((f) => JSON.stringify(child[f]) !== JSON.stringify(parent[f]));
    assert(changed.length >= 1 && changed.length <= 3, `changed ${changed.join(", ")}`);
    assert(distance(child, parent) > 0, "a child is new");
  }
  // With crossover from a pool of two, the parent named is the nearer of the two.
  const pair = top.slice(0, 2);
  const crossOnly = new EvolutionaryProposer(space, { topK: 2, crossoverRate: 1 });
  let second = 0;
  for (const p of await crossOnly.propose({ trials, count: 30, seed: 23 })) {
    const child = p.spec as Architecture;
    const [d0, d1] = pair.map((t) => distance(child, t.spec as Architecture));
    assertEquals(p.parentId, d1 < d0 ? pair[1].id : pair[0].id, "the nearer parent");
    if (p.parentId === pair[1].id) second++;
  }
  assert(second > 0 && second < 30, `the second-best parent was nearer ${second} times of 30`);
});

test("evolutionary proposer: mutation stays in the space and changes the fields asked for", () => {
  const space = createSearchSpace({ maxLevels: 3 });
  const rng = new Rng(8);
  for (let i = 0; i < 300; i++) {
    const a = sampleArchitecture(space, rng), fields = 1 + (i % 2);
    const m = mutate(a, space, rng, fields);
    const r = parseArchitecture(m, space);
    assert(r.ok, `mutant refused: ${!r.ok && r.reason}`);
    const changed = ARCHITECTURE_FIELDS.filter((f) => JSON.stringify(a[f]) !== JSON.stringify(m[f]));
    // A removed level can take an attention resolution with it: one field more.
    const extra = changed.includes("channelMult") && changed.includes("attnResolutions") ? 1 : 0;
    assert(changed.length >= 1 && changed.length - extra <= fields, `${fields} asked, changed ${changed}`);
  }
});
