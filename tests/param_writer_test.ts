/**
 * @file ParamWriter, the uniform words of every dispatch: u32, i32 (two's complement) and f32 (bit patterns)
 * in order, at least four words, and clear errors past the block or for a bad u32.
 */

import fc from "fast-check";
import { ParamWriter, UNIFORM_WORDS } from "../kernels/types.ts";
import { assertEquals, assertThrows, RUNS, test } from "./util.ts";

type Value = ["u32" | "i32" | "f32", number];

const valueArb: fc.Arbitrary<Value> = fc.oneof(
  fc.tuple(fc.constant("u32" as const), fc.oneof(fc.constantFrom(0, 1, 0xffffffff), fc.nat())),
  fc.tuple(fc.constant("i32" as const), fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 })),
  fc.tuple(
    fc.constant("f32" as const),
    fc.oneof(fc.double(), fc.constantFrom(0, -0, 1e-45, 3.4e38, Infinity, -Infinity, NaN)),
  ),
);

/** The expected words, written through a DataView (little-endian, as the GPU reads the uniform block). */
function reference(values: Value[]): Uint32Array {
  const view = new DataView(new ArrayBuffer(4 * Math.max(values.length, 4)));
  values.forEach(([kind, v], i) => {
    if (kind === "u32") view.setUint32(4 * i, v, true);
    else if (kind === "i32") view.setInt32(4 * i, v, true);
    else view.setFloat32(4 * i, v, true);
  });
  return new Uint32Array(view.buffer);
}

test("ParamWriter: words in order (u32, i32 two's complement, f32 bits), at least four", () => {
  fc.assert(
    fc.property(fc.array(valueArb, { maxLength: UNIFORM_WORDS }), (values) => {
      const w = new ParamWriter();
      for (const [kind, v] of values) w[kind](v);
      assertEquals(w.offset, values.length);
      assertEquals([...w.finish()], [...reference(values)]);
    }),
    { numRuns: RUNS * 4 },
  );
});

test("ParamWriter: more than the uniform block, or a bad u32, is an error that says so", () => {
  const w = new ParamWriter().u32(...new Array(UNIFORM_WORDS).fill(7));
  assertThrows(() => w.f32(1), `exceed ${UNIFORM_WORDS} uniform words`);
  for (const bad of [-1, 1.5, 2 ** 32, NaN]) {
    assertThrows(() => new ParamWriter().u32(bad), "u32 out of range");
  }
});
