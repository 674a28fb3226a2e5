/**
 * @file How row-wise kernels (norm.ts, softmax.ts, reduce.ts) map rows to threads, and the WGSL declarations of
 * their lanes variants.
 *
 * - "tree" (real GPUs): each row gets a segment of T threads (a power of two up to `WG`), merged by tree
 *   reductions in workgroup memory; `pickThreadsPerRow` chooses T.
 * - "lanes" (CPU-emulated adapters): llvmpipe runs a workgroup 8 invocations to a vector, turns every storage
 *   load into a per-lane loop and every barrier into a coroutine switch, so throughput comes from few
 *   instructions per element, not from many threads. A row gets one lane (or a few, when rows are scarce,
 *   merged with one barrier; `lanesPerRow`), each lane owning a contiguous run of the row read in units of
 *   V = 4 (vec4) or 1 elements (`unitDecls`). "lanesTexture" reads the inputs through flat textures instead.
 */

import type { GpuCaps } from "./types.ts";
import { FLAT_TEXEL_WGSL, header, WG } from "./wgsl.ts";

/**
 * How a row kernel maps rows to threads (see the file comment): "tree" (segments of threads per row, tree
 * merges; for real GPUs), "lanes" (a few threads per row, each owning a contiguous run of the row, vec4 where
 * the layout allows; for CPU-emulated adapters) and "lanesTexture" (lanes reading their inputs as textures).
 * Absent: chosen from the adapter. A variant a layout cannot run falls back to the next one that can.
 */
export type RowVariant = "tree" | "lanes" | "lanesTexture";

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

/**
 * Threads per workgroup of the lanes variants; lanes per row divide it. 16, 32 and 128 measured no better at
 * [8,64,32,32], 256 slower (2 workgroups for 2 threads: 2.0 against 1.8 ms fwd+bwd).
 */
export const LANE_WG = 64;

/**
 * Lanes per row: one while there are enough rows to give the adapter's threads many 8-wide vectors, otherwise
 * more (whole segments each, at least 32 units each), merged through workgroup memory with one barrier. More
 * lanes than that measured slower at [8,64,32,32] (WANT_LANES 512: 2.2 against 1.8 ms fwd+bwd).
 */
export function lanesPerRow(rows: number, segments: number, unitsPerSegment: number): number {
  const WANT_LANES = 128, MIN_UNITS = 32;
  let T = 1;
  while (
    T < LANE_WG && rows * T < WANT_LANES && 2 * T <= segments &&
    Math.floor(segments / (2 * T)) * unitsPerSegment >= MIN_UNITS
  ) T *= 2;
  return T;
}

/**
 * Declarations of a kernel that walks contiguous rows in units of V elements (the lanes variants here and in
 * softmax.ts): the bindings from `header`, with `unitArrays` declared as arrays of the unit type `U` (vec4<f32>
 * or f32) and `vec4Arrays` as vec4 arrays; `ld_<name>(i)`, unit i of each input in `unitInputs` (indices into
 * `inputs`), from its flat texture where `texture` (flat copies: V must be 4) or else its buffer; and
 * `hsum(U) -> f32`, the sum of a unit's elements.
 */
export function unitDecls(
  V: 1 | 4,
  texture: boolean,
  inputs: string[],
  outputs: string[],
  unitInputs: number[],
  unitArrays: string[],
  vec4Arrays: string[] = [],
): string {
  const U = V === 4 ? "vec4<f32>" : "f32";
  let decls = header(inputs, outputs, "f32", texture ? unitInputs : []);
  for (const name of [...unitArrays, ...vec4Arrays]) {
    const type = unitArrays.includes(name) ? U : "vec4<f32>";
    decls = decls.replace(
      new RegExp(`(var<storage, read(_write)?> ${name}): array<f32>;`),
      `$1: array<${type}>;`,
    );
  }
  const loads = unitInputs.map((i) => inputs[i]).map((name) =>
    texture
      ? `fn ld_${name}(i: u32) -> U { return textureLoad(${name}, flatTexel(i)); }`
      : `fn ld_${name}(i: u32) -> U { return ${name}[i]; }`
  );
  return decls + `alias U = ${U};
${texture ? FLAT_TEXEL_WGSL : ""}
${loads.join("\n")}
fn hsum(v: U) -> f32 { return ${V === 4 ? "v.x + v.y + v.z + v.w" : "v"}; }
`;
}
