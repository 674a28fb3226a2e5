/**
 * @file The CPU reference backend: storage is a plain Float32Array (or Float64Array, for gradient checks) and
 * `run` calls the kernel's TypeScript reference directly. Nothing is pooled or batched; it needs no adapter.
 */

import type { FloatArray, Kernel } from "../kernels/types.ts";
import type { Backend, DeviceInfo, DType, Storage } from "./backend.ts";

interface CpuStorage extends Storage {
  data: FloatArray;
}

export class CpuBackend implements Backend {
  readonly info: DeviceInfo;
  /** `reason`: why the CPU backend was chosen (asked for, or no WebGPU adapter). */
  constructor(private readonly dtype: DType, reason = 'backend "cpu" was asked for') {
    this.info = {
      backend: "cpu",
      dtype,
      adapter: `CPU reference kernels (${dtype})`,
      api: "cpu",
      isCpuEmulated: true,
      reason,
      features: [],
      limits: {},
    };
  }
  alloc(elements: number): CpuStorage {
    const data = this.dtype === "float64" ? new Float64Array(elements) : new Float32Array(elements);
    return { elements, bytes: data.byteLength, data };
  }
  release(): void {}
  write(s: Storage, data: ArrayLike<number>): void {
    (s as CpuStorage).data.set(data);
  }
  read(s: Storage, elements: number): Promise<FloatArray> {
    return Promise.resolve((s as CpuStorage).data.slice(0, elements));
  }
  run<P>(kernel: Kernel<P>, params: P, inputs: Storage[], outputs: Storage[]): void {
    kernel.cpu(params, inputs.map((s) => (s as CpuStorage).data), outputs.map((s) => (s as CpuStorage).data));
  }
  flush(): void {}
  pooled() {
    return { bytes: 0, buffers: 0 };
  }
  counters() {
    return {};
  }
  destroy(): void {}
}
