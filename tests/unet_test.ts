/**
 * @file Tests of the configurable diffusion UNet (models/unet.ts, models/unet_blocks.ts, models/presets.ts):
 * the published parameter counts of the presets, derived from the spec without allocating; the planner's
 * names and shapes against a real module for every architectural variant; forward shapes, determinism and
 * freeing of intermediates (and the peak memory of a noGrad forward); gradients reaching every parameter; a float64 finite-difference check of one
 * UNet block (input and parameter gradients); the noise embeddings against host formulas; and zod errors that
 * name the bad field.
 */

import { deepStrictEqual as assertEquals } from "node:assert";
import { Device, mul, noGrad, randn, reshape, scope, sum, tensor } from "../engine/mod.ts";
import {
  countParameters,
  parameterShapes,
  parseUNetSpec,
  planLayers,
  SONG_INIT,
  UNet,
  type UNetSpecInput,
} from "../models/unet.ts";
import { PositionalEmbedding, UNetBlock } from "../models/unet_blocks.ts";
import { admImagenet64, ddpmppCifar10, ddsmCifar10, PRESETS } from "../models/presets.ts";
import {
  assertClose,
  assertThrows,
  cpuDevice,
  f64Device,
  gpuDevice,
  gpuTest,
  gradCheck,
  readAll,
  seededValues,
  test,
} from "./util.ts";

/** Initialisation with every "zero" layer at full scale, so that gradients flow everywhere from the start. */
const LIVE_INIT = { ...SONG_INIT, zero: 1, proj: 1 };

/** Tiny networks (8×8 images) covering each architectural option. */
const TINY: Record<string, UNetSpecInput> = {
  // DDPM++ shape: SongUNet mapping with labels and augmentation, box resampling in blocks with skip projections.
  song: {
    imgResolution: 8,
    inChannels: 3,
    outChannels: 3,
    labelDim: 4,
    augmentDim: 2,
    modelChannels: 16,
    channelMult: [1, 2],
    inputMult: 1,
    numBlocks: 1,
    attnResolutions: [4],
    decoderAttention: "last",
    numHeads: 1,
    dropout: 0,
    embeddingLayout: "sin-cos",
    embeddingEndpoint: true,
    resampleProj: true,
    skipScale: Math.SQRT1_2,
    normEps: 1e-6,
    init: LIVE_INIT,
  },
  // ADM shape: adaptive scale-shift, multi-head attention at both levels, labels after the mapping layers.
  adm: {
    imgResolution: 8,
    inChannels: 3,
    outChannels: 3,
    labelDim: 5,
    modelChannels: 16,
    channelMult: [1, 2],
    numBlocks: 1,
    attnResolutions: [8, 4],
    channelsPerHead: 8,
    dropout: 0,
    mapping: "adm",
    adaptiveScale: true,
    init: {
      mode: "kaiming_uniform",
      weight: Math.sqrt(1 / 3),
      bias: Math.sqrt(1 / 3),
      zero: 0.5,
      qkv: 0.5,
      proj: 0.5,
    },
  },
  // DDPM/DDSM shape: learned conv resampling as separate layers, interleaved sinusoids, 3 levels.
  ddpm: {
    imgResolution: 8,
    inChannels: 3,
    outChannels: 3,
    modelChannels: 16,
    channelMult: [1, 2, 2],
    numBlocks: 1,
    attnResolutions: [4],
    numHeads: 1,
    dropout: 0,
    embeddingLayout: "interleaved-sin-cos",
    resampleFilter: "conv",
    resampleInBlock: false,
    normMinChannelsPerGroup: 1,
    normGroups: 4,
    init: { ...LIVE_INIT, qkv: Math.SQRT2 },
  },
  // Parameter-free resampling as separate layers, Fourier embedding, no attention outside the middle.
  fourier: {
    imgResolution: 8,
    inChannels: 1,
    outChannels: 2,
    modelChannels: 8,
    channelMult: [1, 2],
    numBlocks: 2,
    numHeads: 2,
    dropout: 0,
    embedding: "fourier",
    channelMultNoise: 2,
    resampleInBlock: false,
    init: LIVE_INIT,
  },
};

function inputsFor(spec: UNetSpecInput, device: Device, n = 2) {
  const s = parseUNetSpec(spec);
  const R = s.imgResolution;
  return {
    x: tensor(seededValues(n * s.inChannels * R * R, 1), [n, s.inChannels, R, R], { device }),
    cNoise: tensor(seededValues(n, 2, -2, 2), [n], { device }),
    labels: s.labelDim ? tensor(seededValues(n * s.labelDim, 3, 0, 1), [n, s.labelDim], { device }) : null,
    augment: s.augmentDim ? tensor(seededValues(n * s.augmentDim, 4), [n, s.augmentDim], { device }) : null,
  };
}

// ---------------------------------------------------------------------------------------------------------------

test("presets: exact parameter counts of EDM's DDPM++ and ADM and DDSM's DDPM UNet, without allocating", () => {
  // EDM Table 7: 55.73 M (DDPM++ CIFAR-10, with the 9-d augmentation label) and 295.90 M (ADM ImageNet-64);
  // DDPM (Ho et al. 2020) and DDSM's CIFAR-10 network: 35,746,307.
  assertEquals(countParameters(ddpmppCifar10()), 55_733_891);
  assertEquals(countParameters(admImagenet64()), 295_899_267);
  assertEquals(countParameters(ddsmCifar10()), 35_746_307);
  // The augmentation label's bias-free 9×128 map is the whole difference to a model trained without it.
  assertEquals(countParameters({ ...ddpmppCifar10(), augmentDim: 0 }), 55_733_891 - 9 * 128);
  assertEquals(Object.keys(PRESETS).sort(), ["adm-imagenet64", "ddpmpp-cifar10", "ddsm-cifar10"]);
});

test("presets: parameter names and shapes follow EDM's modules", () => {
  const shapes = (spec: UNetSpecInput) => new Map(parameterShapes(spec));
  const song = shapes(ddpmppCifar10());
  assertEquals(song.get("map_augment.weight"), [128, 9]);
  assertEquals(song.has("map_augment.bias"), false);
  assertEquals(song.get("map_layer0.weight"), [512, 128]);
  assertEquals(song.get("enc.32x32_conv.weight"), [128, 3, 3, 3]);
  assertEquals(song.get("enc.32x32_block0.skip.weight"), [256, 128, 1, 1]);
  assertEquals(song.get("enc.16x16_down.skip.weight"), [256, 256, 1, 1]); // resample_proj
  assertEquals(song.get("enc.16x16_block3.qkv.weight"), [768, 256, 1, 1]);
  assertEquals(song.has("dec.16x16_block3.qkv.weight"), false); // DDPM++ decoder: attention in the last only
  assertEquals(song.get("dec.16x16_block4.proj.weight"), [256, 256, 1, 1]);
  assertEquals(song.get("dec.32x32_block0.conv0.weight"), [256, 512, 3, 3]);
  assertEquals(song.get("out_conv.weight"), [3, 256, 3, 3]);
  const adm = shapes(admImagenet64());
  assertEquals(adm.get("map_label.weight"), [768, 1000]);
  assertEquals(adm.has("map_label.bias"), false);
  assertEquals(adm.get("enc.64x64_block0.affine.weight"), [384, 768]); // scale and shift
  assertEquals(adm.has("enc.32x32_down.skip.weight"), false); // bare resample on the skip path
  assertEquals(adm.get("dec.8x8_in0.qkv.weight"), [2304, 768, 1, 1]);
  assertEquals(adm.get("dec.64x64_block3.conv0.weight"), [192, 384, 3, 3]);
  const ddsm = shapes(ddsmCifar10());
  assertEquals(ddsm.get("enc.16x16_down.conv.weight"), [128, 128, 3, 3]);
  assertEquals(ddsm.get("dec.16x16_up.conv.weight"), [256, 256, 3, 3]);
  assertEquals(ddsm.get("dec.32x32_block0.conv0.weight"), [128, 384, 3, 3]);
  assertEquals(ddsm.get("enc.16x16_block1.qkv.weight"), [768, 256, 1, 1]);
  assertEquals(ddsm.has("enc.32x32_block0.qkv.weight"), false);
  const heads = new Map(planLayers(admImagenet64()).filter((l) => l.heads).map((l) => [l.name, l.heads]));
  assertEquals(heads.get("enc.32x32_block0.qkv"), 6); // 384 channels / 64 per head
  assertEquals(heads.get("dec.8x8_in0.qkv"), 12);
});

test("the planner's names, order and shapes equal the module's parameters, for every variant", async () => {
  const device = await cpuDevice();
  for (const [name, spec] of Object.entries(TINY)) {
    const net = new UNet(spec, { device });
    const real = net.namedParameters().map(([n, t]) => [n, [...t.shape]]);
    assertEquals(real, parameterShapes(spec), `${name}: planner and module differ`);
    assertEquals(net.parameterCount(), countParameters(spec), name);
    net.dispose();
  }
});

gpuTest("forward: output shape, finiteness and determinism per seed, on WebGPU", async () => {
  const device = await gpuDevice();
  for (const [name, spec] of Object.entries(TINY)) {
    const s = parseUNetSpec(spec);
    const build = () => {
      device.manualSeed(11);
      return new UNet(spec, { device });
    };
    const [a, b] = [build(), build()];
    const { x, cNoise, labels, augment } = inputsFor(spec, device);
    const run = (net: UNet) => noGrad(() => net.forward(x, cNoise, labels, { augmentLabels: augment }));
    const [ya, ya2, yb] = [run(a), run(a), run(b)];
    assertEquals([...ya.shape], [2, s.outChannels, 8, 8], name);
    const [va, va2, vb] = await readAll([ya, ya2, yb]);
    if (!va.every(Number.isFinite)) throw new Error(`${name}: non-finite output`);
    if (!va.some((v) => v !== 0)) throw new Error(`${name}: all-zero output`);
    assertEquals(va2, va, `${name}: two runs differ`);
    assertEquals(vb, va, `${name}: same seed, different network`);
    // The class label and the noise level both change the output.
    const c2 = tensor(seededValues(2, 5, -2, 2), [2], { device });
    const yc = noGrad(() => a.forward(x, c2, labels, { augmentLabels: augment }));
    const [vc] = await readAll([yc]);
    if (vc.every((v, i) => v === va[i])) throw new Error(`${name}: the noise level has no effect`);
    if (labels) {
      const l2 = tensor(seededValues(labels.size, 6, 0, 1), labels.shape, { device });
      const [vl] = await readAll([noGrad(() => a.forward(x, cNoise, l2, { augmentLabels: augment }))]);
      if (vl.every((v, i) => v === va[i])) throw new Error(`${name}: the class label has no effect`);
    }
    for (const t of [ya, ya2, yb, yc, x, cNoise, c2]) t.dispose();
    a.dispose();
    b.dispose();
  }
});

gpuTest("forward without a tape frees every intermediate; dropout follows train()/eval()", async () => {
  const device = await gpuDevice();
  const spec = { ...TINY.ddpm, dropout: 0.3 };
  const net = new UNet(spec, { device });
  const { x, cNoise } = inputsFor(spec, device);
  noGrad(() => net.eval().forward(x, cNoise)).dispose(); // warm-up: caches the embedding frequencies
  const before = device.memory().liveAllocations;
  const y = noGrad(() => net.forward(x, cNoise));
  assertEquals(device.memory().liveAllocations, before + 1);
  const y2 = noGrad(() => net.forward(x, cNoise));
  net.train();
  const [d1, d2] = [noGrad(() => net.forward(x, cNoise)), noGrad(() => net.forward(x, cNoise))];
  const [v, v2, t1, t2] = await readAll([y, y2, d1, d2]);
  assertEquals(v2, v); // eval: dropout is the identity
  if (t1.every((a, i) => a === t2[i])) throw new Error("training-mode dropout gave identical outputs");
  if (t1.every((a, i) => a === v[i])) throw new Error("training-mode dropout had no effect");
  net.dispose();
});

test("noGrad forward of every variant: only the output stays live; the peak stays far below what a tape holds and does not grow over a sampling loop", async () => {
  // A device of its own: tensors that earlier tests left to the FinalizationRegistry must not move the counts.
  const device = await Device.create({ backend: "cpu" });
  for (const [name, spec] of Object.entries(TINY)) {
    const net = new UNet(spec, { device }).eval();
    const { x, cNoise, labels, augment } = inputsFor(spec, device);
    const forward = () => net.forward(x, cNoise, labels, { augmentLabels: augment });
    noGrad(forward).dispose(); // warm-up: caches the embedding frequencies
    const base = device.memory().liveBytes;
    device.resetPeakMemory();
    const y = noGrad(forward);
    assertEquals(device.memory().liveBytes - base, y.size * 4, `${name}: intermediates left live`);
    const peak = device.memory().peakLiveBytes - base;
    y.dispose();
    // Sampling: one forward per step; nothing accumulates from step to step.
    for (let step = 0; step < 4; step++) noGrad(forward).dispose();
    assertEquals(device.memory().liveBytes, base, `${name}: the sampling loop leaked`);
    assertEquals(device.memory().peakLiveBytes - base, peak, `${name}: the peak grew over the sampling loop`);
    // With a tape every intermediate is held until backward; without one they are freed as the forward goes.
    let taped = 0;
    scope(() => {
      forward();
      taped = device.memory().liveBytes - base;
    });
    assertEquals(device.memory().liveBytes, base, `${name}: the taped forward outlived its scope`);
    if (!(peak * 3 < taped)) {
      throw new Error(`${name}: noGrad peak ${peak} B is not far below the ${taped} B a taped forward holds`);
    }
    for (const t of [x, cNoise, labels, augment]) t?.dispose();
    net.dispose();
  }
  device.destroy();
});

gpuTest("backward: every parameter receives a non-zero gradient, on WebGPU", async () => {
  const device = await gpuDevice();
  for (const [name, spec] of Object.entries(TINY)) {
    device.manualSeed(3);
    const net = new UNet(spec, { device });
    const { x, cNoise, labels, augment } = inputsFor(spec, device);
    scope(() => {
      const y = net.forward(x, cNoise, labels, { augmentLabels: augment });
      const cot = randn(y.shape, { device, seed: 9 });
      sum(mul(y, cot)).backward();
    });
    const params = net.namedParameters();
    const missing = params.filter(([, p]) => !p.grad).map(([n]) => n);
    if (missing.length) throw new Error(`${name}: no gradient for ${missing.join(", ")}`);
    const grads = await readAll(params.map(([, p]) => p.grad!));
    params.forEach(([n], i) => {
      if (!grads[i].some((v) => v !== 0)) throw new Error(`${name}: zero gradient for ${n}`);
      if (!grads[i].every(Number.isFinite)) throw new Error(`${name}: non-finite gradient for ${n}`);
    });
    net.dispose();
  }
});

test("UNetBlock (down, adaptive scale, 2-head attention, slimmed): gradients by finite differences (float64)", async () => {
  const dev = await f64Device();
  dev.manualSeed(21);
  const live = { mode: "xavier_uniform" as const, weight: 1, bias: 0.5 };
  const block = new UNetBlock(8, 16, {
    embChannels: 16,
    down: true,
    numHeads: 2,
    dropout: 0,
    skipScale: Math.SQRT1_2,
    eps: 1e-5,
    resampleProj: true,
    adaptiveScale: true,
    groups: 4,
    minChannelsPerGroup: 1,
    init: live,
    initZero: live,
    initQkv: live,
    initProj: live,
    device: dev,
  });
  const width = 0.5; // 16 → 8 output channels, 4 per head; the input has 6 of its 8 channels.
  const xShape = [1, 6, 4, 4], eShape = [1, 12];
  await gradCheck((x, e) => block.forward(x, e, width), [
    { shape: xShape, data: seededValues(96, 31) },
    { shape: eShape, data: seededValues(12, 32) },
  ], { rtol: 1e-5, atol: 1e-7 });
  block.zeroGrad();
  // Parameter gradients against central differences: inside the slice they match, outside they are zero.
  const x = tensor(seededValues(96, 31), xShape, { device: dev });
  const e = tensor(seededValues(12, 32), eShape, { device: dev });
  const yShape = [1, 8, 2, 2];
  const cot = tensor(seededValues(32, 33), yShape, { device: dev });
  const objective = async () => {
    const y = noGrad(() => block.forward(x, e, width));
    const [yv, cv] = [await y.toFloat64Array(), await cot.toFloat64Array()];
    y.dispose();
    return yv.reduce((s, v, i) => s + v * cv[i], 0);
  };
  block.forward(x, e, width).backward(cot);
  const eps = 1e-6;
  // (parameter, flat index): inside the slice, and outside it (rows ≥ 8 or input channels ≥ 6).
  const probes: [string, number, boolean][] = [
    ["conv0.weight", 0, true],
    ["conv0.weight", 7 * 72 + 5 * 9 + 4, true],
    ["conv0.weight", 8 * 72, false],
    ["conv0.weight", 6 * 9, false],
    ["affine.weight", 3 * 16 + 11, true], // scale row 3
    ["affine.weight", 16 * 16 + 2, true], // shift row 0
    ["affine.weight", 8 * 16, false], // scale row 8
    ["affine.weight", 2 * 16 + 12, false], // embedding feature 12
    ["skip.weight", 5 * 8 + 3, true],
    ["norm1.weight", 7, true],
    ["norm1.weight", 8, false],
    ["qkv.weight", (1 * 8 + 3) * 3 * 16 + 2 * 16 + 7, true], // head 1, channel 3, v
    ["qkv.weight", (1 * 8 + 4) * 3 * 16, false], // head 1, channel 4: outside its 4 slim channels
    ["proj.weight", 2 * 16 + 8 + 3, true], // input: head 1, channel 3
    ["proj.weight", 2 * 16 + 4, false], // input: head 0, channel 4
  ];
  const params = new Map(block.namedParameters());
  for (const [pname, i, inside] of probes) {
    const p = params.get(pname)!;
    const g = await p.grad!.toFloat64Array();
    const base = await p.toFloat64Array();
    const set = (v: number) => {
      const vals = base.slice();
      vals[i] = v;
      dev.write(p.storage, vals);
    };
    set(base[i] + eps);
    const plus = await objective();
    set(base[i] - eps);
    const minus = await objective();
    set(base[i]);
    const numeric = (plus - minus) / (2 * eps);
    assertClose([g[i]], [numeric], { rtol: 1e-5, atol: 1e-8 }, `d/d ${pname}[${i}]`);
    if (inside !== (Math.abs(numeric) > 1e-9)) {
      throw new Error(`${pname}[${i}]: expected ${inside ? "a" : "no"} gradient, got ${numeric}`);
    }
  }
});

test("noise embeddings: positional layouts and endpoint, Fourier features, against host formulas", async () => {
  const device = await cpuDevice();
  const c = [0.3, -1.7];
  const cNoise = tensor(c, [2], { device });
  const C = 8, half = 4;
  for (const endpoint of [false, true]) {
    const f = Array.from({ length: half }, (_, i) => Math.pow(1e-4, i / (half - (endpoint ? 1 : 0))));
    const want = {
      "cos-sin": c.flatMap((v) => [...f.map((q) => Math.cos(v * q)), ...f.map((q) => Math.sin(v * q))]),
      "sin-cos": c.flatMap((v) => [...f.map((q) => Math.sin(v * q)), ...f.map((q) => Math.cos(v * q))]),
      "interleaved-sin-cos": c.flatMap((v) => f.flatMap((q) => [Math.sin(v * q), Math.cos(v * q)])),
    } as const;
    for (const layout of Object.keys(want) as (keyof typeof want)[]) {
      const emb = new PositionalEmbedding(C, { maxPositions: 10000, endpoint, layout, device });
      assertClose(
        await emb.forward(cNoise).toArray(),
        want[layout],
        { atol: 1e-6 },
        `${layout}, endpoint ${endpoint}`,
      );
    }
  }
  const net = new UNet(TINY.fourier, { device });
  const freqs = await net.stateDict()["map_noise.freqs"].toArray();
  assertEquals(freqs.length, 8); // 8 channels × channelMultNoise 2 / 2
  const got = await net.map_noise.forward(cNoise).toArray();
  const want = c.flatMap((v) => [
    ...[...freqs].map((q) => Math.cos(2 * Math.PI * q * v)),
    ...[...freqs].map((q) => Math.sin(2 * Math.PI * q * v)),
  ]);
  assertClose(got, want, { atol: 1e-4 }, "Fourier embedding");
  net.dispose();
});

test("spec errors name the bad field", () => {
  const base = TINY.song;
  const bad = (patch: Record<string, unknown>, ...parts: string[]) =>
    assertThrows(() => parseUNetSpec({ ...base, ...patch }), "UNetSpec", ...parts);
  bad({ numBlocks: 0 }, "numBlocks");
  bad({ modelChannels: 2.5 }, "modelChannels");
  bad({ channelMult: [] }, "channelMult");
  bad({ channelMult: [1, 0] }, "channelMult.1");
  bad({ dropout: 1.5 }, "dropout");
  bad({ attnResolutions: [4, 5] }, "attnResolutions.1", "not a level resolution");
  bad({ imgResolution: 6, channelMult: [1, 2, 2] }, "imgResolution", "does not halve");
  bad({ numHeads: 3 }, "numHeads", "heads");
  bad({ numHeads: undefined, channelsPerHead: 24 }, "channelsPerHead");
  bad({ resampleFilter: "conv" }, "resampleInBlock");
  bad({ embedding: "wavelet" }, "embedding");
  bad({ numBlock: 2 }, "numBlock");
  bad({ init: { ...SONG_INIT, mode: "orthogonal" } }, "init.mode");
  bad({ labelDim: 0, labelDropout: 0.1 }, "labelDropout");
  const minimal = parseUNetSpec({
    imgResolution: 8,
    inChannels: 3,
    outChannels: 3,
    modelChannels: 8,
    channelMult: [1],
    numBlocks: 1,
  });
  assertEquals([minimal.dropout, minimal.skipScale, minimal.labelDim, minimal.mapping], [0.1, 1, 0, "song"]);
  assertEquals(planLayers(minimal).filter((l) => l.heads).map((l) => [l.name, l.heads]), [[
    "dec.8x8_in0.qkv",
    1,
  ], [
    "dec.8x8_in0.proj",
    1,
  ]]);
});

test("forward rejects wrong input shapes and missing labels with clear errors", async () => {
  const device = await cpuDevice();
  const net = new UNet(TINY.song, { device });
  const { x, cNoise, labels } = inputsFor(TINY.song, device);
  assertThrows(() => net.forward(x, cNoise), "classLabels [2, 4] are required");
  assertThrows(() => net.forward(reshape(x, [2, 3, 4, 16]), cNoise, labels), "x must be [N, 3, 8, 8]");
  assertThrows(() => net.forward(x, reshape(x, [-1]), labels), "cNoise must be [2]");
  assertThrows(() => net.forward(x, cNoise, labels, { width: 0 }), "width must be in (0, 1]");
  net.dispose();
});
