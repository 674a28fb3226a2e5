/**
 * @file groupNorm and layerNorm (F.group_norm / F.layer_norm semantics), both on the row-normalization kernel
 * in `kernels/norm.ts`: the input is seen as rows (groupNorm: one per (sample, group); layerNorm: one per
 * leading index) that are normalized by their own mean and biased variance, then scaled and shifted per channel.
 *
 * The forward saves per-row statistics for the backward (the mean relative to the row's first element, and rstd;
 * see the kernel file for why). dx is one fused kernel; dweight and dbias (Σ g·x̂ and Σ g over everything but the
 * channel) come as [chunks, C] partial sums, either from that same dx kernel (per sample, on CPU-emulated
 * adapters: no extra pass over x and g) or from a partial-sum kernel, then one small kernel sums the chunks.
 *
 * `groupNormSilu` is silu(groupNorm(x)) from the same kernels (the UNet blocks' norm → SiLU): the forward
 * writes the activation directly, and the backward multiplies g by silu'(pre) inside the dx kernel, which
 * recomputes the pre-activation from x and the statistics it reads anyway; only where the parameter gradients
 * come from the separate partial-sum kernel (real GPUs, short rows, or x without a gradient) does the forward
 * also save the pre-activation and the backward take g·silu'(pre) as one elementwise pass first.
 */

import {
  fusedParamPartials,
  paramGradChunkRows,
  paramGradChunks,
  type RowLayout,
  rowNorm,
  rowNormBackward,
  rowNormParamGrad,
  rowNormParamSum,
  samplesSummedInKernel,
} from "../../kernels/norm.ts";
import { bin, inp, un } from "../../kernels/elementwise.ts";
import { isGradEnabled, record, sameDevice, type Shape, sizeOf, Tensor } from "../tensor.ts";
import type { Storage } from "../device.ts";
import { quadBufferElements, type QuadLayout } from "../../kernels/layout.ts";
import { fmt, sameShape } from "../shape.ts";
import { map, packsConvInputs, reduceRaw, view } from "./core.ts";

/** Optional affine parameters, `null` and `undefined` meaning absent, as in PyTorch. */
type Maybe = Tensor | null | undefined;

interface NormPlan {
  layout: RowLayout;
  /** x seen as [outer, channels, spatial] for reducing dweight/dbias over axes 0 and 2. */
  channelView: [number, number, number];
  /** Shape of weight and bias. */
  paramShape: Shape;
}

function checkParam(op: string, name: string, t: Maybe, want: Shape, x: Tensor) {
  if (t && !sameShape(t.shape, want)) {
    throw new Error(
      `${op}: ${name} has shape ${fmt(t.shape)}, expected ${fmt(want)} for input ${fmt(x.shape)}`,
    );
  }
}

/**
 * Runs the forward kernel and attaches the backward. With `silu` the output is silu(norm(x)) from the same
 * kernel; its backward takes silu' inside the dx kernel (recomputing the pre-activation from x and the
 * statistics) where that kernel also gives the parameter gradients (`fusedParamPartials`) or none are needed,
 * and otherwise multiplies g by silu' of a pre-activation the forward saved.
 */
function rowNormOp(
  op: string,
  x: Tensor,
  plan: NormPlan,
  weight: Maybe,
  bias: Maybe,
  eps: number,
  silu = false,
): Tensor {
  if (!(x instanceof Tensor)) throw new Error(`${op}: expected a Tensor input`);
  if (!(eps >= 0)) throw new Error(`${op}: eps must be a non-negative number, got ${eps}`);
  checkParam(op, "weight", weight, plan.paramShape, x);
  checkParam(op, "bias", bias, plan.paramShape, x);
  const w = weight ?? null, b = bias ?? null;
  const params = [w, b].filter((t): t is Tensor => t !== null);
  const device = sameDevice(op, x, ...params);
  const { layout } = plan;
  const needW = w?.requiresGrad ?? false, needB = b?.requiresGrad ?? false;
  const taped = isGradEnabled() && (x.requiresGrad || needW || needB);
  const siluInKernel = x.requiresGrad &&
    (!(needW || needB) || fusedParamPartials(layout, device.info.isCpuEmulated));
  const pre = silu && taped && !siluInKernel ? Tensor.empty(x.shape, device) : null;
  const shiftedMean = Tensor.empty([layout.rows], device), rstd = Tensor.empty([layout.rows], device);
  const kernelParams = {
    ...layout,
    hasWeight: w !== null,
    hasBias: b !== null,
    eps,
    silu,
    savePre: pre !== null,
  };
  const inputs = [x, ...params];
  let ran = false;
  // The statistics go to shiftedMean and rstd while the backward may need them, else to scratch buffers (a
  // deferred output computed after an untaped forward has returned).
  const run = (ins: Storage[], out: Storage, quadOut?: QuadLayout) => {
    const keep = !shiftedMean.disposed;
    const m = keep ? shiftedMean.storage : device.alloc(layout.rows);
    const r = keep ? rstd.storage : device.alloc(layout.rows);
    device.run(rowNorm, { ...kernelParams, quadOut }, ins, [out, m, r, ...(pre ? [pre.storage] : [])]);
    if (!keep) [m, r].forEach((t) => device.release(t));
    ran = true;
  };
  let y: Tensor;
  if (pre === null && writesQuads(x, layout)) {
    // Deferred: a convolution reading y may take it in its packed layout straight from the kernel.
    // It reads its leaves' storage: x may be disposed (or discarded by a forward) before y is computed.
    const leaves = inputs.map((t) => ({ ref: t.storageRef }));
    const ins = () => leaves.map((l) => l.ref.storage);
    y = Tensor.deferred(device, x.shape, {
      leaves,
      run: (out) => run(ins(), out),
      runQuad(l) {
        if (!(l.N === x.shape[0] && l.C === x.shape[1] && l.H === x.shape[2] && l.W === x.shape[3])) {
          return null;
        }
        const out = device.alloc(quadBufferElements(l));
        run(ins(), out, l);
        return out;
      },
    });
  } else {
    y = Tensor.empty(x.shape, device);
    run(inputs.map((t) => t.storage), y.storage);
  }
  const out = record(y, op, [x, ...params], (gOut) => {
    if (!ran) {
      // The statistics come with the output; a deferred output nothing read has not been computed yet.
      const scratch = device.alloc(y.size);
      run(inputs.map((t) => t.storage), scratch);
      device.release(scratch);
    }
    // Without silu in the kernels: the gradient of the normalized output, g·silu'(pre).
    const g = pre ? map(bin("mul", inp(0), un("siluGrad", inp(1))), [gOut, pre]) : gOut;
    const siluGrad = silu && !pre;
    let dx: Tensor | null = null, dw: Tensor | null = null, db: Tensor | null = null;
    if (siluGrad && !(needW || needB)) {
      dx = normInputGrad(x, g, shiftedMean, rstd, w, b, layout, true);
    } else if (
      x.requiresGrad && (needW || needB) &&
      (siluGrad || fusedParamPartials(layout, device.info.isCpuEmulated))
    ) {
      [dx, dw, db] = fusedGrads(x, g, shiftedMean, rstd, w, b, plan, siluGrad);
      if (!needW) dw = disposed(dw);
      if (!needB) db = disposed(db);
    } else {
      dx = x.requiresGrad ? normInputGrad(x, g, shiftedMean, rstd, w, null, layout, false) : null;
      // dbias alone is a plain sum of g; with dweight it comes from the same pass.
      [dw, db] = needW
        ? paramGrads(x, g, shiftedMean, rstd, plan, needB)
        : [null, needB ? channelSum(g, plan) : null];
    }
    if (g !== gOut) g.dispose();
    const grads: (Tensor | null)[] = [dx];
    if (w) grads.push(dw);
    if (b) grads.push(db);
    shiftedMean.dispose();
    rstd.dispose();
    pre?.dispose();
    return grads;
  });
  if (!out.requiresGrad) {
    shiftedMean.dispose();
    rstd.dispose();
    pre?.dispose();
  }
  return out;
}

/**
 * Whether the forward of groupNorm over `x` is deferred so that its output can be written in a convolution's
 * padded channel-quad layout (kernels/layout.ts): where convolutions pack their inputs, for [N, C, H, W] with
 * whole channel quads per group and rows of whole vec4s.
 */
function writesQuads(x: Tensor, layout: RowLayout): boolean {
  return packsConvInputs(x.device) && x.rank === 4 && layout.channelsPerGroup % 4 === 0 &&
    layout.spatial === x.shape[2] * x.shape[3] && layout.groups * layout.channelsPerGroup === x.shape[1] &&
    x.shape[3] % 4 === 0;
}

function disposed(t: Tensor): null {
  t.dispose();
  return null;
}

/** dx alone; with `silu`, g is the gradient of silu(pre) and the bias (if any) is needed for pre. */
function normInputGrad(
  x: Tensor,
  g: Tensor,
  shiftedMean: Tensor,
  rstd: Tensor,
  w: Tensor | null,
  b: Tensor | null,
  layout: RowLayout,
  silu: boolean,
) {
  const dx = Tensor.empty(x.shape, x.device);
  const inputs = [x, g, shiftedMean, rstd, ...(w ? [w] : []), ...(silu && b ? [b] : [])];
  x.device.run(
    rowNormBackward,
    { ...layout, hasWeight: w !== null, silu, hasBias: silu && b !== null },
    inputs.map((t) => t.storage),
    [dx.storage],
  );
  return dx;
}

/** Sums a tensor laid out like x over everything but the channel, shaped like the affine parameters. */
function channelSum(t: Tensor, plan: NormPlan): Tensor {
  const v = view(t, plan.channelView);
  const s = reduceRaw("sum", v, [0, 2], plan.paramShape);
  v.dispose();
  return s;
}

/**
 * dweight = Σ g·x̂ and dbias = Σ g over samples and spatial positions: per-chunk partial sums [chunks, C] from
 * one kernel (x̂ recomputed from the saved statistics), summed over the chunks when there is more than one.
 */
function paramGrads(
  x: Tensor,
  g: Tensor,
  shiftedMean: Tensor,
  rstd: Tensor,
  plan: NormPlan,
  wantBias: boolean,
): [Tensor, Tensor | null] {
  const params = { ...plan.layout, chunkRows: paramGradChunkRows(plan.layout, x.device.info.isCpuEmulated) };
  const chunks = paramGradChunks(params);
  const partialShape = [chunks, plan.channelView[1]];
  const pw = Tensor.empty(partialShape, x.device), pb = Tensor.empty(partialShape, x.device);
  x.device.run(rowNormParamGrad, params, [x, g, shiftedMean, rstd].map((t) => t.storage), [
    pw.storage,
    pb.storage,
  ]);
  const [dw, db] = sumPartials(pw, pb, chunks, plan);
  return [dw, wantBias ? db : disposed(db)];
}

/**
 * dx, dweight and dbias from one pass over x and g that also writes per-sample partials [N, C] of Σ g·x̂ and
 * Σ g and, where all samples of a group share a workgroup, their sums; otherwise one small dispatch sums them.
 */
function fusedGrads(
  x: Tensor,
  g: Tensor,
  shiftedMean: Tensor,
  rstd: Tensor,
  w: Tensor | null,
  b: Tensor | null,
  plan: NormPlan,
  silu: boolean,
): [Tensor, Tensor, Tensor] {
  const { layout } = plan;
  const outer = layout.rows / layout.groups, partialShape = [outer, plan.channelView[1]];
  const dx = Tensor.empty(x.shape, x.device);
  const pw = Tensor.empty(partialShape, x.device), pb = Tensor.empty(partialShape, x.device);
  const dw = Tensor.empty(plan.paramShape, x.device), db = Tensor.empty(plan.paramShape, x.device);
  const inputs = [x, g, shiftedMean, rstd, ...(w ? [w] : []), ...(silu && b ? [b] : [])];
  x.device.run(
    rowNormBackward,
    { ...layout, hasWeight: w !== null, paramPartials: true, silu, hasBias: silu && b !== null },
    inputs.map((t) => t.storage),
    [dx, pw, pb, dw, db].map((t) => t.storage),
  );
  if (!samplesSummedInKernel(layout)) runParamSum(pw, pb, outer, dw, db);
  pw.dispose();
  pb.dispose();
  return [dx, dw, db];
}

/** dw, db = the sums over the chunks of [chunks, C] partials (one dispatch for both). */
function runParamSum(pw: Tensor, pb: Tensor, chunks: number, dw: Tensor, db: Tensor) {
  pw.device.run(rowNormParamSum, { chunks, channels: dw.size }, [pw.storage, pb.storage], [
    dw.storage,
    db.storage,
  ]);
}

/** Sums [chunks, C] partials of dweight and dbias over the chunks, consuming the partials. */
function sumPartials(pw: Tensor, pb: Tensor, chunks: number, plan: NormPlan): [Tensor, Tensor] {
  let dw: Tensor, db: Tensor;
  if (chunks === 1) {
    dw = view(pw, plan.paramShape);
    db = view(pb, plan.paramShape);
  } else {
    dw = Tensor.empty(plan.paramShape, pw.device);
    db = Tensor.empty(plan.paramShape, pw.device);
    runParamSum(pw, pb, chunks, dw, db);
  }
  pw.dispose();
  pb.dispose();
  return [dw, db];
}

/** The row layout of groupNorm over `x` with `numGroups` groups (validated). */
function groupPlan(op: string, x: Tensor, numGroups: number): NormPlan {
  if (!(x instanceof Tensor)) throw new Error(`${op}: expected a Tensor input`);
  if (x.rank < 2) throw new Error(`${op}: input ${fmt(x.shape)} must be [N, C, ...spatial] (rank ≥ 2)`);
  const [N, C] = x.shape;
  if (!Number.isInteger(numGroups) || numGroups < 1) {
    throw new Error(`${op}: numGroups must be a positive integer, got ${numGroups}`);
  }
  if (C % numGroups !== 0) {
    throw new Error(
      `${op}: the ${C} channels of input ${fmt(x.shape)} are not divisible by numGroups ${numGroups}`,
    );
  }
  const spatial = sizeOf(x.shape.slice(2));
  const channelsPerGroup = C / numGroups;
  return {
    layout: { rows: N * numGroups, groups: numGroups, channelsPerGroup, spatial },
    channelView: [N, C, spatial],
    paramShape: [C],
  };
}

/**
 * F.group_norm: x [N, C, ...spatial] normalized over each group of C/numGroups channels (and all spatial
 * positions), then weight[c]·x̂ + bias[c] with weight and bias of shape [C].
 */
export function groupNorm(x: Tensor, numGroups: number, weight?: Maybe, bias?: Maybe, eps = 1e-5): Tensor {
  return rowNormOp("groupNorm", x, groupPlan("groupNorm", x, numGroups), weight, bias, eps);
}

/**
 * `silu(groupNorm(x, numGroups, weight, bias, eps))` in one kernel, and its backward without a pass for the
 * activation (the UNet blocks' norm → SiLU).
 */
export function groupNormSilu(
  x: Tensor,
  numGroups: number,
  weight?: Maybe,
  bias?: Maybe,
  eps = 1e-5,
): Tensor {
  return rowNormOp("groupNormSilu", x, groupPlan("groupNormSilu", x, numGroups), weight, bias, eps, true);
}

/**
 * F.layer_norm: x normalized over its trailing dims `normalizedShape` (a number means one trailing dim), then
 * weight·x̂ + bias with weight and bias of shape `normalizedShape`.
 */
export function layerNorm(
  x: Tensor,
  normalizedShape: number | readonly number[],
  weight?: Maybe,
  bias?: Maybe,
  eps = 1e-5,
): Tensor {
  if (!(x instanceof Tensor)) throw new Error("layerNorm: expected a Tensor input");
  const norm = typeof normalizedShape === "number" ? [normalizedShape] : [...normalizedShape];
  const k = norm.length;
  if (k === 0 || k > x.rank || !sameShape(x.shape.slice(x.rank - k), norm)) {
    throw new Error(
      `layerNorm: normalized shape ${fmt(norm)} does not match the trailing dims of input ${fmt(x.shape)}`,
    );
  }
  const cols = sizeOf(norm);
  const rows = x.size / cols;
  const plan: NormPlan = {
    layout: { rows, groups: 1, channelsPerGroup: cols, spatial: 1 },
    channelView: [rows, cols, 1],
    paramShape: norm,
  };
  return rowNormOp("layerNorm", x, plan, weight, bias, eps);
}
