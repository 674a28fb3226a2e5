/**
 * @file Batched matrix multiply: `out[b] = A[b] · B[b] (+ bias)`, out contiguous `[batch, M, N]`.
 *
 * Both operands are read through element strides (an offset, then a batch, row and column stride), so a
 * transposed operand is just swapped row/column strides and a batch-broadcast operand has batch stride 0:
 * neither needs a copy. The optional bias is a length-N vector added to every row (a linear layer).
 *
 * Three variants, all register-blocked (an invocation owns a block of the output and keeps it in registers, so
 * each step of the K loop costs one load per block row and one per block column for rows × columns FMAs):
 * - "texture" (CPU-emulated adapters, the default there when the operands fit the adapter's texture size): both
 *   operands are first packed into rgba32float textures (see `TextureInput` in types.ts) whose texels hold four
 *   consecutive k of one row of A (column of B) and whose rows are "panels": all k of one register tile's rows,
 *   the tile's rows side by side for each k quad. One texel fetch (a vector gather on llvmpipe, where each
 *   storage load is a per-lane scalar loop) then serves four k, a step reads tm + tn neighbouring texels for
 *   4·tm·tn multiply-adds accumulated as dot products, and the packing pads M, N, K with zeros so the loop has no
 *   edge cases. Neighbouring invocations take neighbouring column tiles: they share A's panel. K longer than a
 *   texture row allows is split into chunks, one texture row each.
 * - "registers" (CPU-emulated adapters: llvmpipe/lavapipe): one invocation per block of up to 8×8, straight
 *   from global memory. There every lane's load is a scalar gather, workgroup memory is just more memory and
 *   barriers are expensive, so what counts is loads per FMA. Operands that are contiguous and aligned along a
 *   dimension are declared as vec4 arrays and read four elements per load (see `LoadMode`), which about doubles
 *   throughput; their K loop runs in steps of four with a scalar tail.
 * - "shared" (real GPUs): a workgroup of 16×16 invocations owns a 64×64 output tile and stages 16-deep slices of
 *   A and B in workgroup memory, so each global element is loaded once per workgroup instead of once per
 *   invocation; each invocation accumulates a strided 4×4 block.
 * Edges (M, N not multiples of the tile) are handled by clamping the rows/columns that are loaded (always in
 * bounds, results discarded) and guarding the stores; the shared variant also zero-fills the slice past K.
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
import { FLAT_TEXEL_WGSL, FLAT_WIDTH, flatTextureSize, grid, header } from "./wgsl.ts";

/** How one operand's matrices are laid out in its buffer, in elements. */
export interface MatOperand {
  /** Element offset of the first matrix (default 0). */
  offset?: number;
  /** Distance between consecutive matrices; 0 broadcasts one matrix over the batch. */
  batchStride: number;
  rowStride: number;
  colStride: number;
}

export type MatmulVariant = "registers" | "shared" | "texture";

export interface MatmulParams {
  batch: number;
  /** Rows of A and of the output. */
  M: number;
  /** Columns of B and of the output. */
  N: number;
  /** Columns of A = rows of B. */
  K: number;
  a: MatOperand;
  b: MatOperand;
  /** Adds a third input, a length-N vector, to every output row. */
  bias?: boolean;
  /** Multiplies the product (before the bias): out = alpha·A·B + bias (default 1; attention's 1/√d). */
  alpha?: number;
  /**
   * Where out[b, m, n] goes: offset + b·batchStride + m·rowStride + n (default contiguous [batch, M, N]), so a
   * product can fill its part of a larger tensor (attention's dq, dk, dv in qkv's layout). Elements the
   * product does not reach are left as they were.
   */
  out?: { offset: number; batchStride: number; rowStride: number };
  /**
   * Forces a variant (tests run all); by default CPU-emulated adapters get "texture" (or "registers" for small
   * products and operands too large for textures), others "shared". A forced "texture" that does not fit the
   * adapter's textures falls back to "registers".
   */
  variant?: MatmulVariant;
}

/** Shared variant: a 16×16 workgroup covers a 64×64 tile, staging BK-deep slices of A and B; 4×4 per invocation. */
const TILE = 64, BK = 16, SIDE = 16, TS = 4;
const WG_REG = 64;

/**
 * How the register variant loads an operand: element by element ("s"), or four at a time as a vec4 along k
 * ("k4") or along its other dimension ("m4" for A, "n4" for B). Vector loads cut the per-lane load count by
 * four, which is what limits a CPU-emulated adapter; they need that dimension contiguous and everything else
 * (offset, strides, the vector dimension's size) a multiple of four, so every vec4 is aligned and complete.
 */
type LoadMode = "s" | "k4" | "m4" | "n4";

function operandMode(o: MatOperand, along: "k" | "mn", size: number): boolean {
  const off = o.offset ?? 0;
  const [unit, other] = along === "k" ? [o.colStride, o.rowStride] : [o.rowStride, o.colStride];
  return unit === 1 && size % 4 === 0 && off % 4 === 0 && o.batchStride % 4 === 0 && other % 4 === 0;
}

/** Register tile edge for a dimension: 8, or the largest power of two not above a small size. */
function tileFor(size: number): number {
  return size >= 8 ? 8 : size >= 4 ? 4 : size >= 2 ? 2 : 1;
}

interface RegisterPlan {
  tm: number;
  tn: number;
  aMode: LoadMode;
  bMode: LoadMode;
}

function registerPlan(p: MatmulParams): RegisterPlan {
  const tm = tileFor(p.M), tn = tileFor(p.N);
  // For an operand contiguous along k, A's rows are the K-long dimension (colStride 1) and B's columns are (rowStride 1).
  const aK = operandMode(p.a, "k", p.K), aM = tm % 4 === 0 && operandMode(p.a, "mn", p.M);
  const bK = operandMode({ ...p.b, rowStride: p.b.colStride, colStride: p.b.rowStride }, "k", p.K);
  const bN = tn % 4 === 0 &&
    operandMode({ ...p.b, rowStride: p.b.colStride, colStride: p.b.rowStride }, "mn", p.N);
  return { tm, tn, aMode: aK ? "k4" : aM ? "m4" : "s", bMode: bK ? "k4" : bN ? "n4" : "s" };
}

function check(p: MatmulParams): void {
  for (const k of ["batch", "M", "N", "K"] as const) {
    if (!Number.isInteger(p[k]) || p[k] < 1) {
      throw new Error(`matmul kernel: ${k} must be a positive integer, got ${p[k]}`);
    }
  }
  for (const [name, o] of [["a", p.a], ["b", p.b]] as const) {
    for (const v of [o.offset ?? 0, o.batchStride, o.rowStride, o.colStride]) {
      if (!Number.isInteger(v) || v < 0) {
        throw new Error(`matmul kernel: operand ${name} has a bad stride or offset: ${v}`);
      }
    }
  }
  if (p.out) {
    const { offset, batchStride, rowStride } = p.out;
    if (![offset, batchStride, rowStride].every((v) => Number.isInteger(v) && v >= 0)) {
      throw new Error(`matmul kernel: bad output layout ${JSON.stringify(p.out)}`);
    }
    // Distinct elements, or invocations would race on one.
    if ((p.M > 1 && rowStride < p.N) || (p.batch > 1 && batchStride < (p.M - 1) * rowStride + p.N)) {
      throw new Error(
        `matmul kernel: output layout ${JSON.stringify(p.out)} overlaps itself for ${p.M}×${p.N}`,
      );
    }
  }
}

/** Uniform layout shared by both variants. */
function params(
  p: MatmulParams,
  tileM: number,
  tileN: number,
): { w: ParamWriter; tilesM: number; tilesN: number } {
  const tilesM = Math.ceil(p.M / tileM), tilesN = Math.ceil(p.N / tileN);
  const w = new ParamWriter().u32(p.batch, p.M, p.N, p.K, tilesN, tilesM);
  w.u32(p.a.offset ?? 0, p.a.batchStride, p.a.rowStride, p.a.colStride);
  w.u32(p.b.offset ?? 0, p.b.batchStride, p.b.rowStride, p.b.colStride);
  return { w, tilesM, tilesN };
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/**
 * Uniform words of the epilogue, past every variant's own words (texture 12, registers and shared 14): alpha,
 * then the output's offset, batch stride and row stride.
 */
const ALPHA_WORD = 15;

/** The output layout: as given, or contiguous [batch, M, N]. */
function outLayout(p: MatmulParams) {
  return p.out ?? { offset: 0, batchStride: p.M * p.N, rowStride: p.N };
}

/** Writes alpha and the output layout from `ALPHA_WORD` on, after a writer that holds `used` words. */
function withEpilogue(w: ParamWriter, used: number, p: MatmulParams): ParamWriter {
  const alpha = p.alpha ?? 1, o = outLayout(p);
  if (!Number.isFinite(alpha)) throw new Error(`matmul kernel: alpha must be finite, got ${alpha}`);
  return w.u32(...new Array(ALPHA_WORD - used).fill(0)).f32(alpha).u32(o.offset, o.batchStride, o.rowStride);
}

/** WGSL lines that store `alpha·acc{i}_{j}` (+ bias) for rows `rowOf(i)` and columns `colOf(j)`, guarded. */
function storeCode(
  tm: number,
  tn: number,
  bias: boolean,
  rowOf: (i: number) => string,
  colOf: (j: number) => string,
) {
  const lines: string[] = [
    `let alpha = pf(${ALPHA_WORD}u); let oOff = pu(${ALPHA_WORD + 1}u); ` +
    `let oBatch = pu(${ALPHA_WORD + 2}u); let oRow = pu(${ALPHA_WORD + 3}u);`,
  ];
  for (const i of range(tm)) {
    lines.push(`if (${rowOf(i)} < M) {`);
    lines.push(`  let o = oOff + bi * oBatch + ${rowOf(i)} * oRow;`);
    for (const j of range(tn)) {
      const v = bias ? `alpha * acc${i}_${j} + bias[${colOf(j)}]` : `alpha * acc${i}_${j}`;
      lines.push(`  if (${colOf(j)} < N) { out[o + ${colOf(j)}] = ${v}; }`);
    }
    lines.push(`}`);
  }
  return lines.join("\n  ");
}

function registersSource({ tm, tn, aMode, bMode }: RegisterPlan, bias: boolean): string {
  const rows = range(tm), cols = range(tn);
  // The binding convention of `header`, with A and/or B viewed as vec4 arrays in the vector modes.
  let common = header(bias ? ["A", "B", "bias"] : ["A", "B"], ["out"]);
  if (aMode !== "s") common = common.replace("A: array<f32>", "A: array<vec4<f32>>");
  if (bMode !== "s") common = common.replace("B: array<f32>", "B: array<vec4<f32>>");
  // Element loads that work whichever way the array is declared (used by the K tail and by scalar mode).
  const elemA = aMode === "s" ? (e: string) => `A[${e}]` : (e: string) => `ldA(${e})`;
  const elemB = bMode === "s" ? (e: string) => `B[${e}]` : (e: string) => `ldB(${e})`;
  const helpers = [
    aMode !== "s" ? `fn ldA(e: u32) -> f32 { return A[e >> 2u][e & 3u]; }` : "",
    bMode !== "s" ? `fn ldB(e: u32) -> f32 { return B[e >> 2u][e & 3u]; }` : "",
  ].join("\n");

  // Per-invocation base offsets. Rows/columns past the edge are clamped: their loads stay in bounds and their
  // results are never stored. Vector groups are clamped to the last whole group.
  const setup: string[] = [];
  rows.forEach((i) => setup.push(`let pa${i} = aBase + min(m0 + ${i}u, M - 1u) * aR;`));
  cols.forEach((j) => setup.push(`let pb${j} = bBase + min(n0 + ${j}u, N - 1u) * bC;`));
  if (aMode === "m4") {
    range(tm / 4).forEach((g) => setup.push(`let ga${g} = (aBase + min(m0 + ${4 * g}u, M - 4u)) >> 2u;`));
  }
  if (bMode === "n4") {
    range(tn / 4).forEach((g) => setup.push(`let gb${g} = (bBase + min(n0 + ${4 * g}u, N - 4u)) >> 2u;`));
  }

  // One K block of four: loads, then tm·tn·4 multiply-adds on extracted components.
  const loads: string[] = [];
  let aAt: (i: number, kk: number) => string;
  if (aMode === "k4") {
    rows.forEach((i) => loads.push(`let a${i} = A[(pa${i} >> 2u) + kb];`));
    aAt = (i, kk) => `a${i}[${kk}]`;
  } else if (aMode === "m4") {
    range(tm / 4).forEach((g) =>
      range(4).forEach((kk) => loads.push(`let a${g}_${kk} = A[ga${g} + ((k + ${kk}u) * aC >> 2u)];`))
    );
    aAt = (i, kk) => `a${i >> 2}_${kk}[${i & 3}]`;
  } else {
    rows.forEach((i) =>
      range(4).forEach((kk) => loads.push(`let a${i}_${kk} = A[pa${i} + (k + ${kk}u) * aC];`))
    );
    aAt = (i, kk) => `a${i}_${kk}`;
  }
  let bAt: (kk: number, j: number) => string;
  if (bMode === "k4") {
    cols.forEach((j) => loads.push(`let b${j} = B[(pb${j} >> 2u) + kb];`));
    bAt = (kk, j) => `b${j}[${kk}]`;
  } else if (bMode === "n4") {
    range(tn / 4).forEach((g) =>
      range(4).forEach((kk) => loads.push(`let b${g}_${kk} = B[gb${g} + ((k + ${kk}u) * bR >> 2u)];`))
    );
    bAt = (kk, j) => `b${j >> 2}_${kk}[${j & 3}]`;
  } else {
    cols.forEach((j) =>
      range(4).forEach((kk) => loads.push(`let b${kk}_${j} = B[pb${j} + (k + ${kk}u) * bR];`))
    );
    bAt = (kk, j) => `b${kk}_${j}`;
  }
  const fmas: string[] = [];
  for (const kk of range(4)) {
    for (const i of rows) {
      fmas.push(cols.map((j) => `acc${i}_${j} = fma(${aAt(i, kk)}, ${bAt(kk, j)}, acc${i}_${j});`).join(" "));
    }
  }

  return common + helpers + `
@compute @workgroup_size(${WG_REG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let M = pu(1u); let N = pu(2u); let K = pu(3u);
  let tilesN = pu(4u); let tilesM = pu(5u);
  let id = linearId(wid, nwg, lid, ${WG_REG}u);
  if (id >= tilesN * tilesM * pu(0u)) { return; }
  // Neighbouring invocations take neighbouring column blocks: they share A's rows (cache-friendly).
  let tn = id % tilesN;
  let rest = id / tilesN;
  let tm = rest % tilesM;
  let bi = rest / tilesM;
  let m0 = tm * ${tm}u; let n0 = tn * ${tn}u;
  let aBase = pu(6u) + bi * pu(7u); let aR = pu(8u); let aC = pu(9u);
  let bBase = pu(10u) + bi * pu(11u); let bR = pu(12u); let bC = pu(13u);
  ${setup.join("\n  ")}
  ${rows.map((i) => cols.map((j) => `var acc${i}_${j} = 0.0;`).join(" ")).join("\n  ")}
  let K4 = K >> 2u;
  for (var kb = 0u; kb < K4; kb++) {
    let k = kb << 2u;
    ${loads.join("\n    ")}
    ${fmas.join("\n    ")}
  }
  for (var k = K4 << 2u; k < K; k++) {
    ${cols.map((j) => `let b${j} = ${elemB(`pb${j} + k * bR`)};`).join(" ")}
    ${
    rows.map((i) =>
      `{ let a = ${elemA(`pa${i} + k * aC`)}; ${
        cols.map((j) => `acc${i}_${j} = fma(a, b${j}, acc${i}_${j});`).join(" ")
      } }`
    ).join("\n    ")
  }
  }
  ${storeCode(tm, tn, bias, (i) => `(m0 + ${i}u)`, (j) => `(n0 + ${j}u)`)}
}`;
}

function sharedSource(bias: boolean): string {
  const inputs = bias ? ["A", "B", "bias"] : ["A", "B"];
  const rows = range(TS), cols = range(TS);
  const perThread = (TILE * BK) / (SIDE * SIDE);
  return header(inputs, ["out"]) + `
var<workgroup> As: array<f32, ${TILE * BK}>; // [BK][TILE], k-major
var<workgroup> Bs: array<f32, ${TILE * BK}>; // [BK][TILE]
@compute @workgroup_size(${SIDE * SIDE})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let M = pu(1u); let N = pu(2u); let K = pu(3u);
  let tilesN = pu(4u); let tilesM = pu(5u);
  let g = wid.x + wid.y * nwg.x;
  if (g >= tilesN * tilesM * pu(0u)) { return; }
  let tn = g % tilesN;
  let rest = g / tilesN;
  let tm = rest % tilesM;
  let bi = rest / tilesM;
  let m0 = tm * ${TILE}u; let n0 = tn * ${TILE}u;
  let aBase = pu(6u) + bi * pu(7u); let aR = pu(8u); let aC = pu(9u);
  let bBase = pu(10u) + bi * pu(11u); let bR = pu(12u); let bC = pu(13u);
  // Invocation (tx, ty) owns rows ty + 16 i and columns tx + 16 j: strided, so workgroup reads do not collide.
  let tx = lid % ${SIDE}u; let ty = lid / ${SIDE}u;
  ${rows.map((i) => cols.map((j) => `var acc${i}_${j} = 0.0;`).join(" ")).join("\n  ")}
  for (var k0 = 0u; k0 < K; k0 += ${BK}u) {
    for (var r = 0u; r < ${perThread}u; r++) {
      let e = lid + r * ${SIDE * SIDE}u;
      // A: neighbouring invocations load neighbouring k; B: neighbouring n (coalesced for row-major operands).
      let am = e / ${BK}u; let ak = e % ${BK}u;
      let av = A[aBase + min(m0 + am, M - 1u) * aR + min(k0 + ak, K - 1u) * aC];
      As[ak * ${TILE}u + am] = select(0.0, av, k0 + ak < K);
      let bk = e / ${TILE}u; let bn = e % ${TILE}u;
      let bv = B[bBase + min(k0 + bk, K - 1u) * bR + min(n0 + bn, N - 1u) * bC];
      Bs[bk * ${TILE}u + bn] = select(0.0, bv, k0 + bk < K);
    }
    workgroupBarrier();
    for (var kk = 0u; kk < ${BK}u; kk++) {
      ${cols.map((j) => `let b${j} = Bs[kk * ${TILE}u + tx + ${j * SIDE}u];`).join(" ")}
      ${
    rows.map((i) =>
      `{ let a = As[kk * ${TILE}u + ty + ${i * SIDE}u]; ${
        cols.map((j) => `acc${i}_${j} = fma(a, b${j}, acc${i}_${j});`).join(" ")
      } }`
    ).join("\n      ")
  }
    }
    workgroupBarrier();
  }
  ${storeCode(TS, TS, bias, (i) => `(m0 + ty + ${i * SIDE}u)`, (j) => `(n0 + tx + ${j * SIDE}u)`)}
}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Texture variant.

/** Largest register tile edge of the texture variant: 16 × 16 (256 accumulators) measured best on llvmpipe. */
const TEX_TILE = 16;
const WG_TEX = 64;
/** Below this many multiply-adds the texture copies and the extra dispatch cost more than they save. */
const TEX_MIN_WORK = 1 << 18;

/**
 * How the texture variant reads one operand, in texels of its texture: "k4" texels hold four consecutive k of
 * one row (t = base + batch·tb + row·tr + k/4), "r4" texels four consecutive rows at one k
 * (t = base + batch·tb + k·tk + row/4). Rows are M for A, N for B.
 */
interface TexOperand {
  mode: "k4" | "r4";
  tile: number;
  base: number;
  tb: number;
  /** tr for "k4", tk for "r4". */
  ts: number;
  texture: Omit<TextureInput, "input">;
}

/**
 * Plans one operand: read straight from a flat copy of its buffer when it is contiguous along k (or along its
 * rows) and 4-aligned, otherwise packed by a compute pass into dense zero-padded "k4" rows.
 */
function texOperand(
  o: MatOperand,
  rows: number,
  K: number,
  rowStride: number,
  kStride: number,
  matrices: number,
  bufferElements: number,
): TexOperand {
  const tile = Math.max(4, tileFor16(rows));
  const off = o.offset ?? 0;
  const aligned = (...v: number[]) => v.every((x) => x % 4 === 0);
  if (kStride === 1 && aligned(K, off, o.batchStride, rowStride)) {
    const texture = flatTextureSize(bufferElements);
    return { mode: "k4", tile, base: off / 4, tb: o.batchStride / 4, ts: rowStride / 4, texture };
  }
  if (rowStride === 1 && aligned(rows, off, o.batchStride, kStride)) {
    const texture = flatTextureSize(bufferElements);
    return { mode: "r4", tile, base: off / 4, tb: o.batchStride / 4, ts: kStride / 4, texture };
  }
  const pitch = Math.ceil(K / 4);
  const w = new ParamWriter().u32(rows, K, pitch, matrices * rows * pitch);
  w.u32(off, o.batchStride, rowStride, kStride);
  const texture = {
    ...flatTextureSize(4 * matrices * rows * pitch),
    pack: DENSE_K4_PACK,
    params: w.finish(),
  };
  return { mode: "k4", tile, base: 0, tb: o.batchStride === 0 ? 0 : rows * pitch, ts: pitch, texture };
}

/** Tile edge of the texture variant: 16, or the largest power of two not above a small size. */
function tileFor16(size: number): number {
  let t = 1;
  while (t * 2 <= Math.min(size, TEX_TILE)) t *= 2;
  return t;
}

/**
 * Packing into dense "k4" rows in flat texel order: texel t = (matrix · rows + row) · pitch + k/4, zero for
 * k ≥ K and past the end. Words: rows, K, pitch, texels, offset, batch stride, row stride, k stride.
 */
const DENSE_K4_PACK = `fn texel(x: u32, y: u32) -> vec4<f32> {
  let rows = pu(0u); let K = pu(1u);
  let t = y * ${FLAT_WIDTH}u + x;
  let rk = divmod(t, pu(2u));
  let k0 = rk.y * 4u;
  let mr = divmod(rk.x, rows);
  let base = i32(pu(4u) + mr.x * pu(5u) + mr.y * pu(6u));
  let k = vec4<u32>(k0, k0 + 1u, k0 + 2u, k0 + 3u);
  let i = select(vec4<i32>(-1), vec4<i32>(base) + vec4<i32>(k) * pi(7u), (k < vec4<u32>(K)) & vec4<bool>(t < pu(3u)));
  return vec4<f32>(srcAt(i.x), srcAt(i.y), srcAt(i.z), srcAt(i.w));
}`;

/** WGSL pieces reading one operand ("A"/"a" or "B"/"b") for a tile of `tile` rows at k quad `kq`. */
function operandCode(name: "A" | "B", v: string, o: TexOperand, rowsName: string, clampRows: string) {
  const tile = o.tile, n = o.mode === "k4" ? tile : tile / 4;
  const setup = o.mode === "k4"
    ? range(n).map((i) => `let ${v}r${i} = ${v}Base + min(${rowsName}0 + ${i}u, ${clampRows} - 1u) * ${v}S;`)
    : range(n).map((g) =>
      `let ${v}g${g} = ${v}Base + min(${rowsName}0 / 4u + ${g}u, ${clampRows} / 4u - 1u);`
    );
  /** Loads for k quad `kq`; in the tail, "r4" rows at k ≥ K are zeros. */
  const loads = (tail: boolean) =>
    o.mode === "k4"
      ? range(n).map((i) => `let ${v}${i} = textureLoad(${name}, flatTexel(${v}r${i} + kq));`)
      : range(4).flatMap((c) =>
        range(n).map((g) => {
          const k = tail ? `min(4u * kq + ${c}u, K - 1u)` : `(4u * kq + ${c}u)`;
          const ld = `textureLoad(${name}, flatTexel(${v}g${g} + ${k} * ${v}S))`;
          return `let ${v}${c}_${g} = ${tail ? `select(vec4<f32>(0.0), ${ld}, 4u * kq + ${c}u < K)` : ld};`;
        })
      );
  const at = o.mode === "k4"
    ? (i: number, c: number) => `${v}${i}[${c}]`
    : (i: number, c: number) => `${v}${c}_${i >> 2}[${i & 3}]`;
  return { setup, loads, at };
}

function textureSource(a: TexOperand, b: TexOperand, bias: boolean): string {
  const tm = a.tile, tn = b.tile;
  const rows = range(tm), cols = range(tn);
  const A = operandCode("A", "a", a, "m", "M"), B = operandCode("B", "b", b, "n", "N");
  // A chain of fma() per accumulator. llvmpipe (Mesa 22.3) lowers ffma and fdot to separate multiplies and
  // adds (`lower_ffma32`, `lower_fdot`), so this, a sum of four products and dot() all compile to the same
  // operations; interleaved A/B runs against the sum of products gave +20%, +20%, +3% and -5% process CPU
  // rate at 1024³, i.e. no reliable difference. The JIT's loop body (perf samples + a dump of the code) is
  // 4869 instructions per k quad, 4.75 per multiply-add: 2 for the multiply and add, 0.75 for each
  // accumulator's reload, execution-mask blend and spill, 1.5 for 32 texel fetches (~48 each: address, bounds
  // mask, 8 per-lane loads, transpose). It runs at only ~3 instructions per cycle (4.15 GHz), and fewer
  // instructions did not make it faster: two k quads per iteration (-11% instructions) measured 7-25% slower,
  // fetching each B column just before its products (-4%) the same, and 16 lanes (LP_NATIVE_VECTOR_WIDTH=512)
  // the same. A probe that read B from one fixed texel (wrong results) ran 7-21% faster, so part of the time
  // is B's memory access, but padded rows, dense k4 packing of both operands and 2-D workgroup tile maps did
  // not recover it (interleaved runs in one process, Zen 5 host, Mesa 22.3).
  const dots = rows.map((i) =>
    cols.map((j) =>
      a.mode === "k4" && b.mode === "k4"
        ? `acc${i}_${j} += dot(a${i}, b${j});`
        : `acc${i}_${j} = ${
          range(4).reduce((e, c) => `fma(${A.at(i, c)}, ${B.at(j, c)}, ${e})`, `acc${i}_${j}`)
        };`
    ).join(" ")
  ).join("\n    ");
  const step = (tail: boolean) => [...A.loads(tail), ...B.loads(tail)].join("\n    ") + "\n    " + dots;
  const inputs = bias ? ["A", "B", "bias"] : ["A", "B"];
  return header(inputs, ["out"], "f32", [0, 1]) + FLAT_TEXEL_WGSL + `
@compute @workgroup_size(${WG_TEX})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let M = pu(1u); let N = pu(2u); let K = pu(3u);
  let tilesN = pu(4u); let tilesM = pu(5u);
  let total = tilesN * tilesM * pu(0u);
  let id0 = linearId(wid, nwg, lid, ${WG_TEX}u);
  // Invocations past the end compute a clamped tile and do not store.
  let live = id0 < total;
  let id = min(id0, total - 1u);
  // Neighbouring invocations take neighbouring column tiles: they read the same texels of A.
  let tn = id % tilesN;
  let rest = id / tilesN;
  let tm = rest % tilesM;
  let bi = rest / tilesM;
  let m0 = tm * ${tm}u; let n0 = tn * ${tn}u;
  let aBase = pu(6u) + bi * pu(7u); let aS = pu(8u);
  let bBase = pu(9u) + bi * pu(10u); let bS = pu(11u);
  // Rows past the edge are clamped (their results are not stored).
  ${A.setup.join(" ")}
  ${B.setup.join(" ")}
  ${rows.map((i) => cols.map((j) => `var acc${i}_${j} = 0.0;`).join(" ")).join("\n  ")}
  for (var kq = 0u; kq < K / 4u; kq++) {
    ${step(false)}
  }
  if (K % 4u != 0u) {
    // The last, partial k quad ("k4" operands are zero-padded there).
    let kq = K / 4u;
    ${step(true)}
  }
  if (!live) { return; }
  ${storeCode(tm, tn, bias, (i) => `(m0 + ${i}u)`, (j) => `(n0 + ${j}u)`)}
}`;
}

interface TexturePlan {
  a: TexOperand;
  b: TexOperand;
}

function texturePlan(p: MatmulParams, maxDim: number, elements: [number, number]): TexturePlan | null {
  const a = texOperand(
    p.a,
    p.M,
    p.K,
    p.a.rowStride,
    p.a.colStride,
    p.a.batchStride ? p.batch : 1,
    elements[0],
  );
  const b = texOperand(
    p.b,
    p.N,
    p.K,
    p.b.colStride,
    p.b.rowStride,
    p.b.batchStride ? p.batch : 1,
    elements[1],
  );
  const fit = (t: { width: number; height: number }) => t.width <= maxDim && t.height <= maxDim;
  return fit(a.texture) && fit(b.texture) ? { a, b } : null;
}

/** Elements the operands' buffers must hold (the kernel only knows strides): the last element read, plus one. */
function operandExtent(o: MatOperand, batch: number, rows: number, cols: number): number {
  return (o.offset ?? 0) + (batch - 1) * o.batchStride + (rows - 1) * o.rowStride + (cols - 1) * o.colStride +
    1;
}

/** The variant a dispatch of `p` runs on an adapter with `caps`. */
export function matmulVariant(
  p: MatmulParams,
  caps: Pick<GpuCaps, "isCpuEmulated" | "maxTextureDimension2D">,
): MatmulVariant {
  const wanted = p.variant ??
    (caps.isCpuEmulated ? (p.batch * p.M * p.N * p.K >= TEX_MIN_WORK ? "texture" : "registers") : "shared");
  if (wanted === "texture" && !texturePlan(p, caps.maxTextureDimension2D ?? 0, extents(p))) {
    return "registers";
  }
  return wanted;
}

/** The operands' buffer sizes as far as the kernel can tell (a flat copy covers at least this much). */
function extents(p: MatmulParams): [number, number] {
  return [operandExtent(p.a, p.batch, p.M, p.K), operandExtent(p.b, p.batch, p.K, p.N)];
}

export const matmul: Kernel<MatmulParams> = {
  name: "matmul",

  gpu(p: MatmulParams, caps: GpuCaps): GpuDispatch {
    check(p);
    const variant = matmulVariant(p, caps);
    const bias = p.bias ?? false;
    if (variant === "texture") {
      const plan = texturePlan(p, caps.maxTextureDimension2D ?? 0, extents(p))!;
      const tilesM = Math.ceil(p.M / plan.a.tile), tilesN = Math.ceil(p.N / plan.b.tile);
      const w = new ParamWriter().u32(p.batch, p.M, p.N, p.K, tilesN, tilesM);
      w.u32(plan.a.base, plan.a.tb, plan.a.ts, plan.b.base, plan.b.tb, plan.b.ts);
      withEpilogue(w, 12, p);
      return {
        source: cachedSource(
          `matmul/texture/${plan.a.mode}${plan.a.tile}/${plan.b.mode}${plan.b.tile}/${bias}`,
          () => textureSource(plan.a, plan.b, bias),
        ),
        workgroups: grid(Math.ceil((p.batch * tilesM * tilesN) / WG_TEX), caps.maxWorkgroupsPerDimension),
        params: w.finish(),
        textures: [{ input: 0, ...plan.a.texture }, { input: 1, ...plan.b.texture }],
      };
    }
    if (variant === "registers") {
      const plan = registerPlan(p);
      const { w, tilesM, tilesN } = params(p, plan.tm, plan.tn);
      withEpilogue(w, 14, p);
      const groups = Math.ceil((p.batch * tilesM * tilesN) / WG_REG);
      return {
        source: cachedSource(
          `matmul/registers/${plan.tm}x${plan.tn}/${plan.aMode}/${plan.bMode}/${bias}`,
          () => registersSource(plan, bias),
        ),
        workgroups: grid(groups, caps.maxWorkgroupsPerDimension),
        params: w.finish(),
      };
    }
    const { w, tilesM, tilesN } = params(p, TILE, TILE);
    withEpilogue(w, 14, p);
    return {
      source: cachedSource(`matmul/shared/${bias}`, () => sharedSource(bias)),
      workgroups: grid(p.batch * tilesM * tilesN, caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: MatmulParams, inputs: FloatArray[], [out]: FloatArray[]): void {
    check(p);
    const [A, B, bias] = inputs;
    const { M, N, K, a, b } = p;
    const o = outLayout(p);
    for (let bi = 0; bi < p.batch; bi++) {
      const aB = (a.offset ?? 0) + bi * a.batchStride, bB = (b.offset ?? 0) + bi * b.batchStride;
      for (let m = 0; m < M; m++) {
        for (let n = 0; n < N; n++) {
          let s = 0;
          let pa = aB + m * a.rowStride, pb = bB + n * b.colStride;
          for (let k = 0; k < K; k++) {
            s += A[pa] * B[pb];
            pa += a.colStride;
            pb += b.rowStride;
          }
          out[o.offset + bi * o.batchStride + m * o.rowStride + n] = (p.alpha ?? 1) * s +
            (p.bias ? bias[n] : 0);
        }
      }
    }
  },
};
