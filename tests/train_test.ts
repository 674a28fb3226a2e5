/**
 * @file Tests of the training loop and checkpoints (models/train.ts, models/trainer.ts, models/checkpoint.ts) on a micro UNet with
 * 8×8 images: a fixed batch is overfitted (its fixed-σ loss falls), checkpoints round-trip and refuse NaNs, a run
 * stopped half-way and resumed ends with exactly the weights of an uninterrupted run (bit-identical on the CPU
 * backend, float tolerance on WebGPU), a diverging run stops naming the step without writing a bad checkpoint,
 * the sandwich rule's gradient is the sum of the three widths' gradients, a step reads back at most once, and
 * memory stays flat from step to step.
 */

import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { type Device, noGrad, randn, type Tensor, tensor } from "../engine/mod.ts";
import { SONG_INIT, type UNet, type UNetSpecInput } from "../models/unet.ts";
import { edmLoss, EDMPrecond } from "../models/edm.ts";
import { BatchIterator, openDataset } from "../models/data.ts";
import { parseTrainConfig, train, type TrainConfigInput, type TrainEvent } from "../models/train.ts";
import {
  accumulateGradients,
  buildNetworks,
  learningRate,
  NonFiniteLossError,
  sandwichWidths,
} from "../models/trainer.ts";
import { sample } from "../models/sample.ts";
import { UsageError } from "../util/errors.ts";
import {
  disposeCheckpoint,
  latestCheckpoint,
  listCheckpoints,
  loadCheckpoint,
  NonFiniteCheckpointError,
  readTensors,
  readTrainState,
  saveCheckpoint,
} from "../models/checkpoint.ts";
import {
  assertClose,
  cpuDevice,
  f64Device,
  gpuDevice,
  gpuTest,
  MICRO_TRAINING,
  MICRO_UNET,
  test,
} from "./util.ts";

/** A micro DDPM++-style UNet for 8×8 RGB (49 k parameters). */
const MICRO: UNetSpecInput = MICRO_UNET;

/** Options shared by the runs: the micro network, 4-image batches, no grids, no periodic checkpoints. */
const BASE: TrainConfigInput = { ...MICRO_TRAINING, checkpointKimg: 0 };

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "train_test_" });
}

async function expectReject(p: Promise<unknown>, ...parts: string[]): Promise<Error> {
  try {
    await p;
  } catch (e) {
    const msg = (e as Error).message;
    for (const part of parts) {
      if (!msg.includes(part)) throw new Error(`expected an error containing "${part}", got "${msg}"`);
    }
    return e as Error;
  }
  throw new Error(`expected an error containing ${parts.join(", ")}, but nothing was thrown`);
}

/** Every tensor of every file of a checkpoint, as host arrays, keyed "file/name". */
async function checkpointValues(dir: string, device: Device): Promise<Map<string, Float32Array>> {
  const ck = await loadCheckpoint(dir, device);
  const out = new Map<string, Float32Array>();
  for (
    const [file, ts] of Object.entries({ model: ck.model, ema: ck.ema, optimizer: ck.optimizer.tensors })
  ) {
    for (const [name, t] of Object.entries(await readTensors(ts))) out.set(`${file}/${name}`, t.data.slice());
  }
  disposeCheckpoint(ck);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

test("configuration: defaults, the data follows the network's resolution, errors name the field", async () => {
  const cfg = await parseTrainConfig({});
  assertEquals(cfg.network.imgResolution, 16);
  assertEquals(cfg.data, { kind: "procedural", resolution: 16, seed: 0, length: 50000, scene: "flat" });
  assertEquals((await parseTrainConfig({ network: "ddsm-cifar10" })).data.kind === "procedural", true);
  assertEquals((await parseTrainConfig({ network: "ddsm-cifar10" })).network.modelChannels, 128);
  const e = await expectReject(parseTrainConfig({ batch: 0, lr: "x", bogus: 1 }), "batch", "lr", "bogus");
  assert(e instanceof UsageError);
  await expectReject(parseTrainConfig({ network: "no-such-net" }), "network", "ddpmpp-cifar10");
  await expectReject(parseTrainConfig({ network: { ...MICRO, channelMult: [] } }), "channelMult");
  // EDM's ramp-up: lr 0 at the first step, linear, then flat.
  const lr = { lr: 1e-3, lrRampupKimg: 1 };
  assertEquals([0, 500, 1000, 5000].map((n) => learningRate(lr, n)), [0, 5e-4, 1e-3, 1e-3]);
});

test("the loss of a tiny fixed batch falls over 50 steps (CPU float32)", async () => {
  const device = await cpuDevice();
  const out = await tempDir();
  const cfg: TrainConfigInput = {
    ...BASE,
    data: { kind: "procedural", resolution: 8, length: 4 },
    lrRampupKimg: 0,
    kimg: 0.2,
    logEvery: 10,
    out,
  };
  const r = await train(cfg, { device });
  assertEquals([r.step, r.nimg, r.stoppedBy], [50, 200, "done"]);

  // The loss of the 4 images (each 4 times) at 16 fixed noise levels from 0.05 to 5 with fixed noise, before
  // and after training.
  const images = new BatchIterator(await openDataset(cfg.data!), { batchSize: 16, shuffle: false, device })
    .next().images;
  const sigma = tensor(Array.from({ length: 16 }, (_, i) => 0.05 * 100 ** (i / 15)), [16], { device });
  const noise = randn([16, 3, 8, 8], { device, seed: 99 });
  const fixedLoss = async (net: UNet) => {
    const D = new EDMPrecond((x, c, l) => net.forward(x, c, l ?? null));
    const l = noGrad(() => edmLoss(D, images, undefined, { sigma, noise }));
    const v = await l.loss.item();
    [l.loss, l.perSample].forEach((t) => t.dispose());
    return v;
  };
  const { net, emaNet } = buildNetworks(await parseTrainConfig(cfg), device);
  net.eval();
  const before = await fixedLoss(net);
  const ck = await loadCheckpoint(r.checkpoint!, device, { model: true });
  net.loadStateDict(ck.model);
  disposeCheckpoint(ck);
  const after = await fixedLoss(net);
  // Measured: 0.877 → 0.731 (−17%).
  assert(after < 0.9 * before, `fixed-σ loss ${before} → ${after}: expected a fall of more than 10%`);
  // The logged (random-σ) loss falls too (measured 0.897 → 0.735).
  const h = r.lossHistory;
  assertEquals(h.map((p) => p.step), [10, 20, 30, 40, 50]);
  assert(h[4].loss < 0.9 * h[0].loss, `logged loss ${h.map((p) => p.loss.toFixed(3)).join(" → ")}`);
  for (const t of [images, sigma, noise]) t.dispose();
  net.dispose();
  emaNet.dispose();
  await Deno.remove(out, { recursive: true });
});

test("checkpoints round-trip, keep the newest, and refuse NaN without writing anything", async () => {
  const device = await cpuDevice();
  const run = await tempDir();
  const a = tensor([1, 2, 3, 4, 5, 6], [2, 3], { device });
  const b = tensor([0.5, -0.25], [2], { device });
  const parts = (step: number, bad?: Tensor) => ({
    model: { "w.weight": a, "w.bias": bad ?? b },
    ema: { "w.weight": a },
    optimizer: {
      tensors: { "w.weight.exp_avg": a, "w.weight.exp_avg_sq": a },
      meta: {
        type: "Adam",
        lr: 0.1,
        betas: [0.9, 0.999] as [number, number],
        eps: 1e-8,
        weightDecay: 0,
        steps: {},
      },
    },
    state: {
      step,
      nimg: 4 * step,
      data: { position: 4 * step, epoch: 0 },
      rng: { seed: 3, counter: 17 * step },
      lossHistory: [{ step, nimg: 4 * step, loss: 0.5 }],
      trainSeconds: 1.5,
      config: { batch: 4 },
    },
  });
  for (const step of [1, 2, 3]) await saveCheckpoint(run, parts(step), { keep: 2 });
  assertEquals((await listCheckpoints(run)).map((c) => c.step), [2, 3]);
  const dir = (await latestCheckpoint(run))!;
  assert(dir.endsWith("step-000000003"), dir);
  const ck = await loadCheckpoint(dir, device);
  assertEquals(Object.keys(ck.model).sort(), ["w.bias", "w.weight"]);
  assertEquals([...ck.model["w.weight"].shape], [2, 3]);
  assertEquals(Array.from(await ck.model["w.weight"].toArray()), [1, 2, 3, 4, 5, 6]);
  assertEquals(Array.from(await ck.model["w.bias"].toArray()), [0.5, -0.25]);
  assertEquals(Object.keys(ck.optimizer.tensors).sort(), ["w.weight.exp_avg", "w.weight.exp_avg_sq"]);
  assertEquals(ck.state.rng, { seed: 3, counter: 51 });
  assertEquals(ck.state.data, { position: 12, epoch: 0 });
  assertEquals(ck.optimizer.meta.lr, 0.1);
  disposeCheckpoint(ck);

  // A NaN anywhere: nothing written, the older checkpoints untouched.
  const nan = tensor([0.5, NaN], [2], { device });
  await expectReject(saveCheckpoint(run, parts(4, nan)), "step 4", "w.bias", "model.safetensors", "NaN")
    .then((e) => assert(e instanceof NonFiniteCheckpointError));
  assertEquals((await listCheckpoints(run)).map((c) => c.step), [2, 3]);
  const leftovers = [...Deno.readDirSync(`${run}/checkpoints`)].map((e) => e.name).sort();
  assertEquals(leftovers, ["step-000000002", "step-000000003"]);

  // A corrupt state.json is reported with the file and the field.
  await Deno.writeTextFile(`${dir}/state.json`, JSON.stringify({ ...ck.state, step: -1 }));
  await expectReject(readTrainState(dir), "state.json", "step");
  for (const t of [a, b, nan]) t.dispose();
  await Deno.remove(run, { recursive: true });
});

/**
 * Runs 6 steps uninterrupted, and 6 steps in two sessions (stopped by the signal after step 3, when a
 * checkpoint is saved, then resumed); returns the final checkpoints' values of both.
 */
async function resumeRuns(device: Device, extra: TrainConfigInput) {
  const dirA = await tempDir(), dirB = await tempDir();
  const cfg = { ...BASE, ...extra, kimg: 0.024 };
  const a = await train({ ...cfg, out: dirA }, { device });
  const controller = new AbortController();
  const stop = (e: TrainEvent) => e.type === "step" && e.step === 3 && controller.abort();
  const b1 = await train({ ...cfg, out: dirB }, { device, signal: controller.signal, onProgress: stop });
  assertEquals([b1.step, b1.stoppedBy], [3, "aborted"]);
  assertEquals((await listCheckpoints(dirB)).map((c) => c.step), [3]);
  const starts: TrainEvent[] = [];
  const b2 = await train({ out: dirB }, { device, onProgress: (e) => e.type === "start" && starts.push(e) });
  assertEquals(starts.length === 1 && starts[0].type === "start" && starts[0].step, 3);
  assertEquals([a.step, b2.step, b2.stoppedBy], [6, 6, "done"]);
  const stateA = await readTrainState(a.checkpoint!), stateB = await readTrainState(b2.checkpoint!);
  assertEquals(stateB.rng, stateA.rng);
  assertEquals(stateB.data, stateA.data);
  assertEquals(stateB.optimizer, stateA.optimizer);
  const va = await checkpointValues(a.checkpoint!, device),
    vb = await checkpointValues(b2.checkpoint!, device);
  assertEquals([...vb.keys()], [...va.keys()]);
  await Deno.remove(dirA, { recursive: true });
  await Deno.remove(dirB, { recursive: true });
  return { va, vb, lossA: a.lossHistory, lossB: b2.lossHistory };
}

test("a stopped and resumed run equals an uninterrupted one bit for bit (CPU float32, sandwich, dropout)", async () => {
  const device = await cpuDevice();
  const { va, vb, lossA, lossB } = await resumeRuns(device, {
    network: { ...MICRO, modelChannels: 16 },
    sandwich: true,
    dropout: 0.2,
  });
  for (const [k, v] of va) assertEquals(Array.from(vb.get(k)!), Array.from(v), k);
  // The weights moved away from their average; the last logged loss (steps 5–6) is the same. (The stopped
  // session logged steps 1–3 at the stop, so the earlier log windows differ by design.)
  assert(va.get("model/out_conv.weight")!.some((x, i) => x !== va.get("ema/out_conv.weight")![i]));
  assertEquals(lossB[lossB.length - 1], lossA[lossA.length - 1]);
});

test("a stopped and resumed run equals an uninterrupted one to float32 rounding (CPU float64)", async () => {
  // Checkpoints store F32, so a float64 run resumes from weights rounded to float32.
  const device = await f64Device();
  const { va, vb } = await resumeRuns(device, { dropout: 0.1 });
  for (const [k, v] of va) assertClose(vb.get(k)!, v, { rtol: 1e-5, atol: 1e-7 }, k);
});

gpuTest("a stopped and resumed run equals an uninterrupted one within float tolerance (WebGPU)", async () => {
  const device = await gpuDevice();
  const { va, vb } = await resumeRuns(device, { dropout: 0.1 });
  for (const [k, v] of va) assertClose(vb.get(k)!, v, { rtol: 1e-5, atol: 1e-6 }, k);
});

test("a diverging run stops naming the step and writes no checkpoint after it", async () => {
  const device = await cpuDevice();
  const out = await tempDir();
  const checkpoints: number[] = [];
  // The first step has lr 0 (EDM's ramp-up from 0 images); from the second on the weights explode.
  const e = await expectReject(
    train({ ...BASE, lr: 1e37, lrRampupKimg: 0, kimg: 0.2, logEvery: 1, checkpointKimg: 0.004, out }, {
      device,
      onProgress: (ev) => ev.type === "checkpoint" && checkpoints.push(ev.step),
    }),
    "training diverged",
    "step",
    "last good checkpoint",
  );
  assert(e instanceof NonFiniteLossError);
  const bad = (e as NonFiniteLossError).step;
  assert(bad >= 2 && bad < 50, `diverged at step ${bad}`);
  assert(e.message.includes(`step ${bad}`), e.message);
  // Every checkpoint left is from before the bad step and finite; the log holds no NaN.
  const left = await listCheckpoints(out);
  assert(left.length > 0 && left.every((c) => c.step < bad), JSON.stringify(left));
  assert(checkpoints.every((s) => s < bad));
  for (const c of left) {
    for (const [k, v] of await checkpointValues(c.dir, device)) assert(v.every(Number.isFinite), k);
  }
  const log = (await Deno.readTextFile(`${out}/log.jsonl`)).trim().split("\n").map((l) => JSON.parse(l));
  assert(log.every((l: { loss: number; step: number }) => Number.isFinite(l.loss) && l.step < bad));
  await Deno.remove(out, { recursive: true });
});

test("sandwich rule: widths 1, 0.25 and 0.5 or 0.75; the gradient is the sum of the three (float64)", async () => {
  const seen = new Set<number>();
  for (let step = 0; step < 64; step++) {
    const w = sandwichWidths(5, step);
    assertEquals(w.slice(0, 2), [1, 0.25]);
    assert(w[2] === 0.5 || w[2] === 0.75);
    seen.add(w[2]);
    assertEquals(sandwichWidths(5, step), w);
  }
  assertEquals([...seen].sort(), [0.5, 0.75]);

  const device = await f64Device();
  const spec = { ...MICRO, modelChannels: 32, init: { ...SONG_INIT, zero: 1, proj: 1 } };
  const cfg = await parseTrainConfig({
    network: spec,
    data: { kind: "procedural", resolution: 8, length: 8 },
  });
  const { net, emaNet } = buildNetworks(cfg, device);
  const images = new BatchIterator(await openDataset(cfg.data), { batchSize: 2, device }).next().images;
  const W = "enc.8x8_conv.weight"; // [32, 3, 3, 3]: width 0.25 uses rows 0–7, 0.5 rows 0–15, 0.75 rows 0–23.
  const param = net.namedParameters().find(([n]) => n === W)![1];
  const grads = async () => {
    const out = new Map<string, Float64Array>();
    for (const [n, p] of net.namedParameters()) {
      out.set(n, p.grad ? await p.grad.toFloat64Array() : new Float64Array(p.size));
    }
    net.zeroGrad();
    return out;
  };
  const widths = [1, 0.25, 0.5];
  device.manualSeed(11);
  accumulateGradients(net, images, undefined, widths).dispose();
  const together = await grads();
  device.manualSeed(11);
  const each: Map<string, Float64Array>[] = [];
  for (const w of widths) {
    accumulateGradients(net, images, undefined, [w]).dispose();
    each.push(await grads());
  }
  for (const [name, g] of together) {
    const sum = g.map((_, i) => each[0].get(name)![i] + each[1].get(name)![i] + each[2].get(name)![i]);
    assertClose(g, sum, { rtol: 1e-10, atol: 1e-14 }, name);
  }
  // Each width trains its own slice: 0.25 nothing beyond row 8, 0.5 nothing beyond row 16; width 1 everything.
  const rows = (g: Float64Array, from: number, to: number) => g.subarray(from * 27, to * 27);
  const [g1, gq, gh] = each.map((m) => m.get(W)!);
  assert(rows(gq, 8, 32).every((v) => v === 0) && rows(gq, 0, 8).some((v) => v !== 0));
  assert(rows(gh, 16, 32).every((v) => v === 0) && rows(gh, 0, 16).some((v) => v !== 0));
  assert(rows(g1, 24, 32).some((v) => v !== 0));
  // So the summed gradient differs from the full width's exactly where the slimmer widths contributed.
  const gt = together.get(W)!;
  assert(rows(gt, 0, 8).some((v, i) => Math.abs(v - rows(g1, 0, 8)[i]) > 1e-12));
  assertEquals(Array.from(rows(gt, 16, 32)), Array.from(rows(g1, 16, 32)));
  assertEquals(param.shape, [32, 3, 3, 3]);
  images.dispose();
  net.dispose();
  emaNet.dispose();
});

gpuTest(
  "a training step reads back at most once, the loss only every logEvery steps; memory stays flat (WebGPU)",
  async () => {
    const device = await gpuDevice();
    for (const logEvery of [1, 10]) {
      const out = await tempDir();
      const reads: number[] = [], live: number[] = [];
      await train({ ...BASE, kimg: 0.08, logEvery, out }, {
        device,
        onProgress: (e) => {
          if (e.type !== "step") return;
          reads[e.step] = device.counters().reads;
          live[e.step] = device.memory().liveBytes;
        },
      });
      // Between the first step and the 20th: one sync per logged step (after steps 1…19 or after step 10).
      assertEquals(reads[20] - reads[1], logEvery === 1 ? 19 : 1);
      for (let s = 2; s <= 20; s++) {
        assert(reads[s] - reads[s - 1] <= 1, `step ${s}: ${reads[s] - reads[s - 1]} reads`);
      }
      if (logEvery === 1) assertEquals(live[20], live[5]);
      await Deno.remove(out, { recursive: true });
    }
  },
);

test("sample: a grid and raw samples from the EMA weights; errors for a missing run or checkpoint", async () => {
  const device = await cpuDevice();
  const out = await tempDir();
  await train({ ...BASE, kimg: 0.016, out, sampleCount: 4, sampleSteps: 3 }, { device });
  const grids = [...Deno.readDirSync(`${out}/samples`)].map((e) => e.name).sort();
  assertEquals(grids, ["step-000000000.png", "step-000000004.png"]);
  const raw = `${out}/raw.safetensors`;
  const r = await sample({ run: out, n: 5, steps: 4, batch: 2, raw, backend: "cpu" }, { device });
  assertEquals([r.step, r.nfe, r.shape], [4, 7, [5, 3, 8, 8]]);
  const png = await Deno.readFile(r.path);
  assertEquals(Array.from(png.subarray(1, 4)), [0x50, 0x4e, 0x47]); // "PNG"
  // The samples do not depend on the batching, and EMA and raw weights give different images.
  const again = await sample({ run: out, n: 5, steps: 4, raw: `${out}/b.safetensors`, out: `${out}/b.png` }, {
    device,
  });
  const rawNet = await sample({ run: out, n: 5, steps: 4, ema: false, raw: `${out}/c.safetensors` }, {
    device,
  });
  const read = async (p: string) => {
    const { loadSafetensors } = await import("../engine/mod.ts");
    const t = (await loadSafetensors(p, { device })).samples;
    const v = await t.toArray();
    t.dispose();
    return v;
  };
  const [v1, v2, v3] = [await read(raw), await read(again.rawPath!), await read(rawNet.rawPath!)];
  assertEquals(Array.from(v2), Array.from(v1));
  assert(v3.some((x, i) => x !== v1[i]));
  assert(v1.every(Number.isFinite));
  await expectReject(sample({ run: `${out}/nope` }, { device }), "does not exist");
  const empty = await tempDir();
  await expectReject(sample({ run: empty }, { device }), "no checkpoint");
  await expectReject(sample({ run: out, steps: 1 }, { device }), "steps");
  await Deno.remove(out, { recursive: true });
  await Deno.remove(empty, { recursive: true });
});

test("resuming refuses changed settings and names them; a finished run does nothing", async () => {
  const device = await cpuDevice();
  const out = await tempDir();
  await train({ ...BASE, kimg: 0.008, out }, { device });
  await expectReject(train({ out, batch: 8, seed: 5 }, { device }), "batch", "seed", "another --out")
    .then((e) => assert(e instanceof UsageError));
  const events: string[] = [];
  const r = await train({ out }, { device, onProgress: (e) => events.push(e.type) });
  assertEquals([r.step, r.stoppedBy, events], [2, "done", ["start"]]);
  await Deno.remove(out, { recursive: true });
});
