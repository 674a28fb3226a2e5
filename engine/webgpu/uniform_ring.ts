/**
 * @file The uniform ring: every dispatch's sizes and scalars (at most `UNIFORM_WORDS` words) in its own 512-byte
 * slot of one uniform buffer. Slots are filled on the host while a batch is recorded and the used part is
 * uploaded with one queue write just before the batch is submitted; the ring then starts over. A full ring
 * means the batch must be submitted first (the backend checks `full`).
 */

import { UNIFORM_WORDS } from "../../kernels/types.ts";

export const SLOT_BYTES = UNIFORM_WORDS * 4;
const RING_SLOTS = 256;

export class UniformRing {
  readonly #buffer: GPUBuffer;
  readonly #data = new Uint32Array(RING_SLOTS * UNIFORM_WORDS);
  #used = 0;

  constructor(device: GPUDevice) {
    this.#buffer = device.createBuffer({
      size: RING_SLOTS * SLOT_BYTES,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
  }

  /** Whether every slot of this batch is taken. */
  get full(): boolean {
    return this.#used >= RING_SLOTS;
  }

  /** Takes the next slot, fills it with `words`, and returns its binding. */
  take(words: Uint32Array | undefined): GPUBindGroupEntry["resource"] {
    if (this.full) throw new Error("uniform ring is full: submit the batch first");
    const slot = this.#used++;
    if (words) {
      if (words.length > UNIFORM_WORDS) throw new Error(`dispatch parameters exceed ${UNIFORM_WORDS} words`);
      this.#data.set(words, slot * UNIFORM_WORDS);
    }
    return { buffer: this.#buffer, offset: slot * SLOT_BYTES, size: SLOT_BYTES };
  }

  /** Uploads the slots of this batch (before its submit) and starts the ring over. */
  upload(queue: GPUQueue): void {
    if (this.#used > 0) queue.writeBuffer(this.#buffer, 0, this.#data.buffer, 0, this.#used * SLOT_BYTES);
    this.#used = 0;
  }
}
