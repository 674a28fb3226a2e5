/**
 * @file Tests of the convolution kernels and of `conv2d` / `convTranspose2d`: hand-computed cases, the three
 * WebGPU kernels in both variants (registers, texture) against their CPU references over random geometries
 * (k 1–5, stride 1–3, padding 0–2, sizes with 1s and primes, bias, split weight gradients, weight layouts),
 * 2-D grids, the variant choice, the ops on the GPU against the CPU backend (values and gradients, also at sizes
 * where the texture variant is the default), the adjoint identity between conv2d and convTranspose2d,
 * finite-difference gradient checks, and shape errors.
 */

import fc from "fast-check";
import {
  conv2d as conv2dKernel,
  conv2dInputGrad,
  conv2dWeightGrad,
  conv2dWeightGradSum,
  type ConvGeometry,
  type ConvOperand,
  convQuadLayout,
  type ConvVariant,
  convVariant,
  oihwStrides,
  texWeightGradInnerSplits,
  weightGradSplits,
  type WeightStrides,
} from "../kernels/conv.ts";
import type { Kernel } from "../kernels/types.ts";
import { quadBufferElements, toQuadBuffer } from "../kernels/layout.ts";
import { conv2d, convTranspose2d } from "../engine/ops/conv.ts";
import { tensor } from "../engine/creation.ts";
import { map } from "../engine/ops/core.ts";
import { mul } from "../engine/ops/elementwise.ts";
import { bin, inp } from "../kernels/elementwise.ts";
import type { Device } from "../engine/device.ts";
import { isGlslApi } from "../engine/backend.ts";
import type { Tensor } from "../engine/tensor.ts";
import {
  assertBackendsAgree,
  assertClose,
  assertEquals,
  cpuDevice,
  gpuDevice,
  gpuTest,
  gradCheck,
  noTextureInputs,
  runOnBuffers,
  RUNS,
  scaleArb,
  seedArb,
  seededValues,
  size,
  smallGridDevice,
  test,
  values,
} from "./util.ts";

/** Why the tests that need texture inputs are skipped here, or null. */
const noTextures = await noTextureInputs();

async function runKernel<P>(device: Device, kernel: Kernel<P>, p: P, inputs: Float32Array[], outLen: number) {
  // NaN-filled: every element must be written.
  const [r] = await runOnBuffers(device, kernel, p, inputs, [new Float32Array(outLen).fill(NaN)]);
  return r;
}

gpuTest("conv2d / convTranspose2d: hand-computed cases on both backends", async () => {
  for (const device of [await gpuDevice(), await cpuDevice()]) {
    const x = tensor([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 1, 3, 3], { device });
    // Identity-diagonal 2×2 kernel: y = x[i][j] + x[i+1][j+1].
    const w = tensor([1, 0, 0, 1], [1, 1, 2, 2], { device });
    assertEquals(Array.from(await values(conv2d(x, w))), [6, 8, 12, 14]);
    // 3×3 ones with padding 1 and stride 2: sums of the clipped 3×3 neighbourhoods of the corners, plus bias.
    const ones = tensor(new Float32Array(9).fill(1), [1, 1, 3, 3], { device });
    const y = conv2d(x, ones, tensor([0.5], [1], { device }), { stride: 2, padding: 1 });
    assertEquals(y.shape, [1, 1, 2, 2]);
    assertEquals(Array.from(await values(y)), [12.5, 16.5, 24.5, 28.5]);
    // Two output channels, unbatched input: channel 1 is channel 0 negated.
    const w2 = tensor([1, 0, 0, 1, -1, 0, 0, -1], [2, 1, 2, 2], { device });
    const y2 = conv2d(tensor([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 3, 3], { device }), w2);
    assertEquals(y2.shape, [2, 2, 2]);
    assertEquals(Array.from(await values(y2)), [6, 8, 12, 14, -6, -8, -12, -14]);
    // Transposed, stride 2, 2×2 ones: every input pixel becomes a 2×2 block.
    const t = convTranspose2d(
      tensor([1, 2, 3, 4], [1, 1, 2, 2], { device }),
      tensor([1, 1, 1, 1], [1, 1, 2, 2], { device }),
      null,
      {
        stride: 2,
      },
    );
    assertEquals(Array.from(await values(t)), [1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]);
    // Transposed, stride 1, 2×2 kernel [1, 2; 3, 4] on [1, 2]: full correlation, output 2×3, plus bias 1.
    const t2 = convTranspose2d(
      tensor([1, 2], [1, 1, 1, 2], { device }),
      tensor([1, 2, 3, 4], [1, 1, 2, 2], { device }),
      tensor([1], [1], { device }),
    );
    assertEquals(t2.shape, [1, 1, 2, 3]);
    assertEquals(Array.from(await values(t2)), [2, 5, 5, 4, 11, 9]);
    // Output padding adds a row/column at the bottom/right (zeros here, then bias).
    const t3 = convTranspose2d(
      tensor([1], [1, 1, 1, 1], { device }),
      tensor([2], [1, 1, 1, 1], { device }),
      null,
      {
        stride: 2,
        outputPadding: 1,
      },
    );
    assertEquals(t3.shape, [1, 1, 2, 2]);
    assertEquals(Array.from(await values(t3)), [2, 0, 0, 0]);
  }
});

/** Random geometries: k 1–5, stride 1–3, padding 0–2, small sizes with 1s and primes, at least one output. */
const geometryArb: fc.Arbitrary<ConvGeometry> = fc.record({
  N: fc.integer({ min: 1, max: 3 }),
  // Multiples of 4 reach the vector weight loads; 16+ the full 16-channel tile and its edges.
  Cin: fc.oneof(
    fc.constantFrom(1, 2, 3, 5, 7),
    fc.integer({ min: 1, max: 10 }),
    fc.constantFrom(4, 8, 12, 20),
  ),
  Cout: fc.oneof(
    fc.constantFrom(1, 2, 3, 5, 7, 13),
    fc.integer({ min: 1, max: 12 }),
    fc.constantFrom(4, 8, 16, 20),
  ),
  kH: fc.integer({ min: 1, max: 5 }),
  kW: fc.integer({ min: 1, max: 5 }),
  strideH: fc.integer({ min: 1, max: 3 }),
  strideW: fc.integer({ min: 1, max: 3 }),
  padH: fc.integer({ min: 0, max: 2 }),
  padW: fc.integer({ min: 0, max: 2 }),
  extraH: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 9 })),
  extraW: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 9 })),
}).map(({ extraH, extraW, ...g }) => {
  const H = Math.max(1, g.kH - 2 * g.padH) + extraH, W = Math.max(1, g.kW - 2 * g.padW) + extraW;
  const Ho = Math.floor((H + 2 * g.padH - g.kH) / g.strideH) + 1;
  const Wo = Math.floor((W + 2 * g.padW - g.kW) / g.strideW) + 1;
  return { ...g, H, W, Ho, Wo };
});

/** Weight layouts the kernels accept: OIHW, and the two transposed copies the ops make for vector loads. */
function layoutStrides(layout: "oihw" | "co" | "ci", g: ConvGeometry): WeightStrides {
  if (layout === "co") return { co: 1, ci: g.Cout, k: g.Cin * g.Cout };
  if (layout === "ci") return { co: g.Cin, ci: 1, k: g.Cin * g.Cout };
  return oihwStrides(g);
}

gpuTest(
  "conv kernels: forward, input gradient and weight gradient on WebGPU match the CPU references",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    const glsl = isGlslApi(gpu.info);
    await fc.assert(
      fc.asyncProperty(
        geometryArb,
        fc.boolean(),
        fc.integer({ min: 1, max: 4 }),
        fc.constantFrom("oihw", "co", "ci") as fc.Arbitrary<"oihw" | "co" | "ci">,
        fc.constantFrom("registers", "texture") as fc.Arbitrary<ConvVariant>,
        scaleArb,
        seedArb,
        fc.constantFrom(undefined, 1, 2, 8, 64),
        async (g0, bias, splits, layout, variant, scale, seed, forcedInnerSplits) => {
          // Forced inner splits only where they compile in reasonable time (not through GLSL: GpuCaps.glsl).
          const innerSplits = glsl ? undefined : forcedInnerSplits;
          const g = { ...g0, variant, innerSplits };
          // The weight buffer is random in any layout; both backends read it through the same strides.
          const weightStrides = layoutStrides(layout, g);
          const xLen = g.N * g.Cin * g.H * g.W,
            yLen = g.N * g.Cout * g.Ho * g.Wo,
            wLen = g.Cout * g.Cin * g.kH * g.kW;
          const x = seededValues(xLen, seed, -scale, scale), dy = seededValues(yLen, seed + 1, -scale, scale);
          const w = seededValues(wLen, seed + 2, -1, 1);
          const what = `${JSON.stringify(g)} weights ${layout}`; // names the variant too
          // Sums of up to Cin·kH·kW (or N·Ho·Wo) products of magnitude ≤ scale (scale² for the weight gradient).
          const tol = (terms: number, mag: number) => ({ rtol: 1e-4, atol: 2e-6 * terms * mag });

          const fwdIn = bias ? [x, w, seededValues(g.Cout, seed + 3)] : [x, w];
          const y = await runKernel(gpu, conv2dKernel, { ...g, bias, weightStrides }, fwdIn, yLen);
          const yRef = await runKernel(cpu, conv2dKernel, { ...g, bias, weightStrides }, fwdIn, yLen);
          assertClose(y, yRef, tol(g.Cin * g.kH * g.kW, scale), `conv2d ${what}`);

          const igIn = bias ? [dy, w, seededValues(g.Cin, seed + 4)] : [dy, w];
          const dx = await runKernel(gpu, conv2dInputGrad, { ...g, bias, weightStrides }, igIn, xLen);
          const dxRef = await runKernel(cpu, conv2dInputGrad, { ...g, bias, weightStrides }, igIn, xLen);
          assertClose(dx, dxRef, tol(g.Cout * g.kH * g.kW, scale), `conv2dInputGrad ${what}`);

          const dwLen = splits * wLen;
          const dw = await runKernel(gpu, conv2dWeightGrad, { ...g, splits }, [x, dy], dwLen);
          const dwRef = await runKernel(cpu, conv2dWeightGrad, { ...g, splits }, [x, dy], dwLen);
          assertClose(
            dw,
            dwRef,
            tol(g.N * g.Ho * g.Wo, scale * scale),
            `conv2dWeightGrad ${what} splits ${splits}`,
          );
          // With the bias gradient as a second output: the same weight gradient, and the bias sums.
          const nan = (n: number) => new Float32Array(n).fill(NaN);
          const wb = { ...g, splits, biasGrad: true };
          const [dw2, db] = await runOnBuffers(gpu, conv2dWeightGrad, wb, [x, dy], [
            nan(dwLen),
            nan(splits * g.Cout),
          ]);
          const [, dbRef] = await runOnBuffers(cpu, conv2dWeightGrad, wb, [x, dy], [
            nan(dwLen),
            nan(splits * g.Cout),
          ]);
          assertClose(dw2, dwRef, tol(g.N * g.Ho * g.Wo, scale * scale), `conv2dWeightGrad+bias ${what}`);
          assertClose(
            db,
            dbRef,
            tol(g.N * g.Ho * g.Wo, scale),
            `conv2dWeightGrad bias ${what} splits ${splits}`,
          );
          // x and dy handed over in the texture variant's quad layouts (as producers write them): the same
          // results, on the GPU (flat copies instead of packing passes) and through the CPU references' unpacking.
          if (variant !== "texture" || noTextures) return;
          const caps = { isCpuEmulated: true, maxTextureDimension2D: gpu.info.limits.maxTextureDimension2D };
          const quads = (which: ConvOperand, data: Float32Array) => {
            const layout = convQuadLayout(which, g, caps);
            if (!layout) return null;
            const q = new Float32Array(quadBufferElements(layout));
            toQuadBuffer(layout, data, q);
            return q;
          };
          const xq = quads(["conv2d", "x"], x), dyq = quads(["conv2dInputGrad", "dy"], dy);
          const xwq = quads(["conv2dWeightGrad", "x"], x), dywq = quads(["conv2dWeightGrad", "dy"], dy);
          for (const device of [gpu, cpu]) {
            const on = `in quads, ${device.kind} ${what}`;
            if (xq) {
              const q = { ...g, bias, weightStrides, quadInput: true };
              const got = await runKernel(device, conv2dKernel, q, [xq, ...fwdIn.slice(1)], yLen);
              assertClose(got, yRef, tol(g.Cin * g.kH * g.kW, scale), `conv2d, x ${on}`);
            }
            if (dyq) {
              const q = { ...g, bias, weightStrides, quadInput: true };
              const got = await runKernel(device, conv2dInputGrad, q, [dyq, ...igIn.slice(1)], xLen);
              assertClose(got, dxRef, tol(g.Cout * g.kH * g.kW, scale), `conv2dInputGrad, dy ${on}`);
            }
            if (xwq && dywq) {
              for (const [xQuad, dyQuad] of [[true, false], [false, true], [true, true]]) {
                const q = { ...g, splits, xQuad, dyQuad };
                const ins = [xQuad ? xwq : x, dyQuad ? dywq : dy];
                const got = await runKernel(device, conv2dWeightGrad, q, ins, dwLen);
                const which = `${xQuad ? "x" : ""}${dyQuad ? " dy" : ""}`;
                assertClose(
                  got,
                  dwRef,
                  tol(g.N * g.Ho * g.Wo, scale * scale),
                  `conv2dWeightGrad, ${which} ${on}`,
                );
              }
            }
          }
        },
      ),
      { numRuns: RUNS * 3 },
    );
  },
);

gpuTest(
  "conv kernels: grids folded into 2-D (more workgroups than one dimension allows) give the same result",
  async () => {
    const small = await smallGridDevice(), cpu = await cpuDevice();
    // Forward 30 workgroups, input gradient 20, weight gradient (40 splits) 23, over a 16-wide grid.
    const g: ConvGeometry = {
      N: 3,
      Cin: 20,
      H: 50,
      W: 50,
      Cout: 33,
      Ho: 50,
      Wo: 50,
      kH: 3,
      kW: 3,
      strideH: 1,
      strideW: 1,
      padH: 1,
      padW: 1,
    };
    const xLen = 3 * 20 * 2500, yLen = 3 * 33 * 2500, wLen = 33 * 20 * 9;
    const x = seededValues(xLen, 1), dy = seededValues(yLen, 2), w = seededValues(wLen, 3);
    const check = async <P>(name: string, kernel: Kernel<P>, p: P, inputs: Float32Array[], len: number) => {
      const want = await runKernel(cpu, kernel, p, inputs, len);
      assertClose(await runKernel(small, kernel, p, inputs, len), want, { rtol: 1e-4, atol: 1e-4 }, name);
    };
    for (const variant of ["registers", "texture"] as const) {
      // Texture variant: 30 (forward), 20 (input gradient) and 34 (weight gradient) workgroups.
      await check(`conv2d ${variant}`, conv2dKernel, { ...g, variant }, [x, w], yLen);
      await check(`conv2dInputGrad ${variant}`, conv2dInputGrad, { ...g, variant }, [dy, w], xLen);
      const wg = { ...g, variant, splits: 40 };
      await check(`conv2dWeightGrad ${variant}`, conv2dWeightGrad, wg, [x, dy], 40 * wLen);
    }
  },
);

test("conv kernels: the weight-gradient splits add up to the unsplit gradient", async () => {
  const cpu = await cpuDevice();
  const g: ConvGeometry = {
    N: 2,
    Cin: 3,
    H: 7,
    W: 6,
    Cout: 4,
    Ho: 4,
    Wo: 3,
    kH: 3,
    kW: 2,
    strideH: 2,
    strideW: 2,
    padH: 1,
    padW: 0,
  };
  const x = seededValues(2 * 3 * 7 * 6, 1), dy = seededValues(2 * 4 * 4 * 3, 2);
  const wLen = 4 * 3 * 3 * 2;
  const whole = await runKernel(cpu, conv2dWeightGrad, g, [x, dy], wLen);
  for (const splits of [2, 3, 8, 11]) {
    const parts = await runKernel(cpu, conv2dWeightGrad, { ...g, splits }, [x, dy], splits * wLen);
    const sum = new Float64Array(wLen);
    for (let s = 0; s < splits; s++) for (let i = 0; i < wLen; i++) sum[i] += parts[s * wLen + i];
    assertClose(sum, whole, { rtol: 1e-5, atol: 1e-5 }, `splits ${splits}`);
    // The bias parts add up to Σ dy per channel, and conv2dWeightGradSum adds both kinds of part.
    const wb = { ...g, splits, biasGrad: true };
    const [wParts, bParts] = await runOnBuffers(cpu, conv2dWeightGrad, wb, [x, dy], [
      splits * wLen,
      splits * 4,
    ]);
    const [dw, db] = await runOnBuffers(
      cpu,
      conv2dWeightGradSum,
      { splits, A: wLen, B: 4 },
      [wParts, bParts],
      [
        wLen,
        4,
      ],
    );
    assertClose(dw, whole, { rtol: 1e-5, atol: 1e-5 }, `weight, splits ${splits}`);
    const dySum = [0, 1, 2, 3].map((c) => {
      let t = 0;
      for (let n = 0; n < 2; n++) for (let i = 0; i < 12; i++) t += dy[(n * 4 + c) * 12 + i];
      return t;
    });
    assertClose(db, dySum, { rtol: 1e-5, atol: 1e-5 }, `bias, splits ${splits}`);
  }
  // Split counts: none for a short reduction; for a 64→64 3×3 conv over 8×32 rows, none on a CPU-emulated
  // adapter (its 16×16 tiles already give enough invocations) and as many as the rows allow on a GPU.
  const emulated = { isCpuEmulated: true }, gpuCaps = { isCpuEmulated: false };
  const short = { ...g, N: 1 };
  assertEquals(
    [weightGradSplits(short, emulated), weightGradSplits(short, gpuCaps)],
    [1, 1],
    "short reduction",
  );
  const big: ConvGeometry = {
    ...g,
    N: 8,
    Cin: 64,
    Cout: 64,
    H: 32,
    W: 32,
    Ho: 32,
    Wo: 32,
    kW: 3,
    strideH: 1,
    strideW: 1,
  };
  assertEquals([weightGradSplits(big, emulated), weightGradSplits(big, gpuCaps)], [1, 64], "64→64 conv");
  // With texture inputs (the texture variant) no outer splits. Inner splits by the fitted time model: 4 × 4
  // channel tiles × 9 taps = 144 tiles, each shared by 8 lanes of a workgroup (18 workgroups, 9 per thread of
  // two); a 16→16 conv (9 tiles) by 32; none for 16 or 4 rows (the inner sum would cost more than the rows);
  // more threads want more workgroups.
  const textured = { isCpuEmulated: true, maxTextureDimension2D: 16384 };
  assertEquals(weightGradSplits(big, textured), 1, "64→64 conv, texture variant");
  const inner = (g: ConvGeometry, caps: Parameters<typeof texWeightGradInnerSplits>[1] = textured) =>
    texWeightGradInnerSplits(g, caps);
  assertEquals(inner(big), 8, "64→64 conv, inner splits");
  assertEquals(inner({ ...big, Cin: 16, Cout: 16 }), 32, "16→16 conv, inner splits");
  assertEquals(inner({ ...big, N: 1, Ho: 16 }), 1, "64→64 conv, 16 rows");
  assertEquals(inner({ ...big, N: 1, Ho: 4 }), 1, "64→64 conv, 4 rows");
  assertEquals(inner(big, { ...textured, cpuThreads: 16 }), 32, "64→64 conv, 16 threads");
  // Where shaders go through GLSL: no inner splits (their workgroup array compiles for minutes there), but 7
  // outer splits for about 16 workgroups, summed by a second pass.
  const glsl = { ...textured, glsl: true };
  assertEquals(inner(big, glsl), 1, "64→64 conv, inner splits, GLSL");
  assertEquals(weightGradSplits(big, glsl), 7, "64→64 conv, texture variant, GLSL");
});

test("conv kernels: variant choice (texture on CPU-emulated adapters for convolutions that are not tiny)", () => {
  const emulated = { isCpuEmulated: true, maxTextureDimension2D: 16384 };
  const big: ConvGeometry = {
    N: 8,
    Cin: 64,
    H: 32,
    W: 32,
    Cout: 64,
    Ho: 32,
    Wo: 32,
    kH: 3,
    kW: 3,
    strideH: 1,
    strideW: 1,
    padH: 1,
    padW: 1,
  };
  const tiny = { ...big, N: 1, Cin: 2, Cout: 2, H: 4, W: 4, Ho: 4, Wo: 4 };
  for (const kernel of ["conv2d", "conv2dInputGrad", "conv2dWeightGrad"] as const) {
    assertEquals(convVariant(kernel, big, emulated), "texture", `${kernel} big`);
    assertEquals(convVariant(kernel, tiny, emulated), "registers", `${kernel} tiny`);
    assertEquals(
      convVariant(kernel, { ...tiny, variant: "texture" }, emulated),
      "texture",
      `${kernel} forced`,
    );
    assertEquals(convVariant(kernel, big, { isCpuEmulated: false }), "registers", `${kernel} GPU`);
    // Textures over the adapter's limit (channel quads × padded width = 16 × 34 > 256): registers.
    assertEquals(convVariant(kernel, big, { ...emulated, maxTextureDimension2D: 256 }), "registers", kernel);
  }
});

gpuTest(
  "conv2d takes a pending elementwise input and gradient in its packed layouts (packing passes saved); values and gradients match the CPU backend",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    // [x shape, Cout, stride, packs saved]: x and dy where every layout is shared; none at stride 2 with Wo = 6
    // (the weight gradient reads x in a layout of its own, so the forward's pack serves it, and dy has no whole
    // position quads); 3 channels are no whole channel quads (x is packed, dy saved).
    const cases: [number[], number, number, number][] = [
      [[2, 16, 8, 16], 16, 1, 2],
      [[2, 16, 12, 12], 32, 2, 0],
      [[2, 3, 16, 16], 32, 1, 1],
    ];
    for (const [shape, Cout, stride, saved] of cases) {
      const C = shape[1];
      const data = {
        x: seededValues(shape.reduce((a, b) => a * b), 1, -2, 2),
        w: seededValues(Cout * C * 9, 2, -0.3, 0.3),
        b: seededValues(Cout, 3),
      };
      // `computed`: x and the output's gradient are computed tensors, so the conv packs both itself.
      const run = async (device: Device, computed: boolean) => {
        const t = (v: Float32Array, s: number[]) => tensor(v, s, { device, requiresGrad: true });
        const x = t(data.x, shape), w = t(data.w, [Cout, C, 3, 3]), b = t(data.b, [Cout]);
        const packs0 = device.counters().packs ?? 0;
        const xin = mul(x, x);
        if (computed) xin.realize();
        const y = conv2d(xin, w, b, { stride, padding: 1 });
        const cot = tensor(seededValues(y.size, 4), y.shape, { device });
        // Lazy: the gradient reaching the conv is the pending expression 3·cot (the mul's backward rule).
        if (computed) {
          const g = mul(cot, 3);
          g.realize();
          y.backward(g);
        } else mul(y, 3).backward(cot);
        const values = await Promise.all([y, x.grad!, w.grad!, b.grad!].map((v) => v.toFloat64Array()));
        return { values, packs: (device.counters().packs ?? 0) - packs0 };
      };
      const what = `[${shape}] → ${Cout} stride ${stride}`;
      const got = await run(gpu, false), computed = await run(gpu, true), want = await run(cpu, true);
      ["y", "dx", "dweight", "dbias"].forEach((name, i) =>
        assertClose(got.values[i], want.values[i], { rtol: 1e-4, atol: 1e-4 }, `${name} ${what}`)
      );
      assertEquals(computed.packs - got.packs, saved, `packing passes saved ${what}`);
    }
  },
  noTextures,
);

gpuTest("conv2d / convTranspose2d ops: GPU matches the CPU backend in values and all gradients", async () => {
  const gpu = await gpuDevice(), cpu = await cpuDevice();
  await fc.assert(
    fc.asyncProperty(
      geometryArb,
      fc.boolean(),
      fc.boolean(),
      seedArb,
      async (g, withBias, unbatched, seed) => {
        const stride: [number, number] = [g.strideH, g.strideW], padding: [number, number] = [g.padH, g.padW];
        const n = unbatched ? [] : [g.N];
        const fwd = (x: Tensor, w: Tensor, b?: Tensor) => conv2d(x, w, b, { stride, padding });
        const cShapes = [
          [...n, g.Cin, g.H, g.W],
          [g.Cout, g.Cin, g.kH, g.kW],
          ...(withBias ? [[g.Cout]] : []),
        ];
        // The transposed op maps the conv output size back, with the output padding that recovers H, W.
        const outputPadding: [number, number] = [
          g.H - ((g.Ho - 1) * g.strideH - 2 * g.padH + g.kH),
          g.W - ((g.Wo - 1) * g.strideW - 2 * g.padW + g.kW),
        ];
        const tr = (x: Tensor, w: Tensor, b?: Tensor) =>
          convTranspose2d(x, w, b, { stride, padding, outputPadding });
        const tShapes = [
          [...n, g.Cout, g.Ho, g.Wo],
          [g.Cout, g.Cin, g.kH, g.kW],
          ...(withBias ? [[g.Cin]] : []),
        ];
        for (
          const [name, f, shapes] of [["conv2d", fwd, cShapes], ["convTranspose2d", tr, tShapes]] as const
        ) {
          const what = `${name} ${JSON.stringify(shapes)} stride ${stride} padding ${padding}`;
          await assertBackendsAgree([gpu, cpu], f, shapes, seed, what, 2e-4);
        }
      },
    ),
    { numRuns: RUNS },
  );
});

gpuTest(
  "conv2d / convTranspose2d ops: sizes where the texture variant is the default match the CPU backend",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    const filled = gpu.counters().textures;
    // Every kernel at over 2^18 multiply-adds (the weight gradients split and summed), odd sizes and strides.
    const cases: [string, (...t: Tensor[]) => Tensor, number[][]][] = [
      ["conv2d", (x, w, b) => conv2d(x, w, b, { padding: 1 }), [[2, 12, 9, 14], [20, 12, 3, 3], [20]]],
      ["conv2d strided", (x, w) => conv2d(x, w, null, { stride: [2, 1], padding: [0, 2] }), [[3, 9, 15, 11], [
        17,
        9,
        3,
        4,
      ]]],
      [
        "convTranspose2d",
        (x, w, b) => convTranspose2d(x, w, b, { stride: 2, padding: 1, outputPadding: 1 }),
        [[2, 16, 10, 9], [16, 12, 3, 3], [12]],
      ],
    ];
    for (const [name, f, shapes] of cases) {
      await assertBackendsAgree([gpu, cpu], f, shapes, 3, name, 5e-4);
    }
    if (gpu.counters().textures === filled) throw new Error("no convolution used the texture variant");
  },
  noTextures,
);

gpuTest("conv2d and convTranspose2d are adjoint: <conv(x), y> = <x, convT(y)>", async () => {
  const gpu = await gpuDevice();
  await fc.assert(
    fc.asyncProperty(geometryArb, seedArb, async (g, seed) => {
      const x = tensor(seededValues(g.N * g.Cin * g.H * g.W, seed), [g.N, g.Cin, g.H, g.W], { device: gpu });
      const y = tensor(seededValues(g.N * g.Cout * g.Ho * g.Wo, seed + 1), [g.N, g.Cout, g.Ho, g.Wo], {
        device: gpu,
      });
      const w = tensor(seededValues(g.Cout * g.Cin * g.kH * g.kW, seed + 2), [g.Cout, g.Cin, g.kH, g.kW], {
        device: gpu,
      });
      const opts = {
        stride: [g.strideH, g.strideW] as [number, number],
        padding: [g.padH, g.padW] as [number, number],
      };
      const outputPadding: [number, number] = [
        g.H - ((g.Ho - 1) * g.strideH - 2 * g.padH + g.kH),
        g.W - ((g.Wo - 1) * g.strideW - 2 * g.padW + g.kW),
      ];
      const cx = await values(conv2d(x, w, null, opts));
      const ty = await values(convTranspose2d(y, w, null, { ...opts, outputPadding }));
      const yv = await values(y), xv = await values(x);
      let lhs = 0, rhs = 0, mag = 0;
      for (let i = 0; i < cx.length; i++) (lhs += cx[i] * yv[i]), (mag += Math.abs(cx[i] * yv[i]));
      for (let i = 0; i < ty.length; i++) rhs += xv[i] * ty[i];
      if (Math.abs(lhs - rhs) > 1e-4 * (mag + 1)) throw new Error(`${JSON.stringify(g)}: ${lhs} vs ${rhs}`);
    }),
    { numRuns: RUNS },
  );
});

gpuTest(
  "conv2d with vector weight loads does not break later small kernels in the same pass (wgpu#7359)",
  async () => {
    const device = await gpuDevice();
    // 4 output channels: the WebGPU path copies the weight for vec4 loads; the device binds ≥ 16 bytes so the next kernel still validates. All
    // inputs are written first, since a write flushes (ends the pass) and would hide the bug.
    const x = tensor(seededValues(2 * 3 * 3, 1), [1, 2, 3, 3], { device });
    const w = tensor(seededValues(4 * 2 * 9, 2), [4, 2, 3, 3], { device });
    const u = tensor([1, 2], [2], { device }), v = tensor([3, 4], [2], { device });
    const y = conv2d(x, w);
    const small = map(bin("add", inp(0), inp(1)), [u, v]);
    assertEquals(Array.from(await values(small)), [4, 6]);
    assertEquals(y.shape, [1, 4, 1, 1]);
  },
);

test("conv2d / convTranspose2d: finite-difference gradient checks", async () => {
  const data = (shape: number[], seed: number) => ({ shape, data: seededValues(size(shape), seed) });
  await gradCheck((x, w, b) => conv2d(x, w, b, { stride: 2, padding: 1 }), [
    data([2, 2, 5, 4], 1),
    data([3, 2, 3, 3], 2),
    data([3], 3),
  ]);
  await gradCheck((x, w) => conv2d(x, w), [data([1, 3, 3, 3], 4), data([2, 3, 1, 1], 5)]); // 1×1
  await gradCheck((x, w, b) => conv2d(x, w, b, { stride: [1, 3], padding: [2, 0] }), [
    data([2, 4, 3], 6), // unbatched
    data([2, 2, 2, 3], 7),
    data([2], 8),
  ]);
  await gradCheck((x, w) => conv2d(x, w, null, { padding: "same" }), [
    data([1, 2, 4, 3], 9),
    data([2, 2, 2, 4], 10),
  ]);
  await gradCheck((x, w, b) => convTranspose2d(x, w, b, { stride: 2, padding: 1, outputPadding: 1 }), [
    data([2, 2, 3, 2], 11),
    data([2, 3, 3, 3], 12),
    data([3], 13),
  ]);
  await gradCheck((x, w) => convTranspose2d(x, w), [data([1, 3, 2, 3], 14), data([3, 2, 2, 1], 15)]);
  await gradCheck((x, w) => convTranspose2d(x, w, null, { stride: [3, 1], padding: [0, 1] }), [
    data([2, 2, 2], 16), // unbatched
    data([2, 1, 4, 3], 17),
  ]);
});

test("conv2d: padding 'same' keeps the size (odd and even kernels) and 'valid' means none", async () => {
  const device = await cpuDevice();
  const x = tensor(seededValues(2 * 5 * 6, 1), [1, 2, 5, 6], { device });
  for (const [kH, kW] of [[3, 3], [2, 4], [1, 5]]) {
    const w = tensor(seededValues(3 * 2 * kH * kW, 2), [3, 2, kH, kW], { device });
    assertEquals(conv2d(x, w, null, { padding: "same" }).shape, [1, 3, 5, 6], `same ${kH}×${kW}`);
    assertEquals(conv2d(x, w, null, { padding: "valid" }).shape, [1, 3, 6 - kH, 7 - kW], `valid ${kH}×${kW}`);
  }
  // Even kernel: PyTorch pads (k−1)//2 on the top/left and the rest on the bottom/right.
  const ones = tensor(new Float32Array(4).fill(1), [1, 1, 2, 2], { device });
  const y = conv2d(tensor([1, 2, 3, 4], [1, 1, 2, 2], { device }), ones, null, { padding: "same" });
  assertEquals(Array.from(await values(y)), [10, 6, 7, 4]);
});

test("conv2d / convTranspose2d: shape errors name the op and the shapes", async () => {
  const device = await cpuDevice();
  const z = (...s: number[]) => tensor(new Float32Array(size(s)), s, { device });
  const expectError = (f: () => unknown, ...parts: string[]) => {
    let message = "";
    try {
      f();
    } catch (e) {
      message = (e as Error).message;
    }
    if (!message) throw new Error(`expected an error mentioning ${parts.join(", ")}`);
    for (const p of parts) {
      if (!message.includes(p)) throw new Error(`error "${message}" does not mention ${p}`);
    }
  };
  expectError(() => conv2d(z(1, 3, 5, 5), z(4, 2, 3, 3)), "conv2d", "[1, 3, 5, 5]", "[4, 2, 3, 3]");
  expectError(() => conv2d(z(1, 3, 5, 5), z(4, 3, 3)), "conv2d", "[4, 3, 3]");
  expectError(() => conv2d(z(3, 5), z(4, 3, 3, 3)), "conv2d", "[3, 5]");
  expectError(() => conv2d(z(1, 3, 2, 2), z(4, 3, 3, 3)), "conv2d", "[1, 3, 2, 2]", "[4, 3, 3, 3]");
  expectError(() => conv2d(z(1, 3, 5, 5), z(4, 3, 3, 3), z(3)), "conv2d", "[3]", "[4, 3, 3, 3]");
  expectError(() => conv2d(z(1, 3, 5, 5), z(4, 3, 3, 3), null, { stride: 0 }), "conv2d", "stride");
  expectError(() => conv2d(z(1, 3, 5, 5), z(4, 3, 3, 3), null, { padding: -1 }), "conv2d", "padding");
  expectError(
    () => conv2d(z(1, 3, 5, 5), z(4, 3, 3, 3), null, { stride: [1, 1, 1] as unknown as [number, number] }),
    "conv2d",
    "stride",
  );
  expectError(
    () => conv2d(z(1, 3, 5, 5), z(4, 3, 3, 3), null, { padding: "same", stride: 2 }),
    "conv2d",
    "same",
  );
  expectError(
    () => convTranspose2d(z(1, 3, 5, 5), z(4, 2, 3, 3)),
    "convTranspose2d",
    "[1, 3, 5, 5]",
    "[4, 2, 3, 3]",
  );
  expectError(
    () => convTranspose2d(z(1, 4, 5, 5), z(4, 2, 3, 3), z(4)),
    "convTranspose2d",
    "[4]",
    "[4, 2, 3, 3]",
  );
  expectError(
    () => convTranspose2d(z(1, 4, 5, 5), z(4, 2, 3, 3), null, { stride: 2, outputPadding: 2 }),
    "convTranspose2d",
    "outputPadding",
  );
  expectError(
    () => convTranspose2d(z(1, 4, 1, 1), z(4, 2, 1, 1), null, { padding: 1 }),
    "convTranspose2d",
    "[1, 4, 1, 1]",
  );
});

gpuTest(
  "conv2dWeightGradSum: WebGPU matches the CPU reference over random sizes (size 1 and odd ones)",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 0, max: 300 }),
        fc.integer({ min: 1, max: 70 }),
        scaleArb,
        seedArb,
        async (splits, A, B, scale, seed) => {
          const a = seededValues(splits * A, seed, -scale, scale),
            b = seededValues(splits * B, seed + 1, -scale, scale);
          const p = { splits, A, B };
          const outs = () => [new Float32Array(A).fill(NaN), new Float32Array(B).fill(NaN)];
          const got = await runOnBuffers(gpu, conv2dWeightGradSum, p, [a, b], outs());
          const want = await runOnBuffers(cpu, conv2dWeightGradSum, p, [a, b], outs());
          const tol = { rtol: 1e-5, atol: 1e-6 * splits * scale };
          assertClose(got[0], want[0], tol, `weight part ${JSON.stringify(p)}`);
          assertClose(got[1], want[1], tol, `bias part ${JSON.stringify(p)}`);
        },
      ),
      { numRuns: RUNS },
    );
  },
);
