/**
 * @file Reductions (sum, mean, amax over any dims, keepdim; every kernel variant: generic, lanes,
 * lanesTexture, rows and columns, vec4 and scalar units) and shape ops (reshape, permute, transpose, narrow, cat,
 * expand) on WebGPU against the CPU reference, with gradient checks.
 */

import fc from "fast-check";
import { tensor } from "../engine/creation.ts";
import * as R from "../engine/ops/reduce.ts";
import {
  laneLayout,
  reduce,
  type ReduceOp,
  type ReduceParams,
  type ReduceVariant,
} from "../kernels/reduce.ts";
import * as S from "../engine/ops/shape.ts";
import type { Tensor } from "../engine/tensor.ts";
import type { Device } from "../engine/device.ts";
import {
  assertClose,
  assertEquals,
  cpuDevice,
  gpuDevice,
  gpuTest,
  gradCheck,
  RUNS,
  scaleArb,
  seedArb,
  seededValues,
  shapeArb,
  size,
  smallGridDevice,
  test,
} from "./util.ts";

const VARIANTS: ReduceVariant[] = ["generic", "lanes", "lanesTexture"];

/** The reduce kernel run directly with a chosen variant on `device`, and its CPU reference. */
async function kernelBoth(
  device: Device,
  p: ReduceParams,
  data: Float32Array,
): Promise<[Float32Array, Float32Array]> {
  const nOut = p.shape.reduce((acc, d, i) => (p.axes.includes(i) ? acc : acc * d), 1);
  const x = device.alloc(data.length), out = device.alloc(nOut);
  device.write(x, data);
  device.run(reduce, p, [x], [out]);
  const got = Float32Array.from(await device.read(out));
  device.release(x);
  device.release(out);
  const want = new Float32Array(nOut);
  reduce.cpu(p, [data], [want]);
  return [got, want];
}

/**
 * Absolute tolerance of a float32 sum of n values uniform in [−scale, scale]: 1e-5 of the sum's typical size
 * (scale·√n). A fixed `1e-5·scale` fails on cancellation: a full sum of 19712 values near 1e-3 landed at −0.001
 * and two correct summation orders differed by 2.7e-8 (CI, seed-dependent).
 */
function sumAtol(shape: readonly number[], axes: readonly number[], scale: number, op: string): number {
  const n = axes.reduce((acc, a) => acc * shape[a < 0 ? a + shape.length : a], 1);
  if (op === "sum") return 1e-5 * scale * Math.sqrt(n);
  if (op === "mean") return 1e-5 * scale / Math.sqrt(n);
  return 1e-5 * scale;
}

/** A dim of an [A, P, K, Q] reduction: 1, below a vec4, odd, prime, or a multiple of 4 (vec4 units). */
const pkqDim = fc.oneof(
  fc.constantFrom(1, 2, 3, 5, 13),
  fc.integer({ min: 1, max: 40 }),
  fc.integer({ min: 1, max: 12 }).map((d) => 4 * d),
);

async function both(
  shape: number[],
  data: Float32Array,
  f: (x: Tensor) => Tensor,
  gpu?: Device,
): Promise<[Float32Array, Float32Array, readonly number[]]> {
  const out: Float32Array[] = [];
  let outShape: readonly number[] = [];
  for (const device of [gpu ?? await gpuDevice(), await cpuDevice()]) {
    const x = tensor(data, shape, { device });
    const y = f(x);
    outShape = y.shape;
    out.push(await y.toArray());
    x.dispose();
    y.dispose();
  }
  return [out[0], out[1], outShape];
}

/** A shape plus a random subset of its axes (possibly negative) and keepdim. */
const reduceCase = shapeArb(1, 5, 8).chain((shape) =>
  fc.tuple(
    fc.constant(shape),
    fc.subarray(shape.map((_, i) => i), { minLength: 1 }),
    fc.boolean(),
    fc.boolean(),
  )
);

for (const op of ["sum", "mean", "amax"] as const) {
  gpuTest(`${op} over random dims: WebGPU matches CPU reference`, async () => {
    await fc.assert(
      fc.asyncProperty(
        reduceCase,
        seedArb,
        scaleArb,
        async ([shape, axes, keepdim, negative], seed, scale) => {
          const dims = negative ? axes.map((a) => a - shape.length) : axes;
          const data = seededValues(size(shape), seed, -scale, scale);
          const [g, c, outShape] = await both(shape, data, (x) => R[op](x, dims, keepdim));
          const want = keepdim
            ? shape.map((d, i) => (axes.includes(i) ? 1 : d))
            : shape.filter((_, i) => !axes.includes(i));
          if (outShape.join() !== want.join()) {
            throw new Error(`${op}: shape [${outShape}], expected [${want}]`);
          }
          assertClose(g, c, { rtol: 1e-5, atol: sumAtol(shape, axes, scale, op) }, op);
        },
      ),
      { numRuns: RUNS },
    );
  });
}

gpuTest(
  "every kernel variant over random dims matches the CPU reference (others fall back to generic)",
  async () => {
    const device = await gpuDevice();
    await fc.assert(
      fc.asyncProperty(
        reduceCase,
        fc.constantFrom<ReduceOp>("sum", "max"),
        seedArb,
        scaleArb,
        async ([shape, axes], op, seed, scale) => {
          const data = seededValues(size(shape), seed, -scale, scale);
          for (const variant of VARIANTS) {
            const [g, c] = await kernelBoth(device, { op, shape, axes, variant }, data);
            const tol = op === "max"
              ? { rtol: 0, atol: 0 }
              : { rtol: 1e-5, atol: sumAtol(shape, axes, scale, op) };
            assertClose(g, c, tol, `${op} of [${shape}] over [${axes}], ${variant}`);
          }
        },
      ),
      { numRuns: RUNS },
    );
  },
);

gpuTest(
  "[A, P, K, Q] layouts: every variant matches the CPU reference (rows, columns, both, full, middle dims; vec4 and scalar units)",
  async () => {
    const device = await gpuDevice();
    await fc.assert(
      fc.asyncProperty(
        pkqDim,
        pkqDim,
        pkqDim,
        fc.constantFrom<ReduceOp>("sum", "max"),
        seedArb,
        fc.constantFrom(1, 1e-3, 30, 1e-30, 1e30),
        fc.constantFrom(1, 2, 3),
        async (P, K, Q, op, seed, scale, A) => {
          const data = seededValues(A * P * K * Q, seed, -scale, scale);
          for (const axes of [[1, 3], [3], [1], [0, 1, 2, 3]]) {
            for (const variant of VARIANTS) {
              const [g, c] = await kernelBoth(device, { op, shape: [A, P, K, Q], axes, variant }, data);
              const shape = [A, P, K, Q];
              const tol = op === "max"
                ? { rtol: 0, atol: 0 }
                : { rtol: 1e-5, atol: sumAtol(shape, axes, scale, op) };
              assertClose(g, c, tol, `${op} of [${A}, ${P}, ${K}, ${Q}] over [${axes}], ${variant}`);
            }
          }
        },
      ),
      { numRuns: RUNS },
    );
  },
);

test("laneLayout: which reductions are [A, P, K, Q] views", () => {
  const view = (shape: number[], axes: number[]) => JSON.stringify(laneLayout({ op: "sum", shape, axes }));
  const cases: [number[], number[], string][] = [
    [[8, 64, 32, 32], [0, 2, 3], `{"A":1,"P":8,"K":64,"Q":1024}`], // bias gradient
    [[8, 64, 32, 32], [2, 3], `{"A":1,"P":1,"K":512,"Q":1024}`], // rows
    [[7, 64, 64, 3, 3], [0], `{"A":1,"P":7,"K":36864,"Q":1}`], // columns
    [[8, 3, 32, 32], [0, 1, 2, 3], `{"A":1,"P":1,"K":1,"Q":24576}`], // full
    [[5, 1, 3], [1], `{"A":1,"P":1,"K":15,"Q":1}`], // a size-1 reduction
    [[2, 3, 4], [1], `{"A":2,"P":3,"K":4,"Q":1}`], // a middle dim
    [[2, 3, 4, 5], [1, 3], `{"A":2,"P":3,"K":4,"Q":5}`],
    [[2, 3, 4, 5], [0, 2], "null"], // reduced and kept alternate twice
    [[2, 3, 4, 5, 6], [1, 3], "null"],
  ];
  for (const [shape, axes, want] of cases) assertEquals(view(shape, axes), want, `[${shape}] over [${axes}]`);
});

gpuTest("long reductions stay accurate in every variant", async () => {
  const device = await gpuDevice();
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 64, max: 20000 }),
      fc.integer({ min: 1, max: 5 }),
      seedArb,
      async (L, rows, seed) => {
        const data = seededValues(L * rows, seed, 0, 1);
        for (const axes of [[1], [0, 1], [0]]) {
          const shape = axes.length === 1 && axes[0] === 0 ? [L, rows] : [rows, L];
          for (const variant of VARIANTS) {
            const [g, c] = await kernelBoth(device, { op: "sum", shape, axes, variant }, data);
            assertClose(g, c, { rtol: 2e-6, atol: 0 }, `sum of ${L}, ${variant}`);
            const [gm, cm] = await kernelBoth(device, { op: "max", shape, axes, variant }, data);
            assertClose(gm, cm, { rtol: 0, atol: 0 }, `max, ${variant}`);
          }
        }
      },
    ),
    { numRuns: RUNS },
  );
});

gpuTest("reductions on 2-D grids", async () => {
  const small = await smallGridDevice();
  for (const L of [5000, 4999]) {
    const data = seededValues(3 * L, 4);
    for (const axes of [[0], [1]]) {
      for (const variant of VARIANTS) {
        const [g, c] = await kernelBoth(small, { op: "sum", shape: [3, L], axes, variant }, data);
        assertClose(g, c, { rtol: 1e-5, atol: 1e-4 }, `sum of [3, ${L}] over ${axes}, ${variant}`);
      }
    }
  }
});

test("reduce errors name the dim and rank", async () => {
  const x = tensor(new Float32Array(6), [2, 3], { device: await cpuDevice() });
  for (const bad of [() => R.sum(x, 2), () => R.mean(x, [-3]), () => R.amax(x, [1, 1])]) {
    let msg = "";
    try {
      bad();
    } catch (e) {
      msg = (e as Error).message;
    }
    if (!/dim|repeated/.test(msg)) throw new Error(`unhelpful message "${msg}"`);
  }
});

test("gradient of sum, mean, amax", async () => {
  const x = { shape: [2, 3, 4], data: seededValues(24, 11) };
  for (const dims of [undefined, 1, [0, 2], -1]) {
    for (const keepdim of [false, true]) {
      await gradCheck((t) => R.sum(t, dims, keepdim), [x]);
      await gradCheck((t) => R.mean(t, dims, keepdim), [x]);
      await gradCheck((t) => R.amax(t, dims, keepdim), [x]);
    }
  }
});

test("amax splits the gradient between tied maxima like torch.amax", async () => {
  const device = await cpuDevice();
  const x = tensor([1, 3, 3, 2], [4], { device, requiresGrad: true });
  R.amax(x).backward();
  assertClose(await x.grad!.toArray(), [0, 0.5, 0.5, 0]);
});

// --- shape ops ----------------------------------------------------------------------------------------------------

gpuTest("permute: WebGPU matches CPU reference and the index definition", async () => {
  await fc.assert(
    fc.asyncProperty(
      shapeArb(1, 5, 6).chain((s) =>
        fc.tuple(fc.constant(s), fc.shuffledSubarray(s.map((_, i) => i), { minLength: s.length }))
      ),
      seedArb,
      async ([shape, dims], seed) => {
        const data = seededValues(size(shape), seed);
        const [g, c, outShape] = await both(shape, data, (x) => S.permute(x, dims));
        assertClose(g, c, { rtol: 0, atol: 0 }, "permute");
        // Definition: out[i] = x[i permuted back]; check one random element.
        const idx = outShape.map((d, k) => (seed + k) % d);
        const src = new Array<number>(shape.length);
        dims.forEach((d, k) => (src[d] = idx[k]));
        const flat = (ix: number[], sh: readonly number[]) => ix.reduce((acc, v, k) => acc * sh[k] + v, 0);
        if (g[flat(idx, outShape)] !== data[flat(src, shape)]) {
          throw new Error("permute moved an element wrongly");
        }
      },
    ),
    { numRuns: RUNS },
  );
});

gpuTest("narrow and cat: WebGPU matches CPU reference; cat of narrows restores the input", async () => {
  await fc.assert(
    fc.asyncProperty(shapeArb(1, 4, 8), fc.nat(), fc.nat(), seedArb, async (shape, dRaw, cut, seed) => {
      const d = dRaw % shape.length;
      if (shape[d] < 2) return;
      const k = 1 + (cut % (shape[d] - 1));
      const data = seededValues(size(shape), seed);
      const [g, c] = await both(shape, data, (x) => S.narrow(x, d, k, shape[d] - k));
      assertClose(g, c, { rtol: 0, atol: 0 }, "narrow");
      const [back] = await both(
        shape,
        data,
        (x) => S.cat([S.narrow(x, d, 0, k), S.narrow(x, d, k, shape[d] - k)], d),
      );
      assertClose(back, data, { rtol: 0, atol: 0 }, "cat(narrow, narrow)");
    }),
    { numRuns: RUNS },
  );
});

gpuTest("expand, reshape with -1, unsqueeze, squeeze", async () => {
  const device = await gpuDevice();
  const x = tensor([1, 2, 3], [3, 1], { device });
  assertClose(await S.expand(x, [2, 3, 2]).toArray(), [1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3]);
  const r = S.reshape(x, [-1]);
  if (r.shape.join() !== "3") throw new Error(`reshape -1 gave [${r.shape}]`);
  if (S.unsqueeze(r, 0).shape.join() !== "1,3") throw new Error("unsqueeze");
  if (S.squeeze(x, 1).shape.join() !== "3") throw new Error("squeeze");
});

test("shape op errors show the shapes", async () => {
  const x = tensor(new Float32Array(6), [2, 3], { device: await cpuDevice() });
  const cases: [() => unknown, string][] = [
    [() => S.reshape(x, [4, 2]), "[2, 3]"],
    [() => S.permute(x, [0, 0]), "[2, 3]"],
    [() => S.narrow(x, 1, 2, 2), "[2, 3]"],
    [() => S.cat([x, tensor(new Float32Array(4), [2, 2], { device: x.device })], 0), "[2, 2]"],
    [() => S.expand(x, [3, 3]), "[3, 3]"],
  ];
  for (const [f, want] of cases) {
    let msg = "";
    try {
      f();
    } catch (e) {
      msg = (e as Error).message;
    }
    if (!msg.includes(want)) throw new Error(`message "${msg}" does not show ${want}`);
  }
});

test("gradients of reshape, permute, transpose, narrow, cat, expand", async () => {
  const a = { shape: [2, 3, 4], data: seededValues(24, 1) };
  const b = { shape: [2, 2, 4], data: seededValues(16, 2) };
  await gradCheck((t) => S.reshape(t, [4, -1]), [a]);
  await gradCheck((t) => S.permute(t, [2, 0, 1]), [a]);
  await gradCheck((t) => S.transpose(t, 0, 2), [a]);
  await gradCheck((t) => S.narrow(t, 1, 1, 2), [a]);
  await gradCheck((t, u) => S.cat([t, u], 1), [a, b]);
  await gradCheck((t, u) => S.cat([u, t, u], 1), [a, b]);
  await gradCheck((t) => S.cat([t, S.narrow(t, 0, 1, 1)], 0), [a]); // outer 1
  await gradCheck((t) => S.cat([S.narrow(t, 2, 1, 3), t], 2), [a]); // inner 1
  await gradCheck((t, u) => S.cat([t, u, t, u, t, u, t, u], 1), [a, b]); // 8 parts: a copy per part
  await gradCheck((t) => S.expand(t, [5, 2, 3, 4]), [a]);
  await gradCheck((t) => S.expand(S.narrow(t, 2, 0, 1), [2, 3, 4]), [a]);
});
