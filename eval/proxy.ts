/**
 * @file FID of a generator against its data, the full metric and the search's cheap proxy (RFID), and the rank
 * correlation that validates the proxy.
 *
 * Both metrics are the same Fréchet distance (eval/fid.ts) between feature statistics of generated images and
 * of the training data, through one feature network (eval/features.ts). They differ only in their protocol: how
 * many images, and which sampler. The full metric (default 2048 images, Heun with 18 steps, NFE 35) is what a
 * model is judged by; the proxy is what a search can afford for every candidate. A Fréchet distance from n
 * samples is biased upward by roughly Tr(Σ)/n, so an RFID is not comparable to an FID, and neither is comparable
 * across sample counts: hence the count in every reported name ("FID-2048", "RFID-128"). A search needs the
 * proxy only to rank models as the full metric does; `spearman` measures that (`deno task eval` over several
 * checkpoints reports it).
 *
 * The default proxy keeps the full sampler and cuts the samples: 128 images, Heun with 18 steps, 16× less network
 * work than FID-2048. Measured on a ladder of 7 checkpoints of one run (1–16 kimg, busy scenes, the first
 * ShapesNet's features; README "Evaluation and the proxy FID"), Spearman's ρ against FID-2048 was 1.000 for
 * RFID-128 and RFID-256 with 18 steps, 0.964 for RFID-64 with 18 steps, but 0.857 for every sample count
 * from 64 to 512 with 6 steps and 0.893 with 10: a short sampler changes which models look best (its
 * discretisation error is not the same for every model); few samples mostly add a bias common to all of them.
 *
 * Images are quantized to 8 bits before their features are taken (as a PNG would store them, and as NVlabs/edm
 * does), so generated and real images meet the feature network in the same form.
 */

import { z } from "zod";
import type { Tensor } from "../engine/mod.ts";
import type { Dataset } from "../models/data.ts";
import { type ImageGenerator, samplerNfe, type SamplerSettings } from "../models/generate.ts";
import {
  FeatureStatistics,
  fidFromStatistics,
  type FidStatistics,
  loadStatistics,
  saveStatistics,
} from "./fid.ts";
import { type FeatureExtractor, quantizedTensor } from "./features.ts";

// ---------------------------------------------------------------------------------------------------------------
// Protocols.

/** How one metric is measured: how many images and which sampler. */
export const FidProtocolSchema = z.strictObject({
  // Generated images.
  n: z.number().int().min(2),
  // Heun / Euler steps N (Heun: NFE = 2N − 1).
  steps: z.number().int().min(2),
  // The ODE sampler.
  sampler: z.enum(["heun", "euler"]).default("heun"),
  // Seed of the latents.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
});
export type FidProtocol = z.output<typeof FidProtocolSchema>;

/** The full metric's default protocol. */
export const FULL_FID: FidProtocol = { n: 2048, steps: 18, sampler: "heun", seed: 0 };
/** The proxy's default protocol. */
export const PROXY_FID: FidProtocol = { n: 128, steps: 18, sampler: "heun", seed: 0 };

/** A metric's reported name, with its sample count: "FID-2048", "RFID-128". */
export function metricName(kind: "FID" | "RFID", n: number): string {
  return `${kind}-${n}`;
}

/** Full sampler settings (EDM's time grid) for a protocol. */
export function protocolSettings(p: FidProtocol): SamplerSettings {
  return {
    steps: p.steps,
    sampler: p.sampler,
    sChurn: 0,
    sMin: 0,
    sNoise: 1,
    sigmaMin: 0.002,
    sigmaMax: 80,
    rho: 7,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Statistics.

/** Progress of a long feature pass. */
export type ProgressFn = (done: number, total: number) => void;

/** What a statistics pass returns: the statistics, optionally the raw features (for KID), and its time. */
export interface StatisticsResult {
  stats: FidStatistics;
  /** Features [n, dim] row-major, when asked for. */
  features?: Float32Array;
  seconds: number;
}

/**
 * Feature statistics of `n` images produced batch by batch by `images(start, count)` (host values in [−1, 1],
 * [count, 3, H, W]); each batch is quantized to 8 bits, passed through `extractor`, and merged in float64.
 */
export async function streamStatistics(
  extractor: FeatureExtractor,
  n: number,
  batch: number,
  images: (start: number, count: number) => Promise<{ data: Float32Array; shape: readonly number[] }>,
  opts: { keepFeatures?: boolean; onProgress?: ProgressFn } = {},
): Promise<StatisticsResult> {
  const t0 = performance.now();
  const acc = new FeatureStatistics(extractor.dim);
  const kept = opts.keepFeatures ? new Float32Array(n * extractor.dim) : undefined;
  for (let start = 0; start < n; start += batch) {
    const count = Math.min(batch, n - start);
    const { data, shape } = await images(start, count);
    const x = quantizedTensor(data, shape, extractor.device);
    const f = extractor.features(x);
    x.dispose();
    try {
      const host = await f.toArray();
      acc.add(host, count);
      kept?.set(host, start * extractor.dim);
    } finally {
      f.dispose();
    }
    opts.onProgress?.(start + count, n);
  }
  return { stats: acc.statistics(), features: kept, seconds: (performance.now() - t0) / 1000 };
}

/** Statistics of the first `n` images of a dataset. */
export function datasetStatistics(
  dataset: Dataset,
  extractor: FeatureExtractor,
  n: number,
  opts: { batch?: number; keepFeatures?: boolean; onProgress?: ProgressFn } = {},
): Promise<StatisticsResult> {
  if (n > dataset.length) {
    throw new Error(`datasetStatistics: ${dataset.name} has ${dataset.length} images, not ${n}`);
  }
  const per = dataset.channels * dataset.height * dataset.width;
  const shape = (count: number) => [count, dataset.channels, dataset.height, dataset.width];
  return streamStatistics(extractor, n, opts.batch ?? 256, (start, count) => {
    const data = new Float32Array(count * per);
    for (let i = 0; i < count; i++) data.set(dataset.get(start + i).image, i * per);
    return Promise.resolve({ data, shape: shape(count) });
  }, opts);
}

/**
 * Reference statistics of a dataset, read from `cacheDir` when an earlier run computed them for the same
 * dataset, feature network (by weights fingerprint) and count, else computed and cached (written atomically).
 * A cached file is used only if it decodes (header, sizes, checksum), has the features' dimension and `n`
 * images, and is finite; a bad one is recomputed and replaced, with a warning (`onWarning`, default
 * console.warn) that names it and why. `recompute` ignores the cache.
 */
export async function referenceStatistics(
  dataset: Dataset,
  extractor: FeatureExtractor,
  n: number,
  opts: {
    cacheDir?: string;
    batch?: number;
    onProgress?: ProgressFn;
    recompute?: boolean;
    onWarning?: (message: string) => void;
  } = {},
): Promise<{ stats: FidStatistics; cached: boolean; path?: string; seconds: number }> {
  const t0 = performance.now();
  const safe = (s: string) => s.replace(/[^A-Za-z0-9._-]+/g, "_");
  const path = opts.cacheDir &&
    `${opts.cacheDir}/${safe(dataset.name)}-${safe(extractor.name)}-${extractor.fingerprint}-n${n}.fidstats`;
  if (path && !opts.recompute && await Deno.stat(path).then(() => true, () => false)) {
    let problem: string;
    try {
      const stats = await loadStatistics(path);
      if (stats.mu.length !== extractor.dim) problem = `dimension ${stats.mu.length}, not ${extractor.dim}`;
      else if (stats.count !== undefined && stats.count !== n) problem = `${stats.count} images, not ${n}`;
      else if (!stats.mu.every(Number.isFinite) || !stats.sigma.every(Number.isFinite)) {
        problem = "NaN or ±Inf";
      } else return { stats, cached: true, path, seconds: (performance.now() - t0) / 1000 };
    } catch (e) {
      problem = (e as Error).message;
    }
    (opts.onWarning ?? console.warn)(
      `cached reference statistics ${path} are unusable (${problem}); recomputing`,
    );
  }
  const { stats } = await datasetStatistics(dataset, extractor, n, opts);
  if (path) {
    await Deno.mkdir(opts.cacheDir!, { recursive: true });
    await saveStatistics(path, stats, {
      dataset: dataset.name,
      features: extractor.name,
      fingerprint: extractor.fingerprint,
    });
  }
  return { stats, cached: false, path, seconds: (performance.now() - t0) / 1000 };
}

/** Statistics of `p.n` images of a generator (a checkpoint's, or an in-memory network's) under protocol `p`. */
export function generatorStatistics(
  gen: ImageGenerator,
  extractor: FeatureExtractor,
  p: FidProtocol,
  opts: { batch?: number; keepFeatures?: boolean; onProgress?: ProgressFn } = {},
): Promise<StatisticsResult> {
  const settings = protocolSettings(p);
  const shape = gen.imageShape;
  return streamStatistics(extractor, p.n, opts.batch ?? 256, async (start, count) => {
    const x: Tensor = gen.generate(start, count, { seed: p.seed, settings });
    try {
      return { data: await x.toArray(), shape: [count, ...shape] };
    } finally {
      x.dispose();
    }
  }, opts);
}

/** One metric of one generator. */
export interface FidMeasurement {
  /** "FID-2048", "RFID-128". */
  name: string;
  value: number;
  protocol: FidProtocol;
  /** Network evaluations per image. */
  nfe: number;
  /** Sampling and features (the reference statistics are not counted: they are shared and cached). */
  seconds: number;
}

/** FID (or RFID) of a generator against reference statistics, under protocol `p` (with its features if kept). */
export async function measureFid(
  kind: "FID" | "RFID",
  gen: ImageGenerator,
  extractor: FeatureExtractor,
  reference: FidStatistics,
  p: FidProtocol,
  opts: { batch?: number; keepFeatures?: boolean; onProgress?: ProgressFn } = {},
): Promise<FidMeasurement & { stats: FidStatistics; features?: Float32Array }> {
  const r = await generatorStatistics(gen, extractor, p, opts);
  const t0 = performance.now();
  const value = fidFromStatistics(r.stats, reference);
  return {
    name: metricName(kind, p.n),
    value,
    protocol: p,
    nfe: samplerNfe(protocolSettings(p)),
    seconds: r.seconds + (performance.now() - t0) / 1000,
    stats: r.stats,
    features: r.features,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Rank correlation.

/** Ranks 1..n with ties given their average rank. */
export function averageRanks(x: readonly number[]): number[] {
  const order = x.map((v, i) => [v, i] as const).sort((a, b) => a[0] - b[0]);
  const ranks = new Array<number>(x.length);
  for (let i = 0; i < order.length;) {
    let j = i;
    while (j + 1 < order.length && order[j + 1][0] === order[i][0]) j++;
    const r = (i + j) / 2 + 1;
    for (let k = i; k <= j; k++) ranks[order[k][1]] = r;
    i = j + 1;
  }
  return ranks;
}

/**
 * Spearman's ρ: the Pearson correlation of the average ranks (exact with ties). Needs two equally long lists
 * of at least 2 finite values; NaN when one list is constant.
 */
export function spearman(a: readonly number[], b: readonly number[]): number {
  if (a.length !== b.length) throw new Error(`spearman: lists of ${a.length} and ${b.length} values`);
  if (a.length < 2) throw new Error(`spearman: needs at least 2 pairs, got ${a.length}`);
  for (const v of [...a, ...b]) {
    if (!Number.isFinite(v)) throw new Error(`spearman: value ${v} is not finite`);
  }
  const ra = averageRanks(a), rb = averageRanks(b), n = a.length;
  const ma = ra.reduce((s, v) => s + v, 0) / n, mb = rb.reduce((s, v) => s + v, 0) / n;
  let sab = 0, saa = 0, sbb = 0;
  for (let i = 0; i < n; i++) {
    sab += (ra[i] - ma) * (rb[i] - mb);
    saa += (ra[i] - ma) ** 2;
    sbb += (rb[i] - mb) ** 2;
  }
  return sab / Math.sqrt(saa * sbb);
}
