/**
 * @file The parts every feature network of this project shares: the `FeatureExtractor` interface a Fréchet
 * distance reads, the weights' fingerprint that keys cached statistics, batch normalisation with "precise BN"
 * statistics, the classification loss and the one-cycle learning-rate schedule. ShapesNet (eval/features.ts)
 * and FashionNet (eval/fashion_net.ts) are built from them.
 */

import {
  add,
  type Device,
  full,
  keep,
  logSoftmax,
  mean,
  mul,
  neg,
  nn,
  noGrad,
  reshape,
  rsqrt,
  scope,
  sub,
  sum,
  type Tensor,
} from "../engine/mod.ts";

/** A network whose features a Fréchet distance compares. */
export interface FeatureExtractor {
  /** Names the network and its weights in reports and cached statistics (e.g. "shapes-net", "inception-v3"). */
  readonly name: string;
  /** Length of a feature vector. */
  readonly dim: number;
  /** Identifies the weights (a hash of the file they came from): cached statistics are keyed by it. */
  readonly fingerprint: string;
  readonly device: Device;
  /** Features [N, dim] of images [N, C, H, W] with values in [0, 255], without gradients. */
  features(images: Tensor): Tensor;
  dispose(): void;
}

/** The first 16 hex digits of a file's SHA-256. */
export async function fileFingerprint(path: string): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await Deno.readFile(path)));
  return Array.from(digest.subarray(0, 8), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Batch normalisation over (N, H, W) per channel, PyTorch's names (`weight`, `bias`, `running_mean`,
 * `running_var`). Training mode normalises with the batch's statistics (built from mean and elementwise ops, so
 * autograd differentiates through them); evaluation mode with the running buffers. Those are not updated step by
 * step: the network's `calibrate` sets them once after training from a large batch ("precise BN"), which keeps the
 * training loop free of in-place state and makes the evaluation statistics exact for the final weights.
 */
export class BatchNorm2d extends nn.Module {
  readonly weight: Tensor;
  readonly bias: Tensor;
  readonly running_mean: Tensor;
  readonly running_var: Tensor;
  /** While set, training-mode forwards append their batch mean and variance [C] here (kept tensors). */
  record: Tensor[][] | null = null;

  constructor(readonly channels: number, device: Device, readonly eps = 1e-5) {
    super();
    this.weight = this.registerParameter("weight", full([channels], 1, { device }));
    this.bias = this.registerParameter("bias", full([channels], 0, { device }));
    this.running_mean = this.registerBuffer("running_mean", full([channels], 0, { device }));
    this.running_var = this.registerBuffer("running_var", full([channels], 1, { device }));
  }

  forward(x: Tensor): Tensor {
    const c = [1, this.channels, 1, 1];
    if (!this.training) {
      const a = mul(reshape(this.weight, c), rsqrt(add(reshape(this.running_var, c), this.eps)));
      return add(mul(x, a), sub(reshape(this.bias, c), mul(reshape(this.running_mean, c), a)));
    }
    const m = mean(x, [0, 2, 3], true), d = sub(x, m), v = mean(mul(d, d), [0, 2, 3], true);
    this.record?.push([keep(reshape(m, [this.channels])), keep(reshape(v, [this.channels]))]);
    return add(mul(d, mul(rsqrt(add(v, this.eps)), reshape(this.weight, c))), reshape(this.bias, c));
  }
}

/**
 * Precise BN: sets every BatchNorm of `net` to the batch statistics that `forward` (a training-mode pass over
 * one large batch of training images) produces under the current weights; leaves `net` in evaluation mode.
 */
export function calibrateBatchNorms(net: nn.Module, forward: () => void): void {
  const norms = net.namedModules().filter((e): e is [string, BatchNorm2d] => e[1] instanceof BatchNorm2d);
  const recorded: Tensor[][] = [];
  norms.forEach(([, m]) => (m.record = recorded));
  net.train();
  try {
    noGrad(() => scope(forward));
    const state: Record<string, Tensor> = {};
    norms.forEach(([name], i) => {
      state[`${name}.running_mean`] = recorded[i][0];
      state[`${name}.running_var`] = recorded[i][1];
    });
    net.loadStateDict(state, { strict: false });
  } finally {
    norms.forEach(([, m]) => (m.record = null));
    recorded.flat().forEach((t) => t.dispose());
    net.eval();
  }
}

/** Mean cross-entropy of logits [N, K] against one-hot labels [N, K]. */
export function crossEntropy(logits: Tensor, oneHot: Tensor): Tensor {
  return neg(mean(sum(mul(logSoftmax(logits, 1), oneHot), 1)));
}

/** The one-cycle learning rate at `step` of `steps`: linear warm-up from lr/25 over 25%, cosine decay to 0. */
export function oneCycle(lr: number, step: number, steps: number): number {
  const warm = Math.max(1, Math.floor(steps * 0.25));
  if (step < warm) return lr / 25 + (lr - lr / 25) * step / warm;
  return lr * 0.5 * (1 + Math.cos(Math.PI * (step - warm) / Math.max(1, steps - warm)));
}
