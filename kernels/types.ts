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
}

/** One compute dispatch: the source (cached by its text), the grid, and the uniform words. */
export interface GpuDispatch {
  source: string;
  workgroups: [number, number, number];
  /** Uniform words (u32, or f32 stored by bit pattern); at most `UNIFORM_WORDS`. */
  params?: Uint32Array;
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
