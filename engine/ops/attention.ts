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
 *
 * `packedQkvAttention` is the same attention over q, k and v packed in one tensor as a UNet's qkv convolution
 * leaves them ([B, c, 3, L]: channels, then q/k/v, then positions), with the output channels first ([B, c, L]).
 * Its matrix products read q, k and v in place through strides and write the output, and in the backward dq,
 * dk and dv, transposed and straight into their parts of d qkv, and carry the scale (the matmul kernel's
 * alpha), so nothing is permuted, sliced, scattered or scaled on the way: 3 dispatches forward and 5 backward,
 * where composing views and the ops above took about 24 for a block (measured: default UNet step).
 */

import { matmul as matmulKernel, type MatOperand } from "../../kernels/matmul.ts";
import { softmax as softmaxKernel, softmaxBackward, type SoftmaxParams } from "../../kernels/softmax.ts";
import { record, Tensor } from "../tensor.ts";
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

/**
 * Attention over packed q, k, v: `qkv` is [B, c, 3, L] (q = qkv[:, :, 0, :]ᵀ as [B, L, c], likewise k and v),
 * the result [B, c, L] is softmax(q·kᵀ·scale)·v with channels first. `scale` defaults to 1/√c. Returns null
 * when the scores [B, L, L] would not fit in one storage binding (or `maxScoreElements`); the caller then uses
 * the general op, which cuts the batch.
 */
export function packedQkvAttention(qkv: Tensor, opts: AttentionOptions = {}): Tensor | null {
  if (qkv.rank !== 4 || qkv.shape[2] !== 3) {
    throw new Error(`packedQkvAttention: qkv must be [B, c, 3, L], got ${fmt(qkv.shape)}`);
  }
  const [B, c, , L] = qkv.shape;
  if (B * L * L > (opts.maxScoreElements ?? maxBindingFloats(qkv))) return null;
  const s = opts.scale ?? 1 / Math.sqrt(c);
  const device = qkv.device;
  // Element (b, i, e) of q (i = 0), k (1) or v (2) lies at b·3cL + e·3L + i·L + position: as an [L, c] matrix
  // (positions as rows) or as its transpose [c, L].
  const rowsOf = (i: number): MatOperand => ({
    offset: i * L,
    batchStride: 3 * c * L,
    rowStride: 1,
    colStride: 3 * L,
  });
  const colsOf = (i: number): MatOperand => ({
    offset: i * L,
    batchStride: 3 * c * L,
    rowStride: 3 * L,
    colStride: 1,
  });
  const square = (trans: boolean): MatOperand => ({
    batchStride: L * L,
    rowStride: trans ? 1 : L,
    colStride: trans ? L : 1,
  });
  const channelsFirst = (trans: boolean): MatOperand => ({
    batchStride: c * L,
    rowStride: trans ? 1 : L,
    colStride: trans ? L : 1,
  });
  /**
   * out[b] = alpha·A[b]·B[b] for [M, K]·[K, N] operands read through strides, into a new [B, M, N] tensor, or
   * into part `into.part` of a [B, c, 3, L] tensor (channels as rows).
   */
  const gemm = (
    a: Tensor,
    ao: MatOperand,
    b: Tensor,
    bo: MatOperand,
    [M, N, K]: [number, number, number],
    alpha = 1,
    into?: { t: Tensor; part: number },
  ) => {
    const out = into?.t ?? Tensor.empty([B, M, N], device);
    const layout = into ? { offset: into.part * L, batchStride: 3 * c * L, rowStride: 3 * L } : undefined;
    device.run(
      matmulKernel,
      { batch: B, M, N, K, a: ao, b: bo, alpha, out: layout },
      [a.storage, b.storage],
      [into ? out.mutableStorage : out.storage],
    );
    return out;
  };
  const rows: SoftmaxParams = { outer: B * L, L, inner: 1, log: false };

  const scores = gemm(qkv, rowsOf(0), qkv, colsOf(1), [L, L, c], s); // q·kᵀ·scale
  const p = Tensor.empty([B, L, L], device);
  device.run(softmaxKernel, rows, [scores.storage], [p.storage]);
  scores.dispose();
  // outᵀ = vᵀ·pᵀ: channels first.
  const out = gemm(qkv, colsOf(2), p, square(true), [c, L, L]);
  if (!qkv.requiresGrad) {
    p.dispose();
    return out;
  }
  return record(out, "packedQkvAttention", [qkv], (g) => {
    // g = d outᵀ [B, c, L]. dp = gᵀ·vᵀ, dvᵀ = g·p; ds = softmax'(dp); dqᵀ = scale·kᵀ·dsᵀ, dkᵀ = scale·qᵀ·ds.
    // dq, dk and dv go straight into their parts of d qkv (part i of channel e at b·3cL + e·3L + i·L), which
    // they cover.
    const dqkv = Tensor.empty(qkv.shape, device);
    const dp = gemm(g, channelsFirst(true), qkv, colsOf(2), [L, L, c]);
    gemm(g, channelsFirst(false), p, square(false), [c, L, L], 1, { t: dqkv, part: 2 });
    // ds without the scale, which the two products apply.
    const ds = Tensor.empty([B, L, L], device);
    device.run(softmaxBackward, rows, [p.storage, dp.storage], [ds.storage]);
    dp.dispose();
    gemm(qkv, colsOf(1), ds, square(true), [c, L, L], s, { t: dqkv, part: 0 });
    gemm(qkv, colsOf(0), ds, square(false), [c, L, L], s, { t: dqkv, part: 1 });
    ds.dispose();
    return [dqkv];
  });
}
