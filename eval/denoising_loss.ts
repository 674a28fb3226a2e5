/**
 * @file The denoising loss of a trained network on fixed images: EDM's λ(σ)-weighted training loss
 * (models/edm.ts `edmLoss`) measured, without gradients, at given noise levels on a fixed batch of images with
 * noise fixed per level. Everything random is a function of a seed, so two networks (two architectures, two
 * widths of one slimmable network) are compared on exactly the same inputs and the difference is theirs.
 *
 * Three users: DDSM's step-importance profile (the loss of each width at each σ of the sampler's grid), the
 * block-distillation search's held-out batch, and the search's loss proxy (`lossProxy`): the mean over the
 * sampler's grid of the loss at each σ, so every sampling step counts once. EDM's weighting λ(σ) = (σ² + σ_d²)/
 * (σ·σ_d)² makes the loss at each σ of order one (it is the loss of the network's raw output F), so no noise
 * level dominates the mean. The proxy needs no sampling: 18 network evaluations of n images against RFID-128's
 * 35 of 128, and no feature network.
 */

import { type Device, noGrad, randn, type Tensor, tensor } from "../engine/mod.ts";
import type { Dataset } from "../models/data.ts";
import { edmLoss, EDMPrecond, type TrainDenoiser } from "../models/edm.ts";
import { edmTimeSteps } from "../models/samplers.ts";
import type { UNet } from "../models/unet.ts";
import { hash2 } from "../util/random.ts";

/** A batch of images (and one-hot labels when the network is conditioned) on the device. */
export interface ImageBatch {
  x: Tensor;
  labels?: Tensor;
}

/** Images start..start+n−1 of `ds` as one batch; one-hot labels of `labelDim` classes when `labelDim` > 0. */
export function imageBatch(
  ds: Dataset,
  start: number,
  n: number,
  labelDim: number,
  device: Device,
): ImageBatch {
  if (!(start >= 0 && n >= 1 && start + n <= ds.length)) {
    throw new Error(
      `imageBatch: images [${start}, ${start + n}) are not a range of ${ds.name} (${ds.length})`,
    );
  }
  const per = ds.channels * ds.height * ds.width, host = new Float32Array(n * per);
  for (let i = 0; i < n; i++) host.set(ds.get(start + i).image, i * per);
  const x = tensor(host, [n, ds.channels, ds.height, ds.width], { device });
  if (!labelDim) return { x };
  const oneHot = new Float32Array(n * labelDim);
  for (let i = 0; i < n; i++) oneHot[i * labelDim + (ds.label(start + i) ?? 0)] = 1;
  return { x, labels: tensor(oneHot, [n, labelDim], { device }) };
}

/** Frees a batch's tensors. */
export function disposeBatch(b: ImageBatch): void {
  b.x.dispose(), b.labels?.dispose();
}

/**
 * The mean EDM loss of each denoiser at each σ on `batch`, read back once per (denoiser, σ): `loss[d][i]` for
 * `denoisers[d]` at `sigmas[i]`. The noise at σ_i is drawn from the seed `hash2(seed, 0x5e9 + i)`, the same for
 * every denoiser.
 */
export async function lossAtSigmas(
  denoisers: readonly TrainDenoiser[],
  batch: ImageBatch,
  sigmas: readonly number[],
  seed: number,
): Promise<number[][]> {
  const device = batch.x.device, n = batch.x.shape[0];
  const loss: number[][] = denoisers.map(() => []);
  for (const [i, sigma] of sigmas.entries()) {
    device.manualSeed(hash2(seed, 0x5e9 + i));
    const noise = randn(batch.x.shape, { device });
    const sig = tensor(new Array(n).fill(sigma), [n], { device });
    try {
      for (const [d, denoiser] of denoisers.entries()) {
        const r = noGrad(() => edmLoss(denoiser, batch.x, batch.labels, { sigma: sig, noise }));
        loss[d].push((await r.loss.toArray())[0]);
        r.loss.dispose(), r.perSample.dispose();
        if (r.sigma !== sig) r.sigma.dispose();
      }
    } finally {
      noise.dispose(), sig.dispose();
    }
  }
  return loss;
}

/** What the loss proxy measures: how many images (the last of the data) at which σ grid, and the noise seed. */
export interface LossProtocol {
  /** Images: the last n of the data (a short run draws few of them; see `lossProxy`). */
  n: number;
  /** Heun steps N of EDM's grid whose noise levels t_0 … t_{N−1} are used. */
  steps: number;
  /** Seed of the noise. */
  seed: number;
}

/** A loss proxy measurement. */
export interface LossMeasurement {
  /** "loss-64": the images it was measured on are in the name, as FIDs carry theirs. */
  name: string;
  /** The mean over the grid of the loss at each σ. */
  value: number;
  /** The loss at each σ of the grid. */
  bySigma: number[];
  sigmas: number[];
  seconds: number;
}

/** The noise levels t_0 … t_{N−1} of EDM's sampler grid with N steps (the last, t_N = 0, has no loss). */
export function samplerSigmas(steps: number): number[] {
  return Array.from(edmTimeSteps(steps).slice(0, steps));
}

/**
 * The search's loss proxy of a trained network: the mean over the sampler's noise levels of the EDM loss on
 * the last `p.n` images of `data` with fixed noise. The images are the end of the data, which the candidates
 * train on too; with the embedded 50,000 shapes a 3-kimg run draws each image with probability about 6%, so the
 * proxy is in effect measured on images the network has not seen.
 */
export async function lossProxy(
  net: UNet,
  sigmaData: number,
  data: Dataset,
  p: LossProtocol,
): Promise<LossMeasurement> {
  const t0 = performance.now();
  const n = Math.min(p.n, data.length);
  const batch = imageBatch(data, data.length - n, n, net.spec.labelDim ?? 0, net.device);
  const sigmas = samplerSigmas(p.steps);
  try {
    const precond = new EDMPrecond((x, c, l) => net.forward(x, c, l ?? null), { sigmaData });
    const [bySigma] = await lossAtSigmas([precond], batch, sigmas, p.seed);
    const value = bySigma.reduce((a, b) => a + b, 0) / bySigma.length;
    return { name: `loss-${n}`, value, bySigma, sigmas, seconds: (performance.now() - t0) / 1000 };
  } finally {
    disposeBatch(batch);
  }
}
