/**
 * @file Validity controls of a feature network: Fréchet distances from real procedural images to disturbed or
 * emptied versions of other real images, whose order tells whether the network's distances mean what a search
 * needs them to mean.
 *
 * The reference is `n` images of one seed; every control is `n` images of another seed, changed as named:
 * - real (other seed): nothing changed, the floor a sample of `n` images reaches;
 * - Gaussian noise of σ = 0.05, 0.1, 0.2, 0.4 (in the [−1, 1] scale) added to every pixel: the ladder must rise;
 * - blurred (3×3 box filter);
 * - background only: the same scenes painted without their shapes (models/data.ts `shapes: false`). A network
 *   that sees shapes must put these far from the data, further than σ = 0.2 noise, which leaves every shape
 *   visible; the earlier ShapesNet did not (the issue that added this file);
 * - colours permuted: every image's channels rotated (RGB → GBR). The generator draws colours uniformly, so this
 *   is almost the data's own distribution: a score near the real floor says the network is not misled by a
 *   colour cast either. (The flat scenes are grey, so for them the rotation changes nothing.)
 * Images are quantized to 8 bits before their features are taken, like a sampler's output.
 *
 * A dataset read from files (Fashion-MNIST) has no seeds to draw a second sample from, so
 * `measureDatasetControls` compares a seeded random subset of its training split (the reference) with the
 * held-out split, changed as above; instead of "background only" it has "item removed": images drawn pixel by
 * pixel from a normal distribution with the reference's per-pixel mean and standard deviation, the right
 * brightness everywhere but no garment.
 */

import { type Dataset, type ProceduralScene, renderProcedural } from "../models/data.ts";
import { hash2, Rng } from "../util/random.ts";
import { fidFromStatistics } from "./fid.ts";
import type { FeatureExtractor } from "./features.ts";
import { streamStatistics } from "./proxy.ts";

/** The controls, in table order. */
export const CONTROLS = [
  "real (other seed)",
  "noise σ=0.05",
  "noise σ=0.1",
  "noise σ=0.2",
  "noise σ=0.4",
  "blurred 3×3",
  "background only",
  "colours permuted",
] as const;
export type Control = (typeof CONTROLS)[number];

/** The σ of a "noise σ=…" control (0 for the others). */
const noiseLevel = (
  control: string,
) => (control.startsWith("noise") ? Number(control.slice("noise σ=".length)) : 0);

/** Adds N(0, σ²) to every value of `x` (in place), from a generator seeded per image so any subset repeats. */
function addNoise(x: Float32Array, sigma: number, seed: number, index: number): Float32Array {
  const rng = new Rng(hash2(seed ^ 0x5eed, index));
  for (let i = 0; i < x.length; i++) {
    // Box–Muller.
    const r = Math.sqrt(-2 * Math.log(1 - rng.next())), t = 2 * Math.PI * rng.next();
    x[i] += sigma * r * Math.cos(t);
  }
  return x;
}

/** A 3×3 box blur of planar [C, R, R] values (edges clamped). */
export function boxBlur(x: Float32Array, R: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let c = 0; c < x.length / (R * R); c++) {
    for (let y = 0; y < R; y++) {
      for (let xx = 0; xx < R; xx++) {
        let s = 0;
        for (let dy = -1; dy <= 1; dy++) {
          for (let dx = -1; dx <= 1; dx++) {
            const yy = Math.min(R - 1, Math.max(0, y + dy)), xc = Math.min(R - 1, Math.max(0, xx + dx));
            s += x[c * R * R + yy * R + xc];
          }
        }
        out[c * R * R + y * R + xx] = s / 9;
      }
    }
  }
  return out;
}

/** Image `index` of `seed` as the control asks for it: planar [3, R, R] in [−1, 1]. */
export function controlImage(
  control: Control,
  scene: ProceduralScene,
  seed: number,
  index: number,
  R: number,
): Float32Array {
  const { bytes } = renderProcedural(seed, index, R, { scene, shapes: control !== "background only" });
  const x = Float32Array.from(bytes, (b) => b / 127.5 - 1);
  const sigma = noiseLevel(control);
  if (sigma > 0) return addNoise(x, sigma, seed, index);
  if (control === "blurred 3×3") return boxBlur(x, R);
  if (control === "colours permuted") {
    const P = R * R, out = new Float32Array(x.length);
    for (let c = 0; c < 3; c++) out.set(x.subarray(((c + 1) % 3) * P, ((c + 1) % 3 + 1) * P), c * P);
    return out;
  }
  return x;
}

/** Options of `measureControls`. */
export interface ControlOptions {
  /** Scene style of the procedural data. */
  scene: ProceduralScene;
  /** Image side in pixels. */
  resolution: number;
  /** Images per side of each distance (FID-n). */
  n: number;
  /** Seed of the reference images (default 0); the controls use seed + 1. */
  seed?: number;
  /** Images per feature batch (default 256). */
  batch?: number;
  /** Which controls (default all, in table order). */
  controls?: readonly Control[];
  onProgress?: (control: Control | "reference", done: number, total: number) => void;
}

/** The Fréchet distance of every control to the reference images (see the file comment). */
export async function measureControls(
  extractor: FeatureExtractor,
  o: ControlOptions,
): Promise<{ control: Control; fid: number }[]> {
  const seed = o.seed ?? 0, R = o.resolution, per = 3 * R * R, batch = o.batch ?? 256;
  const stats = (control: Control, s: number, name: Control | "reference") =>
    streamStatistics(extractor, o.n, batch, (start, count) => {
      const data = new Float32Array(count * per);
      for (let i = 0; i < count; i++) data.set(controlImage(control, o.scene, s, start + i, R), i * per);
      return Promise.resolve({ data, shape: [count, 3, R, R] });
    }, { onProgress: (d, t) => o.onProgress?.(name, d, t) });
  const reference = (await stats("real (other seed)", seed, "reference")).stats;
  const out: { control: Control; fid: number }[] = [];
  for (const control of o.controls ?? CONTROLS) {
    out.push({ control, fid: fidFromStatistics(reference, (await stats(control, seed + 1, control)).stats) });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Controls of a dataset read from files.

/** The controls of `measureDatasetControls`, in table order. */
export const DATASET_CONTROLS = [
  "real (held-out split)",
  "noise σ=0.05",
  "noise σ=0.1",
  "noise σ=0.2",
  "noise σ=0.4",
  "blurred 3×3",
  "item removed",
] as const;
export type DatasetControl = (typeof DATASET_CONTROLS)[number];

/** Options of `measureDatasetControls`. */
export interface DatasetControlOptions {
  /** The reference: `n` images drawn at random (by `seed`) from it (the training split). */
  reference: Dataset;
  /** The controls' images: its first `n` (the held-out split). */
  heldOut: Dataset;
  /** Images per side of each distance (FID-n). */
  n: number;
  /** Seed of the reference subset and of the noise (default 0). */
  seed?: number;
  /** Images per feature batch (default 256). */
  batch?: number;
  onProgress?: (control: DatasetControl | "reference", done: number, total: number) => void;
}

/** The Fréchet distance of every dataset control to a random subset of the training split (file comment). */
export async function measureDatasetControls(
  extractor: FeatureExtractor,
  o: DatasetControlOptions,
): Promise<{ control: DatasetControl; fid: number }[]> {
  const { reference: ref, heldOut, n } = o, seed = o.seed ?? 0, batch = o.batch ?? 256;
  if (heldOut.length < n || ref.length < n) {
    throw new Error(`controls: n = ${n} is more than ${heldOut.length < n ? heldOut.name : ref.name} holds`);
  }
  const C = ref.channels, H = ref.height, W = ref.width, per = C * H * W;
  const subset = new Rng(hash2(seed, 0x7e5)).permutation(ref.length).subarray(0, n);
  const image = (ds: Dataset, i: number) => Float32Array.from(ds.bytes(i), (b) => b / 127.5 - 1);
  // Per-pixel mean and standard deviation of the reference subset, for "item removed".
  const mean = new Float32Array(per), sq = new Float32Array(per);
  for (const i of subset) {
    const x = image(ref, i);
    for (let j = 0; j < per; j++) (mean[j] += x[j] / n), (sq[j] += x[j] * x[j] / n);
  }
  const std = Float32Array.from(mean, (m, j) => Math.sqrt(Math.max(0, sq[j] - m * m)));
  const controlImage = (control: DatasetControl, i: number): Float32Array => {
    const sigma = noiseLevel(control);
    if (sigma > 0) return addNoise(image(heldOut, i), sigma, seed + 1, i);
    if (control === "blurred 3×3") return boxBlur(image(heldOut, i), H);
    if (control === "item removed") {
      // Standard normals, scaled and shifted to the reference's pixel statistics.
      const x = addNoise(new Float32Array(per), 1, seed + 2, i);
      for (let j = 0; j < per; j++) x[j] = mean[j] + std[j] * x[j];
      return x;
    }
    return image(heldOut, i);
  };
  const stats = (name: DatasetControl | "reference", draw: (i: number) => Float32Array) =>
    streamStatistics(extractor, n, batch, (start, count) => {
      const data = new Float32Array(count * per);
      for (let i = 0; i < count; i++) data.set(draw(start + i), i * per);
      return Promise.resolve({ data, shape: [count, C, H, W] });
    }, { onProgress: (d, t) => o.onProgress?.(name, d, t) });
  const reference = (await stats("reference", (i) => image(ref, subset[i]))).stats;
  const out: { control: DatasetControl; fid: number }[] = [];
  for (const control of DATASET_CONTROLS) {
    const s = (await stats(control, (i) => controlImage(control, i))).stats;
    out.push({ control, fid: fidFromStatistics(reference, s) });
  }
  return out;
}
