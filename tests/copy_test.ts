/**
 * @file The strided copy kernel on WebGPU against its CPU reference: random shapes copied between permuted,
 * padded, offset and broadcast (stride 0) layouts, so that the vec4 path (aligned on both sides), the gathered
 * vec4 path (aligned destination, strided source) and the scalar path all run; also on the small-grid device.
 * The one-pass `concat` (join and split) against its reference and against the per-part copies it replaces.
 */

import fc from "fast-check";
import {
  concat,
  CONCAT_MAX_PARTS,
  type ConcatParams,
  concatPlan,
  copy,
  type CopyParams,
  copyPlan,
} from "../kernels/copy.ts";
import type { Device } from "../engine/device.ts";
import {
  assertEquals,
  assertThrows,
  type BufferLayout,
  cpuDevice,
  gpuDevice,
  gpuTest,
  layoutStrides,
  runOnBuffers,
  RUNS,
  seedArb,
  seededValues,
  smallGridDevice,
  test,
} from "./util.ts";

/** A source or destination layout; copies also start at an offset. */
type Layout = BufferLayout & { offset: number };

const dimArb = fc.oneof(fc.integer({ min: 1, max: 9 }), fc.constantFrom(1, 4, 8, 12, 16, 3, 5, 7));

function layoutArb(rank: number, allowBroadcast: boolean): fc.Arbitrary<Layout> {
  return fc.record({
    pad: fc.array(fc.constantFrom(0, 0, 0, 1, 4), { minLength: rank, maxLength: rank }),
    perm: fc.shuffledSubarray([...Array(rank).keys()], { minLength: rank, maxLength: rank }),
    offset: fc.constantFrom(0, 0, 4, 8, 1, 3),
    broadcast: fc.array(allowBroadcast ? fc.boolean() : fc.constant(false), {
      minLength: rank,
      maxLength: rank,
    }),
  });
}

interface Case {
  shape: number[];
  src: Layout;
  dst: Layout;
  seed: number;
}

const caseArb: fc.Arbitrary<Case> = fc.array(dimArb, { minLength: 1, maxLength: 4 }).chain((shape) =>
  fc.record({
    shape: fc.constant(shape),
    src: layoutArb(shape.length, true),
    // The destination is written once per element: no broadcast dims; mostly in order, so vec4 stores happen.
    dst: fc.oneof(
      layoutArb(shape.length, false).map((l) => ({ ...l, perm: [...Array(shape.length).keys()] })),
      layoutArb(shape.length, false),
    ),
    seed: seedArb,
  })
);

async function runCopy(device: Device, p: CopyParams, src: Float32Array, dst: Float32Array) {
  const [out] = await runOnBuffers(device, copy, p, [src], [dst]);
  return out;
}

async function checkCase(gpu: Device, c: Case) {
  const src = layoutStrides(c.shape, c.src), dst = layoutStrides(c.shape, c.dst);
  const p: CopyParams = {
    shape: c.shape,
    srcOffset: c.src.offset,
    srcStrides: src.strides,
    dstOffset: c.dst.offset,
    dstStrides: dst.strides,
  };
  const srcData = seededValues(src.elements, c.seed);
  const dstData = seededValues(dst.elements, c.seed + 1, 10, 20); // elements the copy skips must stay
  const want = await runCopy(await cpuDevice(), p, srcData, dstData);
  const got = await runCopy(gpu, p, srcData, dstData);
  const plan = copyPlan(p);
  assertEquals([...got], [...want], `copy ${JSON.stringify(p)} (V=${plan.V}, vec4 source ${plan.srcVec})`);
}

gpuTest(
  "copy: WebGPU matches the CPU reference over permuted, padded, offset and broadcast layouts",
  async () => {
    const gpu = await gpuDevice();
    await fc.assert(fc.asyncProperty(caseArb, (c) => checkCase(gpu, c)), { numRuns: RUNS * 8 });
  },
);

gpuTest("copy: the 2-D grid path (small-grid device) matches the CPU reference", async () => {
  const gpu = await smallGridDevice();
  await fc.assert(fc.asyncProperty(caseArb, (c) => checkCase(gpu, c)), { numRuns: RUNS * 2 });
});

test("copy: plans vec4 stores and loads only where both layouts allow them", () => {
  const plan = (p: CopyParams) => {
    const { V, srcVec } = copyPlan(p);
    return { V, srcVec };
  };
  const cat = {
    shape: [8, 4096],
    srcOffset: 0,
    srcStrides: [4096, 1],
    dstOffset: 4096,
    dstStrides: [8192, 1],
  };
  assertEquals(plan(cat), { V: 4, srcVec: true }, "cat into an aligned half");
  const transpose = {
    shape: [8, 64, 64],
    srcOffset: 0,
    srcStrides: [4096, 1, 64],
    dstOffset: 0,
    dstStrides: [4096, 64, 1],
  };
  assertEquals(plan(transpose), { V: 4, srcVec: false }, "transpose: gathered loads");
  assertEquals(plan({ ...cat, srcOffset: 2 }), { V: 4, srcVec: false }, "unaligned source offset");
  assertEquals(plan({ ...cat, dstOffset: 2 }), { V: 1, srcVec: false }, "unaligned destination offset");
  assertEquals(plan({ ...cat, shape: [8, 4093] }), { V: 1, srcVec: false }, "odd rows");
});

// ---------------------------------------------------------------------------------------------------------------
// concat

/** Part widths from 1 to 7 parts, multiples of 4 (vec4 path) or any (scalar path), with rows of 1 to 5. */
const concatArb: fc.Arbitrary<{ p: ConcatParams; seed: number }> = fc.record({
  outer: fc.integer({ min: 1, max: 5 }),
  widths: fc.oneof(
    fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: CONCAT_MAX_PARTS }),
    fc.array(fc.integer({ min: 1, max: 10 }).map((k) => 4 * k), {
      minLength: 1,
      maxLength: CONCAT_MAX_PARTS,
    }),
  ),
  direction: fc.constantFrom("join" as const, "split" as const),
}).chain((p) => fc.record({ p: fc.constant(p), seed: seedArb }));

/** The parts of a [outer, Σ widths] whole, cut the way cat along the second dim would. */
function cutRows(whole: Float32Array, outer: number, widths: readonly number[]): number[][] {
  const row = widths.reduce((a, b) => a + b, 0);
  let start = 0;
  return widths.map((w) => {
    const part: number[] = [];
    for (let r = 0; r < outer; r++) part.push(...whole.subarray(r * row + start, r * row + start + w));
    start += w;
    return part;
  });
}

async function checkConcat(gpu: Device, { p, seed }: { p: ConcatParams; seed: number }) {
  const row = p.widths.reduce((a, b) => a + b, 0);
  const whole = seededValues(p.outer * row, seed);
  const parts = cutRows(whole, p.outer, p.widths);
  for (const device of [await cpuDevice(), gpu]) {
    const what = `concat ${JSON.stringify(p)} (V=${concatPlan(p).V}) on ${device.kind}`;
    if (p.direction === "join") {
      const [got] = await runOnBuffers(device, concat, p, parts, [whole.length]);
      assertEquals([...got], [...whole], what);
    } else {
      const got = await runOnBuffers(device, concat, p, [whole], p.widths.map((w) => w * p.outer));
      assertEquals(got.map((g) => [...g]), parts, what);
    }
  }
}

gpuTest("concat: join and split match the reference cut on WebGPU and CPU, vec4 and scalar", async () => {
  const gpu = await gpuDevice();
  await fc.assert(fc.asyncProperty(concatArb, (c) => checkConcat(gpu, c)), { numRuns: RUNS * 4 });
});

gpuTest("concat: the 2-D grid path (small-grid device) matches the reference cut", async () => {
  const gpu = await smallGridDevice();
  await fc.assert(fc.asyncProperty(concatArb, (c) => checkConcat(gpu, c)), { numRuns: RUNS });
});

test("concat: vec4 only when every part's row is whole vec4s; 1 to 7 parts", () => {
  assertEquals(concatPlan({ outer: 2, widths: [8, 4], direction: "join" }).V, 4);
  assertEquals(concatPlan({ outer: 2, widths: [8, 6], direction: "join" }).V, 1);
  assertThrows(() => concatPlan({ outer: 1, widths: [], direction: "join" }), "1 to 7 parts, got 0");
  assertThrows(() => concatPlan({ outer: 1, widths: Array(8).fill(4), direction: "split" }), "got 8");
});
