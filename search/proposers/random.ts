/**
 * @file The random proposer: uniform samples of the search space, blind to every score (the memory-less
 * baseline every search is compared against). It only reads the memory's keys, so it never proposes a network
 * that was already proposed: a repeat would be refused by the storage anyway and waste the call.
 */

import { Rng } from "../../util/random.ts";
import { type Architecture, architectureKey, sampleArchitecture, type SearchSpace } from "../space.ts";
import type { Proposal, ProposalContext, Proposer } from "../types.ts";

/** Draws until an architecture whose key is not in `seen` comes up (at most `maxTries` draws); adds its key. */
export function freshSample(
  space: SearchSpace,
  rng: Rng,
  seen: Set<string>,
  maxTries: number,
): Architecture | null {
  for (let i = 0; i < maxTries; i++) {
    const a = sampleArchitecture(space, rng), key = architectureKey(a);
    if (!seen.has(key)) {
      seen.add(key);
      return a;
    }
  }
  return null;
}

/** Uniform random architectures of the space; deterministic given `ctx.seed`. */
export class RandomProposer implements Proposer {
  readonly name = "random";

  /** `maxTries`: draws per candidate to find one not in the memory (fewer candidates come back if none). */
  constructor(readonly space: SearchSpace, readonly maxTries = 50) {}

  propose(ctx: ProposalContext): Promise<Proposal[]> {
    const rng = new Rng(ctx.seed), seen = new Set(ctx.trials.map((t) => t.key));
    const out: Proposal[] = [];
    for (let i = 0; i < ctx.count; i++) {
      const a = freshSample(this.space, rng, seen, this.maxTries);
      if (a) out.push({ spec: a, parentId: null });
    }
    return Promise.resolve(out);
  }
}
