/**
 * @file The texture pool: rgba32float textures for kernels' texture inputs (see `TextureInput` in
 * kernels/types.ts), reused by size. A texture is handed to one user at a time and given back when the dispatch
 * that reads it has been recorded (what writes it next is recorded after that read, so WebGPU orders them).
 * When a new texture would take the pool past its byte limit, the pool first asks its owner to make room
 * (`makeRoom`: submit pending work, then `destroyIdle`). As the buffer pool does, a size hands out its free
 * texture created first, so that the same sequence of uses gets the same textures (and cached bind groups).
 */

/** A pooled rgba32float texture for texture inputs, with its one view. */
export interface PooledTexture {
  texture: GPUTexture;
  view: GPUTextureView;
  key: string;
  bytes: number;
  /** Creation order (the pool's choice among free textures). */
  order: number;
}

export class TexturePool {
  /** Free textures per size, latest-created first (`take` pops the earliest). */
  readonly #free = new Map<string, PooledTexture[]>();
  #created = 0;
  /** Bytes of every texture the pool created and has not destroyed (given out or idle). */
  #bytes = 0;

  constructor(
    private readonly device: GPUDevice,
    readonly limitBytes: number,
    private readonly makeRoom: () => void,
    /** Whether packing passes render into these textures (not where rgba32float is not renderable, as on GL). */
    private readonly renderable = true,
  ) {}

  /** A `width × height` texture (not handed to anyone else until given back); `maxSide` is the device limit. */
  take(width: number, height: number, maxSide: number): PooledTexture {
    if (!(Number.isInteger(width) && Number.isInteger(height) && width >= 1 && height >= 1)) {
      throw new Error(`bad texture input size ${width}×${height}`);
    }
    if (width > maxSide || height > maxSide) {
      throw new Error(`texture input of ${width}×${height} texels exceeds the device's limit of ${maxSide}`);
    }
    const key = `${width}x${height}`;
    const reused = this.#free.get(key)?.pop();
    if (reused) return reused;
    const bytes = width * height * 16;
    if (this.#bytes + bytes > this.limitBytes) this.makeRoom();
    const texture = this.device.createTexture({
      size: [width, height],
      format: "rgba32float",
      usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST |
        (this.renderable ? GPUTextureUsage.RENDER_ATTACHMENT : 0),
    });
    this.#bytes += bytes;
    return { texture, view: texture.createView(), key, bytes, order: this.#created++ };
  }

  giveBack(tex: PooledTexture): void {
    let free = this.#free.get(tex.key);
    if (!free) this.#free.set(tex.key, free = []);
    let i = free.length;
    while (i > 0 && free[i - 1].order < tex.order) i--;
    free.splice(i, 0, tex);
  }

  /** Destroys the idle textures (the caller has submitted the work that may still read them). */
  destroyIdle(): void {
    for (const list of this.#free.values()) {
      for (const t of list) {
        t.texture.destroy();
        this.#bytes -= t.bytes;
      }
      list.length = 0;
    }
  }
}
