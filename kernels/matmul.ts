/**
 * @file Batched matrix multiply: `out[b] = A[b] · B[b] (+ bias)`, out contiguous `[batch, M, N]`.
 *
 * Both operands are read through element strides (an offset, then a batch, row and column stride), so a
 * transposed operand is just swapped row/column strides and a batch-broadcast operand has batch stride 0:
 * neither needs a copy. The optional bias is a length-N vector added to every row (a linear layer).
 *
 * Two variants, both register-blocked (an invocation owns a block of the output and keeps it in registers, so
 * each step of the K loop costs one load per block row and one per block column for rows × columns FMAs):
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

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { grid, header } from "./wgsl.ts";

/** How one operand's matrices are laid out in its buffer, in elements. */
export interface MatOperand {
  /** Element offset of the first matrix (default 0). */
  offset?: number;
  /** Distance between consecutive matrices; 0 broadcasts one matrix over the batch. */
  batchStride: number;
  rowStride: number;
  colStride: number;
}

export type MatmulVariant = "registers" | "shared";

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
  /** Forces a variant (tests run both); by default CPU-emulated adapters get "registers", others "shared". */
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

/** WGSL lines that store `acc{i}_{j}` (+ bias) for rows `rowOf(i)` and columns `colOf(j)`, guarded. */
function storeCode(
  tm: number,
  tn: number,
  bias: boolean,
  rowOf: (i: number) => string,
  colOf: (j: number) => string,
) {
  const lines: string[] = [];
  for (const i of range(tm)) {
    lines.push(`if (${rowOf(i)} < M) {`);
    lines.push(`  let o = (bi * M + ${rowOf(i)}) * N;`);
    for (const j of range(tn)) {
      const v = bias ? `acc${i}_${j} + bias[${colOf(j)}]` : `acc${i}_${j}`;
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

/** Whether a dispatch of `p` declares vec4 storage arrays. */
export function usesVectorLoads(p: MatmulParams, caps: Pick<GpuCaps, "isCpuEmulated">): boolean {
  const variant = p.variant ?? (caps.isCpuEmulated ? "registers" : "shared");
  if (variant !== "registers") return false;
  const plan = registerPlan(p);
  return plan.aMode !== "s" || plan.bMode !== "s";
}

export const matmul: Kernel<MatmulParams> = {
  name: "matmul",

  gpu(p: MatmulParams, caps: GpuCaps): GpuDispatch {
    check(p);
    const variant = p.variant ?? (caps.isCpuEmulated ? "registers" : "shared");
    const bias = p.bias ?? false;
    if (variant === "registers") {
      const plan = registerPlan(p);
      const { w, tilesM, tilesN } = params(p, plan.tm, plan.tn);
      const groups = Math.ceil((p.batch * tilesM * tilesN) / WG_REG);
      return {
        source: registersSource(plan, bias),
        workgroups: grid(groups, caps.maxWorkgroupsPerDimension),
        params: w.finish(),
      };
    }
    const { w, tilesM, tilesN } = params(p, TILE, TILE);
    return {
      source: sharedSource(bias),
      workgroups: grid(p.batch * tilesM * tilesN, caps.maxWorkgroupsPerDimension),
      params: w.finish(),
    };
  },

  cpu(p: MatmulParams, inputs: FloatArray[], [out]: FloatArray[]): void {
    check(p);
    const [A, B, bias] = inputs;
    const { M, N, K, a, b } = p;
    for (let bi = 0; bi < p.batch; bi++) {
      const aB = (a.offset ?? 0) + bi * a.batchStride, bB = (b.offset ?? 0) + bi * b.batchStride;
      for (let m = 0; m < M; m++) {
        for (let n = 0; n < N; n++) {
          let s = p.bias ? bias[n] : 0;
          let pa = aB + m * a.rowStride, pb = bB + n * b.colStride;
          for (let k = 0; k < K; k++) {
            s += A[pa] * B[pb];
            pa += a.colStride;
            pb += b.rowStride;
          }
          out[(bi * M + m) * N + n] = s;
        }
      }
    }
  },
};
