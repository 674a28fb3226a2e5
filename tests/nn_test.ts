/**
 * @file Tests of the nn modules: dotted parameter names and counts as PyTorch would give them, state dict
 * round trips (through safetensors) with strictness and shape errors that name the key, PyTorch's default
 * initialization bounds from the device generator, forward passes against float64 host references on both
 * backends (including EDM's attention block), and gradients through the attention block.
 */

import fc from "fast-check";
import { deepStrictEqual as assertEquals } from "node:assert";
import {
  Conv2d,
  GroupNorm,
  kaimingUniformBound,
  Linear,
  Module,
  scopedForward,
  Sequential,
  SiLU,
} from "../engine/nn.ts";
import { AttentionBlock } from "../models/attention.ts";
import { loadSafetensors, saveSafetensors } from "../engine/safetensors.ts";
import { EMA } from "../engine/optim.ts";
import { tensor } from "../engine/creation.ts";
import { noGrad, scope, type Tensor } from "../engine/tensor.ts";
import { copyInto } from "../engine/ops/core.ts";
import { sum } from "../engine/ops/reduce.ts";
import { add } from "../engine/ops/elementwise.ts";
import { Device } from "../engine/device.ts";
import {
  assertClose,
  assertThrows,
  cpuDevice,
  f64Device,
  gpuDevice,
  gpuTest,
  gradCheck,
  RUNS,
  seededValues,
  test,
} from "./util.ts";

async function backends(): Promise<[string, Device][]> {
  return [["webgpu", await gpuDevice()], ["cpu", await cpuDevice()]];
}

const shapesOf = (m: Module) => m.namedParameters().map(([n, t]) => [n, [...t.shape]]);

/** A small network in the shape of a UNet stage: nested modules, a Sequential and a shared parameter. */
class Net extends Module {
  readonly stem: Conv2d;
  readonly body: Sequential;
  readonly attn: AttentionBlock;
  readonly head: Linear;
  constructor(device: Device) {
    super();
    this.stem = this.registerModule("stem", new Conv2d(3, 8, 3, { padding: 1, device }));
    this.body = this.registerModule(
      "body",
      new Sequential(
        new GroupNorm(2, 8, { device }),
        new SiLU(),
        new Conv2d(8, 8, 1, { bias: false, device }),
      ),
    );
    this.attn = this.registerModule("attn", new AttentionBlock(8, { numHeads: 2, device }));
    this.head = this.registerModule("head", new Linear(8, 4, { device }));
    this.registerParameter("scale", tensor([1], [1], { device }));
  }
}

test("parameter names, shapes and counts follow PyTorch's named_parameters()", async () => {
  const dev = await cpuDevice();
  assertEquals(shapesOf(new Linear(3, 4, { device: dev })), [["weight", [4, 3]], ["bias", [4]]]);
  assertEquals(shapesOf(new Linear(3, 4, { device: dev, bias: false })), [["weight", [4, 3]]]);
  assertEquals(shapesOf(new Conv2d(2, 5, [3, 1], { device: dev })), [["weight", [5, 2, 3, 1]], ["bias", [
    5,
  ]]]);
  assertEquals(shapesOf(new GroupNorm(2, 6, { device: dev })), [["weight", [6]], ["bias", [6]]]);
  assertEquals(shapesOf(new GroupNorm(2, 6, { device: dev, affine: false })), []);
  assertEquals(shapesOf(new SiLU()), []);
  const net = new Net(dev);
  assertEquals(net.namedParameters().map(([n]) => n), [
    "scale",
    "stem.weight",
    "stem.bias",
    "body.0.weight",
    "body.0.bias",
    "body.2.weight",
    "attn.norm.weight",
    "attn.norm.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "head.weight",
    "head.bias",
  ]);
  const attnCount = 8 + 8 + 24 * 8 + 24 + 8 * 8 + 8;
  assertEquals(net.attn.parameterCount(), attnCount);
  assertEquals(net.parameterCount(), 1 + (8 * 27 + 8) + 16 + 64 + attnCount + (32 + 4));
  assertEquals(net.parameters().every((p) => p.requiresGrad), true);
  // Optimizers and the EMA take a module and key their state by its dotted names.
  const ema = new EMA(net);
  assertEquals(Object.keys(ema.stateDict()), net.namedParameters().map(([n]) => n));
  ema.dispose();
  // Without buffers or shared parameters, state_dict keys are the parameter names in the same order.
  assertEquals(Object.keys(net.stateDict()), net.namedParameters().map(([n]) => n));
  assertEquals(net.namedModules().map(([n]) => n), [
    "",
    "stem",
    "body",
    "body.0",
    "body.1",
    "body.2",
    "attn",
    "attn.norm",
    "attn.qkv",
    "attn.proj",
    "head",
  ]);
});

test("a parameter shared by two modules is listed once; duplicate or dotted names are refused", async () => {
  const dev = await cpuDevice();
  class Tied extends Module {
    constructor() {
      super();
      const a = this.registerModule("a", new Linear(2, 2, { device: dev }));
      const b = this.registerModule("b", new Module());
      // deno-lint-ignore no-explicit-any
      (b as any).registerParameter("w", a.weight);
      assertThrows(() => this.registerModule("a", new SiLU()), `"a" is already registered`);
      assertThrows(
        () => this.registerParameter("x.y", tensor([1], [1], { device: dev })),
        `"x.y" must be non-empty`,
      );
    }
  }
  const t = new Tied();
  assertEquals(t.namedParameters().map(([n]) => n), ["a.weight", "a.bias"]);
  assertEquals(Object.keys(t.stateDict()), ["a.weight", "a.bias", "b.w"]);
});

test("without a tape a Sequential holds about two activations at a time; with one, every layer's input", async () => {
  // A device of its own: tensors that earlier tests left to the FinalizationRegistry must not move the counts.
  const device = await Device.create({ backend: "cpu" });
  const seq = new Sequential(...Array.from({ length: 8 }, () => new Conv2d(4, 4, 1, { device })));
  const x = tensor(seededValues(2 * 4 * 8 * 8, 1), [2, 4, 8, 8], { device });
  const activation = x.size * 4;
  noGrad(() => seq.forward(x)).dispose(); // warm-up
  const base = device.memory().liveBytes;
  device.resetPeakMemory();
  const y = noGrad(() => seq.forward(x));
  assertEquals(device.memory().liveBytes - base, activation, "only the output stays live");
  const peak = device.memory().peakLiveBytes - base;
  if (peak > 2 * activation) {
    throw new Error(`peak ${peak} B for ${activation} B activations: layers were kept`);
  }
  y.dispose();
  // With a tape every layer's input is kept for backward, until the enclosing scope ends.
  scope(() => {
    seq.forward(x);
    assertEquals(device.memory().liveBytes - base, 8 * activation, "taped activations");
  });
  assertEquals(device.memory().liveBytes, base);
  seq.dispose();
  x.dispose();
  device.destroy();
});

test("@scopedForward: without a tape only the output stays live; with one, intermediates live until the enclosing scope", async () => {
  // A device of its own: tensors that earlier tests left to the FinalizationRegistry must not move the counts.
  const device = await Device.create({ backend: "cpu" });
  class Block extends Module {
    readonly norm = this.registerModule("norm", new GroupNorm(2, 4, { device }));
    readonly conv = this.registerModule("conv", new Conv2d(4, 4, 3, { padding: 1, device }));
    @scopedForward
    forward(x: Tensor): Tensor {
      return add(x, this.conv.forward(new SiLU().forward(this.norm.forward(x))));
    }
  }
  const block = new Block();
  const x = tensor(seededValues(2 * 4 * 5 * 5, 2), [2, 4, 5, 5], { device });
  noGrad(() => block.forward(x)).dispose(); // warm-up: the norm's constant parameters get their storage
  const base = device.memory().liveAllocations;
  const y = noGrad(() => block.forward(x));
  assertEquals(device.memory().liveAllocations, base + 1, "noGrad: only the output");
  const ref = noGrad(() =>
    scope(() => add(x, block.conv.forward(new SiLU().forward(block.norm.forward(x)))))
  );
  assertClose(await y.toArray(), await ref.toArray(), { rtol: 1e-6 }, "plain maths");
  y.dispose();
  ref.dispose();
  scope(() => {
    const out = block.forward(x);
    if (device.memory().liveAllocations < base + 3) {
      throw new Error("a taped forward freed its intermediates");
    }
    sum(out).backward();
    if (!block.conv.weight.grad) throw new Error("no gradient reached the convolution");
  });
  block.zeroGrad();
  assertEquals(device.memory().liveAllocations, base, "the enclosing scope freed the taped forward");
  block.dispose();
  x.dispose();
  device.destroy();
});

test("train() / eval() set the mode recursively", async () => {
  const net = new Net(await cpuDevice());
  assertEquals(net.namedModules().every(([, m]) => m.training), true);
  assertEquals(net.eval(), net);
  assertEquals(net.namedModules().some(([, m]) => m.training), false);
  net.train();
  assertEquals(net.attn.qkv.training, true);
});

gpuTest(
  "default initialization: kaiming-uniform(a=√5) weights and 1/√fan_in biases, from the seeded generator",
  async () => {
    assertClose([kaimingUniformBound(50)], [1 / Math.sqrt(50)], { rtol: 1e-14 });
    const weights: Float32Array[] = [];
    for (const [name, dev] of await backends()) {
      dev.manualSeed(2024);
      const lin = new Linear(50, 64, { device: dev });
      const conv = new Conv2d(4, 32, 3, { device: dev });
      for (
        const [what, t, fanIn] of [
          ["Linear.weight", lin.weight, 50],
          ["Linear.bias", lin.bias!, 50],
          ["Conv2d.weight", conv.weight, 36],
          ["Conv2d.bias", conv.bias!, 36],
        ] as const
      ) {
        const v = await t.toArray();
        const bound = 1 / Math.sqrt(fanIn);
        let maxAbs = 0, sq = 0;
        for (const x of v) {
          maxAbs = Math.max(maxAbs, Math.abs(x));
          sq += x * x;
        }
        if (maxAbs > bound * (1 + 1e-6)) {
          throw new Error(`${name} ${what}: |w| up to ${maxAbs} exceeds ${bound}`);
        }
        // U(−b, b) fills its range and has variance b²/3.
        if (v.length > 100) {
          if (maxAbs < 0.9 * bound) {
            throw new Error(`${name} ${what}: |w| only reaches ${maxAbs} of ${bound}`);
          }
          const variance = sq / v.length, want = bound * bound / 3;
          if (Math.abs(variance - want) > 0.15 * want) {
            throw new Error(`${name} ${what}: variance ${variance}, want ${want}`);
          }
        }
      }
      weights.push(await lin.weight.toArray());
      // Different layers get different numbers (the generator advances).
      if ((await conv.weight.toArray())[0] === weights[weights.length - 1][0]) {
        throw new Error("repeated numbers");
      }
    }
    assertClose(
      weights[0],
      weights[1],
      { rtol: 1e-6, atol: 1e-7 },
      "same seed, same weights on both backends",
    );
    const g = new GroupNorm(2, 4, { device: await cpuDevice() });
    assertEquals([Array.from(await g.weight!.toArray()), Array.from(await g.bias!.toArray())], [
      [1, 1, 1, 1],
      [
        0,
        0,
        0,
        0,
      ],
    ]);
  },
);

gpuTest("state dict round trip through safetensors reproduces the model's outputs", async () => {
  for (const [name, dev] of await backends()) {
    dev.manualSeed(1);
    const a = new Net(dev);
    dev.manualSeed(2);
    const b = new Net(dev);
    const x = tensor(seededValues(2 * 3 * 4 * 4, 5), [2, 3, 4, 4], { device: dev });
    const run = (m: Net) =>
      noGrad(() => {
        const h = m.attn.forward(m.body.forward(m.stem.forward(x)));
        return m.head.forward(sum(h, [2, 3])); // [N, C, H, W] summed over positions → [N, C]
      });
    const before = await run(b).toArray();
    const path = await Deno.makeTempFile({ suffix: ".safetensors" });
    await saveSafetensors(path, a.stateDict());
    const loaded = await loadSafetensors(path, { device: dev });
    await Deno.remove(path);
    const paramsBefore = b.parameters();
    const result = b.loadStateDict(loaded);
    assertEquals(result, { missingKeys: [], unexpectedKeys: [] });
    assertEquals(b.parameters(), paramsBefore, "parameters are updated in place, not replaced");
    const ya = await run(a).toArray(), yb = await run(b).toArray();
    assertEquals(Array.from(yb), Array.from(ya), `${name}: loaded model matches`);
    if (before.every((v, i) => v === ya[i])) {
      throw new Error("differently seeded models agreed before loading");
    }
  }
});

gpuTest(
  "loadStateDict: strict key checks, shape mismatches naming the key, non-strict partial loads",
  async () => {
    const dev = await cpuDevice();
    const net = new Net(dev);
    const sd = { ...net.stateDict() };
    const { "head.bias": _dropped, ...partial } = sd;
    assertThrows(() => net.loadStateDict(partial), `missing key(s): "head.bias"`);
    assertThrows(() => net.loadStateDict({ ...sd, extra: sd.scale }), `unexpected key(s): "extra"`);
    assertThrows(
      () =>
        net.loadStateDict({
          ...sd,
          "stem.weight": tensor(new Float32Array(8 * 3 * 3), [8, 3, 3, 1], { device: dev }),
        }),
      `size mismatch for "stem.weight": the checkpoint has shape [8, 3, 3, 1], the model [8, 3, 3, 3]`,
    );
    const zeros = tensor([0, 0, 0, 0], [4], { device: dev });
    const r = net.loadStateDict({ "head.bias": zeros, other: zeros }, { strict: false });
    assertEquals(r.unexpectedKeys, ["other"]);
    assertEquals(r.missingKeys.length, Object.keys(sd).length - 1);
    assertEquals(Array.from(await net.head.bias!.toArray()), [0, 0, 0, 0]);
    const gpuNet = new Linear(3, 4, { device: await gpuDevice() });
    assertThrows(
      () => gpuNet.loadStateDict(new Linear(3, 4, { device: dev }).stateDict()),
      `"weight" is on a cpu device`,
    );
  },
);

// ---------------------------------------------------------------------------------------------------------------
// Forward passes against float64 host references.

function hostLinear(
  x: Float64Array,
  rows: number,
  w: Float64Array,
  b: Float64Array | null,
  inF: number,
  outF: number,
) {
  const y = new Float64Array(rows * outF);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outF; o++) {
      let s = b ? b[o] : 0;
      for (let i = 0; i < inF; i++) s += x[r * inF + i] * w[o * inF + i];
      y[r * outF + o] = s;
    }
  }
  return y;
}

function hostGroupNorm(
  x: Float64Array,
  N: number,
  C: number,
  L: number,
  G: number,
  w: Float64Array,
  b: Float64Array,
  eps: number,
) {
  const y = new Float64Array(x.length), cg = C / G;
  for (let n = 0; n < N; n++) {
    for (let g = 0; g < G; g++) {
      const start = (n * C + g * cg) * L, len = cg * L;
      let m = 0;
      for (let i = 0; i < len; i++) m += x[start + i];
      m /= len;
      let v = 0;
      for (let i = 0; i < len; i++) v += (x[start + i] - m) ** 2;
      v /= len;
      for (let i = 0; i < len; i++) {
        const c = g * cg + Math.floor(i / L);
        y[start + i] = ((x[start + i] - m) / Math.sqrt(v + eps)) * w[c] + b[c];
      }
    }
  }
  return y;
}

/** A 1×1 convolution: per sample, y[o, p] = Σ_c w[o, c]·x[c, p] + b[o]. */
function hostConv1x1(
  x: Float64Array,
  N: number,
  Cin: number,
  L: number,
  w: Float64Array,
  b: Float64Array,
  Cout: number,
) {
  const y = new Float64Array(N * Cout * L);
  for (let n = 0; n < N; n++) {
    for (let o = 0; o < Cout; o++) {
      for (let p = 0; p < L; p++) {
        let s = b[o];
        for (let c = 0; c < Cin; c++) s += w[o * Cin + c] * x[(n * Cin + c) * L + p];
        y[(n * Cout + o) * L + p] = s;
      }
    }
  }
  return y;
}

/** EDM's UNetBlock attention, transcribed: reshape(N·heads, C/heads, 3, L), softmax(qᵀk/√c), einsum, proj, residual. */
async function hostAttention(block: AttentionBlock, x: Float64Array, [N, C, H, W]: number[]) {
  const L = H * W, heads = block.numHeads, c = C / heads;
  const r = (t: Tensor | null) => t!.toFloat64Array();
  const h = hostGroupNorm(
    x,
    N,
    C,
    L,
    block.norm.numGroups,
    await r(block.norm.weight),
    await r(block.norm.bias),
    block.norm.eps,
  );
  const qkv = hostConv1x1(h, N, C, L, await r(block.qkv.weight), await r(block.qkv.bias), 3 * C);
  const a = new Float64Array(N * C * L);
  for (let n = 0; n < N; n++) {
    for (let hd = 0; hd < heads; hd++) {
      // Element (batch n·heads+hd, channel ci, part j, position p) of the reshape is qkv channel (hd·c+ci)·3+j.
      const at = (ci: number, j: number, p: number) => qkv[(n * 3 * C + (hd * c + ci) * 3 + j) * L + p];
      for (let q = 0; q < L; q++) {
        const logits = new Float64Array(L);
        for (let k = 0; k < L; k++) {
          let s = 0;
          for (let ci = 0; ci < c; ci++) s += at(ci, 0, q) * at(ci, 1, k);
          logits[k] = s / Math.sqrt(c);
        }
        const mx = Math.max(...logits);
        const e = logits.map((l) => Math.exp(l - mx));
        const z = e.reduce((s, v) => s + v, 0);
        for (let ci = 0; ci < c; ci++) {
          let s = 0;
          for (let k = 0; k < L; k++) s += (e[k] / z) * at(ci, 2, k);
          a[(n * C + hd * c + ci) * L + q] = s;
        }
      }
    }
  }
  const proj = hostConv1x1(a, N, C, L, await r(block.proj.weight), await r(block.proj.bias), C);
  return proj.map((v, i) => (v + x[i]) * block.skipScale);
}

gpuTest(
  "property: Linear, Conv2d(1×1), GroupNorm and SiLU forwards match float64 references (both backends)",
  async () => {
    const devs = await backends();
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 }),
        fc.constantFrom(1, 2, 3),
        fc.integer({ min: 1, max: 7 }),
        fc.integer({ min: 1, max: 5 }),
        fc.nat(),
        async (N, G, cg, L, seed) => {
          const C = G * cg;
          const xv = Float64Array.from(seededValues(N * C * L, seed, -2, 2));
          for (const [name, dev] of devs) {
            dev.manualSeed(seed);
            const x = tensor(xv, [N, C, L, 1], { device: dev });
            const lin = new Linear(C, 5, { device: dev });
            const conv = new Conv2d(C, 4, 1, { device: dev });
            const gn = new GroupNorm(G, C, { device: dev, eps: 1e-3 });
            // Non-trivial affine parameters for the norm.
            copyInto(gn.weight!, tensor(seededValues(C, seed + 1, 0.5, 2), [C], { device: dev }), [0]);
            copyInto(gn.bias!, tensor(seededValues(C, seed + 2), [C], { device: dev }), [0]);
            const xr = tensor(xv, [N * L, C], { device: dev }); // rows of C features for the Linear
            const r = (t: Tensor) => t.toFloat64Array();
            const got = noGrad(
              () => [lin.forward(xr), conv.forward(x), gn.forward(x), new SiLU().forward(x)],
            );
            const wantLin = hostLinear(await r(xr), N * L, await r(lin.weight), await r(lin.bias!), C, 5);
            const wantConv = hostConv1x1(xv, N, C, L, await r(conv.weight), await r(conv.bias!), 4);
            const wantGn = hostGroupNorm(xv, N, C, L, G, await r(gn.weight!), await r(gn.bias!), 1e-3);
            const wantSilu = xv.map((v) => v / (1 + Math.exp(-v)));
            const tol = { rtol: 1e-4, atol: 1e-5 };
            assertClose(await r(got[0]), wantLin, tol, `${name} Linear`);
            assertClose(await r(got[1]), wantConv, tol, `${name} Conv2d`);
            assertClose(await r(got[2]), wantGn, tol, `${name} GroupNorm`);
            assertClose(await r(got[3]), wantSilu, tol, `${name} SiLU`);
            for (const m of [lin, conv, gn]) m.dispose();
            got.forEach((t) => t.dispose());
          }
        },
      ),
      { numRuns: Math.max(1, Math.floor(RUNS / 3)) },
    );
  },
);

gpuTest(
  "property: AttentionBlock matches EDM's attention (float64 transcription) on both backends",
  async () => {
    const devs = await backends();
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 2 }),
        fc.constantFrom([4, 1], [8, 2], [6, 3], [8, 1]),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 5 }),
        fc.constantFrom(1, Math.SQRT1_2),
        fc.nat(),
        async (N, [C, heads], H, W, skipScale, seed) => {
          const shape = [N, C, H, W];
          const xv = Float64Array.from(seededValues(N * C * H * W, seed, -2, 2));
          for (const [name, dev] of devs) {
            dev.manualSeed(seed);
            const block = new AttentionBlock(C, { numHeads: heads, numGroups: 2, skipScale, device: dev });
            const x = tensor(xv, shape, { device: dev });
            const y = noGrad(() => block.forward(x));
            assertEquals(y.shape, shape);
            assertClose(await y.toFloat64Array(), await hostAttention(block, xv, shape), {
              rtol: 1e-4,
              atol: 2e-5,
            }, name);
            block.dispose();
            y.dispose();
            x.dispose();
          }
        },
      ),
      { numRuns: Math.max(1, Math.floor(RUNS / 3)) },
    );
  },
);

gpuTest("AttentionBlock: zeroInitProj starts as the identity; options and inputs are validated", async () => {
  const dev = await gpuDevice();
  const block = new AttentionBlock(8, { zeroInitProj: true, device: dev });
  const xv = seededValues(2 * 8 * 3 * 3, 3);
  const x = tensor(xv, [2, 8, 3, 3], { device: dev });
  assertEquals(Array.from(await block.forward(x).toArray()), Array.from(xv));
  assertEquals(block.norm.numGroups, 2, "EDM's default min(32, C/4) groups");
  assertThrows(
    () => new AttentionBlock(6, { numHeads: 4, device: dev }),
    "channels 6 must be divisible by numHeads 4",
  );
  assertThrows(
    () => block.forward(tensor(new Float32Array(8 * 9), [8, 3, 3], { device: dev })),
    "expected input [N, 8, H, W], got [8, 3, 3]",
  );
  assertThrows(() => new GroupNorm(3, 8, { device: dev }), "numChannels 8 must be divisible by numGroups 3");
  assertThrows(
    () => new Linear(0, 3, { device: dev }),
    "Linear: inFeatures must be a positive integer, got 0",
  );
  assertThrows(() => new Conv2d(3, 4, 0, { device: dev }), "Conv2d: kernelSize must be a positive integer");
  assertThrows(
    () => new Linear(5, 2, { device: dev }).forward(x),
    "linear: input [2, 8, 3, 3] does not end in in_features 5",
  );
});

test("AttentionBlock: input gradient by finite differences, parameter gradients checked entrywise (float64)", async () => {
  const dev = await f64Device();
  dev.manualSeed(8);
  const block = new AttentionBlock(4, { numHeads: 2, numGroups: 2, skipScale: Math.SQRT1_2, device: dev });
  const shape = [1, 4, 2, 3];
  await gradCheck((x) => block.forward(x), [{ shape, data: seededValues(24, 9) }], {
    rtol: 1e-5,
    atol: 1e-7,
  });
  block.zeroGrad();
  // Parameter gradients of sum(y·cot) against central differences on a few entries of each parameter.
  const x = tensor(seededValues(24, 9), shape, { device: dev });
  const cot = tensor(seededValues(24, 10), shape, { device: dev });
  const objective = async () => {
    const y = noGrad(() => block.forward(x));
    const [yv, cv] = [await y.toFloat64Array(), await cot.toFloat64Array()];
    y.dispose();
    return yv.reduce((s, v, i) => s + v * cv[i], 0);
  };
  block.forward(x).backward(cot);
  const eps = 1e-6;
  for (const [pname, p] of block.namedParameters()) {
    const g = await p.grad!.toFloat64Array();
    const base = await p.toFloat64Array();
    for (const i of [0, Math.floor(p.size / 2), p.size - 1]) {
      const set = (v: number) => {
        const vals = base.slice();
        vals[i] = v;
        copyInto(p, tensor(vals, p.shape, { device: dev }), p.shape.map(() => 0));
      };
      set(base[i] + eps);
      const plus = await objective();
      set(base[i] - eps);
      const minus = await objective();
      set(base[i]);
      assertClose([g[i]], [(plus - minus) / (2 * eps)], { rtol: 1e-5, atol: 1e-7 }, `d/d ${pname}[${i}]`);
    }
  }
});
