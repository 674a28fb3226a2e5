/**
 * @file `deno task bench [--json] [--quick] [--no-peer] [--only NAME]`: the kernels that dominate a UNet
 * training step, as GFLOP/s (compute-bound) or GB/s (memory-bound), each the median of several timed repeats
 * (see harness.ts), with TensorFlow.js's WebGPU backend measured in the same run on matmul and conv, its
 * repeats alternating with ours.
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
import type { PeerWorkload } from "./peer_tfjs.ts";

const args = new Set(Deno.args);
const json = args.has("--json");
const quick = args.has("--quick");
const withPeer = !args.has("--no-peer");
const onlyAt = Deno.args.indexOf("--only");
const only = onlyAt >= 0 ? Deno.args[onlyAt + 1] : undefined;
/** The peer library (bench/peer_tfjs.ts, imported only when it is measured). */
const PEER = "tfjs-webgpu";
const timing: TimingOptions = quick ? { minMs: 100, repeats: 3 } : { minMs: 300, repeats: 5 };

const device = await Device.create();
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
    r.peer = PEER;
    r.peer_value = work / peerTiming.ms / 1e6;
    r.ratio = r.value / r.peer_value;
  }
  if (note) r.note = note;
  records.push(r);
  if (json) console.log(JSON.stringify(r));
  else log(`${name}: ${value.toFixed(2)} ${unit}${r.ratio ? ` (${r.ratio.toFixed(1)}× ${r.peer})` : ""}`);
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

// --- one training step of a small UNet at 32×32 ------------------------------------------------------------------
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
  // Host syncs the step itself makes: count device reads over steps with no harness sync in between.
  step();
  await sync();
  const readsBefore = device.counters().reads;
  for (let i = 0; i < 3; i++) step();
  const syncsPerStep = (device.counters().reads - readsBefore) / 3;
  const t = await timePerIteration(step, sync, {
    ...timing,
    minMs: quick ? 500 : 2000,
    repeats: quick ? 2 : 3,
  });
  report(
    "train step UNet 32×32 (B=8, fwd+bwd+Adam)",
    "img/s",
    B * 1e9,
    t,
    undefined,
    `${unet.parameterCount()} params; ${syncsPerStep} host syncs per step (a loop that logs the loss adds 1)`,
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
console.error(`load average (1, 5, 15 min): ${loadAtStart} at start, ${loadAverage()} at end`);
Deno.exit(0); // tfjs keeps its own device alive
