/**
 * @file Tests of EDM preconditioning and loss: c_skip, c_out, c_in, c_noise against float64 formulas for σ from
 * 0.002 to 80 (device tensors and host numbers), D = c_skip·x + c_out·F(c_in·x; c_noise) with what F receives,
 * the loss of a perfect denoiser (exactly zero) and of F = 0 (the float64 formula, with the reference's draw
 * order σ-then-noise), the distribution of ln σ, gradients against finite differences, parameter names, memory,
 * and errors that name the bad option or shape.
 */

import { deepStrictEqual as assertEquals } from "node:assert";
import {
  add,
  type Device,
  mul,
  nn,
  noGrad,
  randn,
  randNormal,
  reshape,
  type Tensor,
  tensor,
  zeros,
} from "../engine/mod.ts";
import {
  cIn,
  cNoise,
  cOut,
  cSkip,
  edmLoss,
  EDMPrecond,
  lossBySigmaBucket,
  lossWeight,
  type NetworkFn,
} from "../models/edm.ts";
import {
  assertClose,
  assertThrows,
  f64Device,
  gpuDevice,
  gpuTest,
  gradCheck,
  seededValues,
  test,
} from "./util.ts";

// Table 1 ("Ours"), written out independently of models/edm.ts.
const ref = {
  cSkip: (s: number, d: number) => d ** 2 / (s ** 2 + d ** 2),
  cOut: (s: number, d: number) => s * d / Math.sqrt(s ** 2 + d ** 2),
  cIn: (s: number, d: number) => 1 / Math.sqrt(d ** 2 + s ** 2),
  cNoise: (s: number) => 0.25 * Math.log(s),
  weight: (s: number, d: number) => (s ** 2 + d ** 2) / (s * d) ** 2,
};
const SIGMAS = [0.002, 0.01, 0.1, 0.3, 0.5, 1, 2.5, 10, 80];

gpuTest(
  "preconditioning coefficients match Table 1 in float64 (device tensors and host numbers)",
  async () => {
    const device = await gpuDevice();
    for (const sd of [0.5, 1.3]) {
      const p = new EDMPrecond(() => zeros([1]), { sigmaData: sd });
      const sigma = tensor(SIGMAS, [SIGMAS.length], { device });
      const c = p.coefficients(sigma);
      assertEquals([...c.cSkip.shape], [SIGMAS.length, 1, 1, 1]);
      assertEquals([...c.cNoise.shape], [SIGMAS.length]);
      for (const k of ["cSkip", "cOut", "cIn"] as const) {
        const want = SIGMAS.map((s) => ref[k](s, sd));
        assertClose(await c[k].toArray(), want, { rtol: 2e-6, atol: 0 }, `${k} (σ_data ${sd}) on the device`);
      }
      assertClose(await c.cNoise.toArray(), SIGMAS.map(ref.cNoise), { rtol: 2e-6, atol: 1e-7 }, "cNoise");
      // Host float64 versions agree to rounding.
      const host = { cSkip, cOut, cIn };
      for (const k of ["cSkip", "cOut", "cIn"] as const) {
        assertClose(SIGMAS.map((s) => host[k](s, sd)), SIGMAS.map((s) => ref[k](s, sd)), {
          rtol: 1e-15,
          atol: 0,
        }, k);
      }
      assertClose(SIGMAS.map((s) => lossWeight(s, sd)), SIGMAS.map((s) => ref.weight(s, sd)), {
        rtol: 1e-15,
      });
      // λ = 1/c_out² (the effective weight is uniform, Sec. 5).
      assertClose(SIGMAS.map((s) => lossWeight(s, sd) * cOut(s, sd) ** 2), SIGMAS.map(() => 1), {
        rtol: 1e-14,
      });
      for (const t of [sigma, c.cSkip, c.cOut, c.cIn, c.cNoise]) t.dispose();
    }
    assertClose(SIGMAS.map(cNoise), SIGMAS.map(ref.cNoise), { rtol: 1e-15, atol: 0 });
  },
);

/** F(x, c) = 2x + 0.1 + c (per sample), recording copies of what it received. */
function recordingNet(seen: { x?: Tensor; c?: Tensor; labels?: Tensor }): NetworkFn {
  return (x, c, labels) => {
    seen.x = mul(x, 1);
    seen.c = mul(c, 1);
    seen.labels = labels;
    return add(add(mul(x, 2), 0.1), reshape(c, [c.size, 1, 1, 1]));
  };
}

gpuTest(
  "EDMPrecond.forward: D = c_skip·x + c_out·F(c_in·x; c_noise) for per-sample and scalar σ",
  async () => {
    const device = await gpuDevice();
    const N = 4, shape = [N, 2, 3, 3], per = 18;
    const xv = seededValues(N * per, 21, -3, 3);
    const x = tensor(xv, shape, { device });
    const labels = tensor([1, 0, 0, 1, 0, 1, 0, 0], [N, 2], { device });
    const sig = [0.002, 0.4, 3, 80];
    for (const mode of ["tensor", "number"] as const) {
      const seen: { x?: Tensor; c?: Tensor; labels?: Tensor } = {};
      const p = new EDMPrecond(recordingNet(seen));
      const sigmaOf = (n: number) => (mode === "tensor" ? sig[n] : 1.7);
      const sigma = mode === "tensor" ? tensor(sig, [N], { device }) : 1.7;
      const D = noGrad(() => p.forward(x, sigma, labels));
      if (seen.labels !== labels) throw new Error("labels were not passed through to F");
      const xin = await seen.x!.toArray(), c = await seen.c!.toArray(), d = await D.toArray();
      const wantIn = new Float64Array(N * per), wantD = new Float64Array(N * per);
      for (let n = 0; n < N; n++) {
        const s = sigmaOf(n);
        for (let j = 0; j < per; j++) {
          const i = n * per + j;
          wantIn[i] = ref.cIn(s, 0.5) * xv[i];
          const F = 2 * wantIn[i] + 0.1 + ref.cNoise(s);
          wantD[i] = ref.cSkip(s, 0.5) * xv[i] + ref.cOut(s, 0.5) * F;
        }
      }
      assertClose(xin, wantIn, { rtol: 1e-5, atol: 1e-6 }, `${mode}: F's input`);
      assertClose(
        c,
        Array.from({ length: N }, (_, n) => ref.cNoise(sigmaOf(n))),
        { rtol: 1e-5, atol: 1e-6 },
        "c_noise",
      );
      assertClose(d, wantD, { rtol: 1e-5, atol: 1e-6 }, `${mode}: D`);
      for (const t of [D, seen.x!, seen.c!]) t.dispose();
      if (sigma instanceof Object) sigma.dispose();
    }
    // A [N, 1, 1, 1] σ is accepted as well.
    const s4 = tensor(sig, [N, 1, 1, 1], { device });
    const p = new EDMPrecond((v) => mul(v, 0));
    const D = noGrad(() => p.forward(x, s4));
    const want = Array.from(xv, (v, i) => ref.cSkip(sig[Math.floor(i / per)], 0.5) * v);
    assertClose(await D.toArray(), want, { rtol: 1e-5, atol: 1e-7 }, "σ as [N,1,1,1]");
    // Other ranks broadcast per sample too: x [N, 3] with σ [N].
    const x2 = tensor([1, 2, 3, 4, 5, 6], [2, 3], { device }), s2 = tensor([0.1, 5], [2], { device });
    const D2 = noGrad(() => p.forward(x2, s2));
    const want2 = [1, 2, 3, 4, 5, 6].map((v, i) => ref.cSkip(i < 3 ? 0.1 : 5, 0.5) * v);
    assertClose(await D2.toArray(), want2, { rtol: 1e-5, atol: 1e-7 }, "x [N, 3]");
    for (const t of [x, labels, s4, D, x2, s2, D2]) t.dispose();
  },
);

gpuTest("EDMPrecond: errors name the bad option or shape", async () => {
  const device = await gpuDevice();
  const x = zeros([2, 1, 2, 2], { device });
  assertThrows(() => new EDMPrecond((v) => v, { sigmaData: -1 }), "EDMPrecond", "sigmaData");
  // @ts-expect-error: unknown options are errors.
  assertThrows(() => new EDMPrecond((v) => v, { sigma_data: 1 }), "sigma_data");
  const p = new EDMPrecond((v) => mul(v, 1));
  assertThrows(() => p.forward(x, 0), "sigma must be a positive finite number");
  const s3 = tensor([1, 2, 3], [3], { device });
  assertThrows(() => p.forward(x, s3), "sigma must have shape [2]");
  const bad = new EDMPrecond(() => zeros([2, 1, 2, 3], { device }));
  assertThrows(() => bad.forward(x, 1), "shaped like its input [2,1,2,2]", "[2,1,2,3]");
  assertThrows(() => edmLoss(p, x, undefined, { pStd: -1 }), "edmLoss", "pStd");
  assertThrows(() => edmLoss(p, x, undefined, { sigma: s3 }), "edmLoss: sigma must have shape [2]");
  for (const t of [x, s3]) t.dispose();
});

test("EDMPrecond registers an nn.Module network as `model` (NVlabs parameter names)", async () => {
  const device = await f64Device();
  class Net extends nn.Module {
    conv = this.registerModule("conv", new nn.Conv2d(2, 2, 1, { device }));
    forward(x: Tensor, _c: Tensor): Tensor {
      return this.conv.forward(x);
    }
  }
  const p = new EDMPrecond(new Net());
  assertEquals(p.namedParameters().map(([n]) => n), ["model.conv.weight", "model.conv.bias"]);
  assertEquals(new EDMPrecond((v) => v).parameters().length, 0);
  const sigma = tensor([0.5, 2], [2], { device });
  const x = tensor(seededValues(8, 2), [2, 2, 1, 2], { device });
  const { loss } = edmLoss(p, x, undefined, { sigma, noise: zeros([2, 2, 1, 2], { device }) });
  loss.backward();
  for (const w of p.parameters()) {
    if (!w.grad) throw new Error("no gradient reached the network's parameters");
  }
  p.zeroGrad();
});

gpuTest("edmLoss: a perfect denoiser gives exactly zero; λ(σ) large or small", async () => {
  const device = await gpuDevice();
  const images = tensor(seededValues(4 * 3 * 4 * 4, 9), [4, 3, 4, 4], { device });
  const perfect = () => mul(images, 1);
  const sigma = tensor([0.002, 0.5, 10, 80], [4], { device });
  for (const opts of [{}, { sigma }]) {
    const r = edmLoss(perfect, images, undefined, opts);
    assertEquals(await r.loss.item(), 0);
    assertEquals(Array.from(await r.perSample.toArray()), [0, 0, 0, 0]);
    for (const t of [r.loss, r.perSample]) t.dispose();
    if (r.sigma !== sigma) r.sigma.dispose();
  }
  images.dispose();
  sigma.dispose();
});

async function checkZeroNetLoss(device: Device, rtol: number) {
  const N = 6, shape = [N, 2, 3, 3], per = 18;
  const yv = seededValues(N * per, 33, -1, 1);
  const images = tensor(yv, shape, { device });
  const p = new EDMPrecond((v) => mul(v, 0));
  const formula = (s: ArrayLike<number>, e: ArrayLike<number>) => {
    const perSample = Array.from({ length: N }, (_, n) => {
      let acc = 0;
      for (let j = 0; j < per; j++) {
        const i = n * per + j, y = yv[i];
        const D = ref.cSkip(s[n], 0.5) * (y + s[n] * e[i]); // F = 0
        acc += (D - y) ** 2;
      }
      return ref.weight(s[n], 0.5) * acc / per;
    });
    return { perSample, loss: perSample.reduce((a, b) => a + b, 0) / N };
  };
  // The random path: σ is drawn first (ln σ ~ N(−1.2, 1.2²)), then the unit noise, as in NVlabs' EDMLoss.
  device.manualSeed(1234);
  const r = edmLoss(p, images);
  device.manualSeed(1234);
  const lnSigma = randNormal([N], -1.2, 1.2, { device }), eps = randn(shape, { device });
  const s = Array.from(await lnSigma.toFloat64Array(), Math.exp);
  assertClose(await r.sigma.toFloat64Array(), s, { rtol, atol: 0 }, "drawn σ");
  const want = formula(s, await eps.toFloat64Array());
  assertClose(
    await r.perSample.toFloat64Array(),
    want.perSample,
    { rtol, atol: 0 },
    `per-sample (${device.dtype})`,
  );
  assertClose([await r.loss.item()], [want.loss], { rtol, atol: 0 }, `loss (${device.dtype})`);
  // Explicit σ and noise (fixed-σ validation losses).
  const sv = [0.002, 0.05, 0.5, 1, 7, 80];
  const sigma = tensor(sv, [N], { device }),
    noise = tensor(seededValues(N * per, 4, -2, 2), shape, { device });
  const r2 = edmLoss(p, images, undefined, { sigma, noise });
  const want2 = formula(sv, await noise.toFloat64Array());
  assertClose(await r2.perSample.toFloat64Array(), want2.perSample, { rtol, atol: 0 }, "per-sample, given σ");
  for (const t of [images, r.loss, r.perSample, r.sigma, lnSigma, eps, sigma, noise, r2.loss, r2.perSample]) {
    t.dispose();
  }
}

gpuTest("edmLoss with F = 0 equals the float64 formula (WebGPU float32 and CPU float64)", async () => {
  await checkZeroNetLoss(await gpuDevice(), 2e-5);
  await checkZeroNetLoss(await f64Device(), 1e-12);
});

gpuTest("edmLoss draws ln σ ~ N(−1.2, 1.2²)", async () => {
  const device = await gpuDevice();
  const N = 8192;
  const images = zeros([N, 1, 1, 1], { device });
  device.manualSeed(77);
  const r = noGrad(() => edmLoss((v) => mul(v, 0), images));
  const ln = Array.from(await r.sigma.toFloat64Array(), Math.log);
  const mean = ln.reduce((a, b) => a + b, 0) / N;
  const std = Math.sqrt(ln.reduce((a, b) => a + (b - mean) ** 2, 0) / (N - 1));
  // Five standard errors: 1.2/√N ≈ 0.013 for the mean, 1.2/√(2N) ≈ 0.0094 for the std.
  if (Math.abs(mean + 1.2) > 0.07 || Math.abs(std - 1.2) > 0.05) {
    throw new Error(`ln σ has mean ${mean} and std ${std}, expected −1.2 and 1.2`);
  }
  for (const t of [images, r.loss, r.perSample, r.sigma]) t.dispose();
});

test("edmLoss gradients match finite differences (float64)", async () => {
  // F(x, c) = w·x + b·c (w per channel, b scalar), with fixed σ and noise.
  const N = 3, shape = [N, 2, 2, 2];
  const yv = seededValues(N * 8, 5), ev = seededValues(N * 8, 6, -2, 2);
  await gradCheck(
    (w, b) => {
      const device = w.device;
      const images = tensor(yv, shape, { device }), noise = tensor(ev, shape, { device });
      const sigma = tensor([0.05, 0.7, 6], [N], { device });
      const p = new EDMPrecond((x, c) => add(mul(x, w), mul(reshape(c, [N, 1, 1, 1]), b)));
      return edmLoss(p, images, undefined, { sigma, noise }).loss;
    },
    [{ shape: [1, 2, 1, 1], data: [0.3, -0.8] }, { shape: [1], data: [0.4] }],
    { rtol: 1e-6, atol: 1e-9 },
  );
});

gpuTest("EDMPrecond and edmLoss under noGrad leave only their results alive", async () => {
  const device = await gpuDevice();
  const x = tensor(seededValues(2 * 3 * 4 * 4, 3), [2, 3, 4, 4], { device });
  const sigma = tensor([0.3, 3], [2], { device });
  // A network that frees its own intermediates, so any leak is the preconditioner's.
  const p = new EDMPrecond((v, c) => {
    const [h, cc] = [mul(v, 0.5), reshape(c, [2, 1, 1, 1])];
    const out = add(h, cc);
    h.dispose();
    cc.dispose();
    return out;
  });
  const before = device.memory().liveAllocations;
  for (const s of [sigma, 0.7]) {
    const D = noGrad(() => p.forward(x, s));
    if (device.memory().liveAllocations !== before + 1) throw new Error("forward leaked intermediates");
    D.dispose();
  }
  const r = noGrad(() => edmLoss(p, x));
  if (device.memory().liveAllocations !== before + 3) throw new Error("edmLoss leaked intermediates");
  for (const t of [r.loss, r.perSample, r.sigma, x, sigma]) t.dispose();
});

test("lossBySigmaBucket groups per-sample losses by σ", () => {
  const b = lossBySigmaBucket([0.01, 0.3, 0.35, 100, 1], [1, 2, 4, 8, 16], [0.1, 1]);
  assertEquals(b.map((x) => [x.lo, x.hi, x.count, x.meanLoss]), [
    [-Infinity, 0.1, 1, 1],
    [0.1, 1, 2, 3],
    [1, Infinity, 2, 12],
  ]);
  assertThrows(() => lossBySigmaBucket([1], [1, 2]), "1 sigmas but 2 losses");
});
