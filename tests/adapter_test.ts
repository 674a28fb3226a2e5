/**
 * @file Adapter choice: with no WebGPU adapter at all (simulated in a child process by hiding every Vulkan ICD
 * and forcing wgpu's Vulkan backend), `Device.create()` falls back to the CPU reference backend with one line on
 * stderr that says how to get a faster one, `deno task info` says which backend was chosen and why, and
 * `fallback: false` throws instead. Runs on every machine: the child never sees an adapter.
 */

import { assertEquals } from "./util.ts";

const ROOT = new URL("../", import.meta.url);
const NO_ADAPTER = { VK_ICD_FILENAMES: "/nonexistent", DENO_WEBGPU_BACKEND: "vulkan", NO_COLOR: "1" };

async function child(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), { args, cwd: ROOT, env: NO_ADAPTER }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test("no adapter: Device.create() falls back to the CPU backend, says so once, and info says why", async () => {
  const r = await child(["run", "-A", "cli.ts", "info", "--json"]);
  assertEquals(r.code, 0, `cli.ts info exited ${r.code}: ${r.stderr}`);
  const lines = r.stderr.trim().split("\n").filter((l) => l.startsWith("no WebGPU adapter"));
  assertEquals(
    lines,
    ["no WebGPU adapter: using the CPU reference kernels (slow); install mesa-vulkan-drivers for lavapipe"],
    "stderr",
  );
  const info = JSON.parse(r.stdout) as { backend: string; reason: string };
  assertEquals(info.backend, "cpu", "backend");
  if (!/requestAdapter\(\) found none.*fell back to the CPU reference kernels/.test(info.reason)) {
    throw new Error(`info.reason does not say why: "${info.reason}"`);
  }
});

Deno.test("no adapter: Device.create({ fallback: false }) throws, naming what to install", async () => {
  const script = `import { Device } from "./engine/device.ts";
try { await Device.create({ backend: "webgpu", fallback: false }); console.log("created"); }
catch (e) { console.log(e.message); }`;
  const r = await child(["eval", script]);
  if (
    !r.stdout.startsWith("no WebGPU adapter") || !r.stdout.includes("apt-get install mesa-vulkan-drivers")
  ) {
    throw new Error(`fallback: false gave "${r.stdout.trim()}" (stderr: ${r.stderr.trim()})`);
  }
  assertEquals(r.stderr.includes("using the CPU reference kernels"), false, "no fallback line");
});
