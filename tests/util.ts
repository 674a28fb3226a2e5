/**
 * @file Shared test helpers: the devices under test, closeness assertions that report where and by how much
 * values differ, seeded random data, fast-check arbitraries for shapes and values, and a finite-difference
 * gradient check in float64 on the CPU reference backend.
 */

import fc from "fast-check";
import type { UNetSpecInput } from "../models/unet.ts";
import type { TrainConfigInput } from "../models/train.ts";
import type { Trial } from "../search/types.ts";
import { Rng } from "../util/random.ts";
import { Device } from "../engine/device.ts";
import { DRIVER_HINT, findAdapter } from "../engine/webgpu/adapter.ts";
import type { FloatArray, Kernel } from "../kernels/types.ts";
import type { QuadLayout } from "../kernels/layout.ts";
import "../engine/autograd.ts";
import { tensor } from "../engine/creation.ts";
import { noGrad, type Tensor } from "../engine/tensor.ts";
import { cat, reshape } from "../engine/ops/shape.ts";

let gpu: Promise<Device> | null = null;
let cpu32: Promise<Device> | null = null;
let cpu64: Promise<Device> | null = null;

/**
 * Why WebGPU tests cannot run in this process (no adapter: no driver installed, or the forced native API has
 * none), or null. Probed once at module load, so that `gpuTest` can register its tests as ignored, with the
 * reason in their names, rather than let them fail.
 */
export const NO_WEBGPU: string | null = await (async () => {
  const found = await findAdapter();
  return found.adapter ? null : `no WebGPU adapter: ${found.why}; ${DRIVER_HINT}`;
})();

/**
 * The WebGPU device (created once per test process). Never the CPU fallback: a test that reaches it with no
 * adapter was not registered with `gpuTest`, and fails saying so.
 */
export function gpuDevice(): Promise<Device> {
  return (gpu ??= Device.create({ backend: "webgpu", fallback: false }));
}
let gpuSmall: Promise<Device> | null = null;
/** A WebGPU device that plans grids as if only 16 workgroups fit per dimension: every kernel takes its 2-D path. */
export function smallGridDevice(): Promise<Device> {
  return (gpuSmall ??= Device.create({ backend: "webgpu", fallback: false, maxWorkgroupsPerDimension: 16 }));
}

/**
 * Why the texture-input tests cannot run here (no adapter, or one whose compute shaders cannot read rgba32float
 * storage textures), or null. Creates the WebGPU device, so files that need it await it at load.
 */
export async function noTextureInputs(): Promise<string | null> {
  if (NO_WEBGPU) return NO_WEBGPU;
  const { info } = await gpuDevice();
  return info.textureInputs ? null : `${info.adapter} through ${info.api} has no texture inputs`;
}

/** CPU reference backend in float32. */
export function cpuDevice(): Promise<Device> {
  return (cpu32 ??= Device.create({ backend: "cpu" }));
}
/** CPU reference backend in float64, for gradient checks. */
export function f64Device(): Promise<Device> {
  return (cpu64 ??= Device.create({ backend: "cpu", precision: "float64" }));
}

/** Runs per-property counts: CI's FC_RUNS overrides the default. */
export const RUNS = Number(Deno.env.get("FC_RUNS") ?? 25);

/** A deterministic stream of uniform values in [lo, hi) (mulberry32, the data generator's `Rng`). */
export function uniformStream(seed: number, lo = 0, hi = 1): () => number {
  const rng = new Rng(seed);
  return () => lo + rng.next() * (hi - lo);
}

/** Deterministic pseudo-random values in [lo, hi) (mulberry32). */
export function seededValues(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  return Float32Array.from({ length: n }, uniformStream(seed, lo, hi));
}

/**
 * Asserts |got − want| ≤ atol + rtol·|want| elementwise (NaN matches NaN, ±Inf must match exactly); `atol` is one
 * number or one per element. The error names the first bad index, both values, and how many elements failed.
 */
export function assertClose(
  got: ArrayLike<number>,
  want: ArrayLike<number>,
  tol: { rtol?: number; atol?: number | ArrayLike<number> } = {},
  what = "values",
): void {
  const rtol = tol.rtol ?? 1e-5, atolOf = tol.atol ?? 1e-6;
  const atol = typeof atolOf === "number" ? () => atolOf : (i: number) => atolOf[i];
  if (got.length !== want.length) throw new Error(`${what}: length ${got.length}, expected ${want.length}`);
  let bad = 0, first = -1, worst = 0;
  for (let i = 0; i < got.length; i++) {
    const g = got[i], w = want[i];
    let ok: boolean;
    if (Number.isNaN(w)) ok = Number.isNaN(g);
    else if (!Number.isFinite(w)) ok = g === w;
    else ok = Math.abs(g - w) <= atol(i) + rtol * Math.abs(w);
    if (!ok) {
      bad++;
      if (first < 0) first = i;
      worst = Math.max(worst, Math.abs(g - w));
    }
  }
  if (bad) {
    throw new Error(
      `${what}: ${bad}/${got.length} elements differ (rtol ${rtol}, atol ${
        atol(first)
      }); first at [${first}]: got ${got[first]}, expected ${want[first]}; largest |diff| ${worst}`,
    );
  }
}

/** fast-check arbitrary for a shape of rank in [minRank, maxRank] with dims in [1, maxDim] (1s and primes likely). */
export function shapeArb(minRank = 1, maxRank = 4, maxDim = 9): fc.Arbitrary<number[]> {
  const dim = fc.oneof(
    fc.constant(1),
    fc.integer({ min: 1, max: maxDim }),
    fc.constantFrom(2, 3, 5, 7, 13, 17),
  );
  return fc.array(dim, { minLength: minRank, maxLength: maxRank });
}

/** A seed arbitrary to derive input values from. */
export const seedArb: fc.Arbitrary<number> = fc.integer({ min: 0, max: 2 ** 31 - 1 });

/** Value scales the properties mix in: ordinary, tiny and large magnitudes. */
export const scaleArb: fc.Arbitrary<number> = fc.constantFrom(1, 1e-3, 30);

export interface GradCheckInput {
  shape: number[];
  data: ArrayLike<number>;
}

/**
 * Compares the engine's vector-Jacobian product of `f` with central finite differences of
 * `sum(f(x) · cotangent)`, everything in float64 on the CPU reference backend. Keep inputs small: it evaluates
 * `f` twice per input element.
 */
export async function gradCheck(
  f: (...xs: Tensor[]) => Tensor,
  inputs: GradCheckInput[],
  opts: { eps?: number; rtol?: number; atol?: number; seed?: number; wrt?: number[] } = {},
): Promise<void> {
  const device = await f64Device();
  const eps = opts.eps ?? 1e-6, rtol = opts.rtol ?? 1e-5, atol = opts.atol ?? 1e-7;
  const wrt = opts.wrt ?? inputs.map((_, i) => i);
  const xs = inputs.map((x, i) => tensor(x.data, x.shape, { device, requiresGrad: wrt.includes(i) }));
  const out = f(...xs);
  const cotData = seededValues(out.size, opts.seed ?? 7);
  const cot = tensor(cotData, out.shape, { device });
  out.backward(cot);
  const objective = async (vals: ArrayLike<number>[]) => {
    const ts = vals.map((v, i) => tensor(v, inputs[i].shape, { device }));
    const y = noGrad(() => f(...ts));
    const yv = await y.toFloat64Array();
    let s = 0;
    for (let i = 0; i < yv.length; i++) s += yv[i] * cotData[i];
    y.dispose();
    ts.forEach((t) => t.dispose());
    return s;
  };
  for (const i of wrt) {
    const grad = xs[i].grad;
    if (!grad) throw new Error(`gradCheck: input ${i} received no gradient`);
    const analytic = await grad.toFloat64Array();
    const numeric = new Float64Array(analytic.length);
    const base = inputs.map((x) => Float64Array.from(x.data));
    for (let j = 0; j < numeric.length; j++) {
      const plus = base.map((b) => b.slice()), minus = base.map((b) => b.slice());
      plus[i][j] += eps;
      minus[i][j] -= eps;
      numeric[j] = ((await objective(plus)) - (await objective(minus))) / (2 * eps);
    }
    assertClose(analytic, numeric, { rtol, atol }, `gradient of input ${i}`);
  }
  xs.forEach((x) => {
    x.grad?.dispose();
    x.dispose();
  });
  out.dispose();
  cot.dispose();
}

/** Reads a tensor on any device as float64 values. */
export function values(t: Tensor): Promise<Float64Array> {
  return t.toFloat64Array();
}

/** Deno.test with resource sanitizers off: the WebGPU device deliberately outlives each test. */
export function test(name: string, fn: () => Promise<void> | void): void {
  Deno.test({ name, fn, sanitizeResources: false, sanitizeOps: false });
}

/**
 * A test that needs the WebGPU device: where there is no adapter (or `skipBecause` gives another reason) it is
 * registered as ignored, and its name says why.
 */
export function gpuTest(name: string, fn: () => Promise<void> | void, skipBecause?: string | null): void {
  const why = NO_WEBGPU ?? skipBecause;
  if (!why) return test(name, fn);
  Deno.test({ name: `${name} [skipped: ${why}]`, ignore: true, fn });
}

/** Every tensor's values with one readback (a sync costs ~11 ms whatever its size). */
export async function readAll(ts: Tensor[]): Promise<Float32Array[]> {
  const flat = noGrad(() => cat(ts.map((t) => reshape(t, [t.size])), 0));
  const all = await flat.toArray();
  flat.dispose();
  let at = 0;
  return ts.map((t) => all.subarray(at, at += t.size));
}

/** Runs `fn`, which must throw an Error whose message contains every one of `parts`; returns the error. */
export function assertThrows(fn: () => unknown, ...parts: string[]): Error {
  let err: unknown = undefined, threw = false;
  try {
    fn();
  } catch (e) {
    err = e;
    threw = true;
  }
  return checkError(threw, err, parts);
}

/** The async form of `assertThrows` (also catches a synchronous throw). */
export async function assertRejects(fn: () => unknown, ...parts: string[]): Promise<Error> {
  let err: unknown = undefined, threw = false;
  try {
    await fn();
  } catch (e) {
    err = e;
    threw = true;
  }
  return checkError(threw, err, parts);
}

function checkError(threw: boolean, err: unknown, parts: string[]): Error {
  const want = parts.length ? `an error containing ${parts.map((p) => `"${p}"`).join(", ")}` : "an error";
  if (!threw) throw new Error(`expected ${want}, but nothing was thrown`);
  if (!(err instanceof Error)) throw new Error(`expected ${want}, got ${String(err)}`);
  for (const p of parts) {
    if (!err.message.includes(p)) throw new Error(`expected ${want}, got "${err.message}"`);
  }
  return err;
}

/** Deep equality by JSON form, for shapes and small integer arrays. */
export function assertEquals(got: unknown, want: unknown, what = "value"): void {
  const g = JSON.stringify(got), w = JSON.stringify(want);
  if (g !== w) throw new Error(`${what}: got ${g}, expected ${w}`);
}

/** A micro DDPM++-style UNet for 8×8 RGB (49 k parameters): the network of the training and evaluation tests. */
export const MICRO_UNET: UNetSpecInput = Object.freeze({
  imgResolution: 8,
  inChannels: 3,
  outChannels: 3,
  modelChannels: 8,
  channelMult: [1, 2],
  numBlocks: 1,
  attnResolutions: [4],
  numHeads: 1,
  dropout: 0,
});

/** Training settings of the micro runs: 8×8 procedural images, 4-image batches, no sample grids. */
export const MICRO_TRAINING: TrainConfigInput = Object.freeze({
  network: MICRO_UNET,
  data: { kind: "procedural" as const, resolution: 8, length: 64 },
  batch: 4,
  lr: 2e-3,
  lrRampupKimg: 0.008,
  emaHalfLifeKimg: 0.02,
  logEvery: 4,
  sampleCount: 0,
});

/** Elements of a shape. */
export const size = (s: readonly number[]): number => s.reduce((a, b) => a * b, 1);

/**
 * `f` of one input [shape] holding `x`, then backward with a seeded cotangent: the output's shape, its values y
 * and the input gradient dx, read back in float64 (every tensor made here is freed).
 */
export async function valueAndGrad(
  device: Device,
  f: (x: Tensor) => Tensor,
  shape: number[],
  x: ArrayLike<number>,
  seed: number,
): Promise<{ shape: readonly number[]; y: Float64Array; dx: Float64Array }> {
  const xt = tensor(x, shape, { device, requiresGrad: true });
  const y = f(xt);
  const c = tensor(seededValues(y.size, seed), y.shape, { device });
  y.backward(c);
  const res = { shape: y.shape, y: await y.toFloat64Array(), dx: await xt.grad!.toFloat64Array() };
  for (const t of [xt, y, c, xt.grad]) t?.dispose();
  return res;
}

/**
 * `f` on seeded inputs of `shapes` (requiring grad) on `device`, then backward with a seeded cotangent: the
 * output's shape and values and every input's gradient, read back in float64.
 */
export async function opAndGrads(
  device: Device,
  f: (...t: Tensor[]) => Tensor,
  shapes: number[][],
  seed: number,
): Promise<{ shape: readonly number[]; out: Float64Array; grads: Float64Array[] }> {
  const xs = shapes.map((s, i) => tensor(seededValues(size(s), seed + i), s, { device, requiresGrad: true }));
  const y = f(...xs);
  const cot = tensor(seededValues(y.size, seed + 99), y.shape, { device });
  const out = await values(y);
  y.backward(cot);
  const grads = [];
  for (const x of xs) grads.push(await values(x.grad!));
  return { shape: y.shape, out, grads };
}

/**
 * Asserts that `f` gives the same output shape, values (rtol = atol = 1e-4) and input gradients (rtol 1e-4,
 * atol `gradAtol`) on device `a` as on device `b` (`opAndGrads` on each).
 */
export async function assertBackendsAgree(
  [a, b]: [Device, Device],
  f: (...t: Tensor[]) => Tensor,
  shapes: number[][],
  seed: number,
  what: string,
  gradAtol = 1e-4,
): Promise<void> {
  const got = await opAndGrads(a, f, shapes, seed), want = await opAndGrads(b, f, shapes, seed);
  assertEquals(got.shape, want.shape, what);
  assertClose(got.out, want.out, { rtol: 1e-4, atol: 1e-4 }, what);
  got.grads.forEach((g, i) =>
    assertClose(g, want.grads[i], { rtol: 1e-4, atol: gradAtol }, `${what} grad ${i}`)
  );
}

/**
 * A layout of a tensor of some shape inside a buffer, for kernel tests: dims laid out outermost-first in `perm`
 * order, each padded by `pad[d]` elements, broadcast dims (stride 0) taking no room, starting at `offset`.
 */
export interface BufferLayout {
  perm: readonly number[];
  pad: readonly number[];
  broadcast: readonly boolean[];
  offset?: number;
}

/** Element strides of `layout` for `shape`, and the buffer size they need. */
export function layoutStrides(
  shape: readonly number[],
  l: BufferLayout,
): { strides: number[]; elements: number } {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let k = shape.length - 1; k >= 0; k--) {
    const d = l.perm[k];
    s[d] = l.broadcast[d] ? 0 : acc;
    acc *= l.broadcast[d] ? 1 : shape[d] + l.pad[d];
  }
  return { strides: s, elements: (l.offset ?? 0) + acc };
}

/**
 * Runs one kernel on fresh device buffers and reads its outputs back. Each input buffer holds the given values;
 * each output is either a size (a buffer as the pool hands it out) or values to start from (NaN to show an
 * element the kernel never writes, or contents a partial write must keep).
 */
export async function runOnBuffers<P>(
  device: Device,
  kernel: Kernel<P>,
  params: P,
  inputs: readonly ArrayLike<number>[],
  outputs: readonly (number | ArrayLike<number>)[],
): Promise<FloatArray[]> {
  const upload = (data: ArrayLike<number>) => {
    const s = device.alloc(data.length);
    device.write(s, data);
    return s;
  };
  const ins = inputs.map(upload),
    outs = outputs.map((o) => (typeof o === "number" ? device.alloc(o) : upload(o)));
  device.run(kernel, params, ins, outs);
  const res: FloatArray[] = [];
  for (const o of outs) res.push(await device.read(o));
  for (const s of [...ins, ...outs]) device.release(s);
  return res;
}

/**
 * A stored search trial for tests of the search layer: done, with no scores or costs, created at `id`, key `k<id>`;
 * `over` replaces any field.
 */
export function fakeTrial(id: number, over: Partial<Trial> = {}): Trial {
  return {
    id,
    key: `k${id}`,
    spec: {},
    proposer: "test",
    prompt: null,
    rawReply: null,
    seed: id,
    status: "done",
    scores: {},
    costs: {},
    lossHistory: [],
    error: null,
    attempts: [],
    createdAt: id,
    heartbeatAt: null,
    parentId: null,
    ...over,
  };
}

/** Temporary folders made by `tempDir`, removed when the test file ends. */
const TEMP_DIRS: string[] = [];
globalThis.addEventListener("unload", () => {
  for (const d of TEMP_DIRS) Deno.removeSync(d, { recursive: true });
});

/** A new temporary folder, removed when the test file ends. */
export async function tempDir(prefix: string): Promise<string> {
  const d = await Deno.makeTempDir({ prefix });
  TEMP_DIRS.push(d);
  return d;
}

/** Borders and extra padding of a padded channel-quad layout (kernels/layout.ts), for kernel properties. */
export const quadPaddingArb = fc.record({
  top: fc.integer({ min: 0, max: 2 }),
  left: fc.integer({ min: 0, max: 2 }),
  extraH: fc.integer({ min: 0, max: 2 }),
  extraW: fc.integer({ min: 0, max: 3 }),
});

/** The quad layout of an [N, C, H, W] activation with that padding. */
export function quadLayoutWith(
  [N, C, H, W]: readonly number[],
  pad: { top: number; left: number; extraH: number; extraW: number },
): QuadLayout {
  const { top, left } = pad;
  return { N, C, H, W, top, left, Hp: top + H + pad.extraH, Wp: left + W + pad.extraW };
}
