/**
 * @file The WebGPU buffer pool: storage buffers by size bucket, and the staging buffers reads map.
 *
 * Buckets are four size classes per power of two (at most 25% waste), 256 bytes at least. A released buffer
 * returns to the pool only at the next submit (`recycle`), because dispatches recorded but not yet submitted
 * may still read it: a queue write into a reused buffer could otherwise overtake a recorded read. Past the
 * pool's byte limit, released buffers are destroyed instead of kept.
 *
 * A bucket hands out its free buffer created first (not the one released last): which buffers are free then
 * decides which one an allocation gets, not the order they were released in, so a training step that makes
 * the same allocations as the step before gets the same buffers, and its cached bind groups
 * (bind_group_cache.ts) are found again.
 */

import type { Storage } from "../backend.ts";

/** A pooled storage buffer holding one allocation. */
export interface GpuStorage extends Storage {
  buffer: GPUBuffer;
  /** Pool bucket the buffer belongs to. */
  bucket: number;
  /** Bumped by every recorded write (a queue write, or a kernel's output): textures filled before are stale. */
  version: number;
}

/** Pool bucket: four size classes per power of two (at most 25% waste), 256 bytes at least. */
export function bucketBytes(bytes: number): number {
  if (bytes <= 256) return 256;
  const p = 2 ** Math.floor(Math.log2(bytes));
  for (const f of [1, 1.25, 1.5, 1.75, 2]) if (p * f >= bytes) return Math.ceil((p * f) / 256) * 256;
  return 2 * p;
}

/** Creation order of pooled buffers (the pool's choice among free ones). */
const created = new WeakMap<GPUBuffer, number>();
let nextBuffer = 0;

export class BufferPool {
  /** Free buffers per bucket, latest-created first (`take` pops the earliest). */
  readonly #free = new Map<number, GPUBuffer[]>();
  /** Bytes and count of the buffers kept for reuse. */
  bytes = 0;
  count = 0;
  #pendingRelease: GpuStorage[] = [];
  readonly #staging: GPUBuffer[] = [];

  constructor(private readonly device: GPUDevice, private readonly limitBytes: number) {}

  /** A buffer for `elements` floats, from the pool when one of its bucket is free. */
  take(elements: number): GpuStorage {
    const bucket = bucketBytes(Math.max(4, elements * 4));
    let buffer = this.#free.get(bucket)?.pop();
    if (buffer) {
      this.bytes -= bucket;
      this.count--;
    } else {
      buffer = this.device.createBuffer({
        size: bucket,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
      });
      created.set(buffer, nextBuffer++);
    }
    return { elements, bytes: elements * 4, buffer, bucket, version: 0 };
  }

  /** Queues `s` for reuse at the next `recycle` (the next submit). */
  release(s: GpuStorage): void {
    this.#pendingRelease.push(s);
  }

  /** Makes the released buffers reusable (or destroys those past the limit): call after a submit. */
  recycle(): void {
    for (const s of this.#pendingRelease) {
      if (this.bytes + s.bucket > this.limitBytes) {
        s.buffer.destroy();
        continue;
      }
      let list = this.#free.get(s.bucket);
      if (!list) this.#free.set(s.bucket, list = []);
      // Kept in descending creation order: a short scan from the end (buckets hold few buffers).
      const id = created.get(s.buffer)!;
      let i = list.length;
      while (i > 0 && created.get(list[i - 1])! < id) i--;
      list.splice(i, 0, s.buffer);
      this.bytes += s.bucket;
      this.count++;
    }
    this.#pendingRelease = [];
  }

  /** A mappable buffer of at least `bytes` to read into; hand it back with `giveBackStaging` once unmapped. */
  takeStaging(bytes: number): GPUBuffer {
    const i = this.#staging.findIndex((b) => b.size >= bytes);
    if (i >= 0) return this.#staging.splice(i, 1)[0];
    return this.device.createBuffer({
      size: bucketBytes(bytes),
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
  }

  giveBackStaging(b: GPUBuffer): void {
    this.#staging.push(b);
  }

  /** Destroys the pooled buffers. */
  destroy(): void {
    for (const list of this.#free.values()) for (const b of list) b.destroy();
    this.#free.clear();
    this.bytes = 0;
    this.count = 0;
  }
}
