/**
 * @file 2-D average pooling and nearest-neighbour upsampling on NCHW planes, forward and backward.
 *
 * All four kernels treat the input as `planes` = N·C independent H×W planes and are gathers (every output is
 * written by exactly one thread, no atomics):
 *
 * - avgPool2d: PyTorch defaults (count_include_pad = True, ceil_mode = False), so every window divides by
 *   kh·kw. A thread computes `RUN` neighbouring outputs of one output row, which spreads the index arithmetic
 *   over several windows. The backward is a gather too: input pixel (h, w) receives g/(kh·kw) from every output
 *   whose window covers it, oh ∈ [ceil((h+ph−kh+1)/sh), floor((h+ph)/sh)] clamped to the output (same for w).
 * - interpolateNearest with integer factors (sh, sw): out[oh, ow] = x[oh / sh, ow / sw]. A thread owns one input
 *   pixel and its sh×sw output block: one read and sh·sw writes forward, sh·sw reads and one write backward
 *   (the backward sums the block).
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { ENTRY_1D, grid1d, header } from "./wgsl.ts";

export interface AvgPool2dParams {
  planes: number;
  H: number;
  W: number;
  kh: number;
  kw: number;
  sh: number;
  sw: number;
  ph: number;
  pw: number;
}

/** Output size of avg_pool2d with ceil_mode = False. */
export function poolOutSize(p: AvgPool2dParams): { Ho: number; Wo: number } {
  return {
    Ho: Math.floor((p.H + 2 * p.ph - p.kh) / p.sh) + 1,
    Wo: Math.floor((p.W + 2 * p.pw - p.kw) / p.sw) + 1,
  };
}

function checkPool(op: string, p: AvgPool2dParams) {
  const { Ho, Wo } = poolOutSize(p);
  const positive = [p.planes, p.H, p.W, p.kh, p.kw, p.sh, p.sw];
  if (
    positive.some((v) => !Number.isInteger(v) || v < 1) ||
    ![p.ph, p.pw].every((v) => Number.isInteger(v) && v >= 0)
  ) {
    throw new Error(`${op}: invalid parameters ${JSON.stringify(p)}`);
  }
  if (Ho < 1 || Wo < 1) throw new Error(`${op}: output would be ${Ho}×${Wo} for ${JSON.stringify(p)}`);
  return { Ho, Wo };
}

/** Outputs per thread along a row in the forward, input pixels per thread along a row in the backward. */
const RUN = 4;

export const avgPool2d: Kernel<AvgPool2dParams> = {
  name: "avgPool2d",

  gpu(p: AvgPool2dParams, caps: GpuCaps): GpuDispatch {
    const { Ho, Wo } = checkPool("avgPool2d", p);
    const runs = Math.ceil(Wo / RUN);
    const total = p.planes * Ho * runs;
    const w = new ParamWriter().u32(total, p.H, p.W, Ho, Wo, runs, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw)
      .f32(1 / (p.kh * p.kw));
    const source = header(["x"], ["y"]) + `
${ENTRY_1D} {
  let id = linearId(wid, nwg, lid, 256u);
  if (id >= pu(0u)) { return; }
  let H = pu(1u); let W = pu(2u); let Ho = pu(3u); let Wo = pu(4u); let runs = pu(5u);
  let kh = pu(6u); let kw = pu(7u); let sh = pu(8u); let sw = pu(9u);
  let r = id % runs;
  let rest = id / runs;
  let oh = rest % Ho;
  let plane = rest / Ho;
  let xPlane = plane * H * W;
  let h0 = i32(oh * sh) - pi(10u);
  let hLo = u32(max(h0, 0));
  let hHi = u32(min(h0 + i32(kh), i32(H)));
  let ow0 = r * ${RUN}u;
  let owEnd = min(ow0 + ${RUN}u, Wo);
  for (var ow = ow0; ow < owEnd; ow++) {
    let w0 = i32(ow * sw) - pi(11u);
    let wLo = u32(max(w0, 0));
    let wHi = u32(min(w0 + i32(kw), i32(W)));
    var acc = 0.0;
    for (var h = hLo; h < hHi; h++) {
      let rowBase = xPlane + h * W;
      for (var ww = wLo; ww < wHi; ww++) { acc += x[rowBase + ww]; }
    }
    y[(plane * Ho + oh) * Wo + ow] = acc * pf(12u);
  }
}`;
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: AvgPool2dParams, [x]: FloatArray[], [y]: FloatArray[]): void {
    const { Ho, Wo } = checkPool("avgPool2d", p);
    const div = p.kh * p.kw;
    for (let plane = 0; plane < p.planes; plane++) {
      for (let oh = 0; oh < Ho; oh++) {
        for (let ow = 0; ow < Wo; ow++) {
          let acc = 0;
          for (let i = 0; i < p.kh; i++) {
            const h = oh * p.sh - p.ph + i;
            if (h < 0 || h >= p.H) continue;
            for (let j = 0; j < p.kw; j++) {
              const w = ow * p.sw - p.pw + j;
              if (w >= 0 && w < p.W) acc += x[(plane * p.H + h) * p.W + w];
            }
          }
          y[(plane * Ho + oh) * Wo + ow] = acc / div;
        }
      }
    }
  },
};

/** Inputs: g (the output gradient, [planes, Ho, Wo]); output: dx ([planes, H, W]). */
export const avgPool2dBackward: Kernel<AvgPool2dParams> = {
  name: "avgPool2dBackward",

  gpu(p: AvgPool2dParams, caps: GpuCaps): GpuDispatch {
    const { Ho, Wo } = checkPool("avgPool2dBackward", p);
    const runs = Math.ceil(p.W / RUN);
    const total = p.planes * p.H * runs;
    const w = new ParamWriter().u32(total, p.H, p.W, Ho, Wo, runs, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw)
      .f32(1 / (p.kh * p.kw));
    // First output index whose window reaches pixel a (with padding pad, kernel k, stride s): ceil((a+pad−k+1)/s).
    const source = header(["g"], ["dx"]) + `
fn firstOut(a: u32, pad: u32, k: u32, s: u32) -> u32 {
  let num = i32(a + pad) - i32(k) + 1;
  return select(0u, (u32(num) + s - 1u) / s, num > 0);
}
${ENTRY_1D} {
  let id = linearId(wid, nwg, lid, 256u);
  if (id >= pu(0u)) { return; }
  let H = pu(1u); let W = pu(2u); let Ho = pu(3u); let Wo = pu(4u); let runs = pu(5u);
  let kh = pu(6u); let kw = pu(7u); let sh = pu(8u); let sw = pu(9u); let ph = pu(10u); let pw = pu(11u);
  let r = id % runs;
  let rest = id / runs;
  let h = rest % H;
  let plane = rest / H;
  let gPlane = plane * Ho * Wo;
  let ohLo = firstOut(h, ph, kh, sh);
  let ohEnd = min((h + ph) / sh + 1u, Ho);
  let w0 = r * ${RUN}u;
  let wEnd = min(w0 + ${RUN}u, W);
  for (var w = w0; w < wEnd; w++) {
    let owLo = firstOut(w, pw, kw, sw);
    let owEnd = min((w + pw) / sw + 1u, Wo);
    var acc = 0.0;
    for (var oh = ohLo; oh < ohEnd; oh++) {
      let rowBase = gPlane + oh * Wo;
      for (var ow = owLo; ow < owEnd; ow++) { acc += g[rowBase + ow]; }
    }
    dx[(plane * H + h) * W + w] = acc * pf(12u);
  }
}`;
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: AvgPool2dParams, [g]: FloatArray[], [dx]: FloatArray[]): void {
    const { Ho, Wo } = checkPool("avgPool2dBackward", p);
    const div = p.kh * p.kw;
    // Scatter form: the opposite of the GPU's gather, so the two are independent derivations.
    dx.fill(0, 0, p.planes * p.H * p.W);
    for (let plane = 0; plane < p.planes; plane++) {
      for (let oh = 0; oh < Ho; oh++) {
        for (let ow = 0; ow < Wo; ow++) {
          const share = g[(plane * Ho + oh) * Wo + ow] / div;
          for (let i = 0; i < p.kh; i++) {
            const h = oh * p.sh - p.ph + i;
            if (h < 0 || h >= p.H) continue;
            for (let j = 0; j < p.kw; j++) {
              const w = ow * p.sw - p.pw + j;
              if (w >= 0 && w < p.W) dx[(plane * p.H + h) * p.W + w] += share;
            }
          }
        }
      }
    }
  },
};

export interface NearestParams {
  planes: number;
  /** Input (forward) plane size. */
  H: number;
  W: number;
  /** Integer scale factors. */
  sh: number;
  sw: number;
}

function checkNearest(op: string, p: NearestParams) {
  if ([p.planes, p.H, p.W, p.sh, p.sw].some((v) => !Number.isInteger(v) || v < 1)) {
    throw new Error(`${op}: invalid parameters ${JSON.stringify(p)}`);
  }
}

/** x: [planes, H, W] → y: [planes, H·sh, W·sw]. */
export const upsampleNearest: Kernel<NearestParams> = {
  name: "upsampleNearest",

  gpu(p: NearestParams, caps: GpuCaps): GpuDispatch {
    checkNearest("upsampleNearest", p);
    const total = p.planes * p.H * p.W;
    const w = new ParamWriter().u32(total, p.W, p.sh, p.sw);
    const source = header(["x"], ["y"]) + `
${ENTRY_1D} {
  let id = linearId(wid, nwg, lid, 256u);
  if (id >= pu(0u)) { return; }
  let W = pu(1u); let sh = pu(2u); let sw = pu(3u);
  let v = x[id];
  let w = id % W;
  let ph = id / W;
  let Wo = W * sw;
  var o = ph * sh * Wo + w * sw;
  for (var i = 0u; i < sh; i++) {
    for (var j = 0u; j < sw; j++) { y[o + j] = v; }
    o += Wo;
  }
}`;
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: NearestParams, [x]: FloatArray[], [y]: FloatArray[]): void {
    checkNearest("upsampleNearest", p);
    const Ho = p.H * p.sh, Wo = p.W * p.sw;
    for (let plane = 0; plane < p.planes; plane++) {
      for (let oh = 0; oh < Ho; oh++) {
        for (let ow = 0; ow < Wo; ow++) {
          y[(plane * Ho + oh) * Wo + ow] =
            x[(plane * p.H + Math.floor(oh / p.sh)) * p.W + Math.floor(ow / p.sw)];
        }
      }
    }
  },
};

/** g: [planes, H·sh, W·sw] → dx: [planes, H, W], each the sum of its sh×sw block. */
export const upsampleNearestBackward: Kernel<NearestParams> = {
  name: "upsampleNearestBackward",

  gpu(p: NearestParams, caps: GpuCaps): GpuDispatch {
    checkNearest("upsampleNearestBackward", p);
    const total = p.planes * p.H * p.W;
    const w = new ParamWriter().u32(total, p.W, p.sh, p.sw);
    const source = header(["g"], ["dx"]) + `
${ENTRY_1D} {
  let id = linearId(wid, nwg, lid, 256u);
  if (id >= pu(0u)) { return; }
  let W = pu(1u); let sh = pu(2u); let sw = pu(3u);
  let w = id % W;
  let ph = id / W;
  let Wo = W * sw;
  var o = ph * sh * Wo + w * sw;
  var acc = 0.0;
  for (var i = 0u; i < sh; i++) {
    for (var j = 0u; j < sw; j++) { acc += g[o + j]; }
    o += Wo;
  }
  dx[id] = acc;
}`;
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: NearestParams, [g]: FloatArray[], [dx]: FloatArray[]): void {
    checkNearest("upsampleNearestBackward", p);
    const Ho = p.H * p.sh, Wo = p.W * p.sw;
    dx.fill(0, 0, p.planes * p.H * p.W);
    for (let plane = 0; plane < p.planes; plane++) {
      for (let oh = 0; oh < Ho; oh++) {
        for (let ow = 0; ow < Wo; ow++) {
          dx[(plane * p.H + Math.floor(oh / p.sh)) * p.W + Math.floor(ow / p.sw)] +=
            g[(plane * Ho + oh) * Wo + ow];
        }
      }
    }
  },
};
