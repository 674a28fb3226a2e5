/**
 * @file EDM preconditioning and training loss: Karras, Aittala, Aila and Laine (2022), "Elucidating the Design
 * Space of Diffusion-Based Generative Models" (NeurIPS), Table 1 ("Ours") and Sec. 5; the reference is
 * NVlabs/edm (`EDMPrecond` in training/networks.py, `EDMLoss` in training/loss.py).
 *
 * The idea: a raw network F is never asked to predict the clean image directly. It sees its input scaled to
 * unit variance, c_in(σ)·x, and the noise level as c_noise(σ) = ¼·ln σ, and its output is mixed with the noisy
 * input so that its training target has unit variance at every σ (eq. 7, Appendix B.6):
 *
 *     D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))
 *     c_skip = σ_d² / (σ² + σ_d²),  c_out = σ·σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼·ln σ
 *
 * with σ_data = 0.5. Training draws ln σ ~ N(P_mean, P_std²) = N(−1.2, 1.2²) per sample, adds n ~ N(0, σ²I) to
 * the image y, and minimises λ(σ)·‖D(y + n; σ) − y‖² with λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out², which makes
 * the effective loss weight uniform over σ at initialisation (eq. 8, Sec. 5).
 *
 * σ is per sample: a tensor [N] (broadcast as [N, 1, 1, 1]) whose coefficients are computed on the device, so
 * training never reads σ back; or one host number (samplers), whose coefficients are computed in float64 on the
 * host and travel as kernel constants. Only engine ops are used, so gradients flow through D to F.
 *
 * One deliberate difference in bookkeeping from NVlabs/edm: its training loop sums the per-element loss over
 * pixels and averages over the batch; `edmLoss` reports the mean over pixels and batch. The two differ by the
 * constant factor C·H·W, which Adam's update is invariant to (up to its ε).
 */

import { z } from "zod";
import {
  add,
  div,
  exp,
  full,
  log,
  mean,
  mseLoss,
  mul,
  nn,
  randn,
  randNormal,
  reshape,
  rsqrt,
  type Shape,
  Tensor,
} from "../engine/mod.ts";
import { parseConfig } from "../util/config.ts";

// ---------------------------------------------------------------------------------------------------------------
// Configuration.

/** Options of `EDMPrecond`. */
export const EDMPrecondConfig = z.object({
  // σ_data: the expected standard deviation of the training images in [−1, 1] (Table 1: 0.5).
  sigmaData: z.number().positive().finite().default(0.5),
}).strict();
export type EDMPrecondOptions = z.input<typeof EDMPrecondConfig>;

/** Options of `edmLoss`. `sigma` and `noise` override the random draws (tests, fixed-σ validation losses). */
export const EDMLossConfig = z.object({
  // P_mean: the mean of ln σ in the training noise distribution (Table 1: −1.2).
  pMean: z.number().finite().default(-1.2),
  // P_std: the standard deviation of ln σ in the training noise distribution (Table 1: 1.2).
  pStd: z.number().nonnegative().finite().default(1.2),
  // σ_data for the loss weight λ(σ); defaults to the preconditioner's (0.5 for a plain denoiser function).
  sigmaData: z.number().positive().finite().optional(),
  // Per-sample noise levels [N] to use instead of drawing ln σ ~ N(P_mean, P_std²).
  sigma: z.instanceof(Tensor).optional(),
  // Unit normal noise shaped like the images to use instead of randn (n = noise·σ).
  noise: z.instanceof(Tensor).optional(),
}).strict();
export type EDMLossOptions = z.input<typeof EDMLossConfig>;

// ---------------------------------------------------------------------------------------------------------------
// The coefficients of Table 1 on the host, in float64 (used for a scalar σ, and by samplers and reports).

/** c_skip(σ) = σ_d² / (σ² + σ_d²). */
export const cSkip = (sigma: number, sigmaData = 0.5): number =>
  (sigmaData * sigmaData) / (sigma * sigma + sigmaData * sigmaData);
/** c_out(σ) = σ·σ_d / √(σ² + σ_d²). */
export const cOut = (sigma: number, sigmaData = 0.5): number =>
  (sigma * sigmaData) / Math.sqrt(sigma * sigma + sigmaData * sigmaData);
/** c_in(σ) = 1 / √(σ² + σ_d²). */
export const cIn = (sigma: number, sigmaData = 0.5): number =>
  1 / Math.sqrt(sigma * sigma + sigmaData * sigmaData);
/** c_noise(σ) = ¼·ln σ. */
export const cNoise = (sigma: number): number => Math.log(sigma) / 4;
/** The loss weight λ(σ) = (σ² + σ_d²) / (σ·σ_d)² (Table 1, Sec. 5). */
export const lossWeight = (sigma: number, sigmaData = 0.5): number =>
  (sigma * sigma + sigmaData * sigmaData) / ((sigma * sigmaData) ** 2);

// ---------------------------------------------------------------------------------------------------------------
// The preconditioned denoiser.

/** The raw network F(c_in·x; c_noise, labels): x [N, C, H, W], c_noise [N], optional labels (e.g. one-hot [N, K]). */
export type NetworkFn = (x: Tensor, cNoise: Tensor, labels?: Tensor) => Tensor;
/** A raw network as an object (an `nn.Module` subclass with this `forward` is registered as `model`). */
export interface Network {
  forward(x: Tensor, cNoise: Tensor, labels?: Tensor): Tensor;
}

/** The four preconditioning coefficients for a per-sample σ, each shaped [N, 1, 1, 1] (for images) except cNoise [N]. */
export interface PrecondCoefficients {
  cSkip: Tensor;
  cOut: Tensor;
  cIn: Tensor;
  cNoise: Tensor;
}

/**
 * D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)) (eq. 7 with Table 1's "Ours" column). When F is an
 * `nn.Module` it is registered as the submodule `model`, so parameter names match NVlabs/edm's
 * `EDMPrecond.model.…`.
 */
export class EDMPrecond extends nn.Module {
  readonly sigmaData: number;
  readonly #F: NetworkFn;

  constructor(model: Network | NetworkFn, opts: EDMPrecondOptions = {}) {
    super();
    this.sigmaData = parseConfig(EDMPrecondConfig, opts, "EDMPrecond").sigmaData;
    if (typeof model === "function") this.#F = model;
    else if (model && typeof model.forward === "function") {
      if (model instanceof nn.Module) this.registerModule("model", model);
      this.#F = (x, c, labels) => model.forward(x, c, labels);
    } else {throw new Error(
        "EDMPrecond: model must be a function F(x, cNoise, labels) or have such a forward()",
      );}
  }

  /**
   * The coefficients for per-sample noise levels σ ([N] or [N, 1, 1, 1]), computed on σ's device with engine
   * ops (no readback): c_skip, c_out, c_in shaped [N, 1, …, 1] (`rank` dims, 4 for images) to broadcast over
   * the batch, c_noise as [N].
   */
  coefficients(sigma: Tensor, rank = 4): PrecondCoefficients {
    const n = sigma.size;
    const temps: Tensor[] = [];
    const t = <T extends Tensor>(v: T): T => (temps.push(v), v);
    const s = t(reshape(sigma, [n, ...new Array(Math.max(0, rank - 1)).fill(1)]));
    const sd2 = this.sigmaData * this.sigmaData;
    const denom = t(add(t(mul(s, s)), sd2)); // σ² + σ_d²
    const cIn = rsqrt(denom); // 1/√(σ² + σ_d²)
    const c: PrecondCoefficients = {
      cSkip: div(sd2, denom),
      cOut: mul(t(mul(s, this.sigmaData)), cIn),
      cIn,
      cNoise: mul(t(log(t(reshape(sigma, [n])))), 0.25),
    };
    if (!sigma.requiresGrad) { for (const v of temps) v.dispose(); }
    return c;
  }

  /**
   * D(x; σ). `sigma` is a host number (one σ for the whole batch; its coefficients are computed in float64)
   * or a tensor of per-sample noise levels [N] / [N, 1, 1, 1]. Labels are passed to F unchanged.
   */
  forward(x: Tensor, sigma: number | Tensor, labels?: Tensor): Tensor {
    if (!(x instanceof Tensor) || x.rank < 1) throw new Error("EDMPrecond: x must be a tensor [N, C, H, W]");
    const N = x.shape[0];
    const temps: Tensor[] = [];
    const t = <T extends Tensor>(v: T): T => (temps.push(v), v);
    let F: Tensor, out: Tensor;
    if (typeof sigma === "number") {
      if (!(sigma > 0) || !Number.isFinite(sigma)) {
        throw new Error(`EDMPrecond: sigma must be a positive finite number, got ${sigma}`);
      }
      const sd = this.sigmaData;
      const noise = t(full([N], cNoise(sigma), { device: x.device }));
      F = this.#F(t(mul(x, cIn(sigma, sd))), noise, labels);
      checkOutput(F, x.shape);
      out = add(t(mul(x, cSkip(sigma, sd))), t(mul(F, cOut(sigma, sd))));
    } else if (sigma instanceof Tensor) {
      if (sigma.size !== N || !(sigma.rank === 1 || sigma.shape.slice(1).every((d) => d === 1))) {
        throw new Error(
          `EDMPrecond: sigma must have shape [${N}] (one noise level per sample of x [${x.shape}]), got [${sigma.shape}]`,
        );
      }
      const c = this.coefficients(sigma, x.rank);
      temps.push(c.cSkip, c.cOut, c.cIn, c.cNoise);
      F = this.#F(t(mul(x, c.cIn)), c.cNoise, labels);
      checkOutput(F, x.shape);
      out = add(t(mul(x, c.cSkip)), t(mul(F, c.cOut)));
    } else throw new Error(`EDMPrecond: sigma must be a number or a Tensor, got ${typeof sigma}`);
    // Without a tape the intermediates are garbage now; with one, the tape holds them until backward.
    if (!out.requiresGrad) {
      for (const v of temps) v.dispose();
      if (F !== x) F.dispose();
    }
    return out;
  }

  /** This preconditioner as the `(x, sigma) => D` callback the samplers take (with fixed labels). */
  denoiser(labels?: Tensor): (x: Tensor, sigma: number | Tensor) => Tensor {
    return (x, sigma) => this.forward(x, sigma, labels);
  }
}

function checkOutput(F: Tensor, shape: Shape) {
  if (!(F instanceof Tensor) || F.shape.length !== shape.length || F.shape.some((d, i) => d !== shape[i])) {
    throw new Error(
      `EDMPrecond: the network must return a tensor shaped like its input [${shape}], got ${
        F instanceof Tensor ? `[${F.shape}]` : typeof F
      }`,
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The training loss.

/** A denoiser D(x; σ, labels) with σ a per-sample tensor [N]: an `EDMPrecond` or any function. */
export type TrainDenoiser = EDMPrecond | ((x: Tensor, sigma: Tensor, labels?: Tensor) => Tensor);

/** What `edmLoss` returns; all three tensors belong to the caller. */
export interface EDMLossResult {
  /** The scalar loss: λ(σ)·(D(y + n; σ) − y)² averaged over elements and batch (call `backward` on it). */
  loss: Tensor;
  /** The loss of each sample, averaged over its elements [N] (for loss per σ-bucket). */
  perSample: Tensor;
  /** The noise level drawn for each sample [N]. */
  sigma: Tensor;
}

/**
 * The EDM training loss (Sec. 5, Table 1; NVlabs/edm `EDMLoss`): ln σ ~ N(P_mean, P_std²) per sample,
 * n = ε·σ with ε ~ N(0, I), loss = λ(σ)·‖D(y + n; σ) − y‖², λ(σ) = (σ² + σ_d²)/(σ·σ_d)². σ is drawn before
 * the noise, as in the reference.
 */
export function edmLoss(
  denoiser: TrainDenoiser,
  images: Tensor,
  labels?: Tensor,
  opts: EDMLossOptions = {},
): EDMLossResult {
  const o = parseConfig(EDMLossConfig, opts, "edmLoss");
  if (!(images instanceof Tensor) || images.rank < 2) {
    throw new Error("edmLoss: images must be a tensor [N, C, H, W]");
  }
  const N = images.shape[0], device = images.device;
  const sigmaData = o.sigmaData ?? (denoiser instanceof EDMPrecond ? denoiser.sigmaData : 0.5);
  if (o.sigma && (o.sigma.size !== N || o.sigma.rank !== 1)) {
    throw new Error(`edmLoss: sigma must have shape [${N}], got [${o.sigma.shape}]`);
  }
  if (o.noise && o.noise.shape.some((d, i) => d !== images.shape[i])) {
    throw new Error(`edmLoss: noise must have the images' shape [${images.shape}], got [${o.noise.shape}]`);
  }
  const temps: Tensor[] = [];
  const t = <T extends Tensor>(v: T): T => (temps.push(v), v);
  // ln σ ~ N(P_mean, P_std²) (Table 1, "Training").
  const sigma = o.sigma ?? exp(t(randNormal([N], o.pMean, o.pStd, { device })));
  const s = t(reshape(sigma, [N, ...new Array(images.rank - 1).fill(1)]));
  const eps = o.noise ?? t(randn(images.shape, { device }));
  const noisy = t(add(images, t(mul(eps, s)))); // y + n, n ~ N(0, σ²I)
  const D = typeof denoiser === "function"
    ? denoiser(noisy, sigma, labels)
    : denoiser.forward(noisy, sigma, labels);
  if (D.shape.length !== images.rank || D.shape.some((d, i) => d !== images.shape[i])) {
    throw new Error(`edmLoss: the denoiser returned [${D.shape}] for images [${images.shape}]`);
  }
  // λ(σ) = (σ² + σ_d²)/(σ·σ_d)².
  const sd2 = sigmaData * sigmaData;
  const weight = t(div(t(add(t(mul(s, s)), sd2)), t(mul(t(mul(s, s)), sd2))));
  const sq = t(mseLoss(D, images, "none"));
  if (D !== noisy && D !== images) temps.push(D);
  const weighted = t(mul(sq, weight));
  const perSample = mean(weighted, images.shape.map((_, i) => i).slice(1));
  const loss = mean(perSample);
  if (!loss.requiresGrad) { for (const v of temps) v.dispose(); }
  return { loss, perSample, sigma };
}

// ---------------------------------------------------------------------------------------------------------------
// Loss per σ-bucket, for training logs.

/** Bucket edges in σ (the buckets are (−∞, e0), [e0, e1), …, [e_last, ∞)); they span ln σ ~ N(−1.2, 1.2²). */
export const DEFAULT_SIGMA_EDGES: readonly number[] = [0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 20];

/** One σ-bucket's mean loss. */
export interface SigmaBucket {
  /** The bucket is [lo, hi) in σ. */
  lo: number;
  hi: number;
  count: number;
  /** Mean per-sample loss in the bucket (NaN when empty). */
  meanLoss: number;
}

/** Groups per-sample losses by their σ (host values, e.g. read back from `edmLoss`'s `perSample` and `sigma`). */
export function lossBySigmaBucket(
  sigma: ArrayLike<number>,
  perSample: ArrayLike<number>,
  edges: readonly number[] = DEFAULT_SIGMA_EDGES,
): SigmaBucket[] {
  if (sigma.length !== perSample.length) {
    throw new Error(`lossBySigmaBucket: ${sigma.length} sigmas but ${perSample.length} losses`);
  }
  for (let i = 1; i < edges.length; i++) {
    if (!(edges[i] > edges[i - 1])) throw new Error("lossBySigmaBucket: edges must increase");
  }
  const bounds = [-Infinity, ...edges, Infinity];
  const out: SigmaBucket[] = bounds.slice(1).map((hi, i) => ({ lo: bounds[i], hi, count: 0, meanLoss: 0 }));
  for (let i = 0; i < sigma.length; i++) {
    let b = 0;
    while (b < edges.length && sigma[i] >= edges[b]) b++;
    out[b].count++;
    out[b].meanLoss += perSample[i];
  }
  for (const b of out) b.meanLoss = b.count ? b.meanLoss / b.count : NaN;
  return out;
}
