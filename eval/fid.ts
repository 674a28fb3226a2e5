/**
 * @file Fréchet Inception Distance (Heusel et al. 2017) and Kernel Inception Distance (Bińkowski et al. 2018)
 * from feature vectors, computed the way NVlabs/edm's fid.py does but in float64 throughout on the host.
 *
 * - `FeatureStatistics` accumulates the mean and the unbiased covariance of features batch by batch in float64.
 *   Each batch contributes its own mean and its scatter about that mean, merged with Chan et al.'s pairwise
 *   update (M₂ = M₂a + M₂b + δδᵀ·na·nb/n): no Σxxᵀ − n·μμᵀ cancellation, which in EDM's formula loses digits
 *   when |μ| is large against the spread. `addTensor` forms the batch scatter on the device (float32, about the
 *   batch mean, so nothing large cancels) and merges in float64 here.
 * - `frechetDistance(μ₁, Σ₁, μ₂, Σ₂)` = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2·Tr √(Σ₁^{1/2}Σ₂Σ₁^{1/2}), the last term from
 *   symmetric eigendecompositions (eval/linalg.ts), so singular covariances (fewer samples than dimensions) and
 *   round-off negatives are handled without the complex-valued detours of scipy's sqrtm. `FrechetReference`
 *   decomposes a fixed reference covariance once, for the many distances a search computes against it.
 * - `kernelInceptionDistance`: the unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³ over
 *   random subsets (default 100 subsets of 1000 from each set, drawn without replacement, as in the paper and
 *   StyleGAN2-ADA / torch-fidelity), reported as mean and standard deviation (population, ddof = 0, like
 *   torch-fidelity) over the subsets. Everything runs in float64 on the host, or, given a device, the Gram
 *   matrices are multiplied there in float32 and read back, and the kernel and its sums stay in float64.
 * - Statistics files: ours are safetensors with F64 tensors `mu` [d] and `sigma` [d, d] and `__metadata__`
 *   {format: "fid-statistics", count}; `.npz` files with arrays `mu` and `sigma` (NVlabs/edm's fid-refs,
 *   pytorch-fid's) are read and written too (eval/npz.ts).
 */

import { z } from "zod";
import {
  Device,
  matmul,
  mean as meanOp,
  noGrad,
  scope,
  sub,
  type Tensor,
  tensor,
  transpose,
} from "../engine/mod.ts";
import { gemmABt, psdSqrtFactor, traceSqrtFromFactor, type TraceSqrtTimings } from "./linalg.ts";
import { encodeNpz, readNpz } from "./npz.ts";
import { Rng } from "../util/random.ts";
import { parseConfig } from "../util/config.ts";
import { writeFileAtomic } from "../util/files.ts";

/** Feature statistics: mean μ [d] and unbiased covariance Σ [d·d], row-major, and the sample count if known. */
export interface FidStatistics {
  mu: Float64Array;
  sigma: Float64Array;
  /** Number of samples the statistics came from (unknown for some reference files). */
  count?: number;
}

// ---------------------------------------------------------------------------------------------------------------
// Accumulation.

/** Running mean and covariance of d-dimensional features, merged batch by batch in float64. */
export class FeatureStatistics {
  #n = 0;
  readonly #mean: Float64Array;
  /** Lower triangle of Σ (x − mean)(x − mean)ᵀ. */
  readonly #m2: Float64Array;

  constructor(readonly dim: number) {
    if (!Number.isInteger(dim) || dim < 1) {
      throw new Error(`FeatureStatistics: dim must be a positive integer, got ${dim}`);
    }
    this.#mean = new Float64Array(dim);
    this.#m2 = new Float64Array(dim * dim);
  }

  /** Samples seen so far. */
  get count(): number {
    return this.#n;
  }

  /** Adds `rows` feature vectors, row-major (rows × dim values), in float64. */
  add(features: ArrayLike<number>, rows = features.length / this.dim): this {
    const d = this.dim;
    if (!Number.isInteger(rows) || rows < 1 || features.length !== rows * d) {
      throw new Error(
        `FeatureStatistics.add: expected rows × ${d} values, got ${features.length} (rows ${rows})`,
      );
    }
    const mb = new Float64Array(d);
    for (let r = 0; r < rows; r++) {
      for (let j = 0; j < d; j++) mb[j] += features[r * d + j];
    }
    for (let j = 0; j < d; j++) mb[j] /= rows;
    // Centered batch, transposed (d × rows), so the scatter is one A·Aᵀ product along contiguous rows.
    const xt = new Float64Array(d * rows);
    for (let r = 0; r < rows; r++) {
      for (let j = 0; j < d; j++) {
        const v = features[r * d + j];
        if (!Number.isFinite(v)) throw new Error(`FeatureStatistics.add: feature [${r}, ${j}] is ${v}`);
        xt[j * rows + r] = v - mb[j];
      }
    }
    this.#merge(rows, mb, gemmABt(xt, xt, d, d, rows, { lower: true }));
    return this;
  }

  /**
   * Adds a batch of features [N, dim] held by a tensor: the batch mean and the scatter about it are computed on
   * the tensor's device (one readback), then merged in float64.
   */
  async addTensor(features: Tensor): Promise<this> {
    const d = this.dim;
    if (features.rank !== 2 || features.shape[1] !== d) {
      throw new Error(`FeatureStatistics.addTensor: expected [N, ${d}], got [${features.shape}]`);
    }
    const rows = features.shape[0];
    const [m, s] = noGrad(() =>
      scope(() => {
        const m = meanOp(features, 0, true);
        const xc = sub(features, m);
        return [m, matmul(transpose(xc, 0, 1), xc)];
      })
    );
    try {
      const mb = await m.toFloat64Array(), scatter = await s.toFloat64Array();
      for (let i = 0; i < d * d; i++) {
        if (!Number.isFinite(scatter[i])) throw new Error("FeatureStatistics.addTensor: non-finite features");
      }
      this.#merge(rows, mb, scatter);
    } finally {
      m.dispose();
      s.dispose();
    }
    return this;
  }

  /** Merges another accumulator's samples into this one. */
  merge(other: FeatureStatistics): this {
    if (other.dim !== this.dim) {
      throw new Error(`FeatureStatistics.merge: dims ${this.dim} and ${other.dim} differ`);
    }
    if (other.#n > 0) this.#merge(other.#n, other.#mean, other.#m2);
    return this;
  }

  /** Chan et al.'s pairwise update with a batch of nb samples, mean mb and scatter sb (lower triangle read). */
  #merge(nb: number, mb: ArrayLike<number>, sb: ArrayLike<number>) {
    const d = this.dim, na = this.#n, n = na + nb;
    const delta = new Float64Array(d);
    for (let j = 0; j < d; j++) delta[j] = mb[j] - this.#mean[j];
    const w = (na * nb) / n;
    for (let i = 0; i < d; i++) {
      const row = i * d, di = delta[i] * w;
      for (let j = 0; j <= i; j++) this.#m2[row + j] += sb[row + j] + di * delta[j];
    }
    for (let j = 0; j < d; j++) this.#mean[j] += delta[j] * (nb / n);
    this.#n = n;
  }

  /** The mean μ (a copy). */
  mean(): Float64Array {
    return this.#mean.slice();
  }

  /** The unbiased covariance Σ = M₂/(n − 1), full and symmetric; needs at least two samples. */
  covariance(): Float64Array {
    const d = this.dim;
    if (this.#n < 2) throw new Error(`FeatureStatistics: a covariance needs ≥ 2 samples, have ${this.#n}`);
    const out = new Float64Array(d * d);
    for (let i = 0; i < d; i++) {
      for (let j = 0; j <= i; j++) {
        const v = this.#m2[i * d + j] / (this.#n - 1);
        out[i * d + j] = v;
        out[j * d + i] = v;
      }
    }
    return out;
  }

  /** μ, Σ and the count. */
  statistics(): FidStatistics {
    return { mu: this.mean(), sigma: this.covariance(), count: this.#n };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fréchet distance.

/** Validates μ, Σ and returns d. */
function checkStatistics(who: string, mu: ArrayLike<number>, sigma: ArrayLike<number>): number {
  const d = mu.length;
  if (d < 1) throw new Error(`${who}: mu is empty`);
  if (sigma.length !== d * d) {
    throw new Error(`${who}: sigma has ${sigma.length} values, expected ${d}×${d} for mu of length ${d}`);
  }
  for (let i = 0; i < d; i++) if (!Number.isFinite(mu[i])) throw new Error(`${who}: mu[${i}] is ${mu[i]}`);
  for (let i = 0; i < d * d; i++) {
    if (!Number.isFinite(sigma[i])) throw new Error(`${who}: sigma[${i}] is ${sigma[i]}`);
  }
  return d;
}

function trace(sigma: ArrayLike<number>, d: number): number {
  let t = 0;
  for (let i = 0; i < d; i++) t += sigma[i * d + i];
  return t;
}

/**
 * A fixed reference distribution (μ_ref, Σ_ref) whose covariance is decomposed once (Σ_ref = Wᵀ·W), so that each
 * `distance` costs two matrix products and one eigenvalue computation instead of a full eigendecomposition
 * more. Tr √(Σ_ref^{1/2}·Σ·Σ_ref^{1/2}) = Tr √(Σ^{1/2}·Σ_ref·Σ^{1/2}) (both are Σᵢ √λᵢ(Σ_ref·Σ)), so the distance is
 * the same FID whichever side is decomposed.
 */
export class FrechetReference {
  readonly dim: number;
  readonly mu: Float64Array;
  readonly #trace: number;
  readonly #w: Float64Array;
  readonly #rank: number;

  constructor(mu: ArrayLike<number>, sigma: ArrayLike<number>) {
    this.dim = checkStatistics("FrechetReference", mu, sigma);
    this.mu = Float64Array.from(mu);
    this.#trace = trace(sigma, this.dim);
    const { w, rank } = psdSqrtFactor(sigma, this.dim);
    this.#w = w;
    this.#rank = rank;
  }

  /** FID between (μ, Σ) and the reference. */
  distance(
    mu: ArrayLike<number>,
    sigma: ArrayLike<number>,
    timings?: Omit<TraceSqrtTimings, "eigenWithVectors">,
  ) {
    const d = checkStatistics("FrechetReference.distance", mu, sigma);
    if (d !== this.dim) {
      throw new Error(`FrechetReference.distance: dimension ${d}, the reference has ${this.dim}`);
    }
    let dist2 = 0;
    for (let i = 0; i < d; i++) dist2 += (mu[i] - this.mu[i]) ** 2;
    const covMean = traceSqrtFromFactor(this.#w, this.#rank, sigma, d, timings);
    return dist2 + this.#trace + trace(sigma, d) - 2 * covMean;
  }
}

/**
 * The Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂): ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2·Tr √(Σ₁^{1/2}Σ₂Σ₁^{1/2}),
 * in float64. μ of length d, Σ row-major d×d (symmetric positive semi-definite; it is symmetrised first).
 */
export function frechetDistance(
  mu1: ArrayLike<number>,
  sigma1: ArrayLike<number>,
  mu2: ArrayLike<number>,
  sigma2: ArrayLike<number>,
): number {
  const d1 = checkStatistics("frechetDistance (first)", mu1, sigma1);
  const d2 = checkStatistics("frechetDistance (second)", mu2, sigma2);
  if (d1 !== d2) throw new Error(`frechetDistance: dimensions ${d1} and ${d2} differ`);
  return new FrechetReference(mu1, sigma1).distance(mu2, sigma2);
}

/** FID between two sets of statistics. */
export function fidFromStatistics(a: FidStatistics, b: FidStatistics): number {
  return frechetDistance(a.mu, a.sigma, b.mu, b.sigma);
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel Inception Distance.

/** KID options (Bińkowski et al. 2018, §3; defaults as in their code, StyleGAN2-ADA and torch-fidelity). */
export const KidOptionsSchema = z.strictObject({
  /** Random subsets the unbiased MMD² is averaged over. */
  subsets: z.number().int().min(1).default(100),
  /** Samples drawn without replacement from each set per subset (capped at the smaller set's size). */
  subsetSize: z.number().int().min(2).default(1000),
  /** Seed of the subset sampler: the same seed draws the same subsets. */
  seed: z.number().int().min(0).max(2 ** 32 - 1).default(0),
  /** Device for the Gram matrices (float32 products; kernel and sums in float64); absent: all on the host. */
  device: z.custom<Device>((v) => v instanceof Device, { message: "expected an engine Device" }).optional(),
});
export type KidOptions = z.input<typeof KidOptionsSchema>;

/** KID: the mean and (population) standard deviation of the per-subset unbiased MMD² estimates. */
export interface KidResult {
  mean: number;
  std: number;
  /** The per-subset estimates. */
  values: Float64Array;
  /** Samples per set per subset actually used. */
  subsetSize: number;
}

/** The first m entries of `perm` become a uniformly random m-subset (partial Fisher–Yates, any start order). */
function drawSubset(perm: Int32Array, m: number, rng: Rng): Int32Array {
  for (let i = 0; i < m; i++) {
    const j = i + rng.int(perm.length - i);
    const t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  return perm.subarray(0, m);
}

/** Σ_{i≠j} k(xᵢ, xⱼ), Σ_{i≠j} k(yᵢ, yⱼ) and Σ_{i,j} k(xᵢ, yⱼ) of one subset. */
type Sums = [number, number, number];
/** Computes the cubic-kernel sums of one subset of m rows from each set. */
type KernelSums = (xs: Float64Array, ys: Float64Array, m: number) => Sums | Promise<Sums>;

const cube = (v: number) => v * v * v;

function hostKernelSums(d: number): KernelSums {
  return (xs, ys, m) => {
    const offDiagonal = (g: Float64Array) => {
      let s = 0;
      for (let i = 0; i < m; i++) for (let j = 0; j < i; j++) s += cube(g[i * m + j] / d + 1);
      return 2 * s;
    };
    const kxx = offDiagonal(gemmABt(xs, xs, m, m, d, { lower: true }));
    const kyy = offDiagonal(gemmABt(ys, ys, m, m, d, { lower: true }));
    const gxy = gemmABt(xs, ys, m, m, d);
    let kxy = 0;
    for (let i = 0; i < m * m; i++) kxy += cube(gxy[i] / d + 1);
    return [kxx, kyy, kxy];
  };
}

function deviceKernelSums(device: Device, d: number): KernelSums {
  return async (xs, ys, m) => {
    // Gram matrices on the device (float32 dot products), read back; the cubic kernel and the sums in float64,
    // where the cancellation between the three terms happens (KID is ~1e-3 of each).
    const grams = noGrad(() =>
      scope(() => {
        const x = tensor(Float32Array.from(xs), [m, d], { device });
        const y = tensor(Float32Array.from(ys), [m, d], { device });
        return [matmul(x, transpose(x, 0, 1)), matmul(y, transpose(y, 0, 1)), matmul(x, transpose(y, 0, 1))];
      })
    );
    try {
      const [gxx, gyy, gxy] = [await grams[0].toArray(), await grams[1].toArray(), await grams[2].toArray()];
      const offDiagonal = (g: Float32Array) => {
        let s = 0;
        for (let i = 0; i < m; i++) {
          for (let j = 0; j < m; j++) if (i !== j) s += cube(g[i * m + j] / d + 1);
        }
        return s;
      };
      let kxy = 0;
      for (let i = 0; i < m * m; i++) kxy += cube(gxy[i] / d + 1);
      return [offDiagonal(gxx), offDiagonal(gyy), kxy];
    } finally {
      for (const t of grams) t.dispose();
    }
  };
}

/**
 * Kernel Inception Distance between feature sets x (nx × dim, row-major) and y (ny × dim): for each subset, m
 * rows drawn without replacement from each, MMD²ᵤ = [Σ_{i≠j} k(xᵢ,xⱼ) + Σ_{i≠j} k(yᵢ,yⱼ)]/(m(m−1))
 * − 2·Σ_{i,j} k(xᵢ,yⱼ)/m², k(a, b) = (aᵀb/dim + 1)³. Returns the mean and std over subsets.
 */
export async function kernelInceptionDistance(
  x: ArrayLike<number>,
  y: ArrayLike<number>,
  dim: number,
  options: KidOptions = {},
): Promise<KidResult> {
  const opts = parseConfig(KidOptionsSchema, options, "kernelInceptionDistance");
  if (!Number.isInteger(dim) || dim < 1) {
    throw new Error(`kernelInceptionDistance: dim must be ≥ 1, got ${dim}`);
  }
  const nx = x.length / dim, ny = y.length / dim;
  if (!Number.isInteger(nx) || !Number.isInteger(ny)) {
    throw new Error(`kernelInceptionDistance: ${x.length} and ${y.length} values are not rows of ${dim}`);
  }
  const m = Math.min(opts.subsetSize, nx, ny);
  if (m < 2) throw new Error(`kernelInceptionDistance: needs ≥ 2 samples per set, have ${nx} and ${ny}`);
  const rng = new Rng(opts.seed);
  const px = Int32Array.from({ length: nx }, (_, i) => i), py = Int32Array.from({ length: ny }, (_, i) => i);
  const sums = opts.device ? deviceKernelSums(opts.device, dim) : hostKernelSums(dim);
  const gather = (src: ArrayLike<number>, rows: Int32Array) => {
    const out = new Float64Array(rows.length * dim);
    rows.forEach((r, i) => {
      for (let k = 0; k < dim; k++) out[i * dim + k] = src[r * dim + k];
    });
    return out;
  };
  const values = new Float64Array(opts.subsets);
  for (let s = 0; s < opts.subsets; s++) {
    const xs = gather(x, drawSubset(px, m, rng)), ys = gather(y, drawSubset(py, m, rng));
    const [kxx, kyy, kxy] = await sums(xs, ys, m);
    values[s] = (kxx + kyy) / (m * (m - 1)) - (2 * kxy) / (m * m);
  }
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  const std = Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / values.length);
  return { mean, std, values, subsetSize: m };
}

// ---------------------------------------------------------------------------------------------------------------
// Files.

const STATS_FORMAT = "fid-statistics";

/**
 * Safetensors bytes of statistics: F64 tensors `mu` [d] and `sigma` [d, d] (8-byte aligned, sorted by name, as
 * the format's reference writer does) and `__metadata__` {format, count, …metadata}.
 */
export function encodeStatistics(stats: FidStatistics, metadata: Record<string, string> = {}): Uint8Array {
  const d = checkStatistics("encodeStatistics", stats.mu, stats.sigma);
  const meta: Record<string, string> = { ...metadata, format: STATS_FORMAT };
  if (stats.count !== undefined) meta.count = String(stats.count);
  const data = new Float64Array(d + d * d);
  data.set(stats.mu);
  data.set(stats.sigma, d);
  meta.checksum = statisticsChecksum(new Uint8Array(data.buffer));
  const header = {
    __metadata__: meta,
    mu: { dtype: "F64", shape: [d], data_offsets: [0, 8 * d] },
    sigma: { dtype: "F64", shape: [d, d], data_offsets: [8 * d, 8 * d + 8 * d * d] },
  };
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) {
    json = Uint8Array.from([...json, ...new Array(padded - json.length).fill(0x20)]);
  }
  const out = new Uint8Array(8 + json.length + 8 * (d + d * d));
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let at = 8 + json.length;
  for (const arr of [stats.mu, stats.sigma]) {
    for (let i = 0; i < arr.length; i++, at += 8) view.setFloat64(at, arr[i], true);
  }
  return out;
}

/** FNV-1a (32 bits, hex) of the bytes: the checksum of a statistics file's data, to find a damaged one. */
export function statisticsChecksum(bytes: Uint8Array): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i], 0x01000193);
  return (h >>> 0).toString(16).padStart(8, "0");
}

/** Parses statistics from safetensors bytes (F64 or F32 `mu`, `sigma`); `source` names the file in errors. */
export function decodeStatistics(
  bytes: Uint8Array,
  source = "<bytes>",
): FidStatistics & { metadata: Record<string, string> } {
  const fail = (msg: string): never => {
    throw new Error(`statistics ${source}: ${msg}`);
  };
  if (bytes.length < 8) fail("too short to be a safetensors file");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  if (n > bytes.length - 8) fail(`header length ${n} runs past the end of the ${bytes.length}-byte file`);
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + n)));
  } catch (e) {
    return fail(`header is not valid JSON: ${(e as Error).message}`);
  }
  const dataStart = 8 + n, dataLen = bytes.length - dataStart;
  const read = (name: string, rank: number) => {
    const info = header[name] as { dtype?: string; shape?: number[]; data_offsets?: number[] } | undefined;
    if (!info) return fail(`has no tensor "${name}" (keys: ${Object.keys(header).join(", ")})`);
    const { dtype, shape, data_offsets: off } = info;
    const width = dtype === "F64"
      ? 8
      : dtype === "F32"
      ? 4
      : fail(`"${name}" has dtype ${dtype}, not F64/F32`);
    if (!Array.isArray(shape) || shape.length !== rank || !shape.every((v) => Number.isInteger(v) && v > 0)) {
      fail(`"${name}" has shape ${JSON.stringify(shape)}, expected rank ${rank}`);
    }
    const count = shape!.reduce((a, b) => a * b, 1);
    if (!Array.isArray(off) || off.length !== 2 || off[1] - off[0] !== count * width || off[1] > dataLen) {
      fail(`"${name}" has data_offsets ${JSON.stringify(off)} inconsistent with its shape or the file size`);
    }
    const out = new Float64Array(count);
    for (let i = 0; i < count; i++) {
      const at = dataStart + off![0] + i * width;
      out[i] = width === 8 ? view.getFloat64(at, true) : view.getFloat32(at, true);
    }
    return { shape: shape!, data: out };
  };
  const mu = read("mu", 1), sigma = read("sigma", 2);
  const d = mu.shape[0];
  if (sigma.shape[0] !== d || sigma.shape[1] !== d) {
    fail(`sigma has shape [${sigma.shape}], expected [${d}, ${d}] for mu of shape [${d}]`);
  }
  const metadata = (header.__metadata__ ?? {}) as Record<string, string>;
  if (metadata.checksum !== undefined) {
    const data = new Float64Array(d + d * d);
    data.set(mu.data);
    data.set(sigma.data, d);
    const sum = statisticsChecksum(new Uint8Array(data.buffer));
    if (sum !== metadata.checksum) fail(`checksum ${sum} does not match the recorded ${metadata.checksum}`);
  }
  const count = metadata.count !== undefined ? Number(metadata.count) : undefined;
  return { mu: mu.data, sigma: sigma.data, count, metadata };
}

/**
 * Writes statistics to `path`: as `.npz` (arrays `mu`, `sigma` in float64, readable by NVlabs/edm's fid.py) when
 * the name ends in ".npz", else as our safetensors format. Written atomically and durably (util/files.ts).
 */
export async function saveStatistics(
  path: string,
  stats: FidStatistics,
  metadata: Record<string, string> = {},
): Promise<void> {
  const bytes = path.toLowerCase().endsWith(".npz")
    ? (checkStatistics("saveStatistics", stats.mu, stats.sigma),
      encodeNpz({
        mu: { data: Float64Array.from(stats.mu), shape: [stats.mu.length] },
        sigma: { data: Float64Array.from(stats.sigma), shape: [stats.mu.length, stats.mu.length] },
      }))
    : encodeStatistics(stats, metadata);
  try {
    await writeFileAtomic(path, bytes);
  } catch (e) {
    // The message is "cannot write <path>: <reason>".
    throw new Error(`saveStatistics ${path}: ${(e as Error).message}`);
  }
}

/** Reads statistics from an `.npz` (keys `mu`, `sigma`) or our safetensors file, recognised by content. */
export async function loadStatistics(path: string): Promise<FidStatistics> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    throw new Error(`statistics ${path}: cannot read the file: ${(e as Error).message}`);
  }
  if (bytes[0] === 0x50 && bytes[1] === 0x4b) {
    const arrays = await readNpz(bytes, path);
    const { mu, sigma } = arrays;
    if (!mu || !sigma) {
      throw new Error(
        `statistics ${path}: the npz needs arrays "mu" and "sigma", has ${Object.keys(arrays)}`,
      );
    }
    const d = mu.shape[0];
    if (mu.shape.length !== 1 || sigma.shape.length !== 2 || sigma.shape[0] !== d || sigma.shape[1] !== d) {
      throw new Error(`statistics ${path}: mu (${mu.shape}) and sigma (${sigma.shape}) do not match`);
    }
    return { mu: Float64Array.from(mu.data), sigma: Float64Array.from(sigma.data) };
  }
  const { mu, sigma, count } = decodeStatistics(bytes, path);
  return { mu, sigma, count };
}
