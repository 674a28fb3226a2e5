/**
 * @file 2-D average and max pooling and nearest-neighbour upsampling on NCHW planes, forward and backward.
 *
 * All six kernels treat the input as `planes` = N·C independent H×W planes and are gathers (every output is
 * written by exactly one thread, no atomics):
 *
 * - avgPool2d: ceil_mode = False. With count_include_pad = True (PyTorch's default) every window divides by
 *   kh·kw; with False (Inception's FID blocks) by the number of its elements inside the input,
 *   (hHi − hLo)·(wHi − wLo) after clipping the window to the plane. A thread computes `RUN` neighbouring outputs
 *   of one output row, which spreads the index arithmetic over several windows. The backward is a gather too:
 *   input pixel (h, w) receives g/divisor(oh, ow) from every output whose window covers it,
 *   oh ∈ [ceil((h+ph−kh+1)/sh), floor((h+ph)/sh)] clamped to the output (same for w).
 * - maxPool2d: F.max_pool2d (ceil_mode = False, dilation 1): padding never wins (it is −∞), the first maximum
 *   in row-major window order is the one selected (strict >, as PyTorch's kernels; a NaN is selected like
 *   PyTorch's `val > max || isnan(val)`). When a gradient will be needed the forward also writes, per output,
 *   the in-plane index h·W + w of its maximum (as a float: exact below 2²⁴, which the op checks); the backward
 *   gathers for each input pixel the g of the covering outputs whose index names it, so it never rescans a
 *   window and never scatters.
 * - interpolateNearest with integer factors (sh, sw): out[oh, ow] = x[oh / sh, ow / sw]. A thread owns one input
 *   pixel and its sh×sw output block: one read and sh·sw writes forward, sh·sw reads and one write backward
 *   (the backward sums the block).
 * - The UNet's resampling (avg-pooling 2×2 at stride 2 without padding, nearest ×2, and their backward passes)
 *   takes `block2Dispatch` where rows are whole vec4s: one vec4 of the smaller side per thread, no window loops
 *   (per bench step 18.5–20.4 → 5.0–5.2 ms for the four kernels, replayed alone).
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { cachedSource } from "./source_cache.ts";
import { ENTRY_1D, grid1d, header } from "./wgsl.ts";

/** The geometry shared by the pooling kernels: planes of H×W, a kh×kw window, strides and zero padding. */
export interface PoolGeometry {
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

export interface AvgPool2dParams extends PoolGeometry {
  /** Padding counts in the divisor (PyTorch's count_include_pad, default true). */
  countIncludePad?: boolean;
}

/** Output size of avg_pool2d / max_pool2d with ceil_mode = False. */
export function poolOutSize(p: PoolGeometry): { Ho: number; Wo: number } {
  return {
    Ho: Math.floor((p.H + 2 * p.ph - p.kh) / p.sh) + 1,
    Wo: Math.floor((p.W + 2 * p.pw - p.kw) / p.sw) + 1,
  };
}

function checkPool(op: string, p: PoolGeometry) {
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

/**
 * The UNet's resampling, 2×2 blocks: avg-pooling with 2×2 windows at stride 2 and no padding, nearest
 * upsampling by 2, and their backward passes, where every row of the smaller side is whole vec4s. The smaller
 * side is [rows, 4·Q] and the larger [2·rows, 8·Q]; element (r, c) of the smaller matches the 2×2 block at
 * rows 2r, 2r + 1 and columns 2c, 2c + 1 of the larger. "down" writes each smaller element as `scale` times the
 * sum of its block, "up" writes `scale` times it into every element of its block. One invocation per vec4 of the
 * smaller side, with vec4 loads and stores throughout (one gather each on llvmpipe, where a scalar storage access
 * is a loop over the lanes), against the general kernels' window loops over single floats.
 */
function block2Dispatch(
  kind: "down" | "up",
  rows: number,
  quads: number,
  scale: number,
  caps: GpuCaps,
): GpuDispatch {
  const total = rows * quads;
  const w = new ParamWriter().u32(total, quads).f32(scale);
  // The source depends on the direction alone (built once; kernels/source_cache.ts).
  const source = cachedSource(`pool/block2/${kind}`, () => {
    // Quads of the larger side: row 2r starts at 2r·2Q; the block of smaller quad (r, c) is columns 2c, 2c + 1.
    const body = kind === "down"
      ? `let a = large[top]; let b = large[top + 1u]; let d = large[bottom]; let e = large[bottom + 1u];
  small[i] = s * (vec4<f32>(a.x + a.y, a.z + a.w, b.x + b.y, b.z + b.w) +
    vec4<f32>(d.x + d.y, d.z + d.w, e.x + e.y, e.z + e.w));`
      : `let v = s * small[i];
  let left = v.xxyy; let right = v.zzww;
  large[top] = left; large[top + 1u] = right; large[bottom] = left; large[bottom + 1u] = right;`;
    const bindings = kind === "down"
      ? header(["large"], ["small"], "vec4<f32>")
      : header(["small"], ["large"], "vec4<f32>");
    return bindings + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, 256u);
  if (i >= pu(0u)) { return; }
  let Q = pu(1u); let s = pf(2u);
  let r = i / Q; let c = i % Q;
  let top = 4u * r * Q + 2u * c; let bottom = top + 2u * Q;
  ${body}
}`;
  });
  return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
}

/** Whether avg-pooling `p` is 2×2 blocks (see block2Dispatch): 2×2 windows at stride 2, no padding, whole quads. */
function poolIsBlock2(p: PoolGeometry): boolean {
  return p.kh === 2 && p.kw === 2 && p.sh === 2 && p.sw === 2 && p.ph === 0 && p.pw === 0 &&
    p.H % 2 === 0 && p.W % 8 === 0;
}

/** Whether nearest upsampling `p` is 2×2 blocks (see block2Dispatch): factor 2 both ways, whole input quads. */
function nearestIsBlock2(p: NearestParams): boolean {
  return p.sh === 2 && p.sw === 2 && p.W % 4 === 0;
}

/**
 * The forward pooling entry point shared by avgPool2d and maxPool2d: an invocation owns `RUN` neighbouring
 * outputs of one row of one plane and, for each, clips its window to the plane (hLo..hHi, wLo..wHi) before
 * running `body`. Uniform words follow `poolWindowWords`.
 */
function poolWindowLoop(body: string): string {
  return `${ENTRY_1D} {
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
${body}  }
}`;
}

export const avgPool2d: Kernel<AvgPool2dParams> = {
  name: "avgPool2d",

  gpu(p: AvgPool2dParams, caps: GpuCaps): GpuDispatch {
    const { Ho, Wo } = checkPool("avgPool2d", p);
    if (poolIsBlock2(p)) return block2Dispatch("down", p.planes * Ho, Wo / 4, 0.25, caps);
    const runs = Math.ceil(Wo / RUN);
    const total = p.planes * Ho * runs;
    const w = new ParamWriter().u32(total, p.H, p.W, Ho, Wo, runs, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw)
      .f32(1 / (p.kh * p.kw)).u32(p.countIncludePad === false ? 0 : 1);
    const source = header(["x"], ["y"]) + poolWindowLoop(`    var acc = 0.0;
    for (var h = hLo; h < hHi; h++) {
      let rowBase = xPlane + h * W;
      for (var ww = wLo; ww < wHi; ww++) { acc += x[rowBase + ww]; }
    }
    let inside = f32((hHi - hLo) * (wHi - wLo));
    y[(plane * Ho + oh) * Wo + ow] = select(acc / inside, acc * pf(12u), pu(13u) == 1u);
`);
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: AvgPool2dParams, [x]: FloatArray[], [y]: FloatArray[]): void {
    const { Ho, Wo } = checkPool("avgPool2d", p);
    for (let plane = 0; plane < p.planes; plane++) {
      for (let oh = 0; oh < Ho; oh++) {
        for (let ow = 0; ow < Wo; ow++) {
          let acc = 0, inside = 0;
          for (let i = 0; i < p.kh; i++) {
            const h = oh * p.sh - p.ph + i;
            if (h < 0 || h >= p.H) continue;
            for (let j = 0; j < p.kw; j++) {
              const w = ow * p.sw - p.pw + j;
              if (w >= 0 && w < p.W) {
                acc += x[(plane * p.H + h) * p.W + w];
                inside++;
              }
            }
          }
          y[(plane * Ho + oh) * Wo + ow] = acc / (p.countIncludePad === false ? inside : p.kh * p.kw);
        }
      }
    }
  },
};

/** Uniform words 0–11 of the backward gathers (see `gatherSource`), and the invocation count. */
function gatherWords(op: string, p: PoolGeometry): { w: ParamWriter; total: number } {
  const { Ho, Wo } = checkPool(op, p);
  const runs = Math.ceil(p.W / RUN);
  const total = p.planes * p.H * runs;
  const w = new ParamWriter().u32(total, p.H, p.W, Ho, Wo, runs, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw);
  return { w, total };
}

/**
 * The backward passes gather rather than scatter: an invocation walks a run of RUN pixels (h, w) of one plane's
 * row of dx, and for each the outputs whose windows reach it, oh ∈ [ohLo, ohEnd) and ow ∈ [owLo, owEnd) (the
 * first is ceil((a + pad − k + 1)/s)). `body` adds into `acc` for one pixel; `helpers` are extra WGSL functions.
 */
function gatherSource(inputs: string[], helpers: string, body: string): string {
  return header(inputs, ["dx"]) + `
fn firstOut(a: u32, pad: u32, k: u32, s: u32) -> u32 {
  let num = i32(a + pad) - i32(k) + 1;
  return select(0u, (u32(num) + s - 1u) / s, num > 0);
}${helpers}
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
    var acc = 0.0;${body}
    dx[(plane * H + h) * W + w] = acc;
  }
}`;
}

/** Inputs: g (the output gradient, [planes, Ho, Wo]); output: dx ([planes, H, W]). */
export const avgPool2dBackward: Kernel<AvgPool2dParams> = {
  name: "avgPool2dBackward",

  gpu(p: AvgPool2dParams, caps: GpuCaps): GpuDispatch {
    const { w, total } = gatherWords("avgPool2dBackward", p);
    if (poolIsBlock2(p)) return block2Dispatch("up", p.planes * (p.H / 2), p.W / 8, 0.25, caps);
    w.f32(1 / (p.kh * p.kw)).u32(p.countIncludePad === false ? 0 : 1);
    // inside(o, …): how many of output o's window positions fall inside a side of length n.
    const source = gatherSource(
      ["g"],
      `
fn inside(o: u32, pad: u32, k: u32, s: u32, n: u32) -> f32 {
  let a0 = i32(o * s) - i32(pad);
  return f32(min(a0 + i32(k), i32(n)) - max(a0, 0));
}`,
      `
    if (pu(13u) == 1u) {
      for (var oh = ohLo; oh < ohEnd; oh++) {
        let rowBase = gPlane + oh * Wo;
        for (var ow = owLo; ow < owEnd; ow++) { acc += g[rowBase + ow]; }
      }
      acc *= pf(12u);
    } else {
      for (var oh = ohLo; oh < ohEnd; oh++) {
        let rowBase = gPlane + oh * Wo;
        let rows = inside(oh, ph, kh, sh, H);
        for (var ow = owLo; ow < owEnd; ow++) { acc += g[rowBase + ow] / (rows * inside(ow, pw, kw, sw, W)); }
      }
    }`,
    );
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: AvgPool2dParams, [g]: FloatArray[], [dx]: FloatArray[]): void {
    const { Ho, Wo } = checkPool("avgPool2dBackward", p);
    // Scatter form: the opposite of the GPU's gather, so the two are independent derivations.
    dx.fill(0, 0, p.planes * p.H * p.W);
    const span = (o: number, s: number, pad: number, k: number, n: number) =>
      Math.min(o * s - pad + k, n) - Math.max(o * s - pad, 0);
    for (let plane = 0; plane < p.planes; plane++) {
      for (let oh = 0; oh < Ho; oh++) {
        for (let ow = 0; ow < Wo; ow++) {
          const div = p.countIncludePad === false
            ? span(oh, p.sh, p.ph, p.kh, p.H) * span(ow, p.sw, p.pw, p.kw, p.W)
            : p.kh * p.kw;
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

export interface MaxPool2dParams extends PoolGeometry {
  /** Also write each output's argmax (its in-plane index h·W + w) as a second output, for the backward. */
  withIndices: boolean;
}

/** x: [planes, H, W] → y: [planes, Ho, Wo] (and, withIndices, idx: [planes, Ho, Wo]). */
export const maxPool2d: Kernel<MaxPool2dParams> = {
  name: "maxPool2d",

  gpu(p: MaxPool2dParams, caps: GpuCaps): GpuDispatch {
    const { Ho, Wo } = checkPool("maxPool2d", p);
    const runs = Math.ceil(Wo / RUN);
    const total = p.planes * Ho * runs;
    const w = new ParamWriter().u32(total, p.H, p.W, Ho, Wo, runs, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw);
    const store = p.withIndices ? "idx[o] = f32(best);" : "";
    // The window is clipped to the plane (padding is −∞ and, with pad ≤ k/2, never the whole window).
    const source = header(["x"], p.withIndices ? ["y", "idx"] : ["y"]) +
      poolWindowLoop(`    var best = hLo * W + wLo;
    var m = x[xPlane + best];
    for (var h = hLo; h < hHi; h++) {
      for (var ww = wLo; ww < wHi; ww++) {
        let at = h * W + ww;
        let v = x[xPlane + at];
        if (v > m || v != v) { m = v; best = at; }
      }
    }
    let o = (plane * Ho + oh) * Wo + ow;
    y[o] = m;
    ${store}
`);
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: MaxPool2dParams, [x]: FloatArray[], [y, idx]: FloatArray[]): void {
    const { Ho, Wo } = checkPool("maxPool2d", p);
    for (let plane = 0; plane < p.planes; plane++) {
      const base = plane * p.H * p.W;
      for (let oh = 0; oh < Ho; oh++) {
        for (let ow = 0; ow < Wo; ow++) {
          let m = -Infinity, best = -1;
          for (let i = 0; i < p.kh; i++) {
            const h = oh * p.sh - p.ph + i;
            if (h < 0 || h >= p.H) continue;
            for (let j = 0; j < p.kw; j++) {
              const w = ow * p.sw - p.pw + j;
              if (w < 0 || w >= p.W) continue;
              const v = x[base + h * p.W + w];
              if (best < 0 || v > m || Number.isNaN(v)) {
                m = v;
                best = h * p.W + w;
              }
            }
          }
          const o = (plane * Ho + oh) * Wo + ow;
          y[o] = m;
          if (p.withIndices) idx[o] = best;
        }
      }
    }
  },
};

/** Inputs: g and idx ([planes, Ho, Wo], idx from the forward); output: dx ([planes, H, W]). */
export const maxPool2dBackward: Kernel<PoolGeometry> = {
  name: "maxPool2dBackward",

  gpu(p: PoolGeometry, caps: GpuCaps): GpuDispatch {
    const { w, total } = gatherWords("maxPool2dBackward", p);
    const source = gatherSource(
      ["g", "idx"],
      "",
      `
    let here = f32(h * W + w);
    for (var oh = ohLo; oh < ohEnd; oh++) {
      let rowBase = gPlane + oh * Wo;
      for (var ow = owLo; ow < owEnd; ow++) {
        if (idx[rowBase + ow] == here) { acc += g[rowBase + ow]; }
      }
    }`,
    );
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: PoolGeometry, [g, idx]: FloatArray[], [dx]: FloatArray[]): void {
    const { Ho, Wo } = checkPool("maxPool2dBackward", p);
    // Scatter form (the GPU gathers): each output's gradient goes to the pixel its index names.
    dx.fill(0, 0, p.planes * p.H * p.W);
    for (let plane = 0; plane < p.planes; plane++) {
      for (let o = 0; o < Ho * Wo; o++) {
        const k = plane * Ho * Wo + o;
        dx[plane * p.H * p.W + idx[k]] += g[k];
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
    if (nearestIsBlock2(p)) return block2Dispatch("up", p.planes * p.H, p.W / 4, 1, caps);
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
    if (nearestIsBlock2(p)) return block2Dispatch("down", p.planes * p.H, p.W / 4, 1, caps);
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
