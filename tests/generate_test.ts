/**
 * @file Tests of the image generators (models/generate.ts) on the CPU backend: an in-memory `NetworkGenerator`
 * over a trainer's EMA network and a `CheckpointGenerator` of the same weights give identical images; a width
 * schedule of all 1 equals width 1; a schedule that changes the width per step runs the network at exactly those
 * widths (both of Heun's evaluations of step i at step i's width, a σ schedule looked up at the step's t_i);
 * and the proxy FID (eval/proxy.ts) measures an in-memory generator as it does a checkpoint's.
 */

import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { mean, type Tensor } from "../engine/mod.ts";
import { saveCheckpoint } from "../models/checkpoint.ts";
import { ProceduralShapes } from "../models/data.ts";
import {
  CheckpointGenerator,
  type ImageGenerator,
  NetworkGenerator,
  type SamplerSettings,
  SamplerSettingsSchema,
} from "../models/generate.ts";
import { edmTimeSteps } from "../models/samplers.ts";
import { parseTrainerConfig, Trainer } from "../models/trainer.ts";
import type { UNet, UNetForwardOptions } from "../models/unet.ts";
import type { FeatureExtractor } from "../eval/features.ts";
import { datasetStatistics, measureFid } from "../eval/proxy.ts";
import { assertThrows, cpuDevice, MICRO_UNET, test } from "./util.ts";

const settings = (o: Partial<SamplerSettings>): SamplerSettings => SamplerSettingsSchema.parse(o);

/** A trainer of the micro network after 3 steps (so the EMA differs from the raw weights and from the init). */
async function trainedMicro(): Promise<Trainer> {
  const cfg = parseTrainerConfig({
    network: MICRO_UNET,
    data: { kind: "procedural", resolution: 8, length: 16 },
    batch: 4,
    lr: 2e-3,
    lrRampupKimg: 0.004,
    emaHalfLifeKimg: 0.004,
    logEvery: 3,
  });
  const trainer = await Trainer.create(cfg, await cpuDevice());
  await trainer.run({ steps: 3 });
  return trainer;
}

/** Images start..start+count−1 of a generator, read back. */
async function images(gen: ImageGenerator, start: number, count: number, s: SamplerSettings, seed = 3) {
  const x = gen.generate(start, count, { seed, settings: s });
  try {
    return Array.from(await x.toArray());
  } finally {
    x.dispose();
  }
}

/** Records the width of every call of `net.forward` until the returned function restores it. */
function recordWidths(net: UNet): { widths: number[]; restore: () => void } {
  const forward = net.forward;
  const widths: number[] = [];
  net.forward = (x: Tensor, c: Tensor, l?: Tensor | null, o?: UNetForwardOptions) => {
    widths.push(o?.width ?? 1);
    return forward.call(net, x, c, l ?? null, o);
  };
  return { widths, restore: () => (net.forward = forward) };
}

test("an in-memory NetworkGenerator and a CheckpointGenerator of the same weights give identical images", async () => {
  const trainer = await trainedMicro();
  const dir = await Deno.makeTempDir({ prefix: "generate_test_" });
  let fromDisk: CheckpointGenerator | undefined;
  try {
    const { progress, ...tensors } = trainer.stateDict();
    const ck = await saveCheckpoint(dir, { ...tensors, state: { ...progress, config: {} } });
    fromDisk = await CheckpointGenerator.open(ck, trainer.network.spec, { device: trainer.device });
    const inMemory = new NetworkGenerator(trainer.emaNetwork());
    for (const s of [settings({ steps: 3 }), settings({ steps: 3, sampler: "stochastic", sChurn: 10 })]) {
      const want = await images(fromDisk, 1, 3, s);
      assertEquals(await images(inMemory, 1, 3, s), want);
      assert(want.every(Number.isFinite));
    }
    // The raw weights give other images (the comparison above is not between two arbitrary equal things).
    trainer.network.eval();
    const s = settings({ steps: 3 });
    const fromEma = await images(fromDisk, 1, 3, s);
    assert((await images(new NetworkGenerator(trainer.network), 1, 3, s)).some((v, i) => v !== fromEma[i]));
    assertEquals([inMemory.imageShape, inMemory.labelDim], [[3, 8, 8], 0]);
    // Disposing an in-memory generator leaves the trainer's network alive.
    inMemory.dispose();
    assertEquals(await images(new NetworkGenerator(trainer.emaNetwork()), 1, 3, s), fromEma);
  } finally {
    fromDisk?.dispose();
    trainer.dispose();
    await Deno.remove(dir, { recursive: true });
  }
});

test("a width schedule of all 1 equals width 1; per-step widths are the widths the network runs at", async () => {
  const trainer = await trainedMicro();
  const net = trainer.emaNetwork();
  try {
    const s = settings({ steps: 4 });
    const full = await images(new NetworkGenerator(net, { width: 1 }), 0, 2, s);
    assertEquals(
      await images(new NetworkGenerator(net, { width: { by: "step", widths: [1, 1, 1, 1] } }), 0, 2, s),
      full,
    );
    const allSigma = { by: "sigma" as const, ranges: [{ sigmaMin: 0, sigmaMax: 80, width: 1 }] };
    assertEquals(await images(new NetworkGenerator(net, { width: allSigma }), 0, 2, s), full);

    // By step: Heun evaluates steps 0–2 twice (Euler, then the correction at t_{i+1}) and the last step once.
    const rec = recordWidths(net);
    try {
      const byStep = new NetworkGenerator(net, { width: { by: "step", widths: [1, 0.5, 0.75, 0.25] } });
      const slim = await images(byStep, 0, 2, s);
      assertEquals(rec.widths, [1, 1, 0.5, 0.5, 0.75, 0.75, 0.25]);
      assert(slim.some((v, i) => v !== full[i]), "slimmer steps give other images");
      rec.widths.length = 0;
      await images(byStep, 0, 2, { ...s, sampler: "euler" });
      assertEquals(rec.widths, [1, 0.5, 0.75, 0.25]);

      // By σ, looked up at the step's t_i: with 3 steps t = [80, ≈2.5, 0.002, 0]; step 1's correction is
      // evaluated at 0.002, in the 0.25 band, but runs at step 1's width 0.5.
      const t = edmTimeSteps(3);
      assert(t[1] > 1 && t[2] < 1, `t = ${Array.from(t)}`);
      rec.widths.length = 0;
      const bySigma = new NetworkGenerator(net, {
        width: {
          by: "sigma",
          ranges: [{ sigmaMin: 0, sigmaMax: 1, width: 0.25 }, { sigmaMin: 1, sigmaMax: 80, width: 0.5 }],
        },
      });
      await images(bySigma, 0, 2, settings({ steps: 3 }));
      assertEquals(rec.widths, [0.5, 0.5, 0.5, 0.5, 0.25]);
    } finally {
      rec.restore();
    }
    const short = new NetworkGenerator(net, { width: { by: "step", widths: [1, 0.5] } });
    assertThrows(() => short.generate(0, 1, { seed: 0, settings: s }), "2 widths, the sampler takes 4 steps");
    assertThrows(() => new NetworkGenerator(net, { width: 1.5 }), "width must be in (0, 1]");
  } finally {
    trainer.dispose();
  }
});

test("measureFid measures an in-memory generator exactly as the checkpoint of the same weights", async () => {
  const trainer = await trainedMicro();
  const device = trainer.device;
  const dir = await Deno.makeTempDir({ prefix: "generate_test_" });
  // Features: the channel means (exact and fast; the Fréchet machinery is what is under test).
  const extractor: FeatureExtractor = {
    name: "channel-means",
    dim: 3,
    fingerprint: "test",
    device,
    features: (x) => mean(x, [2, 3]),
    dispose: () => {},
  };
  let fromDisk: CheckpointGenerator | undefined;
  try {
    const ref = await datasetStatistics(
      new ProceduralShapes({ resolution: 8, length: 32, seed: 1 }),
      extractor,
      32,
    );
    const protocol = { n: 6, steps: 2, sampler: "heun" as const, seed: 0 };
    const inMemory = new NetworkGenerator(trainer.emaNetwork());
    const m = await measureFid("RFID", inMemory, extractor, ref.stats, protocol, { batch: 4 });
    assertEquals([m.name, m.nfe, m.stats.count], ["RFID-6", 3, 6]);
    assert(Number.isFinite(m.value) && m.value > 0, `RFID ${m.value}`);
    const { progress, ...tensors } = trainer.stateDict();
    const ck = await saveCheckpoint(dir, { ...tensors, state: { ...progress, config: {} } });
    fromDisk = await CheckpointGenerator.open(ck, trainer.network.spec, { device });
    const d = await measureFid("RFID", fromDisk, extractor, ref.stats, protocol, { batch: 4 });
    assertEquals(d.value, m.value);
  } finally {
    fromDisk?.dispose();
    trainer.dispose();
    await Deno.remove(dir, { recursive: true });
  }
});
