/**
 * @file Memoized WGSL sources. A kernel's source depends only on its structure (variant flags and tile sizes),
 * but building it is string work on the host every dispatch: 0.2–0.5 ms for the matmul texture variant's 81 KB
 * of WGSL, 0.3 ms for the conv weight gradient (measured with /tmp/mm/gen.ts), against about 1.5 ms of llvmpipe
 * time for a whole 256³ product. A memoized source is also the same string object every time, so the device's
 * pipeline cache hashes it once (V8 keeps a string's hash).
 */

const sources = new Map<string, string>();

/**
 * The source for `key`, built by `build` the first time. The key must name the kernel family and every
 * structural choice the source depends on (never sizes: the number of distinct keys stays small).
 */
export function cachedSource(key: string, build: () => string): string {
  let source = sources.get(key);
  if (source === undefined) {
    source = build();
    sources.set(key, source);
  }
  return source;
}
