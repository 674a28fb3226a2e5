/**
 * @file `deno task bench [--json] [--quick] [--no-peer] [--only NAME] [--torch-threads N] [--profile]`: the kernels that dominate a UNet
 * training step, as GFLOP/s (compute-bound) or GB/s (memory-bound), each the median of several timed repeats
 * (see harness.ts), with TensorFlow.js's WebGPU backend measured in the same run on matmul and conv, its
 * repeats alternating with ours; and training steps in images/s against the same step in PyTorch on the CPU
 * (bench/peer_torch.ts, when Debian's python3-torch is installed), with each step's dispatches, submits, host
 * encoding time and both processes' peak memory.
 *
 * Gradients are timed by calling the tape node's vector-Jacobian product directly, so a figure is exactly the
 * code `backward()` runs for that op and nothing else.
 */

import {
  add,
  conv2d,
  Device,
  groupNorm,
  matmul,
  mul,
  optim,
  randn,
  scope,
  silu,
  softmax,
  Tensor,
  tensor,
} from "../engine/mod.ts";
import {
  type BenchRecord,
  printTable,
  timeInterleaved,
  timePerIteration,
  type Timing,
  type TimingOptions,
  type Workload,
} from "./harness.ts";
import { cpus } from "node:os";
import type { PeerWorkload } from "./peer_tfjs.ts";
import {
  ownRssPeakMiB,
  torchAvailable,
  type TorchPeer,
  torchTrainStep,
  type TorchTrainWorkload,
} from "./peer_torch.ts";

const args = new Set(Deno.args);
const json = args.has("--json");
const quick = args.has("--quick");
const withPeer = !args.has("--no-peer");
const onlyAt = Deno.args.indexOf("--only");
const only = onlyAt >= 0 ? Deno.args[onlyAt + 1] : undefined;
/** Instead of timing the training steps, print their device time per kernel (engine/webgpu/profiler.ts). */
const profiling = args.has("--profile");
/** The peer library (bench/peer_tfjs.ts, imported only when it is measured). */
const PEER = "tfjs-webgpu";
const timing: TimingOptions = quick ? { minMs: 100, repeats: 3 } : { minMs: 300, repeats: 5 };

const device = await Device.create({ profile: profiling });
// Figures on this 2-core machine move with its load (groupNorm: 7.9 GB/s at load 2.5, 5.8 at 5.3), so the load
// average is printed beside them (stderr in --json mode).
const loadAverage = () => Deno.loadavg().map((v) => v.toFixed(2)).join(" ");
const loadAtStart = loadAverage();
const records: BenchRecord[] = [];
const log = (s: string) => json || console.error(s);

const sync = async () => {
  const probe = tensor([0], [1]);
  await probe.toArray();
  probe.dispose();
};

/** Forces every tensor in a result to be computed: elementwise results are lazy and would otherwise be skipped. */
function realize(v: unknown) {
  if (v instanceof Tensor) v.realize();
  else if (Array.isArray(v)) v.forEach(realize);
}

/** Our op as a workload: each step computes `f`'s result and frees its tensors. */
const ours = (f: () => unknown): Workload => ({ step: () => scope(() => realize(f())), sync });

/** Timing of `f` per call (see harness.ts). */
const timeOurs = (f: () => unknown) => timePerIteration(ours(f).step, sync, timing);

/**
 * Timings of `f` and of the peer's workload for the same op, in alternating repeats; the peer's is undefined
 * with --no-peer or when the peer fails (the failure is logged).
 */
async function timeWithPeer(
  f: () => unknown,
  peerWorkload: () => Promise<PeerWorkload>,
): Promise<[Timing, Timing | undefined]> {
  let p: PeerWorkload | undefined;
  try {
    if (withPeer) p = await peerWorkload();
  } catch (e) {
    log(`peer failed: ${(e as Error).message}`);
  }
  if (!p) return [await timeOurs(f), undefined];
  try {
    const [t, tp] = await timeInterleaved([ours(f), p], timing);
    return [t, tp];
  } finally {
    p.dispose();
  }
}

function report(
  name: string,
  unit: BenchRecord["unit"],
  work: number,
  { ms, cpuMs }: Timing,
  peerTiming?: Timing,
  note?: string,
  peer = PEER,
  extra: Partial<BenchRecord> = {},
) {
  const value = work / ms / 1e6;
  const r: BenchRecord = { name, unit, value };
  // The same work per CPU-second of this process (see Timing): steadier than wall time under load.
  const perCpu = work / cpuMs / 1e6;
  if (Number.isFinite(perCpu)) {
    const rate = `${perCpu.toFixed(perCpu < 10 ? 2 : 1)} ${unit.replace("/s", "")} per CPU-second`;
    note = note ? `${note}; ${rate}` : rate;
  }
  if (peerTiming !== undefined) {
    r.peer = peer;
    r.peer_value = work / peerTiming.ms / 1e6;
    r.ratio = r.value / r.peer_value;
  }
  if (note) r.note = note;
  Object.assign(r, extra);
  records.push(r);
  if (json) console.log(JSON.stringify(r));
  else {
    const ratio = r.ratio ? ` (${r.ratio.toFixed(r.ratio < 1 ? 2 : 1)}× ${r.peer})` : "";
    log(`${name}: ${value.toFixed(2)} ${unit}${ratio}`);
  }
}

const want = (name: string) => !only || name.includes(only);
const tf = withPeer ? await import("./peer_tfjs.ts") : null;

// --- matmul -------------------------------------------------------------------------------------------------------
for (const n of quick ? [256, 512] : [256, 512, 1024]) {
  const name = `matmul ${n}³`;
  if (!want(name)) continue;
  const a = randn([n, n]), b = randn([n, n]);
  const [t, tp] = await timeWithPeer(() => matmul(a, b), () => tf!.tfMatmul(n));
  report(name, "GFLOP/s", 2 * n ** 3, t, tp);
  a.dispose();
  b.dispose();
}

// --- conv2d: batch 8, 32×32, 64→64, 3×3, padding 1 ----------------------------------------------------------------
// The operands do not change between iterations, so on llvmpipe their texture copies are made once and kept
// (engine/device.ts), as a training step's weight gradient reuses the forward's; a step still packs each new
// activation and weight once, which the train-step figure includes. The same holds for groupNorm and softmax.
const PACKED_ONCE = "operands' texture packing cached across iterations";
{
  const [N, C, H, W, Co, k] = [8, 64, 32, 32, 64, 3];
  const flops = 2 * N * Co * H * W * C * k * k;
  const x = randn([N, C, H, W]), w = randn([Co, C, k, k]);
  if (want("conv2d forward")) {
    const [t, tp] = await timeWithPeer(
      () => conv2d(x, w, null, { padding: 1 }),
      () => tf!.tfConv2d(N, C, H, W, Co, k),
    );
    report("conv2d forward", "GFLOP/s", flops, t, tp, PACKED_ONCE);
  }
  const g = randn([N, Co, H, W]);
  /** Times one gradient of conv2d alone: the tape node's VJP with only `wrt` requiring grad. */
  const convGrad = async (wrt: "x" | "w") => {
    x.requiresGrad = wrt === "x";
    w.requiresGrad = wrt === "w";
    const y = conv2d(x, w, null, { padding: 1 });
    const node = y.node!;
    const t = await timeOurs(() => node.vjp(g));
    y.dispose();
    x.requiresGrad = w.requiresGrad = false;
    return t;
  };
  if (want("conv2d input-grad")) {
    report("conv2d input-grad", "GFLOP/s", flops, await convGrad("x"), undefined, PACKED_ONCE);
  }
  if (want("conv2d weight-grad")) {
    report("conv2d weight-grad", "GFLOP/s", flops, await convGrad("w"), undefined, PACKED_ONCE);
  }
  [x, w, g].forEach((t) => t.dispose());
}

// --- groupNorm forward + backward ---------------------------------------------------------------------------------
if (want("groupNorm")) {
  const shape = [8, 64, 32, 32];
  const n = shape.reduce((p, q) => p * q, 1);
  const x = randn(shape, { requiresGrad: true }), g = randn(shape);
  const wt = randn([64], { requiresGrad: true }), bs = randn([64], { requiresGrad: true });
  const t = await timeOurs(() => {
    const y = groupNorm(x, 32, wt, bs);
    return y.node!.vjp(g);
  });
  // Effective traffic: forward reads x and writes y; backward reads x and g and writes dx (5 tensors).
  report(
    "groupNorm fwd+bwd [8,64,32,32] G=32",
    "GB/s",
    5 * 4 * n,
    t,
    undefined,
    `bytes = 5·numel·4; ${PACKED_ONCE}`,
  );
  [x, g, wt, bs].forEach((t) => t.dispose());
}

// --- softmax forward + backward over the last dim (attention's rows) -----------------------------------------------
if (want("softmax")) {
  const shape = [4096, 256];
  const n = shape[0] * shape[1];
  const x = randn(shape, { requiresGrad: true }), g = randn(shape);
  const t = await timeOurs(() => softmax(x, -1).node!.vjp(g));
  // Forward reads x and writes y; backward reads y and g and writes dx.
  report(
    "softmax fwd+bwd [4096,256] dim -1",
    "GB/s",
    5 * 4 * n,
    t,
    undefined,
    `bytes = 5·numel·4; ${PACKED_ONCE}`,
  );
  [x, g].forEach((t) => t.dispose());
}

// --- elementwise chains -------------------------------------------------------------------------------------------
if (want("elementwise")) {
  // EDM preconditioning output D = c_skip·x + c_out·F with per-sample coefficients, and a ResBlock's
  // silu(h·(1+scale) + shift): the chains the engine should fuse.
  const shape = [8, 64, 32, 32];
  const n = shape.reduce((p, q) => p * q, 1);
  const x = randn(shape), F = randn(shape);
  const cSkip = randn([8, 1, 1, 1]), cOut = randn([8, 1, 1, 1]);
  const scale = randn([8, 64, 1, 1]), shift = randn([8, 64, 1, 1]);
  const ms1 = await timeOurs(() => add(mul(cSkip, x), mul(cOut, F)));
  report(
    "elementwise EDM c_skip·x + c_out·F",
    "GB/s",
    3 * 4 * n,
    ms1,
    undefined,
    "bytes = (2 in + 1 out)·numel·4",
  );
  const ms2 = await timeOurs(() => silu(add(mul(x, add(scale, 1)), shift)));
  report(
    "elementwise silu(h·(1+scale)+shift)",
    "GB/s",
    2 * 4 * n,
    ms2,
    undefined,
    "bytes = (1 in + 1 out)·numel·4",
  );
  [x, F, cSkip, cOut, scale, shift].forEach((t: Tensor) => t.dispose());
}

// --- training steps against PyTorch CPU ------------------------------------------------------------------------
// Two workloads, each timed in alternating repeats with the same step written in PyTorch (bench/peer_torch.py):
// the default training configuration (models/train.ts DEFAULT_NETWORK through the Trainer: data, lr ramp-up,
// EDM loss, Adam, EMA) and a small DDPM++-style UNet at 32×32 (EDM loss and Adam). Besides images/s, a step's
// dispatches and submits (device counters), the host time spent recording it against its wall time, and the
// peak resident memory of both processes (ours is the whole bench process so far: run with --only train for
// the training figures alone). PyTorch runs 2 intra-op threads unless --torch-threads says otherwise; on this
// shared machine under load (load average 16) its 2 OpenMP threads wait on each other and a step took 15× the
// wall time of 1 thread, spinning, so compare with --torch-threads 1 there, or per CPU-second.

/** Per-step device counters and the host/wall split of `n` steps of `step` (one sync at the end). */
async function stepProfile(step: () => void, stepSync: () => Promise<void>, n: number) {
  step(); // pipelines compiled, pools filled
  await stepSync();
  const c0 = device.counters();
  let host = 0;
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const h0 = performance.now();
    step();
    host += performance.now() - h0;
  }
  const hostDone = device.counters();
  await stepSync();
  const wall = performance.now() - t0;
  // Host time in the steps is recording (encoding kernels) plus submitting, which on lavapipe waits while the
  // previous batch runs (engine/webgpu/backend.ts `stats`); the rest of the wall time is waiting for the device
  // at the sync.
  const submitMs = hostDone.submitMs - c0.submitMs;
  return {
    dispatches: (hostDone.dispatches - c0.dispatches) / n,
    submits: (hostDone.submits - c0.submits) / n,
    reads: (hostDone.reads - c0.reads) / n,
    // Bind groups the step had to create (the rest were found in the backend's cache).
    bindGroups: ((hostDone.bindGroups ?? 0) - (c0.bindGroups ?? 0)) / n,
    // Texture inputs filled by a packing pass (the rest were flat copies or kept textures).
    packs: ((hostDone.packs ?? 0) - (c0.packs ?? 0)) / n,
    encodeMs: (host - submitMs) / n,
    submitMs: submitMs / n,
    wallMs: wall / n,
  };
}

const wantTrain = want("train default") || want("train step");
const torchPython = withPeer && wantTrain ? await torchAvailable() : null;
const torchThreadsAt = Deno.args.indexOf("--torch-threads");
/** PyTorch's intra-op threads (default 2, this machine's cores). */
const torchThreads = torchThreadsAt >= 0 ? Number(Deno.args[torchThreadsAt + 1]) : 2;
// One line on stderr, in --json mode too: the training figures then have no peer fields.
if (torchPython && "skipped" in torchPython) console.error(`PyTorch peer skipped: ${torchPython.skipped}`);

/**
 * Times a training step of ours (`step` records one without waiting, `stepSync` waits for them) against the
 * PyTorch peer of `peerWorkload`, and reports images/s, the ratio, parameters, memory and the step profile.
 */
async function trainFigure(
  name: string,
  B: number,
  params: number,
  step: () => void,
  stepSync: () => Promise<void>,
  peerWorkload: TorchTrainWorkload,
) {
  if (profiling) return await printStepProfile(name, step, stepSync);
  const opts = { ...timing, minMs: quick ? 500 : 2000, repeats: quick ? 3 : 5 };
  let peer: TorchPeer | undefined;
  if (torchPython && "python" in torchPython) {
    try {
      peer = await torchTrainStep(torchPython.python, { threads: torchThreads, ...peerWorkload });
      if (peer.params !== params) {
        throw new Error(`the PyTorch network has ${peer.params} parameters, ours ${params}: not compared`);
      }
    } catch (e) {
      log(`PyTorch peer failed on ${name}: ${(e as Error).message}`);
      await peer?.dispose();
      peer = undefined;
    }
  }
  const load = Deno.loadavg()[0];
  let t: Timing, tp: Timing | undefined;
  try {
    [t, tp] = peer
      ? await timeInterleaved([{ step, sync: stepSync }, peer], opts)
      : [await timePerIteration(step, stepSync, opts), undefined];
  } finally {
    await peer?.dispose();
  }
  // After the timed steps, so that the counts are of warmed-up steps: the first steps create most of the bind
  // groups (the bench step: about 500, then 225, 110, … until its allocations find the same pooled buffers).
  const profile = await stepProfile(step, stepSync, 3);
  const r: Partial<BenchRecord> = {
    params,
    rss_peak_mib: ownRssPeakMiB(),
    dispatches_per_step: profile.dispatches,
    submits_per_step: profile.submits,
    bind_groups_per_step: profile.bindGroups,
    packs_per_step: profile.packs,
    encode_ms_per_step: profile.encodeMs,
    submit_ms_per_step: profile.submitMs,
    wall_ms_per_step: profile.wallMs,
    load,
  };
  const facts = [
    `${params} params${peer ? ` (PyTorch ${peer.params})` : ""}`,
    `${profile.dispatches.toFixed(0)} dispatches, ${profile.submits.toFixed(1)} submits, ` +
    `${profile.reads.toFixed(1)} host syncs, ${profile.packs.toFixed(0)} packing passes, ` +
    `${profile.bindGroups.toFixed(0)} new bind groups per step`,
    `per step of ${profile.wallMs.toFixed(0)} ms: host encoding ${profile.encodeMs.toFixed(1)} ms, ` +
    `in submits ${profile.submitMs.toFixed(1)} ms, waiting at the sync ` +
    `${(profile.wallMs - profile.encodeMs - profile.submitMs).toFixed(1)} ms`,
  ];
  if (peer) {
    r.peer_params = peer.params;
    r.peer_rss_peak_mib = peer.rssPeakMiB();
    facts.push(
      `peak RSS ours ${r.rss_peak_mib?.toFixed(0)} MiB, PyTorch ${peer.torchVersion} ` +
        `${r.peer_rss_peak_mib.toFixed(0)} MiB`,
    );
  }
  if (tp) {
    // Images per CPU-second of each process: the load-robust comparison (see peer_torch.ts).
    r.ratio_per_cpu = tp.cpuMs / t.cpuMs;
    facts.push(
      `per CPU-second ${r.ratio_per_cpu.toFixed(2)}× PyTorch (${(B * 1e3 / tp.cpuMs).toFixed(1)} img)`,
    );
  }
  facts.push(`load ${load.toFixed(1)}`);
  report(name, "img/s", B * 1e9, t, tp, facts.join("; "), peer ? "pytorch-cpu" : undefined, r);
}

/** --profile: device time per kernel over a few steps (after a warm-up step), per step. */
async function printStepProfile(name: string, step: () => void, stepSync: () => Promise<void>) {
  const steps = 3;
  step();
  await stepSync();
  await device.profile();
  for (let i = 0; i < steps; i++) step();
  await stepSync();
  const p = await device.profile();
  if (!p) {
    console.error(`${name}: no profile (the adapter has no timestamp queries)`);
    return;
  }
  const rows = (title: string, rs: typeof p.kernels, n: number) => {
    console.log(`\n${title}`);
    for (const r of rs.slice(0, n)) {
      const share = (100 * r.ms / p.passMs).toFixed(1).padStart(5);
      console.log(
        `${(r.ms / steps).toFixed(2).padStart(8)} ms ${share}% ${
          (r.count / steps).toFixed(0).padStart(4)
        }×  ${r.label}`,
      );
    }
  };
  if (device.info.isCpuEmulated) {
    // Measured on llvmpipe: the weight gradient of conv N32 C32 16×16 showed 0.11 ms per dispatch here against
    // 4.5 ms by wall clock (bench-style timing of its VJP alone), and total pass time moved with the batch size.
    console.log(
      "warning: on this CPU-emulated adapter timestamps do not follow the dispatches (compute runs " +
        "asynchronously to them); read the shares as rough at best, and time kernels by wall clock instead",
    );
  }
  console.log(
    `\n${name}: per step ${(p.passMs / steps).toFixed(1)} ms in timed passes, ` +
      `${(p.spanMs / steps).toFixed(1)} ms from first to last pass of each submit (one pass per dispatch)`,
  );
  rows("per kernel (ms per step, share, dispatches per step)", p.kernels, 30);
  rows("per kernel and parameters", p.shapes, Number(Deno.env.get("PROFILE_ROWS") ?? 40));
}

if (want("train default")) {
  const { DEFAULT_NETWORK } = await import("../models/train.ts");
  const { parseTrainerConfig, Trainer } = await import("../models/trainer.ts");
  const cfg = parseTrainerConfig({ network: DEFAULT_NETWORK });
  const trainer = await Trainer.create(cfg, device);
  // The trainer's own sync: the loss readback of the steps since the last one (what `run()` does per log).
  const stepSync = async () => void await trainer.flushLog();
  await trainFigure(
    `train default ${cfg.network.imgResolution}×${cfg.network.imgResolution} (B=${cfg.batch}, ` +
      `fwd+bwd+Adam+EMA)`,
    cfg.batch,
    trainer.network.parameterCount(),
    () => trainer.step(),
    stepSync,
    {
      spec: cfg.network,
      batch: cfg.batch,
      adam: { lr: cfg.lr, betas: cfg.betas, eps: cfg.eps, rampupImg: cfg.lrRampupKimg * 1000 },
      ema: { halfLifeImg: cfg.emaHalfLifeKimg * 1000, rampupRatio: cfg.emaRampupRatio },
      sigmaData: cfg.sigmaData,
      pMean: cfg.pMean,
      pStd: cfg.pStd,
    },
  );
  trainer.dispose();
}

if (want("train step")) {
  const { UNet } = await import("../models/unet.ts");
  const { EDMPrecond, edmLoss } = await import("../models/edm.ts");
  // A small DDPM++-style UNet: 32 → 64 channels over 32, 16, 8; attention at 8×8; one block per level.
  const unet = new UNet({
    imgResolution: 32,
    inChannels: 3,
    outChannels: 3,
    modelChannels: 32,
    channelMult: [1, 2, 2],
    numBlocks: 1,
    attnResolutions: [8],
    dropout: 0,
  });
  const precond = new EDMPrecond(unet);
  const params = unet.parameters();
  const opt = new optim.Adam(params, { lr: 1e-4 });
  const B = 8;
  const images = randn([B, 3, 32, 32]);
  const step = () =>
    scope(() => {
      edmLoss(precond, images).loss.backward();
      opt.step();
      opt.zeroGrad();
    });
  await trainFigure(
    "train step UNet 32×32 (B=8, fwd+bwd+Adam)",
    B,
    unet.parameterCount(),
    step,
    sync,
    {
      spec: unet.spec,
      batch: B,
      adam: { lr: 1e-4, betas: [0.9, 0.999], eps: 1e-8 },
      ema: null,
      sigmaData: 0.5,
      pMean: -1.2,
      pStd: 1.2,
    },
  );
  opt.dispose();
  unet.dispose();
  images.dispose();
}

if (!json) printTable(records);
const c = device.counters();
log(
  `device: ${device.info.adapter} via ${device.info.api}; ${c.dispatches} dispatches, ${c.submits} submits`,
);
// The host's processor beside the figures: sessions run on different machines (an Intel Xeon and an AMD EPYC so
// far, both 2 cores), and PyTorch's oneDNN and llvmpipe move differently between them.
const hostCpus = cpus();
console.error(`host: ${hostCpus[0]?.model ?? "unknown processor"}, ${hostCpus.length} CPUs`);
console.error(`load average (1, 5, 15 min): ${loadAtStart} at start, ${loadAverage()} at end`);
Deno.exit(0); // tfjs keeps its own device alive
