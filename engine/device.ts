/**
 * @file Devices: where tensors live and kernels run.
 *
 * A `Device` wraps one of two backends behind the same four verbs (alloc/release, write, read, run; the contract
 * is in backend.ts) and adds what is the same for both: counting live bytes, the random generator's state, the
 * default device, and a known-answer kernel at start-up.
 *
 * - `webgpu` (webgpu/backend.ts): Deno's WebGPU. Kernels are recorded into one open compute pass and submitted
 *   in batches; nothing syncs with the host until a read. Pipelines are cached by WGSL source, sizes travel as
 *   uniforms, buffers and textures come from pools (see the files under webgpu/).
 * - `cpu` (backend_cpu.ts): the kernels' plain-TypeScript references, in float32 or (for gradient checks)
 *   float64.
 *
 * `Device.create()` probes the adapter (features, limits) and runs a known-answer kernel before returning. With
 * no WebGPU adapter at all (no driver installed), `backend: "webgpu"` falls back to the CPU backend with one line
 * on stderr, unless `fallback: false` asks it to throw; `info.reason` says which was chosen and why.
 */

import { bin, elementwise, inp } from "../kernels/elementwise.ts";
import type { FloatArray, Kernel } from "../kernels/types.ts";
import type {
  Backend,
  BackendKind,
  DeviceInfo,
  DeviceOptions,
  DType,
  MemoryStats,
  Storage,
} from "./backend.ts";
import { CpuBackend } from "./backend_cpu.ts";
import { DRIVER_HINT, NoAdapterError } from "./webgpu/adapter.ts";
import { WebGpuBackend } from "./webgpu/backend.ts";
import type { Profile } from "./webgpu/profiler.ts";

export type {
  Backend,
  BackendKind,
  DeviceInfo,
  DeviceOptions,
  DType,
  MemoryStats,
  Storage,
} from "./backend.ts";

let defaultDevice: Device | null = null;

/**
 * A tensor the backend could not allocate: above the adapter's storage binding limit, or host memory exhausted
 * (a typed array of that size). Commands turn it into an error naming the option that sized the tensor.
 */
export class AllocationError extends Error {
  override name = "AllocationError";
  constructor(readonly elements: number, readonly shape: readonly number[] | null, cause: string) {
    super(
      `cannot allocate ${shape ? `a [${shape.join(", ")}] tensor` : "a tensor"} of ${elements} values ` +
        `(${(elements * 4 / 2 ** 20).toPrecision(3)} MiB): ${cause}`,
    );
  }
}

/** The device that tensor constructors use when none is given. */
export function getDefaultDevice(): Device {
  if (!defaultDevice) throw new Error("no device: call `await Device.create()` first (or pass { device })");
  return defaultDevice;
}

export class Device {
  /** Random generator state: a Philox key and the next unused counter. */
  readonly rng: { seed: number; counter: number };
  #live = 0;
  #liveCount = 0;
  /** Most live bytes since creation or the last `resetPeakMemory()`. */
  #peak = 0;

  private constructor(private readonly backend: Backend, seed: number) {
    this.rng = { seed, counter: 0 };
  }

  static async create(opts: DeviceOptions = {}): Promise<Device> {
    const kind = opts.backend ?? "webgpu";
    let backend: Backend;
    if (kind === "cpu") backend = new CpuBackend(opts.precision ?? "float32");
    else if (kind === "webgpu") {
      if (opts.precision === "float64") throw new Error("the webgpu backend computes in float32 only");
      try {
        backend = await WebGpuBackend.create(opts);
      } catch (e) {
        if (!(e instanceof NoAdapterError) || opts.fallback === false) throw e;
        // Everything still runs (the CPU kernels are the references the GPU ones are tested against), slowly.
        console.error(`no WebGPU adapter: using the CPU reference kernels (slow); ${DRIVER_HINT}`);
        backend = new CpuBackend(
          "float32",
          `backend "webgpu" was asked for, but ${e.why}: fell back to the CPU reference kernels ` +
            `(${DRIVER_HINT}, or pass fallback: false to throw)`,
        );
      }
    } else throw new Error(`unknown backend "${kind}" (expected "webgpu" or "cpu")`);
    const device = new Device(backend, opts.seed ?? 0);
    await device.knownAnswerTest();
    defaultDevice ??= device;
    return device;
  }

  /** Makes this the device used when none is given. */
  makeDefault(): this {
    defaultDevice = this;
    return this;
  }

  get info(): DeviceInfo {
    return this.backend.info;
  }
  get kind(): BackendKind {
    return this.backend.info.backend;
  }
  get dtype(): DType {
    return this.backend.info.dtype;
  }

  /** Resets the random generator: the same seed gives the same numbers on every run and backend. */
  manualSeed(seed: number): void {
    this.rng.seed = seed >>> 0;
    this.rng.counter = 0;
  }

  /** Allocates `elements` values (of a tensor of `shape`, named in an `AllocationError`). */
  alloc(elements: number, shape?: readonly number[]): Storage {
    let s: Storage;
    try {
      s = this.backend.alloc(elements);
    } catch (e) {
      throw new AllocationError(elements, shape ?? null, (e as Error).message);
    }
    this.#live += s.bytes;
    this.#liveCount++;
    if (this.#live > this.#peak) this.#peak = this.#live;
    return s;
  }

  release(s: Storage): void {
    this.#live -= s.bytes;
    this.#liveCount--;
    this.backend.release(s);
  }

  write(s: Storage, data: ArrayLike<number>): void {
    if (data.length !== s.elements) {
      throw new Error(`write of ${data.length} values into ${s.elements} elements`);
    }
    this.backend.write(s, data);
  }

  /** Reads an allocation back (submitting pending work first). */
  read(s: Storage, elements = s.elements): Promise<FloatArray> {
    return this.backend.read(s, elements);
  }

  /** Records (WebGPU) or runs (CPU) one kernel. */
  run<P>(kernel: Kernel<P>, params: P, inputs: Storage[], outputs: Storage[]): void {
    this.backend.run(kernel, params, inputs, outputs);
  }

  /** Submits recorded work without waiting for it. */
  flush(): void {
    this.backend.flush();
  }

  /** Starts the peak of `memory().peakLiveBytes` over from the bytes live now. */
  resetPeakMemory(): void {
    this.#peak = this.#live;
  }

  memory(): MemoryStats {
    const p = this.backend.pooled();
    return {
      liveBytes: this.#live,
      liveAllocations: this.#liveCount,
      peakLiveBytes: this.#peak,
      pooledBytes: p.bytes,
      pooledBuffers: p.buffers,
    };
  }

  /** Dispatch, submit and pipeline counters (WebGPU), for benchmarks and tests. */
  counters(): Record<string, number> {
    return this.backend.counters();
  }

  /**
   * Device time per kernel since the last call (submitting pending work first), for a device created with
   * `profile: true` on an adapter with timestamp queries; null otherwise.
   */
  async profile(): Promise<Profile | null> {
    return await this.backend.profile?.() ?? null;
  }

  destroy(): void {
    if (defaultDevice === this) defaultDevice = null;
    this.backend.destroy();
  }

  private async knownAnswerTest() {
    const a = this.alloc(3), b = this.alloc(3), c = this.alloc(3);
    this.write(a, [1, 2, 3]);
    this.write(b, [10, 20, 30]);
    this.run(elementwise, { expr: bin("add", inp(0), inp(1)), consts: [], shape: [3], strides: [[1], [1]] }, [
      a,
      b,
    ], [
      c,
    ]);
    const got = await this.read(c);
    for (const s of [a, b, c]) this.release(s);
    if (got[0] !== 11 || got[1] !== 22 || got[2] !== 33) {
      throw new Error(`device failed its known-answer kernel: 1+10, 2+20, 3+30 gave [${Array.from(got)}]`);
    }
  }
}
