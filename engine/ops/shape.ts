/**
 * @file Differentiable shape ops: `reshape` (shares storage), `permute`, `transpose`, `narrow`, `cat`, `expand`,
 * `unsqueeze`, `squeeze`. Tensors are always contiguous, so permute and narrow copy (one strided-copy dispatch),
 * and cat joins its parts in one `concat` dispatch (its backward splits the gradient in another).
 */

import { contiguousStrides } from "../../kernels/layout.ts";
import { concat, CONCAT_MAX_PARTS } from "../../kernels/copy.ts";
import { record, sameDevice, type Shape, sizeOf, Tensor } from "../tensor.ts";
import { broadcastShapes, fmt, normAxis } from "../shape.ts";
import { copyInto, expandTo, gather, map, sumTo, view } from "./core.ts";
import { cst } from "../../kernels/elementwise.ts";

/** Same elements, new shape; one dimension may be -1 (inferred). Shares storage. */
export function reshape(x: Tensor, shape: readonly number[]): Tensor {
  const free = shape.filter((d) => d === -1).length;
  if (free > 1) throw new Error(`reshape: at most one -1 in ${fmt(shape)}`);
  let target = [...shape];
  if (free === 1) {
    const known = shape.filter((d) => d !== -1).reduce((a, b) => a * b, 1);
    if (known === 0 || x.size % known !== 0) {
      throw new Error(`reshape: cannot reshape ${fmt(x.shape)} to ${fmt(shape)}`);
    }
    target = shape.map((d) => (d === -1 ? x.size / known : d));
  }
  if (sizeOf(target) !== x.size) {
    throw new Error(`reshape: cannot reshape ${fmt(x.shape)} (${x.size} elements) to ${fmt(shape)}`);
  }
  const out = view(x, target);
  return record(out, "reshape", [x], (g) => [view(g, x.shape)]);
}

/** Reorders dimensions: output dim i is input dim `dims[i]`. */
export function permute(x: Tensor, dims: readonly number[]): Tensor {
  const axes = dims.map((d) => normAxis("permute", d, x.rank));
  if (axes.length !== x.rank || new Set(axes).size !== x.rank) {
    throw new Error(`permute: dims [${dims}] are not a permutation of the ${x.rank} dims of ${fmt(x.shape)}`);
  }
  const st = contiguousStrides(x.shape);
  const out = gather(x, axes.map((a) => x.shape[a]), axes.map((a) => st[a]));
  const inverse = new Array<number>(x.rank);
  axes.forEach((a, i) => (inverse[a] = i));
  return record(out, "permute", [x], (g) => {
    const gs = contiguousStrides(g.shape);
    return [gather(g, x.shape, inverse.map((i) => gs[i]))];
  });
}

/** Swaps two dimensions. */
export function transpose(x: Tensor, dim0: number, dim1: number): Tensor {
  const a = normAxis("transpose", dim0, x.rank), b = normAxis("transpose", dim1, x.rank);
  const dims = Array.from({ length: x.rank }, (_, i) => i);
  [dims[a], dims[b]] = [dims[b], dims[a]];
  return permute(x, dims);
}

/** The slice `start .. start+length` of dimension `dim`. */
export function narrow(x: Tensor, dim: number, start: number, length: number): Tensor {
  const d = normAxis("narrow", dim, x.rank);
  if (
    !Number.isInteger(start) || !Number.isInteger(length) || start < 0 || length < 1 ||
    start + length > x.shape[d]
  ) {
    throw new Error(
      `narrow: start ${start}, length ${length} out of range for dim ${dim} of ${fmt(x.shape)}`,
    );
  }
  const st = contiguousStrides(x.shape);
  const shape = x.shape.map((s, i) => (i === d ? length : s));
  const out = gather(x, shape, st, start * st[d]);
  return record(out, "narrow", [x], (g) => {
    const dx = map(cst(0), [], [0], { shape: x.shape, device: x.device });
    copyInto(dx, g, x.shape.map((_, i) => (i === d ? start : 0)));
    return [dx];
  });
}

/** Concatenates along `dim`; all other dims must match. */
export function cat(xs: readonly Tensor[], dim = 0): Tensor {
  if (!xs.length) throw new Error("cat: needs at least one tensor");
  const device = sameDevice("cat", ...xs);
  const rank = xs[0].rank;
  const d = normAxis("cat", dim, rank);
  for (const t of xs) {
    if (t.rank !== rank || t.shape.some((s, i) => i !== d && s !== xs[0].shape[i])) {
      throw new Error(`cat: shapes ${xs.map((x) => fmt(x.shape)).join(", ")} differ outside dim ${dim}`);
    }
  }
  const shape = xs[0].shape.map((s, i) => (i === d ? xs.reduce((a, t) => a + t.shape[d], 0) : s));
  const out = Tensor.empty(shape, device);
  if (xs.length > CONCAT_MAX_PARTS) return catByCopies(xs, d, shape, out);
  // One pass each way: the whole as [outer, Σ widths], part k as [outer, widths[k]].
  const outer = sizeOf(shape.slice(0, d)), inner = sizeOf(shape.slice(d + 1));
  const widths = xs.map((t) => t.shape[d] * inner);
  device.run(concat, { outer, widths, direction: "join" }, xs.map((t) => t.storage), [out.storage]);
  return record(out, "cat", [...xs], (g) => {
    const parts = xs.map((t) => Tensor.empty(t.shape, device));
    device.run(concat, { outer, widths, direction: "split" }, [g.storage], parts.map((t) => t.storage));
    return parts.map((t, k) => (xs[k].requiresGrad ? t : (t.dispose(), null)));
  });
}

/** cat of more parts than one `concat` dispatch takes: a copy per part each way. */
function catByCopies(xs: readonly Tensor[], d: number, shape: Shape, out: Tensor): Tensor {
  const starts: number[] = [];
  let at = 0;
  for (const t of xs) {
    starts.push(at);
    copyInto(out, t, shape.map((_, i) => (i === d ? at : 0)));
    at += t.shape[d];
  }
  return record(out, "cat", [...xs], (g) => {
    const gs = contiguousStrides(g.shape);
    return xs.map((t, k) => (t.requiresGrad ? gather(g, t.shape, gs, starts[k] * gs[d]) : null));
  });
}

/** Materialises a broadcast to `shape` (NumPy rules; new leading dims allowed). */
export function expand(x: Tensor, shape: Shape): Tensor {
  const target = broadcastShapes("expand", x.shape, shape);
  if (target.length !== shape.length || target.some((s, i) => s !== shape[i])) {
    throw new Error(`expand: ${fmt(x.shape)} cannot be expanded to ${fmt(shape)}`);
  }
  const out = expandTo(x, shape);
  return record(out, "expand", [x], (g) => [sumTo(g, x.shape)]);
}

/** Inserts a dimension of size 1 at `dim`. */
export function unsqueeze(x: Tensor, dim: number): Tensor {
  const d = normAxis("unsqueeze", dim, x.rank + 1);
  const shape = [...x.shape];
  shape.splice(d, 0, 1);
  return reshape(x, shape);
}

/** Removes dimension `dim`, which must have size 1. */
export function squeeze(x: Tensor, dim: number): Tensor {
  const d = normAxis("squeeze", dim, x.rank);
  if (x.shape[d] !== 1) throw new Error(`squeeze: dim ${dim} of ${fmt(x.shape)} is not 1`);
  return reshape(x, x.shape.filter((_, i) => i !== d));
}
