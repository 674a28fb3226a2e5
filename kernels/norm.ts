/**
 * @file Row normalization, the one kernel family behind both groupNorm and layerNorm.
 *
 * The input is viewed as [outer, C, spatial] with C = groups · channelsPerGroup, and as `rows` = outer · groups
 * contiguous rows of `cols` = channelsPerGroup · spatial elements (groupNorm: a row per (sample, group);
 * layerNorm: groups = 1, spatial = 1, channelsPerGroup = prod(normalized_shape), a row per leading index). Each
 * row is normalized by its own mean and biased variance, then scaled and shifted per channel, where the channel
 * of element (row, col) is (row % groups) · channelsPerGroup + floor(col / spatial).
 *
 * The row kernels give each row a segment of T threads (a power of two, 256/T rows per workgroup):
 *
 * - forward: each thread runs Welford's update over its strided share of the row (one read of x), the segment
 *   merges the partial (count, mean, M2) triples in workgroup memory with Chan's formula, then every thread
 *   writes its share of y = (x − μ)·rstd·w[c] + b[c] (second read). Welford keeps the variance right when
 *   |mean| ≫ std, where the one-pass E[x²] − E[x]² loses every digit in float32. Both directions also work on
 *   x − K with K = the row's first element: near 1000, a float32 μ is only good to ~3e-5, which would show up
 *   in every x − μ, while x − K is exact for values within a factor of two of K and its mean keeps the low
 *   digits. So the saved statistics are μ − K ("shifted mean") and rstd per row; the backward needs them.
 * - backward (dx): with ĝ = g·w[c] and x̂ = ((x − K) − (μ − K))·rstd, one pass sums ĝ and ĝ·x̂ over the row,
 *   the second writes dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)).
 *
 * The channel is tracked incrementally along the thread's stride (T/spatial and T%spatial travel as uniforms),
 * so there is no integer division per element.
 *
 * dweight = Σ g·x̂ and dbias = Σ g run over outer and spatial, across rows. `rowNormParamGrad` gives a
 * workgroup to each (chunk of samples, channel), walks its elements with a (sample, spatial) cursor that reloads
 * the row statistics only when the sample changes, and tree-sums both in workgroup memory. The samples are
 * split into chunks only when there are too few channels to fill the device; the op sums the [chunks, C]
 * partials with the reduce kernel.
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { grid, header, WG } from "./wgsl.ts";

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

/** Number of chunks (the leading dim of the partial sums). */
export function paramGradChunks(p: RowNormParamGradParams): number {
  return Math.ceil(p.rows / p.groups / p.chunkRows);
}

export interface RowNormParams extends RowLayout {
  hasWeight: boolean;
  hasBias: boolean;
  eps: number;
}

export interface RowNormBackwardParams extends RowLayout {
  hasWeight: boolean;
}

/**
 * Threads per row: a power of two up to `WG`, small enough that each thread has at least `minPerThread`
 * elements, so short rows pack many to a workgroup and long rows get the whole workgroup.
 */
export function threadsPerRow(cols: number, minPerThread: number): number {
  let t = 1;
  while (t < WG && t * 2 * minPerThread <= cols) t *= 2;
  return t;
}

/**
 * Threads per row for `rows` rows of `cols` elements. A real GPU wants many threads per row to hide latency. On
 * a CPU-emulated adapter a workgroup barrier is a switch between coroutines and only the workgroups run in
 * parallel, so it takes the fewest threads per row that still make enough workgroups to keep every core busy.
 */
export function pickThreadsPerRow(rows: number, cols: number, caps: GpuCaps): number {
  const most = threadsPerRow(cols, 4);
  if (!caps.isCpuEmulated) return most;
  const WANT_WORKGROUPS = 16;
  let t = 1;
  while (t < most && Math.ceil((rows * t) / WG) < WANT_WORKGROUPS) t *= 2;
  return t;
}

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

/** Inputs: x, [weight], [bias]; outputs: y, shifted mean (μ − x[row, 0]) and rstd per row. */
export const rowNorm: Kernel<RowNormParams> = {
  name: "rowNorm",

  gpu(p: RowNormParams, caps: GpuCaps): GpuDispatch {
    const cols = checkLayout("rowNorm", p);
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
    const source = header(inputs, ["y", "meanOut", "rstdOut"]) + shared + `
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
    y[base + j] = ((x[base + j] - K) - mu) * (${scale})${shift};
    ${ADVANCE}
  }
}`;
    return {
      source,
      workgroups: grid(Math.ceil(p.rows / (WG / T)), caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: RowNormParams, inputs: FloatArray[], [y, meanOut, rstdOut]: FloatArray[]): void {
    const L = checkLayout("rowNorm", p);
    const x = inputs[0];
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
        y[base + j] = v;
      }
    }
  },
};

/** dx of row normalization. Inputs: x, g, shifted mean, rstd (as the forward saved them), [weight]; output: dx. */
export const rowNormBackward: Kernel<RowNormBackwardParams> = {
  name: "rowNormBackward",

  gpu(p: RowNormBackwardParams, caps: GpuCaps): GpuDispatch {
    const cols = checkLayout("rowNormBackward", p);
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

  cpu(p: RowNormBackwardParams, inputs: FloatArray[], [dx]: FloatArray[]): void {
    const L = checkLayout("rowNormBackward", p);
    const [x, g, meanIn, rstdIn] = inputs;
    const weight = p.hasWeight ? inputs[4] : null;
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
