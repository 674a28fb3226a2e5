/**
 * @file Strided copy: `dst[dstOffset + Σ i_d·dstStride_d] = src[srcOffset + Σ i_d·srcStride_d]` over a shape.
 *
 * One primitive covers permute (permuted source strides), narrow (a source offset), cat (a destination offset
 * into a wider tensor), the backward of narrow (a write into a zeroed tensor) and expand (source stride 0).
 * The destination is bound read-write, so copies into part of an existing tensor leave the rest untouched.
 *
 * Dimensions are coalesced first (see `coalesce` in layout.ts). When the destination's innermost run is
 * contiguous and 4-aligned, each invocation moves four elements: one vec4 store, and one vec4 load when the
 * source is aligned the same way (else four scalar loads along the source's innermost stride). llvmpipe runs
 * every storage access as a per-lane loop and the u32 div/mod index math is not vectorised, so doing both once
 * per four elements matters.
 *
 * `concat` is cat along one dim (or its backward, the split) for up to seven parts in one dispatch: the
 * decoder of a UNet concatenates its skip connections, and a copy per part was two dispatches each way.
 */

import { coalesce } from "./layout.ts";
import { cachedSource } from "./source_cache.ts";
import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { ENTRY_1D, grid1d, header, splitIndexWgsl, WG } from "./wgsl.ts";

export interface CopyParams {
  shape: readonly number[];
  srcOffset: number;
  srcStrides: readonly number[];
  dstOffset: number;
  dstStrides: readonly number[];
}

/** Whether a side can be read or written as whole vec4s: innermost stride 1 and every offset 4-aligned. */
function vec4Aligned(strides: readonly number[], offset: number): boolean {
  const rank = strides.length;
  return strides[rank - 1] === 1 && offset % 4 === 0 && strides.slice(0, rank - 1).every((s) => s % 4 === 0);
}

/**
 * How a copy runs: elements per invocation `V` (4: vec4 stores), whether the source is read as vec4s, and the
 * index words (shape, offsets and strides in the units each side is indexed in).
 */
export function copyPlan(p: CopyParams) {
  const c = coalesce(p.shape, [p.srcStrides, p.dstStrides]);
  const rank = c.shape.length;
  const [ss, ds] = c.strides;
  const V = c.shape[rank - 1] % 4 === 0 && vec4Aligned(ds, p.dstOffset) ? 4 : 1;
  const srcVec = V === 4 && vec4Aligned(ss, p.srcOffset);
  const shape = [...c.shape.slice(0, rank - 1), c.shape[rank - 1] / V];
  // In vec4 units a vec4-indexed side steps one vec4 per innermost coordinate and stride/4 elsewhere.
  const vec4Strides = (st: number[]) => [...st.slice(0, rank - 1).map((s) => s / 4), 1];
  const dstStrides = V === 4 ? vec4Strides(ds) : ds;
  // A scalar-read source steps V elements along its innermost stride per invocation.
  const srcStrides = srcVec ? vec4Strides(ss) : [...ss.slice(0, rank - 1), ss[rank - 1] * V];
  return {
    V,
    srcVec,
    rank,
    n: shape.reduce((a, b) => a * b, 1),
    shape,
    srcOffset: srcVec ? p.srcOffset / 4 : p.srcOffset,
    dstOffset: p.dstOffset / V,
    srcStrides,
    dstStrides,
    /** Element stride between the four scalar loads of a gathered vec4. */
    srcInner: ss[rank - 1],
  };
}

function copySource(rank: number, V: number, srcVec: boolean): string {
  const lines = splitIndexWgsl(
    rank,
    4,
    (d) => [`s += c * pu(${4 + rank + d}u);`, `t += c * pu(${4 + 2 * rank + d}u);`],
  );
  let store = `dst[t] = src[s];`;
  if (V === 4 && !srcVec) {
    store = `let k = pu(3u);
  dst[t] = vec4<f32>(src[s], src[s + k], src[s + 2u * k], src[s + 3u * k]);`;
  }
  let head = header(["src"], ["dst"]);
  if (V === 4) {
    head = head.replace(
      `var<storage, read_write> dst: array<f32>;`,
      `var<storage, read_write> dst: array<vec4<f32>>;`,
    );
  }
  if (srcVec) {
    head = head.replace(`var<storage, read> src: array<f32>;`, `var<storage, read> src: array<vec4<f32>>;`);
  }
  return head + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, 256u);
  if (i >= pu(0u)) { return; }
  var rem = i;
  var s = pu(1u);
  var t = pu(2u);
  ${lines.join("\n  ")}
  ${store}
}`;
}

export const copy: Kernel<CopyParams> = {
  name: "copy",

  gpu(p: CopyParams, caps: GpuCaps): GpuDispatch {
    const plan = copyPlan(p);
    const w = new ParamWriter().u32(
      plan.n,
      plan.srcOffset,
      plan.dstOffset,
      plan.srcInner,
      ...plan.shape,
      ...plan.srcStrides,
      ...plan.dstStrides,
    );
    const { rank, V, srcVec } = plan;
    const source = cachedSource(`copy:${rank}:${V}:${srcVec}`, () => copySource(rank, V, srcVec));
    return { source, workgroups: grid1d(plan.n, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: CopyParams, [src]: FloatArray[], [dst]: FloatArray[]): void {
    const c = coalesce(p.shape, [p.srcStrides, p.dstStrides]);
    const rank = c.shape.length;
    const n = c.shape.reduce((a, b) => a * b, 1);
    const [ss, ds] = c.strides;
    for (let i = 0; i < n; i++) {
      let rem = i, s = p.srcOffset, t = p.dstOffset;
      for (let d = rank - 1; d >= 0; d--) {
        const k = rem % c.shape[d];
        rem = (rem - k) / c.shape[d];
        s += k * ss[d];
        t += k * ds[d];
      }
      dst[t] = src[s];
    }
  },
};

// ---------------------------------------------------------------------------------------------------------------
// Concatenation in one pass.

/** Most parts one `concat` dispatch joins or splits: 7 plus the whole fit the default 8 storage buffers. */
export const CONCAT_MAX_PARTS = 7;

export interface ConcatParams {
  /** Rows: the product of the dims before the concatenated one (1 for dim 0). */
  outer: number;
  /** Per part, its elements per row: its size along the dim times the product of the dims after it. */
  widths: readonly number[];
  /** "join": the parts (inputs) into the whole (output); "split": the whole (input) into the parts (outputs). */
  direction: "join" | "split";
}

/** Elements per invocation (4 when every part's row is a whole number of vec4s) and the checked part count. */
export function concatPlan(p: ConcatParams) {
  const K = p.widths.length;
  if (K < 1 || K > CONCAT_MAX_PARTS) throw new Error(`concat: 1 to ${CONCAT_MAX_PARTS} parts, got ${K}`);
  const V = p.widths.every((w) => w % 4 === 0) ? 4 : 1;
  const row = p.widths.reduce((a, b) => a + b, 0);
  return { K, V, row, n: (p.outer * row) / V };
}

/**
 * cat along one dim, or its backward, in one dispatch instead of one copy per part: the whole is seen as
 * [outer, Σ widths] and part k as [outer, widths[k]] at column Σ_{j<k} widths[j]. Each invocation moves V
 * elements of the whole; it finds its part by comparing its column with the parts' ends (the same branch for
 * whole runs of a row, so lanes rarely diverge). Uniform words: n, row / V, then per part its end column and
 * its width (in V units).
 */
export const concat: Kernel<ConcatParams> = {
  name: "concat",

  gpu(p: ConcatParams, caps: GpuCaps): GpuDispatch {
    const { K, V, row, n } = concatPlan(p);
    const w = new ParamWriter().u32(n, row / V);
    let end = 0;
    for (const width of p.widths) w.u32(end += width / V, width / V);
    const source = cachedSource(`concat:${p.direction}:${K}:${V}`, () => {
      const parts = Array.from({ length: K }, (_, k) => `part${k}`);
      const join = p.direction === "join";
      let head = join ? header(parts, ["whole"]) : header(["whole"], parts);
      if (V === 4) head = head.replaceAll("array<f32>", "array<vec4<f32>>");
      const branches = parts.map((part, k) => {
        const start = k === 0 ? "0u" : `pu(${2 + 2 * (k - 1)}u)`;
        const at = `r * pu(${3 + 2 * k}u) + c - ${start}`;
        const move = join ? `whole[i] = ${part}[${at}];` : `${part}[${at}] = whole[i];`;
        return `  if (c < pu(${2 + 2 * k}u)) { ${move} return; }`;
      });
      return head + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, ${WG}u);
  if (i >= pu(0u)) { return; }
  let r = i / pu(1u);
  let c = i - r * pu(1u);
${branches.join("\n")}
}`;
    });
    return { source, workgroups: grid1d(n, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: ConcatParams, inputs: FloatArray[], outputs: FloatArray[]): void {
    const { row } = concatPlan(p);
    const [whole, parts] = p.direction === "join" ? [outputs[0], inputs] : [inputs[0], outputs];
    for (let r = 0; r < p.outer; r++) {
      let start = 0;
      p.widths.forEach((width, k) => {
        for (let c = 0; c < width; c++) {
          const at = r * row + start + c, partAt = r * width + c;
          if (p.direction === "join") whole[at] = parts[k][partAt];
          else parts[k][partAt] = whole[at];
        }
        start += width;
      });
    }
  },
};
