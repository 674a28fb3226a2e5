/**
 * @file Tests of DDSM's slimmable widths (models/slimmable.ts with the UNet of models/unet.ts): the rounding
 * rule; the channel counts every layer of every preset uses at each width (table-driven, against hand-computed
 * values); a forward at each width whose gradients reach exactly the planned leading slices of the shared
 * weights (per chunk for adaptive scale/shift, per head for attention); the slimmed network computing exactly
 * what a separately built narrow network computes with the sliced weights; and the step-aware wrapper's
 * schedules.
 */

import fc from "fast-check";
import { deepStrictEqual as assertEquals } from "node:assert";
import { type Device, mul, noGrad, randn, scope, sum, type Tensor, tensor } from "../engine/mod.ts";
import { planLayers, type PlannedLayer, SONG_INIT, UNet, type UNetSpecInput } from "../models/unet.ts";
import { admImagenet64, ddpmppCifar10, ddsmCifar10 } from "../models/presets.ts";
import {
  constantSchedule,
  DDSM_WIDTHS,
  makeDivisible,
  parseWidthSchedule,
  slimChannels,
  slimGroups,
  widthAt,
} from "../models/slimmable.ts";
import { StepAwareUNet } from "../models/step_aware.ts";
import {
  assertClose,
  assertThrows,
  cpuDevice,
  gpuDevice,
  gpuTest,
  readAll,
  RUNS,
  seededValues,
  test,
} from "./util.ts";

const LIVE_INIT = { ...SONG_INIT, zero: 1, proj: 1 };

/** Tiny slimmable networks: 32 base channels, so the widths give 8, 16, 24 and 32 channels. */
const TINY: Record<string, UNetSpecInput> = {
  ddsm: {
    imgResolution: 8,
    inChannels: 3,
    outChannels: 3,
    modelChannels: 32,
    channelMult: [1, 2],
    numBlocks: 1,
    attnResolutions: [4],
    numHeads: 1,
    dropout: 0,
    embeddingLayout: "interleaved-sin-cos",
    resampleFilter: "conv",
    resampleInBlock: false,
    normGroups: 4,
    normMinChannelsPerGroup: 1,
    init: { ...LIVE_INIT, qkv: Math.SQRT2 },
  },
  adm: {
    imgResolution: 8,
    inChannels: 3,
    outChannels: 3,
    labelDim: 3,
    modelChannels: 32,
    channelMult: [1, 2],
    numBlocks: 1,
    attnResolutions: [8, 4],
    numHeads: 2,
    dropout: 0,
    mapping: "adm",
    adaptiveScale: true,
    normGroups: 4,
    normMinChannelsPerGroup: 1,
    init: { mode: "kaiming_uniform", weight: 0.6, bias: 0.6, zero: 0.6, qkv: 0.6, proj: 0.6 },
  },
  song: {
    imgResolution: 8,
    inChannels: 3,
    outChannels: 3,
    labelDim: 3,
    augmentDim: 2,
    modelChannels: 32,
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
    normGroups: 4,
    normMinChannelsPerGroup: 1,
    init: LIVE_INIT,
  },
};

function inputsFor(spec: UNetSpecInput, device: Device) {
  const n = 2, s = spec as { inChannels: number; labelDim?: number; augmentDim?: number };
  return {
    x: tensor(seededValues(n * s.inChannels * 64, 1), [n, s.inChannels, 8, 8], { device }),
    cNoise: tensor(seededValues(n, 2, -2, 2), [n], { device }),
    labels: s.labelDim ? tensor(seededValues(n * s.labelDim, 3, 0, 1), [n, s.labelDim], { device }) : null,
    augment: s.augmentDim ? tensor(seededValues(n * s.augmentDim, 4), [n, s.augmentDim], { device }) : null,
  };
}

// ---------------------------------------------------------------------------------------------------------------

test("makeDivisible and slimChannels: DDSM's rounding, capped at the full count", () => {
  const cases: [number, number, number][] = [
    [96, 8, 96],
    [4, 8, 8],
    [12, 8, 16],
    [11.9, 8, 16], // rounds to 8, which loses more than 10%: +8
    [3, 8, 9], // rounds to 0 → at least 1, then +8 (DDSM slices such counts down to the full size)
    [144, 16, 144],
    [40, 16, 48],
    [36, 16, 48], // 32 < 0.9·36
    [192, 8, 192],
  ];
  for (const [v, f, want] of cases) assertEquals(makeDivisible(v, f), want, `makeDivisible(${v}, ${f})`);
  assertEquals(slimChannels(12, 1, 8), 12);
  assertEquals(slimChannels(12, 0.75, 8), 12); // 16, capped
  assertEquals(slimChannels(3, 0.25, 8), 1);
  assertEquals(slimChannels(576, 0.25, 8), 144);
  assertEquals(slimGroups(32, 144), 24);
  assertEquals(slimGroups(32, 432), 27);
  assertEquals(slimGroups(32, 96), 32);
  assertThrows(() => slimChannels(64, 1.5, 8), "width must be in (0, 1]");
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 4096 }),
      fc.constantFrom(...DDSM_WIDTHS),
      fc.constantFrom(8, 16),
      (c, w, f) => {
        const n = slimChannels(c, w, f), v = c * w;
        if (n > c || n < 1) return false;
        if (n === c) return true;
        // Below f/2 the rounding gives 0, raised to the minimum 1 (then +f if that lost more than 10%).
        if (v < f / 2) return n === (1 < 0.9 * v ? 1 + f : 1);
        return n % f === 0 && n >= 0.9 * v && n <= Math.max(v + f / 2, 0.9 * v + f);
      },
    ),
    { numRuns: RUNS * 8 },
  );
});

/** Channel counts at each DDSM width [1, 0.75, 0.5, 0.25] for a full count (f = 8), and per embedding (f = 16). */
const W = (c: number) => DDSM_WIDTHS.map((w) => slimChannels(c, w, 8));

test("slimmed channel counts of every preset's layers at each width (table)", () => {
  // Hand-computed: w·c is already a multiple of 8 (16 for the embeddings) in all three presets.
  const c128 = [128, 96, 64, 32], c256 = [256, 192, 128, 64], e512 = [512, 384, 256, 128];
  const c192 = [192, 144, 96, 48], c384 = [384, 288, 192, 96], c576 = [576, 432, 288, 144];
  const c768 = [768, 576, 384, 192], e768 = c768;
  assertEquals(W(128), c128);
  const fixed = (n: number) => [n, n, n, n];
  const add = (a: number[], b: number[]) => a.map((v, i) => v + b[i]);
  const times = (k: number, a: number[]) => a.map((v) => k * v);
  // [layer, inputs per width, outputs per width, GroupNorm groups per width (norms only)]
  type Row = [string, number[], number[], number[]?];
  const tables: [string, () => UNetSpecInput, Row[]][] = [
    ["ddsm-cifar10", ddsmCifar10, [
      ["map_layer0", fixed(128), e512],
      ["map_layer1", e512, e512],
      ["enc.32x32_conv", fixed(3), c128],
      ["enc.32x32_block0.norm0", c128, c128, fixed(32)],
      ["enc.32x32_block0.conv0", c128, c128],
      ["enc.32x32_block0.affine", e512, c128],
      ["enc.16x16_down.conv", c128, c128],
      ["enc.16x16_block0.conv0", c128, c256],
      ["enc.16x16_block0.skip", c128, c256],
      ["enc.16x16_block0.qkv", c256, times(3, c256)],
      ["dec.4x4_in0.proj", c256, c256],
      ["dec.16x16_up.conv", c256, c256],
      ["dec.32x32_block0.norm0", add(c256, c128), add(c256, c128), fixed(32)],
      ["dec.32x32_block0.conv0", add(c256, c128), c128],
      ["dec.32x32_block2.conv0", add(c128, c128), c128],
      ["out_norm", c128, c128, fixed(32)],
      ["out_conv", c128, fixed(3)],
    ]],
    ["ddpmpp-cifar10", ddpmppCifar10, [
      ["map_augment", fixed(9), fixed(128)],
      ["map_layer0", fixed(128), e512],
      ["enc.32x32_conv", fixed(3), c128],
      ["enc.32x32_block0.conv0", c128, c256],
      ["enc.32x32_block0.skip", c128, c256],
      ["enc.16x16_down.skip", c256, c256],
      ["enc.16x16_block0.qkv", c256, times(3, c256)],
      ["dec.32x32_block0.conv0", add(c256, c256), c256],
      ["dec.32x32_block4.conv0", add(c256, c128), c256],
      ["dec.32x32_block4.norm0", add(c256, c128), add(c256, c128), fixed(32)],
      ["out_conv", c256, fixed(3)],
    ]],
    ["adm-imagenet64", admImagenet64, [
      ["map_layer0", fixed(192), e768],
      ["map_label", fixed(1000), e768],
      ["enc.64x64_conv", fixed(3), c192],
      ["enc.64x64_block0.affine", e768, times(2, c192)],
      ["enc.32x32_block0.conv0", c192, c384],
      ["enc.32x32_block0.qkv", c384, times(3, c384)],
      ["enc.16x16_block0.norm0", c384, c384, fixed(32)],
      ["enc.8x8_block0.norm1", c768, c768, fixed(32)],
      ["enc.16x16_block1.norm1", c576, c576, [32, 27, 32, 24]], // 432 and 144 are not multiples of 32
      ["dec.8x8_in0.qkv", c768, times(3, c768)],
      ["dec.64x64_block3.conv0", add(c192, c192), c192],
      ["out_conv", c192, fixed(3)],
    ]],
  ];
  for (const [preset, make, rows] of tables) {
    const spec = make();
    const plans = DDSM_WIDTHS.map((w) => new Map(planLayers(spec, w).map((l) => [l.name, l])));
    for (const [name, ins, outs, groups] of rows) {
      const got = plans.map((p) => {
        const l = p.get(name);
        if (!l) throw new Error(`${preset}: no layer ${name}`);
        return l;
      });
      assertEquals(got.map((l) => l.in), ins, `${preset} ${name}: inputs`);
      assertEquals(got.map((l) => l.out), outs, `${preset} ${name}: outputs`);
      if (groups) assertEquals(got.map((l) => l.groups), groups, `${preset} ${name}: groups`);
    }
  }
});

test("every layer of every preset at every width: within its weights, norms divisible, heads whole", () => {
  for (
    const [preset, make] of [["ddsm", ddsmCifar10], ["ddpmpp", ddpmppCifar10], [
      "adm",
      admImagenet64,
    ]] as const
  ) {
    const spec = make();
    for (const w of DDSM_WIDTHS) {
      for (const l of planLayers(spec, w)) {
        const at = `${preset} w=${w} ${l.name}`;
        if (l.in > l.inFull || l.out > l.outFull || l.in < 1 || l.out < 1) {
          throw new Error(`${at}: ${l.in}→${l.out}`);
        }
        if (l.kind === "norm" && l.in % l.groups!) {
          throw new Error(`${at}: ${l.in} channels, ${l.groups} groups`);
        }
        // DDSM and DDPM++ keep 32 groups at every width.
        if (l.kind === "norm" && preset !== "adm" && l.groups !== 32) {
          throw new Error(`${at}: ${l.groups} groups`);
        }
        if (l.heads && (l.name.endsWith("qkv") ? l.out / 3 : l.in) % l.heads) throw new Error(`${at}: heads`);
        // The per-block embedding projection is rounded like the convolution it is added to; DDSM rounds it with
        // its linear divisor 16, which gives the same count in all presets.
        if (l.name.endsWith("affine")) {
          const k = l.chunks!;
          assertEquals(slimChannels(l.outFull / k, w, 16), l.out / k, at);
        }
      }
    }
  }
});

/** Whether flat index `i` of parameter `kind` of planned layer `l` lies in the part the width uses. */
function used(l: PlannedLayer, kind: "weight" | "bias", i: number): boolean {
  const rowUsed = (r: number) => {
    if (l.name.endsWith(".qkv") && l.heads) {
      const perFull = l.outFull / 3 / l.heads, per = l.out / 3 / l.heads;
      return Math.floor(r / 3) % perFull < per;
    }
    if (l.chunks && l.chunks > 1) {
      const part = l.outFull / l.chunks;
      return r % part < l.out / l.chunks;
    }
    return r < l.out;
  };
  const colUsed = (c: number) => {
    if (l.name.endsWith(".proj") && l.heads) {
      const perFull = l.inFull / l.heads;
      return c % perFull < l.in / l.heads;
    }
    return c < l.in;
  };
  if (l.kind === "norm") return i < l.in;
  if (kind === "bias") return rowUsed(i);
  const kk = l.kernel * l.kernel;
  return rowUsed(Math.floor(i / (l.inFull * kk))) && colUsed(Math.floor(i / kk) % l.inFull);
}

gpuTest(
  "forward at each width runs; gradients reach exactly the planned slices of the shared weights (WebGPU)",
  async () => {
    const device = await gpuDevice();
    for (const [variant, spec] of Object.entries(TINY)) {
      device.manualSeed(5);
      const net = new UNet(spec, { device });
      const { x, cNoise, labels, augment } = inputsFor(spec, device);
      const params = net.namedParameters();
      for (const w of DDSM_WIDTHS) {
        net.zeroGrad();
        scope(() => {
          const y = net.forward(x, cNoise, labels, { width: w, augmentLabels: augment });
          assertEquals([...y.shape], [2, 3, 8, 8]);
          sum(mul(y, randn(y.shape, { device, seed: 4 }))).backward();
        });
        const plan = new Map(planLayers(spec, w).map((l) => [l.name, l]));
        const missing = params.filter(([, p]) => !p.grad).map(([n]) => n);
        if (missing.length) throw new Error(`${variant} w=${w}: no gradient for ${missing.join(", ")}`);
        const grads = await readAll(params.map(([, p]) => p.grad!));
        params.forEach(([name], k) => {
          const dot = name.lastIndexOf(".");
          const l = plan.get(name.slice(0, dot))!, kind = name.slice(dot + 1) as "weight" | "bias";
          let inside = 0, live = 0;
          grads[k].forEach((g, i) => {
            if (used(l, kind, i)) {
              // A key bias shifts every score of a query equally: softmax cancels it, its true gradient is 0.
              if (name.endsWith(".qkv.bias") && i % 3 === 1) return;
              inside++;
              if (g !== 0) live++;
            } else if (g !== 0) {
              throw new Error(`${variant} w=${w}: ${name}[${i}] is outside the slice but has gradient ${g}`);
            }
          });
          if (inside === 0 || live < 0.99 * inside) {
            throw new Error(
              `${variant} w=${w}: ${name}: only ${live} of ${inside} used entries have gradients`,
            );
          }
        });
      }
      net.dispose();
    }
  },
);

/** `full` (of shape `shape`, planned as `l` at some width) cut down to the entries that width uses. */
function sliceParam(full: Float32Array, l: PlannedLayer, kind: "weight" | "bias"): Float32Array {
  const out: number[] = [];
  full.forEach((v, i) => used(l, kind, i) && out.push(v));
  return Float32Array.from(out);
}

test("the slimmed network equals a narrow network built with the sliced weights (CPU)", async () => {
  const device = await cpuDevice();
  for (const [variant, spec] of Object.entries(TINY)) {
    device.manualSeed(6);
    const big = new UNet(spec, { device });
    const { x, cNoise, labels, augment } = inputsFor(spec, device);
    for (const w of [0.5, 0.25]) {
      // Same architecture with w·modelChannels; the noise embedding stays full-size at every width.
      const s = big.spec;
      const smallSpec = {
        ...s,
        modelChannels: s.modelChannels * w,
        channelMultNoise: s.channelMultNoise / w,
      };
      const small = new UNet(smallSpec, { device });
      const bigPlan = planLayers(s, w), smallPlan = planLayers(smallSpec, 1);
      assertEquals(
        bigPlan.map((l) => [l.name, l.in, l.out, l.groups]),
        smallPlan.map((l) => [l.name, l.inFull, l.outFull, l.groups]),
        `${variant} w=${w}: the slim plan is not the narrow network's`,
      );
      const byName = new Map(bigPlan.map((l) => [l.name, l]));
      const state: Record<string, Tensor> = {};
      const smallShapes = new Map(small.namedParameters().map(([n, t]) => [n, t.shape]));
      for (const [name, p] of big.namedParameters()) {
        const dot = name.lastIndexOf(".");
        const sliced = sliceParam(
          await p.toArray(),
          byName.get(name.slice(0, dot))!,
          name.slice(dot + 1) as "weight",
        );
        state[name] = tensor(sliced, smallShapes.get(name)!, { device });
      }
      small.loadStateDict(state);
      const yBig = noGrad(() => big.forward(x, cNoise, labels, { width: w, augmentLabels: augment }));
      const ySmall = noGrad(() => small.forward(x, cNoise, labels, { augmentLabels: augment }));
      assertClose(
        await yBig.toArray(),
        await ySmall.toArray(),
        { rtol: 1e-5, atol: 1e-6 },
        `${variant} w=${w}`,
      );
      small.dispose();
    }
    big.dispose();
  }
});

test("width schedules: parsing errors name the field; σ bands and step indices select widths", () => {
  const bad = (input: unknown, ...parts: string[]) => assertThrows(() => parseWidthSchedule(input), ...parts);
  bad({ by: "sigma", ranges: [{ sigmaMin: 0, sigmaMax: 1, width: 1.5 }] }, "ranges.0.width");
  bad({ by: "sigma", ranges: [{ sigmaMin: 2, sigmaMax: 1, width: 1 }] }, "ranges.0.sigmaMax");
  bad({ by: "sigma", ranges: [] }, "ranges");
  bad(
    {
      by: "sigma",
      ranges: [{ sigmaMin: 1, sigmaMax: 80, width: 1 }, { sigmaMin: 0, sigmaMax: 1.5, width: 0.5 }],
    },
    "ranges.0.sigmaMin",
    "overlaps",
  );
  bad({ by: "step", widths: [1, 0] }, "widths.1");
  bad({ by: "time", widths: [1] }, "by");
  const bands = parseWidthSchedule({
    by: "sigma",
    ranges: [
      { sigmaMin: 5, sigmaMax: 80, width: 0.5 },
      { sigmaMin: 0.5, sigmaMax: 5, width: 1 },
      { sigmaMin: 0, sigmaMax: 0.5, width: 0.25 },
    ],
  });
  assertEquals([0.002, 0.5, 4.99, 5, 80].map((sigma) => widthAt(bands, { sigma })), [0.25, 1, 1, 0.5, 0.5]);
  assertThrows(() => widthAt(bands, { sigma: 80.5 }), "none of the scheduled bands");
  assertThrows(() => widthAt(bands, {}), "needs a sigma");
  const steps = parseWidthSchedule({ by: "step", widths: [0.25, 0.5, 1, 0.75] });
  assertEquals([0, 1, 2, 3].map((step) => widthAt(steps, { step })), [0.25, 0.5, 1, 0.75]);
  assertThrows(() => widthAt(steps, { step: 4 }), "step 4");
  assertEquals(widthAt(constantSchedule(0.75), { sigma: 80 }), 0.75);
  assertEquals(JSON.parse(JSON.stringify(bands)), bands); // JSON round trip
});

gpuTest("StepAwareUNet runs the shared network at the scheduled width", async () => {
  const device = await gpuDevice();
  device.manualSeed(8);
  const spec = TINY.adm;
  const net = new UNet(spec, { device });
  const stepAware = new StepAwareUNet(net, {
    by: "sigma",
    ranges: [{ sigmaMin: 0, sigmaMax: 1, width: 0.25 }, { sigmaMin: 1, sigmaMax: 80, width: 0.5 }],
  });
  assertEquals(stepAware.namedParameters().map(([n]) => n), net.namedParameters().map(([n]) => `net.${n}`));
  const { x, cNoise, labels } = inputsFor(spec, device);
  const [a, b, c, d] = noGrad(() => [
    stepAware.forward(x, cNoise, labels, { sigma: 0.3 }),
    net.forward(x, cNoise, labels, { width: 0.25 }),
    stepAware.forward(x, cNoise, labels, { sigma: 3 }),
    net.forward(x, cNoise, labels, { width: 0.5 }),
  ]);
  const [va, vb, vc, vd] = await readAll([a, b, c, d]);
  assertEquals(va, vb);
  assertEquals(vc, vd);
  if (va.every((v, i) => v === vc[i])) throw new Error("the two widths gave the same output");
  net.dispose();
});
