/**
 * @file The command line. Each subcommand parses its options and calls into the layers below; no logic lives
 * here. Exit codes: 0 success, 1 failure, 2 usage error or a command that is not built yet.
 */

import { Command } from "commander";
import { Device } from "./engine/mod.ts";

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
    ["train", "diffusion model training"],
    ["sample", "sampling from a checkpoint"],
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

try {
  await program.parseAsync(Deno.args, { from: "user" });
} catch (e) {
  console.error(`error: ${(e as Error).message}`);
  Deno.exit(1);
}
