/**
 * @file Differentiable `conv2d` and `convTranspose2d` with PyTorch semantics (NCHW input, or CHW unbatched;
 * conv2d weight [out, in, kH, kW], convTranspose2d weight [in, out, kH, kW]; no groups or dilation).
 *
 * Three kernels cover both ops and all their gradients (see kernels/conv.ts). Written with conv2d's names
 * (x → y, weight [Cout, Cin, kH, kW]): `conv2d` maps x to y, `conv2dInputGrad` maps y-shaped data back to
 * x-shaped data (the transposed convolution), and `conv2dWeightGrad` correlates x-shaped with y-shaped data.
 * convTranspose2d is the same geometry with the roles of x and y swapped: its forward is the input-gradient
 * kernel, its input gradient is the conv2d kernel, and its weight gradient is the weight-gradient kernel with
 * its two inputs exchanged. Bias gradients are sums of g over N, H, W.
 */

import {
  conv2d as conv2dKernel,
  conv2dInputGrad,
  conv2dWeightGrad,
  conv2dWeightGradSum,
  type ConvGeometry,
  type ConvOperand,
  convQuadLayout,
  convUsesVectorLoads,
  weightGradSplits,
  type WeightStrides,
} from "../../kernels/conv.ts";
import { contiguousStrides, sameQuadLayout } from "../../kernels/layout.ts";
import type { Device } from "../device.ts";
import { isGlslApi } from "../backend.ts";
import { isGradEnabled, record, sameDevice, type Shape, Tensor } from "../tensor.ts";
import { fmt } from "../shape.ts";
import { gather, reduceRaw } from "./core.ts";

export type Pair = number | [number, number];

export interface Conv2dOptions {
  /** Default 1. */
  stride?: Pair;
  /** Zero padding on each side (default 0), or "valid" (none) / "same" (output size = input size, stride 1). */
  padding?: Pair | "valid" | "same";
}

export interface ConvTranspose2dOptions {
  /** Default 1. */
  stride?: Pair;
  /** Removed from each side of the full transposed output (default 0). */
  padding?: Pair;
  /** Extra rows/columns on the bottom/right, each smaller than the stride (default 0). */
  outputPadding?: Pair;
}

function pair(op: string, name: string, v: Pair | undefined, dflt: number, min: number): [number, number] {
  const p: [number, number] = v === undefined ? [dflt, dflt] : typeof v === "number" ? [v, v] : [v[0], v[1]];
  if ((Array.isArray(v) && v.length !== 2) || p.some((x) => !Number.isInteger(x) || x < min)) {
    throw new Error(`${op}: ${name} must be an integer ≥ ${min} or a pair of them, got ${JSON.stringify(v)}`);
  }
  return p;
}

/** Input as [N, C, H, W] (an unbatched [C, H, W] input is one image). */
function batched(op: string, x: Tensor): [number, number, number, number] {
  if (x.rank === 4) return x.shape as unknown as [number, number, number, number];
  if (x.rank === 3) return [1, x.shape[0], x.shape[1], x.shape[2]];
  throw new Error(`${op}: input must be 3-D (C, H, W) or 4-D (N, C, H, W), got ${fmt(x.shape)}`);
}

/** The output shape, unbatched when the input was. */
function shaped(x: Tensor, n: number, c: number, h: number, w: number): Shape {
  return x.rank === 3 ? [c, h, w] : [n, c, h, w];
}

function checkWeightAndBias(
  op: string,
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null | undefined,
  biasLen: number,
) {
  if (weight.rank !== 4) {
    throw new Error(`${op}: weight must be 4-D, got ${fmt(weight.shape)} (input ${fmt(x.shape)})`);
  }
  if (bias && !(bias.rank === 1 && bias.shape[0] === biasLen)) {
    throw new Error(
      `${op}: bias ${fmt(bias.shape)} does not match weight ${fmt(weight.shape)} (expected [${biasLen}])`,
    );
  }
}

/** What the kernels' variant choice needs to know about a device. */
function capsOf(device: Device) {
  return {
    isCpuEmulated: device.info.isCpuEmulated,
    maxTextureDimension2D: device.info.textureInputs ? device.info.limits.maxTextureDimension2D : 0,
    glsl: isGlslApi(device.info),
  };
}

/**
 * Runs the conv2d or input-gradient kernel for geometry `g` (roles as in conv2d; `weight` is laid out
 * [g.Cout, g.Cin, kH, kW]) into `out`. On WebGPU the weight is first copied with the channel dimension that the
 * kernel tiles made contiguous ([kH, kW, Cin, Cout] for conv2d, [kH, kW, Cout, Cin] for the input gradient)
 * when that lets the registers variant load four channels at once; the copy is tiny next to the convolution.
 * (The texture variant packs the weight itself.)
 */
function runConv(
  kind: "conv2d" | "conv2dInputGrad",
  g: ConvGeometry,
  input: Tensor,
  weight: Tensor,
  bias: Tensor | null | undefined,
  out: Tensor,
  inputQuad: Tensor | null = null,
): void {
  const device = out.device;
  let w = weight, copy: Tensor | null = null, weightStrides: WeightStrides | undefined;
  if (device.kind === "webgpu") {
    const { Cout, Cin, kH, kW } = g;
    const forward = kind === "conv2d";
    const strides: WeightStrides = forward
      ? { co: 1, ci: Cout, k: Cin * Cout }
      : { co: Cin, ci: 1, k: Cin * Cout };
    if (convUsesVectorLoads(kind, { ...g, weightStrides: strides }, capsOf(device))) {
      const [sCo, sCi, sKh, sKw] = contiguousStrides([Cout, Cin, kH, kW]);
      copy = forward
        ? gather(weight, [kH, kW, Cin, Cout], [sKh, sKw, sCi, sCo])
        : gather(weight, [kH, kW, Cout, Cin], [sKh, sKw, sCo, sCi]);
      w = copy;
      weightStrides = strides;
    }
  }
  const inputs = [(inputQuad ?? input).storage, w.storage];
  if (bias) inputs.push(bias.storage);
  device.run(
    kind === "conv2d" ? conv2dKernel : conv2dInputGrad,
    { ...g, bias: !!bias, weightStrides, quadInput: inputQuad !== null },
    inputs,
    [out.storage],
  );
  copy?.dispose();
}

/** Operands of the weight gradient already in its quad layouts (see `convQuadLayout`). */
interface Quads {
  x?: Tensor;
  dy?: Tensor;
}

/** Weight-gradient split count: enough invocations to fill the adapter, none on the (serial) CPU backend. */
function splitsFor(device: Device, g: ConvGeometry): number {
  if (device.kind === "cpu") return 1;
  return weightGradSplits(g, capsOf(device));
}

/** Runs the weight-gradient kernel for geometry `g` (inputs in conv2d's roles) into a tensor of `shape`. */
function weightGrad(g: ConvGeometry, x: Tensor, dy: Tensor, shape: Shape, quads: Quads = {}): Tensor {
  const device = x.device;
  const splits = splitsFor(device, g);
  const params = { ...g, splits, xQuad: !!quads.x, dyQuad: !!quads.dy };
  const inputs = [(quads.x ?? x).storage, (quads.dy ?? dy).storage];
  if (splits === 1) {
    const dw = Tensor.empty(shape, device);
    device.run(conv2dWeightGrad, params, inputs, [dw.storage]);
    return dw;
  }
  const parts = Tensor.empty([splits, ...shape], device);
  device.run(conv2dWeightGrad, params, inputs, [parts.storage]);
  const dw = reduceRaw("sum", parts, [0], shape);
  parts.dispose();
  return dw;
}

/**
 * The weight and bias gradients of conv2d together (the bias summed over dy's channels by the weight-gradient
 * kernel from the dy it reads anyway): one dispatch, or two with split rows (the splits summed in one pass).
 */
function weightAndBiasGrad(
  g: ConvGeometry,
  x: Tensor,
  dy: Tensor,
  shape: Shape,
  quads: Quads,
): [Tensor, Tensor] {
  const device = x.device;
  const splits = splitsFor(device, g);
  const params = { ...g, splits, biasGrad: true, xQuad: !!quads.x, dyQuad: !!quads.dy };
  const inputs = [(quads.x ?? x).storage, (quads.dy ?? dy).storage];
  if (splits === 1) {
    const dw = Tensor.empty(shape, device), db = Tensor.empty([g.Cout], device);
    device.run(conv2dWeightGrad, params, inputs, [dw.storage, db.storage]);
    return [dw, db];
  }
  const parts = Tensor.empty([splits, ...shape], device), biasParts = Tensor.empty([splits, g.Cout], device);
  device.run(conv2dWeightGrad, params, inputs, [parts.storage, biasParts.storage]);
  const dw = Tensor.empty(shape, device), db = Tensor.empty([g.Cout], device);
  const A = dw.size;
  device.run(conv2dWeightGradSum, { splits, A, B: g.Cout }, [parts.storage, biasParts.storage], [
    dw.storage,
    db.storage,
  ]);
  parts.dispose();
  biasParts.dispose();
  return [dw, db];
}

/** Sum of g over every dim but the channel dim (bias gradient). */
function biasGrad(g: Tensor, channels: number): Tensor {
  const axes = g.rank === 4 ? [0, 2, 3] : [1, 2];
  return reduceRaw("sum", g, axes, [channels]);
}

/** 2-D convolution like F.conv2d(input, weight, bias, stride, padding). */
export function conv2d(x: Tensor, weight: Tensor, bias?: Tensor | null, opts: Conv2dOptions = {}): Tensor {
  const op = "conv2d";
  const device = sameDevice(op, ...(bias ? [x, weight, bias] : [x, weight]));
  const [N, C, H, W] = batched(op, x);
  checkWeightAndBias(op, x, weight, bias, weight.shape[0]);
  const [Cout, Cin, kH, kW] = weight.shape;
  if (C !== Cin) {
    throw new Error(
      `${op}: input ${fmt(x.shape)} has ${C} channels but weight ${fmt(weight.shape)} expects ${Cin}`,
    );
  }
  const [strideH, strideW] = pair(op, "stride", opts.stride, 1, 1);
  let padH: number, padW: number, Ho: number, Wo: number;
  if (opts.padding === "same") {
    if (strideH !== 1 || strideW !== 1) {
      throw new Error(`${op}: padding="same" needs stride 1, got ${opts.stride}`);
    }
    // As PyTorch: total padding k−1, the smaller half on the top/left (the extra row/column goes bottom/right).
    [padH, padW, Ho, Wo] = [Math.floor((kH - 1) / 2), Math.floor((kW - 1) / 2), H, W];
  } else {
    [padH, padW] = opts.padding === "valid" ? [0, 0] : pair(op, "padding", opts.padding, 0, 0);
    if (H + 2 * padH < kH || W + 2 * padW < kW) {
      throw new Error(
        `${op}: kernel ${kH}×${kW} of weight ${fmt(weight.shape)} is larger than the padded input ` +
          `${H + 2 * padH}×${W + 2 * padW} (input ${fmt(x.shape)}, padding ${padH},${padW})`,
      );
    }
    Ho = Math.floor((H + 2 * padH - kH) / strideH) + 1;
    Wo = Math.floor((W + 2 * padW - kW) / strideW) + 1;
  }
  const geo: ConvGeometry = { N, Cin, H, W, Cout, Ho, Wo, kH, kW, strideH, strideW, padH, padW };
  const out = Tensor.empty(shaped(x, N, Cout, Ho, Wo), device);
  const caps = capsOf(device), gpu = device.kind === "webgpu";
  const layout = (which: ConvOperand) => gpu ? convQuadLayout(which, geo, caps) : null;
  // x straight from a producer that can write the texture variant's layout (a deferred groupNorm, a pending
  // elementwise result): no packing pass. It is kept for the weight gradient, so not taken where that reads x
  // in another layout (the forward's packed texture serves both then).
  const xLayout = layout(["conv2d", "x"]);
  const wgX = weight.requiresGrad && isGradEnabled() ? layout(["conv2dWeightGrad", "x"]) : null;
  const xShared = wgX === null || (xLayout !== null && sameQuadLayout(wgX, xLayout));
  let xq = xLayout && xShared ? x.quadForm(xLayout) : null;
  runConv("conv2d", geo, x, weight, bias, out, xq);
  if (xq && !wgX) xq = disposed(xq);

  const result = record(out, op, bias ? [x, weight, bias] : [x, weight], (g) => {
    // dy likewise, in the input gradient's layout (or, without one, the weight gradient's).
    const dyLayout = layout(x.requiresGrad ? ["conv2dInputGrad", "dy"] : ["conv2dWeightGrad", "dy"]);
    let dyq = dyLayout && g.quadForm(dyLayout);
    let dx: Tensor | null = null;
    if (x.requiresGrad) {
      dx = Tensor.empty(x.shape, device);
      runConv("conv2dInputGrad", geo, g, weight, null, dx, dyq);
      const wgDy = dyq && weight.requiresGrad ? layout(["conv2dWeightGrad", "dy"]) : null;
      if (dyq && !(wgDy && sameQuadLayout(wgDy, dyLayout!))) dyq = disposed(dyq);
    }
    const quads = { x: xq ?? undefined, dy: dyq ?? undefined };
    let grads: (Tensor | null)[];
    if (bias?.requiresGrad && weight.requiresGrad) {
      grads = [dx, ...weightAndBiasGrad(geo, x, g, weight.shape, quads)];
    } else {
      const dw = weight.requiresGrad ? weightGrad(geo, x, g, weight.shape, quads) : null;
      grads = bias ? [dx, dw, bias.requiresGrad ? biasGrad(g, Cout) : null] : [dx, dw];
    }
    xq?.dispose();
    dyq?.dispose();
    return grads;
  });
  if (!result.requiresGrad) xq?.dispose();
  return result;
}

function disposed(t: Tensor): null {
  t.dispose();
  return null;
}

/** Transposed 2-D convolution like F.conv_transpose2d(input, weight, bias, stride, padding, output_padding). */
export function convTranspose2d(
  x: Tensor,
  weight: Tensor,
  bias?: Tensor | null,
  opts: ConvTranspose2dOptions = {},
): Tensor {
  const op = "convTranspose2d";
  const device = sameDevice(op, ...(bias ? [x, weight, bias] : [x, weight]));
  const [N, C, H, W] = batched(op, x);
  checkWeightAndBias(op, x, weight, bias, weight.shape[1]);
  const [Cin, Cout, kH, kW] = weight.shape;
  if (C !== Cin) {
    throw new Error(
      `${op}: input ${fmt(x.shape)} has ${C} channels but weight ${fmt(weight.shape)} expects ${Cin}`,
    );
  }
  const [strideH, strideW] = pair(op, "stride", opts.stride, 1, 1);
  const [padH, padW] = pair(op, "padding", opts.padding, 0, 0);
  const [opH, opW] = pair(op, "outputPadding", opts.outputPadding, 0, 0);
  if (opH >= strideH || opW >= strideW) {
    throw new Error(
      `${op}: outputPadding (${opH}, ${opW}) must be smaller than stride (${strideH}, ${strideW})`,
    );
  }
  const Hout = (H - 1) * strideH - 2 * padH + kH + opH;
  const Wout = (W - 1) * strideW - 2 * padW + kW + opW;
  if (Hout < 1 || Wout < 1) {
    throw new Error(
      `${op}: output size ${Hout}×${Wout} is not positive (input ${fmt(x.shape)}, weight ${
        fmt(weight.shape)
      }, ` +
        `stride ${strideH},${strideW}, padding ${padH},${padW})`,
    );
  }
  // conv2d's geometry with the roles swapped: its "x" is our output, its "y" is our input.
  const geo: ConvGeometry = {
    N,
    Cin: Cout,
    H: Hout,
    W: Wout,
    Cout: Cin,
    Ho: H,
    Wo: W,
    kH,
    kW,
    strideH,
    strideW,
    padH,
    padW,
  };
  const out = Tensor.empty(shaped(x, N, Cout, Hout, Wout), device);
  runConv("conv2dInputGrad", geo, x, weight, bias, out);

  return record(out, op, bias ? [x, weight, bias] : [x, weight], (g) => {
    let dx: Tensor | null = null;
    if (x.requiresGrad) {
      dx = Tensor.empty(x.shape, device);
      runConv("conv2d", geo, g, weight, null, dx);
    }
    const dw = weight.requiresGrad ? weightGrad(geo, g, x, weight.shape) : null;
    if (!bias) return [dx, dw];
    return [dx, dw, bias.requiresGrad ? biasGrad(g, Cout) : null];
  });
}
