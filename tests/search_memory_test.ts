/**
 * @file The memory views on hand-made trials: best by proxy FID, most recent, rejected with reasons, the
 * Pareto front of (proxy FID, MACs), the loss at a number of images (exact and interpolated), Optuna's median
 * pruning rule, and best-so-far curves per proposer.
 */

import {
  bestSoFarByProposer,
  bestTrials,
  lossAt,
  median,
  medianLossAt,
  paretoFront,
  recentTrials,
  rejectedTrials,
  shouldPrune,
} from "../search/memory.ts";
import type { LossPoint, Trial } from "../search/types.ts";
import { assertEquals, fakeTrial, test } from "./util.ts";

let nextId = 1;
/** A trial with only what the views read. */
function t(
  over: Partial<Trial> & { fid?: number; macs?: number; losses?: [number, number][] } = {},
): Trial {
  const { fid, macs, losses, ...rest } = over;
  const id = rest.id ?? nextId++;
  const lossHistory: LossPoint[] = (losses ?? []).map(([nimg, loss], i) => ({ step: i + 1, nimg, loss }));
  return fakeTrial(id, {
    proposer: "evolutionary",
    seed: 0,
    scores: fid === undefined ? {} : { proxyFid: fid },
    costs: macs === undefined ? {} : { macs },
    lossHistory,
    ...rest,
  });
}
const ids = (ts: Trial[]) => ts.map((x) => x.id);

test("memory: best done trials by proxy FID, most recent, rejected with reasons", () => {
  const trials = [
    t({ id: 1, fid: 30 }),
    t({ id: 2, fid: 10 }),
    t({ id: 3, fid: 5, status: "pruned" }),
    t({ id: 4, status: "rejected", error: "channelMult.2: 5 is above the space's maximum 4" }),
    t({ id: 5, fid: 10 }),
    t({ id: 6 }), // done but never scored
    t({ id: 7, fid: NaN }),
    t({ id: 8, status: "rejected", error: null }),
    t({ id: 9, fid: 20 }),
  ];
  assertEquals(ids(bestTrials(trials)), [2, 5, 9, 1], "by FID, ties to the older, only scored done trials");
  assertEquals(ids(bestTrials(trials, 2)), [2, 5], "top 2");
  assertEquals(ids(recentTrials(trials, 3)), [9, 8, 7], "newest first");
  assertEquals(rejectedTrials(trials).map((r) => [r.trial.id, r.reason]), [
    [8, "(no reason recorded)"],
    [4, "channelMult.2: 5 is above the space's maximum 4"],
  ], "rejected");
  assertEquals(rejectedTrials(trials, 1).length, 1, "limited");
});

test("memory: the Pareto front of (proxy FID, MACs)", () => {
  const trials = [
    t({ id: 1, fid: 10, macs: 100 }), // A
    t({ id: 2, fid: 8, macs: 200 }), // B
    t({ id: 3, fid: 12, macs: 50 }), // C
    t({ id: 4, fid: 11, macs: 150 }), // dominated by A
    t({ id: 5, fid: 8, macs: 250 }), // dominated by B (same FID, more MACs)
    t({ id: 6, fid: 10, macs: 100 }), // equal to A: neither dominates
    t({ id: 7, fid: 1, macs: 1, status: "failed" }), // not done
    t({ id: 8, fid: 2 }), // no MACs measured
    t({ id: 9, fid: 30, macs: 50 }), // dominated by C (same MACs, worse FID)
    t({ id: 10, fid: 7, macs: 400 }), // best FID, most MACs: on the front
  ];
  assertEquals(ids(paretoFront(trials)), [3, 1, 6, 2, 10], "front sorted by MACs");
  assertEquals(paretoFront([]), [], "empty");
  assertEquals(ids(paretoFront([t({ id: 11, fid: 3, macs: 9 })])), [11], "one trial");
});

test("memory: loss at a number of images, exact or interpolated, null outside the history", () => {
  const x = t({ losses: [[32, 0.75], [96, 0.25], [128, 0.3]] });
  assertEquals(lossAt(x, 32), 0.75, "exact");
  assertEquals(lossAt(x, 64), 0.5, "halfway");
  assertEquals(lossAt(x, 112), 0.275, "between the last two");
  assertEquals(lossAt(x, 128), 0.3, "last");
  assertEquals([lossAt(x, 16), lossAt(x, 129)], [null, null], "outside");
  assertEquals([median([]), median([3, 1, 2]), median([4, 1, 3, 2])], [null, 2, 2.5], "median");
});

test("memory: Optuna's median pruning rule", () => {
  const done = [
    t({ losses: [[64, 0.5], [128, 0.4]] }),
    t({ losses: [[64, 0.75], [128, 0.2]] }),
    t({ losses: [[32, 0.875], [96, 0.375]] }), // 0.625 at 64 by interpolation
    t({ losses: [[32, 0.9]] }), // never reached 64: left out
  ];
  const others = [
    t({ status: "running", losses: [[64, 0.01]] }),
    t({ status: "pruned", losses: [[64, 0.01]] }),
    t({ status: "failed", losses: [[64, 9]] }),
  ];
  const trials = [...done, ...others];
  assertEquals(medianLossAt(trials, 64), { median: 0.625, count: 3 }, "median of done trials at 64 images");
  assertEquals(shouldPrune(0.65, 64, trials, 3), true, "worse than the median");
  assertEquals(shouldPrune(0.625, 64, trials, 3), false, "at the median");
  assertEquals(shouldPrune(0.6, 64, trials, 3), false, "better than the median");
  assertEquals(shouldPrune(0.65, 64, trials, 4), false, "too few trials reached 64 images");
  assertEquals(shouldPrune(5, 1000, trials, 1), false, "none reached 1000 images");
  assertEquals(shouldPrune(NaN, 64, [], 3), true, "a diverged loss is pruned");
  assertEquals(shouldPrune(Infinity, 64, trials, 3), true, "infinite loss");
  assertEquals(shouldPrune(0.35, 128, trials, 2), true, "at 128 the median is 0.3");
});

test("memory: best so far per trained trial, per proposer", () => {
  const trials = [
    t({ id: 1, proposer: "random", fid: 50 }),
    t({ id: 2, proposer: "llm", status: "rejected", error: "bad" }),
    t({ id: 3, proposer: "llm", status: "failed" }),
    t({ id: 4, proposer: "random", fid: 60 }),
    t({ id: 5, proposer: "llm", fid: 40 }),
    t({ id: 6, proposer: "random", status: "pruned" }),
    t({ id: 7, proposer: "llm", fid: 45 }),
    t({ id: 8, proposer: "random", fid: 20 }),
    t({ id: 9, proposer: "random", status: "queued" }),
  ];
  const curves = bestSoFarByProposer(trials);
  assertEquals([...curves.keys()], ["random", "llm"], "proposers in order of their first trained trial");
  assertEquals(curves.get("random")!.map((p) => [p.index, p.trialId, p.proxyFid, p.best]), [
    [1, 1, 50, 50],
    [2, 4, 60, 50],
    [3, 6, null, 50],
    [4, 8, 20, 20],
  ], "random");
  assertEquals(curves.get("llm")!.map((p) => [p.index, p.trialId, p.proxyFid, p.best]), [
    [1, 3, null, null],
    [2, 5, 40, 40],
    [3, 7, 45, 40],
  ], "llm");
});
