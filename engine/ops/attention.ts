/**
 * @file Scaled dot-product attention, composed from differentiable ops: softmax(q·kᵀ·scale)·v, as
 * F.scaled_dot_product_attention without mask or dropout. Its gradient comes from the tape of its parts.
 *
 * The score matrix [..., Lq, Lk] is the one large intermediate: at 16×16 positions it holds 64 Ki floats per
 * batch entry and head, so a batch of 256 images with two heads needs 128 MiB in one buffer, the adapter's
 * whole storage binding limit on lavapipe (measured: the search's proxy sampling failed there). When the
 * scores would not fit in one binding, the leading (batch) dims are cut into chunks that do, each chunk
 * attends on its own, and the outputs are concatenated: rows of attention are independent, so the result and
 * its gradient are the same, in more dispatches.
 */

import type { Tensor } from "../tensor.ts";
import { fmt } from "../shape.ts";
import { mul } from "./elementwise.ts";
import { matmul, matmulTransposed } from "./matmul.ts";
import { softmax } from "./softmax.ts";
import { cat, narrow, reshape } from "./shape.ts";

export interface AttentionOptions {
  /** Multiplier of q·kᵀ; defaults to 1/√E with E the last dim of q. */
  scale?: number;
  /** Most score floats one piece may hold (default: the device's storage binding limit; see the file comment). */
  maxScoreElements?: number;
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
  const Lq = q.shape[q.rank - 2], Lk = k.shape[k.rank - 2];
  const lead = q.shape.slice(0, -2), B = lead.reduce((a, b) => a * b, 1);
  const chunk = Math.floor((opts.maxScoreElements ?? maxBindingFloats(q)) / (Lq * Lk));
  const sameLead = [k, v].every((t) =>
    t.rank === q.rank && t.shape.slice(0, -2).every((d, i) => d === lead[i])
  );
  if (B > 1 && chunk < B && q.rank >= 3 && sameLead) {
    if (chunk < 1) {
      throw new Error(
        `scaledDotProductAttention: one score matrix [${Lq}, ${Lk}] exceeds the adapter's storage binding limit`,
      );
    }
    const flat = (t: Tensor) => reshape(t, [B, ...t.shape.slice(-2)]);
    const [qf, kf, vf] = [flat(q), flat(k), flat(v)];
    const parts: Tensor[] = [];
    for (let at = 0; at < B; at += chunk) {
      const n = Math.min(chunk, B - at);
      parts.push(attend(narrow(qf, 0, at, n), narrow(kf, 0, at, n), narrow(vf, 0, at, n), scale));
    }
    return reshape(cat(parts, 0), [...lead, Lq, v.shape[v.rank - 1]]);
  }
  return attend(q, k, v, scale);
}

/** Floats one storage binding of `t`'s device may hold (unbounded on the CPU reference backend). */
function maxBindingFloats(t: Tensor): number {
  const bytes = t.device.info.limits.maxStorageBufferBindingSize;
  return bytes ? Math.floor(bytes / 4) : Infinity;
}

/** softmax(q·kᵀ·scale)·v in one piece. */
function attend(q: Tensor, k: Tensor, v: Tensor, scale: number): Tensor {
  // kᵀ is read through swapped strides: no transposed copy of k, forward or backward.
  const scores = matmulTransposed(q, k, { transposeB: true });
  const scaled = mul(scores, scale);
  const p = softmax(scaled, -1);
  const out = matmul(p, v);
  // Without a tape the intermediates are garbage now; with one, the tape holds them until backward.
  if (!out.requiresGrad) { for (const t of [scores, scaled, p]) t.dispose(); }
  return out;
}
