/**
 * @file The WebGPU backend: records kernels into one open compute pass and submits them in batches; nothing
 * syncs with the host until a read.
 *
 * The resources live in their own files: storage buffers and read staging in a size-bucketed pool
 * (buffer_pool.ts; a released buffer is reusable only after the batch that may still read it is submitted, so
 * queue writes into a reused buffer never overtake a recorded read), pipelines cached by WGSL source
 * (pipeline_cache.ts), each dispatch's sizes in a slot of a uniform ring uploaded once per batch
 * (uniform_ring.ts, bound by dynamic offset), bind groups cached by what they bind (bind_group_cache.ts), and
 * rgba32float textures for texture inputs (texture_pool.ts) with the filled ones kept while their buffer is
 * unchanged (filled_textures.ts).
 *
 * A dispatch may read some inputs as textures (`GpuDispatch.textures`): the backend takes a pooled texture per
 * such input and records, just before the dispatch, either a flat copy of the buffer into it or the kernel's
 * packing pass (a flat copy into a second pooled texture, then a draw that writes every texel; see `packSource`
 * in kernels/wgsl.ts).
 */

import type { GpuCaps, Kernel, TextureInput } from "../../kernels/types.ts";
import { flatTextureSize, PACK_TILE, type PackBy } from "../../kernels/wgsl.ts";
import type { Backend, DeviceInfo, DeviceOptions, Storage } from "../backend.ts";
import { describeGpu, probeTextureInputs, requestGpu } from "./adapter.ts";
import { BindGroupCache } from "./bind_group_cache.ts";
import { BufferPool, type GpuStorage } from "./buffer_pool.ts";
import { FilledTextures } from "./filled_textures.ts";
import { kindsOf, PACK_COMPUTE_KINDS, PipelineCache } from "./pipeline_cache.ts";
import { describeParams, GpuProfiler, type Profile } from "./profiler.ts";
import { type PooledTexture, TexturePool } from "./texture_pool.ts";
import { UniformRing } from "./uniform_ring.ts";

export class WebGpuBackend implements Backend {
  readonly info: DeviceInfo;
  private readonly caps: GpuCaps;
  private readonly pipelines: PipelineCache;
  private readonly buffers: BufferPool;
  private readonly textures: TexturePool;
  private readonly filled: FilledTextures;
  private readonly ring: UniformRing;
  private readonly bindGroups: BindGroupCache;
  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private recorded = 0;
  private error: string | null = null;
  /**
   * `textures`: texture inputs filled (flat copies and packing passes), `packs` the packing passes among them;
   * `textureReuses`: kept ones reused.
   *
   * `submitMs`: host time inside `flush()` (finishing and submitting a batch). On Vulkan lavapipe (Mesa 22.3) a
   * submit returns at once while no earlier batch is executing and otherwise waits until that one has finished (a
   * queue one batch deep: of two batches of ten long dispatches submitted back to back, the first submit took
   * 0.1 ms, the second 150–210 ms, the first batch's run time), so most of this is device time that encoding the
   * next batch did not hide. Not measured on GL.
   */
  private readonly stats = {
    dispatches: 0,
    submits: 0,
    reads: 0,
    textures: 0,
    packs: 0,
    textureReuses: 0,
    submitMs: 0,
  };

  private constructor(
    private readonly device: GPUDevice,
    adapter: GPUAdapter,
    private readonly batchSize: number,
    poolLimit: number,
    texturePoolLimit: number,
    /** How packing passes write their textures, or null where there are no texture inputs (see the probe). */
    private readonly packBy: PackBy | null,
    gridLimit?: number,
    /** Times every pass (profiler.ts), or null. */
    private readonly profiler: GpuProfiler | null = null,
  ) {
    const described = describeGpu(device, adapter, gridLimit);
    this.info = described.info;
    this.caps = described.caps;
    if (!packBy) {
      // Kernels read `maxTextureDimension2D` 0 as "no texture inputs".
      this.caps.maxTextureDimension2D = 0;
      this.info.textureInputs = false;
    }
    this.info.packBy = packBy ?? undefined;
    this.pipelines = new PipelineCache(device, (m) => this.error ??= m);
    this.buffers = new BufferPool(device, poolLimit);
    this.textures = new TexturePool(device, texturePoolLimit, () => this.trimTextures(), packBy === "render");
    // At most a quarter of the texture pool is kept filled; past that the oldest go back to the pool.
    this.filled = new FilledTextures(this.textures, texturePoolLimit / 4);
    this.ring = new UniformRing(device);
    this.bindGroups = new BindGroupCache(device);
    device.addEventListener("uncapturederror", (e) => {
      this.error ??= (e as GPUUncapturedErrorEvent).error.message;
    });
  }

  static async create(opts: DeviceOptions): Promise<WebGpuBackend> {
    const { adapter, device } = await requestGpu();
    const packBy = await probeTextureInputs(device, new PipelineCache(device, () => {}));
    return new WebGpuBackend(
      device,
      adapter,
      opts.batchSize ?? 64,
      opts.poolLimitBytes ?? 2 ** 30,
      opts.texturePoolLimitBytes ?? 2 ** 28,
      packBy,
      opts.maxWorkgroupsPerDimension,
      opts.profile && device.features.has("timestamp-query") ? new GpuProfiler(device) : null,
    );
  }

  alloc(elements: number): GpuStorage {
    const bytes = Math.max(4, elements * 4);
    if (bytes > this.caps.maxStorageBufferBindingSize) {
      throw new Error(
        `allocation of ${elements} floats (${bytes} bytes) exceeds the adapter's storage binding limit of ` +
          `${this.caps.maxStorageBufferBindingSize} bytes`,
      );
    }
    return this.buffers.take(elements);
  }

  release(s: Storage): void {
    this.filled.drop(s as GpuStorage);
    // Recorded but unsubmitted dispatches may still read it: it becomes reusable at the next submit.
    this.buffers.release(s as GpuStorage);
    if (!this.encoder) this.buffers.recycle();
  }

  write(s: Storage, data: ArrayLike<number>): void {
    // Queue writes run before recorded-but-unsubmitted dispatches: submit those first so that a write into a
    // live buffer cannot overtake the kernels recorded before it.
    // Deno 2.9.6 panics on an empty queue write (ext/webgpu/queue.rs: unwrap on None); there is nothing to write.
    if (data.length === 0) return;
    this.flush();
    this.changed(s as GpuStorage);
    const f = data instanceof Float32Array ? data : Float32Array.from(data);
    this.device.queue.writeBuffer((s as GpuStorage).buffer, 0, f as Float32Array<ArrayBuffer>);
  }

  async read(s: Storage, elements: number): Promise<Float32Array> {
    const bytes = Math.max(4, elements * 4);
    const staging = this.buffers.takeStaging(bytes);
    this.endPass();
    this.encoder ??= this.device.createCommandEncoder();
    this.encoder.copyBufferToBuffer((s as GpuStorage).buffer, 0, staging, 0, bytes);
    this.flush();
    this.stats.reads++;
    await staging.mapAsync(GPUMapMode.READ, 0, bytes);
    const out = new Float32Array(staging.getMappedRange(0, bytes).slice(0, elements * 4));
    staging.unmap();
    this.buffers.giveBackStaging(staging);
    this.throwIfError();
    return out;
  }

  /** A buffer binding. */
  private static bufferEntry(binding: number, s: Storage): GPUBindGroupEntry {
    const g = s as GpuStorage;
    // At least 16 bytes (pool buckets are 256 at least): Deno's wgpu keeps the previous pipeline's minimum
    // binding sizes when consecutive pipelines share a layout (gfx-rs/wgpu#7359), so a vec4 kernel would make a later 4-byte binding fail.
    // Pool buffers are at least 256 bytes, so the wider binding is always in range. The whole pool bucket is
    // bound (kernels take their sizes from the uniform block, never from the binding), so that a buffer's bind
    // groups are reused whatever the size of the allocation it holds (bind_group_cache.ts).
    return { binding, resource: { buffer: g.buffer, offset: 0, size: g.bucket } };
  }

  /**
   * Takes a uniform slot of the ring (submitting first when the ring is full), fills it, and returns its
   * dynamic offset.
   */
  private takeSlot(words: Uint32Array | undefined): number {
    if (this.ring.full) this.flush();
    return this.ring.take(words);
  }

  /** The (cached) bind group of `entries` under the layout of `kinds`. */
  private bindGroup(kinds: string, entries: GPUBindGroupEntry[], visibility?: number): GPUBindGroup {
    // The stage is part of the key: the same binding kinds under another stage are another layout.
    const key = visibility === undefined ? kinds : `${kinds}@${visibility}`;
    return this.bindGroups.get(key, this.pipelines.layoutFor(kinds, visibility).group, entries);
  }

  private record(
    pipeline: GPUComputePipeline,
    bindGroup: GPUBindGroup,
    slot: number,
    workgroups: [number, number, number],
    label: () => [string, string],
  ) {
    if (this.profiler) {
      // A pass of its own, between two timestamps.
      this.endPass();
      this.encoder ??= this.device.createCommandEncoder();
      this.pass = this.encoder.beginComputePass({ timestampWrites: this.profiler.next(...label()) });
    } else if (!this.pass) {
      this.encoder ??= this.device.createCommandEncoder();
      this.pass = this.encoder.beginComputePass();
    }
    this.pass.setPipeline(pipeline);
    this.pass.setBindGroup(0, bindGroup, [slot]);
    this.pass.dispatchWorkgroups(...workgroups);
    if (this.profiler) this.endPass();
  }

  run<P>(kernel: Kernel<P>, params: P, inputs: Storage[], outputs: Storage[]): void {
    this.throwIfError();
    // Room for this dispatch's passes (its packing passes and itself) before any slot is taken.
    if (this.profiler?.full) this.flush();
    const d = kernel.gpu(params, this.caps);
    const kinds = kindsOf(inputs.length, outputs.length, d.textures);
    const pipeline = this.pipelines.compute(kernel.name, d.source, kinds);
    this.filled.unpinAll();
    const { views, taken } = this.fillTextureInputs(kernel.name, d.textures ?? [], inputs, outputs);
    const entries: GPUBindGroupEntry[] = [...inputs, ...outputs].map((s, i) =>
      views.has(i) ? { binding: i, resource: views.get(i)! } : WebGpuBackend.bufferEntry(i, s)
    );
    entries.push({ binding: inputs.length + outputs.length, resource: this.ring.binding });
    const slot = this.takeSlot(d.params);
    this.record(pipeline, this.bindGroup(kinds, entries), slot, d.workgroups, () => {
      const ws = d.workgroups[0] * d.workgroups[1] * d.workgroups[2];
      return [kernel.name, `${kernel.name} ${describeParams(params)} wg=${ws}`];
    });
    // Free for the next dispatch at once: whatever writes them next is recorded after this dispatch's reads.
    for (const tex of taken) this.textures.giveBack(tex);
    this.filled.unpinAll();
    for (const o of outputs) this.changed(o as GpuStorage);
    this.stats.dispatches++;
    if (++this.recorded >= this.batchSize) this.flush();
  }

  /**
   * Texture inputs: fills a pooled texture per input (flat copy or packing pass), recorded just before the
   * kernel (WebGPU orders those writes before the kernel's reads), unless one filled the same way from the
   * same, unchanged buffer is kept. Returns the views by input index and the textures to give back once the
   * dispatch is recorded (those not kept).
   */
  private fillTextureInputs(
    kernelName: string,
    textureInputs: readonly TextureInput[],
    inputs: Storage[],
    outputs: Storage[],
  ): { views: Map<number, GPUTextureView>; taken: PooledTexture[] } {
    const views = new Map<number, GPUTextureView>();
    const taken: PooledTexture[] = [];
    for (const t of textureInputs) {
      if (!Number.isInteger(t.input) || t.input < 0 || t.input >= inputs.length || views.has(t.input)) {
        throw new Error(`kernel "${kernelName}": bad texture input ${t.input} (of ${inputs.length} inputs)`);
      }
      const src = inputs[t.input] as GpuStorage;
      const kept = this.filled.find(src, t);
      if (kept) {
        views.set(t.input, kept.tex.view);
        this.stats.textureReuses++;
        continue;
      }
      const tex = this.takeTexture(t.width, t.height);
      if (t.pack) {
        this.pack(kernelName, t.pack, t.params, src, tex);
        this.stats.packs++;
      } else this.copyFlat(src, tex);
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
      if (outputs.includes(src) || !this.filled.keep(src, fill)) taken.push(tex);
    }
    return { views, taken };
  }

  /** Records that `s` is being written: its kept textures are stale and go back to the pool. */
  private changed(s: GpuStorage) {
    s.version++;
    this.filled.drop(s);
  }

  private takeTexture(width: number, height: number): PooledTexture {
    return this.textures.take(width, height, this.caps.maxTextureDimension2D ?? 0);
  }

  /** Destroys the idle pooled textures and the kept ones, after submitting the work that may still use them. */
  private trimTextures() {
    this.flush();
    this.filled.evictAll();
    this.textures.destroyIdle();
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

  /**
   * Fills `tex` with the packing function `texelFn` over the buffer `src`: a flat copy of `src` into a pooled
   * texture, then one full-screen triangle drawn into `tex`, or, where rgba32float is not renderable, a compute
   * pass that stores every texel (see `packSource` in wgsl.ts).
   */
  private pack(
    kernelName: string,
    texelFn: string,
    params: Uint32Array | undefined,
    src: Storage,
    tex: PooledTexture,
  ) {
    const size = flatTextureSize(src.elements);
    const flat = this.takeTexture(size.width, size.height);
    this.copyFlat(src, flat);
    if (this.packBy === "compute") {
      const pipeline = this.pipelines.packCompute(kernelName, texelFn);
      const slot = this.takeSlot(params);
      const bindGroup = this.bindGroup(PACK_COMPUTE_KINDS, [
        { binding: 0, resource: flat.view },
        { binding: 1, resource: this.ring.binding },
        { binding: 2, resource: tex.view },
      ]);
      const { width, height } = tex.texture;
      this.record(pipeline, bindGroup, slot, [
        Math.ceil(width / PACK_TILE),
        Math.ceil(height / PACK_TILE),
        1,
      ], () => [`${kernelName} (pack)`, `${kernelName} (pack) ${width}×${height}`]);
    } else {
      const pipeline = this.pipelines.render(`${kernelName} (pack)`, texelFn);
      const slot = this.takeSlot(params);
      const bindGroup = this.bindGroup(
        "tu",
        [{ binding: 0, resource: flat.view }, { binding: 1, resource: this.ring.binding }],
        GPUShaderStage.FRAGMENT,
      );
      this.endPass();
      this.encoder ??= this.device.createCommandEncoder();
      const { width, height } = tex.texture;
      const pass = this.encoder.beginRenderPass({
        colorAttachments: [{ view: tex.view, loadOp: "clear", clearValue: [0, 0, 0, 0], storeOp: "store" }],
        timestampWrites: this.profiler?.next(
          `${kernelName} (pack)`,
          `${kernelName} (pack) ${width}×${height}`,
        ),
      });
      pass.setPipeline(pipeline);
      pass.setBindGroup(0, bindGroup, [slot]);
      pass.draw(3);
      pass.end();
    }
    this.textures.giveBack(flat);
    this.recorded++;
  }

  private endPass() {
    this.pass?.end();
    this.pass = null;
  }

  flush(): void {
    if (!this.encoder) return;
    const t0 = performance.now();
    this.endPass();
    this.profiler?.resolveInto(this.encoder);
    this.ring.upload(this.device.queue);
    this.device.queue.submit([this.encoder.finish()]);
    this.stats.submits++;
    this.stats.submitMs += performance.now() - t0;
    this.encoder = null;
    this.recorded = 0;
    this.buffers.recycle();
  }

  private throwIfError() {
    if (this.error) {
      const e = this.error;
      this.error = null;
      throw new Error(`WebGPU error: ${e}`);
    }
  }

  pooled() {
    return { bytes: this.buffers.bytes, buffers: this.buffers.count };
  }

  /** Device time per kernel since the last call (profiler.ts), or null unless created with `profile`. */
  async profile(): Promise<Profile | null> {
    if (!this.profiler) return null;
    this.flush();
    return await this.profiler.collect();
  }

  counters() {
    const s = this.stats;
    return {
      dispatches: s.dispatches,
      submits: s.submits,
      pipelines: this.pipelines.created,
      reads: s.reads,
      textures: s.textures,
      packs: s.packs,
      textureReuses: s.textureReuses,
      submitMs: s.submitMs,
      bindGroups: this.bindGroups.misses,
      bindGroupReuses: this.bindGroups.hits,
    };
  }

  destroy(): void {
    this.flush();
    this.buffers.destroy();
    this.trimTextures();
    this.device.destroy();
  }
}
