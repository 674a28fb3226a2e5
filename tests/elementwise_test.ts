/**
 * @file Elementwise kernels and ops: every unary and binary op on WebGPU against the CPU reference over random
 * shapes, broadcasting patterns and magnitudes; random fused expression trees; scalar operands; the 2-D grid
 * path; finite-difference gradient checks of every op in float64.
 */

import fc from "fast-check";
import { bin, cst, elementwise, type Expr, inp, un, UNARY, type UnaryOp } from "../kernels/elementwise.ts";
import type { GpuCaps } from "../kernels/types.ts";
import { quadBufferElements, toQuadBuffer } from "../kernels/layout.ts";
import { tensor } from "../engine/creation.ts";
import { map } from "../engine/ops/core.ts";
import * as E from "../engine/ops/elementwise.ts";
import type { Device } from "../engine/device.ts";
import type { Tensor } from "../engine/tensor.ts";
import {
  assertClose,
  type BufferLayout,
  cpuDevice,
  gpuDevice,
  gpuTest,
  gradCheck,
  layoutStrides,
  quadLayoutWith,
  quadPaddingArb,
  runOnBuffers,
  RUNS,
  scaleArb,
  seedArb,
  seededValues,
  shapeArb,
  size,
  smallGridDevice,
  test,
} from "./util.ts";

/** Input values for an op: positive where the op needs it. */
function domainValues(op: string, n: number, seed: number, scale: number): Float32Array {
  const v = seededValues(n, seed, -scale, scale);
  if (["log", "sqrt", "rsqrt"].includes(op)) return v.map((x) => Math.abs(x) + 1e-3 * scale);
  return v;
}

/** Runs `f` on both devices with the same host inputs; returns [gpu, cpu] results. */
async function both(
  inputs: { shape: number[]; data: Float32Array }[],
  f: (...xs: Tensor[]) => Tensor,
  gpu?: Device,
): Promise<[Float32Array, Float32Array]> {
  const out: Float32Array[] = [];
  for (const device of [gpu ?? await gpuDevice(), await cpuDevice()]) {
    const xs = inputs.map((x) => tensor(x.data, x.shape, { device }));
    const y = f(...xs);
    out.push(await y.toArray());
    [...xs, y].forEach((t) => t.dispose());
  }
  return [out[0], out[1]];
}

const TESTED_UNARY: UnaryOp[] = [
  "neg",
  "abs",
  "exp",
  "log",
  "sqrt",
  "rsqrt",
  "sin",
  "cos",
  "tanh",
  "sigmoid",
  "silu",
  "relu",
  "gelu",
  "geluGrad",
  "siluGrad",
  "erf",
  "recip",
  "square",
  "sign",
  "step",
];

for (const op of TESTED_UNARY) {
  gpuTest(`unary ${op}: WebGPU matches CPU reference`, async () => {
    await fc.assert(
      fc.asyncProperty(shapeArb(1, 4, 9), seedArb, scaleArb, async (shape, seed, scale) => {
        const scl = op === "exp" ? Math.min(scale, 20) : scale;
        const data = domainValues(op, size(shape), seed, scl);
        const [g, c] = await both([{ shape, data }], (x) => map(un(op, inp(0)), [x]));
        assertClose(g, c, { rtol: 2e-5, atol: 2e-5 }, op);
      }),
      { numRuns: RUNS },
    );
  });
}

test("every unary op in the table is covered by a test", () => {
  const missing = Object.keys(UNARY).filter((k) => !TESTED_UNARY.includes(k as UnaryOp));
  if (missing.length) throw new Error(`untested unary ops: ${missing}`);
});

gpuTest("unary ops stay finite and saturate correctly at extreme inputs", async () => {
  const data = Float32Array.from([-1e30, -100, -50, 0, 50, 100, 1e30]);
  for (const op of ["tanh", "sigmoid", "silu", "gelu", "erf"] as UnaryOp[]) {
    const [g, c] = await both([{ shape: [7], data }], (x) => map(un(op, inp(0)), [x]));
    assertClose(g, c, { rtol: 1e-6, atol: 1e-6 }, op);
  }
});

/** A shape that broadcasts against `shape`: some dims set to 1, maybe fewer leading dims. */
const broadcastPair = shapeArb(1, 4, 7).chain((shape) =>
  fc.tuple(
    fc.constant(shape),
    fc.array(fc.boolean(), { minLength: shape.length, maxLength: shape.length }),
    fc.integer({ min: 0, max: shape.length - 1 }),
    fc.boolean(),
  ).map(([s, ones, drop, swap]) => {
    const other = s.map((d, i) => (ones[i] ? 1 : d)).slice(drop);
    return swap ? [other, s] : [s, other];
  })
);

for (const op of ["add", "sub", "mul", "div", "pow", "max", "min", "gt", "eq"] as const) {
  gpuTest(`binary ${op} with broadcasting: WebGPU matches CPU reference`, async () => {
    await fc.assert(
      fc.asyncProperty(broadcastPair, seedArb, scaleArb, async ([sa, sb], seed, scale) => {
        let a = seededValues(size(sa), seed, -scale, scale);
        let b = seededValues(size(sb), seed + 1, -scale, scale);
        if (op === "pow") {
          a = a.map((x) => Math.abs(x) / scale + 0.5); // positive base, moderate range
          b = b.map((x) => x / scale * 3);
        }
        if (op === "div") b = b.map((x) => (Math.abs(x) < 1e-3 * scale ? 1e-3 * scale : x));
        if (op === "eq") b = b.map((x, i) => (i % 2 ? x : a[i % a.length]));
        const [g, c] = await both(
          [{ shape: sa, data: a }, { shape: sb, data: b }],
          (x, y) => map(bin(op, inp(0), inp(1)), [x, y]),
        );
        assertClose(g, c, { rtol: 3e-5, atol: 1e-6 }, op);
      }),
      { numRuns: RUNS },
    );
  });
}

gpuTest("pow follows PyTorch for negative bases and zero exponents", async () => {
  const base = Float32Array.from([-2, -2, -2, 0, 3, -1.5]);
  const expo = Float32Array.from([3, 2, 0.5, 0, 0, 0]);
  const [g, c] = await both(
    [{ shape: [6], data: base }, { shape: [6], data: expo }],
    (x, y) => map(bin("pow", inp(0), inp(1)), [x, y]),
  );
  assertClose(c, [-8, 4, NaN, 1, 1, 1], {}, "cpu pow");
  assertClose(g, [-8, 4, NaN, 1, 1, 1], {}, "gpu pow");
});

/** Random expression trees over three inputs and two constants. */
const exprArb: fc.Arbitrary<Expr> = fc.letrec<{ e: Expr }>((tie) => ({
  e: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    fc.integer({ min: 0, max: 2 }).map(inp),
    fc.integer({ min: 0, max: 1 }).map(cst),
    fc.tuple(fc.constantFrom<UnaryOp>("neg", "tanh", "sigmoid", "silu", "relu", "sin", "square"), tie("e"))
      .map((
        [op, a],
      ) => un(op, a)),
    fc.tuple(fc.constantFrom("add", "sub", "mul", "max", "min") as fc.Arbitrary<"add">, tie("e"), tie("e"))
      .map((
        [op, a, b],
      ) => bin(op, a, b)),
  ),
})).e;

gpuTest("random fused expression trees: WebGPU matches CPU reference", async () => {
  await fc.assert(
    fc.asyncProperty(exprArb, shapeArb(1, 3, 9), seedArb, async (expr, shape, seed) => {
      const n = size(shape);
      const inputs = [0, 1, 2].map((k) => ({ shape, data: seededValues(n, seed + k) }));
      const consts = [0.5, -1.25];
      const [g, c] = await both(inputs, (...xs) => map(expr, xs, consts, { shape }));
      assertClose(g, c, { rtol: 1e-4, atol: 1e-5 }, "fused");
    }),
    { numRuns: RUNS * 2 },
  );
});

const inputLayoutArb = (rank: number): fc.Arbitrary<BufferLayout> =>
  fc.record({
    // Mostly in order, so that inner-contiguous slices (padded outer dims) and inner broadcasts are common.
    perm: fc.oneof(
      fc.constant<readonly number[]>([...Array(rank).keys()]),
      fc.shuffledSubarray([...Array(rank).keys()], { minLength: rank, maxLength: rank }),
    ),
    pad: fc.array(fc.constantFrom(0, 0, 1, 4), { minLength: rank, maxLength: rank }),
    broadcast: fc.array(fc.boolean(), { minLength: rank, maxLength: rank }),
  });

gpuTest(
  "kernel: strided, sliced and broadcast input layouts match the CPU reference (one, four elements per thread)",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    const dimArb = fc.constantFrom(1, 2, 3, 4, 5, 8, 12);
    const caseArb = fc.array(dimArb, { minLength: 1, maxLength: 4 }).chain((shape) =>
      fc.record({
        shape: fc.constant(shape),
        layouts: fc.array(inputLayoutArb(shape.length), { minLength: 3, maxLength: 3 }),
        expr: exprArb,
        seed: seedArb,
      })
    );
    await fc.assert(
      fc.asyncProperty(caseArb, async ({ shape, layouts, expr, seed }) => {
        const ins = layouts.map((l) => layoutStrides(shape, l))
          .map((x, k) => ({ ...x, data: seededValues(x.elements, seed + k) }));
        const params = { expr, consts: [0.5, -1.25], shape, strides: ins.map((x) => x.strides) };
        const datas = ins.map((x) => x.data);
        const [got] = await runOnBuffers(gpu, elementwise, params, datas, [size(shape)]);
        const [want] = await runOnBuffers(cpu, elementwise, params, datas, [size(shape)]);
        assertClose(got, want, { rtol: 1e-4, atol: 1e-5 }, `strides ${JSON.stringify(params.strides)}`);
      }),
      { numRuns: RUNS * 4 },
    );
  },
);

gpuTest(
  "kernel: quadOut writes the padded channel-quad layout (borders and row ends zeroed) for strided, sliced and broadcast inputs",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    const caseArb = fc.record({
      N: fc.integer({ min: 1, max: 3 }),
      C: fc.constantFrom(4, 8, 12),
      H: fc.integer({ min: 1, max: 5 }),
      W: fc.constantFrom(4, 8, 12),
      pad: quadPaddingArb,
      layouts: fc.array(inputLayoutArb(4), { minLength: 3, maxLength: 3 }),
      expr: exprArb,
      seed: seedArb,
    });
    await fc.assert(
      fc.asyncProperty(caseArb, async (k) => {
        const shape = [k.N, k.C, k.H, k.W];
        const quadOut = quadLayoutWith(shape, k.pad);
        const ins = k.layouts.map((l) => layoutStrides(shape, l))
          .map((x, j) => ({ ...x, data: seededValues(x.elements, k.seed + j) }));
        const params = {
          expr: k.expr,
          consts: [0.5, -1.25],
          shape,
          strides: ins.map((x) => x.strides),
          quadOut,
        };
        const datas = ins.map((x) => x.data);
        // NaN-filled: every texel, borders and row ends included, must be written.
        const out = () => [new Float32Array(quadBufferElements(quadOut)).fill(NaN)];
        const [got] = await runOnBuffers(gpu, elementwise, params, datas, out());
        const [want] = await runOnBuffers(cpu, elementwise, params, datas, out());
        assertClose(got, want, { rtol: 1e-4, atol: 1e-5 }, `quad ${JSON.stringify(quadOut)}`);
        // The CPU reference is the row-major result placed in the layout.
        const [flat] = await runOnBuffers(cpu, elementwise, { ...params, quadOut: undefined }, datas, [
          size(shape),
        ]);
        const placed = new Float32Array(quadBufferElements(quadOut));
        toQuadBuffer(quadOut, flat, placed);
        assertClose(want, placed, { rtol: 0, atol: 0 }, "CPU reference");
      }),
      { numRuns: RUNS * 2 },
    );
  },
);

test("kernel: four-element threads load a broadcast input once and an aligned slice as one vec4", () => {
  const caps = { maxWorkgroupsPerDimension: 65535 } as GpuCaps;
  const expr = bin("add", bin("mul", inp(0), inp(1)), inp(2));
  // [8, 64, 32, 32] · scale [8, 64, 1, 1] + a channel slice of a [8, 128, 32, 32] tensor.
  const { source } = elementwise.gpu({
    expr,
    consts: [],
    shape: [8, 64, 32, 32],
    strides: [[65536, 1024, 32, 1], [64, 1, 0, 0], [131072, 1024, 32, 1]],
  }, caps);
  for (
    const line of ["let s1 = in1[o1];", "let v2 = in2[o2];", "var<storage, read> in2: array<vec4<f32>>;"]
  ) {
    if (!source.includes(line)) throw new Error(`expected \`${line}\` in:\n${source}`);
  }
  if (/in[12]\[o[12] \+/.test(source)) throw new Error(`scalar gathers left in:\n${source}`);
});

gpuTest("2-D grids (more workgroups than one dimension allows) cover every element", async () => {
  const small = await smallGridDevice();
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 4000, max: 60000 }), seedArb, async (n, seed) => {
      const data = seededValues(n, seed);
      const [g, c] = await both(
        [{ shape: [n], data }, { shape: [1], data: Float32Array.of(2) }],
        (x, y) => E.mul(x, y),
        small,
      );
      assertClose(g, c, {}, "mul on a 2-D grid");
    }),
    { numRuns: 5 },
  );
});

gpuTest("scalar operands work on either side and keep one pipeline per structure", async () => {
  const device = await gpuDevice();
  const x = tensor([1, 2, 3], [3], { device });
  const before = device.counters().pipelines;
  const outs = [E.add(x, 2), E.add(x, 7), E.sub(10, x), E.mul(0.5, x), E.div(x, 4), E.div(1, x), E.pow(x, 2)];
  const vals = await Promise.all(outs.map((t) => t.toArray()));
  assertClose(vals[0], [3, 4, 5]);
  assertClose(vals[1], [8, 9, 10]);
  assertClose(vals[2], [9, 8, 7]);
  assertClose(vals[3], [0.5, 1, 1.5]);
  assertClose(vals[4], [0.25, 0.5, 0.75]);
  assertClose(vals[5], [1, 0.5, 1 / 3]);
  assertClose(vals[6], [1, 4, 9]);
  // add(x, 2) and add(x, 7) differ only in a uniform: at most 6 new pipelines for 7 ops.
  const made = device.counters().pipelines - before;
  if (made > 6) throw new Error(`expected constants to share pipelines, ${made} were built`);
  [x, ...outs].forEach((t) => t.dispose());
});

test("broadcast errors name both shapes", async () => {
  const device = await cpuDevice();
  const a = tensor(new Float32Array(6), [2, 3], { device }), b = tensor(new Float32Array(4), [4], { device });
  let msg = "";
  try {
    E.add(a, b);
  } catch (e) {
    msg = (e as Error).message;
  }
  if (!msg.includes("[2, 3]") || !msg.includes("[4]")) throw new Error(`unhelpful message: "${msg}"`);
});

// --- gradient checks in float64 ---------------------------------------------------------------------------------

const UNARY_OPS: [string, (x: Tensor) => Tensor][] = [
  ["neg", E.neg],
  ["abs", E.abs],
  ["exp", E.exp],
  ["log", E.log],
  ["sqrt", E.sqrt],
  ["rsqrt", E.rsqrt],
  ["sin", E.sin],
  ["cos", E.cos],
  ["tanh", E.tanh],
  ["sigmoid", E.sigmoid],
  ["silu", E.silu],
  ["relu", E.relu],
  ["gelu", E.gelu],
];

for (const [name, f] of UNARY_OPS) {
  test(`gradient of ${name}`, async () => {
    // Values away from the kinks of abs/relu, positive for log/sqrt/rsqrt.
    const data = seededValues(12, name.length * 31, 0.2, 2).map((v, i) => (i % 2 ? v : -v));
    const input = ["log", "sqrt", "rsqrt"].includes(name) ? data.map(Math.abs) : data;
    await gradCheck(f, [{ shape: [3, 4], data: input }], { rtol: 1e-5, atol: 1e-6 });
  });
}

test("gradient of gelu against the erf approximation's own derivative tolerance", async () => {
  // geluGrad is the exact derivative of the exact GELU; the A&S erf approximation differs by < 1.5e-7.
  await gradCheck(E.gelu, [{ shape: [9], data: seededValues(9, 3, -4, 4) }], { rtol: 1e-5, atol: 5e-7 });
});

const BINARY_OPS: [string, (a: Tensor, b: Tensor) => Tensor][] = [
  ["add", E.add],
  ["sub", E.sub],
  ["mul", E.mul],
  ["div", E.div],
  ["pow", E.pow],
];

for (const [name, f] of BINARY_OPS) {
  test(`gradient of ${name} with broadcasting`, async () => {
    const a = seededValues(24, 5, 0.5, 2), b = seededValues(3, 6, 0.5, 1.5);
    await gradCheck(f, [{ shape: [2, 3, 4], data: a }, { shape: [3, 1], data: b }]);
    await gradCheck(f, [{ shape: [3, 1], data: b }, { shape: [2, 3, 4], data: a }]);
  });
}

test("gradients with scalar operands", async () => {
  const x = { shape: [2, 3], data: seededValues(6, 9, 0.5, 2) };
  await gradCheck((t) => E.pow(t, 3), [x]);
  await gradCheck((t) => E.pow(2, t), [x]);
  await gradCheck((t) => E.div(1.5, t), [x]);
  await gradCheck((t) => E.sub(1, E.mul(t, 0.25)), [x]);
});

// --- fusion (lazy elementwise results) ----------------------------------------------------------------------------

gpuTest("fusion: an elementwise chain runs as one dispatch; an unread result never runs", async () => {
  const device = await gpuDevice();
  const x = tensor(seededValues(64, 1), [4, 16], { device }),
    b = tensor(seededValues(16, 2), [16], { device });
  const before = device.counters().dispatches;
  const unused = E.exp(x);
  const y = E.silu(E.add(E.mul(x, E.add(b, 1)), E.tanh(b)));
  unused.dispose();
  const got = await y.toArray();
  const dispatches = device.counters().dispatches - before;
  if (dispatches !== 1) {
    throw new Error(`chain of 5 elementwise ops took ${dispatches} dispatches, expected 1`);
  }
  const xv = seededValues(64, 1), bv = seededValues(16, 2);
  const want = Array.from(xv, (v, i) => {
    const h = v * (bv[i % 16] + 1) + Math.tanh(bv[i % 16]);
    return h / (1 + Math.exp(-h));
  });
  assertClose(got, want, { rtol: 1e-5, atol: 1e-6 });
});

gpuTest("fusion: a lazy result keeps its inputs alive after they are disposed", async () => {
  const device = await gpuDevice();
  const x = tensor([1, 2, 3], [3], { device });
  const y = E.mul(x, 10);
  x.dispose();
  assertClose(await y.toArray(), [10, 20, 30]);
  y.dispose();
});

gpuTest(
  "fusion: an in-place write (optimizer step) computes pending readers of the old values first",
  async () => {
    const device = await gpuDevice();
    const { copyInto } = await import("../engine/ops/core.ts");
    const w = tensor([1, 2, 3], [3], { device });
    const before = E.mul(w, 2); // lazy: reads w when computed
    copyInto(w, tensor([7, 7, 7], [3], { device }), [0]); // overwrites w in place
    assertClose(await before.toArray(), [2, 4, 6], {}, "value computed before the write");
    assertClose(await w.toArray(), [7, 7, 7], {}, "written value");
  },
);

gpuTest("fusion respects the 7-input budget and deep trees stay correct", async () => {
  const device = await gpuDevice();
  const xs = Array.from({ length: 10 }, (_, k) => tensor([k + 1], [1], { device }));
  let acc = E.mul(xs[0], 1);
  for (const x of xs.slice(1)) acc = E.add(acc, E.mul(x, 2)); // 10 distinct leaves: must split
  assertClose(await acc.toArray(), [1 + 2 * (2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10)]);
  let deep = E.mul(xs[0], 1);
  for (let i = 0; i < 40; i++) deep = E.add(deep, deep); // node count doubles: must be cut at the budget
  assertClose(await deep.toArray(), [2 ** 40], { rtol: 1e-6 });
});
