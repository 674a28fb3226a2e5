/**
 * @file Preset `UNetSpec`s that reproduce published networks exactly (architecture, embedding, initialisation):
 *
 * - `ddpmppCifar10`: EDM's DDPM++ for unconditional CIFAR-10 (Karras et al. 2022, train.py `--arch=ddpmpp`
 *   with its default augmentation, so augment_dim = 9): SongUNet, 128 channels × [2, 2, 2], 4 blocks per level,
 *   attention at 16×16, 55.7 M parameters (EDM Table 7: 55.73 M).
 * - `admImagenet64`: EDM's ADM for class-conditional ImageNet-64 (train.py `--arch=adm --cond=1 --augment=0`):
 *   DhariwalUNet, 192 channels × [1, 2, 3, 4], 3 blocks, attention at 32, 16, 8 with 64 channels per head,
 *   adaptive group norm, label_dim 1000: 295.9 M parameters (EDM Table 7: 295.90 M).
 * - `ddsmCifar10`: DDSM's CIFAR-10 supernet (Yang et al. 2023; the DDPM UNet of Ho et al. 2020 as in the
 *   authors' slimmable_model.py): 128 channels × [1, 2, 2, 2], 2 blocks, attention at 16×16, learned conv
 *   resampling as separate layers, additive embedding, interleaved sinusoids, 35,746,307 parameters (DDPM's
 *   35.7 M).
 *
 * The exact counts are asserted in tests/unet_test.ts from `countParameters`, without allocating.
 */

import { type InitSpec, parseUNetSpec, SONG_INIT, type UNetSpec } from "./unet.ts";

/** EDM's DhariwalUNet initialisation: kaiming_uniform × √(1/3) (PyTorch's default), zero-initialised outputs. */
export const ADM_INIT: InitSpec = Object.freeze({
  mode: "kaiming_uniform",
  weight: Math.sqrt(1 / 3),
  bias: Math.sqrt(1 / 3),
  zero: 0,
  qkv: Math.sqrt(1 / 3),
  proj: 0,
});

/**
 * DDSM's (pytorch-ddpm's) initialisation: xavier_uniform weights, zero biases, gain 1e-5 on each block's last
 * conv and the output conv. Its q, k, v are separate C×C layers (xavier bound √(3/C)); our fused [3C, C] qkv has
 * xavier bound √(1.5/C), hence the √2. The attention output projection ends at gain 1: the residual block's
 * initialize() re-initialises its attention submodule after the attention block set 1e-5.
 */
export const DDSM_INIT: InitSpec = Object.freeze({
  mode: "xavier_uniform",
  weight: 1,
  bias: 0,
  zero: 1e-5,
  qkv: Math.SQRT2,
  proj: 1,
});

/** EDM DDPM++ (SongUNet), unconditional CIFAR-10 32×32 (EDM config F). */
export function ddpmppCifar10(): UNetSpec {
  return parseUNetSpec({
    imgResolution: 32,
    inChannels: 3,
    outChannels: 3,
    labelDim: 0,
    augmentDim: 9,
    modelChannels: 128,
    channelMult: [2, 2, 2],
    inputMult: 1,
    numBlocks: 4,
    attnResolutions: [16],
    decoderAttention: "last",
    numHeads: 1,
    dropout: 0.13,
    embedding: "positional",
    embeddingLayout: "sin-cos",
    embeddingEndpoint: true,
    channelMultNoise: 1,
    channelMultEmb: 4,
    mapping: "song",
    resampleFilter: "box",
    resampleInBlock: true,
    resampleProj: true,
    skipScale: Math.SQRT1_2,
    adaptiveScale: false,
    normGroups: 32,
    normMinChannelsPerGroup: 4,
    normEps: 1e-6,
    init: SONG_INIT,
  });
}

/** EDM ADM (DhariwalUNet), class-conditional ImageNet 64×64. */
export function admImagenet64(): UNetSpec {
  return parseUNetSpec({
    imgResolution: 64,
    inChannels: 3,
    outChannels: 3,
    labelDim: 1000,
    augmentDim: 0,
    modelChannels: 192,
    channelMult: [1, 2, 3, 4],
    numBlocks: 3,
    attnResolutions: [32, 16, 8],
    decoderAttention: "all",
    channelsPerHead: 64,
    dropout: 0.1,
    embedding: "positional",
    embeddingLayout: "cos-sin",
    embeddingEndpoint: false,
    channelMultNoise: 1,
    channelMultEmb: 4,
    mapping: "adm",
    resampleFilter: "box",
    resampleInBlock: true,
    resampleProj: false,
    skipScale: 1,
    adaptiveScale: true,
    normGroups: 32,
    normMinChannelsPerGroup: 4,
    normEps: 1e-5,
    init: ADM_INIT,
  });
}

/** DDSM's CIFAR-10 supernet: the DDPM UNet (Ho et al. 2020) of the authors' slimmable_model.py. */
export function ddsmCifar10(): UNetSpec {
  return parseUNetSpec({
    imgResolution: 32,
    inChannels: 3,
    outChannels: 3,
    labelDim: 0,
    augmentDim: 0,
    modelChannels: 128,
    channelMult: [1, 2, 2, 2],
    numBlocks: 2,
    attnResolutions: [16],
    decoderAttention: "all",
    numHeads: 1,
    dropout: 0.1,
    embedding: "positional",
    embeddingLayout: "interleaved-sin-cos",
    embeddingEndpoint: false,
    channelMultNoise: 1,
    channelMultEmb: 4,
    mapping: "song",
    resampleFilter: "conv",
    resampleInBlock: false,
    resampleProj: false,
    skipScale: 1,
    adaptiveScale: false,
    normGroups: 32,
    normMinChannelsPerGroup: 1,
    normEps: 1e-5,
    init: DDSM_INIT,
  });
}

/** The presets by name. */
export const PRESETS: Readonly<Record<string, () => UNetSpec>> = Object.freeze({
  "ddpmpp-cifar10": ddpmppCifar10,
  "adm-imagenet64": admImagenet64,
  "ddsm-cifar10": ddsmCifar10,
});
