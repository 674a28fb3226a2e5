/**
 * @file The public API of the engine (see DESIGN.md, "Public API"): devices, tensors, functional ops with
 * PyTorch semantics (NCHW, OIHW, NumPy broadcasting), autograd, nn modules, optimizers and safetensors I/O.
 */

import "./autograd.ts";

export {
  AllocationError,
  Device,
  type DeviceInfo,
  type DeviceOptions,
  getDefaultDevice,
  type MemoryStats,
} from "./device.ts";
export {
  discard,
  forwardScope,
  isGradEnabled,
  keep,
  noGrad,
  scope,
  type Shape,
  Tensor,
  type TensorOptions,
} from "./tensor.ts";
export { arange, full, ones, tensor, zeros } from "./creation.ts";
export * from "./ops/elementwise.ts";
export * from "./ops/reduce.ts";
export * from "./ops/shape.ts";
export * from "./ops/matmul.ts";
export * from "./ops/conv.ts";
export * from "./ops/norm.ts";
export * from "./ops/softmax.ts";
export * from "./ops/pool.ts";
export * from "./ops/resize.ts";
export * from "./ops/attention.ts";
export * from "./ops/loss.ts";
export * from "./ops/random.ts";
export * as nn from "./nn.ts";
export * as optim from "./optim.ts";
export * from "./safetensors.ts";
