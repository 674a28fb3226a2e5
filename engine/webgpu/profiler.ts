/**
 * @file Device-side time per kernel, from timestamp queries. When a device is created with `profile: true` (and
 * the adapter has "timestamp-query"), the backend gives every dispatch and every packing pass its own pass with
 * a begin and an end timestamp, labelled with the kernel and a short summary of its parameters. At each submit
 * the batch's timestamps are resolved into a buffer; `collect()` reads them all and sums the time per label.
 *
 * A pass per dispatch costs some time of its own, and flat texture copies (outside any pass) are not timed, so
 * the table shows where device time goes rather than what an unprofiled step takes: the bench reports both.
 *
 * Meant for real GPUs. On llvmpipe (lavapipe) the timestamps do not bracket the compute work: a conv weight
 * gradient that takes 4.5 ms by wall clock showed 0.11 ms, and the totals moved with the batch size.
 */

/** Device time of one label: the kernel, or the kernel with its parameters. */
export interface ProfileRow {
  label: string;
  count: number;
  ms: number;
}

export interface Profile {
  /** Per kernel name (packing passes as "<kernel> (pack)"), most time first. */
  kernels: ProfileRow[];
  /** Per kernel and parameters, most time first. */
  shapes: ProfileRow[];
  /** Sum of the timed passes. */
  passMs: number;
  /** From the first pass's start to the last one's end in each submit, summed: passes plus what lies between. */
  spanMs: number;
}

/** At most this many passes per submit (two queries each; a query set holds at most 4096). */
const PASSES = 2048;

interface Pending {
  read: GPUBuffer;
  resolve: GPUBuffer;
  labels: [string, string][];
}

export class GpuProfiler {
  readonly #querySet: GPUQuerySet;
  #labels: [string, string][] = [];
  #pending: Pending[] = [];

  constructor(private readonly device: GPUDevice) {
    this.#querySet = device.createQuerySet({ type: "timestamp", count: 2 * PASSES });
  }

  /** Whether this batch may lack room for another dispatch's passes (the backend submits first). */
  get full(): boolean {
    return this.#labels.length + 8 > PASSES;
  }

  /** The timestamp writes for the next pass, labelled by kernel and by kernel + parameters. */
  next(kernel: string, detail: string): GPUComputePassTimestampWrites {
    const i = this.#labels.length;
    if (i >= PASSES) throw new Error("profiler: batch is full, submit first");
    this.#labels.push([kernel, detail]);
    return { querySet: this.#querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 };
  }

  /** Records the resolve of this batch's timestamps into `encoder` (after its last pass ends). */
  resolveInto(encoder: GPUCommandEncoder): void {
    const n = 2 * this.#labels.length;
    if (n === 0) return;
    const resolve = this.device.createBuffer({
      size: n * 8,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    const read = this.device.createBuffer({
      size: n * 8,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    encoder.resolveQuerySet(this.#querySet, 0, n, resolve, 0);
    encoder.copyBufferToBuffer(resolve, 0, read, 0, n * 8);
    this.#pending.push({ read, resolve, labels: this.#labels });
    this.#labels = [];
  }

  /** Reads every resolved batch since the last call and sums them (the caller submits first). */
  async collect(): Promise<Profile> {
    const kernels = new Map<string, ProfileRow>(), shapes = new Map<string, ProfileRow>();
    const add = (m: Map<string, ProfileRow>, label: string, ms: number) => {
      const r = m.get(label) ?? m.set(label, { label, count: 0, ms: 0 }).get(label)!;
      r.count++;
      r.ms += ms;
    };
    let passMs = 0, spanMs = 0;
    const pending = this.#pending;
    this.#pending = [];
    for (const p of pending) {
      await p.read.mapAsync(GPUMapMode.READ);
      const t = new BigUint64Array(p.read.getMappedRange().slice(0));
      p.read.unmap();
      p.read.destroy();
      p.resolve.destroy();
      p.labels.forEach(([kernel, detail], i) => {
        const ms = Number(t[2 * i + 1] - t[2 * i]) / 1e6;
        add(kernels, kernel, ms);
        add(shapes, detail, ms);
        passMs += ms;
      });
      spanMs += Number(t[t.length - 1] - t[0]) / 1e6;
    }
    const sorted = (m: Map<string, ProfileRow>) => [...m.values()].sort((a, b) => b.ms - a.ms);
    return { kernels: sorted(kernels), shapes: sorted(shapes), passMs, spanMs };
  }
}

/** A short label of a kernel's parameters: its scalar fields as `name=value`, arrays joined by "×". */
export function describeParams(params: unknown): string {
  if (params === null || typeof params !== "object") return "";
  const parts: string[] = [];
  for (const [k, v] of Object.entries(params)) {
    if (typeof v === "number" || typeof v === "boolean") parts.push(`${k}=${v}`);
    else if (typeof v === "string" && v.length <= 24) parts.push(`${k}=${v}`);
    else if (v !== null && typeof v === "object" && "op" in v) parts.push(`${k}=${exprText(v)}`);
    else if (Array.isArray(v) && v.length <= 6 && v.every((e) => typeof e === "number")) {
      parts.push(`${k}=${v.join("×")}`);
    }
    if (parts.length >= 14) break;
  }
  return parts.join(" ");
}

/** An elementwise expression tree (kernels/elementwise.ts `Expr`) as text: `mul(x0,add(x1,c0))`. */
function exprText(e: unknown): string {
  const n = e as { op: string; i?: number; a?: unknown; b?: unknown; c?: unknown };
  if (n.op === "in") return `x${n.i}`;
  if (n.op === "const") return `c${n.i}`;
  const args = [n.c, n.a, n.b].filter((x) => x !== undefined).map(exprText);
  return `${n.op}(${args.join(",")})`;
}
