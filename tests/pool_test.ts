/**
 * @file avgPool2d (with and without count_include_pad), maxPool2d and interpolateNearest: forward and backward
 * on WebGPU against the CPU reference over random shapes, kernels, strides and paddings (the CPU backward is a
 * scatter, the GPU one a gather), values checked by hand against PyTorch's semantics (including max-pool ties),
 * finite-difference gradient checks, and argument errors.
 */

import fc from "fast-check";
import { tensor } from "../engine/creation.ts";
import { avgPool2d, interpolateNearest, maxPool2d } from "../engine/ops/pool.ts";
import { noGrad } from "../engine/tensor.ts";
import type { Tensor } from "../engine/tensor.ts";
import {
  assertClose,
  cpuDevice,
  gpuDevice,
  gpuTest,
  gradCheck,
  RUNS,
  scaleArb,
  seedArb,
  seededValues,
  size,
  smallGridDevice,
  test,
  valueAndGrad,
} from "./util.ts";

async function compare(
  f: (x: Tensor) => Tensor,
  shape: number[],
  x: ArrayLike<number>,
  seed: number,
  small: boolean,
) {
  const gpu = small ? await smallGridDevice() : await gpuDevice();
  const got = await valueAndGrad(gpu, f, shape, x, seed);
  const want = await valueAndGrad(await cpuDevice(), f, shape, x, seed);
  if (got.shape.join() !== want.shape.join()) throw new Error(`shape [${got.shape}] vs [${want.shape}]`);
  assertClose(got.y, want.y, { rtol: 1e-5, atol: 1e-6 }, "y");
  assertClose(got.dx, want.dx, { rtol: 1e-5, atol: 1e-6 }, "dx");
}

const dim = fc.oneof(fc.integer({ min: 1, max: 9 }), fc.constantFrom(13, 17));

/** A pooling case whose output is non-empty and whose padding is at most half the kernel. */
const poolCase = fc
  .record({
    lead: fc.array(fc.integer({ min: 1, max: 3 }), { minLength: 1, maxLength: 2 }),
    H: dim,
    W: dim,
    kh: fc.integer({ min: 1, max: 4 }),
    kw: fc.integer({ min: 1, max: 4 }),
    sh: fc.integer({ min: 1, max: 4 }),
    sw: fc.integer({ min: 1, max: 4 }),
    pad: fc.tuple(fc.integer({ min: 0, max: 2 }), fc.integer({ min: 0, max: 2 })),
    defaultStride: fc.boolean(),
  })
  .map((c) => ({ ...c, ph: Math.min(c.pad[0], c.kh >> 1), pw: Math.min(c.pad[1], c.kw >> 1) }))
  .filter((c) => c.H + 2 * c.ph >= c.kh && c.W + 2 * c.pw >= c.kw);

gpuTest("avgPool2d forward and backward: WebGPU matches CPU reference", async () => {
  await fc.assert(
    fc.asyncProperty(
      poolCase,
      scaleArb,
      seedArb,
      fc.boolean(),
      fc.boolean(),
      async (c, scale, seed, small, countIncludePad) => {
        const shape = [...c.lead, c.H, c.W];
        const x = seededValues(size(shape), seed, -scale, scale);
        const stride = c.defaultStride ? undefined : ([c.sh, c.sw] as const);
        await compare(
          (t) => avgPool2d(t, [c.kh, c.kw], stride, [c.ph, c.pw], { countIncludePad }),
          shape,
          x,
          seed + 1,
          small,
        );
      },
    ),
    { numRuns: RUNS },
  );
});

gpuTest("maxPool2d forward and backward: WebGPU matches CPU reference", async () => {
  await fc.assert(
    fc.asyncProperty(poolCase, scaleArb, seedArb, fc.boolean(), async (c, scale, seed, small) => {
      const shape = [...c.lead, c.H, c.W];
      const x = seededValues(size(shape), seed, -scale, scale);
      const stride = c.defaultStride ? undefined : ([c.sh, c.sw] as const);
      await compare((t) => maxPool2d(t, [c.kh, c.kw], stride, [c.ph, c.pw]), shape, x, seed + 1, small);
    }),
    { numRuns: RUNS },
  );
});

gpuTest("maxPool2d without a tape (noGrad) gives the same maxima as with one", async () => {
  await fc.assert(
    fc.asyncProperty(poolCase, seedArb, async (c, seed) => {
      const device = await gpuDevice();
      const shape = [...c.lead, c.H, c.W];
      const x = tensor(seededValues(size(shape), seed), shape, { device, requiresGrad: true });
      const f = (t: Tensor) => maxPool2d(t, [c.kh, c.kw], [c.sh, c.sw], [c.ph, c.pw]);
      const taped = f(x), plain = noGrad(() => f(x));
      if (plain.requiresGrad) throw new Error("maxPool2d under noGrad recorded the tape");
      assertClose(await plain.toArray(), await taped.toArray(), { rtol: 0, atol: 0 });
      for (const t of [x, taped, plain]) t.dispose();
    }),
    { numRuns: RUNS },
  );
});

gpuTest("interpolateNearest forward and backward: WebGPU matches CPU reference", async () => {
  const caseArb = fc.record({
    N: fc.integer({ min: 1, max: 3 }),
    C: fc.integer({ min: 1, max: 4 }),
    H: dim,
    W: dim,
    scale: fc.oneof(
      fc.integer({ min: 1, max: 4 }),
      fc.tuple(fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 3 })),
    ),
  });
  await fc.assert(
    fc.asyncProperty(caseArb, scaleArb, seedArb, fc.boolean(), async (c, scale, seed, small) => {
      const shape = [c.N, c.C, c.H, c.W];
      const x = seededValues(size(shape), seed, -scale, scale);
      await compare((t) => interpolateNearest(t, c.scale), shape, x, seed + 1, small);
    }),
    { numRuns: RUNS },
  );
});

gpuTest(
  "2×2 resampling (avgPool2d 2×2 at stride 2, interpolateNearest ×2; vec4 blocks): WebGPU matches CPU",
  async () => {
    // Shapes whose rows are whole vec4s on the smaller side take the block kernels (kernels/pool.ts); the general
    // property tests above rarely draw them.
    const caseArb = fc.record({
      N: fc.integer({ min: 1, max: 3 }),
      C: fc.integer({ min: 1, max: 5 }),
      h: fc.integer({ min: 1, max: 5 }),
      q: fc.integer({ min: 1, max: 3 }),
      pool: fc.boolean(),
    });
    await fc.assert(
      fc.asyncProperty(caseArb, scaleArb, seedArb, fc.boolean(), async (c, scale, seed, small) => {
        // Pooling: H even, W a multiple of 8 (whole output quads); upsampling: W a multiple of 4.
        const shape = c.pool ? [c.N, c.C, 2 * c.h, 8 * c.q] : [c.N, c.C, c.h, 4 * c.q];
        const x = seededValues(size(shape), seed, -scale, scale);
        const f = c.pool ? (t: Tensor) => avgPool2d(t, 2) : (t: Tensor) => interpolateNearest(t, 2);
        await compare(f, shape, x, seed + 1, small);
      }),
      { numRuns: RUNS },
    );
  },
);

gpuTest("avgPool2d matches PyTorch on hand-computed cases (count_include_pad, floor mode)", async () => {
  for (const device of [await gpuDevice(), await cpuDevice()]) {
    const x = tensor(Array.from({ length: 16 }, (_, i) => i), [1, 1, 4, 4], { device });
    const a = avgPool2d(x, 2);
    if (a.shape.join() !== "1,1,2,2") throw new Error(`avgPool2d(x, 2) shape [${a.shape}]`);
    assertClose(await a.toArray(), [2.5, 4.5, 10.5, 12.5], {}, `${device.kind} k=2`);
    // F.avg_pool2d(arange(16).view(1,1,4,4), 3, 2, 1): padded zeros count, so every window divides by 9.
    assertClose(
      await avgPool2d(x, 3, 2, 1).toArray(),
      [10 / 9, 24 / 9, 51 / 9, 90 / 9],
      {},
      `${device.kind} k=3 s=2 p=1`,
    );
    // Floor mode: a 5-wide input with k=2 drops the last column; [C, H, W] input is unbatched.
    const u = tensor(Array.from({ length: 10 }, (_, i) => i), [1, 2, 5], { device });
    const b = avgPool2d(u, 2);
    if (b.shape.join() !== "1,1,2") throw new Error(`unbatched avgPool2d shape [${b.shape}]`);
    assertClose(await b.toArray(), [3, 5], {}, `${device.kind} floor mode`);
  }
});

gpuTest(
  "avgPool2d with countIncludePad: false divides by the window's elements inside the input",
  async () => {
    for (const device of [await gpuDevice(), await cpuDevice()]) {
      const x = tensor(Array.from({ length: 16 }, (_, i) => i), [1, 1, 4, 4], { device });
      // F.avg_pool2d(arange(16).view(1,1,4,4), 3, 2, 1, count_include_pad=False): 10/4, 24/6, 51/6, 90/9.
      const y = avgPool2d(x, 3, 2, 1, { countIncludePad: false });
      assertClose(await y.toArray(), [2.5, 4, 8.5, 10], {}, `${device.kind} k=3 s=2 p=1`);
      // Inception's branch_pool (3×3, stride 1, pad 1) of a constant image stays constant at the borders.
      const c = tensor(new Array(20).fill(7), [1, 4, 5], { device });
      assertClose(await avgPool2d(c, 3, 1, 1, { countIncludePad: false }).toArray(), new Array(20).fill(7));
      const inc = await avgPool2d(c, 3, 1, 1).toArray();
      if (Math.abs(inc[0] - 7 * 4 / 9) > 1e-5) throw new Error(`count_include_pad=True corner ${inc[0]}`);
    }
  },
);

gpuTest("maxPool2d matches PyTorch on hand-computed cases, ties go to the first maximum", async () => {
  for (const device of [await gpuDevice(), await cpuDevice()]) {
    const x = tensor(Array.from({ length: 16 }, (_, i) => i), [1, 1, 4, 4], { device });
    // F.max_pool2d(arange(16).view(1,1,4,4), 3, 2, 1) = [[5, 7], [13, 15]]; padding never wins.
    assertClose(await maxPool2d(x, 3, 2, 1).toArray(), [5, 7, 13, 15], {}, `${device.kind} k=3 s=2 p=1`);
    const neg = tensor(Array.from({ length: 16 }, (_, i) => -1 - i), [1, 1, 4, 4], { device });
    assertClose(await maxPool2d(neg, 3, 2, 1).toArray(), [-1, -2, -5, -6], {}, `${device.kind} negative`);
    // Ties: a constant 3×3 image pooled 2×2 with stride 1 sends each window's gradient to its top-left pixel.
    const c = tensor(new Array(9).fill(1), [1, 1, 3, 3], { device, requiresGrad: true });
    const y = maxPool2d(c, 2, 1);
    y.backward(tensor([1, 10, 100, 1000], [1, 1, 2, 2], { device }));
    assertClose(await c.grad!.toArray(), [1, 10, 0, 100, 1000, 0, 0, 0, 0], {}, `${device.kind} ties`);
    // Overlapping windows that share a maximum accumulate its gradient; [C, H, W] input is unbatched.
    const u = tensor([0, 9, 0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 5], { device, requiresGrad: true });
    const z = maxPool2d(u, 2, 1);
    if (z.shape.join() !== "1,1,4") throw new Error(`unbatched maxPool2d shape [${z.shape}]`);
    assertClose(await z.toArray(), [9, 9, 6, 7], {}, `${device.kind} unbatched`);
    z.backward();
    assertClose(await u.grad!.toArray(), [0, 2, 0, 0, 0, 0, 0, 0, 1, 1], {}, `${device.kind} shared max`);
  }
});

gpuTest("interpolateNearest repeats each pixel into a block", async () => {
  const x = tensor([1, 2, 3, 4, 5, 6], [1, 1, 2, 3], { device: await gpuDevice() });
  const y = interpolateNearest(x);
  if (y.shape.join() !== "1,1,4,6") throw new Error(`shape [${y.shape}]`);
  assertClose(await y.toArray(), [1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 4, 4, 5, 5, 6, 6]);
  const z = interpolateNearest(x, [1, 2]);
  assertClose(await z.toArray(), [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]);
});

test("avgPool2d gradient check with padding and stride ≠ kernel", async () => {
  const shape = [1, 2, 5, 6], n = size(shape);
  const data = seededValues(n, 3, -1, 1);
  await gradCheck((x) => avgPool2d(x, 3, 2, 1), [{ shape, data }]);
  await gradCheck((x) => avgPool2d(x, [2, 3], [1, 2], [1, 0]), [{ shape, data }]);
  await gradCheck((x) => avgPool2d(x, 2, 3), [{ shape, data }]);
});

test("avgPool2d (countIncludePad: false) and maxPool2d gradient checks", async () => {
  const shape = [1, 2, 5, 6], n = size(shape);
  const data = seededValues(n, 8, -1, 1);
  const exclude = { countIncludePad: false };
  await gradCheck((x) => avgPool2d(x, 3, 1, 1, exclude), [{ shape, data }]);
  await gradCheck((x) => avgPool2d(x, [2, 3], [2, 1], [1, 1], exclude), [{ shape, data }]);
  await gradCheck((x) => maxPool2d(x, 3, 2), [{ shape, data }]);
  await gradCheck((x) => maxPool2d(x, 3, 1, 1), [{ shape, data }]);
  await gradCheck((x) => maxPool2d(x, [2, 3], [1, 2], [1, 0]), [{ shape, data }]);
});

test("interpolateNearest gradient check", async () => {
  const shape = [2, 1, 2, 3], n = size(shape);
  await gradCheck((x) => interpolateNearest(x), [{ shape, data: seededValues(n, 4) }]);
  await gradCheck((x) => interpolateNearest(x, [3, 2]), [{ shape, data: seededValues(n, 5) }]);
});

test("avgPool2d/interpolateNearest argument errors name the shapes and values", async () => {
  const device = await cpuDevice();
  const x = tensor(seededValues(2 * 3 * 4 * 4, 1), [2, 3, 4, 4], { device });
  const expectError = (f: () => unknown, ...parts: string[]) => {
    try {
      f();
    } catch (e) {
      const msg = (e as Error).message;
      for (const p of parts) if (!msg.includes(p)) throw new Error(`error "${msg}" does not mention ${p}`);
      return;
    }
    throw new Error(`expected an error mentioning ${parts.join(", ")}`);
  };
  expectError(() => avgPool2d(x, 2, 1, 2), "avgPool2d", "padding", "[2, 2]", "kernelSize");
  expectError(() => avgPool2d(x, 5), "avgPool2d", "[2, 3, 4, 4]", "[5, 5]");
  expectError(() => avgPool2d(tensor([1, 2, 3, 4], [2, 2], { device }), 1), "avgPool2d", "[2, 2]");
  expectError(() => avgPool2d(x, 0), "avgPool2d", "kernelSize");
  expectError(() => maxPool2d(x, 3, 1, 2), "maxPool2d", "padding", "[2, 2]", "kernelSize");
  expectError(() => maxPool2d(x, [5, 2]), "maxPool2d", "[2, 3, 4, 4]", "[5, 2]");
  expectError(() => maxPool2d(tensor([1, 2], [2], { device }), 1), "maxPool2d", "[2]");
  expectError(() => maxPool2d(x, 2, 0), "maxPool2d", "stride");
  expectError(() => interpolateNearest(x, 1.5), "interpolateNearest", "scaleFactor", "1.5");
  expectError(
    () => interpolateNearest(tensor([1, 2, 3], [1, 1, 3], { device })),
    "interpolateNearest",
    "[1, 1, 3]",
  );
});
