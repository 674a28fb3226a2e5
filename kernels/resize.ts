/**
 * @file Bilinear resampling of NCHW planes to an arbitrary size, forward and backward, with PyTorch's
 * F.interpolate(mode="bilinear") semantics for a given output size, and TensorFlow 1's legacy resize.
 *
 * Along each axis (input length n, output length m) output o reads source coordinate
 *
 *     "half-pixel"     src = max((o + 0.5)·n/m − 0.5, 0)   PyTorch align_corners = False (pixel centres line up)
 *     "align-corners"  src = o·(n − 1)/(m − 1) (0 if m = 1) PyTorch align_corners = True (corner pixels line up)
 *     "asymmetric"     src = o·n/m                         TF1 resize_bilinear (half_pixel_centers = False), the
 *                                                          resize inside NVlabs' TorchScript Inception for FID
 *
 * and blends i0 = ⌊src⌋ and i1 = min(i0 + 1, n − 1) with weights 1 − λ and λ = src − i0; the 2-D weight is the
 * product of the two axes' weights. As in PyTorch, the scale is computed once per axis in float32 (the GPU gets
 * it as a uniform, rounded like PyTorch's float division) and the source coordinate in float32; the CPU reference
 * computes everything in float64, so the two agree to float32 rounding.
 *
 * Both kernels are gathers over `planes` = N·C independent planes:
 *
 * - forward: a thread computes `RUN` neighbouring outputs of one output row, sharing the vertical weights.
 * - backward: a thread owns `RUN` neighbouring input pixels of one row and sums the output gradients that read
 *   them. The outputs that can read input index i along an axis have src ∈ [i − 1, i + 1), i.e.
 *   o ∈ [(i − 0.5)·m/n − 0.5, (i + 1.5)·m/n − 0.5) with half-pixel coordinates and o ∈ ((i − 1)/s, (i + 1)/s)
 *   with src = o·s; the thread scans that range widened by one on each side (and to the ends for the
 *   first two and the last input index, where the clamping at 0 and at n − 1 sends more outputs), recomputing
 *   each candidate's i0, i1, λ exactly as the forward does and keeping the weight it gives to i. So each output
 *   gradient is read only by the few input pixels it feeds, with no atomics. The CPU backward is a scatter, an
 *   independent derivation.
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { ENTRY_1D, grid1d, header } from "./wgsl.ts";

export interface BilinearParams {
  planes: number;
  /** Input plane size. */
  H: number;
  W: number;
  /** Output plane size. */
  Ho: number;
  Wo: number;
  /** How output coordinates map to source coordinates (see the file comment). */
  coordinates: BilinearCoordinates;
}

export type BilinearCoordinates = "half-pixel" | "align-corners" | "asymmetric";

/** Outputs per thread along a row (forward), input pixels per thread along a row (backward). */
const RUN = 4;

function check(op: string, p: BilinearParams) {
  if (
    [p.planes, p.H, p.W, p.Ho, p.Wo].some((v) => !Number.isInteger(v) || v < 1) ||
    !["half-pixel", "align-corners", "asymmetric"].includes(p.coordinates)
  ) {
    throw new Error(`${op}: invalid parameters ${JSON.stringify(p)}`);
  }
}

/** The per-axis scale (PyTorch's area_pixel_compute_scale for a given output size), exact, in float64. */
export function bilinearScale(n: number, m: number, coordinates: BilinearCoordinates): number {
  return coordinates === "align-corners" ? (m > 1 ? (n - 1) / (m - 1) : 0) : n / m;
}

/** Source index pair and weights along one axis (the CPU reference's float64 version of the WGSL `axis`). */
function axisWeights(o: number, n: number, scale: number, halfPixel: boolean): [number, number, number] {
  const src = halfPixel ? Math.max((o + 0.5) * scale - 0.5, 0) : o * scale;
  const i0 = Math.min(Math.floor(src), n - 1);
  const i1 = Math.min(i0 + 1, n - 1);
  return [i0, i1, src - i0];
}

/** The uniforms both kernels share: sizes, float32 scales, and whether coordinates are half-pixel ones. */
function writeCommon(w: ParamWriter, p: BilinearParams) {
  w.u32(p.H, p.W, p.Ho, p.Wo, p.coordinates === "half-pixel" ? 0 : 1)
    .f32(bilinearScale(p.H, p.Ho, p.coordinates), bilinearScale(p.W, p.Wo, p.coordinates));
}

// Words: 0 total, 1 H, 2 W, 3 Ho, 4 Wo, 5 (0 half-pixel, 1 src = o·scale), 6 scaleH, 7 scaleW, 8 runs.
const WGSL_AXIS = `
/** Source indices i0, i1 (as floats) and weight λ of i1 for output o along an axis of input length n. */
fn axis(o: u32, n: u32, scale: f32) -> vec3<f32> {
  var src = scale * f32(o);
  if (pu(5u) == 0u) { src = max(scale * (f32(o) + 0.5) - 0.5, 0.0); }
  let i0 = min(u32(src), n - 1u);
  let i1 = min(i0 + 1u, n - 1u);
  return vec3<f32>(f32(i0), f32(i1), src - f32(i0));
}
`;

/** x: [planes, H, W] → y: [planes, Ho, Wo]. */
export const bilinearResize: Kernel<BilinearParams> = {
  name: "bilinearResize",

  gpu(p: BilinearParams, caps: GpuCaps): GpuDispatch {
    check("bilinearResize", p);
    const runs = Math.ceil(p.Wo / RUN);
    const total = p.planes * p.Ho * runs;
    const w = new ParamWriter().u32(total);
    writeCommon(w, p);
    w.u32(runs);
    const source = header(["x"], ["y"]) + WGSL_AXIS + `
${ENTRY_1D} {
  let id = linearId(wid, nwg, lid, 256u);
  if (id >= pu(0u)) { return; }
  let H = pu(1u); let W = pu(2u); let Ho = pu(3u); let Wo = pu(4u); let runs = pu(8u);
  let r = id % runs;
  let rest = id / runs;
  let oh = rest % Ho;
  let plane = rest / Ho;
  let ay = axis(oh, H, pf(6u));
  let row0 = plane * H * W + u32(ay.x) * W;
  let row1 = plane * H * W + u32(ay.y) * W;
  let ow0 = r * ${RUN}u;
  let owEnd = min(ow0 + ${RUN}u, Wo);
  for (var ow = ow0; ow < owEnd; ow++) {
    let ax = axis(ow, W, pf(7u));
    let c0 = u32(ax.x); let c1 = u32(ax.y);
    let top = (1.0 - ax.z) * x[row0 + c0] + ax.z * x[row0 + c1];
    let bottom = (1.0 - ax.z) * x[row1 + c0] + ax.z * x[row1 + c1];
    y[(plane * Ho + oh) * Wo + ow] = (1.0 - ay.z) * top + ay.z * bottom;
  }
}`;
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: BilinearParams, [x]: FloatArray[], [y]: FloatArray[]): void {
    check("bilinearResize", p);
    const sy = bilinearScale(p.H, p.Ho, p.coordinates), sx = bilinearScale(p.W, p.Wo, p.coordinates);
    const half = p.coordinates === "half-pixel";
    const cols = Array.from({ length: p.Wo }, (_, ow) => axisWeights(ow, p.W, sx, half));
    for (let plane = 0; plane < p.planes; plane++) {
      const base = plane * p.H * p.W;
      for (let oh = 0; oh < p.Ho; oh++) {
        const [h0, h1, ly] = axisWeights(oh, p.H, sy, half);
        for (let ow = 0; ow < p.Wo; ow++) {
          const [w0, w1, lx] = cols[ow];
          const at = (h: number, w: number) => x[base + h * p.W + w];
          y[(plane * p.Ho + oh) * p.Wo + ow] = (1 - ly) * ((1 - lx) * at(h0, w0) + lx * at(h0, w1)) +
            ly * ((1 - lx) * at(h1, w0) + lx * at(h1, w1));
        }
      }
    }
  },
};

/** g: [planes, Ho, Wo] → dx: [planes, H, W]. */
export const bilinearResizeBackward: Kernel<BilinearParams> = {
  name: "bilinearResizeBackward",

  gpu(p: BilinearParams, caps: GpuCaps): GpuDispatch {
    check("bilinearResizeBackward", p);
    const runs = Math.ceil(p.W / RUN);
    const total = p.planes * p.H * runs;
    const w = new ParamWriter().u32(total);
    writeCommon(w, p);
    w.u32(runs);
    // Inverse scales (output units per input unit) bound the candidate range; the weights themselves are
    // recomputed with the forward's arithmetic.
    const inv = (n: number, m: number) => {
      const s = bilinearScale(n, m, p.coordinates);
      return s > 0 ? 1 / s : 0;
    };
    w.f32(inv(p.H, p.Ho), inv(p.W, p.Wo));
    const source = header(["g"], ["dx"]) + WGSL_AXIS + `
/** The candidate outputs [lo, hi) that may read input index i along an axis (n inputs, m outputs). */
fn candidates(i: u32, n: u32, m: u32, inv: f32) -> vec2<u32> {
  if (inv == 0.0) { return vec2<u32>(0u, m); }
  var a: f32; var b: f32;
  if (pu(5u) == 0u) {
    a = (f32(i) - 0.5) * inv - 0.5; b = (f32(i) + 1.5) * inv - 0.5;
  } else {
    a = (f32(i) - 1.0) * inv; b = (f32(i) + 1.0) * inv;
  }
  var lo = u32(max(floor(a) - 1.0, 0.0));
  var hi = u32(min(max(ceil(b) + 2.0, 0.0), f32(m)));
  if (i <= 1u) { lo = 0u; }
  if (i + 1u >= n) { hi = m; }
  return vec2<u32>(lo, hi);
}
/** The weight output o gives to input index i along an axis. */
fn weightOf(i: u32, o: u32, n: u32, scale: f32) -> f32 {
  let a = axis(o, n, scale);
  var wgt = 0.0;
  if (u32(a.x) == i) { wgt += 1.0 - a.z; }
  if (u32(a.y) == i) { wgt += a.z; }
  return wgt;
}
${ENTRY_1D} {
  let id = linearId(wid, nwg, lid, 256u);
  if (id >= pu(0u)) { return; }
  let H = pu(1u); let W = pu(2u); let Ho = pu(3u); let Wo = pu(4u); let runs = pu(8u);
  let r = id % runs;
  let rest = id / runs;
  let h = rest % H;
  let plane = rest / H;
  let gPlane = plane * Ho * Wo;
  let rows = candidates(h, H, Ho, pf(9u));
  let w0 = r * ${RUN}u;
  let wEnd = min(w0 + ${RUN}u, W);
  for (var w = w0; w < wEnd; w++) {
    let cols = candidates(w, W, Wo, pf(10u));
    var acc = 0.0;
    for (var oh = rows.x; oh < rows.y; oh++) {
      let wy = weightOf(h, oh, H, pf(6u));
      if (wy == 0.0) { continue; }
      let rowBase = gPlane + oh * Wo;
      var line = 0.0;
      for (var ow = cols.x; ow < cols.y; ow++) {
        line += weightOf(w, ow, W, pf(7u)) * g[rowBase + ow];
      }
      acc += wy * line;
    }
    dx[(plane * H + h) * W + w] = acc;
  }
}`;
    return { source, workgroups: grid1d(total, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: BilinearParams, [g]: FloatArray[], [dx]: FloatArray[]): void {
    check("bilinearResizeBackward", p);
    const sy = bilinearScale(p.H, p.Ho, p.coordinates), sx = bilinearScale(p.W, p.Wo, p.coordinates);
    const half = p.coordinates === "half-pixel";
    dx.fill(0, 0, p.planes * p.H * p.W);
    const cols = Array.from({ length: p.Wo }, (_, ow) => axisWeights(ow, p.W, sx, half));
    for (let plane = 0; plane < p.planes; plane++) {
      const base = plane * p.H * p.W;
      for (let oh = 0; oh < p.Ho; oh++) {
        const [h0, h1, ly] = axisWeights(oh, p.H, sy, half);
        for (let ow = 0; ow < p.Wo; ow++) {
          const [w0, w1, lx] = cols[ow];
          const v = g[(plane * p.Ho + oh) * p.Wo + ow];
          dx[base + h0 * p.W + w0] += (1 - ly) * (1 - lx) * v;
          dx[base + h0 * p.W + w1] += (1 - ly) * lx * v;
          dx[base + h1 * p.W + w0] += ly * (1 - lx) * v;
          dx[base + h1 * p.W + w1] += ly * lx * v;
        }
      }
    }
  },
};
