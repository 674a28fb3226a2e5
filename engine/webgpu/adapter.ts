/**
 * @file Start-up of the WebGPU backend: requesting the adapter and device (with the adapter's own limits, which
 * on llvmpipe are far above the defaults), describing them (`DeviceInfo` for `deno task info`, `GpuCaps` for the
 * kernels' variant choice), and probing whether texture inputs work at all.
 */

import type { GpuCaps } from "../../kernels/types.ts";
import { type PackBy, packSource, TEXTURE_INPUT } from "../../kernels/wgsl.ts";
import { type DeviceInfo, isGlslApi } from "../backend.ts";
import { PACK_COMPUTE_KINDS, type PipelineCache } from "./pipeline_cache.ts";

/** Which native API wgpu picked; the adapter does not say, so this reports how it was inferred. */
function detectApi(): string {
  const forced = Deno.env.get("DENO_WEBGPU_BACKEND");
  if (forced) return `${forced} (DENO_WEBGPU_BACKEND)`;
  if (Deno.build.os !== "linux") return "native default";
  // The Vulkan loader reads only the drivers these variables list when one is set (VK_DRIVER_FILES is the
  // newer name of VK_ICD_FILENAMES).
  for (const name of ["VK_DRIVER_FILES", "VK_ICD_FILENAMES"]) {
    const list = Deno.env.get(name);
    if (!list) continue;
    const found = list.split(":").some((f) => {
      try {
        return Deno.statSync(f).isFile;
      } catch {
        return false;
      }
    });
    return found ? `vulkan (${name})` : `gl (${name} lists no driver that exists)`;
  }
  for (const dir of ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]) {
    try {
      for (const e of Deno.readDirSync(dir)) {
        if (e.name.endsWith(".json")) return "vulkan (an ICD is installed)";
      }
    } catch { /* no such folder */ }
  }
  return "gl (no Vulkan ICD installed)";
}

/** What to install for a faster device than the CPU reference kernels. */
export const DRIVER_HINT = "install mesa-vulkan-drivers for lavapipe";

/** Thrown when there is no WebGPU adapter at all, so that `Device.create()` can fall back to the CPU backend. */
export class NoAdapterError extends Error {
  constructor(readonly why: string) {
    super(
      `no WebGPU adapter: ${why}. On Linux, ${DRIVER_HINT} (\`apt-get install mesa-vulkan-drivers libvulkan1\`), ` +
        'or run on the CPU reference backend with Device.create({ backend: "cpu" })',
    );
  }
}

/** The high-performance adapter, or null (with why) when this Deno has no WebGPU or no adapter. */
export async function findAdapter(): Promise<{ adapter: GPUAdapter } | { adapter: null; why: string }> {
  if (!("gpu" in navigator) || !navigator.gpu) {
    return { adapter: null, why: "this Deno has no navigator.gpu" };
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    const forced = Deno.env.get("DENO_WEBGPU_BACKEND");
    return {
      adapter: null,
      why: `navigator.gpu.requestAdapter() found none${forced ? ` (DENO_WEBGPU_BACKEND=${forced})` : ""}`,
    };
  }
  return { adapter };
}

/** The high-performance adapter and a device with its limits; with no adapter, a `NoAdapterError`. */
export async function requestGpu(): Promise<{ adapter: GPUAdapter; device: GPUDevice }> {
  const found = await findAdapter();
  if (!found.adapter) {
    throw new NoAdapterError(found.why);
  }
  const adapter = found.adapter;
  const wanted: GPUFeatureName[] = ["shader-f16", "timestamp-query"];
  const device = await adapter.requestDevice({
    requiredFeatures: wanted.filter((f) => adapter.features.has(f)),
    requiredLimits: {
      maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
      maxBufferSize: adapter.limits.maxBufferSize,
      maxStorageBuffersPerShaderStage: adapter.limits.maxStorageBuffersPerShaderStage,
      maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: adapter.limits.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: adapter.limits.maxComputeWorkgroupSizeX,
      // Texture inputs: lavapipe allows 16384 (the default limit is 8192) and dozens of storage textures.
      maxTextureDimension2D: adapter.limits.maxTextureDimension2D,
      maxStorageTexturesPerShaderStage: adapter.limits.maxStorageTexturesPerShaderStage,
    },
  });
  return { adapter, device };
}

/**
 * Threads llvmpipe runs compute workgroups on: LP_NUM_THREADS when set (and readable), otherwise one per CPU, at
 * most 16 (Mesa's limit). Kernels balance their workgroups over them (see texWeightGradInnerSplits).
 */
function emulatorThreads(): number {
  // Asked only when already granted (a prompt in the middle of a run would be worse than the default).
  const granted = Deno.permissions.querySync({ name: "env", variable: "LP_NUM_THREADS" }).state === "granted";
  const fromEnv = granted ? Number(Deno.env.get("LP_NUM_THREADS")) : NaN;
  const n = Number.isInteger(fromEnv) && fromEnv > 0 ? fromEnv : navigator.hardwareConcurrency ?? 2;
  return Math.max(1, Math.min(16, n));
}

/**
 * What the device reports (`info`) and what kernels may know (`caps`); `gridLimit` lowers the workgroups per
 * dimension that kernels plan for (tests use it to reach the 2-D grid path cheaply).
 */
export function describeGpu(
  device: GPUDevice,
  adapter: GPUAdapter,
  gridLimit?: number,
): { info: DeviceInfo; caps: GpuCaps } {
  const limits: Record<string, number> = {};
  for (
    const k of [
      "maxStorageBufferBindingSize",
      "maxBufferSize",
      "maxComputeWorkgroupsPerDimension",
      "maxComputeInvocationsPerWorkgroup",
      "maxComputeWorkgroupStorageSize",
      "maxStorageBuffersPerShaderStage",
      "maxTextureDimension2D",
      "maxStorageTexturesPerShaderStage",
    ] as const
  ) limits[k] = device.limits[k];
  const description = adapter.info.description || adapter.info.device || "unknown adapter";
  const isCpuEmulated = adapter.info.isFallbackAdapter ||
    /llvmpipe|lavapipe|swiftshader/i.test(description);
  const info: DeviceInfo = {
    backend: "webgpu",
    dtype: "float32",
    adapter: description,
    api: detectApi(),
    isCpuEmulated,
    reason: `backend "webgpu" (the default): the high-performance adapter, through ${detectApi()}`,
    features: [...device.features].sort(),
    limits,
    textureInputs: true,
  };
  const caps: GpuCaps = {
    description,
    isCpuEmulated,
    maxWorkgroupsPerDimension: Math.min(limits.maxComputeWorkgroupsPerDimension, gridLimit ?? Infinity),
    maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
    features: new Set(device.features),
    maxTextureDimension2D: limits.maxTextureDimension2D,
    glsl: isGlslApi(info),
    cpuThreads: isCpuEmulated ? emulatorThreads() : undefined,
  };
  return { info, caps };
}

/**
 * Whether texture inputs work, and how packing passes write their textures: texture inputs need read-only
 * storage textures in compute shaders; packing passes render into rgba32float where the adapter can ("render")
 * and otherwise store texels from a compute pass ("compute"; wgpu's GL backend cannot render to rgba32float).
 * `null` means no texture inputs: kernels are told so and use their other variants.
 */
export async function probeTextureInputs(
  device: GPUDevice,
  pipelines: PipelineCache,
): Promise<PackBy | null> {
  const builds = async (build: () => void) => {
    device.pushErrorScope("validation");
    device.pushErrorScope("internal");
    build();
    const internal = await device.popErrorScope(), validation = await device.popErrorScope();
    return !internal && !validation;
  };
  const texelFn = "fn texel(x: u32, y: u32) -> vec4<f32> { return vec4<f32>(srcAt(i32(x + y))); }";
  const reads = await builds(() => {
    const compute = device.createShaderModule({
      code: `@group(0) @binding(0) var t: ${TEXTURE_INPUT};
@group(0) @binding(1) var<storage, read_write> o: array<f32>;
@group(0) @binding(2) var<uniform> u: vec4<u32>;
@compute @workgroup_size(1) fn main() { o[0] = textureLoad(t, vec2<u32>(u.x, 0u)).x; }`,
    });
    device.createComputePipeline({
      layout: pipelines.layoutFor("twu").pipeline,
      compute: { module: compute, entryPoint: "main" },
    });
  });
  if (!reads) return null;
  const renders = await builds(() => {
    const pack = device.createShaderModule({ code: packSource(texelFn, "render") });
    device.createRenderPipeline({
      layout: pipelines.layoutFor("tu", GPUShaderStage.FRAGMENT).pipeline,
      vertex: { module: pack, entryPoint: "vs" },
      fragment: { module: pack, entryPoint: "fs", targets: [{ format: "rgba32float" }] },
      primitive: { topology: "triangle-list" },
    });
  });
  if (renders) return "render";
  const stores = await builds(() => {
    const pack = device.createShaderModule({ code: packSource(texelFn, "compute") });
    device.createComputePipeline({
      layout: pipelines.layoutFor(PACK_COMPUTE_KINDS).pipeline,
      compute: { module: pack, entryPoint: "main" },
    });
  });
  return stores ? "compute" : null;
}
