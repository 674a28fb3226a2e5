/**
 * @file Tests of the idx reader and the Fashion-MNIST dataset (models/idx.ts, models/data.ts) on small files the
 * tests write, gzipped and raw: the bytes and labels read back, 32×32 is the 28×28 image with a 2-pixel
 * background border, and each damaged file (bad magic, wrong type, wrong dimensions, truncated, extra bytes,
 * damaged gzip, label out of range, label count that differs, a missing file) fails naming the file and what is
 * wrong. FashionNet (eval/fashion_net.ts): features of the padded and native image agree, the seeded build refuses
 * to replace a file without force and to write below its accuracy bar, and the architecture travels in the
 * metadata. The real package's files are read when `dataset-fashion-mnist` is installed; otherwise that test is
 * skipped and its name says why.
 */

import { gzipSync } from "node:zlib";
import { decodeSafetensors, tensor } from "../engine/mod.ts";
import { FashionMnistDataset, loadFashionMnist, openDataset } from "../models/data.ts";
import { encodeIdx, FASHION_MNIST_DIR, parseIdx, readFashionMnist } from "../models/idx.ts";
import {
  buildFashionNet,
  FASHION_NET_FILE,
  FASHION_NET_MIN_ACCURACY,
  fashionAccuracy,
  FashionNet,
} from "../eval/fashion_net.ts";
import { openFeatureExtractor } from "../eval/features.ts";
import { DATASET_CONTROLS, measureDatasetControls } from "../eval/controls.ts";
import { parseTrainConfig } from "../models/train.ts";
import { assertClose, assertEquals, assertRejects, assertThrows, cpuDevice, tempDir, test } from "./util.ts";

/** `count` 28×28 images whose pixel p of image i is (i·7 + p) mod 256, labels i mod 10. */
function fakeSplit(count: number): { images: Uint8Array; labels: Uint8Array } {
  const images = Uint8Array.from(
    { length: count * 784 },
    (_, k) => (Math.floor(k / 784) * 7 + k % 784) % 256,
  );
  const labels = Uint8Array.from({ length: count }, (_, i) => i % 10);
  return { images, labels };
}

/** Writes a Fashion-MNIST folder: both splits, gzipped or raw, with `count` images each. */
async function writeFolder(dir: string, count: number, gz: boolean): Promise<void> {
  const enc = (b: Uint8Array) => (gz ? new Uint8Array(gzipSync(b)) : b), ext = gz ? ".gz" : "";
  for (const prefix of ["train", "t10k"]) {
    const { images, labels } = fakeSplit(count);
    await Deno.writeFile(`${dir}/${prefix}-images-idx3-ubyte${ext}`, enc(encodeIdx([count, 28, 28], images)));
    await Deno.writeFile(`${dir}/${prefix}-labels-idx1-ubyte${ext}`, enc(encodeIdx([count], labels)));
  }
}

test("idx: gzipped and raw folders read back the bytes and labels written; 32×32 pads with background", async () => {
  for (const gz of [true, false]) {
    const dir = await tempDir("idx-");
    await writeFolder(dir, 12, gz);
    const want = fakeSplit(12);
    for (const split of ["train", "test"] as const) {
      const ds = await openDataset({ kind: "fashion-mnist", path: dir, split, resolution: 28 });
      assertEquals([ds.length, ds.channels, ds.height, ds.width, ds.numClasses], [12, 1, 28, 28, 10]);
      assertEquals(ds.name, `fashion-mnist-${split}-28x28`);
      for (const i of [0, 5, 11]) {
        assertEquals(Array.from(ds.bytes(i)), Array.from(want.images.subarray(i * 784, (i + 1) * 784)));
        assertEquals(ds.label(i), i % 10);
      }
      const padded = await loadFashionMnist({ path: dir, split, resolution: 32 });
      const b = padded.bytes(5), native = ds.bytes(5);
      for (let y = 0; y < 32; y++) {
        for (let x = 0; x < 32; x++) {
          const inside = y >= 2 && y < 30 && x >= 2 && x < 30;
          const v = inside ? native[(y - 2) * 28 + x - 2] : 0;
          if (b[y * 32 + x] !== v) {
            throw new Error(`padded pixel (${y}, ${x}) is ${b[y * 32 + x]}, want ${v}`);
          }
        }
      }
      // [−1, 1] like every dataset: background 0 → −1.
      assertEquals(padded.get(5).image[0], -1);
    }
  }
});

test("idx: damaged files fail naming the file and what is wrong", async () => {
  const good = encodeIdx([3, 28, 28], new Uint8Array(3 * 784));
  assertEquals(parseIdx(good, "g", 3).dims, [3, 28, 28]);
  const bad = (bytes: Uint8Array, ...parts: string[]) =>
    assertThrows(() => parseIdx(bytes, "f.idx", 3), ...parts);
  bad(Uint8Array.of(0x50, 0x4b, 3, 4, ...good.subarray(4)), "f.idx", "bad magic number 0x504b0304");
  const float = good.slice();
  float[2] = 0x0d;
  bad(float, "f.idx", "type 0x0d");
  bad(encodeIdx([3, 784], new Uint8Array(3 * 784)), "f.idx", "2 dimensions, expected 3");
  bad(good.subarray(0, good.length - 1), "f.idx", "truncated", "need 2352 bytes of data, it has 2351");
  bad(good.subarray(0, 9), "f.idx", "truncated", "header of 3 dimensions is 16");
  bad(Uint8Array.of(...good, 1, 2), "f.idx", "2 bytes after");
  bad(new Uint8Array(gzipSync(good)).subarray(0, 30), "f.idx", "damaged gzip");
  assertEquals(parseIdx(new Uint8Array(gzipSync(good)), "g", 3).dims, [3, 28, 28]);

  // Folder-level checks: dimensions, label range and count, missing files.
  const dir = await tempDir("idx-bad-");
  await writeFolder(dir, 4, false);
  const labels = `${dir}/train-labels-idx1-ubyte`, images = `${dir}/train-images-idx3-ubyte`;
  await Deno.writeFile(labels, encodeIdx([5], new Uint8Array(5)));
  await assertRejects(() => readFashionMnist("train", dir), labels, "5 labels", images, "4 images");
  await Deno.writeFile(labels, encodeIdx([4], Uint8Array.of(0, 1, 10, 3)));
  await assertRejects(() => readFashionMnist("train", dir), labels, "label 2 is 10", "0–9");
  await Deno.writeFile(images, encodeIdx([4, 32, 32], new Uint8Array(4 * 1024)));
  await assertRejects(() => readFashionMnist("train", dir), images, "32×32", "28×28");
  await Deno.remove(images);
  await assertRejects(() => readFashionMnist("train", dir), "train-images-idx3-ubyte.gz", dir);
  await assertRejects(() => readFashionMnist("train", `${dir}/nowhere`), `${dir}/nowhere`, "not a folder");
  // The test split is untouched and still reads.
  assertEquals((await readFashionMnist("test", dir)).count, 4);
  await assertRejects(
    () => openDataset({ kind: "fashion-mnist", path: dir, resolution: 30 as 28 }),
    "resolution",
  );
});

const REAL = await Deno.stat(`${FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz`).then(() => true, () => false);
Deno.test({
  name: REAL
    ? "idx: the installed dataset-fashion-mnist reads (10,000 t10k images, 1,000 per class)"
    : `idx: the installed dataset-fashion-mnist reads [skipped: ${FASHION_MNIST_DIR} is absent; ` +
      "apt-get install dataset-fashion-mnist]",
  ignore: !REAL,
  fn: async () => {
    const ds = await loadFashionMnist({ split: "test" });
    assertEquals([ds.length, ds.height, ds.channels], [10000, 28, 1]);
    const counts = new Array(10).fill(0);
    for (let i = 0; i < ds.length; i++) counts[ds.label(i)!]++;
    assertEquals(counts, new Array(10).fill(1000));
  },
});

test("FashionNet: padded and native images give the same features; the feature network follows the data", async () => {
  const device = await cpuDevice();
  const net = new FashionNet(undefined, { device }).eval();
  const dir = await tempDir("idx-net-");
  await writeFolder(dir, 4, true);
  const native = await loadFashionMnist({ path: dir, resolution: 28 }),
    padded = await loadFashionMnist({ path: dir, resolution: 32 });
  const batch = (ds: FashionMnistDataset) =>
    tensor(
      Float32Array.from({ length: 4 * ds.height ** 2 }, (_, k) =>
        ds.bytes(Math.floor(k / ds.height ** 2))[k % ds.height ** 2]),
      [4, 1, ds.height, ds.height],
      { device },
    );
  const a = net.features(batch(native)), b = net.features(batch(padded));
  assertEquals(a.shape, [4, 64]);
  assertClose(await b.toArray(), await a.toArray(), { atol: 1e-5 });
  assertThrows(
    () => net.features(tensor(new Float32Array(3 * 784), [1, 3, 28, 28], { device })),
    "grey",
    "[1,3,28,28]",
  );
  net.dispose();
  // Without Inception, Fashion-MNIST data gets FashionNet and other data ShapesNet.
  const f = await openFeatureExtractor({ device, data: { kind: "fashion-mnist" } });
  assertEquals(f.name, "fashion-net");
  f.dispose();
  const s = await openFeatureExtractor({ device, data: { kind: "procedural" } });
  assertEquals(s.name, "shapes-net");
  s.dispose();
});

test("FashionNet: the build refuses to overwrite without force and to write below its bar; metadata round-trips", async () => {
  const device = await cpuDevice();
  const dir = await tempDir("idx-build-");
  await writeFolder(dir, 20, false);
  const out = `${dir}/net.safetensors`;
  const options = {
    steps: 2,
    batch: 8,
    calibration: 8,
    channels: [4, 4, 8] as [number, number, number],
    path: dir,
  };
  const below = await buildFashionNet(out, options, { device, minAccuracy: 1.01 });
  assertEquals(below.written, false);
  if (await Deno.stat(out).then(() => true, () => false)) {
    throw new Error("a network below the bar was written");
  }
  const ok = await buildFashionNet(out, options, { device, minAccuracy: 0 });
  assertEquals(ok.written, true);
  const meta = decodeSafetensors(await Deno.readFile(out), out).metadata;
  assertEquals(JSON.parse(meta.architecture), { channels: [4, 4, 8] });
  assertEquals(JSON.parse(meta.heldOutAccuracy).t10k, ok.accuracy);
  assertEquals(JSON.parse(meta.options).steps, 2);
  await assertRejects(() => buildFashionNet(out, options, { device, minAccuracy: 0 }), out, "--force");
  const loaded = await FashionNet.load(out, { device });
  assertEquals(loaded.dim, 8);
  // The accuracy stored is the one the loaded weights reach.
  assertEquals(
    await fashionAccuracy(loaded, await loadFashionMnist({ path: dir, split: "test" })),
    ok.accuracy,
  );
  // The controls run on any dataset: one finite, non-negative distance per control.
  const train = await loadFashionMnist({ path: dir }),
    test = await loadFashionMnist({ path: dir, split: "test" });
  const rows = await measureDatasetControls(loaded, { reference: train, heldOut: test, n: 16, batch: 8 });
  assertEquals(rows.map((r) => r.control), [...DATASET_CONTROLS]);
  for (const r of rows) {
    if (!Number.isFinite(r.fid) || r.fid < -1e-6) throw new Error(`${r.control}: ${r.fid}`);
  }
  loaded.dispose();
});

test("train: Fashion-MNIST runs default to the grey 28×28 class-conditional network and its training options; given ones win", async () => {
  const cfg = await parseTrainConfig({ data: { kind: "fashion-mnist" } });
  assertEquals(
    [cfg.network.imgResolution, cfg.network.inChannels, cfg.network.channelMult, cfg.network.attnResolutions],
    [28, 1, [1, 2, 2], [7]],
  );
  // Conditioned on the 10 garment classes, the number the Trainer checks against the data's.
  assertEquals(cfg.network.labelDim, 10);
  assertEquals([cfg.batch, cfg.lr, cfg.emaHalfLifeKimg, cfg.kimg, cfg.pMean], [16, 5e-3, 1, 10, -0.4]);
  const padded = await parseTrainConfig({
    data: { kind: "fashion-mnist", resolution: 32 },
    batch: 8,
    kimg: 2,
  });
  assertEquals(
    [
      padded.network.imgResolution,
      padded.network.attnResolutions,
      padded.network.labelDim,
      padded.batch,
      padded.kimg,
    ],
    [32, [8], 10, 8, 2],
  );
  // Other data keep the shapes' defaults.
  const shapes = await parseTrainConfig({});
  assertEquals([shapes.network.inChannels, shapes.network.labelDim, shapes.batch], [3, 5, 32]);
});

test("shipped FashionNet: its recorded t10k accuracy is at least the bar, with its options and architecture", async () => {
  const path = FASHION_NET_FILE.pathname;
  const meta = decodeSafetensors(await Deno.readFile(path), path).metadata;
  const acc = JSON.parse(meta.heldOutAccuracy).t10k;
  if (!(acc >= FASHION_NET_MIN_ACCURACY)) {
    throw new Error(`${path}: t10k accuracy ${acc} < ${FASHION_NET_MIN_ACCURACY}`);
  }
  assertEquals([meta.network, JSON.parse(meta.architecture).channels], ["fashion-net", [16, 32, 64]]);
  assertEquals(JSON.parse(meta.options).seed, 0);
});
