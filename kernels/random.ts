/**
 * @file Counter-based random numbers: Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as
 * easy as 1, 2, 3", SC 2011), the generator behind cuRAND's Philox, JAX and PyTorch's CUDA generator.
 *
 * Philox is a keyed bijection of a 128-bit counter: block `b` of a stream is `philox(counter + b, key)`, four
 * 32-bit words, computed independently of every other block. That makes it ideal for a GPU (no sequential
 * state, each thread computes one block) and makes the CPU reference trivially identical: both sides run the
 * same ten rounds of integer arithmetic, so the raw words agree bit for bit.
 *
 * Stream layout: element `e` of a dispatch takes word `e % 4` of block `e / 4`. The block counter is
 * `(c0, c1) + e/4` as a 64-bit add with carry, with `c2`, `c3` fixed; the key is `(k0, k1)`.
 *
 * Distributions, one thread per Philox block (four outputs):
 * - `uniform`: `low + (high − low)·u` with `u = (word >> 8)·2⁻²⁴ ∈ [0, 1)` (24 bits: exact in float32, so
 *   `rand` is bit-identical across backends);
 * - `normal`: Box–Muller on the word pairs (w0, w1) and (w2, w3): `u1 = ((w0 >> 8) + 1)·2⁻²⁴ ∈ (0, 1]` (never
 *   log(0)), `u2 = (w1 >> 8)·2⁻²⁴`, `z0 = r·cos(2πu2)`, `z1 = r·sin(2πu2)`, `r = √(−2 ln u1)`; then
 *   `mean + std·z`. The two backends differ only by float32 rounding of log/cos/sin (on the GPU, −2·ln u1
 *   near u1 = 1 comes from a short series in the exact 1 − u1, see `WGSL_NEG2LOG`; measured worst difference
 *   1.4e-6 over 2^20 samples on lavapipe). The 24-bit u1 caps |z| at √(2·ln 2²⁴) ≈ 5.77;
 * - `dropout`: `out = x·scale` where `(word >> 8) ≥ threshold` else 0, the threshold an integer
 *   `ceil(p·2²⁴)` so the keep decision is exact on both backends (and replaying the same counter on the
 *   gradient reproduces the mask without storing it);
 * - `bits`: the raw words, each as two exactly representable floats (high and low 16 bits), for
 *   verification against the published known-answer vectors.
 *
 * WGSL has no 32×32→64-bit multiply, so `mulhilo` builds the high word from 16-bit halves; the CPU reference
 * uses the same decomposition with `Math.imul` and `>>> 0` for unsigned wrap-around.
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { grid, header } from "./wgsl.ts";

/** Philox4x32 multipliers and Weyl key increments (the round constants of the paper and Random123). */
export const PHILOX_M0 = 0xd2511f53;
export const PHILOX_M1 = 0xcd9e8d57;
export const PHILOX_W0 = 0x9e3779b9;
export const PHILOX_W1 = 0xbb67ae85;
export const PHILOX_ROUNDS = 10;

/** High and low 32 bits of the 64-bit product of two u32, from 16-bit halves (as the WGSL does it). */
function mulhilo(a: number, b: number): [number, number] {
  const lo = Math.imul(a, b) >>> 0;
  const a0 = a & 0xffff, a1 = a >>> 16, b0 = b & 0xffff, b1 = b >>> 16;
  // Each partial product is below 2^32, exact in a double.
  const p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
  const hi = (p11 + (p01 >>> 16) + (p10 >>> 16) + (mid >>> 16)) >>> 0;
  return [hi, lo];
}

/** One Philox4x32-10 block: the four output words of `counter` (4 words) under `key` (2 words). */
export function philox4x32(
  counter: readonly number[],
  key: readonly number[],
): [number, number, number, number] {
  let c0 = counter[0] >>> 0, c1 = counter[1] >>> 0, c2 = counter[2] >>> 0, c3 = counter[3] >>> 0;
  let k0 = key[0] >>> 0, k1 = key[1] >>> 0;
  for (let r = 0; r < PHILOX_ROUNDS; r++) {
    if (r > 0) {
      k0 = (k0 + PHILOX_W0) >>> 0;
      k1 = (k1 + PHILOX_W1) >>> 0;
    }
    const [hi0, lo0] = mulhilo(PHILOX_M0, c0);
    const [hi1, lo1] = mulhilo(PHILOX_M1, c2);
    const n0 = (hi1 ^ c1 ^ k0) >>> 0, n2 = (hi0 ^ c3 ^ k1) >>> 0;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return [c0, c1, c2, c3];
}

export type RandomDist = "uniform" | "normal" | "dropout" | "bits";

export interface RandomParams {
  dist: RandomDist;
  /** Elements to produce (for `bits`: 32-bit words; the output then holds 2·n floats). */
  n: number;
  /** Philox key (k0, k1). */
  key: readonly [number, number];
  /** Counter of block 0: (c0, c1) is the 64-bit block index base, c2 and c3 are fixed. */
  counter: readonly [number, number, number, number];
  /** uniform: [low, high]; normal: [mean, std]; dropout: [threshold (integer in [0, 2^24]), scale]. */
  args?: readonly [number, number];
}

const TWO_PI = 2 * Math.PI;
const INV_2_24 = 1 / 16777216;

/** Block `b`'s counter: (c0, c1) + b with carry into c1. */
function blockCounter(c: readonly number[], b: number): number[] {
  const lo = c[0] + b;
  return [lo >>> 0, (c[1] + Math.floor(lo / 4294967296)) >>> 0, c[2], c[3]];
}

function validate(p: RandomParams) {
  if (!Number.isInteger(p.n) || p.n < 1) {
    throw new Error(`random: element count ${p.n} must be a positive integer`);
  }
  for (const w of [...p.key, ...p.counter]) {
    if (!Number.isInteger(w) || w < 0 || w > 0xffffffff) {
      throw new Error(`random: key/counter word ${w} is not a u32`);
    }
  }
  if (p.dist === "dropout") {
    const t = p.args?.[0];
    if (t === undefined || !Number.isInteger(t) || t < 0 || t > 16777216) {
      throw new Error(`random: dropout threshold ${t} must be an integer in [0, 2^24]`);
    }
  }
}

const WG_RANDOM = 64;

const WGSL_PHILOX = `
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
  let a0 = a & 0xffffu; let a1 = a >> 16u; let b0 = b & 0xffffu; let b1 = b >> 16u;
  let p00 = a0 * b0; let p01 = a0 * b1; let p10 = a1 * b0; let p11 = a1 * b1;
  let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
  return vec2<u32>(p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u), a * b);
}
fn philox(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
  var c = counter;
  var k = key;
  for (var r = 0u; r < ${PHILOX_ROUNDS}u; r++) {
    if (r > 0u) { k = k + vec2<u32>(${PHILOX_W0}u, ${PHILOX_W1}u); }
    let p0 = mulhilo(${PHILOX_M0}u, c.x);
    let p1 = mulhilo(${PHILOX_M1}u, c.z);
    c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
  }
  return c;
}
`;

/**
 * −2·ln(u1) for u1 = (k + 1)·2⁻²⁴. Near u1 = 1 a float32 log has an absolute error comparable to ln(u1) itself
 * (it goes through log2), which would make small normals inaccurate; there, with d = 1 − u1 exact, the series
 * −ln(1 − d) = d + d²/2 + d³/3 + d⁴/4 (truncation below 2e-8 relative for d < 1/64) is accurate to rounding.
 */
const WGSL_NEG2LOG = `
fn neg2log(k: u32) -> f32 {
  let d = f32(16777215u - k) * ${INV_2_24};
  if (d < 0.015625) { return 2.0 * d * (1.0 + d * (0.5 + d * (0.33333334 + d * 0.25))); }
  return -2.0 * log(f32(k + 1u) * ${INV_2_24});
}
`;

/** Per-variant WGSL that turns the block's words `w` into values and stores the elements `e0 .. e0+3` below n. */
function storeCode(dist: RandomDist): string {
  switch (dist) {
    case "uniform":
      return `let lo = pf(8u); let span = pf(9u);
  for (var j = 0u; j < 4u; j++) {
    if (e0 + j < n) { out[e0 + j] = lo + span * (f32(w[j] >> 8u) * ${INV_2_24}); }
  }`;
    case "normal":
      return `let mean = pf(8u); let sd = pf(9u);
  var z: vec4<f32>;
  for (var h = 0u; h < 2u; h++) {
    let u2 = f32(w[2u * h + 1u] >> 8u) * ${INV_2_24};
    let rad = sqrt(neg2log(w[2u * h] >> 8u));
    let theta = ${TWO_PI} * u2;
    z[2u * h] = rad * cos(theta);
    z[2u * h + 1u] = rad * sin(theta);
  }
  for (var j = 0u; j < 4u; j++) {
    if (e0 + j < n) { out[e0 + j] = mean + sd * z[j]; }
  }`;
    case "dropout":
      return `let threshold = pu(8u); let scale = pf(9u);
  for (var j = 0u; j < 4u; j++) {
    if (e0 + j < n) { out[e0 + j] = select(0.0, x[e0 + j] * scale, (w[j] >> 8u) >= threshold); }
  }`;
    case "bits":
      return `for (var j = 0u; j < 4u; j++) {
    if (e0 + j < n) {
      out[2u * (e0 + j)] = f32(w[j] >> 16u);
      out[2u * (e0 + j) + 1u] = f32(w[j] & 0xffffu);
    }
  }`;
  }
}

/** Philox-driven fills (uniform, normal, raw bits) and the dropout mask-and-scale (one input). */
export const random: Kernel<RandomParams> = {
  name: "random",

  gpu(p: RandomParams, caps: GpuCaps): GpuDispatch {
    validate(p);
    const blocks = Math.ceil(p.n / 4);
    const w = new ParamWriter().u32(p.n, blocks, ...p.key, ...p.counter);
    if (p.dist === "dropout") w.u32(p.args![0]).f32(p.args![1]);
    else if (p.dist !== "bits") w.f32(...(p.args ?? [0, 1]));
    const prelude = WGSL_PHILOX + (p.dist === "normal" ? WGSL_NEG2LOG : "");
    const source = header(p.dist === "dropout" ? ["x"] : [], ["out"]) + prelude + `
@compute @workgroup_size(${WG_RANDOM})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let b = linearId(wid, nwg, lid, ${WG_RANDOM}u);
  if (b >= pu(1u)) { return; }
  let n = pu(0u);
  let c0 = pu(4u) + b;
  let c1 = pu(5u) + select(0u, 1u, c0 < b);
  let w = philox(vec4<u32>(c0, c1, pu(6u), pu(7u)), vec2<u32>(pu(2u), pu(3u)));
  let e0 = 4u * b;
  ${storeCode(p.dist)}
}`;
    return {
      source,
      workgroups: grid(Math.ceil(blocks / WG_RANDOM), caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: RandomParams, inputs: FloatArray[], [out]: FloatArray[]): void {
    validate(p);
    const n = p.n;
    const [a0, a1] = p.args ?? [0, 1];
    const x = inputs[0];
    for (let b = 0, e0 = 0; e0 < n; b++, e0 += 4) {
      const w = philox4x32(blockCounter(p.counter, b), p.key);
      const m = Math.min(4, n - e0);
      switch (p.dist) {
        case "uniform":
          for (let j = 0; j < m; j++) out[e0 + j] = a0 + a1 * ((w[j] >>> 8) * INV_2_24);
          break;
        case "normal": {
          const z = [0, 0, 0, 0];
          for (let h = 0; h < 2; h++) {
            const u1 = ((w[2 * h] >>> 8) + 1) * INV_2_24, u2 = (w[2 * h + 1] >>> 8) * INV_2_24;
            const rad = Math.sqrt(-2 * Math.log(u1)), theta = TWO_PI * u2;
            z[2 * h] = rad * Math.cos(theta);
            z[2 * h + 1] = rad * Math.sin(theta);
          }
          for (let j = 0; j < m; j++) out[e0 + j] = a0 + a1 * z[j];
          break;
        }
        case "dropout":
          // The scale travels as float32 on the GPU; use the same value so both sides scale identically.
          for (let j = 0; j < m; j++) out[e0 + j] = (w[j] >>> 8) >= a0 ? x[e0 + j] * Math.fround(a1) : 0;
          break;
        case "bits":
          for (let j = 0; j < m; j++) {
            out[2 * (e0 + j)] = w[j] >>> 16;
            out[2 * (e0 + j) + 1] = w[j] & 0xffff;
          }
          break;
      }
    }
  },
};
