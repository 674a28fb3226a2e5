/**
 * @file The evolutionary proposer, the default when no LLM endpoint is configured: a steady-state genetic
 * search over the architecture space that reads the search memory.
 *
 * Per child:
 *
 * 1. **Selection** (top-k): parents are drawn uniformly from the `topK` best done trials by proxy FID (lower is
 *    better), a second parent distinct from the first. While fewer than `minParents` trials are done there is
 *    no population yet and the child is a uniform random sample instead. The default, 1, breeds from the
 *    baseline (trial 1, the default network) at once: regularized evolution (Real et al. 2019) starts from a
 *    random population of its own size, but a 13-minute search here trains 3–5 candidates, which such a start
 *    would spend entirely on random samples.
 * 2. **Crossover** (with probability `crossoverRate`, when the population has two members): uniform
 *    crossover, each field from one parent or the other with probability ½. `channelMult` is one field (the level count and multipliers go together); an
 *    attention resolution the child's levels lack is dropped. Otherwise the child starts as a copy of one parent.
 * 3. **Mutation**: one or two fields (each case with probability ½), chosen among the fields the space lets
 *    vary, each moved within the space: base channels one step up or down, one level's multiplier ±1 or a
 *    level added or removed at the bottom, blocks ±1, one attention resolution toggled, another head count,
 *    dropout, embedding or option.
 * 4. **Novelty**: a child whose key is already in the memory (or in this batch) is discarded and the steps
 *    repeat, at most `maxTries` times; after that the batch comes back shorter.
 *
 * The child's `parentId` is the parent closest to it (space.ts `distance`): the best source of weights for
 * inheritance. All draws come from one `Rng(ctx.seed)` over the memory in a fixed order, so a call is
 * deterministic given its seed and memory.
 */

import { z } from "zod";
import { parseConfig } from "../../util/config.ts";
import { Rng } from "../../util/random.ts";
import { bestTrials } from "../memory.ts";
import {
  type Architecture,
  ARCHITECTURE_FIELDS,
  architectureKey,
  canonicalArchitecture,
  distance,
  DROPOUT_STEP,
  parseArchitecture,
  type SearchSpace,
} from "../space.ts";
import type { Proposal, ProposalContext, Proposer, Trial } from "../types.ts";
import { freshSample } from "./random.ts";

/** Settings of the evolutionary proposer. */
export const EvolutionaryOptionsSchema = z.strictObject({
  /** Parents come from the k best done trials. */
  topK: z.number().int().min(2).default(5),
  /** Done trials needed before children are bred; with fewer, the proposals are random samples. */
  minParents: z.number().int().min(1).default(1),
  /** Probability that a child is a crossover of two parents rather than a copy of one (before mutation). */
  crossoverRate: z.number().min(0).max(1).default(0.5),
  /** Tries per child to find an architecture not yet in the memory. */
  maxTries: z.number().int().min(1).default(50),
}).refine((o) => o.minParents <= o.topK, {
  message: "minParents must not exceed topK (the population never grows past topK)",
  path: ["minParents"],
});
export type EvolutionaryOptions = z.input<typeof EvolutionaryOptionsSchema>;

/** A done trial whose spec is an architecture of this space. */
interface Member {
  trial: Trial;
  arch: Architecture;
}

/** Top-k selection, uniform crossover and one- or two-field mutation (see the file comment). */
export class EvolutionaryProposer implements Proposer {
  readonly name = "evolutionary";
  readonly options: z.output<typeof EvolutionaryOptionsSchema>;

  constructor(readonly space: SearchSpace, options: EvolutionaryOptions = {}) {
    this.options = parseConfig(EvolutionaryOptionsSchema, options, "EvolutionaryProposer");
  }

  propose(ctx: ProposalContext): Promise<Proposal[]> {
    const { topK, minParents, crossoverRate, maxTries } = this.options;
    const rng = new Rng(ctx.seed), seen = new Set(ctx.trials.map((t) => t.key));
    // The population: the best done trials whose spec still fits the space (a resumed run may have changed it).
    const pool: Member[] = [];
    for (const trial of bestTrials(ctx.trials)) {
      const r = parseArchitecture(trial.spec, this.space);
      if (r.ok) pool.push({ trial, arch: r.value });
      if (pool.length === topK) break;
    }
    const out: Proposal[] = [];
    for (let i = 0; i < ctx.count; i++) {
      if (pool.length < minParents) {
        const a = freshSample(this.space, rng, seen, maxTries);
        if (a) out.push({ spec: a, parentId: null });
        continue;
      }
      for (let tries = 0; tries < maxTries; tries++) {
        const p1 = pool[rng.int(pool.length)];
        let p2: Member | null = null;
        let child: Architecture;
        if (pool.length > 1 && rng.next() < crossoverRate) {
          p2 = pool[(pool.indexOf(p1) + 1 + rng.int(pool.length - 1)) % pool.length];
          child = crossover(p1.arch, p2.arch, rng);
        } else child = p1.arch;
        child = mutate(child, this.space, rng, rng.next() < 0.5 ? 1 : 2); // also drops attention off its levels
        const key = architectureKey(child);
        if (seen.has(key) || !parseArchitecture(child, this.space).ok) continue;
        seen.add(key);
        // Parents best first, so that a tie in distance goes to the better one.
        const parents = p2 ? [p1, p2].sort((x, y) => pool.indexOf(x) - pool.indexOf(y)) : [p1];
        out.push({ spec: child, parentId: closest(child, parents).trial.id });
        break;
      }
    }
    return Promise.resolve(out);
  }
}

/** The member closest to `a` (ties: the earlier in the list). */
function closest(a: Architecture, members: Member[]): Member {
  let best = members[0], bestD = distance(a, best.arch);
  for (const m of members.slice(1)) {
    const d = distance(a, m.arch);
    if (d < bestD) [best, bestD] = [m, d];
  }
  return best;
}

/** Attention resolutions of `a` that are level resolutions of its own levels. */
function fitAttention(a: Architecture, space: SearchSpace): Architecture {
  const res = space.levelResolutions.slice(0, a.channelMult.length);
  return { ...a, attnResolutions: a.attnResolutions.filter((r) => res.includes(r)) };
}

/** Uniform crossover: every field from `a` or `b` with probability ½. */
export function crossover(a: Architecture, b: Architecture, rng: Rng): Architecture {
  const child: Record<string, unknown> = {};
  for (const k of ARCHITECTURE_FIELDS) child[k] = rng.next() < 0.5 ? a[k] : b[k];
  return child as unknown as Architecture;
}

/** Something else from `xs` than `x` (uniform over the others). */
const other = <T>(rng: Rng, xs: readonly T[], x: T): T => {
  const rest = xs.filter((v) => v !== x);
  return rest[rng.int(rest.length)];
};

type Field = keyof Architecture;

/** The mutations the space allows for `a`, one per field, as functions giving the changed architecture. */
function mutations(a: Architecture, space: SearchSpace, rng: Rng): Map<Field, () => Architecture> {
  const c = space.config, ops = new Map<Field, () => Architecture>();
  const ch = space.channelChoices, i = ch.indexOf(a.modelChannels);
  if (ch.length > 1) {
    ops.set("modelChannels", () => {
      const j = i <= 0 ? 1 : i >= ch.length - 1 ? ch.length - 2 : i + (rng.next() < 0.5 ? -1 : 1);
      return { ...a, modelChannels: ch[j] };
    });
  }
  // channelMult: one level's multiplier ±1, or a level added or removed at the bottom.
  const multOps: (() => Architecture)[] = [];
  if (c.maxMult > c.minMult) {
    multOps.push(() => {
      const l = rng.int(a.channelMult.length), m = a.channelMult[l];
      const step = m <= c.minMult ? 1 : m >= c.maxMult ? -1 : rng.next() < 0.5 ? -1 : 1;
      return { ...a, channelMult: a.channelMult.map((v, k) => (k === l ? v + step : v)) };
    });
  }
  if (a.channelMult.length < c.maxLevels) {
    multOps.push(() => ({
      ...a,
      channelMult: [...a.channelMult, c.minMult + rng.int(c.maxMult - c.minMult + 1)],
    }));
  }
  if (a.channelMult.length > c.minLevels) {
    multOps.push(() => ({ ...a, channelMult: a.channelMult.slice(0, -1) }));
  }
  if (multOps.length) ops.set("channelMult", () => multOps[rng.int(multOps.length)]());
  if (c.maxBlocks > c.minBlocks) {
    ops.set("numBlocks", () => {
      const n = a.numBlocks;
      const step = n <= c.minBlocks ? 1 : n >= c.maxBlocks ? -1 : rng.next() < 0.5 ? -1 : 1;
      return { ...a, numBlocks: n + step };
    });
  }
  const attn = space.attnChoices.filter((r) => space.levelResolutions.indexOf(r) < a.channelMult.length);
  if (attn.length) {
    ops.set("attnResolutions", () => {
      const r = attn[rng.int(attn.length)];
      const has = a.attnResolutions.includes(r);
      return {
        ...a,
        attnResolutions: has ? a.attnResolutions.filter((x) => x !== r) : [...a.attnResolutions, r],
      };
    });
  }
  if (space.headChoices.length > 1) {
    ops.set("numHeads", () => ({ ...a, numHeads: other(rng, space.headChoices, a.numHeads) }));
  }
  const lo = Math.round(c.dropout[0] / DROPOUT_STEP), hi = Math.round(c.dropout[1] / DROPOUT_STEP);
  if (hi > lo) {
    const grid = Array.from({ length: hi - lo + 1 }, (_, k) => (lo + k) * DROPOUT_STEP);
    const now = Math.round(a.dropout / DROPOUT_STEP) * DROPOUT_STEP;
    ops.set(
      "dropout",
      () => ({ ...a, dropout: other(rng, grid, grid.find((g) => Math.abs(g - now) < 1e-9) ?? NaN) }),
    );
  }
  if (space.embeddingChoices.length > 1) {
    ops.set("embedding", () => ({ ...a, embedding: other(rng, space.embeddingChoices, a.embedding) }));
  }
  if (space.resampleProjChoices.length > 1) {
    ops.set("resampleProj", () => ({ ...a, resampleProj: !a.resampleProj }));
  }
  if (space.adaptiveScaleChoices.length > 1) {
    ops.set("adaptiveScale", () => ({ ...a, adaptiveScale: !a.adaptiveScale }));
  }
  return ops;
}

/**
 * `a` with `fields` of its fields (1 or 2) changed within the space (different fields each time), canonical,
 * attention kept to its own levels.
 */
export function mutate(a: Architecture, space: SearchSpace, rng: Rng, fields: number): Architecture {
  let child = fitAttention(canonicalArchitecture(a), space);
  const used = new Set<Field>();
  for (let f = 0; f < fields; f++) {
    const ops = mutations(child, space, rng);
    const free = [...ops.keys()].filter((k) => !used.has(k));
    if (!free.length) break;
    const k = free[rng.int(free.length)];
    used.add(k);
    child = fitAttention(canonicalArchitecture(ops.get(k)!()), space);
  }
  return child;
}
