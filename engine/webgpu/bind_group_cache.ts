/**
 * @file Bind groups cached by what they bind. Creating one costs about 0.1 ms of host time on Deno's wgpu
 * (validation and the op call), as much as recording the rest of a dispatch, while a training step binds
 * the same pooled buffers and textures in the same roles step after step. The uniform block is bound with a
 * dynamic offset (its ring slot is passed to `setBindGroup`), so a group names only buffers, views and sizes.
 *
 * Keys are the layout's binding kinds and, per entry, the identity of the buffer (with offset and size) or of
 * the texture view. A destroyed buffer or texture is never handed out again, so a group that names one is never
 * asked for; such groups only take memory until the cache is cleared, which happens when it reaches its limit.
 */

export class BindGroupCache {
  readonly #ids = new WeakMap<object, number>();
  #nextId = 0;
  readonly #groups = new Map<string, GPUBindGroup>();
  /** Lookups answered from the cache and groups created. */
  hits = 0;
  misses = 0;

  constructor(private readonly device: GPUDevice, private readonly limit = 8192) {}

  /** A small number naming `o` for as long as it lives. */
  #id(o: object): number {
    let id = this.#ids.get(o);
    if (id === undefined) this.#ids.set(o, id = this.#nextId++);
    return id;
  }

  /**
   * The bind group of `entries` (bindings 0, 1, … in order) under `layout`; `layoutKey` names the layout (its
   * binding kinds and stage).
   */
  get(layoutKey: string, layout: GPUBindGroupLayout, entries: GPUBindGroupEntry[]): GPUBindGroup {
    let key = layoutKey;
    for (const e of entries) {
      const r = e.resource as GPUBufferBinding | GPUTextureView;
      key += "buffer" in r ? `|${this.#id(r.buffer)}:${r.offset ?? 0}:${r.size}` : `|t${this.#id(r)}`;
    }
    let group = this.#groups.get(key);
    if (group) {
      this.hits++;
      return group;
    }
    if (this.#groups.size >= this.limit) this.#groups.clear();
    group = this.device.createBindGroup({ layout, entries });
    this.#groups.set(key, group);
    this.misses++;
    return group;
  }
}
