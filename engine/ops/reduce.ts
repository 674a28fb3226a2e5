/**
 * @file Differentiable reductions over any dims, with keepdim, as in PyTorch: `sum`, `mean`, `amax`.
 * `amax` sends the gradient to every maximal element in equal shares, like `torch.amax`.
 */

import { bin, cst, inp } from "../../kernels/elementwise.ts";
import { record, type Tensor } from "../tensor.ts";
import { normAxes } from "../shape.ts";
import { expandTo, keepdimShape, map, reduceRaw, view } from "./core.ts";

export type Dims = number | readonly number[];

function outShapeOf(x: Tensor, axes: number[], keepdim: boolean): number[] {
  return keepdim ? keepdimShape(x.shape, axes) : x.shape.filter((_, d) => !axes.includes(d));
}

/** The gradient of a reduction output seen with keepdim shape, so that it broadcasts against the input. */
function keepView(g: Tensor, x: Tensor, axes: number[]): Tensor {
  return view(g, keepdimShape(x.shape, axes));
}

/** Sum over `dims` (all dims when omitted). */
export function sum(x: Tensor, dims?: Dims, keepdim = false): Tensor {
  const axes = normAxes("sum", dims, x.rank);
  const out = reduceRaw("sum", x, axes, outShapeOf(x, axes, keepdim));
  return record(out, "sum", [x], (g) => {
    const gk = keepView(g, x, axes);
    const r = expandTo(gk, x.shape);
    gk.dispose();
    return [r];
  });
}

/** Mean over `dims` (all dims when omitted). */
export function mean(x: Tensor, dims?: Dims, keepdim = false): Tensor {
  const axes = normAxes("mean", dims, x.rank);
  const n = axes.reduce((acc, d) => acc * x.shape[d], 1);
  const s = reduceRaw("sum", x, axes, outShapeOf(x, axes, keepdim));
  const out = map(bin("mul", inp(0), cst(0)), [s], [1 / n]);
  s.dispose();
  return record(out, "mean", [x], (g) => {
    const gk = keepView(g, x, axes);
    const r = map(bin("mul", inp(0), cst(0)), [gk], [1 / n], { shape: x.shape });
    gk.dispose();
    return [r];
  });
}

/** Maximum over `dims` (all dims when omitted). */
export function amax(x: Tensor, dims?: Dims, keepdim = false): Tensor {
  const axes = normAxes("amax", dims, x.rank);
  const out = reduceRaw("max", x, axes, outShapeOf(x, axes, keepdim));
  return record(out, "amax", [x], (g) => {
    const mk = keepView(out, x, axes), gk = keepView(g, x, axes);
    const isMax = map(bin("eq", inp(0), inp(1)), [x, mk]);
    const count = reduceRaw("sum", isMax, axes, keepdimShape(x.shape, axes));
    const r = map(bin("div", bin("mul", inp(0), inp(1)), inp(2)), [gk, isMax, count]);
    for (const t of [mk, gk, isMax, count]) t.dispose();
    return [r];
  });
}
