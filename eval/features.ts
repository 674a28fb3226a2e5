/**
 * @file Feature networks for Fréchet distances, and the embedded one: `ShapesNet`.
 *
 * A Fréchet distance is only as meaningful as the features it compares. The literature's network is
 * Inception-v3 (eval/inception.ts), whose weights cannot be downloaded here. For the embedded procedural data
 * (models/data.ts) we therefore build our own: a small convolutional classifier trained to tell the kind of the
 * largest shape in an image (disc, rectangle, triangle, ring, stripes), reproducibly from a seed
 * (`trainShapesNet`, `deno task features`), and shipped as `eval/assets/shapes_net.safetensors`.
 *
 * Its feature vector is the global average of every stage's activations, concatenated (16 + 32 + 64 + 128 =
 * 240 values). Inception's pool3 is the last stage only; taking every stage here keeps the colour and texture
 * statistics of the early layers in the features, so a Fréchet distance sees a wrong palette or noisy pixels as
 * well as wrong shapes (tests/features_test.ts checks that it grows with noise and blur).
 *
 * Both networks follow one interface, `FeatureExtractor`: images [N, 3, H, W] with values in [0, 255] (as the
 * 8-bit images a sampler writes) → features [N, dim].
 */

import { z } from "zod";
import {
  avgPool2d,
  cat,
  Device,
  getDefaultDevice,
  interpolateBilinear,
  logSoftmax,
  mean,
  mul,
  neg,
  nn,
  noGrad,
  optim,
  reshape,
  saveSafetensors,
  scope,
  silu,
  sub,
  sum,
  type Tensor,
  tensor,
} from "../engine/mod.ts";
import { BatchIterator, PROCEDURAL_CLASSES, ProceduralShapes } from "../models/data.ts";
import { INCEPTION_FEATURES, InceptionV3 } from "./inception.ts";
import { parseConfig } from "../util/config.ts";

/** A network whose features a Fréchet distance compares. */
export interface FeatureExtractor {
  /** Names the network and its weights in reports and cached statistics (e.g. "shapes-net", "inception-v3"). */
  readonly name: string;
  /** Length of a feature vector. */
  readonly dim: number;
  /** Identifies the weights (a hash of the file they came from): cached statistics are keyed by it. */
  readonly fingerprint: string;
  readonly device: Device;
  /** Features [N, dim] of images [N, 3, H, W] with values in [0, 255], without gradients. */
  features(images: Tensor): Tensor;
  dispose(): void;
}

/** The first 16 hex digits of a file's SHA-256. */
export async function fileFingerprint(path: string): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await Deno.readFile(path)));
  return Array.from(digest.subarray(0, 8), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The feature network of an evaluation: Inception-v3 from a safetensors file (the literature's FID), or
 * without one the shipped ShapesNet (meaningful on the embedded procedural data only).
 */
export async function openFeatureExtractor(
  opts: { inception?: string; shapesNet?: string; device: Device },
): Promise<FeatureExtractor> {
  if (!opts.inception) {
    return await ShapesNet.load(opts.shapesNet ?? SHAPES_NET_FILE, { device: opts.device });
  }
  const net = await InceptionV3.load(opts.inception, { device: opts.device });
  return {
    name: "inception-v3",
    dim: INCEPTION_FEATURES,
    device: opts.device,
    fingerprint: await fileFingerprint(opts.inception),
    features: (images) => net.features(images),
    dispose: () => net.dispose(),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// The network.

/** Side of ShapesNet's input: 16×16 images are upsampled to it, as Inception upsamples to 299×299. */
export const SHAPES_NET_SIZE = 32;
/** Channels of the four stages (each two 3×3 convolutions; 32², 16², 8², 4²). */
export const SHAPES_NET_CHANNELS = [16, 32, 64, 128] as const;
/** Feature length: every stage's channels. */
export const SHAPES_NET_DIM = SHAPES_NET_CHANNELS.reduce((a, b) => a + b, 0);
/** The shipped weights. */
export const SHAPES_NET_FILE = new URL("./assets/shapes_net.safetensors", import.meta.url);

/**
 * One stage: (conv → GroupNorm → SiLU) twice at one resolution. The norms keep every stage's activations at unit
 * scale: without them PyTorch's default init shrinks the signal about 3× per layer and the 8-layer net sat at the
 * chance loss ln 5 for the first hundreds of steps (measured).
 */
class ShapesStage extends nn.Module {
  readonly conv0: nn.Conv2d;
  readonly norm0: nn.GroupNorm;
  readonly conv1: nn.Conv2d;
  readonly norm1: nn.GroupNorm;
  constructor(cin: number, cout: number, device: Device) {
    super();
    const groups = Math.min(8, cout / 2);
    this.conv0 = this.registerModule("conv0", new nn.Conv2d(cin, cout, 3, { padding: 1, device }));
    this.norm0 = this.registerModule("norm0", new nn.GroupNorm(groups, cout, { device }));
    this.conv1 = this.registerModule("conv1", new nn.Conv2d(cout, cout, 3, { padding: 1, device }));
    this.norm1 = this.registerModule("norm1", new nn.GroupNorm(groups, cout, { device }));
  }
  forward(x: Tensor): Tensor {
    const h = silu(this.norm0.forward(this.conv0.forward(x)));
    return silu(this.norm1.forward(this.conv1.forward(h)));
  }
}

/** The embedded feature network (see the file comment). */
export class ShapesNet extends nn.Module implements FeatureExtractor {
  readonly name = "shapes-net";
  readonly dim = SHAPES_NET_DIM;
  readonly device: Device;
  /** Set by `load` from the file's bytes; a network built in memory gets a fingerprint of its own. */
  fingerprint = `unsaved-${crypto.randomUUID().slice(0, 8)}`;
  readonly stages: ShapesStage[];
  /** The classifier on the last stage's pooled features (used only in training). */
  readonly head: nn.Linear;

  constructor(opts: { device?: Device } = {}) {
    super();
    const device = this.device = opts.device ?? getDefaultDevice();
    let cin = 3;
    this.stages = SHAPES_NET_CHANNELS.map((c, i) => {
      const s = this.registerModule(`stage${i}`, new ShapesStage(cin, c, device));
      cin = c;
      return s;
    });
    const last = SHAPES_NET_CHANNELS[SHAPES_NET_CHANNELS.length - 1];
    this.head = this.registerModule("head", new nn.Linear(last, PROCEDURAL_CLASSES.length, { device }));
  }

  /** Loads weights saved by `save` (default: the shipped file). */
  static async load(
    path: string | URL = SHAPES_NET_FILE,
    opts: { device?: Device } = {},
  ): Promise<ShapesNet> {
    const net = new ShapesNet(opts).eval();
    try {
      const file = path instanceof URL ? path.pathname : path;
      net.fingerprint = await fileFingerprint(file);
      await net.loadSafetensors(file);
    } catch (e) {
      net.dispose();
      throw new Error(`ShapesNet.load ${path}: ${(e as Error).message}`);
    }
    return net;
  }

  /** Writes the weights (atomically) with `metadata` (how they were made). */
  save(path: string, metadata: Record<string, string> = {}): Promise<void> {
    return saveSafetensors(path, this.stateDict(), { ...metadata, network: this.name });
  }

  /** Images [N, 3, H, W] in [−1, 1] → the pooled activations of every stage and the class logits. */
  #run(x: Tensor): { pooled: Tensor[]; logits: Tensor } {
    if (x.rank !== 4 || x.shape[1] !== 3) {
      throw new Error(`ShapesNet: images must be [N, 3, H, W], got [${x.shape}]`);
    }
    const [, , H, W] = x.shape;
    let h = H === SHAPES_NET_SIZE && W === SHAPES_NET_SIZE
      ? x
      : interpolateBilinear(x, [SHAPES_NET_SIZE, SHAPES_NET_SIZE]);
    const pooled: Tensor[] = [];
    this.stages.forEach((stage, i) => {
      if (i > 0) h = avgPool2d(h, 2);
      h = stage.forward(h);
      pooled.push(mean(h, [2, 3]));
    });
    return { pooled, logits: this.head.forward(pooled[pooled.length - 1]) };
  }

  /**
   * Class logits [N, 5] of images [N, 3, H, W] in [−1, 1]. Differentiable (the training loss uses it), so its
   * intermediates live until the caller's scope ends.
   */
  logits(images: Tensor): Tensor {
    return this.#run(images).logits;
  }

  /** Features [N, 240] of images [N, 3, H, W] in [0, 255]. */
  features(images: Tensor): Tensor {
    return noGrad(() => scope(() => cat(this.#run(sub(mul(images, 1 / 127.5), 1)).pooled, 1)));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Building it from a seed.

/** Options of `trainShapesNet` (`deno task features`). */
export const ShapesNetTrainSchema = z.strictObject({
  // Seed of the weights' initialisation and of the batch order.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // Seed of the procedural training images (the held-out check uses seed + 1).
  dataSeed: z.number().int().min(0).max(0xffffffff).default(1000),
  // Optimizer steps; even steps see 16×16 images (upsampled), odd steps 32×32.
  steps: z.number().int().positive().default(2000),
  // Images per step.
  batch: z.number().int().positive().default(64),
  // Adam learning rate (cosine-decayed to zero; 1e-3 stalled at the chance loss for 150 steps, 3e-4 did not).
  lr: z.number().positive().default(3e-4),
  // Held-out images for the reported accuracy.
  heldOut: z.number().int().positive().default(1024),
});
export type ShapesNetTrainOptions = z.input<typeof ShapesNetTrainSchema>;

/** What a build reports. */
export interface ShapesNetBuild {
  net: ShapesNet;
  /** Mean training loss over the last tenth of the steps. */
  finalLoss: number;
  /** Fraction of held-out images classified correctly, at 16×16 and 32×32. */
  accuracy: { r16: number; r32: number };
  seconds: number;
  options: z.output<typeof ShapesNetTrainSchema>;
}

/** Mean cross-entropy of logits [N, K] against one-hot labels [N, K]. */
export function crossEntropy(logits: Tensor, oneHot: Tensor): Tensor {
  return neg(mean(sum(mul(logSoftmax(logits, 1), oneHot), 1)));
}

/** Fraction of `n` images of `dataset` (from index 0) that `net` classifies correctly. */
export async function shapesAccuracy(net: ShapesNet, dataset: ProceduralShapes, n: number): Promise<number> {
  const it = new BatchIterator(dataset, { batchSize: Math.min(n, 256), shuffle: false, device: net.device });
  let correct = 0, seen = 0;
  while (seen < n) {
    const b = it.next();
    const logits = noGrad(() => scope(() => net.logits(b.images)));
    const host = await logits.toArray();
    logits.dispose();
    b.images.dispose();
    b.labels?.dispose();
    const K = PROCEDURAL_CLASSES.length, rows = Math.min(b.indices.length, n - seen);
    for (let i = 0; i < rows; i++) {
      let best = 0;
      for (let k = 1; k < K; k++) if (host[i * K + k] > host[i * K + best]) best = k;
      if (best === b.labelIndices![i]) correct++;
    }
    seen += rows;
  }
  return correct / n;
}

/**
 * Trains ShapesNet to classify procedural images (Adam, cosine learning-rate decay, 16×16 and 32×32 batches in
 * turn). Deterministic given the options on one adapter; `onProgress` gets the running loss every 50 steps.
 */
export async function trainShapesNet(
  options: ShapesNetTrainOptions = {},
  ctx: { device?: Device; onProgress?: (step: number, steps: number, loss: number) => void } = {},
): Promise<ShapesNetBuild> {
  const o = parseConfig(ShapesNetTrainSchema, options, "trainShapesNet");
  const device = ctx.device ?? getDefaultDevice();
  const t0 = performance.now();
  device.manualSeed(o.seed);
  const net = new ShapesNet({ device }).train();
  const iters = [16, 32].map((resolution) =>
    new BatchIterator(new ProceduralShapes({ resolution, seed: o.dataSeed }), {
      batchSize: o.batch,
      seed: o.seed,
      device,
    })
  );
  const adam = new optim.Adam(net.parameters(), { lr: o.lr });
  const losses: Tensor[] = [];
  const tail: number[] = [];
  try {
    for (let step = 0; step < o.steps; step++) {
      adam.lr = o.lr * 0.5 * (1 + Math.cos(Math.PI * step / o.steps));
      const b = iters[step % 2].next();
      const loss = scope(() => {
        const l = crossEntropy(net.logits(b.images), b.labels!);
        l.backward();
        return l;
      });
      adam.step();
      net.zeroGrad();
      b.images.dispose();
      b.labels?.dispose();
      losses.push(loss);
      if (losses.length === 50 || step === o.steps - 1) {
        const host = await noGrad(() => cat(losses.map((l) => reshape(l, [1])))).toArray();
        losses.forEach((l) => l.dispose());
        losses.length = 0;
        for (const v of host) {
          if (!Number.isFinite(v)) throw new Error(`trainShapesNet: the loss at step ${step} is ${v}`);
        }
        // The window held steps step − n + 1 … step; the last tenth of all steps (at least one) is the tail.
        host.forEach((v, i) => {
          if (step - host.length + 1 + i >= Math.floor(o.steps * 0.9)) tail.push(v);
        });
        ctx.onProgress?.(step + 1, o.steps, host.reduce((a, b) => a + b, 0) / host.length);
      }
    }
    net.eval();
    const held = (resolution: number) =>
      shapesAccuracy(net, new ProceduralShapes({ resolution, seed: o.dataSeed + 1 }), o.heldOut);
    const accuracy = { r16: await held(16), r32: await held(32) };
    const finalLoss = tail.length ? tail.reduce((a, b) => a + b, 0) / tail.length : NaN;
    return { net, finalLoss, accuracy, seconds: (performance.now() - t0) / 1000, options: o };
  } catch (e) {
    net.dispose();
    throw e;
  } finally {
    losses.forEach((l) => l.dispose());
    for (const t of Object.values(adam.stateDict().tensors)) t.dispose();
  }
}

/** Host images [N, 3, H, W] in [−1, 1] → the 8-bit values a PNG would hold, as floats in [0, 255]. */
export function quantize(images: Float32Array): Float32Array {
  const out = new Float32Array(images.length);
  for (let i = 0; i < images.length; i++) {
    out[i] = Math.min(255, Math.max(0, Math.round(images[i] * 127.5 + 127.5)));
  }
  return out;
}

/** A device tensor [N, 3, H, W] in [0, 255] of host images in [−1, 1], quantized to 8 bits. */
export function quantizedTensor(images: Float32Array, shape: readonly number[], device: Device): Tensor {
  return tensor(quantize(images), [...shape], { device });
}

/** Trains ShapesNet (`trainShapesNet`) and writes it to `path` with the options and held-out accuracy. */
export async function buildShapesNet(
  path: string,
  options: ShapesNetTrainOptions = {},
  ctx: { device?: Device; onProgress?: (step: number, steps: number, loss: number) => void } = {},
): Promise<Omit<ShapesNetBuild, "net">> {
  const { net, ...build } = await trainShapesNet(options, ctx);
  try {
    await net.save(path, {
      options: JSON.stringify(build.options),
      heldOutAccuracy: JSON.stringify(build.accuracy),
      finalLoss: String(build.finalLoss),
      adapter: net.device.info.adapter,
    });
  } finally {
    net.dispose();
  }
  return build;
}
