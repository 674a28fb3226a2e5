/**
 * @file Texture inputs kept while their source buffer is unchanged.
 *
 * A training step packs a conv's input for the forward and again, identically, for the weight gradient; the
 * second pack (about 15 ns of llvmpipe time per texel, some 15% of the conv) is skipped when the texture filled
 * the first time is kept. A kept texture is keyed by its buffer and remembers the buffer's version (bumped by
 * every write), its size and how it was filled (packing function and its uniform words); a write to the buffer
 * drops its textures. At most `FILLED_PER_BUFFER` per buffer (a weight is read in two layouts, forward and input
 * gradient, plus spares) and at most `limitBytes` in all; past that the oldest go back to the texture pool.
 * Textures that the dispatch being recorded uses are pinned: no eviction may hand them out.
 */

import type { TextureInput } from "../../kernels/types.ts";
import type { GpuStorage } from "./buffer_pool.ts";
import type { PooledTexture, TexturePool } from "./texture_pool.ts";

/** A texture input filled from a buffer at one version, kept for reuse while the buffer is unchanged. */
export interface FilledTexture {
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

export class FilledTextures {
  /** Kept textures by buffer, in the order the buffers were first kept. */
  readonly #byBuffer = new Map<GpuStorage, FilledTexture[]>();
  #keptBytes = 0;
  /** Kept textures the dispatch being recorded uses: a trim or an eviction must not hand them out. */
  readonly #pinned = new Set<PooledTexture>();

  constructor(private readonly pool: TexturePool, private readonly limitBytes: number) {}

  /** The kept texture filled from `src`, as it is now, the way `t` asks for; it is pinned. */
  find(src: GpuStorage, t: TextureInput): FilledTexture | undefined {
    const kept = this.#byBuffer.get(src)?.find((f) =>
      f.version === src.version && f.width === t.width && f.height === t.height && f.pack === t.pack &&
      sameWords(f.params, t.params)
    );
    if (kept) this.#pinned.add(kept.tex);
    return kept;
  }

  /** Keeps `f` for reuse (pinned until `unpinAll`); false when there is no room for it. */
  keep(s: GpuStorage, f: FilledTexture): boolean {
    if (this.#byBuffer.get(s)?.length === FILLED_PER_BUFFER) {
      this.#evict(s, () => this.#byBuffer.get(s)!.length < FILLED_PER_BUFFER);
    }
    const fits = () => this.#keptBytes + f.tex.bytes <= this.limitBytes;
    for (const other of [...this.#byBuffer.keys()]) {
      if (fits()) break;
      this.#evict(other, fits);
    }
    if (!fits() || (this.#byBuffer.get(s)?.length ?? 0) >= FILLED_PER_BUFFER) return false;
    let list = this.#byBuffer.get(s);
    if (!list) this.#byBuffer.set(s, list = []);
    list.push(f);
    this.#keptBytes += f.tex.bytes;
    this.#pinned.add(f.tex);
    return true;
  }

  /** Ends the pins of the dispatch being recorded. */
  unpinAll(): void {
    this.#pinned.clear();
  }

  /** Gives back every kept texture of `s` (it changed or was released). */
  drop(s: GpuStorage): void {
    const list = this.#byBuffer.get(s);
    if (!list) return;
    for (const f of list) this.#unkeep(f);
    this.#byBuffer.delete(s);
  }

  /** Gives back every kept texture that is not pinned. */
  evictAll(): void {
    for (const s of [...this.#byBuffer.keys()]) this.#evict(s, () => false);
  }

  #unkeep(f: FilledTexture) {
    this.#keptBytes -= f.tex.bytes;
    this.pool.giveBack(f.tex);
  }

  /** Gives back the kept textures of `s` (all, or the oldest until `enough`) that are not pinned. */
  #evict(s: GpuStorage, enough: () => boolean) {
    const list = this.#byBuffer.get(s)!;
    for (let i = 0; i < list.length && !enough();) {
      if (this.#pinned.has(list[i].tex)) i++;
      else this.#unkeep(list.splice(i, 1)[0]);
    }
    if (!list.length) this.#byBuffer.delete(s);
  }
}
