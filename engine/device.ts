/**
 * @file Devices: where tensors live and kernels run.
 *
 * A `Device` wraps one of two backends behind the same four verbs (alloc/release, write, read, run):
 *
 * - `webgpu`: Deno's WebGPU. Kernels are recorded into one open compute pass and submitted in batches; nothing
 *   syncs with the host until a read. Pipelines are cached by WGSL source (sizes travel as uniforms, one 512-byte
 *   slot per dispatch in a ring that is uploaded once per batch). Buffers come from a size-bucketed pool; a
 *   released buffer returns to the pool only after the batch that may still read it has been submitted, so queue
 *   writes into a reused buffer can never overtake a recorded read. A dispatch may read some inputs as textures
 *   (`GpuDispatch.textures`): the backend takes a pooled rgba32float texture per such input and records, just
 *   before the dispatch, either a flat copy of the buffer into it or the kernel's packing pass (a flat copy into
 *   a second pooled texture, then a draw that writes every texel; see `packSource` in kernels/wgsl.ts).
 * - `cpu`: the kernels' plain-TypeScript references, in float32 or (for gradient checks) float64.
 *
 * `Device.create()` probes the adapter (features, limits) and runs a known-answer kernel before returning.
 */

import { bin, elementwise, inp } from "../kernels/elementwise.ts";
import type { FloatArray, GpuCaps, Kernel, TextureInput } from "../kernels/types.ts";
import { UNIFORM_WORDS } from "../kernels/types.ts";
import { flatTextureSize, packSource, TEXTURE_INPUT } from "../kernels/wgsl.ts";

export type BackendKind = "webgpu" | "cpu";
export type DType = "float32" | "float64";

export interface DeviceOptions {
  /** "webgpu" (default) or "cpu" (the reference kernels; no adapter needed). */
  backend?: BackendKind;
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
  /** Bytes of released buffers kept for reuse. */
  pooledBytes: number;
  pooledBuffers: number;
}

export interface DeviceInfo {
  backend: BackendKind;
  dtype: DType;
  adapter: string;
  /** "vulkan" or "gl" for WebGPU on Linux, with how it was determined; "cpu" for the reference backend. */
  api: string;
  isCpuEmulated: boolean;
  features: string[];
  limits: Record<string, number>;
  /** WebGPU: whether kernels may read inputs as textures (see `TextureInput` in kernels/types.ts). */
  textureInputs?: boolean;
}

interface Backend {
  readonly info: DeviceInfo;
  alloc(elements: number): Storage;
  release(s: Storage): void;
  write(s: Storage, data: ArrayLike<number>): void;
  read(s: Storage, elements: number): Promise<FloatArray>;
  run<P>(kernel: Kernel<P>, params: P, inputs: Storage[], outputs: Storage[]): void;
  flush(): void;
  pooled(): { bytes: number; buffers: number };
  counters(): Record<string, number>;
  destroy(): void;
}

let defaultDevice: Device | null = null;

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

  private constructor(private readonly backend: Backend, seed: number) {
    this.rng = { seed, counter: 0 };
  }

  static async create(opts: DeviceOptions = {}): Promise<Device> {
    const kind = opts.backend ?? "webgpu";
    let backend: Backend;
    if (kind === "cpu") backend = new CpuBackend(opts.precision ?? "float32");
    else if (kind === "webgpu") {
      if (opts.precision === "float64") throw new Error("the webgpu backend computes in float32 only");
      backend = await WebGpuBackend.create(opts);
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

  alloc(elements: number): Storage {
    const s = this.backend.alloc(elements);
    this.#live += s.bytes;
    this.#liveCount++;
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

  memory(): MemoryStats {
    const p = this.backend.pooled();
    return {
      liveBytes: this.#live,
      liveAllocations: this.#liveCount,
      pooledBytes: p.bytes,
      pooledBuffers: p.buffers,
    };
  }

  /** Dispatch, submit and pipeline counters (WebGPU), for benchmarks and tests. */
  counters(): Record<string, number> {
    return this.backend.counters();
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

// ---------------------------------------------------------------------------------------------------------------
// CPU reference backend.

interface CpuStorage extends Storage {
  data: FloatArray;
}

class CpuBackend implements Backend {
  readonly info: DeviceInfo;
  constructor(private readonly dtype: DType) {
    this.info = {
      backend: "cpu",
      dtype,
      adapter: `CPU reference kernels (${dtype})`,
      api: "cpu",
      isCpuEmulated: true,
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

// ---------------------------------------------------------------------------------------------------------------
// WebGPU backend.

interface GpuStorage extends Storage {
  buffer: GPUBuffer;
  /** Pool bucket the buffer belongs to. */
  bucket: number;
  /** Bumped by every recorded write (a queue write, or a kernel's output): textures filled before are stale. */
  version: number;
}

/** A texture input filled from a buffer at one version, kept for reuse while the buffer is unchanged. */
interface FilledTexture {
  version: number;
  width: number;
  height: number;
  /** The packing function (memoized by the kernels, so usually the same string object), or none: a flat copy. */
  pack: string | undefined;
  params: Uint32Array | undefined;
  tex: PooledTexture;
}

/** Filled textures kept per buffer: a weight is read in two layouts (forward and input gradient), plus spares. */
const FILLED_PER_BUFFER = 4;

const sameWords = (a: Uint32Array | undefined, b: Uint32Array | undefined) =>
  a === b || (a !== undefined && b !== undefined && a.length === b.length && a.every((v, i) => v === b[i]));

/** A pooled rgba32float texture for texture inputs, with its one view. */
interface PooledTexture {
  texture: GPUTexture;
  view: GPUTextureView;
  key: string;
  bytes: number;
}

/**
 * Binding kinds, one letter per binding, that key the explicit bind-group layouts: "r" read-only storage buffer,
 * "w" read-write storage buffer, "t" read-only rgba32float storage texture, "u" uniform.
 */
type BindingKinds = string;

const SLOT_BYTES = UNIFORM_WORDS * 4;
const RING_SLOTS = 256;

/** Pool bucket: four size classes per power of two (at most 25% waste), 256 bytes at least. */
function bucketBytes(bytes: number): number {
  if (bytes <= 256) return 256;
  const p = 2 ** Math.floor(Math.log2(bytes));
  for (const f of [1, 1.25, 1.5, 1.75, 2]) if (p * f >= bytes) return Math.ceil((p * f) / 256) * 256;
  return 2 * p;
}

/** Which native API wgpu picked; the adapter does not say, so this reports how it was inferred. */
function detectApi(): string {
  const forced = Deno.env.get("DENO_WEBGPU_BACKEND");
  if (forced) return `${forced} (DENO_WEBGPU_BACKEND)`;
  if (Deno.build.os !== "linux") return "native default";
  for (const dir of ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]) {
    try {
      for (const e of Deno.readDirSync(dir)) {
        if (e.name.endsWith(".json")) return "vulkan (an ICD is installed)";
      }
    } catch { /* no such folder */ }
  }
  return "gl (no Vulkan ICD installed)";
}

class WebGpuBackend implements Backend {
  readonly info: DeviceInfo;
  private readonly caps: GpuCaps;
  /**
   * Compute pipelines by binding kinds, then by source. Nested rather than keyed by a concatenation: kernels hand
   * over the same (memoized) source string every time, whose hash V8 computes once, while a concatenated key
   * is a new string, up to 80 KB, hashed again on every dispatch.
   */
  private readonly pipelines = new Map<BindingKinds, Map<string, GPUComputePipeline>>();
  private readonly layouts = new Map<string, { group: GPUBindGroupLayout; pipeline: GPUPipelineLayout }>();
  /** Packing pipelines by the kernel's `texel` function (the packing source is built only on a miss). */
  private readonly renderPipelines = new Map<string, GPURenderPipeline>();
  private readonly textures = new Map<string, PooledTexture[]>();
  private textureBytes = 0;
  private readonly pool = new Map<number, GPUBuffer[]>();
  private pooledBytes = 0;
  private pooledCount = 0;
  private pendingRelease: GpuStorage[] = [];
  private readonly staging: GPUBuffer[] = [];
  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private readonly ring: GPUBuffer;
  private readonly ringData = new Uint32Array(RING_SLOTS * UNIFORM_WORDS);
  private slot = 0;
  private recorded = 0;
  private error: string | null = null;
  /**
   * Texture inputs kept while their source buffer is unchanged, by buffer (in the order they were first kept):
   * a training step packs a conv's input for the forward and again, identically, for the weight gradient, and
   * the second pack (about 15 ns of llvmpipe time per texel, some 15% of the conv) is then skipped. At most a
   * quarter of the texture pool limit is kept; past that the oldest go back to the pool.
   */
  private readonly filled = new Map<GpuStorage, FilledTexture[]>();
  private keptBytes = 0;
  /** Kept textures the dispatch being recorded uses: a trim or an eviction must not hand them out. */
  private readonly pinned = new Set<PooledTexture>();
  /** `textures`: texture inputs filled (flat copies and packing passes); `textureReuses`: kept ones reused. */
  private readonly stats = {
    dispatches: 0,
    submits: 0,
    pipelines: 0,
    reads: 0,
    textures: 0,
    textureReuses: 0,
  };

  private constructor(
    private readonly device: GPUDevice,
    adapter: GPUAdapter,
    private readonly batchSize: number,
    private readonly poolLimit: number,
    private readonly texturePoolLimit: number,
    gridLimit?: number,
  ) {
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
    this.info = {
      backend: "webgpu",
      dtype: "float32",
      adapter: description,
      api: detectApi(),
      isCpuEmulated,
      features: [...device.features].sort(),
      limits,
      textureInputs: true,
    };
    this.caps = {
      description,
      isCpuEmulated,
      maxWorkgroupsPerDimension: Math.min(limits.maxComputeWorkgroupsPerDimension, gridLimit ?? Infinity),
      maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
      features: new Set(device.features),
      maxTextureDimension2D: limits.maxTextureDimension2D,
    };
    this.ring = device.createBuffer({
      size: RING_SLOTS * SLOT_BYTES,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    device.addEventListener("uncapturederror", (e) => {
      this.error ??= (e as GPUUncapturedErrorEvent).error.message;
    });
  }

  static async create(opts: DeviceOptions): Promise<WebGpuBackend> {
    if (!("gpu" in navigator) || !navigator.gpu) {
      throw new Error('this Deno has no WebGPU (navigator.gpu); use Device.create({ backend: "cpu" })');
    }
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    if (!adapter) {
      throw new Error(
        "no WebGPU adapter found. On Linux install a driver (`apt-get install mesa-vulkan-drivers libvulkan1`), " +
          'or run on the CPU reference backend with Device.create({ backend: "cpu" })',
      );
    }
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
    const backend = new WebGpuBackend(
      device,
      adapter,
      opts.batchSize ?? 64,
      opts.poolLimitBytes ?? 2 ** 30,
      opts.texturePoolLimitBytes ?? 2 ** 28,
      opts.maxWorkgroupsPerDimension,
    );
    await backend.probeTextureInputs();
    return backend;
  }

  /**
   * Texture inputs need read-only storage textures in compute shaders and rgba32float render targets (for the
   * packing passes); wgpu's GL backend, for one, cannot render to rgba32float. Where either pipeline fails to
   * build, kernels are told there are no texture inputs (`maxTextureDimension2D` 0) and use their other variants.
   */
  private async probeTextureInputs(): Promise<void> {
    this.device.pushErrorScope("validation");
    this.device.pushErrorScope("internal");
    const compute = this.device.createShaderModule({
      code: `@group(0) @binding(0) var t: ${TEXTURE_INPUT};
@group(0) @binding(1) var<storage, read_write> o: array<f32>;
@group(0) @binding(2) var<uniform> u: vec4<u32>;
@compute @workgroup_size(1) fn main() { o[0] = textureLoad(t, vec2<u32>(u.x, 0u)).x; }`,
    });
    this.device.createComputePipeline({
      layout: this.layoutFor("twu").pipeline,
      compute: { module: compute, entryPoint: "main" },
    });
    const pack = this.device.createShaderModule({
      code: packSource("fn texel(x: u32, y: u32) -> vec4<f32> { return vec4<f32>(srcAt(i32(x + y))); }"),
    });
    this.device.createRenderPipeline({
      layout: this.layoutFor("tu", GPUShaderStage.FRAGMENT).pipeline,
      vertex: { module: pack, entryPoint: "vs" },
      fragment: { module: pack, entryPoint: "fs", targets: [{ format: "rgba32float" }] },
      primitive: { topology: "triangle-list" },
    });
    const internal = await this.device.popErrorScope(), validation = await this.device.popErrorScope();
    if (internal || validation) {
      this.caps.maxTextureDimension2D = 0;
      this.info.textureInputs = false;
    }
  }

  alloc(elements: number): GpuStorage {
    const bytes = Math.max(4, elements * 4);
    if (bytes > this.caps.maxStorageBufferBindingSize) {
      throw new Error(
        `allocation of ${elements} floats (${bytes} bytes) exceeds the adapter's storage binding limit of ` +
          `${this.caps.maxStorageBufferBindingSize} bytes`,
      );
    }
    const bucket = bucketBytes(bytes);
    const free = this.pool.get(bucket);
    let buffer = free?.pop();
    if (buffer) {
      this.pooledBytes -= bucket;
      this.pooledCount--;
    } else {
      buffer = this.device.createBuffer({
        size: bucket,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
      });
    }
    return { elements, bytes: elements * 4, buffer, bucket, version: 0 };
  }

  release(s: Storage): void {
    this.dropFilled(s as GpuStorage);
    // Recorded but unsubmitted dispatches may still read it: it becomes reusable at the next submit.
    this.pendingRelease.push(s as GpuStorage);
    if (!this.encoder) this.recycle();
  }

  private recycle() {
    for (const s of this.pendingRelease) {
      if (this.pooledBytes + s.bucket > this.poolLimit) {
        s.buffer.destroy();
        continue;
      }
      let list = this.pool.get(s.bucket);
      if (!list) this.pool.set(s.bucket, list = []);
      list.push(s.buffer);
      this.pooledBytes += s.bucket;
      this.pooledCount++;
    }
    this.pendingRelease = [];
  }

  write(s: Storage, data: ArrayLike<number>): void {
    // Queue writes run before recorded-but-unsubmitted dispatches: submit those first so that a write into a
    // live buffer cannot overtake the kernels recorded before it.
    this.flush();
    this.changed(s as GpuStorage);
    const f = data instanceof Float32Array ? data : Float32Array.from(data);
    this.device.queue.writeBuffer((s as GpuStorage).buffer, 0, f as Float32Array<ArrayBuffer>);
  }

  async read(s: Storage, elements: number): Promise<Float32Array> {
    const bytes = Math.max(4, elements * 4);
    const staging = this.takeStaging(bytes);
    this.endPass();
    this.encoder ??= this.device.createCommandEncoder();
    this.encoder.copyBufferToBuffer((s as GpuStorage).buffer, 0, staging, 0, bytes);
    this.flush();
    this.stats.reads++;
    await staging.mapAsync(GPUMapMode.READ, 0, bytes);
    const out = new Float32Array(staging.getMappedRange(0, bytes).slice(0, elements * 4));
    staging.unmap();
    this.staging.push(staging);
    this.throwIfError();
    return out;
  }

  private takeStaging(bytes: number): GPUBuffer {
    const i = this.staging.findIndex((b) => b.size >= bytes);
    if (i >= 0) return this.staging.splice(i, 1)[0];
    return this.device.createBuffer({
      size: bucketBytes(bytes),
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
  }

  /** The kinds of a kernel's bindings: inputs (textures where listed), outputs, then the uniform block. */
  private kindsOf(nIn: number, nOut: number, textures: readonly TextureInput[] | undefined): BindingKinds {
    let kinds = "";
    for (let i = 0; i < nIn; i++) kinds += textures?.some((t) => t.input === i) ? "t" : "r";
    return kinds + "w".repeat(nOut) + "u";
  }

  private layoutFor(kinds: BindingKinds, visibility: number = GPUShaderStage.COMPUTE) {
    const key = `${kinds}:${visibility}`;
    let l = this.layouts.get(key);
    if (!l) {
      const entries: GPUBindGroupLayoutEntry[] = [...kinds].map((kind, binding) => {
        switch (kind) {
          case "r":
            return { binding, visibility, buffer: { type: "read-only-storage" } };
          case "w":
            return { binding, visibility, buffer: { type: "storage" } };
          case "t":
            return { binding, visibility, storageTexture: { access: "read-only", format: "rgba32float" } };
          default:
            return { binding, visibility, buffer: { type: "uniform" } };
        }
      });
      const group = this.device.createBindGroupLayout({ entries });
      l = { group, pipeline: this.device.createPipelineLayout({ bindGroupLayouts: [group] }) };
      this.layouts.set(key, l);
    }
    return l;
  }

  private pipelineFor(name: string, source: string, kinds: BindingKinds): GPUComputePipeline {
    let bySource = this.pipelines.get(kinds);
    if (!bySource) this.pipelines.set(kinds, bySource = new Map());
    let p = bySource.get(source);
    if (!p) {
      const layout = this.layoutFor(kinds).pipeline;
      this.device.pushErrorScope("validation");
      const module = this.device.createShaderModule({ code: source, label: name });
      p = this.device.createComputePipeline({ layout, compute: { module, entryPoint: "main" }, label: name });
      this.device.popErrorScope().then((e) => {
        if (e) this.error ??= `kernel "${name}" failed to compile: ${e.message}\n--- source ---\n${source}`;
      });
      bySource.set(source, p);
      this.stats.pipelines++;
    }
    return p;
  }

  /** A buffer binding. */
  private static bufferEntry(binding: number, s: Storage): GPUBindGroupEntry {
    const g = s as GpuStorage;
    // At least 16 bytes: Deno's wgpu keeps the previous pipeline's minimum binding sizes when consecutive
    // pipelines share a layout (gfx-rs/wgpu#7359), so a vec4 kernel would make a later 4-byte binding fail.
    // Pool buffers are at least 256 bytes, so the wider binding is always in range.
    return { binding, resource: { buffer: g.buffer, offset: 0, size: Math.max(16, g.bytes) } };
  }

  /** Takes a uniform slot of the ring (submitting first when the ring is full) and fills it. */
  private takeSlot(words: Uint32Array | undefined): GPUBindGroupEntry["resource"] {
    if (this.slot >= RING_SLOTS) this.flush();
    const slot = this.slot++;
    if (words) {
      if (words.length > UNIFORM_WORDS) throw new Error(`dispatch parameters exceed ${UNIFORM_WORDS} words`);
      this.ringData.set(words, slot * UNIFORM_WORDS);
    }
    return { buffer: this.ring, offset: slot * SLOT_BYTES, size: SLOT_BYTES };
  }

  private record(
    pipeline: GPUComputePipeline,
    bindGroup: GPUBindGroup,
    workgroups: [number, number, number],
  ) {
    if (!this.pass) {
      this.encoder ??= this.device.createCommandEncoder();
      this.pass = this.encoder.beginComputePass();
    }
    this.pass.setPipeline(pipeline);
    this.pass.setBindGroup(0, bindGroup);
    this.pass.dispatchWorkgroups(...workgroups);
  }

  run<P>(kernel: Kernel<P>, params: P, inputs: Storage[], outputs: Storage[]): void {
    this.throwIfError();
    const d = kernel.gpu(params, this.caps);
    const kinds = this.kindsOf(inputs.length, outputs.length, d.textures);
    const pipeline = this.pipelineFor(kernel.name, d.source, kinds);
    // Texture inputs: fill a pooled texture per input (flat copy or packing pass), recorded just before the
    // kernel (WebGPU orders those writes before the kernel's reads), unless one filled the same way from the
    // same, unchanged buffer is kept.
    const views = new Map<number, GPUTextureView>();
    const taken: PooledTexture[] = [];
    this.pinned.clear();
    for (const t of d.textures ?? []) {
      if (!Number.isInteger(t.input) || t.input < 0 || t.input >= inputs.length || views.has(t.input)) {
        throw new Error(`kernel "${kernel.name}": bad texture input ${t.input} (of ${inputs.length} inputs)`);
      }
      const src = inputs[t.input] as GpuStorage;
      const kept = this.filled.get(src)?.find((f) =>
        f.version === src.version && f.width === t.width && f.height === t.height && f.pack === t.pack &&
        sameWords(f.params, t.params)
      );
      if (kept) {
        this.pinned.add(kept.tex);
        views.set(t.input, kept.tex.view);
        this.stats.textureReuses++;
        continue;
      }
      const tex = this.takeTexture(t.width, t.height);
      if (t.pack) this.pack(kernel.name, t.pack, t.params, src, tex);
      else this.copyFlat(src, tex);
      views.set(t.input, tex.view);
      this.stats.textures++;
      // An output of this dispatch is about to change: its texture is not worth keeping.
      const fill = {
        version: src.version,
        width: t.width,
        height: t.height,
        pack: t.pack,
        params: t.params,
        tex,
      };
      if (outputs.includes(src) || !this.keepFilled(src, fill)) taken.push(tex);
    }
    const entries: GPUBindGroupEntry[] = [...inputs, ...outputs].map((s, i) =>
      views.has(i) ? { binding: i, resource: views.get(i)! } : WebGpuBackend.bufferEntry(i, s)
    );
    entries.push({ binding: inputs.length + outputs.length, resource: this.takeSlot(d.params) });
    const bindGroup = this.device.createBindGroup({ layout: this.layoutFor(kinds).group, entries });
    this.record(pipeline, bindGroup, d.workgroups);
    // Free for the next dispatch at once: whatever writes them next is recorded after this dispatch's reads.
    for (const tex of taken) this.giveBackTexture(tex);
    this.pinned.clear();
    for (const o of outputs) this.changed(o as GpuStorage);
    this.stats.dispatches++;
    if (++this.recorded >= this.batchSize) this.flush();
  }

  /** Records that `s` is being written: its kept textures are stale and go back to the pool. */
  private changed(s: GpuStorage) {
    s.version++;
    this.dropFilled(s);
  }

  private dropFilled(s: GpuStorage) {
    const list = this.filled.get(s);
    if (!list) return;
    for (const f of list) this.unkeep(f);
    this.filled.delete(s);
  }

  private unkeep(f: FilledTexture) {
    this.keptBytes -= f.tex.bytes;
    this.giveBackTexture(f.tex);
  }

  /** Gives back the kept textures of `s` (all, or the oldest until `enough`) that no dispatch being recorded uses. */
  private evictFilled(s: GpuStorage, enough: () => boolean) {
    const list = this.filled.get(s)!;
    for (let i = 0; i < list.length && !enough();) {
      if (this.pinned.has(list[i].tex)) i++;
      else this.unkeep(list.splice(i, 1)[0]);
    }
    if (!list.length) this.filled.delete(s);
  }

  /** Keeps `f` for reuse (pinned until the dispatch is recorded); false when there is no room for it. */
  private keepFilled(s: GpuStorage, f: FilledTexture): boolean {
    if (this.filled.get(s)?.length === FILLED_PER_BUFFER) {
      this.evictFilled(s, () => this.filled.get(s)!.length < FILLED_PER_BUFFER);
    }
    const fits = () => this.keptBytes + f.tex.bytes <= this.texturePoolLimit / 4;
    for (const other of [...this.filled.keys()]) {
      if (fits()) break;
      this.evictFilled(other, fits);
    }
    if (!fits() || (this.filled.get(s)?.length ?? 0) >= FILLED_PER_BUFFER) return false;
    let list = this.filled.get(s);
    if (!list) this.filled.set(s, list = []);
    list.push(f);
    this.keptBytes += f.tex.bytes;
    this.pinned.add(f.tex);
    return true;
  }

  /** A pooled `width × height` rgba32float texture (not handed to anyone else until given back). */
  private takeTexture(width: number, height: number): PooledTexture {
    const max = this.caps.maxTextureDimension2D ?? 0;
    if (!(Number.isInteger(width) && Number.isInteger(height) && width >= 1 && height >= 1)) {
      throw new Error(`bad texture input size ${width}×${height}`);
    }
    if (width > max || height > max) {
      throw new Error(`texture input of ${width}×${height} texels exceeds the device's limit of ${max}`);
    }
    const key = `${width}x${height}`;
    const reused = this.textures.get(key)?.pop();
    if (reused) return reused;
    const bytes = width * height * 16;
    if (this.textureBytes + bytes > this.texturePoolLimit) this.trimTextures();
    const texture = this.device.createTexture({
      size: [width, height],
      format: "rgba32float",
      usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST | GPUTextureUsage.RENDER_ATTACHMENT,
    });
    this.textureBytes += bytes;
    return { texture, view: texture.createView(), key, bytes };
  }

  private giveBackTexture(tex: PooledTexture) {
    let free = this.textures.get(tex.key);
    if (!free) this.textures.set(tex.key, free = []);
    free.push(tex);
  }

  /** Destroys the idle pooled textures and the kept ones, after submitting the work that may still use them. */
  private trimTextures() {
    this.flush();
    for (const s of [...this.filled.keys()]) this.evictFilled(s, () => false);
    for (const list of this.textures.values()) {
      for (const t of list) {
        t.texture.destroy();
        this.textureBytes -= t.bytes;
      }
      list.length = 0;
    }
  }

  /**
   * Copies the start of the buffer `src` into `tex`, four floats per texel in rows of the texture's width (as
   * much as fits: a kernel sizes the texture for what it reads).
   */
  private copyFlat(src: Storage, tex: PooledTexture) {
    const { width, height } = tex.texture;
    const texels = Math.min(Math.ceil(src.elements / 4), width * height), rowBytes = width * 16;
    if (rowBytes % 256 !== 0) {
      throw new Error(`a flat texture needs rows of 16-texel multiples, got ${width}`);
    }
    this.endPass();
    this.encoder ??= this.device.createCommandEncoder();
    const buffer = (src as GpuStorage).buffer;
    const full = Math.floor(texels / width), rest = texels % width;
    if (full > 0) {
      this.encoder.copyBufferToTexture(
        { buffer, offset: 0, bytesPerRow: rowBytes, rowsPerImage: full },
        { texture: tex.texture },
        [width, full],
      );
    }
    // The last row is partial; its final texel may read up to 12 bytes past the elements, which the pool's
    // 256-byte buckets always hold.
    if (rest > 0) {
      this.encoder.copyBufferToTexture(
        { buffer, offset: full * rowBytes, bytesPerRow: rowBytes },
        { texture: tex.texture, origin: [0, full] },
        [rest, 1],
      );
    }
  }

  private renderPipelineFor(name: string, texelFn: string): GPURenderPipeline {
    let p = this.renderPipelines.get(texelFn);
    if (!p) {
      const source = packSource(texelFn);
      const layout = this.layoutFor("tu", GPUShaderStage.FRAGMENT).pipeline;
      this.device.pushErrorScope("validation");
      const module = this.device.createShaderModule({ code: source, label: name });
      p = this.device.createRenderPipeline({
        layout,
        vertex: { module, entryPoint: "vs" },
        fragment: { module, entryPoint: "fs", targets: [{ format: "rgba32float" }] },
        primitive: { topology: "triangle-list" },
        label: name,
      });
      this.device.popErrorScope().then((e) => {
        if (e) {
          this.error ??= `packing pass "${name}" failed to compile: ${e.message}\n--- source ---\n${source}`;
        }
      });
      this.renderPipelines.set(texelFn, p);
      this.stats.pipelines++;
    }
    return p;
  }

  /**
   * Fills `tex` with the packing function `texelFn` over the buffer `src`: a flat copy of `src` into a pooled
   * texture, then one full-screen triangle drawn into `tex` (see `packSource` in wgsl.ts).
   */
  private pack(
    kernelName: string,
    texelFn: string,
    params: Uint32Array | undefined,
    src: Storage,
    tex: PooledTexture,
  ) {
    const pipeline = this.renderPipelineFor(`${kernelName} (pack)`, texelFn);
    const size = flatTextureSize(src.elements);
    const flat = this.takeTexture(size.width, size.height);
    this.copyFlat(src, flat);
    const bindGroup = this.device.createBindGroup({
      layout: this.layoutFor("tu", GPUShaderStage.FRAGMENT).group,
      entries: [{ binding: 0, resource: flat.view }, { binding: 1, resource: this.takeSlot(params) }],
    });
    this.endPass();
    this.encoder ??= this.device.createCommandEncoder();
    const pass = this.encoder.beginRenderPass({
      colorAttachments: [{ view: tex.view, loadOp: "clear", clearValue: [0, 0, 0, 0], storeOp: "store" }],
    });
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.draw(3);
    pass.end();
    this.giveBackTexture(flat);
    this.recorded++;
  }

  private endPass() {
    this.pass?.end();
    this.pass = null;
  }

  flush(): void {
    if (!this.encoder) return;
    this.endPass();
    if (this.slot > 0) {
      this.device.queue.writeBuffer(this.ring, 0, this.ringData.buffer, 0, this.slot * SLOT_BYTES);
    }
    this.device.queue.submit([this.encoder.finish()]);
    this.stats.submits++;
    this.encoder = null;
    this.slot = 0;
    this.recorded = 0;
    this.recycle();
  }

  private throwIfError() {
    if (this.error) {
      const e = this.error;
      this.error = null;
      throw new Error(`WebGPU error: ${e}`);
    }
  }

  pooled() {
    return { bytes: this.pooledBytes, buffers: this.pooledCount };
  }

  counters() {
    return { ...this.stats };
  }

  destroy(): void {
    this.flush();
    for (const list of this.pool.values()) for (const b of list) b.destroy();
    this.trimTextures();
    this.pool.clear();
    this.pooledBytes = 0;
    this.pooledCount = 0;
    this.device.destroy();
  }
}
