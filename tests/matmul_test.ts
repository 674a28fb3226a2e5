/**
 * @file Tests of the batched GEMM kernel and of `matmul` / `linear`: hand-computed products, the WebGPU kernel
 * against its CPU reference over random sizes and layouts (transposed, batch-broadcast, offset, every variant,
 * every vector-load and texture-operand mode, texture padding), the texture-input contract of the device (flat
 * copies, packing passes, size limits), the variant choice, the ops on the GPU against the CPU backend (values and
 * gradients, including the folded and materialised batch paths and products large enough for the texture
 * variant by default), finite-difference gradient checks, and shape errors.
 */

import fc from "fast-check";
import {
  matmul as matmulKernel,
  type MatmulParams,
  type MatmulVariant,
  matmulVariant,
  type MatOperand,
} from "../kernels/matmul.ts";
import type { FloatArray, GpuDispatch, Kernel } from "../kernels/types.ts";
import { FLAT_TEXEL_WGSL, flatTextureSize, header } from "../kernels/wgsl.ts";
import { linear, matmul, matmulTransposed } from "../engine/ops/matmul.ts";
import { tensor } from "../engine/creation.ts";
import { transpose } from "../engine/ops/shape.ts";
import { map } from "../engine/ops/core.ts";
import { bin, elementwise, inp } from "../kernels/elementwise.ts";
import { Device } from "../engine/device.ts";
import type { Tensor } from "../engine/tensor.ts";
import {
  assertBackendsAgree,
  assertClose,
  assertEquals,
  assertThrows,
  cpuDevice,
  gpuDevice,
  gpuTest,
  gradCheck,
  noTextureInputs,
  opAndGrads,
  runOnBuffers,
  RUNS,
  scaleArb,
  seedArb,
  seededValues,
  smallGridDevice,
  test,
  values,
} from "./util.ts";

/** Why the tests that need texture inputs are skipped here, or null. */
const noTextures = await noTextureInputs();

/** Runs a kernel on raw buffers and reads its single output back. */
async function runKernel(device: Device, p: MatmulParams, inputs: Float32Array[], outLen: number) {
  // NaN-filled: every element must be written.
  const [r] = await runOnBuffers(device, matmulKernel, p, inputs, [new Float32Array(outLen).fill(NaN)]);
  return r;
}

/** Sizes that hit 1, primes, multiples of the 4/8 tiles (vector loads) and non-multiples. */
const dimArb = fc.oneof(
  fc.constant(1),
  fc.integer({ min: 1, max: 20 }),
  fc.constantFrom(2, 3, 5, 7, 13, 17),
  fc.constantFrom(4, 8, 12, 16, 24, 36),
);

interface Layout {
  trans: boolean;
  broadcast: boolean;
  offset: number;
}
const layoutArb: fc.Arbitrary<Layout> = fc.record({
  trans: fc.boolean(),
  broadcast: fc.boolean(),
  offset: fc.constantFrom(0, 0, 3, 8),
});

/** Strides and buffer length of a [rows, cols] operand (stored transposed when asked). */
function operand(l: Layout, batch: number, rows: number, cols: number): { op: MatOperand; len: number } {
  const op: MatOperand = {
    offset: l.offset,
    batchStride: l.broadcast ? 0 : rows * cols,
    rowStride: l.trans ? 1 : cols,
    colStride: l.trans ? rows : 1,
  };
  return { op, len: l.offset + (l.broadcast ? 1 : batch) * rows * cols };
}

gpuTest("matmul: hand-computed products on both backends", async () => {
  for (const device of [await gpuDevice(), await cpuDevice()]) {
    const a = tensor([1, 2, 3, 4], [2, 2], { device }), b = tensor([5, 6, 7, 8], [2, 2], { device });
    assertEquals(Array.from(await values(matmul(a, b))), [19, 22, 43, 50]);
    const u = tensor([1, 2, 3], [3], { device }), v = tensor([4, 5, 6], [3], { device });
    const dot = matmul(u, v);
    assertEquals(dot.shape, []);
    assertEquals(await dot.item(), 32);
    // [2, 3] · [3] = [2]; [3] · [3, 2] = [2]
    const m = tensor([1, 0, 2, 0, 1, -1], [2, 3], { device });
    assertEquals(Array.from(await values(matmul(m, u))), [7, -1]);
    const mt = tensor([1, 0, 0, 1, 2, -1], [3, 2], { device });
    assertEquals(Array.from(await values(matmul(u, mt))), [7, -1]);
    // linear: x [2, 2], weight [3, 2], bias [3]
    const x = tensor([1, 2, 3, 4], [2, 2], { device });
    const w = tensor([1, 0, 0, 1, 1, 1], [3, 2], { device }), bias = tensor([10, 20, 30], [3], { device });
    assertEquals(Array.from(await values(linear(x, w, bias))), [11, 22, 33, 13, 24, 37]);
  }
});

gpuTest(
  "matmul kernel: WebGPU matches the CPU reference over sizes, strides, broadcasts and variants",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          batch: fc.integer({ min: 1, max: 3 }),
          M: dimArb,
          N: dimArb,
          K: dimArb,
          la: layoutArb,
          lb: layoutArb,
          bias: fc.boolean(),
          alpha: fc.option(fc.double({ min: -4, max: 4, noNaN: true }), { nil: undefined }),
          variant: fc.constantFrom("registers", "shared", "texture") as fc.Arbitrary<MatmulVariant>,
          scale: scaleArb,
          seed: seedArb,
        }),
        async ({ batch, M, N, K, la, lb, bias, alpha, variant, scale, seed }) => {
          const A = operand(la, batch, ...(la.trans ? [K, M] as const : [M, K] as const));
          const B = operand(lb, batch, ...(lb.trans ? [N, K] as const : [K, N] as const));
          // Transposed storage swaps the stored dims; strides then read it as [M, K] / [K, N].
          if (la.trans) A.op = { ...A.op, rowStride: 1, colStride: M };
          if (lb.trans) B.op = { ...B.op, rowStride: 1, colStride: K };
          const p: MatmulParams = { batch, M, N, K, a: A.op, b: B.op, bias, alpha, variant };
          const inputs = [
            seededValues(A.len, seed, -scale, scale),
            seededValues(B.len, seed + 1, -scale, scale),
          ];
          if (bias) inputs.push(seededValues(N, seed + 2, -scale, scale));
          const got = await runKernel(gpu, p, inputs, batch * M * N);
          const want = await runKernel(cpu, p, inputs, batch * M * N);
          assertClose(
            got,
            want,
            { rtol: 1e-4, atol: 1e-5 * K * scale * scale * Math.max(1, Math.abs(alpha ?? 1)) },
            `matmul ${JSON.stringify(p)}`,
          );
        },
      ),
      { numRuns: RUNS * 3 },
    );
  },
);

gpuTest(
  "matmul kernel: vector-load and texture-operand modes agree with the reference on aligned layouts",
  async () => {
    // Every combination of A ∈ {row-major, column-major} and B ∈ {row-major, column-major} with sizes divisible by
    // four (vector loads; texture operands read straight from flat copies, along k or along rows) and a K with a
    // tail (texture variant: the k-contiguous operand is then packed and the other one masked past K), in every
    // variant.
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    for (const [M, N, K] of [[8, 8, 8], [12, 16, 20], [16, 4, 7], [4, 24, 9]]) {
      for (const ta of [false, true]) {
        for (const tb of [false, true]) {
          const a: MatOperand = { batchStride: M * K, rowStride: ta ? 1 : K, colStride: ta ? M : 1 };
          const b: MatOperand = { batchStride: 0, rowStride: tb ? 1 : N, colStride: tb ? K : 1 };
          const p: MatmulParams = { batch: 2, M, N, K, a, b };
          const inputs = [seededValues(2 * M * K, M + K), seededValues(K * N, N)];
          const want = await runKernel(cpu, p, inputs, 2 * M * N);
          for (const variant of ["registers", "shared", "texture"] as const) {
            const got = await runKernel(gpu, { ...p, variant }, inputs, 2 * M * N);
            assertClose(
              got,
              want,
              { rtol: 1e-4, atol: 1e-5 },
              `${variant} M${M} N${N} K${K} ta=${ta} tb=${tb}`,
            );
          }
        }
      }
    }
  },
);

gpuTest(
  "matmul kernel: grids folded into 2-D (more workgroups than one dimension allows) give the same result",
  async () => {
    const small = await smallGridDevice(), cpu = await cpuDevice();
    // 20 × (128×128) outputs: 5120 register blocks (80 workgroups), 80 shared 64×64 tiles or 1280 texture tiles
    // (20 workgroups), over a 16-wide grid. K = 5: the texture variant packs A and masks B's tail.
    const [batch, M, N, K] = [20, 128, 128, 5];
    const p: MatmulParams = {
      batch,
      M,
      N,
      K,
      a: { batchStride: M * K, rowStride: K, colStride: 1 },
      b: { batchStride: 0, rowStride: N, colStride: 1 },
    };
    const inputs = [seededValues(batch * M * K, 1), seededValues(K * N, 2)];
    const want = await runKernel(cpu, p, inputs, batch * M * N);
    for (const variant of ["registers", "shared", "texture"] as const) {
      assertClose(await runKernel(small, { ...p, variant }, inputs, batch * M * N), want, {
        rtol: 1e-5,
        atol: 1e-5,
      }, variant);
    }
  },
);

/**
 * A kernel that exercises the texture-input contract: input 0 is read from a flat copy, input 1 (the same data)
 * through a packing pass that stores each quad of elements reversed, three texels per row, zero past the end.
 * out[i] = flat read of element i, out[n + i] = packed read of element i, out[2n + c] = the first padding texel.
 */
const textureProbe: Kernel<{ n: number; width?: number }> = {
  name: "textureProbe",
  gpu(p: { n: number; width?: number }): GpuDispatch {
    const quads = Math.ceil(p.n / 4), rows = Math.ceil((quads + 1) / 3);
    return {
      source: header(["flat", "packed"], ["out"], "f32", [0, 1]) + FLAT_TEXEL_WGSL + `
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let n = pu(0u); let i = gid.x;
  if (i < n) {
    out[i] = textureLoad(flat, flatTexel(i / 4u))[i % 4u];
    let t = i / 4u;
    out[n + i] = textureLoad(packed, vec2<u32>(t % 3u, t / 3u))[3u - i % 4u];
  }
  if (i < 4u) {
    let t = (n + 3u) / 4u;
    out[2u * n + i] = textureLoad(packed, vec2<u32>(t % 3u, t / 3u))[i];
  }
}`,
      workgroups: [Math.ceil(Math.max(p.n, 4) / 64), 1, 1],
      params: Uint32Array.of(p.n, 0, 0, 0),
      textures: [
        { input: 0, ...flatTextureSize(p.n) },
        {
          input: 1,
          width: p.width ?? 3,
          height: rows,
          pack: `fn texel(x: u32, y: u32) -> vec4<f32> {
  let q = (y * 3u + x) * 4u;
  let n = i32(pu(0u));
  let i = vec4<i32>(vec4<u32>(q + 3u, q + 2u, q + 1u, q)) ;
  return vec4<f32>(srcAt(select(-1, i.x, i.x < n)), srcAt(select(-1, i.y, i.y < n)),
    srcAt(select(-1, i.z, i.z < n)), srcAt(select(-1, i.w, i.w < n)));
}`,
          params: Uint32Array.of(p.n, 0, 0, 0),
        },
      ],
    };
  },
  cpu(p: { n: number }, [x]: FloatArray[], [out]: FloatArray[]): void {
    out.fill(0);
    for (let i = 0; i < p.n; i++) out[i] = out[p.n + i] = x[i];
  },
};

gpuTest(
  "texture inputs: flat copies and packing passes deliver the data, zero-padded, and sizes are checked",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    if (!gpu.info.textureInputs) throw new Error(`this adapter has no texture inputs (${gpu.info.api})`);
    // Sizes around the flat texture's 4096-element rows (partial last row, partial last texel).
    for (const n of [1, 5, 12, 4095, 4096, 4101, 9000]) {
      const x = seededValues(n, n);
      const want = await runProbe(cpu, { n }, x);
      const got = await runProbe(gpu, { n }, x);
      assertClose(got, want, { rtol: 0, atol: 0 }, `texture probe n=${n}`);
    }
    const max = gpu.info.limits.maxTextureDimension2D;
    let message = "";
    try {
      await runProbe(gpu, { n: 8, width: max + 1 }, seededValues(8, 1));
    } catch (e) {
      message = (e as Error).message;
    }
    if (!message.includes(`${max + 1}`) || !message.includes(`${max}`)) {
      throw new Error(`an oversized texture input gave "${message}"`);
    }
  },
  noTextures,
);

gpuTest(
  "texture inputs: kept while their buffer is unchanged, refilled after a queue write or a kernel output",
  async () => {
    const gpu = await gpuDevice();
    for (const n of [5, 4101]) {
      const x0 = seededValues(n, 1), x1 = seededValues(n, 2), x2 = seededValues(n, 3);
      const a = gpu.alloc(n), b = gpu.alloc(n), c = gpu.alloc(n), zero = gpu.alloc(n);
      const outs = [0, 1, 2, 3].map(() => gpu.alloc(2 * n + 4));
      gpu.write(a, x0);
      gpu.write(b, x0);
      gpu.write(c, x2);
      gpu.write(zero, new Float32Array(n));
      const reused = gpu.counters().textureReuses;
      gpu.run(textureProbe, { n }, [a, b], [outs[0]]);
      gpu.run(textureProbe, { n }, [a, b], [outs[1]]); // both textures kept from the first run
      assertEquals(gpu.counters().textureReuses - reused, 2, "unchanged buffers");
      gpu.write(a, x1); // a queue write: a's flat copy is stale
      gpu.run(textureProbe, { n }, [a, b], [outs[2]]);
      // b becomes x2 through a kernel output recorded in the same batch as the reads around it.
      const add = { expr: bin("add", inp(0), inp(1)), consts: [], shape: [n], strides: [[1], [1]] };
      gpu.run(elementwise, add, [c, zero], [b]);
      gpu.run(textureProbe, { n }, [a, b], [outs[3]]);
      const got = [];
      for (const o of outs) got.push(await gpu.read(o));
      const expect = (flat: Float32Array, packed: Float32Array) => [...flat, ...packed];
      const wants = [expect(x0, x0), expect(x0, x0), expect(x1, x0), expect(x1, x2)];
      got.forEach((g, i) =>
        assertClose(g.slice(0, 2 * n), wants[i], { rtol: 0, atol: 0 }, `n=${n} run ${i}`)
      );
      for (const s of [a, b, c, zero, ...outs]) gpu.release(s);
    }
    // A texture pool of 128 KiB keeps at most 32 KiB: one flat copy of 4101 elements. Rotating over four buffers
    // evicts kept textures all the time; every result must still be right.
    const small = await Device.create({
      backend: "webgpu",
      fallback: false,
      texturePoolLimitBytes: 128 * 1024,
    });
    try {
      const n = 4101, xs = [1, 2, 3, 4].map((k) => seededValues(n, 10 + k));
      const bufs = xs.map((x) => {
        const s = small.alloc(n);
        small.write(s, x);
        return s;
      });
      const order = [0, 1, 0, 2, 3, 3, 1, 0, 2, 2];
      const outs = order.map(() => small.alloc(2 * n + 4));
      order.forEach((k, i) => small.run(textureProbe, { n }, [bufs[k], bufs[(k + 1) % 4]], [outs[i]]));
      for (const [i, k] of order.entries()) {
        const got = (await small.read(outs[i])).slice(0, 2 * n);
        assertClose(got, [...xs[k], ...xs[(k + 1) % 4]], { rtol: 0, atol: 0 }, `small pool, run ${i}`);
      }
      if (small.counters().textureReuses === 0) throw new Error("the small pool never reused a texture");
    } finally {
      small.destroy();
    }
  },
  noTextures,
);

async function runProbe(device: Device, p: { n: number; width?: number }, x: Float32Array) {
  const a = device.alloc(x.length), b = device.alloc(x.length), out = device.alloc(2 * p.n + 4);
  device.write(a, x);
  device.write(b, x);
  device.write(out, new Float32Array(2 * p.n + 4).fill(NaN));
  try {
    device.run(textureProbe, p, [a, b], [out]);
    return await device.read(out);
  } finally {
    for (const s of [a, b, out]) device.release(s);
  }
}

test("matmul kernel: variant choice (texture on CPU-emulated adapters for large products that fit)", () => {
  const op = (M: number, K: number): MatOperand => ({ batchStride: M * K, rowStride: K, colStride: 1 });
  const p = (M: number, N: number, K: number): MatmulParams => ({
    batch: 1,
    M,
    N,
    K,
    a: op(M, K),
    b: op(K, N),
  });
  const emulated = { isCpuEmulated: true, maxTextureDimension2D: 16384 };
  assertEquals(matmulVariant(p(8, 8, 8), emulated), "registers", "small product");
  assertEquals(matmulVariant(p(64, 64, 64), emulated), "texture", "64³");
  assertEquals(
    matmulVariant(p(64, 64, 64), { isCpuEmulated: false, maxTextureDimension2D: 16384 }),
    "shared",
  );
  // Operands whose flat copies exceed the texture size, or no texture inputs at all: registers.
  assertEquals(
    matmulVariant(p(64, 64, 64), { ...emulated, maxTextureDimension2D: 1 }),
    "registers",
    "too big",
  );
  assertEquals(matmulVariant({ ...p(8, 8, 8), variant: "texture" }, { isCpuEmulated: true }), "registers");
  assertEquals(matmulVariant({ ...p(8, 8, 8), variant: "texture" }, emulated), "texture", "forced");
});

test("matmul kernel: sources are built once per structure, never per size", () => {
  const caps = {
    description: "llvmpipe",
    isCpuEmulated: true,
    maxWorkgroupsPerDimension: 65535,
    maxStorageBufferBindingSize: 1 << 30,
    features: new Set<string>(),
    maxTextureDimension2D: 16384,
  };
  const p = (M: number, N: number, K: number, bias = false): MatmulParams => ({
    batch: 1,
    M,
    N,
    K,
    a: { batchStride: 0, rowStride: K, colStride: 1 },
    b: { batchStride: 0, rowStride: N, colStride: 1 },
    bias,
  });
  const source = (q: MatmulParams) => matmulKernel.gpu(q, caps).source;
  // Same structure (16×16 tiles, k-quad A, row-quad B), other sizes: the very same string object.
  assertEquals(source(p(64, 64, 64)) === source(p(96, 80, 128)), true, "same structure");
  assertEquals(source(p(64, 64, 64)) === source(p(64, 64, 64, true)), false, "bias changes the source");
  const aByRows: MatmulParams = { ...p(64, 64, 64), a: { batchStride: 0, rowStride: 1, colStride: 64 } };
  assertEquals(source(p(64, 64, 64)) === source(aByRows), false, "A read by row quads");
  // Packing A (K not a multiple of four) keeps its k-quad layout: the same kernel.
  assertEquals(source(p(64, 64, 64)) === source(p(64, 64, 66)), true, "packed A");
  for (const variant of ["registers", "shared"] as const) {
    assertEquals(source({ ...p(8, 8, 8), variant }) === source({ ...p(8, 16, 12), variant }), true, variant);
  }
});

gpuTest(
  "matmul / linear ops: products large enough for the texture variant match the CPU backend",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    const filled = gpu.counters().textures;
    // Folded batch (A row-major, B row-major), and linear (weight read transposed); the gradients read the stored
    // operands transposed, so all four texture-operand modes and the packed (K % 4 ≠ 0) path occur.
    const cases: [(...t: Tensor[]) => Tensor, number[][]][] = [
      [matmul, [[3, 40, 72], [72, 48]]],
      [(x, w, b) => linear(x, w, b), [[100, 66], [52, 66], [52]]],
    ];
    for (const [f, shapes] of cases) {
      await assertBackendsAgree([gpu, cpu], f, shapes, 5, JSON.stringify(shapes));
    }
    if (gpu.counters().textures === filled) {
      throw new Error("the large products did not use the texture variant");
    }
  },
  noTextures,
);

/** Random operand shapes for torch.matmul: ranks 1–4 with batch dims that broadcast (some set to 1). */
const matmulShapesArb = fc.record({
  batch: fc.array(fc.integer({ min: 1, max: 3 }), { maxLength: 2 }),
  rankA: fc.integer({ min: 1, max: 4 }),
  rankB: fc.integer({ min: 1, max: 4 }),
  dropA: fc.array(fc.boolean(), { minLength: 2, maxLength: 2 }),
  dropB: fc.array(fc.boolean(), { minLength: 2, maxLength: 2 }),
  M: dimArb,
  N: dimArb,
  K: dimArb,
}).map(({ batch, rankA, rankB, dropA, dropB, M, N, K }) => {
  const batchFor = (rank: number, drop: boolean[]) => {
    const nb = Math.min(Math.max(rank - 2, 0), batch.length);
    return batch.slice(batch.length - nb).map((d, i) => (drop[i] ? 1 : d));
  };
  const a = rankA === 1 ? [K] : [...batchFor(rankA, dropA), M, K];
  const b = rankB === 1 ? [K] : [...batchFor(rankB, dropB), K, N];
  return { a, b };
});

gpuTest(
  "matmul op: GPU matches the CPU backend in values and gradients (broadcast, 1-D, folded batches)",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    await fc.assert(
      fc.asyncProperty(matmulShapesArb, seedArb, async ({ a, b }, seed) => {
        const what = `matmul ${JSON.stringify(a)} · ${JSON.stringify(b)}`;
        await assertBackendsAgree([gpu, cpu], matmul, [a, b], seed, what);
      }),
      { numRuns: RUNS },
    );
  },
);

gpuTest(
  "matmulTransposed: transposeA / transposeB equal torch.matmul(a.mT, b.mT), values and gradients",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    const arb = fc.record({ shapes: matmulShapesArb, ta: fc.boolean(), tb: fc.boolean() });
    await fc.assert(
      fc.asyncProperty(arb, seedArb, async ({ shapes: { a, b }, ta, tb }, seed) => {
        // Only operands of rank ≥ 2 can be transposed; their stored shape swaps the last two dims.
        ta &&= a.length >= 2;
        tb &&= b.length >= 2;
        const mT = (s: number[]) => [...s.slice(0, -2), s[s.length - 1], s[s.length - 2]];
        const shapes = [ta ? mT(a) : a, tb ? mT(b) : b];
        const got = await opAndGrads(
          gpu,
          (x, y) => matmulTransposed(x, y, { transposeA: ta, transposeB: tb }),
          shapes,
          seed,
        );
        // The reference: the CPU backend with the transposes materialised.
        const want = await opAndGrads(
          cpu,
          (x, y) => matmul(ta ? transpose(x, -2, -1) : x, tb ? transpose(y, -2, -1) : y),
          shapes,
          seed,
        );
        const what = `matmul ${JSON.stringify(shapes[0])}${ta ? "ᵀ" : ""} · ${JSON.stringify(shapes[1])}${
          tb ? "ᵀ" : ""
        }`;
        assertEquals(got.shape, want.shape, what);
        assertClose(got.out, want.out, { rtol: 1e-4, atol: 1e-4 }, what);
        got.grads.forEach((g, i) =>
          assertClose(g, want.grads[i], { rtol: 1e-4, atol: 1e-4 }, `${what} grad ${i}`)
        );
      }),
      { numRuns: RUNS },
    );
    assertThrows(
      () =>
        matmulTransposed(tensor([1, 2], [2], { device: cpu }), tensor([1, 2], [2, 1], { device: cpu }), {
          transposeA: true,
        }),
      "rank ≥ 2",
    );
  },
);

test("matmul op: result shapes follow torch.matmul", async () => {
  const device = await cpuDevice();
  const cases: [number[], number[], number[]][] = [
    [[3], [3], []],
    [[2, 3], [3], [2]],
    [[3], [3, 4], [4]],
    [[5, 2, 3], [3], [5, 2]],
    [[3], [5, 3, 4], [5, 4]],
    [[5, 2, 3], [3, 4], [5, 2, 4]],
    [[2, 1, 2, 3], [5, 3, 4], [2, 5, 2, 4]],
    [[1, 2, 3], [6, 3, 1], [6, 2, 1]],
  ];
  for (const [sa, sb, want] of cases) {
    const y = matmul(
      tensor(new Float32Array(sa.reduce((p, d) => p * d, 1)), sa, { device }),
      tensor(
        new Float32Array(sb.reduce((p, d) => p * d, 1)),
        sb,
        { device },
      ),
    );
    assertEquals([...y.shape], want, `${JSON.stringify(sa)} · ${JSON.stringify(sb)}`);
  }
});

gpuTest("a vector-load matmul does not break later small kernels in the same pass (wgpu#7359)", async () => {
  const device = await gpuDevice();
  // [1, 4] · [4, 4]: both operands qualify for vec4 loads; the device binds ≥ 16 bytes so the next kernel still validates. All inputs
  // are written first, since a write flushes (ends the pass) and would hide the bug.
  const a = tensor([1, 2, 3, 4], [1, 4], { device }),
    b = tensor(new Float32Array(16).fill(1), [4, 4], { device });
  const u = tensor([1, 2], [2], { device }), v = tensor([3, 4], [2], { device });
  const y = matmul(a, b);
  const small = map(bin("add", inp(0), inp(1)), [u, v]);
  assertEquals(Array.from(await values(small)), [4, 6]);
  assertEquals(Array.from(await values(y)), [10, 10, 10, 10]);
});

test("matmul / linear: finite-difference gradient checks", async () => {
  const data = (shape: number[], seed: number) => ({
    shape,
    data: seededValues(shape.reduce((p, d) => p * d, 1), seed),
  });
  const pairs: [number[], number[]][] = [
    [[3], [3]],
    [[2, 3], [3]],
    [[3], [3, 4]],
    [[2, 3], [3, 4]],
    [[2, 3, 4], [4, 5]], // folded batch, single B (dB in one GEMM)
    [[3, 4], [2, 4, 5]], // single A broadcast over B's batch
    [[2, 1, 2, 3], [3, 3, 2]], // partial broadcasts on both sides (materialised)
    [[2, 2, 3], [3]],
    [[3], [2, 3, 2]],
  ];
  for (const [sa, sb] of pairs) await gradCheck(matmul, [data(sa, 1), data(sb, 2)]);
  // Transposed operands (stored shapes), including the folded single-B gradient read transposed.
  const transposed: [number[], number[], boolean, boolean][] = [
    [[3, 2], [3, 4], true, false],
    [[2, 3], [4, 3], false, true],
    [[3, 2], [4, 3], true, true],
    [[2, 2, 3], [5, 3], false, true],
    [[2, 3, 2], [3, 4], true, false],
  ];
  for (const [sa, sb, transposeA, transposeB] of transposed) {
    await gradCheck((x, y) => matmulTransposed(x, y, { transposeA, transposeB }), [
      data(sa, 11),
      data(sb, 12),
    ]);
  }
  await gradCheck((x, w, b) => linear(x, w, b), [data([2, 3, 4], 3), data([5, 4], 4), data([5], 5)]);
  await gradCheck((x, w) => linear(x, w), [data([4], 6), data([3, 4], 7)]);
  await gradCheck((x, w, b) => linear(x, w, b), [data([4], 8), data([2, 4], 9), data([2], 10)]);
});

gpuTest("linear: GPU matches the CPU backend (values and gradients)", async () => {
  const gpu = await gpuDevice(), cpu = await cpuDevice();
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.integer({ min: 1, max: 5 }), { maxLength: 2 }),
      dimArb,
      dimArb,
      fc.boolean(),
      seedArb,
      async (lead, inF, outF, withBias, seed) => {
        const shapes = [[...lead, inF], [outF, inF], ...(withBias ? [[outF]] : [])];
        const f = (x: Tensor, w: Tensor, b?: Tensor) => linear(x, w, b);
        await assertBackendsAgree([gpu, cpu], f, shapes, seed, `linear ${JSON.stringify(shapes)}`);
      },
    ),
    { numRuns: RUNS },
  );
});

test("matmul / linear: shape errors name the op and both shapes", async () => {
  const device = await cpuDevice();
  const z = (...s: number[]) => tensor(new Float32Array(s.reduce((p, d) => p * d, 1)), s, { device });
  const expectError = (f: () => unknown, ...parts: string[]) => {
    const e = assertThrows(f);
    for (const p of parts) {
      if (!e.message.includes(p)) throw new Error(`error "${e.message}" does not mention ${p}`);
    }
  };
  expectError(() => matmul(z(2, 3), z(4, 5)), "matmul", "[2, 3]", "[4, 5]");
  expectError(() => matmul(z(3), z(4)), "matmul", "[3]", "[4]");
  expectError(() => matmul(z(2, 2, 3), z(3, 3, 4)), "matmul", "[2, 2, 3]", "[3, 3, 4]");
  expectError(() => matmul(z(2, 3), tensor([1], [], { device })), "matmul", "[2, 3]", "[]");
  expectError(() => linear(z(2, 3), z(4, 5)), "linear", "[2, 3]", "[4, 5]");
  expectError(() => linear(z(2, 3), z(4, 3), z(5)), "linear", "[5]", "[4, 3]");
  expectError(() => linear(z(2, 3), z(3)), "linear", "[3]");
});

test("matmul kernel: alpha scales the product and not the bias; a non-finite alpha is refused", async () => {
  const cpu = await cpuDevice();
  const op = { batchStride: 0, rowStride: 2, colStride: 1 };
  // [1, 2; 3, 4] · [1, 0; 0, 1] = the first; times −0.5, plus bias [10, 20].
  const p: MatmulParams = { batch: 1, M: 2, N: 2, K: 2, a: op, b: op, bias: true, alpha: -0.5 };
  const got = await runKernel(cpu, p, [
    new Float32Array([1, 2, 3, 4]),
    new Float32Array([1, 0, 0, 1]),
    new Float32Array([10, 20]),
  ], 4);
  assertEquals(Array.from(got), [9.5, 19, 8.5, 18]);
  const gpuCaps = {
    description: "",
    isCpuEmulated: false,
    maxWorkgroupsPerDimension: 65535,
    maxStorageBufferBindingSize: 1 << 30,
    features: new Set<string>(),
  };
  assertThrows(() => matmulKernel.gpu({ ...p, alpha: Infinity }, gpuCaps), "alpha must be finite");
});

gpuTest(
  "matmul kernel: an output layout writes into part of a larger buffer and leaves the rest; overlaps are refused",
  async () => {
    const gpu = await gpuDevice(), cpu = await cpuDevice();
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 }),
        dimArb,
        dimArb,
        dimArb,
        fc.integer({ min: 0, max: 5 }),
        fc.integer({ min: 0, max: 3 }),
        fc.integer({ min: 0, max: 7 }),
        fc.constantFrom("registers", "shared", "texture") as fc.Arbitrary<MatmulVariant>,
        seedArb,
        async (batch, M, N, K, offset, rowGap, batchGap, variant, seed) => {
          const rowStride = N + rowGap, batchStride = (M - 1) * rowStride + N + batchGap;
          const len = offset + batch * batchStride + 3;
          const a = { batchStride: M * K, rowStride: K, colStride: 1 },
            b = { batchStride: K * N, rowStride: N, colStride: 1 };
          const p: MatmulParams = { batch, M, N, K, a, b, variant, out: { offset, batchStride, rowStride } };
          const inputs = [seededValues(batch * M * K, seed), seededValues(batch * K * N, seed + 1)];
          // A sentinel everywhere: the elements outside the product's places must keep it.
          const fill = () => new Float32Array(len).fill(-7);
          const [got] = await runOnBuffers(gpu, matmulKernel, p, inputs, [fill()]);
          const [want] = await runOnBuffers(cpu, matmulKernel, p, inputs, [fill()]);
          assertClose(got, want, { rtol: 1e-4, atol: 1e-5 * K }, `matmul ${JSON.stringify(p)}`);
          const contiguous = await runKernel(cpu, { ...p, out: undefined }, inputs, batch * M * N);
          for (let bi = 0; bi < batch; bi++) {
            for (let m = 0; m < M; m++) {
              for (let n = 0; n < N; n++) {
                const at = offset + bi * batchStride + m * rowStride + n;
                if (want[at] !== contiguous[(bi * M + m) * N + n]) {
                  throw new Error(`element ${bi},${m},${n} misplaced`);
                }
                want[at] = -7;
              }
            }
          }
          if (!want.every((v) => v === -7)) {
            throw new Error("an element outside the output layout was written");
          }
        },
      ),
      { numRuns: RUNS },
    );
    const op = { batchStride: 0, rowStride: 2, colStride: 1 };
    const caps = {
      description: "",
      isCpuEmulated: false,
      maxWorkgroupsPerDimension: 65535,
      maxStorageBufferBindingSize: 1 << 30,
      features: new Set<string>(),
    };
    const p: MatmulParams = { batch: 2, M: 2, N: 2, K: 2, a: op, b: op };
    assertThrows(
      () => matmulKernel.gpu({ ...p, out: { offset: 0, batchStride: 4, rowStride: 1 } }, caps),
      "overlaps itself",
    );
    assertThrows(
      () => matmulKernel.gpu({ ...p, out: { offset: 0, batchStride: 3, rowStride: 2 } }, caps),
      "overlaps itself",
    );
  },
);
