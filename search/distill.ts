/**
 * @file Block-wise distillation NAS (`deno task search --method distill`): "Lightweight Diffusion Models with
 * Distillation-Based Block Neural Architecture Search" (Tang et al. 2023), on the block-wise supernet of DNA
 * (Li et al. 2020). Given a trained teacher UNet, it finds a smaller student block by block:
 *
 *     teacher   ← --teacher RUN (a `deno task train` run folder or checkpoint), or the default network trained
 *                 here (teacher.safetensors in the run folder, reused by --resume)
 *     cut       ← one block per encoder level, the middle, one per decoder level (models/blocks_cut.ts); the
 *                 teacher's own blocks reassemble it exactly
 *     supernet  ← one UNet of the teacher's shape, randomly initialised; per batch one teacher forward gives every
 *                 block's inputs and outputs, and each block, under one candidate drawn per block per step (a
 *                 width of its residual branches, a depth, attention on/off), learns its teacher block's output
 *                 from the teacher's inputs (relative MSE); the candidates of a block share its weights
 *     losses    ← every candidate's relative MSE on held-out images (the end of the data) with fixed σ and
 *                 noise, read back once (candidates.json)
 *     local     ← per block the fewest-MACs candidate whose loss is within (1 + δ) of the block's best (the
 *                 paper's rule); global ← the least summed block loss under the local student's MACs, for
 *                 comparison (exact, by merging the blocks' (MACs, loss) Pareto fronts)
 *     retrain   ← the assembled student (supernet weights, the teacher's mapping network) trained with
 *                 L = L_EDM + λ(τ)·Σ_b w_b·MSE(student block b, teacher block b), each student block fed by the
 *                 student's own previous blocks, w_b = 1 / (B·E[teacher output²]) (so the sum is the blocks'
 *                 mean relative error); λ decaying (cosine by default), and the ablations (linear, constant,
 *                 λ = 0); the global student too when it differs
 *     score     ← proxy FID (RFID-n) of the teacher and every student, FID-n of the teacher and the student
 *     report    ← student.json, student.safetensors (EMA weights of the whole container UNet, used under the
 *                 choices), report.html / report.json
 *
 * MACs and parameters follow models/cost.ts; a student's are its mapping network's plus its blocks' under their
 * choices (models/blocks_cut.ts `blockPlan`), so they add up block by block.
 *
 * The time of each part, measured and estimated, is in the defaults' comment (search/config.ts). A search
 * killed part way keeps its teacher, supernet, retrained students (students/) and every FID (scores.json):
 * `--resume` computes only what is missing.
 */

import {
  add,
  cat,
  Device,
  div,
  exp,
  log,
  mean,
  mseLoss,
  mul,
  noGrad,
  optim,
  randn,
  randNormal,
  reshape,
  rsqrt,
  saveSafetensors,
  scope,
  type Tensor,
} from "../engine/mod.ts";
import { BatchIterator, type Dataset, openDataset } from "../models/data.ts";
import { DEFAULT_NETWORK } from "../models/train.ts";
import { emaBeta, learningRate, parseTrainerConfig, Trainer } from "../models/trainer.ts";
import { UNet, type UNetSpec } from "../models/unet.ts";
import { edmLoss, EDMPrecond } from "../models/edm.ts";
import {
  blockCandidates,
  type BlockChoice,
  type BlockCut,
  blockInputs,
  blockPlan,
  BlockwiseUNet,
  choiceLabel,
  cutUNet,
  fullChoice,
  mappingPlan,
  runBlock,
  runBlocks,
  studentPlan,
} from "../models/blocks_cut.ts";
import { NetworkGenerator } from "../models/generate.ts";
import { encodeImageGrid } from "../models/images.ts";
import { layersCost, unetCost } from "../models/cost.ts";
import { type FeatureExtractor, openFeatureExtractor } from "../eval/features.ts";
import { imageBatch } from "../eval/denoising_loss.ts";
import type { FidStatistics } from "../eval/fid.ts";
import { measureFid, protocolSettings, referenceStatistics } from "../eval/proxy.ts";
import { UsageError } from "../util/errors.ts";
import { writeFileAtomic, writeTextAtomic } from "../util/files.ts";
import { hash2, Rng } from "../util/random.ts";
import { FULL_RUN, type LambdaSchedule, type SearchConfig, type SearchConfigInput } from "./config.ts";
import { baseNetwork, claimRunFolder, openMemory, type SearchOptions } from "./diffnas.ts";
import { datasetSlice, loadSupernetCheckpoint } from "./ddsm.ts";
import { type ChartSpec, type ReportGrid, type ReportSection, writeReport } from "./report.ts";
import { proxyProtocol } from "./runner.ts";

/** Progress of a distillation search. */
export type DistillEvent =
  | { type: "start"; dir: string; resumed: boolean; device: string; blocks: string[] }
  | { type: "teacher"; nimg: number; totalNimg: number; loss?: number; loaded?: string }
  | { type: "supernet"; nimg: number; totalNimg: number; losses: number[] }
  | { type: "candidates"; count: number; seconds: number }
  | { type: "selected"; local: string[]; global: string[] | null }
  | {
    type: "retrain";
    label: string;
    nimg: number;
    totalNimg: number;
    edm: number;
    distill: number | null;
    loaded?: string;
  }
  | { type: "reference"; cached: boolean; seconds: number }
  | { type: "fid"; label: string; name: string; value: number; seconds: number }
  | { type: "stop"; reason: string }
  | { type: "report"; html: string; json: string };

/** Files of the run folder. */
export const TEACHER_FILE = "teacher.safetensors";
export const SUPERNET_FILE = "supernet.safetensors";
export const STUDENT_FILE = "student.safetensors";

// ---------------------------------------------------------------------------------------------------------------
// λ(τ), the selection rules.

/** λ at training progress τ ∈ [0, 1]: λ0·(1 − τ), λ0·(1 + cos πτ)/2, λ0, or 0. */
export function lambdaAt(schedule: LambdaSchedule, lambda0: number, tau: number): number {
  if (!(tau >= 0 && tau <= 1)) throw new Error(`lambdaAt: τ must be in [0, 1], got ${tau}`);
  switch (schedule) {
    case "linear":
      return lambda0 * (1 - tau);
    case "cosine":
      return lambda0 * (1 + Math.cos(Math.PI * tau)) / 2;
    case "constant":
      return lambda0;
    case "zero":
      return 0;
  }
}

/** One candidate of a block with its cost and held-out loss. */
export interface ScoredCandidate {
  choice: BlockChoice;
  label: string;
  /** MACs and parameters of the block under this choice (models/cost.ts convention). */
  macs: number;
  params: number;
  /** Held-out relative MSE to the teacher's block output. */
  loss: number;
}

/**
 * The local rule (Tang et al.): the index of the fewest-MACs candidate whose loss is at most (1 + δ) times the
 * least loss of the block (ties in MACs: the lower loss, then the earlier candidate).
 */
export function selectLocal(cands: readonly ScoredCandidate[], delta: number): number {
  if (!cands.length) throw new Error("selectLocal: no candidates");
  if (!(delta >= 0)) throw new Error(`selectLocal: delta must be ≥ 0, got ${delta}`);
  const finite = cands.filter((c) => Number.isFinite(c.loss));
  if (!finite.length) throw new Error("selectLocal: no candidate has a finite loss");
  const best = Math.min(...finite.map((c) => c.loss));
  let pick = -1;
  cands.forEach((c, i) => {
    if (!(c.loss <= (1 + delta) * best)) return;
    const p = cands[pick];
    if (pick < 0 || c.macs < p.macs || (c.macs === p.macs && c.loss < p.loss)) pick = i;
  });
  return pick;
}

/**
 * The global alternative: one candidate per block with the least summed loss whose summed MACs are at most
 * `maxMacs` (null when none fits). Exact: the blocks' (MACs, loss) Pareto fronts are merged block by block.
 */
export function selectGlobal(
  blocks: readonly (readonly ScoredCandidate[])[],
  maxMacs: number,
): number[] | null {
  type Point = { macs: number; loss: number; picks: number[] };
  let front: Point[] = [{ macs: 0, loss: 0, picks: [] }];
  for (const cands of blocks) {
    const next: Point[] = [];
    for (const p of front) {
      cands.forEach((c, i) => {
        if (!Number.isFinite(c.loss)) return;
        const macs = p.macs + c.macs;
        if (macs <= maxMacs) next.push({ macs, loss: p.loss + c.loss, picks: [...p.picks, i] });
      });
    }
    next.sort((a, b) => a.macs - b.macs || a.loss - b.loss);
    front = [];
    for (const p of next) if (!front.length || p.loss < front[front.length - 1].loss) front.push(p);
    if (!front.length) return null;
  }
  return front.reduce((a, b) => (b.loss < a.loss ? b : a)).picks;
}

// ---------------------------------------------------------------------------------------------------------------
// Losses.

/** EDM's network input c_in·(y + σ·ε) and c_noise = ln(σ)/4 (models/edm.ts `EDMPrecond`). */
export function noisyInput(
  images: Tensor,
  sigma: Tensor,
  noise: Tensor,
  sigmaData: number,
): { xIn: Tensor; cNoise: Tensor } {
  const N = images.shape[0], s = reshape(sigma, [N, 1, 1, 1]);
  const xIn = mul(add(images, mul(noise, s)), rsqrt(add(mul(s, s), sigmaData * sigmaData)));
  return { xIn, cNoise: mul(log(sigma), 0.25) };
}

/** Relative MSE of a block: the mean over its outputs of MSE(student, teacher) / mean(teacher²). */
export function relativeMse(student: readonly Tensor[], teacher: readonly Tensor[]): Tensor {
  const parts = student.map((s, j) => {
    const power = noGrad(() => mean(mul(teacher[j], teacher[j])));
    return div(mseLoss(s, teacher[j]), add(power, 1e-12));
  });
  return parts.length === 1 ? parts[0] : mul(parts.reduce((a, b) => add(a, b)), 1 / parts.length);
}

/** The parts of the joint loss (scalars; `distill` null when λ = 0 and it was not computed). */
export interface JointLoss {
  loss: Tensor;
  edm: Tensor;
  distill: Tensor | null;
}

/**
 * The dynamic joint loss of one batch: L = L_EDM + λ·Σ_b w_b·MSE(student block b, teacher block b), with the
 * student's blocks fed by its own previous blocks and the teacher run (without gradients) on the same noisy
 * input. `sigma` / `noise` fix the draws (tests); λ = 0 skips the teacher.
 */
export function jointLoss(
  student: BlockwiseUNet,
  teacher: UNet,
  images: Tensor,
  labels: Tensor | undefined,
  lambda: number,
  weights: readonly number[],
  opts: { sigmaData?: number; pMean?: number; pStd?: number; sigma?: Tensor; noise?: Tensor } = {},
): JointLoss {
  const cuts = student.cuts;
  if (weights.length !== cuts.length) {
    throw new Error(`jointLoss: ${cuts.length} blocks, got ${weights.length} weights`);
  }
  // The distillation term is formed inside F: off the tape edmLoss frees F's output once it has used it.
  let distill: Tensor | null = null;
  const F = (xIn: Tensor, c: Tensor, l?: Tensor) => {
    const sBlocks = student.forwardBlocks(xIn, c, l ?? null);
    if (lambda > 0) {
      const tBlocks = noGrad(() =>
        runBlocks(teacher, cuts, null, xIn, teacher.embed(c, teacher.spec.labelDim ? l ?? null : null))
      );
      for (let b = 0; b < cuts.length; b++) {
        const per = sBlocks[b].map((s, j) => mseLoss(s, tBlocks[b][j]));
        const m = per.length === 1 ? per[0] : mul(per.reduce((a, v) => add(a, v)), 1 / per.length);
        const term = mul(m, weights[b]);
        distill = distill ? add(distill, term) : term;
      }
    }
    return sBlocks[sBlocks.length - 1][0];
  };
  const precond = new EDMPrecond(F, { sigmaData: opts.sigmaData ?? 0.5 });
  const r = edmLoss(precond, images, labels, {
    pMean: opts.pMean,
    pStd: opts.pStd,
    sigma: opts.sigma,
    noise: opts.noise,
  });
  if (!distill) return { loss: r.loss, edm: r.loss, distill: null };
  return { loss: add(r.loss, mul(distill!, lambda)), edm: r.loss, distill };
}

// ---------------------------------------------------------------------------------------------------------------
// The search's parts.

/** What the parts share. */
interface Context {
  cfg: SearchConfig;
  dir: string;
  device: Device;
  train: Dataset;
  teacher: UNet;
  sigmaData: number;
  cuts: BlockCut[];
  emit: (e: DistillEvent) => void;
  signal?: AbortSignal;
}

/** The teacher: loaded from --teacher, from the run folder, or trained here and saved there. */
async function obtainTeacher(
  cfg: SearchConfig,
  dataset: Dataset,
  train: Dataset,
  device: Device,
  emit: (e: DistillEvent) => void,
  signal?: AbortSignal,
): Promise<{ net: UNet; sigmaData: number; source: string; trainSeconds?: number }> {
  const d = cfg.distill;
  if (d.teacher) {
    const t = await loadSupernetCheckpoint(d.teacher, device, "--teacher");
    emit({ type: "teacher", nimg: 0, totalNimg: 0, loaded: t.source });
    return t;
  }
  const spec = baseNetwork(dataset), path = `${cfg.out}/${TEACHER_FILE}`;
  const fraction = d.teacherKimg / FULL_RUN.kimg;
  let trainSeconds: number | undefined;
  try {
    await Deno.stat(path);
    emit({ type: "teacher", nimg: 0, totalNimg: 0, loaded: path });
  } catch {
    const trainer = new Trainer(
      parseTrainerConfig({
        network: spec,
        data: cfg.data ?? { kind: "procedural", resolution: spec.imgResolution },
        seed: cfg.seed,
        batch: d.batch,
        lr: cfg.training.lr,
        lrRampupKimg: FULL_RUN.lrRampupKimg * fraction,
        emaHalfLifeKimg: FULL_RUN.emaHalfLifeKimg * fraction,
        pMean: FULL_RUN.pMean,
        logEvery: cfg.training.logEvery,
      }),
      device,
      train,
    );
    const totalNimg = Math.round(d.teacherKimg * 1000);
    try {
      const run = await trainer.run({
        untilNimg: totalNimg,
        signal,
        onLog: (e) => emit({ type: "teacher", nimg: e.nimg, totalNimg, loss: e.loss }),
      });
      if (run.stoppedBy === "aborted") throw new Error("interrupted");
      trainSeconds = run.trainSeconds;
      await saveSafetensors(path, trainer.emaNetwork().stateDict(), {
        kimg: String(d.teacherKimg),
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
  return { net, sigmaData: 0.5, source: path, trainSeconds };
}

/** A warm-up of a twelfth of the run (the default run's 0.5 of 6 kimg), then `lr`. */
function rampedLr(lr: number, nimg: number, totalNimg: number): number {
  return learningRate({ lr, lrRampupKimg: totalNimg / 12 / 1000 }, nimg);
}

/**
 * Trains the block-wise supernet: per batch one teacher forward; each block, under one candidate drawn per
 * block per step, learns its teacher block's outputs from the teacher's inputs. Returns the supernet (a UNet of
 * the teacher's shape) and the mean relative loss of each block per log window.
 */
async function trainSupernet(
  ctx: Context,
  candidates: readonly BlockChoice[][],
): Promise<{ net: UNet; history: { nimg: number; losses: number[] }[]; seconds: number }> {
  const { cfg, device, teacher, cuts } = ctx, d = cfg.distill, spec = teacher.spec;
  const t0 = performance.now();
  device.manualSeed(hash2(cfg.seed, 0x50e7));
  const net = new UNet(spec, { device }).train();
  const history: { nimg: number; losses: number[] }[] = [];
  const adam = new optim.Adam(net, { lr: d.lr });
  const it = new BatchIterator(ctx.train, { batchSize: d.batch, seed: cfg.seed, device });
  const totalNimg = Math.round(d.supernetKimg * 1000);
  const pending: Tensor[] = [];
  const flush = async (nimg: number) => {
    if (!pending.length) return;
    const all = noGrad(() => cat(pending));
    const host = await all.toArray();
    all.dispose();
    const steps = pending.length;
    pending.forEach((t) => t.dispose());
    pending.length = 0;
    const losses = cuts.map((_, b) => {
      let s = 0;
      for (let k = 0; k < steps; k++) s += host[k * cuts.length + b];
      return s / steps;
    });
    if (losses.some((v) => !Number.isFinite(v))) {
      throw new Error(`supernet: the block loss is not finite at ${nimg} images (lower distill.lr ${d.lr})`);
    }
    history.push({ nimg, losses });
    ctx.emit({ type: "supernet", nimg, totalNimg, losses });
  };
  try {
    for (let nimg = 0, step = 0; nimg < totalNimg; step++) {
      if (ctx.signal?.aborted) throw new Error("interrupted");
      const rng = new Rng(hash2(cfg.seed ^ 0xb10c, step));
      const picks = candidates.map((c) => c[Math.floor(rng.next() * c.length)]);
      const batch = it.next();
      adam.lr = rampedLr(d.lr, nimg, totalNimg);
      try {
        const logT = scope(() => {
          const labels = spec.labelDim ? batch.labels : undefined;
          const N = batch.images.shape[0];
          const sigma = exp(randNormal([N], FULL_RUN.pMean, 1.2, { device }));
          const { xIn, cNoise } = noisyInput(
            batch.images,
            sigma,
            randn(batch.images.shape, { device }),
            ctx.sigmaData,
          );
          const { emb, outs } = noGrad(() => {
            const emb = teacher.embed(cNoise, labels ?? null);
            return { emb, outs: runBlocks(teacher, cuts, null, xIn, emb) };
          });
          const losses = cuts.map((cut, b) =>
            relativeMse(runBlock(net, cut, picks[b], blockInputs(cuts, b, outs, xIn), emb), outs[b])
          );
          losses.reduce((a, b) => add(a, b)).backward();
          adam.step();
          net.zeroGrad();
          return noGrad(() => cat(losses.map((l) => reshape(l, [1]))));
        });
        pending.push(logT);
      } finally {
        batch.images.dispose();
        batch.labels?.dispose();
      }
      nimg += d.batch;
      if ((step + 1) % cfg.training.logEvery === 0 || nimg >= totalNimg) await flush(nimg);
    }
  } catch (e) {
    pending.forEach((t) => t.dispose());
    adam.dispose();
    net.dispose();
    throw e;
  }
  adam.dispose();
  return { net: net.eval(), history, seconds: (performance.now() - t0) / 1000 };
}

/**
 * Every candidate's held-out relative MSE to its teacher block (teacher inputs, fixed σ and noise drawn from the
 * training distribution), read back in one sync; also each block's teacher output power E[t²].
 */
export async function candidateLosses(
  supernet: UNet,
  teacher: UNet,
  cuts: readonly BlockCut[],
  candidates: readonly BlockChoice[][],
  data: { x: Tensor; labels?: Tensor },
  seed: number,
  sigmaData: number,
): Promise<{ losses: number[][]; power: number[] }> {
  const device = teacher.device, N = data.x.shape[0];
  device.manualSeed(hash2(seed, 0xd15));
  const flat = noGrad(() =>
    scope(() => {
      const sigma = exp(randNormal([N], -1.2, 1.2, { device }));
      const { xIn, cNoise } = noisyInput(data.x, sigma, randn(data.x.shape, { device }), sigmaData);
      const emb = teacher.embed(cNoise, teacher.spec.labelDim ? data.labels ?? null : null);
      const outs = runBlocks(teacher, cuts, null, xIn, emb);
      const parts: Tensor[] = [];
      cuts.forEach((cut, b) => {
        const inputs = blockInputs(cuts, b, outs, xIn);
        for (const c of candidates[b]) {
          parts.push(
            reshape(scope(() => relativeMse(runBlock(supernet, cut, c, inputs, emb), outs[b])), [1]),
          );
        }
        const power = outs[b].map((t) => mean(mul(t, t)));
        parts.push(
          reshape(power.length === 1 ? power[0] : mul(power.reduce((a, c) => add(a, c)), 1 / power.length), [
            1,
          ]),
        );
      });
      return cat(parts);
    })
  );
  const host = await flat.toArray();
  flat.dispose();
  const losses: number[][] = [], power: number[] = [];
  let at = 0;
  for (const c of candidates) {
    losses.push(Array.from(host.subarray(at, at + c.length)));
    at += c.length;
    power.push(host[at++]);
  }
  return { losses, power };
}

/** One retrained student: its EMA network under the choices, and its loss log. */
interface Retrained {
  label: string;
  schedule: LambdaSchedule;
  choices: BlockChoice[];
  student: BlockwiseUNet;
  history: { nimg: number; edm: number; distill: number | null; lambda: number }[];
  seconds: number;
}

/**
 * Retrains an assembled student with the joint loss under `schedule`: the supernet's weights, the teacher's
 * mapping network (the blocks learned on its embedding), Adam with a warm-up and an EMA as in the trainer.
 */
async function retrain(
  ctx: Context,
  supernet: UNet,
  choices: BlockChoice[],
  schedule: LambdaSchedule,
  weights: readonly number[],
  label: string,
): Promise<Retrained> {
  const { cfg, device, teacher } = ctx, d = cfg.distill, spec = teacher.spec;
  // A student retrained by an earlier run of this search (killed later) is loaded, not retrained.
  const file = `${ctx.dir}/students/${label.replace(/[^a-z0-9]+/gi, "-")}`;
  try {
    const saved = JSON.parse(await Deno.readTextFile(`${file}.json`));
    const emaNet = new UNet(spec, { device }).eval();
    try {
      await emaNet.loadSafetensors(`${file}.safetensors`);
    } catch (e) {
      emaNet.dispose();
      throw e;
    }
    ctx.emit({
      type: "retrain",
      label,
      nimg: 0,
      totalNimg: 0,
      edm: NaN,
      distill: null,
      loaded: `${file}.safetensors`,
    });
    return { label, schedule, choices, student: new BlockwiseUNet(emaNet, choices), ...saved };
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const t0 = performance.now();
  const net = new UNet(spec, { device }).train(), emaNet = new UNet(spec, { device }).eval();
  const teacherMapping = Object.fromEntries(
    Object.entries(teacher.stateDict()).filter(([k]) => k.startsWith("map_")),
  );
  net.loadStateDict({ ...supernet.stateDict(), ...teacherMapping });
  emaNet.loadStateDict(net.stateDict());
  const student = new BlockwiseUNet(net, choices);
  const adam = new optim.Adam(net, { lr: d.lr }), ema = new optim.EMA(net);
  const totalNimg = Math.round(d.retrainKimg * 1000), fraction = d.retrainKimg / FULL_RUN.kimg;
  const emaCfg = {
    batch: d.batch,
    emaHalfLifeKimg: FULL_RUN.emaHalfLifeKimg * fraction,
    emaRampupRatio: 0.05,
  };
  const it = new BatchIterator(ctx.train, { batchSize: d.batch, seed: cfg.seed, device });
  device.manualSeed(hash2(cfg.seed, 0x7e7));
  const history: Retrained["history"] = [];
  let pending: { nimg: number; lambda: number; t: Tensor }[] = [];
  const flush = async () => {
    if (!pending.length) return;
    const all = noGrad(() => cat(pending.map((p) => p.t)));
    const host = await all.toArray();
    all.dispose();
    let edm = 0, dist = 0;
    pending.forEach((p, k) => {
      edm += host[2 * k];
      dist += host[2 * k + 1];
      p.t.dispose();
    });
    const last = pending[pending.length - 1], n = pending.length;
    pending = [];
    if (!Number.isFinite(edm)) {
      throw new Error(`retrain ${label}: the loss is not finite at ${last.nimg} images`);
    }
    const entry = {
      nimg: last.nimg,
      edm: edm / n,
      distill: last.lambda > 0 ? dist / n : null,
      lambda: last.lambda,
    };
    history.push(entry);
    ctx.emit({ type: "retrain", label, nimg: entry.nimg, totalNimg, edm: entry.edm, distill: entry.distill });
  };
  try {
    for (let nimg = 0, step = 0; nimg < totalNimg; step++) {
      if (ctx.signal?.aborted) throw new Error("interrupted");
      const lambda = lambdaAt(schedule, d.lambda, nimg / totalNimg);
      adam.lr = rampedLr(d.lr, nimg, totalNimg);
      const beta = emaBeta(emaCfg, nimg);
      const batch = it.next();
      try {
        const t = scope(() => {
          const labels = spec.labelDim ? batch.labels : undefined;
          const r = jointLoss(student, teacher, batch.images, labels, lambda, weights, {
            sigmaData: ctx.sigmaData,
            pMean: FULL_RUN.pMean,
          });
          r.loss.backward();
          adam.step();
          net.zeroGrad();
          ema.update(beta);
          return noGrad(() => cat([reshape(r.edm, [1]), reshape(r.distill ?? mul(r.edm, 0), [1])]));
        });
        nimg += d.batch;
        pending.push({ nimg, lambda, t });
      } finally {
        batch.images.dispose();
        batch.labels?.dispose();
      }
      if ((step + 1) % cfg.training.logEvery === 0 || nimg >= totalNimg) await flush();
    }
    ema.copyTo(emaNet);
  } catch (e) {
    pending.forEach((p) => p.t.dispose());
    emaNet.dispose();
    throw e;
  } finally {
    adam.dispose();
    ema.dispose();
    net.dispose();
  }
  const seconds = (performance.now() - t0) / 1000;
  await Deno.mkdir(`${ctx.dir}/students`, { recursive: true });
  await saveSafetensors(`${file}.safetensors`, emaNet.stateDict(), { schedule });
  await writeTextAtomic(`${file}.json`, JSON.stringify({ history, seconds }) + "\n");
  return { label, schedule, choices, student: new BlockwiseUNet(emaNet, choices), history, seconds };
}

// ---------------------------------------------------------------------------------------------------------------
// The search.

/** The cost of a whole student (mapping network and blocks). */
function studentCost(spec: UNetSpec, choices: readonly BlockChoice[]) {
  return layersCost(studentPlan(spec, choices));
}

/** A measured FID: its name ("RFID-128", "FID-2048"), value and seconds. */
interface Score {
  name: string;
  value: number;
  seconds: number;
}

/** A row of the student table. */
interface ModelRow {
  label: string;
  macs: number;
  params: number;
  proxyFid: number | null;
  fid: number | null;
  fidName: string | null;
  choices: string[];
}

/** The outcome of a distillation search. */
export interface DistillOutcome {
  dir: string;
  stoppedBy: "done" | "interrupted";
  reportHtml: string;
  reportJson: string;
  summary: string;
  seconds: number;
  teacher: { macs: number; params: number; proxyFid: number | null; fid: number | null };
  student: {
    macs: number;
    params: number;
    proxyFid: number | null;
    fid: number | null;
    choices: BlockChoice[];
  };
}

/** Runs a block-wise distillation search; see the file comment. */
export async function runDistillSearch(
  input: SearchConfigInput | Record<string, unknown>,
  opts: Omit<SearchOptions, "proposer" | "onEvent"> & { onEvent?: (e: DistillEvent) => void } = {},
): Promise<DistillOutcome> {
  const t0 = performance.now();
  const { raw, given, lock } = await claimRunFolder(input, { method: "distill" });
  using _lock = lock;
  const emit = opts.onEvent ?? (() => {});
  const storage = await openMemory(given, raw, opts.resume ?? false);
  let device: Device | undefined;
  let teacher: UNet | undefined, supernet: UNet | undefined;
  let features: FeatureExtractor | undefined;
  const students: Retrained[] = [];
  const toFree: Tensor[] = [];
  try {
    const cfg = storage.cfg, d = cfg.distill, dir = cfg.out;
    if (cfg.method !== "distill") {
      throw new UsageError(`${dir} holds a ${cfg.method} search, not a distill one`);
    }
    device = opts.device ?? await Device.create({ backend: cfg.backend });
    const dataset = await openDataset(
      cfg.data ?? { kind: "procedural", resolution: DEFAULT_NETWORK.imgResolution },
    );
    const heldOut = Math.min(d.heldOutN, dataset.length >> 1);
    const train = datasetSlice(dataset, 0, dataset.length - heldOut);
    const heldData = datasetSlice(dataset, dataset.length - heldOut, dataset.length);

    const t = await obtainTeacher(cfg, dataset, train, device, emit, opts.signal);
    teacher = t.net;
    const spec = teacher.spec;
    if (spec.imgResolution !== dataset.height || spec.inChannels !== dataset.channels) {
      throw new UsageError(
        `--teacher ${d.teacher}: its network makes ${spec.inChannels}×${spec.imgResolution}² images, the data ` +
          `has ${dataset.channels}×${dataset.height}²`,
      );
    }
    const cuts = cutUNet(spec);
    emit({
      type: "start",
      dir,
      resumed: storage.resumed,
      device: `${device.info.adapter} (${device.kind})`,
      blocks: cuts.map((c) => c.name),
    });
    const ctx: Context = {
      cfg,
      dir,
      device,
      train,
      teacher,
      sigmaData: t.sigmaData,
      cuts,
      emit,
      signal: opts.signal,
    };
    const candidates = cuts.map((c) => blockCandidates(c, d.widths));

    // The supernet: from the run folder (a resumed search) or trained here.
    const supernetPath = `${dir}/${SUPERNET_FILE}`;
    let supernetHistory: { nimg: number; losses: number[] }[] = [];
    let supernetSeconds = 0;
    try {
      await Deno.stat(supernetPath);
      supernet = new UNet(spec, { device }).eval();
      await supernet.loadSafetensors(supernetPath);
      supernetHistory = JSON.parse(await Deno.readTextFile(`${dir}/supernet.json`)).history;
    } catch {
      supernet?.dispose();
      const s = await trainSupernet(ctx, candidates);
      supernet = s.net;
      supernetHistory = s.history;
      supernetSeconds = s.seconds;
      await saveSafetensors(supernetPath, supernet.stateDict(), { kimg: String(d.supernetKimg) });
      await writeTextAtomic(
        `${dir}/supernet.json`,
        JSON.stringify({ history: s.history, seconds: s.seconds }) + "\n",
      );
    }

    // Held-out losses of every candidate.
    const c0 = performance.now();
    const held = imageBatch(heldData, 0, heldOut, spec.labelDim ?? 0, device);
    toFree.push(held.x, ...(held.labels ? [held.labels] : []));
    const { losses, power } = await candidateLosses(
      supernet,
      teacher,
      cuts,
      candidates,
      held,
      cfg.seed,
      t.sigmaData,
    );
    emit({ type: "candidates", count: candidates.flat().length, seconds: (performance.now() - c0) / 1000 });
    const scored: ScoredCandidate[][] = cuts.map((cut, b) =>
      candidates[b].map((choice, i) => {
        const cost = layersCost(blockPlan(spec, cut, choice));
        return {
          choice,
          label: choiceLabel(cut, choice),
          macs: cost.macs,
          params: cost.parameters,
          loss: losses[b][i],
        };
      })
    );
    const localPicks = scored.map((s) => selectLocal(s, d.delta));
    const localChoices = localPicks.map((p, b) => scored[b][p].choice);
    const localMacs = localPicks.reduce((a, p, b) => a + scored[b][p].macs, 0);
    const globalPicks = selectGlobal(scored, localMacs);
    const globalChoices = globalPicks?.map((p, b) => scored[b][p].choice) ?? null;
    const sameAsLocal = globalPicks !== null && globalPicks.every((p, b) => p === localPicks[b]);
    emit({
      type: "selected",
      local: localPicks.map((p, b) => scored[b][p].label),
      global: globalPicks?.map((p, b) => scored[b][p].label) ?? null,
    });
    await writeTextAtomic(
      `${dir}/candidates.json`,
      JSON.stringify(
        {
          delta: d.delta,
          heldOut,
          blocks: cuts.map((cut, b) => ({
            block: cut.name,
            teacherPower: power[b],
            local: localPicks[b],
            global: globalPicks?.[b] ?? null,
            candidates: scored[b],
          })),
        },
        null,
        2,
      ) + "\n",
    );

    // Retraining: the main schedule, the ablations, and the global student.
    const weights = power.map((p) => 1 / (cuts.length * Math.max(p, 1e-12)));
    const schedules = [
      d.schedule,
      ...d.ablations.filter((s, i, a) => s !== d.schedule && a.indexOf(s) === i),
    ];
    for (const s of schedules) {
      students.push(await retrain(ctx, supernet, localChoices, s, weights, `local, λ ${s}`));
    }
    if (d.retrainGlobal && globalChoices && !sameAsLocal) {
      students.push(
        await retrain(ctx, supernet, globalChoices, d.schedule, weights, `global, λ ${d.schedule}`),
      );
    }
    const main = students[0];
    await saveSafetensors(`${dir}/${STUDENT_FILE}`, main.student.net.stateDict(), {
      schedule: main.schedule,
    });

    // Scores.
    features = await openFeatureExtractor({ device, data: cfg.data });
    const ref = await referenceStatistics(dataset, features, Math.min(cfg.refN, dataset.length), {
      cacheDir: cfg.cacheDir,
    });
    emit({ type: "reference", cached: ref.cached, seconds: ref.seconds });
    const proxy = proxyProtocol(cfg);
    // Every proxy FID first, then the FID-n of the teacher and the student; each cached in scores.json, so a
    // search killed while scoring measures only what is missing when resumed.
    const scoresPath = `${dir}/scores.json`;
    let cache: Record<string, Score> = {};
    try {
      cache = JSON.parse(await Deno.readTextFile(scoresPath));
    } catch { /* none yet */ }
    const measure = async (
      label: string,
      gen: NetworkGenerator<UNet | BlockwiseUNet>,
      kind: "RFID" | "FID",
    ): Promise<Score> => {
      const p = kind === "RFID" ? proxy : { ...proxy, n: d.fidN };
      const key = `${label}: ${kind}-${p.n}`;
      if (!cache[key]) {
        if (opts.signal?.aborted) throw new Error("interrupted");
        const m = await measureFid(kind, gen, features!, ref.stats as FidStatistics, p);
        cache[key] = { name: m.name, value: m.value, seconds: m.seconds };
        await writeTextAtomic(scoresPath, JSON.stringify(cache, null, 2) + "\n");
      }
      emit({ type: "fid", label, ...cache[key] });
      return cache[key];
    };
    const gens: [string, NetworkGenerator<UNet | BlockwiseUNet>][] = [
      ["teacher", new NetworkGenerator(teacher, { sigmaData: t.sigmaData })],
      ...students.map((s) =>
        [s.label, new NetworkGenerator(s.student, { sigmaData: t.sigmaData })] as [
          string,
          NetworkGenerator<BlockwiseUNet>,
        ]
      ),
    ];
    const scores: { proxy: Score; fid: Score | null }[] = [];
    for (const [label, gen] of gens) scores.push({ proxy: await measure(label, gen, "RFID"), fid: null });
    if (d.fidN > 0) {
      for (const i of [0, 1]) scores[i].fid = await measure(gens[i][0], gens[i][1], "FID");
    }
    const [teacherScore, ...studentScores] = scores;

    // Outputs.
    const teacherCost = unetCost(spec);
    const rowOf = (
      label: string,
      choices: readonly BlockChoice[],
      m: { proxy: Score; fid: Score | null },
    ) => {
      const c = studentCost(spec, choices);
      return {
        label,
        macs: c.macs,
        params: c.parameters,
        proxyFid: m.proxy.value,
        fid: m.fid?.value ?? null,
        fidName: m.fid?.name ?? null,
        choices: choices.map((ch, b) => choiceLabel(cuts[b], ch)),
      } satisfies ModelRow;
    };
    const rows: ModelRow[] = [
      rowOf("teacher", cuts.map(fullChoice), teacherScore),
      ...students.map((s, i) => rowOf(`student (${s.label})`, s.choices, studentScores[i])),
    ];
    const studentRow = rows[1];
    await writeTextAtomic(
      `${dir}/student.json`,
      JSON.stringify(
        {
          teacher: { spec, source: t.source, macs: teacherCost.macs, params: teacherCost.parameters },
          blocks: cuts.map((cut, b) => ({
            block: cut.name,
            choice: localChoices[b],
            label: scored[b][localPicks[b]].label,
          })),
          macs: studentRow.macs,
          params: studentRow.params,
          macsSaving: 1 - studentRow.macs / teacherCost.macs,
          paramsSaving: 1 - studentRow.params / teacherCost.parameters,
          schedule: main.schedule,
          weights: STUDENT_FILE,
          scores: rows,
        },
        null,
        2,
      ) + "\n",
    );
    const grids: ReportGrid[] = [];
    if (cfg.gridImages > 0) {
      await Deno.mkdir(`${dir}/grids`, { recursive: true });
      const settings = protocolSettings(proxy);
      for (
        const [label, file, gen] of [
          ["teacher", "teacher.png", new NetworkGenerator(teacher, { sigmaData: t.sigmaData })],
          [
            `student (${main.label})`,
            "student.png",
            new NetworkGenerator(main.student, { sigmaData: t.sigmaData }),
          ],
        ] as const
      ) {
        const x = gen.generate(0, cfg.gridImages, { seed: cfg.seed, settings });
        try {
          const png = encodeImageGrid({ data: await x.toArray(), shape: x.shape }, { cols: 6 });
          await writeFileAtomic(`${dir}/grids/${file}`, png);
          grids.push({ label, png, path: `grids/${file}` });
        } finally {
          x.dispose();
        }
      }
    }
    const report = await writeReport(dir, {
      title: `Block-wise distillation search: ${dir}`,
      settings: { ...cfg },
      timing: {
        started: Math.round(performance.timeOrigin + t0),
        finished: Date.now(),
        wallSeconds: (performance.now() - t0) / 1000,
        perTrial: { trainSeconds: null, proxySeconds: null },
      },
      trials: [],
      paretoIds: [],
      bestSoFar: [],
      baseline: {
        name: "teacher",
        proxyFid: teacherScore.proxy.value,
        fid: teacherScore.fid?.value,
        macs: teacherCost.macs,
        params: teacherCost.parameters,
        spec,
      },
      grids,
      sections: distillSections({
        rows,
        cuts,
        scored,
        localPicks,
        globalPicks,
        delta: d.delta,
        students,
        studentScores: studentScores.map((s) => s.proxy.value),
        supernetHistory,
        timings: {
          teacher: t.trainSeconds ?? null,
          supernet: supernetSeconds,
          retrain: students.map((s) => s.seconds),
        },
        lambda0: d.lambda,
        mappingMacs: layersCost(mappingPlan(spec)).macs,
      }),
    });
    emit({ type: "stop", reason: "done" });
    emit({ type: "report", html: report.html, json: report.json });
    return {
      dir,
      stoppedBy: "done",
      reportHtml: report.html,
      reportJson: report.json,
      summary: summaryTable(rows, teacherCost),
      seconds: (performance.now() - t0) / 1000,
      teacher: { macs: rows[0].macs, params: rows[0].params, proxyFid: rows[0].proxyFid, fid: rows[0].fid },
      student: {
        macs: studentRow.macs,
        params: studentRow.params,
        proxyFid: studentRow.proxyFid,
        fid: studentRow.fid,
        choices: localChoices,
      },
    };
  } catch (e) {
    if ((e as Error).message !== "interrupted") throw e;
    emit({ type: "stop", reason: "interrupted" });
    return {
      dir: given.out,
      stoppedBy: "interrupted",
      reportHtml: "",
      reportJson: "",
      summary:
        "interrupted: run the same command with --resume to continue (the teacher and supernet are kept)",
      seconds: (performance.now() - t0) / 1000,
      teacher: { macs: NaN, params: NaN, proxyFid: null, fid: null },
      student: { macs: NaN, params: NaN, proxyFid: null, fid: null, choices: [] },
    };
  } finally {
    toFree.forEach((x) => x.dispose());
    students.forEach((s) => s.student.dispose());
    supernet?.dispose();
    teacher?.dispose();
    features?.dispose();
    await storage.storage.close();
    if (device && !opts.device) device.destroy();
  }
}

/** The terminal table: teacher and students. */
function summaryTable(rows: readonly ModelRow[], teacher: { macs: number; parameters: number }): string {
  const lines = ["model                              MACs (M)  saving   params  saving  proxy FID       FID"];
  for (const r of rows) {
    lines.push(
      `${r.label.padEnd(34)} ${(r.macs / 1e6).toFixed(2).padStart(8)} ${
        (100 * (1 - r.macs / teacher.macs)).toFixed(1).padStart(6)
      }% ${String(r.params).padStart(8)} ${
        (100 * (1 - r.params / teacher.parameters)).toFixed(1).padStart(6)
      }% ${r.proxyFid === null ? "–".padStart(9) : r.proxyFid.toFixed(3).padStart(9)} ${
        r.fid === null ? "–".padStart(9) : `${r.fid.toFixed(3)} (${r.fidName})`
      }`,
    );
  }
  lines.push(`student blocks: ${rows[1]?.choices.join(" | ")}`);
  return lines.join("\n");
}

/** What the report's distillation sections show. */
interface SectionInput {
  rows: ModelRow[];
  cuts: BlockCut[];
  scored: ScoredCandidate[][];
  localPicks: number[];
  globalPicks: number[] | null;
  delta: number;
  students: Retrained[];
  studentScores: number[];
  supernetHistory: { nimg: number; losses: number[] }[];
  timings: { teacher: number | null; supernet: number; retrain: number[] };
  lambda0: number;
  mappingMacs: number;
}

const fixed = (
  v: number | null,
  digits: number,
) => (v === null || !Number.isFinite(v) ? null : Number(v.toFixed(digits)));

/** The report's sections: the student, the blocks' choices and losses, local against global, the λ ablation. */
function distillSections(s: SectionInput): ReportSection[] {
  const teacher = s.rows[0];
  const students: ReportSection = {
    title: "Student against teacher",
    text:
      `The student is the local selection (δ = ${s.delta}) retrained with the joint loss; the teacher row is ` +
      `the network distilled. MACs per network evaluation and parameters follow models/cost.ts (the student's: ` +
      `its mapping network, ${
        (s.mappingMacs / 1e6).toFixed(3)
      } M MACs, plus its blocks under their choices).`,
    table: {
      columns: ["model", "MACs (M)", "MACs saved", "params", "params saved", "proxy FID", "FID", "blocks"],
      rows: s.rows.map((r) => [
        r.label,
        fixed(r.macs / 1e6, 3),
        `${(100 * (1 - r.macs / teacher.macs)).toFixed(1)}%`,
        r.params,
        `${(100 * (1 - r.params / teacher.params)).toFixed(1)}%`,
        fixed(r.proxyFid, 3),
        r.fid === null ? null : `${r.fid.toFixed(3)} (${r.fidName})`,
        r.choices.join(" | "),
      ]),
    },
  };
  const perBlock: ReportSection = {
    title: "Per-block choice",
    text:
      "Held-out loss: relative MSE of the block's outputs to the teacher's (MSE / mean of the teacher output " +
      "squared), each block fed the teacher's inputs. Local: fewest MACs within (1 + δ) of the block's best; " +
      "global: least summed loss under the local student's total MACs.",
    table: {
      columns: [
        "block",
        "best candidate (loss)",
        "local choice",
        "local loss",
        "local MACs (M)",
        "global choice",
        "global loss",
        "teacher MACs (M)",
      ],
      rows: s.cuts.map((cut, b) => {
        const sc = s.scored[b];
        const best = sc.reduce((a, c) => (c.loss < a.loss ? c : a));
        const l = sc[s.localPicks[b]], g = s.globalPicks ? sc[s.globalPicks[b]] : null;
        const full = sc.find((c) =>
          c.choice.width === 1 && c.choice.depth === cut.res.length && c.choice.attention
        )!;
        return [
          cut.name,
          `${best.label} (${best.loss.toPrecision(3)})`,
          l.label,
          Number(l.loss.toPrecision(3)),
          fixed(l.macs / 1e6, 3),
          g?.label ?? null,
          g ? Number(g.loss.toPrecision(3)) : null,
          fixed(full.macs / 1e6, 3),
        ];
      }),
    },
    charts: [{
      title: "Candidates: held-out loss against MACs, per block",
      xLabel: "MACs (M)",
      yLabel: "relative MSE",
      yLog: true,
      series: s.cuts.map((cut, b) => ({
        name: cut.name,
        kind: "scatter" as const,
        points: s.scored[b].map((c) => [c.macs / 1e6, c.loss] as [number, number]),
      })),
    }],
  };
  const candidates: ReportSection = {
    title: "Candidate losses",
    table: {
      columns: ["block", "candidate", "MACs (M)", "params", "held-out loss", "picked"],
      rows: s.cuts.flatMap((cut, b) =>
        s.scored[b].map((c, i) => [
          cut.name,
          c.label,
          fixed(c.macs / 1e6, 3),
          c.params,
          Number(c.loss.toPrecision(4)),
          [i === s.localPicks[b] ? "local" : "", s.globalPicks?.[b] === i ? "global" : ""].filter(Boolean)
            .join(", ") ||
          null,
        ])
      ),
    },
  };
  const sum = (picks: number[]) => ({
    macs: picks.reduce((a, p, b) => a + s.scored[b][p].macs, 0),
    loss: picks.reduce((a, p, b) => a + s.scored[b][p].loss, 0),
  });
  const local = sum(s.localPicks), global = s.globalPicks ? sum(s.globalPicks) : null;
  const globalStudent = s.students.findIndex((x) => x.label.startsWith("global"));
  const mainScore = s.studentScores[0];
  const localGlobal: ReportSection = {
    title: "Local against global selection",
    text: global && s.globalPicks!.every((p, b) => p === s.localPicks[b])
      ? "The global selection picks the same candidates as the local one."
      : "The global selection minimises the summed block loss under the local student's MACs (blocks' MACs only).",
    table: {
      columns: [
        "selection",
        "blocks' MACs (M)",
        "summed held-out loss",
        "proxy FID (retrained, main λ schedule)",
      ],
      rows: [
        ["local", fixed(local.macs / 1e6, 3), Number(local.loss.toPrecision(4)), fixed(mainScore, 3)],
        ...(global
          ? [[
            "global",
            fixed(global.macs / 1e6, 3),
            Number(global.loss.toPrecision(4)),
            globalStudent >= 0
              ? fixed(s.studentScores[globalStudent], 3)
              : s.globalPicks!.every((p, b) => p === s.localPicks[b])
              ? fixed(mainScore, 3)
              : null,
          ]]
          : [["global", null, "no selection fits the local MACs", null]]),
      ],
    },
  };
  const ablations = s.students.map((x, i) => ({ x, score: s.studentScores[i] })).filter(({ x }) =>
    x.label.startsWith("local")
  );
  const lambdaChart: ChartSpec = {
    title: "λ(τ) of each schedule",
    xLabel: "τ (training progress)",
    yLabel: "λ",
    series: ablations.map(({ x }) => ({
      name: x.schedule,
      kind: "line" as const,
      points: Array.from(
        { length: 21 },
        (_, k) => [k / 20, lambdaAt(x.schedule, s.lambda0, k / 20)] as [number, number],
      ),
    })),
  };
  const edmChart: ChartSpec = {
    title: "Retraining: EDM loss per log window",
    xLabel: "images",
    yLabel: "EDM loss",
    series: s.students.map((x) => ({
      name: x.label,
      kind: "line" as const,
      points: x.history.map((h) => [h.nimg, h.edm] as [number, number]),
    })),
  };
  const ablation: ReportSection = {
    title: "λ ablation",
    text:
      `The local student retrained with each λ(τ) schedule from λ(0) = ${s.lambda0} (zero: plain EDM training ` +
      `from the supernet's weights).`,
    table: {
      columns: ["schedule", "final EDM loss", "final distillation term", "proxy FID", "seconds"],
      rows: ablations.map(({ x, score }) => {
        const last = x.history[x.history.length - 1];
        return [
          x.schedule,
          fixed(last?.edm ?? null, 4),
          last?.distill === null ? null : fixed(last?.distill ?? null, 4),
          fixed(score, 3),
          fixed(x.seconds, 0),
        ];
      }),
    },
    charts: [lambdaChart, edmChart],
  };
  const supernet: ReportSection = {
    title: "Supernet training",
    text:
      `Teacher training ${
        s.timings.teacher === null ? "not run here" : `${s.timings.teacher.toFixed(0)} s`
      }, ` +
      `supernet ${s.timings.supernet.toFixed(0)} s (0: loaded), retrainings ${
        s.timings.retrain.map((v) => v.toFixed(0)).join(", ")
      } s.`,
    charts: [{
      title: "Block-wise distillation: relative MSE of the sampled candidates",
      xLabel: "images",
      yLabel: "relative MSE",
      yLog: true,
      series: s.cuts.map((cut, b) => ({
        name: cut.name,
        kind: "line" as const,
        points: s.supernetHistory.map((h) => [h.nimg, h.losses[b]] as [number, number]),
      })),
    }],
  };
  return [students, perBlock, localGlobal, ablation, supernet, candidates];
}
