/**
 * @file The untracked primitives every op front-end is built from: `map` (a fused elementwise expression with
 * broadcasting), `reduceRaw`, `view` (a reshape sharing storage), `copyInto`, and the two broadcasting helpers
 * the backward rules need (`sumTo` undoes a broadcast, `expandTo` performs one). None of these record the tape;
 * differentiable ops call them and attach their own vector-Jacobian product with `record`.
 */

import type { Device } from "../device.ts";
import { elementwise, type Expr, inp } from "../../kernels/elementwise.ts";
import { reduce, type ReduceOp } from "../../kernels/reduce.ts";
import { copy } from "../../kernels/copy.ts";
import { contiguousStrides } from "../../kernels/elementwise.ts";
import { sameDevice, type Shape, sizeOf, Tensor } from "../tensor.ts";
import { broadcastShapes, broadcastStrides, fmt, sameShape } from "../shape.ts";

export interface MapOptions {
  /** Output shape; defaults to the broadcast of the inputs' shapes (inputs must broadcast to it). */
  shape?: Shape;
  /** Needed only when there are no inputs. */
  device?: Device;
}

/** Evaluates `expr` elementwise over the broadcast inputs into a new tensor. One dispatch; no tape. */
export function map(expr: Expr, inputs: Tensor[], consts: number[] = [], opts: MapOptions = {}): Tensor {
  const device = inputs.length ? sameDevice("map", ...inputs) : opts.device;
  if (!device) throw new Error("map: a device is needed when there are no inputs");
  const shape = opts.shape ?? broadcastShapes("map", ...inputs.map((t) => t.shape));
  if (opts.shape) broadcastShapes("map", shape, ...inputs.map((t) => t.shape)); // validates
  const out = Tensor.empty(shape, device);
  device.run(
    elementwise,
    { expr, consts, shape, strides: inputs.map((t) => broadcastStrides(t.shape, shape)) },
    inputs.map((t) => t.storage),
    [out.storage],
  );
  return out;
}

/** A tensor of another shape with the same elements, sharing storage. */
export function view(t: Tensor, shape: Shape): Tensor {
  if (sizeOf(shape) !== t.size) throw new Error(`reshape: cannot view ${fmt(t.shape)} as ${fmt(shape)}`);
  return new Tensor(t.device, shape, t.storage, t);
}

/** Sum or max over `axes` (normalised, sorted), output shaped `outShape` (kept dims, or with keepdim 1s). */
export function reduceRaw(op: ReduceOp, x: Tensor, axes: number[], outShape: Shape): Tensor {
  const out = Tensor.empty(outShape, x.device);
  x.device.run(reduce, { op, shape: x.shape, axes }, [x.storage], [out.storage]);
  return out;
}

/** The shape `x` has after reducing `axes` with keepdim. */
export function keepdimShape(shape: Shape, axes: readonly number[]): number[] {
  return shape.map((d, i) => (axes.includes(i) ? 1 : d));
}

/** Sums a broadcast gradient back to `shape` (the inverse of broadcasting an input of that shape). */
export function sumTo(g: Tensor, shape: Shape): Tensor {
  if (sameShape(g.shape, shape)) return g;
  const lead = g.rank - shape.length;
  const axes: number[] = [];
  for (let d = 0; d < g.rank; d++) {
    if (d < lead || (shape[d - lead] === 1 && g.shape[d] !== 1)) axes.push(d);
  }
  const kept = g.shape.filter((_, d) => !axes.includes(d));
  const r = reduceRaw("sum", g, axes, kept);
  if (sameShape(kept, shape)) return r;
  const v = view(r, shape);
  r.dispose();
  return v;
}

/** Materialises `t` broadcast to `shape`. */
export function expandTo(t: Tensor, shape: Shape): Tensor {
  return map(inp(0), [t], [], { shape });
}

/**
 * Copies `src` into the region of `dst` that starts at `start` along each dimension (the rest of `dst` is left
 * as it was). Used by cat and by the backward of narrow.
 */
export function copyInto(dst: Tensor, src: Tensor, start: readonly number[]): void {
  const ds = contiguousStrides(dst.shape);
  const dstOffset = start.reduce((acc, s, d) => acc + s * ds[d], 0);
  dst.device.run(
    copy,
    { shape: src.shape, srcOffset: 0, srcStrides: contiguousStrides(src.shape), dstOffset, dstStrides: ds },
    [src.storage],
    [dst.storage],
  );
}

/** A new tensor holding `src` elements read through arbitrary strides from an offset (permute, narrow). */
export function gather(src: Tensor, shape: Shape, strides: readonly number[], offset = 0): Tensor {
  const out = Tensor.empty(shape, src.device);
  src.device.run(
    copy,
    { shape, srcOffset: offset, srcStrides: strides, dstOffset: 0, dstStrides: contiguousStrides(shape) },
    [src.storage],
    [out.storage],
  );
  return out;
}
