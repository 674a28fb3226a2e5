/**
 * @file The same op chain on the WebGPU and the CPU backend gives the same numbers within float32 tolerance:
 * a ResBlock-shaped chain (conv, groupNorm, SiLU, scale-shift from an embedding, attention, resampling, a skip
 * connection, an MSE loss), forward and every gradient, with one sync at the end.
 */

import fc from "fast-check";
import * as T from "../engine/mod.ts";
import type { Device, Tensor } from "../engine/mod.ts";
import {
  assertClose,
  assertEquals,
  cpuDevice,
  gpuDevice,
  gpuTest,
  RUNS,
  seedArb,
  seededValues,
} from "./util.ts";

interface Case {
  N: number;
  C: number;
  H: number;
  E: number;
  seed: number;
}

/** Runs the chain on `device`; returns the loss and the gradient of every parameter, as host arrays. */
async function chain(device: Device, c: Case): Promise<Float32Array[]> {
  const { N, C, H, E, seed } = c;
  const mk = (shape: number[], s: number, scale = 0.5, grad = true) =>
    T.tensor(seededValues(shape.reduce((a, b) => a * b, 1), seed + s, -scale, scale), shape, {
      device,
      requiresGrad: grad,
    });
  const x = mk([N, C, H, H], 1, 1, false),
    emb = mk([N, E], 2, 1, false),
    target = mk([N, C, H, H], 3, 1, false);
  const params: Tensor[] = [
    mk([C, C, 3, 3], 4, 0.3), // conv0 weight
    mk([C], 5, 0.1), // conv0 bias
    mk([C], 6, 0.2), // norm weight
    mk([C], 7, 0.2), // norm bias
    mk([2 * C, E], 8, 0.3), // emb → scale, shift
    mk([C, C, 1, 1], 9, 0.3), // 1×1 conv
  ];
  const [w0, b0, gw, gb, we, w1] = params;
  const G = C / 2;
  const out = T.scope(() => {
    let h = T.conv2d(x, w0, b0, { padding: 1 });
    h = T.groupNorm(h, G, gw, gb);
    const ss = T.reshape(T.linear(emb, we), [N, 2 * C, 1, 1]);
    const scale = T.narrow(ss, 1, 0, C), shift = T.narrow(ss, 1, C, C);
    h = T.silu(T.add(T.mul(h, T.add(scale, 1)), shift));
    // Self-attention over positions, then down and up again, then a 1×1 conv and the skip.
    const seq = T.permute(T.reshape(h, [N, C, H * H]), [0, 2, 1]);
    const att = T.scaledDotProductAttention(seq, seq, seq);
    h = T.reshape(T.permute(att, [0, 2, 1]), [N, C, H, H]);
    h = T.interpolateNearest(T.avgPool2d(h, 2), 2);
    h = T.add(T.conv2d(h, w1), x);
    const loss = T.mseLoss(h, target);
    loss.backward();
    return loss;
  });
  const result = [await out.toArray(), ...(await Promise.all(params.map((p) => p.grad!.toArray())))];
  [out, x, emb, target, ...params, ...params.map((p) => p.grad!)].forEach((t) => t.dispose());
  return result;
}

gpuTest("a ResBlock-shaped chain gives the same loss and gradients on WebGPU and CPU", async () => {
  const gpu = await gpuDevice(), cpu = await cpuDevice();
  await fc.assert(
    fc.asyncProperty(
      fc.record({
        N: fc.integer({ min: 1, max: 2 }),
        C: fc.constantFrom(2, 4, 6),
        H: fc.constantFrom(2, 4, 6),
        E: fc.integer({ min: 1, max: 5 }),
        seed: seedArb,
      }),
      async (c) => {
        const [g, r] = [await chain(gpu, c), await chain(cpu, c)];
        const names = [
          "loss",
          "conv0.weight",
          "conv0.bias",
          "norm.weight",
          "norm.bias",
          "emb.weight",
          "conv1.weight",
        ];
        g.forEach((v, i) =>
          assertClose(v, r[i], { rtol: 2e-4, atol: 2e-5 }, `${names[i]} ${JSON.stringify(c)}`)
        );
      },
    ),
    { numRuns: Math.max(5, Math.floor(RUNS / 2)) },
  );
});

gpuTest(
  "cached bind groups: a repeated chain finds every bind group again and gives the same numbers",
  async () => {
    // The pools hand out their earliest-created free buffer or texture, so from the second run on the chain gets
    // the same ones in the same roles and creates no bind group.
    const gpu = await gpuDevice();
    const c: Case = { N: 2, C: 4, H: 4, E: 3, seed: 7 };
    const first = await chain(gpu, c);
    await chain(gpu, c);
    const before = gpu.counters();
    const again = await chain(gpu, c);
    const after = gpu.counters();
    assertEquals(after.bindGroups - before.bindGroups, 0, "bind groups created by the third run");
    if (after.bindGroupReuses === before.bindGroupReuses) throw new Error("the third run bound nothing");
    again.forEach((v, i) => assertClose(v, first[i], { rtol: 0, atol: 0 }, `output ${i}`));
  },
);

gpuTest(
  "cached bind groups: allocations of any size in a reused pool buffer read and write their own elements",
  async () => {
    // Sizes within one pool bucket share buffers (and so bind groups, which bind the whole bucket): every
    // allocation must still see exactly its own elements, whatever size held the buffer before.
    const gpu = await gpuDevice();
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 2, maxLength: 6 }),
        seedArb,
        async (sizes, seed) => {
          for (const [k, n] of sizes.entries()) {
            const values = seededValues(n, seed + k, -1, 1);
            const x = T.tensor(values, [n], { device: gpu });
            const y = T.mul(T.add(x, 1), 2);
            const s = T.sum(y);
            const [got, total] = [await y.toArray(), await s.toArray()];
            const want = Float32Array.from(values, (v) => Math.fround(Math.fround(Math.fround(v) + 1) * 2));
            assertClose(got, want, { rtol: 0, atol: 0 }, `y of size ${n}`);
            assertClose(
              total,
              [want.reduce((a, b) => a + b, 0)],
              { rtol: 1e-5, atol: 1e-5 },
              `sum of size ${n}`,
            );
            [x, y, s].forEach((t) => t.dispose());
          }
        },
      ),
      { numRuns: Math.max(5, Math.floor(RUNS / 2)) },
    );
  },
);
