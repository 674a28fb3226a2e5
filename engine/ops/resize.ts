/**
 * @file `interpolateBilinear`: F.interpolate(x, size=[H, W], mode="bilinear", align_corners=…) on NCHW tensors,
 * differentiable. One gather kernel per direction from `kernels/resize.ts`. Like PyTorch's bilinear mode it takes
 * 4-D input only. FID's Inception network resizes every image to 299×299 with it: pytorch-fid with PyTorch's
 * default (align_corners = False, half-pixel centres), NVlabs' detector with TensorFlow 1's legacy resize
 * (`halfPixelCenters: false`, src = o·in/out), which the option reproduces.
 */

import {
  type BilinearCoordinates,
  type BilinearParams,
  bilinearResize,
  bilinearResizeBackward,
} from "../../kernels/resize.ts";
import { record, Tensor } from "../tensor.ts";
import { fmt } from "../shape.ts";

export interface InterpolateBilinearOptions {
  /** PyTorch's align_corners (default false: pixel centres line up, the scale is in/out). */
  alignCorners?: boolean;
  /**
   * TensorFlow's half_pixel_centers, for alignCorners false only: true (default) is PyTorch's mapping
   * src = (o + ½)·in/out − ½; false is TF1's legacy src = o·in/out.
   */
  halfPixelCenters?: boolean;
}

/**
 * F.interpolate(x, size=size, mode="bilinear", align_corners=opts.alignCorners ?? false). x: [N, C, H, W];
 * size: the output [H', W'] (or one number for both). Returns [N, C, H', W']. With `halfPixelCenters: false`,
 * TF1's tf.image.resize_bilinear(align_corners=False) instead.
 */
export function interpolateBilinear(
  x: Tensor,
  size: number | readonly [number, number],
  opts: InterpolateBilinearOptions = {},
): Tensor {
  const op = "interpolateBilinear";
  if (!(x instanceof Tensor)) throw new Error(`${op}: expected a Tensor input`);
  if (x.disposed) throw new Error(`${op}: input of shape ${fmt(x.shape)} was used after dispose()`);
  if (x.rank !== 4) throw new Error(`${op}: input ${fmt(x.shape)} must be [N, C, H, W]`);
  const out: number[] = typeof size === "number" ? [size, size] : [...size];
  if (out.length !== 2 || out.some((d) => !Number.isInteger(d) || d < 1)) {
    throw new Error(`${op}: size must be a positive integer or a pair of them, got ${JSON.stringify(size)}`);
  }
  const alignCorners = opts.alignCorners ?? false, halfPixelCenters = opts.halfPixelCenters ?? !alignCorners;
  for (const [name, v] of [["alignCorners", alignCorners], ["halfPixelCenters", halfPixelCenters]]) {
    if (typeof v !== "boolean") throw new Error(`${op}: ${name} must be a boolean, got ${v}`);
  }
  if (alignCorners && halfPixelCenters) {
    throw new Error(`${op}: halfPixelCenters needs alignCorners false (as in TensorFlow)`);
  }
  const coordinates: BilinearCoordinates = alignCorners
    ? "align-corners"
    : halfPixelCenters
    ? "half-pixel"
    : "asymmetric";
  const [N, C, H, W] = x.shape;
  const params: BilinearParams = { planes: N * C, H, W, Ho: out[0], Wo: out[1], coordinates };
  const y = Tensor.empty([N, C, out[0], out[1]], x.device);
  x.device.run(bilinearResize, params, [x.storage], [y.storage]);
  return record(y, op, [x], (g) => {
    const dx = Tensor.empty(x.shape, x.device);
    x.device.run(bilinearResizeBackward, params, [g.storage], [dx.storage]);
    return [dx];
  });
}
