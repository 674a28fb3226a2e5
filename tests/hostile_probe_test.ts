/**
 * @file The project's fault-injection suite (issue 17): bad inputs to `train`, `sample`, `eval` and `features`,
 * each run as its own `deno run -A cli.ts` process (what a user runs), and real `kill -9`s of a training.
 *
 * Each probe of the table gives the command line and what must come back: exit code 2 for a usage error (a bad
 * flag, field, size or path) or 1 for a runtime error (a damaged file), the parts the message must name (the
 * field, flag or file), and no stack trace. Around the whole table every file that existed before (the fixture's
 * runs, configs, data, decoys, and the shipped ShapesNet weights) is hashed, and must be unchanged after, except
 * the damaged cache file a probe expects to be replaced. The probes share one fixture (a tiny trained run, its
 * damaged copies, bad configs and data) and run a few at a time, so the table costs about one process start
 * each.
 *
 * As root (permissions are not enforced) a read-only folder cannot be made, so its probes are skipped there and
 * say so.
 */

import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { encodePng } from "../models/images.ts";
import { train, type TrainConfigInput } from "../models/train.ts";
import { evaluate } from "../eval/evaluate.ts";
import { SHAPES_NET_FILE } from "../eval/features.ts";
import { MICRO_TRAINING, test } from "./util.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;
const DENO_JSON = new URL("../deno.json", import.meta.url).pathname;
const IS_ROOT = Deno.uid() === 0;

/** Two micro steps on the CPU with a checkpoint at the end: the run the probes sample, evaluate and damage. */
const TINY: TrainConfigInput = {
  ...MICRO_TRAINING,
  data: { kind: "procedural", resolution: 8, length: 16 },
  checkpointKimg: 0,
  kimg: 0.008,
  backend: "cpu",
};
/** Eval settings that finish in seconds on the tiny run. */
const QUICK_EVAL = ["--proxy-only", "--proxy-n", "4", "--proxy-steps", "2", "--ref-n", "8", "--no-latency"];

/** One bad input and what must come back. */
interface Probe {
  name: string;
  /** Arguments after `cli.ts`, run in the fixture folder. */
  args: string[];
  /** 2: usage error, 1: runtime error, 0: handled (a damaged cache recomputed). */
  code: 0 | 1 | 2;
  /** Parts of stderr that name the cause (field, flag, file). */
  says: string[];
  /** Pre-existing files (fixture-relative) this probe is expected to replace. */
  replaces?: string[];
  /** Why the probe cannot run here (it is reported, not run). */
  skip?: string;
}

/** A valid PNG whose header (with a correct CRC) declares width × height pixels. */
function pngDeclaring(width: number, height: number): Uint8Array {
  const png = encodePng(4, 3, 3, new Uint8Array(36)).slice();
  const view = new DataView(png.buffer);
  view.setUint32(16, width);
  view.setUint32(20, height);
  let c = 0xffffffff;
  for (const b of png.subarray(12, 29)) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  view.setUint32(29, (c ^ 0xffffffff) >>> 0);
  return png;
}

/** Builds the fixture in `dir`: a trained run, damaged copies, bad configs, data and decoys. */
async function buildFixture(dir: string): Promise<void> {
  const w = (path: string, text: string | Uint8Array) =>
    typeof text === "string"
      ? Deno.writeTextFile(`${dir}/${path}`, text)
      : Deno.writeFile(`${dir}/${path}`, text);
  const json = (path: string, v: unknown) => w(path, JSON.stringify(v));
  await train({ ...TINY, out: `${dir}/run` });
  const ck = `checkpoints/step-000000002`;
  // A reference-statistics cache the eval probes find (and one of them finds damaged).
  await evaluate({
    runs: [`${dir}/run`],
    proxyOnly: true,
    proxyN: 4,
    proxySteps: 2,
    refN: 8,
    latency: false,
    backend: "cpu",
    cacheDir: `${dir}/cache-bad`,
  });
  const cacheFile = [...Deno.readDirSync(`${dir}/cache-bad`)][0].name;
  const cache = Deno.readFileSync(`${dir}/cache-bad/${cacheFile}`);
  await w(`cache-bad/${cacheFile}`, cache.subarray(0, cache.length >> 1));
  // Damaged copies of the run.
  for (const copy of ["run-trunc", "run-badstate", "run-nojson"]) {
    await new Deno.Command("cp", { args: ["-r", `${dir}/run`, `${dir}/${copy}`] }).output();
  }
  const ema = Deno.readFileSync(`${dir}/run-trunc/${ck}/ema.safetensors`);
  await w(`run-trunc/${ck}/ema.safetensors`, ema.subarray(0, ema.length - 100));
  const modelFile = Deno.readFileSync(`${dir}/run-trunc/${ck}/model.safetensors`);
  await w(`run-trunc/${ck}/model.safetensors`, modelFile.subarray(0, 40));
  const state = JSON.parse(Deno.readTextFileSync(`${dir}/run-badstate/${ck}/state.json`));
  state.config.network.numBlocks = 100000;
  await json(`run-badstate/${ck}/state.json`, state);
  await w(`run-nojson/${ck}/state.json`, '{"step": 2, "config": ');
  // Configs.
  const net = { imgResolution: 8, inChannels: 3, outChannels: 3, modelChannels: 8, channelMult: [1, 2] };
  await json("wrong-type.json", { batch: "32" });
  await json("unknown-key.json", { bacth: 4 });
  await json("negative.json", { kimg: -1 });
  await json("huge-batch.json", { batch: 1e8 });
  await json("huge-grid.json", { sampleCount: 1e8 });
  await json("blocks.json", { network: { ...net, numBlocks: 100000 } });
  await json("channels-20000.json", { network: { ...net, numBlocks: 1, modelChannels: 20000 } });
  await json("channels-1e9.json", { network: { ...net, numBlocks: 1, modelChannels: 1e9 } });
  await json("fits-not.json", {
    network: { ...net, numBlocks: 64, modelChannels: 4096, channelMult: [4, 4] },
  });
  await json("resolution.json", { network: { ...net, numBlocks: 1, imgResolution: 4096 } });
  await json("array.json", [1, 2]);
  await json("bad-data.json", { ...TINY, data: { kind: "png", path: `${dir}/png-corrupt` } });
  await json("huge-png.json", { ...TINY, data: { kind: "png", path: `${dir}/png-huge` } });
  await json("short-cifar.json", { ...TINY, data: { kind: "cifar10", path: `${dir}/cifar.bin` } });
  await w("bom.json", "\ufeff" + JSON.stringify({ batch: -1 }));
  await w("not-json.json", "{ batch: 4 ");
  // Data.
  await Deno.mkdir(`${dir}/png-corrupt`);
  await w("png-corrupt/a.png", encodePng(8, 8, 3, new Uint8Array(192)));
  await w("png-corrupt/b.png", "this is not a png");
  await Deno.mkdir(`${dir}/png-huge`);
  await w("png-huge/a.png", encodePng(8, 8, 3, new Uint8Array(192)));
  await w("png-huge/b.png", pngDeclaring(30000, 30000));
  await w("cifar.bin", new Uint8Array(1000));
  // Decoys: a folder that is not a run, a file, a symlink to the folder, a broken weights file.
  await Deno.mkdir(`${dir}/notes`);
  await w("notes/README.md", "# my notes\n");
  await w("notes/config.json", '{"mine": true}\n');
  await w("file.txt", "a file\n");
  await Deno.symlink(`${dir}/notes`, `${dir}/notes-link`);
  await w("weights.safetensors", "not safetensors");
  await Deno.mkdir(`${dir}/readonly`);
  if (!IS_ROOT) await Deno.chmod(`${dir}/readonly`, 0o555);
}

const RO_SKIP = IS_ROOT ? "running as root: permissions are not enforced" : undefined;

/** The table: train, sample, eval, features. */
const PROBES: Probe[] = [
  // train: configs.
  {
    name: "train: a field of the wrong type",
    args: ["train", "--config", "wrong-type.json"],
    code: 2,
    says: ["batch"],
  },
  {
    name: "train: an unknown key",
    args: ["train", "--config", "unknown-key.json"],
    code: 2,
    says: ["bacth"],
  },
  { name: "train: a negative length", args: ["train", "--config", "negative.json"], code: 2, says: ["kimg"] },
  { name: "train: config with a BOM", args: ["train", "--config", "bom.json"], code: 2, says: ["batch"] },
  {
    name: "train: config not JSON",
    args: ["train", "--config", "not-json.json"],
    code: 2,
    says: ["not-json.json"],
  },
  {
    name: "train: config an array",
    args: ["train", "--config", "array.json"],
    code: 2,
    says: ["array.json"],
  },
  {
    name: "train: config missing",
    args: ["train", "--config", "nothing.json"],
    code: 2,
    says: ["nothing.json"],
  },
  { name: "train: --kimg 0x10", args: ["train", "--kimg", "0x10"], code: 2, says: ["--kimg", "0x10"] },
  { name: "train: --lr NaN", args: ["train", "--lr", "NaN"], code: 2, says: ["--lr", "NaN"] },
  { name: "train: --batch -4", args: ["train", "--batch", "-4", "--out", "x"], code: 2, says: ["batch"] },
  {
    name: "train: --backend metal",
    args: ["train", "--backend", "metal", "--out", "x"],
    code: 2,
    says: ["backend"],
  },
  // train: absurd sizes (refused by the bounds or the memory estimate, before anything is allocated).
  {
    name: "train: numBlocks 100000",
    args: ["train", "--config", "blocks.json", "--out", "x"],
    code: 2,
    says: ["numBlocks"],
  },
  {
    name: "train: modelChannels 20000",
    args: ["train", "--config", "channels-20000.json"],
    code: 2,
    says: ["modelChannels"],
  },
  {
    name: "train: modelChannels 1e9",
    args: ["train", "--config", "channels-1e9.json"],
    code: 2,
    says: ["modelChannels"],
  },
  {
    name: "train: a network within the bounds that cannot fit",
    args: ["train", "--config", "fits-not.json", "--out", "x"],
    code: 2,
    says: ["memoryLimitMiB", "make the network smaller", "modelChannels"],
  },
  {
    name: "train: batch 1e8 (config)",
    args: ["train", "--config", "huge-batch.json"],
    code: 2,
    says: ["at batch 100000000", "lower batch"],
  },
  {
    name: "train: --batch 1e8 (exponent flag)",
    args: ["train", "--batch", "1e8", "--out", "x"],
    code: 2,
    says: ["lower batch"],
  },
  {
    name: "train: sampleCount 1e8",
    args: ["train", "--config", "huge-grid.json"],
    code: 2,
    says: ["sampleCount"],
  },
  {
    name: "train: --memory-limit-mib 1",
    args: ["train", "--memory-limit-mib", "1", "--out", "x"],
    code: 2,
    says: ["memoryLimitMiB 1"],
  },
  {
    name: "train: imgResolution 4096",
    args: ["train", "--config", "resolution.json"],
    code: 2,
    says: ["imgResolution"],
  },
  // train: data.
  {
    name: "train: a corrupt PNG",
    args: ["train", "--config", "bad-data.json", "--out", "out-png"],
    code: 1,
    says: ["b.png"],
  },
  {
    name: "train: a PNG declaring 30000x30000",
    args: ["train", "--config", "huge-png.json", "--out", "out-huge"],
    code: 1,
    says: ["b.png", "30000"],
  },
  {
    name: "train: a truncated CIFAR file",
    args: ["train", "--config", "short-cifar.json", "--out", "out-cifar"],
    code: 1,
    says: ["cifar.bin"],
  },
  // train: output folders and damaged runs.
  {
    name: "train: --out a file",
    args: ["train", "--out", "file.txt"],
    code: 2,
    says: ["file.txt is a file"],
  },
  { name: "train: --out a device", args: ["train", "--out", "/dev/null"], code: 2, says: ["/dev/null"] },
  {
    name: "train: --out a folder that is not a run",
    args: ["train", "--out", "notes"],
    code: 2,
    says: ["notes is not a run folder", "README.md"],
  },
  {
    name: "train: --out a symlink to such a folder",
    args: ["train", "--out", "notes-link"],
    code: 2,
    says: ["notes-link is not a run folder"],
  },
  {
    name: "train: --out under a file",
    args: ["train", "--out", "file.txt/run"],
    code: 2,
    says: ["file.txt"],
  },
  {
    name: "train: --out a read-only folder",
    args: ["train", "--out", "readonly"],
    code: 2,
    says: ["readonly"],
    skip: RO_SKIP,
  },
  {
    name: "train: resume from truncated weights",
    args: ["train", "--out", "run-trunc", "--kimg", "0.016"],
    code: 1,
    says: ["run-trunc/checkpoints/step-000000002"],
  },
  {
    name: "train: resume a stored config with numBlocks 100000",
    args: ["train", "--out", "run-badstate", "--kimg", "0.016"],
    code: 1,
    says: ["run-badstate/checkpoints/step-000000002/state.json", "numBlocks"],
  },
  {
    name: "train: resume from a state.json cut short",
    args: ["train", "--out", "run-nojson", "--kimg", "0.016"],
    code: 1,
    says: ["state.json"],
  },
  // sample.
  { name: "sample: --run missing", args: ["sample", "--run", "nowhere"], code: 2, says: ["nowhere"] },
  {
    name: "sample: --run a file",
    args: ["sample", "--run", "file.txt"],
    code: 2,
    says: ["file.txt is a file"],
  },
  {
    name: "sample: --run a folder that is not a run",
    args: ["sample", "--run", "notes"],
    code: 2,
    says: ["notes"],
  },
  {
    name: "sample: --n 1e8",
    args: ["sample", "--run", "run", "--n", "1e8", "--backend", "cpu"],
    code: 2,
    says: ["lower n"],
  },
  {
    name: "sample: --n 2e6 --batch 2e6 (the held images fit, the batch does not)",
    args: [
      "sample",
      "--run",
      "run",
      "--n",
      "2e6",
      "--batch",
      "2e6",
      "--memory-limit-mib",
      "16384",
      "--backend",
      "cpu",
    ],
    code: 2,
    says: ["at batch 2000000", "lower batch (at most", "or n"],
  },
  {
    name: "sample: --steps 0x5",
    args: ["sample", "--run", "run", "--steps", "0x5"],
    code: 2,
    says: ["--steps"],
  },
  { name: "sample: --width 0", args: ["sample", "--run", "run", "--width", "0"], code: 2, says: ["width"] },
  {
    name: "sample: --out a device",
    args: ["sample", "--run", "run", "--n", "2", "--out", "/dev/null", "--backend", "cpu"],
    code: 2,
    says: ["out:", "/dev/null"],
  },
  {
    name: "sample: --out a folder",
    args: ["sample", "--run", "run", "--n", "2", "--out", "notes", "--backend", "cpu"],
    code: 2,
    says: ["out:", "notes"],
  },
  {
    name: "sample: --raw under a file",
    args: ["sample", "--run", "run", "--n", "2", "--raw", "file.txt/x.safetensors", "--backend", "cpu"],
    code: 2,
    says: ["raw:", "file.txt"],
  },
  {
    name: "sample: --out in a read-only folder",
    args: ["sample", "--run", "run", "--n", "2", "--out", "readonly/g.png", "--backend", "cpu"],
    code: 2,
    says: ["readonly/g.png"],
    skip: RO_SKIP,
  },
  {
    name: "sample: truncated weights",
    args: ["sample", "--run", "run-trunc", "--n", "2", "--backend", "cpu"],
    code: 1,
    says: ["run-trunc/checkpoints/step-000000002"],
  },
  {
    name: "sample: a stored network with numBlocks 100000",
    args: ["sample", "--run", "run-badstate", "--backend", "cpu"],
    code: 1,
    says: ["state.json", "numBlocks"],
  },
  {
    name: "sample: --checkpoint a folder that is not one",
    args: ["sample", "--run", "run", "--checkpoint", "notes", "--backend", "cpu"],
    code: 1,
    says: ["notes"],
  },
  {
    // The estimate raised out of the way: the allocation that fails (1.5 PB on the host) names the options.
    name: "sample: an allocation that fails anyway",
    args: ["sample", "--run", "run", "--n", "2e12", "--memory-limit-mib", "1e12", "--backend", "cpu"],
    code: 1,
    says: ["out of memory", "Lower n or batch"],
  },
  // eval.
  { name: "eval: a missing run", args: ["eval", "nowhere", "--backend", "cpu"], code: 2, says: ["nowhere"] },
  {
    name: "eval: --n 1e8 --batch 1e8",
    args: ["eval", "run", "--n", "1e8", "--batch", "1e8", "--backend", "cpu"],
    code: 2,
    says: ["lower batch"],
  },
  {
    name: "eval: --batch 0",
    args: ["eval", "run", "--batch", "0", "--backend", "cpu"],
    code: 2,
    says: ["batch"],
  },
  {
    name: "eval: --json a device",
    args: ["eval", "run", "--json", "/dev/null", ...QUICK_EVAL, "--backend", "cpu"],
    code: 2,
    says: ["--json", "/dev/null"],
  },
  {
    name: "eval: --json a folder",
    args: ["eval", "run", "--json", "notes", ...QUICK_EVAL, "--backend", "cpu"],
    code: 2,
    says: ["--json", "notes"],
  },
  {
    name: "eval: truncated weights",
    args: ["eval", "run-trunc", ...QUICK_EVAL, "--backend", "cpu"],
    code: 1,
    says: ["run-trunc/checkpoints/step-000000002"],
  },
  {
    name: "eval: a stored network with numBlocks 100000",
    args: ["eval", "run-badstate", ...QUICK_EVAL, "--backend", "cpu"],
    code: 1,
    says: ["state.json", "numBlocks"],
  },
  {
    name: "eval: a truncated cached FID statistics file is recomputed with a warning",
    args: ["eval", "run", ...QUICK_EVAL, "--cache-dir", "cache-bad", "--backend", "cpu"],
    code: 0,
    says: ["cache-bad/", "unusable"],
    replaces: ["cache-bad/"],
  },
  // features.
  {
    name: "features: replacing the shipped weights without --force",
    args: ["features", "--steps", "1", "--backend", "cpu"],
    code: 2,
    says: ["--force", "shapes_net"],
  },
  {
    name: "features: --out a device",
    args: ["features", "--steps", "1", "--force", "--out", "/dev/null", "--backend", "cpu"],
    code: 2,
    says: ["--out", "/dev/null"],
  },
  {
    name: "features: --batch 0",
    args: ["features", "--batch", "0", "--out", "new.safetensors", "--backend", "cpu"],
    code: 2,
    says: ["batch"],
  },
  {
    name: "features: --steps 1e99",
    args: ["features", "--steps", "1e99", "--out", "new.safetensors", "--backend", "cpu"],
    code: 2,
    says: ["steps"],
  },
  {
    name: "features: --controls with broken weights",
    args: ["features", "--controls", "--weights", "weights.safetensors", "--n", "2", "--backend", "cpu"],
    code: 1,
    says: ["weights.safetensors"],
  },
];

/** sha-256 of every regular file under `dir` (relative paths; symlinks not followed). */
async function hashTree(dir: string, prefix = ""): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for await (const e of Deno.readDir(`${dir}/${prefix}`)) {
    const rel = `${prefix}${e.name}`;
    if (e.isDirectory) { for (const [k, v] of await hashTree(dir, `${rel}/`)) out.set(k, v); }
    else if (e.isFile) out.set(rel, await hashFile(`${dir}/${rel}`));
  }
  return out;
}

async function hashFile(path: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", await Deno.readFile(path));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Runs `deno run -A cli.ts ARGS` in `cwd` to the end. */
async function cli(
  cwd: string,
  args: string[],
): Promise<{ code: number; out: string; err: string; seconds: number }> {
  const t0 = performance.now();
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--config", DENO_JSON, CLI, ...args],
    cwd,
    stdin: "null",
  }).output();
  const dec = new TextDecoder();
  return {
    code: r.code,
    out: dec.decode(r.stdout),
    err: dec.decode(r.stderr),
    seconds: (performance.now() - t0) / 1000,
  };
}

/** Runs `f` over `items`, `n` at a time. */
async function pool<T, R>(items: T[], n: number, f: (x: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(Array.from({ length: n }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await f(items[i]);
    }
  }));
  return out;
}

/** A stack frame or an uncaught error in stderr. */
const STACK = /^\s+at .+:\d+:\d+\)?$|error: Uncaught|Stack backtrace|panicked at/m;

test(`hostile probes: ${PROBES.length} bad inputs to train, sample, eval and features`, async () => {
  const dir = await Deno.makeTempDir({ prefix: "hostile_probe_" });
  try {
    await buildFixture(dir);
    const before = await hashTree(dir);
    const shipped = await hashFile(SHAPES_NET_FILE.pathname);
    const t0 = performance.now();
    const runnable = PROBES.filter((p) => !p.skip);
    const results = await pool(runnable, 3, (p) => cli(dir, p.args));
    const failures: string[] = [];
    runnable.forEach((p, i) => {
      const r = results[i], why: string[] = [];
      if (r.code !== p.code) why.push(`exit ${r.code}, expected ${p.code}`);
      // Errors go to stderr; a handled problem's warning may be a progress line on stdout.
      const said = p.code ? r.err : r.err + r.out;
      for (const part of p.says) if (!said.includes(part)) why.push(`the output lacks "${part}"`);
      if (STACK.test(r.err)) why.push("a stack trace");
      if (why.length) {
        failures.push(
          `${p.name} (${p.args.join(" ")}): ${why.join("; ")}\n  stderr: ${r.err.trim().slice(0, 600)}`,
        );
      }
    });
    const after = await hashTree(dir);
    const replaced = runnable.flatMap((p) => p.replaces ?? []);
    for (const [path, hash] of before) {
      if (replaced.some((r) => path.startsWith(r))) continue;
      if (after.get(path) !== hash) failures.push(`${path} was ${after.has(path) ? "changed" : "removed"}`);
    }
    if ((await hashFile(SHAPES_NET_FILE.pathname)) !== shipped) {
      failures.push("the shipped ShapesNet changed");
    }
    assert((await Deno.stat("/dev/null")).isCharDevice, "/dev/null is no longer a device");
    // The damaged cache was replaced by a good one, not left damaged.
    const cache = [...after.keys()].filter((k) => k.startsWith("cache-bad/"));
    assertEquals(cache.length, 1, `cache files: ${cache}`);
    assert(after.get(cache[0]) !== before.get(cache[0]), "the damaged cache file was not recomputed");
    const seconds = (performance.now() - t0) / 1000;
    const skipped = PROBES.filter((p) => p.skip).map((p) => `${p.name} (${p.skip})`);
    const slowest = runnable.map((p, i) => ({ name: p.name, s: results[i].seconds })).sort((a, b) =>
      b.s - a.s
    )
      .slice(0, 3).map((x) => `${x.name} ${x.s.toFixed(1)} s`);
    console.log(
      `${runnable.length} probes in ${seconds.toFixed(1)} s (slowest: ${slowest.join(", ")})` +
        (skipped.length ? `; skipped: ${skipped.join(", ")}` : ""),
    );
    if (failures.length) throw new Error(`${failures.length} probe(s) failed:\n${failures.join("\n")}`);
  } finally {
    if (!IS_ROOT) await Deno.chmod(`${dir}/readonly`, 0o755).catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

/** The PIDs below `pid` (from /proc; Linux). */
function descendants(pid: number): number[] {
  const out: number[] = [];
  let tasks: string[] = [];
  try {
    tasks = [...Deno.readDirSync(`/proc/${pid}/task`)].map((e) => e.name);
  } catch {
    return out;
  }
  for (const t of tasks) {
    const text = (() => {
      try {
        return Deno.readTextFileSync(`/proc/${pid}/task/${t}/children`);
      } catch {
        return "";
      }
    })();
    for (const c of text.split(" ").filter(Boolean).map(Number)) out.push(c, ...descendants(c));
  }
  return out;
}

const alive = (pid: number) => {
  try {
    return !/^\S+ \S+ [ZX]/.test(Deno.readTextFileSync(`/proc/${pid}/stat`).replace(/\(.*\)/, "x"));
  } catch {
    return false;
  }
};

/** Polls `f` every 100 ms until it returns a value (not undefined), for at most `seconds`. */
async function waitFor<T>(what: string, seconds: number, f: () => T | undefined): Promise<T> {
  const end = performance.now() + seconds * 1000;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (performance.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The logged steps of a run (log.jsonl lines with a loss). */
const loggedSteps = (run: string): number[] => {
  try {
    return Deno.readTextFileSync(`${run}/log.jsonl`).trim().split("\n").filter(Boolean).map((l) =>
      JSON.parse(l)
    )
      .filter((e) => e.event === undefined).map((e) => e.step);
  } catch {
    return [];
  }
};

/** The newest checkpoint's step, or 0. */
const newestCheckpoint = (run: string): number => {
  try {
    const steps = [...Deno.readDirSync(`${run}/checkpoints`)].map((e) => /^step-(\d+)$/.exec(e.name)?.[1])
      .filter((s) => s !== undefined).map(Number);
    return steps.length ? Math.max(...steps) : 0;
  } catch {
    return 0;
  }
};

test("kill -9 of the trainer and of the deno task wrapper: the lock names the orphan, the run resumes with no duplicated step", async () => {
  const dir = await Deno.makeTempDir({ prefix: "hostile_kill_" });
  const run = `${dir}/run`, config = `${dir}/train.json`;
  // Long enough never to finish by itself; a checkpoint every 4 steps, every step logged.
  await Deno.writeTextFile(
    config,
    JSON.stringify({ ...TINY, kimg: 1000, checkpointKimg: 0.016, logEvery: 1 }),
  );
  const started: number[] = [];
  const wrapper = () => {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["task", "--config", DENO_JSON, "train", "--config", config, "--out", run],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    started.push(child.pid);
    return child;
  };
  const trainerOf = (pid: number) =>
    descendants(pid).find((d) => {
      try {
        const cmd = Deno.readTextFileSync(`/proc/${d}/cmdline`).split("\0");
        return cmd.some((a) => a.endsWith("cli.ts")) && cmd.includes("train");
      } catch {
        return false;
      }
    });
  try {
    // 1. The trainer killed with SIGKILL: the wrapper ends too (nothing is left running).
    const w1 = wrapper();
    const t1 = await waitFor("the first trainer", 60, () => trainerOf(w1.pid));
    started.push(t1);
    await waitFor("a checkpoint", 120, () => newestCheckpoint(run) >= 4 || undefined);
    Deno.kill(t1, "SIGKILL");
    const s1 = await w1.status;
    assert(!s1.success, `the wrapper reported success after its trainer was killed`);
    await w1.stderr.cancel();
    assert(!alive(t1));
    // 2. The wrapper killed with SIGKILL: its trainer lives on as an orphan; a second trainer is refused and
    // names it; once it is killed too, the run resumes.
    const w2 = wrapper();
    const t2 = await waitFor("the second trainer", 60, () => trainerOf(w2.pid));
    started.push(t2);
    const before = newestCheckpoint(run);
    await waitFor("a newer checkpoint", 120, () => newestCheckpoint(run) > before || undefined);
    Deno.kill(w2.pid, "SIGKILL");
    await w2.status;
    await w2.stderr.cancel();
    // (SIGKILL cannot be forwarded: the trainer is orphaned, as with any process manager.)
    assert(alive(t2), "the trainer ended with its wrapper");
    const refused = await cli(dir, ["train", "--config", config, "--out", run]);
    assertEquals(refused.code, 2, refused.err);
    assert(refused.err.includes(`is in use by process ${t2}`), refused.err);
    Deno.kill(t2, "SIGKILL");
    await waitFor("the orphan to end", 30, () => alive(t2) ? undefined : true);
    // 3. Resume to two steps past the newest checkpoint: every step is logged exactly once.
    const target = newestCheckpoint(run) + 2;
    const r = await cli(dir, [
      "train",
      "--config",
      config,
      "--out",
      run,
      "--kimg",
      String(target * 4 / 1000),
    ]);
    assertEquals(r.code, 0, r.err);
    assert(!STACK.test(r.err), r.err);
    assertEquals(loggedSteps(run), Array.from({ length: target }, (_, i) => i + 1));
  } finally {
    for (const pid of started) {
      for (const d of descendants(pid)) if (alive(d)) Deno.kill(d, "SIGKILL");
      if (alive(pid)) Deno.kill(pid, "SIGKILL");
    }
    await Deno.remove(dir, { recursive: true });
  }
});
