/**
 * @file In-place optimizer kernels: the fused Adam/AdamW update, the pieces of global gradient-norm clipping,
 * and the exponential moving average of parameters.
 *
 * These kernels write their state buffers in place (bound read_write as outputs) so that a training step
 * allocates nothing and never syncs with the host: hyper-parameters and the bias corrections (which depend on
 * the step count the host already knows) travel as uniforms, and a gradient scale that is only known on the
 * device (the clipping coefficient) is read from a one-element buffer.
 *
 * - `adam`: Adam/AdamW over up to `MAX_GROUP` tensors in one dispatch (a training step's whole parameter list
 *   in a handful of dispatches instead of one per tensor): thread i updates element i (four, as vec4s, when the
 *   sizes allow) of every tensor of the dispatch, which have similar sizes (see `lockstepPlan`), with PyTorch's
 *   `torch.optim.Adam`/`AdamW` arithmetic (see `adamStepJs`); with `ema` it also moves each parameter's moving
 *   average towards the updated parameter in the same pass. Parameters and gradients stay separate buffers
 *   (separate bindings), so modules and checkpoints keep their layout; the moments live in two flat buffers; the
 *   adapter's storage-buffer limit (32 on llvmpipe) decides how many tensors fit one dispatch;
 * - `sumSquares`: partial sums of x² over chunks of `SUMSQ_CHUNK` elements, one workgroup per chunk with a tree
 *   in workgroup memory, written at an offset into one partials buffer shared by all parameters;
 * - `clipFinish`: one workgroup sums the partials and writes the norm √Σ and the clip coefficient
 *   `min(maxNorm / (norm + 1e-6), 1)` (PyTorch's `clip_grad_norm_`);
 * - `scaleInPlace`: `x *= s[0]`;
 * - `ema`: `shadow = β·shadow + (1−β)·param`, several tensors per dispatch like `adam`.
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
// Multi-tensor dispatches.

/**
 * Most tensors one multi-tensor dispatch updates: bounded by the uniform block (a few words per tensor) and the
 * size of the unrolled shader. The adapter's storage-buffer limit usually bounds it first (see `groupSize`).
 */
export const MAX_GROUP = 24;

/**
 * How many tensors one multi-tensor dispatch may update, with `buffersPerTensor` storage bindings each plus
 * `shared` bindings for the whole dispatch, under the adapter's `maxStorageBuffersPerShaderStage` (undefined on
 * the CPU backend, which has no such limit).
 */
export function groupSize(
  maxStorageBuffers: number | undefined,
  buffersPerTensor: number,
  shared = 0,
): number {
  const fit = Math.floor(((maxStorageBuffers ?? Infinity) - shared) / buffersPerTensor);
  if (fit < 1) throw new Error(`a multi-tensor dispatch needs ${buffersPerTensor + shared} storage buffers`);
  return Math.min(MAX_GROUP, fit);
}

/**
 * The plan of a multi-tensor dispatch: thread i updates unit i (V elements) of every tensor that has one, so the
 * shader is straight-line code with one bounds test per tensor, and the grid covers the largest tensor. Why not
 * a run of workgroups per tensor, selected by a branch: llvmpipe runs both sides of every branch under a lane
 * mask, so each workgroup paid for every tensor's body (Adam over the bench UNet's 1.26M parameters: 17 ms at one
 * tensor per dispatch, 33 ms at 8, 46 ms at 15 that way). Tensors of one dispatch should have similar sizes
 * (`lockstepGroups`); V is 4 when every size is a multiple of 4.
 */
function lockstepPlan(sizes: readonly number[]) {
  if (!sizes.length) throw new Error("a multi-tensor dispatch needs at least one tensor");
  if (sizes.length > MAX_GROUP) throw new Error(`a multi-tensor dispatch takes at most ${MAX_GROUP} tensors`);
  const V: 1 | 4 = sizes.every((n) => elementsPerThread(n) === 4) ? 4 : 1;
  const units = sizes.map((n) => n / V);
  return { V, units, total: Math.max(...units) };
}

/**
 * Splits tensors (by size) into the groups of multi-tensor dispatches: at most `size` each, one vector width
 * each, and sizes within a factor of two of the group's smallest (tensors of at most one workgroup's units join
 * any group of small ones), so that few threads idle (see `lockstepPlan`). Returns indices into `sizes`.
 */
export function lockstepGroups(sizes: readonly number[], size: number): number[][] {
  const order = sizes.map((_, i) => i).sort((a, b) =>
    elementsPerThread(sizes[b]) - elementsPerThread(sizes[a]) || sizes[a] - sizes[b] || a - b
  );
  const groups: number[][] = [];
  let first = -1;
  for (const i of order) {
    const last = groups[groups.length - 1];
    const n = sizes[i], V = elementsPerThread(n);
    if (
      last && last.length < size && elementsPerThread(sizes[first]) === V &&
      (n <= 2 * sizes[first] || n / V <= WG)
    ) last.push(i);
    else {
      groups.push([i]);
      first = i;
    }
  }
  return groups;
}

/** WGSL of the lockstep body: `body(k)` runs for unit `i` of tensor k where tensor k has one. */
function lockstepEntry(
  count: number,
  totalWord: number,
  unitsWord: (k: number) => number,
  body: (k: number) => string,
) {
  const parts = Array.from({ length: count }, (_, k) =>
    `  if (i < pu(${unitsWord(k)}u)) {
${body(k)}
  }`);
  return `${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, ${WG}u);
  if (i >= pu(${totalWord}u)) { return; }
${parts.join("\n")}
}`;
}

const storageDecl = (binding: number, name: string, elem: string, write: boolean) =>
  `@group(0) @binding(${binding}) var<storage, ${write ? "read_write" : "read"}> ${name}: array<${elem}>;`;

/** The uniform block and its accessors (as `header` in wgsl.ts writes them) after `bindings` storage buffers. */
function uniformDecl(bindings: number): string {
  return header([], []).replace("@binding(0) var<uniform>", `@binding(${bindings}) var<uniform>`);
}

// ---------------------------------------------------------------------------------------------------------------
// Adam / AdamW.

/** One tensor of a multi-tensor Adam dispatch. */
export interface AdamTensor {
  /** Elements. */
  n: number;
  /** The step number of this tensor after this update (1 on the first step), for its bias corrections. */
  step: number;
  /** Where its exp_avg and exp_avg_sq start in the flat state buffers (elements; a multiple of 4). */
  offset: number;
}

export interface AdamParams {
  /** The tensors, in binding order (at most `MAX_GROUP`; see `adamGroupSize`). */
  tensors: readonly AdamTensor[];
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** AdamW: decay the parameter directly (p *= 1 − lr·wd) instead of adding wd·p to the gradient. */
  decoupled: boolean;
  /** A one-element scale buffer follows the gradients among the inputs (each grad is multiplied by it first). */
  scaled: boolean;
  /**
   * Also update each tensor's EMA shadow (a second output per tensor) from the new parameter:
   * `shadow = β·shadow + (1−β)·param`, exactly what the `ema` kernel computes after the step.
   */
  ema?: { beta: number };
}

/**
 * Storage bindings per tensor of an `adam` dispatch (gradient and parameter, and the EMA shadow) and for the
 * whole dispatch (the flat exp_avg and exp_avg_sq, and the scale). The state is flat because the adapter's
 * binding limit sets how many tensors a dispatch updates: with 32 bindings, 15 instead of 8 (the bench UNet's
 * Adam: 25 dispatches per step before, 15 now with the size grouping of `lockstepGroups`).
 */
function adamBindings(opts: { scaled: boolean; ema: boolean }) {
  return { perTensor: opts.ema ? 3 : 2, shared: 2 + (opts.scaled ? 1 : 0) };
}

/** The tensors one `adam` dispatch may update on a device with this storage-buffer limit. */
export function adamGroupSize(
  maxStorageBuffers: number | undefined,
  opts: { scaled: boolean; ema: boolean },
): number {
  const b = adamBindings(opts);
  return groupSize(maxStorageBuffers, b.perTensor, b.shared);
}

/** Host-side derived constants: step size lr / (1 − β1^t) and √(1 − β2^t). */
function adamConstants(p: { lr: number; beta1: number; beta2: number; step: number }) {
  if (!Number.isInteger(p.step) || p.step < 1) {
    throw new Error(`adam: step ${p.step} must be a positive integer`);
  }
  const bc1 = 1 - Math.pow(p.beta1, p.step), bc2 = 1 - Math.pow(p.beta2, p.step);
  return { stepSize: p.lr / bc1, bc2Sqrt: Math.sqrt(bc2) };
}

/** Hyper-parameters of one element's update (`adamStepJs`). */
export type AdamHyper = Omit<AdamParams, "tensors" | "scaled" | "ema"> & { step: number };

/**
 * One element of PyTorch's Adam/AdamW step (`_single_tensor_adam`, amsgrad off): returns the new
 * (param, m, v). Exported for the float64 reference in tests.
 */
export function adamStepJs(
  p: AdamHyper,
  param: number,
  grad: number,
  m: number,
  v: number,
): [number, number, number] {
  const { stepSize, bc2Sqrt } = adamConstants(p);
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

/**
 * Uniform words of `adam`: 8 hyper-parameters, the largest tensor's units (`ADAM_TOTAL`), then 4 per tensor
 * (units, step size, √(1 − β2^t), state offset in units).
 */
const ADAM_TOTAL = 8;
const ADAM_SHARED = ADAM_TOTAL + 1;
const ADAM_PER_TENSOR = 4;

/**
 * Adam/AdamW over several tensors in one dispatch. Inputs: the gradients, then the scale (when `scaled`);
 * outputs: per tensor its parameter (and EMA shadow), in place, then the flat exp_avg and exp_avg_sq, in which
 * tensor k's state starts at `tensors[k].offset`. Every element gets the same arithmetic as a one-tensor
 * dispatch, so how tensors are grouped does not change any result.
 */
export const adam: Kernel<AdamParams> = {
  name: "adam",

  gpu(p: AdamParams, caps: GpuCaps): GpuDispatch {
    const plan = lockstepPlan(p.tensors.map((t) => t.n));
    const K = p.tensors.length, withEma = !!p.ema, { V } = plan;
    // 1−β is computed in double: 1 − f32(0.999) would be off by 5e-5 relative (PyTorch passes it as a scalar too).
    const w = new ParamWriter().f32(p.lr, 1 - p.beta1, p.beta2, 1 - p.beta2, p.eps, p.weightDecay);
    w.f32(p.ema?.beta ?? 0, 1 - (p.ema?.beta ?? 0)).u32(plan.total);
    p.tensors.forEach((t, k) => {
      if (t.offset % 4) throw new Error(`adam: state offset ${t.offset} is not a multiple of 4`);
      const { stepSize, bc2Sqrt } = adamConstants({ ...p, step: t.step });
      w.u32(plan.units[k]).f32(stepSize, bc2Sqrt).u32(t.offset / V);
    });
    const source = cachedSource(`adam:${K}:${V}:${p.decoupled}:${p.scaled}:${withEma}`, () => {
      const T = elementType(V);
      const decls: string[] = [];
      for (let k = 0; k < K; k++) decls.push(storageDecl(k, `g${k}`, T, false));
      if (p.scaled) decls.push(storageDecl(K, "scale", "f32", false));
      let b = K + (p.scaled ? 1 : 0);
      for (let k = 0; k < K; k++) {
        decls.push(storageDecl(b++, `p${k}`, T, true));
        if (withEma) decls.push(storageDecl(b++, `s${k}`, T, true));
      }
      // The flat state as vec4s (every tensor's state starts at a multiple of 4); at one element per thread a
      // tensor indexes a component.
      decls.push(storageDecl(b++, "m", "vec4<f32>", true), storageDecl(b++, "v", "vec4<f32>", true));
      const [mAt, vAt] = V === 4 ? ["m[j]", "v[j]"] : ["m[j >> 2u][j & 3u]", "v[j >> 2u][j & 3u]"];
      const word = (k: number, j: number) => ADAM_SHARED + ADAM_PER_TENSOR * k + j;
      const body = (k: number) => {
        const decay = p.decoupled ? `pr = pr * (1.0 - pf(0u) * pf(5u));` : `g = g + pf(5u) * pr;`;
        const average = withEma ? `\n    s${k}[i] = pf(6u) * s${k}[i] + pf(7u) * np;` : "";
        return `    var g = g${k}[i]${p.scaled ? " * scale[0]" : ""};
    var pr = p${k}[i];
    ${decay}
    let j = pu(${word(k, 3)}u) + i;
    let mi = ${mAt} + pf(1u) * (g - ${mAt});
    let vi = pf(2u) * ${vAt} + pf(3u) * g * g;
    ${mAt} = mi;
    ${vAt} = vi;
    let np = pr - pf(${word(k, 1)}u) * mi / (sqrt(vi) / pf(${word(k, 2)}u) + pf(4u));
    p${k}[i] = np;${average}`;
      };
      return decls.join("\n") + "\n" + uniformDecl(b) + lockstepEntry(K, ADAM_TOTAL, (k) => word(k, 0), body);
    });
    return { source, workgroups: grid1d(plan.total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: AdamParams, inputs: FloatArray[], outputs: FloatArray[]): void {
    const K = p.tensors.length, per = p.ema ? 2 : 1;
    const s = p.scaled ? inputs[K][0] : 1;
    const [m, v] = outputs.slice(per * K);
    p.tensors.forEach(({ n, step, offset }, k) => {
      const grad = inputs[k];
      const [param, shadow] = outputs.slice(per * k, per * k + per);
      for (let i = 0; i < n; i++) {
        const r = adamStepJs({ ...p, step }, param[i], grad[i] * s, m[offset + i], v[offset + i]);
        param[i] = r[0];
        m[offset + i] = r[1];
        v[offset + i] = r[2];
      }
      // Reads the stored (rounded) parameters, as the separate `ema` kernel would.
      if (p.ema) ema.cpu({ sizes: [n], beta: p.ema.beta }, [param], [shadow]);
    });
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
  /** Elements of each tensor, in binding order (at most `MAX_GROUP`; see `emaGroupSize`). */
  sizes: readonly number[];
  beta: number;
}

/** The tensors one `ema` dispatch may update on a device with this storage-buffer limit. */
export function emaGroupSize(maxStorageBuffers: number | undefined): number {
  return groupSize(maxStorageBuffers, 2);
}

/** `shadow = β·shadow + (1−β)·param` for several tensors; inputs: the params, outputs: their shadows. */
export const ema: Kernel<EmaParams> = {
  name: "ema",

  gpu(p: EmaParams, caps: GpuCaps): GpuDispatch {
    const plan = lockstepPlan(p.sizes);
    const K = p.sizes.length, T = elementType(plan.V);
    // Words: β, 1 − β, the largest tensor's units (word 2), then each tensor's units (from word 3).
    const w = new ParamWriter().f32(p.beta, 1 - p.beta).u32(plan.total, ...plan.units);
    const source = cachedSource(`ema:${K}:${plan.V}`, () => {
      const decls = [
        ...p.sizes.map((_, k) => storageDecl(k, `p${k}`, T, false)),
        ...p.sizes.map((_, k) => storageDecl(K + k, `s${k}`, T, true)),
      ];
      const body = (k: number) => `    s${k}[i] = pf(0u) * s${k}[i] + pf(1u) * p${k}[i];`;
      return decls.join("\n") + "\n" + uniformDecl(2 * K) + lockstepEntry(K, 2, (k) => 3 + k, body);
    });
    return { source, workgroups: grid1d(plan.total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: EmaParams, params: FloatArray[], shadows: FloatArray[]): void {
    p.sizes.forEach((n, k) => {
      const [param, shadow] = [params[k], shadows[k]];
      for (let i = 0; i < n; i++) shadow[i] = p.beta * shadow[i] + (1 - p.beta) * param[i];
    });
  },
};
