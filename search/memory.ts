/**
 * @file Reading the search memory: the views of a `Trial[]` that the proposers, the LLM prompt and the report
 * share, so that "best", "Pareto front" and "prune" mean one thing everywhere.
 *
 * - best done trials by proxy FID (lower is better; ties go to the older trial);
 * - the most recent trials, and the rejected ones with their reasons (what the proposer should learn from);
 * - the Pareto front of (proxy FID, MACs): done trials no other done trial beats on both;
 * - Optuna's median pruning rule (MedianPruner): a running trial whose loss at some point of training is worse
 *   than the median loss of the done trials at that same point is stopped;
 * - best-so-far curves per proposer, for comparing proposers by how fast they find good networks;
 * - who ran a trial and how long it waited in the queue (for searches with workers on many machines).
 */

import type { Trial } from "./types.ts";

/** Done trials with a finite proxy FID. */
export function scoredTrials(trials: readonly Trial[]): Trial[] {
  return trials.filter((t) => t.status === "done" && Number.isFinite(t.scores.proxyFid));
}

/** Orders by proxy FID, lower first, then by id (the older trial first on ties). */
const byFid = (a: Trial, b: Trial) => a.scores.proxyFid! - b.scores.proxyFid! || a.id - b.id;

/** The `n` best done trials by proxy FID (all of them when `n` is absent). */
export function bestTrials(trials: readonly Trial[], n = Infinity): Trial[] {
  return scoredTrials(trials).sort(byFid).slice(0, n);
}

/** The `n` most recently created trials, newest first (by id, which follows creation order). */
export function recentTrials(trials: readonly Trial[], n: number): Trial[] {
  return [...trials].sort((a, b) => b.id - a.id).slice(0, n);
}

/** The `n` most recent rejected trials, newest first, with the reason each was refused. */
export function rejectedTrials(trials: readonly Trial[], n = Infinity): { trial: Trial; reason: string }[] {
  return recentTrials(trials.filter((t) => t.status === "rejected"), n)
    .map((trial) => ({ trial, reason: trial.error ?? "(no reason recorded)" }));
}

/**
 * The Pareto front of (proxy FID, MACs), both lower better: the done trials with both measured that no other
 * such trial dominates (at most as bad on both and better on one). Sorted by MACs, then FID, then id. Trials
 * with identical scores are both on the front.
 */
export function paretoFront(trials: readonly Trial[]): Trial[] {
  const pts = scoredTrials(trials).filter((t) => Number.isFinite(t.costs.macs));
  const fid = (t: Trial) => t.scores.proxyFid!, macs = (t: Trial) => t.costs.macs!;
  const dominates = (a: Trial, b: Trial) =>
    fid(a) <= fid(b) && macs(a) <= macs(b) && (fid(a) < fid(b) || macs(a) < macs(b));
  return pts.filter((t) => !pts.some((o) => dominates(o, t)))
    .sort((a, b) => macs(a) - macs(b) || fid(a) - fid(b) || a.id - b.id);
}

/**
 * A trial's loss at `nimg` training images: the logged point at exactly `nimg`, or the linear interpolation
 * between the two logged points around it; null when its history does not reach that far (or starts later).
 */
export function lossAt(trial: Trial, nimg: number): number | null {
  const h = trial.lossHistory;
  for (let i = 0; i < h.length; i++) {
    if (h[i].nimg === nimg) return h[i].loss;
    if (h[i].nimg > nimg) {
      if (i === 0) return null;
      const a = h[i - 1], b = h[i];
      return a.loss + (b.loss - a.loss) * (nimg - a.nimg) / (b.nimg - a.nimg);
    }
  }
  return null;
}

/** The median of numbers (the mean of the two middle ones for an even count); null for none. */
export function median(xs: readonly number[]): number | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b), m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** The median loss at `nimg` over done trials whose history covers it, and how many there were. */
export function medianLossAt(
  trials: readonly Trial[],
  nimg: number,
): { median: number | null; count: number } {
  const losses = trials.filter((t) => t.status === "done").map((t) => lossAt(t, nimg))
    .filter((l): l is number => l !== null && Number.isFinite(l));
  return { median: median(losses), count: losses.length };
}

/**
 * Optuna's median pruning rule: prune a running trial whose loss at `nimg` is above the median loss of the
 * done trials at `nimg`, once at least `minTrials` of them reached it (never before: too few to judge). A
 * non-finite loss (a diverged run) is always pruned. The caller decides which loss to pass (Optuna passes the
 * best so far of the running trial).
 */
export function shouldPrune(
  lossAtCheckpoint: number,
  nimg: number,
  trials: readonly Trial[],
  minTrials: number,
): boolean {
  if (!Number.isFinite(lossAtCheckpoint)) return true;
  const { median: m, count } = medianLossAt(trials, nimg);
  if (m === null || count < Math.max(1, minTrials)) return false;
  return lossAtCheckpoint > m;
}

/** One point of a best-so-far curve. */
export interface BestSoFarPoint {
  /** 1 for the proposer's first trained trial, 2 for its second, ... */
  index: number;
  trialId: number;
  /** This trial's proxy FID (null when it failed, was pruned or is not scored). */
  proxyFid: number | null;
  /** The best proxy FID among the proposer's trials up to this one (null before the first scored one). */
  best: number | null;
}

/**
 * Best proxy FID so far against the number of trials trained, per proposer: the trials that went through
 * training (done, pruned, failed) in id order; rejected, queued and running trials cost no training yet and are
 * left out.
 */
export function bestSoFarByProposer(trials: readonly Trial[]): Map<string, BestSoFarPoint[]> {
  const curves = new Map<string, BestSoFarPoint[]>();
  const trained = trials.filter((t) => t.status === "done" || t.status === "pruned" || t.status === "failed");
  for (const t of [...trained].sort((a, b) => a.id - b.id)) {
    const curve = curves.get(t.proposer) ?? [];
    curves.set(t.proposer, curve);
    const fid = t.status === "done" && Number.isFinite(t.scores.proxyFid) ? t.scores.proxyFid! : null;
    const prev = curve.length ? curve[curve.length - 1].best : null;
    const best = fid === null ? prev : prev === null ? fid : Math.min(prev, fid);
    curve.push({ index: curve.length + 1, trialId: t.id, proxyFid: fid, best });
  }
  return curves;
}

/** The worker whose attempt produced the trial's result (its last attempt that ended without error), or null. */
export function trialWorker(t: Trial): string | null {
  if (!["done", "pruned", "failed"].includes(t.status)) return null;
  const ok = t.attempts.filter((a) => a.end !== null && a.lateResult === undefined);
  const last = t.status === "failed" ? ok[ok.length - 1] : ok.filter((a) => a.error === null).pop();
  return last?.worker ?? null;
}

/**
 * Seconds a trial waited in the queue: from its creation to its first claim, plus, for each retry, from the
 * end of the lost attempt to the next claim. Null for a trial never claimed.
 */
export function queueWaitSeconds(t: Trial): number | null {
  if (!t.attempts.length) return null;
  let ms = t.attempts[0].start - t.createdAt;
  for (let i = 1; i < t.attempts.length; i++) {
    ms += t.attempts[i].start - (t.attempts[i - 1].end ?? t.attempts[i].start);
  }
  return Math.max(0, ms) / 1000;
}
