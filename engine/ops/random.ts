/**
 * @file Random tensors and dropout from the device's Philox4x32-10 generator (see `kernels/random.ts`).
 *
 * The generator state is `device.rng`: a key (the seed) and a 64-bit block counter. Every call takes the next
 * `ceil(n/4)` blocks and advances the counter past them, so consecutive calls give fresh numbers, and
 * `device.manualSeed(s)` (which also resets the counter) replays the same sequence. The numbers depend only on
 * (seed, counter, element index), never on the backend: the same seed gives bit-identical `rand` values and
 * `randn` values equal up to float32 rounding of Box–Muller on WebGPU and on the CPU reference.
 *
 * An explicit `seed` option uses key = seed from counter 0 and leaves the device generator untouched (a
 * reproducible side stream, like passing a fresh `torch.Generator`).
 */

import { random, type RandomDist } from "../../kernels/random.ts";
import { type Device, getDefaultDevice } from "../device.ts";
import { checkShape, record, type Shape, sizeOf, Tensor, type TensorOptions } from "../tensor.ts";
import { fmt } from "../shape.ts";
import { map, view } from "./core.ts";
import { cst } from "../../kernels/elementwise.ts";

export interface RandomOptions extends TensorOptions {
  /** Use this seed (from counter 0) instead of the device generator, which is then not advanced. */
  seed?: number;
}

const TWO_32 = 4294967296;

/** Splits a non-negative integer below 2^53 into (low, high) u32 words. */
function split64(v: number, what: string): [number, number] {
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new Error(`random: ${what} ${v} must be a non-negative integer below 2^53`);
  }
  return [v % TWO_32, Math.floor(v / TWO_32)];
}

/** The key and first counter for `n` elements, advancing the device generator unless a seed is given. */
function takeStream(device: Device, n: number, seed?: number) {
  const blocks = Math.ceil(n / 4);
  if (seed !== undefined) {
    return { key: split64(seed, "seed"), counter: [0, 0, 0, 0] as [number, number, number, number] };
  }
  const key = split64(device.rng.seed, "device seed");
  const [c0, c1] = split64(device.rng.counter, "device counter");
  device.rng.counter += blocks;
  return { key, counter: [c0, c1, 0, 0] as [number, number, number, number] };
}

function fill(
  op: string,
  dist: RandomDist,
  shape: Shape,
  args: [number, number],
  opts: RandomOptions,
): Tensor {
  checkShape(shape, `${op}: shape`);
  const device = opts.device ?? getDefaultDevice();
  const n = sizeOf(shape);
  const out = Tensor.empty(shape, device);
  const { key, counter } = takeStream(device, n, opts.seed);
  device.run(random, { dist, n, key, counter, args }, [], [out.storage]);
  if (opts.requiresGrad) out.requiresGrad = true;
  return out;
}

/** Uniform values in [0, 1), like `torch.rand`. */
export function rand(shape: Shape, opts: RandomOptions = {}): Tensor {
  return fill("rand", "uniform", shape, [0, 1], opts);
}

/** Standard normal values, like `torch.randn`. */
export function randn(shape: Shape, opts: RandomOptions = {}): Tensor {
  return fill("randn", "normal", shape, [0, 1], opts);
}

/** Uniform values in [low, high) (one fused dispatch), like `torch.nn.init.uniform_` on a new tensor. */
export function randUniform(shape: Shape, low: number, high: number, opts: RandomOptions = {}): Tensor {
  if (!(high >= low)) throw new Error(`randUniform: high ${high} must be ≥ low ${low}`);
  return fill("randUniform", "uniform", shape, [low, high - low], opts);
}

/** Normal values with the given mean and standard deviation, like `torch.nn.init.normal_` on a new tensor. */
export function randNormal(shape: Shape, mean: number, std: number, opts: RandomOptions = {}): Tensor {
  if (!(std >= 0)) throw new Error(`randNormal: std ${std} must be ≥ 0`);
  return fill("randNormal", "normal", shape, [mean, std], opts);
}

/**
 * `count` raw 32-bit Philox words as a [count, 2] tensor of their high and low 16-bit halves (each exact in
 * float32). For verifying the generator; takes the stream like `rand` does.
 */
export function randomBits(count: number, opts: RandomOptions = {}): Tensor {
  if (!Number.isInteger(count) || count < 1) {
    throw new Error(`randomBits: count ${count} must be a positive integer`);
  }
  const device = opts.device ?? getDefaultDevice();
  const out = Tensor.empty([count, 2], device);
  const { key, counter } = takeStream(device, count, opts.seed);
  device.run(random, { dist: "bits", n: count, key, counter }, [], [out.storage]);
  return out;
}

/**
 * Raw Philox words for an explicit counter and key (block b uses counter (c0, c1) + b, c2, c3), as [count, 2]
 * high/low halves; for known-answer tests of the generator itself.
 */
export function philoxBits(
  count: number,
  counter: readonly [number, number, number, number],
  key: readonly [number, number],
  device: Device = getDefaultDevice(),
): Tensor {
  const out = Tensor.empty([count, 2], device);
  device.run(random, { dist: "bits", n: count, key, counter }, [], [out.storage]);
  return out;
}

/**
 * Zeroes each element with probability `p` and scales the rest by 1/(1−p) (inverted dropout, as
 * `torch.nn.functional.dropout`). The identity when `training` is false or p = 0. The mask is not stored: the
 * backward replays the same Philox stream on the gradient, which gives exactly the same mask.
 */
export function dropout(x: Tensor, p = 0.5, training = true): Tensor {
  if (!(x instanceof Tensor)) throw new Error("dropout: expected a Tensor");
  if (!(p >= 0 && p <= 1)) throw new Error(`dropout: probability has to be between 0 and 1, but got ${p}`);
  if (!training || p === 0) {
    const out = view(x, x.shape);
    return record(out, "dropout", [x], (g) => [view(g, g.shape)]);
  }
  if (p === 1) {
    const out = map(cst(0), [], [0], { shape: x.shape, device: x.device });
    return record(out, "dropout", [x], (g) => [map(cst(0), [], [0], { shape: g.shape, device: g.device })]);
  }
  const device = x.device;
  const { key, counter } = takeStream(device, x.size);
  // Keep where the 24-bit uniform word u satisfies u·2^-24 ≥ p, i.e. u ≥ ceil(p·2^24): an exact integer test.
  const args: [number, number] = [Math.ceil(p * 16777216), 1 / (1 - p)];
  const apply = (t: Tensor) => {
    const out = Tensor.empty(t.shape, device);
    device.run(random, { dist: "dropout", n: t.size, key, counter, args }, [t.storage], [out.storage]);
    return out;
  };
  const out = apply(x);
  return record(out, "dropout", [x], (g) => {
    if (g.size !== x.size) {
      throw new Error(`dropout: gradient ${fmt(g.shape)} does not match input ${fmt(x.shape)}`);
    }
    return [apply(g)];
  });
}
