/**
 * @file Self-attention over the H·W positions of a feature map, as in EDM's `UNetBlock` (networks.py; DDPM++
 * and ADM do the same): the 3C channels of a 1×1 `qkv` convolution are read as [heads, C/heads, 3] (so each
 * head's q, k and v channels are interleaved), and every head attends with softmax(qᵀk / √(C/heads)) over all
 * positions. Called inside a `@nn.scopedForward`, its intermediates are freed with the forward's.
 *
 * `qkvAttention` is that reading and the attention itself; the UNet's blocks (models/unet_blocks.ts) wrap it in
 * their slimmable layers. `AttentionBlock` is the standalone residual block with full-width layers:
 * `(x + proj(qkvAttention(qkv(norm(x)))))·skipScale`, parameters `norm`, `qkv`, `proj`.
 */

import {
  add,
  type Device,
  getDefaultDevice,
  mul,
  narrow,
  nn,
  packedQkvAttention,
  permute,
  reshape,
  scaledDotProductAttention,
  type Tensor,
  transpose,
  zeros,
} from "../engine/mod.ts";

/** Multi-head attention of a qkv feature map [N, 3C, H, W] read EDM's way (see the file comment): [N, C, H, W]. */
export function qkvAttention(qkv: Tensor, heads: number): Tensor {
  const [N, C3, H, W] = qkv.shape, C = C3 / 3, c = C / heads, L = H * W;
  if (qkv.rank !== 4 || !Number.isInteger(c)) {
    throw new Error(
      `qkvAttention: [N, 3C, H, W] with C divisible by ${heads} heads expected, got [${qkv.shape}]`,
    );
  }
  // [N, 3C, H, W] is [N·heads, c, 3, L] as stored: the packed op reads q, k and v in place (one dispatch
  // per product), its output [N·heads, c, L] is [N, C, H, W] as stored.
  const packed = packedQkvAttention(reshape(qkv, [N * heads, c, 3, L]));
  if (packed) return reshape(packed, [N, C, H, W]);
  // Scores too large for one binding: the general op, which attends in chunks. [3, N·heads, L, c]: q, k, v
  // with positions as rows.
  const split = permute(reshape(qkv, [N * heads, c, 3, L]), [2, 0, 3, 1]);
  const part = (i: number) => reshape(narrow(split, 0, i, 1), [N * heads, L, c]);
  const a = scaledDotProductAttention(part(0), part(1), part(2));
  return reshape(transpose(a, 1, 2), [N, C, H, W]);
}

export interface AttentionBlockOptions {
  /** Attention heads; channels must be divisible by it (default 1). */
  numHeads?: number;
  /** GroupNorm groups (default EDM's min(32, channels/4), at least 1). */
  numGroups?: number;
  /** GroupNorm epsilon (default 1e-5). */
  eps?: number;
  /** Multiplier of the residual sum (EDM's skip_scale; DDPM++ uses √0.5; default 1). */
  skipScale?: number;
  /** Start the output projection at zero so the block begins as the identity (DDPM++/EDM; default false). */
  zeroInitProj?: boolean;
  device?: Device;
}

/**
 * The residual self-attention block with full-width layers: `x + proj(qkvAttention(qkv(norm(x))))`, times
 * `skipScale`. Parameters: `norm`, `qkv` (1×1, 3C outputs), `proj` (1×1).
 */
export class AttentionBlock extends nn.Module {
  readonly norm: nn.GroupNorm;
  readonly qkv: nn.Conv2d;
  readonly proj: nn.Conv2d;
  readonly numHeads: number;
  readonly skipScale: number;

  constructor(readonly channels: number, opts: AttentionBlockOptions = {}) {
    super();
    this.numHeads = opts.numHeads ?? 1;
    if (!Number.isInteger(this.numHeads) || this.numHeads < 1 || channels % this.numHeads) {
      throw new Error(`AttentionBlock: channels ${channels} must be divisible by numHeads ${this.numHeads}`);
    }
    this.skipScale = opts.skipScale ?? 1;
    const device = opts.device ?? getDefaultDevice();
    const groups = opts.numGroups ?? Math.max(1, Math.min(32, Math.floor(channels / 4)));
    this.norm = this.registerModule("norm", new nn.GroupNorm(groups, channels, { eps: opts.eps, device }));
    this.qkv = this.registerModule("qkv", new nn.Conv2d(channels, 3 * channels, 1, { device }));
    this.proj = this.registerModule("proj", new nn.Conv2d(channels, channels, 1, { device }));
    if (opts.zeroInitProj) {
      const z = { weight: zeros(this.proj.weight.shape, { device }), bias: zeros([channels], { device }) };
      this.proj.loadStateDict(z);
      z.weight.dispose();
      z.bias.dispose();
    }
  }

  @nn.scopedForward
  forward(x: Tensor): Tensor {
    if (x.rank !== 4 || x.shape[1] !== this.channels) {
      throw new Error(
        `AttentionBlock: expected input [N, ${this.channels}, H, W], got [${x.shape.join(", ")}]`,
      );
    }
    const a = qkvAttention(this.qkv.forward(this.norm.forward(x)), this.numHeads);
    const out = add(this.proj.forward(a), x);
    return this.skipScale === 1 ? out : mul(out, this.skipScale);
  }
}
