/**
 * @file Tests of the Philox4x32-10 generator and the random ops: the published known-answer vectors (on the
 * host function and through the kernel on both backends), bit-identical streams on WebGPU and CPU, moments of
 * uniform and normal samples against statistical bounds, seeding and counter semantics, and dropout (rate,
 * scaling, replayed mask in the gradient, finite-difference check).
 */

import fc from "fast-check";
import { deepStrictEqual as assertEquals } from "node:assert";
import { philox4x32 } from "../kernels/random.ts";
import {
  dropout,
  philoxBits,
  rand,
  randn,
  randNormal,
  randomBits,
  randUniform,
} from "../engine/ops/random.ts";
import { tensor } from "../engine/creation.ts";
import { Device } from "../engine/device.ts";
import {
  assertClose,
  assertThrows,
  cpuDevice,
  f64Device,
  gpuDevice,
  gpuTest,
  gradCheck,
  RUNS,
  seededValues,
  shapeArb,
  test,
} from "./util.ts";

/** Random123's kat_vectors for philox4x32_10: counter (4 words), key (2 words), expected output. */
const KAT: [number[], number[], number[]][] = [
  [[0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]],
  [
    [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff],
    [0xffffffff, 0xffffffff],
    [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
  ],
  [
    [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
    [0xa4093822, 0x299f31d0],
    [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
  ],
];

/** Joins the [count, 2] high/low halves of `randomBits`/`philoxBits` back into u32 words. */
async function words(t: { toArray(): Promise<Float32Array> }): Promise<number[]> {
  const v = await t.toArray();
  const out: number[] = [];
  for (let i = 0; i < v.length; i += 2) out.push(((v[i] * 65536) + v[i + 1]) >>> 0);
  return out;
}

const hex = (ws: number[]) => ws.map((w) => w.toString(16).padStart(8, "0")).join(" ");

async function backends(): Promise<[string, Device][]> {
  return [["webgpu", await gpuDevice()], ["cpu", await cpuDevice()]];
}

test("philox4x32-10 host function matches the Random123 known-answer vectors", () => {
  for (const [ctr, key, want] of KAT) assertEquals(hex(philox4x32(ctr, key)), hex(want));
});

gpuTest("philox kernel matches the known-answer vectors on both backends", async () => {
  for (const [name, dev] of await backends()) {
    for (const [ctr, key, want] of KAT) {
      const t = philoxBits(4, ctr as [number, number, number, number], key as [number, number], dev);
      assertEquals(hex(await words(t)), hex(want), `${name}, counter ${hex(ctr)}`);
      t.dispose();
    }
  }
});

gpuTest("philox kernel: block b uses counter (c0, c1) + b with a carry into c1", async () => {
  const ctr: [number, number, number, number] = [0xfffffffe, 7, 3, 9], key: [number, number] = [11, 12];
  const want: number[] = [];
  for (const c of [[0xfffffffe, 7], [0xffffffff, 7], [0, 8], [1, 8]]) {
    want.push(...philox4x32([...c, 3, 9], key));
  }
  for (const [name, dev] of await backends()) {
    const t = philoxBits(14, ctr, key, dev);
    assertEquals(hex(await words(t)), hex(want.slice(0, 14)), name);
    t.dispose();
  }
});

gpuTest(
  "property: raw words are bit-identical on WebGPU and CPU for any seed, counter and length",
  async () => {
    const [gpu, cpu] = [await gpuDevice(), await cpuDevice()];
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 70 }), fc.nat(), fc.nat(), async (n, seed, counter) => {
        const got: number[][] = [];
        for (const dev of [gpu, cpu]) {
          dev.manualSeed(seed);
          dev.rng.counter = counter;
          const t = randomBits(n, { device: dev });
          got.push(await words(t));
          t.dispose();
          assertEquals(dev.rng.counter, counter + Math.ceil(n / 4));
        }
        assertEquals(hex(got[0]), hex(got[1]));
        // And both agree with the host function, word e from block e/4.
        const key = [seed >>> 0, 0];
        for (let e = 0; e < n; e++) {
          assertEquals(
            got[1][e],
            philox4x32([counter + Math.floor(e / 4), 0, 0, 0], key)[e % 4],
            `word ${e}`,
          );
        }
      }),
      { numRuns: RUNS },
    );
  },
);

gpuTest("property: rand is bit-identical across backends, randn equal within float32 rounding", async () => {
  const [gpu, cpu] = [await gpuDevice(), await cpuDevice()];
  await fc.assert(
    fc.asyncProperty(shapeArb(1, 3, 9), fc.nat(), async (shape, seed) => {
      const u: Float32Array[] = [], z: Float32Array[] = [], a: Float32Array[] = [], b: Float32Array[] = [];
      for (const dev of [gpu, cpu]) {
        dev.manualSeed(seed);
        for (
          const [list, t] of [
            [u, rand(shape, { device: dev })],
            [z, randn(shape, { device: dev })],
            [a, randUniform(shape, -3, 5, { device: dev })],
            [b, randNormal(shape, 2, 0.5, { device: dev })],
          ] as const
        ) {
          list.push(await t.toArray());
          t.dispose();
        }
      }
      assertEquals(Array.from(u[0]), Array.from(u[1]), "rand");
      for (const x of u[0]) if (!(x >= 0 && x < 1)) throw new Error(`rand gave ${x}, outside [0, 1)`);
      assertClose(z[0], z[1], { rtol: 1e-5, atol: 5e-6 }, "randn");
      assertClose(a[0], a[1], { rtol: 1e-6, atol: 1e-6 }, "randUniform");
      assertClose(b[0], b[1], { rtol: 1e-5, atol: 5e-6 }, "randNormal");
      for (const x of a[1]) if (!(x >= -3 && x < 5)) throw new Error(`randUniform(-3, 5) gave ${x}`);
    }),
    { numRuns: RUNS },
  );
});

/** Sample mean, variance, skewness and excess kurtosis. */
function moments(v: ArrayLike<number>) {
  const n = v.length;
  let m = 0;
  for (let i = 0; i < n; i++) m += v[i];
  m /= n;
  let m2 = 0, m3 = 0, m4 = 0;
  for (let i = 0; i < n; i++) {
    const d = v[i] - m;
    m2 += d * d;
    m3 += d * d * d;
    m4 += d * d * d * d;
  }
  m2 /= n;
  m3 /= n;
  m4 /= n;
  return { mean: m, variance: m2, skew: m3 / m2 ** 1.5, kurtosis: m4 / (m2 * m2) - 3 };
}

/** |got − want| within `sigmas` standard errors. */
function within(what: string, got: number, want: number, stdError: number, sigmas = 5) {
  if (!(Math.abs(got - want) <= sigmas * stdError)) {
    throw new Error(`${what}: ${got}, expected ${want} ± ${sigmas}·${stdError.toExponential(2)}`);
  }
}

gpuTest("uniform and normal samples have the right moments over 1e5 draws (both backends)", async () => {
  const n = 100_000;
  for (const [name, dev] of await backends()) {
    dev.manualSeed(1234);
    const tu = rand([n], { device: dev }), tz = randn([n], { device: dev });
    const u = await tu.toArray(), z = await tz.toArray();
    tu.dispose();
    tz.dispose();
    const mu = moments(u);
    within(`${name} uniform mean`, mu.mean, 0.5, Math.sqrt(1 / 12 / n));
    // Var((U − ½)²) = 1/80 − 1/144.
    within(`${name} uniform variance`, mu.variance, 1 / 12, Math.sqrt((1 / 80 - 1 / 144) / n));
    // Chi-square over 20 equal bins (19 degrees of freedom; 60 is beyond the 99.999th percentile).
    const bins = new Array(20).fill(0);
    for (const x of u) bins[Math.floor(x * 20)]++;
    const chi2 = bins.reduce((s, c) => s + (c - n / 20) ** 2 / (n / 20), 0);
    if (chi2 > 60) throw new Error(`${name} uniform histogram chi-square ${chi2} over 19 dof: ${bins}`);
    const mz = moments(z);
    within(`${name} normal mean`, mz.mean, 0, Math.sqrt(1 / n));
    within(`${name} normal variance`, mz.variance, 1, Math.sqrt(2 / n));
    within(`${name} normal skewness`, mz.skew, 0, Math.sqrt(6 / n));
    within(`${name} normal excess kurtosis`, mz.kurtosis, 0, Math.sqrt(24 / n));
    let inside = 0;
    for (const x of z) if (Math.abs(x) < 1) inside++;
    const p1 = 0.6826894921370859;
    within(`${name} P(|z| < 1)`, inside / n, p1, Math.sqrt(p1 * (1 - p1) / n));
    // Neighbouring elements are independent (correlation of z[i], z[i+1] near 0; they share a Box–Muller pair).
    let c = 0;
    for (let i = 0; i + 1 < n; i++) c += z[i] * z[i + 1];
    within(`${name} lag-1 correlation`, c / (n - 1), 0, Math.sqrt(1 / n));
    for (const x of z) if (!Number.isFinite(x)) throw new Error(`${name} randn gave ${x}`);
  }
});

gpuTest(
  "manualSeed replays; consecutive calls differ; an explicit seed leaves the generator alone",
  async () => {
    for (const [name, dev] of await backends()) {
      dev.manualSeed(42);
      const a1 = await rand([10], { device: dev }).toArray();
      const a2 = await rand([10], { device: dev }).toArray();
      assertEquals(dev.rng.counter, 6, `${name}: two calls of 10 elements take 3 blocks each`);
      dev.manualSeed(42);
      const b1 = await rand([10], { device: dev }).toArray();
      const b2 = await rand([10], { device: dev }).toArray();
      assertEquals(Array.from(b1), Array.from(a1), `${name}: replay`);
      assertEquals(Array.from(b2), Array.from(a2), `${name}: replay`);
      if (a1.every((x, i) => x === a2[i])) {
        throw new Error(
          `${name}: consecutive calls gave the same numbers`,
        );
      }
      dev.manualSeed(43);
      const c1 = await rand([10], { device: dev }).toArray();
      if (c1.every((x, i) => x === a1[i])) throw new Error(`${name}: seeds 42 and 43 gave the same numbers`);
      const before = dev.rng.counter;
      const s1 = await randn([5], { device: dev, seed: 7 }).toArray();
      const s2 = await randn([5], { device: dev, seed: 7 }).toArray();
      assertEquals(dev.rng.counter, before, `${name}: explicit seed must not advance the device counter`);
      assertEquals(Array.from(s1), Array.from(s2));
      dev.manualSeed(7);
      assertClose(
        await randn([5], { device: dev }).toArray(),
        s1,
        { rtol: 0, atol: 0 },
        `${name}: seed 7 stream`,
      );
    }
  },
);

test("random ops reject bad shapes and arguments, naming the op", async () => {
  const dev = await cpuDevice();
  assertThrows(() => rand([2, 0], { device: dev }), "rand: shape [2, 0]");
  assertThrows(() => randn([1.5], { device: dev }), "randn: shape [1.5]");
  assertThrows(() => randUniform([2], 1, 0, { device: dev }), "randUniform: high 0 must be ≥ low 1");
  assertThrows(() => randNormal([2], 0, -1, { device: dev }), "randNormal: std -1");
  assertThrows(() => rand([2], { device: dev, seed: -1 }), "seed -1");
  const x = tensor([1, 2], [2], { device: dev });
  assertThrows(() => dropout(x, 1.5), "dropout: probability has to be between 0 and 1, but got 1.5");
  assertThrows(() => dropout(x, -0.1), "dropout: probability");
});

gpuTest(
  "dropout: drop rate ≈ p, survivors scaled by exactly 1/(1−p), same mask on both backends",
  async () => {
    const n = 40_000, p = 0.3;
    const data = seededValues(n, 3, 0.5, 2); // never zero, so out == 0 identifies dropped elements
    const outs: Float32Array[] = [];
    for (const [name, dev] of await backends()) {
      dev.manualSeed(99);
      const x = tensor(data, [n], { device: dev });
      const y = await dropout(x, p).toArray();
      outs.push(y);
      let dropped = 0;
      for (let i = 0; i < n; i++) {
        if (y[i] === 0) dropped++;
        else if (y[i] !== Math.fround(data[i] * Math.fround(1 / (1 - p)))) {
          throw new Error(`${name}: element ${i} is ${y[i]}, expected ${data[i]}/(1−p)`);
        }
      }
      within(`${name} drop rate`, dropped / n, p, Math.sqrt(p * (1 - p) / n));
      x.dispose();
    }
    assertEquals(
      outs[0].map((v) => (v === 0 ? 0 : 1)).join(""),
      outs[1].map((v) => (v === 0 ? 0 : 1)).join(""),
    );
  },
);

gpuTest("dropout: identity in eval mode and for p = 0, zeros for p = 1; gradients follow", async () => {
  const dev = await gpuDevice();
  const x = tensor([1, -2, 3], [3], { device: dev, requiresGrad: true });
  for (const y of [dropout(x, 0.5, false), dropout(x, 0)]) {
    assertEquals(Array.from(await y.toArray()), [1, -2, 3]);
    y.backward(tensor([4, 5, 6], [3], { device: dev }));
  }
  assertEquals(Array.from(await x.grad!.toArray()), [8, 10, 12]);
  x.grad = null;
  const z = dropout(x, 1);
  assertEquals(Array.from(await z.toArray()), [0, 0, 0]);
  z.backward(tensor([4, 5, 6], [3], { device: dev }));
  assertEquals(Array.from(await x.grad!.toArray()), [0, 0, 0]);
});

gpuTest("dropout gradient replays the forward mask (both backends)", async () => {
  for (const [name, dev] of await backends()) {
    const n = 1000, p = 0.6;
    dev.manualSeed(5);
    const x = tensor(seededValues(n, 1, 0.5, 2), [n], { device: dev, requiresGrad: true });
    const y = dropout(x, p);
    // Another random call between forward and backward must not disturb the mask.
    rand([17], { device: dev }).dispose();
    const cot = seededValues(n, 2);
    y.backward(tensor(cot, [n], { device: dev }));
    const yv = await y.toArray(), gv = await x.grad!.toArray();
    const want = Float32Array.from(yv, (v, i) => (v === 0 ? 0 : cot[i] * Math.fround(1 / (1 - p))));
    assertClose(gv, want, { rtol: 1e-6, atol: 0 }, `${name} dropout gradient`);
  }
});

test("dropout: finite-difference gradient check (float64, fixed seed)", async () => {
  const dev = await f64Device();
  const f = (x: Parameters<typeof dropout>[0]) => {
    dev.manualSeed(11); // the same mask on every evaluation
    return dropout(x, 0.4);
  };
  await gradCheck(f, [{ shape: [3, 5], data: seededValues(15, 4) }]);
});

test("random kernels fold large dispatches into a 2-D grid correctly", async () => {
  // A device that plans for at most 4 workgroups per dimension: 3001 elements need 751 blocks = 12 workgroups.
  const small = await Device.create({ backend: "webgpu", fallback: false, maxWorkgroupsPerDimension: 4 });
  const cpu = await cpuDevice();
  try {
    for (const dev of [small, cpu]) dev.manualSeed(77);
    const [a, b] = [randomBits(3001, { device: small }), randomBits(3001, { device: cpu })];
    assertEquals(hex(await words(a)), hex(await words(b)));
    const [u, v] = [randn([3001], { device: small }), randn([3001], { device: cpu })];
    assertClose(await u.toArray(), await v.toArray(), { rtol: 1e-5, atol: 5e-6 });
  } finally {
    small.destroy();
  }
});
