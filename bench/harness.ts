/**
 * @file Timing that is fair to an asynchronous GPU queue.
 *
 * A host-device sync costs about 11 ms in Deno whatever its size, so timing one op with one readback measures
 * the sync. Instead each figure runs K iterations back to back and syncs once at the end; K is chosen from a
 * warm-up so that one repeat lasts at least `minMs`; the reported time per iteration is the median over
 * `repeats` repeats. The same procedure times our engine and the peer library, their repeats alternating.
 */

export interface BenchRecord {
  name: string;
  unit: "GFLOP/s" | "GB/s" | "img/s" | "ms";
  value: number;
  peer?: string;
  peer_value?: number;
  ratio?: number;
  /** Extra facts about the measurement (host syncs per step, bytes model, ...). */
  note?: string;
  /** Training figures: parameters of our network and of the peer's (they must be equal). */
  params?: number;
  peer_params?: number;
  /** Training figures: peak resident memory of our process and of the peer's, in MiB. */
  rss_peak_mib?: number;
  peer_rss_peak_mib?: number;
  /** Training figures: device dispatches and queue submits per step (device counters). */
  dispatches_per_step?: number;
  submits_per_step?: number;
  /** Training figures: bind groups created per step (WebGPU; the others come from the backend's cache). */
  bind_groups_per_step?: number;
  /** Texture inputs filled by a packing pass per step (CPU-emulated adapters). */
  packs_per_step?: number;
  /** Training figures: host ms per step spent encoding kernels, inside submits, and wall ms per step. */
  encode_ms_per_step?: number;
  submit_ms_per_step?: number;
  wall_ms_per_step?: number;
  /** Training figures: images per CPU-second of ours over the peer's (steadier than `ratio` under load). */
  ratio_per_cpu?: number;
  /** The 1-minute load average when the figure was taken (this machine is shared). */
  load?: number;
}

export interface TimingOptions {
  minMs?: number;
  repeats?: number;
  maxIterations?: number;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/**
 * CPU time of this process (all threads: lavapipe's workers are ours) in ms, from /proc/self/stat's utime and
 * stime (clock ticks of 10 ms); NaN where /proc is not readable.
 */
export function processCpuMs(): number {
  try {
    const stat = Deno.readTextFileSync("/proc/self/stat");
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) * 10;
  } catch {
    return NaN;
  }
}

/** A timing: wall-clock ms per iteration (the median repeat) and this process's CPU ms per iteration. */
export interface Timing {
  ms: number;
  /**
   * CPU ms per iteration over all repeats. On this shared 2-core machine wall time ≈ CPU time ÷ the cores we
   * actually get, so work ÷ CPU time is the steadier figure when other processes load the machine.
   */
  cpuMs: number;
}

/** Work to time: `step` records one iteration without waiting for it, `sync` waits for all recorded work. */
export interface Workload {
  step: () => void;
  sync: () => Promise<void>;
  /** CPU ms of the process doing the work, when that is not this one (a peer in a child process). */
  cpuMs?: () => number;
}

/**
 * Iterations per repeat: after one warm-up iteration (compiles pipelines, fills pools), K doubles until K
 * iterations plus one sync last `minMs`, so that the ~11 ms sync does not dominate small ops.
 */
async function iterationsPerRepeat({ step, sync }: Workload, minMs: number, maxIt: number): Promise<number> {
  step();
  await sync();
  let K = 1;
  for (;;) {
    const t0 = performance.now();
    for (let k = 0; k < K; k++) step();
    await sync();
    if (performance.now() - t0 >= minMs || K >= maxIt) return K;
    K = Math.min(maxIt, K * 2);
  }
}

/** One repeat of K iterations and a sync: wall ms per iteration, and this process's CPU ms for the repeat. */
async function repeat({ step, sync, cpuMs }: Workload, K: number): Promise<{ ms: number; cpuMs: number }> {
  const cpu = cpuMs ?? processCpuMs;
  const cpu0 = cpu(), t0 = performance.now();
  for (let k = 0; k < K; k++) step();
  await sync();
  return { ms: (performance.now() - t0) / K, cpuMs: cpu() - cpu0 };
}

/**
 * Time per iteration of `step` (which records work without waiting), where `sync` waits for all recorded work:
 * the median of `repeats` repeats of K iterations plus one sync, and the CPU time they took.
 */
export async function timePerIteration(
  step: () => void,
  sync: () => Promise<void>,
  opts: TimingOptions = {},
): Promise<Timing> {
  const [t] = await timeInterleaved([{ step, sync }], opts);
  return t;
}

/**
 * Times several workloads in alternating repeats (A, B, A, B, …), each the median of its own `repeats`, so
 * that the machine's drift (other tenants, clock) falls on all of them alike: a ratio between them compares
 * the workloads, not two moments. On this host the peer's matmul 1024³ ran at 6.6–8.3 GFLOP/s in three
 * processes a minute apart, and ours moved with it.
 */
export async function timeInterleaved(workloads: Workload[], opts: TimingOptions = {}): Promise<Timing[]> {
  const minMs = opts.minMs ?? 250, repeats = opts.repeats ?? 5, maxIt = opts.maxIterations ?? 4096;
  const K: number[] = [];
  for (const w of workloads) K.push(await iterationsPerRepeat(w, minMs, maxIt));
  const times = workloads.map(() => [] as number[]), cpu = workloads.map(() => 0);
  for (let r = 0; r < repeats; r++) {
    for (const [i, w] of workloads.entries()) {
      const t = await repeat(w, K[i]);
      times[i].push(t.ms);
      cpu[i] += t.cpuMs;
    }
  }
  return workloads.map((_, i) => ({ ms: median(times[i]), cpuMs: cpu[i] / (repeats * K[i]) }));
}

export function printTable(records: BenchRecord[]): void {
  const rows = records.map((r) => [
    r.name,
    `${r.value.toFixed(r.value < 10 ? 2 : 1)} ${r.unit}`,
    r.peer ? `${r.peer_value!.toFixed(2)} ${r.unit} (${r.peer})` : "",
    r.ratio !== undefined ? `${r.ratio.toFixed(r.ratio < 1 ? 2 : 1)}×` : "",
    r.note ?? "",
  ]);
  const head = ["figure", "ours", "peer", "ratio", "note"];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd();
  console.log(line(head));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const r of rows) console.log(line(r));
}
