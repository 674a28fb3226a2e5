/**
 * @file The Inception-v3 network that FID is defined with ("pt_inception-2015-12-05", the TensorFlow graph
 * http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz that Heusel et al.'s FID code
 * used, as ported to PyTorch by pytorch-fid and to TorchScript by NVlabs), on our engine, returning the
 * 2048-dimensional pool features whose statistics FID compares.
 *
 * The port differs from torchvision's Inception-v3 in the ways the TF graph does (pytorch-fid's FIDInception*):
 *
 * - every BasicConv2d is conv (no bias) → BatchNorm (eps 0.001, inference statistics) → ReLU; BatchNorm is
 *   applied, not folded, in the one elementwise pass after the convolution (a = γ/√(var + ε), b = β − mean·a,
 *   relu(conv·a + b): the engine fuses it into one dispatch);
 * - the average pools of the A, C and first E blocks (Mixed_5b–d, Mixed_6b–e, Mixed_7b) exclude the padding
 *   (count_include_pad = False, TF's behaviour), and the pool branch of the last E block (Mixed_7c) is a 3×3
 *   max pool (stride 1, padding 1);
 * - 1008 classes in the (optional) final fc layer.
 *
 * Input: float images [N, 3, H, W] with pixel values in [0, 255]. Two preprocessing conventions exist for the
 * same weights, and they give slightly different features:
 *
 * - "nvlabs" (default; what NVlabs/edm's fid.py runs, through the TorchScript detector inception-2015-12-05.pkl):
 *   bilinear resize to 299×299 the way TF1's resize_bilinear does it (align_corners = False without half-pixel
 *   centres: source = output·in/out, clamped at the border), then (x − 128)/128;
 * - "pytorch-fid": F.interpolate(size=299, mode="bilinear", align_corners=False) (half-pixel centres), then
 *   x/127.5 − 1 (pytorch-fid's 2x − 1 on [0, 1] images).
 *
 * Weights come from a safetensors file with pytorch-fid's (= torchvision's) parameter names, e.g.
 * `Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch3x3dbl_3b.bn.running_var`, `fc.weight`. We cannot download
 * them here; convert the published PyTorch checkpoint once with torch and safetensors:
 *
 * ```python
 * # pip install torch safetensors
 * import torch
 * from safetensors.torch import save_file
 * url = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
 * state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
 * save_file({k: v.float().contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")},
 *           "pt_inception-2015-12-05.safetensors")
 * ```
 *
 * The loader ignores `*.num_batches_tracked`, `AuxLogits.*` (a full torchvision checkpoint) and, when the
 * network is built without its fc layer, `fc.*`; any other missing, unexpected or mis-shaped tensor is an error
 * that names it. Parameter count (conv weights + BatchNorm γ, β): 21,785,568 without fc, 23,850,960 with it
 * (fc: 2048·1008 + 1008); the 94 BatchNorms also hold 2 × 34,432 running statistics (buffers).
 */

import { z } from "zod";
import {
  add,
  avgPool2d,
  cat,
  Device,
  full,
  getDefaultDevice,
  linear,
  maxPool2d,
  mean,
  mul,
  nn,
  noGrad,
  relu,
  reshape,
  rsqrt,
  scope,
  sub,
  type Tensor,
} from "../engine/mod.ts";
import { interpolateBilinear } from "../engine/ops/resize.ts";
import { parseConfig } from "../util/config.ts";

/** BatchNorm epsilon of the TF graph (and of torchvision's BasicConv2d). */
export const INCEPTION_BN_EPS = 0.001;
/** Side of the square input the network was trained at. */
export const INCEPTION_SIZE = 299;
/** Feature dimension of the final average pool. */
export const INCEPTION_FEATURES = 2048;
/** Classes of the TF graph's classifier. */
export const INCEPTION_CLASSES = 1008;

type Pair = number | [number, number];

// ---------------------------------------------------------------------------------------------------------------
// Layers.

/** BatchNorm2d in inference mode: weight (γ), bias (β), running_mean and running_var, eps 0.001. */
export class BatchNorm2d extends nn.Module {
  readonly weight: Tensor;
  readonly bias: Tensor;
  readonly running_mean: Tensor;
  readonly running_var: Tensor;

  constructor(readonly channels: number, readonly eps: number, device: Device) {
    super();
    this.weight = this.registerParameter("weight", full([channels], 1, { device }));
    this.bias = this.registerParameter("bias", full([channels], 0, { device }));
    this.running_mean = this.registerBuffer("running_mean", full([channels], 0, { device }));
    this.running_var = this.registerBuffer("running_var", full([channels], 1, { device }));
  }

  /** relu((x − mean)·γ/√(var + ε) + β) for x [N, C, H, W], as one fused elementwise expression. */
  forwardRelu(x: Tensor): Tensor {
    const c = [1, this.channels, 1, 1];
    const a = mul(reshape(this.weight, c), rsqrt(add(reshape(this.running_var, c), this.eps)));
    const b = sub(reshape(this.bias, c), mul(reshape(this.running_mean, c), a));
    return relu(add(mul(x, a), b));
  }
}

/** Conv (no bias) → BatchNorm (eps 0.001) → ReLU, with parameters `conv.weight` and `bn.*` (torchvision's). */
export class BasicConv2d extends nn.Module {
  readonly conv: nn.Conv2d;
  readonly bn: BatchNorm2d;

  constructor(
    inChannels: number,
    outChannels: number,
    kernel: Pair,
    device: Device,
    stride: Pair = 1,
    padding: Pair = 0,
  ) {
    super();
    this.conv = this.registerModule(
      "conv",
      new nn.Conv2d(inChannels, outChannels, kernel, { bias: false, stride, padding, device }),
    );
    this.bn = this.registerModule("bn", new BatchNorm2d(outChannels, INCEPTION_BN_EPS, device));
  }

  forward(x: Tensor): Tensor {
    return this.bn.forwardRelu(this.conv.forward(x));
  }
}

/** A 3×3, stride-1, padding-1 average pool that ignores the padding (TF's SAME average pool). */
const tfAvgPool = (x: Tensor) => avgPool2d(x, 3, 1, 1, { countIncludePad: false });

/** Mixed_5b/c/d: 1×1 | 1×1 → 5×5 | 1×1 → 3×3 → 3×3 | avg pool → 1×1; 224 + poolFeatures channels out. */
export class InceptionA extends nn.Module {
  readonly branch1x1: BasicConv2d;
  readonly branch5x5_1: BasicConv2d;
  readonly branch5x5_2: BasicConv2d;
  readonly branch3x3dbl_1: BasicConv2d;
  readonly branch3x3dbl_2: BasicConv2d;
  readonly branch3x3dbl_3: BasicConv2d;
  readonly branch_pool: BasicConv2d;

  constructor(inChannels: number, poolFeatures: number, device: Device) {
    super();
    const c = (name: string, ci: number, co: number, k: Pair, pad: Pair = 0) =>
      this.registerModule(name, new BasicConv2d(ci, co, k, device, 1, pad));
    this.branch1x1 = c("branch1x1", inChannels, 64, 1);
    this.branch5x5_1 = c("branch5x5_1", inChannels, 48, 1);
    this.branch5x5_2 = c("branch5x5_2", 48, 64, 5, 2);
    this.branch3x3dbl_1 = c("branch3x3dbl_1", inChannels, 64, 1);
    this.branch3x3dbl_2 = c("branch3x3dbl_2", 64, 96, 3, 1);
    this.branch3x3dbl_3 = c("branch3x3dbl_3", 96, 96, 3, 1);
    this.branch_pool = c("branch_pool", inChannels, poolFeatures, 1);
  }

  forward(x: Tensor): Tensor {
    return cat([
      this.branch1x1.forward(x),
      this.branch5x5_2.forward(this.branch5x5_1.forward(x)),
      this.branch3x3dbl_3.forward(this.branch3x3dbl_2.forward(this.branch3x3dbl_1.forward(x))),
      this.branch_pool.forward(tfAvgPool(x)),
    ], 1);
  }
}

/** Mixed_6a (grid reduction 35 → 17): 3×3/2 | 1×1 → 3×3 → 3×3/2 | max pool 3×3/2; 480 + in channels out. */
export class InceptionB extends nn.Module {
  readonly branch3x3: BasicConv2d;
  readonly branch3x3dbl_1: BasicConv2d;
  readonly branch3x3dbl_2: BasicConv2d;
  readonly branch3x3dbl_3: BasicConv2d;

  constructor(inChannels: number, device: Device) {
    super();
    this.branch3x3 = this.registerModule("branch3x3", new BasicConv2d(inChannels, 384, 3, device, 2));
    this.branch3x3dbl_1 = this.registerModule("branch3x3dbl_1", new BasicConv2d(inChannels, 64, 1, device));
    this.branch3x3dbl_2 = this.registerModule("branch3x3dbl_2", new BasicConv2d(64, 96, 3, device, 1, 1));
    this.branch3x3dbl_3 = this.registerModule("branch3x3dbl_3", new BasicConv2d(96, 96, 3, device, 2));
  }

  forward(x: Tensor): Tensor {
    return cat([
      this.branch3x3.forward(x),
      this.branch3x3dbl_3.forward(this.branch3x3dbl_2.forward(this.branch3x3dbl_1.forward(x))),
      maxPool2d(x, 3, 2),
    ], 1);
  }
}

/** Mixed_6b–e: factorised 7×7 convolutions (1×7 and 7×1) with c7 inner channels; 768 channels out. */
export class InceptionC extends nn.Module {
  readonly branch1x1: BasicConv2d;
  readonly branch7x7_1: BasicConv2d;
  readonly branch7x7_2: BasicConv2d;
  readonly branch7x7_3: BasicConv2d;
  readonly branch7x7dbl_1: BasicConv2d;
  readonly branch7x7dbl_2: BasicConv2d;
  readonly branch7x7dbl_3: BasicConv2d;
  readonly branch7x7dbl_4: BasicConv2d;
  readonly branch7x7dbl_5: BasicConv2d;
  readonly branch_pool: BasicConv2d;

  constructor(inChannels: number, c7: number, device: Device) {
    super();
    const c = (name: string, ci: number, co: number, k: Pair, pad: Pair = 0) =>
      this.registerModule(name, new BasicConv2d(ci, co, k, device, 1, pad));
    const row: [Pair, Pair] = [[1, 7], [0, 3]], col: [Pair, Pair] = [[7, 1], [3, 0]];
    this.branch1x1 = c("branch1x1", inChannels, 192, 1);
    this.branch7x7_1 = c("branch7x7_1", inChannels, c7, 1);
    this.branch7x7_2 = c("branch7x7_2", c7, c7, ...row);
    this.branch7x7_3 = c("branch7x7_3", c7, 192, ...col);
    this.branch7x7dbl_1 = c("branch7x7dbl_1", inChannels, c7, 1);
    this.branch7x7dbl_2 = c("branch7x7dbl_2", c7, c7, ...col);
    this.branch7x7dbl_3 = c("branch7x7dbl_3", c7, c7, ...row);
    this.branch7x7dbl_4 = c("branch7x7dbl_4", c7, c7, ...col);
    this.branch7x7dbl_5 = c("branch7x7dbl_5", c7, 192, ...row);
    this.branch_pool = c("branch_pool", inChannels, 192, 1);
  }

  forward(x: Tensor): Tensor {
    let d = this.branch7x7dbl_1.forward(x);
    for (const m of [this.branch7x7dbl_2, this.branch7x7dbl_3, this.branch7x7dbl_4, this.branch7x7dbl_5]) {
      d = m.forward(d);
    }
    return cat([
      this.branch1x1.forward(x),
      this.branch7x7_3.forward(this.branch7x7_2.forward(this.branch7x7_1.forward(x))),
      d,
      this.branch_pool.forward(tfAvgPool(x)),
    ], 1);
  }
}

/** Mixed_7a (grid reduction 17 → 8): 1×1 → 3×3/2 | 1×1 → 1×7 → 7×1 → 3×3/2 | max pool 3×3/2; 512 + in out. */
export class InceptionD extends nn.Module {
  readonly branch3x3_1: BasicConv2d;
  readonly branch3x3_2: BasicConv2d;
  readonly branch7x7x3_1: BasicConv2d;
  readonly branch7x7x3_2: BasicConv2d;
  readonly branch7x7x3_3: BasicConv2d;
  readonly branch7x7x3_4: BasicConv2d;

  constructor(inChannels: number, device: Device) {
    super();
    const c = (name: string, ci: number, co: number, k: Pair, stride: Pair = 1, pad: Pair = 0) =>
      this.registerModule(name, new BasicConv2d(ci, co, k, device, stride, pad));
    this.branch3x3_1 = c("branch3x3_1", inChannels, 192, 1);
    this.branch3x3_2 = c("branch3x3_2", 192, 320, 3, 2);
    this.branch7x7x3_1 = c("branch7x7x3_1", inChannels, 192, 1);
    this.branch7x7x3_2 = c("branch7x7x3_2", 192, 192, [1, 7], 1, [0, 3]);
    this.branch7x7x3_3 = c("branch7x7x3_3", 192, 192, [7, 1], 1, [3, 0]);
    this.branch7x7x3_4 = c("branch7x7x3_4", 192, 192, 3, 2);
  }

  forward(x: Tensor): Tensor {
    let b = this.branch7x7x3_1.forward(x);
    for (const m of [this.branch7x7x3_2, this.branch7x7x3_3, this.branch7x7x3_4]) b = m.forward(b);
    return cat([this.branch3x3_2.forward(this.branch3x3_1.forward(x)), b, maxPool2d(x, 3, 2)], 1);
  }
}

/**
 * Mixed_7b/c: 1×1 | 1×1 → (1×3 ‖ 3×1) | 1×1 → 3×3 → (1×3 ‖ 3×1) | pool → 1×1; 2048 channels out. The FID
 * graph pools with a padding-excluding average in Mixed_7b and with a 3×3 max pool in Mixed_7c.
 */
export class InceptionE extends nn.Module {
  readonly branch1x1: BasicConv2d;
  readonly branch3x3_1: BasicConv2d;
  readonly branch3x3_2a: BasicConv2d;
  readonly branch3x3_2b: BasicConv2d;
  readonly branch3x3dbl_1: BasicConv2d;
  readonly branch3x3dbl_2: BasicConv2d;
  readonly branch3x3dbl_3a: BasicConv2d;
  readonly branch3x3dbl_3b: BasicConv2d;
  readonly branch_pool: BasicConv2d;

  constructor(inChannels: number, readonly pool: "avg" | "max", device: Device) {
    super();
    const c = (name: string, ci: number, co: number, k: Pair, pad: Pair = 0) =>
      this.registerModule(name, new BasicConv2d(ci, co, k, device, 1, pad));
    this.branch1x1 = c("branch1x1", inChannels, 320, 1);
    this.branch3x3_1 = c("branch3x3_1", inChannels, 384, 1);
    this.branch3x3_2a = c("branch3x3_2a", 384, 384, [1, 3], [0, 1]);
    this.branch3x3_2b = c("branch3x3_2b", 384, 384, [3, 1], [1, 0]);
    this.branch3x3dbl_1 = c("branch3x3dbl_1", inChannels, 448, 1);
    this.branch3x3dbl_2 = c("branch3x3dbl_2", 448, 384, 3, 1);
    this.branch3x3dbl_3a = c("branch3x3dbl_3a", 384, 384, [1, 3], [0, 1]);
    this.branch3x3dbl_3b = c("branch3x3dbl_3b", 384, 384, [3, 1], [1, 0]);
    this.branch_pool = c("branch_pool", inChannels, 192, 1);
  }

  forward(x: Tensor): Tensor {
    const s = this.branch3x3_1.forward(x);
    const d = this.branch3x3dbl_2.forward(this.branch3x3dbl_1.forward(x));
    const pooled = this.pool === "avg" ? tfAvgPool(x) : maxPool2d(x, 3, 1, 1);
    return cat([
      this.branch1x1.forward(x),
      this.branch3x3_2a.forward(s),
      this.branch3x3_2b.forward(s),
      this.branch3x3dbl_3a.forward(d),
      this.branch3x3dbl_3b.forward(d),
      this.branch_pool.forward(pooled),
    ], 1);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The network.

/** Inception options. */
export const InceptionOptionsSchema = z.strictObject({
  /** Device of the weights (default: the default device). */
  device: z.custom<Device>((v) => v instanceof Device, { message: "expected an engine Device" }).optional(),
  /** Build the 2048 → 1008 classifier (`fc.*`), needed only for `logits`. */
  fc: z.boolean().default(false),
  /** Input convention: NVlabs' detector (TF1 resize, (x − 128)/128) or pytorch-fid's (half-pixel, x/127.5 − 1). */
  preprocess: z.enum(["nvlabs", "pytorch-fid"]).default("nvlabs"),
  /** Resize inputs to 299×299 first (off: any size ≥ 75×75 goes through unchanged, as in pytorch-fid). */
  resize: z.boolean().default(true),
});
export type InceptionOptions = z.input<typeof InceptionOptionsSchema>;

function parseOptions(opts: InceptionOptions): z.output<typeof InceptionOptionsSchema> {
  return parseConfig(InceptionOptionsSchema, opts, "InceptionV3");
}

/** Keys of a PyTorch checkpoint that the FID network does not use. */
function ignoredKey(key: string, fc: boolean): boolean {
  return key.endsWith(".num_batches_tracked") || key.startsWith("AuxLogits.") ||
    (!fc && key.startsWith("fc."));
}

/**
 * The FID Inception-v3: `features(images)` → [N, 2048]; `logits(images)` → [N, 1008] when built with `fc`.
 * Module names follow pytorch-fid / torchvision, so `stateDict()` keys match the published checkpoint.
 */
export class InceptionV3 extends nn.Module {
  readonly Conv2d_1a_3x3: BasicConv2d;
  readonly Conv2d_2a_3x3: BasicConv2d;
  readonly Conv2d_2b_3x3: BasicConv2d;
  readonly Conv2d_3b_1x1: BasicConv2d;
  readonly Conv2d_4a_3x3: BasicConv2d;
  readonly Mixed_5b: InceptionA;
  readonly Mixed_5c: InceptionA;
  readonly Mixed_5d: InceptionA;
  readonly Mixed_6a: InceptionB;
  readonly Mixed_6b: InceptionC;
  readonly Mixed_6c: InceptionC;
  readonly Mixed_6d: InceptionC;
  readonly Mixed_6e: InceptionC;
  readonly Mixed_7a: InceptionD;
  readonly Mixed_7b: InceptionE;
  readonly Mixed_7c: InceptionE;
  readonly fc: nn.Linear | null;
  readonly options: z.output<typeof InceptionOptionsSchema>;
  readonly device: Device;

  constructor(opts: InceptionOptions = {}) {
    super();
    this.options = parseOptions(opts);
    const device = this.device = this.options.device ?? getDefaultDevice();
    const r = <M extends nn.Module>(name: string, m: M) => this.registerModule(name, m);
    this.Conv2d_1a_3x3 = r("Conv2d_1a_3x3", new BasicConv2d(3, 32, 3, device, 2));
    this.Conv2d_2a_3x3 = r("Conv2d_2a_3x3", new BasicConv2d(32, 32, 3, device));
    this.Conv2d_2b_3x3 = r("Conv2d_2b_3x3", new BasicConv2d(32, 64, 3, device, 1, 1));
    this.Conv2d_3b_1x1 = r("Conv2d_3b_1x1", new BasicConv2d(64, 80, 1, device));
    this.Conv2d_4a_3x3 = r("Conv2d_4a_3x3", new BasicConv2d(80, 192, 3, device));
    this.Mixed_5b = r("Mixed_5b", new InceptionA(192, 32, device));
    this.Mixed_5c = r("Mixed_5c", new InceptionA(256, 64, device));
    this.Mixed_5d = r("Mixed_5d", new InceptionA(288, 64, device));
    this.Mixed_6a = r("Mixed_6a", new InceptionB(288, device));
    this.Mixed_6b = r("Mixed_6b", new InceptionC(768, 128, device));
    this.Mixed_6c = r("Mixed_6c", new InceptionC(768, 160, device));
    this.Mixed_6d = r("Mixed_6d", new InceptionC(768, 160, device));
    this.Mixed_6e = r("Mixed_6e", new InceptionC(768, 192, device));
    this.Mixed_7a = r("Mixed_7a", new InceptionD(768, device));
    this.Mixed_7b = r("Mixed_7b", new InceptionE(1280, "avg", device));
    this.Mixed_7c = r("Mixed_7c", new InceptionE(2048, "max", device));
    this.fc = this.options.fc
      ? r("fc", new nn.Linear(INCEPTION_FEATURES, INCEPTION_CLASSES, { device }))
      : null;
    this.eval();
  }

  /** Builds the network and loads weights from a safetensors file with PyTorch names (see the file comment). */
  static async load(path: string, opts: InceptionOptions = {}): Promise<InceptionV3> {
    const net = new InceptionV3(opts);
    try {
      await net.loadSafetensors(path, (key) => !ignoredKey(key, net.fc !== null));
    } catch (e) {
      net.dispose();
      throw new Error(`InceptionV3.load ${path}: ${(e as Error).message}`);
    }
    return net;
  }

  /**
   * Copies weights by PyTorch name into the network. Ignores `*.num_batches_tracked`, `AuxLogits.*` and (without
   * fc) `fc.*`; every other missing, unexpected or mis-shaped tensor is named in the error, before anything is
   * copied.
   */
  loadWeights(tensors: Record<string, Tensor>): void {
    const fc = this.fc !== null;
    const used = Object.fromEntries(Object.entries(tensors).filter(([k]) => !ignoredKey(k, fc)));
    this.loadStateDict(used);
  }

  /** Images [N, 3, H, W] in [0, 255] → the network's input: resized to 299×299 and normalised. */
  preprocess(images: Tensor): Tensor {
    if (images.rank !== 4 || images.shape[1] !== 3) {
      throw new Error(
        `InceptionV3: images must be [N, 3, H, W] with values in [0, 255], got [${images.shape}]`,
      );
    }
    const nv = this.options.preprocess === "nvlabs";
    const [, , H, W] = images.shape;
    return scope(() => {
      const sized = this.options.resize && (H !== INCEPTION_SIZE || W !== INCEPTION_SIZE)
        ? interpolateBilinear(images, [INCEPTION_SIZE, INCEPTION_SIZE], { halfPixelCenters: !nv })
        : images;
      return nv ? mul(sub(sized, 128), 1 / 128) : sub(mul(sized, 1 / 127.5), 1);
    });
  }

  /** The stages in order: each takes the previous output. */
  #stages(): ((x: Tensor) => Tensor)[] {
    const conv = (m: BasicConv2d) => (x: Tensor) => m.forward(x);
    const block = (m: { forward(x: Tensor): Tensor }) => (x: Tensor) => m.forward(x);
    return [
      conv(this.Conv2d_1a_3x3),
      conv(this.Conv2d_2a_3x3),
      conv(this.Conv2d_2b_3x3),
      (x) => maxPool2d(x, 3, 2),
      conv(this.Conv2d_3b_1x1),
      conv(this.Conv2d_4a_3x3),
      (x) => maxPool2d(x, 3, 2),
      ...[this.Mixed_5b, this.Mixed_5c, this.Mixed_5d, this.Mixed_6a].map(block),
      ...[this.Mixed_6b, this.Mixed_6c, this.Mixed_6d, this.Mixed_6e].map(block),
      ...[this.Mixed_7a, this.Mixed_7b, this.Mixed_7c].map(block),
      // Global average pool to [N, 2048].
      (x) => mean(x, [2, 3]),
    ];
  }

  /**
   * The 2048-d pool features of images [N, 3, H, W] in [0, 255], without gradients. Each stage's
   * intermediates are freed as soon as the stage is done, so memory stays at about two stages' activations.
   */
  features(images: Tensor): Tensor {
    return noGrad(() => {
      let h = this.preprocess(images);
      for (const stage of this.#stages()) {
        const prev = h;
        h = scope(() => stage(prev));
        if (prev !== images) prev.dispose();
      }
      return h;
    });
  }

  /** Classifier logits [N, 1008] (the TF graph's 1008 classes); needs the network built with `fc: true`. */
  logits(images: Tensor): Tensor {
    if (!this.fc) {
      throw new Error("InceptionV3.logits: the network was built without its fc layer (fc: false)");
    }
    const f = this.features(images);
    const out = noGrad(() => linear(f, this.fc!.weight, this.fc!.bias));
    f.dispose();
    return out;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Counting without allocating.

/** One BasicConv2d of the network: input and output channels and kernel [kh, kw]. */
export interface InceptionConv {
  name: string;
  inChannels: number;
  outChannels: number;
  kernel: [number, number];
}

/** Every BasicConv2d of the FID Inception-v3, in parameter order, from the architecture (no allocation). */
export function inceptionConvs(): InceptionConv[] {
  const out: InceptionConv[] = [];
  const c = (name: string, i: number, o: number, k: Pair) =>
    out.push({ name, inChannels: i, outChannels: o, kernel: typeof k === "number" ? [k, k] : k });
  c("Conv2d_1a_3x3", 3, 32, 3);
  c("Conv2d_2a_3x3", 32, 32, 3);
  c("Conv2d_2b_3x3", 32, 64, 3);
  c("Conv2d_3b_1x1", 64, 80, 1);
  c("Conv2d_4a_3x3", 80, 192, 3);
  const a = (n: string, i: number, pf: number) => {
    c(`${n}.branch1x1`, i, 64, 1);
    c(`${n}.branch5x5_1`, i, 48, 1);
    c(`${n}.branch5x5_2`, 48, 64, 5);
    c(`${n}.branch3x3dbl_1`, i, 64, 1);
    c(`${n}.branch3x3dbl_2`, 64, 96, 3);
    c(`${n}.branch3x3dbl_3`, 96, 96, 3);
    c(`${n}.branch_pool`, i, pf, 1);
  };
  a("Mixed_5b", 192, 32);
  a("Mixed_5c", 256, 64);
  a("Mixed_5d", 288, 64);
  c("Mixed_6a.branch3x3", 288, 384, 3);
  c("Mixed_6a.branch3x3dbl_1", 288, 64, 1);
  c("Mixed_6a.branch3x3dbl_2", 64, 96, 3);
  c("Mixed_6a.branch3x3dbl_3", 96, 96, 3);
  for (
    const [n, c7] of [["Mixed_6b", 128], ["Mixed_6c", 160], ["Mixed_6d", 160], ["Mixed_6e", 192]] as const
  ) {
    c(`${n}.branch1x1`, 768, 192, 1);
    c(`${n}.branch7x7_1`, 768, c7, 1);
    c(`${n}.branch7x7_2`, c7, c7, [1, 7]);
    c(`${n}.branch7x7_3`, c7, 192, [7, 1]);
    c(`${n}.branch7x7dbl_1`, 768, c7, 1);
    c(`${n}.branch7x7dbl_2`, c7, c7, [7, 1]);
    c(`${n}.branch7x7dbl_3`, c7, c7, [1, 7]);
    c(`${n}.branch7x7dbl_4`, c7, c7, [7, 1]);
    c(`${n}.branch7x7dbl_5`, c7, 192, [1, 7]);
    c(`${n}.branch_pool`, 768, 192, 1);
  }
  c("Mixed_7a.branch3x3_1", 768, 192, 1);
  c("Mixed_7a.branch3x3_2", 192, 320, 3);
  c("Mixed_7a.branch7x7x3_1", 768, 192, 1);
  c("Mixed_7a.branch7x7x3_2", 192, 192, [1, 7]);
  c("Mixed_7a.branch7x7x3_3", 192, 192, [7, 1]);
  c("Mixed_7a.branch7x7x3_4", 192, 192, 3);
  for (const [n, i] of [["Mixed_7b", 1280], ["Mixed_7c", 2048]] as const) {
    c(`${n}.branch1x1`, i, 320, 1);
    c(`${n}.branch3x3_1`, i, 384, 1);
    c(`${n}.branch3x3_2a`, 384, 384, [1, 3]);
    c(`${n}.branch3x3_2b`, 384, 384, [3, 1]);
    c(`${n}.branch3x3dbl_1`, i, 448, 1);
    c(`${n}.branch3x3dbl_2`, 448, 384, 3);
    c(`${n}.branch3x3dbl_3a`, 384, 384, [1, 3]);
    c(`${n}.branch3x3dbl_3b`, 384, 384, [3, 1]);
    c(`${n}.branch_pool`, i, 192, 1);
  }
  return out;
}

/**
 * Trainable parameters of the FID Inception-v3 from its architecture: conv weights (no biases) + BatchNorm γ
 * and β, plus the 2048 → 1008 fc layer (weight and bias) when `fc`. BatchNorm running statistics are buffers
 * and not counted (there are 2·34,432 of them).
 */
export function inceptionParameterCount(opts: { fc?: boolean } = {}): {
  convWeights: number;
  batchNorm: number;
  fc: number;
  total: number;
} {
  let convWeights = 0, batchNorm = 0;
  for (const l of inceptionConvs()) {
    convWeights += l.inChannels * l.outChannels * l.kernel[0] * l.kernel[1];
    batchNorm += 2 * l.outChannels;
  }
  const fc = opts.fc ? INCEPTION_FEATURES * INCEPTION_CLASSES + INCEPTION_CLASSES : 0;
  return { convWeights, batchNorm, fc, total: convWeights + batchNorm + fc };
}
