/**
 * @file The search's report from its memory: gathers what `search/report.ts` draws (ranking, Pareto front,
 * best-so-far curves, sample grids of the best trials and of the default network) and writes report.json and
 * report.html into the run folder. Everything comes from the storage and the saved weights (which a shared
 * memory holds too), so the report of a resumed or finished search can be written again at any time, on any
 * machine that reaches the memory. A section lists who ran each trial, its attempts and its time in the queue.
 */

import { UNet, type UNetSpec } from "../models/unet.ts";
import { NetworkGenerator } from "../models/generate.ts";
import { encodeImageGrid } from "../models/images.ts";
import { protocolSettings } from "../eval/proxy.ts";
import { writeFileAtomic } from "../util/files.ts";
import { bestSoFarByProposer, bestTrials, paretoFront, queueWaitSeconds, trialWorker } from "./memory.ts";
import {
  formatSummaryTable,
  type ReportGrid,
  type ReportInput,
  type ReportSection,
  writeReport,
} from "./report.ts";
import { fetchTrialWeights, type RunnerContext, weightsPath } from "./runner.ts";
import { type Architecture, toUNetSpec } from "./space.ts";
import { finalSection } from "./final_report.ts";
import type { Trial } from "./types.ts";

/**
 * A PNG grid of `config.gridImages` samples of a network (the proxy's sampler, the search's seed), as the report
 * draws every model; null when the grids are turned off (gridImages 0).
 */
export async function sampleGrid(
  net: UNet,
  config: Pick<RunnerContext["config"], "gridImages" | "proxySteps" | "seed">,
  sigmaData?: number,
): Promise<Uint8Array | null> {
  const n = config.gridImages;
  if (n === 0) return null;
  const gen = new NetworkGenerator(net, sigmaData === undefined ? {} : { sigmaData });
  const settings = protocolSettings({ n, steps: config.proxySteps, sampler: "heun", seed: 0 });
  const x = gen.generate(0, n, { seed: config.seed, settings });
  try {
    return encodeImageGrid({ data: await x.toArray(), shape: x.shape }, { cols: 6 });
  } finally {
    x.dispose();
  }
}

/** The grid of a trial's saved weights (`sampleGrid`); null when it has none. */
async function trialGrid(ctx: RunnerContext, trial: Trial, spec: UNetSpec): Promise<Uint8Array | null> {
  if (!(await fetchTrialWeights(ctx.dir, trial.id, ctx.storage))) return null;
  const net = new UNet(spec, { device: ctx.device }).eval();
  try {
    await net.loadSafetensors(weightsPath(ctx.dir, trial.id));
  } catch {
    net.dispose();
    return null;
  }
  try {
    return await sampleGrid(net, ctx.config);
  } finally {
    net.dispose();
  }
}

/**
 * When a search ran: `started` on this process's clock (performance.now()) for a search that ends now, or, for a
 * report written again later (`search --final`), the search's own times (epoch ms) and wall seconds.
 */
export type SearchTiming =
  | { started: number; stoppedBy: string }
  | { startedAt: number; finishedAt: number; wallSeconds: number; stoppedBy: string };

/**
 * Writes the report of `trials` (see the file comment), with the "Full training of the best" section when the
 * run folder holds a `final.json`; returns the two files' paths and the terminal table.
 */
export async function writeSearchReport(
  ctx: RunnerContext,
  trials: Trial[],
  base: UNetSpec,
  timing: SearchTiming,
): Promise<{ html: string; json: string; summary: string }> {
  const done = trials.filter((t) => t.status === "done");
  const baselineTrial = trials.find((t) => t.proposer === "baseline");
  const grids: ReportGrid[] = [];
  const drawn = new Set<number>();
  const draw = async (t: Trial, label: string) => {
    if (drawn.has(t.id) || ctx.config.gridImages === 0) return;
    drawn.add(t.id);
    const spec = toUNetSpec(t.spec as Architecture, base);
    if (!spec.ok) return;
    const png = await trialGrid(ctx, t, spec.value);
    if (!png) return;
    const path = `grids/trial-${t.id}.png`;
    await Deno.mkdir(`${ctx.dir}/grids`, { recursive: true });
    await writeFileAtomic(`${ctx.dir}/${path}`, png);
    grids.push({ label, trialId: t.id, png, path });
  };
  for (const [i, t] of bestTrials(trials, 3).entries()) {
    await draw(
      t,
      `best #${i + 1}: trial ${t.id} (${t.proposer}), ${t.scores.proxyName} ${t.scores.proxyFid!.toFixed(2)}`,
    );
  }
  if (baselineTrial?.status === "done") {
    await draw(
      baselineTrial,
      `default network: trial ${baselineTrial.id}, ${baselineTrial.scores.proxyName} ` +
        `${baselineTrial.scores.proxyFid!.toFixed(2)}`,
    );
  }
  const mean = (xs: (number | undefined)[]) => {
    const v = xs.filter((x): x is number => x !== undefined && Number.isFinite(x));
    return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
  };
  const input: ReportInput = {
    title: `DiffNAS search: ${ctx.dir}`,
    settings: { ...ctx.config, stoppedBy: timing.stoppedBy },
    timing: {
      ...("startedAt" in timing
        ? { started: timing.startedAt, finished: timing.finishedAt, wallSeconds: timing.wallSeconds }
        : {
          started: Math.round(performance.timeOrigin + timing.started),
          finished: Date.now(),
          wallSeconds: (performance.now() - timing.started) / 1000,
        }),
      perTrial: {
        trainSeconds: mean(done.map((t) => t.costs.trainSeconds)),
        proxySeconds: mean(done.map((t) => t.costs.proxySeconds)),
      },
    },
    trials,
    paretoIds: paretoFront(trials).map((t) => t.id),
    bestSoFar: [...bestSoFarByProposer(trials)].map(([proposer, points]) => ({
      proposer,
      points: points.filter((p) => p.best !== null).map((p) => ({ trial: p.index, best: p.best! })),
    })),
    baseline: baselineTrial?.status === "done"
      ? {
        name: "default network",
        trialId: baselineTrial.id,
        proxyFid: baselineTrial.scores.proxyFid!,
        macs: baselineTrial.costs.macs ?? 0,
        params: baselineTrial.costs.params ?? 0,
        spec: baselineTrial.spec,
      }
      : undefined,
    grids,
    sections: [workersSection(trials), ...[await finalSection(ctx.dir)].filter((x) => x !== null)],
  };
  return { ...await writeReport(ctx.dir, input), summary: formatSummaryTable(input) };
}

/** Who ran each claimed trial, its attempts (lost ones with the reason) and its time in the queue. */
export function workersSection(trials: readonly Trial[]): ReportSection {
  const claimed = trials.filter((t) => t.attempts.length);
  const waits = claimed.map(queueWaitSeconds).filter((w): w is number => w !== null);
  const workers = new Set(claimed.map(trialWorker).filter((w) => w !== null));
  const mean = waits.length ? waits.reduce((a, b) => a + b, 0) / waits.length : 0;
  return {
    title: "Workers and queue",
    text: `${claimed.length} trials claimed by ${workers.size} worker(s); mean time in the queue ` +
      `${mean.toFixed(1)} s. Attempts lost to a stopped heartbeat were retried with the same spec and seed.`,
    table: {
      columns: ["trial", "status", "worker", "queue s", "run s", "attempts"],
      rows: claimed.map((t) => {
        const last = t.attempts[t.attempts.length - 1];
        return [
          t.id,
          t.status,
          trialWorker(t),
          queueWaitSeconds(t),
          last.end === null ? null : (last.end - last.start) / 1000,
          t.attempts.map((a) =>
            `${a.worker}${a.error ? ` (${a.error})` : ""}${
              a.lateResult ? ` (late ${a.lateResult.status})` : ""
            }`
          ).join("; "),
        ];
      }),
    },
  };
}
