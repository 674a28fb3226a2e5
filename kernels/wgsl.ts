/**
 * @file WGSL building blocks shared by the kernel families: the binding header that follows the convention in
 * `types.ts`, uniform accessors, and grid sizing that stays under the 65535-workgroups-per-dimension limit.
 */

import { UNIFORM_WORDS } from "./types.ts";

/** Threads per workgroup for one-thread-per-element kernels. */
export const WG = 256;

/** WGSL type of an input read as a texture (see `TextureInput` in types.ts). */
export const TEXTURE_INPUT = "texture_storage_2d<rgba32float, read>";

/** Texels per row of a flat-copied texture input (16 KiB rows: a multiple of the 256-byte copy alignment). */
export const FLAT_WIDTH = 1024;

/** WGSL `flatTexel(t)`: the coordinates of texel t of a flat-copied texture input. */
export const FLAT_TEXEL_WGSL = `fn flatTexel(t: u32) -> vec2<i32> { return vec2<i32>(i32(t & ${
  FLAT_WIDTH - 1
}u), i32(t >> ${Math.log2(FLAT_WIDTH)}u)); }`;

/** Size of the flat-copied texture of a buffer of `elements` floats. */
export function flatTextureSize(elements: number): { width: number; height: number } {
  return { width: FLAT_WIDTH, height: Math.max(1, Math.ceil(Math.ceil(elements / 4) / FLAT_WIDTH)) };
}

/**
 * The binding declarations for `inputs` read-only arrays and `outputs` read-write arrays, the uniform block `P`
 * with accessors `pu(i)` (u32), `pi(i)` (i32) and `pf(i)` (f32), and `linearId`, which turns a 2-D grid from
 * `grid1d` back into one index. Inputs whose index is in `textureInputs` are declared as read-only rgba32float
 * storage textures instead (the dispatch must list them in `textures`).
 */
export function header(
  inputs: string[],
  outputs: string[],
  elem = "f32",
  textureInputs: readonly number[] = [],
): string {
  const lines: string[] = [];
  let b = 0;
  for (const [i, name] of inputs.entries()) {
    lines.push(
      textureInputs.includes(i)
        ? `@group(0) @binding(${b++}) var ${name}: ${TEXTURE_INPUT};`
        : `@group(0) @binding(${b++}) var<storage, read> ${name}: array<${elem}>;`,
    );
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

/**
 * WGSL statements that split the linear index in the `var rem` into coordinates of a row-major shape of `rank`
 * dimensions, innermost first: for each dimension d they bind `c` to its coordinate and emit `use(d)`. The size
 * of dimension d is the uniform word `sizeWord + d`. The outermost coordinate is what is left of `rem`, with no
 * division. (An f32-reciprocal divmod in place of u32 `/` and `%`, which x86 cannot vectorise, measured the same
 * in the elementwise kernel: 3 A/B runs each of broadcast and permuted operands, V = 1 and 4.)
 */
export function splitIndexWgsl(rank: number, sizeWord: number, use: (d: number) => string[]): string[] {
  const lines: string[] = [];
  for (let d = rank - 1; d >= 0; d--) {
    if (d > 0) {
      lines.push(`{ let c = rem % pu(${sizeWord + d}u); rem = rem / pu(${sizeWord + d}u);`);
    } else lines.push(`{ let c = rem;`);
    lines.push(...use(d).map((l) => `  ${l}`), `}`);
  }
  return lines;
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

/**
 * The packing pass for a texture input (see `TextureInput` in types.ts): a full-screen triangle drawn into the
 * texture, whose fragment shader returns `texel(x, y)` for every texel. It reads the input through `srcAt(i)`
 * from a flat copy of the input buffer, `src` (bound like a flat texture input, at binding 0), with the uniform
 * block at binding 1. Why a render pass: on llvmpipe a fragment shader's colour writes are vector stores and
 * texel fetches are vector gathers, while a compute shader's image stores and storage loads are per-lane scalar
 * loops; packing costs about 15 ns of CPU per texel this way and 40 as a compute pass. A draw has a larger fixed
 * cost (a 2,304-texel weight panel: 0.4–0.8 ms per conv2d run against 0.02–0.2 ms as a compute pass, alone), but
 * packing textures under 8,192 texels by compute passes did not pay in the default training step (35 panels a
 * step; 40 interleaved rounds: median paired difference 15 ms slower), so packs are draws wherever they can be.
 *
 * `by: "compute"` is that compute pass, for adapters that cannot render to rgba32float (wgpu's GL backend says
 * "Format Rgba32Float is not renderable"; read-only and write-only rgba32float storage textures work there): one
 * invocation per texel stores `texel(x, y)` into `dst`, a write-only storage texture at binding 2. Worth it: on
 * GL llvmpipe a batch of four 256³ matmuls took 14 ms with the texture variant against 26 ms ("registers")
 * and 157 ms ("shared"), the same 14 ms as on Vulkan lavapipe.
 */
export function packSource(texelFn: string, by: PackBy = "render"): string {
  return `@group(0) @binding(0) var src: ${TEXTURE_INPUT};
struct Params { v: array<vec4<u32>, ${UNIFORM_WORDS / 4}> }
@group(0) @binding(1) var<uniform> P: Params;
fn pu(i: u32) -> u32 { return P.v[i / 4u][i % 4u]; }
fn pi(i: u32) -> i32 { return bitcast<i32>(pu(i)); }
fn pf(i: u32) -> f32 { return bitcast<f32>(pu(i)); }
${FLAT_TEXEL_WGSL}
/** Element i of the input buffer, or 0 for a negative index (padding). */
fn srcAt(i: i32) -> f32 {
  let t = u32(max(i, 0));
  return select(0.0, textureLoad(src, flatTexel(t >> 2u))[t & 3u], i >= 0);
}
/**
 * (x / d, x % d) for 0 < d and x < 2^24 without an integer division (a scalar loop over the lanes on llvmpipe):
 * the float quotient is off by a few units at most (WGSL allows 2.5 ULP), the remainder's float quotient fixes
 * that to within one, and the last two steps make it exact.
 */
fn divmod(x: u32, d: u32) -> vec2<u32> {
  var q = i32(f32(x) / f32(d));
  q += i32(floor(f32(i32(x) - q * i32(d)) / f32(d)));
  q = select(q, q - 1, q * i32(d) > i32(x));
  q = select(q, q + 1, (q + 1) * i32(d) <= i32(x));
  return vec2<u32>(u32(q), x - u32(q) * d);
}
${texelFn}
${by === "render" ? PACK_BY_RENDER : PACK_BY_COMPUTE}`;
}

/** How packing passes write their texture: a draw into it (render target) or a compute pass's texel stores. */
export type PackBy = "render" | "compute";

const PACK_BY_RENDER = `@vertex
fn vs(@builtin(vertex_index) i: u32) -> @builtin(position) vec4<f32> {
  // One triangle that covers the whole target.
  return vec4<f32>(f32(i & 1u) * 4.0 - 1.0, f32(i >> 1u) * 4.0 - 1.0, 0.0, 1.0);
}
@fragment
fn fs(@builtin(position) pos: vec4<f32>) -> @location(0) vec4<f32> {
  return texel(u32(pos.x), u32(pos.y));
}
`;

/** Workgroup edge of the compute packing pass (texels per side). */
export const PACK_TILE = 8;

const PACK_BY_COMPUTE = `@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
@compute @workgroup_size(${PACK_TILE}, ${PACK_TILE})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let size = textureDimensions(dst);
  if (gid.x < size.x && gid.y < size.y) { textureStore(dst, gid.xy, texel(gid.x, gid.y)); }
}
`;
