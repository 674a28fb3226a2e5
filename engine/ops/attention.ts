/**
 * @file Scaled dot-product attention, composed from differentiable ops: softmax(q·kᵀ·scale)·v, as
 * F.scaled_dot_product_attention without mask or dropout. Its gradient comes from the tape of its parts.
 */

import type { Tensor } from "../tensor.ts";
import { fmt } from "../shape.ts";
import { mul } from "./elementwise.ts";
import { matmul, matmulTransposed } from "./matmul.ts";
import { softmax } from "./softmax.ts";

export interface AttentionOptions {
  /** Multiplier of q·kᵀ; defaults to 1/√E with E the last dim of q. */
  scale?: number;
}

/** q: [..., Lq, E], k: [..., Lk, E], v: [..., Lk, Ev] → [..., Lq, Ev]. */
export function scaledDotProductAttention(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions = {},
): Tensor {
  const E = q.shape[q.rank - 1];
  if (
    q.rank < 2 || k.rank < 2 || v.rank < 2 || k.shape[k.rank - 1] !== E ||
    k.shape[k.rank - 2] !== v.shape[v.rank - 2]
  ) {
    throw new Error(
      `scaledDotProductAttention: q ${fmt(q.shape)}, k ${fmt(k.shape)}, v ${fmt(v.shape)} do not fit ` +
        `q [..., Lq, E], k [..., Lk, E], v [..., Lk, Ev]`,
    );
  }
  const scale = opts.scale ?? 1 / Math.sqrt(E);
  // kᵀ is read through swapped strides: no transposed copy of k, forward or backward.
  const scores = matmulTransposed(q, k, { transposeB: true });
  const scaled = mul(scores, scale);
  const p = softmax(scaled, -1);
  const out = matmul(p, v);
  // Without a tape the intermediates are garbage now; with one, the tape holds them until backward.
  if (!out.requiresGrad) { for (const t of [scores, scaled, p]) t.dispose(); }
  return out;
}
