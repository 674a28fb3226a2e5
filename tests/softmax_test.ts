/**
 * @file softmax and logSoftmax: forward and backward on WebGPU against the CPU reference for random shapes and
 * any dim (short rows: thread per row; long rows: the workgroup tree, contiguous and interleaved), the kernels in
 * every variant (tree; lanes with vec4 or scalar units, one or several lanes per row, buffer or texture inputs)
 * with masked entries, large and tiny values, −inf entries, hand-computed values, finite-difference gradient checks on dim 0, a middle dim and
 * the last dim, and dim errors; scaled dot-product attention cut into batch chunks (as it is when its scores
 * would exceed a storage binding) against the whole, forward and gradient.
 */

import fc from "fast-check";
import { tensor } from "../engine/creation.ts";
import type { Device } from "../engine/device.ts";
import { logSoftmax, softmax } from "../engine/ops/softmax.ts";
import { packedQkvAttention, scaledDotProductAttention } from "../engine/ops/attention.ts";
import { narrow, reshape, transpose } from "../engine/ops/shape.ts";
import type { Tensor } from "../engine/tensor.ts";
import { softmax as softmaxKernel, softmaxBackward, type SoftmaxParams } from "../kernels/softmax.ts";
import {
  assertBackendsAgree,
  assertClose,
  assertEquals,
  cpuDevice,
  f64Device,
  gpuDevice,
  gpuTest,
  gradCheck,
  runOnBuffers,
  RUNS,
  scaleArb,
  seedArb,
  seededValues,
  size,
  smallGridDevice,
  test,
} from "./util.ts";

const OPS = { softmax, logSoftmax };

/** y and dx (for a fixed cotangent) on one device. */
async function onDevice(
  device: Device,
  op: keyof typeof OPS,
  shape: number[],
  x: ArrayLike<number>,
  dim: number,
  cot: ArrayLike<number>,
): Promise<Float64Array[]> {
  const xt = tensor(x, shape, { device, requiresGrad: true });
  const y = OPS[op](xt, dim);
  const c = tensor(cot, shape, { device });
  y.backward(c);
  const res = [await y.toFloat64Array(), await xt.grad!.toFloat64Array()];
  for (const t of [xt, y, c, xt.grad]) t?.dispose();
  return res;
}

/** A shape, a dim in it (maybe negative), with the softmax dim sometimes long enough for the workgroup tree. */
const caseArb = fc.record({
  outer: fc.array(fc.constantFrom(1, 2, 3, 5), { maxLength: 2 }),
  L: fc.oneof(
    fc.constant(1),
    fc.integer({ min: 1, max: 9 }),
    fc.constantFrom(13, 17),
    fc.integer({ min: 30, max: 700 }),
  ),
  inner: fc.array(fc.constantFrom(1, 2, 3, 7), { maxLength: 2 }),
  negative: fc.boolean(),
  op: fc.constantFrom("softmax" as const, "logSoftmax" as const),
  small: fc.boolean(),
});

gpuTest("softmax/logSoftmax forward and backward over any dim: WebGPU matches CPU reference", async () => {
  await fc.assert(
    fc.asyncProperty(
      caseArb,
      scaleArb,
      seedArb,
      async ({ outer, L, inner, negative, op, small }, scale, seed) => {
        const shape = [...outer, L, ...inner];
        const d = outer.length;
        const dim = negative ? d - shape.length : d;
        const n = size(shape);
        const x = seededValues(n, seed, -scale, scale);
        const cot = seededValues(n, seed + 1);
        const gpu = small ? await smallGridDevice() : await gpuDevice();
        const [y, dx] = await onDevice(gpu, op, shape, x, dim, cot);
        const [yWant, dxWant] = await onDevice(await cpuDevice(), op, shape, x, dim, cot);
        const yTol = op === "softmax" ? { rtol: 1e-4, atol: 1e-6 } : { rtol: 1e-5, atol: 1e-5 };
        assertClose(y, yWant, yTol, `${op} y ${JSON.stringify(shape)} dim ${dim}`);
        assertClose(dx, dxWant, { rtol: 1e-3, atol: 1e-5 }, `${op} dx ${JSON.stringify(shape)} dim ${dim}`);
      },
    ),
    { numRuns: RUNS },
  );
});

/** Runs one kernel with host inputs; returns its output as float64. */
async function runKernel(
  device: Device,
  kernel: typeof softmaxKernel,
  p: SoftmaxParams,
  inputs: ArrayLike<number>[],
) {
  const [out] = await runOnBuffers(device, kernel, p, inputs, [inputs[0].length]);
  return Float64Array.from(out);
}

const kernelCase = fc.record({
  outer: fc.oneof(fc.constant(1), fc.integer({ min: 1, max: 20 }), fc.constantFrom(70, 129)),
  // Multiples of 4 take vec4 units in the lanes variants; long rows with few of them take several lanes.
  L: fc.oneof(
    fc.constant(1),
    fc.integer({ min: 1, max: 9 }),
    fc.constantFrom(4, 64, 129, 260),
    fc.integer({ min: 30, max: 700 }),
  ),
  inner: fc.constantFrom(1, 1, 1, 2, 3),
  log: fc.boolean(),
  variant: fc.constantFrom<SoftmaxParams["variant"]>(undefined, "tree", "lanes", "lanesTexture"),
  masked: fc.boolean(),
  small: fc.boolean(),
});

gpuTest(
  "softmax kernels in every variant (tree, lanes, lanes with textures): WebGPU matches CPU reference",
  async () => {
    await fc.assert(
      fc.asyncProperty(kernelCase, scaleArb, seedArb, async (k, scale, seed) => {
        const { outer, L, inner, log, variant, masked, small } = k;
        const n = outer * L * inner;
        if (n > 60000) return;
        const p: SoftmaxParams = { outer, L, inner, log, variant };
        // Masked: every third element −inf, as attention masks do (never a whole row when L > 1).
        const x = seededValues(n, seed, -scale, scale).map((
          v,
          i,
        ) => (masked && L > 1 && i % 3 === 1 ? -Infinity : v));
        const g = seededValues(n, seed + 1);
        const gpu = small ? await smallGridDevice() : await gpuDevice(), ref = await f64Device();
        const y = await runKernel(gpu, softmaxKernel, p, [x]);
        const yWant = await runKernel(ref, softmaxKernel, p, [x]);
        const yTol = log ? { rtol: 1e-5, atol: 1e-5 } : { rtol: 1e-4, atol: 1e-6 };
        assertClose(y, yWant, yTol, `y ${JSON.stringify(k)}`);
        // The backward from the reference output, so only it is under test.
        const y32 = Float32Array.from(yWant);
        const dx = await runKernel(gpu, softmaxBackward, p, [y32, g]);
        const dxWant = await runKernel(ref, softmaxBackward, p, [y32, g]);
        assertClose(dx, dxWant, { rtol: 1e-3, atol: 1e-5 }, `dx ${JSON.stringify(k)}`);
      }),
      { numRuns: RUNS },
    );
  },
);

gpuTest("softmax matches hand-computed values and sums to one along the dim", async () => {
  const gpu = await gpuDevice();
  const x = tensor([1, 2, 3, 1000, 1000, 1000], [2, 3], { device: gpu });
  const e = [Math.exp(-2), Math.exp(-1), 1], s = e[0] + e[1] + e[2];
  assertClose(await softmax(x).toArray(), [e[0] / s, e[1] / s, e[2] / s, 1 / 3, 1 / 3, 1 / 3], {
    rtol: 1e-6,
  });
  const ls = Math.log(s);
  assertClose(await logSoftmax(x, 1).toArray(), [
    -2 - ls,
    -1 - ls,
    -ls,
    -Math.log(3),
    -Math.log(3),
    -Math.log(3),
  ], {
    rtol: 1e-6,
    atol: 1e-6,
  });
  // Along dim 0 of [2, 3]: columns (1, 1000), (2, 1000), (3, 1000).
  const col = await softmax(x, 0).toArray();
  for (let j = 0; j < 3; j++) assertClose([col[j] + col[3 + j]], [1], { rtol: 1e-6 }, `column ${j} sum`);
  assertClose([col[3]], [1], { rtol: 1e-6 }, "softmax(1, 1000)");
});

gpuTest("softmax treats −inf as zero probability; an all −inf row is NaN as in PyTorch", async () => {
  for (const device of [await gpuDevice(), await cpuDevice()]) {
    for (const L of [4, 300]) {
      // Row 0: −inf first (the running max must not start an inf − inf), then finite values; row 1: all −inf.
      const row0 = Array.from({ length: L }, (_, j) => (j % 2 === 0 ? -Infinity : j / L));
      const row1 = new Array<number>(L).fill(-Infinity);
      const x = tensor([...row0, ...row1], [2, L], { device });
      const y = await softmax(x).toArray();
      const ly = await logSoftmax(x).toArray();
      const finite = row0.filter((v) => v !== -Infinity);
      const m = Math.max(...finite), s = finite.reduce((a, v) => a + Math.exp(v - m), 0);
      const want = row0.map((v) => (v === -Infinity ? 0 : Math.exp(v - m) / s));
      const wantLog = row0.map((v) => (v === -Infinity ? -Infinity : v - m - Math.log(s)));
      const what = `${device.kind} L=${L}`;
      assertClose(y.subarray(0, L), want, { rtol: 1e-5, atol: 1e-7 }, `${what} softmax with −inf`);
      assertClose(ly.subarray(0, L), wantLog, { rtol: 1e-5, atol: 1e-6 }, `${what} logSoftmax with −inf`);
      assertClose(y.subarray(L), new Array<number>(L).fill(NaN), {}, `${what} all −inf row`);
    }
  }
});

test("softmax gradient check on dim 0, a middle dim and the last dim", async () => {
  const shape = [3, 4, 2], n = size(shape);
  for (const dim of [0, 1, -1]) {
    await gradCheck((x) => softmax(x, dim), [{ shape, data: seededValues(n, 10 + dim, -2, 2) }]);
  }
});

test("logSoftmax gradient check on dim 0, a middle dim and the last dim", async () => {
  const shape = [2, 3, 4], n = size(shape);
  for (const dim of [0, 1, 2]) {
    await gradCheck((x) => logSoftmax(x, dim), [{ shape, data: seededValues(n, 20 + dim, -2, 2) }]);
  }
});

test("softmax rejects a dim out of range, naming the dim and the rank", async () => {
  const x = tensor([1, 2, 3, 4, 5, 6], [2, 3], { device: await cpuDevice() });
  for (const [f, dim] of [[softmax, 2], [logSoftmax, -3]] as const) {
    let msg = "";
    try {
      f(x, dim);
    } catch (e) {
      msg = (e as Error).message;
    }
    if (!msg.includes(String(dim)) || !msg.includes("rank 2")) throw new Error(`unexpected error "${msg}"`);
  }
});

test("attention cut into batch chunks equals the whole, forward and float64 gradient", async () => {
  const device = await f64Device();
  // [2, 3] leading dims (6 score matrices of 4×5): pieces of 2 score matrices, and of 1 (odd split 6 = 1·6).
  const [Lq, Lk, E, Ev] = [4, 5, 3, 2];
  const shapes = [[2, 3, Lq, E], [2, 3, Lk, E], [2, 3, Lk, Ev]];
  const inputs = shapes.map((shape, i) => ({ shape, data: seededValues(size(shape), 40 + i, -2, 2) }));
  const [q, k, v] = inputs.map((x) => tensor(x.data, x.shape, { device }));
  const whole = await scaledDotProductAttention(q, k, v).toFloat64Array();
  for (const pieces of [2 * Lq * Lk, 4 * Lq * Lk, Lq * Lk]) {
    const cut = scaledDotProductAttention(q, k, v, { maxScoreElements: pieces });
    assertClose(
      await cut.toFloat64Array(),
      whole,
      { rtol: 1e-12, atol: 1e-12 },
      `pieces of ${pieces} scores`,
    );
  }
  await gradCheck(
    (q, k, v) => scaledDotProductAttention(q, k, v, { maxScoreElements: 2 * Lq * Lk }),
    inputs,
  );
  let msg = "";
  try {
    scaledDotProductAttention(q, k, v, { maxScoreElements: Lq * Lk - 1 });
  } catch (e) {
    msg = (e as Error).message;
  }
  if (!msg.includes("[4, 5]") || !msg.includes("binding limit")) throw new Error(`unexpected error "${msg}"`);
});

gpuTest("attention over a batch whose scores exceed the storage binding limit runs in chunks", async () => {
  const device = await gpuDevice();
  const limit = device.info.limits.maxStorageBufferBindingSize / 4;
  // One head per batch entry at 32×32 positions (1 Mi scores each): just over the binding limit in all.
  const L = 1024, B = Math.floor(limit / (L * L)) + 1;
  const q = tensor(seededValues(B * L * 2, 1), [B, L, 2], { device });
  const out = scaledDotProductAttention(q, q, q);
  const last = await out.toArray();
  // Uniform-ish rows average v: every output lies within v's range.
  if (!last.every((x) => Number.isFinite(x) && Math.abs(x) <= 1)) {
    throw new Error("attention output out of range");
  }
  [q, out].forEach((t) => t.dispose());
});

/** The packed op's meaning spelled out with views and the general op: q, k, v as [B, L, c], out [B, c, L]. */
function packedByViews(qkv: Tensor): Tensor {
  const [B, c, , L] = qkv.shape;
  const part = (i: number) => transpose(reshape(narrow(qkv, 2, i, 1), [B, c, L]), 1, 2);
  return transpose(scaledDotProductAttention(part(0), part(1), part(2)), 1, 2);
}

test("packedQkvAttention equals attention over the sliced q, k, v, forward and float64 gradient", async () => {
  const device = await f64Device();
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 3 }),
      fc.integer({ min: 1, max: 5 }),
      fc.integer({ min: 1, max: 7 }),
      seedArb,
      async (B, c, L, seed) => {
        const shape = [B, c, 3, L];
        const data = seededValues(size(shape), seed, -2, 2);
        const qkv = tensor(data, shape, { device });
        const got = packedQkvAttention(qkv)!;
        assertEquals(got.shape, [B, c, L]);
        assertClose(await got.toFloat64Array(), await packedByViews(qkv).toFloat64Array(), {
          rtol: 1e-12,
          atol: 1e-12,
        }, `B ${B} c ${c} L ${L}`);
        await gradCheck((t) => packedQkvAttention(t)!, [{ shape, data }], { seed });
      },
    ),
    { numRuns: RUNS },
  );
  // A given scale, and null (the caller's cue to cut the batch) when the scores exceed the limit.
  const qkv = tensor(seededValues(2 * 2 * 3 * 4, 3), [2, 2, 3, 4], { device });
  const two = packedQkvAttention(qkv, { scale: 2 })!;
  const part = (i: number) => transpose(reshape(narrow(qkv, 2, i, 1), [2, 2, 4]), 1, 2);
  const want = transpose(scaledDotProductAttention(part(0), part(1), part(2), { scale: 2 }), 1, 2);
  assertClose(
    await two.toFloat64Array(),
    await want.toFloat64Array(),
    { rtol: 1e-12, atol: 1e-12 },
    "scale 2",
  );
  assertEquals(packedQkvAttention(qkv, { maxScoreElements: 2 * 16 - 1 }), null);
  let msg = "";
  try {
    packedQkvAttention(tensor([1, 2, 3], [1, 1, 1, 3], { device }));
  } catch (e) {
    msg = (e as Error).message;
  }
  if (!msg.includes("[B, c, 3, L]") || !msg.includes("[1, 1, 1, 3]")) {
    throw new Error(`unexpected error "${msg}"`);
  }
});

gpuTest("packedQkvAttention on WebGPU matches the CPU backend in values and gradient", async () => {
  const gpu = await gpuDevice(), cpu = await cpuDevice();
  for (const [B, c, L, seed] of [[3, 5, 7, 1], [1, 1, 1, 2], [32, 32, 64, 3], [4, 8, 13, 4]]) {
    await assertBackendsAgree(
      [gpu, cpu],
      (t) => packedQkvAttention(t)!,
      [[B, c, 3, L]],
      seed,
      `B ${B} c ${c} L ${L}`,
    );
  }
});
