/**
 * @file In-place optimizer kernels: the fused Adam/AdamW update, the pieces of global gradient-norm clipping,
 * and the exponential moving average of parameters.
 *
 * These kernels write their state buffers in place (bound read_write as outputs) so that a training step
 * allocates nothing and never syncs with the host: hyper-parameters and the bias corrections (which depend on
 * the step count the host already knows) travel as uniforms, and a gradient scale that is only known on the
 * device (the clipping coefficient) is read from a one-element buffer.
 *
 * - `adam`: one thread per element (four, as vec4s, when the size allows), PyTorch's `torch.optim.Adam`/`AdamW`
 *   arithmetic (see `adamStepJs`); with `ema` it also moves the parameter's moving average towards the updated
 *   parameter in the same pass (a training step's Adam and EMA in one dispatch per parameter instead of two);
 * - `sumSquares`: partial sums of x² over chunks of `SUMSQ_CHUNK` elements, one workgroup per chunk with a tree
 *   in workgroup memory, written at an offset into one partials buffer shared by all parameters;
 * - `clipFinish`: one workgroup sums the partials and writes the norm √Σ and the clip coefficient
 *   `min(maxNorm / (norm + 1e-6), 1)` (PyTorch's `clip_grad_norm_`);
 * - `scaleInPlace`: `x *= s[0]`;
 * - `ema`: `shadow = β·shadow + (1−β)·param`.
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { cachedSource } from "./source_cache.ts";
import { ENTRY_1D, grid, grid1d, header, WG } from "./wgsl.ts";

/**
 * Elements per thread of the one-thread-per-element kernels: 4 (vec4 loads and stores) when `n` is a multiple
 * of 4. llvmpipe runs every storage access as a per-lane loop, so a vec4 access moves four times the data for
 * about the cost of a scalar one.
 */
function elementsPerThread(n: number): 1 | 4 {
  return n % 4 === 0 ? 4 : 1;
}

function elementType(V: 1 | 4): string {
  return V === 4 ? "vec4<f32>" : "f32";
}

// ---------------------------------------------------------------------------------------------------------------
// Adam / AdamW.

export interface AdamParams {
  n: number;
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** AdamW: decay the parameter directly (p *= 1 − lr·wd) instead of adding wd·p to the gradient. */
  decoupled: boolean;
  /** The step number after this update (1 on the first step), for the bias corrections. */
  step: number;
  /** A one-element scale buffer follows the gradient among the inputs (grad is multiplied by it first). */
  scaled: boolean;
  /**
   * Also update an EMA shadow (a fourth output) from the new parameter: `shadow = β·shadow + (1−β)·param`,
   * exactly what the `ema` kernel computes after the step.
   */
  ema?: { beta: number };
}

/** Host-side derived constants: step size lr / (1 − β1^t) and √(1 − β2^t). */
function adamConstants(p: AdamParams) {
  if (!Number.isInteger(p.step) || p.step < 1) {
    throw new Error(`adam: step ${p.step} must be a positive integer`);
  }
  const bc1 = 1 - Math.pow(p.beta1, p.step), bc2 = 1 - Math.pow(p.beta2, p.step);
  return { stepSize: p.lr / bc1, bc2Sqrt: Math.sqrt(bc2) };
}

/**
 * One element of PyTorch's Adam/AdamW step (`_single_tensor_adam`, amsgrad off): returns the new
 * (param, m, v). Exported for the float64 reference in tests.
 */
export function adamStepJs(
  p: Omit<AdamParams, "n" | "scaled">,
  param: number,
  grad: number,
  m: number,
  v: number,
): [number, number, number] {
  const { stepSize, bc2Sqrt } = adamConstants(p as AdamParams);
  if (p.weightDecay !== 0) {
    if (p.decoupled) param *= 1 - p.lr * p.weightDecay;
    else grad += p.weightDecay * param;
  }
  m += (1 - p.beta1) * (grad - m); // exp_avg.lerp_(grad, 1 − β1)
  v = p.beta2 * v + (1 - p.beta2) * grad * grad;
  const denom = Math.sqrt(v) / bc2Sqrt + p.eps;
  param -= (stepSize * m) / denom;
  return [param, m, v];
}

export const adam: Kernel<AdamParams> = {
  name: "adam",

  gpu(p: AdamParams, caps: GpuCaps): GpuDispatch {
    const { stepSize, bc2Sqrt } = adamConstants(p);
    const V = elementsPerThread(p.n);
    // 1−β is computed in double: 1 − f32(0.999) would be off by 5e-5 relative (PyTorch passes it as a scalar too).
    const w = new ParamWriter().u32(p.n / V).f32(
      p.lr,
      1 - p.beta1,
      p.beta2,
      1 - p.beta2,
      p.eps,
      p.weightDecay,
    );
    w.f32(stepSize, bc2Sqrt);
    if (p.ema) w.f32(p.ema.beta, 1 - p.ema.beta);
    const withEma = !!p.ema;
    const source = cachedSource(`adam:${V}:${p.decoupled}:${p.scaled}:${withEma}`, () => {
      const decay = p.decoupled ? `pr = pr * (1.0 - pf(1u) * pf(6u));` : `g = g + pf(6u) * pr;`;
      // The scale buffer binds at least 16 bytes (see bufferEntry in engine/device.ts), so a vec4 read is in range.
      const scale = p.scaled ? ` * scale[0]${V === 4 ? ".x" : ""}` : "";
      const outputs = withEma ? ["param", "m", "v", "shadow"] : ["param", "m", "v"];
      const average = withEma ? `\n  shadow[i] = pf(9u) * shadow[i] + pf(10u) * np;` : "";
      return header(p.scaled ? ["grad", "scale"] : ["grad"], outputs, elementType(V)) + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, ${WG}u);
  if (i >= pu(0u)) { return; }
  var g = grad[i]${scale};
  var pr = param[i];
  ${decay}
  let mi = m[i] + pf(2u) * (g - m[i]);
  let vi = pf(3u) * v[i] + pf(4u) * g * g;
  m[i] = mi;
  v[i] = vi;
  let np = pr - pf(7u) * mi / (sqrt(vi) / pf(8u) + pf(5u));
  param[i] = np;${average}
}`;
    });
    return { source, workgroups: grid1d(p.n / V, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: AdamParams, inputs: FloatArray[], [param, m, v, shadow]: FloatArray[]): void {
    const [grad, scale] = inputs;
    const s = p.scaled ? scale[0] : 1;
    for (let i = 0; i < p.n; i++) {
      const r = adamStepJs(p, param[i], grad[i] * s, m[i], v[i]);
      param[i] = r[0];
      m[i] = r[1];
      v[i] = r[2];
    }
    // Reads the stored (rounded) parameters, as the separate `ema` kernel would.
    if (p.ema) ema.cpu({ n: p.n, beta: p.ema.beta }, [param], [shadow]);
  },
};

// ---------------------------------------------------------------------------------------------------------------
// Global gradient norm.

/** Elements each workgroup of `sumSquares` reduces: 256 threads × 8 strided loads. */
export const SUMSQ_CHUNK = WG * 8;

export interface SumSquaresParams {
  /** Elements of the input. */
  n: number;
  /** Where this input's `ceil(n / SUMSQ_CHUNK)` partial sums start in the partials buffer. */
  offset: number;
}

export const sumSquares: Kernel<SumSquaresParams> = {
  name: "sumSquares",

  gpu(p: SumSquaresParams, caps: GpuCaps): GpuDispatch {
    const chunks = Math.ceil(p.n / SUMSQ_CHUNK);
    const w = new ParamWriter().u32(p.n, p.offset, chunks);
    const source = header(["x"], ["partials"]) + `
var<workgroup> sh: array<f32, ${WG}>;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let chunk = wid.x + wid.y * nwg.x;
  if (chunk >= pu(2u)) { return; }
  let n = pu(0u);
  let start = chunk * ${SUMSQ_CHUNK}u;
  var acc = 0.0;
  for (var k = 0u; k < ${SUMSQ_CHUNK / WG}u; k++) {
    let i = start + k * ${WG}u + lid;
    if (i < n) { let xi = x[i]; acc = acc + xi * xi; }
  }
  sh[lid] = acc;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { sh[lid] = sh[lid] + sh[lid + s]; }
    workgroupBarrier();
  }
  if (lid == 0u) { partials[pu(1u) + chunk] = sh[0]; }
}`;
    return { source, workgroups: grid(chunks, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: SumSquaresParams, [x]: FloatArray[], [partials]: FloatArray[]): void {
    const chunks = Math.ceil(p.n / SUMSQ_CHUNK);
    for (let c = 0; c < chunks; c++) {
      let acc = 0;
      const end = Math.min(p.n, (c + 1) * SUMSQ_CHUNK);
      for (let i = c * SUMSQ_CHUNK; i < end; i++) acc += x[i] * x[i];
      partials[p.offset + c] = acc;
    }
  },
};

export interface ClipFinishParams {
  /** Partial sums of squares to add up. */
  count: number;
  /** Largest allowed norm (Infinity: the coefficient is always 1). */
  maxNorm: number;
}

/** Outputs: [norm (1 element), clip coefficient (1 element)]. */
export const clipFinish: Kernel<ClipFinishParams> = {
  name: "clipFinish",

  gpu(p: ClipFinishParams): GpuDispatch {
    const w = new ParamWriter().u32(p.count).f32(p.maxNorm);
    const source = header(["partials"], ["norm", "coef"]) + `
var<workgroup> sh: array<f32, ${WG}>;
@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32) {
  var acc = 0.0;
  for (var i = lid; i < pu(0u); i += ${WG}u) { acc = acc + partials[i]; }
  sh[lid] = acc;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { sh[lid] = sh[lid] + sh[lid + s]; }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let total = sqrt(sh[0]);
    norm[0] = total;
    coef[0] = min(pf(1u) / (total + 1e-6), 1.0);
  }
}`;
    return { source, workgroups: [1, 1, 1], params: w.finish() };
  },

  cpu(p: ClipFinishParams, [partials]: FloatArray[], [norm, coef]: FloatArray[]): void {
    let acc = 0;
    for (let i = 0; i < p.count; i++) acc += partials[i];
    const total = Math.sqrt(acc);
    norm[0] = total;
    coef[0] = Math.min(p.maxNorm / (total + 1e-6), 1);
  },
};

export interface ScaleInPlaceParams {
  n: number;
}

/** `x[i] *= s[0]`; inputs [s], outputs [x]. */
export const scaleInPlace: Kernel<ScaleInPlaceParams> = {
  name: "scaleInPlace",

  gpu(p: ScaleInPlaceParams, caps: GpuCaps): GpuDispatch {
    const source = header(["s"], ["x"]) + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, ${WG}u);
  if (i >= pu(0u)) { return; }
  x[i] = x[i] * s[0];
}`;
    return {
      source,
      workgroups: grid1d(p.n, caps.maxWorkgroupsPerDimension),
      params: new ParamWriter().u32(p.n).finish(),
    };
  },

  cpu(p: ScaleInPlaceParams, [s]: FloatArray[], [x]: FloatArray[]): void {
    const k = s[0];
    for (let i = 0; i < p.n; i++) x[i] *= k;
  },
};

// ---------------------------------------------------------------------------------------------------------------
// Exponential moving average.

export interface EmaParams {
  n: number;
  beta: number;
}

/** `shadow = β·shadow + (1−β)·param`; inputs [param], outputs [shadow]. */
export const ema: Kernel<EmaParams> = {
  name: "ema",

  gpu(p: EmaParams, caps: GpuCaps): GpuDispatch {
    const w = new ParamWriter().u32(p.n).f32(p.beta, 1 - p.beta);
    const source = header(["param"], ["shadow"]) + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, ${WG}u);
  if (i >= pu(0u)) { return; }
  shadow[i] = pf(1u) * shadow[i] + pf(2u) * param[i];
}`;
    return { source, workgroups: grid1d(p.n, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: EmaParams, [param]: FloatArray[], [shadow]: FloatArray[]): void {
    for (let i = 0; i < p.n; i++) shadow[i] = p.beta * shadow[i] + (1 - p.beta) * param[i];
  },
};
