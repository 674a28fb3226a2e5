/**
 * @file Tests of the in-memory `Trainer` (models/trainer.ts) on the micro UNet with 8×8 procedural images, CPU
 * backend: it trains without touching the file system, `shouldStop` prunes a run early, an `init` hook's weights
 * are the ones trained (and averaged) from, and N steps then M steps equal N + M steps in one go bit for bit,
 * whether the same trainer continues or a new one is restored from `stateDict()`, with sampling on the same
 * device in between.
 */

import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { type Tensor, tensor } from "../engine/mod.ts";
import type { UNet } from "../models/unet.ts";
import { readTensors } from "../models/checkpoint.ts";
import { NetworkGenerator, SamplerSettingsSchema } from "../models/generate.ts";
import {
  type LogEntry,
  parseTrainerConfig,
  Trainer,
  type TrainerConfigInput,
  type TrainerState,
} from "../models/trainer.ts";
import { cpuDevice, MICRO_UNET, test } from "./util.ts";

/** The micro network with dropout (so steps draw random numbers beyond σ and noise), 4-image batches. */
const MICRO: TrainerConfigInput = {
  network: { ...MICRO_UNET, dropout: 0.1 },
  data: { kind: "procedural", resolution: 8, length: 16 },
  batch: 4,
  lr: 2e-3,
  lrRampupKimg: 0.008,
  emaHalfLifeKimg: 0.02,
  logEvery: 2,
};

/** Every tensor of a state (model, ema, optimizer) as host arrays, keyed "part/name". */
async function stateValues(s: TrainerState): Promise<Map<string, number[]>> {
  const out = new Map<string, number[]>();
  const parts: Record<string, Record<string, Tensor>> = {
    model: s.model,
    ema: s.ema,
    optimizer: s.optimizer.tensors,
  };
  for (const [part, ts] of Object.entries(parts)) {
    for (const [name, t] of Object.entries(await readTensors(ts))) {
      out.set(`${part}/${name}`, Array.from(t.data));
    }
  }
  return out;
}

/** The parameters of a network as host arrays by name. */
async function parameterValues(net: UNet): Promise<Map<string, number[]>> {
  const host = await readTensors(Object.fromEntries(net.namedParameters()));
  return new Map(Object.entries(host).map(([k, v]) => [k, Array.from(v.data)]));
}

/** Deno's functions that write to the file system, replaced by ones that record the call and throw. */
const WRITERS = [
  "writeFile",
  "writeTextFile",
  "writeFileSync",
  "writeTextFileSync",
  "open",
  "openSync",
  "create",
  "createSync",
  "mkdir",
  "mkdirSync",
  "makeTempDir",
  "makeTempFile",
  "rename",
  "remove",
  "copyFile",
  "truncate",
  "symlink",
  "link",
];

/** Runs `fn` in an empty temporary working folder with every file-writing Deno function refused. */
async function withoutFiles<T>(
  fn: () => Promise<T>,
): Promise<{ value: T; writes: string[]; left: string[] }> {
  const cwd = Deno.cwd(), tmp = await Deno.makeTempDir({ prefix: "trainer_test_" });
  const deno = Deno as unknown as Record<string, unknown>;
  const saved = WRITERS.map((k) => [k, deno[k]] as const);
  const writes: string[] = [];
  Deno.chdir(tmp);
  for (const k of WRITERS) {
    deno[k] = (...args: unknown[]) => {
      writes.push(`${k}(${String(args[0])})`);
      throw new Error(`Deno.${k} called while training in memory`);
    };
  }
  try {
    const value = await fn();
    return { value, writes, left: [...Deno.readDirSync(tmp)].map((e) => e.name) };
  } finally {
    for (const [k, v] of saved) deno[k] = v;
    Deno.chdir(cwd);
    await Deno.remove(tmp, { recursive: true });
  }
}

test("a trainer trains in memory: no file is written, the loss is logged every logEvery steps", async () => {
  const device = await cpuDevice();
  const logged: LogEntry[] = [], stepped: number[] = [];
  const { value: r, writes, left } = await withoutFiles(async () => {
    const trainer = await Trainer.create(parseTrainerConfig(MICRO), device);
    try {
      return await trainer.run({
        steps: 5,
        onStep: (p) => stepped.push(p.step),
        onLog: (e) => void logged.push(e),
      });
    } finally {
      trainer.dispose();
    }
  });
  assertEquals(writes, []);
  assertEquals(left, []);
  assertEquals([r.step, r.nimg, r.stoppedBy], [5, 20, "done"]);
  assertEquals(stepped, [1, 2, 3, 4, 5]);
  // Every 2 steps and once at the end.
  assertEquals(logged.map((e) => e.step), [2, 4, 5]);
  assertEquals(r.lossHistory.map((p) => p.step), [2, 4, 5]);
  assertEquals(r.lastLoss, logged[2].loss);
  assert(
    logged.every((e) => Number.isFinite(e.loss) && e.loss > 0),
    JSON.stringify(logged.map((e) => e.loss)),
  );
  assert(r.trainSeconds > 0 && r.imgPerSec > 0);
});

test("shouldStop stops a run early (stoppedBy 'stopped'); a later run continues from there", async () => {
  const device = await cpuDevice();
  const trainer = await Trainer.create(parseTrainerConfig(MICRO), device);
  try {
    const asked: number[] = [];
    const r = await trainer.run({
      kimg: 1,
      shouldStop: (e) => (asked.push(e.step), e.step >= 4),
    });
    assertEquals([r.step, r.nimg, r.stoppedBy], [4, 16, "stopped"]);
    assertEquals(asked, [2, 4]);
    assertEquals(r.lossHistory.map((p) => p.step), [2, 4]);
    const more = await trainer.run({ untilNimg: 24 });
    assertEquals([more.step, more.stoppedBy], [6, "done"]);
    const aborted = new AbortController();
    aborted.abort();
    assertEquals((await trainer.run({ steps: 3, signal: aborted.signal })).stoppedBy, "aborted");
    assertEquals(trainer.stepCount, 6);
  } finally {
    trainer.dispose();
  }
});

test("an init hook's weights are the ones trained and averaged from (a state dict, or a function)", async () => {
  const device = await cpuDevice();
  const cfg = parseTrainerConfig(MICRO);
  // Weights another trainer with another seed reached: not what this seed would initialise.
  const donor = await Trainer.create({ ...cfg, seed: 7, lrRampupKimg: 0 }, device);
  await donor.run({ steps: 2 });
  const donorWeights = await parameterValues(donor.network);
  const fresh = await Trainer.create(cfg, device);
  const freshWeights = await parameterValues(fresh.network);
  fresh.dispose();
  const inherited = await Trainer.create(cfg, device, { init: donor.network.stateDict() });
  donor.dispose();
  try {
    assertEquals(await parameterValues(inherited.network), donorWeights);
    assertEquals(await parameterValues(inherited.emaNetwork()), donorWeights);
    assert([...freshWeights].some(([k, v]) => v.some((x, i) => x !== donorWeights.get(k)![i])));
    // The first step has lr 0 (the ramp starts at 0 images): the weights stay the inherited ones.
    await inherited.run({ steps: 1 });
    assertEquals(await parameterValues(inherited.network), donorWeights);
  } finally {
    inherited.dispose();
  }

  // A function changes the built network in place; the optimizer trains those very tensors.
  const W = "out_conv.weight";
  const zeroed = await Trainer.create(cfg, device, {
    init: (net) => {
      const p = net.namedParameters().find(([n]) => n === W)![1];
      const zeros = tensor(new Float32Array(p.size), p.shape, { device });
      net.loadStateDict({ [W]: zeros }, { strict: false });
      zeros.dispose();
    },
  });
  try {
    const before = (await parameterValues(zeroed.network)).get(W)!;
    assert(before.every((v) => v === 0));
    assertEquals((await parameterValues(zeroed.emaNetwork())).get(W), before);
    // (The first step has lr 0 whatever the ramp; the second moves the weights.)
    await zeroed.run({ steps: 2 });
    assert(
      (await parameterValues(zeroed.network)).get(W)!.some((v) => v !== 0),
      "the steps moved the weights",
    );
  } finally {
    zeroed.dispose();
  }
});

test("N steps then M steps equal N + M steps in one go, bit for bit (CPU float32, sandwich, dropout)", async () => {
  const device = await cpuDevice();
  const cfg = parseTrainerConfig({ ...MICRO, sandwich: true, logEvery: 3 });
  const once = await Trainer.create(cfg, device);
  const twice = await Trainer.create(cfg, device);
  let restored: Trainer | undefined;
  try {
    await once.run({ steps: 5 });
    await twice.run({ steps: 2 });
    // A second trainer restored from the first's state, on the same device.
    restored = await Trainer.create(cfg, device);
    restored.loadState(twice.stateDict());
    // Sampling between the runs re-seeds the device generator; the trainers keep their own.
    const gen = new NetworkGenerator(twice.emaNetwork());
    const settings = SamplerSettingsSchema.parse({ steps: 2 });
    gen.generate(0, 2, { seed: 123, settings }).dispose();
    await twice.run({ steps: 3 });
    await restored.run({ steps: 3 });
    const want = await stateValues(once.stateDict());
    for (const t of [twice, restored]) {
      const got = await stateValues(t.stateDict());
      assertEquals([...got.keys()], [...want.keys()]);
      for (const [k, v] of want) assertEquals(got.get(k), v, k);
      const p = t.progress, q = once.progress;
      assertEquals([p.step, p.nimg, p.data, p.rng], [q.step, q.nimg, q.data, q.rng]);
    }
    // The weights moved (the comparison is not between two untouched initialisations).
    const model = want.get("model/out_conv.weight")!, ema = want.get("ema/out_conv.weight")!;
    assert(model.some((x, i) => x !== ema[i]));
  } finally {
    once.dispose();
    twice.dispose();
    restored?.dispose();
  }
});
