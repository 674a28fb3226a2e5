/**
 * @file `deno task search --compare`: is the memory-based proposer better than random search? The DiffNAS
 * issue's measure: run both for the same number of trials over several seeds and count **trials-to-target**,
 * the trials a run needs until it finds a proxy FID within 2% of the best found in all runs.
 *
 *     for seed in 0 .. seeds−1, for proposer in [memory-based (evolutionary, or llm when configured), random]:
 *         a full search (runSearch) in <out>/<proposer>-seed<seed>   (resumed when the folder holds one)
 *     target = (best proxy FID over every run) × (1 + 2%)
 *     per run: the 1-based index, among its trained trials (done, failed or pruned, in id order), of the first
 *              finished trial at or below the target; a run that never reaches it counts as its trial
 *              budget + 1 (or its trained trials + 1, if more) and is flagged
 *     per proposer: mean and standard deviation over seeds
 *
 * The search seed is also the training seed and the proxy's latent seed, so different seeds train (and score)
 * the same architecture differently: the spread over seeds includes that training noise, and both proposers
 * see the same noise for a seed (the baseline, trial 1 of every run, scores the same under both). Each run's
 * wall-clock budget is lifted (unless `minutes` is given) so every run gets the same number of trials.
 *
 * Each run is an ordinary search folder, so an interrupted comparison continues where it stopped: finished
 * runs are reopened as-is, the interrupted one resumes. `compare.json`, `compare.md` and `compare.html` (the
 * best-so-far curves of every run) go into the out folder.
 */

import { z } from "zod";
import { Device } from "../engine/mod.ts";
import { parseUsage } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import { writeTextAtomic } from "../util/files.ts";
import { type SearchConfigInput, SearchConfigSchema } from "./config.ts";
import { runSearch, type SearchEvent } from "./diffnas.ts";
import { type ChartSeries, escapeHtml, renderChartSvg } from "./report.ts";
import { MEMORY_FILE } from "./sqlite_storage.ts";
import type { Trial } from "./types.ts";

/** The out folder when none is given. */
export const DEFAULT_COMPARE_OUT = "runs/compare";
/**
 * The comparison's sizes where the configuration does not give them (flags and config files win, field by
 * field). At the search's own sizes (6-kimg candidates up to 60 M MACs, about 2–3 minutes each here) the
 * default 3 seeds × 2 proposers would take about 2 hours for 10 trials each, so the comparison asks a
 * smaller question that fits in half an hour on this two-core machine: which proposer finds a better
 * network *at the default network's cost* (MACs ceiling 20 M, the default's 19.8 M) sooner, with 3-kimg
 * candidates (~30–40 s each) and no sample grids. At 3 kimg RFID-128 separates architectures (55–88 over the
 * eight of the proxy validation) though it does not rank them as their long runs do (ρ −0.33): the comparison
 * measures how fast a proposer optimizes the proxy it is given, not the proxy. A shorter schedule is no
 * cheaper way to the answer: at 1 kimg every candidate's proxy sits in the untrained network's noise floor
 * (RFID-128 86.6, 86.6 and 87.3 for the first three trials of a run, the default network's 85.9), all within
 * the 2% target, so every run "reaches" it at its first trial. `--kimg 6 --max-macs 60e6 --trials 10` is
 * the comparison at the search's own sizes.
 */
export const COMPARE_DEFAULTS = Object.freeze({
  // Trials per run, the baseline included (five proposals after it).
  trials: 6,
  // Thousands of training images per candidate.
  kimg: 3,
  // MACs ceiling per network evaluation: the default network's cost, rounded up.
  maxMacs: 20e6,
  // No sample grids in the runs' reports (about 10 s per grid here).
  gridImages: 0,
});

/** A run reaches the target at a proxy FID within this fraction of the best of all runs. */
export const TARGET_TOLERANCE = 0.02;

/**
 * A run's search settings: the given ones (flags and config file) over `COMPARE_DEFAULTS`, field by field; a
 * given `training` object keeps the default kimg unless it sets its own, anything else in its place is left
 * for the schema to name.
 */
export function compareSearchInput(given: Record<string, unknown>): Record<string, unknown> {
  const d = COMPARE_DEFAULTS;
  const training = given.training === undefined
    ? { kimg: d.kimg }
    : isPlainObject(given.training)
    ? { kimg: d.kimg, ...given.training }
    : given.training;
  return { trials: d.trials, maxMacs: d.maxMacs, gridImages: d.gridImages, ...given, training };
}

/** Settings of the comparison besides the search's. */
export const CompareSchema = z.strictObject({
  // Seeds 0 .. seeds−1, one run of each proposer per seed.
  seeds: z.number().int().min(1).max(1000).default(3),
});
export type CompareInput = z.input<typeof CompareSchema>;

/** Where one run reached the target. */
export interface TrialsToTarget {
  /** Trials until the target (1-based among trained trials); max(trained, budget) + 1 when never reached. */
  trials: number;
  reached: boolean;
  /** Trained trials of the run (done, failed or pruned). */
  trained: number;
}

/** One run of the comparison. */
export interface CompareRun {
  proposer: string;
  seed: number;
  dir: string;
  /** Best proxy FID of the run (null when no trial finished). */
  best: number | null;
  stoppedBy: string;
  toTarget: TrialsToTarget;
  /** Best proxy FID so far after each trained trial, in order (null until one is done). */
  bestSoFar: (number | null)[];
}

/** Mean and spread of one proposer's trials-to-target. */
export interface ProposerSummary {
  proposer: string;
  runs: number;
  mean: number;
  /** Sample standard deviation (n − 1; 0 for one run). */
  std: number;
  min: number;
  max: number;
  /** Runs that never reached the target (counted as max(trained, budget) + 1). */
  notReached: number;
}

/** What `compare.json` holds. */
export interface CompareReport {
  complete: boolean;
  seeds: number;
  trials: number;
  proxyName: string | null;
  /** Best proxy FID over every run, and the target (best × (1 + tolerance)). */
  best: number | null;
  target: number | null;
  tolerance: number;
  runs: CompareRun[];
  summary: ProposerSummary[];
  /** Wall time of this invocation (a resumed comparison does not add the earlier ones). */
  seconds: number;
}

/** Trials that cost training, in the order they were trained (ids increase in creation order). */
const trained = <T extends Pick<Trial, "id" | "status">>(trials: readonly T[]): T[] =>
  trials.filter((t) => t.status === "done" || t.status === "failed" || t.status === "pruned")
    .sort((a, b) => a.id - b.id);

/** The best proxy FID of finished trials, or null. */
export function bestProxy(trials: readonly Pick<Trial, "status" | "scores">[]): number | null {
  let best: number | null = null;
  for (const t of trials) {
    const v = t.scores.proxyFid;
    if (t.status === "done" && typeof v === "number" && Number.isFinite(v) && (best === null || v < best)) {
      best = v;
    }
  }
  return best;
}

/** Trials-to-target of one run (see the file comment). */
export function trialsToTarget(
  trials: readonly Pick<Trial, "id" | "status" | "scores">[],
  target: number,
  budget = 0,
): TrialsToTarget {
  const ordered = trained(trials);
  // A run that stopped short of its budget (the proposer ran out of admissible candidates) did not find the
  // target within the budget either: it must not count as quicker than one that used every trial.
  const i = ordered.findIndex((t) =>
    t.status === "done" && typeof t.scores.proxyFid === "number" && t.scores.proxyFid <= target
  );
  return i < 0
    ? { trials: Math.max(ordered.length, budget) + 1, reached: false, trained: ordered.length }
    : { trials: i + 1, reached: true, trained: ordered.length };
}

/** The best proxy FID after each trained trial of a run (null until one is done). */
export function bestSoFar(trials: readonly Pick<Trial, "id" | "status" | "scores">[]): (number | null)[] {
  let best: number | null = null;
  return trained(trials).map((t) => {
    const v = t.scores.proxyFid;
    if (t.status === "done" && typeof v === "number" && Number.isFinite(v) && (best === null || v < best)) {
      best = v;
    }
    return best;
  });
}

/** Mean, sample standard deviation and range of trials-to-target per proposer, in first-seen order. */
export function summarizeRuns(runs: readonly Pick<CompareRun, "proposer" | "toTarget">[]): ProposerSummary[] {
  const names = [...new Set(runs.map((r) => r.proposer))];
  return names.map((proposer) => {
    const mine = runs.filter((r) => r.proposer === proposer), xs = mine.map((r) => r.toTarget.trials);
    const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
    const std = xs.length > 1 ? Math.sqrt(xs.reduce((a, x) => a + (x - mean) ** 2, 0) / (xs.length - 1)) : 0;
    return {
      proposer,
      runs: xs.length,
      mean,
      std,
      min: Math.min(...xs),
      max: Math.max(...xs),
      notReached: mine.filter((r) => !r.toTarget.reached).length,
    };
  });
}

/** Target, per-run trials-to-target and per-proposer summary of runs' trial lists. */
export function compareRuns(
  runs: readonly {
    proposer: string;
    seed: number;
    dir: string;
    stoppedBy: string;
    trials: readonly Trial[];
  }[],
  tolerance = TARGET_TOLERANCE,
  budget = 0,
): { best: number | null; target: number | null; runs: CompareRun[]; summary: ProposerSummary[] } {
  const bests = runs.map((r) => bestProxy(r.trials));
  const finite = bests.filter((b): b is number => b !== null);
  const best = finite.length ? Math.min(...finite) : null;
  const target = best === null ? null : best * (1 + tolerance);
  const out = runs.map((r, i): CompareRun => ({
    proposer: r.proposer,
    seed: r.seed,
    dir: r.dir,
    best: bests[i],
    stoppedBy: r.stoppedBy,
    // No finished trial anywhere: no run reaches a target.
    toTarget: trialsToTarget(r.trials, target ?? -Infinity, budget),
    bestSoFar: bestSoFar(r.trials),
  }));
  return { best, target, runs: out, summary: summarizeRuns(out) };
}

/** The report as markdown: the per-proposer summary, then every run. */
export function compareMarkdown(r: CompareReport): string {
  const f = (v: number | null, d = 3) => (v === null ? "—" : v.toFixed(d));
  const lines = [
    `# Proposer comparison${r.complete ? "" : " (incomplete)"}`,
    "",
    `${r.seeds} seeds × ${r.trials} trials per run; target: ${r.proxyName ?? "proxy FID"} ≤ ${f(r.target)} ` +
    `(best of all runs ${f(r.best)} + ${(r.tolerance * 100).toFixed(0)}%).`,
    "",
    "| proposer | runs | trials-to-target mean | std | min | max | never reached |",
    "|---|---|---|---|---|---|---|",
    ...r.summary.map((s) =>
      `| ${s.proposer} | ${s.runs} | ${s.mean.toFixed(2)} | ${s.std.toFixed(2)} | ${s.min} | ${s.max} | ` +
      `${s.notReached} |`
    ),
    "",
    "| proposer | seed | trained | best | trials-to-target | folder |",
    "|---|---|---|---|---|---|",
    ...r.runs.map((x) =>
      `| ${x.proposer} | ${x.seed} | ${x.toTarget.trained} | ${f(x.best)} | ${x.toTarget.trials}` +
      `${x.toTarget.reached ? "" : " (never reached)"} | ${x.dir} |`
    ),
  ];
  return lines.join("\n") + "\n";
}

/**
 * `compare.html`: the summary table and the best proxy FID so far against trial number of every run (solid:
 * the memory-based proposer, dashed: random), with the target; self-contained like report.html.
 */
export function compareHtml(r: CompareReport): string {
  const name = r.proxyName ?? "proxy FID";
  const proposers = r.summary.map((s) => s.proposer);
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
  const series: ChartSeries[] = r.runs.map((run) => ({
    name: `${run.proposer} seed ${run.seed}`,
    kind: "step",
    color: colors[Math.max(0, proposers.indexOf(run.proposer)) % colors.length],
    dashed: run.proposer === "random",
    points: run.bestSoFar.flatMap((b, i): [number, number][] => (b === null ? [] : [[i + 1, b]])),
  }));
  const longest = Math.max(1, ...r.runs.map((x) => x.bestSoFar.length));
  if (r.target !== null) {
    series.push({
      name: `target (best + ${(r.tolerance * 100).toFixed(0)}%)`,
      kind: "line",
      color: "#777",
      dashed: true,
      points: [[1, r.target], [longest, r.target]],
    });
  }
  const chart = renderChartSvg({
    title: `Best ${name} so far`,
    xLabel: "trial",
    yLabel: name,
    series,
    width: 720,
    height: 420,
  });
  const e = (v: unknown) => escapeHtml(String(v));
  const f = (v: number | null, d = 3) => (v === null ? "–" : v.toFixed(d));
  const row = (cells: unknown[]) => `<tr>${cells.map((c) => `<td>${e(c)}</td>`).join("")}</tr>`;
  const head = (cells: string[]) => `<tr>${cells.map((c) => `<th>${e(c)}</th>`).join("")}</tr>`;
  return [
    `<!doctype html><html lang="en"><head><meta charset="utf-8">`,
    `<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">`,
    `<title>Proposer comparison</title><style>body{font:14px/1.45 system-ui,sans-serif;max-width:1000px;` +
    `margin:20px auto;padding:0 16px}table{border-collapse:collapse;font-size:13px}th,td{padding:3px 9px;` +
    `border-bottom:1px solid #eee;text-align:left}th{background:#f6f6f6}</style></head><body>`,
    `<h1>Proposer comparison${r.complete ? "" : " (incomplete)"}</h1>`,
    `<p>${r.seeds} seeds × ${r.trials} trials per run; target: ${e(name)} ≤ ${
      f(r.target)
    } (best of all runs ` +
    `${f(r.best)} + ${(r.tolerance * 100).toFixed(0)}%); this invocation ${
      (r.seconds / 60).toFixed(1)
    } minutes (a resumed comparison counts only its own).</p>`,
    `<table>`,
    head(["proposer", "runs", "trials-to-target mean", "std", "min", "max", "never reached"]),
    ...r.summary.map((s) =>
      row([s.proposer, s.runs, s.mean.toFixed(2), s.std.toFixed(2), s.min, s.max, s.notReached])
    ),
    `</table>`,
    `<figure>${chart}<figcaption>Best ${e(name)} so far against trial number, per run (the baseline, the ` +
    `default network, is trial 1 of each)</figcaption></figure>`,
    `<table>`,
    head(["proposer", "seed", "trained", "best", "trials-to-target", "folder"]),
    ...r.runs.map((x) =>
      row([
        x.proposer,
        x.seed,
        x.toTarget.trained,
        f(x.best),
        `${x.toTarget.trials}${x.toTarget.reached ? "" : " (never reached)"}`,
        x.dir,
      ])
    ),
    `</table></body></html>`,
  ].join("\n") + "\n";
}

/** What the comparison reports as it goes. */
export type CompareEvent =
  | { type: "run-start"; proposer: string; seed: number; dir: string; resumed: boolean }
  | { type: "search"; proposer: string; seed: number; event: SearchEvent }
  | { type: "run-end"; proposer: string; seed: number; stoppedBy: string };

/** Options besides the settings. */
export interface CompareOptions {
  signal?: AbortSignal;
  onEvent?: (e: CompareEvent) => void;
  /** Use this device for every run instead of creating one. */
  device?: Device;
}

/** Runs (or continues) the comparison; see the file comment. */
export async function runCompare(
  input: SearchConfigInput | Record<string, unknown>,
  settingsInput: CompareInput | Record<string, unknown> = {},
  opts: CompareOptions = {},
): Promise<{ report: CompareReport; json: string; markdown: string; html: string; interrupted: boolean }> {
  const t0 = performance.now();
  const given: Record<string, unknown> = Object.fromEntries(
    Object.entries((input ?? {}) as Record<string, unknown>).filter(([, v]) => v !== undefined),
  );
  const raw = compareSearchInput(given);
  const cfg = parseUsage(
    SearchConfigSchema,
    { out: DEFAULT_COMPARE_OUT, minutes: 100000, ...raw },
    "search config",
  );
  const { seeds } = parseUsage(
    CompareSchema,
    Object.fromEntries(Object.entries(settingsInput).filter(([, v]) => v !== undefined)),
    "comparison settings",
  );
  if (raw.seed !== undefined) {
    throw new UsageError(`--compare runs seeds 0 .. seeds−1 itself: give --seeds, not --seed`);
  }
  if (cfg.proposer === "random") {
    throw new UsageError(
      `--compare runs random search against a memory-based proposer: --proposer random is one`,
    );
  }
  const memoryBased = cfg.proposer === "auto" ? (cfg.llm ? "llm" : "evolutionary") : cfg.proposer;
  const emit = opts.onEvent ?? (() => {});
  const root = cfg.out;
  await Deno.mkdir(root, { recursive: true });
  const json = `${root}/compare.json`, markdown = `${root}/compare.md`, page = `${root}/compare.html`;
  const device = opts.device ?? await Device.create({ backend: cfg.backend });
  const done: { proposer: string; seed: number; dir: string; stoppedBy: string; trials: Trial[] }[] = [];
  let proxyName: string | null = null;
  const write = async (complete: boolean) => {
    const c = compareRuns(done, TARGET_TOLERANCE, cfg.trials);
    const report: CompareReport = {
      complete,
      seeds,
      trials: cfg.trials,
      proxyName,
      best: c.best,
      target: c.target,
      tolerance: TARGET_TOLERANCE,
      runs: c.runs,
      summary: c.summary,
      seconds: (performance.now() - t0) / 1000,
    };
    await writeTextAtomic(json, JSON.stringify(report, null, 2) + "\n");
    await writeTextAtomic(markdown, compareMarkdown(report));
    await writeTextAtomic(page, compareHtml(report));
    return report;
  };
  let interrupted = false;
  try {
    outer: for (let seed = 0; seed < seeds; seed++) {
      for (const proposer of [memoryBased, "random"]) {
        const dir = `${root}/${proposer}-seed${seed}`;
        const resume = await exists(`${dir}/${MEMORY_FILE}`);
        emit({ type: "run-start", proposer, seed, dir, resumed: resume });
        const r = await runSearch({ ...raw, minutes: cfg.minutes, out: dir, seed, proposer }, {
          resume,
          device,
          signal: opts.signal,
          onEvent: (event) => emit({ type: "search", proposer, seed, event }),
        });
        emit({ type: "run-end", proposer, seed, stoppedBy: r.stoppedBy });
        if (r.stoppedBy === "interrupted") {
          interrupted = true;
          break outer;
        }
        proxyName ??= r.trials.find((t) => t.scores.proxyName)?.scores.proxyName ?? null;
        done.push({ proposer, seed, dir, stoppedBy: r.stoppedBy, trials: r.trials });
        await write(false);
      }
    }
    return { report: await write(!interrupted), json, markdown, html: page, interrupted };
  } finally {
    if (!opts.device) device.destroy();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);
