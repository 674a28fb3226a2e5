/**
 * @file Weight inheritance (search/inherit.ts): the leading-slice overlay against a hand-computed case and
 * random shapes, and a child UNet of another width that starts from a parent's weights.
 */

import fc from "fast-check";
import { UNet } from "../models/unet.ts";
import { hostState, inheritWeights, overlayLeadingSlice } from "../search/inherit.ts";
import { assertEquals, cpuDevice, MICRO_UNET, RUNS, test } from "./util.ts";

test("overlayLeadingSlice copies the common leading block of a 2-D tensor and keeps the rest", () => {
  const child = { shape: [3, 2], data: Float32Array.from([0, 0, 0, 0, 0, 0]) };
  const parent = { shape: [2, 4], data: Float32Array.from([1, 2, 3, 4, 5, 6, 7, 8]) };
  assertEquals([...overlayLeadingSlice(child, parent)], [1, 2, 5, 6, 0, 0]);
  assertEquals([...child.data], [0, 0, 0, 0, 0, 0], "child left unchanged");
});

test("overlayLeadingSlice: every element inside the common box comes from the parent, every other from the child", () => {
  const dims = fc.array(fc.integer({ min: 1, max: 4 }), { minLength: 1, maxLength: 4 });
  fc.assert(
    fc.property(dims, dims, (a, b0) => {
      const b = a.map((_, i) => b0[i % b0.length]);
      const size = (s: number[]) => s.reduce((x, y) => x * y, 1);
      const child = { shape: a, data: Float32Array.from({ length: size(a) }, (_, i) => -1 - i) };
      const parent = { shape: b, data: Float32Array.from({ length: size(b) }, (_, i) => i) };
      const out = overlayLeadingSlice(child, parent);
      for (let flat = 0; flat < out.length; flat++) {
        // The child's multi-index of `flat`, then the parent's flat index of the same multi-index.
        let rest = flat, pFlat = 0, inside = true, pStride = 1;
        const idx: number[] = [];
        for (let d = a.length - 1; d >= 0; d--) {
          idx[d] = rest % a[d];
          rest = Math.floor(rest / a[d]);
        }
        for (let d = a.length - 1; d >= 0; d--) {
          if (idx[d] >= b[d]) inside = false;
          pFlat += idx[d] * pStride;
          pStride *= b[d];
        }
        const want = inside ? parent.data[pFlat] : child.data[flat];
        if (out[flat] !== want) return false;
      }
      return true;
    }),
    { numRuns: RUNS * 4 },
  );
});

test("a wider child UNet inherits its parent's weights by name: whole tensors copied, wider ones sliced", async () => {
  const device = await cpuDevice();
  device.manualSeed(1);
  const parent = new UNet(MICRO_UNET, { device });
  device.manualSeed(2);
  const child = new UNet({ ...MICRO_UNET, channelMult: [1, 3] }, { device });
  try {
    const p = await hostState(parent), before = await hostState(child);
    const stats = await inheritWeights(child, p);
    if (stats.copied === 0 || stats.sliced === 0) {
      throw new Error(`expected whole copies and slices: ${JSON.stringify(stats)}`);
    }
    const after = await hostState(child);
    // Every tensor is the parent's leading block over the child's fresh initialisation (or fresh if absent).
    for (const [name, c] of Object.entries(after)) {
      const want = p[name] && p[name].shape.length === c.shape.length
        ? overlayLeadingSlice(before[name], p[name])
        : before[name].data;
      assertEquals([...c.data], [...want], name);
    }
  } finally {
    parent.dispose();
    child.dispose();
  }
});
