/**
 * @file Row normalization, the one kernel family behind both groupNorm and layerNorm.
 *
 * The input is viewed as [outer, C, spatial] with C = groups · channelsPerGroup, and as `rows` = outer · groups
 * contiguous rows of `cols` = channelsPerGroup · spatial elements (groupNorm: a row per (sample, group);
 * layerNorm: groups = 1, spatial = 1, channelsPerGroup = prod(normalized_shape), a row per leading index). Each
 * row is normalized by its own mean and biased variance, then scaled and shifted per channel, where the channel
 * of element (row, col) is (row % groups) · channelsPerGroup + floor(col / spatial).
 *
 * Two ways to map rows to threads (`RowNormVariant`):
 *
 * - "tree" (real GPUs): each row gets a segment of T threads (a power of two, 256/T rows per workgroup), each
 *   thread a strided share of the row, merged by tree reductions in workgroup memory.
 * - "lanes" (CPU-emulated adapters): llvmpipe runs a workgroup 8 invocations to a vector, turns every storage
 *   load into a per-lane loop and every barrier into a coroutine switch, so throughput comes from few
 *   instructions per element, not from many threads. A row gets one lane (or a few, when rows are scarce, merged
 *   with one barrier), and each lane owns a contiguous run of whole channels, read as vec4 units where rows start
 *   4-aligned and a unit stays in one channel, so weight and bias are loaded once per channel. "lanesTexture"
 *   reads x (and g) through flat textures: a texel fetch is one vector gather. On the [8,64,32,32] G=32 bench
 *   (one lane per row): forward 4.1 → 1.0 ms with vec4 buffer loads, 0.69 ms with the texture; dx 1.5 / 1.1 ms.
 *   The thread mapping and the lanes' unit declarations are shared with softmax and reduce (kernels/lanes.ts).
 *
 * The statistics, in both variants:
 *
 * - forward: each thread runs Welford's update over its share of the row (one read of x), the partial (count,
 *   mean, M2) triples are merged with Chan's formula, then every thread writes its share of
 *   y = (x − μ)·rstd·w[c] + b[c] (second read). Welford keeps the variance right when
 *   |mean| ≫ std, where the one-pass E[x²] − E[x]² loses every digit in float32. Both directions also work on
 *   x − K with K = the row's first element: near 1000, a float32 μ is only good to ~3e-5, which would show up
 *   in every x − μ, while x − K is exact for values within a factor of two of K and its mean keeps the low
 *   digits. So the saved statistics are μ − K ("shifted mean") and rstd per row; the backward needs them.
 * - backward (dx): with ĝ = g·w[c] and x̂ = ((x − K) − (μ − K))·rstd, one pass sums ĝ and ĝ·x̂ over the row,
 *   the second writes dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)).
 *
 * In the tree variant the channel is tracked incrementally along the thread's stride (T/spatial and T%spatial
 * travel as uniforms), so there is no integer division per element.
 *
 * dweight = Σ g·x̂ and dbias = Σ g run over outer and spatial, across rows. On CPU-emulated adapters the dx
 * kernel's first pass also writes them per (sample, channel) (`paramPartials`), since it sums g and g·x̂ per
 * channel anyway, and `rowNormParamSum` adds the samples up: no third pass over x and g. Elsewhere `rowNormParamGrad` gives a
 * workgroup to each (chunk of samples, channel), walks its elements with a (sample, spatial) cursor that reloads
 * the row statistics only when the sample changes, and tree-sums both in workgroup memory. The samples are
 * split into chunks only when there are too few channels to fill the device; `rowNormParamSum` sums the
 * [chunks, C] partials.
 *
 * SiLU epilogue (`silu`): the forward writes silu(x̂·w + b) (and, with `savePre`, x̂·w + b too); the backward
 * (a lanes variant) takes g·silu'(pre) wherever it reads g, pre recomputed as (x − K − μ)·(rstd·w) + b exactly
 * as the forward computed it, so GroupNorm → SiLU costs no pass and no saved tensor of its own.
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { cachedSource } from "./source_cache.ts";
import { LANE_WG, lanesPerRow, pickThreadsPerRow, type RowVariant, unitDecls } from "./lanes.ts";
import { ENTRY_1D, flatTextureSize, grid, grid1d, header, WG } from "./wgsl.ts";
import { quadBlockStoreWgsl, quadBorderRowWgsl, type QuadLayout, quadPitch, toQuadBuffer } from "./layout.ts";

export interface RowLayout {
  /** Number of rows: outer · groups. */
  rows: number;
  /** Rows per sample; channel = (row % groups) · channelsPerGroup + floor(col / spatial). */
  groups: number;
  channelsPerGroup: number;
  /** Elements per channel within a row; a row has channelsPerGroup · spatial elements. */
  spatial: number;
}

export interface RowNormParamGradParams extends RowLayout {
  /** Samples (of outer = rows / groups) per partial sum; partial sums come out as [ceil(outer / chunkRows), C]. */
  chunkRows: number;
}

/** Elements per row. */
export function rowLength(p: RowLayout): number {
  return p.channelsPerGroup * p.spatial;
}

/**
 * Samples per chunk for the parameter gradient: a workgroup per (chunk, channel), split into chunks only as far
 * as needed for `targetWorkgroups`, and never below 2048 elements per workgroup. CPU-emulated adapters run few
 * workgroups at once and pay ~1 ms per extra dispatch (the reduce over chunks), so they want a small target;
 * a real GPU wants a few per multiprocessor.
 */
export function paramGradChunkRows(p: RowLayout, isCpuEmulated: boolean): number {
  const targetWorkgroups = isCpuEmulated ? 32 : 1024;
  const outer = p.rows / p.groups, C = p.groups * p.channelsPerGroup;
  const chunks = Math.max(
    1,
    Math.min(Math.ceil(targetWorkgroups / C), Math.floor((outer * p.spatial) / 2048)),
  );
  return Math.ceil(outer / chunks);
}

/**
 * Whether the backward should write the per-sample parameter-gradient partials from its dx pass
 * (`paramPartials`) instead of running `rowNormParamGrad`, a third pass over x and g: on CPU-emulated
 * adapters, where a pass costs far more than the [N, C] partials do once spatial is long.
 */
export function fusedParamPartials(p: RowLayout, isCpuEmulated: boolean): boolean {
  return isCpuEmulated && p.spatial >= 16;
}

/** Number of chunks (the leading dim of the partial sums). */
export function paramGradChunks(p: RowNormParamGradParams): number {
  return Math.ceil(p.rows / p.groups / p.chunkRows);
}

/** How the row-norm kernels map rows to threads (see the file comment and kernels/lanes.ts). */
export type RowNormVariant = RowVariant;

export interface RowNormParams extends RowLayout {
  hasWeight: boolean;
  hasBias: boolean;
  eps: number;
  /** Write y = silu(x̂·w + b) (GroupNorm fused with the SiLU that follows it) instead of x̂·w + b. */
  silu?: boolean;
  /** With `silu`, also write the pre-activation x̂·w + b, as a fourth output (for a backward without `silu`). */
  savePre?: boolean;
  /**
   * Write y in this padded channel-quad layout (kernels/layout.ts; a buffer of `quadBufferElements` floats,
   * borders and row ends zero) instead of row-major: for a convolution that reads it so (see `convQuadLayout`),
   * which then needs no packing pass. groupNorm of [N, C, H, W] with channelsPerGroup and W multiples of 4;
   * runs a lanes variant, without `savePre`.
   */
  quadOut?: QuadLayout;
  variant?: RowNormVariant;
}

export interface RowNormBackwardParams extends RowLayout {
  hasWeight: boolean;
  /**
   * Also compute the parameter gradients from the same pass over x and g: outputs dx, then the per-sample
   * partials Σ g·x̂ and Σ g, each [rows / groups, C] (those of `rowNormParamGrad` with chunkRows 1), then their
   * sums over the samples dW and dB, each [C], which are written only where `samplesSummedInKernel` (otherwise
   * sum the partials with `rowNormParamSum`). Runs a lanes variant.
   */
  paramPartials?: boolean;
  /**
   * g is the gradient of silu(pre), pre = x̂·w + b, of a forward with `silu`: the kernel recomputes pre from x
   * and the statistics and takes g·silu'(pre) wherever it reads g (no pass of its own, no saved pre). The bias,
   * when `hasBias`, follows the weight among the inputs. Runs a lanes variant.
   */
  silu?: boolean;
  /** With `silu`: the forward had a bias (an input after the weight). */
  hasBias?: boolean;
  variant?: RowNormVariant;
}

/** WGSL of silu and its derivative on `type` (f32, or the lanes' unit U), as the elementwise silu/siluGrad. */
function siluFns(type: string): string {
  return `fn silu_(v: ${type}) -> ${type} { return v * (1.0 / (1.0 + exp(-v))); }
fn siluGrad_(v: ${type}) -> ${type} { let s = 1.0 / (1.0 + exp(-v)); return s * (1.0 + v * (1.0 - s)); }
`;
}

const sigmoidJs = (v: number) => 1 / (1 + Math.exp(-v));
const siluJs = (v: number) => v * sigmoidJs(v);
const siluGradJs = (v: number) => sigmoidJs(v) * (1 + v * (1 - sigmoidJs(v)));

function checkLayout(op: string, p: RowLayout): number {
  const dims = { rows: p.rows, groups: p.groups, channelsPerGroup: p.channelsPerGroup, spatial: p.spatial };
  for (const [k, v] of Object.entries(dims)) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`${op}: ${k} must be a positive integer, got ${v}`);
  }
  if (p.rows % p.groups !== 0) {
    throw new Error(`${op}: ${p.rows} rows are not a multiple of ${p.groups} groups`);
  }
  return rowLength(p);
}

/** Throws unless the quad layout `l` is one of groupNorm's [N, C, H, W] input that the lanes can write. */
function checkQuadOut(p: RowNormParams, l: QuadLayout): void {
  const fits = l.C === p.groups * p.channelsPerGroup && l.N * p.groups === p.rows &&
    l.H * l.W === p.spatial &&
    p.channelsPerGroup % 4 === 0 && l.W % 4 === 0 && l.top + l.H <= l.Hp && l.left + l.W <= l.Wp &&
    !p.savePre;
  if (!fits) {
    throw new Error(
      `rowNorm: quadOut ${JSON.stringify(l)} does not fit ${p.rows} rows of ${p.groups} groups × ` +
        `${p.channelsPerGroup} channels × ${p.spatial} (needs channelsPerGroup and W multiples of 4, no savePre)`,
    );
  }
}

function channelOf(p: RowLayout, row: number, col: number): number {
  return (row % p.groups) * p.channelsPerGroup + Math.floor(col / p.spatial);
}

/** Uniform words 0..6 shared by both directions: rows, cols, groups, channelsPerGroup, spatial, T/spatial, T%spatial. */
function layoutWords(w: ParamWriter, p: RowLayout, T: number): ParamWriter {
  const cols = rowLength(p);
  return w.u32(
    p.rows,
    cols,
    p.groups,
    p.channelsPerGroup,
    p.spatial,
    Math.floor(T / p.spatial),
    T % p.spatial,
  );
}

/** WGSL prologue: the row this thread serves, its position in the segment, and the channel cursor helpers. */
function rowPrologue(T: number): string {
  return `
  let rows = pu(0u);
  let L = pu(1u);
  let seg = lid / ${T}u;
  let t = lid % ${T}u;
  let row = (wid.x + wid.y * nwg.x) * ${WG / T}u + seg;
  let valid = row < rows;
  let base = row * L;
  let S = pu(4u);
  let c0 = (row % pu(2u)) * pu(3u) + t / S;
  let s0 = t % S;`;
}

/** WGSL that advances the channel cursor (c, s) by T columns. */
const ADVANCE = `s += pu(6u); c += pu(5u); if (s >= S) { s -= S; c += 1u; }`;

/**
 * WGSL that refreshes per-channel values when the cursor enters a new channel: a thread stays in one channel
 * for spatial/T steps, so the per-element weight (and bias) loads become one per channel run.
 */
function channelCache(loads: string[]): { init: string; refresh: string } {
  if (!loads.length) return { init: "", refresh: "" };
  return {
    init: `var cached = 0xffffffffu;\n  ${loads.map((l) => `var ${l.split(" = ")[0]} = 0.0;`).join(" ")}`,
    refresh: `if (c != cached) { cached = c; ${loads.map((l) => `${l};`).join(" ")} }`,
  };
}

/** WGSL tree sum of shW and shB over the whole workgroup (thread index `t`). */
function workgroupTreeSum(T: number): string {
  return `
  workgroupBarrier();
  for (var k = ${T / 2}u; k > 0u; k = k >> 1u) {
    if (t < k) { shW[t] += shW[t + k]; shB[t] += shB[t + k]; }
    workgroupBarrier();
  }`;
}

/** WGSL tree reduction over the T threads of each segment; `merge(i, j)` folds slot j into slot i. */
function segmentTree(T: number, merge: string): string {
  if (T === 1) return "";
  return `
  workgroupBarrier();
  for (var k = ${T / 2}u; k > 0u; k = k >> 1u) {
    if (t < k) { ${merge} }
    workgroupBarrier();
  }`;
}

// --- lanes variants (CPU-emulated adapters) ---------------------------------------------------------------------

/** How a lanes dispatch walks its rows. */
interface LanePlan {
  /** Elements per unit: 4 (vec4 loads and stores) where rows start 4-aligned and a unit stays in one channel, or 1. */
  V: 1 | 4;
  /** A unit spans four channels (spatial 1, V 4): weight and bias are read as vec4, one segment per unit. */
  vectorWeights: boolean;
  /** Lanes (threads) per row. */
  T: number;
  /** A row is `segments` segments of `unitsPerSegment` units; a segment is one channel (or, vectorWeights, one unit). */
  segments: number;
  unitsPerSegment: number;
  /** Segments per lane: lane t owns segments t·segmentsPerLane .. (t+1)·segmentsPerLane − 1 of its row. */
  segmentsPerLane: number;
  /** x (and g) are read as flat textures. */
  texture: boolean;
}

/**
 * The lanes plan for `p`. `channelSegments` asks for segments that are whole channels (the parameter-gradient
 * partials need them), which rules out vectorWeights. Textures only when the variant asks for them, the adapter
 * has texture inputs, the rows are vec4 and the flat texture fits.
 */
function lanePlan(
  p: RowLayout,
  caps: Pick<GpuCaps, "maxTextureDimension2D">,
  variant: "lanes" | "lanesTexture",
  channelSegments: boolean,
): LanePlan {
  const L = rowLength(p);
  const vec = L % 4 === 0 && (p.spatial % 4 === 0 || (p.spatial === 1 && !channelSegments));
  const V = vec ? 4 : 1;
  const vectorWeights = vec && p.spatial === 1;
  const unitsPerSegment = vectorWeights ? 1 : p.spatial / V;
  const segments = vectorWeights ? L / 4 : p.channelsPerGroup;
  const T = lanesPerRow(p.rows, segments, unitsPerSegment);
  const max = caps.maxTextureDimension2D ?? 0;
  const tex = flatTextureSize(p.rows * L);
  const texture = variant === "lanesTexture" && V === 4 && tex.height <= max && tex.width <= max;
  return {
    V,
    vectorWeights,
    T,
    segments,
    unitsPerSegment,
    segmentsPerLane: Math.ceil(segments / T),
    texture,
  };
}

/**
 * Whether the backward with `paramPartials` also sums them over the samples itself (dW, dB): when every sample
 * of a group fits in one workgroup of the channel-segment plan. Otherwise `rowNormParamSum` does it (one more
 * dispatch, ~0.1 ms on lavapipe against a ~1.6 ms fwd+bwd at [8,64,32,32]).
 */
export function samplesSummedInKernel(p: RowLayout): boolean {
  return p.rows / p.groups <= LANE_WG / lanePlan(p, {}, "lanes", true).T;
}

/** The variant a dispatch runs: as asked, else lanesTexture on CPU-emulated adapters (or for partials), else tree. */
function pickVariant(asked: RowNormVariant | undefined, caps: GpuCaps, needsLanes: boolean): RowNormVariant {
  const v = asked ?? (caps.isCpuEmulated ? "lanesTexture" : "tree");
  return v === "tree" && needsLanes ? "lanes" : v;
}

/**
 * Uniform words 0..8 of the lanes variants: rows, L, groups, parameter entries per group (channelsPerGroup, or
 * a quarter of it for vectorWeights), unitsPerSegment, segments, segmentsPerLane, units per row, C. The forward
 * adds eps; the backward the number of samples and the groups per workgroup of its sample-major mapping.
 */
function laneWords(p: RowLayout, plan: LanePlan): ParamWriter {
  const L = rowLength(p);
  return new ParamWriter().u32(
    p.rows,
    L,
    p.groups,
    plan.vectorWeights ? p.channelsPerGroup / 4 : p.channelsPerGroup,
    plan.unitsPerSegment,
    plan.segments,
    plan.segmentsPerLane,
    L / plan.V,
    p.groups * p.channelsPerGroup,
  );
}

/**
 * Bindings, helpers and prologue of a lanes kernel. `U` is the unit type (vec4<f32> or f32); `ld_<name>(i)`
 * reads unit i of a row-major input from its buffer or texture; `hsum` adds a unit's elements. The prologue
 * defines the lane's row, `valid`, `base` (the row's first unit), its segments `seg0 .. seg1`, `SU` and `K`
 * (the row's first element).
 */
function laneHeader(
  plan: LanePlan,
  inputs: string[],
  outputs: string[],
  unitArrays: string[],
  vecParams: string[],
  texInputs: number[],
  sampleMajor = false,
): { decls: string; prologue: string } {
  const decls = unitDecls(plan.V, plan.texture, inputs, outputs, texInputs, unitArrays, vecParams);
  // Row-major: consecutive rows per workgroup. Sample-major: every sample of pu(10) groups per workgroup, so
  // one workgroup sees all the partial sums of a channel (uniform word 9 is the number of samples).
  const rows = sampleMajor
    ? `let local = lid / ${plan.T}u;
  let sample = local % pu(9u);
  let grp = (wid.x + wid.y * nwg.x) * pu(10u) + local / pu(9u);
  let valid = local / pu(9u) < pu(10u) && grp < pu(2u);
  let row = sample * pu(2u) + grp;`
    : `let row = (wid.x + wid.y * nwg.x) * ${LANE_WG / plan.T}u + lid / ${plan.T}u;
  let valid = row < pu(0u);`;
  const prologue = `
  let lane = lid % ${plan.T}u;
  ${rows}
  let SU = pu(4u);
  let seg0 = min(lane * pu(6u), pu(5u));
  let seg1 = min(seg0 + pu(6u), pu(5u));
  let base = row * pu(7u);
  let c0 = (row % pu(2u)) * pu(3u) + seg0;
  var K = 0.0;
  if (valid) { K = ld_x(base)${plan.V === 4 ? ".x" : ""}; }`;
  return { decls, prologue };
}

/**
 * WGSL that walks the lane's segments: `before` and `after` run once per segment with `c` its parameter index,
 * `unit` once per unit `j` of it.
 */
function laneSegments(before: string, unit: string, after: string): string {
  return `{
    var c = c0;
    var j = seg0 * SU;
    for (var sgi = seg0; sgi < seg1; sgi++) {
      ${before}
      let e = j + SU;
      for (; j < e; j++) { ${unit} }
      ${after}
      c++;
    }
  }`;
}

function lanesForward(p: RowNormParams, caps: GpuCaps, variant: "lanes" | "lanesTexture"): GpuDispatch {
  const plan = lanePlan(p, caps, variant, false);
  const T = plan.T;
  // Built once per parameters and plan (kernels/source_cache.ts): the host would otherwise rebuild it per dispatch.
  const source = cachedSource(
    `rowNorm/lanes:${JSON.stringify(p)}:${JSON.stringify(plan)}`,
    () => lanesForwardSource(p, plan),
  );
  return {
    source,
    workgroups: grid(Math.ceil((p.rows * T) / LANE_WG), caps.maxWorkgroupsPerDimension),
    params: quadWords(laneWords(p, plan).f32(p.eps), p.quadOut).finish(),
    textures: plan.texture ? [{ input: 0, ...flatTextureSize(p.rows * rowLength(p)) }] : undefined,
  };
}

/** Words 10..17 of a forward with `quadOut`: H, W, Hp, Wp, top, left, the pitch, the image's channel quads. */
function quadWords(w: ParamWriter, l: QuadLayout | undefined): ParamWriter {
  return l ? w.u32(l.H, l.W, l.Hp, l.Wp, l.top, l.left, quadPitch(l), Math.ceil(l.C / 4)) : w;
}

/**
 * The forward's write in the quad layout: the lane takes its share of the row's position quads (four
 * positions along a row of one channel, a unit) for each of the row's channel quads, loads the four channels'
 * units, and stores the 4 × 4 block transposed as four texels (four channels at one position). Then it zeroes
 * its share of the padded rows' borders (and, for the image's last channel quad, the row ends up to the pitch).
 */
function quadWriteSource(p: RowNormParams, T: number): string {
  const quadOf = (name: string) => `vec4<f32>(${name}[c], ${name}[c + 1u], ${name}[c + 2u], ${name}[c + 3u])`;
  const a = p.hasWeight ? `rstd * ${quadOf("weight")}` : "vec4<f32>(rstd)";
  const b = p.hasBias ? quadOf("bias") : "vec4<f32>(0.0)";
  const value = (k: number) => {
    const v = `((ld_x(u + ${k}u * SU) - K) - mu) * a[${k}]${p.hasBias ? ` + b[${k}]` : ""}`;
    return `let v${k} = ${p.silu ? `silu_(${v})` : v};`;
  };
  return `
  let G = pu(2u); let cpg = pu(3u);
  let H = pu(10u); let W = pu(11u); let Hp = pu(12u); let Wp = pu(13u); let top = pu(14u); let left = pu(15u);
  let pitch = pu(16u); let CQ = pu(17u);
  let img = row / G; let g = row % G; let WQ = W / 4u;
  let per = (SU + ${T - 1}u) / ${T}u;
  let p0 = min(lane * per, SU); let p1 = min(p0 + per, SU);
  for (var k = 0u; k < cpg / 4u; k++) {
    let c = g * cpg + 4u * k;
    let a = ${a};
    let b = ${b};
    let col = (g * cpg / 4u + k) * Wp + left;
    var h = p0 / WQ;
    var wq = p0 % WQ;
    for (var pq = p0; pq < p1; pq++) {
      let u = base + 4u * k * SU + pq;
      ${[0, 1, 2, 3].map(value).join("\n      ")}
      let t = (img * Hp + h + top) * pitch + col + 4u * wq;
      ${quadBlockStoreWgsl("y", "v", "      ")}
      wq++;
      if (wq == WQ) { wq = 0u; h++; }
    }
  }
  for (var k = 0u; k < cpg / 4u; k++) {
    let q = g * cpg / 4u + k;
    let col = q * Wp;
    let end = select(col + Wp, pitch, q + 1u == CQ);
    for (var hp = lane; hp < Hp; hp += ${T}u) {
      let r = (img * Hp + hp) * pitch;
      ${quadBorderRowWgsl("y", "W", "      ")}
    }
  }`;
}

function lanesForwardSource(p: RowNormParams, plan: LanePlan): string {
  const inputs = ["x", ...(p.hasWeight ? ["weight"] : []), ...(p.hasBias ? ["bias"] : [])];
  const vecParams = plan.vectorWeights ? inputs.slice(1) : [];
  const pre = p.silu && p.savePre ? ["pre"] : [];
  const { decls, prologue } = laneHeader(
    plan,
    inputs,
    ["y", "meanOut", "rstdOut", ...pre],
    ["x", "y", ...pre],
    vecParams,
    [0],
  );
  const T = plan.T;
  // Chan et al. over the T lanes of the row, in lane order (every lane gets the same result).
  const merge = T === 1 ? "" : `
  shN[lid] = n;
  shM[lid] = mu;
  shQ[lid] = m2;
  workgroupBarrier();
  n = 0.0;
  mu = 0.0;
  m2 = 0.0;
  for (var k = lid - lane; k < lid - lane + ${T}u; k++) {
    let nb = shN[k];
    if (nb > 0.0) {
      let nn = n + nb;
      let d = shM[k] - mu;
      let f = nb / nn;
      mu += d * f;
      m2 += shQ[k] + d * d * n * f;
      n = nn;
    }
  }`;
  const shared = T === 1 ? "" : `var<workgroup> shN: array<f32, ${LANE_WG}>;
var<workgroup> shM: array<f32, ${LANE_WG}>;
var<workgroup> shQ: array<f32, ${LANE_WG}>;
`;
  const scale = p.hasWeight ? "rstd * weight[c]" : "rstd";
  const shift = p.hasBias ? " + bias[c]" : "";
  const write = !p.silu
    ? `y[base + j] = ((ld_x(base + j) - K) - mu) * a${shift};`
    : `let yv = ((ld_x(base + j) - K) - mu) * a${shift};\n        y[base + j] = silu_(yv);${
      pre.length ? "\n        pre[base + j] = yv;" : ""
    }`;
  return decls + (p.silu ? siluFns("U") : "") + shared + `
@compute @workgroup_size(${LANE_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${prologue}
  // Welford per element position of the unit (one division per unit), then the positions folded together.
  var cnt = 0.0;
  var mean = U(0.0);
  var q = U(0.0);
  if (valid) {
    for (var j = seg0 * SU; j < seg1 * SU; j++) {
      let v = ld_x(base + j) - K;
      cnt += 1.0;
      let d = v - mean;
      mean += d / cnt;
      q += d * (v - mean);
    }
  }
  var n = cnt * ${plan.V}.0;
  var mu = hsum(mean) * ${1 / plan.V};
  let dm = mean - mu;
  var m2 = hsum(q) + cnt * hsum(dm * dm);${merge}
  if (!valid) { return; }
  let rstd = inverseSqrt(max(m2 / f32(pu(1u)), 0.0) + pf(9u));
  if (lane == 0u) {
    meanOut[row] = mu;
    rstdOut[row] = rstd;
  }
  ${p.quadOut ? quadWriteSource(p, T) : laneSegments(`let a = ${scale};`, write, "")}
}`;
}

function lanesBackward(
  p: RowNormBackwardParams,
  caps: GpuCaps,
  variant: "lanes" | "lanesTexture",
): GpuDispatch {
  const partials = p.paramPartials ?? false;
  const plan = lanePlan(p, caps, variant, partials);
  const sumSamples = partials && samplesSummedInKernel(p);
  // Built once per parameters and plan (kernels/source_cache.ts): the host would otherwise rebuild it per dispatch.
  const source = cachedSource(
    `rowNormBackward/lanes:${JSON.stringify(p)}:${JSON.stringify(plan)}`,
    () => lanesBackwardSource(p, plan, sumSamples),
  );
  const tex = flatTextureSize(p.rows * rowLength(p));
  const samples = p.rows / p.groups, groupsPerWorkgroup = Math.floor(LANE_WG / plan.T / samples);
  const workgroups = sumSamples
    ? Math.ceil(p.groups / groupsPerWorkgroup)
    : Math.ceil((p.rows * plan.T) / LANE_WG);
  return {
    source,
    workgroups: grid(workgroups, caps.maxWorkgroupsPerDimension),
    params: laneWords(p, plan).u32(samples, groupsPerWorkgroup).finish(),
    textures: plan.texture ? [{ input: 0, ...tex }, { input: 1, ...tex }] : undefined,
  };
}

function lanesBackwardSource(p: RowNormBackwardParams, plan: LanePlan, sumSamples: boolean): string {
  const partials = p.paramPartials ?? false;
  const silu = p.silu ?? false, hasBias = silu && (p.hasBias ?? false);
  const params = [...(p.hasWeight ? ["weight"] : []), ...(hasBias ? ["bias"] : [])];
  const inputs = ["x", "g", "meanIn", "rstdIn", ...params];
  const outputs = ["dx", ...(partials ? ["pW", "pB", "dW", "dB"] : [])];
  const vecParams = plan.vectorWeights ? params : [];
  const { decls, prologue } = laneHeader(
    plan,
    inputs,
    outputs,
    ["x", "g", "dx"],
    vecParams,
    [0, 1],
    sumSamples,
  );
  const T = plan.T;
  // The partials of a channel were written by the lanes of its group, all in this workgroup; the sample-0 lane
  // adds them up in sample order (as rowNormParamSum does). After the dx pass: a barrier between the two passes
  // over a row would run every lane's first pass before any second one, and the rows would leave the cache.
  const sampleSum = !sumSamples ? "" : `
  storageBarrier();
  if (valid && sample == 0u) {
    for (var c = c0; c < c0 + seg1 - seg0; c++) {
      var sw = 0.0;
      var sg = 0.0;
      for (var k = 0u; k < pu(9u); k++) {
        sw += pW[k * pu(8u) + c];
        sg += pB[k * pu(8u) + c];
      }
      dW[c] = sw;
      dB[c] = sg;
    }
  }`;
  const merge = T === 1 ? "" : `
  shA[lid] = sa;
  shB[lid] = sb;
  workgroupBarrier();
  sa = 0.0;
  sb = 0.0;
  for (var k = lid - lane; k < lid - lane + ${T}u; k++) {
    sa += shA[k];
    sb += shB[k];
  }`;
  const shared = T === 1 ? "" : `var<workgroup> shA: array<f32, ${LANE_WG}>;
var<workgroup> shB: array<f32, ${LANE_WG}>;
`;
  const w = p.hasWeight ? " * weight[c]" : "";
  // With silu, g·silu'(pre) with pre recomputed exactly as the forward computed it: (x − K − μ)·(rstd·w) + b.
  const affine = !silu ? "" : `\n      let a = rstd${w};${hasBias ? "\n      let bc = bias[c];" : ""}`;
  const gradAt = (xm: string) =>
    silu ? `ld_g(base + j) * siluGrad_(${xm} * a${hasBias ? " + bc" : ""})` : "ld_g(base + j)";
  const sums = laneSegments(
    "var sg = U(0.0);\n      var sgx = U(0.0);" + affine,
    `let xm = (ld_x(base + j) - K) - mu;\n        let gv = ${
      gradAt("xm")
    };\n        sg += gv;\n        sgx += gv * xm;`,
    `sa += hsum(sg${w});
      sb += hsum(sgx${w});${
      partials ? `\n      pB[pbase + c] = hsum(sg);\n      pW[pbase + c] = hsum(sgx) * rstd;` : ""
    }`,
  );
  return decls + (silu ? siluFns("U") : "") + shared + `
@compute @workgroup_size(${LANE_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${prologue}
  var mu = 0.0;
  var rstd = 0.0;
  var sa = 0.0;
  var sb = 0.0;
  if (valid) {
    mu = meanIn[row];
    rstd = rstdIn[row];${partials ? "\n    let pbase = (row / pu(2u)) * pu(8u);" : ""}
    ${sums}
  }${merge}
  if (valid) {
    // dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)); ĝ − mean(ĝ) first, so a row of equal ĝ gives exactly 0.
    let invL = 1.0 / f32(pu(1u));
    let meanG = sa * invL;
    let xm = rstd * sb * rstd * invL;
    ${
    laneSegments(
      (p.hasWeight ? "let wc = weight[c];" : "") + affine,
      `let xd = (ld_x(base + j) - K) - mu;\n        dx[base + j] = rstd * (${gradAt("xd")}${
        p.hasWeight ? " * wc" : ""
      } - meanG - xd * xm);`,
      "",
    )
  }
  }${sampleSum}
}`;
}

/** Inputs: x, [weight], [bias]; outputs: y, shifted mean (μ − x[row, 0]) and rstd per row. */
export const rowNorm: Kernel<RowNormParams> = {
  name: "rowNorm",

  gpu(p: RowNormParams, caps: GpuCaps): GpuDispatch {
    const cols = checkLayout("rowNorm", p);
    if (p.quadOut) checkQuadOut(p, p.quadOut);
    const variant = pickVariant(p.variant, caps, p.quadOut !== undefined);
    if (variant !== "tree") return lanesForward(p, caps, variant);
    const T = pickThreadsPerRow(p.rows, cols, caps);
    const w = layoutWords(new ParamWriter(), p, T).f32(p.eps);
    const inputs = ["x", ...(p.hasWeight ? ["weight"] : []), ...(p.hasBias ? ["bias"] : [])];
    const shared = T === 1 ? "" : `
var<workgroup> shN: array<f32, ${WG}>;
var<workgroup> shM: array<f32, ${WG}>;
var<workgroup> shQ: array<f32, ${WG}>;`;
    // Chan et al.: merging (na, ma, qa) with (nb, mb, qb); empty partners (short rows) are skipped.
    const merge = `let j = lid + k;
      let nb = shN[j];
      if (nb > 0.0) {
        let na = shN[lid];
        let n = na + nb;
        let d = shM[j] - shM[lid];
        let f = nb / n;
        shM[lid] = shM[lid] + d * f;
        shQ[lid] = shQ[lid] + shQ[j] + d * d * na * f;
        shN[lid] = n;
      }`;
    const finish = T === 1 ? `let mu = mean;\n  let m2 = q;` : `shN[lid] = n;
  shM[lid] = mean;
  shQ[lid] = q;${segmentTree(T, merge)}
  let mu = shM[lid - t];
  let m2 = shQ[lid - t];`;
    const cache = channelCache([
      ...(p.hasWeight ? ["wc = weight[c]"] : []),
      ...(p.hasBias ? ["bc = bias[c]"] : []),
    ]);
    const scale = p.hasWeight ? "rstd * wc" : "rstd";
    const shift = p.hasBias ? " + bc" : "";
    const savePre = p.silu && p.savePre;
    const write = !p.silu
      ? `y[base + j] = ((x[base + j] - K) - mu) * (${scale})${shift};`
      : `let yv = ((x[base + j] - K) - mu) * (${scale})${shift};
    y[base + j] = silu_(yv);${savePre ? "\n    pre[base + j] = yv;" : ""}`;
    const outputs = ["y", "meanOut", "rstdOut", ...(savePre ? ["pre"] : [])];
    const source = header(inputs, outputs) + (p.silu ? siluFns("f32") : "") + shared + `
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${rowPrologue(T)}
  var n = 0.0;
  var mean = 0.0;
  var q = 0.0;
  var K = 0.0;
  if (valid) {
    K = x[base];
    for (var j = t; j < L; j += ${T}u) {
      let v = x[base + j] - K;
      n += 1.0;
      let d = v - mean;
      mean += d / n;
      q += d * (v - mean);
    }
  }
  ${finish}
  if (!valid) { return; }
  let rstd = inverseSqrt(max(m2 / f32(L), 0.0) + pf(7u));
  if (t == 0u) {
    meanOut[row] = mu;
    rstdOut[row] = rstd;
  }
  var c = c0;
  var s = s0;
  ${cache.init}
  for (var j = t; j < L; j += ${T}u) {
    ${cache.refresh}
    ${write}
    ${ADVANCE}
  }
}`;
    return {
      source,
      workgroups: grid(Math.ceil(p.rows / (WG / T)), caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: RowNormParams, inputs: FloatArray[], [yOut, meanOut, rstdOut, pre]: FloatArray[]): void {
    const L = checkLayout("rowNorm", p);
    const x = inputs[0];
    if (p.quadOut) checkQuadOut(p, p.quadOut);
    // With quadOut: row-major first, then placed in the layout.
    const y = p.quadOut ? new Float64Array(p.rows * L) : yOut;
    const weight = p.hasWeight ? inputs[1] : null;
    const bias = p.hasBias ? inputs[p.hasWeight ? 2 : 1] : null;
    for (let r = 0; r < p.rows; r++) {
      const base = r * L, K = x[base];
      let sum = 0;
      for (let j = 0; j < L; j++) sum += x[base + j] - K;
      const mu = sum / L;
      let sq = 0;
      for (let j = 0; j < L; j++) {
        const d = x[base + j] - K - mu;
        sq += d * d;
      }
      const rstd = 1 / Math.sqrt(sq / L + p.eps);
      meanOut[r] = mu;
      rstdOut[r] = rstd;
      for (let j = 0; j < L; j++) {
        const c = channelOf(p, r, j);
        let v = (x[base + j] - K - mu) * rstd;
        if (weight) v *= weight[c];
        if (bias) v += bias[c];
        if (p.silu && p.savePre) pre[base + j] = v;
        y[base + j] = p.silu ? siluJs(v) : v;
      }
    }
    if (p.quadOut) toQuadBuffer(p.quadOut, y, yOut);
  },
};

/** g·silu'(pre) with pre = (x − K − μ)·(rstd·w) + b, as the forward with `silu` computed it (CPU reference). */
function siluInputGrad(
  p: RowLayout,
  x: FloatArray,
  g: FloatArray,
  meanIn: FloatArray,
  rstdIn: FloatArray,
  weight: FloatArray | null,
  bias: FloatArray | null,
): FloatArray {
  const L = rowLength(p);
  const out = new (g.constructor as { new (n: number): FloatArray })(p.rows * L);
  for (let r = 0; r < p.rows; r++) {
    const base = r * L, K = x[base];
    for (let j = 0; j < L; j++) {
      const c = channelOf(p, r, j);
      const a = weight ? rstdIn[r] * weight[c] : rstdIn[r];
      const pre = (x[base + j] - K - meanIn[r]) * a + (bias ? bias[c] : 0);
      out[base + j] = g[base + j] * siluGradJs(pre);
    }
  }
  return out;
}

/**
 * dx of row normalization. Inputs: x, g, shifted mean, rstd (as the forward saved them), [weight], [bias (with
 * `silu`)]; output: dx (and the parameter partials and sums with `paramPartials`).
 */
export const rowNormBackward: Kernel<RowNormBackwardParams> = {
  name: "rowNormBackward",

  gpu(p: RowNormBackwardParams, caps: GpuCaps): GpuDispatch {
    const cols = checkLayout("rowNormBackward", p);
    const variant = pickVariant(p.variant, caps, (p.paramPartials ?? false) || (p.silu ?? false));
    if (variant !== "tree") return lanesBackward(p, caps, variant);
    const T = pickThreadsPerRow(p.rows, cols, caps);
    const w = layoutWords(new ParamWriter(), p, T);
    const inputs = ["x", "g", "meanIn", "rstdIn", ...(p.hasWeight ? ["weight"] : [])];
    const gHat = p.hasWeight ? `g[base + j] * wc` : `g[base + j]`;
    const cache = channelCache(p.hasWeight ? ["wc = weight[c]"] : []);
    const shared = T === 1 ? "" : `
var<workgroup> shA: array<f32, ${WG}>;
var<workgroup> shB: array<f32, ${WG}>;`;
    const finish = T === 1 ? "" : `shA[lid] = sa;
  shB[lid] = sb;${segmentTree(T, `shA[lid] += shA[lid + k]; shB[lid] += shB[lid + k];`)}
  sa = shA[lid - t];
  sb = shB[lid - t];`;
    const source = header(inputs, ["dx"]) + shared + `
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${rowPrologue(T)}
  var mu = 0.0;
  var rstd = 0.0;
  var K = 0.0;
  var sa = 0.0;
  var sb = 0.0;
  if (valid) {
    mu = meanIn[row];
    rstd = rstdIn[row];
    K = x[base];
    var c = c0;
    var s = s0;
    ${cache.init}
    for (var j = t; j < L; j += ${T}u) {
      ${cache.refresh}
      let gh = ${gHat};
      sa += gh;
      sb += gh * ((x[base + j] - K) - mu);
      ${ADVANCE}
    }
  }
  ${finish}
  if (!valid) { return; }
  let invL = 1.0 / f32(L);
  let meanG = sa * invL;
  let meanGX = sb * rstd * invL;
  var c = c0;
  var s = s0;
  ${cache.init}
  for (var j = t; j < L; j += ${T}u) {
    ${cache.refresh}
    let gh = ${gHat};
    let xh = ((x[base + j] - K) - mu) * rstd;
    dx[base + j] = rstd * (gh - meanG - xh * meanGX);
    ${ADVANCE}
  }
}`;
    return {
      source,
      workgroups: grid(Math.ceil(p.rows / (WG / T)), caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: RowNormBackwardParams, inputs: FloatArray[], [dx, pW, pB, dW, dB]: FloatArray[]): void {
    const L = checkLayout("rowNormBackward", p);
    const [x, gIn, meanIn, rstdIn] = inputs;
    const weight = p.hasWeight ? inputs[4] : null;
    const g = p.silu
      ? siluInputGrad(p, x, gIn, meanIn, rstdIn, weight, p.hasBias ? inputs[weight ? 5 : 4] : null)
      : gIn;
    if (p.paramPartials) {
      rowNormParamGrad.cpu({ ...p, chunkRows: 1 }, [x, g, meanIn, rstdIn], [pW, pB]);
      const channels = p.groups * p.channelsPerGroup;
      rowNormParamSum.cpu({ chunks: p.rows / p.groups, channels }, [pW, pB], [dW, dB]);
    }
    for (let r = 0; r < p.rows; r++) {
      const base = r * L, K = x[base], mu = meanIn[r], rstd = rstdIn[r];
      let sa = 0, sb = 0;
      for (let j = 0; j < L; j++) {
        const gh = weight ? g[base + j] * weight[channelOf(p, r, j)] : g[base + j];
        sa += gh;
        sb += gh * (x[base + j] - K - mu) * rstd;
      }
      const meanG = sa / L, meanGX = sb / L;
      for (let j = 0; j < L; j++) {
        const gh = weight ? g[base + j] * weight[channelOf(p, r, j)] : g[base + j];
        const xh = (x[base + j] - K - mu) * rstd;
        dx[base + j] = rstd * (gh - meanG - xh * meanGX);
      }
    }
  },
};

/**
 * Partial sums of dweight and dbias. Inputs: x, g, shifted mean, rstd; outputs: Σ g·x̂ and Σ g, each
 * [chunks, C] (element (k, c) sums channel c over samples k·chunkRows .. (k+1)·chunkRows − 1 and all spatial
 * positions).
 */
export const rowNormParamGrad: Kernel<RowNormParamGradParams> = {
  name: "rowNormParamGrad",

  gpu(p: RowNormParamGradParams, caps: GpuCaps): GpuDispatch {
    const cols = checkLayout("rowNormParamGrad", p);
    const C = p.groups * p.channelsPerGroup, S = p.spatial;
    const w = new ParamWriter().u32(p.rows / p.groups, C, S, p.groups, p.channelsPerGroup, cols, p.chunkRows)
      .u32(Math.floor(WG / S), WG % S);
    const source = header(["x", "g", "meanIn", "rstdIn"], ["dW", "dB"]) + `
var<workgroup> shW: array<f32, ${WG}>;
var<workgroup> shB: array<f32, ${WG}>;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let C = pu(1u);
  let S = pu(2u);
  let L = pu(5u);
  let id = wid.x + wid.y * nwg.x;
  let valid = id < ((pu(0u) + pu(6u) - 1u) / pu(6u)) * C;
  let c = id % C;
  let chunk = id / C;
  let group = c / pu(4u);
  let n1 = min((chunk + 1u) * pu(6u), pu(0u));
  // Cursor over (sample n, spatial s) of this chunk, stepping by the workgroup size.
  var n = chunk * pu(6u) + t / S;
  var s = t % S;
  var cachedN = 0xffffffffu;
  var K = 0.0;
  var mu = 0.0;
  var r = 0.0;
  var aw = 0.0;
  var ab = 0.0;
  if (valid) {
    while (n < n1) {
      if (n != cachedN) {
        cachedN = n;
        let row = n * pu(3u) + group;
        K = x[row * L];
        mu = meanIn[row];
        r = rstdIn[row];
      }
      let e = (n * C + c) * S + s;
      let gv = g[e];
      aw += gv * (((x[e] - K) - mu) * r);
      ab += gv;
      s += pu(8u); n += pu(7u); if (s >= S) { s -= S; n += 1u; }
    }
  }
  shW[t] = aw;
  shB[t] = ab;${workgroupTreeSum(WG)}
  if (valid && t == 0u) {
    dW[id] = shW[0];
    dB[id] = shB[0];
  }
}`;
    return {
      source,
      workgroups: grid(paramGradChunks(p) * C, caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: RowNormParamGradParams, [x, g, meanIn, rstdIn]: FloatArray[], [dW, dB]: FloatArray[]): void {
    const L = checkLayout("rowNormParamGrad", p);
    const C = p.groups * p.channelsPerGroup, chunks = paramGradChunks(p);
    dW.fill(0, 0, chunks * C);
    dB.fill(0, 0, chunks * C);
    for (let r = 0; r < p.rows; r++) {
      const k = Math.floor(Math.floor(r / p.groups) / p.chunkRows), base = r * L, K = x[base];
      for (let j = 0; j < L; j++) {
        const out = k * C + channelOf(p, r, j);
        const gv = g[base + j];
        dW[out] += gv * (x[base + j] - K - meanIn[r]) * rstdIn[r];
        dB[out] += gv;
      }
    }
  },
};

export interface RowNormParamSumParams {
  /** Leading dim of the partials. */
  chunks: number;
  channels: number;
}

/**
 * dweight and dbias from their partials: inputs Σ g·x̂ and Σ g partials, each [chunks, C]; outputs their sums
 * over the chunks, each [C]. One small dispatch for both (two reduce dispatches cost twice the ~25 µs floor).
 */
export const rowNormParamSum: Kernel<RowNormParamSumParams> = {
  name: "rowNormParamSum",

  gpu(p: RowNormParamSumParams, caps: GpuCaps): GpuDispatch {
    return {
      source: header(["pW", "pB"], ["dW", "dB"]) + `
${ENTRY_1D} {
  let c = linearId(wid, nwg, lid, ${WG}u);
  let C = pu(1u);
  if (c >= C) { return; }
  var sw = 0.0;
  var sb = 0.0;
  for (var k = 0u; k < pu(0u); k++) {
    sw += pW[k * C + c];
    sb += pB[k * C + c];
  }
  dW[c] = sw;
  dB[c] = sb;
}`,
      workgroups: grid1d(p.channels, caps.maxWorkgroupsPerDimension),
      params: new ParamWriter().u32(p.chunks, p.channels).finish(),
    };
  },

  cpu(p: RowNormParamSumParams, [pW, pB]: FloatArray[], [dW, dB]: FloatArray[]): void {
    for (let c = 0; c < p.channels; c++) {
      let sw = 0, sb = 0;
      for (let k = 0; k < p.chunks; k++) {
        sw += pW[k * p.channels + c];
        sb += pB[k * p.channels + c];
      }
      dW[c] = sw;
      dB[c] = sb;
    }
  },
};
