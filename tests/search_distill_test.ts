/**
 * @file Tests of block-wise distillation NAS (models/blocks_cut.ts, search/distill.ts): the teacher's blocks
 * reassemble it exactly (several layouts, float32, bit for bit) and their planned cost is the network's; a
 * student's planned parameters are exactly those its forward uses (nonzero gradients); the local selection rule
 * and the global one (against brute force); the λ(τ) schedules; the joint loss's gradient against central
 * finite differences on a tiny network in float64; and a tiny `--method distill` search end to end.
 */

import fc from "fast-check";
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { add, log, mul, noGrad, randn, reshape, rsqrt, type Tensor, tensor } from "../engine/mod.ts";
import { parseUNetSpec, UNet, type UNetSpecInput } from "../models/unet.ts";
import {
  blockCandidates,
  type BlockChoice,
  BlockwiseUNet,
  cutUNet,
  fullChoice,
  runBlocks,
  studentPlan,
} from "../models/blocks_cut.ts";
import { DEFAULT_NETWORK, train } from "../models/train.ts";
import { layersCost, unetCost } from "../models/cost.ts";
import {
  jointLoss,
  lambdaAt,
  runDistillSearch,
  type ScoredCandidate,
  selectGlobal,
  selectLocal,
  STUDENT_FILE,
  SUPERNET_FILE,
} from "../search/distill.ts";
import type { SearchConfigInput } from "../search/config.ts";
import {
  assertClose,
  assertRejects,
  cpuDevice,
  f64Device,
  MICRO_TRAINING,
  RUNS,
  seededValues,
  tempDir,
  test,
} from "./util.ts";

/** A tiny network with every layer kind of the cut: attention in the encoder, middle and decoder, live inits. */
const TINY: UNetSpecInput = {
  imgResolution: 4,
  inChannels: 2,
  outChannels: 2,
  modelChannels: 4,
  channelMult: [1, 2],
  numBlocks: 1,
  attnResolutions: [2],
  numHeads: 1,
  dropout: 0,
  // One group: with one channel per group GroupNorm removes per-channel constants and some biases have no effect.
  normGroups: 1,
  init: { mode: "xavier_uniform", weight: 1, bias: 0.5, zero: 1, qkv: 1, proj: 1 },
};

// ---------------------------------------------------------------------------------------------------------------
// Cutting.

const LAYOUTS: [string, UNetSpecInput][] = [
  ["default network", DEFAULT_NETWORK],
  ["two blocks per level, ADM-style adaptive scale and mapping, 2 heads, class labels", {
    ...DEFAULT_NETWORK,
    numBlocks: 2,
    resampleProj: false,
    adaptiveScale: true,
    mapping: "adm",
    numHeads: 2,
    labelDim: 3,
    skipScale: 1,
  }],
  ["DDPM: separate learned resampling layers, three levels", {
    ...DEFAULT_NETWORK,
    channelMult: [1, 2, 2],
    numBlocks: 2,
    resampleFilter: "conv",
    resampleInBlock: false,
    resampleProj: false,
    attnResolutions: [8, 4],
    decoderAttention: "all",
  }],
];

test("blocks: the teacher's own blocks reassemble its forward exactly; their cost is the network's", async () => {
  const device = await cpuDevice();
  for (const [name, input] of LAYOUTS) {
    const spec = parseUNetSpec(input);
    device.manualSeed(3);
    const net = new UNet(spec, { device }).eval();
    const cuts = cutUNet(spec);
    assertEquals(cuts.map((c) => c.kind), [
      ...spec.channelMult.map(() => "enc"),
      "mid",
      ...spec.channelMult.map(() => "dec"),
    ]);
    const N = 2, R = spec.imgResolution;
    const x = randn([N, spec.inChannels, R, R], { device });
    const c = tensor([0.3, -0.9], [N], { device });
    // One-hot labels of classes 0 and labelDim − 1.
    const L = spec.labelDim, oneHot = new Array(N * L).fill(0);
    if (L) [oneHot[0], oneHot[2 * L - 1]] = [1, 1];
    const labels = L ? tensor(oneHot, [N, L], { device }) : null;
    const whole = noGrad(() => net.forward(x, c, labels));
    const outs = noGrad(() => runBlocks(net, cuts, null, x, net.embed(c, labels)));
    assertEquals(
      outs.map((o) => o.map((t) => t.shape[1])),
      cuts.map((cut) => cut.outChannels),
      `${name}: channels`,
    );
    const a = await whole.toArray(), b = await outs[outs.length - 1][0].toArray();
    assert(a.every((v, i) => Object.is(v, b[i])), `${name}: reassembled output differs`);
    // The assembled teacher as a student (every block its own choice) is the same function too.
    const asStudent = new BlockwiseUNet(net, cuts.map(fullChoice));
    const s = await noGrad(() => asStudent.forward(x, c, labels)).toArray();
    assert(s.every((v, i) => Object.is(v, a[i])), `${name}: BlockwiseUNet differs`);
    const full = layersCost(studentPlan(spec, cuts.map(fullChoice))), ref = unetCost(spec);
    assertEquals(
      [full.macs, full.parameters, full.breakdown],
      [ref.macs, ref.parameters, ref.breakdown],
      name,
    );
    net.dispose();
  }
});

test("blocks: a student's planned parameters are exactly those its forward uses (nonzero gradients)", async () => {
  const device = await f64Device();
  const spec = parseUNetSpec(TINY);
  device.manualSeed(5);
  const net = new UNet(spec, { device }).train();
  const choices: BlockChoice[] = [
    { width: 0.5, depth: 1, attention: true },
    { width: 0.5, depth: 1, attention: false },
    { width: 0.75, depth: 1, attention: true },
    { width: 1, depth: 1, attention: true },
    { width: 0.5, depth: 2, attention: true },
  ];
  const student = new BlockwiseUNet(net, choices);
  const x = tensor(seededValues(2 * 2 * 16, 8), [2, 2, 4, 4], { device });
  const c = tensor([0.2, -0.4], [2], { device });
  const y = student.forward(x, c);
  y.backward(tensor(seededValues(y.size, 9), y.shape, { device }));
  // Used: a gradient above rounding noise, or an attention key bias of a running attention layer (softmax is
  // blind to a constant added to every logit of a query, so that gradient is zero though the bias is used).
  let used = 0;
  for (const [name, p] of net.namedParameters()) {
    if (!p.grad) continue;
    const g = await p.grad.toFloat64Array();
    const keyBias = (i: number) => name.endsWith(".qkv.bias") && i % 3 === 1;
    used += g.filter((v, i) => !keyBias(i) && Math.abs(v) > 1e-12).length;
    if (name.endsWith(".qkv.bias")) used += g.length / 3;
  }
  assertEquals(used, layersCost(studentPlan(spec, choices)).parameters);
  assert(used < unetCost(spec).parameters);
  net.dispose();
});

test("blocks: candidates cover widths, depths and attention only where the blocks run it", () => {
  const cuts = cutUNet(parseUNetSpec(DEFAULT_NETWORK));
  const count = cuts.map((c) => blockCandidates(c, [0.25, 0.5, 0.75, 1]).length);
  // enc0: 4 widths; enc1: attention on/off; mid: 2 depths, attention in in0; dec1: attention only in block1 of
  // 2; dec0: 2 depths, no attention.
  assertEquals(count, [4, 8, 16, 12, 8]);
});

// ---------------------------------------------------------------------------------------------------------------
// Selection.

const cand = (macs: number, loss: number): ScoredCandidate => ({
  choice: { width: 1, depth: 1, attention: true },
  label: `${macs}/${loss}`,
  macs,
  params: 0,
  loss,
});

test("local rule: the fewest-MACs candidate within (1 + δ) of the block's best", () => {
  const block = [cand(10, 1.0), cand(6, 1.08), cand(4, 1.25), cand(2, 3)];
  assertEquals(selectLocal(block, 0), 0);
  assertEquals(selectLocal(block, 0.1), 1);
  assertEquals(selectLocal(block, 0.25), 2);
  assertEquals(selectLocal(block, 10), 3);
  // Ties in MACs: the lower loss; a NaN loss is never picked.
  assertEquals(selectLocal([cand(5, 1.1), cand(5, 1.0), cand(1, NaN)], 0.5), 1);
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.integer({ min: 1, max: 50 }), fc.double({ min: 0.01, max: 10, noNaN: true })), {
        minLength: 1,
        maxLength: 12,
      }),
      fc.double({ min: 0, max: 2, noNaN: true }),
      (pairs, delta) => {
        const cs = pairs.map(([m, l]) => cand(m, l));
        const best = Math.min(...cs.map((c) => c.loss));
        const p = cs[selectLocal(cs, delta)];
        assert(p.loss <= (1 + delta) * best);
        assert(!cs.some((c) => c.loss <= (1 + delta) * best && c.macs < p.macs));
      },
    ),
    { numRuns: RUNS },
  );
});

test("global rule: the least summed loss under the MACs budget, as brute force finds it", () => {
  const blockArb = fc.array(
    fc.tuple(fc.integer({ min: 1, max: 20 }), fc.integer({ min: 1, max: 100 })),
    { minLength: 1, maxLength: 4 },
  );
  fc.assert(
    fc.property(
      fc.array(blockArb, { minLength: 1, maxLength: 4 }),
      fc.integer({ min: 1, max: 60 }),
      (raw, budget) => {
        const blocks = raw.map((b) => b.map(([m, l]) => cand(m, l)));
        let best: number | null = null;
        const walk = (b: number, macs: number, loss: number) => {
          if (macs > budget) return;
          if (b === blocks.length) {
            if (best === null || loss < best) best = loss;
            return;
          }
          for (const c of blocks[b]) walk(b + 1, macs + c.macs, loss + c.loss);
        };
        walk(0, 0, 0);
        const picks = selectGlobal(blocks, budget);
        if (best === null) return assertEquals(picks, null);
        assert(picks);
        assertEquals(picks.reduce((a, p, b) => a + blocks[b][p].loss, 0), best);
        assert(picks.reduce((a, p, b) => a + blocks[b][p].macs, 0) <= budget);
      },
    ),
    { numRuns: RUNS },
  );
});

// ---------------------------------------------------------------------------------------------------------------
// λ(τ).

test("λ(τ): linear and cosine decay from λ0 to 0, constant stays, zero is zero", () => {
  assertClose(
    [0, 0.25, 0.5, 1].map((t) => lambdaAt("linear", 2, t)),
    [2, 1.5, 1, 0],
    { atol: 1e-15 },
    "linear",
  );
  assertClose(
    [0, 0.25, 0.5, 1].map((t) => lambdaAt("cosine", 2, t)),
    [2, 1 + Math.SQRT1_2, 1, 0],
    { atol: 1e-15 },
    "cosine",
  );
  assertEquals([0, 0.3, 1].map((t) => lambdaAt("constant", 0.7, t)), [0.7, 0.7, 0.7]);
  assertEquals([0, 0.3, 1].map((t) => lambdaAt("zero", 0.7, t)), [0, 0, 0]);
  // Both decays never increase; the cosine stays above the line in the first half, below it in the second.
  for (let k = 1; k <= 100; k++) {
    const [a, b] = [(k - 1) / 100, k / 100];
    assert(lambdaAt("linear", 1, b) <= lambdaAt("linear", 1, a));
    assert(lambdaAt("cosine", 1, b) <= lambdaAt("cosine", 1, a));
    if (b < 0.5) assert(lambdaAt("cosine", 1, b) > lambdaAt("linear", 1, b));
    if (a > 0.5) assert(lambdaAt("cosine", 1, a) < lambdaAt("linear", 1, a));
  }
  for (const bad of [-0.1, 1.1, NaN]) {
    let threw = false;
    try {
      lambdaAt("linear", 1, bad);
    } catch {
      threw = true;
    }
    assert(threw, `τ = ${bad} accepted`);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// The joint loss.

test("joint loss: L = L_EDM + λ·Σ w_b·MSE_b, and its gradient matches finite differences (float64)", async () => {
  const device = await f64Device();
  const spec = parseUNetSpec(TINY);
  device.manualSeed(11);
  const teacher = new UNet(spec, { device }).eval();
  device.manualSeed(12);
  const net = new UNet(spec, { device }).train();
  const cuts = cutUNet(spec);
  const choices: BlockChoice[] = [
    { width: 0.5, depth: 1, attention: true },
    { width: 0.5, depth: 1, attention: false },
    { width: 1, depth: 1, attention: true },
    { width: 0.75, depth: 2, attention: true },
    { width: 0.5, depth: 1, attention: true },
  ];
  const student = new BlockwiseUNet(net, choices);
  const N = 2, shape = [N, 2, 4, 4];
  const images = tensor(seededValues(64, 21), shape, { device });
  const noise = tensor(seededValues(64, 22, -2, 2), shape, { device });
  const sigma = tensor([0.3, 2.5], [N], { device });
  const weights = [0.5, 0.2, 1.5, 0.7, 0.3], lambda = 0.8;
  const loss = (): Tensor =>
    jointLoss(student, teacher, images, undefined, lambda, weights, { sigma, noise }).loss;

  // The value: the EDM loss plus λ times the weighted block MSEs, recomputed here from the blocks.
  const r = noGrad(() => jointLoss(student, teacher, images, undefined, lambda, weights, { sigma, noise }));
  const [total, edm, distill] = await Promise.all([r.loss, r.edm, r.distill!].map((t) => t.toFloat64Array()));
  assertClose([total[0]], [edm[0] + lambda * distill[0]], { rtol: 1e-12 }, "loss = edm + λ·distill");
  const xIn = noGrad(() => {
    const s = reshape(sigma, [N, 1, 1, 1]);
    return mul(add(images, mul(noise, s)), rsqrt(add(mul(s, s), 0.25)));
  });
  const cNoise = noGrad(() => mul(log(sigma), 0.25));
  const tOut = noGrad(() => runBlocks(teacher, cuts, null, xIn, teacher.embed(cNoise, null)));
  const sOut = noGrad(() => student.forwardBlocks(xIn, cNoise));
  let want = 0;
  for (let b = 0; b < cuts.length; b++) {
    let m = 0;
    for (let j = 0; j < tOut[b].length; j++) {
      const [s, t] = [await sOut[b][j].toFloat64Array(), await tOut[b][j].toFloat64Array()];
      m += s.reduce((a, v, i) => a + (v - t[i]) ** 2, 0) / s.length;
    }
    want += weights[b] * m / tOut[b].length;
  }
  assertClose([distill[0]], [want], { rtol: 1e-10 }, "distillation term");

  // The gradient: analytic against central differences, at probes in every block and the mapping network.
  loss().backward();
  for (const p of teacher.parameters()) assert(p.grad === null, "the teacher received a gradient");
  const params = new Map(net.namedParameters());
  const objective = async () => {
    const v = noGrad(loss);
    const out = (await v.toFloat64Array())[0];
    v.dispose();
    return out;
  };
  const probes: [string, number, boolean][] = [
    ["map_layer0.weight", 5, true],
    ["enc.4x4_conv.weight", 3, true],
    ["enc.4x4_block0.conv0.weight", 0, true],
    ["enc.4x4_block0.conv0.weight", 3 * 36, false], // hidden 2 of 4: filter 3 is outside
    ["enc.2x2_block0.qkv.weight", 1, false], // attention off in enc1
    ["enc.2x2_block0.conv1.weight", 7 * 8 * 9 + 3 * 9 + 4, true],
    ["dec.2x2_in0.proj.weight", 9, true],
    ["dec.2x2_in1.conv0.weight", 0, false], // mid runs depth 1
    ["dec.2x2_block1.qkv.bias", 5, true],
    ["dec.4x4_up.affine.weight", 2, true],
    ["dec.4x4_block1.conv0.weight", 0, false], // dec0 runs depth 1
    ["out_conv.weight", 11, true],
  ];
  const eps = 1e-6;
  for (const [name, i, inside] of probes) {
    const p = params.get(name);
    if (!p) throw new Error(`no parameter ${name}`);
    const g = p.grad ? (await p.grad.toFloat64Array())[i] : 0;
    const base = await p.toFloat64Array();
    const set = (v: number) => {
      const vals = base.slice();
      vals[i] = v;
      device.write(p.storage, vals);
    };
    set(base[i] + eps);
    const plus = await objective();
    set(base[i] - eps);
    const minus = await objective();
    set(base[i]);
    const numeric = (plus - minus) / (2 * eps);
    assertClose([g], [numeric], { rtol: 1e-5, atol: 1e-9 }, `d/d ${name}[${i}]`);
    if (inside !== (Math.abs(numeric) > 1e-9)) {
      throw new Error(`${name}[${i}]: expected ${inside ? "a" : "no"} gradient, got ${numeric}`);
    }
  }
  teacher.dispose();
  net.dispose();
});

// ---------------------------------------------------------------------------------------------------------------
// End to end.

const CACHE = await tempDir("distill-cache-");

/** A tiny distillation search on a micro teacher (8×8 images, CPU kernels). */
function tiny(out: string, teacher: string): SearchConfigInput {
  return {
    method: "distill",
    data: { kind: "procedural", resolution: 8, length: 64 },
    out,
    refN: 32,
    proxyN: 8,
    proxySteps: 3,
    gridImages: 2,
    cacheDir: CACHE,
    training: { logEvery: 2 },
    backend: "cpu",
    distill: {
      teacher,
      batch: 4,
      supernetKimg: 0.016,
      heldOutN: 8,
      retrainKimg: 0.008,
      ablations: ["zero"],
      fidN: 8,
    },
  };
}

Deno.test({
  name: "distill e2e: a tiny search on a micro teacher writes the student, the loss tables and the report",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const root = await tempDir("distill-e2e-");
    await train({ ...MICRO_TRAINING, kimg: 0.008, out: `${root}/teacher`, backend: "cpu" });
    const out = `${root}/run`;
    const events: string[] = [];
    const r = await runDistillSearch(tiny(out, `${root}/teacher`), { onEvent: (e) => events.push(e.type) });
    assertEquals(r.stoppedBy, "done");
    for (
      const f of [
        "report.html",
        "report.json",
        "student.json",
        "candidates.json",
        STUDENT_FILE,
        SUPERNET_FILE,
      ]
    ) {
      assert((await Deno.stat(`${out}/${f}`)).size > 0, `${f} is empty`);
    }
    const student = JSON.parse(await Deno.readTextFile(`${out}/student.json`));
    const teacherCost = unetCost(parseUNetSpec(MICRO_TRAINING.network as UNetSpecInput));
    assertEquals(student.teacher.macs, teacherCost.macs);
    assert(student.macs <= teacherCost.macs && student.macs === r.student.macs);
    assertEquals(student.blocks.map((b: { block: string }) => b.block), [
      "enc0",
      "enc1",
      "mid",
      "dec1",
      "dec0",
    ]);
    // The local choice of each block obeys the rule on the stored losses.
    const cands = JSON.parse(await Deno.readTextFile(`${out}/candidates.json`));
    for (const b of cands.blocks) {
      assertEquals(b.local, selectLocal(b.candidates, cands.delta));
      assertEquals(
        b.candidates[b.local].choice,
        student.blocks.find((x: { block: string }) => x.block === b.block).choice,
      );
    }
    const report = JSON.parse(await Deno.readTextFile(`${out}/report.json`));
    const text = JSON.stringify(report);
    for (
      const title of [
        "Student against teacher",
        "Per-block choice",
        "Local against global selection",
        "λ ablation",
      ]
    ) {
      assert(text.includes(title), `report.json lacks "${title}"`);
    }
    assert(
      Number.isFinite(r.teacher.fid) && Number.isFinite(r.student.fid) && Number.isFinite(r.student.proxyFid),
    );
    assert(events.includes("supernet") && events.includes("retrain"));
    // The folder holds a search now: another one needs --resume, which trains and measures nothing again.
    await assertRejects(() => runDistillSearch(tiny(out, `${root}/teacher`)), "--resume");
    const scores = await Deno.readTextFile(`${out}/scores.json`);
    const again: string[] = [];
    const r2 = await runDistillSearch(tiny(out, `${root}/teacher`), {
      resume: true,
      onEvent: (e) => {
        again.push(e.type);
        if (e.type === "retrain") assert(e.loaded, `${e.label} was retrained`);
      },
    });
    assert(!again.includes("supernet"), "the supernet was trained again");
    assertEquals(await Deno.readTextFile(`${out}/scores.json`), scores);
    assertEquals([r2.student, r2.teacher], [r.student, r.teacher]);
  },
});
