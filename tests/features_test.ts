/**
 * @file Tests of the embedded feature network (eval/features.ts): the architecture (parameter count, feature
 * length, any input size, shape errors), the shipped weights (they classify held-out procedural images, and the
 * Fréchet distance through them grows with the strength of a disturbance, as Heusel et al. 2017 §4 ask of FID:
 * Gaussian noise of increasing σ, and blur), and the seeded build (the same seed gives the same weights).
 */

import { ok as assert } from "node:assert";
import { type Device, tensor } from "../engine/mod.ts";
import { ProceduralShapes } from "../models/data.ts";
import { Rng } from "../util/random.ts";
import { FeatureStatistics, fidFromStatistics } from "../eval/fid.ts";
import {
  quantizedTensor,
  SHAPES_NET_CHANNELS,
  SHAPES_NET_DIM,
  shapesAccuracy,
  ShapesNet,
  trainShapesNet,
} from "../eval/features.ts";
import { assertEquals, assertThrows, gpuDevice, readAll, test } from "./util.ts";

test("ShapesNet: parameter count from the architecture, 240 features at any input size, shape errors", async () => {
  const device = await gpuDevice();
  const net = new ShapesNet({ device });
  try {
    // Per stage: two 3×3 convs with bias and two GroupNorms (γ, β); then the 128 → 5 head.
    let expected = 0, cin = 3;
    for (const c of SHAPES_NET_CHANNELS) {
      expected += cin * c * 9 + c + c * c * 9 + c + 4 * c;
      cin = c;
    }
    expected += 128 * 5 + 5;
    assertEquals(net.parameterCount(), expected);
    assertEquals(SHAPES_NET_DIM, 240);
    for (const size of [16, 32, 7]) {
      const x = tensor(new Float32Array(2 * 3 * size * size).fill(100), [2, 3, size, size], { device });
      const f = net.features(x);
      assertEquals(f.shape, [2, 240]);
      const [v] = await readAll([f]);
      assert(v.every(Number.isFinite), `finite features at ${size}×${size}`);
      x.dispose();
      f.dispose();
    }
    const bad = tensor(new Float32Array(16), [1, 1, 4, 4], { device });
    assertThrows(() => net.features(bad), "[1,1,4,4]");
    bad.dispose();
  } finally {
    net.dispose();
  }
});

/** The first n images of a procedural set, [n, 3, R, R] in [−1, 1] on the host. */
function images(seed: number, n: number, R = 16): Float32Array {
  const ds = new ProceduralShapes({ resolution: R, seed, length: n });
  const per = 3 * R * R, out = new Float32Array(n * per);
  for (let i = 0; i < n; i++) out.set(ds.get(i).image, i * per);
  return out;
}

async function statistics(net: ShapesNet, x: Float32Array, n: number, R: number, device: Device) {
  const t = quantizedTensor(x, [n, 3, R, R], device);
  const f = net.features(t);
  const [host] = await readAll([f]);
  t.dispose();
  f.dispose();
  return new FeatureStatistics(SHAPES_NET_DIM).add(host).statistics();
}

/** A 3×3 box blur of every channel (edges clamped). */
function blur(x: Float32Array, n: number, R: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let p = 0; p < n * 3; p++) {
    for (let y = 0; y < R; y++) {
      for (let xx = 0; xx < R; xx++) {
        let s = 0;
        for (let dy = -1; dy <= 1; dy++) {
          for (let dx = -1; dx <= 1; dx++) {
            const yy = Math.min(R - 1, Math.max(0, y + dy)), xc = Math.min(R - 1, Math.max(0, xx + dx));
            s += x[p * R * R + yy * R + xc];
          }
        }
        out[p * R * R + y * R + xx] = s / 9;
      }
    }
  }
  return out;
}

test("shipped ShapesNet: classifies held-out shapes; FID through it grows with noise and blur", async () => {
  const device = await gpuDevice();
  const net = await ShapesNet.load(undefined, { device });
  try {
    assert(/^[0-9a-f]{16}$/.test(net.fingerprint), `fingerprint ${net.fingerprint}`);
    // Held-out images (the build trains on seed 1000): chance is 20%.
    for (const R of [16, 32]) {
      const acc = await shapesAccuracy(net, new ProceduralShapes({ resolution: R, seed: 77 }), 256);
      assert(acc >= 0.6, `accuracy ${acc} at ${R}×${R}`);
    }
    const n = 384, R = 16;
    const real = await statistics(net, images(5, n), n, R, device);
    const other = images(6, n);
    const fid = async (x: Float32Array) => fidFromStatistics(real, await statistics(net, x, n, R, device));
    const base = await fid(other);
    const rng = new Rng(9);
    // Box–Muller normals from the data module's seeded generator.
    const normal = () => Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next());
    const noisy = (sigma: number) => other.map((v) => v + sigma * normal());
    const byNoise = [base];
    for (const sigma of [0.05, 0.1, 0.2, 0.4]) byNoise.push(await fid(noisy(sigma)));
    for (let i = 1; i < byNoise.length; i++) {
      assert(byNoise[i] > byNoise[i - 1], `FID by noise σ should grow: ${byNoise.map((v) => v.toFixed(2))}`);
    }
    assert(byNoise[4] > 5 * base, `strong noise should be far: ${byNoise.map((v) => v.toFixed(2))}`);
    const blurred = await fid(blur(other, n, R));
    assert(blurred > 2 * base, `blur: ${blurred} vs ${base}`);
  } finally {
    net.dispose();
  }
});

test("trainShapesNet: the same seed builds the same weights; options are checked", async () => {
  const device = await gpuDevice();
  const opts = { steps: 3, batch: 4, heldOut: 4, seed: 5 };
  const a = await trainShapesNet(opts, { device }), b = await trainShapesNet(opts, { device });
  try {
    const wa = await readAll(a.net.parameters()), wb = await readAll(b.net.parameters());
    wa.forEach((w, i) => assertEquals(Array.from(w), Array.from(wb[i])));
    assert(Number.isFinite(a.finalLoss));
    assert(a.accuracy.r16 >= 0 && a.accuracy.r16 <= 1);
  } finally {
    a.net.dispose();
    b.net.dispose();
  }
  await trainShapesNet({ steps: 0 }, { device }).then(
    () => assert(false, "expected an error"),
    (e) => assert(/steps/.test((e as Error).message), (e as Error).message),
  );
});
