/**
 * @file The uniform ring: every dispatch's sizes and scalars (at most `UNIFORM_WORDS` words) in its own 512-byte
 * slot of one uniform buffer. Slots are filled on the host while a batch is recorded and the used part is
 * uploaded with one queue write just before the batch is submitted; the ring then starts over. A full ring
 * means the batch must be submitted first (the backend checks `full`). Bind groups bind the ring at offset 0
 * (`binding`) and pick the slot with a dynamic offset, so one bind group serves every slot.
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

  /** The ring as a bind-group resource: one slot from offset 0, moved by a dynamic offset. */
  get binding(): GPUBufferBinding {
    return { buffer: this.#buffer, offset: 0, size: SLOT_BYTES };
  }

  /** Takes the next slot, fills it with `words`, and returns its byte offset (the dynamic offset to bind). */
  take(words: Uint32Array | undefined): number {
    if (this.full) throw new Error("uniform ring is full: submit the batch first");
    const slot = this.#used++;
    if (words) {
      if (words.length > UNIFORM_WORDS) throw new Error(`dispatch parameters exceed ${UNIFORM_WORDS} words`);
      this.#data.set(words, slot * UNIFORM_WORDS);
    }
    return slot * SLOT_BYTES;
  }

  /** Uploads the slots of this batch (before its submit) and starts the ring over. */
  upload(queue: GPUQueue): void {
    if (this.#used > 0) queue.writeBuffer(this.#buffer, 0, this.#data.buffer, 0, this.#used * SLOT_BYTES);
    this.#used = 0;
  }
}
