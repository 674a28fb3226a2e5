/**
 * @file interpolateBilinear: forward and backward on WebGPU against the CPU reference over random sizes (up,
 * down, odd ratios, size 1, both align_corners settings; the CPU backward is a scatter, the GPU one a gather),
 * values checked by hand against PyTorch's F.interpolate(mode="bilinear"), finite-difference gradient checks,
 * and argument errors.
 */

import fc from "fast-check";
import { tensor } from "../engine/creation.ts";
import { interpolateBilinear } from "../engine/ops/resize.ts";
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

const dim = fc.oneof(fc.integer({ min: 1, max: 9 }), fc.constantFrom(13, 17, 23));

gpuTest("interpolateBilinear forward and backward: WebGPU matches CPU reference", async () => {
  const caseArb = fc.record({
    N: fc.integer({ min: 1, max: 2 }),
    C: fc.integer({ min: 1, max: 3 }),
    H: dim,
    W: dim,
    Ho: dim,
    Wo: dim,
    mode: fc.constantFrom("half-pixel", "align-corners", "asymmetric"),
  });
  await fc.assert(
    fc.asyncProperty(caseArb, scaleArb, seedArb, fc.boolean(), async (c, scale, seed, small) => {
      const shape = [c.N, c.C, c.H, c.W];
      const x = seededValues(size(shape), seed, -scale, scale);
      const opts = c.mode === "align-corners"
        ? { alignCorners: true }
        : { halfPixelCenters: c.mode === "half-pixel" };
      const f = (t: Tensor) => interpolateBilinear(t, [c.Ho, c.Wo], opts);
      const got = await valueAndGrad(
        small ? await smallGridDevice() : await gpuDevice(),
        f,
        shape,
        x,
        seed + 1,
      );
      const want = await valueAndGrad(await cpuDevice(), f, shape, x, seed + 1);
      if (got.shape.join() !== [c.N, c.C, c.Ho, c.Wo].join()) throw new Error(`shape [${got.shape}]`);
      // The GPU's source coordinates are float32 (like PyTorch's), the reference's float64: a coordinate off by
      // δ ≈ 2⁻²³·max(n, m) moves a value by δ·|x₁ − x₀| ≤ 2δ·scale, and a gradient by δ per output feeding it.
      const delta = 4 * 2 ** -23 * Math.max(c.H, c.W, c.Ho, c.Wo);
      const feeds = (Math.ceil(c.Ho / c.H) + 1) * (Math.ceil(c.Wo / c.W) + 1);
      assertClose(got.y, want.y, { rtol: 1e-5, atol: 2 * delta * scale }, "y");
      assertClose(got.dx, want.dx, { rtol: 1e-5, atol: 2 * delta * feeds }, "dx");
    }),
    { numRuns: RUNS },
  );
});

gpuTest("interpolateBilinear matches PyTorch on hand-computed cases", async () => {
  for (const device of [await gpuDevice(), await cpuDevice()]) {
    // F.interpolate([[1, 2], [3, 4]], size=(4, 4), mode="bilinear", align_corners=False).
    const x = tensor([1, 2, 3, 4], [1, 1, 2, 2], { device });
    assertClose(
      await interpolateBilinear(x, [4, 4]).toArray(),
      [1, 1.25, 1.75, 2, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3, 3.25, 3.75, 4],
      {},
      `${device.kind} 2→4`,
    );
    // On a ramp the output is the source coordinate: 5 → 3 reads (o + 0.5)·5/3 − 0.5 = 1/3, 2, 11/3;
    // 5 → 2 reads 0.75, 3.25; 2 → 3 reads max(−1/6, 0) = 0, 0.5, 7/6 → clamped to 1 (the last pixel).
    const ramp = tensor([0, 1, 2, 3, 4], [1, 1, 1, 5], { device });
    assertClose(
      await interpolateBilinear(ramp, [1, 3]).toArray(),
      [1 / 3, 2, 11 / 3],
      {},
      `${device.kind} 5→3`,
    );
    assertClose(await interpolateBilinear(ramp, [1, 2]).toArray(), [0.75, 3.25], {}, `${device.kind} 5→2`);
    const two = tensor([0, 1], [1, 1, 1, 2], { device });
    assertClose(await interpolateBilinear(two, [1, 3]).toArray(), [0, 0.5, 1], {}, `${device.kind} 2→3`);
    // align_corners=True: 5 → 3 reads 0, 2, 4; 2 → 3 reads 0, 0.5, 1; a single output reads the first pixel.
    const ac = { alignCorners: true };
    assertClose(
      await interpolateBilinear(ramp, [1, 3], ac).toArray(),
      [0, 2, 4],
      {},
      `${device.kind} ac 5→3`,
    );
    assertClose(
      await interpolateBilinear(two, [1, 3], ac).toArray(),
      [0, 0.5, 1],
      {},
      `${device.kind} ac 2→3`,
    );
    assertClose(await interpolateBilinear(ramp, [1, 1], ac).toArray(), [0], {}, `${device.kind} ac 5→1`);
    // TF1 legacy (half_pixel_centers=False): 5 → 3 reads 0, 5/3, 10/3; 2 → 3 reads 0, 2/3, 4/3 → clamped to 1.
    const tf = { halfPixelCenters: false };
    assertClose(
      await interpolateBilinear(ramp, [1, 3], tf).toArray(),
      [0, 5 / 3, 10 / 3],
      {},
      `${device.kind} tf 5→3`,
    );
    assertClose(
      await interpolateBilinear(two, [1, 3], tf).toArray(),
      [0, 2 / 3, 1],
      {},
      `${device.kind} tf 2→3`,
    );
    // The same size is the identity.
    const id = seededValues(2 * 3 * 5 * 7, 3);
    assertClose(await interpolateBilinear(tensor(id, [2, 3, 5, 7], { device }), [5, 7]).toArray(), id);
  }
});

gpuTest("interpolateBilinear backward sends each output's gradient to its four source pixels", async () => {
  const device = await gpuDevice();
  // 2 → 4 along W: outputs read 0, 0.25, 0.75, 1 (in source units), so dx = [1 + .75 + .25, .25 + .75 + 1].
  const x = tensor([5, 6], [1, 1, 1, 2], { device, requiresGrad: true });
  interpolateBilinear(x, [1, 4]).backward();
  assertClose(await x.grad!.toArray(), [2, 2]);
  // The gradient's total equals the output count (bilinear weights sum to one), for a downscale too.
  const big = tensor(seededValues(64, 2), [1, 1, 8, 8], { device, requiresGrad: true });
  interpolateBilinear(big, [3, 5]).backward();
  const total = (await big.grad!.toArray()).reduce((a, b) => a + b, 0);
  if (Math.abs(total - 15) > 1e-4) throw new Error(`gradient total ${total}, expected 15`);
});

test("interpolateBilinear gradient check (up, down, odd ratios, align_corners, TF1 legacy)", async () => {
  const shape = [1, 2, 3, 4], n = size(shape);
  const data = seededValues(n, 11);
  await gradCheck((x) => interpolateBilinear(x, [7, 5]), [{ shape, data }]);
  await gradCheck((x) => interpolateBilinear(x, [2, 3]), [{ shape, data }]);
  await gradCheck((x) => interpolateBilinear(x, [5, 9], { alignCorners: true }), [{ shape, data }]);
  await gradCheck((x) => interpolateBilinear(x, [1, 2], { alignCorners: true }), [{ shape, data }]);
  await gradCheck((x) => interpolateBilinear(x, [8, 3], { halfPixelCenters: false }), [{ shape, data }]);
});

test("interpolateBilinear argument errors name the shapes and values", async () => {
  const device = await cpuDevice();
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
  const x = tensor(seededValues(12, 1), [1, 3, 2, 2], { device });
  expectError(
    () => interpolateBilinear(tensor([1, 2, 3], [1, 1, 3], { device }), 4),
    "interpolateBilinear",
    "[1, 1, 3]",
  );
  expectError(() => interpolateBilinear(x, [0, 4]), "interpolateBilinear", "size", "[0,4]");
  expectError(() => interpolateBilinear(x, 2.5), "interpolateBilinear", "size", "2.5");
  expectError(
    () => interpolateBilinear(x, [2, 2, 2] as unknown as [number, number]),
    "interpolateBilinear",
    "size",
  );
});
