/**
 * @file Strided copy: `dst[dstOffset + Σ i_d·dstStride_d] = src[srcOffset + Σ i_d·srcStride_d]` over a shape.
 *
 * One primitive covers permute (permuted source strides), narrow (a source offset), cat (a destination offset
 * into a wider tensor), the backward of narrow (a write into a zeroed tensor) and expand (source stride 0).
 * The destination is bound read-write, so copies into part of an existing tensor leave the rest untouched.
 */

import { coalesce } from "./elementwise.ts";
import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { ENTRY_1D, grid1d, header } from "./wgsl.ts";

export interface CopyParams {
  shape: readonly number[];
  srcOffset: number;
  srcStrides: readonly number[];
  dstOffset: number;
  dstStrides: readonly number[];
}

export const copy: Kernel<CopyParams> = {
  name: "copy",

  gpu(p: CopyParams, caps: GpuCaps): GpuDispatch {
    const c = coalesce(p.shape, [p.srcStrides, p.dstStrides]);
    const rank = c.shape.length;
    const n = c.shape.reduce((a, b) => a * b, 1);
    const w = new ParamWriter().u32(
      n,
      p.srcOffset,
      p.dstOffset,
      ...c.shape,
      ...c.strides[0],
      ...c.strides[1],
    );
    const lines: string[] = [];
    for (let d = rank - 1; d >= 0; d--) {
      lines.push(
        `{ let c = rem % pu(${3 + d}u); rem = rem / pu(${3 + d}u); s += c * pu(${
          3 + rank + d
        }u); t += c * pu(${3 + 2 * rank + d}u); }`,
      );
    }
    const source = header(["src"], ["dst"]) + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, 256u);
  if (i >= pu(0u)) { return; }
  var rem = i;
  var s = pu(1u);
  var t = pu(2u);
  ${lines.join("\n  ")}
  dst[t] = src[s];
}`;
    return { source, workgroups: grid1d(n, caps.maxWorkgroupsPerDimension), params: w.finish() };
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
