/**
 * @file `FashionNet`: the feature network of Fashion-MNIST FIDs, ours, trained with the engine from a seed.
 *
 * Same idea as ShapesNet (eval/features.ts): a plain classifier whose last hidden layer, globally average
 * pooled, is the feature vector, like Inception's pool3, so that the Fréchet distance compares what the images
 * show (which garment, its shape) rather than pixel statistics. Trained on Fashion-MNIST's training split and
 * measured on the 10,000 t10k images, which it never sees; `deno task features --data fashion-mnist` rebuilds
 * `eval/assets/fashion_net.safetensors` and refuses to write one below `FASHION_NET_MIN_ACCURACY`.
 *
 * The network is narrow so that it trains in minutes on two CPU cores: three stages at 28², 14², 7² (16, 32,
 * 64 channels by default), each 3×3 convolutions with batch normalisation and ReLU (one in the first stage, two
 * in the others), max pooling between stages, global average pooling to the 64 features, a linear classifier.
 * Inputs are grey images [N, 1, H, W] in [0, 255]; 32×32 images (the padded data, models/data.ts) lose their
 * 2-pixel background border, other sizes are resampled to 28×28.
 */

import { z } from "zod";
import {
  cat,
  decodeSafetensors,
  Device,
  getDefaultDevice,
  interpolateBilinear,
  maxPool2d,
  mean,
  mul,
  narrow,
  nn,
  noGrad,
  optim,
  relu,
  reshape,
  saveSafetensors,
  scope,
  sub,
  type Tensor,
  tensor,
} from "../engine/mod.ts";
import { BatchIterator, type Dataset, loadFashionMnist } from "../models/data.ts";
import { FASHION_MNIST_CLASSES, FASHION_MNIST_SIZE } from "../models/idx.ts";
import { parseConfig } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import {
  BatchNorm2d,
  calibrateBatchNorms,
  crossEntropy,
  type FeatureExtractor,
  fileFingerprint,
  oneCycle,
} from "./classifier.ts";

/** The shipped weights. */
export const FASHION_NET_FILE = new URL("./assets/fashion_net.safetensors", import.meta.url);
/** The least t10k accuracy a build must reach to be written (published 2-conv networks: 87.6–93.9%). */
export const FASHION_NET_MIN_ACCURACY = 0.9;

/** conv → BatchNorm → ReLU. */
class ConvBnRelu extends nn.Module {
  readonly conv: nn.Conv2d;
  readonly bn: BatchNorm2d;
  constructor(cin: number, cout: number, device: Device) {
    super();
    // No conv bias: the norm's β follows at once.
    this.conv = this.registerModule("conv", new nn.Conv2d(cin, cout, 3, { padding: 1, bias: false, device }));
    this.bn = this.registerModule("bn", new BatchNorm2d(cout, device));
  }
  forward(x: Tensor): Tensor {
    return relu(this.bn.forward(this.conv.forward(x)));
  }
}

/** The architecture (stored in the weights file's metadata, so `load` rebuilds the same network). */
export const FashionNetArchSchema = z.strictObject({
  // Channels of the three stages (28², 14², 7²); the last is the feature length.
  channels: z.tuple([z.number().int().positive(), z.number().int().positive(), z.number().int().positive()])
    .default([16, 32, 64]),
});
export type FashionNetArch = z.output<typeof FashionNetArchSchema>;

/** The Fashion-MNIST feature network (see the file comment). */
export class FashionNet extends nn.Module implements FeatureExtractor {
  readonly name = "fashion-net";
  readonly dim: number;
  readonly device: Device;
  /** Set by `load` from the file's bytes; a network built in memory gets a fingerprint of its own. */
  fingerprint = `unsaved-${crypto.randomUUID().slice(0, 8)}`;
  readonly layers: ConvBnRelu[][];
  readonly head: nn.Linear;

  constructor(
    readonly arch: FashionNetArch = FashionNetArchSchema.parse({}),
    opts: { device?: Device } = {},
  ) {
    super();
    const device = this.device = opts.device ?? getDefaultDevice();
    const [c0, c1, c2] = arch.channels;
    const stage = (i: number, pairs: [number, number][]) =>
      pairs.map(([a, b], j) => this.registerModule(`stage${i}_${j}`, new ConvBnRelu(a, b, device)));
    this.layers = [stage(0, [[1, c0]]), stage(1, [[c0, c1], [c1, c1]]), stage(2, [[c1, c2], [c2, c2]])];
    this.dim = c2;
    this.head = this.registerModule("head", new nn.Linear(c2, FASHION_MNIST_CLASSES.length, { device }));
  }

  /** Loads weights saved by `save` (default: the shipped file); the architecture comes from the metadata. */
  static async load(
    path: string | URL = FASHION_NET_FILE,
    opts: { device?: Device } = {},
  ): Promise<FashionNet> {
    const file = path instanceof URL ? path.pathname : path;
    let arch: FashionNetArch;
    try {
      arch = FashionNetArchSchema.parse(JSON.parse((await readMetadata(file)).architecture ?? "{}"));
    } catch (e) {
      throw new Error(`FashionNet.load ${file}: ${(e as Error).message}`);
    }
    const net = new FashionNet(arch, opts).eval();
    try {
      net.fingerprint = await fileFingerprint(file);
      await net.loadSafetensors(file);
    } catch (e) {
      net.dispose();
      throw new Error(`FashionNet.load ${file}: ${(e as Error).message}`);
    }
    return net;
  }

  /** Writes the weights (atomically) with `metadata` (how they were made) and the architecture. */
  save(path: string, metadata: Record<string, string> = {}): Promise<void> {
    return saveSafetensors(path, this.stateDict(), {
      ...metadata,
      network: this.name,
      architecture: JSON.stringify(this.arch),
    });
  }

  /** Images [N, 1, H, W] in [−1, 1] → the pooled last-stage features [N, dim]. */
  #features(x: Tensor): Tensor {
    if (x.rank !== 4 || x.shape[1] !== 1) {
      throw new Error(`FashionNet: images must be grey, [N, 1, H, W], got [${x.shape}]`);
    }
    const [, , H, W] = x.shape, S = FASHION_MNIST_SIZE;
    // 32×32 is the padded data: its 2-pixel border is background, so cropping is exact.
    let h = H === S && W === S
      ? x
      : H === S + 4 && W === S + 4
      ? narrow(narrow(x, 2, 2, S), 3, 2, S)
      : interpolateBilinear(x, [S, S]);
    this.layers.forEach((stage, i) => {
      if (i > 0) h = maxPool2d(h, 2);
      for (const layer of stage) h = layer.forward(h);
    });
    return mean(h, [2, 3]);
  }

  /** Class logits [N, 10] of images [N, 1, H, W] in [−1, 1] (differentiable: the training loss uses it). */
  logits(images: Tensor): Tensor {
    return this.head.forward(this.#features(images));
  }

  /** Features [N, dim] of images [N, 1, H, W] in [0, 255]. */
  features(images: Tensor): Tensor {
    return noGrad(() => scope(() => this.#features(sub(mul(images, 1 / 127.5), 1))));
  }

  /** Precise BN, as `ShapesNet.calibrate`: running statistics from one large batch of training images. */
  calibrate(images: Tensor): void {
    calibrateBatchNorms(this, () => void this.#features(images));
  }
}

/** The metadata of a safetensors file (decoded on the host). */
async function readMetadata(path: string): Promise<Record<string, string>> {
  return decodeSafetensors(await Deno.readFile(path), path).metadata;
}

// ---------------------------------------------------------------------------------------------------------------
// Building it from a seed.

/** Options of `trainFashionNet` (`deno task features --data fashion-mnist`). */
export const FashionNetTrainSchema = z.strictObject({
  // Seed of the weights' initialisation and of the batch order.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // Optimizer steps over the training split (60,000 images: 940 steps of 64 are one epoch; one epoch reached
  // 89.45% on t10k, two are the default).
  steps: z.number().int().positive().default(1880),
  // Images per step.
  batch: z.number().int().positive().default(64),
  // Peak AdamW learning rate of the one-cycle schedule (as ShapesNet's).
  lr: z.number().positive().default(4e-3),
  // AdamW's decoupled weight decay.
  weightDecay: z.number().nonnegative().default(0.05),
  // Training images whose statistics become the BatchNorm running statistics.
  calibration: z.number().int().positive().default(1024),
  // Channels of the three stages.
  channels: FashionNetArchSchema.shape.channels,
  // Folder of the idx files (default Debian's).
  path: z.string().min(1).optional(),
});
export type FashionNetTrainOptions = z.input<typeof FashionNetTrainSchema>;

/** What a build reports. */
export interface FashionNetBuild {
  net: FashionNet;
  /** Mean training loss over the last tenth of the steps. */
  finalLoss: number;
  /** Fraction of the t10k images classified correctly. */
  accuracy: number;
  seconds: number;
  options: z.output<typeof FashionNetTrainSchema>;
}

/** Fraction of `dataset`'s images (all of them, or the first `n`) that `net` classifies correctly. */
export async function fashionAccuracy(
  net: FashionNet,
  dataset: Dataset,
  n = dataset.length,
): Promise<number> {
  const it = new BatchIterator(dataset, { batchSize: Math.min(n, 500), shuffle: false, device: net.device });
  const K = FASHION_MNIST_CLASSES.length;
  let correct = 0, seen = 0;
  while (seen < n) {
    const b = it.next();
    const logits = noGrad(() => scope(() => net.logits(b.images)));
    const host = await logits.toArray();
    logits.dispose();
    b.images.dispose();
    b.labels?.dispose();
    const rows = Math.min(b.indices.length, n - seen);
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
 * Trains FashionNet on the training split (AdamW, one-cycle schedule), calibrates its BatchNorm statistics and
 * measures its accuracy on t10k. Deterministic given the options on one adapter; `onProgress` gets the running
 * loss every 50 steps.
 */
export async function trainFashionNet(
  options: FashionNetTrainOptions = {},
  ctx: { device?: Device; onProgress?: (step: number, steps: number, loss: number) => void } = {},
): Promise<FashionNetBuild> {
  const o = parseConfig(FashionNetTrainSchema, options, "trainFashionNet");
  const device = ctx.device ?? getDefaultDevice();
  const t0 = performance.now();
  const trainSet = await loadFashionMnist({ path: o.path, split: "train" });
  const testSet = await loadFashionMnist({ path: o.path, split: "test" });
  device.manualSeed(o.seed);
  const net = new FashionNet({ channels: o.channels }, { device }).train();
  const it = new BatchIterator(trainSet, { batchSize: o.batch, seed: o.seed, device });
  const adam = new optim.AdamW(net.parameters(), { lr: o.lr, weightDecay: o.weightDecay });
  const losses: Tensor[] = [];
  const tail: number[] = [];
  try {
    for (let step = 0; step < o.steps; step++) {
      adam.lr = oneCycle(o.lr, step, o.steps);
      const b = it.next();
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
          if (!Number.isFinite(v)) throw new Error(`trainFashionNet: the loss at step ${step} is ${v}`);
        }
        host.forEach((v, i) => {
          if (step - host.length + 1 + i >= Math.floor(o.steps * 0.9)) tail.push(v);
        });
        ctx.onProgress?.(step + 1, o.steps, host.reduce((a, b) => a + b, 0) / host.length);
      }
    }
    const h = new BatchIterator(trainSet, { batchSize: o.calibration, seed: o.seed + 1 }).nextHost();
    const calib = tensor(h.images, h.shape, { device });
    try {
      net.calibrate(calib);
    } finally {
      calib.dispose();
    }
    const accuracy = await fashionAccuracy(net, testSet);
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

/**
 * Trains FashionNet and writes it to `path` with its options and t10k accuracy. Refuses to overwrite an existing
 * file unless `force` (checked before and after training), and to write a network below `minAccuracy` (default
 * `FASHION_NET_MIN_ACCURACY`); the report says whether it was written.
 */
export async function buildFashionNet(
  path: string,
  options: FashionNetTrainOptions = {},
  ctx: {
    device?: Device;
    force?: boolean;
    minAccuracy?: number;
    onProgress?: (step: number, steps: number, loss: number) => void;
  } = {},
): Promise<Omit<FashionNetBuild, "net"> & { written: boolean }> {
  const exists = () => Deno.stat(path).then(() => true, () => false);
  const refuse = () =>
    new UsageError(`features: ${path} exists; pass --force to replace it (or --out to write elsewhere)`);
  if (!ctx.force && await exists()) throw refuse();
  const { net, ...build } = await trainFashionNet(options, ctx);
  try {
    if (build.accuracy < (ctx.minAccuracy ?? FASHION_NET_MIN_ACCURACY)) return { ...build, written: false };
    if (!ctx.force && await exists()) throw refuse();
    const { path: _, ...stored } = build.options;
    await net.save(path, {
      options: JSON.stringify(stored),
      heldOutAccuracy: JSON.stringify({ t10k: build.accuracy }),
      finalLoss: String(build.finalLoss),
      features: `${net.dim} pooled last-stage activations`,
      adapter: net.device.info.adapter,
    });
  } finally {
    net.dispose();
  }
  return { ...build, written: true };
}
