/**
 * @file Making tensors: from host data, constants, and ranges. Random tensors live in `ops/random.ts`.
 */

import { cst } from "../kernels/elementwise.ts";
import { type Device, getDefaultDevice } from "./device.ts";
import { checkShape, type Shape, sizeOf, Tensor, type TensorOptions } from "./tensor.ts";
import { map } from "./ops/core.ts";
import { fmt } from "./shape.ts";

function finish(t: Tensor, opts: TensorOptions): Tensor {
  if (opts.requiresGrad) t.requiresGrad = true;
  return t;
}

/** A tensor from row-major host values; `shape` defaults to `[data.length]`. */
export function tensor(data: ArrayLike<number>, shape?: Shape, opts: TensorOptions = {}): Tensor {
  const s = shape ?? [data.length];
  checkShape(s);
  if (sizeOf(s) !== data.length) {
    throw new Error(`tensor: ${data.length} values do not fill shape ${fmt(s)} (${sizeOf(s)} elements)`);
  }
  const device = opts.device ?? getDefaultDevice();
  const t = Tensor.empty(s, device);
  device.write(t.storage, data);
  return finish(t, opts);
}

/** A tensor filled with `value`. */
export function full(shape: Shape, value: number, opts: TensorOptions = {}): Tensor {
  const device: Device = opts.device ?? getDefaultDevice();
  return finish(map(cst(0), [], [value], { shape, device }), opts);
}

export const zeros = (shape: Shape, opts: TensorOptions = {}): Tensor => full(shape, 0, opts);
export const ones = (shape: Shape, opts: TensorOptions = {}): Tensor => full(shape, 1, opts);

/** `[start, start+step, ...)` below `end`, like torch.arange. */
export function arange(start: number, end?: number, step = 1, opts: TensorOptions = {}): Tensor {
  if (end === undefined) [start, end] = [0, start];
  if (step === 0) throw new Error("arange: step must not be 0");
  const n = Math.max(0, Math.ceil((end - start) / step));
  if (n === 0) throw new Error(`arange(${start}, ${end}, ${step}) is empty`);
  return tensor(Float64Array.from({ length: n }, (_, i) => start + i * step), [n], opts);
}
