/**
 * @file Spatial resampling on NCHW tensors: `avgPool2d` (F.avg_pool2d with ceil_mode = False, count_include_pad
 * True by default or False on request), `maxPool2d` (F.max_pool2d with ceil_mode = False, dilation 1) and
 * `interpolateNearest` (F.interpolate(mode="nearest") with an integer scale factor). Each direction is one gather
 * kernel from `kernels/pool.ts`. The pools also take an unbatched [C, H, W] input as PyTorch does;
 * interpolateNearest takes 4-D input only (PyTorch reads a 3-D input as [N, C, W]).
 *
 * maxPool2d saves the argmax of every window for its backward only when a gradient can flow (grad mode on and
 * the input requires grad); under `noGrad` (feature extraction) it writes the maxima alone.
 */

import {
  avgPool2d as avgPoolKernel,
  avgPool2dBackward,
  type AvgPool2dParams,
  maxPool2d as maxPoolKernel,
  maxPool2dBackward,
  type NearestParams,
  type PoolGeometry,
  poolOutSize,
  upsampleNearest,
  upsampleNearestBackward,
} from "../../kernels/pool.ts";
import { isGradEnabled, record, Tensor } from "../tensor.ts";
import { fmt } from "../shape.ts";

export type Size2 = number | readonly [number, number];

function pair(op: string, name: string, v: Size2, min: number): [number, number] {
  const p: number[] = typeof v === "number" ? [v, v] : [...v];
  if (p.length !== 2 || p.some((d) => !Number.isInteger(d) || d < min)) {
    throw new Error(`${op}: ${name} must be an integer ≥ ${min} or a pair of them, got ${JSON.stringify(v)}`);
  }
  return [p[0], p[1]];
}

function checkPlanes(op: string, x: Tensor, unbatched: boolean): { planes: number; H: number; W: number } {
  if (!(x instanceof Tensor)) throw new Error(`${op}: expected a Tensor input`);
  if (x.disposed) throw new Error(`${op}: input of shape ${fmt(x.shape)} was used after dispose()`);
  if (x.rank !== 4 && !(unbatched && x.rank === 3)) {
    throw new Error(`${op}: input ${fmt(x.shape)} must be [N, C, H, W]${unbatched ? " or [C, H, W]" : ""}`);
  }
  const H = x.shape[x.rank - 2], W = x.shape[x.rank - 1];
  return { planes: x.size / (H * W), H, W };
}

/** Validates a pooling call and returns its geometry and output size. */
function poolGeometry(
  op: string,
  x: Tensor,
  kernelSize: Size2,
  stride: Size2 | null | undefined,
  padding: Size2,
): { geometry: PoolGeometry; Ho: number; Wo: number } {
  const { planes, H, W } = checkPlanes(op, x, true);
  const [kh, kw] = pair(op, "kernelSize", kernelSize, 1);
  const [sh, sw] = stride === undefined || stride === null ? [kh, kw] : pair(op, "stride", stride, 1);
  const [ph, pw] = pair(op, "padding", padding, 0);
  if (2 * ph > kh || 2 * pw > kw) {
    throw new Error(`${op}: padding [${ph}, ${pw}] must be at most half of kernelSize [${kh}, ${kw}]`);
  }
  const geometry: PoolGeometry = { planes, H, W, kh, kw, sh, sw, ph, pw };
  const { Ho, Wo } = poolOutSize(geometry);
  if (Ho < 1 || Wo < 1) {
    throw new Error(
      `${op}: input ${fmt(x.shape)} is too small for kernelSize [${kh}, ${kw}], stride [${sh}, ${sw}], ` +
        `padding [${ph}, ${pw}] (output would be ${Ho}×${Wo})`,
    );
  }
  return { geometry, Ho, Wo };
}

export interface AvgPool2dOptions {
  /** Whether zero padding counts in each window's divisor (PyTorch's count_include_pad, default true). */
  countIncludePad?: boolean;
}

/**
 * F.avg_pool2d(x, kernelSize, stride, padding, count_include_pad=opts.countIncludePad) with ceil_mode = False.
 * `stride` defaults to the kernel size. With countIncludePad (the default) padded zeros count in the average;
 * without, each window divides by the number of its elements inside the input. x: [N, C, H, W] or [C, H, W].
 */
export function avgPool2d(
  x: Tensor,
  kernelSize: Size2,
  stride?: Size2 | null,
  padding: Size2 = 0,
  opts: AvgPool2dOptions = {},
): Tensor {
  const op = "avgPool2d";
  const { geometry, Ho, Wo } = poolGeometry(op, x, kernelSize, stride, padding);
  const cip = opts.countIncludePad ?? true;
  if (typeof cip !== "boolean") throw new Error(`${op}: countIncludePad must be a boolean, got ${cip}`);
  const params: AvgPool2dParams = { ...geometry, countIncludePad: cip };
  const y = Tensor.empty([...x.shape.slice(0, -2), Ho, Wo], x.device);
  x.device.run(avgPoolKernel, params, [x.storage], [y.storage]);
  return record(y, op, [x], (g) => {
    const dx = Tensor.empty(x.shape, x.device);
    x.device.run(avgPool2dBackward, params, [g.storage], [dx.storage]);
    return [dx];
  });
}

/** Argmax indices travel as float32 in-plane offsets, exact up to 2^24. */
const MAX_INDEXED_PLANE = 2 ** 24;

/**
 * F.max_pool2d(x, kernelSize, stride, padding) with ceil_mode = False and dilation 1: the maximum of each window,
 * padding never selected; `stride` defaults to the kernel size. The gradient goes to the first maximum of each
 * window (row-major order), like PyTorch. x: [N, C, H, W] or [C, H, W].
 */
export function maxPool2d(x: Tensor, kernelSize: Size2, stride?: Size2 | null, padding: Size2 = 0): Tensor {
  const op = "maxPool2d";
  const { geometry, Ho, Wo } = poolGeometry(op, x, kernelSize, stride, padding);
  const outShape = [...x.shape.slice(0, -2), Ho, Wo];
  const y = Tensor.empty(outShape, x.device);
  if (!(isGradEnabled() && x.requiresGrad)) {
    x.device.run(maxPoolKernel, { ...geometry, withIndices: false }, [x.storage], [y.storage]);
    return y;
  }
  if (geometry.H * geometry.W > MAX_INDEXED_PLANE) {
    throw new Error(`${op}: a differentiable max pool needs H·W ≤ 2^24, input is ${fmt(x.shape)}`);
  }
  const idx = Tensor.empty(outShape, x.device);
  x.device.run(maxPoolKernel, { ...geometry, withIndices: true }, [x.storage], [y.storage, idx.storage]);
  return record(y, op, [x], (g) => {
    const dx = Tensor.empty(x.shape, x.device);
    x.device.run(maxPool2dBackward, geometry, [g.storage, idx.storage], [dx.storage]);
    idx.dispose();
    return [dx];
  });
}

/**
 * F.interpolate(x, scale_factor=scaleFactor, mode="nearest") for integer factors: every pixel becomes an
 * sh×sw block. x: [N, C, H, W]; scaleFactor a positive integer or [sh, sw].
 */
export function interpolateNearest(x: Tensor, scaleFactor: Size2 = 2): Tensor {
  const op = "interpolateNearest";
  const { planes, H, W } = checkPlanes(op, x, false);
  const [sh, sw] = pair(op, "scaleFactor", scaleFactor, 1);
  const params: NearestParams = { planes, H, W, sh, sw };
  const y = Tensor.empty([...x.shape.slice(0, -2), H * sh, W * sw], x.device);
  x.device.run(upsampleNearest, params, [x.storage], [y.storage]);
  return record(y, op, [x], (g) => {
    const dx = Tensor.empty(x.shape, x.device);
    x.device.run(upsampleNearestBackward, params, [g.storage], [dx.storage]);
    return [dx];
  });
}
