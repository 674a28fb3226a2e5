/**
 * @file The peer library measured in the same run: TensorFlow.js's WebGPU backend, on the same adapter. Only
 * the bench imports it. Timed with the same harness; tensors are made once, outside the timed loop.
 */

import * as tf from "@tensorflow/tfjs-core";
import "@tensorflow/tfjs-backend-webgpu";
import { timePerIteration, type TimingOptions } from "./harness.ts";

export const PEER = "tfjs-webgpu";

let ready: Promise<void> | null = null;
async function init() {
  ready ??= (async () => {
    if (!(await tf.setBackend("webgpu"))) throw new Error("tfjs: the webgpu backend did not initialise");
    await tf.ready();
  })();
  await ready;
}

/** Times `make()` (which returns the op's output) with tfjs's own memory management. */
async function timeTf(make: () => tf.Tensor, opts?: TimingOptions): Promise<number> {
  let last: tf.Tensor | null = null;
  const { ms } = await timePerIteration(
    () => {
      last?.dispose();
      last = make();
    },
    async () => {
      await last!.data();
    },
    opts,
  );
  return ms;
}

/** ms per n×n×n matmul. */
export async function tfMatmul(n: number, opts?: TimingOptions): Promise<number> {
  await init();
  const a = tf.randomNormal([n, n]), b = tf.randomNormal([n, n]);
  const ms = await timeTf(() => tf.matMul(a, b), opts);
  tf.dispose([a, b]);
  return ms;
}

/** ms per conv2d forward, NCHW input [N, C, H, W], 'same' padding, stride 1. */
export async function tfConv2d(
  N: number,
  C: number,
  H: number,
  W: number,
  Cout: number,
  k: number,
  opts?: TimingOptions,
): Promise<number> {
  await init();
  // tfjs is fastest in its native NHWC layout; give it that.
  const x = tf.randomNormal([N, H, W, C]) as tf.Tensor4D, w = tf.randomNormal([k, k, C, Cout]) as tf.Tensor4D;
  const ms = await timeTf(() => tf.conv2d(x, w, 1, "same"), opts);
  tf.dispose([x, w]);
  return ms;
}
