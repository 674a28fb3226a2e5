/**
 * @file Dense float64 linear algebra on the host for the Fréchet distance: the symmetric eigendecomposition
 * (Householder tridiagonalisation + implicit QL with Wilkinson shifts, the tred2/tql2 pair of EISPACK), a
 * cache-blocked A·Bᵀ product, and the trace of the matrix square root that FID needs,
 *
 *     Tr √(Σ₁^{1/2} Σ₂ Σ₁^{1/2}) = Σᵢ √λᵢ   (λᵢ the eigenvalues of Σ₁^{1/2} Σ₂ Σ₁^{1/2}, negatives from round-off → 0).
 *
 * Matrices are row-major Float64Arrays. The implementation is arranged so that every inner loop runs along a row:
 *
 * - Tridiagonalisation keeps only the lower triangle. Step k reflects column k below the diagonal onto its first
 *   entry with H = I − β·v·vᵀ and updates the trailing block as A ← A − v·qᵀ − q·vᵀ with p = β·A·v and
 *   q = p − (β·vᵀp/2)·v (one symmetric matrix-vector product, one rank-2 update). The Householder vector is
 *   stored in the (unused) upper triangle of row k.
 * - The orthogonal factor is accumulated transposed, Qᵀ = H_{n−3}···H₀: row r of Qᵀ is e_rᵀ·H_{n−3}···H₀, which
 *   only the reflections with k < r change, computed for blocks of rows that stay in cache while the Householder
 *   vectors stream past.
 * - QL rotations act on two adjacent columns of Q, i.e. on two adjacent rows of Qᵀ: contiguous memory, four
 *   rotations of a sweep per pass. The eigenvectors come out as the rows of the returned matrix.
 *
 * Measured on this 2-core machine (shared, so ±30%) for a 2048×2048 covariance: eigendecomposition with vectors
 * ≈ 25 s (tridiagonalisation 7 s, Qᵀ 7 s, QL 12 s), eigenvalues only ≈ 7 s, a full Fréchet distance ≈ 40 s of
 * CPU, and ≈ 11 s against a `FrechetReference` whose decomposition is already done; the trace agrees with
 * scipy.linalg.sqrtm to 1e-14 relative.
 *
 * For the square-root trace, with Σ₁ = Uᵀ·Λ·U (U's rows the eigenvectors) and D = √Λ₊, the matrix
 * Σ₁^{1/2}·Σ₂·Σ₁^{1/2} = Uᵀ·(D·U·Σ₂·Uᵀ·D)·U is similar to M = D·(U·Σ₂·Uᵀ)·D, so its eigenvalues are M's: one
 * eigendecomposition with vectors, two products (U·Σ₂ and its product with Uᵀ, of which only M's lower triangle
 * is formed, and only for the rows with λ > 0, which makes singular covariances cheaper, not fragile), and one
 * eigendecomposition without vectors.
 */

/** Machine epsilon of float64. */
const EPS = 2 ** -52;

/** √(a² + b²) without destructive overflow or underflow. */
function hypot(a: number, b: number): number {
  const x = Math.abs(a), y = Math.abs(b);
  if (x > y) {
    const r = y / x;
    return x * Math.sqrt(1 + r * r);
  }
  if (y === 0) return 0;
  const r = x / y;
  return y * Math.sqrt(1 + r * r);
}

function checkSquare(who: string, a: ArrayLike<number>, n: number) {
  if (!Number.isInteger(n) || n < 1) throw new Error(`${who}: size must be a positive integer, got ${n}`);
  if (a.length !== n * n) throw new Error(`${who}: expected ${n}×${n} = ${n * n} values, got ${a.length}`);
}

/**
 * Householder reduction of the symmetric matrix in `a`'s lower triangle to tridiagonal form T = Qᵀ·A·Q.
 * Writes T's diagonal to `d` and its subdiagonal to `e` (e[i] = T[i+1][i], e[n−1] = 0) and returns the
 * reflection coefficients β; `a` is overwritten (its upper triangle rows hold the Householder vectors).
 */
function tridiagonalize(a: Float64Array, n: number, d: Float64Array, e: Float64Array): Float64Array {
  const beta = new Float64Array(n);
  const p = new Float64Array(n);
  for (let k = 0; k < n - 2; k++) {
    const m0 = k + 1, row = k * n;
    d[k] = a[row + k];
    // x = A[k+1.., k]; scale first so that its norm neither overflows nor underflows.
    let scale = 0;
    for (let i = m0; i < n; i++) scale = Math.max(scale, Math.abs(a[i * n + k]));
    let tail = 0;
    for (let i = m0 + 1; i < n; i++) tail = Math.max(tail, Math.abs(a[i * n + k]));
    if (tail === 0) {
      // Already tridiagonal in this column: no reflection.
      e[k] = a[m0 * n + k];
      beta[k] = 0;
      continue;
    }
    let norm2 = 0;
    for (let i = m0; i < n; i++) {
      const x = a[i * n + k] / scale;
      norm2 += x * x;
    }
    const x0 = a[m0 * n + k];
    // alpha has the opposite sign of x0, so v0 = x0 − alpha never cancels.
    const alpha = (x0 > 0 ? -scale : scale) * Math.sqrt(norm2);
    let vv = 0;
    for (let i = m0; i < n; i++) {
      const vi = i === m0 ? x0 - alpha : a[i * n + k];
      a[row + i] = vi;
      vv += vi * vi;
    }
    e[k] = alpha;
    const b = 2 / vv;
    beta[k] = b;
    // p = b·B·v over the trailing block B, from its lower triangle: row i contributes B[i][j]·v[j] to p[i] and,
    // by symmetry, B[i][j]·v[i] to p[j].
    p.fill(0, m0, n);
    for (let i = m0; i < n; i++) {
      const ri = i * n, vi = a[row + i];
      let s = 0;
      for (let j = m0; j < i; j++) {
        const aij = a[ri + j];
        s += aij * a[row + j];
        p[j] += aij * vi;
      }
      p[i] += s + a[ri + i] * vi;
    }
    let vp = 0;
    for (let i = m0; i < n; i++) {
      p[i] *= b;
      vp += a[row + i] * p[i];
    }
    const K = 0.5 * b * vp;
    for (let i = m0; i < n; i++) p[i] -= K * a[row + i];
    // B ← B − v·qᵀ − q·vᵀ on the lower triangle (p now holds q).
    for (let i = m0; i < n; i++) {
      const ri = i * n, vi = a[row + i], qi = p[i];
      for (let j = m0; j <= i; j++) a[ri + j] -= vi * p[j] + qi * a[row + j];
    }
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * n + n - 2];
    e[n - 2] = a[(n - 1) * n + n - 2];
  }
  d[n - 1] = a[(n - 1) * n + n - 1];
  e[n - 1] = 0;
  return beta;
}

/** Rows of Qᵀ per block of `accumulateQt`: the block stays in cache while every Householder vector passes. */
const QT_ROW_BLOCK = 16;

/**
 * Qᵀ (row-major) from the Householder vectors that `tridiagonalize` left in `a`: row r of Qᵀ is
 * e_rᵀ·H_{n−3}···H₀, i.e. x ← x − β_k·(x·v_k)·v_k for k = n−3 … 0, where only k < r can change it (v_k vanishes
 * at indices ≤ k, and x = e_r until then). Rows are processed in blocks that stay in cache while the vectors
 * stream past, four rows at a time so that each vector element loaded serves four rows.
 */
function accumulateQt(a: Float64Array, n: number, beta: Float64Array): Float64Array {
  const qt = new Float64Array(n * n);
  for (let i = 0; i < n; i++) qt[i * n + i] = 1;
  for (let r0 = 1; r0 < n; r0 += QT_ROW_BLOCK) {
    const r1 = Math.min(n, r0 + QT_ROW_BLOCK);
    for (let k = Math.min(n - 3, r1 - 2); k >= 0; k--) {
      const b = beta[k];
      if (b === 0) continue;
      const m0 = k + 1, row = k * n;
      // Rows r > k of the block; processed four at a time.
      let r = Math.max(r0, m0);
      for (; r + 3 < r1; r += 4) {
        const q0 = r * n, q1 = q0 + n, q2 = q1 + n, q3 = q2 + n;
        let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (let j = m0; j < n; j++) {
          const v = a[row + j];
          s0 += qt[q0 + j] * v;
          s1 += qt[q1 + j] * v;
          s2 += qt[q2 + j] * v;
          s3 += qt[q3 + j] * v;
        }
        s0 *= b;
        s1 *= b;
        s2 *= b;
        s3 *= b;
        for (let j = m0; j < n; j++) {
          const v = a[row + j];
          qt[q0 + j] -= s0 * v;
          qt[q1 + j] -= s1 * v;
          qt[q2 + j] -= s2 * v;
          qt[q3 + j] -= s3 * v;
        }
      }
      for (; r < r1; r++) {
        const q0 = r * n;
        let s0 = 0;
        for (let j = m0; j < n; j++) s0 += qt[q0 + j] * a[row + j];
        s0 *= b;
        for (let j = m0; j < n; j++) qt[q0 + j] -= s0 * a[row + j];
      }
    }
  }
  return qt;
}

/**
 * Applies one QL sweep's rotations to the rows of z: rotation i (for i = hi − 1 down to lo, angles in cs[i],
 * sn[i]) mixes rows i and i + 1 as (z_i, z_{i+1}) ← (c·z_i − s·z_{i+1}, s·z_i + c·z_{i+1}). Row i + 1 is final after
 * rotation i and row i goes on into rotation i − 1, so four consecutive rotations run in one pass over five rows
 * with the travelling row in a register: each element is loaded and stored about once per four rotations
 * instead of twice per rotation (measured about 1.6× faster than one rotation per pass).
 */
function applySweep(z: Float64Array, n: number, hi: number, lo: number, cs: Float64Array, sn: Float64Array) {
  let i = hi - 1;
  for (; i - 3 >= lo; i -= 4) {
    const c0 = cs[i], s0 = sn[i], c1 = cs[i - 1], s1 = sn[i - 1];
    const c2 = cs[i - 2], s2 = sn[i - 2], c3 = cs[i - 3], s3 = sn[i - 3];
    const r1 = i * n, r0 = r1 + n, r2 = r1 - n, r3 = r2 - n, r4 = r3 - n;
    for (let k = 0; k < n; k++) {
      let t = z[r0 + k];
      const a1 = z[r1 + k], a2 = z[r2 + k], a3 = z[r3 + k], a4 = z[r4 + k];
      z[r0 + k] = s0 * a1 + c0 * t;
      t = c0 * a1 - s0 * t;
      z[r1 + k] = s1 * a2 + c1 * t;
      t = c1 * a2 - s1 * t;
      z[r2 + k] = s2 * a3 + c2 * t;
      t = c2 * a3 - s2 * t;
      z[r3 + k] = s3 * a4 + c3 * t;
      z[r4 + k] = c3 * a4 - s3 * t;
    }
  }
  for (; i >= lo; i--) {
    const c = cs[i], s = sn[i], r0 = i * n, r1 = r0 + n;
    for (let k = 0; k < n; k++) {
      const zi = z[r0 + k], zj = z[r1 + k];
      z[r1 + k] = s * zi + c * zj;
      z[r0 + k] = c * zi - s * zj;
    }
  }
}

/**
 * Eigenvalues of the symmetric tridiagonal matrix (d, e) by the implicit QL method with Wilkinson shifts,
 * in place in `d`. With `z`, the rotations are also applied to z's rows (z holds Qᵀ: rows i and i+1 rotate
 * together), which turns them into the eigenvectors.
 */
function tridiagonalQL(d: Float64Array, e: Float64Array, n: number, z: Float64Array | null): void {
  const cs = new Float64Array(n), sn = new Float64Array(n);
  // ‖T‖ (max row sum). An entry is negligible at eps·‖T‖ as well as at eps relative to its neighbours: in the
  // null space of a singular covariance d and e are all round-off (~eps·‖T‖), and every sweep's rotations
  // against the large eigenvalues put that much back into e, so a purely relative test never splits the block
  // (measured: a rank-31 covariance of 240 features did not converge). Tridiagonalisation itself is only
  // accurate to eps·‖T‖, so nothing is lost.
  let norm = 0;
  for (let i = 0; i < n; i++) {
    norm = Math.max(norm, Math.abs(d[i]) + Math.abs(e[i]) + (i > 0 ? Math.abs(e[i - 1]) : 0));
  }
  for (let l = 0; l < n; l++) {
    let iterations = 0;
    for (;;) {
      // The first negligible subdiagonal entry at or after l splits off a block [l, m].
      let m = l;
      for (; m < n - 1; m++) {
        const dd = Math.abs(d[m]) + Math.abs(d[m + 1]);
        if (Math.abs(e[m]) <= EPS * Math.max(dd, norm)) break;
      }
      if (m === l) break;
      if (++iterations > 60) throw new Error(`symmetricEigen: QL did not converge for eigenvalue ${l}`);
      // Wilkinson shift from the leading 2×2 of the block, folded into the first rotation.
      let g = (d[l + 1] - d[l]) / (2 * e[l]);
      let r = hypot(g, 1);
      g = d[m] - d[l] + e[l] / (g + (g >= 0 ? r : -r));
      let s = 1, c = 1, p = 0;
      let i = m - 1;
      for (; i >= l; i--) {
        const f = s * e[i], b = c * e[i];
        r = hypot(f, g);
        e[i + 1] = r;
        if (r === 0) {
          // Underflow: the block splits at i + 1; start over on the smaller block.
          d[i + 1] -= p;
          e[m] = 0;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
        cs[i] = c;
        sn[i] = s;
      }
      // Rotations m−1 … i+1 were made (all of them unless the sweep stopped early at i ≥ l).
      if (z && i + 1 <= m - 1) applySweep(z, n, m, i + 1, cs, sn);
      if (i >= l) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0;
    }
  }
}

/** Milliseconds spent in each stage of `symmetricEigen`. */
export interface EigenTimings {
  tridiagonalize: number;
  accumulate: number;
  ql: number;
}

/** A function that returns the milliseconds since it was made or last called. */
function stopwatch(): () => number {
  let t = performance.now();
  return () => {
    const now = performance.now(), dt = now - t;
    t = now;
    return dt;
  };
}

export interface SymmetricEigen {
  /** Eigenvalues in ascending order. */
  values: Float64Array;
  /** Row i (values i·n … i·n + n − 1) is the unit eigenvector of values[i]; null when not requested. */
  vectors: Float64Array | null;
}

/**
 * Eigendecomposition of the symmetric n×n matrix `a` (row-major; only its lower triangle is read), in float64:
 * A = Σᵢ λᵢ·uᵢ·uᵢᵀ. `vectors: false` skips the eigenvectors (about a third of the work).
 */
export function symmetricEigen(
  a: ArrayLike<number>,
  n: number,
  opts: { vectors?: boolean; timings?: EigenTimings } = {},
): SymmetricEigen {
  checkSquare("symmetricEigen", a, n);
  const work = Float64Array.from(a);
  const d = new Float64Array(n), e = new Float64Array(n);
  for (let i = 0; i < n * n; i++) {
    if (!Number.isFinite(work[i])) throw new Error(`symmetricEigen: entry ${i} is ${work[i]}`);
  }
  const clock = stopwatch();
  const beta = tridiagonalize(work, n, d, e);
  const t1 = clock();
  const z = (opts.vectors ?? true) ? accumulateQt(work, n, beta) : null;
  const t2 = clock();
  tridiagonalQL(d, e, n, z);
  const t3 = clock();
  if (opts.timings) Object.assign(opts.timings, { tridiagonalize: t1, accumulate: t2, ql: t3 });
  const order = Array.from({ length: n }, (_, i) => i).sort((i, j) => d[i] - d[j]);
  const values = Float64Array.from(order, (i) => d[i]);
  if (!z) return { values, vectors: null };
  const vectors = new Float64Array(n * n);
  order.forEach((src, dst) => vectors.set(z.subarray(src * n, src * n + n), dst * n));
  return { values, vectors };
}

// ---------------------------------------------------------------------------------------------------------------
// Products.

/** Rows of B (and the reduction length) per cache block of `gemmABt`: 64 rows × 256 values × 8 bytes = 128 KiB. */
const BLOCK_ROWS = 64, BLOCK_K = 256;

/**
 * C = A·Bᵀ for row-major A (r×K) and B (c×K): C[i][j] = A[i]·B[j], every load along a row. Blocked for the cache
 * (a block of B's rows and of the reduction stays resident while all of A's rows stream past) and for registers
 * (4×2 outputs per inner loop). With `lower`, only C[i][j] for j ≤ i is computed (r = c), the rest left 0.
 */
export function gemmABt(
  a: Float64Array,
  b: Float64Array,
  r: number,
  c: number,
  K: number,
  opts: { lower?: boolean; out?: Float64Array } = {},
): Float64Array {
  if (a.length < r * K || b.length < c * K) {
    throw new Error(`gemmABt: A needs ${r}×${K}, B ${c}×${K} values; got ${a.length} and ${b.length}`);
  }
  const lower = opts.lower ?? false;
  if (lower && r !== c) throw new Error(`gemmABt: the lower triangle needs a square result, got ${r}×${c}`);
  const out = opts.out ?? new Float64Array(r * c);
  if (out.length < r * c) throw new Error(`gemmABt: out holds ${out.length} values, needs ${r * c}`);
  out.fill(0, 0, r * c);
  for (let k0 = 0; k0 < K; k0 += BLOCK_K) {
    const k1 = Math.min(K, k0 + BLOCK_K);
    for (let j0 = 0; j0 < c; j0 += BLOCK_ROWS) {
      const j1 = Math.min(c, j0 + BLOCK_ROWS);
      for (let i = lower ? j0 : 0; i < r; i += 4) {
        const rows = Math.min(4, r - i);
        const a0 = i * K, a1 = a0 + K, a2 = a1 + K, a3 = a2 + K;
        const jEnd = lower ? Math.min(j1, i + rows) : j1;
        let j = j0;
        for (; j + 1 < jEnd; j += 2) {
          const b0 = j * K, b1 = b0 + K;
          let c00 = 0, c01 = 0, c10 = 0, c11 = 0, c20 = 0, c21 = 0, c30 = 0, c31 = 0;
          if (rows === 4) {
            for (let k = k0; k < k1; k++) {
              const x0 = b[b0 + k], x1 = b[b1 + k];
              const y0 = a[a0 + k], y1 = a[a1 + k], y2 = a[a2 + k], y3 = a[a3 + k];
              c00 += y0 * x0;
              c01 += y0 * x1;
              c10 += y1 * x0;
              c11 += y1 * x1;
              c20 += y2 * x0;
              c21 += y2 * x1;
              c30 += y3 * x0;
              c31 += y3 * x1;
            }
          } else {
            for (let k = k0; k < k1; k++) {
              const x0 = b[b0 + k], x1 = b[b1 + k];
              const y0 = a[a0 + k];
              c00 += y0 * x0;
              c01 += y0 * x1;
              if (rows > 1) {
                const y1 = a[a1 + k];
                c10 += y1 * x0;
                c11 += y1 * x1;
              }
              if (rows > 2) {
                const y2 = a[a2 + k];
                c20 += y2 * x0;
                c21 += y2 * x1;
              }
            }
          }
          const o = i * c + j;
          out[o] += c00;
          out[o + 1] += c01;
          if (rows > 1) (out[o + c] += c10), (out[o + c + 1] += c11);
          if (rows > 2) (out[o + 2 * c] += c20), (out[o + 2 * c + 1] += c21);
          if (rows > 3) (out[o + 3 * c] += c30), (out[o + 3 * c + 1] += c31);
        }
        for (; j < jEnd; j++) {
          const b0 = j * K;
          for (let q = 0; q < rows; q++) {
            const aq = a0 + q * K;
            let s = 0;
            for (let k = k0; k < k1; k++) s += a[aq + k] * b[b0 + k];
            out[(i + q) * c + j] += s;
          }
        }
      }
    }
  }
  if (lower) {
    // The 4×2 tiles overshoot the diagonal by up to 3 columns; clear the strict upper triangle.
    for (let i = 0; i < r; i++) out.fill(0, i * c + i + 1, i * c + c);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Square roots.

/** (A + Aᵀ)/2: covariances read from files are symmetric only up to round-off. */
export function symmetrize(a: ArrayLike<number>, n: number): Float64Array {
  checkSquare("symmetrize", a, n);
  const s = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j <= i; j++) {
      const v = 0.5 * (a[i * n + j] + a[j * n + i]);
      s[i * n + j] = v;
      s[j * n + i] = v;
    }
  }
  return s;
}

/** The principal square root V·√Λ₊·Vᵀ of a symmetric positive semi-definite matrix (negative λ → 0). */
export function sqrtPsd(a: ArrayLike<number>, n: number): Float64Array {
  const { values, vectors } = symmetricEigen(symmetrize(a, n), n);
  const u = vectors!;
  const scaled = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    const s = Math.sqrt(Math.max(values[i], 0));
    for (let k = 0; k < n; k++) scaled[i * n + k] = s * u[i * n + k];
  }
  // Σᵢ √λᵢ·uᵢ·uᵢᵀ = Sᵀ·U with S = √Λ₊·U: entry [j][k] = Σᵢ S[i][j]·U[i][k], accumulated row by row.
  const out = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const s = scaled[i * n + j];
      if (s === 0) continue;
      const row = j * n, ui = i * n;
      for (let k = 0; k < n; k++) out[row + k] += s * u[ui + k];
    }
  }
  return out;
}

/** Timings of the steps of `traceSqrtProduct`, in milliseconds. */
export interface TraceSqrtTimings {
  eigenWithVectors: number;
  products: number;
  eigenValues: number;
}

/**
 * A square-root factor of a symmetric positive semi-definite Σ: the r×n matrix W = D·U whose rows are the
 * eigenvectors with λ > 0 scaled by √λ, so that Σ = Wᵀ·W (r = the numerical rank). One eigendecomposition.
 */
export function psdSqrtFactor(sigma: ArrayLike<number>, n: number): { w: Float64Array; rank: number } {
  checkSquare("psdSqrtFactor", sigma, n);
  const { values, vectors } = symmetricEigen(symmetrize(sigma, n), n);
  const u = vectors!;
  const keep: number[] = [];
  for (let i = 0; i < n; i++) if (values[i] > 0) keep.push(i);
  const w = new Float64Array(keep.length * n);
  keep.forEach((i, q) => {
    const s = Math.sqrt(values[i]);
    for (let k = 0; k < n; k++) w[q * n + k] = s * u[i * n + k];
  });
  return { w, rank: keep.length };
}

/**
 * Tr √(Σ₁^{1/2}·Σ₂·Σ₁^{1/2}) from Σ₁'s factor W (r×n, from `psdSqrtFactor`) and Σ₂: the eigenvalues of
 * M = W·Σ₂·Wᵀ (r×r), which has the same nonzero eigenvalues, clamped at 0 and square-rooted.
 */
export function traceSqrtFromFactor(
  w: Float64Array,
  rank: number,
  sigma2: ArrayLike<number>,
  n: number,
  timings?: Omit<TraceSqrtTimings, "eigenWithVectors">,
): number {
  checkSquare("traceSqrtFromFactor (sigma2)", sigma2, n);
  if (w.length !== rank * n) {
    throw new Error(`traceSqrtFromFactor: factor has ${w.length} values, not ${rank}×${n}`);
  }
  if (rank === 0) return 0;
  const clock = stopwatch();
  // T = W·Σ₂ (= W·Σ₂ᵀ, Σ₂ symmetric), then M = T·Wᵀ, lower triangle only.
  const tm = gemmABt(w, symmetrize(sigma2, n), rank, n, n);
  const m = gemmABt(tm, w, rank, rank, n, { lower: true });
  const products = clock();
  const { values } = symmetricEigen(m, rank, { vectors: false });
  if (timings) Object.assign(timings, { products, eigenValues: clock() });
  let sum = 0;
  for (let i = 0; i < rank; i++) sum += Math.sqrt(Math.max(values[i], 0));
  return sum;
}

/**
 * Tr √(Σ₁^{1/2}·Σ₂·Σ₁^{1/2}) = Σᵢ √max(λᵢ, 0) for symmetric positive semi-definite Σ₁, Σ₂ (n×n, row-major),
 * in float64. Singular Σ₁ or Σ₂ (fewer samples than dimensions) are fine: zero eigenvalues of Σ₁ drop out, and
 * eigenvalues of the product that round-off made slightly negative count as 0.
 */
export function traceSqrtProduct(
  sigma1: ArrayLike<number>,
  sigma2: ArrayLike<number>,
  n: number,
  timings?: TraceSqrtTimings,
): number {
  checkSquare("traceSqrtProduct (sigma1)", sigma1, n);
  checkSquare("traceSqrtProduct (sigma2)", sigma2, n);
  const clock = stopwatch();
  const { w, rank } = psdSqrtFactor(sigma1, n);
  const eigenWithVectors = clock();
  const rest = { products: 0, eigenValues: 0 };
  const t = traceSqrtFromFactor(w, rank, sigma2, n, rest);
  if (timings) Object.assign(timings, { eigenWithVectors, ...rest });
  return t;
}
