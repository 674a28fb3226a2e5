/**
 * @file Samplers: the EDM time grid and the deterministic (Algorithm 1) and stochastic (Algorithm 2) samplers
 * of Karras et al. (2022), plain Euler, and DDIM (Song, Meng and Ermon 2021) for ε-prediction models on a
 * VP/DDPM linear-β schedule. Reference: NVlabs/edm generate.py (`edm_sampler`, `ablation_sampler`).
 *
 * EDM samplers integrate the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (eq. 3 with σ(t) = t, s(t) = 1)
 * from σ_max down to 0 over the grid of eq. 5,
 *
 *     t_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ  for i < N,   t_N = 0,
 *
 * starting from x_0 = t_0·latents (latents ~ N(0, I)). Heun's method costs two evaluations of D per step except
 * the last (t_N = 0 would divide by zero, so it is an Euler step): NFE = 2N − 1. Algorithm 2 first raises the
 * noise from t_i to t̂_i = t_i + γ_i·t_i (γ_i = min(S_churn/N, √2 − 1) for t_i ∈ [S_min, S_max]) by adding fresh
 * noise of standard deviation √(t̂_i² − t_i²)·S_noise, then takes the same Heun step from t̂_i.
 *
 * The grid and every step coefficient are float64 on the host; only the image tensors live on the device.
 * Samplers run under `noGrad`, each step inside `scope` (so memory stays flat however many steps), never read
 * anything back, and return the final x (the caller owns it; the latents are left alone).
 *
 * The denoiser is a callback `(x, sigma, ctx) => D(x; σ)` given σ as a host number, so a step-aware network
 * (DDSM) can choose its width from σ or from `ctx.step`; `EDMPrecond.denoiser(labels)` makes one.
 */

import { z } from "zod";
import { add, type Device, mul, noGrad, randn, scope, type Shape, sub, Tensor } from "../engine/mod.ts";
import { parseConfig } from "../util/config.ts";

// ---------------------------------------------------------------------------------------------------------------
// Types.

/** Which evaluation of D a call is: the step's Euler evaluation or Heun's second-order correction. */
export interface StepContext {
  /** The step i (0-based) of `steps`. */
  step: number;
  steps: number;
  stage: "euler" | "correction";
}

/** The denoiser D(x; σ) (σ a host number for the whole batch, or a per-sample tensor). */
export type Denoiser = (x: Tensor, sigma: number | Tensor, ctx?: StepContext) => Tensor;

/** Progress after each step. */
export interface StepInfo {
  step: number;
  steps: number;
  /** The noise level the step started from (t_i; for DDIM the σ equivalent of ᾱ_t). */
  sigma: number;
  /** The raised noise level t̂_i the step integrated from (= sigma unless the sampler is stochastic). */
  sigmaHat: number;
  /** The noise level the step ended at (t_{i+1}). */
  sigmaNext: number;
  /** Evaluations of the network so far. */
  nfe: number;
}
export type ProgressFn = (info: StepInfo) => void;

/** Draws standard normal noise shaped like x (default: the device generator's `randn`). */
export type NoiseFn = (shape: Shape, device: Device) => Tensor;

const defaultNoise: NoiseFn = (shape, device) => randn(shape, { device });

const fn = <T>(what: string) =>
  z.custom<T>((v) => typeof v === "function", { message: `${what} must be a function` });

// ---------------------------------------------------------------------------------------------------------------
// The time grid (eq. 5).

const gridFields = {
  // σ_min: the last nonzero noise level t_{N−1} (Table 1: 0.002).
  sigmaMin: z.number().positive().finite().default(0.002),
  // σ_max: the first noise level t_0, which also scales the latents (Table 1: 80).
  sigmaMax: z.number().positive().finite().default(80),
  // ρ: how much the steps concentrate near σ_min (eq. 5; Table 1: 7).
  rho: z.number().positive().finite().default(7),
};
const gridOrdered = (o: { sigmaMin: number; sigmaMax: number }) => o.sigmaMin < o.sigmaMax;
const gridOrderedMsg = { message: "sigmaMin must be smaller than sigmaMax", path: ["sigmaMin"] };

/** Options of `edmTimeSteps`. */
export const TimeStepsConfig = z.object(gridFields).strict().refine(gridOrdered, gridOrderedMsg);
export type TimeStepsOptions = z.input<typeof TimeStepsConfig>;

/**
 * The N + 1 noise levels t_0 = σ_max > … > t_{N−1} = σ_min > t_N = 0 of eq. 5, in float64. The two endpoints
 * are set exactly (the power round trip (σ^{1/ρ})^ρ can be off by an ulp).
 */
export function edmTimeSteps(steps: number, opts: TimeStepsOptions = {}): Float64Array {
  if (!Number.isInteger(steps) || steps < 2) {
    throw new Error(
      `edmTimeSteps: steps must be an integer ≥ 2 (t_0 = σ_max, t_{N−1} = σ_min), got ${steps}`,
    );
  }
  const { sigmaMin, sigmaMax, rho } = parseConfig(TimeStepsConfig, opts, "edmTimeSteps");
  const N = steps, t = new Float64Array(N + 1);
  const hi = sigmaMax ** (1 / rho), lo = sigmaMin ** (1 / rho);
  for (let i = 0; i < N; i++) t[i] = (hi + (i / (N - 1)) * (lo - hi)) ** rho;
  t[0] = sigmaMax;
  t[N - 1] = sigmaMin;
  t[N] = 0;
  return t;
}

// ---------------------------------------------------------------------------------------------------------------
// Algorithm 1 (Heun), Euler, and Algorithm 2 (stochastic).

const odeFields = {
  ...gridFields,
  // N: the number of steps (NFE = 2N − 1 for Heun, N for Euler; NVlabs' default 18).
  steps: z.number().int().min(2).default(18),
  // Called after every step with the noise levels and the evaluations so far.
  onStep: fn<ProgressFn>("onStep").optional(),
};

/** Options of `heunSampler` and `eulerSampler`. */
export const ODESamplerConfig = z.object(odeFields).strict().refine(gridOrdered, gridOrderedMsg);
export type ODESamplerOptions = z.input<typeof ODESamplerConfig>;

/** Options of `stochasticSampler` (Algorithm 2); S_churn = 0 makes it Algorithm 1. */
export const StochasticSamplerConfig = z.object({
  ...odeFields,
  // S_churn: overall amount of stochasticity; γ_i = min(S_churn/N, √2 − 1) (Algorithm 2, Table 5).
  sChurn: z.number().nonnegative().finite().default(0),
  // S_min: noise is added only at steps with t_i ≥ S_min.
  sMin: z.number().nonnegative().finite().default(0),
  // S_max: noise is added only at steps with t_i ≤ S_max (default ∞).
  sMax: z.number().nonnegative().or(z.literal(Infinity)).default(Infinity),
  // S_noise: inflation of the added noise's standard deviation (slightly above 1 counters detail loss).
  sNoise: z.number().nonnegative().finite().default(1),
  // Draws the churn noise ε_i ~ N(0, I) (default: `randn` from the device generator).
  noise: fn<NoiseFn>("noise").optional(),
}).strict().refine(gridOrdered, gridOrderedMsg);
export type StochasticSamplerOptions = z.input<typeof StochasticSamplerConfig>;

function checkLatents(who: string, latents: Tensor) {
  if (!(latents instanceof Tensor)) throw new Error(`${who}: latents must be a Tensor`);
}

/**
 * Runs `step` N times on x, each in its own scope, disposing the previous x; reports progress after each step's
 * intermediates are gone; returns the last x.
 */
function integrate(
  x0: Tensor,
  steps: number,
  onStep: ProgressFn | undefined,
  step: (x: Tensor, i: number) => { x: Tensor; info: StepInfo },
): Tensor {
  let x = x0;
  for (let i = 0; i < steps; i++) {
    const { x: next, info } = scope(() => step(x, i));
    if (next !== x) x.dispose();
    x = next;
    onStep?.(info);
  }
  return x;
}

/**
 * One step of Algorithm 1 (lines 4–8; Algorithm 2's lines 7–11) from x at t to tNext: an Euler step with
 * dx/dt = (x − D(x; t))/t, then the 2nd-order correction averaging the slopes at both ends, skipped when tNext = 0.
 */
function heunStep(
  denoise: Denoiser,
  x: Tensor,
  t: number,
  tNext: number,
  step: number,
  steps: number,
): { x: Tensor; evaluations: number } {
  const D = denoise(x, t, { step, steps, stage: "euler" });
  const d = mul(sub(x, D), 1 / t);
  const xEuler = add(x, mul(d, tNext - t));
  if (tNext === 0) return { x: xEuler, evaluations: 1 };
  const D2 = denoise(xEuler, tNext, { step, steps, stage: "correction" });
  const d2 = mul(sub(xEuler, D2), 1 / tNext);
  return { x: add(x, mul(add(d, d2), 0.5 * (tNext - t))), evaluations: 2 };
}

/**
 * Algorithm 1: Heun's second-order method on the probability-flow ODE. NFE = 2N − 1 (the last step, to
 * t_N = 0, is Euler).
 */
export function heunSampler(denoise: Denoiser, latents: Tensor, opts: ODESamplerOptions = {}): Tensor {
  checkLatents("heunSampler", latents);
  const o = parseConfig(ODESamplerConfig, opts, "heunSampler");
  const N = o.steps, t = edmTimeSteps(N, { sigmaMin: o.sigmaMin, sigmaMax: o.sigmaMax, rho: o.rho });
  let nfe = 0;
  return noGrad(() =>
    integrate(mul(latents, t[0]), N, o.onStep, (x, i) => {
      const tCur = t[i], tNext = t[i + 1];
      const step = heunStep(denoise, x, tCur, tNext, i, N);
      nfe += step.evaluations;
      const xNext = step.x;
      return { x: xNext, info: { step: i, steps: N, sigma: tCur, sigmaHat: tCur, sigmaNext: tNext, nfe } };
    })
  );
}

/** Euler's method on the probability-flow ODE over the same grid (Algorithm 1 without lines 6–8): NFE = N. */
export function eulerSampler(denoise: Denoiser, latents: Tensor, opts: ODESamplerOptions = {}): Tensor {
  checkLatents("eulerSampler", latents);
  const o = parseConfig(ODESamplerConfig, opts, "eulerSampler");
  const N = o.steps, t = edmTimeSteps(N, { sigmaMin: o.sigmaMin, sigmaMax: o.sigmaMax, rho: o.rho });
  let nfe = 0;
  return noGrad(() =>
    integrate(mul(latents, t[0]), N, o.onStep, (x, i) => {
      const tCur = t[i], tNext = t[i + 1];
      const D = denoise(x, tCur, { step: i, steps: N, stage: "euler" });
      nfe++;
      // x_{i+1} = x_i + (t_{i+1} − t_i)·(x_i − D(x_i; t_i))/t_i.
      const xNext = add(x, mul(sub(x, D), (tNext - tCur) / tCur));
      return { x: xNext, info: { step: i, steps: N, sigma: tCur, sigmaHat: tCur, sigmaNext: tNext, nfe } };
    })
  );
}

/**
 * Algorithm 2: the stochastic sampler. Before each step the noise is raised to t̂_i = t_i + γ_i·t_i with fresh
 * noise of standard deviation √(t̂_i² − t_i²)·S_noise, then a Heun step goes from t̂_i to t_{i+1}. NFE = 2N − 1.
 */
export function stochasticSampler(
  denoise: Denoiser,
  latents: Tensor,
  opts: StochasticSamplerOptions = {},
): Tensor {
  checkLatents("stochasticSampler", latents);
  const o = parseConfig(StochasticSamplerConfig, opts, "stochasticSampler");
  const N = o.steps, t = edmTimeSteps(N, { sigmaMin: o.sigmaMin, sigmaMax: o.sigmaMax, rho: o.rho });
  const noise = o.noise ?? defaultNoise;
  let nfe = 0;
  return noGrad(() =>
    integrate(mul(latents, t[0]), N, o.onStep, (x, i) => {
      const tCur = t[i], tNext = t[i + 1];
      // Increase the noise temporarily (lines 4–6).
      const gamma = o.sMin <= tCur && tCur <= o.sMax ? Math.min(o.sChurn / N, Math.SQRT2 - 1) : 0;
      const tHat = tCur + gamma * tCur;
      const xHat = gamma > 0
        ? add(x, mul(noise(x.shape, x.device), Math.sqrt(tHat * tHat - tCur * tCur) * o.sNoise))
        : x;
      // Heun step from t̂_i to t_{i+1} (lines 7–11).
      const step = heunStep(denoise, xHat, tHat, tNext, i, N);
      nfe += step.evaluations;
      const xNext = step.x;
      return { x: xNext, info: { step: i, steps: N, sigma: tCur, sigmaHat: tHat, sigmaNext: tNext, nfe } };
    })
  );
}

// ---------------------------------------------------------------------------------------------------------------
// DDIM on the VP (DDPM) schedule.

/** Options of the DDPM linear-β schedule (Ho et al. 2020: β from 1e−4 to 0.02 over T = 1000). */
export const VPScheduleConfig = z.object({
  // T: the number of discrete diffusion timesteps of the trained model.
  timesteps: z.number().int().min(2).default(1000),
  // β_1: the first variance of the forward process.
  betaStart: z.number().positive().lt(1).default(1e-4),
  // β_T: the last variance of the forward process.
  betaEnd: z.number().positive().lt(1).default(0.02),
}).strict();
export type VPScheduleOptions = z.input<typeof VPScheduleConfig>;

/** A discrete VP schedule: β_t and ᾱ_t = Π_{s ≤ t}(1 − β_s) for t = 0 … T−1 (0-based, as a network sees t). */
export interface VPSchedule {
  timesteps: number;
  betas: Float64Array;
  alphaBar: Float64Array;
}

/** The DDPM linear schedule β_t = linspace(β_1, β_T, T) and its cumulative products ᾱ_t, in float64. */
export function vpLinearSchedule(opts: VPScheduleOptions = {}): VPSchedule {
  const { timesteps: T, betaStart, betaEnd } = parseConfig(VPScheduleConfig, opts, "vpLinearSchedule");
  const betas = new Float64Array(T), alphaBar = new Float64Array(T);
  let a = 1;
  for (let i = 0; i < T; i++) {
    betas[i] = betaStart + (i / (T - 1)) * (betaEnd - betaStart);
    a *= 1 - betas[i];
    alphaBar[i] = a;
  }
  return { timesteps: T, betas, alphaBar };
}

/** The noise level σ = √((1 − ᾱ)/ᾱ) at which x_t/√ᾱ_t = x_0 + σ·ε is a VE (EDM) sample. */
export const vpSigma = (alphaBar: number): number => Math.sqrt((1 - alphaBar) / alphaBar);

/**
 * The S timesteps DDIM visits, increasing (Song et al. 2021, Sec. D.2): "uniform" τ_i = i·⌊T/S⌋, or
 * "quadratic" τ_i = ⌊(i/(S−1)·√(0.8·T))²⌋.
 */
export function ddimTimesteps(steps: number, T: number, skip: "uniform" | "quadratic" = "uniform"): number[] {
  if (!Number.isInteger(steps) || steps < 1 || steps > T) {
    throw new Error(`ddimTimesteps: steps must be an integer in [1, ${T}], got ${steps}`);
  }
  if (skip === "uniform") {
    const stride = Math.floor(T / steps);
    return Array.from({ length: steps }, (_, i) => i * stride);
  }
  if (skip === "quadratic") {
    const top = Math.sqrt(0.8 * T);
    const seq = Array.from(
      { length: steps },
      (_, i) => Math.floor((steps === 1 ? 0 : (i / (steps - 1)) * top) ** 2),
    );
    if (new Set(seq).size !== seq.length) {
      throw new Error(`ddimTimesteps: ${steps} quadratic steps repeat timesteps of T = ${T}; use "uniform"`);
    }
    return seq;
  }
  throw new Error(`ddimTimesteps: skip must be "uniform" or "quadratic", got "${skip}"`);
}

/** An ε-prediction network ε_θ(x_t, t) with t the 0-based discrete timestep. */
export type EpsModel = (x: Tensor, t: number, ctx?: StepContext) => Tensor;

/** Options of `ddimSampler`. */
export const DDIMSamplerConfig = z.object({
  // S: the number of DDIM steps (NFE = S).
  steps: z.number().int().min(1).default(50),
  // η: 0 gives the deterministic DDIM, 1 the DDPM posterior variance (eq. 16).
  eta: z.number().nonnegative().finite().default(0),
  // The VP schedule the ε-model was trained with (default DDPM linear β, T = 1000).
  schedule: VPScheduleConfig.default({ timesteps: 1000, betaStart: 1e-4, betaEnd: 0.02 }),
  // How the S timesteps are chosen among the T ("uniform" or "quadratic", Sec. D.2).
  skip: z.enum(["uniform", "quadratic"]).default("uniform"),
  // Called after every step.
  onStep: fn<ProgressFn>("onStep").optional(),
  // Draws z ~ N(0, I) for η > 0 (default: `randn` from the device generator).
  noise: fn<NoiseFn>("noise").optional(),
}).strict();
export type DDIMSamplerOptions = z.input<typeof DDIMSamplerConfig>;

/**
 * DDIM (Song et al. 2021, eq. 12) for an ε-prediction model on a VP schedule, from x_T = latents (unit
 * variance: the VP prior, not scaled by σ_max). With x̂_0 = (x_t − √(1−ᾱ_t)·ε_θ)/√ᾱ_t,
 *
 *     x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − σ_t²)·ε_θ + σ_t·z,
 *     σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev),
 *
 * where ᾱ_prev = 1 after the first timestep, so the last step returns x̂_0. NFE = S.
 */
export function ddimSampler(eps: EpsModel, latents: Tensor, opts: DDIMSamplerOptions = {}): Tensor {
  checkLatents("ddimSampler", latents);
  const o = parseConfig(DDIMSamplerConfig, opts, "ddimSampler");
  const { alphaBar, timesteps: T } = vpLinearSchedule(o.schedule);
  const S = o.steps, seq = ddimTimesteps(S, T, o.skip);
  const noise = o.noise ?? defaultNoise;
  let nfe = 0;
  return noGrad(() =>
    integrate(mul(latents, 1), S, o.onStep, (x, i) => {
      const t = seq[S - 1 - i], tPrev = i === S - 1 ? -1 : seq[S - 2 - i];
      const a = alphaBar[t], aPrev = tPrev < 0 ? 1 : alphaBar[tPrev];
      const e = eps(x, t, { step: i, steps: S, stage: "euler" });
      nfe++;
      // The predicted clean image x̂_0 (eq. 9).
      const x0 = mul(sub(x, mul(e, Math.sqrt(1 - a))), 1 / Math.sqrt(a));
      const sigmaT = o.eta * Math.sqrt((1 - aPrev) / (1 - a)) * Math.sqrt(1 - a / aPrev);
      let xPrev = add(mul(x0, Math.sqrt(aPrev)), mul(e, Math.sqrt(Math.max(0, 1 - aPrev - sigmaT * sigmaT))));
      if (sigmaT > 0) xPrev = add(xPrev, mul(noise(x.shape, x.device), sigmaT));
      const info = {
        step: i,
        steps: S,
        sigma: vpSigma(a),
        sigmaHat: vpSigma(a),
        sigmaNext: vpSigma(aPrev),
        nfe,
      };
      return { x: xPrev, info };
    })
  );
}

/**
 * An ε-model from an EDM denoiser on a VP schedule (the VP ↔ VE correspondence of Sec. 2 / eq. 4):
 * x_t = √ᾱ_t·(y + σ_t·ε) with σ_t = √((1 − ᾱ_t)/ᾱ_t), so ε̂ = (x̃ − D(x̃; σ_t))/σ_t with x̃ = x_t/√ᾱ_t.
 */
export function epsFromDenoiser(denoise: Denoiser, schedule: VPSchedule): EpsModel {
  return (x, t, ctx) => {
    const a = schedule.alphaBar[t];
    if (a === undefined) {
      throw new Error(`epsFromDenoiser: timestep ${t} is outside [0, ${schedule.timesteps})`);
    }
    const sigma = vpSigma(a);
    const xt = mul(x, 1 / Math.sqrt(a));
    const D = denoise(xt, sigma, ctx);
    const diff = sub(xt, D);
    const e = mul(diff, 1 / sigma);
    for (const v of [xt, D, diff]) if (v !== x) v.dispose();
    return e;
  };
}
