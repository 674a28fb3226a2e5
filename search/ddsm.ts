/**
 * @file DDSM (Yang et al., ICLR 2024, "Denoising Diffusion Step-aware Models"): one slimmable network, a width
 * per sampling step, the per-step schedule found by a genetic search (`deno task search --method ddsm`).
 *
 *     supernet ← --supernet CHECKPOINT, or trained here with the sandwich rule (widths 1, 0.25 and one of
 *                0.5/0.75 per batch) and saved as supernet.safetensors (a resumed search loads it)
 *     profile  ← the EDM loss of each width at each σ of the sampler's grid, on held-out images with fixed
 *                noise (the step-importance profile, profile.json)
 *     GA       ← search/ga.ts over genomes of one width per Heun step (both evaluations of a step use its
 *                width), started from the uniform genomes, switch seeds ("width w for the k noisiest steps,
 *                then 1" at the configured savings), genomes read off the profile (per step the cheapest width
 *                within (1 + δ) of width 1's loss) and random ones: fitness = fidWeight · proxy FID +
 *                macsWeight · average MACs (millions) per network evaluation actually made; every genome is a
 *                trial of the search memory (key = genome), so a resumed search replays the GA from the memory
 *                and computes only what is missing
 *     compare  ← the uniform schedules and the best "switch at step k" two-width schedule of about the same
 *                average MACs as the GA's best; FID-n of these (fid.json, cached by genome)
 *     report   ← schedule.json, report.html / report.json with the schedule, profile and GA-history charts
 *
 * Every genome is scored with the same proxy protocol (seed, latents, sampler), so differences between genomes
 * are the schedule's alone.
 */

import { Device, saveSafetensors } from "../engine/mod.ts";
import { type Dataset, openDataset } from "../models/data.ts";
import { DEFAULT_NETWORK, parseTrainConfig } from "../models/train.ts";
import { networkSpec, parseTrainerConfig, Trainer } from "../models/trainer.ts";
import { UNet, type UNetSpec } from "../models/unet.ts";
import { EDMPrecond } from "../models/edm.ts";
import { edmTimeSteps } from "../models/samplers.ts";
import { DDSM_WIDTHS, type WidthSchedule } from "../models/slimmable.ts";
import { disposeCheckpoint, latestCheckpoint, loadCheckpoint, readTrainState } from "../models/checkpoint.ts";
import { NetworkGenerator } from "../models/generate.ts";
import { encodeImageGrid } from "../models/images.ts";
import { unetCost } from "../models/cost.ts";
import { type FeatureExtractor, openFeatureExtractor } from "../eval/features.ts";
import { disposeBatch, imageBatch, lossAtSigmas } from "../eval/denoising_loss.ts";
import type { FidStatistics } from "../eval/fid.ts";
import { measureFid, protocolSettings, referenceStatistics } from "../eval/proxy.ts";
import { UsageError } from "../util/errors.ts";
import { writeFileAtomic, writeTextAtomic } from "../util/files.ts";
import { FULL_RUN, type SearchConfig, type SearchConfigInput } from "./config.ts";
import {
  baseNetwork,
  claimRunFolder,
  openMemory,
  type SearchEvent,
  type SearchOptions,
  type SearchOutcome,
} from "./diffnas.ts";
import {
  type GaResult,
  type GenerationRecord,
  type Genome,
  genomeKey,
  runGa,
  uniformGenomes,
  uniqueGenomes,
} from "./ga.ts";
import { bestSoFarByProposer, paretoFront } from "./memory.ts";
import {
  type ChartSpec,
  type ReportGrid,
  type ReportInput,
  type ReportSection,
  writeReport,
} from "./report.ts";
import { proxyProtocol } from "./runner.ts";
import type { SearchStorage, Trial } from "./types.ts";

/** Progress of a DDSM search: the search events and its own. */
export type DdsmEvent =
  | SearchEvent
  | { type: "supernet"; nimg: number; totalNimg: number; loss?: number; loaded?: string }
  | { type: "profile"; seconds: number; cached: boolean }
  | { type: "generation"; record: GenerationRecord };

/** Proposer names of the trials of a DDSM search. */
export const GA_PROPOSER = "ddsm-ga";
export const SWITCH_PROPOSER = "ddsm-switch";
export const UNIFORM_PROPOSER = "ddsm-uniform";

/** The file holding the supernet trained by the search (EMA weights). */
export const SUPERNET_FILE = "supernet.safetensors";

// ---------------------------------------------------------------------------------------------------------------
// MACs of a schedule.

/** Network evaluations per step of the EDM Heun sampler with `steps` steps: 2 each, 1 for the last (to σ = 0). */
export function heunEvaluations(steps: number): number[] {
  return Array.from({ length: steps }, (_, i) => i === steps - 1 ? 1 : 2);
}

/**
 * Average MACs per network evaluation of a width schedule under Heun: Σ_i evals_i · MACs(w_i) / Σ_i evals_i,
 * with `macsAt[j]` the MACs of one forward at width index j.
 */
export function averageMacs(genome: readonly number[], macsAt: readonly number[]): number {
  const evals = heunEvaluations(genome.length);
  let sum = 0, n = 0;
  for (const [i, g] of genome.entries()) sum += evals[i] * macsAt[g], n += evals[i];
  return sum / n;
}

/** MACs of one forward of `spec` at each width of `widths` (models/cost.ts convention). */
export function macsPerWidth(spec: UNetSpec, widths: readonly number[]): number[] {
  return widths.map((w) => unetCost(spec, w).macs);
}

/** The sampler-step width schedule of a genome. */
export function genomeSchedule(
  genome: readonly number[],
  widths: readonly number[],
): WidthSchedule & { by: "step" } {
  return { by: "step", widths: genome.map((g) => widths[g]) };
}

/**
 * The genome the step-importance profile suggests at tolerance δ: per step the width of fewest MACs whose
 * loss is within (1 + δ) of width index 0's (the full width) at that step's σ.
 */
export function profileGenome(profile: StepProfile, macsAt: readonly number[], delta: number): Genome {
  return profile.sigmas.map((_, i) => {
    let best = 0;
    for (let j = 1; j < macsAt.length; j++) {
      if (profile.loss[j][i] <= (1 + delta) * profile.loss[0][i] && macsAt[j] < macsAt[best]) best = j;
    }
    return best;
  });
}

/** Every two-width schedule "width a for steps < k, width b from step k on" (a ≠ b, 1 ≤ k < steps). */
export function switchGenomes(steps: number, choices: number): Genome[] {
  const out: Genome[] = [];
  for (let a = 0; a < choices; a++) {
    for (let b = 0; b < choices; b++) {
      if (a === b) continue;
      for (let k = 1; k < steps; k++) out.push(Array.from({ length: steps }, (_, i) => i < k ? a : b));
    }
  }
  return out;
}

/**
 * The switch seeds of the initial population: for each saving s of `savings` and each width index j > 0, the
 * switch genome "width j for the k noisiest steps, then width 1" with the fewest k that saves at least s of
 * width 1's MACs (a width that cannot save s, e.g. 0.75 past ~30%, gives none). These are the schedules DDSM's
 * searches end at, which 16 uniform and random genomes almost never hit.
 */
export function switchSeedGenomes(
  steps: number,
  macsAt: readonly number[],
  savings: readonly number[],
): Genome[] {
  const toFull = switchGenomes(steps, macsAt.length).filter((g) => g[steps - 1] === 0);
  const out: Genome[] = [];
  for (const s of savings) {
    for (let j = 1; j < macsAt.length; j++) {
      // switchGenomes lists k in increasing order, so the first match has the fewest narrow steps; 1e-9
      // absorbs the rounding of a saving that is exactly s.
      const g = toFull.find((g) => g[0] === j && 1 - averageMacs(g, macsAt) / macsAt[0] >= s - 1e-9);
      if (g) out.push(g);
    }
  }
  return uniqueGenomes(out);
}

/** The genomes DDSM puts in the GA's initial population after the uniform ones: switch seeds, profile seeds. */
export function ddsmSeedGenomes(
  d: Pick<SearchConfig["ddsm"], "switchSeeds" | "profileSeeds">,
  profile: StepProfile,
  macsAt: readonly number[],
): Genome[] {
  return [
    ...switchSeedGenomes(profile.sigmas.length, macsAt, d.switchSeeds),
    ...d.profileSeeds.map((delta) => profileGenome(profile, macsAt, delta)),
  ];
}

// ---------------------------------------------------------------------------------------------------------------
// Data, supernet and profile.

/** Images start..end−1 of `ds` as a dataset (the training part, or the held-out part of the profile). */
export function datasetSlice(ds: Dataset, start: number, end: number): Dataset {
  if (!(0 <= start && start < end && end <= ds.length)) {
    throw new Error(`datasetSlice: [${start}, ${end}) is not a range of ${ds.name} (${ds.length} images)`);
  }
  const at = (i: number) => {
    if (!Number.isInteger(i) || i < 0 || i >= end - start) {
      throw new Error(`${ds.name}[${start}:${end}]: index ${i} is out of range [0, ${end - start})`);
    }
    return start + i;
  };
  return {
    name: `${ds.name}[${start}:${end}]`,
    length: end - start,
    channels: ds.channels,
    height: ds.height,
    width: ds.width,
    numClasses: ds.numClasses,
    get: (i) => ds.get(at(i)),
    bytes: (i) => ds.bytes(at(i)),
    label: (i) => ds.label(at(i)),
  };
}

/** A supernet ready to sample: the network (eval mode), its σ_data and where it came from. */
export interface Supernet {
  net: UNet;
  sigmaData: number;
  source: string;
  trainSeconds?: number;
}

/**
 * Loads the EMA network of a `deno task train` run folder (latest checkpoint) or of a checkpoint folder; `flag`
 * names the option that gave the path in errors.
 */
export async function loadSupernetCheckpoint(
  path: string,
  device: Device,
  flag = "--supernet",
): Promise<Supernet> {
  let dir = path;
  try {
    await Deno.stat(`${path}/state.json`);
  } catch {
    const latest = await latestCheckpoint(path).catch(() => null);
    if (!latest) throw new UsageError(`${flag} ${path}: neither a checkpoint nor a run folder with one`);
    dir = latest;
  }
  const state = await readTrainState(dir);
  const cfg = await parseTrainConfig(state.config);
  const net = new UNet(networkSpec(cfg), { device }).eval();
  try {
    const ck = await loadCheckpoint(dir, device, { model: true, ema: true });
    try {
      net.loadStateDict({ ...ck.model, ...ck.ema });
    } finally {
      disposeCheckpoint(ck);
    }
  } catch (e) {
    net.dispose();
    throw e;
  }
  return { net, sigmaData: cfg.sigmaData, source: dir };
}

/**
 * Loads a supernet saved by another DDSM search (its `supernet.safetensors`: EMA weights of the base network
 * of the data, trained with σ_data 0.5).
 */
export async function loadSupernetFile(path: string, spec: UNetSpec, device: Device): Promise<Supernet> {
  const net = new UNet(spec, { device }).eval();
  try {
    await net.loadSafetensors(path);
  } catch (e) {
    net.dispose();
    throw new UsageError(`--supernet ${path}: ${(e as Error).message}`);
  }
  return { net, sigmaData: parseTrainerConfig({ network: spec }).sigmaData, source: path };
}

/**
 * The supernet trained by this search: loaded from the run folder when a previous run saved it, else trained
 * with the sandwich rule on `train` (the warm-up and EMA half-life scaled to its length like a search
 * candidate's) and saved there. A run killed while training it trains it again from the start.
 */
async function trainedSupernet(
  cfg: SearchConfig,
  spec: UNetSpec,
  train: Dataset,
  device: Device,
  emit: (e: DdsmEvent) => void,
  signal?: AbortSignal,
): Promise<Supernet> {
  const path = `${cfg.out}/${SUPERNET_FILE}`;
  const d = cfg.ddsm;
  const fraction = d.supernetKimg / FULL_RUN.kimg;
  const trainerCfg = parseTrainerConfig({
    network: spec,
    data: cfg.data ?? { kind: "procedural", resolution: spec.imgResolution },
    seed: cfg.seed,
    batch: d.supernetBatch,
    lr: cfg.training.lr,
    lrRampupKimg: FULL_RUN.lrRampupKimg * fraction,
    emaHalfLifeKimg: FULL_RUN.emaHalfLifeKimg * fraction,
    pMean: FULL_RUN.pMean,
    logEvery: cfg.training.logEvery,
    sandwich: true,
  });
  let trainSeconds: number | undefined;
  try {
    await Deno.stat(path);
    emit({ type: "supernet", nimg: 0, totalNimg: 0, loaded: path });
  } catch {
    const trainer = new Trainer(trainerCfg, device, train);
    const totalNimg = Math.round(d.supernetKimg * 1000);
    try {
      const run = await trainer.run({
        untilNimg: totalNimg,
        signal,
        onLog: (e) => emit({ type: "supernet", nimg: e.nimg, totalNimg, loss: e.loss }),
      });
      if (run.stoppedBy === "aborted") throw new Error("interrupted");
      trainSeconds = run.trainSeconds;
      await saveSafetensors(path, trainer.emaNetwork().stateDict(), {
        kimg: String(d.supernetKimg),
        trainSeconds: String(run.trainSeconds),
      });
    } finally {
      trainer.dispose();
    }
  }
  const net = new UNet(spec, { device }).eval();
  try {
    await net.loadSafetensors(path);
  } catch (e) {
    net.dispose();
    throw e;
  }
  return { net, sigmaData: trainerCfg.sigmaData, source: path, trainSeconds };
}

/** The step-importance profile: the EDM loss of each width at each σ of the sampler's grid. */
export interface StepProfile {
  widths: number[];
  /** t_0 … t_{N−1} of the Heun grid (the noise level of each step). */
  sigmas: number[];
  /** loss[w][i]: mean loss of width widths[w] at sigmas[i]. */
  loss: number[][];
  images: number;
}

/**
 * The EDM loss (λ(σ)-weighted, as in training) of each width at each grid σ, on `images` held-out images with
 * noise fixed per σ (the same for every width; eval/denoising_loss.ts).
 */
export async function stepProfile(
  net: UNet,
  sigmaData: number,
  data: Dataset,
  images: number,
  sigmas: readonly number[],
  widths: readonly number[],
  seed: number,
): Promise<StepProfile> {
  const n = Math.min(images, data.length);
  const batch = imageBatch(data, 0, n, net.spec.labelDim ?? 0, net.device);
  try {
    const denoisers = widths.map((width) =>
      new EDMPrecond((a, c, l) => net.forward(a, c, l ?? null, { width }), { sigmaData })
    );
    const loss = await lossAtSigmas(denoisers, batch, sigmas, seed);
    return { widths: [...widths], sigmas: [...sigmas], loss, images: n };
  } finally {
    disposeBatch(batch);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scoring genomes through the search memory.

/** What the evaluation of genomes shares. */
interface Scorer {
  cfg: SearchConfig;
  storage: SearchStorage;
  worker: string;
  supernet: Supernet;
  features: FeatureExtractor;
  reference: FidStatistics;
  widths: number[];
  macsAt: number[];
  signal?: AbortSignal;
  emit: (e: DdsmEvent) => void;
  /** Genomes scored in this process (for progress). */
  count: number;
}

/** Fitness of a scored trial: fidWeight · proxy FID + macsWeight · MACs in millions (failed: +∞). */
export function fitnessOf(t: Trial, w: { fidWeight: number; macsWeight: number }): number {
  if (t.status !== "done" || !Number.isFinite(t.scores.proxyFid)) return Infinity;
  return w.fidWeight * t.scores.proxyFid! + w.macsWeight * (t.costs.macs ?? 0) / 1e6;
}

/**
 * The trial of `genome`: from the memory when it was scored before (nothing is computed), else added, scored
 * with the proxy FID at its width schedule and committed.
 */
async function scoreGenome(sc: Scorer, genome: Genome, proposer: string): Promise<Trial> {
  const key = genomeKey(genome);
  const known = await sc.storage.getTrialByKey(key);
  if (known && (known.status === "done" || known.status === "failed")) return known;
  if (sc.signal?.aborted) throw new Error("interrupted");
  const schedule = genomeSchedule(genome, sc.widths);
  const macs = averageMacs(genome, sc.macsAt);
  if (!known) {
    await sc.storage.addTrial({
      key,
      spec: { widths: schedule.widths },
      proposer,
      seed: sc.cfg.seed,
      costs: { macs },
    });
  }
  const trial = await sc.storage.claimNext(sc.worker);
  if (!trial || trial.key !== key) {
    throw new Error(`ddsm: expected to claim the trial of genome ${key}, got ${trial?.key ?? "none"}`);
  }
  sc.count++;
  sc.emit({ type: "trial-start", trial, index: sc.count, total: 0 });
  const gen = new NetworkGenerator(sc.supernet.net, { sigmaData: sc.supernet.sigmaData, width: schedule });
  try {
    const m = await measureFid("RFID", gen, sc.features, sc.reference, proxyProtocol(sc.cfg));
    await sc.storage.finish(trial.id, sc.worker, {
      status: "done",
      scores: { proxyFid: m.value, proxyName: m.name },
      costs: { macs, proxySeconds: m.seconds },
    });
  } catch (e) {
    await sc.storage.finish(trial.id, sc.worker, { status: "failed", error: (e as Error).message });
  }
  const done = (await sc.storage.getTrial(trial.id))!;
  sc.emit({ type: "trial-end", trial: done, index: sc.count, total: 0 });
  return done;
}

/** FID-n of genomes, cached by key in fid.json of the run folder. */
async function fidOf(
  sc: Scorer,
  genomes: readonly Genome[],
): Promise<Map<string, { fid: number; name: string; seconds: number }>> {
  const path = `${sc.cfg.out}/fid.json`;
  let cache: Record<string, { fid: number; name: string; seconds: number }> = {};
  try {
    cache = JSON.parse(await Deno.readTextFile(path));
  } catch { /* none yet */ }
  const n = sc.cfg.ddsm.fidN;
  for (const g of genomes) {
    const key = genomeKey(g);
    if (n === 0 || cache[key] || sc.signal?.aborted) continue;
    const gen = new NetworkGenerator(sc.supernet.net, {
      sigmaData: sc.supernet.sigmaData,
      width: genomeSchedule(g, sc.widths),
    });
    const m = await measureFid("FID", gen, sc.features, sc.reference, {
      ...proxyProtocol(sc.cfg),
      n,
    });
    cache[key] = { fid: m.value, name: m.name, seconds: m.seconds };
    await writeTextAtomic(path, JSON.stringify(cache, null, 2) + "\n");
  }
  return new Map(Object.entries(cache));
}

// ---------------------------------------------------------------------------------------------------------------
// The search.

/** Runs (or resumes) a DDSM search; see the file comment. */
export async function runDdsmSearch(
  input: SearchConfigInput | Record<string, unknown>,
  opts: Omit<SearchOptions, "proposer" | "onEvent"> & { onEvent?: (e: DdsmEvent) => void } = {},
): Promise<SearchOutcome & { best: { widths: number[]; macs: number; proxyFid: number } }> {
  const t0 = performance.now();
  const { raw, given, lock } = await claimRunFolder(input, { method: "ddsm" });
  using _lock = lock;
  const emit = opts.onEvent ?? (() => {});
  let storage: SearchStorage | undefined;
  let device: Device | undefined;
  let features: FeatureExtractor | undefined;
  let supernet: Supernet | undefined;
  try {
    const opened = await openMemory(given, raw, opts.resume ?? false);
    storage = opened.storage;
    const cfg = opened.cfg, d = cfg.ddsm, dir = cfg.out;
    if (cfg.method !== "ddsm") throw new UsageError(`${dir} holds a ${cfg.method} search, not a ddsm one`);
    await storage.requeueStale(0);
    device = opts.device ?? await Device.create({ backend: cfg.backend });
    const dataset = await openDataset(
      cfg.data ?? { kind: "procedural", resolution: DEFAULT_NETWORK.imgResolution },
    );
    // The profile's images are held out of the supernet's training: the last profileN of the data.
    const heldOut = Math.min(d.profileN, dataset.length >> 1);
    const train = datasetSlice(dataset, 0, dataset.length - heldOut);
    const profileData = datasetSlice(dataset, dataset.length - heldOut, dataset.length);
    const budget = d.population * (d.generations + 1) + d.switchCandidates;
    emit({
      type: "start",
      dir,
      resumed: opened.resumed,
      proposer: GA_PROPOSER,
      device: `${device.info.adapter} (${device.kind})`,
      trials: budget,
      memory: opened.label,
    });
    supernet = d.supernet?.endsWith(".safetensors")
      ? await loadSupernetFile(d.supernet, baseNetwork(dataset), device)
      : d.supernet
      ? await loadSupernetCheckpoint(d.supernet, device)
      : await trainedSupernet(cfg, baseNetwork(dataset), train, device, emit, opts.signal);
    if (d.supernet) emit({ type: "supernet", nimg: 0, totalNimg: 0, loaded: supernet.source });
    const spec = supernet.net.spec;
    if (spec.imgResolution !== dataset.height || spec.inChannels !== dataset.channels) {
      throw new UsageError(
        `--supernet ${d.supernet}: its network makes ${spec.inChannels}×${spec.imgResolution}² images, the data ` +
          `has ${dataset.channels}×${dataset.height}²`,
      );
    }

    const settings = protocolSettings(proxyProtocol(cfg));
    const grid = edmTimeSteps(settings.steps, {
      sigmaMin: settings.sigmaMin,
      sigmaMax: settings.sigmaMax,
      rho: settings.rho,
    });
    const sigmas = Array.from(grid.slice(0, settings.steps));
    const widths = [...DDSM_WIDTHS];
    const profilePath = `${dir}/profile.json`;
    let profile: StepProfile;
    try {
      profile = JSON.parse(await Deno.readTextFile(profilePath));
      emit({ type: "profile", seconds: 0, cached: true });
    } catch {
      const p0 = performance.now();
      profile = await stepProfile(
        supernet.net,
        supernet.sigmaData,
        profileData,
        d.profileN,
        sigmas,
        widths,
        cfg.seed,
      );
      await writeTextAtomic(profilePath, JSON.stringify(profile, null, 2) + "\n");
      emit({ type: "profile", seconds: (performance.now() - p0) / 1000, cached: false });
    }

    features = await openFeatureExtractor({ device, data: cfg.data });
    const ref = await referenceStatistics(dataset, features, Math.min(cfg.refN, dataset.length), {
      cacheDir: cfg.cacheDir,
    });
    emit({ type: "reference", cached: ref.cached, seconds: ref.seconds });

    const macsAt = macsPerWidth(spec, widths);
    const sc: Scorer = {
      cfg,
      storage,
      worker: `${Deno.hostname()}:${Deno.pid}`,
      supernet,
      features,
      reference: ref.stats,
      widths,
      macsAt,
      signal: opts.signal,
      emit,
      count: 0,
    };
    const deadline = t0 + cfg.minutes * 60_000;
    let stoppedBy: SearchOutcome["stoppedBy"] = "trials";
    const ga: GaResult = await runGa(
      {
        length: settings.steps,
        choices: widths.length,
        population: d.population,
        generations: d.generations,
        mutationRate: d.mutationRate,
        seed: cfg.seed,
        seeds: ddsmSeedGenomes(d, profile, macsAt),
      },
      async (g) => fitnessOf(await scoreGenome(sc, g, GA_PROPOSER), d),
      {
        shouldStop: () => performance.now() > deadline,
        onGeneration: (record) => emit({ type: "generation", record }),
      },
    );
    if (!ga.complete) stoppedBy = "minutes";

    // The comparison: the switch-at-k schedules closest in average MACs to the best, and FID-n.
    const best = ga.best.genome, bestMacs = averageMacs(best, macsAt);
    const switches = switchGenomes(settings.steps, widths.length)
      .map((g) => ({ g, gap: Math.abs(averageMacs(g, macsAt) - bestMacs) }))
      .sort((a, b) => a.gap - b.gap)
      .slice(0, d.switchCandidates);
    const switchTrials: Trial[] = [];
    // The comparison runs past the time budget: its cost is bounded (switchCandidates genomes, six FID-n).
    for (const { g } of switches) {
      switchTrials.push(await scoreGenome(sc, g, SWITCH_PROPOSER));
    }
    const bestSwitch = switchTrials.filter((t) => t.status === "done")
      .sort((a, b) => a.scores.proxyFid! - b.scores.proxyFid!)[0];
    // The uniform schedules seed the GA; with a population smaller than the widths some are scored here.
    const uniform = uniformGenomes(settings.steps, widths.length);
    for (const g of uniform) await scoreGenome(sc, g, UNIFORM_PROPOSER);
    const switchGenome = bestSwitch
      ? (bestSwitch.spec as { widths: number[] }).widths.map((w) => widths.indexOf(w))
      : null;
    // The uniform schedule the GA's best is measured against: the nearest in average MACs below width 1
    // (width 1 is the quality reference, not a competitor).
    const nearest = nearestUniform(bestMacs, macsAt);
    // FID-n of what the comparison needs (an FID-2048 of width 1 costs minutes here): the GA's best, the best
    // switch, width 1 and the nearest uniform schedule.
    const fids = await fidOf(sc, [
      best,
      ...(switchGenome ? [switchGenome] : []),
      uniform[0],
      uniform[nearest],
    ]);

    const trials = await storage.listTrials();
    const trialOf = (g: Genome) => trials.find((t) => t.key === genomeKey(g));
    const rows = [
      { label: "GA best", g: best },
      ...(switchGenome ? [{ label: "best switch at step k", g: switchGenome }] : []),
      ...uniform.map((g, j) => ({ label: `uniform ${widths[j]}`, g })),
    ].map(({ label, g }) => {
      const t = trialOf(g);
      const macs = averageMacs(g, macsAt);
      const f = fids.get(genomeKey(g));
      return {
        label,
        widths: g.map((j) => widths[j]),
        macs,
        saving: 1 - macs / macsAt[0],
        proxyFid: t?.scores.proxyFid ?? NaN,
        fid: f?.fid ?? null,
        fidName: f?.name ?? null,
        fitness: t ? fitnessOf(t, d) : NaN,
      };
    });
    const bestRow = rows[0];
    const verdict = doneWhen(
      bestRow,
      rows[rows.length - uniform.length],
      rows[rows.length - uniform.length + nearest],
    );
    await writeTextAtomic(
      `${dir}/schedule.json`,
      JSON.stringify(
        {
          widths: bestRow.widths,
          sigmas,
          averageMacs: bestRow.macs,
          fullWidthMacs: macsAt[0],
          saving: bestRow.saving,
          proxyFid: bestRow.proxyFid,
          proxyName: trialOf(best)?.scores.proxyName,
          fid: bestRow.fid,
          fidName: bestRow.fidName,
          fitness: ga.best.fitness,
          verdict,
          comparison: rows,
          history: ga.history,
          supernet: supernet.source,
        },
        null,
        2,
      ) + "\n",
    );

    const grids: ReportGrid[] = [];
    if (cfg.gridImages > 0) {
      const gen = new NetworkGenerator(supernet.net, {
        sigmaData: supernet.sigmaData,
        width: genomeSchedule(best, widths),
      });
      const x = gen.generate(0, cfg.gridImages, { seed: cfg.seed, settings });
      try {
        const png = encodeImageGrid({ data: await x.toArray(), shape: x.shape }, { cols: 6 });
        await Deno.mkdir(`${dir}/grids`, { recursive: true });
        await writeFileAtomic(`${dir}/grids/ddsm-best.png`, png);
        grids.push({ label: "GA best schedule", png, path: "grids/ddsm-best.png" });
      } finally {
        x.dispose();
      }
    }
    const report = await writeReport(
      dir,
      {
        title: `DDSM search: ${dir}`,
        settings: { ...cfg, stoppedBy },
        timing: {
          started: Math.round(performance.timeOrigin + t0),
          finished: Date.now(),
          wallSeconds: (performance.now() - t0) / 1000,
          perTrial: { trainSeconds: supernet.trainSeconds ?? null, proxySeconds: meanOf(trials) },
        },
        trials,
        paretoIds: paretoFront(trials).map((t) => t.id),
        bestSoFar: [...bestSoFarByProposer(trials)].map(([proposer, points]) => ({
          proposer,
          points: points.filter((p) => p.best !== null).map((p) => ({ trial: p.index, best: p.best! })),
        })),
        grids,
        sections: ddsmSections(rows, verdict, profile, ga.history, sigmas, macsAt, supernet.source),
      } satisfies ReportInput,
    );
    emit({ type: "stop", reason: stoppedBy });
    emit({ type: "report", html: report.html, json: report.json });
    return {
      dir,
      trials,
      stoppedBy,
      reportHtml: report.html,
      reportJson: report.json,
      summary: summaryTable(rows) + "\n" + verdictLine(verdict),
      seconds: (performance.now() - t0) / 1000,
      best: { widths: bestRow.widths, macs: bestRow.macs, proxyFid: bestRow.proxyFid },
    };
  } catch (e) {
    if ((e as Error).message !== "interrupted" || !storage) throw e;
    // Everything committed stays in the memory; --resume replays the GA from it.
    emit({ type: "stop", reason: "interrupted" });
    return {
      dir: given.out,
      trials: await storage.listTrials(),
      stoppedBy: "interrupted",
      reportHtml: "",
      reportJson: "",
      summary: "interrupted: run the same command with --resume to continue",
      seconds: (performance.now() - t0) / 1000,
      best: { widths: [], macs: NaN, proxyFid: NaN },
    };
  } finally {
    supernet?.net.dispose();
    features?.dispose();
    await storage?.close();
    if (device && !opts.device) device.destroy();
  }
}

/**
 * Index of the uniform schedule (a width index > 0) whose average MACs are nearest to `macs`: the schedule of
 * about the same cost that the GA's best must beat.
 */
export function nearestUniform(macs: number, macsAt: readonly number[]): number {
  let best = 1;
  for (let j = 2; j < macsAt.length; j++) {
    if (Math.abs(macsAt[j] - macs) < Math.abs(macsAt[best] - macs)) best = j;
  }
  return best;
}

/** The acceptance test of a found schedule, on the FID-n of the comparison (null: no FID-n). */
export interface DdsmVerdict {
  /** MACs saved against width 1 everywhere (fraction). */
  saving: number;
  /** FID-n of the GA's best over that of width 1 (≤ 1.05 passes). */
  fidRatio: number | null;
  /** The uniform schedule of the nearest average MACs (below width 1). */
  nearestUniform: string;
  /** Its FID-n. */
  nearestUniformFid: number | null;
  /** At least 40% saved, FID-n within 5% of width 1's and below the nearest uniform schedule's. */
  met: boolean | null;
}

/** The verdict of the best row against width 1 (`full`) and the nearest uniform row. */
export function doneWhen(
  best: ComparisonRow,
  full: ComparisonRow,
  nearest: ComparisonRow,
): DdsmVerdict {
  const fidRatio = best.fid !== null && full.fid !== null ? best.fid / full.fid : null;
  const met = fidRatio === null || nearest.fid === null
    ? null
    : best.saving >= 0.4 && fidRatio <= 1.05 && best.fid! < nearest.fid;
  return {
    saving: best.saving,
    fidRatio,
    nearestUniform: nearest.label,
    nearestUniformFid: nearest.fid,
    met,
  };
}

function verdictLine(v: DdsmVerdict): string {
  if (v.met === null) return `saving ${(100 * v.saving).toFixed(1)}% (no FID-n: fidN 0)`;
  return `saving ${(100 * v.saving).toFixed(1)}% (target ≥ 40%), FID-n ${
    (100 * (v.fidRatio! - 1)).toFixed(1)
  }% against width 1 (target ≤ +5%), the nearest uniform schedule (${v.nearestUniform} FID-n ${
    v.nearestUniformFid!.toFixed(3)
  }): ${v.met ? "targets met" : "targets not met"}`;
}

function meanOf(trials: readonly Trial[]): number | null {
  const v = trials.map((t) => t.costs.proxySeconds).filter((x): x is number => x !== undefined);
  return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
}

/** One row of the comparison. */
export interface ComparisonRow {
  label: string;
  widths: number[];
  macs: number;
  saving: number;
  proxyFid: number;
  fid: number | null;
  fidName: string | null;
  fitness: number;
}

/** The terminal table of the comparison. */
function summaryTable(rows: readonly ComparisonRow[]): string {
  const lines = ["schedule                 MACs/eval  saving  proxy FID     FID-n  widths"];
  for (const r of rows) {
    lines.push(
      `${r.label.padEnd(24)} ${(r.macs / 1e6).toFixed(2).padStart(8)} M ${
        (100 * r.saving).toFixed(1).padStart(5)
      }% ` +
        `${r.proxyFid.toFixed(3).padStart(10)} ${
          r.fid === null ? "–".padStart(9) : r.fid.toFixed(3).padStart(9)
        }  ` +
        r.widths.join(" "),
    );
  }
  return lines.join("\n");
}

/** The report's DDSM sections: the schedule, the comparison, the profile and the GA's history. */
function ddsmSections(
  rows: readonly ComparisonRow[],
  verdict: DdsmVerdict,
  profile: StepProfile,
  history: readonly GenerationRecord[],
  sigmas: readonly number[],
  macsAt: readonly number[],
  source: string,
): ReportSection[] {
  const best = rows[0];
  const byStep: ChartSpec = {
    title: "Width per sampling step",
    xLabel: "step",
    yLabel: "width",
    series: rows.filter((r, i) => i === 0 || r.label.startsWith("best switch")).map((r) => ({
      name: r.label,
      kind: "step" as const,
      points: r.widths.map((w, i) => [i, w] as [number, number]),
    })),
  };
  const bySigma: ChartSpec = {
    title: "Width against the step's noise level",
    xLabel: "σ",
    yLabel: "width",
    xLog: true,
    series: [{ name: "GA best", kind: "scatter", points: best.widths.map((w, i) => [sigmas[i], w]) }],
  };
  const profileChart: ChartSpec = {
    title: "Step-importance profile: loss of each width at each σ of the grid",
    xLabel: "σ",
    yLabel: "EDM loss",
    xLog: true,
    yLog: true,
    series: profile.widths.map((w, j) => ({
      name: `width ${w}`,
      kind: "line" as const,
      points: profile.sigmas.map((s, i) => [s, profile.loss[j][i]] as [number, number]),
    })),
  };
  const gaChart: ChartSpec = {
    title: "GA: best fitness per generation",
    xLabel: "generation",
    yLabel: "fitness",
    series: [{ name: "best", kind: "line", points: history.map((h) => [h.generation, h.best]) }],
  };
  return [
    {
      title: "DDSM schedule",
      text: `Supernet ${source}. The GA's best schedule runs at ${(best.macs / 1e6).toFixed(3)} M MACs per ` +
        `network evaluation on average, against ${(macsAt[0] / 1e6).toFixed(3)} M at width 1 everywhere ` +
        `(${(100 * best.saving).toFixed(1)}% saved). The switch schedule is the best two-width "switch at ` +
        `step k" schedule among those closest in average MACs to the GA's best. FID-n is measured for the ` +
        `GA's best, that switch, width 1 and the uniform schedule nearest in MACs; ${verdictLine(verdict)}.`,
      table: {
        columns: ["schedule", "MACs/eval (M)", "saving", "proxy FID", "FID-n", "fitness", "widths per step"],
        rows: rows.map((r) => [
          r.label,
          Number((r.macs / 1e6).toFixed(3)),
          `${(100 * r.saving).toFixed(1)}%`,
          Number.isFinite(r.proxyFid) ? Number(r.proxyFid.toFixed(3)) : null,
          r.fid === null ? null : `${r.fid.toFixed(3)} (${r.fidName})`,
          Number.isFinite(r.fitness) ? Number(r.fitness.toFixed(3)) : null,
          r.widths.join(" "),
        ]),
      },
      charts: [byStep, bySigma],
    },
    {
      title: "Step-importance profile",
      text: `EDM loss (λ(σ)-weighted) of each width at each σ of the sampler's grid, on ${profile.images} ` +
        `held-out images with the same noise for every width.`,
      table: {
        columns: ["σ", ...profile.widths.map((w) => `width ${w}`)],
        rows: profile.sigmas.map((s, i) => [
          Number(s.toPrecision(4)),
          ...profile.loss.map((l) => Number(l[i].toPrecision(4))),
        ]),
      },
      charts: [profileChart],
    },
    {
      title: "Genetic search",
      table: {
        columns: ["generation", "best fitness", "best genome (width indices)", "evaluated"],
        rows: history.map((h) => [h.generation, Number(h.best.toFixed(4)), h.bestKey, h.evaluated]),
      },
      charts: [gaChart],
    },
  ];
}
