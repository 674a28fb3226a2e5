/**
 * @file Deterministic host-side randomness in integer arithmetic, the same on every machine: a hash that mixes
 * two 32-bit words (for deriving independent seeds from (seed, index) pairs) and mulberry32, a small generator
 * for data order, procedural images, proposals and subsets. Device-side draws use the engine's Philox instead.
 */

/** Mixes two 32-bit words into one (MurmurHash3's finaliser over a + golden-ratio·b). */
export function hash2(a: number, b: number): number {
  let h = (a ^ Math.imul(b ^ 0x9e3779b9, 0x85ebca6b)) >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** mulberry32: a small 32-bit generator; `next()` is uniform in [0, 1) with 32 random bits. */
export class Rng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  u32(): number {
    this.#s = (this.#s + 0x6d2b79f5) >>> 0;
    let t = this.#s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  next(): number {
    return this.u32() / 4294967296;
  }
  range(lo: number, hi: number): number {
    return lo + (hi - lo) * this.next();
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** A uniformly random unit vector (rejection sampling in the unit disc; no trigonometry). */
  direction(): [number, number] {
    for (;;) {
      const x = 2 * this.next() - 1, y = 2 * this.next() - 1, r2 = x * x + y * y;
      if (r2 > 1e-4 && r2 <= 1) {
        const r = Math.sqrt(r2);
        return [x / r, y / r];
      }
    }
  }
  /** A random permutation of 0 … n−1 (Fisher–Yates). */
  permutation(n: number): Int32Array {
    const p = new Int32Array(n);
    for (let i = 0; i < n; i++) p[i] = i;
    for (let i = n - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const t = p[i];
      p[i] = p[j];
      p[j] = t;
    }
    return p;
  }
}
