/**
 * @file The contract between a `Device` (engine/device.ts) and a backend that holds memory and runs kernels:
 * four verbs (alloc/release, write, read, run), a flush, and the numbers a device reports (pooled bytes,
 * counters, adapter info). Two backends implement it: the CPU reference (backend_cpu.ts) and WebGPU
 * (webgpu/backend.ts). The types live here rather than in device.ts so that the backends need not import the
 * device that imports them.
 */

import type { FloatArray, Kernel } from "../kernels/types.ts";
import type { Profile } from "./webgpu/profiler.ts";

export type BackendKind = "webgpu" | "cpu";
export type DType = "float32" | "float64";

export interface DeviceOptions {
  /** "webgpu" (default) or "cpu" (the reference kernels; no adapter needed). */
  backend?: BackendKind;
  /** With no WebGPU adapter, use the CPU backend (true, the default; one line on stderr says so) or throw. */
  fallback?: boolean;
  /** Element type of the CPU backend; "float64" is for gradient checks. WebGPU is always float32. */
  precision?: DType;
  /** Dispatches recorded before an automatic submit (default 64). */
  batchSize?: number;
  /** Bytes the buffer pool may hold for reuse before it destroys released buffers (default 1 GiB). */
  poolLimitBytes?: number;
  /** Bytes of pooled textures (for texture inputs) kept before idle ones are destroyed (default 256 MiB). */
  texturePoolLimitBytes?: number;
  /** Seed of the device's counter-based random generator (default 0). */
  seed?: number;
  /** WebGPU: time every dispatch with timestamp queries (where the adapter has them) for `Device.profile()`;
   * each dispatch then gets a pass of its own, which slows a step down. */
  profile?: boolean;
  /** Lowers the workgroups-per-dimension limit kernels plan for, so tests reach the 2-D grid path cheaply. */
  maxWorkgroupsPerDimension?: number;
}

/** A device allocation; its contents are reached only through the owning device. */
export interface Storage {
  readonly elements: number;
  readonly bytes: number;
}

export interface MemoryStats {
  /** Bytes in allocations that tensors hold. */
  liveBytes: number;
  liveAllocations: number;
  /** Most bytes live at once since the device was created or `resetPeakMemory()` was called. */
  peakLiveBytes: number;
  /** Bytes of released buffers kept for reuse. */
  pooledBytes: number;
  pooledBuffers: number;
}

/** Whether shaders reach the driver as GLSL (wgpu's GL backend), from `DeviceInfo.api` (see `GpuCaps.glsl`). */
export const isGlslApi = (info: Pick<DeviceInfo, "api">): boolean => info.api.startsWith("gl");

export interface DeviceInfo {
  backend: BackendKind;
  dtype: DType;
  adapter: string;
  /** "vulkan" or "gl" for WebGPU on Linux, with how it was determined; "cpu" for the reference backend. */
  api: string;
  isCpuEmulated: boolean;
  /** Why this backend and adapter: what was asked for, and what was found (for `deno task info`). */
  reason: string;
  features: string[];
  limits: Record<string, number>;
  /** WebGPU: whether kernels may read inputs as textures (see `TextureInput` in kernels/types.ts). */
  textureInputs?: boolean;
  /** WebGPU with texture inputs: how packing passes fill them, "render" or "compute" (where rgba32float is not
   * renderable, as on wgpu's GL backend). */
  packBy?: "render" | "compute";
}

/** What a device asks of its backend. */
export interface Backend {
  readonly info: DeviceInfo;
  alloc(elements: number): Storage;
  release(s: Storage): void;
  write(s: Storage, data: ArrayLike<number>): void;
  read(s: Storage, elements: number): Promise<FloatArray>;
  run<P>(kernel: Kernel<P>, params: P, inputs: Storage[], outputs: Storage[]): void;
  flush(): void;
  pooled(): { bytes: number; buffers: number };
  counters(): Record<string, number>;
  /** Device time per kernel since the last call, where the backend was created to profile; else null. */
  profile?(): Promise<Profile | null>;
  destroy(): void;
}
