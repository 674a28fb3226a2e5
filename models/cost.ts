/**
 * @file Model cost counted from the spec, without allocating anything (models/unet.ts `planLayers`): parameters
 * and multiply-accumulates (MACs) of one forward at any DDSM width, and the memory a training step or a batch of
 * sampling holds. `checkMemory` compares that estimate with a ceiling and the device's limits before anything is
 * allocated, so an absurd network or batch fails at once naming the field to change, instead of taking minutes
 * and gigabytes first (train, sample, eval and the search's trials all call it). Latency, which needs a device,
 * is measured in eval/cost.ts.
 *
 * MAC convention (batch 1, one forward of the denoiser network F):
 *
 * - convolution: Cin·Cout·kh·kw per output pixel (Cin·Cout·k²·Ho·Wo), at the channels the width uses;
 * - linear: in·out;
 * - bias: one MAC per output element of a layer with a bias (the add into the accumulator);
 * - GroupNorm: two MACs per element: one accumulating Σ(x − μ)² for the variance, one applying x·a + b with
 *   a = γ/σ, b = β − μ·a;
 * - attention: QKᵀ and A·V, 2·L²·C for L = H·W positions and C channels, reported separately (`attention`)
 *   and not in `macs`, as DDSM's tables do (their profiler, like most, sees only layers);
 * - free: activations, residual sums, softmax, resampling without weights, embeddings' sines.
 *
 * For DDSM's CIFAR-10 supernet (models/presets.ts `ddsmCifar10`) this gives 6065.5 / 3415.3 / 1521.0 /
 * 382.6 M MACs at widths 1 / 0.75 / 0.5 / 0.25, against the paper's 6.07 G / 3.42 G / 1.52 G / 382.5 M (all
 * within 0.15%, and each of the first three rounds to the published figure). The plain conv + linear count
 * (DDSM's profile.py, which skips norms and biases) gives 6054.0 / 3406.7 / 1515.3 / 379.7 M, and conv + linear
 * + one MAC per GroupNorm element gives 6057.3 / 3409.2 / 1517.0 / 380.6 M (the 0.25 width 0.51% low); neither
 *
 * Memory (float32, 4 bytes a value), an upper bound by design:
 *
 * - the weights: training holds 7 copies of the parameters (network, gradients, Adam's two moments, the EMA,
 *   the EMA network, and the weight gradients' partial sums), sampling 2 (the network and the host copy it is
 *   loaded from);
 * - a block's working set: 3 values per element of each conv output and each GroupNorm input (the tensor and
 *   the elementwise ops around it) and 3 per attention score (q·kᵀ, scaled, softmax). A taped forward keeps
 *   every block's set for backward; a forward without a tape keeps the encoder's outputs (the skips) and one
 *   block's set at a time (each module's forward frees its intermediates as it returns);
 * - 10 images' worth of sampler and loss state per image (x, the denoised image, slopes, noise).
 *
 * Against the device's measured peak (tests/cost_test.ts) this is 1–3× the real figure: close enough to refuse
 * what cannot run, never below what does.
 */

import { z } from "zod";
import {
  parseUNetSpec,
  planLayers,
  type PlannedLayer,
  unetLayout,
  type UNetSpec,
  type UNetSpecInput,
} from "./unet.ts";
import { parseConfig } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";

/** What counts as a MAC beyond the convolution and linear products (see the file comment). */
export const MacConventionSchema = z.strictObject({
  /** Count one MAC per output element of every layer with a bias. */
  bias: z.boolean().default(true),
  /** MACs per GroupNorm element: 2 (variance + normalise), 1 (normalise only), 0 (norms are free). */
  groupNormPerElement: z.number().int().min(0).max(4).default(2),
});
export type MacConvention = z.input<typeof MacConventionSchema>;

/** Parameters and MACs of one forward at one width. */
export interface UNetCost {
  width: number;
  /** Parameters the forward at this width uses (the whole network's at width 1). */
  parameters: number;
  /** conv + linear + bias + GroupNorm MACs (the DDSM-comparable figure, attention excluded). */
  macs: number;
  /** The parts of `macs`, and attention's QKᵀ and A·V, which `macs` leaves out. */
  breakdown: { conv: number; linear: number; bias: number; groupNorm: number; attention: number };
  /** macs + attention. */
  macsWithAttention: number;
}

function parseConvention(c: MacConvention): z.output<typeof MacConventionSchema> {
  return parseConfig(MacConventionSchema, c, "MacConvention");
}

/** Parameters a planned layer uses at its width. */
function layerParameters(l: PlannedLayer): number {
  if (l.kind === "norm") return 2 * l.in;
  const weights = l.in * l.out * l.kernel * l.kernel;
  return weights + (l.bias ? l.out : 0);
}

/**
 * Parameters and MACs of one forward (batch 1) of the UNet described by `spec` at DDSM `width`, from
 * `planLayers` (nothing is allocated).
 */
export function unetCost(
  spec: UNetSpecInput | UNetSpec,
  width = 1,
  convention: MacConvention = {},
): UNetCost {
  return layersCost(planLayers(spec, width), width, convention);
}

/**
 * Parameters and MACs of one forward (batch 1) through `layers` (planned layers with the channels they run at:
 * `planLayers`, or the blocks of a distilled student, models/blocks_cut.ts `studentPlan`).
 */
export function layersCost(
  layers: readonly PlannedLayer[],
  width = 1,
  convention: MacConvention = {},
): UNetCost {
  const conv = parseConvention(convention);
  const b = { conv: 0, linear: 0, bias: 0, groupNorm: 0, attention: 0 };
  let parameters = 0;
  for (const l of layers) {
    parameters += layerParameters(l);
    const pixels = l.res * l.res;
    if (l.kind === "conv") {
      b.conv += l.in * l.out * l.kernel * l.kernel * pixels;
      if (l.bias) b.bias += l.out * pixels;
      // Attention over the L = res² positions of this qkv projection: QKᵀ and A·V, L²·C each.
      if (l.name.endsWith(".qkv")) b.attention += 2 * pixels * pixels * (l.out / 3);
    } else if (l.kind === "linear") {
      b.linear += l.in * l.out;
      if (l.bias) b.bias += l.out;
    } else b.groupNorm += l.in * pixels;
  }
  b.groupNorm *= conv.groupNormPerElement;
  if (!conv.bias) b.bias = 0;
  const macs = b.conv + b.linear + b.bias + b.groupNorm;
  return { width, parameters, macs, breakdown: b, macsWithAttention: macs + b.attention };
}

const UNITS: [number, string][] = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];

/** A count with its magnitude: "52,431,360 (52.4 M)". */
export function formatCount(n: number): string {
  const exact = Math.round(n).toLocaleString("en-US");
  return Math.abs(n) >= 1e3 ? `${exact} (${magnitude(n)})` : exact;
}

/** A count to three digits with its unit: "52.4 M", "189 k", "12". */
function magnitude(n: number): string {
  const u = UNITS.find(([v]) => Math.abs(n) >= v);
  return u ? `${Number((n / u[0]).toPrecision(3))} ${u[1]}` : String(Math.round(n));
}

// ---------------------------------------------------------------------------------------------------------------
// Memory.

/** Bytes per value (float32; the CPU backend's float64 mode is for gradient checks of tiny tensors). */
const BYTES = 4;
/** Copies of the parameters training holds: network, gradients, Adam's two moments, EMA, EMA network, and a
 * transient copy for the weight gradients' partial sums. Sampling: the network and the host copy it loads. */
const PARAMETER_COPIES = { train: 7, sample: 2 } as const;
/** Values per element of a conv output or a GroupNorm input in a block's working set (see the file comment). */
const PER_ELEMENT = 3;
/** Values per attention score: q·kᵀ, its scaled copy and the softmax. */
const PER_SCORE = 3;
/** Images' worth of sampler and loss state (x, the denoised image, slopes, noise, the loss's terms). */
const IMAGE_COPIES = 10;

/** Training keeps every forward activation for backward; sampling runs forwards without a tape. */
export type MemoryMode = "train" | "sample";

/** The estimated memory of a network at a batch size (see the file comment), and what it is made of. */
export interface MemoryEstimate {
  mode: MemoryMode;
  parameters: number;
  /** MACs of one forward of one image, attention included. */
  macs: number;
  /** Bytes that do not grow with the batch: the weights (training: with gradients and optimizer state). */
  fixedBytes: number;
  /** Bytes per image of the batch (activations and sampler state). */
  bytesPerImage: number;
  /** The largest activation of one image: the layer, its shape without the batch, and its bytes. */
  largestActivation: { name: string; shape: number[]; bytes: number };
  /** The largest weight tensor: its name and bytes. */
  largestWeight: { name: string; bytes: number };
}

/** Estimated bytes of `e` at `batch` images. */
export const estimatedBytes = (e: MemoryEstimate, batch: number): number =>
  e.fixedBytes + e.bytesPerImage * batch;

/**
 * The memory a training step (`train`: every activation kept for backward) or a sampling forward (`sample`) of
 * `spec` holds, per image and apart from the batch, from `planLayers` (nothing is allocated).
 */
export function estimateMemory(spec: UNetSpecInput | UNetSpec, mode: MemoryMode): MemoryEstimate {
  const s = parseUNetSpec(spec);
  const layers = planLayers(s);
  // A layer's block: its name up to the last dot ("dec.8x8_block1.conv0" → "dec.8x8_block1").
  const blockOf = (name: string) => name.includes(".") ? name.slice(0, name.lastIndexOf(".")) : name;
  const perBlock = new Map<string, number>();
  let parameters = 0;
  let largestActivation = { name: "", shape: [] as number[], bytes: 0 };
  let largestWeight = { name: "", bytes: 0 };
  const activation = (name: string, shape: number[]) => {
    const bytes = shape.reduce((a, b) => a * b, 1) * BYTES;
    if (bytes > largestActivation.bytes) largestActivation = { name, shape, bytes };
  };
  for (const l of layers) {
    const px = l.res * l.res, weights = l.kind === "norm" ? 2 * l.in : l.in * l.out * l.kernel * l.kernel;
    parameters += weights + (l.kind !== "norm" && l.bias ? l.out : 0);
    if (weights * BYTES > largestWeight.bytes) {
      largestWeight = { name: `${l.name}.weight`, bytes: weights * BYTES };
    }
    let values = 0;
    if (l.kind === "conv") {
      values = PER_ELEMENT * l.out * px;
      activation(`${l.name} output`, [l.out, l.res, l.res]);
      if (l.heads) {
        values += PER_SCORE * l.heads * px * px;
        activation(`${l.name} attention scores`, [l.heads, px, px]);
      }
    } else if (l.kind === "norm") {
      values = PER_ELEMENT * l.in * px;
      activation(`${l.name} input`, [l.in, l.res, l.res]);
    } else values = PER_ELEMENT * l.out;
    const b = blockOf(l.name);
    perBlock.set(b, (perBlock.get(b) ?? 0) + values);
  }
  const image = s.inChannels * s.imgResolution * s.imgResolution;
  const sets = [...perBlock.values()];
  let values: number;
  if (mode === "train") values = sets.reduce((a, b) => a + b, 0);
  else {
    // Without a tape: the encoder's outputs wait as skips while one block's working set is live.
    const skips = unetLayout(s).enc.reduce((n, e) => n + e.outChannels * e.res * e.res, 0);
    values = Math.max(...sets) + skips;
  }
  return {
    mode,
    parameters,
    macs: unetCost(s).macsWithAttention,
    fixedBytes: PARAMETER_COPIES[mode] * parameters * BYTES,
    bytesPerImage: (values + IMAGE_COPIES * image) * BYTES,
    largestActivation,
    largestWeight,
  };
}

/** What `checkMemory` checks a network against. */
export interface MemoryBudget {
  /** The command, named first in the error ("train", "sample", "eval", "search: trial 3"). */
  what: string;
  mode: MemoryMode;
  /** Images at once. */
  batch: number;
  /** The option that sets `batch`, named in the error ("batch", "sampleCount", "n"). */
  batchField: string;
  /** Images held on the host whatever the batch (the sample command's output and grid), and their option. */
  held?: { images: number; field: string; bytesPerImage: number };
  /** The ceiling in MiB (the `memoryLimitMiB` option). */
  memoryLimitMiB: number;
  /** The device's limits (`Device.info.limits`): maxStorageBufferBindingSize and maxBufferSize bound a tensor. */
  deviceLimits?: Readonly<Record<string, number>>;
}

/** The network fields that size it, for "make the network smaller". */
const NETWORK_FIELDS = "network: modelChannels, channelMult, numBlocks or attnResolutions";
const MIB = 2 ** 20;

/** Bytes with a binary unit: "512 B", "3.2 MiB", "1.1 TiB". */
export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) (n /= 1024), i++;
  return `${i ? Number(n.toPrecision(3)) : Math.round(n)} ${units[i]}`;
}

/** The default ceiling: the machine's memory in MiB (16 GiB where it cannot be read). */
export function defaultMemoryLimitMiB(): number {
  try {
    return Math.floor(Deno.systemMemoryInfo().total / MIB);
  } catch {
    return 16 * 1024;
  }
}

/**
 * Throws a `UsageError` naming the field to change when `spec` at `budget.batch` images would hold more than the
 * ceiling or needs a tensor larger than the device can bind; returns the estimate otherwise. Nothing is
 * allocated, so an absurd configuration fails in milliseconds.
 */
export function checkMemory(spec: UNetSpecInput | UNetSpec, budget: MemoryBudget): MemoryEstimate {
  const e = estimateMemory(spec, budget.mode);
  const { what, batch, batchField } = budget;
  const held = budget.held ? budget.held.images * budget.held.bytesPerImage : 0;
  const total = e.fixedBytes + held + e.bytesPerImage * batch, limit = budget.memoryLimitMiB * MIB;
  const counts = `${magnitude(e.parameters)} parameters, ${magnitude(e.macs)} MACs per image`;
  const weights = budget.mode === "train" ? "weights, gradients and optimizer state" : "weights";
  if (total > limit) {
    const fits = Math.floor((limit - e.fixedBytes - held) / e.bytesPerImage);
    const lower = [
      ...(fits >= 1 ? [`${batchField} (at most ${fits} fits)`] : []),
      ...(budget.held && budget.held.field !== batchField ? [budget.held.field] : []),
    ];
    const remedy = lower.length || held
      ? `lower ${
        lower.length ? lower.join(" or ") : batchField
      }, make the network smaller (${NETWORK_FIELDS})`
      : `make the network smaller (${NETWORK_FIELDS}): its ${weights} alone need ${
        formatBytes(e.fixedBytes)
      }`;
    const parts = [
      `${formatBytes(e.fixedBytes)} for ${weights}`,
      `${formatBytes(e.bytesPerImage)} per image`,
      ...(held ? [`${formatBytes(held)} for ${budget.held!.images} images on the host`] : []),
    ];
    throw new UsageError(
      `${what}: this network (${counts}) at ${batchField} ${batch} needs an estimated ${
        formatBytes(total)
      } ` +
        `(${
          parts.join(", ")
        }), above the ceiling memoryLimitMiB ${budget.memoryLimitMiB}: ${remedy}, or raise ` +
        `memoryLimitMiB`,
    );
  }
  const limits = budget.deviceLimits ?? {};
  const bind = Math.min(limits.maxStorageBufferBindingSize ?? Infinity, limits.maxBufferSize ?? Infinity);
  if (!Number.isFinite(bind)) return e;
  const bindName = (limits.maxStorageBufferBindingSize ?? Infinity) <= (limits.maxBufferSize ?? Infinity)
    ? "maxStorageBufferBindingSize"
    : "maxBufferSize";
  if (e.largestWeight.bytes > bind) {
    throw new UsageError(
      `${what}: the weight ${e.largestWeight.name} of this network (${counts}) needs ` +
        `${formatBytes(e.largestWeight.bytes)}, above the adapter's ${bindName} of ${formatBytes(bind)}: ` +
        `make the network smaller (${NETWORK_FIELDS})`,
    );
  }
  const a = e.largestActivation;
  if (a.bytes * batch > bind) {
    const fits = Math.floor(bind / a.bytes);
    throw new UsageError(
      `${what}: at ${batchField} ${batch}, the ${a.name} of this network ([${
        [batch, ...a.shape].join(", ")
      }], ` +
        `${formatBytes(a.bytes * batch)}) is above the adapter's ${bindName} of ${
          formatBytes(bind)
        }: lower ` +
        `${batchField}${
          fits >= 1 ? ` (at most ${fits} fits)` : ""
        } or make the network smaller (${NETWORK_FIELDS})`,
    );
  }
  return e;
}
