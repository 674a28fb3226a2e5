/**
 * @file The contract between the engine and a kernel family.
 *
 * A kernel is one computation with two implementations side by side: `gpu` builds a WGSL dispatch, `cpu` is the
 * plain-TypeScript reference that tests compare against and that the CPU backend runs. Kernels know buffers and
 * shapes only, never tensors.
 *
 * Binding convention for every WGSL kernel (see `wgsl.ts`): inputs are read-only storage buffers at bindings
 * 0..n-1, outputs are read-write storage buffers at n..n+m-1, and a 512-byte uniform block of 32-bit words (the
 * kernel's sizes and scalars) sits at binding n+m. The WGSL source must depend only on the structure of the
 * parameters (rank, which variant), never on sizes or scalar values, so that pipelines are cached by source and a
 * new shape does not mean a recompile.
 *
 * Texture inputs (optional, WebGPU only): a dispatch may declare that some inputs are read as rgba32float
 * textures (`GpuDispatch.textures`). The device then records, before the dispatch, a packing pass per such input
 * that fills a pooled `width × height` texture from the input buffer through the kernel's own `texel(x, y)`
 * function, and binds that texture at the input's slot as `texture_storage_2d<rgba32float, read>`. On
 * CPU-emulated adapters (llvmpipe) a texel fetch is one vector gather of four floats, while every storage-buffer
 * load is a per-lane scalar loop, so a kernel that reads its operands through textures in a layout made for it
 * (four reduction values per texel, its register tile's rows next to each other) does several times fewer
 * load instructions. Read-only storage textures rather than sampled `texture_2d`: llvmpipe treats the mip level
 * of a sampled `textureLoad` as per-lane (wgpu clamps it), which costs as much again as the fetch itself.
 */

/** The element arrays kernels compute on: float32 on the device, float64 for gradient checks on the CPU. */
export type FloatArray = Float32Array | Float64Array;

/** What a kernel may know about the adapter when it picks a variant. */
export interface GpuCaps {
  /** Adapter description, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)". */
  description: string;
  /** True for CPU-emulated adapters (llvmpipe/lavapipe): they want register blocking, not shared-memory tiles. */
  isCpuEmulated: boolean;
  maxWorkgroupsPerDimension: number;
  maxStorageBufferBindingSize: number;
  features: ReadonlySet<string>;
  /** Largest texture side the device accepts; absent (or 0) where the backend cannot provide texture inputs. */
  maxTextureDimension2D?: number;
  /**
   * Shaders reach the driver as GLSL (wgpu's GL backend). naga then zero-initialises a workgroup array with a
   * constructor naming every element, which Mesa compiles in time superlinear in its length (a 4096-float array:
   * 79 s; 256 floats: 0.9 s), so kernels keep workgroup arrays small there.
   */
  glsl?: boolean;
  /** Threads a CPU-emulated adapter runs workgroups on (llvmpipe: one per CPU unless LP_NUM_THREADS says). */
  cpuThreads?: number;
}

/**
 * An input read as an rgba32float texture (see the file comment), filled in one of two ways before the dispatch:
 * - without `pack`: a flat copy of the start of the input buffer (a `copyBufferToTexture`, memcpy speed): texel
 *   t holds elements 4t..4t+3 and sits at (t % width, t / width), where `width` is `FLAT_WIDTH` (wgsl.ts; see
 *   `flatTextureSize`). Kernels address it with `flatTexel(t)`; only 4-aligned runs of elements are whole
 *   texels, and the last texel may extend past the buffer's elements into unspecified values.
 * - with `pack`: a packing pass writes every texel from `pack`, the WGSL of `fn texel(x: u32, y: u32) ->
 *   vec4<f32>`, which reads the input buffer through `srcAt(i: i32) -> f32` (element i, 0 for i < 0) and its
 *   own uniform words `params` through `pu`/`pi`/`pf`, and may use `divmod(x, d)` (cheap for x, d < 2^24). Any
 *   layout, transposition or zero padding. The device runs it as a flat copy plus a draw into the texture (see
 *   `packSource` in wgsl.ts): about 15 ns of CPU per texel on llvmpipe, against 2 for a plain copy.
 * Packing pipelines are cached by source like kernels.
 */
export interface TextureInput {
  /** Index of the input (0..n-1) that the kernel declares as `texture_storage_2d<rgba32float, read>`. */
  input: number;
  width: number;
  height: number;
  pack?: string;
  /** Uniform words of the packing pass; at most `UNIFORM_WORDS`. */
  params?: Uint32Array;
}

/** One compute dispatch: the source (cached by its text), the grid, and the uniform words. */
export interface GpuDispatch {
  source: string;
  workgroups: [number, number, number];
  /** Uniform words (u32, or f32 stored by bit pattern); at most `UNIFORM_WORDS`. */
  params?: Uint32Array;
  /** Inputs the kernel reads as textures (WebGPU only; a kernel asks for them only when caps allow). */
  textures?: TextureInput[];
}

export interface Kernel<P> {
  readonly name: string;
  gpu(p: P, caps: GpuCaps): GpuDispatch;
  cpu(p: P, inputs: FloatArray[], outputs: FloatArray[]): void;
}

/** Uniform block size in 32-bit words (512 bytes). */
export const UNIFORM_WORDS = 128;

/** Packs u32 and f32 values into uniform words, in order. */
export class ParamWriter {
  private readonly words = new Uint32Array(UNIFORM_WORDS);
  private readonly floats = new Float32Array(this.words.buffer);
  private n = 0;

  u32(...values: number[]): this {
    for (const v of values) {
      if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new Error(`uniform u32 out of range: ${v}`);
      this.check();
      this.words[this.n++] = v;
    }
    return this;
  }

  /** Signed integers travel as their two's-complement bit pattern; WGSL reads them with `bitcast<i32>`. */
  i32(...values: number[]): this {
    for (const v of values) {
      this.check();
      this.words[this.n++] = v | 0;
    }
    return this;
  }

  f32(...values: number[]): this {
    for (const v of values) {
      this.check();
      this.floats[this.n++] = v;
    }
    return this;
  }

  /** Current word index: where the next value will go. */
  get offset(): number {
    return this.n;
  }

  finish(): Uint32Array {
    return this.words.slice(0, Math.max(this.n, 4));
  }

  private check() {
    if (this.n >= UNIFORM_WORDS) throw new Error(`kernel parameters exceed ${UNIFORM_WORDS} uniform words`);
  }
}
