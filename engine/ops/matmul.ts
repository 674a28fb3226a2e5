/**
 * @file Differentiable `matmul` (torch.matmul semantics), `matmulTransposed` (the same with either operand read
 * as its transpose, as attention's q·kᵀ wants) and `linear` (F.linear), all on the strided batched GEMM kernel.
 *
 * Every operand is "a stack of matrices read through strides": the backward products `dA = g·Bᵀ` and
 * `dB = Aᵀ·g` read the stored A and B with swapped row/column strides, so no transpose is ever materialised.
 * Batch broadcasting uses batch stride 0 when an operand has a single matrix; only an operand whose batch dims
 * are partly broadcast (say [2,1] against [1,3]) is expanded with `expandTo`, since one stride cannot express it.
 * Two foldings keep GEMMs large: a batched A times a single B is one [batch·M, K]·[K, N] product, and in the
 * backward the gradient of that single B is one [K, batch·M]·[batch·M, N] product instead of a batched product
 * followed by a reduction.
 */

import { matmul as matmulKernel, type MatmulParams, type MatOperand } from "../../kernels/matmul.ts";
import { record, sameDevice, type Shape, sizeOf, Tensor } from "../tensor.ts";
import { broadcastShapes, fmt, sameShape } from "../shape.ts";
import { expandTo, reduceRaw, sumTo, view } from "./core.ts";

/** A tensor seen as a stack of matrices `[...batch, rows, cols]` (its own shape, or a 1-D tensor as a row or
 * column), read as stored or transposed. */
interface MatView {
  t: Tensor;
  shape: readonly number[];
  trans: boolean;
}

const batchOf = (v: MatView) => v.shape.slice(0, -2);
/** Rows and columns as read (after the optional transpose). */
function readDims(v: MatView): [number, number] {
  const r = v.shape[v.shape.length - 2], c = v.shape[v.shape.length - 1];
  return v.trans ? [c, r] : [r, c];
}

/** Strides that read `v` for a product over `batch`, plus a temporary when the batch had to be materialised. */
function operandFor(v: MatView, batch: readonly number[]): { op: MatOperand; tmp: Tensor | null; t: Tensor } {
  const r = v.shape[v.shape.length - 2], c = v.shape[v.shape.length - 1];
  const rowStride = v.trans ? 1 : c, colStride = v.trans ? c : 1;
  const own = batchOf(v);
  const nb = sizeOf(batch);
  if (sizeOf(own) === 1) return { op: { batchStride: 0, rowStride, colStride }, tmp: null, t: v.t };
  // Same batch dims (up to leading 1s): the matrices follow each other in storage.
  const padded = [...new Array(batch.length - own.length).fill(1), ...own];
  if (sizeOf(own) === nb && sameShape(padded, batch)) {
    return { op: { batchStride: r * c, rowStride, colStride }, tmp: null, t: v.t };
  }
  const tmp = expandTo(v.t, [...batch, r, c]);
  return { op: { batchStride: r * c, rowStride, colStride }, tmp, t: tmp };
}

/**
 * `x · y` for every batch index into a new tensor of `outShape` (whose layout must be [...batch, M, N]), with an
 * optional bias added to every row. The batch dims of x and y must broadcast to `batch`.
 */
function bmm(x: MatView, y: MatView, batch: readonly number[], outShape: Shape, bias?: Tensor): Tensor {
  const [M, K] = readDims(x), [K2, N] = readDims(y);
  if (K !== K2) throw new Error(`matmul: inner dimensions ${K} and ${K2} differ`);
  const device = x.t.device;
  const out = Tensor.empty(outShape, device);
  const ox = operandFor(x, batch), oy = operandFor(y, batch);
  let nb = sizeOf(batch), rows = M;
  // A batched, row-major x times one y matrix: fold the batch into the rows (a taller single GEMM).
  if (nb > 1 && oy.op.batchStride === 0 && !x.trans && ox.op.batchStride === M * K) {
    rows = nb * M;
    nb = 1;
  }
  const inputs = [ox.t.storage, oy.t.storage];
  if (bias) inputs.push(bias.storage);
  const p: MatmulParams = { batch: nb, M: rows, N, K, a: ox.op, b: oy.op, bias: !!bias };
  device.run(matmulKernel, p, inputs, [out.storage]);
  ox.tmp?.dispose();
  oy.tmp?.dispose();
  return out;
}

/** Sums a batched gradient `[...batch, r, c]` down to the operand's own stack shape, viewed as `target`. */
function reduceTo(full: Tensor, stackShape: readonly number[], target: Shape): Tensor {
  const r = sumTo(full, stackShape);
  if (r !== full) full.dispose();
  if (sameShape(r.shape, target)) return r;
  const v = view(r, target);
  r.dispose();
  return v;
}

/** Which operands `matmulTransposed` reads transposed. */
export interface TransposeOptions {
  /** Multiply by the transpose of a's last two dims (torch's `a.mT`), read through swapped strides: no copy. */
  transposeA?: boolean;
  /** The same for b: `matmulTransposed(q, k, { transposeB: true })` is q·kᵀ without materialising kᵀ. */
  transposeB?: boolean;
}

/**
 * Matrix product with torch.matmul semantics: 1-D operands are a row (left) or column (right) vector whose
 * dimension is dropped from the result; operands of rank ≥ 3 are stacks of matrices whose batch dims broadcast.
 */
export function matmul(a: Tensor, b: Tensor): Tensor {
  return matmulTransposed(a, b);
}

/**
 * torch.matmul(a.mT, b.mT) for the operands `opts` names (which must have rank ≥ 2): the kernel reads them
 * through swapped strides, so neither the product nor its gradients copy a transposed operand.
 */
export function matmulTransposed(a: Tensor, b: Tensor, opts: TransposeOptions = {}): Tensor {
  sameDevice("matmul", a, b);
  if (a.rank === 0 || b.rank === 0) {
    throw new Error(
      `matmul: both arguments need at least one dimension, got shapes ${fmt(a.shape)} and ${fmt(b.shape)}`,
    );
  }
  const ta = opts.transposeA ?? false, tb = opts.transposeB ?? false;
  if ((ta && a.rank < 2) || (tb && b.rank < 2)) {
    throw new Error(
      `matmul: transposeA/transposeB need operands of rank ≥ 2, got shapes ${fmt(a.shape)} and ${
        fmt(b.shape)
      }`,
    );
  }
  const aStack = a.rank === 1 ? [1, a.shape[0]] : [...a.shape];
  const bStack = b.rank === 1 ? [b.shape[0], 1] : [...b.shape];
  const A: MatView = { t: a, shape: aStack, trans: ta },
    B: MatView = { t: b, shape: bStack, trans: tb };
  const [M, K] = readDims(A), [Kb, N] = readDims(B);
  if (K !== Kb) {
    const as = `${fmt(a.shape)}${ta ? "ᵀ" : ""}`, bs = `${fmt(b.shape)}${tb ? "ᵀ" : ""}`;
    throw new Error(`matmul: shapes ${as} and ${bs} cannot be multiplied (${K} ≠ ${Kb})`);
  }
  let batch: number[];
  try {
    batch = broadcastShapes("matmul", aStack.slice(0, -2), bStack.slice(0, -2));
  } catch {
    throw new Error(
      `matmul: batch dimensions of ${fmt(a.shape)} and ${fmt(b.shape)} cannot be broadcast together`,
    );
  }
  const outShape = [...batch, ...(a.rank === 1 ? [] : [M]), ...(b.rank === 1 ? [] : [N])];
  const out = bmm(A, B, batch, outShape);

  return record(out, "matmul", [a, b], (g) => {
    const G: MatView = { t: g, shape: [...batch, M, N], trans: false };
    const Gt: MatView = { ...G, trans: true };
    const nb = sizeOf(batch);
    let da: Tensor | null = null, db: Tensor | null = null;
    if (a.requiresGrad) {
      // As read, dA = g·op(B)ᵀ; a stored transposed gets its transpose op(B)·gᵀ.
      const [x, y] = ta ? [B, Gt] : [G, { ...B, trans: !tb }];
      da = sizeOf(batchOf(A)) === nb
        ? bmm(x, y, batch, a.shape)
        : reduceTo(bmm(x, y, batch, [...batch, ...aStack.slice(-2)]), aStack, a.shape);
    }
    if (b.requiresGrad) {
      // As read, dB = op(A)ᵀ·g; b stored transposed gets its transpose gᵀ·op(A).
      const [x, y] = tb ? [Gt, A] : [{ ...A, trans: !ta }, G];
      const nbA = sizeOf(batchOf(A)), nbB = sizeOf(batchOf(B));
      if (nbB === nb) db = bmm(x, y, batch, b.shape);
      else if (nbB === 1 && nbA === nb && !ta) {
        // One B for the whole batch: dB = A_flatᵀ · g_flat (or its transpose), the batch summed inside the K loop.
        const aFlat: MatView = { t: a, shape: [nb * M, K], trans: false };
        const gFlat: MatView = { t: g, shape: [nb * M, N], trans: false };
        db = tb
          ? bmm({ ...gFlat, trans: true }, aFlat, [], b.shape)
          : bmm({ ...aFlat, trans: true }, gFlat, [], b.shape);
      } else db = reduceTo(bmm(x, y, batch, [...batch, ...bStack.slice(-2)]), bStack, b.shape);
    }
    return [da, db];
  });
}

/** `x · weightᵀ + bias` like F.linear: x is [..., in], weight is [out, in], bias is [out]; the result is [..., out]. */
export function linear(x: Tensor, weight: Tensor, bias?: Tensor | null): Tensor {
  const inputs = bias ? [x, weight, bias] : [x, weight];
  sameDevice("linear", ...inputs);
  if (weight.rank !== 2) {
    throw new Error(`linear: weight must be 2-D [out_features, in_features], got ${fmt(weight.shape)}`);
  }
  const [outF, inF] = weight.shape;
  if (x.rank === 0 || x.shape[x.rank - 1] !== inF) {
    throw new Error(
      `linear: input ${fmt(x.shape)} does not end in in_features ${inF} of weight ${fmt(weight.shape)}`,
    );
  }
  if (bias && !(bias.rank === 1 && bias.shape[0] === outF)) {
    throw new Error(
      `linear: bias ${fmt(bias.shape)} does not match weight ${fmt(weight.shape)} (expected [${outF}])`,
    );
  }
  const lead = x.shape.slice(0, -1);
  const rows = sizeOf(lead);
  const X: MatView = { t: x, shape: [rows, inF], trans: false };
  const Wt: MatView = { t: weight, shape: [outF, inF], trans: true };
  const out = bmm(X, Wt, [], [...lead, outF], bias ?? undefined);

  return record(out, "linear", inputs, (g) => {
    const G: MatView = { t: g, shape: [rows, outF], trans: false };
    const dx = x.requiresGrad ? bmm(G, { ...Wt, trans: false }, [], x.shape) : null;
    const dw = weight.requiresGrad ? bmm({ ...G, trans: true }, X, [], weight.shape) : null;
    let db: Tensor | null = null;
    if (bias?.requiresGrad) {
      const axes = lead.map((_, i) => i);
      db = axes.length ? reduceRaw("sum", g, axes, [outF]) : view(g, [outF]);
    }
    return bias ? [dx, dw, db] : [dx, dw];
  });
}
