/**
 * @file FID, KID and their statistics: the float64 symmetric eigensolver against cyclic Jacobi (an independent
 * algorithm), the Fréchet distance against a reference that takes the square root of Σ₁Σ₂ by the Denman–Beavers
 * iteration (no eigendecomposition at all) on random SPD pairs and against closed forms, singular covariances
 * (fewer samples than dimensions), the float64 feature accumulator against a two-pass computation (also far from
 * the origin, where Σxxᵀ − nμμᵀ would cancel), KID against the direct formula and its unbiasedness, and the
 * statistics files: our safetensors, .npz written by NumPy itself (stored with ZIP64 local headers, and
 * compressed, Fortran-ordered, big-endian, half precision), a hand-built ZIP64 archive, and corrupt files.
 */

import fc from "fast-check";
import { tensor } from "../engine/mod.ts";
import {
  decodeStatistics,
  encodeStatistics,
  FeatureStatistics,
  fidFromStatistics,
  frechetDistance,
  FrechetReference,
  kernelInceptionDistance,
  loadStatistics,
  saveStatistics,
} from "../eval/fid.ts";
import { gemmABt, sqrtPsd, symmetricEigen, traceSqrtProduct } from "../eval/linalg.ts";
import { crc32, encodeNpz, parseNpy, readNpz } from "../eval/npz.ts";
import {
  assertClose,
  assertRejects,
  gpuDevice,
  gpuTest,
  RUNS,
  seedArb,
  test,
  uniformStream,
} from "./util.ts";

// ---------------------------------------------------------------------------------------------------------------
// Independent float64 references.

/** Standard normal draws (Box–Muller). */
function gaussian(seed: number): () => number {
  const u = uniformStream(seed, -0.5, 0.5);
  return () => Math.sqrt(-2 * Math.log(u() + 0.5 + 1e-300)) * Math.cos(2 * Math.PI * (u() + 0.5));
}

function matmul(a: Float64Array, b: Float64Array, n: number): Float64Array {
  const c = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < n; k++) {
      const v = a[i * n + k];
      for (let j = 0; j < n; j++) c[i * n + j] += v * b[k * n + j];
    }
  }
  return c;
}

/** Inverse by Gauss–Jordan elimination with partial pivoting. */
function inverse(a: Float64Array, n: number): Float64Array {
  const m = a.slice(), inv = new Float64Array(n * n);
  for (let i = 0; i < n; i++) inv[i * n + i] = 1;
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(m[r * n + c]) > Math.abs(m[p * n + c])) p = r;
    for (const x of [m, inv]) {
      for (let j = 0; j < n; j++) [x[c * n + j], x[p * n + j]] = [x[p * n + j], x[c * n + j]];
    }
    const d = m[c * n + c];
    for (let j = 0; j < n; j++) {
      m[c * n + j] /= d;
      inv[c * n + j] /= d;
    }
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const f = m[r * n + c];
      for (let j = 0; j < n; j++) {
        m[r * n + j] -= f * m[c * n + j];
        inv[r * n + j] -= f * inv[c * n + j];
      }
    }
  }
  return inv;
}

/** √A of a matrix with positive real eigenvalues by the Denman–Beavers iteration (Y → A^{1/2}, Z → A^{−1/2}). */
function denmanBeaversSqrt(a: Float64Array, n: number): Float64Array {
  let y = a.slice(), z = new Float64Array(n * n);
  for (let i = 0; i < n; i++) z[i * n + i] = 1;
  for (let it = 0; it < 100; it++) {
    const yi = inverse(y, n), zi = inverse(z, n);
    const y2 = y.map((v, i) => 0.5 * (v + zi[i])), z2 = z.map((v, i) => 0.5 * (v + yi[i]));
    let change = 0, size = 0;
    for (let i = 0; i < n * n; i++) {
      change = Math.max(change, Math.abs(y2[i] - y[i]));
      size = Math.max(size, Math.abs(y2[i]));
    }
    y = y2;
    z = z2;
    if (change <= 1e-15 * size) return y;
  }
  throw new Error("Denman–Beavers did not converge");
}

/** Eigenvalues and eigenvectors (columns of V) of a symmetric matrix by cyclic Jacobi rotations. */
function jacobiEigen(a: Float64Array, n: number): { values: number[]; v: Float64Array } {
  const m = a.slice(), v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0, all = 0;
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        all += m[i * n + j] ** 2;
        if (i !== j) off += m[i * n + j] ** 2;
      }
    }
    if (off <= 1e-32 * all) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = m[p * n + q];
        if (apq === 0) continue;
        const theta = (m[q * n + q] - m[p * n + p]) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1), s = t * c;
        for (let k = 0; k < n; k++) {
          const kp = m[k * n + p], kq = m[k * n + q];
          m[k * n + p] = c * kp - s * kq;
          m[k * n + q] = s * kp + c * kq;
        }
        for (let k = 0; k < n; k++) {
          const pk = m[p * n + k], qk = m[q * n + k];
          m[p * n + k] = c * pk - s * qk;
          m[q * n + k] = s * pk + c * qk;
        }
        for (let k = 0; k < n; k++) {
          const kp = v[k * n + p], kq = v[k * n + q];
          v[k * n + p] = c * kp - s * kq;
          v[k * n + q] = s * kp + c * kq;
        }
      }
    }
  }
  return { values: Array.from({ length: n }, (_, i) => m[i * n + i]), v };
}

/** Tr √(Σ₁^{1/2}Σ₂Σ₁^{1/2}) with Jacobi: √Σ₁ = V√Λ₊Vᵀ, then the eigenvalues of √Σ₁·Σ₂·√Σ₁ (PSD-safe). */
function jacobiTraceSqrt(s1: Float64Array, s2: Float64Array, n: number): number {
  const { values, v } = jacobiEigen(s1, n);
  const r = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      let acc = 0;
      for (let k = 0; k < n; k++) acc += v[i * n + k] * Math.sqrt(Math.max(values[k], 0)) * v[j * n + k];
      r[i * n + j] = acc;
    }
  }
  return jacobiEigen(matmul(matmul(r, s2, n), r, n), n).values.reduce(
    (a, l) => a + Math.sqrt(Math.max(l, 0)),
    0,
  );
}

/** Sample covariance (two-pass, unbiased) and mean of `rows` samples. */
function twoPass(x: Float64Array, rows: number, d: number): { mu: Float64Array; sigma: Float64Array } {
  const mu = new Float64Array(d), sigma = new Float64Array(d * d);
  for (let r = 0; r < rows; r++) for (let j = 0; j < d; j++) mu[j] += x[r * d + j] / rows;
  for (let r = 0; r < rows; r++) {
    for (let i = 0; i < d; i++) {
      for (let j = 0; j < d; j++) {
        sigma[i * d + j] += (x[r * d + i] - mu[i]) * (x[r * d + j] - mu[j]) / (rows - 1);
      }
    }
  }
  return { mu, sigma };
}

/**
 * Random features: rows samples of d correlated Gaussian dimensions, with a mean offset and scale; `mixSeed`
 * picks the correlation (the distribution), `seed` the samples.
 */
function features(
  seed: number,
  rows: number,
  d: number,
  scale = 1,
  offset = 0,
  mixSeed = seed + 1,
): Float64Array {
  const g = gaussian(seed), mix = gaussian(mixSeed);
  const a = Float64Array.from({ length: d * d }, () => mix() / Math.sqrt(d));
  const out = new Float64Array(rows * d);
  for (let r = 0; r < rows; r++) {
    const z = Float64Array.from({ length: d }, () => g());
    for (let i = 0; i < d; i++) {
      let v = z[i];
      for (let k = 0; k < d; k++) v += a[i * d + k] * z[k];
      out[r * d + i] = offset + scale * v + (i % 3) * 0.1;
    }
  }
  return out;
}

/** A random SPD matrix B·Bᵀ/d + ε·I, times `scale`. */
function randomSpd(seed: number, d: number, scale: number, eps = 0.05): Float64Array {
  const g = gaussian(seed);
  const b = Float64Array.from({ length: d * d }, () => g());
  const s = gemmABt(b, b, d, d, d);
  for (let i = 0; i < d * d; i++) s[i] = (scale * s[i]) / d;
  for (let i = 0; i < d; i++) s[i * d + i] += scale * eps;
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Eigensolver.

test("symmetricEigen matches cyclic Jacobi; eigenvectors are orthonormal with small residuals", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 14 }),
      seedArb,
      fc.constantFrom(1, 1e-6, 1e6),
      fc.constantFrom("dense", "low-rank", "repeated"),
      (n, seed, scale, kind) => {
        const u = uniformStream(seed, -0.5, 0.5);
        let a: Float64Array = new Float64Array(n * n);
        if (kind === "dense") {
          for (let i = 0; i < n; i++) {
            for (let j = 0; j <= i; j++) a[i * n + j] = a[j * n + i] = scale * u();
          }
        } else if (kind === "low-rank") {
          // Rank ≤ 2: most eigenvalues are exactly zero.
          const b = Float64Array.from({ length: n * 2 }, () => u()); // n×2
          a = gemmABt(b, b, n, n, 2);
          for (let i = 0; i < n * n; i++) a[i] *= scale;
        } else {
          // Q·diag(1, 1, 1, 2, 2, …)·Qᵀ from a Jacobi-orthonormalised random matrix: repeated eigenvalues.
          const q = jacobiEigen(randomSpd(seed, n, 1), n).v;
          for (let i = 0; i < n; i++) {
            for (let j = 0; j < n; j++) {
              let s = 0;
              for (let k = 0; k < n; k++) s += q[i * n + k] * (1 + Math.floor(k / 3)) * q[j * n + k];
              a[i * n + j] = scale * s;
            }
          }
        }
        const norm = Math.sqrt(a.reduce((s, v) => s + v * v, 0)) || 1;
        const { values, vectors } = symmetricEigen(a, n);
        const want = jacobiEigen(a, n).values.sort((x, y) => x - y);
        assertClose(values, want, { rtol: 0, atol: 1e-12 * norm }, `eigenvalues (${kind}, n ${n})`);
        for (let i = 1; i < n; i++) {
          if (values[i] < values[i - 1]) throw new Error("eigenvalues not ascending");
        }
        const u2 = vectors!;
        const gram = gemmABt(u2, u2, n, n, n);
        assertClose(gram, Float64Array.from({ length: n * n }, (_, i) => (i % (n + 1) === 0 ? 1 : 0)), {
          rtol: 0,
          atol: 1e-12,
        }, "UUᵀ = I");
        for (let q = 0; q < n; q++) {
          for (let i = 0; i < n; i++) {
            let s = 0;
            for (let k = 0; k < n; k++) s += a[i * n + k] * u2[q * n + k];
            if (Math.abs(s - values[q] * u2[q * n + i]) > 1e-12 * norm) {
              throw new Error(`residual of eigenpair ${q} at ${i}: ${s - values[q] * u2[q * n + i]}`);
            }
          }
        }
        const noVectors = symmetricEigen(a, n, { vectors: false });
        if (noVectors.vectors !== null) throw new Error("vectors: false still returned vectors");
        assertClose(noVectors.values, values, { rtol: 0, atol: 1e-13 * norm }, "values without vectors");
      },
    ),
    { numRuns: RUNS * 4 },
  );
});

test("symmetricEigen converges on singular covariances whose null space is pure round-off", () => {
  // 100 samples of 240 features: rank 99. With a purely relative split test the QL iteration never split off
  // the 141-dimensional null block (found on ShapesNet features; this seed reproduced it).
  const rows = 100, d = 240, g = gaussian(1);
  const x = Float64Array.from({ length: rows * d }, (_, i) => g() * (1 + (i % d) / 10));
  const sigma = new FeatureStatistics(d).add(x).statistics().sigma;
  const { values } = symmetricEigen(sigma, d, { vectors: true });
  let trace = 0;
  for (let i = 0; i < d; i++) trace += sigma[i * d + i];
  assertClose([values.reduce((a, b) => a + b, 0)], [trace], { rtol: 1e-12 });
  const top = values[d - 1];
  assertClose([values.filter((v) => v > 1e-10 * top).length], [rows - 1], { rtol: 0, atol: 0 });
  for (const v of values) if (v < 1e-10 * top) assertClose([v], [0], { atol: 1e-13 * top, rtol: 0 });
});

test("symmetricEigen reads only the lower triangle and rejects bad input", async () => {
  const a = Float64Array.from([2, 99, 1, 3]); // lower triangle [[2, ·], [1, 3]]
  const { values } = symmetricEigen(a, 2);
  const disc = Math.sqrt(1 + 4);
  assertClose(values, [(5 - disc) / 2, (5 + disc) / 2], { rtol: 1e-14, atol: 0 });
  await assertRejects(() => symmetricEigen([1, 2, 3], 2), "symmetricEigen", "2×2");
  await assertRejects(() => symmetricEigen([1, NaN, 0, 1], 2), "symmetricEigen", "NaN");
});

test("sqrtPsd squares back to the matrix, also when singular", () => {
  for (const [seed, d] of [[1, 7], [2, 12]]) {
    const x = features(seed, 4, d); // 4 samples in d dimensions: rank ≤ 3
    const { sigma } = twoPass(x, 4, d);
    const r = sqrtPsd(sigma, d);
    const norm = Math.sqrt(sigma.reduce((s, v) => s + v * v, 0));
    assertClose(matmul(r, r, d), sigma, { rtol: 0, atol: 1e-12 * norm }, `√Σ·√Σ (d ${d})`);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Fréchet distance.

test("FID of identical statistics is 0 (also singular, also through FrechetReference)", () => {
  for (const [d, rows] of [[16, 200], [24, 6]]) {
    const x = features(d, rows, d, 2, 3);
    const { mu, sigma } = twoPass(x, rows, d);
    const fid = frechetDistance(mu, sigma, mu, sigma);
    // Singular Σ: the zero eigenvalues of Σ² come out as ±ε·‖Σ‖², whose square roots are ~1e-8·‖Σ‖.
    const tol = rows > d ? 1e-9 : 1e-6 * (2 * sigma.reduce((s, v, i) => (i % (d + 1) ? s : s + v), 0));
    if (!(Math.abs(fid) <= tol)) throw new Error(`FID(x, x) = ${fid} (d ${d}, ${rows} samples)`);
    const ref = new FrechetReference(mu, sigma);
    if (!(Math.abs(ref.distance(mu, sigma)) <= tol)) {
      throw new Error(`reference FID(x, x) = ${ref.distance(mu, sigma)}`);
    }
  }
});

test("FID matches a Denman–Beavers float64 reference on random SPD pairs to 1e-6 relative", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 12 }),
      seedArb,
      fc.constantFrom(1, 1e-3, 30),
      (d, seed, scale) => {
        const s1 = randomSpd(seed, d, scale), s2 = randomSpd(seed + 1, d, scale * 2);
        const g = gaussian(seed + 2);
        const mu1 = Float64Array.from({ length: d }, () => g()),
          mu2 = Float64Array.from({ length: d }, () => g());
        // EDM's formula with sqrtm(Σ₁Σ₂) (real positive eigenvalues for SPD pairs), by Denman–Beavers.
        const root = denmanBeaversSqrt(matmul(s1, s2, d), d);
        let want = 0;
        for (let i = 0; i < d; i++) {
          want += (mu1[i] - mu2[i]) ** 2 + s1[i * d + i] + s2[i * d + i] - 2 * root[i * d + i];
        }
        const got = frechetDistance(mu1, s1, mu2, s2);
        if (!(Math.abs(got - want) <= 1e-6 * Math.abs(want))) {
          throw new Error(`FID ${got}, reference ${want} (d ${d}, scale ${scale})`);
        }
        // Symmetric in its arguments, and the same through a precomputed reference.
        const back = frechetDistance(mu2, s2, mu1, s1);
        const viaRef = new FrechetReference(mu2, s2).distance(mu1, s1);
        for (const v of [back, viaRef]) {
          if (!(Math.abs(v - want) <= 1e-6 * Math.abs(want))) {
            throw new Error(`swapped FID ${v}, want ${want}`);
          }
        }
      },
    ),
    { numRuns: RUNS * 4 },
  );
});

test("FID of commuting (diagonal) covariances has the closed form Σ(√a − √b)² + ‖Δμ‖², zeros included", () => {
  const a = [4, 0, 9, 1e-3, 2.5, 0], b = [1, 0, 16, 4e-3, 0, 7];
  const d = a.length;
  const diag = (v: number[]) =>
    Float64Array.from({ length: d * d }, (_, i) => (i % (d + 1) === 0 ? v[i / (d + 1)] : 0));
  const mu1 = [1, 2, 3, 4, 5, 6], mu2 = [1, 2.5, 3, 4, 4, 6];
  let want = 0.25 + 1;
  for (let i = 0; i < d; i++) want += (Math.sqrt(a[i]) - Math.sqrt(b[i])) ** 2;
  const got = frechetDistance(mu1, diag(a), mu2, diag(b));
  if (Math.abs(got - want) > 1e-12 * want) throw new Error(`FID ${got}, closed form ${want}`);
});

test("FID with singular covariances (fewer samples than dimensions) matches a Jacobi reference", () => {
  fc.assert(
    fc.property(fc.integer({ min: 6, max: 14 }), fc.integer({ min: 2, max: 5 }), seedArb, (d, rows, seed) => {
      const { mu: mu1, sigma: s1 } = twoPass(features(seed, rows, d), rows, d);
      const { mu: mu2, sigma: s2 } = twoPass(features(seed + 7, rows + 1, d, 1.5, 0.5), rows + 1, d);
      let want = jacobiTraceSqrt(s1, s2, d) * -2;
      for (let i = 0; i < d; i++) want += (mu1[i] - mu2[i]) ** 2 + s1[i * d + i] + s2[i * d + i];
      const got = frechetDistance(mu1, s1, mu2, s2);
      const traces = s1.reduce((s, v, i) => (i % (d + 1) ? s : s + v), 0) +
        s2.reduce((s, v, i) => (i % (d + 1) ? s : s + v), 0);
      if (!(Math.abs(got - want) <= 1e-6 * Math.max(Math.abs(want), traces))) {
        throw new Error(`FID ${got}, Jacobi reference ${want} (d ${d}, ${rows} samples)`);
      }
      // A singular Σ₁ decomposes fine: the trace term equals the one computed from the other side.
      const t12 = traceSqrtProduct(s1, s2, d), t21 = traceSqrtProduct(s2, s1, d);
      if (Math.abs(t12 - t21) > 1e-6 * traces) throw new Error(`Tr√ asymmetric: ${t12} vs ${t21}`);
    }),
    { numRuns: RUNS * 2 },
  );
});

test("frechetDistance rejects mismatched or non-finite statistics, naming what is wrong", async () => {
  const s = randomSpd(1, 3, 1);
  await assertRejects(() => frechetDistance([0, 0, 0], s, [0, 0], s), "second", "sigma", "2×2");
  await assertRejects(() => frechetDistance([0, 0, 0], s, [0, 0, 0], s.subarray(0, 8)), "sigma", "8 values");
  await assertRejects(() => frechetDistance([0, NaN, 0], s, [0, 0, 0], s), "mu[1]", "NaN");
  await assertRejects(
    () => new FrechetReference([0, 0], randomSpd(1, 2, 1)).distance([0, 0, 0], s),
    "dimension 3",
  );
});

// ---------------------------------------------------------------------------------------------------------------
// Accumulation.

test("FeatureStatistics equals the two-pass mean and unbiased covariance over any batch split, far from 0", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 9 }),
      fc.array(fc.integer({ min: 1, max: 7 }), { minLength: 1, maxLength: 5 }),
      seedArb,
      fc.constantFrom(0, 1e4, -3e6),
      (d, batches, seed, offset) => {
        const rows = batches.reduce((a, b) => a + b, 0);
        if (rows < 2) return;
        const x = features(seed, rows, d, 0.5, offset);
        const want = twoPass(x, rows, d);
        const acc = new FeatureStatistics(d),
          left = new FeatureStatistics(d),
          right = new FeatureStatistics(d);
        let at = 0;
        batches.forEach((b, k) => {
          const part = x.subarray(at * d, (at + b) * d);
          acc.add(part);
          (k % 2 ? right : left).add(part, b);
          at += b;
        });
        const stats = acc.statistics();
        if (stats.count !== rows) throw new Error(`count ${stats.count}, expected ${rows}`);
        const scale = Math.max(...want.sigma.map(Math.abs));
        // Relative to the spread, not to |μ|: float64 data at 3e6 are only good to 3e6·2⁻⁵³ ≈ 3e-10 each (which
        // bounds the two-pass reference too), while Σxxᵀ − n·μμᵀ would lose ~|μ|²·2⁻⁵³ ≈ 1e-3.
        const atol = 1e-10 * scale + 8 * 2 ** -53 * Math.abs(offset) * Math.sqrt(scale);
        assertClose(stats.sigma, want.sigma, { rtol: 0, atol }, "covariance");
        assertClose(stats.mu, want.mu, { rtol: 1e-14, atol: 1e-12 }, "mean");
        const merged = left.merge(right).statistics();
        assertClose(merged.sigma, want.sigma, { rtol: 0, atol }, "merged covariance");
      },
    ),
    { numRuns: RUNS * 2 },
  );
});

gpuTest(
  "FeatureStatistics.addTensor (device scatter, float64 merge) matches the host accumulation",
  async () => {
    const device = await gpuDevice();
    const d = 11, rows = [5, 9, 3];
    const host = new FeatureStatistics(d), dev = new FeatureStatistics(d);
    let seed = 40;
    for (const r of rows) {
      const x = Float32Array.from(features(seed++, r, d, 2, 100));
      host.add(x);
      const t = tensor(x, [r, d], { device });
      await dev.addTensor(t);
      t.dispose();
    }
    const a = host.statistics(), b = dev.statistics();
    const scale = Math.max(...a.sigma.map(Math.abs));
    assertClose(b.sigma, a.sigma, { rtol: 0, atol: 1e-5 * scale }, "device covariance");
    assertClose(b.mu, a.mu, { rtol: 1e-6, atol: 0 }, "device mean");
    await assertRejects(
      () => dev.addTensor(tensor(new Float32Array(6), [2, 3], { device })),
      "[N, 11]",
      "[2,3]",
    );
    await assertRejects(() => host.add(new Float64Array(10)), "rows × 11");
    await assertRejects(() => new FeatureStatistics(3).covariance(), "≥ 2 samples");
  },
);

// ---------------------------------------------------------------------------------------------------------------
// KID.

/** The unbiased MMD² of x and y (m rows each) computed straight from the definition. */
function directMmd(x: Float64Array, y: Float64Array, m: number, d: number): number {
  const k = (a: Float64Array, i: number, b: Float64Array, j: number) => {
    let s = 0;
    for (let t = 0; t < d; t++) s += a[i * d + t] * b[j * d + t];
    return (s / d + 1) ** 3;
  };
  let xx = 0, yy = 0, xy = 0;
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < m; j++) {
      if (i !== j) (xx += k(x, i, x, j)), (yy += k(y, i, y, j));
      xy += k(x, i, y, j);
    }
  }
  return (xx + yy) / (m * (m - 1)) - (2 * xy) / (m * m);
}

gpuTest(
  "KID equals the direct unbiased MMD² when a subset is the whole set; device and host agree",
  async () => {
    const d = 6, m = 9;
    const x = features(3, m, d), y = features(4, m, d, 1.3, 0.2);
    const want = directMmd(x, y, m, d);
    const host = await kernelInceptionDistance(x, y, d, { subsets: 3, subsetSize: 50 });
    if (host.subsetSize !== m) throw new Error(`subset size ${host.subsetSize}, expected ${m}`);
    assertClose(host.values, [want, want, want], { rtol: 1e-12, atol: 1e-14 }, "host KID");
    if (host.std > 1e-12) throw new Error(`std of identical subsets ${host.std}`);
    const dev = await kernelInceptionDistance(x, y, d, {
      subsets: 2,
      subsetSize: 50,
      device: await gpuDevice(),
    });
    assertClose(dev.values, [want, want], { rtol: 1e-5, atol: 1e-7 }, "device KID");
    // Subsets smaller than the sets: different seeds draw different subsets, the same seed the same ones.
    const bx = features(5, 60, d), by = features(6, 60, d);
    const r1 = await kernelInceptionDistance(bx, by, d, { subsets: 4, subsetSize: 20, seed: 1 });
    const r2 = await kernelInceptionDistance(bx, by, d, { subsets: 4, subsetSize: 20, seed: 1 });
    const r3 = await kernelInceptionDistance(bx, by, d, { subsets: 4, subsetSize: 20, seed: 2 });
    assertClose(r2.values, r1.values, { rtol: 0, atol: 0 }, "same seed");
    if (r3.values.every((v, i) => v === r1.values[i])) {
      throw new Error("a different seed drew the same subsets");
    }
    const rd = await kernelInceptionDistance(bx, by, d, {
      subsets: 4,
      subsetSize: 20,
      seed: 1,
      device: await gpuDevice(),
    });
    assertClose(rd.values, r1.values, { rtol: 1e-5, atol: 1e-7 }, "device subsets");
  },
);

test("KID is unbiased: ≈ 0 within its spread for one distribution, clearly positive for two", async () => {
  const d = 8, n = 400;
  const same = await kernelInceptionDistance(features(10, n, d, 1, 0, 99), features(11, n, d, 1, 0, 99), d, {
    subsets: 40,
    subsetSize: 60,
  });
  // Each subset estimate is unbiased, so the mean over 40 subsets is within a few standard errors of 0.
  if (!(Math.abs(same.mean) < 3 * same.std / Math.sqrt(40) + 1e-12) || !(same.std > 0)) {
    throw new Error(`KID of one distribution: mean ${same.mean}, std ${same.std}`);
  }
  if (!same.values.some((v) => v < 0)) throw new Error("an unbiased estimator should go negative sometimes");
  const diff = await kernelInceptionDistance(
    features(10, n, d, 1, 0, 99),
    features(12, n, d, 1.5, 0.5, 99),
    d,
    {
      subsets: 40,
      subsetSize: 60,
    },
  );
  if (!(diff.mean > 5 * diff.std / Math.sqrt(40))) {
    throw new Error(`KID of two distributions: mean ${diff.mean}, std ${diff.std}`);
  }
});

test("KID options are validated, errors name the field", async () => {
  const x = features(1, 10, 2);
  await assertRejects(() => kernelInceptionDistance(x, x, 2, { subsets: 0 }), "subsets");
  await assertRejects(() => kernelInceptionDistance(x, x, 2, { subsetSize: 1.5 }), "subsetSize");
  await assertRejects(
    () => kernelInceptionDistance(x, x, 2, { device: "gpu" } as unknown as { subsets: number }),
    "device",
  );
  await assertRejects(() => kernelInceptionDistance(x, x, 3), "not rows of 3");
  await assertRejects(() => kernelInceptionDistance(x.subarray(0, 2), x, 2), "≥ 2 samples");
});

// ---------------------------------------------------------------------------------------------------------------
// Files.

// np.savez(f, mu=[0.5, -1.25, 3.0], sigma=[[2, .25, -.5], [.25, 1.5, .125], [-.5, .125, 3]]) with NumPy 2.4.
const NUMPY_SAVEZ =
  "UEsDBC0AAAAAAAAAIQCavVY6//////////8GABQAbXUubnB5AQAQAJgAAAAAAAAAmAAAAAAAAACTTlVNUFkBAHYAeydkZXNjcic6ICc8ZjgnLCAnZm9ydHJhbl9vcmRlcic6IEZhbHNlLCAnc2hhcGUnOiAoMywpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgCgAAAAAAAOA/AAAAAAAA9L8AAAAAAAAIQFBLAwQtAAAAAAAAACEAZbWt2///////////CQAUAHNpZ21hLm5weQEAEADIAAAAAAAAAMgAAAAAAAAAk05VTVBZAQB2AHsnZGVzY3InOiAnPGY4JywgJ2ZvcnRyYW5fb3JkZXInOiBGYWxzZSwgJ3NoYXBlJzogKDMsIDMpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAAAAAAAAQAAAAAAAANA/AAAAAAAA4L8AAAAAAADQPwAAAAAAAPg/AAAAAAAAwD8AAAAAAADgvwAAAAAAAMA/AAAAAAAACEBQSwECLQMtAAAAAAAAACEAmr1WOpgAAACYAAAABgAAAAAAAAAAAAAAgAEAAAAAbXUubnB5UEsBAi0DLQAAAAAAAAAhAGW1rdvIAAAAyAAAAAkAAAAAAAAAAAAAAIAB0AAAAHNpZ21hLm5weVBLBQYAAAAAAgACAGsAAADTAQAAAAA=";
// np.savez_compressed(f, fortran=asfortranarray(arange(6, dtype='<f4').reshape(2, 3) * 0.5),
//                     big=array([1.5, -2.0], dtype='>f8'), half=array([0.5, -3.0], dtype='<f2')).
const NUMPY_SAVEZ_COMPRESSED =
  "UEsDBC0AAAAIAAAAIQCHKnrk//////////8LABQAZm9ydHJhbi5ucHkBABAAmAAAAAAAAABVAAAAAAAAAJvsF+obEMnIUMZQrZ6SWpxcpG6loG6TZqKuo6Cell9UUpSYF59flJIKEg8pKk0FChdnJBakArkaRjoKxpo6CrUK5AMuBjA4YA8kQNiBgaEBSCs4AABQSwMELQAAAAgAAAAhAFcDlR///////////wcAFABiaWcubnB5AQAQAJAAAAAAAAAATQAAAAAAAACb7BfqGxDJyFDGUK2eklqcXKRupaBul2ahrqOgnpZfVFKUmBefX5SSChJ3S8wpTgWKF2ckFqQC+RpGOpo6CrUKFAAu+x8MYHAAQjEAAFBLAwQtAAAACAAAACEALdwB5v//////////CAAUAGhhbGYubnB5AQAQAIQAAAAAAAAASAAAAAAAAACb7BfqGxDJyFDGUK2eklqcXKRupaBuk2akrqOgnpZfVFKUmBefX5SSChJ3S8wpTgWKF2ckFqQC+RpGOpo6CrUKFAAuBguGQwBQSwECLQMtAAAACAAAACEAhyp65FUAAACYAAAACwAAAAAAAAAAAAAAgAEAAAAAZm9ydHJhbi5ucHlQSwECLQMtAAAACAAAACEAVwOVH00AAACQAAAABwAAAAAAAAAAAAAAgAGSAAAAYmlnLm5weVBLAQItAy0AAAAIAAAAIQAt3AHmSAAAAIQAAAAIAAAAAAAAAAAAAACAARgBAABoYWxmLm5weVBLBQYAAAAAAwADAKQAAACaAQAAAAA=";

const fromBase64 = (s: string) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));

test("npz files written by NumPy read exactly (ZIP64 local headers, deflate, Fortran order, byte orders)", async () => {
  const plain = await readNpz(fromBase64(NUMPY_SAVEZ), "savez");
  if (plain.mu.dtype !== "<f8" || plain.mu.shape.join() !== "3") {
    throw new Error(`mu ${plain.mu.dtype} ${plain.mu.shape}`);
  }
  if (!(plain.mu.data instanceof Float64Array)) throw new Error("'<f8' must read as float64");
  assertClose(plain.mu.data, [0.5, -1.25, 3], { rtol: 0, atol: 0 }, "mu");
  assertClose(
    plain.sigma.data,
    [2, 0.25, -0.5, 0.25, 1.5, 0.125, -0.5, 0.125, 3],
    { rtol: 0, atol: 0 },
    "sigma",
  );
  const z = await readNpz(fromBase64(NUMPY_SAVEZ_COMPRESSED), "savez_compressed");
  if (z.fortran.shape.join() !== "2,3" || !(z.fortran.data instanceof Float32Array)) {
    throw new Error(`fortran array ${z.fortran.shape} ${z.fortran.data.constructor.name}`);
  }
  assertClose(z.fortran.data, [0, 0.5, 1, 1.5, 2, 2.5], { rtol: 0, atol: 0 }, "Fortran order to C order");
  assertClose(z.big.data, [1.5, -2], { rtol: 0, atol: 0 }, "big-endian f8");
  assertClose(z.half.data, [0.5, -3], { rtol: 0, atol: 0 }, "f2");
});

/** A zip archive built by hand with ZIP64 central-directory extras and end records (what a >4 GiB file has). */
function handBuiltZip64(name: string, body: Uint8Array): Uint8Array {
  const enc = new TextEncoder().encode(name);
  const parts: number[] = [];
  const u16 = (v: number) => parts.push(v & 0xff, (v >>> 8) & 0xff);
  const u32 = (v: number) => (u16(v & 0xffff), u16(v >>> 16));
  const u64 = (v: number) => (u32(v), u32(0));
  // Local header (method 0) with zeroed sizes and a ZIP64 extra.
  u32(0x04034b50),
    u16(45),
    u16(0),
    u16(0),
    u16(0),
    u16(0),
    u32(crc32(body)),
    u32(0xffffffff),
    u32(0xffffffff);
  u16(enc.length), u16(20), parts.push(...enc), u16(1), u16(16), u64(body.length), u64(body.length);
  parts.push(...body);
  const cd = parts.length;
  u32(0x02014b50), u16(45), u16(45), u16(0), u16(0), u16(0), u16(0), u32(crc32(body));
  u32(0xffffffff), u32(0xffffffff), u16(enc.length), u16(28), u16(0), u16(0), u16(0), u32(0), u32(0xffffffff);
  parts.push(...enc), u16(1), u16(24), u64(body.length), u64(body.length), u64(0);
  const cdSize = parts.length - cd, z64 = parts.length;
  u32(0x06064b50), u64(44), u16(45), u16(45), u32(0), u32(0), u64(1), u64(1), u64(cdSize), u64(cd);
  u32(0x07064b50), u32(0), u64(z64), u32(1);
  u32(0x06054b50), u16(0), u16(0), u16(0xffff), u16(0xffff), u32(0xffffffff), u32(0xffffffff), u16(0);
  return Uint8Array.from(parts);
}

test("npz reader handles a hand-built ZIP64 archive and names corrupt or unsupported content", async () => {
  const arr = Float64Array.from([1, -2, 3.5, 1e-300]);
  const { encodeNpy } = await import("../eval/npz.ts");
  const zip64 = handBuiltZip64("mu.npy", encodeNpy(arr, [2, 2]));
  const got = await readNpz(zip64, "zip64");
  if (got.mu.shape.join() !== "2,2") throw new Error(`shape ${got.mu.shape}`);
  assertClose(got.mu.data, arr, { rtol: 0, atol: 0 }, "zip64 member");
  const bad = zip64.slice();
  bad[120] ^= 1; // inside the .npy body
  await assertRejects(() => readNpz(bad, "bad.npz"), "bad.npz", "mu.npy", "CRC-32");
  await assertRejects(() => readNpz(new Uint8Array(40), "junk.npz"), "junk.npz", "not a zip");
  const objHeader = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }\n";
  const obj = Uint8Array.from([0x93, ...new TextEncoder().encode("NUMPY"), 1, 0, objHeader.length, 0]);
  const objFile = new Uint8Array(obj.length + objHeader.length + 8);
  objFile.set(obj);
  objFile.set(new TextEncoder().encode(objHeader), obj.length);
  await assertRejects(() => parseNpy(objFile, "obj.npy"), "obj.npy", "'|O'", "not supported");
  await assertRejects(() => parseNpy(new Uint8Array(20), "x.npy"), "x.npy", "magic");
});

test("statistics files: safetensors F64 and npz round-trip exactly; EDM-style npz loads; errors name the file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const x = features(9, 30, 5, 3, 1);
    const stats = new FeatureStatistics(5).add(x).statistics();
    const st = `${dir}/ref.safetensors`, nz = `${dir}/ref.npz`;
    await saveStatistics(st, stats, { dataset: "test" });
    await saveStatistics(nz, stats);
    const a = await loadStatistics(st), b = await loadStatistics(nz);
    for (const [what, s] of [["safetensors", a], ["npz", b]] as const) {
      assertClose(s.mu, stats.mu, { rtol: 0, atol: 0 }, `${what} mu`);
      assertClose(s.sigma, stats.sigma, { rtol: 0, atol: 0 }, `${what} sigma`);
      if (fidFromStatistics(s, stats) > 1e-9) {
        throw new Error(`${what}: FID to itself ${fidFromStatistics(s, stats)}`);
      }
    }
    if (a.count !== 30) throw new Error(`count ${a.count}`);
    const meta = decodeStatistics(encodeStatistics(stats, { dataset: "test" })).metadata;
    if (meta.dataset !== "test" || meta.format !== "fid-statistics") throw new Error(JSON.stringify(meta));
    // An npz as NVlabs/edm writes it (np.savez(mu=…, sigma=…)) loads as statistics.
    await Deno.writeFile(`${dir}/edm.npz`, fromBase64(NUMPY_SAVEZ));
    const edm = await loadStatistics(`${dir}/edm.npz`);
    assertClose(edm.mu, [0.5, -1.25, 3], { rtol: 0, atol: 0 }, "edm mu");
    await Deno.writeFile(`${dir}/other.npz`, encodeNpz({ m: { data: new Float64Array(2), shape: [2] } }));
    await assertRejects(() => loadStatistics(`${dir}/other.npz`), "other.npz", '"mu"', '"sigma"');
    const trunc = encodeStatistics(stats).subarray(0, 200);
    await assertRejects(() => decodeStatistics(trunc, "t.safetensors"), "t.safetensors");
    await assertRejects(() => loadStatistics(`${dir}/missing.npz`), "missing.npz", "cannot read");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
