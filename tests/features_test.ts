/**
 * @file Tests of the embedded feature network (eval/features.ts) and its validity controls (eval/controls.ts):
 * the architecture (parameter count, 128 last-stage features at any input size, shape errors), batch
 * normalisation (training mode standardises per channel; calibration makes evaluation mode reproduce it), the
 * shipped weights (≥ 93% held-out accuracy on the bold scenes, recorded in the metadata, and on the default flat
 * scenes, measured), the controls' order
 * on small samples (real < noise σ = 0.05 < 0.1 < 0.2 < 0.4; blur above real; no shapes worse than σ = 0.2
 * noise, as Heusel et al. 2017 §4 ask of FID and the issue that added the controls asks of shape features), and
 * the seeded build (same seed, same weights; it refuses to replace a file without force or to write a network
 * below the accuracy bar).
 */

import { ok as assert } from "node:assert";
import { decodeSafetensors, randn, tensor } from "../engine/mod.ts";
import { PROCEDURAL_SCENES, ProceduralShapes, renderProcedural } from "../models/data.ts";
import { controlImage, CONTROLS, measureControls } from "../eval/controls.ts";
import {
  BatchNorm2d,
  buildShapesNet,
  SHAPES_NET_CHANNELS,
  SHAPES_NET_DIM,
  SHAPES_NET_FILE,
  SHAPES_NET_MIN_ACCURACY,
  shapesAccuracy,
  ShapesNet,
  trainShapesNet,
} from "../eval/features.ts";
import {
  assertClose,
  assertEquals,
  assertRejects,
  assertThrows,
  gpuDevice,
  gpuTest,
  readAll,
  test,
} from "./util.ts";

/** The `__metadata__` of a safetensors file. */
async function metadataOf(path: string): Promise<Record<string, string>> {
  return decodeSafetensors(await Deno.readFile(path), path).metadata;
}

gpuTest(
  "ShapesNet: parameter count from the architecture, 128 features at any input size, shape errors",
  async () => {
    const device = await gpuDevice();
    const net = new ShapesNet({ device });
    try {
      // Per stage: two 3×3 convs without bias and two BatchNorms (γ, β); then the 128 → 5 head.
      let expected = 0, cin = 3;
      for (const c of SHAPES_NET_CHANNELS) {
        expected += cin * c * 9 + c * c * 9 + 4 * c;
        cin = c;
      }
      expected += 128 * 5 + 5;
      assertEquals(net.parameterCount(), expected);
      assertEquals(SHAPES_NET_DIM, 128);
      for (const size of [16, 32, 7]) {
        const x = tensor(new Float32Array(2 * 3 * size * size).fill(100), [2, 3, size, size], { device });
        const f = net.eval().features(x);
        assertEquals(f.shape, [2, 128]);
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
  },
);

gpuTest(
  "BatchNorm2d: training mode standardises each channel; calibrated evaluation mode gives the same output",
  async () => {
    const device = await gpuDevice();
    const bn = new BatchNorm2d(3, device);
    device.manualSeed(4);
    const x = randn([5, 3, 4, 4], { device, requiresGrad: false });
    try {
      const [xs] = await readAll([x]);
      const scaled = tensor(xs.map((v, i) => v * (1 + Math.floor(i / 16) % 3) + 2), [5, 3, 4, 4], { device });
      const y = bn.train().forward(scaled);
      const [ys] = await readAll([y]);
      for (let c = 0; c < 3; c++) {
        const vals: number[] = [];
        for (let n = 0; n < 5; n++) for (let p = 0; p < 16; p++) vals.push(ys[(n * 3 + c) * 16 + p]);
        const m = vals.reduce((a, b) => a + b, 0) / vals.length;
        const v = vals.reduce((a, b) => a + (b - m) ** 2, 0) / vals.length;
        assertClose([m, v], [0, 1], { atol: 1e-3 }, `mean and variance of channel ${c}`);
      }
      // Calibration through a network: evaluation mode on the calibration batch equals training mode on it.
      const net = new ShapesNet({ device });
      const img = tensor(Float32Array.from({ length: 8 * 3 * 16 * 16 }, (_, i) => Math.sin(i * 0.37)), [
        8,
        3,
        16,
        16,
      ], {
        device,
      });
      const train = net.train().logits(img);
      net.calibrate(img);
      assert(!net.training, "calibrate leaves evaluation mode");
      const evalOut = net.logits(img);
      const [a, b] = await readAll([train, evalOut]);
      assertClose(b, a, { rtol: 1e-3, atol: 2e-3 }, "logits after calibration");
      for (const t of [y, scaled, train, evalOut, img]) t.dispose();
      net.dispose();
    } finally {
      x.dispose();
      bn.dispose();
    }
  },
);

gpuTest(
  "shipped ShapesNet: ≥ 93% held-out accuracy on the default scenes, recorded with its options",
  async () => {
    const device = await gpuDevice();
    const net = await ShapesNet.load(undefined, { device });
    try {
      assert(/^[0-9a-f]{16}$/.test(net.fingerprint), `fingerprint ${net.fingerprint}`);
      const meta = await metadataOf(SHAPES_NET_FILE.pathname);
      const recorded = JSON.parse(meta.heldOutAccuracy) as Record<string, number>;
      const options = JSON.parse(meta.options) as Record<string, number>;
      assert(options.steps > 0 && options.lr > 0, meta.options);
      assert(recorded.bold >= SHAPES_NET_MIN_ACCURACY, `recorded bold accuracy ${recorded.bold}`);
      // The busy scenes (the largest of up to five shapes among textures) are harder: 80% for the shipped build.
      assert(recorded.busy >= 0.75, `recorded busy accuracy ${recorded.busy}`);
      // Images of a seed the build never saw (it trains on 1000 and reports 1001); chance is 20%.
      // The default flat scenes were added after the build (97.9% on 2,048 images of seed 1001).
      for (const [scene, least] of [["flat", 0.93], ["bold", 0.93], ["busy", 0.7]] as const) {
        const acc = await shapesAccuracy(net, new ProceduralShapes({ resolution: 16, seed: 77, scene }), 256);
        assert(acc >= least, `accuracy ${acc} on ${scene} scenes`);
      }
    } finally {
      net.dispose();
    }
  },
);

test("controls: the image transforms (noise is seeded, background only paints no shapes, channels rotate)", () => {
  const R = 16, P = R * R;
  const real = controlImage("real (other seed)", "bold", 3, 5, R);
  assertEquals(
    Array.from(real),
    Array.from(Float32Array.from(renderProcedural(3, 5, R, { scene: "bold" }).bytes, (b) => b / 127.5 - 1)),
  );
  const noisy = controlImage("noise σ=0.2", "bold", 3, 5, R);
  assertEquals(Array.from(noisy), Array.from(controlImage("noise σ=0.2", "bold", 3, 5, R)));
  const d = noisy.map((v, i) => v - real[i]);
  const sd = Math.sqrt(d.reduce((a, b) => a + b * b, 0) / d.length);
  assert(Math.abs(sd - 0.2) < 0.03, `noise σ ${sd}`);
  // The bold background is a smooth gradient: without the shape, no pixel differs much from its neighbour.
  const bg = controlImage("background only", "bold", 3, 5, R);
  let jump = 0;
  for (let i = 0; i < bg.length; i++) if (i % R) jump = Math.max(jump, Math.abs(bg[i] - bg[i - 1]));
  assert(jump < 0.1, `background-only step ${jump}`);
  assert(
    real.some((v, i) => Math.abs(v - bg[i]) > 0.3),
    "the shape is missing from the background-only image",
  );
  const perm = controlImage("colours permuted", "bold", 3, 5, R);
  assertEquals(Array.from(perm.subarray(0, P)), Array.from(real.subarray(P, 2 * P)));
  assertEquals(Array.from(perm.subarray(2 * P)), Array.from(real.subarray(0, P)));
  // The flat background is one grey: the background-only image is constant, the real one is not.
  const flatBg = controlImage("background only", "flat", 3, 5, R);
  assert(flatBg.every((v) => v === flatBg[0]), "the flat background-only image is not one grey");
  assert(controlImage("real (other seed)", "flat", 3, 5, R).some((v) => v !== flatBg[0]), "no flat shape");
});

gpuTest(
  "controls through the shipped ShapesNet (n = 256): real < noise ladder; no shapes worse than σ = 0.2",
  async () => {
    const device = await gpuDevice();
    const net = await ShapesNet.load(undefined, { device });
    try {
      for (const scene of PROCEDURAL_SCENES) {
        const rows = await measureControls(net, { scene, resolution: 16, n: 256 });
        const fid = Object.fromEntries(rows.map((r) => [r.control, r.fid]));
        const table = rows.map((r) => `${r.control} ${r.fid.toFixed(2)}`).join(", ");
        assertEquals(rows.map((r) => r.control), [...CONTROLS]);
        const ladder = ["real (other seed)", "noise σ=0.05", "noise σ=0.1", "noise σ=0.2", "noise σ=0.4"];
        for (let i = 1; i < ladder.length; i++) {
          assert(
            fid[ladder[i]] > fid[ladder[i - 1]],
            `${scene}: ${ladder[i]} above ${ladder[i - 1]}: ${table}`,
          );
        }
        assert(fid["blurred 3×3"] > 2 * fid["real (other seed)"], `${scene}: blur: ${table}`);
        assert(
          fid["background only"] > fid["noise σ=0.2"],
          `${scene}: no shapes must be worse than σ = 0.2: ${table}`,
        );
        assert(fid["background only"] > fid["colours permuted"], `${scene}: ${table}`);
      }
    } finally {
      net.dispose();
    }
  },
);

gpuTest(
  "trainShapesNet: the same seed builds the same weights; the build guards the shipped file",
  async () => {
    const device = await gpuDevice();
    const opts = { steps: 3, batch: 4, heldOut: 4, calibration: 8, seed: 5 };
    const a = await trainShapesNet(opts, { device }), b = await trainShapesNet(opts, { device });
    try {
      const wa = await readAll(Object.values(a.net.stateDict()));
      const wb = await readAll(Object.values(b.net.stateDict()));
      wa.forEach((w, i) => assertEquals(Array.from(w), Array.from(wb[i])));
      assert(Number.isFinite(a.finalLoss));
      for (const scene of PROCEDURAL_SCENES) assert(a.accuracy[scene] >= 0 && a.accuracy[scene] <= 1);
    } finally {
      a.net.dispose();
      b.net.dispose();
    }
    await assertRejects(() => trainShapesNet({ steps: 0 }, { device }), "steps");
    const dir = await Deno.makeTempDir();
    try {
      // An existing file is not replaced without force (refused before any training).
      const existing = `${dir}/net.safetensors`;
      await Deno.writeTextFile(existing, "keep me");
      await assertRejects(() => buildShapesNet(existing, opts, { device }), "--force");
      assertEquals(await Deno.readTextFile(existing), "keep me");
      // A network below the accuracy bar is not written.
      const fresh = `${dir}/fresh.safetensors`;
      const r = await buildShapesNet(fresh, opts, { device, minAccuracy: 1.01 });
      assertEquals(r.written, false);
      await assertRejects(() => Deno.stat(fresh), "No such file");
      // With force and a bar it passes, the file is replaced and carries its options and accuracy.
      const w = await buildShapesNet(existing, opts, { device, force: true, minAccuracy: 0 });
      assertEquals(w.written, true);
      const meta = await metadataOf(existing);
      assertEquals(JSON.parse(meta.options).steps, 3);
      assertEquals(Object.keys(JSON.parse(meta.heldOutAccuracy)).sort(), [...PROCEDURAL_SCENES].sort());
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
