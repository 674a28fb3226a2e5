/**
 * @file groupNorm and layerNorm: the row-normalization kernels (forward with its saved mean/rstd, and the dx
 * backward) on WebGPU against the CPU reference over random shapes, including rows of length 1, groups = 1 and
 * groups = C, long rows that take the workgroup-tree path or several lanes per row, every kernel variant
 * (tree, lanes, lanes with texture inputs; vec4 and scalar units), and values offset far from zero (where a
 * one-pass variance fails); the ops' full backward (dx, dweight, dbias) on both backends; finite-difference gradient
 * checks; and shape errors. groupNormSilu (GroupNorm fused with the SiLU after it) the same way: its kernels in
 * every variant against the CPU reference, the op against silu(groupNorm(·)) on both backends through each of
 * its backward paths, finite-difference checks, and its saved tensors freed.
 */

import fc from "fast-check";
import { tensor } from "../engine/creation.ts";
import type { Device } from "../engine/device.ts";
import { groupNorm, groupNormSilu, layerNorm } from "../engine/ops/norm.ts";
import { add, silu } from "../engine/ops/elementwise.ts";
import { conv2d } from "../engine/ops/conv.ts";
import { noGrad, scope, type Tensor } from "../engine/tensor.ts";
import {
  paramGradChunks,
  rowNorm,
  rowNormBackward,
  rowNormParamGrad,
  type RowNormParams,
  rowNormParamSum,
  type RowNormVariant,
  samplesSummedInKernel,
} from "../kernels/norm.ts";
import type { GpuCaps, Kernel } from "../kernels/types.ts";
import { quadBufferElements, type QuadLayout, toQuadBuffer } from "../kernels/layout.ts";
import {
  assertClose,
  assertEquals,
  assertThrows,
  cpuDevice,
  f64Device,
  gpuDevice,
  gpuTest,
  gradCheck,
  noTextureInputs,
  quadLayoutWith,
  quadPaddingArb,
  runOnBuffers,
  RUNS,
  scaleArb,
  seedArb,
  seededValues,
  size,
  smallGridDevice,
  test,
} from "./util.ts";

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** Runs one kernel on a device with host inputs; returns the outputs as float64. */
async function runKernel<P>(
  device: Device,
  kernel: Kernel<P>,
  params: P,
  inputs: ArrayLike<number>[],
  outSizes: (number | ArrayLike<number>)[],
): Promise<Float64Array[]> {
  return (await runOnBuffers(device, kernel, params, inputs, outSizes)).map((o) => Float64Array.from(o));
}

/** What the ops produce on one device: y, and the gradients of x, weight, bias for a fixed cotangent. */
async function normOnDevice(
  device: Device,
  f: (x: Tensor, w: Tensor | null, b: Tensor | null) => Tensor,
  shape: number[],
  x: Float32Array,
  paramShape: number[],
  w: Float32Array | null,
  b: Float32Array | null,
  cot: Float32Array,
): Promise<Float64Array[]> {
  const xt = tensor(x, shape, { device, requiresGrad: true });
  const wt = w && tensor(w, paramShape, { device, requiresGrad: true });
  const bt = b && tensor(b, paramShape, { device, requiresGrad: true });
  const y = f(xt, wt, bt);
  const c = tensor(cot, shape, { device });
  y.backward(c);
  const res = [await y.toFloat64Array(), await xt.grad!.toFloat64Array()];
  if (wt) res.push(await wt.grad!.toFloat64Array());
  if (bt) res.push(await bt.grad!.toFloat64Array());
  for (const t of [xt, wt, bt, y, c, xt.grad, wt?.grad, bt?.grad]) t?.dispose();
  return res;
}

/** Why the tests that need texture inputs are skipped here, or null. */
const noTextures = await noTextureInputs();

const FAKE_CAPS: GpuCaps = {
  description: "llvmpipe",
  isCpuEmulated: true,
  maxWorkgroupsPerDimension: 65535,
  maxStorageBufferBindingSize: 1 << 30,
  features: new Set(),
};

/** Values offset ± scale, the offset far from zero in a third of the cases. */
const valueArb = fc.record({ offset: fc.constantFrom(0, 0, 1000, -1000), scale: scaleArb });

/**
 * Normalized outputs are O(1) (times weight) and the backward scales with rstd, so the tolerance is relative to
 * the largest value. It is the same for rows offset by ±1000: the kernels subtract the row's first element
 * before anything else, so a float32 mean near 1000 (good to ~3e-5 only) never enters x − μ.
 */
function compareAll(got: Float64Array[], want: Float64Array[], what: string[]) {
  got.forEach((g, i) => assertClose(g, want[i], { rtol: 1e-3, atol: 2e-5 * (1 + maxAbs(want[i])) }, what[i]));
}

const groupCase = fc.record({
  N: fc.integer({ min: 1, max: 3 }),
  G: fc.oneof(fc.constant(1), fc.integer({ min: 1, max: 5 })),
  Cg: fc.oneof(fc.constant(1), fc.integer({ min: 1, max: 4 })),
  spatial: fc.oneof(
    fc.array(fc.integer({ min: 1, max: 7 }), { maxLength: 2 }),
    // Long rows: the workgroup-tree path.
    fc.tuple(fc.integer({ min: 5, max: 23 }), fc.integer({ min: 5, max: 31 })),
  ),
  affine: fc.constantFrom("both", "weight", "bias", "none"),
});

gpuTest("groupNorm forward and backward: WebGPU matches CPU reference", async () => {
  await fc.assert(
    fc.asyncProperty(
      groupCase,
      valueArb,
      seedArb,
      async ({ N, G, Cg, spatial, affine }, { offset, scale }, seed) => {
        const C = G * Cg;
        const shape = [N, C, ...spatial];
        const n = size(shape);
        const x = seededValues(n, seed, offset - scale, offset + scale);
        const w = affine === "both" || affine === "weight" ? seededValues(C, seed + 1, 0.5, 1.5) : null;
        const b = affine === "both" || affine === "bias" ? seededValues(C, seed + 2) : null;
        const cot = seededValues(n, seed + 3);
        const f = (xt: Tensor, wt: Tensor | null, bt: Tensor | null) => groupNorm(xt, G, wt, bt);
        const got = await normOnDevice(await gpuDevice(), f, shape, x, [C], w, b, cot);
        const want = await normOnDevice(await cpuDevice(), f, shape, x, [C], w, b, cot);
        compareAll(got, want, ["y", "dx", ...(w ? ["dweight"] : []), ...(b ? ["dbias"] : [])]);
      },
    ),
    { numRuns: RUNS },
  );
});

const layerCase = fc.record({
  lead: fc.array(fc.constantFrom(1, 2, 3, 5, 7), { minLength: 0, maxLength: 2 }),
  norm: fc.oneof(
    fc.array(fc.constantFrom(1, 2, 3, 4, 7), { minLength: 1, maxLength: 2 }),
    fc.tuple(fc.integer({ min: 30, max: 600 })),
  ),
  affine: fc.constantFrom("both", "weight", "bias", "none"),
});

gpuTest("layerNorm forward and backward: WebGPU matches CPU reference", async () => {
  await fc.assert(
    fc.asyncProperty(
      layerCase,
      valueArb,
      seedArb,
      async ({ lead, norm, affine }, { offset, scale }, seed) => {
        const shape = [...lead, ...norm];
        const n = size(shape), k = size(norm);
        const x = seededValues(n, seed, offset - scale, offset + scale);
        const w = affine === "both" || affine === "weight" ? seededValues(k, seed + 1, 0.5, 1.5) : null;
        const b = affine === "both" || affine === "bias" ? seededValues(k, seed + 2) : null;
        const cot = seededValues(n, seed + 3);
        const f = (xt: Tensor, wt: Tensor | null, bt: Tensor | null) => layerNorm(xt, norm, wt, bt);
        const got = await normOnDevice(await gpuDevice(), f, shape, x, norm, w, b, cot);
        const want = await normOnDevice(await cpuDevice(), f, shape, x, norm, w, b, cot);
        compareAll(got, want, ["y", "dx", ...(w ? ["dweight"] : []), ...(b ? ["dbias"] : [])]);
      },
    ),
    { numRuns: RUNS },
  );
});

/** Kernel-level cases: any channel mapping, the saved statistics, and the backward kernels. */
const kernelCase = fc.record({
  outer: fc.oneof(fc.constant(1), fc.integer({ min: 1, max: 20 }), fc.constantFrom(70, 129)),
  groups: fc.integer({ min: 1, max: 4 }),
  channelsPerGroup: fc.integer({ min: 1, max: 4 }),
  spatial: fc.oneof(fc.constant(1), fc.integer({ min: 1, max: 9 }), fc.constantFrom(64, 129)),
  hasWeight: fc.boolean(),
  hasBias: fc.boolean(),
  eps: fc.constantFrom(1e-5, 1e-3, 0.1),
  chunkRows: fc.integer({ min: 1, max: 9 }),
  variant: fc.constantFrom<RowNormVariant | undefined>(undefined, "tree", "lanes", "lanesTexture"),
});

gpuTest(
  "rowNorm kernels (y, stats, dx, dweight/dbias partials) in every variant: WebGPU matches CPU reference, also on a 2-D grid",
  async () => {
    await fc.assert(
      fc.asyncProperty(
        kernelCase,
        valueArb,
        seedArb,
        fc.boolean(),
        async (k, { offset, scale }, seed, small) => {
          const { outer, groups, channelsPerGroup, spatial, chunkRows } = k;
          const rows = outer * groups, cols = channelsPerGroup * spatial, C = groups * channelsPerGroup;
          const n = rows * cols;
          if (n > 40000) return;
          const p: RowNormParams = { ...k, rows };
          const x = seededValues(n, seed, offset - scale, offset + scale);
          const w = seededValues(C, seed + 1, -2, 2), b = seededValues(C, seed + 2);
          const g = seededValues(n, seed + 3);
          const ins = [x, ...(k.hasWeight ? [w] : []), ...(k.hasBias ? [b] : [])];
          const sizes = [n, rows, rows];
          const gpu = small ? await smallGridDevice() : await gpuDevice();
          const ref = await f64Device();
          const got = await runKernel(gpu, rowNorm, p, ins, sizes);
          const want = await runKernel(ref, rowNorm, p, ins, sizes);
          const rel = 2e-5;
          assertClose(got[0], want[0], { rtol: 1e-3, atol: rel * (1 + maxAbs(want[0])) }, "y");
          assertClose(got[1], want[1], { rtol: 1e-5, atol: 1e-6 * scale }, "shifted mean");
          assertClose(got[2], want[2], { rtol: 1e-4 }, "rstd");
          // The backward kernels from the reference statistics, so only they are under test.
          const stats = [Float32Array.from(want[1]), Float32Array.from(want[2])];
          const bins = [x, g, ...stats, ...(k.hasWeight ? [w] : [])];
          const [dxGot] = await runKernel(gpu, rowNormBackward, p, bins, [n]);
          const [dxWant] = await runKernel(ref, rowNormBackward, p, bins, [n]);
          assertClose(dxGot, dxWant, { rtol: 1e-3, atol: rel * (1 + maxAbs(dxWant)) }, "dx");
          // dx with the per-sample partials from the same pass, and their sum over the samples.
          const fp = { ...p, paramPartials: true };
          const fused = [n, outer * C, outer * C, C, C];
          const fGot = await runKernel(gpu, rowNormBackward, fp, bins, fused);
          const fWant = await runKernel(ref, rowNormBackward, fp, bins, fused);
          assertClose(
            fGot[0],
            dxWant,
            { rtol: 1e-3, atol: rel * (1 + maxAbs(dxWant)) },
            "dx (with partials)",
          );
          assertClose(
            fGot[1],
            fWant[1],
            { rtol: 1e-3, atol: 1e-5 * (1 + maxAbs(fWant[1])) },
            "Σ g·x̂ per sample",
          );
          assertClose(
            fGot[2],
            fWant[2],
            { rtol: 1e-4, atol: 1e-5 * (1 + maxAbs(fWant[2])) },
            "Σ g per sample",
          );
          // The sums over the samples: from the kernel where it makes them, else from rowNormParamSum.
          const sums = [Float32Array.from(fWant[1]), Float32Array.from(fWant[2])];
          const sp = { chunks: outer, channels: C };
          const sGot = samplesSummedInKernel(p)
            ? fGot.slice(3)
            : await runKernel(gpu, rowNormParamSum, sp, sums, [C, C]);
          const sWant = fWant.slice(3);
          sGot.forEach((v, i) =>
            assertClose(v, sWant[i], { rtol: 1e-4, atol: 1e-5 * (1 + maxAbs(sWant[i])) }, "sums")
          );
          // The small-grid device has 16×16 workgroups: one per (chunk, channel) must fit.
          const pp = { ...p, chunkRows: Math.max(chunkRows, Math.ceil((outer * C) / 256)) };
          const partial = paramGradChunks(pp) * C;
          const pGot = await runKernel(gpu, rowNormParamGrad, pp, [x, g, ...stats], [partial, partial]);
          const pWant = await runKernel(ref, rowNormParamGrad, pp, [x, g, ...stats], [partial, partial]);
          assertClose(
            pGot[0],
            pWant[0],
            { rtol: 1e-3, atol: 1e-5 * (1 + maxAbs(pWant[0])) },
            "dweight partials",
          );
          assertClose(
            pGot[1],
            pWant[1],
            { rtol: 1e-4, atol: 1e-5 * (1 + maxAbs(pWant[1])) },
            "dbias partials",
          );
        },
      ),
      { numRuns: RUNS },
    );
  },
);

gpuTest(
  "rowNorm with silu (forward, pre-activation, dx and partials from g·silu'(pre)) in every variant: WebGPU matches CPU reference",
  async () => {
    await fc.assert(
      fc.asyncProperty(
        kernelCase,
        valueArb,
        seedArb,
        fc.boolean(),
        async (k, { offset, scale }, seed, small) => {
          const { outer, groups, channelsPerGroup, spatial } = k;
          const rows = outer * groups, cols = channelsPerGroup * spatial, C = groups * channelsPerGroup;
          const n = rows * cols;
          if (n > 40000) return;
          const p: RowNormParams = { ...k, rows, silu: true, savePre: true };
          const x = seededValues(n, seed, offset - scale, offset + scale);
          const w = seededValues(C, seed + 1, -2, 2), b = seededValues(C, seed + 2, -2, 2);
          const g = seededValues(n, seed + 3);
          const params = [...(k.hasWeight ? [w] : []), ...(k.hasBias ? [b] : [])];
          const gpu = small ? await smallGridDevice() : await gpuDevice();
          const ref = await f64Device();
          const sizes = [n, rows, rows, n];
          const got = await runKernel(gpu, rowNorm, p, [x, ...params], sizes);
          const want = await runKernel(ref, rowNorm, p, [x, ...params], sizes);
          const rel = 2e-5;
          assertClose(got[0], want[0], { rtol: 1e-3, atol: rel * (1 + maxAbs(want[0])) }, "silu(y)");
          assertClose(got[3], want[3], { rtol: 1e-3, atol: rel * (1 + maxAbs(want[3])) }, "pre-activation");
          // The plain kernel's y is the pre-activation.
          const plain = await runKernel(ref, rowNorm, { ...p, silu: false }, [x, ...params], [n, rows, rows]);
          assertClose(want[3], plain[0], { rtol: 1e-12, atol: 1e-12 }, "pre = plain y");
          assertClose(want[0], Array.from(plain[0], (v) => v / (1 + Math.exp(-v))), {
            rtol: 1e-12,
            atol: 1e-12,
          });
          // dx and the partials with silu equal the plain backward on g·silu'(pre).
          const stats = [Float32Array.from(want[1]), Float32Array.from(want[2])];
          const gy = Float32Array.from(want[3], (v, i) => {
            const s = 1 / (1 + Math.exp(-v));
            return g[i] * s * (1 + v * (1 - s));
          });
          const bp = { ...p, hasBias: k.hasBias };
          const bins = [x, g, ...stats, ...params];
          const plainIns = [x, gy, ...stats, ...(k.hasWeight ? [w] : [])];
          for (const paramPartials of [false, true]) {
            const outs = paramPartials ? [n, outer * C, outer * C, C, C] : [n];
            const sp = { ...bp, paramPartials };
            const bGot = await runKernel(gpu, rowNormBackward, sp, bins, outs);
            const bWant = await runKernel(ref, rowNormBackward, sp, bins, outs);
            const bPlain = await runKernel(ref, rowNormBackward, { ...sp, silu: false }, plainIns, outs);
            const what = ["dx", "Σ g·x̂ per sample", "Σ g per sample", "dweight", "dbias"];
            const checked = paramPartials && !samplesSummedInKernel(p) ? 3 : outs.length;
            for (let i = 0; i < checked; i++) {
              const tol = { rtol: 1e-3, atol: 1e-5 * (1 + maxAbs(bWant[i])) };
              assertClose(bGot[i], bWant[i], tol, `${what[i]}${paramPartials ? " (with partials)" : ""}`);
              assertClose(bWant[i], bPlain[i], tol, `${what[i]}: reference vs plain backward on g·silu'`);
            }
          }
        },
      ),
      { numRuns: RUNS },
    );
  },
);

/**
 * groupNormSilu against silu(groupNorm(·)) on one device, for the gradients the case asks for: x and/or the
 * affine parameters, which take different backward paths (silu' in the dx kernel, or a saved pre-activation).
 */
async function siluCase(
  device: Device,
  fused: boolean,
  shape: number[],
  G: number,
  x: Float32Array,
  w: Float32Array | null,
  b: Float32Array | null,
  cot: Float32Array,
  grads: { x: boolean; params: boolean },
): Promise<Float64Array[]> {
  const C = shape[1];
  const xt = tensor(x, shape, { device, requiresGrad: grads.x });
  const wt = w && tensor(w, [C], { device, requiresGrad: grads.params });
  const bt = b && tensor(b, [C], { device, requiresGrad: grads.params });
  const y = fused ? groupNormSilu(xt, G, wt, bt) : silu(groupNorm(xt, G, wt, bt));
  const c = tensor(cot, shape, { device });
  y.backward(c);
  const res = [await y.toFloat64Array()];
  for (const t of [xt, wt, bt]) if (t?.grad) res.push(await t.grad.toFloat64Array());
  for (const t of [xt, wt, bt, y, c, xt.grad, wt?.grad, bt?.grad]) t?.dispose();
  return res;
}

gpuTest(
  "groupNormSilu equals silu(groupNorm) in value and gradients (x, weight, bias; each backward path), both backends",
  async () => {
    await fc.assert(
      fc.asyncProperty(
        groupCase,
        fc.constantFrom({ x: true, params: true }, { x: true, params: false }, { x: false, params: true }),
        valueArb,
        seedArb,
        async ({ N, G, Cg, spatial, affine }, grads, { offset, scale }, seed) => {
          if (!grads.x && (affine === "none")) return;
          const C = G * Cg;
          const shape = [N, C, ...spatial];
          const n = size(shape);
          const x = seededValues(n, seed, offset - scale, offset + scale);
          const w = affine === "both" || affine === "weight" ? seededValues(C, seed + 1, 0.5, 1.5) : null;
          const b = affine === "both" || affine === "bias" ? seededValues(C, seed + 2, -2, 2) : null;
          const cot = seededValues(n, seed + 3);
          const names = ["y", ...(grads.x ? ["dx"] : []), ...(grads.params && w ? ["dweight"] : [])];
          if (grads.params && b) names.push("dbias");
          for (const device of [await gpuDevice(), await cpuDevice()]) {
            const got = await siluCase(device, true, shape, G, x, w, b, cot, grads);
            const want = await siluCase(device, false, shape, G, x, w, b, cot, grads);
            compareAll(got, want, names.map((s) => `${device.kind} ${s}`));
          }
        },
      ),
      { numRuns: RUNS },
    );
  },
);

gpuTest(
  "rowNorm with quadOut (the convolution's padded channel-quad layout, borders and row ends zeroed) in every variant: WebGPU matches CPU reference",
  async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          N: fc.integer({ min: 1, max: 3 }),
          G: fc.integer({ min: 1, max: 4 }),
          Cg: fc.constantFrom(4, 8),
          H: fc.integer({ min: 1, max: 7 }),
          W: fc.constantFrom(4, 8, 12),
          pad: quadPaddingArb,
          affine: fc.constantFrom("both", "weight", "bias", "none"),
          silu: fc.boolean(),
          variant: fc.constantFrom<RowNormVariant>("lanes", "lanesTexture", "tree"),
        }),
        valueArb,
        seedArb,
        fc.boolean(),
        async (k, { offset, scale }, seed, small) => {
          const { N, G, Cg, H, W } = k, C = G * Cg, n = N * C * H * W;
          const quadOut = quadLayoutWith([N, C, H, W], k.pad);
          const hasWeight = k.affine === "both" || k.affine === "weight";
          const hasBias = k.affine === "both" || k.affine === "bias";
          const p: RowNormParams = {
            rows: N * G,
            groups: G,
            channelsPerGroup: Cg,
            spatial: H * W,
            hasWeight,
            hasBias,
            eps: 1e-5,
            silu: k.silu,
            variant: k.variant,
            quadOut,
          };
          const x = seededValues(n, seed, offset - scale, offset + scale);
          const ins = [
            x,
            ...(hasWeight ? [seededValues(C, seed + 1, -2, 2)] : []),
            ...(hasBias ? [seededValues(C, seed + 2)] : []),
          ];
          // NaN-filled outputs: every border texel and row end must be written.
          const y0 = new Float32Array(quadBufferElements(quadOut)).fill(NaN);
          const outs = [y0, N * G, N * G];
          const gpu = small ? await smallGridDevice() : await gpuDevice();
          const got = await runKernel(gpu, rowNorm, p, ins, outs);
          const want = await runKernel(await f64Device(), rowNorm, p, ins, outs);
          assertClose(got[0], want[0], { rtol: 1e-3, atol: 2e-5 * (1 + maxAbs(want[0])) }, "y (quad layout)");
          // The row-major forward, placed in the layout on the host, agrees too.
          const [flat] = await runKernel(gpu, rowNorm, { ...p, quadOut: undefined }, ins, [n, N * G, N * G]);
          const placed = new Float64Array(y0.length);
          toQuadBuffer(quadOut, flat, placed);
          assertClose(
            got[0],
            placed,
            { rtol: 1e-6, atol: 1e-6 },
            "y (quad layout) against the row-major forward",
          );
          assertClose(got[2], want[2], { rtol: 1e-4 }, "rstd");
        },
      ),
      { numRuns: RUNS },
    );
  },
);

test("rowNorm quadOut errors name the layout that does not fit", () => {
  const p: RowNormParams = {
    rows: 2,
    groups: 1,
    channelsPerGroup: 4,
    spatial: 12,
    hasWeight: false,
    hasBias: false,
    eps: 1e-5,
  };
  const l: QuadLayout = { N: 2, C: 4, H: 2, W: 6, top: 1, left: 1, Hp: 4, Wp: 8 };
  for (const quadOut of [l, { ...l, W: 4, H: 3, C: 8 }]) {
    assertThrows(
      () => rowNorm.gpu({ ...p, quadOut }, FAKE_CAPS),
      "rowNorm: quadOut",
      "needs channelsPerGroup and W multiples of 4",
    );
  }
});

gpuTest(
  "groupNorm(Silu) → conv2d: the conv takes the norm's output in its packed layout (one packing pass fewer); values, every gradient and the output read back match the CPU backend",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    // [x shape, groups, silu, conv out channels, stride, packs saved]; W % 4 ≠ 0 is not deferred.
    const cases: [number[], number, boolean, number, number, number][] = [
      [[2, 16, 8, 16], 4, true, 16, 1, 1],
      [[2, 32, 8, 8], 4, false, 48, 2, 1],
      [[1, 16, 12, 12], 2, true, 24, 1, 1],
      [[2, 16, 6, 6], 4, true, 48, 1, 0],
    ];
    for (const [shape, G, withSilu, Cout, stride, saved] of cases) {
      const C = shape[1], n = size(shape);
      const data = {
        x: seededValues(n, 1, -2, 2),
        nw: seededValues(C, 2, 0.5, 1.5),
        nb: seededValues(C, 3, -1, 1),
        cw: seededValues(Cout * C * 9, 4, -0.2, 0.2),
        cb: seededValues(Cout, 5, -1, 1),
      };
      // `viaCopy` puts a computed elementwise copy between norm and conv: the conv then packs its input itself.
      const run = async (device: Device, viaCopy: boolean) => {
        const t = (v: Float32Array, s: number[]) => tensor(v, s, { device, requiresGrad: true });
        const x = t(data.x, shape), nw = t(data.nw, [C]), nb = t(data.nb, [C]);
        const cw = t(data.cw, [Cout, C, 3, 3]), cb = t(data.cb, [Cout]);
        const packs0 = device.counters().packs ?? 0;
        const h = (withSilu ? groupNormSilu : groupNorm)(x, G, nw, nb, 1e-5);
        const copied = viaCopy ? add(h, 0) : h;
        if (viaCopy) copied.realize();
        const y = conv2d(copied, cw, cb, { stride, padding: 1 });
        y.backward(tensor(seededValues(y.size, 6), y.shape, { device }));
        // An in-place update of the norm's weight (as an optimizer step) leaves h as it was computed.
        device.write(nw.mutableStorage, new Float32Array(C));
        const out = [y, h, x.grad!, nw.grad!, nb.grad!, cw.grad!, cb.grad!];
        const values = await Promise.all(out.map((v) => v.toFloat64Array()));
        const packs = (device.counters().packs ?? 0) - packs0;
        for (const v of [...out, x, nw, nb, cw, cb]) v.dispose();
        return { values, packs };
      };
      const what = `[${shape}] G ${G} silu ${withSilu} → ${Cout} stride ${stride}`;
      const got = await run(gpu, false), viaCopy = await run(gpu, true), want = await run(cpu, false);
      const names = ["y", "norm output", "dx", "dnorm.weight", "dnorm.bias", "dconv.weight", "dconv.bias"];
      compareAll(got.values, want.values, names.map((s) => `${s} ${what}`));
      assertEquals(viaCopy.packs - got.packs, saved, `packing passes saved ${what}`);
    }
  },
  noTextures,
);

test("groupNormSilu gradient check (float64): silu' in the dx kernel (spatial ≥ 16) and from the saved pre-activation", async () => {
  const wb = (C: number) => [
    { shape: [C], data: seededValues(C, 2, 0.5, 1.5) },
    { shape: [C], data: seededValues(C, 3, -1, 1) },
  ];
  // 4×4 spatial: the fused partials path with silu in the kernel; 3 spatial: the saved pre-activation.
  for (const shape of [[2, 4, 4, 4], [2, 4, 3]]) {
    const n = size(shape);
    const inputs = [{ shape, data: seededValues(n, 1, -2, 2) }, ...wb(4)];
    await gradCheck((x, w, b) => groupNormSilu(x, 2, w, b), inputs);
    // x alone (dx kernel with silu, no parameter gradients) and the parameters alone (saved pre-activation).
    await gradCheck((x, w, b) => groupNormSilu(x, 2, w, b), inputs, { wrt: [0] });
    await gradCheck((x, w, b) => groupNormSilu(x, 4, w, b), inputs, { wrt: [1, 2] });
  }
  const shape = [1, 3, 4, 5], n = size(shape);
  await gradCheck((x) => groupNormSilu(x, 1), [{ shape, data: seededValues(n, 9, -1, 1) }]);
});

test("groupNormSilu frees its saved statistics and pre-activation after backward and under noGrad", async () => {
  const device = await cpuDevice();
  const before = device.memory().liveAllocations;
  for (const shape of [[2, 4, 3], [2, 4, 4, 4]]) {
    const n = size(shape);
    scope(() => {
      // x without a gradient: the parameter gradients come from g·silu'(pre), so the forward saves pre.
      const x = tensor(seededValues(n, 1), shape, { device });
      const w = tensor([1, 2, 3, 4], [4], { device, requiresGrad: true });
      const b = tensor([0, 1, 0, -1], [4], { device, requiresGrad: true });
      groupNormSilu(x, 2, w, b).backward(tensor(seededValues(n, 2), shape, { device }));
      // Left alive: x, w, b, their two grads, y and the cotangent until the scope ends; nothing else.
      const live = device.memory().liveAllocations - before;
      if (live !== 7) throw new Error(`${live} live allocations after backward, expected 7`);
      w.grad!.dispose();
      b.grad!.dispose();
    });
  }
  noGrad(() => {
    const x = tensor(seededValues(24, 1), [2, 4, 3], { device, requiresGrad: true });
    groupNormSilu(x, 2).dispose();
    x.dispose();
  });
  const after = device.memory().liveAllocations;
  if (after !== before) throw new Error(`${after - before} allocations leaked`);
});

gpuTest("groupNorm is stable when |mean| ≫ std (values 1000 + noise)", async () => {
  const shape = [2, 8, 16, 16], n = size(shape);
  const x = seededValues(n, 11, -0.01, 0.01).map((v) => 1000 + v);
  const gpu = await gpuDevice(), ref = await f64Device();
  const got = await groupNorm(tensor(x, shape, { device: gpu }), 4).toFloat64Array();
  const want = await groupNorm(tensor(x, shape, { device: ref }), 4).toFloat64Array();
  // The normalized values have unit variance. A one-pass E[x²] − E[x]² in float32 is off by O(1) here, and even
  // x − μ with μ rounded to float32 (±3e-5 near 1000, std ≈ 0.006) would be off by ~5e-3.
  assertClose(got, want, { rtol: 0, atol: 1e-3 }, "groupNorm(1000 + noise)");
});

gpuTest("groupNorm with groups = C and 1×1 spatial (rows of length 1) gives the bias", async () => {
  const gpu = await gpuDevice();
  const x = tensor([3, -1, 7, 2, 5, 0], [2, 3], { device: gpu });
  const w = tensor([2, 2, 2], [3], { device: gpu }), b = tensor([0.5, -1, 4], [3], { device: gpu });
  assertClose(await groupNorm(x, 3, w, b).toArray(), [0.5, -1, 4, 0.5, -1, 4], {}, "groupNorm L = 1");
  const col = tensor([3, -1], [2, 1], { device: gpu });
  const lb = tensor([0.25], [1], { device: gpu });
  assertClose(await layerNorm(col, [1], null, lb).toArray(), [0.25, 0.25], {}, "layerNorm L = 1");
});

gpuTest("layerNorm matches hand-computed values", async () => {
  const gpu = await gpuDevice();
  // Row [1, 2, 3, 4]: mean 2.5, biased variance 1.25.
  const x = tensor([1, 2, 3, 4, -2, 0, 2, 4], [2, 4], { device: gpu });
  const r = 1 / Math.sqrt(1.25 + 1e-5), r2 = 1 / Math.sqrt(5 + 1e-5);
  const want = [-1.5 * r, -0.5 * r, 0.5 * r, 1.5 * r, -3 * r2, -1 * r2, 1 * r2, 3 * r2];
  assertClose(await layerNorm(x, 4).toArray(), want, { rtol: 1e-5, atol: 1e-6 });
});

test("groupNorm gradient check (x, weight, bias)", async () => {
  const shape = [2, 4, 3], n = size(shape);
  await gradCheck((x, w, b) => groupNorm(x, 2, w, b), [
    { shape, data: seededValues(n, 1, -2, 2) },
    { shape: [4], data: seededValues(4, 2, 0.5, 1.5) },
    { shape: [4], data: seededValues(4, 3) },
  ]);
});

test("groupNorm gradient check: groups = 1 and groups = C, no affine, spatial rank 2", async () => {
  const shape = [1, 3, 2, 2], n = size(shape);
  for (const G of [1, 3]) {
    await gradCheck((x) => groupNorm(x, G), [{ shape, data: seededValues(n, 4 + G, -1, 1) }]);
  }
});

test("layerNorm gradient check (x, weight, bias) over two trailing dims", async () => {
  const shape = [3, 2, 3], n = size(shape);
  await gradCheck((x, w, b) => layerNorm(x, [2, 3], w, b, 1e-3), [
    { shape, data: seededValues(n, 5, -2, 2) },
    { shape: [2, 3], data: seededValues(6, 6, 0.5, 1.5) },
    { shape: [2, 3], data: seededValues(6, 7) },
  ]);
  await gradCheck((x) => layerNorm(x, 3), [{ shape, data: seededValues(n, 8, -1, 1) }]);
});

test("groupNorm/layerNorm shape errors name both numbers or shapes", async () => {
  const device = await cpuDevice();
  const x = tensor(seededValues(2 * 6 * 4, 1), [2, 6, 4], { device });
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
  expectError(() => groupNorm(x, 4), "groupNorm", "6", "4");
  expectError(() => groupNorm(x, 3, tensor([1, 1, 1], [3], { device })), "groupNorm", "[3]", "[6]");
  expectError(() => layerNorm(x, [5, 4]), "layerNorm", "[5, 4]", "[2, 6, 4]");
  expectError(() => layerNorm(x, [2, 2, 6, 4]), "layerNorm", "[2, 2, 6, 4]", "[2, 6, 4]");
  expectError(() => layerNorm(x, 4, tensor([1, 1], [2], { device })), "layerNorm", "[2]", "[4]");
  expectError(() => groupNorm(tensor([1, 2], [2], { device }), 1), "groupNorm", "[2]");
});

test("groupNorm frees its saved statistics after backward and under noGrad", async () => {
  const device = await cpuDevice();
  const shape = [2, 4, 3];
  const before = device.memory().liveAllocations;
  const grads = scope(() => {
    const x = tensor(seededValues(24, 1), shape, { device, requiresGrad: true });
    const w = tensor([1, 2, 3, 4], [4], { device, requiresGrad: true });
    const y = groupNorm(x, 2, w);
    y.backward(tensor(seededValues(24, 2), shape, { device }));
    // Left alive: x, w, their grads, y, and the cotangent until the scope ends; nothing else.
    const live = device.memory().liveAllocations - before;
    if (live !== 6) throw new Error(`${live} live allocations after backward, expected 6`);
    return [x.grad!, w.grad!];
  });
  grads.forEach((g) => g.dispose());
  noGrad(() => {
    const x = tensor(seededValues(24, 1), shape, { device });
    groupNorm(x, 2).dispose();
    x.dispose();
  });
  const after = device.memory().liveAllocations;
  if (after !== before) throw new Error(`${after - before} allocations leaked`);
});
