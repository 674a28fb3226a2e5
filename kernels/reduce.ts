/**
 * @file Sum and max over any set of axes.
 *
 * The input is split into kept and reduced dimensions, each group coalesced; the output is the kept dimensions
 * in order, contiguous. Short reductions run one thread per output; long ones (the bias gradient of a conv sums
 * N·H·W values per channel) give each output a workgroup that strides over the reduced elements and finishes
 * with a tree in workgroup memory, which is also more accurate than a serial float32 sum ("generic").
 *
 * On CPU-emulated adapters (llvmpipe) that kernel runs at about 0.2 GB/s: every element costs an integer
 * division per reduced dim (llvmpipe has no vector integer division, so each one is a per-lane loop), a
 * per-lane scalar storage load, and a barrier per tree level. The "lanes" variants (the idea of the norm
 * kernels' lanes variants, kernels/norm.ts) cover the layouts a training step produces, all views of the input
 * as [A, P, K, Q] with out[a, k] = reduce over (p, q) of x[((a·P + p)·K + k)·Q + q]: rows (P = 1: sums over the
 * last dims, full sums), columns (Q = 1: sums over leading dims, e.g. the split-K partials of conv weight
 * gradients; with A > 1, over middle dims), and both (bias gradients, [N, C, H·W] → [C]). A lane owns a contiguous stretch of the elements of one output
 * unit, read as vec4 units where they are 4-aligned (rows: along q, Q % 4 = 0; columns: four neighbouring
 * outputs, K % 4 = 0), with no division in the loop; when outputs are too few to keep the adapter's threads
 * busy, up to 64 lanes share one and are merged in workgroup memory with one barrier. "lanesTexture" reads x
 * as a flat rgba32float texture, a vector gather per unit. Each lane adds its units in blocks of `BLOCK` and
 * then the block sums, so a float32 sum's error grows with BLOCK + n/BLOCK rather than n.
 */

import { LANE_WG, lanesPerRow, unitDecls } from "./lanes.ts";
import { contiguousStrides } from "./layout.ts";
import { cachedSource } from "./source_cache.ts";
import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { flatTextureSize, grid, header } from "./wgsl.ts";

export type ReduceOp = "sum" | "max";

/**
 * "generic" (any layout; a workgroup tree per output for long reductions: for real GPUs), "lanes" and
 * "lanesTexture" (see the file comment; for CPU-emulated adapters; [A, P, K, Q] layouts only, others run generic).
 * Absent: on CPU-emulated adapters lanesTexture for large inputs and lanes for small ones, else generic.
 */
export type ReduceVariant = "generic" | "lanes" | "lanesTexture";

export interface ReduceParams {
  op: ReduceOp;
  /** Input shape (contiguous). */
  shape: readonly number[];
  /** Axes to reduce, each in [0, rank). */
  axes: readonly number[];
  variant?: ReduceVariant;
}

/** Merges neighbouring dimensions of one (shape, strides) group that are contiguous with each other. */
function coalesceGroup(shape: number[], strides: number[]): { shape: number[]; strides: number[] } {
  const s: number[] = [], t: number[] = [];
  for (let d = 0; d < shape.length; d++) {
    if (shape[d] === 1) continue;
    const last = s.length - 1;
    if (last >= 0 && t[last] === strides[d] * shape[d]) {
      s[last] *= shape[d];
      t[last] = strides[d];
    } else {
      s.push(shape[d]);
      t.push(strides[d]);
    }
  }
  return s.length ? { shape: s, strides: t } : { shape: [1], strides: [0] };
}

export function reduceLayout(p: ReduceParams) {
  const rank = p.shape.length;
  for (const a of p.axes) {
    if (!Number.isInteger(a) || a < 0 || a >= rank) {
      throw new Error(`reduce: axis ${a} out of range for rank ${rank}`);
    }
  }
  const st = contiguousStrides(p.shape);
  const red = new Set(p.axes);
  const kShape: number[] = [], kStr: number[] = [], rShape: number[] = [], rStr: number[] = [];
  for (let d = 0; d < rank; d++) {
    if (red.has(d)) {
      rShape.push(p.shape[d]);
      rStr.push(st[d]);
    } else {
      kShape.push(p.shape[d]);
      kStr.push(st[d]);
    }
  }
  const kept = coalesceGroup(kShape, kStr);
  const reduced = coalesceGroup(rShape, rStr);
  const nOut = kShape.reduce((a, b) => a * b, 1);
  const L = rShape.reduce((a, b) => a * b, 1);
  return { kept, reduced, nOut, L };
}

/** The input seen as [A, P, K, Q], reducing P and Q: out[a, k] = reduce over (p, q) of x[((a·P + p)·K + k)·Q + q]. */
export interface LaneLayout {
  A: number;
  P: number;
  K: number;
  Q: number;
}

/**
 * The [A, P, K, Q] view of a reduction, or null where its layout is not one (e.g. reduced and kept dims
 * alternating twice). Candidates come from the coalesced groups; one is right when the 4-D shape coalesces to the
 * same groups.
 */
export function laneLayout(p: ReduceParams): LaneLayout | null {
  const { kept, reduced, L } = reduceLayout(p);
  if (kept.shape.length > 2 || reduced.shape.length > 2) return null;
  const [A, K] = kept.shape.length === 2 ? kept.shape : [1, kept.shape[0]];
  const pq: [number, number][] = L === 1
    ? [[1, 1]]
    : reduced.shape.length === 2
    ? [[reduced.shape[0], reduced.shape[1]]]
    : [[1, L], [L, 1]];
  const key = (q: ReduceParams) => {
    const l = reduceLayout(q);
    return JSON.stringify([l.kept, l.reduced]);
  };
  const want = key(p);
  for (const [P, Q] of pq) {
    if (key({ op: p.op, shape: [A, P, K, Q], axes: [1, 3] }) === want) return { A, P, K, Q };
  }
  return null;
}

/**
 * Units a lane adds into a block sum before adding the block to its total: the float32 error then grows with
 * BLOCK + n/BLOCK instead of n.
 */
const BLOCK = 64;

/** How a lanes reduction maps outputs to lanes. */
interface LaneReducePlan {
  /** Rows (along q, Q > 1) or columns (along k, Q = 1: a unit is V neighbouring outputs). */
  columns: boolean;
  V: 1 | 4;
  /**
   * Output units per block of A (K / V for columns, else K), in all (A of those), and input units per output
   * unit (P · Q / V, or P for columns).
   */
  blockOutUnits: number;
  outUnits: number;
  work: number;
  /** Lanes per output unit. */
  T: number;
  texture: boolean;
}

function laneReducePlan(l: LaneLayout, caps: GpuCaps, variant: "lanes" | "lanesTexture"): LaneReducePlan {
  const columns = l.Q === 1;
  const V = (columns ? l.K : l.Q) % 4 === 0 ? 4 : 1;
  const blockOutUnits = columns ? l.K / V : l.K;
  const outUnits = l.A * blockOutUnits;
  const work = columns ? l.P : (l.P * l.Q) / V;
  // lanesPerRow's 128 lanes in all: 512 and 2048 measured no better on bias gradients ([8,64,1024] over [0,2]).
  const T = lanesPerRow(outUnits, work, 1);
  const tex = flatTextureSize(l.A * l.P * l.K * l.Q), max = caps.maxTextureDimension2D ?? 0;
  const texture = variant === "lanesTexture" && V === 4 && tex.width <= max && tex.height <= max;
  return { columns, V, blockOutUnits, outUnits, work, T, texture };
}

/**
 * Inputs of at least this many elements are read as textures by default: the texture copy costs about 50 µs
 * more than it saves below (lavapipe, [8, 64, Q] over [0, 2] and [8, K] over [0]: even at 2^17, texture
 * 10–25% faster from 2^18 up, 20–50% slower at 2^15).
 */
const TEXTURE_MIN_ELEMENTS = 1 << 17;

function defaultVariant(p: ReduceParams, caps: GpuCaps): ReduceVariant {
  if (!caps.isCpuEmulated) return "generic";
  return p.shape.reduce((a, b) => a * b, 1) >= TEXTURE_MIN_ELEMENTS ? "lanesTexture" : "lanes";
}

function lanesReduce(
  p: ReduceParams,
  l: LaneLayout,
  caps: GpuCaps,
  variant: "lanes" | "lanesTexture",
): GpuDispatch {
  const plan = laneReducePlan(l, caps, variant);
  const { V, T } = plan;
  const sum = p.op === "sum";
  const init = sum ? "U(0.0)" : "U(bitcast<f32>(0xff800000u))";
  const combine = (a: string, b: string) => (sum ? `${a} + ${b}` : `max(${a}, ${b})`);
  const horizontal = V === 1 ? "v" : sum ? "v.x + v.y + v.z + v.w" : "max(max(v.x, v.y), max(v.z, v.w))";
  // Unit (a, p, k, u) sits at ((a·P + p)·KU + k)·QU + u: rows have KU = K, QU = Q / V; columns KU = K / V,
  // QU = 1. Output unit o is (a, k) = (o / KU, o % KU).
  const KU = plan.blockOutUnits, QU = plan.columns ? 1 : l.Q / V;
  const chunk = Math.ceil(plan.work / T);
  const w = new ParamWriter().u32(plan.outUnits, KU, QU, plan.work, chunk, l.P * KU * QU);
  // Rows: a lane's stretch [i0, i1) of the (p, u) units of output unit o, in blocks that stay within one p.
  // Columns: p = i0 .. i1 − 1 of output unit o, in blocks.
  const walk = plan.columns
    ? `var q = i0;
    while (q < i1) {
      let n = min(i1 - q, ${BLOCK}u);
      var b = ${init};
      for (var e = base + q * KU; e < base + (q + n) * KU; e += KU) { b = ${combine("b", "ld_x(e)")}; }
      acc = ${combine("acc", "b")};
      q += n;
    }`
    : `var q = i0 / QU;
    var u = i0 - q * QU;
    var i = i0;
    while (i < i1) {
      let n = min(min(QU - u, i1 - i), ${BLOCK}u);
      let e0 = base + q * KU * QU + u;
      var b = ${init};
      for (var e = e0; e < e0 + n; e++) { b = ${combine("b", "ld_x(e)")}; }
      acc = ${combine("acc", "b")};
      i += n;
      u += n;
      if (u == QU) { u = 0u; q++; }
    }`;
  // The source depends on the op, vector width, texture input, columns and lanes per output alone: built once
  // per structure (kernels/source_cache.ts).
  const key = `reduce/lanes:${p.op}:${V}:${plan.texture}:${plan.columns}:${T}`;
  const source = cachedSource(key, () => {
    const merge = T === 1 ? "" : `
  sh[lid] = acc;
  workgroupBarrier();
  if (lane == 0u) {
    for (var k = lid + 1u; k < lid + ${T}u; k++) { acc = ${combine("acc", "sh[k]")}; }
  }`;
    return unitDecls(V, plan.texture, ["x"], ["out"], [0], plan.columns ? ["x", "out"] : ["x"]) +
      (T === 1 ? "" : `var<workgroup> sh: array<U, ${LANE_WG}>;
`) + `
fn horizontal(v: U) -> f32 { return ${horizontal}; }
@compute @workgroup_size(${LANE_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let id = (wid.x + wid.y * nwg.x) * ${LANE_WG}u + lid;
  let o = id / ${T}u;
  let lane = id % ${T}u;
  let valid = o < pu(0u);
  let KU = pu(1u);
  let QU = pu(2u);
  var acc = ${init};
  if (valid) {
    let i0 = min(lane * pu(4u), pu(3u));
    let i1 = min(i0 + pu(4u), pu(3u));
    let a = o / KU;
    let base = a * pu(5u) + (o - a * KU) * QU;
    ${walk}
  }${merge}
  if (valid && lane == 0u) { out[o] = ${plan.columns ? "acc" : "horizontal(acc)"}; }
}`;
  });
  return {
    source,
    workgroups: grid(Math.ceil((plan.outUnits * T) / LANE_WG), caps.maxWorkgroupsPerDimension),
    params: w.finish(),
    textures: plan.texture ? [{ input: 0, ...flatTextureSize(l.A * l.P * l.K * l.Q) }] : undefined,
  };
}

const WG_REDUCE = 256;

/** WGSL that sets `name` to the input offset of linear index `j` over a group of dimensions. */
function offsetCode(name: string, j: string, rank: number, shapeWord: number, strideWord: number): string {
  const lines = [`var ${name} = 0u;`, `{ var rem = ${j};`];
  for (let d = rank - 1; d >= 0; d--) {
    lines.push(
      `  { let c = rem % pu(${shapeWord + d}u); rem = rem / pu(${shapeWord + d}u); ${name} += c * pu(${
        strideWord + d
      }u); }`,
    );
  }
  lines.push(`}`);
  return lines.join("\n");
}

export const reduce: Kernel<ReduceParams> = {
  name: "reduce",

  gpu(p: ReduceParams, caps: GpuCaps): GpuDispatch {
    const variant = p.variant ?? defaultVariant(p, caps);
    const lanes = variant === "generic" ? null : laneLayout(p);
    if (lanes && variant !== "generic") return lanesReduce(p, lanes, caps, variant);
    const { kept, reduced, nOut, L } = reduceLayout(p);
    const kr = kept.shape.length, rr = reduced.shape.length;
    const w = new ParamWriter().u32(nOut, L).u32(
      ...kept.shape,
      ...kept.strides,
      ...reduced.shape,
      ...reduced.strides,
    );
    const kShapeW = 2, kStrW = 2 + kr, rShapeW = 2 + 2 * kr, rStrW = 2 + 2 * kr + rr;
    const init = p.op === "sum" ? "0.0" : "bitcast<f32>(0xff800000u)";
    const combine = (a: string, b: string) => (p.op === "sum" ? `${a} + ${b}` : `max(${a}, ${b})`);
    const wide = L >= 64 && nOut < 16384;
    // Built once per op, form and kept/reduced ranks (kernels/source_cache.ts).
    const key = `reduce/generic:${p.op}:${wide}:${kr}:${rr}`;
    if (wide) {
      const source = cachedSource(key, () =>
        header(["x"], ["out"]) + `
var<workgroup> sh: array<f32, ${WG_REDUCE}>;
@compute @workgroup_size(${WG_REDUCE})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let o = wid.x + wid.y * nwg.x;
  if (o >= pu(0u)) { return; }
  let L = pu(1u);
  ${offsetCode("base", "o", kr, kShapeW, kStrW)}
  var acc = ${init};
  for (var j = lid; j < L; j += ${WG_REDUCE}u) {
    ${offsetCode("off", "j", rr, rShapeW, rStrW)}
    acc = ${combine("acc", "x[base + off]")};
  }
  sh[lid] = acc;
  workgroupBarrier();
  for (var s = ${WG_REDUCE / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { sh[lid] = ${combine("sh[lid]", "sh[lid + s]")}; }
    workgroupBarrier();
  }
  if (lid == 0u) { out[o] = sh[0]; }
}`);
      return { source, workgroups: grid(nOut, caps.maxWorkgroupsPerDimension), params: w.finish() };
    }
    const source = cachedSource(key, () =>
      header(["x"], ["out"]) + `
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let o = linearId(wid, nwg, lid, 64u);
  if (o >= pu(0u)) { return; }
  let L = pu(1u);
  ${offsetCode("base", "o", kr, kShapeW, kStrW)}
  var acc = ${init};
  for (var j = 0u; j < L; j++) {
    ${offsetCode("off", "j", rr, rShapeW, rStrW)}
    acc = ${combine("acc", "x[base + off]")};
  }
  out[o] = acc;
}`);
    return {
      source,
      workgroups: grid(Math.ceil(nOut / 64), caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: ReduceParams, [x]: FloatArray[], [out]: FloatArray[]): void {
    const { kept, reduced, nOut, L } = reduceLayout(p);
    const offsets = (g: { shape: number[]; strides: number[] }, n: number) => {
      const o = new Int32Array(n);
      for (let j = 0; j < n; j++) {
        let rem = j, off = 0;
        for (let d = g.shape.length - 1; d >= 0; d--) {
          off += (rem % g.shape[d]) * g.strides[d];
          rem = Math.floor(rem / g.shape[d]);
        }
        o[j] = off;
      }
      return o;
    };
    const base = offsets(kept, nOut), red = offsets(reduced, L);
    for (let o = 0; o < nOut; o++) {
      let acc = p.op === "sum" ? 0 : -Infinity;
      const b = base[o];
      if (p.op === "sum") { for (let j = 0; j < L; j++) acc += x[b + red[j]]; }
      else for (let j = 0; j < L; j++) acc = Math.max(acc, x[b + red[j]]);
      out[o] = acc;
    }
  },
};
