/**
 * @file The untracked primitives every op front-end is built from: `map` (a fused elementwise expression with
 * broadcasting), `reduceRaw`, `view` (a reshape sharing storage), `copyInto`, and the two broadcasting helpers
 * the backward rules need (`sumTo` undoes a broadcast, `expandTo` performs one). None of these record the tape;
 * differentiable ops call them and attach their own vector-Jacobian product with `record`.
 */

import type { Device } from "../device.ts";
import { type Expr, inp } from "../../kernels/elementwise.ts";
import { reduce, type ReduceOp } from "../../kernels/reduce.ts";
import { copy } from "../../kernels/copy.ts";
import { contiguousStrides } from "../../kernels/layout.ts";
import { type LazyValue, sameDevice, type Shape, sizeOf, type StorageRef, Tensor } from "../tensor.ts";
import { broadcastShapes, fmt, sameShape } from "../shape.ts";

export interface MapOptions {
  /** Output shape; defaults to the broadcast of the inputs' shapes (inputs must broadcast to it). */
  shape?: Shape;
  /** Needed only when there are no inputs. */
  device?: Device;
}

// Fusion budget: the kernel binds at most 7 inputs; bounded trees keep recomputation and compile time small;
// constants share the 128-word uniform block with the shape and strides.
const MAX_LEAVES = 7;
const MAX_NODES = 64;
const MAX_CONSTS = 32;

function countNodes(e: Expr): number {
  switch (e.op) {
    case "in":
    case "const":
      return 1;
    case "where":
      return 1 + countNodes(e.c) + countNodes(e.a) + countNodes(e.b);
    default:
      return 1 + ("b" in e ? countNodes(e.a) + countNodes(e.b) : countNodes((e as { a: Expr }).a));
  }
}

/** `e` with input i replaced by `inputs[i]` and constant j by constant j + constOffset. */
function substitute(e: Expr, inputs: (i: number) => Expr, constOffset: number): Expr {
  switch (e.op) {
    case "in":
      return inputs(e.i);
    case "const":
      return { op: "const", i: e.i + constOffset };
    case "where":
      return {
        op: "where",
        c: substitute(e.c, inputs, constOffset),
        a: substitute(e.a, inputs, constOffset),
        b: substitute(e.b, inputs, constOffset),
      };
    default:
      if ("b" in e) {
        const be = e as { op: string; a: Expr; b: Expr };
        return {
          ...be,
          a: substitute(be.a, inputs, constOffset),
          b: substitute(be.b, inputs, constOffset),
        } as Expr;
      }
      return { ...e, a: substitute((e as { a: Expr }).a, inputs, constOffset) } as Expr;
  }
}

/**
 * Evaluates `expr` elementwise over the broadcast inputs. The result is lazy: nothing runs until its storage is
 * needed, and an input that is itself a lazy elementwise result is inlined into this expression, so a chain of
 * elementwise ops (a ResBlock's scale-shift-SiLU, EDM's c_skip·x + c_out·F, every backward rule) becomes one
 * dispatch, and intermediates that only feed other elementwise ops are never written. No tape.
 */
export function map(expr: Expr, inputs: Tensor[], consts: number[] = [], opts: MapOptions = {}): Tensor {
  const device = inputs.length ? sameDevice("map", ...inputs) : opts.device;
  if (!device) throw new Error("map: a device is needed when there are no inputs");
  const shape = opts.shape ?? broadcastShapes("map", ...inputs.map((t) => t.shape));
  if (opts.shape) broadcastShapes("map", shape, ...inputs.map((t) => t.shape)); // validates

  const leaves: LazyValue["leaves"] = [];
  const allConsts = [...consts];
  const leafIndex = (ref: StorageRef, leafShape: Shape): Expr => {
    let i = leaves.findIndex((l) => l.ref === ref && sameShape(l.shape, leafShape));
    if (i < 0) i = leaves.push({ ref, shape: leafShape }) - 1;
    return inp(i);
  };
  const parts = inputs.map((t): Expr => {
    const v = t.lazyValue;
    if (v) {
      const newLeaves = v.leaves.filter((l) =>
        !leaves.some((m) => m.ref === l.ref && sameShape(m.shape, l.shape))
      );
      // Inputs after this one still need a slot each in the worst case.
      const roomAfter = inputs.length - 1 - inputs.indexOf(t);
      if (
        leaves.length + newLeaves.length + roomAfter <= MAX_LEAVES &&
        allConsts.length + v.consts.length <= MAX_CONSTS
      ) {
        const offset = allConsts.length;
        allConsts.push(...v.consts);
        const mapped = v.leaves.map((l) => leafIndex(l.ref, l.shape));
        return substitute(v.expr, (i) => mapped[i], offset);
      }
    }
    return leafIndex(t.storageRef, t.shape);
  });
  let fused = substitute(expr, (i) => parts[i], 0);
  if (countNodes(fused) > MAX_NODES) {
    // Too big to inline: compute the lazy inputs and use them as plain leaves.
    leaves.length = 0;
    allConsts.length = consts.length;
    const plain = inputs.map((t) => leafIndex(t.storageRef, t.shape));
    fused = substitute(expr, (i) => plain[i], 0);
  }
  return Tensor.lazy(device, shape, { expr: fused, consts: allConsts, leaves });
}

/**
 * Whether convolutions on `device` read their activations as packed textures (the texture variants on
 * CPU-emulated adapters, kernels/conv.ts), so that producers able to write the packed layout directly
 * (`Tensor.quadForm`) save them the packing pass: about 8.6 ns of llvmpipe time per texel.
 */
export function packsConvInputs(device: Device): boolean {
  const info = device.info;
  return info.backend === "webgpu" && info.isCpuEmulated && !!info.textureInputs;
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
    [dst.mutableStorage],
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
