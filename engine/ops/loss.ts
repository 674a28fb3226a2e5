/**
 * @file Losses. `mseLoss` is one fused squared-difference kernel plus a reduction, with its own backward
 * (2·(a−b)·g/n), rather than a chain of sub/mul/mean.
 */

import { bin, cst, inp, un } from "../../kernels/elementwise.ts";
import { record, sameDevice, type Tensor } from "../tensor.ts";
import { fmt, sameShape } from "../shape.ts";
import { map, reduceRaw, sumTo } from "./core.ts";

export type Reduction = "mean" | "sum" | "none";

/** F.mse_loss: (a − b)², reduced by mean (default), sum, or not at all. b broadcasts to a. */
export function mseLoss(a: Tensor, b: Tensor, reduction: Reduction = "mean"): Tensor {
  sameDevice("mseLoss", a, b);
  if (!["mean", "sum", "none"].includes(reduction)) {
    throw new Error(`mseLoss: unknown reduction "${reduction}"`);
  }
  const sq = map(un("square", bin("sub", inp(0), inp(1))), [a, b]);
  if (!sameShape(sq.shape, a.shape)) {
    sq.dispose();
    throw new Error(`mseLoss: target ${fmt(b.shape)} must broadcast to input ${fmt(a.shape)}`);
  }
  const n = reduction === "mean" ? a.size : 1;
  let out = sq;
  if (reduction !== "none") {
    const s = reduceRaw("sum", sq, a.shape.map((_, i) => i), []);
    sq.dispose();
    out = n === 1 ? s : map(bin("mul", inp(0), cst(0)), [s], [1 / n]);
    if (out !== s) s.dispose();
  }
  return record(out, "mseLoss", [a, b], (g) => {
    // d/da = 2(a − b)·g/n; g is a scalar (or elementwise for "none") and broadcasts.
    const da = map(bin("mul", bin("mul", bin("sub", inp(0), inp(1)), inp(2)), cst(0)), [a, b, g], [2 / n], {
      shape: a.shape,
    });
    let db: Tensor | null = null;
    if (b.requiresGrad) {
      const negDa = map(un("neg", inp(0)), [da]);
      db = sumTo(negDa, b.shape);
      if (db !== negDa) negDa.dispose();
    }
    return [a.requiresGrad ? da : (da.dispose(), null), db];
  });
}
