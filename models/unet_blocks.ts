/**
 * @file The layers of the diffusion UNet family (models/unet.ts), after EDM's training/networks.py (Karras et
 * al. 2022), which unifies DDPM++ / NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021): convolution and
 * linear layers with EDM's initialisation modes, group normalization with EDM's group rule, the noise-level
 * embeddings, the unified `UNetBlock` (pre-activation residual block with optional up/down-sampling, additive
 * or adaptive scale-shift embedding, and self-attention), and DDPM-style separate resampling layers.
 *
 * Every layer is slimmable (DDSM, see models/slimmable.ts): `forward(..., width)` uses the leading slices of the
 * full weights, taken with the differentiable `narrow`, so training at any width trains the shared weights. At
 * width 1 no slice is taken and the full parameters are used directly.
 *
 * Memory: the forwards are `@nn.scopedForward` (engine/nn.ts), so they are written as plain maths: with a tape
 * (training) the intermediates live until the caller's scope ends; without one (sampling under `noGrad`) each
 * layer's intermediates are freed as soon as its output exists.
 */

import {
  add,
  avgPool2d,
  cat,
  conv2d,
  cos,
  type Device,
  dropout,
  groupNorm,
  groupNormSilu,
  interpolateNearest,
  keep,
  linear,
  mul,
  narrow,
  nn,
  randNormal,
  randUniform,
  reshape,
  silu,
  sin,
  type Tensor,
  tensor,
  zeros,
} from "../engine/mod.ts";
import { qkvAttention } from "./attention.ts";
import { CONV_DIVISOR, LINEAR_DIVISOR, slimChannels, slimGroups } from "./slimmable.ts";

// ---------------------------------------------------------------------------------------------------------------
// Initialisation (EDM's weight_init).

/** EDM's `weight_init` modes (networks.py): uniform or normal, scaled by fan-in or by fan-in + fan-out. */
export type InitMode = "xavier_uniform" | "xavier_normal" | "kaiming_uniform" | "kaiming_normal";

/** How a layer's parameters are initialised: EDM's `init_mode`, `init_weight`, `init_bias`. */
export interface LayerInit {
  mode: InitMode;
  /** Multiplier of the weight draw (0: zeros). */
  weight: number;
  /** Multiplier of the bias draw (0: zeros). */
  bias: number;
}

/** A tensor drawn like EDM's weight_init(shape, mode, fanIn, fanOut), times `scale`; zeros when scale is 0. */
export function initTensor(
  shape: number[],
  mode: InitMode,
  fanIn: number,
  fanOut: number,
  scale: number,
  device: Device,
): Tensor {
  if (scale === 0) return zeros(shape, { device });
  switch (mode) {
    case "xavier_uniform": {
      const b = scale * Math.sqrt(6 / (fanIn + fanOut));
      return randUniform(shape, -b, b, { device });
    }
    case "xavier_normal":
      return randNormal(shape, 0, scale * Math.sqrt(2 / (fanIn + fanOut)), { device });
    case "kaiming_uniform": {
      const b = scale * Math.sqrt(3 / fanIn);
      return randUniform(shape, -b, b, { device });
    }
    case "kaiming_normal":
      return randNormal(shape, 0, scale * Math.sqrt(1 / fanIn), { device });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Slimmable layers.

/** The leading `length` entries of a weight (or bias) along `dim`: the weight itself when that is all of it. */
function leading(t: Tensor, dim: number, length: number): Tensor {
  return length === t.shape[dim] ? t : narrow(t, dim, 0, length);
}

export interface ConvOptions {
  /** Whether there is a bias (default true). */
  bias?: boolean;
  /** Initialisation (default: PyTorch-like kaiming_uniform with multipliers √(1/3)). */
  init?: LayerInit;
  /** Whether the output channels shrink with the width (false for the image-output convolution). */
  slimOut?: boolean;
  /** Stride (default 1); padding is kernel/2 either way, as in EDM and DDPM. */
  stride?: number;
  device?: Device;
}

const TORCH_INIT: LayerInit = { mode: "kaiming_uniform", weight: Math.sqrt(1 / 3), bias: Math.sqrt(1 / 3) };

/**
 * A k×k convolution (k odd, padding k/2) with weight [out, in, k, k] and bias [out]. At a width below 1 it
 * uses the leading `slimChannels(out, w, 8)` filters over the input's own (leading) channel count.
 */
export class SlimConv2d extends nn.Module {
  readonly weight: Tensor;
  readonly bias: Tensor | null;
  readonly slimOut: boolean;
  readonly stride: number;

  constructor(
    readonly inChannels: number,
    readonly outChannels: number,
    readonly kernel: number,
    opts: ConvOptions = {},
  ) {
    super();
    const device = opts.device;
    if (!device) throw new Error("SlimConv2d: a device is required");
    const init = opts.init ?? TORCH_INIT;
    const fanIn = inChannels * kernel * kernel, fanOut = outChannels * kernel * kernel;
    this.weight = this.registerParameter(
      "weight",
      initTensor([outChannels, inChannels, kernel, kernel], init.mode, fanIn, fanOut, init.weight, device),
    );
    this.bias = (opts.bias ?? true)
      ? this.registerParameter("bias", initTensor([outChannels], init.mode, fanIn, fanOut, init.bias, device))
      : null;
    this.slimOut = opts.slimOut ?? true;
    this.stride = opts.stride ?? 1;
  }

  /** Output channels at `width`. */
  outAt(width: number): number {
    return this.slimOut ? slimChannels(this.outChannels, width, CONV_DIVISOR) : this.outChannels;
  }

  @nn.scopedForward
  forward(x: Tensor, width = 1): Tensor {
    const cin = x.shape[1];
    if (cin > this.inChannels) {
      throw new Error(`SlimConv2d: input has ${cin} channels, the layer at most ${this.inChannels}`);
    }
    const cout = this.outAt(width);
    const w = leading(leading(this.weight, 0, cout), 1, cin);
    const b = this.bias && leading(this.bias, 0, cout);
    return conv2d(x, w, b, { stride: this.stride, padding: this.kernel >> 1 });
  }
}

export interface LinearOptions {
  bias?: boolean;
  init?: LayerInit;
  /** Whether the output features shrink with the width (default true). */
  slimOut?: boolean;
  /** Rounding divisor of the slimmed output count (default 16, DDSM's SlimmableLinear). */
  divisor?: number;
  /**
   * The output is `chunks` equal parts (EDM's adaptive scale and shift); each part is slimmed on its own, so
   * the slim scale uses the leading scale rows and the slim shift the leading shift rows.
   */
  chunks?: number;
  device?: Device;
}

/** `y = x·Wᵀ + b` with weight [out, in]; slimmable like `SlimConv2d` (leading rows and columns). */
export class SlimLinear extends nn.Module {
  readonly weight: Tensor;
  readonly bias: Tensor | null;
  readonly slimOut: boolean;
  readonly divisor: number;
  readonly chunks: number;

  constructor(readonly inFeatures: number, readonly outFeatures: number, opts: LinearOptions = {}) {
    super();
    const device = opts.device;
    if (!device) throw new Error("SlimLinear: a device is required");
    const init = opts.init ?? TORCH_INIT;
    this.chunks = opts.chunks ?? 1;
    if (outFeatures % this.chunks) {
      throw new Error(`SlimLinear: ${outFeatures} outputs do not split into ${this.chunks} chunks`);
    }
    this.weight = this.registerParameter(
      "weight",
      initTensor([outFeatures, inFeatures], init.mode, inFeatures, outFeatures, init.weight, device),
    );
    this.bias = (opts.bias ?? true)
      ? this.registerParameter(
        "bias",
        initTensor([outFeatures], init.mode, inFeatures, outFeatures, init.bias, device),
      )
      : null;
    this.slimOut = opts.slimOut ?? true;
    this.divisor = opts.divisor ?? LINEAR_DIVISOR;
  }

  /** Output features of one chunk at `width`. */
  chunkAt(width: number): number {
    const full = this.outFeatures / this.chunks;
    return this.slimOut ? slimChannels(full, width, this.divisor) : full;
  }

  /** Output features at `width`. */
  outAt(width: number): number {
    return this.chunks * this.chunkAt(width);
  }

  @nn.scopedForward
  forward(x: Tensor, width = 1): Tensor {
    const fin = x.shape[x.rank - 1];
    if (fin > this.inFeatures) {
      throw new Error(`SlimLinear: input has ${fin} features, the layer at most ${this.inFeatures}`);
    }
    const k = this.chunks, full = this.outFeatures / k, part = this.chunkAt(width);
    let w = this.weight, b = this.bias;
    if (part < full && k === 1) {
      w = narrow(w, 0, 0, part);
      b = b && narrow(b, 0, 0, part);
    } else if (part < full) {
      // The leading `part` rows of each chunk.
      w = reshape(narrow(reshape(w, [k, full, this.inFeatures]), 1, 0, part), [k * part, this.inFeatures]);
      b = b && reshape(narrow(reshape(b, [k, full]), 1, 0, part), [k * part]);
    }
    return linear(x, leading(w, 1, fin), b);
  }
}

/** EDM's group count: min(groups, channels / minPerGroup), lowered to a divisor of the channel count. */
export function normGroups(channels: number, groups: number, minPerGroup: number): number {
  return slimGroups(Math.max(1, Math.min(groups, Math.floor(channels / minPerGroup))), channels);
}

/**
 * Group normalization with affine weight (ones) and bias (zeros) over `numChannels`; on a slimmed input it uses
 * the leading affine entries and the largest group count ≤ its full-width count that divides the channels.
 */
export class SlimGroupNorm extends nn.Module {
  readonly weight: Tensor;
  readonly bias: Tensor;

  constructor(
    readonly numChannels: number,
    readonly numGroups: number,
    readonly eps: number,
    device: Device,
  ) {
    super();
    if (numChannels % numGroups) {
      throw new Error(`SlimGroupNorm: ${numChannels} channels are not divisible by ${numGroups} groups`);
    }
    this.weight = this.registerParameter(
      "weight",
      tensor(new Float32Array(numChannels).fill(1), [numChannels], {
        device,
      }),
    );
    this.bias = this.registerParameter("bias", zeros([numChannels], { device }));
  }

  /** The group count used on `channels` input channels. */
  groupsAt(channels: number): number {
    return channels === this.numChannels ? this.numGroups : slimGroups(this.numGroups, channels);
  }

  @nn.scopedForward
  forward(x: Tensor): Tensor {
    return this.#norm(x, groupNorm);
  }

  /** `silu(forward(x))` in one kernel (see `groupNormSilu`). */
  @nn.scopedForward
  forwardSilu(x: Tensor): Tensor {
    return this.#norm(x, groupNormSilu);
  }

  #norm(x: Tensor, op: typeof groupNorm): Tensor {
    const c = x.shape[1];
    if (c > this.numChannels) {
      throw new Error(`SlimGroupNorm: input has ${c} channels, the layer at most ${this.numChannels}`);
    }
    return op(x, this.groupsAt(c), leading(this.weight, 0, c), leading(this.bias, 0, c), this.eps);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Noise-level embeddings.

/**
 * Order of the sines and cosines: EDM's ADM puts cosines first ("cos-sin"); SongUNet (DDPM++/NCSN++) swaps
 * the halves ("sin-cos"); DDPM/DDSM's PyTorch code interleaves them per frequency ("interleaved-sin-cos").
 */
export type EmbeddingLayout = "cos-sin" | "sin-cos" | "interleaved-sin-cos";

/** Arranges [N, half] cosines and sines into [N, 2·half] per `layout`. */
function arrange(c: Tensor, s: Tensor, layout: EmbeddingLayout): Tensor {
  if (layout === "cos-sin") return cat([c, s], 1);
  if (layout === "sin-cos") return cat([s, c], 1);
  const [N, half] = c.shape;
  return reshape(cat([reshape(s, [N, half, 1]), reshape(c, [N, half, 1])], 2), [N, 2 * half]);
}

/** cos/sin of `cNoise ⊗ freqs` arranged per `layout`. */
function sinusoids(cNoise: Tensor, freqs: Tensor, layout: EmbeddingLayout): Tensor {
  if (cNoise.rank !== 1) throw new Error(`noise embedding: cNoise must be [N], got [${cNoise.shape}]`);
  const args = mul(reshape(cNoise, [cNoise.shape[0], 1]), freqs);
  return arrange(cos(args), sin(args), layout);
}

/**
 * The Transformer sinusoidal embedding of DDPM and ADM (EDM's PositionalEmbedding): frequencies
 * (1/maxPositions)^(i/(half − endpoint)) for i < half.
 */
export class PositionalEmbedding extends nn.Module {
  #freqs: Tensor | null = null;
  constructor(
    readonly numChannels: number,
    readonly opts: { maxPositions: number; endpoint: boolean; layout: EmbeddingLayout; device: Device },
  ) {
    super();
    const half = numChannels / 2;
    if (!Number.isInteger(half) || half < 1 || (opts.endpoint && half < 2)) {
      throw new Error(`PositionalEmbedding: ${numChannels} channels do not give a frequency ladder`);
    }
  }

  /** The frequencies as [1, half] (computed once, in float64 on the host). */
  freqs(): Tensor {
    if (!this.#freqs) {
      const half = this.numChannels / 2, denom = half - (this.opts.endpoint ? 1 : 0);
      const f = Float64Array.from(
        { length: half },
        (_, i) => Math.pow(1 / this.opts.maxPositions, i / denom),
      );
      // Kept out of any enclosing scope: it lives as long as the module, like a parameter.
      this.#freqs = keep(tensor(f, [1, half], { device: this.opts.device }));
    }
    return this.#freqs;
  }

  @nn.scopedForward
  forward(cNoise: Tensor): Tensor {
    return sinusoids(cNoise, this.freqs(), this.opts.layout);
  }

  override dispose(): void {
    this.#freqs?.dispose();
    this.#freqs = null;
    super.dispose();
  }
}

/** Random Fourier features of NCSN++ (EDM's FourierEmbedding): a buffer `freqs` ~ N(0, scale²), 2π·freqs·c. */
export class FourierEmbedding extends nn.Module {
  readonly freqs: Tensor;
  constructor(
    readonly numChannels: number,
    readonly opts: { scale: number; layout: EmbeddingLayout; device: Device },
  ) {
    super();
    if (numChannels % 2 || numChannels < 2) {
      throw new Error(`FourierEmbedding: ${numChannels} channels must be even`);
    }
    this.freqs = this.registerBuffer(
      "freqs",
      randNormal([numChannels / 2], 0, opts.scale, { device: opts.device }),
    );
  }

  @nn.scopedForward
  forward(cNoise: Tensor): Tensor {
    return sinusoids(
      cNoise,
      mul(reshape(this.freqs, [1, this.numChannels / 2]), 2 * Math.PI),
      this.opts.layout,
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The unified UNet block.

export interface UNetBlockOptions {
  /** Width of the embedding vector the block is conditioned on. */
  embChannels: number;
  /** Upsample ×2 (nearest, EDM's [1,1] filter) before the first convolution. */
  up?: boolean;
  /** Downsample ×2 (2×2 average, EDM's [1,1] filter) before the first convolution. */
  down?: boolean;
  /** Attention heads after the residual branch (0: no attention). */
  numHeads: number;
  dropout: number;
  /** Multiplier of each residual sum (EDM: √0.5 for DDPM++, 1 for ADM and DDPM). */
  skipScale: number;
  eps: number;
  /** 1×1 convolution on the skip path of resampling blocks (DDPM++) instead of the bare resample (ADM). */
  resampleProj: boolean;
  /** Adaptive group norm (scale and shift from the embedding, ADM) instead of an added embedding (DDPM). */
  adaptiveScale: boolean;
  /** GroupNorm group count and minimum channels per group (EDM: 32 and 4). */
  groups: number;
  minChannelsPerGroup: number;
  init: LayerInit;
  /** Initialisation of conv1 (EDM's init_zero). */
  initZero: LayerInit;
  /** Initialisation of the attention's qkv and proj. */
  initQkv: LayerInit;
  initProj: LayerInit;
  device: Device;
}

/**
 * EDM's UNetBlock: `conv0(silu(norm0(x)))` (resampled first when up/down), the embedding added before norm1
 * (DDPM) or used as scale and shift after it (ADM), `conv1(dropout(silu(·)))`, plus the (projected) skip, times
 * `skipScale`; then optionally multi-head self-attention with its own residual. Parameters: norm0, conv0,
 * affine, norm1, conv1, skip, norm2, qkv, proj (EDM's names).
 */
export class UNetBlock extends nn.Module {
  readonly norm0: SlimGroupNorm;
  readonly conv0: SlimConv2d;
  readonly affine: SlimLinear;
  readonly norm1: SlimGroupNorm;
  readonly conv1: SlimConv2d;
  readonly skip: SlimConv2d | null;
  readonly norm2: SlimGroupNorm | null = null;
  readonly qkv: SlimConv2d | null = null;
  readonly proj: SlimConv2d | null = null;
  readonly up: boolean;
  readonly down: boolean;
  readonly numHeads: number;
  /** Whether the skip path resamples (up/down) without a projection (EDM's kernel-0 Conv2d). */
  readonly bareResampleSkip: boolean;

  constructor(readonly inChannels: number, readonly outChannels: number, readonly opts: UNetBlockOptions) {
    super();
    const { device, eps } = opts;
    this.up = opts.up ?? false;
    this.down = opts.down ?? false;
    if (this.up && this.down) throw new Error("UNetBlock: up and down are exclusive");
    this.numHeads = opts.numHeads;
    const gn = (c: number) =>
      new SlimGroupNorm(c, normGroups(c, opts.groups, opts.minChannelsPerGroup), eps, device);
    this.norm0 = this.registerModule("norm0", gn(inChannels));
    this.conv0 = this.registerModule(
      "conv0",
      new SlimConv2d(inChannels, outChannels, 3, { init: opts.init, device }),
    );
    const k = opts.adaptiveScale ? 2 : 1;
    // The embedding is added to conv0's output, so it is slimmed with the convolution's rounding.
    this.affine = this.registerModule(
      "affine",
      new SlimLinear(opts.embChannels, k * outChannels, {
        init: opts.init,
        divisor: CONV_DIVISOR,
        chunks: k,
        device,
      }),
    );
    this.norm1 = this.registerModule("norm1", gn(outChannels));
    this.conv1 = this.registerModule(
      "conv1",
      new SlimConv2d(outChannels, outChannels, 3, { init: opts.initZero, device }),
    );
    const resample = this.up || this.down;
    this.skip = null;
    this.bareResampleSkip = false;
    if (outChannels !== inChannels || resample) {
      if (opts.resampleProj || outChannels !== inChannels) {
        this.skip = this.registerModule(
          "skip",
          new SlimConv2d(inChannels, outChannels, 1, { init: opts.init, device }),
        );
      } else this.bareResampleSkip = true;
    }
    if (this.numHeads > 0) {
      if (outChannels % this.numHeads) {
        throw new Error(`UNetBlock: ${outChannels} channels do not split into ${this.numHeads} heads`);
      }
      this.norm2 = this.registerModule("norm2", gn(outChannels));
      this.qkv = this.registerModule(
        "qkv",
        new SlimConv2d(outChannels, 3 * outChannels, 1, { init: opts.initQkv, device }),
      );
      this.proj = this.registerModule(
        "proj",
        new SlimConv2d(outChannels, outChannels, 1, { init: opts.initProj, device }),
      );
    }
  }

  /** Output channels at `width`. */
  outAt(width: number): number {
    return this.conv0.outAt(width);
  }

  /** ×2 down (2×2 average) or up (nearest) when the block resamples; otherwise `x` itself. */
  #resample(x: Tensor): Tensor {
    return this.down ? avgPool2d(x, 2) : this.up ? interpolateNearest(x, 2) : x;
  }

  @nn.scopedForward
  forward(x: Tensor, emb: Tensor, width = 1): Tensor {
    let h = this.conv0.forward(this.#resample(this.norm0.forwardSilu(x)), width);
    const params = reshape(this.affine.forward(emb, width), [emb.shape[0], -1, 1, 1]);
    if (this.opts.adaptiveScale) {
      const c = h.shape[1], scale = narrow(params, 1, 0, c), shift = narrow(params, 1, c, c);
      h = silu(add(shift, mul(this.norm1.forward(h), add(scale, 1))));
    } else {
      h = this.norm1.forwardSilu(add(h, params));
    }
    h = this.conv1.forward(this.#dropout(h), width);
    // A projected skip, or the bare resample of ADM's kernel-0 skip, or (no resampling) x itself.
    const skip = this.skip ? this.skip.forward(this.#resample(x), width) : this.#resample(x);
    h = this.#scaled(add(h, skip));
    return this.numHeads > 0 ? this.#attention(h) : h;
  }

  /**
   * The block with its residual branch narrowed to `hidden` channels and its attention optionally left out,
   * input and output at their full channel counts (the candidates of block-wise distillation,
   * models/blocks_cut.ts): conv0 keeps its leading `hidden` filters, the affine the leading `hidden` rows of each
   * chunk, norm1 its leading parameters (with EDM's group count for `hidden` channels), conv1 its leading
   * `hidden` input columns; the skip path and attention stay full. With every channel and the attention it is `forward(x, emb)` itself.
   */
  @nn.scopedForward
  forwardNarrow(x: Tensor, emb: Tensor, hidden: number, attention = true): Tensor {
    const o = this.outChannels;
    if (!Number.isInteger(hidden) || hidden < 1 || hidden > o) {
      throw new Error(`UNetBlock.forwardNarrow: hidden must be an integer in [1, ${o}], got ${hidden}`);
    }
    if (hidden === o && (attention || this.numHeads === 0)) return this.forward(x, emb);
    const rows = (t: Tensor) => narrow(t, 0, 0, hidden);
    const c0 = this.conv0, a = this.affine, k = a.chunks, fin = emb.shape[emb.rank - 1];
    let h = conv2d(
      this.#resample(this.norm0.forwardSilu(x)),
      hidden < o ? rows(c0.weight) : c0.weight,
      c0.bias && (hidden < o ? rows(c0.bias) : c0.bias),
      { padding: 1 },
    );
    let aw = a.weight, ab = a.bias;
    if (hidden < o) {
      aw = reshape(narrow(reshape(aw, [k, o, a.inFeatures]), 1, 0, hidden), [k * hidden, a.inFeatures]);
      ab = ab && reshape(narrow(reshape(ab, [k, o]), 1, 0, hidden), [k * hidden]);
    }
    if (fin < a.inFeatures) aw = narrow(aw, 1, 0, fin);
    const params = reshape(linear(emb, aw, ab), [emb.shape[0], -1, 1, 1]);
    // norm1 on the narrowed branch keeps EDM's group rule (at least minChannelsPerGroup channels per group)
    // rather than the slimmable full group count: with one channel per group the added embedding would be
    // normalised away.
    const n1 = this.norm1, groups = normGroups(hidden, this.opts.groups, this.opts.minChannelsPerGroup);
    const norm1 = (v: Tensor, op: typeof groupNorm = groupNorm) =>
      op(v, groups, narrow(n1.weight, 0, 0, hidden), narrow(n1.bias, 0, 0, hidden), n1.eps);
    if (this.opts.adaptiveScale) {
      const scale = narrow(params, 1, 0, hidden), shift = narrow(params, 1, hidden, hidden);
      h = silu(add(shift, mul(norm1(h), add(scale, 1))));
    } else {
      h = norm1(add(h, params), groupNormSilu);
    }
    // conv1 takes the leading `hidden` input columns (SlimConv2d slices by the input) and keeps all its filters.
    h = this.conv1.forward(this.#dropout(h), 1);
    const skip = this.skip ? this.skip.forward(this.#resample(x), 1) : this.#resample(x);
    h = this.#scaled(add(h, skip));
    return attention && this.numHeads > 0 ? this.#attention(h) : h;
  }

  /**
   * Dropout before conv1; without it (p = 0, or evaluating) h itself rather than an identity view, so that conv1
   * can still take a deferred groupNorm output in its packed layout (ops/norm.ts).
   */
  #dropout(h: Tensor): Tensor {
    return this.opts.dropout > 0 && this.training ? dropout(h, this.opts.dropout, this.training) : h;
  }

  /** A residual sum times `skipScale` (no op at 1). */
  #scaled(x: Tensor): Tensor {
    return this.opts.skipScale === 1 ? x : mul(x, this.opts.skipScale);
  }

  /**
   * Multi-head self-attention (EDM's UNetBlock): qkv channels read as [heads, C/heads, 3]; at a slim width the
   * head count stays and each head keeps its leading channels, so the qkv rows and the proj columns are
   * narrowed per head (with one head: the leading rows and columns, as DDSM's attention).
   */
  #attention(x: Tensor): Tensor {
    const c = x.shape[1], heads = this.numHeads, C = this.outChannels;
    if (c % heads) {
      throw new Error(`UNetBlock: ${c} slimmed channels do not split into ${heads} attention heads`);
    }
    const per = c / heads, full = C / heads;
    let wq = this.qkv!.weight, bq = this.qkv!.bias!, wp = this.proj!.weight, bp = this.proj!.bias!;
    if (c < C) {
      wq = reshape(narrow(narrow(reshape(wq, [heads, full, 3, C]), 1, 0, per), 3, 0, c), [3 * c, c, 1, 1]);
      bq = reshape(narrow(reshape(bq, [heads, full, 3]), 1, 0, per), [3 * c]);
      wp = reshape(narrow(reshape(narrow(wp, 0, 0, c), [c, heads, full]), 2, 0, per), [c, c, 1, 1]);
      bp = narrow(bp, 0, 0, c);
    }
    const a = qkvAttention(conv2d(this.norm2!.forward(x), wq, bq), heads);
    return this.#scaled(add(conv2d(a, wp, bp), x));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Separate resampling layers (DDPM, Ho et al. 2020; DDSM's DownSample / UpSample).

/** ×2 downsampling as its own layer: a learned 3×3 stride-2 convolution (padding 1), or a 2×2 average. */
export class Downsample extends nn.Module {
  readonly conv: SlimConv2d | null;
  constructor(channels: number, learned: boolean, init: LayerInit, device: Device) {
    super();
    this.conv = learned
      ? this.registerModule("conv", new SlimConv2d(channels, channels, 3, { init, stride: 2, device }))
      : null;
  }
  forward(x: Tensor, width = 1): Tensor {
    return this.conv ? this.conv.forward(x, width) : avgPool2d(x, 2);
  }
}

/** ×2 upsampling as its own layer: nearest neighbour, then (when learned) a 3×3 convolution. */
export class Upsample extends nn.Module {
  readonly conv: SlimConv2d | null;
  constructor(channels: number, learned: boolean, init: LayerInit, device: Device) {
    super();
    this.conv = learned
      ? this.registerModule("conv", new SlimConv2d(channels, channels, 3, { init, device }))
      : null;
  }
  @nn.scopedForward
  forward(x: Tensor, width = 1): Tensor {
    const up = interpolateNearest(x, 2);
    return this.conv ? this.conv.forward(up, width) : up;
  }
}
