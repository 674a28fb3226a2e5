/**
 * @file `deno task search --validate-proxy`: does the search's cheap score rank architectures as a long
 * training and a full FID would? The DiffNAS issue asks for it before any search result is trusted:
 *
 *     pick N architectures of different size and shape (the default network and others spread over the space
 *     by MACs), then, for each, with the same seed:
 *         short    train the search's short schedule                → RFID-n and loss-n (the two proxies)
 *         long     train `longFactor`× longer (ramp and EMA scaled) → FID-fullN     (the truth we approximate)
 *         inherit  the short schedule from the weights of the closest architecture trained before it in this
 *                  pass (as a search with `inherit` does)           → RFID-n and loss-n
 *     report Spearman ρ(short proxy, long FID) and ρ(inherited proxy, long FID) for each proxy
 *
 * The architectures are drawn from the space with the search seed (a pool of `POOL_PER_PICK`× as many random
 * admissible ones), sorted by MACs and picked at evenly spaced ranks, so they span small to large with varied
 * shapes; the default network is always one of them when it fits the space's ceilings. They are trained
 * smallest first, so an inheriting architecture mostly grows from a smaller parent, as in a search that starts
 * from the baseline. The first one has no parent: its "inherit" run is its short run.
 *
 * Training and scoring go through the runner's helpers (search/runner.ts), so the short run here is exactly a
 * search trial without pruning. Nothing is stored in a search memory; `validate-proxy.json` (rewritten after
 * every architecture, `complete: false` until the end) and `validate-proxy.md` go into the out folder.
 *
 * The measurement takes hours on a small machine, so it resumes: the same command on the same out folder keeps
 * every architecture the JSON already holds in full when the settings and the picked architectures are the
 * same (anything else is refused, naming what differs), and goes on from the first unfinished one; a row
 * with its long run but without the loss proxy (measured before it existed) keeps the long run. Weights
 * are not stored; an inherit run whose parent finished before the restart retrains the parent's run that
 * produced them (training is seeded and deterministic, so these are the same weights).
 */

import { z } from "zod";
import { Device, type Tensor } from "../engine/mod.ts";
import { openDataset } from "../models/data.ts";
import { DEFAULT_NETWORK } from "../models/train.ts";
import { Trainer } from "../models/trainer.ts";
import type { UNetSpec } from "../models/unet.ts";
import { type FeatureExtractor, openFeatureExtractor } from "../eval/features.ts";
import { type LossProtocol, lossProxy as lossProxyOf } from "../eval/denoising_loss.ts";
import { type FidProtocol, referenceStatistics, spearman } from "../eval/proxy.ts";
import { parseUsage } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import { writeTextAtomic } from "../util/files.ts";
import { Rng } from "../util/random.ts";
import { type SearchConfig, type SearchConfigInput, SearchConfigSchema, trialSchedule } from "./config.ts";
import { baselineArchitecture, searchSpaceFor } from "./diffnas.ts";
import { type HostState, hostState } from "./inherit.ts";
import { specSummary } from "./report.ts";
import {
  candidateTrainerConfig,
  inheritedInit,
  lossProtocol,
  proxyProtocol,
  type RunnerContext,
  scoreNetwork,
  type TrialEvent,
} from "./runner.ts";
import {
  type Architecture,
  architectureKey,
  checkBudget,
  distance,
  sampleArchitecture,
  type SearchSpace,
  toUNetSpec,
} from "./space.ts";

/** Random admissible architectures drawn per architecture picked (the pool spread by MACs). */
export const POOL_PER_PICK = 16;
/** The out folder when none is given. */
export const DEFAULT_VALIDATE_OUT = "runs/validate-proxy";

/** Settings of the measurement besides the search's (which give data, space, schedule, proxy, seed). */
export const ValidateProxySchema = z.strictObject({
  // Architectures to train (the issue: at least 8).
  architectures: z.number().int().min(2).max(256).default(8),
  // Images of the full FID of the long runs.
  fullN: z.number().int().min(2).max(100000).default(2048),
  // The long schedule's length as a multiple of the short one (the issue: 4×).
  longFactor: z.number().min(1).max(1000).default(4),
  // Also train the short schedule with weight inheritance and report its ρ.
  inheritance: z.boolean().default(true),
});
export type ValidateProxyInput = z.input<typeof ValidateProxySchema>;
export type ValidateProxySettings = z.output<typeof ValidateProxySchema>;

/** One architecture chosen for the measurement. */
export interface PickedArchitecture {
  arch: Architecture;
  spec: UNetSpec;
  macs: number;
  params: number;
  baseline: boolean;
}

/**
 * One training and its scores (value null when the run failed, with the error): the FID of its protocol and the
 * loss proxy of the same network (`loss`, with the loss at each σ of the grid).
 */
export interface RunScore {
  name: string;
  value: number | null;
  error?: string;
  trainSeconds: number;
  /** Seconds of both scores (the FID and the loss proxy). */
  scoreSeconds: number;
  lossName?: string;
  loss?: number | null;
  lossBySigma?: number[];
}

/** The measurements of one architecture. */
export interface ArchitectureRow {
  index: number;
  summary: string;
  architecture: Architecture;
  macs: number;
  params: number;
  baseline: boolean;
  short?: RunScore;
  long?: RunScore;
  inherit?: RunScore & { parent: number | null };
}

/** A rank correlation, or null with the reason it is undefined. */
export interface Correlation {
  rho: number | null;
  pairs: number;
  reason?: string;
}

/** What `validate-proxy.json` holds. */
export interface ValidateProxyReport {
  complete: boolean;
  settings: ValidateProxySettings & {
    seed: number;
    shortKimg: number;
    longKimg: number;
    proxy: FidProtocol;
    lossProxy: LossProtocol;
    full: FidProtocol;
    refN: number;
  };
  rows: ArchitectureRow[];
  /** ρ(short proxy, long FID). */
  shortVsLong: Correlation;
  /** ρ(inherited short proxy, long FID) (null when inheritance was not measured). */
  inheritVsLong: Correlation | null;
  /** ρ(short loss proxy, long FID). */
  shortLossVsLong: Correlation;
  /** ρ(inherited short loss proxy, long FID) (null when inheritance was not measured). */
  inheritLossVsLong: Correlation | null;
  seconds: number;
}

/** What the measurement reports as it goes. */
export type ValidateEvent =
  | { type: "start"; dir: string; device: string; architectures: PickedArchitecture[] }
  | { type: "reference"; cached: boolean; seconds: number }
  | { type: "run-start"; index: number; total: number; phase: "short" | "long" | "inherit"; summary: string }
  | { type: "resumed"; index: number; total: number; summary: string; kept: "all" | "long" }
  | { type: "run-progress"; event: TrialEvent }
  | { type: "run-end"; index: number; total: number; phase: "short" | "long" | "inherit"; score: RunScore };

/**
 * `count` admissible architectures spread over the space by MACs (see the file comment): the default network
 * (when within the ceilings) and the others at evenly spaced MAC ranks of a seeded random pool. Sorted by MACs.
 */
export function spreadArchitectures(
  space: SearchSpace,
  count: number,
  seed: number,
  ceilings: { maxMacs?: number; maxParams?: number } = {},
): PickedArchitecture[] {
  const admit = (arch: Architecture, baseline: boolean): PickedArchitecture | null => {
    const spec = toUNetSpec(arch, space.base);
    if (!spec.ok) return null;
    const cost = checkBudget(spec.value, ceilings);
    return cost.ok ? { arch, spec: spec.value, macs: cost.macs, params: cost.params, baseline } : null;
  };
  const base = admit(baselineArchitecture(space.base), true);
  const pool = new Map<string, PickedArchitecture>();
  const rng = new Rng(seed);
  for (let i = 0; i < POOL_PER_PICK * count; i++) {
    const a = sampleArchitecture(space, rng), key = architectureKey(a);
    if (base && key === architectureKey(base.arch)) continue;
    const p = pool.has(key) ? null : admit(a, false);
    if (p) pool.set(key, p);
  }
  const want = count - (base ? 1 : 0);
  const sorted = [...pool.values()].sort((a, b) => a.macs - b.macs || a.params - b.params);
  if (sorted.length < want) {
    throw new UsageError(
      `--architectures ${count}: the space (with its ceilings) gave only ${sorted.length + (base ? 1 : 0)} ` +
        `distinct admissible architectures in ${
          POOL_PER_PICK * count
        } draws; widen the space or ask for fewer`,
    );
  }
  const picked = want === 1
    ? [sorted[Math.floor((sorted.length - 1) / 2)]]
    : Array.from({ length: want }, (_, i) => sorted[Math.round(i * (sorted.length - 1) / (want - 1))]);
  return [...(base ? [base] : []), ...picked].sort((a, b) => a.macs - b.macs || a.params - b.params);
}

/** Spearman ρ of the rows' `x` against their long FID over the rows where both are finite. */
export function correlation(
  rows: ArchitectureRow[],
  x: (r: ArchitectureRow) => number | null | undefined,
): Correlation {
  const pairs = rows.flatMap((r) => {
    const a = x(r), b = r.long?.value;
    return typeof a === "number" && Number.isFinite(a) && typeof b === "number" && Number.isFinite(b)
      ? [[a, b]]
      : [];
  });
  if (pairs.length < 2) {
    return {
      rho: null,
      pairs: pairs.length,
      reason: `${pairs.length} architecture(s) with both scores; ρ needs 2`,
    };
  }
  const rho = spearman(pairs.map((p) => p[0]), pairs.map((p) => p[1]));
  if (!Number.isFinite(rho)) {
    return { rho: null, pairs: pairs.length, reason: "all scores of one side tie, so ranks carry no order" };
  }
  return { rho, pairs: pairs.length };
}

const fmt = (s: RunScore | undefined) =>
  s === undefined ? "" : s.value === null ? `failed: ${s.error}` : s.value.toFixed(3);
const fmtLoss = (s: RunScore | undefined) => (typeof s?.loss === "number" ? s.loss.toFixed(4) : "");
const fmtRho = (c: Correlation) => (c.rho === null ? `undefined (${c.reason})` : c.rho.toFixed(3));

/** The report as a markdown table with the correlations under it. */
export function validateProxyMarkdown(r: ValidateProxyReport): string {
  const s = r.settings;
  const proxy = `RFID-${s.proxy.n}`, loss = `loss-${s.lossProxy.n}`, full = `FID-${s.full.n}`;
  const head = [
    "#",
    "architecture",
    "MACs (M)",
    "params (k)",
    `short ${proxy} (${s.shortKimg} kimg)`,
    `short ${loss}`,
    ...(s.inheritance ? [`inherited ${proxy} (parent #)`, `inherited ${loss}`] : []),
    `long ${full} (${s.longKimg} kimg)`,
  ];
  const lines = [
    `# Proxy validation${r.complete ? "" : " (incomplete)"}`,
    "",
    `Seed ${s.seed}; ${r.rows.length} architectures; proxy ${proxy} with ${s.proxy.steps} Heun steps; ` +
    `${full} with the same sampler; reference statistics of ${s.refN} real images; ${loss}: the mean EDM ` +
    `loss over the ${s.lossProxy.steps} noise levels of the sampler's grid on the last ${s.lossProxy.n} images.`,
    "",
    `| ${head.join(" | ")} |`,
    `|${head.map(() => "---").join("|")}|`,
  ];
  for (const row of r.rows) {
    const parent = row.inherit ? ` (${row.inherit.parent === null ? "—" : row.inherit.parent + 1})` : "";
    lines.push(
      `| ${
        [
          String(row.index + 1) + (row.baseline ? " (default)" : ""),
          row.summary,
          (row.macs / 1e6).toFixed(2),
          (row.params / 1e3).toFixed(1),
          fmt(row.short),
          fmtLoss(row.short),
          ...(s.inheritance ? [`${fmt(row.inherit)}${parent}`, fmtLoss(row.inherit)] : []),
          fmt(row.long),
        ].join(" | ")
      } |`,
    );
  }
  const rho = (name: string, c: Correlation | null) =>
    c ? [`- Spearman ρ(${name}, long ${full}) = ${fmtRho(c)} over ${c.pairs}`] : [];
  lines.push(
    "",
    ...rho(`short ${proxy}`, r.shortVsLong),
    ...rho(`short ${loss}`, r.shortLossVsLong),
    ...rho(`inherited short ${proxy}`, r.inheritVsLong),
    ...rho(`inherited short ${loss}`, r.inheritLossVsLong),
  );
  return lines.join("\n") + "\n";
}

/**
 * Whether a row holds every measurement: short and long runs, the inherit run when inheritance is measured,
 * and the loss proxy of the short (and inherit) run (rows from before the loss proxy existed lack it).
 */
export function rowFinished(row: ArchitectureRow, inheritance: boolean): boolean {
  const hasLoss = (r: RunScore | undefined) => r !== undefined && r.loss !== undefined;
  return hasLoss(row.short) && row.long !== undefined && (!inheritance || hasLoss(row.inherit));
}

/**
 * The leading rows of a `validate-proxy.json` left in the out folder, finished or not, when it was written with
 * the same settings and architectures as `expected`; none when there is no such file. A file from other
 * settings is refused, not overwritten: it may hold hours of measurements.
 */
export async function storedRows(path: string, expected: ValidateProxyReport): Promise<ArchitectureRow[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
  let stored: ValidateProxyReport;
  try {
    stored = JSON.parse(text);
    if (!stored || typeof stored !== "object" || !Array.isArray(stored.rows)) throw new Error("no rows");
  } catch (e) {
    throw new UsageError(
      `${path} is not a proxy validation report (${(e as Error).message}); use another --out`,
    );
  }
  const storedSettings = (stored.settings ?? {}) as Record<string, unknown>;
  for (const [key, want] of Object.entries(expected.settings)) {
    const have = storedSettings[key];
    if (JSON.stringify(have) !== JSON.stringify(want)) {
      throw new UsageError(
        `${path} was measured with ${key} ${JSON.stringify(have)}, this run asks for ${
          JSON.stringify(want)
        }: ` +
          `give the same settings to continue it, or another --out`,
      );
    }
  }
  const rows: ArchitectureRow[] = [];
  for (const [i, row] of stored.rows.entries()) {
    const want = expected.rows[i];
    if (!want) break;
    if (architectureKey(row.architecture) !== architectureKey(want.architecture)) {
      throw new UsageError(
        `${path}: architecture ${
          i + 1
        } is ${row.summary} there and ${want.summary} now (another seed, space ` +
          `or --architectures?): give the same settings to continue it, or another --out`,
      );
    }
    rows.push(row);
  }
  return rows;
}

/** Options besides the settings. */
export interface ValidateProxyOptions {
  signal?: AbortSignal;
  onEvent?: (e: ValidateEvent) => void;
  /** Use this device instead of creating one. */
  device?: Device;
  /** Folder of cached reference statistics (default ".cache/fid", as the search's). */
  cacheDir?: string;
}

/** Runs the measurement (see the file comment); returns the report and the paths written. */
export async function validateProxy(
  input: SearchConfigInput | Record<string, unknown>,
  settingsInput: ValidateProxyInput | Record<string, unknown> = {},
  opts: ValidateProxyOptions = {},
): Promise<{ report: ValidateProxyReport; json: string; markdown: string }> {
  const t0 = performance.now();
  const raw = Object.fromEntries(
    Object.entries((input ?? {}) as Record<string, unknown>).filter(([, v]) => v !== undefined),
  );
  const cfg: SearchConfig = parseUsage(
    SearchConfigSchema,
    { out: DEFAULT_VALIDATE_OUT, ...raw },
    "search config",
  );
  const settings = parseUsage(
    ValidateProxySchema,
    Object.fromEntries(Object.entries(settingsInput).filter(([, v]) => v !== undefined)),
    "proxy validation settings",
  );
  const emit = opts.onEvent ?? (() => {});
  const dir = cfg.out;
  await Deno.mkdir(dir, { recursive: true });
  const json = `${dir}/validate-proxy.json`, markdown = `${dir}/validate-proxy.md`;
  const device = opts.device ?? await Device.create({ backend: cfg.backend });
  let features: FeatureExtractor | undefined;
  try {
    const dataset = await openDataset(
      cfg.data ?? { kind: "procedural", resolution: DEFAULT_NETWORK.imgResolution },
    );
    const space = searchSpaceFor(cfg, dataset);
    const picked = spreadArchitectures(space, settings.architectures, cfg.seed, {
      maxMacs: cfg.maxMacs,
      maxParams: cfg.maxParams,
    });
    emit({ type: "start", dir, device: `${device.info.adapter} (${device.kind})`, architectures: picked });
    features = await openFeatureExtractor({ device, data: cfg.data });
    const ref = await referenceStatistics(dataset, features, Math.min(cfg.refN, dataset.length), {
      cacheDir: opts.cacheDir ?? ".cache/fid",
    });
    emit({ type: "reference", cached: ref.cached, seconds: ref.seconds });
    const scoring = { features, reference: ref.stats } satisfies Pick<
      RunnerContext,
      "features" | "reference"
    >;

    const short = trialSchedule(cfg.training);
    const long = trialSchedule({ ...cfg.training, kimg: cfg.training.kimg * settings.longFactor });
    const proxy = proxyProtocol(cfg);
    const full: FidProtocol = { ...proxy, n: settings.fullN };
    const lossProxy = lossProtocol(cfg);
    const rows: ArchitectureRow[] = picked.map((p, index) => ({
      index,
      summary: specSummary(p.arch),
      architecture: p.arch,
      macs: p.macs,
      params: p.params,
      baseline: p.baseline,
    }));
    const report = (complete: boolean): ValidateProxyReport => ({
      complete,
      settings: {
        ...settings,
        seed: cfg.seed,
        shortKimg: short.kimg,
        longKimg: long.kimg,
        proxy,
        lossProxy,
        full,
        refN: Math.min(cfg.refN, dataset.length),
      },
      rows,
      shortVsLong: correlation(rows, (r) => r.short?.value),
      inheritVsLong: settings.inheritance ? correlation(rows, (r) => r.inherit?.value) : null,
      shortLossVsLong: correlation(rows, (r) => r.short?.loss),
      inheritLossVsLong: settings.inheritance ? correlation(rows, (r) => r.inherit?.loss) : null,
      seconds: (performance.now() - t0) / 1000,
    });
    const write = async (complete: boolean) => {
      const r = report(complete);
      await writeTextAtomic(json, JSON.stringify(r, null, 2) + "\n");
      await writeTextAtomic(markdown, validateProxyMarkdown(r));
      return r;
    };

    /** Trains `p` with `schedule` (from `parent`'s weights if given), scores it; returns the EMA weights too. */
    const trainAndScore = async (
      i: number,
      phase: "short" | "long" | "inherit",
      schedule: ReturnType<typeof trialSchedule>,
      protocol: FidProtocol,
      kind: "FID" | "RFID",
      parent: HostState | null,
    ): Promise<{ score: RunScore; weights: HostState | null }> => {
      const p = picked[i];
      emit({ type: "run-start", index: i, total: picked.length, phase, summary: rows[i].summary });
      const cfgT = candidateTrainerConfig(p.spec, cfg, cfg.seed, schedule);
      const totalNimg = Math.round(schedule.kimg * 1000);
      const onEvent = (event: TrialEvent) => emit({ type: "run-progress", event });
      const score: RunScore = {
        name: `${kind}-${protocol.n}`,
        value: null,
        trainSeconds: 0,
        scoreSeconds: 0,
        loss: null,
      };
      let weights: HostState | null = null;
      let init: Record<string, Tensor> | undefined;
      let trainer: Trainer | undefined;
      try {
        if (parent) init = await inheritedInit(p.spec, cfg.seed, parent, device);
        trainer = new Trainer(cfgT, device, dataset, { init });
        const run = await trainer.run({
          untilNimg: totalNimg,
          signal: opts.signal,
          onStep: (s) => onEvent({ type: "train", nimg: s.nimg, totalNimg }),
          onLog: (e) => onEvent({ type: "train", nimg: e.nimg, totalNimg, loss: e.loss }),
        });
        score.trainSeconds = run.trainSeconds;
        if (run.stoppedBy === "aborted") throw new Error("interrupted");
        const net = trainer.emaNetwork();
        if (settings.inheritance && phase !== "long") weights = await hostState(net);
        const m = await scoreNetwork(net, cfgT.sigmaData, scoring, kind, protocol, onEvent);
        const l = await lossProxyOf(net, cfgT.sigmaData, dataset, lossProxy);
        score.value = m.value;
        score.scoreSeconds = m.seconds + l.seconds;
        score.lossName = l.name;
        score.loss = l.value;
        score.lossBySigma = l.bySigma;
      } catch (e) {
        if ((e as Error).message === "interrupted") throw e;
        score.error = (e as Error).message;
      } finally {
        trainer?.dispose();
        if (init) { for (const t of Object.values(init)) t.dispose(); }
      }
      emit({ type: "run-end", index: i, total: picked.length, phase, score });
      return { score, weights };
    };

    const stored = await storedRows(json, report(false));
    // What is kept goes into the rows at once, so that every rewrite of the JSON still holds it.
    const kept = new Set<number>();
    for (const [i, prev] of stored.entries()) {
      if (rowFinished(prev, settings.inheritance)) {
        rows[i] = prev;
        kept.add(i);
      } else if (prev.long) rows[i].long = prev.long;
    }
    // Weights of the inherit pass, by index (the parents of later architectures); for an architecture finished
    // before a restart, `weightsOf` retrains the run that gave them.
    const inherited = new Map<number, HostState>();
    const hasWeights = new Set<number>();
    const weightsOf = async (j: number): Promise<HostState | null> => {
      if (!inherited.has(j)) {
        const parent = rows[j].inherit!.parent;
        const r = parent === null
          ? await trainAndScore(j, "short", short, proxy, "RFID", null)
          : await trainAndScore(j, "inherit", short, proxy, "RFID", await weightsOf(parent));
        if (r.weights) inherited.set(j, r.weights);
      }
      return inherited.get(j) ?? null;
    };
    for (let i = 0; i < picked.length; i++) {
      if (kept.has(i)) {
        emit({ type: "resumed", index: i, total: picked.length, summary: rows[i].summary, kept: "all" });
        // Its inherit (or first short) run succeeded, so it had weights to pass on.
        if (settings.inheritance && rows[i].inherit?.value !== null) hasWeights.add(i);
        continue;
      }
      const s = await trainAndScore(i, "short", short, proxy, "RFID", null);
      rows[i].short = s.score;
      if (stored[i]?.long) {
        // The long run is the expensive half: a row measured before the loss proxy existed keeps it.
        emit({ type: "resumed", index: i, total: picked.length, summary: rows[i].summary, kept: "long" });
      } else rows[i].long = (await trainAndScore(i, "long", long, full, "FID", null)).score;
      if (settings.inheritance) {
        let parent: number | null = null;
        for (const j of hasWeights) {
          if (
            parent === null ||
            distance(picked[i].arch, picked[j].arch) < distance(picked[i].arch, picked[parent].arch)
          ) {
            parent = j;
          }
        }
        if (parent === null) {
          // Nothing trained before it: the inherit run is the short run.
          rows[i].inherit = { ...s.score, parent: null };
          if (s.weights) inherited.set(i, s.weights);
        } else {
          const parentWeights = await weightsOf(parent);
          const r = parentWeights ? await trainAndScore(i, "inherit", short, proxy, "RFID", parentWeights) : {
            score: { ...s.score, value: null, error: "the parent's weights could not be rebuilt" },
            weights: null,
          };
          rows[i].inherit = { ...r.score, parent };
          if (r.weights) inherited.set(i, r.weights);
        }
        if (inherited.has(i)) hasWeights.add(i);
      }
      await write(false);
    }
    return { report: await write(true), json, markdown };
  } finally {
    features?.dispose();
    if (!opts.device) device.destroy();
  }
}
