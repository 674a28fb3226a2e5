/**
 * @file The command line. Each subcommand parses its options and calls into the layers below; no logic lives
 * here. Exit codes: 0 success, 1 failure, 2 usage error or a command that is not built yet.
 */

import { Command, type CommanderError, InvalidArgumentError } from "commander";
// @ts-types="@types/cli-progress"
import cliProgress from "cli-progress";
import { AllocationError, Device } from "./engine/mod.ts";
import { train, type TrainEvent } from "./models/train.ts";
import { formatBucketTable, formatLogEntry, type LogEntry } from "./models/trainer.ts";
import { sample, type SampleConfigInput } from "./models/sample.ts";
import { UsageError } from "./util/errors.ts";
import { readJsonFile } from "./util/config.ts";
import { checkWritable, writeTextAtomic } from "./util/files.ts";
import { type CheckpointEval, type EvalConfigInput, type EvalReport, evaluate } from "./eval/evaluate.ts";
import { buildShapesNet, SHAPES_NET_FILE, SHAPES_NET_MIN_ACCURACY, ShapesNet } from "./eval/features.ts";
import { measureControls, measureDatasetControls } from "./eval/controls.ts";
import {
  buildFashionNet,
  FASHION_NET_FILE,
  FASHION_NET_MIN_ACCURACY,
  FashionNet,
} from "./eval/fashion_net.ts";
import { loadFashionMnist, PROCEDURAL_SCENES, type ProceduralScene } from "./models/data.ts";
import type { DdsmEvent } from "./search/ddsm.ts";
import type { DistillEvent } from "./search/distill.ts";

const program = new Command("deno task")
  .description("WebGPU tensor engine and architecture search for diffusion models")
  .showHelpAfterError();

program
  .command("info")
  .description("print the WebGPU adapter, native API, features, limits and the buffer pool's state")
  .option("--json", "print one JSON object")
  .option("--backend <name>", "webgpu or cpu", "webgpu")
  .action(async (opts: { json?: boolean; backend: "webgpu" | "cpu" }) => {
    const device = await Device.create({ backend: opts.backend });
    const { info } = device;
    const memory = device.memory();
    if (opts.json) {
      console.log(JSON.stringify({ ...info, memory, knownAnswer: "passed" }));
      return;
    }
    console.log(`backend     ${info.backend} (${info.dtype})`);
    console.log(`adapter     ${info.adapter}${info.isCpuEmulated ? "  [CPU-emulated]" : ""}`);
    console.log(`native API  ${info.api}`);
    console.log(`chosen      ${info.reason}`);
    if (info.backend === "webgpu") {
      console.log(
        `textures    ${
          info.textureInputs
            ? `kernel inputs via rgba32float textures, packed by ${info.packBy} passes`
            : "off (storage buffers only: this adapter cannot read rgba32float storage textures in compute)"
        }`,
      );
    }
    console.log(`features    ${info.features.join(", ") || "(none)"}`);
    for (const [k, v] of Object.entries(info.limits)) console.log(`limit       ${k} = ${v}`);
    console.log(
      `pool        ${memory.pooledBuffers} buffers, ${memory.pooledBytes} bytes pooled; ${memory.liveBytes} bytes live`,
    );
    console.log(`self-test   known-answer kernel passed`);
    device.destroy();
  });

// ---------------------------------------------------------------------------------------------------------------
// train / sample.

const DATA_FLAG =
  "shapes (default), fashion-mnist (Debian's files) or fashion-mnist:DIR, png:DIR or cifar10:PATH";

/**
 * `--data`: "shapes" (the embedded procedural set), "fashion-mnist" (Debian's dataset-fashion-mnist, training
 * split) or "fashion-mnist:DIR", "png:DIR" or "cifar10:PATH".
 */
function parseDataFlag(v: string): Record<string, unknown> {
  if (v === "shapes" || v === "procedural") return { kind: "procedural" };
  if (v === "fashion-mnist") return { kind: "fashion-mnist" };
  const m = /^(png|cifar10|fashion-mnist):(.+)$/.exec(v);
  if (m) return { kind: m[1], path: m[2] };
  throw new UsageError(
    `--data: "${v}" is not shapes, fashion-mnist, fashion-mnist:DIR, png:DIR or cifar10:PATH`,
  );
}

/** A decimal number as typed by a person: digits, an optional fraction and exponent; no spaces, no 0x/0o/0b. */
const DECIMAL = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;
/**
 * Numeric options: decimal numbers only (`Number` would read "0x10" as 16 and "" or " " as 0). Commander names
 * the option in its error ("option '--kimg <n>' argument '0x10' is invalid") and the exit code is 2; zod
 * checks the range.
 */
const num = (v: string) => {
  if (!DECIMAL.test(v)) throw new InvalidArgumentError("expected a decimal number (like 6, 0.5 or 2e-3).");
  return Number(v);
};
/** Memory ran out: a tensor the engine could not allocate, or a host array V8 could not. */
const outOfMemory = (e: unknown) =>
  e instanceof AllocationError ||
  (e instanceof RangeError && /allocation failed|invalid typed array length|array buffer/i.test(e.message));

/** Passwords of connection strings given on this command line: never printed (see `hideSecrets`). */
const secrets: string[] = [];
/** `text` with every password given on the command line replaced by ***. */
const hideSecrets = (text: string) => secrets.reduce((t, p) => t.split(p).join("***"), text);
/** `--storage`: remembers the password of a connection string so that no message prints it. */
const storageFlag = (v: string) => {
  const m = /^[a-z]+:\/\/[^:/@]*:([^@]*)@/i.exec(v);
  if (m && m[1]) secrets.push(m[1], decodeURIComponent(m[1]));
  return v;
};

/**
 * Usage errors (bad options, bad config fields, missing run directory) exit with 2, other failures with 1. An
 * allocation that failed anyway (the estimate of models/cost.ts let it through) names `sizedBy`, the options
 * that size the command's tensors. No message shows a password given on the command line.
 */
const fail = (e: unknown, sizedBy?: string): never => {
  const message = hideSecrets((e as Error).message);
  console.error(
    outOfMemory(e) && sizedBy
      ? `error: out of memory: ${message}. Lower ${sizedBy}, or lower memoryLimitMiB so that the estimate ` +
        `refuses such sizes before it starts`
      : `error: ${message}`,
  );
  Deno.exit(e instanceof UsageError ? 2 : 1);
};

/** Commander names `--memory-limit-mib` memoryLimitMib; the configurations call it memoryLimitMiB. */
function withMemoryLimit<T extends Record<string, unknown>>(opts: T): T {
  const { memoryLimitMib, ...rest } = opts;
  return (memoryLimitMib === undefined ? rest : { ...rest, memoryLimitMiB: memoryLimitMib }) as unknown as T;
}
const MEMORY_FLAG = [
  "--memory-limit-mib <n>",
  "ceiling of the estimated memory in MiB (default: the machine's)",
];
/** Commander's own usage errors (unknown option, missing value) also exit with 2; --help with 0. */
const usageExit = (e: CommanderError) => Deno.exit(e.exitCode === 0 ? 0 : 2);

/** A progress bar on a terminal (log lines printed above it); plain log lines otherwise. */
function progressPrinter(unit: string) {
  const multi = Deno.stdout.isTerminal()
    ? new cliProgress.MultiBar({
      format: `{bar} {percentage}% | {value}/{total} ${unit} | {status}`,
      hideCursor: true,
      clearOnComplete: true,
    }, cliProgress.Presets.shades_classic)
    : null;
  let bar: cliProgress.SingleBar | null = null;
  return {
    start: (total: number, value = 0) => (bar = multi?.create(total, value, { status: "" }) ?? null),
    update: (value: number, status?: string) => bar?.update(value, status === undefined ? {} : { status }),
    log: (line: string) => (multi ? multi.log(line + "\n") : console.log(line)),
    stop: () => multi?.stop(),
  };
}

program
  .command("train")
  .description(
    "train an EDM diffusion model (default: a small UNet on the embedded procedural shapes, 16x16); " +
      "a run directory that holds a checkpoint is resumed",
  )
  .option("--config <file>", "JSON file with training options (TrainConfigSchema in models/train.ts)")
  .option("--out <dir>", "run directory (checkpoints, log.jsonl, samples/); default runs/default")
  .option(
    "--network <name|file.json>",
    "preset (ddpmpp-cifar10, adm-imagenet64, ddsm-cifar10) or UNetSpec file",
  )
  .option("--data <name>", DATA_FLAG)
  .option("--kimg <n>", "training length in thousands of images", num)
  .option("--batch <n>", "images per step", num)
  .option("--lr <x>", "Adam learning rate", num)
  .option("--lr-rampup-kimg <n>", "linear learning-rate warm-up in kimg", num)
  .option("--ema-half-life-kimg <n>", "EMA half-life in kimg", num)
  .option("--grad-clip <norm>", "clip the global gradient norm", num)
  .option("--dropout <p>", "dropout probability (overrides the network's)", num)
  .option("--seed <n>", "random seed", num)
  .option("--sandwich", "DDSM sandwich rule: widths 1, 0.25 and 0.5 or 0.75 per step")
  .option("--log-every <steps>", "read back and log the loss every this many steps", num)
  .option("--checkpoint-kimg <n>", "checkpoint every this many kimg (0: only at the end)", num)
  .option("--sample-kimg <n>", "EMA sample grid every this many kimg (0: only at start and end)", num)
  .option("--sample-count <n>", "images per sample grid (0: none)", num)
  .option("--backend <name>", "webgpu or cpu")
  .option(MEMORY_FLAG[0], MEMORY_FLAG[1], num)
  .exitOverride(usageExit)
  .action(async (opts: Record<string, unknown> & { config?: string; data?: string }) => {
    const { config, data, ...rest } = withMemoryLimit(opts);
    const controller = new AbortController();
    // SIGINT (Ctrl-C) and SIGTERM (kill, a job scheduler; `deno task` forwards both to this process) alike stop
    // after the current step with a checkpoint; a second signal quits at once.
    const onSignal = () => {
      if (controller.signal.aborted) Deno.exit(1);
      controller.abort();
      console.error("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)");
    };
    Deno.addSignalListener("SIGINT", onSignal);
    Deno.addSignalListener("SIGTERM", onSignal);
    const p = progressPrinter("kimg");
    const logs: LogEntry[] = [];
    const onProgress = (e: TrainEvent) => {
      switch (e.type) {
        case "start":
          console.log(
            `${e.resumedFrom ? `resuming ${e.resumedFrom}` : `new run ${e.runDir}`}: ` +
              `${e.parameters.toLocaleString("en")} parameters, ${e.device}`,
          );
          p.start(e.totalNimg / 1000, e.nimg / 1000);
          break;
        case "step":
          p.update(e.nimg / 1000);
          break;
        case "log":
          p.update(
            e.entry.nimg / 1000,
            `loss ${e.entry.loss.toFixed(4)}  ${e.entry.imgPerSec.toFixed(1)} img/s`,
          );
          p.log(formatLogEntry(e.entry));
          if (!logs.length) {
            p.log(`loss by σ at step ${e.entry.step}:\n${formatBucketTable(e.entry.buckets)}`);
          }
          logs.push(e.entry);
          break;
        case "checkpoint":
          p.log(`checkpoint ${e.dir}`);
          break;
        case "sample":
          p.log(`sample grid ${e.path} (${e.seconds.toFixed(1)} s)`);
          break;
      }
    };
    try {
      const file = config ? await readJsonFile(config) : {};
      if (typeof file !== "object" || file === null || Array.isArray(file)) {
        throw new UsageError(`${config} must hold a JSON object of training options`);
      }
      const flags = data === undefined ? rest : { ...rest, data: parseDataFlag(data) };
      const r = await train({ ...file, ...flags }, { onProgress, signal: controller.signal });
      p.stop();
      const last = logs[logs.length - 1];
      if (logs.length > 1) console.log(`loss by σ at step ${last.step}:\n${formatBucketTable(last.buckets)}`);
      console.log(
        `${r.stoppedBy === "done" ? "done" : "interrupted"} at step ${r.step} (${r.nimg / 1000} kimg)` +
          `; checkpoint ${r.checkpoint}`,
      );
      if (r.stoppedBy === "aborted") {
        console.log(`run the same command again to resume`);
        Deno.exit(1);
      }
    } catch (e) {
      p.stop();
      fail(e, "batch or sampleCount, make the network smaller (modelChannels, channelMult, numBlocks)");
    } finally {
      Deno.removeSignalListener("SIGINT", onSignal);
      Deno.removeSignalListener("SIGTERM", onSignal);
    }
  });

program
  .command("sample")
  .description(
    "sample images from a run's checkpoint (EMA weights, EDM Heun sampler by default) into a PNG grid",
  )
  .option("--run <dir>", "run directory (its newest checkpoint is used)")
  .option("--checkpoint <dir>", "a checkpoint folder instead of the newest (--run may then be left out)")
  .option("--n <count>", "number of images (default 64)", num)
  .option("--steps <n>", "sampler steps (default 18)", num)
  .option("--sampler <name>", "heun, euler or stochastic")
  .option("--s-churn <x>", "stochastic sampler: S_churn", num)
  .option("--s-min <x>", "stochastic sampler: S_min", num)
  .option("--s-max <x>", "stochastic sampler: S_max", num)
  .option("--s-noise <x>", "stochastic sampler: S_noise", num)
  .option("--no-ema", "use the raw network weights instead of the EMA")
  .option("--width <w>", "DDSM width multiplier (default 1)", num)
  .option("--seed <n>", "seed of the latents", num)
  .option("--batch <n>", "images per network batch", num)
  .option("--class-label <k>", "class of every image (class-conditional networks)", num)
  .option("--cols <n>", "images per grid row", num)
  .option("--out <file.png>", "grid to write (default <run>/samples/sample-<checkpoint>.png)")
  .option("--raw <file.safetensors>", "also write the raw samples")
  .option("--backend <name>", "webgpu or cpu")
  .option(MEMORY_FLAG[0], MEMORY_FLAG[1], num)
  .exitOverride(usageExit)
  .action(async (opts: SampleConfigInput) => {
    const p = progressPrinter("steps");
    try {
      const r = await sample(withMemoryLimit(opts), {
        onStep: (i) => {
          if (i.step === 0 && i.batch === 0) p.start(i.steps * i.batches);
          p.update(i.batch * i.steps + i.step + 1, `σ ${i.sigmaNext.toPrecision(3)}`);
        },
      });
      p.stop();
      console.log(
        `${r.shape[0]} images (${r.nfe} network evaluations each) from ${r.checkpoint} in ` +
          `${r.seconds.toFixed(1)} s → ${r.path}${r.rawPath ? ` and ${r.rawPath}` : ""}`,
      );
    } catch (e) {
      p.stop();
      fail(e, "n or batch");
    }
  });

// ---------------------------------------------------------------------------------------------------------------
// search.

/** Progress bars of a search: one for the whole search, one for the running candidate. */
function searchPrinter() {
  const tty = Deno.stdout.isTerminal();
  const multi = tty
    ? new cliProgress.MultiBar({
      format: "{label} {bar} {percentage}% | {value}/{total} {unit} | {status}",
      hideCursor: true,
      clearOnComplete: true,
    }, cliProgress.Presets.shades_classic)
    : null;
  let overall: cliProgress.SingleBar | null = null, candidate: cliProgress.SingleBar | null = null;
  return {
    overall(total: number, value: number) {
      overall = multi?.create(total, value, { label: "search   ", unit: "trials", status: "" }) ?? null;
    },
    overallUpdate: (value: number, status: string) => overall?.update(value, { status }),
    candidate(total: number, unit: string, status: string) {
      if (!multi) return;
      if (candidate) multi.remove(candidate);
      candidate = multi.create(total, 0, { label: "candidate", unit, status });
    },
    candidateUpdate: (value: number, status?: string) =>
      candidate?.update(value, status === undefined ? {} : { status }),
    log: (line: string) => (multi ? multi.log(line + "\n") : console.log(line)),
    stop: () => multi?.stop(),
  };
}

/** `search --validate-proxy`: one log line per training run, then the table. */
async function validateProxyCommand(
  input: Record<string, unknown>,
  opts: Record<string, unknown>,
  signal: AbortSignal,
  p: ReturnType<typeof searchPrinter>,
): Promise<void> {
  const { validateProxy } = await import("./search/validate_proxy.ts");
  const r = await validateProxy(input, {
    architectures: opts.architectures,
    fullN: opts.fullN,
    longFactor: opts.longFactor,
    inheritance: opts.inheritance,
  }, {
    signal,
    onEvent: (e) => {
      if (e.type === "start") {
        p.log(`proxy validation in ${e.dir}: ${e.architectures.length} architectures, ${e.device}`);
      } else if (e.type === "resumed") {
        p.log(
          `#${e.index + 1}/${e.total} ${
            e.kept === "all" ? "kept" : "long run kept"
          } from the earlier run: ${e.summary}`,
        );
      } else if (e.type === "run-start") p.candidate(1, "runs", `#${e.index + 1} ${e.phase}: ${e.summary}`);
      else if (e.type === "run-end") {
        const s = e.score;
        p.log(
          `#${e.index + 1}/${e.total} ${e.phase.padEnd(7)} ${s.name} ` +
            `${s.value === null ? `failed: ${s.error}` : s.value.toFixed(3)}  ` +
            (typeof s.loss === "number" ? `${s.lossName} ${s.loss.toFixed(4)}  ` : "") +
            `${s.trainSeconds.toFixed(0)} s + ${s.scoreSeconds.toFixed(0)} s`,
        );
      }
    },
  });
  p.stop();
  console.log(await Deno.readTextFile(r.markdown));
  console.log(`written: ${r.json} and ${r.markdown}`);
}

/** `search --final`: a bar per architecture, one log line per finished one, then the table. */
async function finalCommand(
  flags: Record<string, unknown>,
  opts: Record<string, unknown>,
  signal: AbortSignal,
  p: ReturnType<typeof searchPrinter>,
): Promise<void> {
  const { runFinal } = await import("./search/final.ts");
  const dir = (flags.out as string | undefined) ?? "runs/search";
  const line = (i: number, total: number, r: import("./search/final_report.ts").FinalRow, what: string) =>
    `#${i + 1}/${total} ${what} ${r.baseline ? "default network" : `trial ${r.trialId}`}: ${r.fidName} ` +
    `${r.fid === null ? `failed: ${r.error}` : r.fid.toFixed(3)}  ${r.trainSeconds.toFixed(0)} s + ` +
    `${r.fidSeconds.toFixed(0)} s  MACs ${(r.macs / 1e6).toFixed(1)} M  params ${
      (r.params / 1e3).toFixed(0)
    } k  ` +
    r.summary;
  let label = "";
  try {
    const r = await runFinal(dir, { top: opts.finalTop, kimg: opts.finalKimg, fidN: opts.fidN }, {
      signal,
      backend: flags.backend as "webgpu" | "cpu" | undefined,
      onEvent: (e) => {
        if (e.type === "start") {
          p.log(`final stage of the search in ${e.dir}: ${e.rows.length} architectures, ${e.device}`);
          p.overall(e.rows.length, 0);
        } else if (e.type === "reference") {
          p.log(
            `reference statistics ${e.cached ? "from the cache" : `computed in ${e.seconds.toFixed(0)} s`}`,
          );
        } else if (e.type === "kept") {
          p.log(line(e.index, e.total, e.row, "kept from the earlier run,"));
          p.overallUpdate(e.index + 1, "");
        } else if (e.type === "dropped") {
          p.log(`no longer selected, dropped from final.json: ${e.row.summary}`);
        } else if (e.type === "row-start") {
          label = e.trialId === null ? "default network" : `trial ${e.trialId}`;
          p.candidate(100, "%", `${label} training`);
        } else if (e.type === "row-progress") {
          // Training is the first half of the bar, the FID the second.
          const ev = e.event;
          if (ev.type === "train") {
            p.candidateUpdate(
              Math.round(50 * ev.nimg / ev.totalNimg),
              ev.loss === undefined ? undefined : `${label} training, loss ${ev.loss.toFixed(4)}`,
            );
          } else p.candidateUpdate(50 + Math.round(50 * ev.done / ev.total), `${label} FID`);
        } else if (e.type === "row-end") {
          p.log(line(e.index, e.total, e.row, "trained"));
          p.overallUpdate(e.index + 1, "");
        }
      },
    });
    p.stop();
    console.log(r.summary);
    console.log(`written: ${r.json} and ${r.markdown}; report: ${r.reportHtml} (and ${r.reportJson})`);
  } catch (e) {
    if ((e as Error).message === "interrupted") {
      p.stop();
      console.log(`interrupted: run the same command to continue (finished architectures are kept)`);
      Deno.exit(130);
    }
    throw e;
  }
}

/** `search --compare`: one log line per finished trial and run, then the table. */
async function compareCommand(
  input: Record<string, unknown>,
  opts: Record<string, unknown>,
  signal: AbortSignal,
  p: ReturnType<typeof searchPrinter>,
): Promise<void> {
  const { runCompare } = await import("./search/compare.ts");
  const r = await runCompare(input, { seeds: opts.seeds }, {
    signal,
    onEvent: (e) => {
      if (e.type === "run-start") {
        p.log(`${e.resumed ? "resuming" : "starting"} ${e.proposer} seed ${e.seed} in ${e.dir}`);
      } else if (e.type === "run-end") p.log(`${e.proposer} seed ${e.seed}: stopped by ${e.stoppedBy}`);
      else if (e.event.type === "trial-end") {
        const t = e.event.trial;
        p.log(
          `  ${e.proposer} seed ${e.seed} trial ${t.id}: ` +
            (t.status === "done" ? `${t.scores.proxyName} ${t.scores.proxyFid!.toFixed(3)}` : t.status),
        );
      }
    },
  });
  p.stop();
  console.log(await Deno.readTextFile(r.markdown));
  console.log(`written: ${r.json}, ${r.markdown} and ${r.html}`);
  if (r.interrupted) {
    console.log(`interrupted: run the same command to continue`);
    Deno.exit(130);
  }
}

/** `search --method ddsm`: one log line per supernet log, scored genome and generation, then the table. */
async function ddsmCommand(
  input: Record<string, unknown>,
  resume: boolean,
  signal: AbortSignal,
  p: ReturnType<typeof searchPrinter>,
): Promise<void> {
  const { runDdsmSearch } = await import("./search/ddsm.ts");
  const r = await runDdsmSearch(input, {
    resume,
    signal,
    onEvent: (e: DdsmEvent) => {
      switch (e.type) {
        case "start":
          console.log(`${e.resumed ? "resuming" : "new"} DDSM search in ${e.dir}: ${e.device}`);
          break;
        case "supernet":
          if (e.loaded) p.log(`supernet: ${e.loaded}`);
          else {
            p.log(`supernet (sandwich) ${e.nimg}/${e.totalNimg} images, loss ${e.loss?.toFixed(4) ?? "–"}`);
          }
          break;
        case "profile":
          p.log(
            `step-importance profile ${e.cached ? "from the run folder" : `in ${e.seconds.toFixed(0)} s`}`,
          );
          break;
        case "reference":
          p.log(
            `reference statistics ${e.cached ? "from the cache" : `computed in ${e.seconds.toFixed(0)} s`}`,
          );
          break;
        case "trial-end": {
          const t = e.trial;
          const score = t.status === "done"
            ? `${t.scores.proxyName} ${t.scores.proxyFid!.toFixed(3)}`
            : `${t.status}: ${t.error}`;
          p.log(
            `trial ${String(t.id).padStart(3)} ${t.proposer.padEnd(12)} ${score}  MACs ${
              ((t.costs.macs ?? 0) / 1e6).toFixed(2)
            } M  widths ${(t.spec as { widths: number[] }).widths.join(" ")}`,
          );
          break;
        }
        case "generation":
          p.log(
            `generation ${e.record.generation}: best fitness ${
              e.record.best.toFixed(4)
            } (${e.record.bestKey})`,
          );
          break;
        case "stop":
          p.log(`stopped: ${e.reason}`);
          break;
      }
    },
  });
  p.stop();
  console.log(r.summary);
  if (r.stoppedBy === "interrupted") {
    console.log(`interrupted: run the same command with --resume to continue`);
    Deno.exit(130);
  }
  console.log(`report: ${r.reportHtml} (and ${r.reportJson}); schedule: ${r.dir}/schedule.json`);
}

/** `search --method distill`: one log line per teacher, supernet and retraining log and per FID, then the table. */
async function distillCommand(
  input: Record<string, unknown>,
  resume: boolean,
  signal: AbortSignal,
  p: ReturnType<typeof searchPrinter>,
): Promise<void> {
  const { runDistillSearch } = await import("./search/distill.ts");
  const r = await runDistillSearch(input, {
    resume,
    signal,
    onEvent: (e: DistillEvent) => {
      switch (e.type) {
        case "start":
          console.log(
            `${e.resumed ? "resuming" : "new"} distillation search in ${e.dir}: ${e.device}; blocks ` +
              e.blocks.join(", "),
          );
          break;
        case "teacher":
          if (e.loaded) p.log(`teacher: ${e.loaded}`);
          else p.log(`teacher ${e.nimg}/${e.totalNimg} images, loss ${e.loss?.toFixed(4) ?? "–"}`);
          break;
        case "supernet":
          p.log(
            `supernet ${e.nimg}/${e.totalNimg} images, block losses ${
              e.losses.map((v) => v.toFixed(3)).join(" ")
            }`,
          );
          break;
        case "candidates":
          p.log(`held-out losses of ${e.count} candidates in ${e.seconds.toFixed(0)} s`);
          break;
        case "selected":
          p.log(`local: ${e.local.join(" | ")}`);
          p.log(`global: ${e.global?.join(" | ") ?? "none fits"}`);
          break;
        case "retrain":
          if (e.loaded) {
            p.log(`retrain ${e.label}: ${e.loaded}`);
            break;
          }
          p.log(
            `retrain ${e.label}: ${e.nimg}/${e.totalNimg} images, EDM loss ${e.edm.toFixed(4)}` +
              (e.distill === null ? "" : `, distillation ${e.distill.toFixed(4)}`),
          );
          break;
        case "reference":
          p.log(
            `reference statistics ${e.cached ? "from the cache" : `computed in ${e.seconds.toFixed(0)} s`}`,
          );
          break;
        case "fid":
          p.log(`${e.label}: ${e.name} ${e.value.toFixed(3)} (${e.seconds.toFixed(0)} s)`);
          break;
        case "stop":
          p.log(`stopped: ${e.reason}`);
          break;
      }
    },
  });
  p.stop();
  console.log(r.summary);
  if (r.stoppedBy === "interrupted") {
    console.log(`interrupted: run the same command with --resume to continue`);
    Deno.exit(130);
  }
  console.log(`report: ${r.reportHtml} (and ${r.reportJson}); student: ${r.dir}/student.json`);
}

program
  .command("search")
  .description(
    "architecture search for diffusion models (DiffNAS: a proposer reads the search memory, each candidate " +
      "trains briefly and is ranked by a proxy FID); writes memory.sqlite, report.html and report.json",
  )
  .option("--config <file>", "JSON file with search settings (SearchConfigSchema in search/config.ts)")
  .option(
    "--method <name>",
    "diffnas (architectures), ddsm (a width per sampling step of one slimmable network) or distill (the " +
      "smallest student of a teacher, block-wise distillation)",
  )
  .option(
    "--teacher <dir>",
    "distill: trained teacher (a train run folder or checkpoint); default: train the default network here " +
      "(--teacher-kimg)",
  )
  .option("--teacher-kimg <n>", "distill: thousands of images of the teacher trained here (default 6)", num)
  .option("--retrain-kimg <n>", "distill: thousands of images of each student retraining (default 4)", num)
  .option(
    "--delta <x>",
    "distill: local rule, within (1 + delta) of the block's best loss (default 0.25)",
    num,
  )
  .option("--lambda <x>", "distill: λ(0) of the block-distillation term of the joint loss (default 1)", num)
  .option("--lambda-schedule <name>", "distill: linear, cosine (default), constant or zero")
  .option("--fid-n <n>", "distill, ddsm, --final: images of the final FIDs (default 2048)", num)
  .option(
    "--supernet <dir>",
    "ddsm: trained slimmable network (a train run folder, checkpoint or another ddsm search's " +
      "supernet.safetensors); default: train one with the " +
      "sandwich rule (--supernet-kimg)",
  )
  .option(
    "--supernet-kimg <n>",
    "ddsm, distill: thousands of images of the supernet trained here (ddsm default 6, distill 2)",
    num,
  )
  .option("--population <n>", "ddsm: GA population (default 8)", num)
  .option("--generations <n>", "ddsm: GA generations after the initial population (default 1)", num)
  .option("--mutation-rate <p>", "ddsm: probability that a step's width is redrawn (default 0.1)", num)
  .option("--fid-weight <x>", "ddsm: weight of the proxy FID in the fitness (default 1)", num)
  .option(
    "--macs-weight <x>",
    "ddsm: weight of the average MACs (millions) in the fitness (default 0.4)",
    num,
  )
  .option("--proxy-steps <n>", "Heun steps of the proxy's sampler (ddsm: genes per genome; default 18)", num)
  .option("--data <name>", DATA_FLAG)
  .option("--out <dir>", "run folder (default runs/search)")
  .option("--resume", "continue the search in --out (after a crash, kill or Ctrl-C)")
  .option("--trials <n>", "candidates to train, the default network included", num)
  .option("--minutes <n>", "wall-clock budget", num)
  .option("--max-macs <n>", "reject candidates above this many MACs per evaluation", num)
  .option("--max-params <n>", "reject candidates above this many parameters", num)
  .option("--proposer <name>", "auto, llm, evolutionary or random")
  .option("--llm-url <url>", "OpenAI-compatible API base URL (e.g. http://127.0.0.1:8080/v1)")
  .option("--llm-model <name>", "model name at that endpoint")
  .option("--llm-key-env <VAR>", "environment variable holding the API key (default OPENAI_API_KEY)")
  .option("--kimg <n>", "training per candidate in thousands of images", num)
  .option("--inherit", "start candidates from the closest finished candidate's weights")
  .option("--no-prune", "no early stopping by the median rule")
  .option("--proxy-n <n>", "images of the proxy FID (RFID-n)", num)
  .option(
    "--proxy-metric <name>",
    "what ranks candidates: rfid (RFID-n of samples) or loss (mean EDM loss over the sampler's σ grid on the " +
      "last --loss-n images)",
  )
  .option("--loss-n <n>", "images of the loss proxy (loss-n; the last of the data)", num)
  .option("--seed <n>", "seed", num)
  .option("--backend <name>", "webgpu or cpu")
  .option(
    "--validate-proxy",
    "measure instead of searching: train --architectures networks (default 8) with the short schedule and " +
      "--long-factor× longer (default 4×), report Spearman ρ of the short RFID-n (--proxy-n, default 128) " +
      "against the long FID-n (--full-n, default 2048), with and without weight inheritance; writes " +
      "validate-proxy.json and .md (default --out runs/validate-proxy); the same command continues an " +
      "interrupted one",
  )
  .option("--architectures <n>", "--validate-proxy: architectures to train (default 8)", num)
  .option("--full-n <n>", "--validate-proxy: images of the long runs' FID (default 2048)", num)
  .option(
    "--long-factor <n>",
    "--validate-proxy: the long schedule's length over the short one (default 4)",
    num,
  )
  .option("--no-inheritance", "--validate-proxy: skip the short runs with weight inheritance")
  .option(
    "--compare",
    "measure instead of searching: run the memory-based proposer (evolutionary, or llm when configured) and " +
      "random search for --trials each (default 6) over --seeds seeds (default 3), report trials-to-target " +
      "(within 2% of the best proxy FID of all runs), mean and spread; writes compare.json and .md " +
      "(default --out runs/compare, one resumable search folder per run). Its own defaults, to fit half an " +
      "hour here: --kimg 3, --max-macs 20e6 (the default network's cost), no sample grids",
  )
  .option("--seeds <n>", "--compare: seeds 0 .. n−1 (default 3)", num)
  .option(
    "--final",
    "the final stage of the search in --out: retrain its top --final-top trials by proxy score (default 1) " +
      "and the default network from scratch with the full schedule (--final-kimg, default 12, ramp and EMA " +
      "half-life of the full run), measure FID-n (--fid-n, default 2048) with the proxy's sampler, save each " +
      "one's EMA weights and sample grid in final/; writes final.json and .md and adds them to the report; " +
      "the same command continues an interrupted one",
  )
  .option("--final-top <k>", "--final: done trials to retrain, best proxy score first (default 1)", num)
  .option("--final-kimg <n>", "--final: thousands of training images of each retraining (default 12)", num)
  .option(
    "--storage <url>",
    "the search memory in PostgreSQL (postgres://user:password@host:port/db?sslmode=…; the password is never " +
      "printed or stored) instead of memory.sqlite in --out: workers on other machines (deno task worker) " +
      "train its trials",
    storageFlag,
  )
  .option("--search <name>", "the search's name in the --storage database (default: default)")
  .option(
    "--queue-depth <n>",
    "keep this many trials queued for workers (default 1; about the worker count)",
    num,
  )
  .option("--propose-only", "with --storage: only propose and keep the queue filled; the workers train")
  .option("--heartbeat-seconds <s>", "seconds between a running trial's heartbeats (default 10)", num)
  .option(
    "--grace-seconds <s>",
    "seconds without a heartbeat before a trial is presumed lost and retried (default 120)",
    num,
  )
  .option("--max-attempts <n>", "attempts per trial before a lost one fails (default 3)", num)
  .exitOverride(usageExit)
  .action(async (opts: Record<string, unknown>) => {
    const controller = new AbortController();
    const stop = () => {
      if (controller.signal.aborted) Deno.exit(130);
      controller.abort();
      console.error(
        opts.final
          ? "\nstopping after this step; the same command retrains the running architecture"
          : "\nstopping after this step; the running candidate will be rerun on --resume",
      );
    };
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
    const p = searchPrinter();
    try {
      const file = opts.config ? await readJsonFile(opts.config as string) : {};
      if (typeof file !== "object" || file === null || Array.isArray(file)) {
        throw new UsageError(`${opts.config} must hold a JSON object of search settings`);
      }
      const f = file as Record<string, unknown>;
      const llm = opts.llmUrl || opts.llmModel || opts.llmKeyEnv
        ? {
          ...(f.llm as Record<string, unknown> ?? {}),
          ...(opts.llmUrl ? { baseUrl: opts.llmUrl } : {}),
          ...(opts.llmModel ? { model: opts.llmModel } : {}),
          ...(opts.llmKeyEnv ? { apiKeyEnv: opts.llmKeyEnv } : {}),
        }
        : undefined;
      const training = opts.kimg !== undefined
        ? { ...(f.training as Record<string, unknown> ?? {}), kimg: opts.kimg }
        : undefined;
      const pruning = opts.prune === false
        ? { ...(f.pruning as Record<string, unknown> ?? {}), enabled: false }
        : undefined;
      const queueFlags = Object.fromEntries(
        Object.entries({
          depth: opts.queueDepth,
          heartbeatSeconds: opts.heartbeatSeconds,
          graceSeconds: opts.graceSeconds,
          maxAttempts: opts.maxAttempts,
        }).filter(([, v]) => v !== undefined),
      );
      const queue = Object.keys(queueFlags).length
        ? { ...(f.queue as Record<string, unknown> ?? {}), ...queueFlags }
        : undefined;
      // Flags override the file; a flag not given must not blank the file's value (runSearch drops
      // undefined fields, which would otherwise fall back to the defaults).
      const flags = Object.fromEntries(
        Object.entries({
          method: opts.method,
          data: opts.data ? parseDataFlag(opts.data as string) : undefined,
          out: opts.out,
          trials: opts.trials,
          minutes: opts.minutes,
          maxMacs: opts.maxMacs,
          maxParams: opts.maxParams,
          proposer: opts.proposer,
          llm,
          training,
          pruning,
          queue,
          inherit: opts.inherit,
          proxyN: opts.proxyN,
          proxyMetric: opts.proxyMetric,
          lossN: opts.lossN,
          seed: opts.seed,
          backend: opts.backend,
        }).filter(([, v]) => v !== undefined),
      );
      // --supernet-kimg and --fid-n belong to both methods: to distill's settings when it is the method.
      const isDistill = f.method === "distill" || opts.method === "distill";
      const distillFlags = Object.fromEntries(
        Object.entries({
          teacher: opts.teacher,
          teacherKimg: opts.teacherKimg,
          supernetKimg: isDistill ? opts.supernetKimg : undefined,
          retrainKimg: opts.retrainKimg,
          delta: opts.delta,
          lambda: opts.lambda,
          schedule: opts.lambdaSchedule,
          fidN: isDistill ? opts.fidN : undefined,
        }).filter(([, v]) => v !== undefined),
      );
      const ddsmFlags = Object.fromEntries(
        Object.entries({
          supernet: opts.supernet,
          supernetKimg: isDistill ? undefined : opts.supernetKimg,
          fidN: isDistill || opts.final ? undefined : opts.fidN,
          population: opts.population,
          generations: opts.generations,
          mutationRate: opts.mutationRate,
          fidWeight: opts.fidWeight,
          macsWeight: opts.macsWeight,
        }).filter(([, v]) => v !== undefined),
      );
      if (!opts.final && (opts.finalTop !== undefined || opts.finalKimg !== undefined)) {
        throw new UsageError(`--${opts.finalTop !== undefined ? "final-top" : "final-kimg"} needs --final`);
      }
      if (opts.final) {
        // The search's settings come from its memory: only the folder and the device are chosen here.
        const given = [
          ...(opts.config ? ["config"] : []),
          ...Object.keys(flags).filter((k) => k !== "out" && k !== "backend"),
          ...(opts.proxySteps !== undefined ? ["proxySteps"] : []),
          ...Object.keys(distillFlags),
          ...Object.keys(ddsmFlags),
          ...(opts.storage !== undefined ? ["storage"] : []),
          ...(opts.validateProxy ? ["validateProxy"] : []),
          ...(opts.compare ? ["compare"] : []),
        ];
        if (given.length) {
          // Settings gathered from several flags are named by the flag that sets them.
          const named: Record<string, string> = {
            training: "kimg",
            pruning: "no-prune",
            llm: "llm-url",
            queue: "queue-depth",
            schedule: "lambda-schedule",
          };
          const flag = named[given[0]] ?? given[0].replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
          throw new UsageError(
            `--final reads the search's settings from the memory in --out: drop --${flag}` +
              (flag === "storage" ? " (the final stage reads memory.sqlite)" : ""),
          );
        }
        return await finalCommand(flags, opts, controller.signal, p);
      }
      const input: Record<string, unknown> = { ...f, ...flags };
      if (opts.proxySteps !== undefined) input.proxySteps = opts.proxySteps;
      if (Object.keys(ddsmFlags).length) {
        if ((input.method ?? "diffnas") !== "ddsm") {
          const flag = Object.keys(ddsmFlags)[0].replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
          const shared = flag === "supernet-kimg" || flag === "fid-n";
          throw new UsageError(`--${flag} needs --method ddsm${shared ? " or distill" : ""}`);
        }
        input.ddsm = { ...(f.ddsm as Record<string, unknown> ?? {}), ...ddsmFlags };
      }
      if (opts.storage === undefined && (opts.search !== undefined || opts.proposeOnly)) {
        throw new UsageError(
          `--${opts.proposeOnly ? "propose-only" : "search"} needs --storage postgres://…`,
        );
      }
      if (
        opts.storage !== undefined && (input.method === "ddsm" || input.method === "distill" ||
          opts.validateProxy || opts.compare)
      ) {
        throw new UsageError(
          "--storage holds DiffNAS searches; --method ddsm and distill, --validate-proxy and --compare " +
            "keep their memory in --out",
        );
      }
      if (Object.keys(distillFlags).length) {
        if (input.method !== "distill") {
          const flag = Object.keys(distillFlags)[0].replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
          throw new UsageError(`--${flag === "schedule" ? "lambda-schedule" : flag} needs --method distill`);
        }
        input.distill = { ...(f.distill as Record<string, unknown> ?? {}), ...distillFlags };
      }
      if (input.method === "distill") {
        if (opts.validateProxy || opts.compare) {
          throw new UsageError("--validate-proxy and --compare measure DiffNAS; drop --method distill");
        }
        return await distillCommand(input, Boolean(opts.resume), controller.signal, p);
      }
      if (input.method === "ddsm") {
        if (opts.validateProxy || opts.compare) {
          throw new UsageError("--validate-proxy and --compare measure DiffNAS; drop --method ddsm");
        }
        return await ddsmCommand(input, Boolean(opts.resume), controller.signal, p);
      }
      if (opts.validateProxy && opts.compare) {
        throw new UsageError("--validate-proxy and --compare: give one");
      }
      if (opts.validateProxy) return await validateProxyCommand(input, opts, controller.signal, p);
      if (opts.compare) return await compareCommand(input, opts, controller.signal, p);
      let done = 0;
      let best: { fid: number; id: number } | null = null;
      // The search's modules (SQLite, ECharts, the LLM client) load only here: the other commands start faster.
      const [{ runSearch }, { specSummary }, { trialWorker }] = await Promise.all([
        import("./search/diffnas.ts"),
        import("./search/report.ts"),
        import("./search/memory.ts"),
      ]);
      const r = await runSearch(input, {
        resume: Boolean(opts.resume),
        signal: controller.signal,
        storage: opts.storage as string | undefined,
        searchName: opts.search as string | undefined,
        proposeOnly: Boolean(opts.proposeOnly),
        onEvent: (e) => {
          switch (e.type) {
            case "start":
              console.log(
                `${e.resumed ? "resuming" : "new"} search in ${e.dir}: proposer ${e.proposer}, ` +
                  `${e.trials} trials, ${e.device}${opts.storage ? `; memory: ${e.memory}` : ""}`,
              );
              p.overall(e.trials, 0);
              break;
            case "reference":
              p.log(
                `reference statistics ${
                  e.cached ? "from the cache" : `computed in ${e.seconds.toFixed(0)} s`
                }`,
              );
              break;
            case "rejected":
              p.log(`rejected  ${e.trial.proposer}: ${e.trial.error}`);
              break;
            case "trial-start":
              p.candidate(100, "%", `trial ${e.trial.id} (${e.trial.proposer}) training`);
              break;
            case "trial-progress":
              if (e.event.type === "train") {
                // Training is the first 80% of a candidate's bar, the proxy FID the rest.
                const loss = e.event.loss === undefined
                  ? undefined
                  : `trial ${e.trial.id} training, loss ${e.event.loss.toFixed(4)}`;
                p.candidateUpdate(Math.round(80 * e.event.nimg / e.event.totalNimg), loss);
              } else {
                p.candidateUpdate(
                  80 + Math.round(20 * e.event.done / e.event.total),
                  `trial ${e.trial.id} proxy FID`,
                );
              }
              break;
            case "trial-end": {
              done = e.index;
              const t = e.trial;
              const score = t.status === "done"
                ? `${t.scores.proxyName} ${t.scores.proxyFid!.toFixed(3)}`
                : `${t.status}: ${t.error}`;
              const by = opts.storage ? `  by ${trialWorker(t) ?? "?"}` : "";
              p.log(
                `trial ${String(t.id).padStart(3)} ${t.proposer.padEnd(12)} ${score}${by}  ` +
                  `MACs ${((t.costs.macs ?? 0) / 1e6).toFixed(1)} M  params ${
                    ((t.costs.params ?? 0) / 1e3).toFixed(0)
                  } k  ` +
                  `${(t.costs.trainSeconds ?? 0).toFixed(0)} s + ${
                    (t.costs.proxySeconds ?? 0).toFixed(0)
                  } s  ${specSummary(t.spec)}`,
              );
              if (t.status === "done" && (best === null || t.scores.proxyFid! < best.fid)) {
                best = { fid: t.scores.proxyFid!, id: t.id };
              }
              p.overallUpdate(done, best ? `best ${best.fid.toFixed(3)} (trial ${best.id})` : "");
              break;
            }
            case "stop":
              p.log(`stopped: ${e.reason}`);
              break;
          }
        },
      });
      p.stop();
      console.log(r.summary);
      console.log(`report: ${r.reportHtml} (and ${r.reportJson})`);
      if (r.stoppedBy === "interrupted") {
        console.log(`interrupted: run the same command with --resume to continue`);
        Deno.exit(130);
      }
    } catch (e) {
      p.stop();
      fail(e);
    } finally {
      Deno.removeSignalListener("SIGINT", stop);
      Deno.removeSignalListener("SIGTERM", stop);
    }
  });

program
  .command("worker")
  .description(
    "train the trials of a search whose memory is in PostgreSQL, on this machine: claim a queued trial, train " +
      "and score it while heart-beating, commit, take the next; stops when the search ends",
  )
  .requiredOption(
    "--storage <url>",
    "the search's PostgreSQL memory (postgres://user:password@host:port/db?sslmode=…; never printed)",
    storageFlag,
  )
  .option("--search <name>", "the search to work for (default: the database's only search)")
  .option("--name <worker>", "this worker's name in the attempts (default host:pid)")
  .option("--out <dir>", "folder for trial weights on this machine (default: a temporary folder)")
  .option("--idle-minutes <n>", "stop after this long with nothing to claim (default 30)", num)
  .option("--max-trials <n>", "stop after this many trials", num)
  .option("--backend <name>", "webgpu or cpu (default: the search's setting)")
  .exitOverride(usageExit)
  .action(async (opts: Record<string, string | number | undefined>) => {
    const controller = new AbortController();
    const stop = () => {
      if (controller.signal.aborted) Deno.exit(130);
      controller.abort();
      console.error("\nstopping; the running trial goes back to the queue after the grace period");
    };
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
    const s = (v: number) => `${v.toFixed(1)} s`;
    try {
      if (opts.backend !== undefined && opts.backend !== "webgpu" && opts.backend !== "cpu") {
        throw new UsageError(`--backend: "${opts.backend}" is not webgpu or cpu`);
      }
      const { runWorker } = await import("./search/worker.ts");
      const r = await runWorker({
        storage: opts.storage as string,
        searchName: opts.search as string | undefined,
        name: opts.name as string | undefined,
        out: opts.out as string | undefined,
        idleMinutes: opts.idleMinutes as number | undefined,
        maxTrials: opts.maxTrials as number | undefined,
        backend: opts.backend as "webgpu" | "cpu" | undefined,
        signal: controller.signal,
        onEvent: (e) => {
          switch (e.type) {
            case "start":
              console.log(`worker ${e.worker} for search ${e.search} in ${e.memory}: ${e.device}`);
              break;
            case "claim":
              console.log(
                `trial ${e.trial.id} claimed (attempt ${e.trial.attempts.length}, queued ${
                  s(e.waitedSeconds)
                })`,
              );
              break;
            case "end": {
              const t = e.trial;
              const what = !e.applied
                ? "late: it had been re-queued, result recorded as a duplicate"
                : t.status === "done"
                ? `${t.scores.proxyName} ${t.scores.proxyFid!.toFixed(3)}`
                : `${t.status}: ${t.error}`;
              console.log(
                `trial ${t.id} ${what} in ${s(e.seconds)}; coordination ${e.coordinationMs.toFixed(1)} ms`,
              );
              break;
            }
            case "stop":
              console.log(`stopped: ${e.reason}`);
              break;
          }
        },
      });
      const per = r.coordination.perTrialMs;
      const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
      const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
      const hb = r.coordination.byMethod["heartbeat (thread)"];
      console.log(
        `worker ${r.worker}: ${r.trials.length} trials [${r.trials.join(", ")}]` +
          (per.length
            ? `; coordination ${mean(per).toFixed(1)} ms per trial (median ${median(per).toFixed(1)} ms; ` +
              `${(100 * mean(per) / 1000 / mean(r.trialSeconds)).toFixed(2)}% of ${
                s(mean(r.trialSeconds))
              }); ` +
              `heartbeats beside it ${hb ? `${hb.calls}× ${(hb.ms / hb.calls).toFixed(1)} ms` : "none"}; ` +
              `idle polling ${r.coordination.idleMs.toFixed(0)} ms`
            : ""),
      );
      const calls = Object.entries(r.coordination.byMethod);
      console.log(
        `coordination by call: ${
          calls.map(([k, v]) => `${k} ${v.calls}× ${(v.ms / v.calls).toFixed(2)} ms`).join(", ")
        }`,
      );
      if (r.stoppedBy === "interrupted") Deno.exit(130);
    } catch (e) {
      fail(e);
    } finally {
      Deno.removeSignalListener("SIGINT", stop);
      Deno.removeSignalListener("SIGTERM", stop);
    }
  });

// ---------------------------------------------------------------------------------------------------------------
// eval / features.

const fmtMacs = (m: number) => `${(m / 1e6).toFixed(1)} M`;

/** One row of the evaluation table. */
function evalRow(r: CheckpointEval): string[] {
  return [
    r.checkpoint,
    String(r.nimg / 1000),
    r.cost.parameters.toLocaleString("en"),
    fmtMacs(r.cost.macs),
    fmtMacs(r.cost.breakdown.attention),
    r.latency ? `${r.latency.medianMs.toFixed(1)} ms` : "-",
    r.fid ? `${r.fid.value.toFixed(3)} (${r.fid.seconds.toFixed(0)} s)` : "-",
    r.rfid ? `${r.rfid.value.toFixed(3)} (${r.rfid.seconds.toFixed(0)} s)` : "-",
    ...(r.kid ? [`${r.kid.mean.toExponential(3)} ± ${r.kid.std.toExponential(1)}`] : []),
  ];
}

function printEvalReport(report: EvalReport): void {
  const first = report.checkpoints[0];
  const head = [
    "checkpoint",
    "kimg",
    "params",
    "MACs",
    "attn MACs",
    "latency",
    first?.fid ? `${first.fid.name} (NFE ${first.fid.nfe})` : "FID",
    first?.rfid ? `${first.rfid.name} (NFE ${first.rfid.nfe})` : "RFID",
    ...(first?.kid ? [first.kid.name] : []),
  ];
  const rows = [head, ...report.checkpoints.map(evalRow)];
  const widths = head.map((_, j) => Math.max(...rows.map((r) => (r[j] ?? "").length)));
  console.log(
    `features ${report.features.name} (${report.features.fingerprint}); reference ${report.reference.dataset}, ` +
      `${report.reference.n} images${report.reference.cached ? " (cached)" : ""}`,
  );
  for (const r of rows) console.log(r.map((c, j) => c.padEnd(widths[j])).join("  "));
  const rc = report.rankCorrelation;
  if (rc) {
    console.log(`Spearman ρ(${rc.rfid}, ${rc.fid}) over ${rc.count} checkpoints = ${rc.rho.toFixed(3)}`);
  }
}

program
  .command("eval")
  .description(
    "evaluate checkpoints: parameters, MACs, latency, FID and the proxy RFID against the training data " +
      "(embedded ShapesNet features unless --inception is given); with 3+ checkpoints also the RFID-FID " +
      "rank correlation",
  )
  .argument("[runs...]", "run directories (default: runs/default)")
  .option("--checkpoints <dirs...>", "evaluate these checkpoint folders instead")
  .option("--all-checkpoints", "every checkpoint of every run, not only the newest")
  .option("--n <count>", "generated images for the full FID (default 2048)", num)
  .option("--steps <n>", "Heun steps for the full FID (default 18, NFE 35)", num)
  .option("--proxy-n <count>", "generated images for the proxy RFID (default 128; 0 skips it)", num)
  .option("--proxy-steps <n>", "Heun steps for the proxy (default 18, NFE 35)", num)
  .option("--proxy-only", "skip the full FID")
  .option("--ref-n <count>", "real images for the reference statistics (default min(10000, dataset))", num)
  .option("--seed <n>", "seed of the latents", num)
  .option("--inception <file>", "Inception-v3 weights (safetensors with PyTorch names) for the true FID")
  .option("--data <name>", `reference data (default: the checkpoints' training data): ${DATA_FLAG}`)
  .option("--kid", "also compute KID on the full metric's samples")
  .option("--no-latency", "skip the latency measurement")
  .option("--batch <n>", "images per network batch (default 256)", num)
  .option("--cache-dir <dir>", "where reference statistics are cached (default .cache/fid)")
  .option("--force", "recompute results that were saved with the same settings")
  .option("--json <file>", "also write the report as JSON")
  .option("--backend <name>", "webgpu or cpu")
  .option(MEMORY_FLAG[0], MEMORY_FLAG[1], num)
  .exitOverride(usageExit)
  .action(async (runs: string[], opts: Record<string, unknown> & { json?: string }) => {
    const { json, latency, data, ...rest } = withMemoryLimit(opts);
    const p = progressPrinter("images");
    let current = "";
    try {
      const input: EvalConfigInput = {
        ...(rest as Omit<EvalConfigInput, "runs">),
        ...(data === undefined ? {} : { data: parseDataFlag(data as string) as EvalConfigInput["data"] }),
        runs: runs.length ? runs : ["runs/default"],
        ...(latency === false ? { latency: false } : {}),
      };
      // The report's file is checked now, not after the evaluation.
      if (json) await checkWritable(json, "--json");
      const report = await evaluate(
        Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined)),
        {
          onEvent: (e) => {
            if (e.type === "reference" || e.type === "metric") {
              const name = e.type === "reference" ? "reference statistics" : e.name;
              if (name !== current) {
                current = name;
                p.start(e.total);
              }
              p.update(e.done, name);
            } else if (e.type === "checkpoint") {
              p.log(`[${e.index + 1}/${e.total}] ${e.dir}`);
            } else if (e.type === "warning") {
              p.log(`warning: ${e.message}`);
            } else if (e.type === "result" && e.result.reused) {
              p.log(`  ${e.result.reused} measurement(s) read from ${e.result.run}/eval/`);
            }
          },
        },
      );
      p.stop();
      printEvalReport(report);
      if (json) await writeTextAtomic(json, JSON.stringify(report, null, 2) + "\n");
    } catch (e) {
      p.stop();
      fail(e, "batch (images per network batch), n or proxyN");
    }
  });

program
  .command("features")
  .description(
    "rebuild the embedded ShapesNet feature network from its seed (trains it on procedural shapes; refuses to " +
      `replace a file without --force or to write one below ${SHAPES_NET_MIN_ACCURACY * 100}% held-out ` +
      "accuracy on the default scenes), or with --data fashion-mnist FashionNet (trained on the training " +
      `split, at least ${
        FASHION_NET_MIN_ACCURACY * 100
      }% on t10k); with --controls print its validity controls`,
  )
  .option("--data <name>", "shapes (default: ShapesNet) or fashion-mnist[:DIR] (FashionNet)")
  .option(
    "--out <file>",
    `weights to write (default ${SHAPES_NET_FILE.pathname} or ${FASHION_NET_FILE.pathname})`,
  )
  .option("--force", "replace an existing weights file")
  .option("--steps <n>", "optimizer steps (default 700; FashionNet 1880)", num)
  .option("--batch <n>", "images per step (default 96; FashionNet 64)", num)
  .option("--lr <x>", "peak learning rate of the one-cycle schedule (default 3e-3; FashionNet 4e-3)", num)
  .option("--seed <n>", "seed of the initialisation and batch order", num)
  .option("--controls", "do not train: print the FIDs of the validity controls (eval/controls.ts)")
  .option("--weights <file>", "with --controls: the network to measure (default: the shipped one)")
  .option("--n <count>", "with --controls: images per side of each FID (default 2048)", num)
  .option("--seed-controls <n>", "with --controls --data fashion-mnist: seed of the reference subset", num)
  .option("--scene <name...>", "with --controls: procedural scene styles (default: flat bold busy)")
  .option("--resolution <px>", "with --controls: image side (default 16)", num)
  .option("--backend <name>", "webgpu or cpu", "webgpu")
  .exitOverride(usageExit)
  .action(async (opts: {
    data?: string;
    seedControls?: number;
    out?: string;
    force?: boolean;
    steps?: number;
    batch?: number;
    lr?: number;
    seed?: number;
    controls?: boolean;
    weights?: string;
    n?: number;
    scene?: string[];
    resolution?: number;
    backend: "webgpu" | "cpu";
  }) => {
    const p = progressPrinter(opts.controls ? "images" : "steps");
    try {
      const data = opts.data === undefined ? { kind: "procedural" } : parseDataFlag(opts.data);
      if (data.kind !== "procedural" && data.kind !== "fashion-mnist") {
        throw new UsageError(`--data: feature networks exist for shapes and fashion-mnist, not ${data.kind}`);
      }
      const device = await Device.create({ backend: opts.backend });
      if (data.kind === "fashion-mnist") {
        return await fashionFeatures(opts, data.path as string | undefined, device, p);
      }
      if (opts.controls) {
        const net = await ShapesNet.load(opts.weights ?? SHAPES_NET_FILE, { device });
        const n = opts.n ?? 2048, resolution = opts.resolution ?? 16;
        console.log(
          `features ${net.name} (${net.fingerprint}); FID-${n} to ${n} real images at ${resolution}x${resolution}`,
        );
        for (const scene of opts.scene ?? PROCEDURAL_SCENES) {
          if (!(PROCEDURAL_SCENES as readonly string[]).includes(scene)) {
            throw new UsageError(`--scene: "${scene}" is not one of ${PROCEDURAL_SCENES.join(", ")}`);
          }
          let current = "";
          const rows = await measureControls(net, {
            scene: scene as ProceduralScene,
            resolution,
            n,
            onProgress: (name, done, total) => {
              if (name !== current) (current = name), p.start(total);
              p.update(done, `${scene}: ${name}`);
            },
          });
          p.stop();
          console.log(`scene ${scene}`);
          for (const r of rows) console.log(`  ${r.control.padEnd(20)} ${r.fid.toFixed(3)}`);
        }
        net.dispose();
        return;
      }
      const out = opts.out ?? SHAPES_NET_FILE.pathname;
      const options = Object.fromEntries(
        Object.entries({ steps: opts.steps, batch: opts.batch, lr: opts.lr, seed: opts.seed })
          .filter(([, v]) => v !== undefined),
      );
      let started = false;
      const r = await buildShapesNet(out, options, {
        device,
        force: opts.force,
        onProgress: (step, steps, loss) => {
          if (!started) p.start(steps), started = true;
          p.update(step, `loss ${loss.toFixed(3)}`);
          if (!Deno.stdout.isTerminal()) p.log(`step ${step}/${steps} loss ${loss.toFixed(4)}`);
        },
      });
      p.stop();
      const acc = Object.entries(r.accuracy).map(([s, a]) => `${(a * 100).toFixed(1)}% (${s})`).join(", ");
      console.log(
        `ShapesNet: final loss ${r.finalLoss.toFixed(4)}, held-out accuracy ${acc}, ${
          r.seconds.toFixed(0)
        } s`,
      );
      if (!r.written) {
        throw new Error(
          `not written: the held-out accuracy on the default (flat) scenes must be at least ` +
            `${SHAPES_NET_MIN_ACCURACY * 100}% (train longer with --steps)`,
        );
      }
      console.log(`→ ${out}`);
    } catch (e) {
      p.stop();
      fail(e, opts.controls ? "--n or --resolution" : "--batch");
    }
  });

/** `features --data fashion-mnist`: build FashionNet, or with --controls print its controls. */
async function fashionFeatures(
  opts: {
    controls?: boolean;
    weights?: string;
    n?: number;
    seedControls?: number;
    out?: string;
    force?: boolean;
    steps?: number;
    batch?: number;
    lr?: number;
    seed?: number;
  },
  path: string | undefined,
  device: Device,
  p: ReturnType<typeof progressPrinter>,
): Promise<void> {
  if (opts.controls) {
    const net = await FashionNet.load(opts.weights ?? FASHION_NET_FILE, { device });
    const n = opts.n ?? 2048;
    const reference = await loadFashionMnist({ path, split: "train" });
    const heldOut = await loadFashionMnist({ path, split: "test" });
    console.log(
      `features ${net.name} (${net.fingerprint}); FID-${n} to ${n} random training images (seed ` +
        `${opts.seedControls ?? 0})`,
    );
    let current = "";
    const rows = await measureDatasetControls(net, {
      reference,
      heldOut,
      n,
      seed: opts.seedControls,
      onProgress: (name, done, total) => {
        if (name !== current) (current = name), p.start(total);
        p.update(done, name);
      },
    });
    p.stop();
    for (const r of rows) console.log(`  ${r.control.padEnd(22)} ${r.fid.toFixed(3)}`);
    net.dispose();
    return;
  }
  const out = opts.out ?? FASHION_NET_FILE.pathname;
  const options = Object.fromEntries(
    Object.entries({ steps: opts.steps, batch: opts.batch, lr: opts.lr, seed: opts.seed, path })
      .filter(([, v]) => v !== undefined),
  );
  let started = false;
  const r = await buildFashionNet(out, options, {
    device,
    force: opts.force,
    onProgress: (step, steps, loss) => {
      if (!started) p.start(steps), started = true;
      p.update(step, `loss ${loss.toFixed(3)}`);
      if (!Deno.stdout.isTerminal()) p.log(`step ${step}/${steps} loss ${loss.toFixed(4)}`);
    },
  });
  p.stop();
  console.log(
    `FashionNet: final loss ${r.finalLoss.toFixed(4)}, t10k accuracy ${(r.accuracy * 100).toFixed(2)}%, ` +
      `${r.seconds.toFixed(0)} s`,
  );
  if (!r.written) {
    throw new Error(
      `not written: the t10k accuracy must be at least ${
        FASHION_NET_MIN_ACCURACY * 100
      }% (train longer with --steps)`,
    );
  }
  console.log(`→ ${out}`);
}

try {
  await program.parseAsync(Deno.args, { from: "user" });
} catch (e) {
  console.error(`error: ${(e as Error).message}`);
  Deno.exit(1);
}
