/**
 * @file The device profiler (engine/webgpu/profiler.ts): every dispatch since the last call is counted under its
 * kernel's name and under its parameters, and the work's results are unchanged by profiling.
 */

import * as T from "../engine/mod.ts";
import { describeParams } from "../engine/webgpu/profiler.ts";
import { assertEquals, gpuDevice, gpuTest, test } from "./util.ts";

test("describeParams: scalars as name=value, short numeric arrays joined, the rest left out", () => {
  assertEquals(
    describeParams({
      N: 2,
      bias: true,
      op: "sum",
      shape: [3, 4],
      expr: { a: 1 },
      long: [1, 2, 3, 4, 5, 6, 7],
    }),
    "N=2 bias=true op=sum shape=3×4",
  );
  assertEquals(describeParams(null), "");
  const expr = {
    op: "mul",
    a: { op: "in", i: 0 },
    b: { op: "add", a: { op: "in", i: 1 }, b: { op: "const", i: 0 } },
  };
  assertEquals(describeParams({ expr }), "expr=mul(x0,add(x1,c0))");
});

gpuTest(
  "Device.profile: null unless asked for; counts each dispatch by kernel and by parameters",
  async () => {
    assertEquals(await (await gpuDevice()).profile(), null);
    const device = await T.Device.create({ backend: "webgpu", fallback: false, profile: true });
    try {
      if (!device.info.features.includes("timestamp-query")) {
        assertEquals(await device.profile(), null);
        return;
      }
      const a = T.tensor([1, 2, 3, 4, 5, 6], [2, 3], { device }),
        b = T.tensor([1, 0, 0, 1, 1, 1], [3, 2], { device });
      await device.profile(); // the creation's known-answer kernel and the writes
      const c = T.matmul(a, b), s = T.sum(c);
      assertEquals(Array.from(await c.toArray()), [4, 5, 10, 11]);
      assertEquals(Array.from(await s.toArray()), [30]);
      const p = (await device.profile())!;
      const matmul = p.kernels.find((r) => r.label === "matmul");
      assertEquals(matmul?.count, 1);
      assertEquals(p.kernels.reduce((n, r) => n + r.count, 0), p.shapes.reduce((n, r) => n + r.count, 0));
      assertEquals(p.shapes.filter((r) => r.label.startsWith("matmul ")).length, 1);
      // (Times are not checked: on llvmpipe the timestamps do not bracket the work, see profiler.ts.)
      assertEquals((await device.profile())!.kernels.length, 0);
      [a, b, c, s].forEach((t) => t.dispose());
    } finally {
      device.destroy();
    }
  },
);
