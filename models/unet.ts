/**
 * @file The configurable diffusion UNet: one network, described by a JSON-serializable `UNetSpec` (parsed with
 * zod), that covers EDM's SongUNet (DDPM++ / NCSN++ positional or Fourier embedding), DhariwalUNet (ADM) and
 * the DDPM UNet of Ho et al. 2020 as used by DDSM. It computes F(x; c_noise, labels) of EDM's preconditioned
 * denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) (Karras et al. 2022, eq. 7).
 *
 * Structure (EDM networks.py, which reproduces the originals): a mapping network turns the noise label (and the
 * class and augmentation labels) into an embedding vector; the encoder is an input convolution followed, per
 * resolution level, by `numBlocks` UNetBlocks (each level after the first starts with a ×2 downsampling, either
 * a down UNetBlock or a separate layer); every encoder output is kept as a skip. The decoder starts with two
 * blocks at the lowest resolution (the first with attention: the "middle" of DDPM), then per level, from the
 * lowest, an upsampling (except at the lowest level) and `numBlocks + 1` blocks, each taking the concatenation
 * of the running features and the latest unused skip; GroupNorm, SiLU and a 3×3 convolution give the output.
 *
 * Parameter names follow EDM's module names in PyTorch's dotted scheme (`map_layer0.weight`,
 * `enc.32x32_block0.conv0.weight`, `dec.4x4_in0.qkv.bias`; DDPM's separate resampling layers are
 * `enc.16x16_down.conv.*` / `dec.8x8_up.conv.*`; the output layers are `out_norm` / `out_conv`, as in ADM).
 *
 * `planLayers(spec, width)` describes every layer (channel counts at a DDSM width, groups, heads) without
 * allocating anything; `parameterShapes` and `countParameters` derive the exact parameter list and count from it.
 */

import { z } from "zod";
import {
  add,
  cat,
  type Device,
  discard,
  dropout,
  getDefaultDevice,
  mul,
  nn,
  ones,
  silu,
  type Tensor,
} from "../engine/mod.ts";
import {
  Downsample,
  FourierEmbedding,
  type LayerInit,
  normGroups,
  PositionalEmbedding,
  SlimConv2d,
  SlimGroupNorm,
  SlimLinear,
  UNetBlock,
  Upsample,
} from "./unet_blocks.ts";
import { checkWidth, CONV_DIVISOR, LINEAR_DIVISOR, slimChannels, slimGroups } from "./slimmable.ts";
import { zodMessage } from "../util/config.ts";

// ---------------------------------------------------------------------------------------------------------------
// The spec.

/**
 * Upper bounds of the spec's sizes: far above any network here (ADM ImageNet-64 has 192 channels, multipliers up
 * to 4, 3 blocks, 4 levels), low enough that planning a network at the bounds takes milliseconds. Whether a
 * network fits in memory at a batch size is checked apart, before anything is allocated (models/cost.ts).
 */
export const SPEC_LIMITS = Object.freeze({
  imgResolution: 4096,
  /** Image channels in and out. */
  imageChannels: 64,
  modelChannels: 4096,
  /** Resolution levels (channelMult entries; 4096 halves 12 times). */
  levels: 13,
  /** A channel multiplier (channelMult, inputMult, channelMultNoise, channelMultEmb). */
  mult: 64,
  numBlocks: 64,
  labelDim: 100_000,
  augmentDim: 1024,
  /** Attention heads, and channels per head. */
  heads: 4096,
  normGroups: 4096,
});

const int = (min: number, max = Number.MAX_SAFE_INTEGER) => z.number().int().min(min).max(max);
const L = SPEC_LIMITS;

/** Parameter initialisation, in terms of EDM's weight_init (networks.py). */
export const InitSchema = z.strictObject({
  /** EDM init_mode of every convolution and linear layer. */
  mode: z.enum(["xavier_uniform", "kaiming_uniform"]),
  /** Multiplier of ordinary weights (EDM init_weight; ADM √(1/3)). */
  weight: z.number().min(0),
  /** Multiplier of ordinary biases (EDM init_bias; 0 = zero biases). */
  bias: z.number().min(0),
  /** Weight multiplier of each block's conv1 and the output conv (EDM init_zero: 1e-5 DDPM++, 0 ADM). */
  zero: z.number().min(0),
  /** Weight multiplier of the attention qkv conv (DDPM++ √0.2; DDPM's separate q, k, v: √2). */
  qkv: z.number().min(0),
  /** Weight multiplier of the attention output projection (DDPM++ 1e-5, ADM 0). */
  proj: z.number().min(0),
});
export type InitSpec = z.infer<typeof InitSchema>;

/** The DDPM++ (SongUNet) initialisation of EDM. */
export const SONG_INIT: InitSpec = Object.freeze({
  mode: "xavier_uniform",
  weight: 1,
  bias: 0,
  zero: 1e-5,
  qkv: Math.sqrt(0.2),
  proj: 1e-5,
});

const UNetSpecObject = z.strictObject({
  /** Height and width of the input and output images. */
  imgResolution: int(1, L.imgResolution),
  /** Image channels at the input. */
  inChannels: int(1, L.imageChannels),
  /** Image channels at the output. */
  outChannels: int(1, L.imageChannels),
  /** Width of the one-hot class label; 0 = unconditional. */
  labelDim: int(0, L.labelDim).default(0),
  /** Probability of dropping the class label in training (classifier-free guidance). */
  labelDropout: z.number().min(0).max(1).default(0),
  /** Width of EDM's augmentation label (9 with its augmentation pipeline); 0 = none. */
  augmentDim: int(0, L.augmentDim).default(0),
  /** Base channel count. */
  modelChannels: int(1, L.modelChannels),
  /** Channels of each resolution level, in units of modelChannels (one entry per level). */
  channelMult: z.array(int(1, L.mult)).min(1).max(L.levels),
  /** Channels of the input conv in units of modelChannels (default channelMult[0]; DDPM++: 1). */
  inputMult: int(1, L.mult).optional(),
  /** Residual blocks per level in the encoder (the decoder has one more per level). */
  numBlocks: int(1, L.numBlocks),
  /** Feature-map resolutions whose blocks have self-attention. */
  attnResolutions: z.array(int(1, L.imgResolution)).max(L.levels).default([]),
  /** Decoder attention in every block of an attention level (ADM, DDPM) or only in its last (DDPM++). */
  decoderAttention: z.enum(["all", "last"]).default("all"),
  /** Attention heads (SongUNet: 1); when absent, channels / channelsPerHead, or 1 if that is absent too. */
  numHeads: int(1, L.heads).optional(),
  /** Channels per attention head when numHeads is absent (ADM: 64). */
  channelsPerHead: int(1, L.modelChannels * L.mult).optional(),
  /** Dropout probability before each block's second convolution. */
  dropout: z.number().min(0).max(1).default(0.1),
  /** Noise embedding: sinusoidal positional (DDPM, DDPM++, ADM) or random Fourier features (NCSN++). */
  embedding: z.enum(["positional", "fourier"]).default("positional"),
  /** Order of the embedding's sines and cosines (ADM cos-sin, DDPM++ sin-cos, DDPM interleaved). */
  embeddingLayout: z.enum(["cos-sin", "sin-cos", "interleaved-sin-cos"]).default("cos-sin"),
  /** Positional frequencies run to exactly 1/maxPositions (DDPM++: true; ADM, DDPM: false). */
  embeddingEndpoint: z.boolean().default(false),
  /** Base period of the positional embedding. */
  maxPositions: z.number().positive().default(10000),
  /** Standard deviation of the random Fourier frequencies (NCSN++: 16). */
  fourierScale: z.number().positive().default(16),
  /** Noise-embedding channels in units of modelChannels (DDPM++ 1, NCSN++ 2). */
  channelMultNoise: int(1, L.mult).default(1),
  /** Embedding-vector channels in units of modelChannels. */
  channelMultEmb: int(1, L.mult).default(4),
  /** Mapping network: SongUNet's (labels join the noise embedding) or ADM's (labels join after layer 1). */
  mapping: z.enum(["song", "adm"]).default("song"),
  /** Resampling: parameter-free [1,1] filter (2×2 average down, nearest up) or learned 3×3 convs (DDPM). */
  resampleFilter: z.enum(["box", "conv"]).default("box"),
  /** Resample inside up/down UNet blocks (EDM, ADM) or with separate layers (DDPM). */
  resampleInBlock: z.boolean().default(true),
  /** 1×1 conv on the skip path of resampling blocks (DDPM++) instead of the bare resample (ADM). */
  resampleProj: z.boolean().default(false),
  /** Multiplier of every residual sum (DDPM++ √0.5; ADM, DDPM 1). */
  skipScale: z.number().positive().default(1),
  /** Adaptive group norm, scale and shift from the embedding (ADM), instead of adding it (DDPM, DDPM++). */
  adaptiveScale: z.boolean().default(false),
  /** GroupNorm group count (EDM: 32). */
  normGroups: int(1, L.normGroups).default(32),
  /** Minimum channels per group: groups = min(normGroups, C / this), EDM: 4 (1 = always normGroups). */
  normMinChannelsPerGroup: int(1, L.modelChannels * L.mult).default(4),
  /** GroupNorm epsilon (DDPM++ 1e-6, ADM 1e-5). */
  normEps: z.number().positive().max(1).default(1e-5),
  /** Parameter initialisation. */
  init: InitSchema.default(SONG_INIT),
});

/** Input resolution of every level (halving from imgResolution). */
const levelResolutions = (s: { imgResolution: number; channelMult: number[] }) =>
  s.channelMult.map((_, l) => s.imgResolution >> l);

export const UNetSpecSchema = UNetSpecObject.superRefine((s, ctx) => {
  const issue = (path: (string | number)[], message: string) =>
    ctx.addIssue({ code: "custom", path, message });
  const levels = s.channelMult.length;
  if (s.imgResolution % (1 << (levels - 1))) {
    issue(
      ["imgResolution"],
      `${s.imgResolution} does not halve ${levels - 1} times (channelMult has ${levels} levels)`,
    );
  }
  const res = levelResolutions(s);
  s.attnResolutions.forEach((r, i) => {
    if (!res.includes(r)) issue(["attnResolutions", i], `${r} is not a level resolution (${res.join(", ")})`);
  });
  const noise = s.modelChannels * s.channelMultNoise;
  if (noise % 2 || (s.embedding === "positional" && s.embeddingEndpoint && noise < 4)) {
    issue(["channelMultNoise"], `noise embedding channels ${noise} must be even (≥ 4 with an endpoint)`);
  }
  if (s.resampleFilter === "conv" && s.resampleInBlock) {
    issue(["resampleInBlock"], "learned (conv) resampling is a separate layer: set resampleInBlock to false");
  }
  if (s.resampleProj && !s.resampleInBlock) {
    issue(["resampleProj"], "only resampling blocks have a skip projection: needs resampleInBlock");
  }
  // Attention channels: the middle block at the lowest level and every level with attention.
  const attnChannels = new Set<number>([s.modelChannels * s.channelMult[levels - 1]]);
  res.forEach((r, l) =>
    s.attnResolutions.includes(r) && attnChannels.add(s.modelChannels * s.channelMult[l])
  );
  for (const c of attnChannels) {
    if (s.numHeads !== undefined) {
      if (c % s.numHeads) {
        issue(["numHeads"], `${c} attention channels do not split into ${s.numHeads} heads`);
      }
    } else if (s.channelsPerHead !== undefined && c % s.channelsPerHead) {
      issue(["channelsPerHead"], `${c} attention channels are not a multiple of ${s.channelsPerHead}`);
    }
  }
  if (s.labelDropout > 0 && s.labelDim === 0) issue(["labelDropout"], "needs labelDim > 0");
});

/** A parsed spec, every default filled in. */
export type UNetSpec = z.output<typeof UNetSpecSchema>;
/** What `parseUNetSpec` accepts (defaults may be left out). */
export type UNetSpecInput = z.input<typeof UNetSpecSchema>;

/** Parses a spec, throwing an error that names each bad field. */
export function parseUNetSpec(input: unknown): UNetSpec {
  const r = UNetSpecSchema.safeParse(input);
  if (!r.success) throw new Error(`UNetSpec: ${zodMessage(r.error)}`);
  return r.data;
}

// ---------------------------------------------------------------------------------------------------------------
// The layout: one list of encoder and decoder entries, shared by the module and the planner.

/** One entry of the encoder or decoder, with its full-width channels. */
export interface LayoutEntry {
  /** Key in `enc` / `dec` (EDM's names: "32x32_conv", "16x16_down", "4x4_in0", "8x8_block2", …). */
  key: string;
  kind: "conv" | "block" | "down" | "up";
  /** Feature-map resolution at the output. */
  res: number;
  inChannels: number;
  outChannels: number;
  /** UNet blocks: attention heads (0 = none), and whether they resample. */
  heads: number;
  up: boolean;
  down: boolean;
  /** Decoder blocks: channels of the skip concatenated to the input (0 = none). */
  skipChannels: number;
}

/** Attention heads of a block with `channels` outputs. */
function headsFor(s: UNetSpec, channels: number): number {
  return s.numHeads ?? (s.channelsPerHead ? channels / s.channelsPerHead : 1);
}

/** The encoder and decoder entries of `spec`, in order (EDM SongUNet / DhariwalUNet constructors). */
export function unetLayout(spec: UNetSpec): { enc: LayoutEntry[]; dec: LayoutEntry[] } {
  const s = spec, mc = s.modelChannels, levels = s.channelMult.length;
  const enc: LayoutEntry[] = [], dec: LayoutEntry[] = [];
  const entry = (
    e: Partial<LayoutEntry> & Pick<LayoutEntry, "key" | "kind" | "res" | "inChannels" | "outChannels">,
  ) => ({ heads: 0, up: false, down: false, skipChannels: 0, ...e }) as LayoutEntry;
  let cout = s.inChannels;
  s.channelMult.forEach((mult, level) => {
    const res = s.imgResolution >> level;
    if (level === 0) {
      const cin = cout;
      cout = mc * (s.inputMult ?? s.channelMult[0]);
      enc.push(entry({ key: `${res}x${res}_conv`, kind: "conv", res, inChannels: cin, outChannels: cout }));
    } else if (s.resampleInBlock) {
      enc.push(
        entry({
          key: `${res}x${res}_down`,
          kind: "block",
          res,
          inChannels: cout,
          outChannels: cout,
          down: true,
        }),
      );
    } else {
      enc.push(entry({ key: `${res}x${res}_down`, kind: "down", res, inChannels: cout, outChannels: cout }));
    }
    for (let i = 0; i < s.numBlocks; i++) {
      const cin = cout;
      cout = mc * mult;
      const heads = s.attnResolutions.includes(res) ? headsFor(s, cout) : 0;
      enc.push(
        entry({
          key: `${res}x${res}_block${i}`,
          kind: "block",
          res,
          inChannels: cin,
          outChannels: cout,
          heads,
        }),
      );
    }
  });
  const skips = enc.map((e) => e.outChannels);
  for (let level = levels - 1; level >= 0; level--) {
    const res = s.imgResolution >> level, mult = s.channelMult[level];
    if (level === levels - 1) {
      const heads = headsFor(s, cout);
      dec.push(
        entry({ key: `${res}x${res}_in0`, kind: "block", res, inChannels: cout, outChannels: cout, heads }),
      );
      dec.push(entry({ key: `${res}x${res}_in1`, kind: "block", res, inChannels: cout, outChannels: cout }));
    } else if (s.resampleInBlock) {
      dec.push(
        entry({ key: `${res}x${res}_up`, kind: "block", res, inChannels: cout, outChannels: cout, up: true }),
      );
    } else {
      dec.push(entry({ key: `${res}x${res}_up`, kind: "up", res, inChannels: cout, outChannels: cout }));
    }
    for (let i = 0; i <= s.numBlocks; i++) {
      const skip = skips.pop()!;
      const cin = cout + skip;
      cout = mc * mult;
      const attn = s.attnResolutions.includes(res) && (s.decoderAttention === "all" || i === s.numBlocks);
      const heads = attn ? headsFor(s, cout) : 0;
      dec.push(entry({
        key: `${res}x${res}_block${i}`,
        kind: "block",
        res,
        inChannels: cin,
        outChannels: cout,
        heads,
        skipChannels: skip,
      }));
    }
  }
  return { enc, dec };
}

/** The layer initialisations of a spec. */
function inits(s: UNetSpec) {
  const i = s.init;
  const layer = (w: number, b: number): LayerInit => ({ mode: i.mode, weight: w, bias: b });
  return {
    init: layer(i.weight, i.bias),
    zero: layer(i.zero, 0),
    qkv: layer(i.qkv, i.bias),
    proj: layer(i.proj, 0),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// The module.

/** A named collection of submodules, like torch.nn.ModuleDict. */
export class ModuleDict<M extends nn.Module = nn.Module> extends nn.Module {
  readonly items = new Map<string, M>();
  set(name: string, m: M): M {
    this.items.set(name, this.registerModule(name, m));
    return m;
  }
}

export interface UNetOptions {
  /** Device of the parameters (default: the default device). */
  device?: Device;
}

export interface UNetForwardOptions {
  /** DDSM width multiplier in (0, 1] (default 1: the full network). */
  width?: number;
  /** EDM augmentation labels [N, augmentDim] (ignored when absent, as in EDM). */
  augmentLabels?: Tensor | null;
}

type EncDecLayer = SlimConv2d | UNetBlock | Downsample | Upsample;

/**
 * The diffusion UNet of a `UNetSpec`: `forward(x [N, C, H, W], cNoise [N], classLabels?)` → [N, C', H, W]. The
 * preset specs (models/presets.ts) reproduce EDM's DDPM++ and ADM and DDSM's DDPM UNet exactly.
 */
export class UNet extends nn.Module {
  readonly spec: UNetSpec;
  readonly device: Device;
  readonly map_noise: PositionalEmbedding | FourierEmbedding;
  readonly map_label: SlimLinear | null = null;
  readonly map_augment: SlimLinear | null = null;
  readonly map_layer0: SlimLinear;
  readonly map_layer1: SlimLinear;
  readonly enc: ModuleDict<EncDecLayer>;
  readonly dec: ModuleDict<EncDecLayer>;
  readonly out_norm: SlimGroupNorm;
  readonly out_conv: SlimConv2d;
  readonly #layout: { enc: LayoutEntry[]; dec: LayoutEntry[] };

  constructor(spec: UNetSpecInput | UNetSpec, opts: UNetOptions = {}) {
    super();
    const s = this.spec = parseUNetSpec(spec);
    const device = this.device = opts.device ?? getDefaultDevice();
    const mc = s.modelChannels, noiseC = mc * s.channelMultNoise, embC = mc * s.channelMultEmb;
    const I = inits(s);
    const layout = this.#layout = unetLayout(s);

    // Mapping network (registration order as in EDM, so the names list like PyTorch's).
    const layout_ = s.embeddingLayout;
    this.map_noise = this.registerModule(
      "map_noise",
      s.embedding === "positional"
        ? new PositionalEmbedding(noiseC, {
          maxPositions: s.maxPositions,
          endpoint: s.embeddingEndpoint,
          layout: layout_,
          device,
        })
        : new FourierEmbedding(noiseC, { scale: s.fourierScale, layout: layout_, device }),
    );
    const makeLabel = () =>
      s.mapping === "song"
        // SongUNet: a biased linear into the (full-size) noise embedding, xavier-initialised.
        ? new SlimLinear(s.labelDim, noiseC, { init: I.init, slimOut: false, device })
        // ADM: bias-free into the embedding vector, kaiming_normal × √label_dim, i.e. N(0, 1) weights.
        : new SlimLinear(s.labelDim, embC, {
          bias: false,
          init: { mode: "kaiming_normal", weight: Math.sqrt(s.labelDim), bias: 0 },
          device,
        });
    const makeAugment = () =>
      new SlimLinear(s.augmentDim, noiseC, {
        bias: false,
        init: s.mapping === "song" ? I.init : { ...I.init, weight: 0 },
        slimOut: false,
        device,
      });
    if (s.mapping === "song") {
      if (s.labelDim) this.map_label = this.registerModule("map_label", makeLabel());
      if (s.augmentDim) this.map_augment = this.registerModule("map_augment", makeAugment());
    } else if (s.augmentDim) this.map_augment = this.registerModule("map_augment", makeAugment());
    this.map_layer0 = this.registerModule(
      "map_layer0",
      new SlimLinear(noiseC, embC, { init: I.init, device }),
    );
    this.map_layer1 = this.registerModule("map_layer1", new SlimLinear(embC, embC, { init: I.init, device }));
    if (s.mapping === "adm" && s.labelDim) {
      this.map_label = this.registerModule("map_label", makeLabel());
    }

    // Encoder and decoder.
    const block = (e: LayoutEntry) =>
      new UNetBlock(e.inChannels, e.outChannels, {
        embChannels: embC,
        up: e.up,
        down: e.down,
        numHeads: e.heads,
        dropout: s.dropout,
        skipScale: s.skipScale,
        eps: s.normEps,
        resampleProj: s.resampleProj,
        adaptiveScale: s.adaptiveScale,
        groups: s.normGroups,
        minChannelsPerGroup: s.normMinChannelsPerGroup,
        init: I.init,
        initZero: I.zero,
        initQkv: I.qkv,
        initProj: I.proj,
        device,
      });
    const make = (e: LayoutEntry): EncDecLayer => {
      switch (e.kind) {
        case "conv":
          return new SlimConv2d(e.inChannels, e.outChannels, 3, { init: I.init, device });
        case "block":
          return block(e);
        case "down":
          return new Downsample(e.outChannels, s.resampleFilter === "conv", I.init, device);
        case "up":
          return new Upsample(e.outChannels, s.resampleFilter === "conv", I.init, device);
      }
    };
    this.enc = this.registerModule("enc", new ModuleDict<EncDecLayer>());
    for (const e of layout.enc) this.enc.set(e.key, make(e));
    this.dec = this.registerModule("dec", new ModuleDict<EncDecLayer>());
    for (const e of layout.dec) this.dec.set(e.key, make(e));
    const cLast = layout.dec[layout.dec.length - 1].outChannels;
    this.out_norm = this.registerModule(
      "out_norm",
      new SlimGroupNorm(cLast, normGroups(cLast, s.normGroups, s.normMinChannelsPerGroup), s.normEps, device),
    );
    this.out_conv = this.registerModule(
      "out_conv",
      new SlimConv2d(cLast, s.outChannels, 3, { init: I.zero, slimOut: false, device }),
    );
  }

  /**
   * The embedding vector [N, embC'] of EDM's mapping network (SongUNet or DhariwalUNet order), which every UNet
   * block is conditioned on (public for running the network block by block, models/blocks_cut.ts).
   */
  embed(cNoise: Tensor, classLabels: Tensor | null, augmentLabels: Tensor | null = null, width = 1): Tensor {
    const s = this.spec;
    let labels = classLabels;
    if (labels && this.training && s.labelDropout > 0) {
      // Keep each sample's label with probability 1 − p: dropout of ones gives 0 or 1/(1 − p).
      const keepMask = mul(
        dropout(ones([labels.shape[0], 1], { device: this.device }), s.labelDropout),
        1 - s.labelDropout,
      );
      labels = mul(labels, keepMask);
    }
    let emb = this.map_noise.forward(cNoise);
    if (s.mapping === "song") {
      if (this.map_label && labels) {
        emb = add(emb, this.map_label.forward(mul(labels, Math.sqrt(s.labelDim)), width));
      }
      if (this.map_augment && augmentLabels) emb = add(emb, this.map_augment.forward(augmentLabels, width));
      emb = silu(this.map_layer0.forward(emb, width));
      return silu(this.map_layer1.forward(emb, width));
    }
    if (this.map_augment && augmentLabels) emb = add(emb, this.map_augment.forward(augmentLabels, width));
    emb = this.map_layer1.forward(silu(this.map_layer0.forward(emb, width)), width);
    if (this.map_label && labels) emb = add(emb, this.map_label.forward(labels, width));
    return silu(emb);
  }

  /**
   * F(x; cNoise, classLabels) at a DDSM width. x: [N, inChannels, R, R]; cNoise: [N] (EDM: ln(σ)/4);
   * classLabels: [N, labelDim] (required when labelDim > 0). Returns [N, outChannels, R, R].
   */
  @nn.scopedForward
  forward(
    x: Tensor,
    cNoise: Tensor,
    classLabels: Tensor | null = null,
    opts: UNetForwardOptions = {},
  ): Tensor {
    const s = this.spec, width = opts.width ?? 1;
    checkWidth(width, "UNet.forward");
    const R = s.imgResolution;
    if (x.rank !== 4 || x.shape[1] !== s.inChannels || x.shape[2] !== R || x.shape[3] !== R) {
      throw new Error(`UNet.forward: x must be [N, ${s.inChannels}, ${R}, ${R}], got [${x.shape}]`);
    }
    const N = x.shape[0];
    if (cNoise.rank !== 1 || cNoise.shape[0] !== N) {
      throw new Error(`UNet.forward: cNoise must be [${N}], got [${cNoise.shape}]`);
    }
    if (s.labelDim > 0) {
      if (!classLabels) {
        throw new Error(`UNet.forward: classLabels [${N}, ${s.labelDim}] are required (labelDim > 0)`);
      }
      if (classLabels.rank !== 2 || classLabels.shape[1] !== s.labelDim) {
        throw new Error(`UNet.forward: classLabels must be [N, ${s.labelDim}], got [${classLabels.shape}]`);
      }
    }
    const aug = opts.augmentLabels ?? null;
    if (aug && s.augmentDim && (aug.rank !== 2 || aug.shape[1] !== s.augmentDim)) {
      throw new Error(`UNet.forward: augmentLabels must be [N, ${s.augmentDim}], got [${aug.shape}]`);
    }
    const emb = this.embed(cNoise, s.labelDim ? classLabels : null, aug, width);
    const run = (m: EncDecLayer, h: Tensor) =>
      m instanceof UNetBlock ? m.forward(h, emb, width) : m.forward(h, width);
    const skips: Tensor[] = [];
    let h = x;
    for (const e of this.#layout.enc) skips.push(h = run(this.enc.items.get(e.key)!, h));
    for (const e of this.#layout.dec) {
      const prev = h, skip = e.skipChannels ? skips.pop()! : null;
      const input = skip ? cat([prev, skip], 1) : prev;
      h = run(this.dec.items.get(e.key)!, input);
      // Off the tape (sampling), what this block consumed is garbage now, except encoder outputs still waiting.
      discard(...[input, skip, prev].filter((t) => t && !skips.includes(t)));
    }
    return this.out_conv.forward(this.out_norm.forwardSilu(h), width);
  }

  /** Layers and channel counts at `width` (see `planLayers`). */
  plan(width = 1): PlannedLayer[] {
    return planLayers(this.spec, width);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Planning and counting without allocating.

/** One parameterised layer at some width: the channels it uses of its full-width weights. */
export interface PlannedLayer {
  /** Dotted module name, e.g. "enc.16x16_block0.conv0". */
  name: string;
  kind: "conv" | "linear" | "norm";
  /** Full-width input/output channels (features, for linear layers; both = channels for norms). */
  inFull: number;
  outFull: number;
  /** Channels used at this width. */
  in: number;
  out: number;
  /** Convolution kernel size (1 for linear layers and norms). */
  kernel: number;
  /** Convolution stride. */
  stride: number;
  bias: boolean;
  /** GroupNorm groups used at this width. */
  groups?: number;
  /** Output split into slimmed chunks (adaptive scale/shift). */
  chunks?: number;
  /** Attention heads, for qkv (output per head) and proj (input per head). */
  heads?: number;
  /** Feature-map resolution the layer runs at (its output, for convs; 1 for the mapping network). */
  res: number;
}

/**
 * Every parameterised layer of `spec` at DDSM `width`, in parameter order, with the channel counts the forward
 * uses (DDSM's rounding; see models/slimmable.ts). Allocates nothing: parameter counts of the published models
 * and per-width costs come from this.
 */
export function planLayers(specInput: UNetSpecInput | UNetSpec, width = 1): PlannedLayer[] {
  checkWidth(width, "planLayers");
  const s = parseUNetSpec(specInput);
  const mc = s.modelChannels, noiseC = mc * s.channelMultNoise, embC = mc * s.channelMultEmb;
  const conv8 = (c: number) => slimChannels(c, width, CONV_DIVISOR);
  const lin16 = (c: number) => slimChannels(c, width, LINEAR_DIVISOR);
  const groupsFull = (c: number) => normGroups(c, s.normGroups, s.normMinChannelsPerGroup);
  const out: PlannedLayer[] = [];
  const linearL = (name: string, inFull: number, outFull: number, inW: number, outW: number, bias: boolean) =>
    out.push({
      name,
      kind: "linear",
      inFull,
      outFull,
      in: inW,
      out: outW,
      kernel: 1,
      stride: 1,
      bias,
      res: 1,
    });
  const convL = (
    name: string,
    inFull: number,
    outFull: number,
    inW: number,
    outW: number,
    kernel: number,
    res: number,
    extra: Partial<PlannedLayer> = {},
  ) =>
    out.push({
      name,
      kind: "conv",
      inFull,
      outFull,
      in: inW,
      out: outW,
      kernel,
      stride: 1,
      bias: true,
      res,
      ...extra,
    });
  const normL = (name: string, full: number, used: number, res: number) => {
    const g = groupsFull(full);
    out.push({
      name,
      kind: "norm",
      inFull: full,
      outFull: full,
      in: used,
      out: used,
      kernel: 1,
      stride: 1,
      bias: true,
      groups: used === full ? g : slimGroups(g, used),
      res,
    });
  };

  // Mapping network; the noise embedding keeps its full size at every width.
  const embW = lin16(embC);
  const labelSong = () => linearL("map_label", s.labelDim, noiseC, s.labelDim, noiseC, true);
  const augment = () => linearL("map_augment", s.augmentDim, noiseC, s.augmentDim, noiseC, false);
  if (s.mapping === "song") {
    if (s.labelDim) labelSong();
    if (s.augmentDim) augment();
  } else if (s.augmentDim) augment();
  linearL("map_layer0", noiseC, embC, noiseC, embW, true);
  linearL("map_layer1", embC, embC, embW, embW, true);
  if (s.mapping === "adm" && s.labelDim) linearL("map_label", s.labelDim, embC, s.labelDim, embW, false);

  const block = (name: string, e: LayoutEntry, inW: number): number => {
    const res = e.res, inRes = e.down ? res * 2 : e.up ? res / 2 : res, o = e.outChannels, oW = conv8(o);
    normL(`${name}.norm0`, e.inChannels, inW, inRes);
    convL(`${name}.conv0`, e.inChannels, o, inW, oW, 3, res);
    const k = s.adaptiveScale ? 2 : 1;
    out.push({
      name: `${name}.affine`,
      kind: "linear",
      inFull: embC,
      outFull: k * o,
      in: embW,
      out: k * oW,
      kernel: 1,
      stride: 1,
      bias: true,
      chunks: k,
      res: 1,
    });
    normL(`${name}.norm1`, o, oW, res);
    convL(`${name}.conv1`, o, o, oW, oW, 3, res);
    if (o !== e.inChannels || ((e.up || e.down) && s.resampleProj)) {
      convL(`${name}.skip`, e.inChannels, o, inW, oW, 1, res);
    }
    if (e.heads) {
      normL(`${name}.norm2`, o, oW, res);
      convL(`${name}.qkv`, o, 3 * o, oW, 3 * oW, 1, res, { heads: e.heads });
      convL(`${name}.proj`, o, o, oW, oW, 1, res, { heads: e.heads });
    }
    return oW;
  };
  const layout = unetLayout(s);
  const skips: number[] = [];
  let h = s.inChannels;
  for (const e of layout.enc) {
    const name = `enc.${e.key}`;
    if (e.kind === "conv") {
      convL(name, e.inChannels, e.outChannels, h, conv8(e.outChannels), 3, e.res);
      h = conv8(e.outChannels);
    } else if (e.kind === "down") {
      if (s.resampleFilter === "conv") {
        convL(`${name}.conv`, e.inChannels, e.outChannels, h, conv8(e.outChannels), 3, e.res, { stride: 2 });
        h = conv8(e.outChannels);
      }
    } else h = block(name, e, h);
    skips.push(h);
  }
  for (const e of layout.dec) {
    const name = `dec.${e.key}`;
    if (e.skipChannels) h += skips.pop()!;
    if (e.kind === "up") {
      if (s.resampleFilter === "conv") {
        convL(`${name}.conv`, e.inChannels, e.outChannels, h, conv8(e.outChannels), 3, e.res);
        h = conv8(e.outChannels);
      }
    } else h = block(name, e, h);
  }
  const last = layout.dec[layout.dec.length - 1].outChannels;
  normL("out_norm", last, h, s.imgResolution);
  convL("out_conv", last, s.outChannels, h, s.outChannels, 3, s.imgResolution);
  return out;
}

/** The full-width parameters of `spec` as [dotted name, shape], in `namedParameters()` order. No allocation. */
export function parameterShapes(spec: UNetSpecInput | UNetSpec): [string, number[]][] {
  const shapes: [string, number[]][] = [];
  for (const l of planLayers(spec, 1)) {
    if (l.kind === "norm") {
      shapes.push([`${l.name}.weight`, [l.outFull]], [`${l.name}.bias`, [l.outFull]]);
    } else if (l.kind === "linear") {
      shapes.push([`${l.name}.weight`, [l.outFull, l.inFull]]);
      if (l.bias) shapes.push([`${l.name}.bias`, [l.outFull]]);
    } else {
      shapes.push([`${l.name}.weight`, [l.outFull, l.inFull, l.kernel, l.kernel]]);
      if (l.bias) shapes.push([`${l.name}.bias`, [l.outFull]]);
    }
  }
  return shapes;
}

/** Exact trainable-parameter count of `spec` (buffers such as Fourier frequencies excluded). No allocation. */
export function countParameters(spec: UNetSpecInput | UNetSpec): number {
  return parameterShapes(spec).reduce((n, [, shape]) => n + shape.reduce((a, b) => a * b, 1), 0);
}
