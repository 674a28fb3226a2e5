/**
 * @file `deno task sample`: images from a run's checkpoint (EMA weights by default) through one of the EDM
 * samplers, written as a PNG grid and optionally as raw values (.safetensors).
 *
 * Latents are exact slices of one seeded stream (models/generate.ts), so the images do not depend on how many
 * are generated per network batch.
 */

import { z } from "zod";
import { Device, encodeSafetensors } from "../engine/mod.ts";
import { CheckpointGenerator, SamplerSettingsSchema } from "./generate.ts";
import type { StepInfo } from "./samplers.ts";
import { saveImageGrid } from "./images.ts";
import { latestCheckpoint } from "./checkpoint.ts";
import { networkSpec } from "./trainer.ts";
import { readStoredConfig } from "./train.ts";
import { UsageError } from "../util/errors.ts";
import { parseUsage } from "../util/config.ts";
import { checkWritable, parentDir, writeFileAtomic } from "../util/files.ts";
import { checkMemory, defaultMemoryLimitMiB } from "./cost.ts";

/** Options of `sample` (`deno task sample`): the sampler settings plus what to sample and where to write it. */
export const SampleConfigSchema = SamplerSettingsSchema.extend({
  // The run directory to sample from (its newest checkpoint); may be left out when `checkpoint` is given.
  run: z.string().min(1).optional(),
  // A checkpoint folder to use instead of the run's newest (a run's <run>/checkpoints/step-N).
  checkpoint: z.string().min(1).optional(),
  // Number of images.
  n: z.number().int().positive().default(64),
  // Sample with the EMA weights (as EDM does) rather than the raw network weights.
  ema: z.boolean().default(true),
  // DDSM width multiplier to run the network at.
  width: z.number().gt(0).lte(1).default(1),
  // Seed of the latents and of Algorithm 2's noise.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // Images per network batch (default: all n at once).
  batch: z.number().int().positive().optional(),
  // Class of every image for a class-conditional network (default: the classes in turn).
  classLabel: z.number().int().nonnegative().optional(),
  // The PNG grid to write (default: <run>/samples/sample-<checkpoint>.png).
  out: z.string().min(1).optional(),
  // Also write the raw samples [n, C, H, W] in [−1, 1] to this .safetensors file.
  raw: z.string().min(1).optional(),
  // Images per row of the grid (default ⌈√n⌉).
  cols: z.number().int().positive().optional(),
  // Device: WebGPU or the CPU reference kernels.
  backend: z.enum(["webgpu", "cpu"]).default("webgpu"),
  // Ceiling of the estimated memory of sampling, in MiB (default: the machine's).
  memoryLimitMiB: z.number().positive().finite().optional(),
}).strict();
export type SampleConfigInput = z.input<typeof SampleConfigSchema>;

/** The outcome of `sample`. */
export interface SampleResult {
  /** The PNG grid written. */
  path: string;
  /** The raw samples' file, if asked for. */
  rawPath?: string;
  /** The checkpoint sampled from and its step. */
  checkpoint: string;
  step: number;
  shape: number[];
  /** Network evaluations per image. */
  nfe: number;
  seconds: number;
}

/**
 * Loads a checkpoint (EMA weights by default), runs the chosen EDM sampler for `n` images and writes a PNG grid
 * (and optionally the raw samples). Latents are drawn at once from the seeded device generator, so the images do
 * not depend on `batch`.
 */
export async function sample(
  input: SampleConfigInput | Record<string, unknown>,
  opts: { device?: Device; onStep?: (info: StepInfo & { batch: number; batches: number }) => void } = {},
): Promise<SampleResult> {
  const o = parseUsage(SampleConfigSchema, input, "sample config");
  if (o.run === undefined && o.checkpoint === undefined) {
    throw new UsageError("run: give a run folder (its newest checkpoint) or a checkpoint folder");
  }
  const checkpoint = o.checkpoint?.replace(/(.)\/+$/, "$1");
  // A checkpoint alone belongs to the run two folders up (<run>/checkpoints/step-N).
  const run = o.run ?? parentDir(parentDir(checkpoint!));
  // The folder the user named: the run, or the checkpoint when no run was given.
  const [what, given] = o.run === undefined ? ["checkpoint", o.checkpoint!] : ["run", o.run];
  const info = await Deno.stat(given).catch(() => null);
  if (!info) throw new UsageError(`${what}: ${given} does not exist`);
  if (!info.isDirectory) throw new UsageError(`${what}: ${given} is a file, not a ${what} folder`);
  const dir = checkpoint ?? await latestCheckpoint(run);
  if (!dir) throw new UsageError(`${run} has no checkpoint yet (${run}/checkpoints/step-*/ is missing)`);
  // The outputs are checked now, not after minutes of sampling.
  const path = o.out ?? `${run}/samples/sample-${dir.split("/").pop()}.png`;
  await checkWritable(path, "out");
  if (o.raw) await checkWritable(o.raw, "raw");
  const { state, cfg } = await readStoredConfig(dir);
  const spec = networkSpec(cfg);
  if (o.classLabel !== undefined && o.classLabel >= spec.labelDim) {
    throw new UsageError(
      `classLabel: ${o.classLabel} is not a class of this ${
        spec.labelDim ? `${spec.labelDim}-class` : "unconditional"
      } network`,
    );
  }
  // Nothing is allocated before the network, the batch and the n images are known to fit.
  const [C, R] = [spec.inChannels, spec.imgResolution], per = C * R * R;
  const memory = (deviceLimits?: Readonly<Record<string, number>>) =>
    checkMemory(spec, {
      what: "sample",
      mode: "sample",
      batch: Math.min(o.batch ?? o.n, o.n),
      batchField: o.batch === undefined ? "n" : "batch",
      // The samples read back (float32), the grid's pixels and PNG, and the raw file's bytes.
      held: { images: o.n, field: "n", bytesPerImage: (o.raw ? 10 : 6) * per },
      memoryLimitMiB: o.memoryLimitMiB ?? defaultMemoryLimitMiB(),
      deviceLimits,
    });
  memory();
  const device = opts.device ?? await Device.create({ backend: o.backend });
  const t0 = performance.now();
  let gen: CheckpointGenerator | undefined;
  try {
    memory(device.info.limits);
    gen = await CheckpointGenerator.open(dir, spec, {
      device,
      ema: o.ema,
      width: o.width,
      sigmaData: cfg.sigmaData,
    });
    const batch = o.batch ?? o.n, batches = Math.ceil(o.n / batch);
    const host = new Float32Array(o.n * per);
    let nfe = 0;
    for (let b = 0; b < batches; b++) {
      const start = b * batch, len = Math.min(batch, o.n - start);
      const x = gen.generate(start, len, {
        seed: o.seed,
        settings: o,
        classLabel: o.classLabel,
        onStep: (info) => {
          nfe = info.nfe;
          opts.onStep?.({ ...info, batch: b, batches });
        },
      });
      host.set(await x.toArray(), start * per);
      x.dispose();
    }
    const shape = [o.n, C, R, R];
    // Finite weights can still overflow (huge values just before a divergence): never write NaN images.
    let nonFinite = 0;
    for (let i = 0; i < host.length; i++) if (!Number.isFinite(host[i])) nonFinite++;
    if (nonFinite) {
      throw new Error(
        `${dir}: ${nonFinite} of ${host.length} sample values are NaN or ±Inf (the network's weights overflow; ` +
          `sample an earlier checkpoint with --checkpoint); nothing was written`,
      );
    }
    await saveImageGrid(path, { data: host, shape }, { cols: o.cols });
    let rawPath: string | undefined;
    if (o.raw) {
      rawPath = o.raw;
      const bytes = encodeSafetensors({ samples: { shape, data: host } }, {
        checkpoint: dir,
        sampler: o.sampler,
        steps: String(o.steps),
        seed: String(o.seed),
      });
      await writeFileAtomic(rawPath, bytes);
    }
    return {
      path,
      rawPath,
      checkpoint: dir,
      step: state.step,
      shape,
      nfe,
      seconds: (performance.now() - t0) / 1000,
    };
  } finally {
    gen?.dispose();
    if (!opts.device) device.destroy();
  }
}
