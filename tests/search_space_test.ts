/**
 * @file The DiffNAS search space: the default network is a point of the default space and round-trips to its
 * UNetSpec; every refusal names its field; canonical forms and keys; bad configurations; the budget check
 * against models/cost.ts; the description and its JSON Schema; uniform samples that are all valid and cover the
 * space; the distance between architectures; and that no input, however odd, makes the check throw.
 */

import fc from "fast-check";
import { DEFAULT_NETWORK } from "../models/train.ts";
import { parseUNetSpec } from "../models/unet.ts";
import { unetCost } from "../models/cost.ts";
import {
  type Architecture,
  architectureKey,
  canonicalArchitecture,
  checkBudget,
  createSearchSpace,
  describeSpace,
  distance,
  parseArchitecture,
  sampleArchitecture,
  toUNetSpec,
} from "../search/space.ts";
import { admitProposal } from "../search/diffnas.ts";
import { SearchConfigSchema } from "../search/config.ts";
import { UsageError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";
import { assertEquals, assertThrows, RUNS, test } from "./util.ts";

/** The default network's searched fields. */
const DEFAULT_ARCH: Architecture = {
  modelChannels: 16,
  channelMult: [1, 2],
  numBlocks: 1,
  attnResolutions: [8],
  numHeads: 1,
  dropout: 0,
  embedding: "positional",
  resampleProj: true,
  adaptiveScale: false,
};

function assert(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Error(what);
}

const reasonOf = (x: unknown, space = createSearchSpace()) => {
  const r = parseArchitecture(x, space);
  if (r.ok) throw new Error(`expected ${JSON.stringify(x)} to be refused`);
  return r.reason;
};

test("space: the default network is a point of the default space and round-trips to its UNetSpec", () => {
  const space = createSearchSpace();
  assertEquals(space.channelChoices, [8, 16, 24, 32, 40, 48, 56, 64], "channel choices");
  assertEquals(space.levelResolutions, [16, 8, 4, 2], "level resolutions of the 16×16 base");
  const r = parseArchitecture(DEFAULT_ARCH, space);
  assert(r.ok, `the default architecture is refused: ${!r.ok && r.reason}`);
  const spec = toUNetSpec(r.value, space.base);
  assert(spec.ok, "toUNetSpec");
  assertEquals(spec.value, parseUNetSpec(DEFAULT_NETWORK), "the default network");
});

test("space: a refused architecture names every bad field", () => {
  const bad = {
    ...DEFAULT_ARCH,
    modelChannels: 20,
    channelMult: [1, 2, 5],
    numBlocks: 0,
    numHeads: 3,
    dropout: 0.5,
    embedding: "learned",
    resampleProj: "yes",
  };
  const reason = reasonOf(bad);
  for (
    const part of [
      "channelMult.2: 5 is above the space's maximum 4",
      "modelChannels: 20 is not a multiple of 8",
      "numBlocks: 0 is below the space's minimum 1",
      "numHeads: 3 is not one of the space's choices 1, 2, 4",
      "dropout: 0.5 is above the space's maximum 0.2",
      'embedding: "learned" is not one of the space\'s choices "positional", "fourier"',
      'resampleProj: "yes" is not a boolean',
    ]
  ) assert(reason.includes(part), `"${part}" missing from: ${reason}`);
  assertEquals(
    reasonOf({ ...DEFAULT_ARCH, attnResolutions: [16, 4] }),
    "attnResolutions.1: 4 is not a level resolution of this network (16, 8)",
    "attention off the network's levels is refused, not dropped",
  );
  assertEquals(
    reasonOf({ ...DEFAULT_ARCH, channelMult: [1, 1, 1, 1, 1] }),
    "channelMult: 5 entries are more than the space's maximum 4",
    "too many levels",
  );
  assertEquals(
    reasonOf({ ...DEFAULT_ARCH, extra: 1 }),
    'architecture: unknown field "extra"',
    "unknown field",
  );
  const { numHeads: _, ...noHeads } = DEFAULT_ARCH;
  assertEquals(reasonOf(noHeads), "numHeads: missing (one of 1, 2, 4)", "missing field");
  assertEquals(reasonOf(null), "architecture: null is not an object", "not an object");
  assertEquals(
    reasonOf({ ...DEFAULT_ARCH, modelChannels: 2.5 }).split(";")[0],
    "modelChannels: 2.5 is not an integer",
  );
});

test("space: canonical form and key: order, duplicates and rounding do not make a new architecture", () => {
  const space = createSearchSpace();
  const messy = {
    adaptiveScale: false,
    dropout: 0.1000001,
    attnResolutions: [8, 16, 8],
    channelMult: [1, 2],
    embedding: "positional",
    modelChannels: 16,
    numBlocks: 1,
    numHeads: 1,
    resampleProj: true,
  };
  const r = parseArchitecture(messy, space);
  assert(r.ok, "messy but valid");
  assertEquals(r.value.attnResolutions, [16, 8], "attention sorted high to low, deduplicated");
  assertEquals(r.value.dropout, 0.1, "dropout rounded");
  const clean = { ...DEFAULT_ARCH, attnResolutions: [16, 8], dropout: 0.1 };
  assertEquals(architectureKey(r.value), architectureKey(clean), "same key");
  assertEquals(
    architectureKey(clean),
    '{"adaptiveScale":false,"attnResolutions":[16,8],"channelMult":[1,2],"dropout":0.1,"embedding":"positional",' +
      '"modelChannels":16,"numBlocks":1,"numHeads":1,"resampleProj":true}',
    "key text",
  );
  assert(
    architectureKey(clean) !== architectureKey({ ...clean, numHeads: 2 }),
    "a changed field changes the key",
  );
  assert(
    architectureKey({ ...clean, channelMult: [2, 1] }) !== architectureKey(clean),
    "multiplier order matters",
  );
  assertEquals(canonicalArchitecture({ ...clean, dropout: -0 }).dropout, 0, "−0");
  assertEquals(Object.is(canonicalArchitecture({ ...clean, dropout: -0.001 }).dropout, 0), true, "no −0");
});

test("space: bad configurations are usage errors that name the field", () => {
  const expectUsage = (f: () => unknown, ...parts: string[]) => {
    const e = assertThrows(f, "search space", ...parts);
    assert(e instanceof UsageError, `${e.message} is a UsageError`);
  };
  expectUsage(() => createSearchSpace({ minChannels: 96 }), "minChannels: 96 is above maxChannels 64");
  expectUsage(() => createSearchSpace({ channelStep: 6 }), "channelStep");
  expectUsage(
    () => createSearchSpace({ minChannels: 33, maxChannels: 39, channelStep: 8 }),
    "no multiple of 8",
  );
  expectUsage(() => createSearchSpace({ maxBlocks: 5 }), "maxBlocks");
  expectUsage(() => createSearchSpace({ heads: [3 as 1] }), "heads.0");
  expectUsage(() => createSearchSpace({ dropout: [0.3, 0.1] }), "dropout: minimum 0.3 is above maximum 0.1");
  expectUsage(() => createSearchSpace({ dropout: [0, 0.125] }), "dropout.1", "multiple of 0.01");
  expectUsage(() => createSearchSpace({ extra: 1 } as never), "extra");
  const base12 = { ...DEFAULT_NETWORK, imgResolution: 12, attnResolutions: [6] };
  assertEquals(createSearchSpace({}, base12).levelResolutions, [12, 6, 3], "levels the base allows");
  expectUsage(() => createSearchSpace({ maxLevels: 4 }, base12), "maxLevels: 4 levels need imgResolution 12");
  expectUsage(
    () => createSearchSpace({}, { ...DEFAULT_NETWORK, modelChannels: 0 }),
    "base network",
    "modelChannels",
  );
  // A DDPM-style base (separate learned resampling) has no skip projection to search over.
  const ddpm = { ...DEFAULT_NETWORK, resampleFilter: "conv", resampleInBlock: false, resampleProj: false };
  expectUsage(() => createSearchSpace({}, ddpm), "resampleProj", "resampleInBlock");
  const space = createSearchSpace({ resampleProj: [false] }, ddpm);
  const ok = parseArchitecture({ ...DEFAULT_ARCH, resampleProj: false }, space);
  assert(ok.ok && toUNetSpec(ok.value, space.base).ok, "without the projection it builds");
  assertEquals(
    reasonOf({ ...DEFAULT_ARCH, resampleProj: true }, space),
    "resampleProj: true is not one of the space's choices false",
    "refused by the space",
  );
  // toUNetSpec still refuses what the UNet refuses, with the UNet's message.
  const r = toUNetSpec({ ...DEFAULT_ARCH, resampleProj: true }, space.base);
  assert(
    !r.ok && r.reason.includes("resampleProj: only resampling blocks have a skip projection"),
    "UNet's reason",
  );
});

test("space: the budget check uses models/cost.ts and names the ceiling and the value", () => {
  const spec = parseUNetSpec(DEFAULT_NETWORK), cost = unetCost(spec);
  const free = checkBudget(spec, {});
  assertEquals([free.ok, free.reason, free.macs, free.params], [
    true,
    null,
    cost.macsWithAttention,
    cost.parameters,
  ], "no ceiling");
  assert(
    checkBudget(spec, { maxMacs: cost.macsWithAttention, maxParams: cost.parameters }).ok,
    "at the ceiling",
  );
  const over = checkBudget(spec, { maxMacs: cost.macsWithAttention - 1 });
  assert(!over.ok, "over the MAC ceiling");
  const v = Math.round(cost.macsWithAttention).toLocaleString("en-US");
  assert(
    over.reason!.startsWith(`MACs ${v} (`) && over.reason!.includes("above the ceiling maxMacs"),
    over.reason!,
  );
  const params = checkBudget(spec, { maxParams: 1e5 });
  assert(
    !params.ok &&
      params.reason!.includes("parameters 189,443 (189 k) are above the ceiling maxParams 100,000 (100 k)"),
    params.reason!,
  );
  // Attention counts: at 16×16 it costs more MACs than the same network without it.
  const withAttn = toUNetSpec({ ...DEFAULT_ARCH, attnResolutions: [16, 8] }, spec);
  assert(withAttn.ok && checkBudget(withAttn.value, {}).macs > free.macs, "attention MACs are counted");
  assertThrows(() => checkBudget(spec, { maxMacs: -1 }), "maxMacs");
});

test("space: the description states the bounds and carries the JSON Schema", () => {
  const space = createSearchSpace({ maxChannels: 32, maxLevels: 3, heads: [1, 2], maxAttnResolution: 8 });
  const d = describeSpace(space, { maxMacs: 2e7 });
  for (
    const part of [
      "16x16 images with 3 channels",
      "a multiple of 8 from 8 to 32",
      "1 to 3 levels",
      "level resolutions are 16, 8, 4",
      "each one of 8, 4",
      "one of 1, 2",
      "at most 20,000,000 (20 M) MACs",
    ]
  ) assert(d.text.includes(part), `"${part}" missing from the description:\n${d.text}`);
  const s = d.jsonSchema as {
    properties: Record<string, Record<string, unknown>>;
    required: string[];
    additionalProperties: boolean;
  };
  assertEquals(s.additionalProperties, false, "no other fields");
  assertEquals(s.required.length, 9, "every field required");
  assertEquals(
    [
      s.properties.modelChannels.minimum,
      s.properties.modelChannels.maximum,
      s.properties.modelChannels.multipleOf,
    ],
    [8, 32, 8],
    "modelChannels",
  );
  assertEquals((s.properties.channelMult as { maxItems: number }).maxItems, 3, "levels");
  assertEquals(
    (s.properties.attnResolutions as { items: { enum: number[] } }).items.enum,
    [8, 4],
    "attention",
  );
  assertEquals(s.properties.numHeads.enum, [1, 2], "heads");
  assertEquals(JSON.parse(JSON.stringify(s)), s, "plain JSON");
});

test("space: samples are valid, canonical, deterministic per seed, and cover every choice", () => {
  const space = createSearchSpace();
  const draw = (seed: number, n: number) => {
    const rng = new Rng(seed);
    return Array.from({ length: n }, () => sampleArchitecture(space, rng));
  };
  const xs = draw(5, 400);
  assertEquals(xs.map(architectureKey), draw(5, 400).map(architectureKey), "same seed, same samples");
  assert(architectureKey(draw(6, 1)[0]) !== architectureKey(xs[0]), "another seed, other samples");
  const seen = {
    mc: new Set<number>(),
    levels: new Set<number>(),
    mult: new Set<number>(),
    blocks: new Set<number>(),
    heads: new Set<number>(),
    attn: new Set<number>(),
    emb: new Set<string>(),
    proj: new Set<boolean>(),
    ada: new Set<boolean>(),
  };
  let dropLo = 1, dropHi = 0;
  for (const a of xs) {
    const r = parseArchitecture(a, space);
    assert(r.ok, `sample refused: ${!r.ok && r.reason}`);
    assertEquals(r.value, a, "samples are canonical");
    assert(toUNetSpec(a, space.base).ok, "every sample builds");
    seen.mc.add(a.modelChannels);
    seen.levels.add(a.channelMult.length);
    a.channelMult.forEach((m) => seen.mult.add(m));
    seen.blocks.add(a.numBlocks);
    seen.heads.add(a.numHeads);
    a.attnResolutions.forEach((r) => seen.attn.add(r));
    seen.emb.add(a.embedding);
    seen.proj.add(a.resampleProj);
    seen.ada.add(a.adaptiveScale);
    dropLo = Math.min(dropLo, a.dropout);
    dropHi = Math.max(dropHi, a.dropout);
  }
  assertEquals([...seen.mc].sort((a, b) => a - b), space.channelChoices, "channels");
  assertEquals([seen.levels.size, seen.mult.size, seen.blocks.size, seen.heads.size, seen.attn.size], [
    4,
    4,
    4,
    3,
    4,
  ], "counts");
  assertEquals([seen.emb.size, seen.proj.size, seen.ada.size], [2, 2, 2], "options");
  assert(dropLo === 0 && dropHi === 0.2, `dropout spans [${dropLo}, ${dropHi}]`);
  // Uniform: each of the 8 channel counts about 1/8 of 400 (50 ± 25).
  for (const c of space.channelChoices) {
    const n = xs.filter((a) => a.modelChannels === c).length;
    assert(n > 25 && n < 75, `${n} samples with ${c} channels`);
  }
});

test("space: distance is 0 only for the same architecture, symmetric, and counts steps", () => {
  const a = DEFAULT_ARCH;
  assertEquals(distance(a, { ...a, attnResolutions: [8, 8] }), 0, "same canonical architecture");
  assertEquals(distance(a, { ...a, modelChannels: 32 }), 1, "one doubling of channels");
  assertEquals(distance(a, { ...a, channelMult: [1, 2, 2] }), 1, "one extra level");
  assertEquals(distance(a, { ...a, channelMult: [1, 4] }), 1, "one doubling of a multiplier");
  assertEquals(distance(a, { ...a, attnResolutions: [] }), 1, "one attention resolution");
  assertEquals(distance(a, { ...a, dropout: 0.2, adaptiveScale: true }), 3, "dropout per 0.1 plus an option");
  const rng = new Rng(3), space = createSearchSpace();
  for (let i = 0; i < 50; i++) {
    const x = sampleArchitecture(space, rng), y = sampleArchitecture(space, rng);
    assertEquals(distance(x, y), distance(y, x), "symmetric");
    assert((distance(x, y) === 0) === (architectureKey(x) === architectureKey(y)), "0 iff same key");
  }
});

test("space: no input makes the check throw; accepted inputs are canonical and build", () => {
  const space = createSearchSpace();
  const near = fc.record({
    modelChannels: fc.oneof(fc.integer({ min: -8, max: 80 }), fc.constant(16)),
    channelMult: fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 5 }),
    numBlocks: fc.integer({ min: 0, max: 5 }),
    attnResolutions: fc.array(fc.constantFrom(1, 2, 4, 8, 16, 32), { maxLength: 4 }),
    numHeads: fc.constantFrom(1, 2, 3, 4),
    dropout: fc.double({ min: -0.1, max: 0.3, noNaN: true }),
    embedding: fc.constantFrom("positional", "fourier", "x"),
    resampleProj: fc.boolean(),
    adaptiveScale: fc.boolean(),
  });
  fc.assert(
    fc.property(fc.oneof(fc.anything(), near), (x) => {
      const r = parseArchitecture(x, space);
      if (!r.ok) return r.reason.length > 0;
      return architectureKey(r.value) === architectureKey(canonicalArchitecture(r.value)) &&
        toUNetSpec(r.value, space.base).ok;
    }),
    { numRuns: RUNS * 20 },
  );
});

test("admitProposal: a candidate whose training step cannot fit memoryLimitMiB is rejected, naming the field", () => {
  const wide = { ...DEFAULT_ARCH, modelChannels: 64, channelMult: [4, 4], numBlocks: 4 };
  const space = createSearchSpace({ maxChannels: 64 });
  const cfg = SearchConfigSchema.parse({ maxMacs: 1e15, memoryLimitMiB: 256 });
  const t = admitProposal({ spec: wide }, "test", space, cfg, [], 0);
  assertEquals(t.status, "rejected", "status");
  assert(
    t.error!.startsWith("candidate: this network") && t.error!.includes("at training.batch 32") &&
      t.error!.includes("memoryLimitMiB 256"),
    t.error!,
  );
  // The default network fits the same ceiling and is queued.
  assertEquals(admitProposal({ spec: DEFAULT_ARCH }, "test", space, cfg, [], 1).status, undefined, "queued");
});
