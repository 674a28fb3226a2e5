/**
 * @file The command line. Each subcommand parses its options and calls into the layers below; no logic lives
 * here. Exit codes: 0 success, 1 failure, 2 usage error or a command that is not built yet.
 */

import { Command, type CommanderError } from "commander";
// @ts-types="@types/cli-progress"
import cliProgress from "cli-progress";
import { Device } from "./engine/mod.ts";
import {
  formatBucketTable,
  formatLogEntry,
  type LogEntry,
  readJsonFile,
  sample,
  type SampleConfigInput,
  train,
  type TrainEvent,
  UsageError,
} from "./models/train.ts";

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
    if (info.backend === "webgpu") {
      console.log(
        `textures    ${
          info.textureInputs ? "kernel inputs via rgba32float textures" : "off (storage buffers only)"
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

for (
  const [name, what] of [
    ["search", "architecture search (DiffNAS, DDSM)"],
    ["eval", "FID and model cost"],
  ] as const
) {
  program
    .command(name)
    .description(`${what} — not built yet`)
    .allowUnknownOption()
    .action(() => {
      console.error(`'${name}' is not built yet: the engine exists; ${what} is still to come.`);
      Deno.exit(2);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// train / sample.

/** Numeric options are passed through as numbers; zod names the option if one is not a valid number. */
const num = (v: string) => Number(v);
/** Usage errors (bad options, bad config fields, missing run directory) exit with 2, other failures with 1. */
const fail = (e: unknown): never => {
  console.error(`error: ${(e as Error).message}`);
  Deno.exit(e instanceof UsageError ? 2 : 1);
};
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
  .exitOverride(usageExit)
  .action(async (opts: Record<string, unknown> & { config?: string }) => {
    const { config, ...flags } = opts;
    const controller = new AbortController();
    const onSigint = () => {
      if (controller.signal.aborted) Deno.exit(1);
      controller.abort();
      console.error("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)");
    };
    Deno.addSignalListener("SIGINT", onSigint);
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
      fail(e);
    } finally {
      Deno.removeSignalListener("SIGINT", onSigint);
    }
  });

program
  .command("sample")
  .description(
    "sample images from a run's checkpoint (EMA weights, EDM Heun sampler by default) into a PNG grid",
  )
  .requiredOption("--run <dir>", "run directory (its newest checkpoint is used)")
  .option("--checkpoint <dir>", "a checkpoint folder instead of the newest")
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
  .exitOverride(usageExit)
  .action(async (opts: SampleConfigInput) => {
    const p = progressPrinter("steps");
    try {
      const r = await sample(opts, {
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
      fail(e);
    }
  });

try {
  await program.parseAsync(Deno.args, { from: "user" });
} catch (e) {
  console.error(`error: ${(e as Error).message}`);
  Deno.exit(1);
}
