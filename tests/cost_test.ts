/**
 * @file Model cost: DDSM's published MACs for its CIFAR-10 supernet at the four widths (within 0.5%), the exact
 * conv / linear / GroupNorm / attention counts against an independent walk of DDSM's slimmable_model.py
 * architecture (done by hand in Python and written down here), the conventions, parameter counts at width 1
 * against `countParameters` for every preset, and latency measurement on a tiny UNet. Memory: the estimate
 * against the measured peak of training steps and sampling, the ceiling's and the binding limit's errors (the
 * field, the largest batch that fits), and the spec's bounds.
 */

import { ok as assert } from "node:assert";
import { Device, nn, randn } from "../engine/mod.ts";
import { measureLatency } from "../eval/cost.ts";
import { checkMemory, estimatedBytes, estimateMemory, type MemoryBudget, unetCost } from "../models/cost.ts";
import { openDataset } from "../models/data.ts";
import { EDMPrecond } from "../models/edm.ts";
import { admImagenet64, ddpmppCifar10, ddsmCifar10 } from "../models/presets.ts";
import { heunSampler } from "../models/samplers.ts";
import { parseTrainerConfig, Trainer } from "../models/trainer.ts";
import { countParameters, parseUNetSpec, SPEC_LIMITS, UNet, type UNetSpecInput } from "../models/unet.ts";
import { UsageError } from "../util/errors.ts";
import { assertThrows, gpuDevice, gpuTest, MICRO_UNET, test } from "./util.ts";

const expectThrow = async (f: () => unknown, ...parts: string[]) => {
  try {
    await f();
  } catch (e) {
    const msg = (e as Error).message;
    for (const p of parts) if (!msg.includes(p)) throw new Error(`error "${msg}" does not mention "${p}"`);
    return;
  }
  throw new Error(`expected an error mentioning ${parts.join(", ")}`);
};

/** DDSM Table: MACs of the CIFAR-10 supernet at widths 1, 0.75, 0.5, 0.25 (6.07 G, 3.42 G, 1.52 G, 382.5 M). */
const PUBLISHED: [number, number][] = [[1, 6070e6], [0.75, 3420e6], [0.5, 1520e6], [0.25, 382.5e6]];

/**
 * Conv, linear, GroupNorm-element and attention counts of DDSM's SlimmableUNet (ch 128, mult [1, 2, 2, 2], 2
 * blocks, attention at 16×16; make_divisible by 8 for convs, 16 for linears, 1 for q/k/v) at each width,
 * from a walk of its module structure written independently of models/unet.ts.
 */
const DDSM_WALK: Record<number, { conv: number; linear: number; gnElements: number; attention: number }> = {
  1: { conv: 6051069952, linear: 2883584, gnElements: 3366912, attention: 167903232 },
  0.75: { conv: 3405053952, linear: 1634304, gnElements: 2525184, attention: 125927424 },
  0.5: { conv: 1514536960, linear: 737280, gnElements: 1683456, attention: 83951616 },
  0.25: { conv: 379518976, linear: 192512, gnElements: 841728, attention: 41975808 },
};

test("DDSM CIFAR-10 supernet: MACs within 0.5% of the published 6070 / 3420 / 1520 / 382.5 M", () => {
  for (const [width, published] of PUBLISHED) {
    const c = unetCost(ddsmCifar10(), width);
    const err = (c.macs - published) / published;
    if (!(Math.abs(err) <= 0.005)) {
      throw new Error(
        `width ${width}: ${c.macs / 1e6} M MACs vs published ${published / 1e6} M (${
          (100 * err).toFixed(2)
        }%)`,
      );
    }
  }
  // The exact totals of the documented convention (regressions show here first).
  const exact = PUBLISHED.map(([w]) => unetCost(ddsmCifar10(), w).macs);
  if (exact.join() !== [6065456000, 3415315872, 1521027008, 382589408].join()) {
    throw new Error(`MACs ${exact}`);
  }
});

test("DDSM CIFAR-10 supernet: each part of the count equals an independent walk of the architecture", () => {
  for (const [width] of PUBLISHED) {
    const want = DDSM_WALK[width];
    const c = unetCost(ddsmCifar10(), width);
    const b = c.breakdown;
    if (b.conv !== want.conv || b.linear !== want.linear || b.attention !== want.attention) {
      throw new Error(`width ${width}: ${JSON.stringify(b)} vs ${JSON.stringify(want)}`);
    }
    if (b.groupNorm !== 2 * want.gnElements) throw new Error(`width ${width}: GroupNorm ${b.groupNorm}`);
    if (c.macs !== b.conv + b.linear + b.bias + b.groupNorm) {
      throw new Error("macs is not the sum of its parts");
    }
    if (c.macsWithAttention !== c.macs + b.attention) throw new Error("macsWithAttention");
    // DDSM's own profile.py (convs and linears only) and the one-MAC-per-GroupNorm-element variant.
    const profile = unetCost(ddsmCifar10(), width, { bias: false, groupNormPerElement: 0 });
    if (profile.macs !== want.conv + want.linear) throw new Error(`profile.py count ${profile.macs}`);
    const gn1 = unetCost(ddsmCifar10(), width, { bias: false, groupNormPerElement: 1 });
    if (gn1.macs !== want.conv + want.linear + want.gnElements) throw new Error(`GN-1 count ${gn1.macs}`);
  }
});

test("parameters at width 1 equal countParameters for every preset; slimmer widths use fewer", () => {
  for (const spec of [ddpmppCifar10(), admImagenet64(), ddsmCifar10()]) {
    const full = unetCost(spec).parameters;
    if (full !== countParameters(spec)) {
      throw new Error(`${full} vs countParameters ${countParameters(spec)}`);
    }
  }
  const widths = PUBLISHED.map(([w]) => unetCost(ddsmCifar10(), w));
  if (widths[0].parameters !== 35_746_307) throw new Error(`DDSM parameters ${widths[0].parameters}`);
  for (let i = 1; i < widths.length; i++) {
    if (!(widths[i].parameters < widths[i - 1].parameters && widths[i].macs < widths[i - 1].macs)) {
      throw new Error(`width ${widths[i].width} does not cost less than ${widths[i - 1].width}`);
    }
  }
  // Costs scale roughly with width² (channels in × channels out).
  const ratio = widths[2].macs / widths[0].macs;
  if (!(ratio > 0.24 && ratio < 0.27)) throw new Error(`half width costs ${ratio} of full`);
});

test("MAC convention options are validated, errors name the field", async () => {
  await expectThrow(() => unetCost(ddsmCifar10(), 1, { groupNormPerElement: -1 }), "groupNormPerElement");
  await expectThrow(() => unetCost(ddsmCifar10(), 1, { bias: "yes" as unknown as boolean }), "bias");
  await expectThrow(() => unetCost(ddsmCifar10(), 0), "width");
});

const TINY: UNetSpecInput = {
  imgResolution: 8,
  inChannels: 3,
  outChannels: 3,
  labelDim: 3,
  modelChannels: 16,
  channelMult: [1, 2],
  numBlocks: 1,
  attnResolutions: [4],
  numHeads: 1,
  dropout: 0,
};

gpuTest(
  "measureLatency: median of timed noGrad forwards at a width, batch 1, on the model's device",
  async () => {
    const device = await gpuDevice();
    const model = new UNet(TINY, { device });
    try {
      model.train();
      const full = await measureLatency(model, { warmup: 1, runs: 3 });
      const slim = await measureLatency(model, { width: 0.5, warmup: 1, runs: 3, batch: 2 });
      // (The model caches a few tensors on its first forwards; after those, a measurement frees all it makes.)
      const before = device.memory().liveAllocations;
      await measureLatency(model, { width: 0.5, warmup: 0, runs: 1, batch: 2 });
      for (const l of [full, slim]) {
        if (l.runsMs.length !== 3 || !l.runsMs.every((t) => t > 0)) throw new Error(`runs ${l.runsMs}`);
        const sorted = [...l.runsMs].sort((a, b) => a - b);
        if (l.medianMs !== sorted[1]) throw new Error(`median ${l.medianMs} of ${l.runsMs}`);
        if (!l.adapter) throw new Error("no adapter name");
      }
      if (slim.width !== 0.5 || slim.batch !== 2) throw new Error(JSON.stringify(slim));
      if (!model.training) throw new Error("measureLatency left the model in eval mode");
      if (device.memory().liveAllocations !== before) throw new Error("measureLatency leaked tensors");
      await expectThrow(() => measureLatency(model, { runs: 0 }), "runs");
      await expectThrow(() => measureLatency(model, { width: 1.5 }), "width");
    } finally {
      (model as nn.Module).dispose();
    }
  },
);

// ---------------------------------------------------------------------------------------------------------------
// Memory.

/** The measured peak of a training step and of a sampling batch on the CPU device, from nothing allocated. */
async function measuredPeaks(spec: UNetSpecInput, batch: number): Promise<{ train: number; sample: number }> {
  const device = await Device.create({ backend: "cpu" });
  try {
    const s = parseUNetSpec(spec);
    const r = s.imgResolution;
    const cfg = parseTrainerConfig({
      network: s,
      batch,
      data: { kind: "procedural", resolution: r, length: 16 },
    });
    const base = device.memory().liveBytes;
    device.resetPeakMemory();
    const trainer = new Trainer(cfg, device, await openDataset(cfg.data));
    trainer.step();
    trainer.step();
    await trainer.flushLog();
    const train = device.memory().peakLiveBytes - base;
    trainer.dispose();
    const before = device.memory().liveBytes;
    device.resetPeakMemory();
    const net = new UNet(s, { device }).eval();
    const latents = randn([batch, s.inChannels, r, r], { device, seed: 1 });
    const precond = new EDMPrecond((x, c, l) => net.forward(x, c, l ?? null), { sigmaData: 0.5 });
    heunSampler(precond.denoiser(undefined), latents, { steps: 2 }).dispose();
    const sample = device.memory().peakLiveBytes - before;
    latents.dispose();
    net.dispose();
    return { train, sample };
  } finally {
    device.destroy();
  }
}

test("memory estimate: above the measured peak of a training step and of sampling, and within 3× of it", async () => {
  const variants: Record<string, UNetSpecInput> = {
    micro: MICRO_UNET,
    attention: { ...MICRO_UNET, attnResolutions: [8, 4], numHeads: 2, numBlocks: 2 },
    adm: {
      ...MICRO_UNET,
      adaptiveScale: true,
      mapping: "adm",
      dropout: 0.1,
      channelMult: [1, 1, 2],
      attnResolutions: [],
    },
  };
  for (const [name, spec] of Object.entries(variants)) {
    for (const batch of [2, 6]) {
      const got = await measuredPeaks(spec, batch);
      for (const mode of ["train", "sample"] as const) {
        const est = estimatedBytes(estimateMemory(spec, mode), batch), real = got[mode];
        if (!(est >= real && est <= 3 * real)) {
          throw new Error(`${name} ${mode} batch ${batch}: estimate ${est} B, measured peak ${real} B`);
        }
      }
    }
  }
});

const LIMITS = { maxStorageBufferBindingSize: 2 ** 27, maxBufferSize: 2 ** 28 };
const budget = (batch: number, memoryLimitMiB = 1024): MemoryBudget => ({
  what: "train",
  mode: "train",
  batch,
  batchField: "batch",
  memoryLimitMiB,
});

test("checkMemory: the ceiling names the batch field and the largest batch that fits, exactly", () => {
  const e = estimateMemory(MICRO_UNET, "train");
  const limitMiB = 4;
  const fits = Math.floor((limitMiB * 2 ** 20 - e.fixedBytes) / e.bytesPerImage);
  assert(fits >= 1, `${fits}`);
  checkMemory(MICRO_UNET, budget(fits, limitMiB));
  const err = assertThrows(
    () => checkMemory(MICRO_UNET, budget(fits + 1, limitMiB)),
    `train: this network`,
    `at batch ${fits + 1} needs an estimated`,
    `above the ceiling memoryLimitMiB ${limitMiB}: lower batch (at most ${fits} fits)`,
    "modelChannels",
  );
  assert(err instanceof UsageError);
  // Weights that alone exceed the ceiling: the network's fields, not the batch.
  assertThrows(
    () => checkMemory({ ...MICRO_UNET, modelChannels: 512 }, budget(1, 4)),
    "make the network smaller (network: modelChannels",
    "weights, gradients and optimizer state alone need",
  );
  // Images held on the host (the sample command's n) are named too.
  assertThrows(
    () =>
      checkMemory(MICRO_UNET, {
        ...budget(4, 64),
        mode: "sample",
        held: { images: 1e8, field: "n", bytesPerImage: 1000 },
      }),
    "for 100000000 images on the host",
    "memoryLimitMiB 64: lower n, make the network smaller",
  );
});

test("checkMemory: a tensor above the adapter's binding limit names the layer, its shape and the field", () => {
  const big = { ...MICRO_UNET, modelChannels: 64, channelMult: [4], attnResolutions: [] };
  assertThrows(
    () => checkMemory(big, { ...budget(1e6, 1e9), deviceLimits: LIMITS }),
    "at batch 1000000, the ",
    "[1000000, ",
    "above the adapter's maxStorageBufferBindingSize of 128 MiB: lower batch (at most",
  );
  // A single weight above it: the network is too large whatever the batch.
  assertThrows(
    () => checkMemory({ ...big, modelChannels: 2048 }, { ...budget(1, 1e9), deviceLimits: LIMITS }),
    "the weight ",
    "above the adapter's maxStorageBufferBindingSize",
    "make the network smaller",
  );
});

test("spec bounds: an absurd network fails at once naming the field; the largest allowed one plans without hanging", () => {
  const t0 = performance.now();
  assertThrows(() => parseUNetSpec({ ...MICRO_UNET, numBlocks: 100000 }), "numBlocks", "<=64");
  assertThrows(() => parseUNetSpec({ ...MICRO_UNET, modelChannels: 1e9 }), "modelChannels");
  assertThrows(() => parseUNetSpec({ ...MICRO_UNET, channelMult: Array(20).fill(1) }), "channelMult");
  assertThrows(() => parseUNetSpec({ ...MICRO_UNET, imgResolution: 1 << 20 }), "imgResolution");
  const L = SPEC_LIMITS;
  const huge = {
    ...MICRO_UNET,
    imgResolution: L.imgResolution,
    modelChannels: L.modelChannels,
    channelMult: Array(L.levels).fill(L.mult),
    numBlocks: L.numBlocks,
    attnResolutions: [],
  };
  assertThrows(() => checkMemory(huge, budget(1)), "make the network smaller");
  // Not a speed test: before the bounds, numBlocks 100000 ran for minutes; 15 s only catches such a hang on a
  // loaded CI machine (it takes milliseconds).
  const ms = performance.now() - t0;
  assert(ms < 15000, `took ${ms} ms`);
});
