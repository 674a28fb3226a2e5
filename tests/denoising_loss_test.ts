/**
 * @file Tests of the denoising loss on fixed images (eval/denoising_loss.ts): the loss of a perfect denoiser is
 * zero and of the zero denoiser is λ(σ)·mean(y²) at every σ, the noise is the same for every denoiser and every
 * call with one seed (and differs with another), batches carry one-hot labels, and the loss proxy of a network
 * is the mean of its losses over the sampler's grid, named with its image count.
 */

import { ok as assert } from "node:assert";
import { mul, type Tensor } from "../engine/mod.ts";
import { ProceduralShapes } from "../models/data.ts";
import { lossWeight } from "../models/edm.ts";
import { edmTimeSteps } from "../models/samplers.ts";
import { UNet } from "../models/unet.ts";
import { DEFAULT_NETWORK } from "../models/train.ts";
import { disposeBatch, imageBatch, lossAtSigmas, lossProxy, samplerSigmas } from "../eval/denoising_loss.ts";
import { assertClose, assertEquals, assertThrows, cpuDevice, test } from "./util.ts";

const data = new ProceduralShapes({ resolution: 8, length: 40 });

test("lossAtSigmas: a perfect denoiser scores 0, the zero denoiser λ(σ)·mean(y²), at every σ", async () => {
  const device = await cpuDevice();
  const batch = imageBatch(data, 30, 6, 0, device);
  try {
    const host = await batch.x.toArray();
    const meanSq = host.reduce((a, v) => a + v * v, 0) / host.length;
    const sigmas = [0.01, 0.5, 7];
    const perfect = (_x: Tensor) => mul(batch.x, 1);
    const zero = (x: Tensor) => mul(x, 0);
    const [p, z] = await lossAtSigmas([perfect, zero], batch, sigmas, 3);
    assertClose(p, [0, 0, 0], { atol: 1e-12 });
    assertClose(z, sigmas.map((s) => lossWeight(s) * meanSq), { rtol: 1e-5 });
  } finally {
    disposeBatch(batch);
  }
});

test("lossAtSigmas: the noise is fixed by the seed, the same for every denoiser", async () => {
  const device = await cpuDevice();
  const batch = imageBatch(data, 0, 4, 0, device);
  try {
    // The identity denoiser's error is the noise itself: λ(σ)·σ²·mean(ε²).
    const identity = (x: Tensor) => mul(x, 1);
    const sigmas = [0.2, 2];
    const a = await lossAtSigmas([identity, identity], batch, sigmas, 11);
    const b = await lossAtSigmas([identity], batch, sigmas, 11);
    const c = await lossAtSigmas([identity], batch, sigmas, 12);
    assertEquals(a[0], a[1]);
    assertEquals(a[0], b[0]);
    assert(a[0][0] !== c[0][0], "another seed draws other noise");
  } finally {
    disposeBatch(batch);
  }
});

test("imageBatch: images of a range with one-hot labels; a range outside the data is refused", async () => {
  const device = await cpuDevice();
  const b = imageBatch(data, 37, 3, 5, device);
  try {
    assertEquals(b.x.shape, [3, 3, 8, 8]);
    assertEquals(Array.from(await b.x.toArray()).slice(0, 192), Array.from(data.get(37).image));
    const oneHot = await b.labels!.toArray();
    for (let i = 0; i < 3; i++) {
      assertEquals(oneHot[i * 5 + data.label(37 + i)!], 1);
      assertEquals(Array.from(oneHot.slice(i * 5, i * 5 + 5)).reduce((x, y) => x + y, 0), 1);
    }
  } finally {
    disposeBatch(b);
  }
  assertThrows(() => imageBatch(data, 38, 3, 0, device), "not a range of");
});

test("lossProxy: the mean over the sampler's grid of the loss at each σ, on the last n images", async () => {
  const device = await cpuDevice();
  device.manualSeed(5);
  const net = new UNet({
    ...DEFAULT_NETWORK,
    imgResolution: 8,
    modelChannels: 8,
    channelMult: [1],
    numBlocks: 1,
    attnResolutions: [],
  }, { device }).eval();
  try {
    assertEquals(samplerSigmas(4), Array.from(edmTimeSteps(4).slice(0, 4)));
    const m = await lossProxy(net, 0.5, data, { n: 5, steps: 4, seed: 2 });
    assertEquals(m.name, "loss-5");
    assertEquals(m.sigmas, samplerSigmas(4));
    assertEquals(m.bySigma.length, 4);
    assertClose([m.value], [m.bySigma.reduce((a, b) => a + b, 0) / 4], { rtol: 1e-12 });
    const again = await lossProxy(net, 0.5, data, { n: 5, steps: 4, seed: 2 });
    assertEquals(again.bySigma, m.bySigma);
    assert(m.bySigma.every((v) => Number.isFinite(v) && v > 0), String(m.bySigma));
  } finally {
    net.dispose();
  }
});
