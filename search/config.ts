/**
 * @file The settings of a search (`deno task search --config file.json` holds them; flags override), parsed
 * with zod: unknown keys are errors, every field has a bound and a one-line comment.
 *
 * The short training schedule is DiffNAS's "rapid convergence": each candidate trains for `training.kimg`
 * thousand images, a fraction of the default run (`deno task train`: 12 kimg), with the learning-rate warm-up and
 * the EMA half-life scaled by the same fraction, so a candidate sees the same shape of schedule as a full run
 * (EDM's ramp and half-life are both proportional to the run's length in its configs).
 */

import { z } from "zod";
import { DataConfig } from "../models/data.ts";
import { SHAPES_TRAINING } from "../models/train.ts";
import { SearchSpaceConfigSchema } from "./space.ts";
import { LlmSettings } from "./proposers/llm.ts";

/**
 * The default run's length and the schedule lengths of `deno task train` that the short schedule scales, and
 * its noise distribution (models/train.ts `SHAPES_TRAINING`), which candidates, supernets and teachers share.
 */
export const FULL_RUN = Object.freeze({
  kimg: SHAPES_TRAINING.kimg,
  lrRampupKimg: 0.5,
  emaHalfLifeKimg: 0.5,
  pMean: SHAPES_TRAINING.pMean,
});

const positive = z.number().positive().finite();

/** How each candidate is trained. */
export const TrialTrainingSchema = z.strictObject({
  // Thousands of training images per candidate (DiffNAS's rapid convergence: half of the 12-kimg default run).
  // The schedule the proxy validation supports, weakly: over eight architectures RFID-128 after 6 kimg ranks
  // the 12-kimg FID-2048 with ρ +0.29, after 3 kimg backwards (ρ −0.33; the loss proxy +0.02, then −0.07); at
  // 1 kimg every candidate sat in the noise floor (README "Does the proxy rank architectures?").
  kimg: positive.max(1000).default(6),
  // Images per optimizer step.
  batch: z.number().int().min(1).max(4096).default(32),
  // Adam learning rate after the warm-up (the default run's).
  lr: positive.max(1).default(1e-2),
  // Read back the loss every this many steps (the median pruning rule looks at these points).
  logEvery: z.number().int().min(1).max(10000).default(5),
  // Gradient clipping (global L2 norm); null: none.
  gradClip: positive.nullable().default(null),
});

/** Optuna's median stopping rule, applied to the training loss. */
export const PruningSchema = z.strictObject({
  // Prune a candidate whose loss at a checkpoint is worse than the median of finished trials at that point.
  enabled: z.boolean().default(true),
  // Checkpoints as fractions of the schedule (Optuna's MedianPruner checks every reported step).
  at: z.array(z.number().gt(0).lt(1)).max(16).default([0.5]),
  // Finished trials needed before anything is pruned (Optuna's n_startup_trials: 5).
  minTrials: z.number().int().min(1).max(1000).default(5),
});

/**
 * The trial queue, as every process of a search shares it (the search process proposes, workers claim; with
 * SQLite the search process is the only worker). Stored with the settings, so workers read them from the memory.
 */
export const QueueSchema = z.strictObject({
  // The search proposes when fewer trials than this wait in the queue (about the number of workers: deeper
  // queues keep workers busy, but their trials are proposed from an older memory).
  depth: z.number().int().min(1).max(1000).default(1),
  // Seconds between the heartbeats of a running trial.
  heartbeatSeconds: positive.max(3600).default(10),
  // Seconds without a heartbeat after which a running trial's worker is presumed dead and the trial re-queued
  // (several heartbeats: a busy machine may delay one).
  graceSeconds: positive.max(86400).default(120),
  // Attempts a trial gets: a trial whose worker is lost on its last attempt fails instead of going back.
  maxAttempts: z.number().int().min(1).max(100).default(3),
  // Seconds an idle worker (or the search process waiting for workers) sleeps before asking again.
  pollSeconds: positive.max(600).default(1),
});

/**
 * DDSM's step-aware width search (search/ddsm.ts); used by method "ddsm". Measured here with the defaults under
 * a load average of 5–9 (other jobs on the two cores): the sandwich supernet, 6 kimg, 311 s (19 img/s; its
 * step costs 2.2–3.0 plain steps; 590 s at 10 img/s in a busier hour); the profile 28 s; RFID-128 at 18 Heun
 * steps 9–39 s per genome (16 of the GA 307 s, the 2 switches not already scored 48 s); FID-2048 388 s at width
 * 1, 331 s at uniform 0.75, 286 s at 40% saving: 28.5 minutes in all (README). On a quiet machine (fresh clone,
 * load below 1) the defaults took 14 min 13 s: supernet 179 s, profile 12 s, 18 genomes ~175 s, the three
 * FID-2048 ~480 s; the GA stops at `minutes` (13) where the machine is slower. The switch seeds replace random genomes, so they
 * add no evaluation.
 */
export const DdsmSettingsSchema = z.strictObject({
  // Trained supernet to use: a `deno task train` run folder (its latest checkpoint), a checkpoint folder or
  // another DDSM search's supernet.safetensors (the base network of the data);
  // null: train one with the sandwich rule in this search (saved in the run folder as supernet.safetensors).
  supernet: z.string().min(1).nullable().default(null),
  // Thousands of training images of the supernet trained here (sandwich rule: three widths per batch).
  supernetKimg: positive.max(100000).default(6),
  // Images per supernet optimizer step.
  supernetBatch: z.number().int().min(1).max(4096).default(32),
  // Held-out images of the step-importance profile (loss of each width at each σ of the sampler's grid).
  profileN: z.number().int().min(1).max(10000).default(64),
  // Individuals per generation (pymoo pop_size).
  population: z.number().int().min(2).max(1000).default(8),
  // Generations after the initial population.
  generations: z.number().int().min(0).max(10000).default(1),
  // Savings (fractions of width 1's MACs) of the switch seeds in the initial population, after the four
  // uniform ones: per saving and width w < 1, "w for the fewest noisiest steps that save it, then width 1"
  // (0.75 saves at most ~30%, so the default gives 0.5 and 0.25 at 40% and 55%: four genomes). The official
  // search starts from uniform and random genomes over 50 × 10 evaluations; with 16 here it never proposed
  // the 40% switch that passes the test. []: no switch seeds.
  switchSeeds: z.array(z.number().gt(0).lt(1)).max(64).default([0.4, 0.55]),
  // Tolerances δ of the profile genomes in the initial population (after the switch seeds): per step the
  // fewest-MACs width whose profile loss is within (1 + δ) of width 1's. None by default: at δ 0.05–0.2 they
  // scored worse fitness than width 1 (README); the population keeps the first `population` seeds.
  // switchSeeds and profileSeeds both []: the official start, uniform and random genomes.
  profileSeeds: z.array(z.number().min(0).max(100)).max(64).default([]),
  // Probability that a child's gene (one step's width) is redrawn.
  mutationRate: z.number().min(0).max(1).default(0.1),
  // Weight of the proxy FID in the fitness.
  fidWeight: z.number().min(0).finite().default(1),
  // Weight of the average MACs per network evaluation, in millions, in the fitness. The official rate
  // (macs_weight 0.001 per M of a 6070 M network) rescaled to the default network's 19.0 M would be 0.32;
  // on the measured front (README) that picks a 15%-saving switch, 0.34–0.47 picks the 40%-saving schedule.
  macsWeight: z.number().min(0).finite().default(0.4),
  // Switch-at-step-k schedules (two widths) evaluated for the comparison: those closest in MACs to the best.
  switchCandidates: z.number().int().min(0).max(100).default(3),
  // Images of the FID-n of the best, the best switch, width 1 and the nearest uniform schedule (0: none).
  fidN: z.number().int().min(0).max(100000).default(2048),
});

/** How the weight λ of the block-distillation term changes with training progress τ ∈ [0, 1]. */
export const LambdaScheduleSchema = z.enum(["linear", "cosine", "constant", "zero"]);
export type LambdaSchedule = z.infer<typeof LambdaScheduleSchema>;

/**
 * Block-wise distillation NAS (search/distill.ts, Tang et al. 2023); used by method "distill". The defaults are
 * sized for about 15 minutes on this machine when it is quiet (the default network trains at ~85 img/s), the
 * teacher included: teacher 6 kimg ~71 s, supernet 2 kimg ~35 s, held-out losses of the 48 candidates ~5 s,
 * five retrainings of 4 kimg (~60 img/s: a teacher forward and the student's training step) ~330 s, six
 * RFID-128 ~150 s, FID-2048 of the teacher ~200 s and of the student ~100 s. Measured under a load average of
 * 9–27 (other jobs on the two cores): 145 s, 69 s, 11 s, 759 s, 64 s for the teacher's RFID-128 and 21–32 s
 * for each student's, 875 s and 260 s for the FID-2048s: about 37 minutes in all.
 */
export const DistillSettingsSchema = z.strictObject({
  // Teacher: a `deno task train` run folder (its latest checkpoint) or a checkpoint folder; null: train the
  // default network here (saved in the run folder as teacher.safetensors, reused by a resumed search).
  teacher: z.string().min(1).nullable().default(null),
  // Thousands of training images of the teacher trained here (half the 12-kimg default run, to fit the time: at
  // 6 kimg the conditional default network already draws discs and rings, FID-2048 28.5).
  teacherKimg: positive.max(100000).default(6),
  // Images per optimizer step of the teacher, the supernet and every retraining.
  batch: z.number().int().min(1).max(4096).default(32),
  // Thousands of images of the block-wise supernet distillation (one candidate per block per step).
  supernetKimg: positive.max(100000).default(6),
  // Adam learning rate of the supernet and of the retrainings, after a warm-up of a twelfth of each run.
  lr: positive.max(1).default(5e-3),
  // Width ratios of a block's residual branches (hidden channels round(w·C); inputs and outputs stay full).
  widths: z.array(z.number().gt(0).lte(1)).min(1).max(8).default([0.25, 0.5, 0.75, 1]),
  // Held-out images (the end of the data, never trained on) of the candidates' distillation losses.
  heldOutN: z.number().int().min(1).max(10000).default(128),
  // Local rule: per block the fewest-MACs candidate whose held-out loss is within (1 + delta) of the best.
  delta: z.number().min(0).max(1000).default(0.25),
  // Thousands of images of each retraining of an assembled student.
  retrainKimg: positive.max(100000).default(4),
  // λ at τ = 0 in the joint loss L = L_EDM + λ(τ)·Σ_b w_b·MSE(student block b, teacher block b).
  lambda: z.number().min(0).finite().default(1),
  // λ(τ) of the student: decaying linearly or as a half cosine to 0, constant, or zero (plain EDM training).
  schedule: LambdaScheduleSchema.default("cosine"),
  // Schedules retrained as the ablation of the joint loss (each scored by the proxy FID).
  ablations: z.array(LambdaScheduleSchema).max(4).default(["linear", "constant", "zero"]),
  // Also retrain the global selection's student (the main schedule) when it differs from the local one.
  retrainGlobal: z.boolean().default(true),
  // Images of the FID of the teacher and the student (FID-n; 0: none).
  fidN: z.number().int().min(0).max(100000).default(2048),
});

/** Settings of a search. */
export const SearchConfigSchema = z.strictObject({
  // The search method: DiffNAS (architectures), DDSM (a width per sampling step of one slimmable network) or
  // distill (the smallest student of a teacher, block by block).
  method: z.enum(["diffnas", "ddsm", "distill"]).default("diffnas"),
  // Training images (default: the embedded procedural shapes at the base network's resolution).
  data: DataConfig.optional(),
  // The run folder: memory.sqlite (unless the memory is in PostgreSQL), weights/, report.html, report.json,
  // grids/.
  out: z.string().min(1).default("runs/search"),
  // Seed of the proposals, the candidates' training and the proxy's latents.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // Candidates to evaluate (trials that train; the baseline counts, rejections do not).
  trials: z.number().int().min(1).max(100000).default(20),
  // Wall-clock budget in minutes: no new candidate starts when it would likely end past it (ddsm: no genome of
  // the GA starts past it; the generation it was in is dropped; distill: not used, its work is fixed).
  minutes: positive.max(100000).default(13),
  // Ceiling on MACs per network evaluation (attention included); proposals above it are rejected. The default,
  // 3× the default network's 19.8 M, keeps a candidate's training within about a minute here.
  maxMacs: positive.default(60e6),
  // Ceiling on trainable parameters.
  maxParams: positive.optional(),
  // Ceiling on a candidate's estimated training memory in MiB (models/cost.ts; default: the machine's).
  memoryLimitMiB: positive.optional(),
  // Who proposes: "auto" is "llm" when an endpoint is configured, else "evolutionary".
  proposer: z.enum(["auto", "llm", "evolutionary", "random"]).default("auto"),
  // The LLM proposer: endpoint (baseUrl, model, apiKeyEnv: the NAME of the key's variable), timeouts, memory
  // sizes in the prompt (search/proposers/llm.ts LlmSettings; needed by proposer "llm").
  llm: LlmSettings.optional(),
  // Bounds of the search space around the base network.
  space: SearchSpaceConfigSchema.optional(),
  // How each candidate trains.
  training: TrialTrainingSchema.default(TrialTrainingSchema.parse({})),
  // Start each candidate from the weights of the closest finished one (leading slices of shared tensors).
  inherit: z.boolean().default(false),
  // Early stopping by the median rule.
  pruning: PruningSchema.default(PruningSchema.parse({})),
  // What ranks the candidates: "rfid" (the RFID-proxyN of their samples) or "loss" (their mean EDM loss over
  // the sampler's σ grid on the last lossN images of the data, fixed noise; eval/denoising_loss.ts).
  proxyMetric: z.enum(["rfid", "loss"]).default("rfid"),
  // Images of the loss proxy (the last of the data).
  lossN: z.number().int().min(1).max(100000).default(128),
  // Images of the proxy FID (RFID-n) per candidate.
  proxyN: z.number().int().min(2).max(100000).default(128),
  // Heun steps of the proxy's sampler (NFE 2N − 1).
  proxySteps: z.number().int().min(2).max(1000).default(18),
  // Real images behind the reference statistics of the proxy.
  refN: z.number().int().min(2).max(1000000).default(10000),
  // Folder of cached reference statistics (relative paths are from the working directory).
  cacheDir: z.string().min(1).default(".cache/fid"),
  // Samples per grid of the report (best trials and the default network; 0: no grids).
  gridImages: z.number().int().min(0).max(1024).default(36),
  // Candidates proposed per proposer call.
  proposeBatch: z.number().int().min(1).max(64).default(4),
  // The trial queue shared with workers (`deno task worker`) when the memory is in PostgreSQL.
  queue: QueueSchema.default(QueueSchema.parse({})),
  // Device: WebGPU or the CPU reference kernels.
  backend: z.enum(["webgpu", "cpu"]).default("webgpu"),
  // DDSM's settings (method "ddsm").
  ddsm: DdsmSettingsSchema.default(DdsmSettingsSchema.parse({})),
  // Block-wise distillation's settings (method "distill").
  distill: DistillSettingsSchema.default(DistillSettingsSchema.parse({})),
});
export type SearchConfigInput = z.input<typeof SearchConfigSchema>;
export type SearchConfig = z.output<typeof SearchConfigSchema>;

/** Settings a resumed search may change; all others must match the stored ones. */
export const RESUMABLE_SEARCH_FIELDS: ReadonlySet<string> = new Set([
  "trials",
  "minutes",
  "out",
  "backend",
  "llm",
  "proposeBatch",
  "queue",
  "cacheDir",
  "gridImages",
  "memoryLimitMiB",
]);

/** The trainer settings of one candidate: the short schedule with ramp and EMA scaled to its length. */
export function trialSchedule(t: SearchConfig["training"]): {
  kimg: number;
  batch: number;
  lr: number;
  lrRampupKimg: number;
  emaHalfLifeKimg: number;
  pMean: number;
  logEvery: number;
  gradClip: number | null;
} {
  const fraction = t.kimg / FULL_RUN.kimg;
  return {
    kimg: t.kimg,
    batch: t.batch,
    lr: t.lr,
    lrRampupKimg: FULL_RUN.lrRampupKimg * fraction,
    emaHalfLifeKimg: FULL_RUN.emaHalfLifeKimg * fraction,
    pMean: FULL_RUN.pMean,
    logEvery: t.logEvery,
    gradClip: t.gradClip,
  };
}
