/**
 * @file softmax and logSoftmax along one dim (F.softmax / F.log_softmax), max-subtracted. Both run in place of
 * a permute: the kernel sees x as [outer, L, inner] around the chosen dim. The backward is one fused kernel
 * over the saved output: dx = y·(g − Σ g·y) for softmax, dx = g − exp(y)·Σ g for logSoftmax.
 */

import { softmax as softmaxKernel, softmaxBackward, type SoftmaxParams } from "../../kernels/softmax.ts";
import { record, sizeOf, Tensor } from "../tensor.ts";
import { normAxis } from "../shape.ts";

function softmaxOp(op: string, x: Tensor, dim: number, log: boolean): Tensor {
  if (!(x instanceof Tensor)) throw new Error(`${op}: expected a Tensor input`);
  if (x.disposed) throw new Error(`${op}: input of shape [${x.shape}] was used after dispose()`);
  // A rank-0 tensor is a softmax over one element; PyTorch takes dim 0 or -1 for it.
  const d = x.rank === 0 && dim === -1 ? 0 : normAxis(op, dim, x.rank);
  const params: SoftmaxParams = {
    outer: sizeOf(x.shape.slice(0, d)),
    L: x.rank === 0 ? 1 : x.shape[d],
    inner: sizeOf(x.shape.slice(d + 1)),
    log,
  };
  const y = Tensor.empty(x.shape, x.device);
  x.device.run(softmaxKernel, params, [x.storage], [y.storage]);
  return record(y, op, [x], (g) => {
    const dx = Tensor.empty(x.shape, x.device);
    x.device.run(softmaxBackward, params, [y.storage, g.storage], [dx.storage]);
    return [dx];
  });
}

/** Softmax over `dim` (default the last). */
export function softmax(x: Tensor, dim = -1): Tensor {
  return softmaxOp("softmax", x, dim, false);
}

/** log(softmax(x)) over `dim` (default the last), computed as x − max − log Σ exp(x − max). */
export function logSoftmax(x: Tensor, dim = -1): Tensor {
  return softmaxOp("logSoftmax", x, dim, true);
}
