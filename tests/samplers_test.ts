/**
 * @file Tests of the samplers: the EDM time grid against float64 values of eq. 5 (endpoints exact), sampling
 * with the exact denoiser of a small point set (every sample must land on a point, every point must be reached,
 * and the network is called exactly 2N − 1 times for Heun and N for Euler), Algorithm 2 with S_churn = 0 equal
 * to Algorithm 1, the order of accuracy of Heun (2) and Euler (1) on Gaussian data whose ODE solution is known in
 * closed form, DDIM (η = 0 and η = 1) with the exact ε-model of the point set, and flat memory over many steps.
 */

import {
  type Device,
  div,
  mul,
  randn,
  reshape,
  softmax,
  sub,
  sum,
  type Tensor,
  tensor,
  zeros,
} from "../engine/mod.ts";
import {
  ddimSampler,
  ddimTimesteps,
  type Denoiser,
  edmTimeSteps,
  epsFromDenoiser,
  type EpsModel,
  eulerSampler,
  heunSampler,
  stochasticSampler,
  vpLinearSchedule,
  vpSigma,
} from "../models/samplers.ts";
import { assertClose, assertThrows, f64Device, gpuDevice, gpuTest, seededValues, test } from "./util.ts";

// ---------------------------------------------------------------------------------------------------------------
// The time grid.

test("edmTimeSteps: eq. 5 in float64, endpoints exact, t_N = 0", () => {
  for (
    const [N, o] of [[18, {}], [2, {}], [5, { sigmaMin: 0.01, sigmaMax: 1.5, rho: 3 }], [40, {
      rho: 1,
    }]] as const
  ) {
    const sMin = (o as { sigmaMin?: number }).sigmaMin ?? 0.002,
      sMax = (o as { sigmaMax?: number }).sigmaMax ?? 80;
    const rho = (o as { rho?: number }).rho ?? 7;
    const t = edmTimeSteps(N, o);
    if (!(t instanceof Float64Array) || t.length !== N + 1) {
      throw new Error(`expected ${N + 1} float64 values`);
    }
    if (t[0] !== sMax || t[N - 1] !== sMin || t[N] !== 0) {
      throw new Error(`endpoints: t_0 = ${t[0]}, t_{N−1} = ${t[N - 1]}, t_N = ${t[N]}`);
    }
    const want = Array.from(
      { length: N },
      (_, i) => (sMax ** (1 / rho) + (i / (N - 1)) * (sMin ** (1 / rho) - sMax ** (1 / rho))) ** rho,
    );
    assertClose(t.subarray(1, N - 1), want.slice(1, N - 1), { rtol: 1e-14, atol: 0 }, `grid N=${N}`);
    assertClose([t[N - 1]], [want[N - 1]], { rtol: 1e-11, atol: 0 }, `formula's t_{N−1} for N=${N}`);
    for (let i = 1; i <= N; i++) if (!(t[i] < t[i - 1])) throw new Error(`grid not decreasing at ${i}`);
  }
  // Values computed independently (Python float64) for the default grid and a custom one.
  const t18 = edmTimeSteps(18);
  assertClose([t18[1], t18[2], t18[8], t18[16]], [
    57.58598472124816,
    40.78557379650796,
    3.256821519765537,
    0.0075280199627840785,
  ], { rtol: 1e-14, atol: 0 });
  assertClose(edmTimeSteps(5, { sigmaMin: 0.01, sigmaMax: 1.5, rho: 3 }).subarray(1, 4), [
    0.7595404404698203,
    0.31454140142128967,
    0.08977166166211412,
  ], { rtol: 1e-14, atol: 0 });
});

test("edmTimeSteps and samplers: bad options name the field", async () => {
  assertThrows(() => edmTimeSteps(1), "steps", "≥ 2");
  assertThrows(() => edmTimeSteps(10, { sigmaMin: -1 }), "sigmaMin");
  assertThrows(() => edmTimeSteps(10, { sigmaMin: 100 }), "sigmaMin must be smaller than sigmaMax");
  assertThrows(() => edmTimeSteps(10, { rho: 0 }), "rho");
  const device = await f64Device();
  const x = zeros([1, 1, 1, 1], { device });
  const D: Denoiser = (v) => mul(v, 0);
  assertThrows(() => heunSampler(D, x, { steps: 1 }), "heunSampler", "steps");
  assertThrows(() => stochasticSampler(D, x, { sChurn: -1 }), "stochasticSampler", "sChurn");
  // @ts-expect-error: an unknown option is an error, not silently ignored.
  assertThrows(() => eulerSampler(D, x, { stpes: 4 }), "eulerSampler", "stpes");
  assertThrows(() => ddimSampler((v) => mul(v, 0), x, { eta: -0.5 }), "ddimSampler", "eta");
  assertThrows(() => ddimSampler((v) => mul(v, 0), x, { schedule: { betaEnd: 2 } }), "schedule.betaEnd");
  x.dispose();
});

// ---------------------------------------------------------------------------------------------------------------
// The exact denoiser of a point set: D*(x; σ) = Σᵢ softmaxᵢ(−‖x − yᵢ‖²/2σ²)·yᵢ, in engine ops.

const K = 4, C = 2, H = 2, W = 2, DIM = C * H * W;

/** E[y | y + σn = x] for y uniform on the rows of `points` [K, DIM]; σ a number or a per-sample tensor. */
function exactDenoiser(points: Tensor, calls?: { n: number }): Denoiser {
  return (x, sigma) => {
    if (calls) calls.n++;
    const B = x.shape[0], k = points.shape[0], d = points.shape[1];
    const diff = sub(reshape(x, [B, 1, d]), reshape(points, [1, k, d]));
    const dist2 = sum(mul(diff, diff), 2); // [B, K]
    const logits = typeof sigma === "number"
      ? mul(dist2, -1 / (2 * sigma * sigma))
      : div(dist2, mul(mul(reshape(sigma, [B, 1]), reshape(sigma, [B, 1])), -2));
    const w = softmax(logits, 1);
    return reshape(sum(mul(reshape(w, [B, k, 1]), reshape(points, [1, k, d])), 1), x.shape);
  };
}

/** The exact ε-model of the point set on a VP schedule: (x_t − √ᾱ·E[y | x_t])/√(1 − ᾱ). */
function exactEps(points: Tensor, alphaBar: Float64Array, calls?: { n: number }): EpsModel {
  return (x, t) => {
    if (calls) calls.n++;
    const a = alphaBar[t];
    const B = x.shape[0], k = points.shape[0], d = points.shape[1];
    const diff = sub(reshape(x, [B, 1, d]), reshape(mul(points, Math.sqrt(a)), [1, k, d]));
    const w = softmax(mul(sum(mul(diff, diff), 2), -1 / (2 * (1 - a))), 1);
    const y = reshape(sum(mul(reshape(w, [B, k, 1]), reshape(points, [1, k, d])), 1), x.shape);
    return mul(sub(x, mul(y, Math.sqrt(a))), 1 / Math.sqrt(1 - a));
  };
}

const POINTS = seededValues(K * DIM, 11, -1, 1);

/** Asserts every sample equals one of the points (max-abs error ≤ tol) and every point is reached. */
async function assertOnPoints(samples: Tensor, tol: number, what: string) {
  const v = await samples.toArray();
  const B = samples.shape[0];
  const hits = new Array(K).fill(0);
  let worst = 0;
  for (let b = 0; b < B; b++) {
    let best = Infinity, bestK = -1;
    for (let k = 0; k < K; k++) {
      let e = 0;
      for (let j = 0; j < DIM; j++) e = Math.max(e, Math.abs(v[b * DIM + j] - POINTS[k * DIM + j]));
      if (e < best) [best, bestK] = [e, k];
    }
    worst = Math.max(worst, best);
    hits[bestK]++;
  }
  if (worst > tol) throw new Error(`${what}: a sample is ${worst} away from every point (tolerance ${tol})`);
  if (hits.some((h) => h === 0)) {
    throw new Error(`${what}: points reached ${hits.join("/")} times; one never`);
  }
}

function pointSetup(device: Device, B = 64) {
  const points = tensor(POINTS, [K, DIM], { device });
  device.manualSeed(5);
  const latents = randn([B, C, H, W], { device });
  return { points, latents };
}

gpuTest("heunSampler and eulerSampler: samples land on the points; NFE 2N − 1 and N", async () => {
  const device = await gpuDevice();
  const { points, latents } = pointSetup(device);
  for (const N of [18, 7]) {
    const calls = { n: 0 };
    let steps = 0, lastNfe = 0;
    const out = heunSampler(exactDenoiser(points, calls), latents, {
      steps: N,
      onStep: (s) => {
        if (s.step !== steps++ || s.steps !== N) throw new Error(`progress step ${s.step} out of order`);
        lastNfe = s.nfe;
      },
    });
    if (calls.n !== 2 * N - 1 || lastNfe !== 2 * N - 1 || steps !== N) {
      throw new Error(`Heun N=${N}: ${calls.n} calls, progress reported ${steps} steps and ${lastNfe} NFE`);
    }
    await assertOnPoints(out, 1e-4, `Heun N=${N}`);
    out.dispose();
    const ecalls = { n: 0 };
    const e = eulerSampler(exactDenoiser(points, ecalls), latents, { steps: N });
    if (ecalls.n !== N) throw new Error(`Euler N=${N}: ${ecalls.n} calls, expected ${N}`);
    await assertOnPoints(e, 1e-4, `Euler N=${N}`);
    e.dispose();
  }
  // The latents are the caller's and stay intact.
  if (latents.disposed) throw new Error("the sampler disposed the latents");
  points.dispose();
  latents.dispose();
});

gpuTest("stochasticSampler: S_churn = 0 equals Heun; with churn it still lands on the points", async () => {
  const device = await gpuDevice();
  const { points, latents } = pointSetup(device);
  const heun = heunSampler(exactDenoiser(points), latents, { steps: 12 });
  const calls = { n: 0 };
  const det = stochasticSampler(exactDenoiser(points, calls), latents, { steps: 12, sChurn: 0 });
  if (calls.n !== 23) throw new Error(`stochastic S_churn=0: ${calls.n} calls, expected 23`);
  assertClose(await det.toArray(), await heun.toArray(), { rtol: 0, atol: 0 }, "S_churn = 0 vs Heun");
  // Table 5's CIFAR-10 settings are S_churn = 0 (VP); ImageNet-style churn exercises the noise path here.
  const sigmas: number[][] = [];
  const churn = stochasticSampler(exactDenoiser(points), latents, {
    steps: 12,
    sChurn: 40,
    sMin: 0.05,
    sMax: 50,
    sNoise: 1.003,
    onStep: (s) => sigmas.push([s.sigma, s.sigmaHat]),
  });
  await assertOnPoints(churn, 1e-4, "stochastic S_churn=40");
  const gammaMax = Math.min(40 / 12, Math.SQRT2 - 1);
  for (const [t, tHat] of sigmas) {
    const want = t >= 0.05 && t <= 50 ? t * (1 + gammaMax) : t;
    assertClose([tHat], [want], { rtol: 1e-15, atol: 0 }, `t̂ at t = ${t}`);
  }
  const a = await churn.toArray(), b = await heun.toArray();
  if (a.every((v, i) => v === b[i])) throw new Error("churn changed nothing: no noise was added");
  for (const t of [heun, det, churn, points, latents]) t.dispose();
});

test("heunSampler has order 2 and eulerSampler order 1 on Gaussian data (closed-form ODE solution)", async () => {
  // For y ~ N(0, s²I), D(x; σ) = x·s²/(s² + σ²) and the ODE solution is x(σ) = x(σ_max)·√(s² + σ²)/√(s² + σ_max²).
  const device = await f64Device();
  const s = 0.5;
  const latents = tensor(seededValues(8, 3, -2, 2), [2, 1, 2, 2], { device });
  const D: Denoiser = (x, sigma) => mul(x, (s * s) / (s * s + (sigma as number) ** 2));
  const lat = await latents.toFloat64Array();
  const exact = Array.from(lat, (v) => v * 80 * s / Math.sqrt(s * s + 80 * 80));
  const err = async (sampler: typeof heunSampler, N: number) => {
    const out = sampler(D, latents, { steps: N });
    const v = await out.toFloat64Array();
    out.dispose();
    return Math.max(...Array.from(v, (x, i) => Math.abs(x - exact[i])));
  };
  const heun = [await err(heunSampler, 16), await err(heunSampler, 32), await err(heunSampler, 64)];
  const euler = [await err(eulerSampler, 16), await err(eulerSampler, 32), await err(eulerSampler, 64)];
  const order = (e: number[]) => [Math.log2(e[0] / e[1]), Math.log2(e[1] / e[2])];
  const oh = order(heun), oe = order(euler);
  if (!oh.every((o) => o > 1.7 && o < 2.5)) throw new Error(`Heun errors ${heun}: observed orders ${oh}`);
  if (!oe.every((o) => o > 0.7 && o < 1.4)) throw new Error(`Euler errors ${euler}: observed orders ${oe}`);
  if (!(heun[2] < euler[2] / 5)) throw new Error(`Heun ${heun[2]} is not far better than Euler ${euler[2]}`);
  latents.dispose();
});

gpuTest("ddimSampler: with the exact ε-model samples land on the points (η = 0 and 1); NFE = S", async () => {
  const device = await gpuDevice();
  const { points, latents } = pointSetup(device);
  const { alphaBar } = vpLinearSchedule();
  for (const eta of [0, 1]) {
    for (const skip of ["uniform", "quadratic"] as const) {
      const calls = { n: 0 };
      const ts: number[] = [];
      const out = ddimSampler(exactEps(points, alphaBar, calls), latents, {
        steps: 25,
        eta,
        skip,
        onStep: (s) => ts.push(s.sigma),
      });
      if (calls.n !== 25) throw new Error(`DDIM: ${calls.n} calls, expected 25`);
      // The first step starts from the largest visited timestep (980 uniform, 800 quadratic), the last from 0.
      const first = vpSigma(alphaBar[skip === "uniform" ? 960 : 800]), last = vpSigma(alphaBar[0]);
      if (ts[0] !== first || ts[24] !== last) throw new Error(`DDIM σ range ${ts[0]} … ${ts[24]}`);
      await assertOnPoints(out, 1e-3, `DDIM η=${eta} ${skip}`);
      out.dispose();
    }
  }
  // η = 1 draws fresh noise: the result differs from η = 0, whose result does not depend on the generator.
  device.manualSeed(1);
  const a = ddimSampler(exactEps(points, alphaBar), latents, { steps: 10 });
  const b = ddimSampler(exactEps(points, alphaBar), latents, { steps: 10, eta: 1 });
  device.manualSeed(99);
  const a2 = ddimSampler(exactEps(points, alphaBar), latents, { steps: 10 });
  const [va, vb, va2] = [await a.toArray(), await b.toArray(), await a2.toArray()];
  assertClose(va2, va, { rtol: 0, atol: 0 }, "DDIM η=0 is deterministic");
  if (va.every((v, i) => Math.abs(v - vb[i]) < 1e-6)) throw new Error("DDIM η=1 equals η=0");
  for (const t of [a, b, a2, points, latents]) t.dispose();
});

test("VP schedule, DDIM timesteps and epsFromDenoiser agree with their formulas", async () => {
  const { betas, alphaBar, timesteps } = vpLinearSchedule();
  if (timesteps !== 1000 || betas[0] !== 1e-4 || Math.abs(betas[999] - 0.02) > 1e-17) {
    throw new Error(`β: ${betas[0]} … ${betas[999]}`);
  }
  let a = 1;
  for (let t = 0; t < 1000; t++) a *= 1 - (1e-4 + (t / 999) * (0.02 - 1e-4));
  assertClose([alphaBar[999]], [a], { rtol: 1e-12, atol: 0 }, "ᾱ_T");
  assertClose([alphaBar[999]], [4.035829e-5], { rtol: 1e-5, atol: 0 }, "ᾱ_T of the DDPM schedule");
  assertClose([vpSigma(alphaBar[0])], [Math.sqrt(1e-4 / (1 - 1e-4))], { rtol: 1e-12, atol: 0 });
  const u = ddimTimesteps(50, 1000);
  if (u.length !== 50 || u[0] !== 0 || u[1] !== 20 || u[49] !== 980) throw new Error(`uniform: ${u}`);
  // numpy: [int(s) for s in np.linspace(0, np.sqrt(800), 25) ** 2][:4] == [0, 1, 5, 12], last 800.
  const q = ddimTimesteps(25, 1000, "quadratic");
  if (q.length !== 25 || [0, 1, 5, 12].some((v, i) => q[i] !== v) || q[24] !== 800) {
    throw new Error(`quadratic: ${q.slice(0, 4)} … ${q[24]}`);
  }
  assertThrows(() => ddimTimesteps(50, 1000, "quadratic"), "repeat");
  assertThrows(() => ddimTimesteps(1001, 1000), "steps");
  // The ε-model derived from the exact EDM denoiser equals the exact ε-model (float64 device).
  const device = await f64Device();
  const points = tensor(POINTS, [K, DIM], { device });
  const x = tensor(seededValues(3 * DIM, 8, -1.5, 1.5), [3, C, H, W], { device });
  const sched = vpLinearSchedule();
  const viaD = epsFromDenoiser(exactDenoiser(points), sched), direct = exactEps(points, sched.alphaBar);
  for (const t of [0, 100, 500, 999]) {
    const e1 = viaD(x, t), e2 = direct(x, t);
    assertClose(await e1.toFloat64Array(), await e2.toFloat64Array(), { rtol: 1e-9, atol: 1e-9 }, `t=${t}`);
    e1.dispose();
    e2.dispose();
  }
  points.dispose();
  x.dispose();
});

gpuTest(
  "samplers keep memory flat: the same live allocations at every step, only the result survives",
  async () => {
    const device = await gpuDevice();
    const { points, latents } = pointSetup(device, 8);
    const before = device.memory().liveAllocations;
    const run = (name: string, sample: (onStep: (s: { step: number }) => void) => Tensor) => {
      const live: number[] = [];
      const out = sample(() => live.push(device.memory().liveAllocations));
      // Elementwise results are lazy (engine/ops/core.ts `map`): the current x may still hold the few tensors it
      // is computed from until the next denoiser call consumes it. Flat means: never more than after step 1.
      if (live.some((n) => n > live[0]) || live[0] > before + 8) {
        throw new Error(`${name}: live allocations per step ${live} grow (${before} before sampling)`);
      }
      out.dispose();
      const after = device.memory().liveAllocations;
      if (after !== before) throw new Error(`${name}: ${after - before} allocations leaked`);
    };
    run("heun", (onStep) => heunSampler(exactDenoiser(points), latents, { steps: 10, onStep }));
    run("euler", (onStep) => eulerSampler(exactDenoiser(points), latents, { steps: 10, onStep }));
    run(
      "stochastic",
      (onStep) => stochasticSampler(exactDenoiser(points), latents, { steps: 10, sChurn: 30, onStep }),
    );
    const { alphaBar } = vpLinearSchedule();
    run("ddim", (onStep) => ddimSampler(exactEps(points, alphaBar), latents, { steps: 10, eta: 1, onStep }));
    points.dispose();
    latents.dispose();
  },
);

test("stochasticSampler takes its churn noise from the noise callback (per-sample generators)", async () => {
  const device = await f64Device();
  const points = tensor(POINTS, [K, DIM], { device });
  const latents = tensor(seededValues(2 * DIM, 4, -1, 1), [2, C, H, W], { device });
  let draws = 0;
  const fixed = (seed: number) => (shape: readonly number[], dev: Device) => {
    draws++;
    return randn(shape, { device: dev, seed: seed + draws });
  };
  const a = stochasticSampler(exactDenoiser(points), latents, { steps: 6, sChurn: 10, noise: fixed(0) });
  const n1 = draws;
  draws = 0;
  const b = stochasticSampler(exactDenoiser(points), latents, { steps: 6, sChurn: 10, noise: fixed(0) });
  if (n1 !== 6) throw new Error(`expected 6 noise draws (γ > 0 at every step), got ${n1}`);
  assertClose(await b.toFloat64Array(), await a.toFloat64Array(), { rtol: 0, atol: 0 }, "replayed noise");
  for (const t of [a, b, points, latents]) t.dispose();
});
