/**
 * @file Softmax and log-softmax along one dimension, forward and backward.
 *
 * The input is viewed as [outer, L, inner]: the softmax runs over L for each of the outer·inner rows, and the
 * elements of row (o, i) sit at o·L·inner + j·inner + i, so any dim works without a permute. A segment of T
 * threads (a power of two) serves each row, 256/T rows per workgroup, T chosen from L and the row count as for
 * the norm kernels (`pickThreadsPerRow` in kernels/lanes.ts).
 *
 * - forward: each thread keeps an online (max, Σexp(x − max)) pair over its strided share of the row (one read,
 *   rescaling the sum when the max grows), the segment merges the pairs in workgroup memory, and a second pass
 *   writes exp(x − m)/s or x − m − log s. The running max starts at −FLT_MAX rather than −inf so that rows with
 *   −inf entries (masks) never form inf − inf.
 * - backward: one pass sums g·y (softmax) or g (log-softmax) over the row, a second writes
 *   dx = y·(g − Σg·y) or dx = g − exp(y)·Σg.
 *
 * When inner > 1, neighbouring threads take neighbouring rows (the segment is interleaved across the
 * workgroup), so the threads of one step read consecutive addresses.
 *
 * On CPU-emulated adapters rows with inner = 1 (the last dim, as in attention) take the lanes variants of the
 * norm kernels instead (see kernels/norm.ts and kernels/lanes.ts): a lane per row (a few when rows are scarce) owning a contiguous
 * run of the row, vec4 units where L % 4 = 0, the online (max, sum) kept per element position of the unit and
 * folded at the end, inputs read as flat textures. fwd+bwd at [4096, 256] on lavapipe: 16.5 ms (tree), 7.7
 * (lanes), 4.8 (lanesTexture); at [256, 4096]: 20.3, 9.0, 4.5.
 */

import { LANE_WG, lanesPerRow, pickThreadsPerRow, type RowVariant, unitDecls } from "./lanes.ts";
import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { flatTextureSize, grid, header, WG } from "./wgsl.ts";

export interface SoftmaxParams {
  outer: number;
  /** Length of the softmax dimension. */
  L: number;
  inner: number;
  /** log-softmax instead of softmax. */
  log: boolean;
  /**
   * As for the norm kernels: "tree" (segments of threads per row), "lanes" (a lane per row, vec4 units where
   * L % 4 = 0), "lanesTexture" (lanes reading the inputs as textures). The lanes variants need inner = 1;
   * absent: lanesTexture on CPU-emulated adapters where inner = 1, else tree.
   */
  variant?: RowVariant;
}

/** The lanes layout of a softmax with inner = 1, or null for the tree variant. */
function lanePlan(p: SoftmaxParams, caps: GpuCaps, textureInputs: number) {
  const variant = p.variant ?? (caps.isCpuEmulated ? "lanesTexture" : "tree");
  if (variant === "tree" || p.inner !== 1) return null;
  const V: 1 | 4 = p.L % 4 === 0 ? 4 : 1;
  const units = p.L / V;
  const T = lanesPerRow(p.outer, units, 1);
  const tex = flatTextureSize(p.outer * p.L), max = caps.maxTextureDimension2D ?? 0;
  const texture = variant === "lanesTexture" && V === 4 && tex.width <= max && tex.height <= max;
  return {
    V,
    T,
    params: new ParamWriter().u32(p.outer, units, Math.ceil(units / T)).finish(),
    workgroups: grid(Math.ceil((p.outer * T) / LANE_WG), caps.maxWorkgroupsPerDimension),
    textures: texture ? Array.from({ length: textureInputs }, (_, input) => ({ input, ...tex })) : undefined,
  };
}

/**
 * Prologue of a lanes kernel: lane `lane` of `T` of row `row` (`valid` when it exists) owns units `j0 .. j1` of
 * the row that starts at unit `base` (uniform words: rows, units per row, units per lane).
 */
function lanePrologue(T: number): string {
  return `
  let lane = lid % ${T}u;
  let row = (wid.x + wid.y * nwg.x) * ${LANE_WG / T}u + lid / ${T}u;
  let valid = row < pu(0u);
  let j0 = min(lane * pu(2u), pu(1u));
  let j1 = min(j0 + pu(2u), pu(1u));
  let base = row * pu(1u);`;
}

/** WGSL that folds per-lane values `names` over the T lanes of a row in lane order, with `merge` (slot k). */
function laneMerge(T: number, names: string[], merge: string): { shared: string; code: string } {
  if (T === 1) return { shared: "", code: "" };
  const sh = (n: string) => `sh_${n}`;
  return {
    shared: names.map((n) => `var<workgroup> ${sh(n)}: array<f32, ${LANE_WG}>;`).join("\n") + "\n",
    code: `
  ${names.map((n) => `${sh(n)}[lid] = ${n};`).join("\n  ")}
  workgroupBarrier();
  ${names.map((n) => `${n} = ${sh(n)}[lid - lane];`).join("\n  ")}
  for (var k = lid - lane + 1u; k < lid - lane + ${T}u; k++) { ${merge} }`,
  };
}

const ENTRY_LANES = `@compute @workgroup_size(${LANE_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32)`;

function check(op: string, p: SoftmaxParams) {
  for (const [k, v] of Object.entries({ outer: p.outer, L: p.L, inner: p.inner })) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`${op}: ${k} must be a positive integer, got ${v}`);
  }
}

interface SegmentPlan {
  T: number;
  /** Distance in lid between two threads of the same row: 1 for contiguous segments, rows-per-workgroup when interleaved. */
  step: number;
  prologue: string;
  workgroups: [number, number, number];
}

function plan(p: SoftmaxParams, caps: GpuCaps): SegmentPlan {
  const rows = p.outer * p.inner;
  const T = pickThreadsPerRow(rows, p.L, caps);
  const rpw = WG / T;
  const interleave = p.inner > 1;
  const step = interleave ? rpw : 1;
  const seg = interleave ? `lid % ${rpw}u` : `lid / ${T}u`;
  const t = interleave ? `lid / ${rpw}u` : `lid % ${T}u`;
  const prologue = `
  let L = pu(1u);
  let inner = pu(2u);
  let seg = ${seg};
  let t = ${t};
  let row = (wid.x + wid.y * nwg.x) * ${rpw}u + seg;
  let valid = row < pu(0u);
  let o = row / inner;
  let base = o * L * inner + (row - o * inner);
  let leader = lid - t * ${step}u;`;
  return { T, step, prologue, workgroups: grid(Math.ceil(rows / rpw), caps.maxWorkgroupsPerDimension) };
}

function tree(T: number, step: number, merge: string): string {
  if (T === 1) return "";
  return `
  workgroupBarrier();
  for (var k = ${T / 2}u; k > 0u; k = k >> 1u) {
    if (t < k) { let j = lid + k * ${step}u; ${merge} }
    workgroupBarrier();
  }`;
}

const NEG_MAX = "-3.4028234e38";

export const softmax: Kernel<SoftmaxParams> = {
  name: "softmax",

  gpu(p: SoftmaxParams, caps: GpuCaps): GpuDispatch {
    check("softmax", p);
    const lanes = lanePlan(p, caps, 1);
    if (lanes) {
      // Online (max, sum) per element position of the unit, folded over the positions, then over the lanes.
      const fold = laneMerge(
        lanes.T,
        ["m", "s"],
        `let mm = max(m, sh_m[k]);
    s = s * exp(m - mm) + sh_s[k] * exp(sh_m[k] - mm);
    m = mm;`,
      );
      const hmax = lanes.V === 4 ? "max(max(mv.x, mv.y), max(mv.z, mv.w))" : "mv";
      const write = p.log ? `(ld_x(base + j) - m) - ls` : `exp(ld_x(base + j) - m) * inv`;
      const source = unitDecls(lanes.V, lanes.textures !== undefined, ["x"], ["y"], [0], ["x", "y"]) +
        fold.shared + `
${ENTRY_LANES} {
  ${lanePrologue(lanes.T)}
  var mv = U(${NEG_MAX});
  var sv = U(0.0);
  if (valid) {
    for (var j = j0; j < j1; j++) {
      let v = ld_x(base + j);
      let mm = max(mv, v);
      sv = sv * exp(mv - mm) + exp(v - mm);
      mv = mm;
    }
  }
  var m = ${hmax};
  var s = hsum(sv * exp(mv - m));${fold.code}
  if (!valid) { return; }
  let inv = 1.0 / s;
  let ls = log(s);
  for (var j = j0; j < j1; j++) {
    y[base + j] = ${write};
  }
}`;
      return { source, workgroups: lanes.workgroups, params: lanes.params, textures: lanes.textures };
    }
    const { T, step, prologue, workgroups } = plan(p, caps);
    const w = new ParamWriter().u32(p.outer * p.inner, p.L, p.inner);
    const shared = T === 1 ? "" : `
var<workgroup> shM: array<f32, ${WG}>;
var<workgroup> shS: array<f32, ${WG}>;`;
    const merge = `let mm = max(shM[lid], shM[j]);
      shS[lid] = shS[lid] * exp(shM[lid] - mm) + shS[j] * exp(shM[j] - mm);
      shM[lid] = mm;`;
    const finish = T === 1 ? "" : `shM[lid] = m;
  shS[lid] = s;${tree(T, step, merge)}
  m = shM[leader];
  s = shS[leader];`;
    // (x − m) − log s rather than x − (m + log s): the sum would round to the float32 grid of m.
    const write = p.log ? `(x[i] - m) - ls` : `exp(x[i] - m) * inv`;
    const source = header(["x"], ["y"]) + shared + `
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${prologue}
  var m = ${NEG_MAX};
  var s = 0.0;
  if (valid) {
    for (var j = t; j < L; j += ${T}u) {
      let v = x[base + j * inner];
      let mm = max(m, v);
      s = s * exp(m - mm) + exp(v - mm);
      m = mm;
    }
  }
  ${finish}
  if (!valid) { return; }
  let inv = 1.0 / s;
  let ls = log(s);
  for (var j = t; j < L; j += ${T}u) {
    let i = base + j * inner;
    y[i] = ${write};
  }
}`;
    return { source, workgroups, params: w.finish() };
  },

  cpu(p: SoftmaxParams, [x]: FloatArray[], [y]: FloatArray[]): void {
    check("softmax", p);
    const { outer, L, inner } = p;
    for (let o = 0; o < outer; o++) {
      for (let i = 0; i < inner; i++) {
        const base = o * L * inner + i;
        let m = -Infinity;
        for (let j = 0; j < L; j++) m = Math.max(m, x[base + j * inner]);
        let s = 0;
        for (let j = 0; j < L; j++) s += Math.exp(x[base + j * inner] - m);
        const ls = Math.log(s);
        for (let j = 0; j < L; j++) {
          const k = base + j * inner;
          y[k] = p.log ? x[k] - m - ls : Math.exp(x[k] - m) / s;
        }
      }
    }
  },
};

/** Inputs: y (the forward output), g; output: dx. */
export const softmaxBackward: Kernel<SoftmaxParams> = {
  name: "softmaxBackward",

  gpu(p: SoftmaxParams, caps: GpuCaps): GpuDispatch {
    check("softmaxBackward", p);
    const lanes = lanePlan(p, caps, 2);
    if (lanes) {
      const fold = laneMerge(lanes.T, ["a"], `a += sh_a[k];`);
      const term = p.log ? `ld_g(base + j)` : `ld_g(base + j) * ld_y(base + j)`;
      const write = p.log
        ? `ld_g(base + j) - exp(ld_y(base + j)) * a`
        : `ld_y(base + j) * (ld_g(base + j) - a)`;
      const source = unitDecls(lanes.V, lanes.textures !== undefined, ["y", "g"], ["dx"], [0, 1], [
        "y",
        "g",
        "dx",
      ]) + fold.shared + `
${ENTRY_LANES} {
  ${lanePrologue(lanes.T)}
  var av = U(0.0);
  if (valid) {
    for (var j = j0; j < j1; j++) {
      av += ${term};
    }
  }
  var a = hsum(av);${fold.code}
  if (!valid) { return; }
  for (var j = j0; j < j1; j++) {
    dx[base + j] = ${write};
  }
}`;
      return { source, workgroups: lanes.workgroups, params: lanes.params, textures: lanes.textures };
    }
    const { T, step, prologue, workgroups } = plan(p, caps);
    const w = new ParamWriter().u32(p.outer * p.inner, p.L, p.inner);
    const shared = T === 1 ? "" : `\nvar<workgroup> shA: array<f32, ${WG}>;`;
    const finish = T === 1 ? "" : `shA[lid] = a;${tree(T, step, `shA[lid] += shA[j];`)}
  a = shA[leader];`;
    const term = p.log ? `g[i]` : `g[i] * y[i]`;
    const write = p.log ? `g[i] - exp(y[i]) * a` : `y[i] * (g[i] - a)`;
    const source = header(["y", "g"], ["dx"]) + shared + `
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${prologue}
  var a = 0.0;
  if (valid) {
    for (var j = t; j < L; j += ${T}u) {
      let i = base + j * inner;
      a += ${term};
    }
  }
  ${finish}
  if (!valid) { return; }
  for (var j = t; j < L; j += ${T}u) {
    let i = base + j * inner;
    dx[i] = ${write};
  }
}`;
    return { source, workgroups, params: w.finish() };
  },

  cpu(p: SoftmaxParams, [y, g]: FloatArray[], [dx]: FloatArray[]): void {
    check("softmaxBackward", p);
    const { outer, L, inner } = p;
    for (let o = 0; o < outer; o++) {
      for (let i = 0; i < inner; i++) {
        const base = o * L * inner + i;
        let a = 0;
        for (let j = 0; j < L; j++) {
          const k = base + j * inner;
          a += p.log ? g[k] : g[k] * y[k];
        }
        for (let j = 0; j < L; j++) {
          const k = base + j * inner;
          dx[k] = p.log ? g[k] - Math.exp(y[k]) * a : y[k] * (g[k] - a);
        }
      }
    }
  },
};
