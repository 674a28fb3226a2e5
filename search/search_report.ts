/**
 * @file The search's report from its memory: gathers what `search/report.ts` draws (ranking, Pareto front,
 * best-so-far curves, sample grids of the best trials and of the default network) and writes report.json and
 * report.html into the run folder. Everything comes from the storage and the saved weights, so the report of a
 * resumed or finished search can be written again at any time.
 */

import { UNet, type UNetSpec } from "../models/unet.ts";
import { NetworkGenerator } from "../models/generate.ts";
import { encodeImageGrid } from "../models/images.ts";
import { protocolSettings } from "../eval/proxy.ts";
import { writeFileAtomic } from "../util/files.ts";
import { bestSoFarByProposer, bestTrials, paretoFront } from "./memory.ts";
import { formatSummaryTable, type ReportGrid, type ReportInput, writeReport } from "./report.ts";
import { type RunnerContext, weightsPath } from "./runner.ts";
import { type Architecture, toUNetSpec } from "./space.ts";
import type { Trial } from "./types.ts";

/** A PNG grid of `config.gridImages` samples of a trial's saved weights (the proxy's sampler and seed). */
async function trialGrid(ctx: RunnerContext, trial: Trial, spec: UNetSpec): Promise<Uint8Array | null> {
  const n = ctx.config.gridImages;
  const net = new UNet(spec, { device: ctx.device }).eval();
  try {
    await net.loadSafetensors(weightsPath(ctx.dir, trial.id));
  } catch {
    net.dispose();
    return null;
  }
  try {
    const gen = new NetworkGenerator(net, {});
    const settings = protocolSettings({
      n,
      steps: ctx.config.proxySteps,
      sampler: "heun",
      seed: 0,
    });
    const x = gen.generate(0, n, { seed: ctx.config.seed, settings });
    try {
      return encodeImageGrid({ data: await x.toArray(), shape: x.shape }, { cols: 6 });
    } finally {
      x.dispose();
    }
  } finally {
    net.dispose();
  }
}

/** Writes the report of `trials` (see the file comment); returns the two files' paths. */
export async function writeSearchReport(
  ctx: RunnerContext,
  trials: Trial[],
  base: UNetSpec,
  timing: { started: number; stoppedBy: string },
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
      started: Math.round(performance.timeOrigin + timing.started),
      finished: Date.now(),
      wallSeconds: (performance.now() - timing.started) / 1000,
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
  };
  return { ...await writeReport(ctx.dir, input), summary: formatSummaryTable(input) };
}
