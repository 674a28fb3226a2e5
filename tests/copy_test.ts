/**
 * @file The strided copy kernel on WebGPU against its CPU reference: random shapes copied between permuted,
 * padded, offset and broadcast (stride 0) layouts, so that the vec4 path (aligned on both sides), the gathered
 * vec4 path (aligned destination, strided source) and the scalar path all run; also on the small-grid device.
 */

import fc from "fast-check";
import { copy, type CopyParams, copyPlan } from "../kernels/copy.ts";
import type { Device } from "../engine/device.ts";
import {
  assertEquals,
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
