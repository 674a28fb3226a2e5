/**
 * @file A UNet cut into blocks for block-wise distillation (DNA, Li et al. 2020; Tang et al. 2023): one block per
 * encoder level, the middle, and one per decoder level, each a function of the tensors crossing the cut and of
 * the noise embedding. Running the blocks in order, each on its predecessors' outputs, is the UNet's forward.
 *
 * For a UNet with L levels and n residual blocks per encoder level (models/unet.ts `unetLayout`):
 *
 *     enc l   input: the image (l = 0) or the last output of enc l−1
 *             layers: the input conv (l = 0) or the ×2 downsampling, then n residual blocks
 *             outputs: every skip of the level (n + 1 tensors; the last is the running features)
 *     mid     input: the last output of enc L−1;  layers: the lowest decoder level's two blocks ("in0", "in1")
 *     dec l   inputs: the running features (of mid or dec l+1) and the skips of enc l
 *             layers: the ×2 upsampling (l < L−1), then n + 1 residual blocks, each on [features, its skip];
 *             dec 0 also holds the output norm and convolution, so its output is the network's F
 *
 * A block runs under a `BlockChoice`: the width of every residual branch in it (the leading `round(w·C)` hidden
 * channels of conv0 / affine / norm1 and input columns of conv1, `UNetBlock.forwardNarrow`; the block's inputs
 * and outputs keep the teacher's channel counts), how many of its residual blocks run (the leading ones; in an
 * encoder a dropped block passes its input through as its skip, in a decoder a dropped block's skip goes unused)
 * and whether its attention layers run. The candidates of one block are views of the same weights (slimmable
 * style), so a block's supernet is the block's own modules of one UNet.
 *
 * `blockPlan` lists the layers a block uses under a choice (as `planLayers` does for a whole network), so MACs
 * and parameters of any student are those of models/cost.ts, summed block by block.
 */

import { cat, type Device, forwardScope, type Tensor } from "../engine/mod.ts";
import { type LayoutEntry, planLayers, type PlannedLayer, UNet, unetLayout, type UNetSpec } from "./unet.ts";
import { type Downsample, normGroups, type SlimConv2d, UNetBlock, type Upsample } from "./unet_blocks.ts";

/** One block of the cut. */
export interface BlockCut {
  /** "enc0", "enc1", …, "mid", …, "dec1", "dec0" (the digit is the resolution level). */
  name: string;
  kind: "enc" | "mid" | "dec";
  /** Resolution level (0 = full resolution; mid: the lowest). */
  level: number;
  /** The input conv, downsampling or upsampling layer ("enc.16x16_conv", "dec.16x16_up"); null: none. */
  head: string | null;
  /** The residual blocks, in order ("enc.8x8_block0", "dec.8x8_in0"); a choice's depth runs the leading ones. */
  res: string[];
  /** Attention heads of each residual block (0 = none). */
  heads: number[];
  /** Where each input comes from: [block index, output index], block −1 being the network's input. */
  inputs: [number, number][];
  /** Channels of each output. */
  outChannels: number[];
  /** Feature-map resolution of the outputs. */
  resolution: number;
  /** Whether the output norm and convolution end this block (dec 0). */
  output: boolean;
}

/** What a block runs: the residual branches' width, how many residual blocks, and whether attention runs. */
export interface BlockChoice {
  /** Width ratio of every residual branch in (0, 1]. */
  width: number;
  /** Residual blocks run, 1 … the block's count. */
  depth: number;
  /** Attention layers run (ignored where the block has none). */
  attention: boolean;
}

/** The blocks of `spec` in execution order: encoder levels, the middle, decoder levels from the lowest. */
export function cutUNet(spec: UNetSpec): BlockCut[] {
  const { enc, dec } = unetLayout(spec), n = spec.numBlocks, L = spec.channelMult.length;
  const cuts: BlockCut[] = [];
  const isBlock = (e: LayoutEntry) => e.kind === "block";
  for (let l = 0; l < L; l++) {
    const entries = enc.slice(l * (n + 1), (l + 1) * (n + 1));
    cuts.push({
      name: `enc${l}`,
      kind: "enc",
      level: l,
      head: `enc.${entries[0].key}`,
      res: entries.slice(1).map((e) => `enc.${e.key}`),
      heads: entries.slice(1).map((e) => e.heads),
      inputs: [l === 0 ? [-1, 0] : [l - 1, n]],
      outChannels: entries.map((e) => e.outChannels),
      resolution: entries[0].res,
      output: false,
    });
  }
  // The decoder: the lowest level's two middle blocks, then per level an optional upsampling and n + 1 blocks.
  let at = 0;
  for (let l = L - 1; l >= 0; l--) {
    if (l === L - 1) {
      const mid = dec.slice(0, 2);
      cuts.push({
        name: "mid",
        kind: "mid",
        level: l,
        head: null,
        res: mid.map((e) => `dec.${e.key}`),
        heads: mid.map((e) => e.heads),
        inputs: [[L - 1, n]],
        outChannels: [mid[1].outChannels],
        resolution: mid[0].res,
        output: false,
      });
      at = 2;
    }
    const head = l === L - 1 ? null : dec[at++];
    const blocks = dec.slice(at, at + n + 1);
    at += n + 1;
    if (blocks.some((e) => !isBlock(e)) || (head && head.kind === "conv")) {
      throw new Error(`cutUNet: unexpected decoder layout at level ${l}`);
    }
    const prev = cuts.length - 1;
    cuts.push({
      name: `dec${l}`,
      kind: "dec",
      level: l,
      head: head ? `dec.${head.key}` : null,
      res: blocks.map((e) => `dec.${e.key}`),
      heads: blocks.map((e) => e.heads),
      inputs: [[prev, 0], ...Array.from({ length: n + 1 }, (_, j) => [l, j] as [number, number])],
      outChannels: [l === 0 ? spec.outChannels : blocks[n].outChannels],
      resolution: blocks[0].res,
      output: l === 0,
    });
  }
  return cuts;
}

/** The teacher's own choice of a block: every residual block at full width, with its attention. */
export function fullChoice(cut: BlockCut): BlockChoice {
  return { width: 1, depth: cut.res.length, attention: true };
}

/** Whether the leading `depth` residual blocks of `cut` include one with attention. */
export function hasAttention(cut: BlockCut, depth: number): boolean {
  return cut.heads.slice(0, depth).some((h) => h > 0);
}

/**
 * Every candidate of a block: each width of `widths`, each depth 1 … the teacher's, and attention on and off
 * where the residual blocks run include attention (one choice, attention on, where they do not).
 */
export function blockCandidates(cut: BlockCut, widths: readonly number[]): BlockChoice[] {
  const out: BlockChoice[] = [];
  for (const width of widths) {
    if (!(width > 0 && width <= 1)) throw new Error(`blockCandidates: width ${width} is not in (0, 1]`);
    for (let depth = 1; depth <= cut.res.length; depth++) {
      out.push({ width, depth, attention: true });
      if (hasAttention(cut, depth)) out.push({ width, depth, attention: false });
    }
  }
  return out;
}

/** "w0.5 d1 attn" — a choice in a few characters (report tables, logs). */
export function choiceLabel(cut: BlockCut, c: BlockChoice): string {
  const attn = hasAttention(cut, c.depth) ? (c.attention ? " attn" : " no-attn") : "";
  return `w${c.width} d${c.depth}/${cut.res.length}${attn}`;
}

/** Hidden channels of a residual branch of `channels` outputs at width ratio `width` (at least 1). */
export function hiddenChannels(channels: number, width: number): number {
  return Math.max(1, Math.min(channels, Math.round(width * channels)));
}

/** Throws unless `choice` is one of `cut`'s candidates (any width in (0, 1]). */
export function checkChoice(cut: BlockCut, choice: BlockChoice): void {
  if (
    !(choice.width > 0 && choice.width <= 1) || !Number.isInteger(choice.depth) || choice.depth < 1 ||
    choice.depth > cut.res.length || typeof choice.attention !== "boolean"
  ) {
    throw new Error(
      `block ${cut.name}: choice ${
        JSON.stringify(choice)
      } needs width in (0, 1], depth 1…${cut.res.length} ` +
        `and attention true/false`,
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Running blocks.

/** The layer named `key` ("enc.8x8_down", "dec.4x4_in0") of `net`. */
function layerOf(net: UNet, key: string): UNetBlock | SlimConv2d | Downsample | Upsample {
  const [side, name] = [key.slice(0, 3), key.slice(4)];
  const m = (side === "enc" ? net.enc : net.dec).items.get(name);
  if (!m) throw new Error(`blocks: the network has no layer ${key}`);
  return m;
}

/** One block of `net` under `choice`, on its inputs (in `cut.inputs` order) and the embedding. */
export function runBlock(
  net: UNet,
  cut: BlockCut,
  choice: BlockChoice,
  inputs: readonly Tensor[],
  emb: Tensor,
): Tensor[] {
  checkChoice(cut, choice);
  if (inputs.length !== cut.inputs.length) {
    throw new Error(`block ${cut.name}: takes ${cut.inputs.length} inputs, got ${inputs.length}`);
  }
  const layer = (key: string, h: Tensor): Tensor => {
    const m = layerOf(net, key);
    if (m instanceof UNetBlock) {
      return m.forwardNarrow(h, emb, hiddenChannels(m.outChannels, choice.width), choice.attention);
    }
    return m.forward(h, 1);
  };
  if (cut.kind === "enc") {
    let h = layer(cut.head!, inputs[0]);
    const out = [h];
    for (let i = 0; i < cut.res.length; i++) {
      if (i < choice.depth) h = layer(cut.res[i], h);
      out.push(h);
    }
    return out;
  }
  let h = inputs[0];
  if (cut.head) h = layer(cut.head, h);
  const skips = inputs.slice(1);
  for (let i = 0; i < choice.depth; i++) {
    h = layer(cut.res[i], cut.kind === "dec" ? cat([h, skips[skips.length - 1 - i]], 1) : h);
  }
  if (cut.output) h = net.out_conv.forward(net.out_norm.forwardSilu(h), 1);
  return [h];
}

/** The inputs of block `b` gathered from the blocks' `outputs` (and the network input `x`). */
export function blockInputs(
  cuts: readonly BlockCut[],
  b: number,
  outputs: readonly Tensor[][],
  x: Tensor,
): Tensor[] {
  return cuts[b].inputs.map(([blk, j]) => {
    if (blk < 0) return x;
    const t = outputs[blk]?.[j];
    if (!t) throw new Error(`block ${cuts[b].name}: input ${blk}.${j} has not been computed`);
    return t;
  });
}

/**
 * Every block of `net` in order, each on its predecessors' outputs (`choices` null: the teacher's own), from the
 * preconditioned input `xIn` and the embedding `emb`. The last block's only output is the network's F.
 */
export function runBlocks(
  net: UNet,
  cuts: readonly BlockCut[],
  choices: readonly BlockChoice[] | null,
  xIn: Tensor,
  emb: Tensor,
): Tensor[][] {
  const outputs: Tensor[][] = [];
  for (let b = 0; b < cuts.length; b++) {
    const choice = choices ? choices[b] : fullChoice(cuts[b]);
    outputs.push(runBlock(net, cuts[b], choice, blockInputs(cuts, b, outputs, xIn), emb));
  }
  return outputs;
}

/**
 * A UNet run block by block under one choice per block: the assembled student of block-wise distillation. It
 * holds a whole UNet (the weights outside the chosen slices are unused); its `forward` is a UNet's, so it samples
 * and trains like one (models/generate.ts `NetworkGenerator`, models/edm.ts `EDMPrecond`).
 */
export class BlockwiseUNet {
  readonly cuts: BlockCut[];
  readonly choices: BlockChoice[];

  constructor(readonly net: UNet, choices: readonly BlockChoice[]) {
    this.cuts = cutUNet(net.spec);
    if (choices.length !== this.cuts.length) {
      throw new Error(`BlockwiseUNet: ${this.cuts.length} blocks, got ${choices.length} choices`);
    }
    this.cuts.forEach((c, i) => checkChoice(c, choices[i]));
    this.choices = choices.map((c) => ({ ...c }));
  }

  get spec(): UNetSpec {
    return this.net.spec;
  }
  get device(): Device {
    return this.net.device;
  }

  /** Every block's outputs and the embedding, from the preconditioned input and c_noise. */
  forwardBlocks(xIn: Tensor, cNoise: Tensor, classLabels: Tensor | null = null): Tensor[][] {
    const emb = this.net.embed(cNoise, this.spec.labelDim ? classLabels : null);
    return runBlocks(this.net, this.cuts, this.choices, xIn, emb);
  }

  /** F(x; c_noise, labels) of the student (width must be 1: the choices are the widths). */
  forward(
    x: Tensor,
    cNoise: Tensor,
    classLabels: Tensor | null = null,
    opts: { width?: number } = {},
  ): Tensor {
    if ((opts.width ?? 1) !== 1) throw new Error("BlockwiseUNet.forward: the block choices set the widths");
    return forwardF(this, x, cNoise, classLabels);
  }

  dispose(): void {
    this.net.dispose();
  }
}

/** The student's F in a forward scope: off the tape every block output but F is freed at once. */
function forwardF(s: BlockwiseUNet, x: Tensor, cNoise: Tensor, labels: Tensor | null): Tensor {
  return forwardScope(() => {
    const out = s.forwardBlocks(x, cNoise, labels);
    return out[out.length - 1][0];
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Planning: the layers a block uses under a choice.

/** The layers of the mapping network (shared by every block; not searched). */
export function mappingPlan(spec: UNetSpec): PlannedLayer[] {
  return planLayers(spec, 1).filter((l) => l.name.startsWith("map_"));
}

/**
 * The layers block `cut` of `spec` uses under `choice`, with the channel counts it runs at (a subset of
 * `planLayers(spec)`, the residual branches narrowed), for models/cost.ts.
 */
export function blockPlan(spec: UNetSpec, cut: BlockCut, choice: BlockChoice): PlannedLayer[] {
  checkChoice(cut, choice);
  const kept = cut.res.slice(0, choice.depth);
  const owners = [...(cut.head ? [cut.head] : []), ...kept];
  const ownerOf = (name: string) => owners.find((o) => name === o || name.startsWith(`${o}.`));
  const blockKeys = new Set(owners.filter((o) => o !== cut.head || isResBlock(spec, o)));
  const out: PlannedLayer[] = [];
  for (const l of planLayers(spec, 1)) {
    if (cut.output && (l.name === "out_norm" || l.name === "out_conv")) {
      out.push(l);
      continue;
    }
    const owner = ownerOf(l.name);
    if (!owner) continue;
    if (!blockKeys.has(owner)) {
      out.push(l);
      continue;
    }
    const part = l.name.slice(owner.length + 1), o = l.outFull;
    if (!choice.attention && (part === "norm2" || part === "qkv" || part === "proj")) continue;
    if (part === "conv0") {
      out.push({ ...l, out: hiddenChannels(o, choice.width) });
    } else if (part === "affine") {
      const k = l.chunks ?? 1;
      out.push({ ...l, out: k * hiddenChannels(o / k, choice.width) });
    } else if (part === "norm1") {
      const h = hiddenChannels(o, choice.width);
      out.push({ ...l, in: h, out: h, groups: normGroups(h, spec.normGroups, spec.normMinChannelsPerGroup) });
    } else if (part === "conv1") {
      out.push({ ...l, in: hiddenChannels(o, choice.width) });
    } else out.push(l);
  }
  return out;
}

/** Whether the layout entry `key` ("enc.8x8_down") is a UNet block (rather than a conv or a resampler). */
function isResBlock(spec: UNetSpec, key: string): boolean {
  const { enc, dec } = unetLayout(spec);
  const e = (key.startsWith("enc.") ? enc : dec).find((x) => x.key === key.slice(4));
  return e?.kind === "block";
}

/** The layers of a whole student: the mapping network and every block under its choice. */
export function studentPlan(spec: UNetSpec, choices: readonly BlockChoice[]): PlannedLayer[] {
  const cuts = cutUNet(spec);
  if (choices.length !== cuts.length) {
    throw new Error(`studentPlan: ${cuts.length} blocks, got ${choices.length} choices`);
  }
  return [...mappingPlan(spec), ...cuts.flatMap((c, i) => blockPlan(spec, c, choices[i]))];
}
