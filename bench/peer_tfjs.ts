/**
 * @file The peer library measured in the same run: TensorFlow.js's WebGPU backend, on the same adapter. Only
 * the bench imports it. Each op is a `Workload` for the same harness; tensors are made once, outside the timed
 * loop.
 */

import * as tf from "@tensorflow/tfjs-core";
import "@tensorflow/tfjs-backend-webgpu";
import type { Workload } from "./harness.ts";

let ready: Promise<void> | null = null;
async function init() {
  ready ??= (async () => {
    if (!(await tf.setBackend("webgpu"))) throw new Error("tfjs: the webgpu backend did not initialise");
    await tf.ready();
  })();
  await ready;
}

/** A tfjs op as a workload: `make()` returns the op's output, which the next step disposes. */
export interface PeerWorkload extends Workload {
  dispose(): void;
}

function tfWorkload(make: () => tf.Tensor, inputs: tf.Tensor[]): PeerWorkload {
  let last: tf.Tensor | null = null;
  return {
    step() {
      last?.dispose();
      last = make();
    },
    async sync() {
      await last!.data();
    },
    dispose() {
      last?.dispose();
      tf.dispose(inputs);
    },
  };
}

/** An n×n×n matmul. */
export async function tfMatmul(n: number): Promise<PeerWorkload> {
  await init();
  const a = tf.randomNormal([n, n]), b = tf.randomNormal([n, n]);
  return tfWorkload(() => tf.matMul(a, b), [a, b]);
}

/** A conv2d forward, NCHW input [N, C, H, W], 'same' padding, stride 1. */
export async function tfConv2d(
  N: number,
  C: number,
  H: number,
  W: number,
  Cout: number,
  k: number,
): Promise<PeerWorkload> {
  await init();
  // tfjs is fastest in its native NHWC layout; give it that.
  const x = tf.randomNormal([N, H, W, C]) as tf.Tensor4D, w = tf.randomNormal([k, k, C, Cout]) as tf.Tensor4D;
  return tfWorkload(() => tf.conv2d(x, w, 1, "same"), [x, w]);
}
