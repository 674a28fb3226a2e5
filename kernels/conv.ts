/**
 * @file 2-D convolution, NCHW activations and OIHW weights, as three kernels that together give conv2d and
 * convTranspose2d with their gradients:
 *
 * - `conv2d`: y[n,co,oh,ow] = bias[co] + Σ_{ci,kh,kw} w[co,ci,kh,kw] · x[n,ci,oh·s−p+kh, ow·s−p+kw].
 * - `conv2dInputGrad`: dx = the adjoint of that map applied to dy (a transposed convolution), for any input size
 *   (so it is also convTranspose2d's forward, output padding included), with an optional bias over dx's channels.
 * - `conv2dWeightGrad`: dw[co,ci,kh,kw] = Σ_{n,oh,ow} dy[n,co,oh,ow] · x[n,ci,oh·s−p+kh, ow·s−p+kw].
 *
 * All three are implicit GEMMs with register blocking: an invocation owns a block of channels × positions and
 * loops over the reduction with few loads per multiply-add. Each has two variants:
 *
 * - "texture" (CPU-emulated adapters, the default there unless the convolution is tiny or its textures exceed
 *   the adapter's size): the operands are read as rgba32float textures (see `TextureInput` in types.ts) in
 *   layouts made for the loop, see the section "Texture variants" below. 16 × 16 tiles of dot products of
 *   channel quads, like the matmul texture variant; zero borders in the packed activations replace all padding
 *   logic.
 * - "registers" (GPUs, and the fallback), described next. Padding costs no branches: an out-of-range position
 *   loads from a clamped (valid) address and is masked to zero with `select`.
 *
 * Forward and input gradient (registers): the channel block is the same for a whole workgroup (so every lane reads the same
 * weights) and each lane owns up to 16 consecutive positions of one row. Along a row, the input columns that a
 * tile needs for tap kw+s are those it needed for tap kw shifted by one position, so the kernel keeps them in
 * registers as a sliding window and loads one new column per tap instead of one per position. For the input
 * gradient a lane owns input columns that are s apart (one phase of the stride): they share the taps that reach
 * them and read consecutive dy columns, so the same window works. Weights are read through element strides; when
 * the channel dimension of the tile is contiguous (the caller passes a transposed copy) and aligned, they are
 * read as vec4s.
 *
 * Weight gradient: it reduces over N·Ho·Wo and has few outputs; its rows (n, oh) can be split into `splits`
 * ranges written to separate slices of the output (summed afterwards by the caller), so that a wide GPU has
 * work. The texture variant instead lets the lanes of a workgroup share a tile and split its rows among
 * themselves (`innerSplits`), summing their parts in workgroup memory: both of llvmpipe's threads get work
 * without a second pass.
 */

import {
  type FloatArray,
  type GpuCaps,
  type GpuDispatch,
  type Kernel,
  ParamWriter,
  type TextureInput,
} from "./types.ts";
import { cachedSource } from "./source_cache.ts";
import { grid, header } from "./wgsl.ts";
import { fromQuadBuffer, quadBufferElements, type QuadLayout, quadPitch } from "./layout.ts";

/** Sizes of one convolution: x is [N, Cin, H, W], y is [N, Cout, Ho, Wo], w is [Cout, Cin, kH, kW]. */
export interface ConvGeometry {
  N: number;
  Cin: number;
  H: number;
  W: number;
  Cout: number;
  Ho: number;
  Wo: number;
  kH: number;
  kW: number;
  strideH: number;
  strideW: number;
  /** Top/left zero padding; the bottom/right padding is whatever Ho, Wo imply. */
  padH: number;
  padW: number;
}

/** Where w[co, ci, kh, kw] lives: co·co + ci·ci + (kh·kW + kw)·k elements into the buffer. */
export interface WeightStrides {
  co: number;
  ci: number;
  k: number;
}

export interface ConvParams extends ConvGeometry {
  /**
   * Forces a variant (tests run both): "texture" is the default on CPU-emulated adapters for convolutions that
   * are not tiny; a forced "texture" whose textures exceed the adapter's limit falls back to "registers".
   */
  variant?: ConvVariant;
  /** A third input: per-channel bias of the output (Cout for conv2d, Cin for the input gradient). */
  bias?: boolean;
  /** Layout of the weight buffer; OIHW (contiguous [Cout, Cin, kH, kW]) by default. */
  weightStrides?: WeightStrides;
  /**
   * Input 0 (x for conv2d, dy for conv2dInputGrad) comes as a buffer in the layout `convQuadLayout` gives,
   * written so by its producer: the texture variant then copies it instead of packing it.
   */
  quadInput?: boolean;
}

export interface ConvWeightGradParams extends ConvGeometry {
  /** As `ConvParams.variant`. */
  variant?: ConvVariant;
  /** Number of row ranges of the reduction; the output is [splits, Cout, Cin, kH, kW] (default 1). */
  splits?: number;
  /**
   * A second output, [splits, Cout]: the bias gradient Σ_{n,oh,ow} dy[n,co,oh,ow] over each split's rows. It
   * rides on the dy loads the weight gradient makes anyway, and saves the bias its own reduction pass.
   */
  biasGrad?: boolean;
  /**
   * Texture variant only: lanes of one workgroup that share each output tile, taking interleaved rows of the
   * reduction and summing their parts through workgroup memory at the end (a power of two up to 64). Default:
   * `texWeightGradInnerSplits`, enough workgroups for llvmpipe's threads without a second pass.
   */
  innerSplits?: number;
  /** x, and dy, come as buffers in the layouts `convQuadLayout` gives (as `ConvParams.quadInput`). */
  xQuad?: boolean;
  dyQuad?: boolean;
}

/** Sizes of `conv2dWeightGradSum`: `splits` slices of A (weight) and of B (bias) elements. */
export interface ConvWeightGradSumParams {
  splits: number;
  A: number;
  B: number;
}

const WG = 64;

function checkGeometry(name: string, g: ConvGeometry): void {
  const positive = ["N", "Cin", "H", "W", "Cout", "Ho", "Wo", "kH", "kW", "strideH", "strideW"] as const;
  for (const k of positive) {
    if (!Number.isInteger(g[k]) || g[k] < 1) {
      throw new Error(`${name}: ${k} must be a positive integer, got ${g[k]}`);
    }
  }
  for (const k of ["padH", "padW"] as const) {
    if (!Number.isInteger(g[k]) || g[k] < 0) {
      throw new Error(`${name}: ${k} must be a non-negative integer, got ${g[k]}`);
    }
  }
}

/** The OIHW strides of a geometry's weight. */
export function oihwStrides(g: ConvGeometry): WeightStrides {
  return { co: g.Cin * g.kH * g.kW, ci: g.kH * g.kW, k: 1 };
}

function weightStridesOf(name: string, p: ConvParams): WeightStrides {
  const s = p.weightStrides ?? oihwStrides(p);
  for (const v of [s.co, s.ci, s.k]) {
    if (!Number.isInteger(v) || v < 0) throw new Error(`${name}: bad weight stride ${v}`);
  }
  return s;
}

/** Geometry as the first 13 uniform words (see `GEOMETRY_WGSL`). */
function geometryWords(g: ConvGeometry): ParamWriter {
  return new ParamWriter().u32(g.N, g.Cin, g.H, g.W, g.Cout, g.Ho, g.Wo, g.kH, g.kW, g.strideH, g.strideW)
    .u32(g.padH, g.padW);
}

const GEOMETRY_WGSL = `let N = pu(0u); let Cin = pu(1u); let H = pu(2u); let W = pu(3u);
  let Cout = pu(4u); let Ho = pu(5u); let Wo = pu(6u); let kH = pu(7u); let kW = pu(8u);
  let sH = pu(9u); let sW = pu(10u); let pH = pu(11u); let pW = pu(12u);
  let HW = H * W; let HoWo = Ho * Wo; let KK = kH * kW; let CinKK = Cin * KK;`;

const ENTRY = `@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32)`;

/**
 * Workgroup → (channel tile `ct`, the same for all its lanes) and lane → position tile `t` (clamped; `live` is
 * false for the clamped ones, which compute but do not store).
 */
function tileMapping(tiles: string, chTiles: string): string {
  return `let tiles = ${tiles};
  let groups = (tiles + ${WG - 1}u) / ${WG}u;
  let wg = wid.x + wid.y * nwg.x;
  let ct = wg / groups;
  if (ct >= ${chTiles}) { return; }
  let t0 = (wg % groups) * ${WG}u + lid;
  let live = t0 < tiles;
  let t = min(t0, tiles - 1u);`;
}

/** Register tile edge for a dimension: the largest power of two not above the size, at most `max`. */
function tileFor(size: number, max = 8): number {
  let t = 1;
  while (t * 2 <= Math.min(size, max)) t *= 2;
  return t;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const each = (n: number, f: (i: number) => string, sep = " ") => range(n).map(f).join(sep);

/** `acc{i}_{j} += a{i} · b{j}` for the whole tile, one line per i. */
function fmaBlock(
  ti: number,
  tj: number,
  a: (i: number) => string,
  b: (j: number) => string,
  indent = "\n      ",
): string {
  return each(ti, (i) => each(tj, (j) => `acc${i}_${j} = fma(${a(i)}, ${b(j)}, acc${i}_${j});`), indent);
}

/**
 * Weight loads for a tile of `tc` channels that are the `along` index of w. Vector mode: the caller made that
 * index contiguous and everything aligned, so four channels are one vec4 load. Returns the setup lines (per-lane
 * bases), the load lines for a given extra offset, and the expression of channel i's weight.
 */
function weightAccess(tc: number, vec: boolean, along: "co" | "ci", count: string) {
  const stride = along === "co" ? "sCo" : "sCi";
  if (vec) {
    return {
      setup: each(tc / 4, (g) => `let cg${g} = min(ct * ${tc}u + ${4 * g}u, ${count} - 4u);`),
      load: (off: string) => each(tc / 4, (g) => `let w${g} = w[(cg${g} + ${off}) >> 2u];`),
      at: (i: number) => `w${i >> 2}[${i & 3}]`,
    };
  }
  return {
    setup: each(tc, (i) => `let cb${i} = min(ct * ${tc}u + ${i}u, ${count} - 1u) * ${stride};`),
    load: (off: string) => each(tc, (i) => `let w${i} = w[cb${i} + ${off}];`),
    at: (i: number) => `w${i}`,
  };
}

/** Vector weight loads need the tile's channel index contiguous and every other stride and count aligned. */
function vectorWeights(s: WeightStrides, along: "co" | "ci", channels: number, tc: number): boolean {
  const [unit, other] = along === "co" ? [s.co, s.ci] : [s.ci, s.co];
  return unit === 1 && other % 4 === 0 && s.k % 4 === 0 && channels % 4 === 0 && tc % 4 === 0;
}

function sourceHeader(inputs: string[], output: string, vec: boolean): string {
  const h = header(inputs, [output]);
  return vec ? h.replace("w: array<f32>", "w: array<vec4<f32>>") : h;
}

type Caps = Pick<GpuCaps, "isCpuEmulated">;

/**
 * Register tile limits (channels × positions). CPU-emulated adapters get 16 × 16: their loads are per-lane
 * gathers, so fewer loads per FMA win even though 256 accumulators spill (spills are plain vector moves). A real
 * GPU thread has at most ~255 registers, so it gets 8 × 4.
 */
function tileLimits(caps: Caps): { ch: number; pos: number } {
  return caps.isCpuEmulated ? { ch: 16, pos: 16 } : { ch: 8, pos: 4 };
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: a workgroup owns tc output channels; a lane owns tp consecutive output columns of one output row.

interface ForwardPlan {
  tc: number;
  tp: number;
  vec: boolean;
  /** Forward only: strideW = 1, the common case, gets a simpler loop nest. */
  unitStride?: boolean;
  colTiles: number;
  chTiles: number;
}

function forwardPlan(p: ConvParams, caps: Caps): ForwardPlan {
  const lim = tileLimits(caps);
  const tc = tileFor(p.Cout, lim.ch), tp = tileFor(p.Wo, lim.pos);
  const vec = vectorWeights(weightStridesOf("conv2d kernel", p), "co", p.Cout, tc);
  return {
    tc,
    tp,
    vec,
    colTiles: Math.ceil(p.Wo / tp),
    chTiles: Math.ceil(p.Cout / tc),
  };
}

function forwardSource({ tc, tp, vec, unitStride }: ForwardPlan, bias: boolean): string {
  const wa = weightAccess(tc, vec, "co", "Cout");
  const last = tp - 1;
  return sourceHeader(bias ? ["x", "w", "bias"] : ["x", "w"], "y", vec) + `
/** x at column iw of the row starting at base, or 0 outside the image (padding). */
fn ldx(base: u32, iw: i32, W: u32, rowOk: bool) -> f32 {
  let ok = rowOk && bitcast<u32>(iw) < W;
  return select(0.0, x[select(0u, base + bitcast<u32>(iw), ok)], ok);
}
${ENTRY} {
  ${GEOMETRY_WGSL}
  let sCo = pu(13u); let sCi = pu(14u); let sK = pu(15u);
  let colTiles = pu(16u);
  ${tileMapping("N * Ho * colTiles", "pu(17u)")}
  let cb = t % colTiles; let nr = t / colTiles; let oh = nr % Ho; let n = nr / Ho;
  let ow0 = cb * ${tp}u;
  let iw0 = i32(ow0 * sW) - i32(pW);
  let ih0 = i32(oh * sH) - i32(pH);
  let xN = n * Cin * HW;
  let isW = i32(sW);
  ${wa.setup}
  ${each(tc, (i) => each(tp, (j) => `var acc${i}_${j} = 0.0;`), "\n  ")}
  ${unitStride ? "" : "let residues = min(sW, kW);"}
  for (var kh = 0u; kh < kH; kh++) {
    let ih = ih0 + i32(kh);
    let rowOk = bitcast<u32>(ih) < H;
    let row = xN + select(0u, bitcast<u32>(ih) * W, rowOk);
    for (var ci = 0u; ci < Cin; ci++) {
      let base = row + ci * HW;
      let wci = ci * sCi + kh * kW * sK;
      // Taps kw ≡ r (mod sW) read the same columns shifted by one position per step of sW. (With sW = 1 the
      // residue loop is left out: the extra loop level alone costs a quarter of the time on llvmpipe.)
      ${unitStride ? "{ let r = 0u;" : "for (var r = 0u; r < residues; r++) {"}
        ${each(tp, (j) => `var x${j} = ldx(base, iw0 + ${j} * isW + i32(r), W, rowOk);`, "\n        ")}
        for (var kw = r; kw < kW; kw += sW) {
          ${wa.load("wci + kw * sK")}
          ${fmaBlock(tc, tp, wa.at, (j) => `x${j}`, "\n          ")}
          // Unconditional: after the last tap this loads a column that is never used (clamped, so in bounds).
          ${each(last, (j) => `x${j} = x${j + 1};`)}
          x${last} = ldx(base, iw0 + ${last} * isW + i32(kw + sW), W, rowOk);
        }
      }
    }
  }
  if (!live) { return; }
  ${forwardStore(tc, tp, bias)}
}`;
}

export const conv2d: Kernel<ConvParams> = {
  name: "conv2d",

  gpu(p: ConvParams, caps: GpuCaps): GpuDispatch {
    checkGeometry("conv2d kernel", p);
    const tex = texForwardDispatch(p, caps);
    if (tex) return tex;
    const plan = forwardPlan(p, caps);
    const s = weightStridesOf("conv2d kernel", p);
    const w = geometryWords(p).u32(s.co, s.ci, s.k, plan.colTiles, plan.chTiles);
    const groups = Math.ceil((p.N * p.Ho * plan.colTiles) / WG) * plan.chTiles;
    return {
      source: cachedSource(
        `conv2d/registers/${plan.tc}x${plan.tp}/${plan.vec}/${plan.unitStride}/${p.bias ?? false}`,
        () => forwardSource(plan, p.bias ?? false),
      ),
      workgroups: grid(groups, caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: ConvParams, [xIn, w, bias]: FloatArray[], [y]: FloatArray[]): void {
    checkGeometry("conv2d kernel", p);
    const x = unpacked(["conv2d", "x"], p, p.quadInput, xIn);
    const { N, Cin, H, W, Cout, Ho, Wo, kH, kW, strideH, strideW, padH, padW } = p;
    const s = weightStridesOf("conv2d kernel", p);
    for (let n = 0; n < N; n++) {
      for (let co = 0; co < Cout; co++) {
        for (let oh = 0; oh < Ho; oh++) {
          for (let ow = 0; ow < Wo; ow++) {
            let acc = p.bias ? bias[co] : 0;
            for (let ci = 0; ci < Cin; ci++) {
              for (let kh = 0; kh < kH; kh++) {
                const ih = oh * strideH - padH + kh;
                if (ih < 0 || ih >= H) continue;
                for (let kw = 0; kw < kW; kw++) {
                  const iw = ow * strideW - padW + kw;
                  if (iw < 0 || iw >= W) continue;
                  acc += w[co * s.co + ci * s.ci + (kh * kW + kw) * s.k] *
                    x[((n * Cin + ci) * H + ih) * W + iw];
                }
              }
            }
            y[((n * Cout + co) * Ho + oh) * Wo + ow] = acc;
          }
        }
      }
    }
  },
};

// ---------------------------------------------------------------------------------------------------------------
// Input gradient / transposed convolution: a workgroup owns tc input channels; a lane owns tp positions of one
// input row that are sW apart (one phase of the stride), which share their taps and read consecutive dy columns.

function inputGradPlan(p: ConvParams, caps: Caps): ForwardPlan {
  const perPhase = Math.ceil(p.W / p.strideW);
  const lim = tileLimits(caps);
  const tc = tileFor(p.Cin, lim.ch), tp = tileFor(perPhase, lim.pos);
  const vec = vectorWeights(weightStridesOf("conv2dInputGrad kernel", p), "ci", p.Cin, tc);
  return { tc, tp, vec, colTiles: Math.ceil(perPhase / tp), chTiles: Math.ceil(p.Cin / tc) };
}

/**
 * WGSL that stores the forward output tile `acc{i}_{j}` (rows = output channels from `ct·rows`, cols =
 * consecutive output positions from `ow0`) into y, with the optional bias; shared by both forward variants.
 */
function forwardStore(rows: number, cols: number, bias: boolean): string {
  return each(
    rows,
    (i) =>
      `{ let co = ct * ${rows}u + ${i}u;
    if (co < Cout) {
      let o = (n * Cout + co) * HoWo + oh * Wo + ow0;
      ${bias ? "let b = bias[co];" : ""}
      ${
        each(
          cols,
          (j) => `if (ow0 + ${j}u < Wo) { y[o + ${j}u] = acc${i}_${j}${bias ? " + b" : ""}; }`,
          "\n      ",
        )
      }
    }
  }`,
    "\n  ",
  );
}

/**
 * WGSL that stores the input-gradient tile `acc{i}_{j}` (rows = input channels from `ct·rows`, cols = positions
 * of one stride phase from `c0`) into dx, with the optional per-channel bias; shared by both input-grad variants.
 */
function inputGradStore(rows: number, cols: number, bias: boolean): string {
  return each(
    rows,
    (i) =>
      `{ let ci = ct * ${rows}u + ${i}u;
    if (ci < Cin) {
      let o = (n * Cin + ci) * HW + ih * W;
      ${bias ? "let b = bias[ci];" : ""}
      ${
        each(cols, (j) =>
          `{ let iw = phase + (c0 + ${j}u) * sW; if (iw < W) { dx[o + iw] = acc${i}_${j}${
            bias ? " + b" : ""
          }; } }`, "\n      ")
      }
    }
  }`,
    "\n  ",
  );
}

function inputGradSource({ tc, tp, vec }: ForwardPlan, bias: boolean): string {
  const wa = weightAccess(tc, vec, "ci", "Cin");
  return sourceHeader(bias ? ["dy", "w", "bias"] : ["dy", "w"], "dx", vec) + `
/** dy at column ow of the row starting at base, or 0 outside it. */
fn ldy(base: u32, ow: i32, Wo: u32, rowOk: bool) -> f32 {
  let ok = rowOk && bitcast<u32>(ow) < Wo;
  return select(0.0, dy[select(0u, base + bitcast<u32>(ow), ok)], ok);
}
${ENTRY} {
  ${GEOMETRY_WGSL}
  let sCo = pu(13u); let sCi = pu(14u); let sK = pu(15u);
  let colTiles = pu(16u);
  ${tileMapping("N * H * sW * colTiles", "pu(17u)")}
  let cb = t % colTiles;
  let rest = t / colTiles;
  let phase = rest % sW;
  let nh = rest / sW;
  let ih = nh % H; let n = nh / H;
  let c0 = cb * ${tp}u;
  ${wa.setup}
  ${each(tc, (i) => each(tp, (j) => `var acc${i}_${j} = 0.0;`), "\n  ")}
  let dyN = n * Cout * HoWo;
  // Position j (input column phase + (c0 + j)·sW) meets tap kw0 + m·sW at dy column q0 − m + j.
  let kw0 = (phase + pW) % sW;
  let q0 = i32((phase + pW - kw0) / sW + c0);
  // Taps kh with (ih + pH − kh) divisible by sH and ≥ 0 reach this row, from dy row (ih + pH − kh) / sH.
  for (var kh = (ih + pH) % sH; kh < kH && kh <= ih + pH; kh += sH) {
    let oh = (ih + pH - kh) / sH;
    let rowOk = oh < Ho;
    let row = dyN + select(0u, oh * Wo, rowOk);
    for (var co = 0u; co < Cout; co++) {
      let base = row + co * HoWo;
      let wco = co * sCo + kh * kW * sK;
      ${each(tp, (j) => `var d${j} = ldy(base, q0 + ${j}, Wo, rowOk);`, "\n      ")}
      var q = q0;
      for (var kw = kw0; kw < kW; kw += sW) {
        ${wa.load("wco + kw * sK")}
        ${fmaBlock(tc, tp, wa.at, (j) => `d${j}`, "\n        ")}
        q -= 1;
        ${each(tp - 1, (k) => `d${tp - 1 - k} = d${tp - 2 - k};`)}
        d0 = ldy(base, q, Wo, rowOk);
      }
    }
  }
  if (!live) { return; }
  ${inputGradStore(tc, tp, bias)}
}`;
}

export const conv2dInputGrad: Kernel<ConvParams> = {
  name: "conv2dInputGrad",

  gpu(p: ConvParams, caps: GpuCaps): GpuDispatch {
    checkGeometry("conv2dInputGrad kernel", p);
    const tex = texInputGradDispatch(p, caps);
    if (tex) return tex;
    const plan = inputGradPlan(p, caps);
    const s = weightStridesOf("conv2dInputGrad kernel", p);
    const w = geometryWords(p).u32(s.co, s.ci, s.k, plan.colTiles, plan.chTiles);
    const groups = Math.ceil((p.N * p.H * p.strideW * plan.colTiles) / WG) * plan.chTiles;
    return {
      source: cachedSource(
        `conv2dInputGrad/registers/${plan.tc}x${plan.tp}/${plan.vec}/${p.bias ?? false}`,
        () => inputGradSource(plan, p.bias ?? false),
      ),
      workgroups: grid(groups, caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  /** The reference scatters each dy element through the kernel: the transpose of conv2d's gather, written directly. */
  cpu(p: ConvParams, [dyIn, w, bias]: FloatArray[], [dx]: FloatArray[]): void {
    checkGeometry("conv2dInputGrad kernel", p);
    const dy = unpacked(["conv2dInputGrad", "dy"], p, p.quadInput, dyIn);
    const { N, Cin, H, W, Cout, Ho, Wo, kH, kW, strideH, strideW, padH, padW } = p;
    const s = weightStridesOf("conv2dInputGrad kernel", p);
    const acc = new Float64Array(N * Cin * H * W);
    for (let n = 0; n < N; n++) {
      for (let co = 0; co < Cout; co++) {
        for (let oh = 0; oh < Ho; oh++) {
          for (let ow = 0; ow < Wo; ow++) {
            const g = dy[((n * Cout + co) * Ho + oh) * Wo + ow];
            for (let ci = 0; ci < Cin; ci++) {
              for (let kh = 0; kh < kH; kh++) {
                const ih = oh * strideH - padH + kh;
                if (ih < 0 || ih >= H) continue;
                for (let kw = 0; kw < kW; kw++) {
                  const iw = ow * strideW - padW + kw;
                  if (iw < 0 || iw >= W) continue;
                  acc[((n * Cin + ci) * H + ih) * W + iw] += g *
                    w[co * s.co + ci * s.ci + (kh * kW + kw) * s.k];
                }
              }
            }
          }
        }
      }
    }
    for (let i = 0; i < acc.length; i++) dx[i] = acc[i] + (p.bias ? bias[Math.floor(i / (H * W)) % Cin] : 0);
  },
};

/** The variant a conv2d / conv2dInputGrad / conv2dWeightGrad dispatch of `p` runs on an adapter with `caps`. */
export function convVariant(
  kernel: "conv2d" | "conv2dInputGrad" | "conv2dWeightGrad",
  p: ConvParams | ConvWeightGradParams,
  caps: TexCaps,
): ConvVariant {
  const full = { ...caps, description: "", maxWorkgroupsPerDimension: 65535, maxStorageBufferBindingSize: 0 };
  const d = kernel === "conv2d"
    ? texForwardDispatch(p, { ...full, features: new Set() })
    : kernel === "conv2dInputGrad"
    ? texInputGradDispatch(p, { ...full, features: new Set() })
    : texWeightGradDispatch(p, { ...full, features: new Set() });
  return d ? "texture" : "registers";
}

/** A convolution kernel and the activation operand it reads: x (conv2d, weight gradient) or dy (the others). */
export type ConvOperand =
  | ["conv2d", "x"]
  | ["conv2dInputGrad", "dy"]
  | ["conv2dWeightGrad", "x" | "dy"];

function quadLayoutOf([kernel, operand]: ConvOperand, p: ConvParams | ConvWeightGradParams): QuadLayout {
  if (kernel === "conv2d") return texForwardPlan(p).x;
  if (kernel === "conv2dInputGrad") return texInputGradPlan(p).dy;
  return texWeightGradPlan(p)[operand];
}

/**
 * The quad layout (kernels/layout.ts) in which the texture variant of a kernel reads an operand, or null where
 * that variant does not run: a producer that writes the operand so (`quadInput`, `xQuad`, `dyQuad`) saves
 * the packing pass.
 */
export function convQuadLayout(
  which: ConvOperand,
  p: ConvParams | ConvWeightGradParams,
  caps: TexCaps,
): QuadLayout | null {
  return convVariant(which[0], p, caps) === "texture" ? quadLayoutOf(which, p) : null;
}

/** A dispatch with an operand in the quad layout can only run the texture variant. */
function quadInputRefused(kernel: string, quad: boolean | undefined): null {
  if (quad) {
    throw new Error(
      `${kernel} kernel: an input in the quad layout needs the texture variant, not available here`,
    );
  }
  return null;
}

/** An operand as a contiguous NCHW array: as given, or unpacked from its quad layout (CPU references). */
function unpacked(
  which: ConvOperand,
  p: ConvParams | ConvWeightGradParams,
  quad: boolean | undefined,
  a: FloatArray,
): FloatArray {
  if (!quad) return a;
  const l = quadLayoutOf(which, p);
  if (a.length < quadBufferElements(l)) {
    throw new Error(
      `${which[0]} kernel: ${which[1]} has ${a.length} elements, its quad layout ${quadBufferElements(l)}`,
    );
  }
  const n = l.N * l.C * l.H * l.W;
  const out = a instanceof Float64Array ? new Float64Array(n) : new Float32Array(n);
  fromQuadBuffer(l, a, out);
  return out;
}

/** Whether a conv2d / conv2dInputGrad dispatch declares vec4 storage (the registers variant only). */
export function convUsesVectorLoads(
  kernel: "conv2d" | "conv2dInputGrad",
  p: ConvParams,
  caps: TexCaps,
): boolean {
  if (convVariant(kernel, p, caps) === "texture") return false;
  return (kernel === "conv2d" ? forwardPlan(p, caps) : inputGradPlan(p, caps)).vec;
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient: an invocation owns tc output channels × tq consecutive entries of (ci, kh, kw) and loops over
// its range of rows (n, oh) and every ow.

function weightGradSource(tc: number, tq: number, bias: boolean): string {
  return header(["x", "dy"], bias ? ["dw", "db"] : ["dw"]) + `
${ENTRY} {
  ${GEOMETRY_WGSL}
  let qTiles = pu(13u); let coTiles = pu(14u); let splits = pu(15u); let rowsPerSplit = pu(16u);
  // Neighbouring lanes take neighbouring (ci, kh, kw) tiles of the same output channels. (Tying the channel tile
  // to the workgroup, as the other kernels do, leaves lanes idle here: there are few (ci, kh, kw) tiles.)
  let id = linearId(wid, nwg, lid, ${WG}u);
  if (id >= qTiles * coTiles * splits) { return; }
  let qt = id % qTiles;
  let rest = id / qTiles;
  let cot = rest % coTiles;
  let split = rest / coTiles;
  let Q = CinKK;
  // Per (ci, kh, kw) entry: its channel's offset in an image of x and its tap offset from (oh·sH, ow·sW).
  ${
    each(tq, (j) =>
      `let e${j} = min(qt * ${tq}u + ${j}u, Q - 1u); let xc${j} = (e${j} / KK) * HW;
  let dh${j} = i32((e${j} % KK) / kW) - i32(pH); let dw${j} = i32(e${j} % kW) - i32(pW);`, "\n  ")
  }
  ${each(tc, (i) => `let yc${i} = min(cot * ${tc}u + ${i}u, Cout - 1u) * HoWo;`)}
  ${each(tc, (i) => each(tq, (j) => `var acc${i}_${j} = 0.0;`), "\n  ")}
  ${bias ? each(tc, (i) => `var bacc${i} = 0.0;`) : ""}
  let r0 = split * rowsPerSplit;
  let r1 = min(r0 + rowsPerSplit, N * Ho);
  for (var r = r0; r < r1; r++) {
    let n = r / Ho; let oh = r % Ho;
    let xN = n * Cin * HW;
    let yRow = n * Cout * HoWo + oh * Wo;
    ${
    each(tq, (j) => `let ih${j} = i32(oh * sH) + dh${j}; let rowOk${j} = bitcast<u32>(ih${j}) < H;`, "\n    ")
  }
    ${each(tq, (j) => `let row${j} = xN + xc${j} + bitcast<u32>(ih${j}) * W;`)}
    ${each(tq, (j) => `var iw${j} = dw${j};`)}
    for (var ow = 0u; ow < Wo; ow++) {
      ${each(tq, (j) => `let ok${j} = rowOk${j} && bitcast<u32>(iw${j}) < W;`)}
      ${
    each(tq, (j) =>
      `let x${j} = select(0.0, x[select(0u, row${j} + bitcast<u32>(iw${j}), ok${j})], ok${j});`, "\n      ")
  }
      ${each(tc, (i) => `let d${i} = dy[yRow + yc${i} + ow];`)}
      ${fmaBlock(tc, tq, (i) => `d${i}`, (j) => `x${j}`)}
      ${bias ? each(tc, (i) => `bacc${i} += d${i};`) : ""}
      ${each(tq, (j) => `iw${j} += i32(sW);`)}
    }
  }
  ${
    each(
      tc,
      (i) =>
        `{ let co = cot * ${tc}u + ${i}u;
    if (co < Cout) {
      let base = (split * Cout + co) * Q + qt * ${tq}u;
      ${each(tq, (j) => `if (qt * ${tq}u + ${j}u < Q) { dw[base + ${j}u] = acc${i}_${j}; }`, "\n      ")}
      ${bias ? `if (qt == 0u) { db[split * Cout + co] = bacc${i}; }` : ""}
    }
  }`,
      "\n  ",
    )
  }
}`;
}

function weightGradTiles(g: ConvGeometry, caps: Caps): { tc: number; tq: number } {
  const lim = tileLimits(caps);
  return { tc: tileFor(g.Cout, lim.ch), tq: tileFor(g.Cin * g.kH * g.kW, lim.ch) };
}

/**
 * A split count for the weight gradient on an adapter: enough invocations to keep it busy (a few workgroups per
 * core on a CPU-emulated adapter, tens of thousands on a GPU), keeping at least `minRowsPerSplit` rows (n, oh)
 * of reduction in each split.
 */
export function weightGradSplits(g: ConvGeometry, caps: TexCaps, minRowsPerSplit = 4): number {
  let targetInvocations: number, invocations: number;
  if (convVariant("conv2dWeightGrad", g, caps) === "texture") {
    // Its workgroups split the rows among their own lanes (innerSplits) and sum the parts themselves: no second
    // pass. Without inner splits (GLSL), about sixteen workgroups of outer splits.
    if (!caps.glsl) return 1;
    const plan = texWeightGradPlan(g);
    targetInvocations = 16 * WG;
    invocations = plan.ciTiles * g.kH * g.kW * plan.coTiles;
  } else {
    targetInvocations = caps.isCpuEmulated ? 256 : 65536;
    const { tc, tq } = weightGradTiles(g, caps);
    invocations = Math.ceil(g.Cout / tc) * Math.ceil((g.Cin * g.kH * g.kW) / tq);
  }
  const byWork = Math.floor((g.N * g.Ho) / minRowsPerSplit);
  return Math.max(1, Math.min(Math.floor(targetInvocations / invocations), byWork, 256));
}

/**
 * Per-thread time of the texture weight gradient on llvmpipe, in ns, fitted by non-negative least squares to 240
 * replayed dispatches (every weight-gradient shape of the default and bench training steps at S = 1…32, median
 * of three runs of ten; median error 9%): each row step of a lane costs `load`·(tm + tn) for its texel loads and
 * `mac`·tm·tn for its multiply-adds; with inner splits, each value a lane hands to the inner sum costs `sum`
 * (tm·tn weights and tm bias sums: every weight gradient of the fitted steps had a bias, and the choice counts
 * them with or without one).
 */
const WEIGHT_GRAD_NS = { load: 0.31, mac: 0.33, sum: 7.7 };

/**
 * Inner splits of the texture weight gradient (see `ConvWeightGradParams.innerSplits`): none where shaders reach
 * the driver as GLSL (`GpuCaps.glsl`: compiling the workgroup array's zero-initialisation took 79 s there);
 * otherwise the S (a power of two up to 32) that minimises the modelled time of the busiest llvmpipe thread
 * (`WEIGHT_GRAD_NS`; workgroups dealt to `GpuCaps.cpuThreads` threads): more splits share a tile's rows among
 * more lanes and fill more workgroups, but every split lane pays for the inner sum. Against the earlier rule (the
 * fewest splits giving about sixteen workgroups, at most 16), on a second replay not used in the fit: the bench
 * step's weight gradients 187 ms instead of 205, the default step's 58.8 instead of 62.4 (the best S of each
 * shape measured alone: 177 and 56.8).
 */
export function texWeightGradInnerSplits(g: ConvGeometry, caps: TexCaps, splits = 1): number {
  if (caps.glsl) return 1;
  const plan = texWeightGradPlan(g);
  const tiles = plan.ciTiles * g.kH * g.kW * plan.coTiles * splits;
  const rows = Math.ceil((g.N * g.Ho) / splits);
  const quads = Math.ceil(g.Wo / 4);
  const threads = caps.cpuThreads ?? 2;
  const { load, mac, sum } = WEIGHT_GRAD_NS;
  const step = load * (plan.tm + plan.tn) + mac * plan.tm * plan.tn;
  let best = 1, bestNs = Infinity;
  for (let S = 1; S <= 32 && S <= rows; S *= 2) {
    const lanes = Math.ceil(Math.ceil((tiles * S) / WG) / threads) * WG;
    const ns = lanes *
      (Math.ceil(rows / S) * quads * step + (S > 1 ? sum * (plan.tm * plan.tn + plan.tm) : 0));
    if (ns < bestNs) [best, bestNs] = [S, ns];
  }
  return best;
}

function splitsOf(p: ConvWeightGradParams): { splits: number; rowsPerSplit: number } {
  const rows = p.N * p.Ho;
  const requested = p.splits ?? 1;
  if (!Number.isInteger(requested) || requested < 1) {
    throw new Error(`conv2dWeightGrad kernel: bad splits ${p.splits}`);
  }
  const rowsPerSplit = Math.ceil(rows / Math.min(requested, rows));
  // Every split gets at least one row; the output still has `requested` slices (trailing ones are zero).
  return { splits: requested, rowsPerSplit };
}

export const conv2dWeightGrad: Kernel<ConvWeightGradParams> = {
  name: "conv2dWeightGrad",

  gpu(p: ConvWeightGradParams, caps: GpuCaps): GpuDispatch {
    checkGeometry("conv2dWeightGrad kernel", p);
    const tex = texWeightGradDispatch(p, caps);
    if (tex) return tex;
    const { splits, rowsPerSplit } = splitsOf(p);
    const Q = p.Cin * p.kH * p.kW;
    const { tc, tq } = weightGradTiles(p, caps);
    const qTiles = Math.ceil(Q / tq), coTiles = Math.ceil(p.Cout / tc);
    const w = geometryWords(p).u32(qTiles, coTiles, splits, rowsPerSplit);
    const bias = p.biasGrad ?? false;
    return {
      source: cachedSource(
        `conv2dWeightGrad/registers/${tc}x${tq}/${bias}`,
        () => weightGradSource(tc, tq, bias),
      ),
      workgroups: grid(Math.ceil((qTiles * coTiles * splits) / WG), caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: ConvWeightGradParams, [xIn, dyIn]: FloatArray[], [dw, db]: FloatArray[]): void {
    checkGeometry("conv2dWeightGrad kernel", p);
    const x = unpacked(["conv2dWeightGrad", "x"], p, p.xQuad, xIn);
    const dy = unpacked(["conv2dWeightGrad", "dy"], p, p.dyQuad, dyIn);
    const { N, Cin, H, W, Cout, Ho, Wo, kH, kW, strideH, strideW, padH, padW } = p;
    const { splits, rowsPerSplit } = splitsOf(p);
    const Q = Cin * kH * kW;
    for (let split = 0; split < splits; split++) {
      const r0 = split * rowsPerSplit, r1 = Math.min(r0 + rowsPerSplit, N * Ho);
      for (let co = 0; co < Cout; co++) {
        if (p.biasGrad) {
          let s = 0;
          for (let r = r0; r < r1; r++) {
            const n = Math.floor(r / Ho), oh = r % Ho;
            for (let ow = 0; ow < Wo; ow++) s += dy[((n * Cout + co) * Ho + oh) * Wo + ow];
          }
          db[split * Cout + co] = s;
        }
        for (let ci = 0; ci < Cin; ci++) {
          for (let kh = 0; kh < kH; kh++) {
            for (let kw = 0; kw < kW; kw++) {
              let s = 0;
              for (let r = r0; r < r1; r++) {
                const n = Math.floor(r / Ho), oh = r % Ho;
                const ih = oh * strideH - padH + kh;
                if (ih < 0 || ih >= H) continue;
                for (let ow = 0; ow < Wo; ow++) {
                  const iw = ow * strideW - padW + kw;
                  if (iw < 0 || iw >= W) continue;
                  s += dy[((n * Cout + co) * Ho + oh) * Wo + ow] * x[((n * Cin + ci) * H + ih) * W + iw];
                }
              }
              dw[(split * Cout + co) * Q + (ci * kH + kh) * kW + kw] = s;
            }
          }
        }
      }
    }
  },
};

// ---------------------------------------------------------------------------------------------------------------
// Texture variants (CPU-emulated adapters). Activations are packed "channel-quad": texel (c·Wp + w', n·Hp + h')
// holds channels 4c..4c+3 at padded position (h', w') of image n, with zero borders, so padding costs nothing
// in the loop; weights are packed into panels: texel (q·T + i, block·KK + tap) holds four channels q of row
// channel block·T + i at that tap. Every step of a kernel's inner loop then reads T + T' neighbouring texels for
// 4·T·T' multiply-adds (dot products of channel quads), as in the matmul texture variant.
//
// Tried and not kept (Mesa 22.3 lavapipe, 2-core AMD EPYC; interleaved runs in one process, 7 rounds):
// - Winograd F(2×2, 3×3) fused into the forward (U = G·g·G^T made by the panel's packing pass, B^T·d·B from
//   4 × (2·nt + 2) texels per channel quad in registers, 16·tm·nt accumulators): the best blocking (16 × 4)
//   ran the bench training step's 47 forward convolutions in 119.5 ms against 128.8 (8 × 4: 128.9), not the
//   2.25× its multiply count promises; reading U from a storage buffer instead was 2.5–8× slower (one replay of
//   the step, not interleaved). A staged Winograd would write 4× the activation between passes (estimated from
//   the packing cost per texel, not built): more than it saves at 32–64 channels.
// - The stride-1 input gradient as this forward of dy with the kernel flipped and its channel axes swapped (the
//   same dy layout): 243.9 ms against 244.2 for the step's 46 input gradients, plus a second weight pack.
// - A window over the row (the tn + 2 texels of a channel quad loaded once for the three taps kw): 165.5 ms
//   against 164.9 (CPU 266 against 248) for the step's forward convolutions.

/**
 * The second stage of a split weight gradient: out0[e] = Σ_s in0[s·A + e] (the weight) and out1[e] = Σ_s
 * in1[s·B + e] (the bias), one invocation per output element, in one pass for both.
 */
export const conv2dWeightGradSum: Kernel<ConvWeightGradSumParams> = {
  name: "conv2dWeightGradSum",

  gpu(p: ConvWeightGradSumParams, caps: GpuCaps): GpuDispatch {
    checkSumParams(p);
    return {
      source: cachedSource("conv2dWeightGradSum", () =>
        header(["a", "b"], ["da", "db"]) + `
${ENTRY} {
  let S = pu(0u); let A = pu(1u); let B = pu(2u);
  let e = linearId(wid, nwg, lid, ${WG}u);
  if (e >= A + B) { return; }
  var s = 0.0;
  if (e < A) {
    for (var k = 0u; k < S; k++) { s += a[k * A + e]; }
    da[e] = s;
  } else {
    let f = e - A;
    for (var k = 0u; k < S; k++) { s += b[k * B + f]; }
    db[f] = s;
  }
}`),
      workgroups: grid(Math.ceil((p.A + p.B) / WG), caps.maxWorkgroupsPerDimension),
      params: new ParamWriter().u32(p.splits, p.A, p.B).finish(),
    };
  },

  cpu(p: ConvWeightGradSumParams, [a, b]: FloatArray[], [da, db]: FloatArray[]): void {
    checkSumParams(p);
    for (let e = 0; e < p.A; e++) {
      let s = 0;
      for (let k = 0; k < p.splits; k++) s += a[k * p.A + e];
      da[e] = s;
    }
    for (let e = 0; e < p.B; e++) {
      let s = 0;
      for (let k = 0; k < p.splits; k++) s += b[k * p.B + e];
      db[e] = s;
    }
  },
};

function checkSumParams(p: ConvWeightGradSumParams) {
  for (const [k, v] of Object.entries(p)) {
    if (!Number.isInteger(v) || v < (k === "splits" ? 1 : 0)) {
      throw new Error(`conv2dWeightGradSum kernel: bad ${k} ${v}`);
    }
  }
}

export type ConvVariant = "registers" | "texture";

/** Register tile edge of the texture variants (256 accumulators, as in matmul). */
const TEX_TILE = 16;
/** Below this many multiply-adds the packing passes cost more than they save. */
const TEX_MIN_WORK = 1 << 18;

type TexCaps = Pick<GpuCaps, "isCpuEmulated" | "maxTextureDimension2D" | "glsl" | "cpuThreads">;

const quadSize = (l: QuadLayout) => ({ width: Math.ceil(l.C / 4) * l.Wp, height: l.N * l.Hp });

/** Packs a contiguous NCHW activation into the channel-quad layout. Words: C, H, W, Hp, Wp, top, left. */
const QUAD_PACK = `fn texel(x: u32, y: u32) -> vec4<f32> {
  let C = pu(0u); let H = pu(1u); let W = pu(2u);
  let nh = divmod(y, pu(3u)); let cw = divmod(x, pu(4u));
  let n = nh.x; let h = i32(nh.y) - pi(5u);
  let cq = cw.x; let w = i32(cw.y) - pi(6u);
  let inside = h >= 0 && h < i32(H) && w >= 0 && w < i32(W);
  let c = vec4<u32>(4u * cq) + vec4<u32>(0u, 1u, 2u, 3u);
  let i = (vec4<i32>(i32(n * C)) + vec4<i32>(c)) * i32(H * W) + vec4<i32>(h * i32(W) + w);
  let idx = select(vec4<i32>(-1), i, (c < vec4<u32>(C)) & vec4<bool>(inside));
  return vec4<f32>(srcAt(idx.x), srcAt(idx.y), srcAt(idx.z), srcAt(idx.w));
}`;

function quadTexture(input: number, l: QuadLayout): TextureInput {
  const params = new ParamWriter().u32(l.C, l.H, l.W, l.Hp, l.Wp, l.top, l.left).finish();
  return { input, ...quadSize(l), pack: QUAD_PACK, params };
}

/** An input already in the quad layout (rows of `quadPitch` texels): a flat copy, no packing pass. */
function quadBufferTexture(input: number, l: QuadLayout): TextureInput {
  return { input, width: quadPitch(l), height: l.N * l.Hp };
}

/**
 * Weight panels: texel (q·T + i, block·KK + tap) = w[row channel block·T + i, quad channels 4q..4q+3, tap],
 * zero past the channel counts. Words: rows, quads' channel count, KK, row stride, quad stride, tap stride.
 */
function panelPackSource(tile: number): string {
  return `const TILE = ${tile}u;
fn texel(x: u32, y: u32) -> vec4<f32> {
  let rows = pu(0u); let Q = pu(1u);
  let bt = divmod(y, pu(2u)); let tap = bt.y;
  let r = bt.x * TILE + x % TILE;
  let q = vec4<u32>(4u * (x / TILE)) + vec4<u32>(0u, 1u, 2u, 3u);
  let i = vec4<i32>(i32(r * pu(3u) + tap * pu(5u))) + vec4<i32>(q) * pi(4u);
  let idx = select(vec4<i32>(-1), i, (q < vec4<u32>(Q)) & vec4<bool>(r < rows));
  return vec4<f32>(srcAt(idx.x), srcAt(idx.y), srcAt(idx.z), srcAt(idx.w));
}`;
}

/**
 * Panels of the weight with output channels as tile rows and input channels in texel quads: the forward reads
 * them, and the input gradient reads the same (see texInputGradSource), so one pack serves both.
 */
function panelTexture(input: number, p: ConvParams, tile: number): TextureInput {
  const s = weightStridesOf("conv kernel", p), KK = p.kH * p.kW;
  const params = new ParamWriter().u32(p.Cout, p.Cin, KK, s.co, s.ci, s.k).finish();
  return {
    input,
    width: Math.ceil(p.Cin / 4) * tile,
    height: Math.ceil(p.Cout / tile) * KK,
    pack: cachedSource(`conv/panelPack/${tile}`, () => panelPackSource(tile)),
    params,
  };
}

const fits = (caps: TexCaps, ...ts: { width: number; height: number }[]) =>
  ts.every((t) =>
    t.width <= (caps.maxTextureDimension2D ?? 0) && t.height <= (caps.maxTextureDimension2D ?? 0)
  );

/** Whether the texture variant applies: asked for (or the default on CPU-emulated adapters) and fits. */
function wantsTexture(
  variant: ConvVariant | undefined,
  g: ConvGeometry,
  caps: TexCaps,
  ...ts: { width: number; height: number }[]
): boolean {
  const work = g.N * g.Cout * g.Ho * g.Wo * g.Cin * g.kH * g.kW;
  const wanted = variant ?? (caps.isCpuEmulated && work >= TEX_MIN_WORK ? "texture" : "registers");
  return wanted === "texture" && fits(caps, ...ts);
}

/** Largest power of two not above `size`, between `min` (4: fewer distinct sources to compile) and the texture tile. */
const texTile = (size: number, min = 4) => Math.max(min, tileFor(size, TEX_TILE));

const accDecl = (tm: number, tn: number) =>
  each(tm, (i) => each(tn, (j) => `var acc${i}_${j} = 0.0;`), "\n  ");
const dotBlock = (tm: number, tn: number) =>
  each(tm, (i) => each(tn, (j) => `acc${i}_${j} += dot(w${i}, v${j});`), "\n          ");

// Forward ---------------------------------------------------------------------------------------------------------

interface TexForwardPlan {
  tm: number;
  tn: number;
  x: QuadLayout;
  colTiles: number;
  chTiles: number;
}

function texForwardPlan(p: ConvParams): TexForwardPlan {
  const tm = texTile(p.Cout), tn = texTile(p.Wo);
  const x: QuadLayout = {
    C: p.Cin,
    H: p.H,
    W: p.W,
    N: p.N,
    top: p.padH,
    left: p.padW,
    Hp: Math.max(p.H + p.padH, (p.Ho - 1) * p.strideH + p.kH),
    Wp: Math.max(p.W + p.padW, (p.Wo - 1) * p.strideW + p.kW),
  };
  return {
    tm,
    tn,
    x,
    colTiles: Math.ceil(p.Wo / tn),
    chTiles: Math.ceil(p.Cout / tm),
  };
}

function texForwardSource({ tm, tn }: TexForwardPlan, bias: boolean): string {
  // (A sliding window over the taps of a row, as the registers variant keeps, measured slower here: the window
  // shifts are masked register moves on llvmpipe.)
  const taps = `for (var kw = 0u; kw < kW; kw++) {
      let wy = i32(ct * KK + kh * kW + kw);
      for (var q = 0u; q < CinQ; q++) {
        let wx = i32(q * ${tm}u); let xx = i32(q * Wp + kw);
        ${each(tm, (i) => `let w${i} = textureLoad(w, vec2<i32>(wx + ${i}, wy));`)}
        ${each(tn, (j) => `let v${j} = textureLoad(x, vec2<i32>(xx + u${j}, row));`)}
        ${dotBlock(tm, tn)}
      }
    }`;
  return header(bias ? ["x", "w", "bias"] : ["x", "w"], ["y"], "f32", [0, 1]) + `
${ENTRY} {
  ${GEOMETRY_WGSL}
  let colTiles = pu(13u); let Hp = pu(15u); let Wp = pu(16u); let CinQ = (Cin + 3u) / 4u;
  ${tileMapping("N * Ho * colTiles", "pu(14u)")}
  let cb = t % colTiles; let nr = t / colTiles; let oh = nr % Ho; let n = nr / Ho;
  let ow0 = cb * ${tn}u;
  // Padded input column of position j at tap 0 (positions past the edge are clamped and not stored).
  ${each(tn, (j) => `let u${j} = i32(min(ow0 + ${j}u, Wo - 1u) * sW);`)}
  ${accDecl(tm, tn)}
  for (var kh = 0u; kh < kH; kh++) {
    let row = i32(n * Hp + oh * sH + kh);
    ${taps}
  }
  if (!live) { return; }
  ${forwardStore(tm, tn, bias)}
}`;
}

function texForwardDispatch(p: ConvParams, caps: GpuCaps): GpuDispatch | null {
  const plan = texForwardPlan(p);
  const x = p.quadInput ? quadBufferTexture(0, plan.x) : quadTexture(0, plan.x);
  const textures = [x, panelTexture(1, p, plan.tm)];
  if (!wantsTexture(p.variant, p, caps, ...textures)) return quadInputRefused("conv2d", p.quadInput);
  const w = geometryWords(p).u32(plan.colTiles, plan.chTiles, plan.x.Hp, plan.x.Wp);
  const groups = Math.ceil((p.N * p.Ho * plan.colTiles) / WG) * plan.chTiles;
  return {
    source: cachedSource(
      `conv2d/texture/${plan.tm}x${plan.tn}/${p.bias ?? false}`,
      () => texForwardSource(plan, p.bias ?? false),
    ),
    workgroups: grid(groups, caps.maxWorkgroupsPerDimension),
    params: w.finish(),
    textures,
  };
}

// Input gradient ------------------------------------------------------------------------------------------------

function texInputGradPlan(p: ConvParams) {
  const perPhase = Math.ceil(p.W / p.strideW);
  const tm = texTile(p.Cin), tn = texTile(perPhase);
  // dy rows (oh) and columns (ow) that valid dx positions reach, with zero borders around dy.
  const top = Math.max(0, Math.ceil((p.kH - 1 - p.padH) / p.strideH));
  const left = Math.max(0, Math.ceil((p.kW - 1 - p.padW) / p.strideW));
  const dy: QuadLayout = {
    C: p.Cout,
    H: p.Ho,
    W: p.Wo,
    N: p.N,
    top,
    left,
    Hp: top + Math.max(p.Ho, Math.floor((p.H - 1 + p.padH) / p.strideH) + 1),
    Wp: left + Math.max(p.Wo, Math.floor((p.W - 1 + p.padW) / p.strideW) + 1),
  };
  return { tm, tn, dy, colTiles: Math.ceil(perPhase / tn), chTiles: Math.ceil(p.Cin / tm) };
}

/**
 * The weight is read in the forward's panels (rows: output channels in tiles of `tf`, texel quads: input
 * channels), so the texture the forward packed serves here too. A step over one dy channel quad loads, for each
 * input-channel quad g of the tile, the four texels of that co quad: m{g}_{k} = w[co = 4q + k, ci quad g], and
 * acc(4g + c)_j += Σ_k m{g}_{k}[c] · dy_j[k], the same multiply-adds per load as dot products of ci rows.
 */
function texInputGradSource(tm: number, tn: number, bias: boolean, tf: number): string {
  const loads = each(
    tm / 4,
    (g) => each(4, (k) => `let m${g}_${k} = textureLoad(w, vec2<i32>(wx${g} + ${k}, wy));`),
    "\n        ",
  );
  const fmas = each(
    tm,
    (i) =>
      each(
        tn,
        (j) =>
          `acc${i}_${j} += ${range(4).map((k) => `m${i >> 2}_${k}[${i & 3}] * v${j}[${k}]`).join(" + ")};`,
      ),
    "\n          ",
  );
  return header(bias ? ["dy", "w", "bias"] : ["dy", "w"], ["dx"], "f32", [0, 1]) + `
${ENTRY} {
  ${GEOMETRY_WGSL}
  let colTiles = pu(13u); let Hp = pu(15u); let Wp = pu(16u); let top = pu(17u); let left = pu(18u);
  let CoutQ = (Cout + 3u) / 4u;
  ${tileMapping("N * H * sW * colTiles", "pu(14u)")}
  let cb = t % colTiles;
  let rest = t / colTiles;
  let phase = rest % sW;
  let nh = rest / sW;
  let ih = nh % H; let n = nh / H;
  let c0 = cb * ${tn}u;
  // Position j (input column phase + (c0 + j)·sW) meets tap kw0 + m·sW at dy column q0 − m + j.
  let kw0 = (phase + pW) % sW;
  let q0 = i32((phase + pW - kw0) / sW + c0 + left);
  ${accDecl(tm, tn)}
  // Taps kh ≡ ih + pH (mod sH) reach this row, from dy row (ih + pH − kh) / sH (in the border when outside).
  for (var kh = (ih + pH) % sH; kh < kH; kh += sH) {
    let row = i32(n * Hp + top) + (i32(ih + pH) - i32(kh)) / i32(sH);
    for (var kw = kw0; kw < kW; kw += sW) {
      let tap = kh * kW + kw;
      let qb = q0 - i32((kw - kw0) / sW);
      for (var q = 0u; q < CoutQ; q++) {
        // Panel row block and the column of co = 4q within it.
        let wy = i32((4u * q / ${tf}u) * KK + tap); let wc = i32(4u * q % ${tf}u);
        ${each(tm / 4, (g) => `let wx${g} = i32((ct * ${tm / 4}u + ${g}u) * ${tf}u) + wc;`)}
        let xx = i32(q * Wp) + qb;
        ${loads}
        ${each(tn, (j) => `let v${j} = textureLoad(dy, vec2<i32>(xx + ${j}, row));`)}
        ${fmas}
      }
    }
  }
  if (!live) { return; }
  ${inputGradStore(tm, tn, bias)}
}`;
}

function texInputGradDispatch(p: ConvParams, caps: GpuCaps): GpuDispatch | null {
  const plan = texInputGradPlan(p);
  // The forward's weight panels (its tile over Cout), packed once for both.
  const tf = texTile(p.Cout);
  const dy = p.quadInput ? quadBufferTexture(0, plan.dy) : quadTexture(0, plan.dy);
  const textures = [dy, panelTexture(1, p, tf)];
  if (!wantsTexture(p.variant, p, caps, ...textures)) return quadInputRefused("conv2dInputGrad", p.quadInput);
  const w = geometryWords(p).u32(
    plan.colTiles,
    plan.chTiles,
    plan.dy.Hp,
    plan.dy.Wp,
    plan.dy.top,
    plan.dy.left,
  );
  const groups = Math.ceil((p.N * p.H * p.strideW * plan.colTiles) / WG) * plan.chTiles;
  return {
    source: cachedSource(
      `conv2dInputGrad/texture/${plan.tm}x${plan.tn}/${p.bias ?? false}/${tf}`,
      () => texInputGradSource(plan.tm, plan.tn, p.bias ?? false, tf),
    ),
    workgroups: grid(groups, caps.maxWorkgroupsPerDimension),
    params: w.finish(),
    textures,
  };
}

// Weight gradient -----------------------------------------------------------------------------------------------

function texWeightGradPlan(g: ConvGeometry) {
  // Channels travel in texel quads on both sides: tiles are multiples of four (as texTile gives).
  const tm = texTile(g.Cout), tn = texTile(g.Cin);
  const WoQ = Math.ceil(g.Wo / 4);
  // Where every position quad is whole, the input gradient's layout of dy (its packed texture is reused);
  // otherwise one whose columns past Wo, up to the last quad, are zeros.
  const dy: QuadLayout = g.Wo % 4 === 0
    ? texInputGradPlan({ ...g, bias: false }).dy
    : { C: g.Cout, H: g.Ho, W: g.Wo, N: g.N, top: 0, left: 0, Hp: g.Ho, Wp: 4 * WoQ };
  const x: QuadLayout = {
    C: g.Cin,
    H: g.H,
    W: g.W,
    N: g.N,
    top: g.padH,
    left: g.padW,
    Hp: Math.max(g.H + g.padH, (g.Ho - 1) * g.strideH + g.kH),
    // Positions up to the last whole quad of dy (zeros there) still read x in bounds.
    Wp: Math.max(g.W + g.padW, (4 * WoQ - 1) * g.strideW + g.kW),
  };
  return { tm, tn, dy, x, ciTiles: Math.ceil(g.Cin / tn), coTiles: Math.ceil(g.Cout / tm) };
}

/**
 * dy is read in a channel-quad packing (a texel is four channels at one position), whose layout (words 20–23)
 * is the input gradient's where Wo is a multiple of four, so the texture the input gradient packed serves here
 * too (measured on the default training step: 259.9 → 251.5 ms against a flat copy of dy of its own).
 */
function texWeightGradSource(tm: number, tn: number, bias: boolean, S: number): string {
  const dAt = (p: number, i: number) => `d${p}_${i >> 2}[${i & 3}]`;
  const xAt = (p: number, j: number) => `v${p}_${j >> 2}[${j & 3}]`;
  const dySetup = `// Texture columns of the tile's dy channel quads (in dy's padded layout: words 20–23).
  let dyHp = pu(20u); let dyWp = pu(21u); let dyTop = pu(22u); let dyLeft = pu(23u);
  ${each(tm / 4, (g) => `let dc${g} = i32((cot * ${tm / 4}u + ${g}u) * dyWp + dyLeft);`)}`;
  const dyLoads = `let dRow = i32(n * dyHp + dyTop + oh);
      ` + each(
    4,
    (p) =>
      each(
        tm / 4,
        (g) => `let d${p}_${g} = textureLoad(dy, vec2<i32>(dc${g} + i32(oq * 4u + ${p}u), dRow));`,
      ),
    "\n      ",
  );
  // Bias sums per channel quad.
  const biasAdds = bias ? each(tm / 4, (g) => `bv${g} += d0_${g} + d1_${g} + d2_${g} + d3_${g};`) : "";
  const T = WG / S;
  const innerSum = S > 1 ? innerSumWgsl(tm, tn, bias, S) : "";
  const directStores = S > 1 ? "" : directStoresWgsl(tm, tn, bias);
  return header(["x", "dy"], bias ? ["dw", "db"] : ["dw"], "f32", [0, 1]) +
    (S > 1 ? `var<workgroup> red: array<f32, ${SUM_ROUND * WG}>;\n` : "") + `
${ENTRY} {
  ${GEOMETRY_WGSL}
  let Hp = pu(13u); let Wp = pu(14u); let Wq = pu(15u); let ciTiles = pu(16u); let coTiles = pu(17u);
  let splits = pu(18u); let rowsPerSplit = pu(19u);
  // Neighbouring invocations take neighbouring (ci tile, tap) pairs of the same output channels: they read the
  // same dy texels. With inner splits, lane lid works on tile lid % T of the workgroup's T, rows ≡ lid / T.
  let per = ciTiles * KK;
  let total = per * coTiles * splits;
  let wgi = wid.x + wid.y * nwg.x;
  let id0 = wgi * ${T}u + lid % ${T}u;
  let live = id0 < total;
  let id = min(id0, total - 1u);
  let e = id % per; let rest = id / per;
  let cot = rest % coTiles; let split = rest / coTiles;
  let tap = e % KK; let cit = e / KK;
  let kh = tap / kW; let kw = tap % kW;
  // Texture columns of the tile's x channel quads at tap kw.
  ${each(tn / 4, (g) => `let xc${g} = i32((cit * ${tn / 4}u + ${g}u) * Wp + kw);`)}
  ${dySetup}
  ${accDecl(tm, tn)}
  ${bias ? each(tm / 4, (i) => `var bv${i} = vec4<f32>(0.0);`) : ""}
  let r0 = split * rowsPerSplit;
  let r1 = min(r0 + rowsPerSplit, N * Ho);
  for (var r = r0 + lid / ${T}u; r < r1; r += ${S}u) {
    let n = r / Ho; let oh = r % Ho;
    let xRow = i32(n * Hp + oh * sH + kh);
    for (var oq = 0u; oq < Wq; oq++) {
      // Four positions per step; dy is zero past Wo.
      ${dyLoads}
      ${
    each(
      4,
      (p) =>
        each(
          tn / 4,
          (g) => `let v${p}_${g} = textureLoad(x, vec2<i32>(xc${g} + i32((oq * 4u + ${p}u) * sW), xRow));`,
        ),
      "\n      ",
    )
  }
      ${
    each(
      tm,
      (i) =>
        each(tn, (j) => `acc${i}_${j} += ${range(4).map((p) => `${dAt(p, i)} * ${xAt(p, j)}`).join(" + ")};`),
      "\n      ",
    )
  }
      ${biasAdds}
    }
  }
  ${
    S > 1 ? innerSum : `if (!live) { return; }
  ${directStores}`
  }
}`;
}

/**
 * Accumulator values per lane in each round of the inner sum (workgroup memory: SUM_ROUND · 64 floats). Fewer
 * per round means more barriers: 4 or 8 ran up to 1.7× slower than 64 on the bench's 64→64 32×32 shape.
 */
const SUM_ROUND = 64;

/**
 * The end of an inner-split weight gradient: each lane's accumulators (the tile's tm·tn, then its tm bias sums),
 * SUM_ROUND at a time through workgroup memory, summed over the S lanes that share a tile and stored. A lane
 * sums and stores values of its own tile (o ≡ lid mod T), so the store reuses the tile's channels and tap from
 * the top of the kernel instead of recomputing them per value from the tile index (eight integer divisions).
 */
function innerSumWgsl(tm: number, tn: number, bias: boolean, S: number): string {
  const T = WG / S;
  const values = [
    ...range(tm * tn).map((k) => `acc${Math.floor(k / tn)}_${k % tn}`),
    ...(bias ? range(tm).map((i) => `bv${i >> 2}[${i & 3}]`) : []),
  ];
  const rounds: string[] = [];
  for (let r0 = 0; r0 < values.length; r0 += SUM_ROUND) {
    const part = values.slice(r0, r0 + SUM_ROUND);
    rounds.push(`${part.map((v, k) => `red[${k * WG}u + lid] = ${v};`).join(" ")}
  workgroupBarrier();
  for (var o = lid; o < ${part.length * T}u; o += ${WG}u) {
    let kk = o / ${T}u;
    var v = 0.0;
    for (var q = 0u; q < ${S}u; q++) { v += red[kk * ${WG}u + lid % ${T}u + q * ${T}u]; }
    let k = ${r0}u + kk;
    if (live) { ${storeValueWgsl(tm, tn, bias)} }
  }
  workgroupBarrier();`);
  }
  return rounds.join("\n  ");
}

/** WGSL statements that store `v`, value `k` of the lane's own tile (see innerSumWgsl), into dw or db. */
function storeValueWgsl(tm: number, tn: number, bias: boolean): string {
  return `if (k < ${tm * tn}u) {
      let co = cot * ${tm}u + k / ${tn}u; let ci = cit * ${tn}u + k % ${tn}u;
      if (co < Cout && ci < Cin) { dw[((split * Cout + co) * Cin + ci) * KK + tap] = v; }
    }${
    bias
      ? ` else {
      let co = cot * ${tm}u + k - ${tm * tn}u;
      if (e == 0u && co < Cout) { db[split * Cout + co] = v; }
    }`
      : ""
  }`;
}

function directStoresWgsl(tm: number, tn: number, bias: boolean): string {
  const biasOf = (i: number) => `bv${i >> 2}[${i & 3}]`;
  return `${
    each(
      tm,
      (i) =>
        `{ let co = cot * ${tm}u + ${i}u;
    if (co < Cout) {
      let base = (split * Cout + co) * CinKK + tap;
      ${
          each(
            tn,
            (j) => `{ let ci = cit * ${tn}u + ${j}u; if (ci < Cin) { dw[base + ci * KK] = acc${i}_${j}; } }`,
            "\n      ",
          )
        }
      ${bias ? `if (e == 0u) { db[split * Cout + co] = ${biasOf(i)}; }` : ""}
    }
  }`,
      "\n  ",
    )
  }`;
}

function texWeightGradDispatch(p: ConvWeightGradParams, caps: GpuCaps): GpuDispatch | null {
  const plan = texWeightGradPlan(p);
  const x = p.xQuad ? quadBufferTexture(0, plan.x) : quadTexture(0, plan.x);
  const dy = p.dyQuad ? quadBufferTexture(1, plan.dy) : quadTexture(1, plan.dy);
  const textures = [x, dy];
  if (!wantsTexture(p.variant, p, caps, ...textures)) {
    return quadInputRefused("conv2dWeightGrad", p.xQuad || p.dyQuad);
  }
  const { splits, rowsPerSplit } = splitsOf(p);
  const w = geometryWords(p).u32(plan.x.Hp, plan.x.Wp, Math.ceil(p.Wo / 4), plan.ciTiles, plan.coTiles);
  w.u32(splits, rowsPerSplit, plan.dy.Hp, plan.dy.Wp, plan.dy.top, plan.dy.left);
  const tiles = plan.ciTiles * p.kH * p.kW * plan.coTiles * splits;
  const S = p.innerSplits ?? texWeightGradInnerSplits(p, caps, splits);
  if (!Number.isInteger(Math.log2(S)) || S < 1 || S > WG) {
    throw new Error(`conv2dWeightGrad kernel: innerSplits must be a power of two from 1 to ${WG}, got ${S}`);
  }
  const bias = p.biasGrad ?? false;
  return {
    source: cachedSource(
      `conv2dWeightGrad/texture/${plan.tm}x${plan.tn}/${bias}/${S}`,
      () => texWeightGradSource(plan.tm, plan.tn, bias, S),
    ),
    workgroups: grid(Math.ceil(tiles / (WG / S)), caps.maxWorkgroupsPerDimension),
    params: w.finish(),
    textures,
  };
}
