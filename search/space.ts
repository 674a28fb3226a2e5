/**
 * @file The DiffNAS search space: which UNets a proposer may suggest, how a suggestion is checked, named and
 * turned into a network, and what it may cost.
 *
 * A point of the space is an **architecture**: the UNetSpec fields the search varies (base channels, per-level
 * channel multipliers, blocks per level, attention resolutions, heads, dropout, the noise embedding and two
 * block options). Everything else (resolution, image channels, labels, norms, initialisation) comes from a
 * **base** UNetSpec, the dataset's network (by default models/train.ts `DEFAULT_NETWORK`). A
 * `SearchSpaceConfig` bounds each field; `createSearchSpace` turns it and the base into a `SearchSpace`, whose
 * zod schema checks a proposal field by field (an LLM's reply is untrusted data) and whose JSON Schema
 * (`describeSpace`) goes into the prompt and the response format.
 *
 * Decisions:
 *
 * - An attention resolution that is not a level resolution of the proposed network is **rejected** (with the
 *   field named), like the UNet itself does, not silently dropped: the proposer learns from the reason, and a
 *   dropped field would make the trained network differ from what was proposed. `canonicalArchitecture` then
 *   only sorts attention resolutions from high to low (level order) and removes duplicates.
 * - Dropout is rounded to 0.01 (`DROPOUT_STEP`); the space's dropout bounds are multiples of it, so rounding
 *   never leaves the range. 0.1 and 0.1000001 are one architecture.
 * - `architectureKey` is the canonical architecture as JSON with sorted keys: the same network always has the
 *   same key, and the storage's UNIQUE key is what keeps it from being trained twice.
 * - Base channels are multiples of `channelStep`, a multiple of 4, and heads are 1, 2 or 4, so every level's
 *   channels split into the heads and the noise embedding is even and at least 4 wide: every sampled
 *   architecture builds. `toUNetSpec` still runs the UNet's own checks and returns its message for anything it
 *   refuses (a base that cannot take an option, for one).
 */

import { z } from "zod";
import { parseUNetSpec, type UNetSpec, UNetSpecSchema } from "../models/unet.ts";
import { DEFAULT_NETWORK } from "../models/train.ts";
import { formatCount, unetCost } from "../models/cost.ts";
import { parseUsage, zodMessage } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import type { Rng } from "../util/random.ts";
import type { SpaceDescription } from "./types.ts";

/** Dropout values are rounded to this step (see the file comment). */
export const DROPOUT_STEP = 0.01;
/** The most resolution levels the space allows. */
export const MAX_LEVELS = 4;
/** The most blocks per level and the largest channel multiplier the space allows. */
export const MAX_BLOCKS = 4;
export const MAX_MULT = 4;

/** Either a value or the reason it was refused (naming the field). */
export type Checked<T> = { ok: true; value: T } | { ok: false; reason: string };

// ---------------------------------------------------------------------------------------------------------------
// Architectures.

/** One point of the search space: the UNetSpec fields the search varies. */
export interface Architecture {
  /** Base channel count. */
  modelChannels: number;
  /** Channel multiplier of each resolution level (its length is the number of levels). */
  channelMult: number[];
  /** Residual blocks per level in the encoder (the decoder has one more). */
  numBlocks: number;
  /** Feature-map resolutions whose blocks have self-attention (level resolutions only). */
  attnResolutions: number[];
  /** Attention heads (of every attention block, including the middle one). */
  numHeads: number;
  /** Dropout probability before each block's second convolution. */
  dropout: number;
  /** Noise embedding: sinusoidal positional or random Fourier features. */
  embedding: "positional" | "fourier";
  /** 1×1 convolution on the skip path of resampling blocks (DDPM++) instead of the bare resample. */
  resampleProj: boolean;
  /** Adaptive GroupNorm scale and shift from the embedding (ADM) instead of adding it. */
  adaptiveScale: boolean;
}

/** The fields of an architecture, in their canonical order. */
export const ARCHITECTURE_FIELDS = [
  "modelChannels",
  "channelMult",
  "numBlocks",
  "attnResolutions",
  "numHeads",
  "dropout",
  "embedding",
  "resampleProj",
  "adaptiveScale",
] as const satisfies readonly (keyof Architecture & keyof UNetSpec)[];

// ---------------------------------------------------------------------------------------------------------------
// The space's configuration.

const int = z.number().int();
const dropoutBound = z.number().min(0).lt(1).refine(
  (v) => Math.abs(v / DROPOUT_STEP - Math.round(v / DROPOUT_STEP)) < 1e-9,
  { message: `must be a multiple of ${DROPOUT_STEP}` },
);

/** Bounds of the search space (a search config's `space` field). */
export const SearchSpaceConfigSchema = z.strictObject({
  /** Smallest base channel count. */
  minChannels: int.min(4).default(8),
  /** Largest base channel count. */
  maxChannels: int.min(4).default(64),
  /** Base channel counts are the multiples of this in [minChannels, maxChannels] (a multiple of 4; 8 or 16). */
  channelStep: int.min(4).multipleOf(4).default(8),
  /** Fewest resolution levels (1 = no downsampling). */
  minLevels: int.min(1).max(MAX_LEVELS).default(1),
  /** Most resolution levels (default: as many as the base resolution halves into, at most 4). */
  maxLevels: int.min(1).max(MAX_LEVELS).optional(),
  /** Smallest channel multiplier of a level. */
  minMult: int.min(1).max(MAX_MULT).default(1),
  /** Largest channel multiplier of a level. */
  maxMult: int.min(1).max(MAX_MULT).default(MAX_MULT),
  /** Fewest residual blocks per level. */
  minBlocks: int.min(1).max(MAX_BLOCKS).default(1),
  /** Most residual blocks per level. */
  maxBlocks: int.min(1).max(MAX_BLOCKS).default(MAX_BLOCKS),
  /** Allowed attention head counts. */
  heads: z.array(z.literal([1, 2, 4])).min(1).default([1, 2, 4]),
  /** Dropout range [min, max] (multiples of 0.01). */
  dropout: z.tuple([dropoutBound, dropoutBound]).default([0, 0.2]),
  /** Attention only at resolutions up to this (default: any level resolution). */
  maxAttnResolution: int.min(1).optional(),
  /** Allowed noise embeddings. */
  embedding: z.array(z.enum(["positional", "fourier"])).min(1).default(["positional", "fourier"]),
  /** Allowed values of resampleProj. */
  resampleProj: z.array(z.boolean()).min(1).default([false, true]),
  /** Allowed values of adaptiveScale. */
  adaptiveScale: z.array(z.boolean()).min(1).default([false, true]),
}).superRefine((c, ctx) => {
  const issue = (path: (string | number)[], message: string) =>
    ctx.addIssue({ code: "custom", path, message });
  if (c.minChannels > c.maxChannels) {
    issue(["minChannels"], `${c.minChannels} is above maxChannels ${c.maxChannels}`);
  } else if (Math.floor(c.maxChannels / c.channelStep) * c.channelStep < c.minChannels) {
    issue(["channelStep"], `no multiple of ${c.channelStep} lies in [${c.minChannels}, ${c.maxChannels}]`);
  }
  if (c.maxLevels !== undefined && c.minLevels > c.maxLevels) {
    issue(["minLevels"], `${c.minLevels} is above maxLevels ${c.maxLevels}`);
  }
  if (c.minMult > c.maxMult) issue(["minMult"], `${c.minMult} is above maxMult ${c.maxMult}`);
  if (c.minBlocks > c.maxBlocks) issue(["minBlocks"], `${c.minBlocks} is above maxBlocks ${c.maxBlocks}`);
  if (c.dropout[0] > c.dropout[1]) {
    issue(["dropout"], `minimum ${c.dropout[0]} is above maximum ${c.dropout[1]}`);
  }
});
/** What a user may write (defaults left out). */
export type SearchSpaceConfigInput = z.input<typeof SearchSpaceConfigSchema>;
/** A parsed configuration, every default filled in. */
export type SearchSpaceConfig = z.output<typeof SearchSpaceConfigSchema>;

/** The search space: bounds resolved against a base network, and the schema that checks a proposal. */
export interface SearchSpace {
  /** The base network: everything an architecture does not set. */
  readonly base: UNetSpec;
  /** The parsed bounds (maxLevels resolved). */
  readonly config: SearchSpaceConfig & { maxLevels: number };
  /** Allowed base channel counts, ascending. */
  readonly channelChoices: readonly number[];
  /** Input resolution of each possible level, from the first (the image resolution). */
  readonly levelResolutions: readonly number[];
  /** Resolutions where attention may be (level resolutions up to maxAttnResolution), descending. */
  readonly attnChoices: readonly number[];
  /** Allowed heads, embeddings and options, deduplicated. */
  readonly headChoices: readonly number[];
  readonly embeddingChoices: readonly Architecture["embedding"][];
  readonly resampleProjChoices: readonly boolean[];
  readonly adaptiveScaleChoices: readonly boolean[];
  /** Checks one proposal field by field (bounds included) and the attention levels. */
  readonly schema: z.ZodType<Architecture>;
}

const unique = <T>(xs: readonly T[]): T[] => [...new Set(xs)];

/**
 * The search space of `config` around `base` (default: models/train.ts `DEFAULT_NETWORK`). A bad config or
 * one the base cannot satisfy is a `UsageError` naming the field.
 */
export function createSearchSpace(
  config: SearchSpaceConfigInput = {},
  base: unknown = DEFAULT_NETWORK,
): SearchSpace {
  const c = parseUsage(SearchSpaceConfigSchema, config, "search space");
  const b = parseUsage(UNetSpecSchema, base, "search space: base network");
  // Levels the base resolution halves into (each level halves the previous one).
  let fit = 1;
  while (fit < MAX_LEVELS && b.imgResolution % (1 << fit) === 0) fit++;
  const maxLevels = c.maxLevels ?? fit;
  const bad = (field: string, message: string) => new UsageError(`search space: ${field}: ${message}`);
  if (maxLevels > fit) {
    throw bad(
      "maxLevels",
      `${maxLevels} levels need imgResolution ${b.imgResolution} to halve ${maxLevels - 1} times`,
    );
  }
  if (c.minLevels > maxLevels) throw bad("minLevels", `${c.minLevels} is above maxLevels ${maxLevels}`);
  if (c.resampleProj.includes(true) && !b.resampleInBlock) {
    throw bad("resampleProj", "true needs a base network that resamples inside blocks (resampleInBlock)");
  }
  const levelResolutions = Array.from({ length: maxLevels }, (_, l) => b.imgResolution >> l);
  const attnChoices = levelResolutions.filter((r) => r <= (c.maxAttnResolution ?? Infinity));
  const channelChoices: number[] = [];
  for (
    let ch = Math.ceil(c.minChannels / c.channelStep) * c.channelStep;
    ch <= c.maxChannels;
    ch += c.channelStep
  ) {
    channelChoices.push(ch);
  }
  const space = {
    base: b,
    config: { ...c, maxLevels },
    channelChoices,
    levelResolutions,
    attnChoices,
    headChoices: unique(c.heads).sort((x, y) => x - y),
    embeddingChoices: unique(c.embedding),
    resampleProjChoices: unique(c.resampleProj),
    adaptiveScaleChoices: unique(c.adaptiveScale),
  };
  return { ...space, schema: architectureSchema(space) };
}

/** The zod schema of an architecture within the space's bounds (also the JSON Schema a proposer sees). */
function architectureSchema(s: Omit<SearchSpace, "schema">): z.ZodType<Architecture> {
  const c = s.config;
  const ints = (lo: number, hi: number) => int.min(lo).max(hi);
  const choice = (xs: readonly boolean[]) => (xs.length === 2 ? z.boolean() : z.literal(xs[0]));
  const levels = (a: { channelMult: number[] }) => a.channelMult.map((_, l) => s.base.imgResolution >> l);
  return z.strictObject({
    modelChannels: ints(s.channelChoices[0], s.channelChoices[s.channelChoices.length - 1])
      .multipleOf(c.channelStep),
    channelMult: z.array(ints(c.minMult, c.maxMult)).min(c.minLevels).max(c.maxLevels),
    numBlocks: ints(c.minBlocks, c.maxBlocks),
    attnResolutions: s.attnChoices.length
      ? z.array(z.literal(s.attnChoices as number[])).max(s.attnChoices.length)
      : z.array(z.never()).max(0),
    numHeads: z.literal(s.headChoices as number[]),
    dropout: z.number().min(c.dropout[0]).max(c.dropout[1]),
    embedding: z.enum(s.embeddingChoices as [Architecture["embedding"], ...Architecture["embedding"][]]),
    resampleProj: choice(s.resampleProjChoices),
    adaptiveScale: choice(s.adaptiveScaleChoices),
  }).superRefine((a, ctx) => {
    const res = levels(a);
    a.attnResolutions.forEach((r, i) => {
      if (!res.includes(r)) {
        ctx.addIssue({
          code: "custom",
          path: ["attnResolutions", i],
          message: `${r} is not a level resolution of this network (${res.join(", ")})`,
        });
      }
    });
  }) as unknown as z.ZodType<Architecture>;
}

// ---------------------------------------------------------------------------------------------------------------
// Checking, naming and building.

const show = (v: unknown) => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
};
const article = (what: string) => (/^[aeiou]/.test(what) ? `an ${what}` : `a ${what}`);

/** Error messages that say what was given and what the space allows (zod's defaults do not say "space"). */
// deno-lint-ignore no-explicit-any
function spaceError(iss: any): string | undefined {
  const has = "input" in iss, many = Array.isArray(iss.input);
  const n = (x: unknown) => Array.isArray(x) ? `${x.length} entries` : show(x);
  const [big, small] = many ? ["are more than", "are fewer than"] : ["is above", "is below"];
  switch (iss.code) {
    case "invalid_type":
      if (!has || iss.input === undefined) return `missing (${article(iss.expected)} is required)`;
      return `${show(iss.input)} is not ${article(iss.expected === "int" ? "integer" : iss.expected)}`;
    case "too_big":
      return `${n(iss.input)} ${iss.inclusive ? big : "is not below"} the space's maximum ${iss.maximum}`;
    case "too_small":
      return `${n(iss.input)} ${iss.inclusive ? small : "is not above"} the space's minimum ${iss.minimum}`;
    case "not_multiple_of":
      return `${show(iss.input)} is not a multiple of ${iss.divisor}`;
    case "invalid_value":
      if (!has || iss.input === undefined) return `missing (one of ${iss.values.map(show).join(", ")})`;
      return `${show(iss.input)} is not one of the space's choices ${iss.values.map(show).join(", ")}`;
    case "unrecognized_keys":
      return `unknown field${iss.keys.length > 1 ? "s" : ""} ${iss.keys.map(show).join(", ")}`;
  }
  return undefined;
}

/**
 * Checks that `x` is an architecture of `space` and returns it in canonical form, or the reason it is not,
 * naming every bad field ("channelMult.2: 5 is above the space's maximum 4").
 */
export function parseArchitecture(x: unknown, space: SearchSpace): Checked<Architecture> {
  const r = space.schema.safeParse(x, { error: spaceError });
  if (!r.success) return { ok: false, reason: zodMessage(r.error, "architecture") };
  return { ok: true, value: canonicalArchitecture(r.data) };
}

/** Rounds dropout to `DROPOUT_STEP` (and turns −0 into 0). */
const roundDropout = (p: number) => Number((Math.round(p / DROPOUT_STEP) * DROPOUT_STEP).toFixed(2)) || 0;

/**
 * The canonical form of a (checked) architecture: fields in a fixed order, attention resolutions sorted from
 * high to low without duplicates, dropout rounded to 0.01. Two architectures that build the same network have
 * the same canonical form.
 */
export function canonicalArchitecture(a: Architecture): Architecture {
  return {
    modelChannels: a.modelChannels,
    channelMult: [...a.channelMult],
    numBlocks: a.numBlocks,
    attnResolutions: unique(a.attnResolutions).sort((x, y) => y - x),
    numHeads: a.numHeads,
    dropout: roundDropout(a.dropout),
    embedding: a.embedding,
    resampleProj: a.resampleProj,
    adaptiveScale: a.adaptiveScale,
  };
}

/** JSON with object keys sorted at every depth: a stable text for equal values. */
export function stableJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableJson).join(",")}]`;
  if (v && typeof v === "object") {
    const o = v as Record<string, unknown>;
    return `{${
      Object.keys(o).sort().filter((k) => o[k] !== undefined).map((k) =>
        `${JSON.stringify(k)}:${stableJson(o[k])}`
      )
        .join(",")
    }}`;
  }
  return JSON.stringify(v);
}

/** The storage key of an architecture: its canonical form as JSON with sorted keys. */
export function architectureKey(a: Architecture): string {
  return stableJson(canonicalArchitecture(a));
}

/**
 * The full UNetSpec of `a` on `base` (the base's fields, the architecture's on top; `channelsPerHead` dropped
 * since the architecture sets `numHeads`), checked by the UNet's own schema; its message when it refuses.
 */
export function toUNetSpec(a: Architecture, base: UNetSpec): Checked<UNetSpec> {
  const { channelsPerHead: _, ...rest } = base;
  try {
    return { ok: true, value: parseUNetSpec({ ...rest, ...canonicalArchitecture(a) }) };
  } catch (e) {
    return { ok: false, reason: (e as Error).message };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Cost ceilings.

/** Cost ceilings of a search (a search config's `budget` field); absent: no ceiling. */
export const BudgetSchema = z.strictObject({
  /** Most MACs per network evaluation, attention included (models/cost.ts `macsWithAttention`). */
  maxMacs: z.number().positive().optional(),
  /** Most trainable parameters. */
  maxParams: z.number().positive().optional(),
});
export type Budget = z.infer<typeof BudgetSchema>;

/** The cost of a spec and whether it fits the budget; the reason names the ceiling and the value. */
export function checkBudget(
  spec: UNetSpec,
  budget: Budget,
): { ok: boolean; reason: string | null; macs: number; params: number } {
  const b = BudgetSchema.parse(budget);
  const cost = unetCost(spec);
  const macs = cost.macsWithAttention, params = cost.parameters;
  const over: string[] = [];
  if (b.maxMacs !== undefined && macs > b.maxMacs) {
    over.push(`MACs ${formatCount(macs)} are above the ceiling maxMacs ${formatCount(b.maxMacs)}`);
  }
  if (b.maxParams !== undefined && params > b.maxParams) {
    over.push(
      `parameters ${formatCount(params)} are above the ceiling maxParams ${formatCount(b.maxParams)}`,
    );
  }
  return { ok: over.length === 0, reason: over.length ? over.join("; ") : null, macs, params };
}

// ---------------------------------------------------------------------------------------------------------------
// Describing, sampling, comparing.

const list = (xs: readonly unknown[]) => xs.map((x) => String(x)).join(", ");

/** The space as a proposer sees it: a plain statement of every field and bound, and the JSON Schema. */
export function describeSpace(space: SearchSpace, budget: Budget = {}): SpaceDescription {
  const c = space.config, b = space.base;
  const ch = space.channelChoices;
  const lines = [
    `UNet denoisers for ${b.imgResolution}x${b.imgResolution} images with ${b.inChannels} channels` +
    (b.labelDim ? ` and ${b.labelDim} classes` : "") +
    `. An architecture is a JSON object with these fields:`,
    `- modelChannels: base channel count, a multiple of ${c.channelStep} from ${ch[0]} to ${
      ch[ch.length - 1]
    }.`,
    `- channelMult: one channel multiplier per resolution level (a level's channels are modelChannels times ` +
    `its multiplier), ${c.minLevels} to ${c.maxLevels} levels, each multiplier from ${c.minMult} to ${c.maxMult}; ` +
    `level resolutions are ${
      list(space.levelResolutions)
    } (each level after the first halves the resolution).`,
    `- numBlocks: residual blocks per level, from ${c.minBlocks} to ${c.maxBlocks} (the decoder has one more).`,
    space.attnChoices.length
      ? `- attnResolutions: resolutions whose blocks get self-attention, each one of ${
        list(space.attnChoices)
      } ` +
        `and a level resolution of this network; may be empty (the middle block at the lowest level always has ` +
        `attention).`
      : `- attnResolutions: must be empty (only the middle block at the lowest level has attention).`,
    `- numHeads: attention heads, one of ${list(space.headChoices)}.`,
    `- dropout: from ${c.dropout[0]} to ${c.dropout[1]} (rounded to ${DROPOUT_STEP}).`,
    `- embedding: noise embedding, one of ${list(space.embeddingChoices)}.`,
    `- resampleProj: 1x1 convolution on the skip path of down/up-sampling blocks, one of ` +
    `${list(space.resampleProjChoices)}.`,
    `- adaptiveScale: GroupNorm scale and shift from the noise embedding, one of ` +
    `${list(space.adaptiveScaleChoices)}.`,
  ];
  const ceilings = [
    budget.maxMacs !== undefined ? `at most ${formatCount(budget.maxMacs)} MACs per evaluation` : "",
    budget.maxParams !== undefined ? `at most ${formatCount(budget.maxParams)} parameters` : "",
  ].filter(Boolean);
  if (ceilings.length) lines.push(`Budget: ${ceilings.join(" and ")} (larger networks are rejected).`);
  const jsonSchema = z.toJSONSchema(space.schema) as Record<string, unknown>;
  return { text: lines.join("\n"), jsonSchema };
}

/** A uniformly random element. */
const pick = <T>(rng: Rng, xs: readonly T[]): T => xs[rng.int(xs.length)];
/** A uniformly random integer in [lo, hi]. */
const between = (rng: Rng, lo: number, hi: number) => lo + rng.int(hi - lo + 1);

/**
 * A random architecture of the space, each field uniform over its choices (levels first, then a multiplier per
 * level; each allowed attention resolution of those levels in or out with probability ½; dropout uniform on its
 * 0.01 grid). Canonical.
 */
export function sampleArchitecture(space: SearchSpace, rng: Rng): Architecture {
  const c = space.config;
  const levels = between(rng, c.minLevels, c.maxLevels);
  const channelMult = Array.from({ length: levels }, () => between(rng, c.minMult, c.maxMult));
  const res = space.levelResolutions.slice(0, levels);
  const lo = Math.round(c.dropout[0] / DROPOUT_STEP), hi = Math.round(c.dropout[1] / DROPOUT_STEP);
  return canonicalArchitecture({
    modelChannels: pick(rng, space.channelChoices),
    channelMult,
    numBlocks: between(rng, c.minBlocks, c.maxBlocks),
    attnResolutions: space.attnChoices.filter((r) => res.includes(r) && rng.next() < 0.5),
    numHeads: pick(rng, space.headChoices),
    dropout: between(rng, lo, hi) * DROPOUT_STEP,
    embedding: pick(rng, space.embeddingChoices),
    resampleProj: pick(rng, space.resampleProjChoices),
    adaptiveScale: pick(rng, space.adaptiveScaleChoices),
  });
}

/**
 * How far apart two architectures are, for picking the closest trained candidate to inherit weights from: a
 * sum of per-field steps. Channels and multipliers count in doublings (|log2 ratio|, per shared level), each
 * extra or missing level 1, each block 1, each attention resolution in one and not the other 1, heads in
 * doublings, dropout per 0.1, and each differing option 1. Symmetric, and 0 only for the same canonical
 * architecture.
 */
export function distance(a: Architecture, b: Architecture): number {
  const x = canonicalArchitecture(a), y = canonicalArchitecture(b);
  const log2 = (p: number, q: number) => Math.abs(Math.log2(p) - Math.log2(q)); // exactly symmetric
  let d = log2(x.modelChannels, y.modelChannels);
  const shared = Math.min(x.channelMult.length, y.channelMult.length);
  for (let l = 0; l < shared; l++) d += log2(x.channelMult[l], y.channelMult[l]);
  d += Math.abs(x.channelMult.length - y.channelMult.length);
  d += Math.abs(x.numBlocks - y.numBlocks);
  const ay = new Set(y.attnResolutions), ax = new Set(x.attnResolutions);
  d += x.attnResolutions.filter((r) => !ay.has(r)).length +
    y.attnResolutions.filter((r) => !ax.has(r)).length;
  d += log2(x.numHeads, y.numHeads);
  d += Math.abs(x.dropout - y.dropout) / 0.1;
  d += Number(x.embedding !== y.embedding) + Number(x.resampleProj !== y.resampleProj) +
    Number(x.adaptiveScale !== y.adaptiveScale);
  return d;
}
