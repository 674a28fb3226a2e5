/**
 * @file Sum and max over any set of axes.
 *
 * The input is split into kept and reduced dimensions, each group coalesced; the output is the kept dimensions
 * in order, contiguous. Short reductions run one thread per output; long ones (the bias gradient of a conv sums
 * N·H·W values per channel) give each output a workgroup that strides over the reduced elements and finishes
 * with a tree in workgroup memory, which is also more accurate than a serial float32 sum.
 */

import { contiguousStrides } from "./elementwise.ts";
import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { grid, header } from "./wgsl.ts";

export type ReduceOp = "sum" | "max";

export interface ReduceParams {
  op: ReduceOp;
  /** Input shape (contiguous). */
  shape: readonly number[];
  /** Axes to reduce, each in [0, rank). */
  axes: readonly number[];
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
    let source: string;
    if (wide) {
      source = header(["x"], ["out"]) + `
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
}`;
      return { source, workgroups: grid(nOut, caps.maxWorkgroupsPerDimension), params: w.finish() };
    }
    source = header(["x"], ["out"]) + `
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
}`;
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
