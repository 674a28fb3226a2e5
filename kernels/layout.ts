/**
 * @file Strided layouts as the kernels see them: row-major strides of a shape, and the coalescing that lets an
 * elementwise, copy or reduce kernel walk a strided view with as few dimensions (and as little index
 * arithmetic) as possible.
 */

/** Contiguous row-major strides of a shape. */
export function contiguousStrides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    s[d] = acc;
    acc *= shape[d];
  }
  return s;
}

/**
 * Drops size-1 dimensions and merges neighbours that every stride list walks contiguously. The result indexes
 * the same elements with the fewest dimensions (at least one).
 */
export function coalesce(
  shape: readonly number[],
  strides: readonly (readonly number[])[],
): { shape: number[]; strides: number[][] } {
  const outShape: number[] = [];
  const outStrides: number[][] = strides.map(() => []);
  for (let d = 0; d < shape.length; d++) {
    if (shape[d] === 1) continue;
    const last = outShape.length - 1;
    const mergeable = last >= 0 &&
      strides.every((s, k) => outStrides[k][last] === s[d] * shape[d]);
    if (mergeable) {
      outShape[last] *= shape[d];
      strides.forEach((s, k) => (outStrides[k][last] = s[d]));
    } else {
      outShape.push(shape[d]);
      strides.forEach((s, k) => outStrides[k].push(s[d]));
    }
  }
  if (outShape.length === 0) return { shape: [1], strides: strides.map(() => [0]) };
  return { shape: outShape, strides: outStrides };
}

/**
 * The padded channel-quad layout of an activation [N, C, H, W] that the convolution texture variants read
 * (kernels/conv.ts): texel (cq·Wp + w', n·Hp + h') holds channels 4cq..4cq+3 at padded position (h', w') =
 * (h + top, w + left) of image n, zeros in the borders and past C. As a texture it is filled by a packing pass;
 * a producer that knows its consumer may write it into a buffer instead (`quadBufferElements`), in rows of
 * `quadPitch` texels, which a flat copy turns into the texture.
 */
export interface QuadLayout {
  N: number;
  C: number;
  H: number;
  W: number;
  /** Padded height and width, and the top/left border. */
  Hp: number;
  Wp: number;
  top: number;
  left: number;
}

/** Texels per row of a quad-layout buffer: the texture's width rounded up to the 256-byte copy row alignment. */
export function quadPitch(l: QuadLayout): number {
  return Math.ceil((Math.ceil(l.C / 4) * l.Wp) / 16) * 16;
}

/** Floats of a quad-layout buffer (`quadPitch` texels per padded row, N·Hp rows). */
export function quadBufferElements(l: QuadLayout): number {
  return 4 * quadPitch(l) * l.N * l.Hp;
}

/** Whether two quad layouts place every texel alike. */
export function sameQuadLayout(a: QuadLayout, b: QuadLayout): boolean {
  return a.N === b.N && a.C === b.C && a.H === b.H && a.W === b.W && a.Hp === b.Hp && a.Wp === b.Wp &&
    a.top === b.top && a.left === b.left;
}

/**
 * The strided copy (kernels/copy.ts) from a quad-layout buffer to contiguous NCHW, for C a multiple of 4: the
 * source seen as [N, C/4, 4, H, W].
 */
export function unpackQuadParams(l: QuadLayout) {
  if (l.C % 4 !== 0) throw new Error(`unpackQuadParams: ${l.C} channels are not whole quads`);
  const pitch = quadPitch(l);
  const shape = [l.N, l.C / 4, 4, l.H, l.W];
  return {
    shape,
    srcOffset: 4 * (pitch * l.top + l.left),
    srcStrides: [4 * pitch * l.Hp, 4 * l.Wp, 1, 4 * pitch, 4],
    dstOffset: 0,
    dstStrides: contiguousStrides(shape),
  };
}

/** Calls `f(i, q)` for every element: its index in contiguous NCHW and in a quad-layout buffer. */
function forEachQuadElement(l: QuadLayout, f: (i: number, q: number) => void) {
  const pitch = quadPitch(l);
  for (let n = 0; n < l.N; n++) {
    for (let c = 0; c < l.C; c++) {
      for (let h = 0; h < l.H; h++) {
        for (let w = 0; w < l.W; w++) {
          const texel = (n * l.Hp + h + l.top) * pitch + (c >> 2) * l.Wp + w + l.left;
          f(((n * l.C + c) * l.H + h) * l.W + w, 4 * texel + (c & 3));
        }
      }
    }
  }
}

/** A contiguous NCHW array written into a quad-layout buffer, zeros elsewhere (CPU references). */
export function toQuadBuffer(
  l: QuadLayout,
  nchw: ArrayLike<number>,
  out: { [i: number]: number; length: number },
) {
  for (let i = 0; i < out.length; i++) out[i] = 0;
  forEachQuadElement(l, (i, q) => out[q] = nchw[i]);
}

/** The contiguous NCHW array of a quad-layout buffer (CPU references). */
export function fromQuadBuffer(l: QuadLayout, quad: ArrayLike<number>, out: { [i: number]: number }) {
  forEachQuadElement(l, (i, q) => out[i] = quad[q]);
}

/**
 * WGSL that stores a 4 × 4 block, `${v}0..${v}3` (four channels' vec4s over four positions), transposed into
 * texels t..t+3 of `out` (one position's four channels each): how the quad-layout writers store.
 */
export function quadBlockStoreWgsl(out: string, v: string, indent: string): string {
  return ["x", "y", "z", "w"].map((e, j) =>
    `${out}[t + ${j}u] = vec4<f32>(${v}0.${e}, ${v}1.${e}, ${v}2.${e}, ${v}3.${e});`
  )
    .join(`\n${indent}`);
}

/**
 * WGSL that zeroes the border texels of padded row `hp` of one channel quad, texels col..end of the row
 * starting at texel r: all of them in a border row, else those left of `left` and from `left + W` on (the
 * writers' names: hp, top, H, left, r, col, end; `W` is given as an expression).
 */
export function quadBorderRowWgsl(out: string, W: string, indent: string): string {
  return `if (hp < top || hp >= top + H) {
${indent}  for (var tx = col; tx < end; tx++) { ${out}[r + tx] = vec4<f32>(0.0); }
${indent}} else {
${indent}  for (var tx = col; tx < col + left; tx++) { ${out}[r + tx] = vec4<f32>(0.0); }
${indent}  for (var tx = col + left + ${W}; tx < end; tx++) { ${out}[r + tx] = vec4<f32>(0.0); }
${indent}}`;
}
