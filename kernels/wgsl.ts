/**
 * @file WGSL building blocks shared by the kernel families: the binding header that follows the convention in
 * `types.ts`, uniform accessors, and grid sizing that stays under the 65535-workgroups-per-dimension limit.
 */

import { UNIFORM_WORDS } from "./types.ts";

/** Threads per workgroup for one-thread-per-element kernels. */
export const WG = 256;

/**
 * The binding declarations for `inputs` read-only arrays and `outputs` read-write arrays, the uniform block `P`
 * with accessors `pu(i)` (u32), `pi(i)` (i32) and `pf(i)` (f32), and `linearId`, which turns a 2-D grid from
 * `grid1d` back into one index.
 */
export function header(inputs: string[], outputs: string[], elem = "f32"): string {
  const lines: string[] = [];
  let b = 0;
  for (const name of inputs) {
    lines.push(`@group(0) @binding(${b++}) var<storage, read> ${name}: array<${elem}>;`);
  }
  for (const name of outputs) {
    lines.push(`@group(0) @binding(${b++}) var<storage, read_write> ${name}: array<${elem}>;`);
  }
  lines.push(`struct Params { v: array<vec4<u32>, ${UNIFORM_WORDS / 4}> }`);
  lines.push(`@group(0) @binding(${b}) var<uniform> P: Params;`);
  lines.push(`fn pu(i: u32) -> u32 { return P.v[i / 4u][i % 4u]; }`);
  lines.push(`fn pi(i: u32) -> i32 { return bitcast<i32>(pu(i)); }`);
  lines.push(`fn pf(i: u32) -> f32 { return bitcast<f32>(pu(i)); }`);
  lines.push(
    `fn linearId(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, wgSize: u32) -> u32 { return (wid.x + wid.y * nwg.x) * wgSize + lid; }`,
  );
  return lines.join("\n") + "\n";
}

/** Workgroup grid for `count` independent workgroups, folded into 2-D when it exceeds the per-dimension limit. */
export function grid(count: number, maxPerDim = 65535): [number, number, number] {
  const n = Math.max(1, count);
  if (n <= maxPerDim) return [n, 1, 1];
  const y = Math.ceil(n / maxPerDim);
  if (y > maxPerDim) throw new Error(`dispatch of ${count} workgroups exceeds the adapter's grid`);
  return [maxPerDim, y, 1];
}

/** Grid for one thread per element with `WG` threads per workgroup. */
export function grid1d(elements: number, maxPerDim = 65535): [number, number, number] {
  return grid(Math.ceil(elements / WG), maxPerDim);
}

/** Standard entry-point attributes for a 1-D kernel of `WG` threads. */
export const ENTRY_1D = `@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32)`;
