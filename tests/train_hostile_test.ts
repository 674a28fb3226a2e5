/**
 * @file Hostile input to `train` and `sample` (models/train.ts, models/sample.ts, cli.ts): a folder that is not
 * a run is refused before anything in it is touched, one process trains per run folder, output paths are
 * checked before the work, numeric flags are decimal, and every error names its cause (file, field or flag)
 * with exit 2 only for usage errors.
 */

import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { Device, encodeSafetensors } from "../engine/mod.ts";
import { disposeCheckpoint, loadCheckpoint, readTensors } from "../models/checkpoint.ts";
import { parseTrainConfig, train, type TrainConfigInput } from "../models/train.ts";
import { sample } from "../models/sample.ts";
import { UsageError } from "../util/errors.ts";
import { LOCK_FILE, processStat } from "../util/lock.ts";
import { MICRO_TRAINING, MICRO_UNET, test } from "./util.ts";

/** Two micro steps on the CPU, no grids, a checkpoint only at the end. */
const TINY: TrainConfigInput = { ...MICRO_TRAINING, checkpointKimg: 0, kimg: 0.008, backend: "cpu" };

async function inTempDir(f: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "train_hostile_" });
  try {
    await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The error `p` rejects with; fails unless its message holds every part. */
async function rejects(p: Promise<unknown>, ...parts: string[]): Promise<Error> {
  try {
    await p;
  } catch (e) {
    const msg = (e as Error).message;
    for (const part of parts) assert(msg.includes(part), `expected "${part}" in "${msg}"`);
    return e as Error;
  }
  throw new Error(`expected an error with ${parts.join(", ")}, but nothing was thrown`);
}

test("train refuses an out folder that is not a run, naming what is there, and leaves it untouched", () =>
  inTempDir(async (dir) => {
    const project = `${dir}/project`;
    await Deno.mkdir(project);
    await Deno.writeTextFile(`${project}/config.json`, '{"mine": true}\n');
    await Deno.writeTextFile(`${project}/log.jsonl`, "precious\n");
    await Deno.writeTextFile(`${project}/README.md`, "# hello\n");
    const e = await rejects(train({ ...TINY, out: project }), `${project} is not a run folder`, "README.md");
    assert(e instanceof UsageError);
    assertEquals(await Deno.readTextFile(`${project}/config.json`), '{"mine": true}\n');
    assertEquals(await Deno.readTextFile(`${project}/log.jsonl`), "precious\n");
    // Only run files, but a config.json that is not a training configuration: refused too.
    await Deno.remove(`${project}/README.md`);
    await rejects(train({ ...TINY, out: project }), `${project}/config.json is not a training configuration`);
    assertEquals(await Deno.readTextFile(`${project}/log.jsonl`), "precious\n");
    // A file.
    await rejects(train({ ...TINY, out: `${project}/log.jsonl` }), "log.jsonl is a file, not a run folder");
    await rejects(train({ ...TINY, out: `${project}/log.jsonl/run` }), "log.jsonl/run lies under a file");
    // An empty folder, and then the run it became, are fine.
    const run = `${dir}/run`;
    await Deno.mkdir(run);
    assertEquals((await train({ ...TINY, out: run })).step, 2);
    assertEquals((await train({ ...TINY, out: run, kimg: 0.016 })).step, 4);
  }));

test("train: one process per run folder; a live holder is named, a dead one's lock is taken over", () =>
  inTempDir(async (dir) => {
    const lock = (pid: number, procStart: number | null) =>
      Deno.writeTextFile(
        `${dir}/${LOCK_FILE}`,
        JSON.stringify({
          pid,
          host: Deno.hostname(),
          bootId: null,
          procStart,
          lockedAt: "2020-01-01T00:00:00Z",
        }),
      );
    await lock(Deno.pid, processStat(Deno.pid)!.start);
    const e = await rejects(train({ ...TINY, out: dir }), `${dir} is in use by process ${Deno.pid}`);
    assert(e instanceof UsageError);
    // The same PID with another start time is a dead holder (the PID was reused).
    await lock(Deno.pid, processStat(Deno.pid)!.start + 1);
    assertEquals((await train({ ...TINY, out: dir })).step, 2);
    assert(!(await Deno.stat(`${dir}/${LOCK_FILE}`).then(() => true, () => false)), "released at the end");
  }));

const CLI = new URL("../cli.ts", import.meta.url).pathname;

/** `deno run -A cli.ts ARGS` to the end: its exit code and output. */
async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const r = await new Deno.Command(Deno.execPath(), { args: ["run", "-A", CLI, ...args], stdin: "null" })
    .output();
  const dec = new TextDecoder();
  return { code: r.code, out: dec.decode(r.stdout), err: dec.decode(r.stderr) };
}

test("cli train: SIGTERM stops like SIGINT, after a step with a checkpoint (exit 1, resumable)", () =>
  inTempDir(async (dir) => {
    const config = `${dir}/train.json`;
    await Deno.writeTextFile(config, JSON.stringify({ ...TINY, kimg: 100, logEvery: 1 }));
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", CLI, "train", "--config", config, "--out", `${dir}/run`],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const errText = new Response(child.stderr).text();
    // Wait for the first logged step, then SIGTERM.
    let out = "";
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    while (!/\bstep\b|\bkimg\b/.test(out.split("\n").slice(1).join("\n"))) {
      const { value, done } = await reader.read();
      if (done) break;
      out += value;
    }
    child.kill("SIGTERM");
    for (let r = await reader.read(); !r.done; r = await reader.read()) out += r.value;
    const status = await child.status;
    const err = await errText;
    assertEquals([status.code, status.signal], [1, null], `exit status; stderr: ${err}`);
    assert(out.includes("interrupted at step"), out);
    assert(err.includes("stopping after this step and saving a checkpoint"), err);
    const cks = [...Deno.readDirSync(`${dir}/run/checkpoints`)].map((e) => e.name);
    assert(cks.some((n) => n.startsWith("step-")), `a checkpoint: ${cks}`);
  }));

test("cli: numeric flags take decimal numbers only; hex, octal, binary, empty and spaced values name the flag", async () => {
  // --batch 0 is a usage error of its own: a run that accepted the bad --kimg would blame --batch instead.
  const bad = ["0x10", "0o7", "0b11", "", " 5", "1_000", "Infinity"];
  const results = await Promise.all(bad.map((v) => cli("train", "--kimg", v, "--batch", "0")));
  results.forEach((r, i) => {
    assertEquals(r.code, 2, `--kimg "${bad[i]}": exit code`);
    assert(r.err.includes(`'--kimg <n>' argument '${bad[i]}' is invalid`), r.err);
    assert(r.err.includes("expected a decimal number"), r.err);
  });
  // Decimal forms pass the flag check (and reach the configuration's: batch 0 is refused there).
  const good = ["16", "2e-3", ".5"];
  const ok = await Promise.all(good.map((v) => cli("train", "--kimg", v, "--batch", "0")));
  ok.forEach((r, i) => {
    assertEquals(r.code, 2, `--kimg ${good[i]}`);
    assert(r.err.includes("batch") && !r.err.includes("is invalid"), r.err);
  });
});

test("sample: a file as --run is named as such; --out and --raw are checked before any sampling; a checkpoint alone is enough", () =>
  inTempDir(async (dir) => {
    const run = `${dir}/run`, file = `${dir}/README.md`;
    await train({ ...TINY, out: run });
    await Deno.writeTextFile(file, "# hello\n");
    const device = await Device.create({ backend: "cpu" });
    try {
      let steps = 0;
      const opts = { device, onStep: () => void steps++ };
      const base = { run, n: 2, steps: 2 };
      const e = await rejects(sample({ run: file }, opts), `run: ${file} is a file, not a run folder`);
      assert(e instanceof UsageError);
      await rejects(
        sample({ ...base, out: `${file}/grid.png` }, opts),
        `out: ${file} is a file, not a folder`,
      );
      await rejects(sample({ ...base, out: dir }, opts), "out:", dir);
      await rejects(
        sample({ ...base, out: `${dir}/grid.png`, raw: `${file}/x.safetensors` }, opts),
        `raw: ${file} is a file, not a folder`,
      );
      assertEquals(steps, 0, "no sampling before the outputs were checked");
      assert(
        !(await Deno.stat(`${dir}/grid.png`).then(() => true, () => false)),
        "no grid without its raw file",
      );
      const r = await sample({ ...base, out: `${dir}/new/grid.png`, raw: `${dir}/new/x.safetensors` }, opts);
      assertEquals(r.shape[0], 2);
      assert(steps > 0);
      // Neither a run nor a checkpoint: named. A checkpoint alone: its grid goes to its run's samples/.
      await rejects(sample({ n: 2 }, opts), "run: give a run folder (its newest checkpoint) or a checkpoint");
      await rejects(
        sample({ checkpoint: file }, opts),
        `checkpoint: ${file} is a file, not a checkpoint folder`,
      );
      const alone = await sample({ checkpoint: `${r.checkpoint}/`, n: 2, steps: 2 }, opts);
      assertEquals(alone.path, `${run}/samples/sample-${r.checkpoint.split("/").pop()}.png`);
      assert(await Deno.stat(alone.path).then((i) => i.isFile), alone.path);
    } finally {
      device.destroy();
    }
  }));

test("a checkpoint whose state.json holds an invalid network is a runtime error naming the file (exit 1)", () =>
  inTempDir(async (dir) => {
    const run = `${dir}/run`;
    const { checkpoint } = await train({ ...TINY, out: run });
    const statePath = `${checkpoint}/state.json`;
    const state = JSON.parse(await Deno.readTextFile(statePath));
    state.config.network.modelChannels = -3;
    await Deno.writeTextFile(statePath, JSON.stringify(state));
    for (
      const f of [() => train({ ...TINY, out: run, kimg: 0.016 }), () => sample({ run, backend: "cpu" })]
    ) {
      const e = await rejects(
        f(),
        `${statePath}: the stored training configuration is invalid`,
        "modelChannels",
      );
      assert(!(e instanceof UsageError), "a damaged file is not a usage error");
    }
    const r = await cli("sample", "--run", run, "--backend", "cpu");
    assertEquals(r.code, 1, r.err);
    assert(r.err.includes(statePath), r.err);
  }));

test("after a divergence: --lr and --grad-clip apply on resume (logged), NaN samples and weights are refused", () =>
  inTempDir(async (dir) => {
    const run = `${dir}/run`;
    const { checkpoint } = await train({ ...TINY, out: run });
    const r = await train({ ...TINY, out: run, kimg: 0.016, lr: 1e-3, gradClip: 1 });
    assertEquals(r.step, 4);
    const log = (await Deno.readTextFile(`${run}/log.jsonl`)).trim().split("\n").map((l) => JSON.parse(l));
    assertEquals(log.filter((l) => l.event === "settings"), [{
      step: 2,
      nimg: 8,
      event: "settings",
      changed: {
        lr: { from: 2e-3, to: 1e-3 },
        gradClip: { from: null, to: 1 },
        kimg: { from: 0.008, to: 0.016 },
      },
    }]);
    assertEquals(JSON.parse(await Deno.readTextFile(`${run}/config.json`)).lr, 1e-3);
    // Finite weights that overflow: the samples are NaN, and nothing is written.
    const device = await Device.create({ backend: "cpu" });
    try {
      const ck = await loadCheckpoint(checkpoint!, device, { ema: true });
      const host = await readTensors(ck.ema);
      disposeCheckpoint(ck);
      const scaled = (v: number) =>
        Object.fromEntries(
          Object.entries(host).map(([k, t]) => [k, { shape: t.shape, data: t.data.map((x) => x * v) }]),
        );
      await Deno.writeFile(`${checkpoint}/ema.safetensors`, encodeSafetensors(scaled(1e30)));
      const grid = `${dir}/grid.png`;
      const e = await rejects(
        sample({ run, checkpoint, out: grid, n: 2, steps: 2 }, { device }),
        `${checkpoint}:`,
        "sample values are NaN or ±Inf",
      );
      assert(!(e instanceof UsageError));
      assert(!(await Deno.stat(grid).then(() => true, () => false)), "no grid of NaNs");
      // A NaN weight is a damaged file, named on load.
      const nan = scaled(1);
      nan[Object.keys(nan)[0]].data[0] = NaN;
      await Deno.writeFile(`${checkpoint}/ema.safetensors`, encodeSafetensors(nan));
      await rejects(
        sample({ run, checkpoint, out: grid, n: 2, steps: 2 }, { device }),
        `${checkpoint}/ema.safetensors: "${Object.keys(nan)[0]}" holds NaN`,
      );
    } finally {
      device.destroy();
    }
  }));

test("a network resolution the default data cannot draw names imgResolution, not a data field never set", async () => {
  const network = { ...MICRO_UNET, imgResolution: 4096, attnResolutions: [] };
  const e = await rejects(
    parseTrainConfig({ network }),
    "network: imgResolution 4096 has no default data",
    "png",
  );
  assert(e instanceof UsageError);
  assert(!e.message.includes("data: resolution"), e.message);
  // With data of that size given, the network's resolution is not the data's problem.
  const cfg = await parseTrainConfig({ network, data: { kind: "png", path: "somewhere" } });
  assertEquals(cfg.network.imgResolution, 4096);
});
