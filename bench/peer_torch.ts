/**
 * @file The PyTorch CPU peer of the training-step figures: spawns bench/peer_torch.py (the same UNet, EDM loss,
 * Adam and EMA written in PyTorch, 2 threads) as a child process and drives it as a harness `Workload`, so its
 * repeats alternate with ours. `step()` only counts; `sync()` asks the child to run the counted steps and waits
 * for its answer, so a repeat's wall time is the child's K steps plus one pipe round trip (well under a
 * millisecond against steps of tens of milliseconds).
 *
 * Python is `$PYTHON` when set, else Debian's `/usr/bin/python3` (where `python3-torch` installs); when no
 * interpreter imports torch, `torchAvailable()` says why and the bench prints one line instead of the peer's
 * figures.
 */

import { unetLayout, type UNetSpec } from "../models/unet.ts";
import type { Workload } from "./harness.ts";

/** A training workload for the peer: the network and the step's settings. */
export interface TorchTrainWorkload {
  spec: UNetSpec;
  batch: number;
  adam: { lr: number; betas: readonly [number, number]; eps: number; rampupImg?: number };
  /** EDM's EMA after each step (half-life in images, ramp-up ratio or null for none), or null for no EMA. */
  ema: { halfLifeImg: number; rampupRatio: number | null } | null;
  sigmaData: number;
  pMean: number;
  pStd: number;
  /** torch.set_num_threads (default 2: this machine's cores). */
  threads?: number;
}

/** The running peer: a workload, its parameter count and the child's peak resident memory. */
export interface TorchPeer extends Workload {
  params: number;
  torchVersion: string;
  /** Peak resident set of the child in MiB, as of its last answer. */
  rssPeakMiB(): number;
  dispose(): Promise<void>;
}

const SCRIPT = new URL("./peer_torch.py", import.meta.url).pathname;

/** The interpreters tried, in order. */
function pythons(): string[] {
  const env = Deno.env.get("PYTHON");
  return env ? [env] : ["/usr/bin/python3", "python3"];
}

/** The first Python that imports torch, or the reason there is none. */
export async function torchAvailable(): Promise<{ python: string } | { skipped: string }> {
  for (const python of pythons()) {
    try {
      const r = await new Deno.Command(python, {
        args: ["-c", "import torch"],
        stderr: "null",
        stdout: "null",
      })
        .output();
      if (r.success) return { python };
    } catch {
      // Not installed under that name: try the next.
    }
  }
  return { skipped: `no Python that imports torch (tried ${pythons().join(", ")}; Debian: python3-torch)` };
}

/** Reads newline-delimited JSON objects from a byte stream. */
function lineReader(stream: ReadableStream<Uint8Array>) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  return async (): Promise<Record<string, unknown>> => {
    for (;;) {
      const nl = buffer.indexOf("\n");
      if (nl >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        return JSON.parse(line);
      }
      const { value, done } = await reader.read();
      if (done) throw new Error("peer_torch.py exited (its stderr is above)");
      buffer += value;
    }
  };
}

/**
 * Starts the peer for `w` (one warm-up step runs before it answers). Its CPU time (`cpuMs`, summed over the
 * steps it ran) lets the bench compare images per CPU-second, which holds up under load: with 2 threads on this
 * shared 2-core machine at load 16, one OpenMP thread waiting on the other made a step 15× slower in wall time
 * than with 1 thread, at the same CPU time.
 */
export async function torchTrainStep(python: string, w: TorchTrainWorkload): Promise<TorchPeer> {
  const arg = JSON.stringify({ ...w, layout: unetLayout(w.spec) });
  const child = new Deno.Command(python, {
    args: [SCRIPT, arg],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const read = lineReader(child.stdout);
  const writer = child.stdin.getWriter();
  const send = (o: unknown) => writer.write(new TextEncoder().encode(JSON.stringify(o) + "\n"));
  const ready = await read();
  let pending = 0, rss = NaN, cpu = 0;
  return {
    params: ready.params as number,
    torchVersion: ready.torch as string,
    step() {
      pending++;
    },
    async sync() {
      if (!pending) return;
      await send({ run: pending });
      pending = 0;
      const r = await read();
      rss = r.rss_peak_mib as number;
      cpu += r.cpu_ms as number;
    },
    cpuMs: () => cpu,
    rssPeakMiB: () => rss,
    async dispose() {
      await writer.close().catch(() => {});
      await child.status;
    },
  };
}

/** This process's peak resident set in MiB (VmHWM of /proc/self/status; NaN where unreadable). */
export function ownRssPeakMiB(): number {
  try {
    const m = Deno.readTextFileSync("/proc/self/status").match(/VmHWM:\s+(\d+) kB/);
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}
