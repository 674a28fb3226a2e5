/**
 * @file EDM's rule for the parameter EMA (Karras et al. 2022, `training_loop.py`): the decay β of each step
 * comes from a half-life counted in training images, ramped up early in training. The engine's `optim.EMA`
 * takes any β; this is the diffusion recipe that chooses it.
 */

/**
 * EDM's EMA decay per step from a half-life in thousands of images (Karras et al. 2022, `training_loop.py`):
 * the shadow's weight on the past halves every `halfLifeKimg·1000` images, so with `batchSize` images per step
 * `β = 0.5^(batchSize / (halfLifeKimg·1000))`. EDM also ramps the half-life up early in training:
 * with `rampupRatio` (EDM: 0.05) and `curNimg` images seen so far, the half-life is
 * `min(halfLifeKimg·1000, curNimg·rampupRatio)` (floored at 1e-8 images), so the average forgets the random
 * initialisation quickly.
 */
export function emaBetaFromHalfLife(
  batchSize: number,
  halfLifeKimg: number,
  opts: { curNimg?: number; rampupRatio?: number } = {},
): number {
  if (!(batchSize > 0)) throw new Error(`emaBetaFromHalfLife: batchSize ${batchSize} must be > 0`);
  if (!(halfLifeKimg >= 0)) throw new Error(`emaBetaFromHalfLife: halfLifeKimg ${halfLifeKimg} must be ≥ 0`);
  let halfLifeNimg = halfLifeKimg * 1000;
  if (opts.rampupRatio !== undefined) {
    halfLifeNimg = Math.min(halfLifeNimg, (opts.curNimg ?? 0) * opts.rampupRatio);
  }
  return Math.pow(0.5, batchSize / Math.max(halfLifeNimg, 1e-8));
}
