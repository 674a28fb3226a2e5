/**
 * @file Tests of the data sources and image grids: the procedural set is deterministic (a golden hash pins its
 * bytes, so any change to the generator is deliberate), in range, structured (neighbouring pixels correlated,
 * correlation decaying with distance, edges present, images distinct, every class present) and consistent
 * across resolutions; the batch iterator's seeded epochs, resumption and one-hot labels; the CIFAR-10 binary
 * reader and the PNG folder reader on small generated files, including the errors for truncated, mislabelled,
 * wrong-sized, transparent and missing files; and PNG grids that decode back to the pixels put in.
 */

import { deepStrictEqual as assertEquals } from "node:assert";
import {
  BatchIterator,
  type Dataset,
  loadCifar10,
  loadImageFolder,
  openDataset,
  PROCEDURAL_CLASSES,
  PROCEDURAL_SCENES,
  ProceduralShapes,
  renderProcedural,
} from "../models/data.ts";
import {
  decodePng,
  encodeImageGrid,
  encodePng,
  fromByte,
  PNG_MAX_PIXELS,
  saveImageGrid,
  toByte,
} from "../models/images.ts";
import { tensor } from "../engine/mod.ts";
import { assertRejects, assertThrows, cpuDevice, test } from "./util.ts";

function fnv1a(parts: Uint8Array[]): string {
  let h = 0x811c9dc5;
  for (const p of parts) {
    for (const b of p) {
      h ^= b;
      h = Math.imul(h, 0x01000193) >>> 0;
    }
  }
  return h.toString(16).padStart(8, "0");
}

// ---------------------------------------------------------------------------------------------------------------
// The procedural set.

test("procedural shapes: deterministic from the seed, pinned by a golden hash, independent of access order", () => {
  // Changing the generator changes the dataset (and every result measured on it): update these deliberately.
  // The busy scenes' hashes are those of the generator before the bold scenes were added, and the bold ones those
  // from before the flat scenes were added: their bytes are kept.
  const golden = {
    flat: ["8112a966", "82da54d8", "de8b11a5"],
    bold: ["9a381eca", "260a8d61", "51cbd1ee"],
    busy: ["7162f379", "bc5f8f97", "a446accc"],
  };
  for (const scene of PROCEDURAL_SCENES) {
    const first16 = (R: number) =>
      Array.from({ length: 16 }, (_, i) => renderProcedural(0, i, R, { scene }).bytes);
    const later = Array.from({ length: 4 }, (_, i) => renderProcedural(12345, 1000 + i, 32, { scene }).bytes);
    assertEquals([fnv1a(first16(32)), fnv1a(first16(16)), fnv1a(later)], golden[scene]);
  }
  // The default is the flat scene.
  assertEquals(renderProcedural(0, 3, 16).bytes, renderProcedural(0, 3, 16, { scene: "flat" }).bytes);
  const a = new ProceduralShapes({ seed: 7, length: 100 }),
    b = new ProceduralShapes({ seed: 7, length: 100 });
  const forward = Array.from({ length: 20 }, (_, i) => a.bytes(i));
  const backward = Array.from({ length: 20 }, (_, i) => b.bytes(19 - i)).reverse();
  assertEquals(forward, backward);
  assertEquals(
    Array.from({ length: 20 }, (_, i) => a.label(i)),
    Array.from({ length: 20 }, (_, i) => b.label(i)),
  );
  const c = new ProceduralShapes({ seed: 8, length: 100 });
  for (let i = 0; i < 20; i++) {
    if (fnv1a([c.bytes(i)]) === fnv1a([a.bytes(i)])) {
      throw new Error(`seeds 7 and 8 give the same image ${i}`);
    }
  }
  // get() maps bytes to [−1, 1] exactly as u/127.5 − 1.
  const e = a.get(3), bytes = a.bytes(3);
  if (!(e.image instanceof Float32Array) || e.image.length !== 3 * 32 * 32) throw new Error("bad image size");
  for (let j = 0; j < bytes.length; j++) {
    if (e.image[j] !== Math.fround(bytes[j] / 127.5 - 1)) {
      throw new Error(`get() value ${j} is ${e.image[j]}`);
    }
  }
  assertEquals(e.label, a.label(3));
});

/** Pearson correlation of pixel pairs (x, x + dx) over all images, rows and channels. */
function neighbourCorrelation(imgs: Uint8Array[], R: number, dx: number): number {
  let n = 0, sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
  for (const img of imgs) {
    for (let c = 0; c < 3; c++) {
      for (let y = 0; y < R; y++) {
        for (let x = 0; x + dx < R; x++) {
          const a = img[(c * R + y) * R + x], b = img[(c * R + y) * R + x + dx];
          n++, sa += a, sb += b, saa += a * a, sbb += b * b, sab += a * b;
        }
      }
    }
  }
  const cov = sab / n - (sa / n) * (sb / n);
  return cov / Math.sqrt((saa / n - (sa / n) ** 2) * (sbb / n - (sb / n) ** 2));
}

test("busy procedural scenes: values span [−1, 1]; images are structured at several scales and distinct", () => {
  const R = 32, N = 200, ds = new ProceduralShapes({ resolution: R, length: N, scene: "busy" });
  // (Generation speed, ~0.3 ms per image quiet, is a bench figure, not asserted here.)
  const imgs = Array.from({ length: N }, (_, i) => ds.bytes(i));
  let lo = 255, hi = 0;
  for (const img of imgs) for (const b of img) (lo = Math.min(lo, b)), (hi = Math.max(hi, b));
  if (lo > 5 || hi < 250) throw new Error(`bytes span only [${lo}, ${hi}]`);
  // Neighbours are strongly but not perfectly correlated (smooth regions plus edges and texture), and the
  // correlation decays with distance (structure at several scales, not one flat colour per image).
  const c1 = neighbourCorrelation(imgs, R, 1), c4 = neighbourCorrelation(imgs, R, 4);
  const c16 = neighbourCorrelation(imgs, R, 16);
  if (!(c1 > 0.85 && c1 < 0.99 && c4 < c1 - 0.08 && c16 < c4 - 0.15 && c16 > 0.2)) {
    throw new Error(`correlations at distance 1, 4, 16: ${c1}, ${c4}, ${c16}`);
  }
  // Edges: a few percent of horizontal neighbours differ by more than 0.3 (in [−1, 1] units).
  let edges = 0, pairs = 0;
  for (const img of imgs) {
    for (let j = 0; j < img.length; j++) {
      if (j % R === R - 1) continue;
      pairs++;
      if (Math.abs(img[j] - img[j + 1]) > 0.15 * 255) edges++;
    }
  }
  if (!(edges / pairs > 0.01 && edges / pairs < 0.2)) throw new Error(`edge fraction ${edges / pairs}`);
  // Every image has contrast; images differ from each other; every class occurs.
  const hashes = new Set(imgs.map((img) => fnv1a([img])));
  if (hashes.size !== N) throw new Error(`${N - hashes.size} duplicate images`);
  let minStd = Infinity, meanDiff = 0;
  for (let i = 0; i < N; i++) {
    const img = imgs[i], m = img.reduce((a, b) => a + b, 0) / img.length;
    minStd = Math.min(minStd, Math.sqrt(img.reduce((a, b) => a + (b - m) ** 2, 0) / img.length) / 127.5);
    if (i) meanDiff += imgs[i].reduce((a, b, j) => a + Math.abs(b - imgs[i - 1][j]), 0) / img.length / 127.5;
  }
  meanDiff /= N - 1;
  if (minStd < 0.12 || meanDiff < 0.35) {
    throw new Error(`least per-image std ${minStd}, mean pair diff ${meanDiff}`);
  }
  // The pixel standard deviation is close to EDM's σ_data = 0.5.
  let sum = 0, sum2 = 0, count = 0;
  for (const img of imgs) {
    for (const b of img) (sum += b / 127.5 - 1), (sum2 += (b / 127.5 - 1) ** 2), count++;
  }
  const std = Math.sqrt(sum2 / count - (sum / count) ** 2);
  if (Math.abs(std - 0.5) > 0.1) throw new Error(`pixel std ${std}, σ_data is 0.5`);
  const counts = new Array(PROCEDURAL_CLASSES.length).fill(0);
  for (let i = 0; i < N; i++) counts[ds.label(i)!]++;
  if (counts.some((c) => c < 20)) throw new Error(`class counts ${counts}`);
});

test("bold procedural scenes: one large shape on a smooth background; every class; σ near EDM's 0.5", () => {
  const R = 16, N = 200, ds = new ProceduralShapes({ resolution: R, length: N, scene: "bold" });
  assertEquals(ds.name, "procedural-bold-16x16-seed0");
  const counts = new Array(PROCEDURAL_CLASSES.length).fill(0);
  let sum = 0, sum2 = 0, count = 0;
  for (let i = 0; i < N; i++) {
    counts[ds.label(i)!]++;
    const img = ds.bytes(i), bg = renderProcedural(0, i, R, { scene: "bold", shapes: false }).bytes;
    // The shape covers a large part of the image (its radius is 27–36% of the side) ...
    let covered = 0;
    for (let p = 0; p < R * R; p++) {
      const d = Math.abs(img[p] - bg[p]) + Math.abs(img[R * R + p] - bg[R * R + p]) +
        Math.abs(img[2 * R * R + p] - bg[2 * R * R + p]);
      if (d > 0.3 * 255) covered++;
    }
    if (covered < 0.08 * R * R) throw new Error(`image ${i}: the shape covers only ${covered} pixels`);
    // ... and the background alone is smooth (no lattice noise, no grain).
    for (let j = 0; j < bg.length; j++) {
      if (j % R && Math.abs(bg[j] - bg[j - 1]) > 0.06 * 255) {
        throw new Error(`image ${i}: background step at ${j}`);
      }
    }
    for (const b of img) (sum += b / 127.5 - 1), (sum2 += (b / 127.5 - 1) ** 2), count++;
  }
  if (counts.some((c) => c < 20)) throw new Error(`class counts ${counts}`);
  const std = Math.sqrt(sum2 / count - (sum / count) ** 2);
  if (Math.abs(std - 0.5) > 0.15) throw new Error(`pixel std ${std}, σ_data is 0.5`);
});

test("flat procedural scenes (the default): one light shape on plain dark grey; every class; labels kept", () => {
  const R = 16, N = 200, ds = new ProceduralShapes({ resolution: R, length: N });
  assertEquals([ds.scene, ds.name], ["flat", "procedural-flat-16x16-seed0"]);
  const dark = Math.round(0.15 * 255), light = Math.round(0.85 * 255);
  const counts = new Array(PROCEDURAL_CLASSES.length).fill(0);
  for (let i = 0; i < N; i++) {
    const label = ds.label(i)!, img = ds.bytes(i), { bytes, label: rendered } = renderProcedural(0, i, R);
    counts[label]++;
    assertEquals([rendered, Array.from(bytes)], [label, Array.from(img)]);
    let lit = 0;
    for (let p = 0; p < R * R; p++) {
      // Grey (R = G = B) and between the two levels: antialiased edges mix them, nothing else is drawn.
      const v = img[p];
      if (img[R * R + p] !== v || img[2 * R * R + p] !== v || v < dark || v > light) {
        throw new Error(`image ${i}: pixel ${p} is (${v}, ${img[R * R + p]}, ${img[2 * R * R + p]})`);
      }
      if (v > 128) lit++;
    }
    // The shape is large (at least 16 of 256 pixels lit, even a thin-striped one) and the corners are background.
    if (lit < 16) throw new Error(`image ${i} (${PROCEDURAL_CLASSES[label]}): only ${lit} pixels lit`);
    for (const p of [0, R - 1, R * (R - 1), R * R - 1]) {
      if (img[p] !== dark) throw new Error(`image ${i}: corner ${p} is ${img[p]}`);
    }
    const bg = renderProcedural(0, i, R, { shapes: false }).bytes;
    if (bg.some((b) => b !== dark)) {
      throw new Error(`image ${i}: the background alone is not plain dark grey`);
    }
  }
  if (counts.some((c) => c < 20)) throw new Error(`class counts ${counts}`);
});

test("procedural shapes: the 16×16 rendering is the same scene as the 32×32 one (every style)", () => {
  let total = 0;
  for (let i = 0; i < 30; i++) {
    const scene = PROCEDURAL_SCENES[i % PROCEDURAL_SCENES.length];
    const big = renderProcedural(3, i, 32, { scene }), small = renderProcedural(3, i, 16, { scene });
    assertEquals(big.label, small.label);
    // 2×2 average pooling of the 32×32 image against the 16×16 one.
    let diff = 0;
    for (let c = 0; c < 3; c++) {
      for (let y = 0; y < 16; y++) {
        for (let x = 0; x < 16; x++) {
          const at = (yy: number, xx: number) => big.bytes[(c * 32 + yy) * 32 + xx];
          const pooled =
            (at(2 * y, 2 * x) + at(2 * y + 1, 2 * x) + at(2 * y, 2 * x + 1) + at(2 * y + 1, 2 * x + 1)) / 4;
          diff += Math.abs(pooled - small.bytes[(c * 16 + y) * 16 + x]);
        }
      }
    }
    total += diff / (3 * 256) / 127.5;
  }
  // Edges, texture and grain differ at pixel scale; the scene does not. (Unrelated images differ by ≈ 0.5.)
  if (total / 30 > 0.08) throw new Error(`pooled 32×32 vs 16×16 differ by ${total / 30} on average`);
});

test("openDataset and ProceduralShapes: options are validated with the bad field named", async () => {
  await assertRejects(() => openDataset({ kind: "procedural", resolution: 7 }), "resolution");
  // @ts-expect-error: an unknown kind.
  await assertRejects(() => openDataset({ kind: "imagenet" }), "kind");
  // @ts-expect-error: a missing path.
  await assertRejects(() => openDataset({ kind: "cifar10" }), "path");
  const ds = await openDataset();
  assertEquals([ds.length, ds.channels, ds.height, ds.width, ds.numClasses], [50000, 3, 32, 32, 5]);
  let threw = false;
  try {
    ds.get(50000);
  } catch (e) {
    threw = (e as Error).message.includes("out of range");
  }
  if (!threw) throw new Error("get(length) did not throw an out-of-range error");
});

// ---------------------------------------------------------------------------------------------------------------
// Batches.

test("BatchIterator: seeded permutation per epoch, straddling batches, resumable, one-hot labels", async () => {
  const device = await cpuDevice();
  const ds = new ProceduralShapes({ resolution: 8, length: 10, seed: 2 });
  const it = new BatchIterator(ds, { batchSize: 4, seed: 1, device });
  const indices: number[] = [], epochs: number[] = [];
  for (let k = 0; k < 5; k++) {
    const b = it.next();
    assertEquals([...b.images.shape], [4, 3, 8, 8]);
    assertEquals([...b.labels!.shape], [4, 5]);
    const imgs = await b.images.toArray(), oneHot = await b.labels!.toArray();
    b.indices.forEach((i, j) => {
      const e = ds.get(i);
      assertEquals(Array.from(imgs.subarray(j * 192, (j + 1) * 192)), Array.from(e.image));
      assertEquals(
        Array.from(oneHot.subarray(j * 5, (j + 1) * 5)),
        [0, 1, 2, 3, 4].map((c) => (c === e.label ? 1 : 0)),
      );
      assertEquals(b.labelIndices![j], e.label);
    });
    indices.push(...b.indices);
    epochs.push(b.epoch);
    b.images.dispose();
    b.labels!.dispose();
  }
  assertEquals(epochs, [0, 0, 0, 1, 1]);
  assertEquals(it.position, 20);
  assertEquals(it.epoch, 2);
  const sorted = (a: number[]) => [...a].sort((x, y) => x - y);
  const all = Array.from({ length: 10 }, (_, i) => i);
  assertEquals(sorted(indices.slice(0, 10)), all);
  assertEquals(sorted(indices.slice(10, 20)), all);
  if (indices.slice(0, 10).join() === indices.slice(10, 20).join()) {
    throw new Error("epochs repeat one order");
  }
  if (indices.slice(0, 10).join() === all.join()) throw new Error("epoch 0 is not shuffled");
  // The same seed replays the stream; a resumed iterator continues it exactly.
  const again = new BatchIterator(ds, { batchSize: 4, seed: 1 });
  const replay = Array.from({ length: 5 }, () => [...again.nextHost().indices]).flat();
  assertEquals(replay, indices);
  const resumed = new BatchIterator(ds, { batchSize: 4, seed: 1, position: 8 });
  assertEquals([...resumed.nextHost().indices], indices.slice(8, 12));
  const other = new BatchIterator(ds, { batchSize: 10, seed: 2 });
  if ([...other.nextHost().indices].join() === indices.slice(0, 10).join()) throw new Error("seed ignored");
  const ordered = new BatchIterator(ds, { batchSize: 3, shuffle: false });
  assertEquals([...ordered.nextHost().indices, ...ordered.nextHost().indices], [0, 1, 2, 3, 4, 5]);
  let threw = "";
  try {
    new BatchIterator(ds, { batchSize: 0 });
  } catch (e) {
    threw = (e as Error).message;
  }
  if (!threw.includes("batchSize")) throw new Error(`batchSize 0: "${threw}"`);
});

// ---------------------------------------------------------------------------------------------------------------
// CIFAR-10.

/** A CIFAR-10 record: label, then R, G, B planes; pixel j of plane c is (seed + 3j + 7c) mod 256. */
function cifarRecord(label: number, seed: number): Uint8Array {
  const r = new Uint8Array(3073);
  r[0] = label;
  for (let c = 0; c < 3; c++) {
    for (let j = 0; j < 1024; j++) r[1 + c * 1024 + j] = (seed + 3 * j + 7 * c) % 256;
  }
  return r;
}
const concat = (...parts: Uint8Array[]) => {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) (out.set(p, at), at += p.length);
  return out;
};

function checkCifarImage(ds: Dataset, i: number, label: number, seed: number) {
  const e = ds.get(i);
  assertEquals(e.label, label);
  for (const [c, j] of [[0, 0], [0, 1023], [1, 5], [2, 777]]) {
    const want = Math.fround(((seed + 3 * j + 7 * c) % 256) / 127.5 - 1);
    if (e.image[c * 1024 + j] !== want) {
      throw new Error(`image ${i} channel ${c} pixel ${j}: ${e.image[c * 1024 + j]}`);
    }
  }
}

test("loadCifar10 reads the binary batches (folder, subfolder, single file, test split)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/data_batch_1.bin`, concat(cifarRecord(3, 0), cifarRecord(9, 50)));
    await Deno.writeFile(`${dir}/data_batch_2.bin`, cifarRecord(0, 100));
    await Deno.writeFile(`${dir}/test_batch.bin`, cifarRecord(7, 200));
    await Deno.writeFile(`${dir}/batches.meta.txt`, new TextEncoder().encode("airplane\n"));
    const ds = await loadCifar10(dir);
    assertEquals([ds.length, ds.channels, ds.height, ds.width, ds.numClasses], [3, 3, 32, 32, 10]);
    checkCifarImage(ds, 0, 3, 0);
    checkCifarImage(ds, 1, 9, 50);
    checkCifarImage(ds, 2, 0, 100);
    const test = await loadCifar10(dir, "test");
    assertEquals(test.length, 1);
    checkCifarImage(test, 0, 7, 200);
    const one = await loadCifar10(`${dir}/data_batch_2.bin`);
    checkCifarImage(one, 0, 0, 100);
    // The tarball's layout: <dir>/cifar-10-batches-bin/data_batch_*.bin.
    const outer = await Deno.makeTempDir();
    await Deno.mkdir(`${outer}/cifar-10-batches-bin`);
    await Deno.writeFile(`${outer}/cifar-10-batches-bin/data_batch_1.bin`, cifarRecord(5, 9));
    checkCifarImage(await loadCifar10(outer), 0, 5, 9);
    await Deno.remove(outer, { recursive: true });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

test("loadCifar10: truncated, empty, mislabelled and missing files are named in the error", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const f = `${dir}/data_batch_1.bin`;
    await Deno.writeFile(f, concat(cifarRecord(1, 0), cifarRecord(2, 0).slice(0, 100)));
    await assertRejects(
      () => loadCifar10(dir),
      f,
      "truncated record",
      "1 whole records",
      "100 bytes of record 2",
    );
    await Deno.writeFile(f, new Uint8Array(0));
    await assertRejects(() => loadCifar10(f), f, "is empty");
    await Deno.writeFile(f, concat(cifarRecord(1, 0), cifarRecord(12, 0)));
    await assertRejects(() => loadCifar10(f), f, "record 2 has label 12");
    await Deno.remove(f);
    await assertRejects(() => loadCifar10(dir), "no data_batch_*.bin in", dir);
    await assertRejects(() => loadCifar10(`${dir}/nothing.bin`), "does not exist");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// PNG folders.

/** An RGB image w×h whose pixel (x, y) channel c is (seed + 10x + 20y + 3c) mod 256, interleaved. */
function rgb(w: number, h: number, seed: number): Uint8Array {
  const d = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      for (let c = 0; c < 3; c++) d[(y * w + x) * 3 + c] = (seed + 10 * x + 20 * y + 3 * c) % 256;
    }
  }
  return d;
}

test("loadImageFolder reads PNGs recursively, sorted, as planar [−1, 1] images with dataset.json labels", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dir}/00000`);
    await Deno.writeFile(`${dir}/00000/img1.png`, encodePng(4, 3, 3, rgb(4, 3, 1)));
    await Deno.writeFile(`${dir}/00000/img0.png`, encodePng(4, 3, 3, rgb(4, 3, 0)));
    // An opaque RGBA image is accepted as RGB.
    const rgba = new Uint8Array(4 * 3 * 4), src = rgb(4, 3, 2);
    for (let p = 0; p < 12; p++) (rgba.set(src.subarray(p * 3, p * 3 + 3), p * 4), rgba[p * 4 + 3] = 255);
    await Deno.writeFile(`${dir}/z.png`, encodePng(4, 3, 4, rgba));
    await Deno.writeFile(`${dir}/notes.txt`, new TextEncoder().encode("not an image"));
    const ds = await loadImageFolder(dir);
    assertEquals(ds.files, ["00000/img0.png", "00000/img1.png", "z.png"]);
    assertEquals([ds.length, ds.channels, ds.height, ds.width, ds.numClasses], [3, 3, 3, 4, 0]);
    for (let i = 0; i < 3; i++) {
      const e = ds.get(i), want = rgb(4, 3, i);
      assertEquals(e.label, undefined);
      for (let c = 0; c < 3; c++) {
        for (let p = 0; p < 12; p++) {
          if (e.image[c * 12 + p] !== Math.fround(want[p * 3 + c] / 127.5 - 1)) {
            throw new Error(`image ${i} channel ${c} pixel ${p}: ${e.image[c * 12 + p]}`);
          }
        }
      }
    }
    const labels = [["00000/img0.png", 2], ["00000/img1.png", 0], ["z.png", 1]];
    await Deno.writeTextFile(`${dir}/dataset.json`, JSON.stringify({ labels }));
    const labelled = await loadImageFolder(dir);
    assertEquals([labelled.numClasses, labelled.label(0), labelled.label(1), labelled.label(2)], [
      3,
      2,
      0,
      1,
    ]);
    await Deno.writeTextFile(`${dir}/dataset.json`, JSON.stringify({ labels: labels.slice(0, 2) }));
    await assertRejects(() => loadImageFolder(dir), "dataset.json has no label for z.png");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** CRC-32 (PNG's chunk checksum). */
function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

/** A valid small PNG whose header (with a correct CRC) declares width × height pixels. */
function pngDeclaring(width: number, height: number): Uint8Array {
  const png = encodePng(4, 3, 3, new Uint8Array(36)).slice();
  const view = new DataView(png.buffer);
  view.setUint32(16, width);
  view.setUint32(20, height);
  view.setUint32(29, crc32(png.subarray(12, 29)));
  return png;
}

test("loadImageFolder: a PNG declaring 30000×30000 pixels is refused from its header, before decoding", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/b.png`, pngDeclaring(30000, 30000));
    await assertRejects(
      () => loadImageFolder(dir),
      `${dir}/b.png: declares 30000×30000 pixels, more than the limit of ${PNG_MAX_PIXELS} pixels (4096×4096)`,
    );
    await Deno.writeFile(`${dir}/a.png`, encodePng(4, 3, 3, new Uint8Array(36)));
    await assertRejects(() => loadImageFolder(dir), `${dir}/b.png is 30000×30000`, `${dir}/a.png is 4×3`);
    assertThrows(() => decodePng(pngDeclaring(30000, 30000)), "declares 30000×30000 pixels");
    assertEquals(decodePng(pngDeclaring(4, 3)).width, 4, "the patched header is a valid PNG");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

test("loadImageFolder: grey images; wrong size, mixed channels, transparency, bad PNG, empty folder are errors", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await assertRejects(() => loadImageFolder(dir), dir, "contains no .png images");
    const grey = new Uint8Array([0, 255, 128, 64, 32, 16]);
    await Deno.writeFile(`${dir}/a.png`, encodePng(3, 2, 1, grey));
    const g = await loadImageFolder(dir);
    assertEquals([g.channels, g.height, g.width], [1, 2, 3]);
    assertEquals(Array.from(g.bytes(0)), Array.from(grey));
    await Deno.writeFile(`${dir}/b.png`, encodePng(3, 3, 1, new Uint8Array(9)));
    await assertRejects(() => loadImageFolder(dir), `${dir}/b.png is 3×3`, `${dir}/a.png is 3×2`, "one size");
    await Deno.writeFile(`${dir}/b.png`, encodePng(3, 2, 3, new Uint8Array(18)));
    await assertRejects(() => loadImageFolder(dir), `${dir}/b.png is RGB (3 channels)`, "grey (1 channel)");
    await Deno.writeFile(
      `${dir}/b.png`,
      encodePng(3, 2, 2, new Uint8Array([0, 255, 0, 255, 0, 254, 0, 255, 0, 255, 0, 255])),
    );
    await assertRejects(
      () => loadImageFolder(dir),
      `${dir}/b.png`,
      "transparent pixels",
      "alpha 254 at pixel 2",
    );
    await Deno.writeFile(`${dir}/b.png`, new TextEncoder().encode("definitely not a PNG"));
    await assertRejects(() => loadImageFolder(dir), `${dir}/b.png`, "not a readable PNG");
    await Deno.writeFile(`${dir}/b.png`, encodePng(3, 2, 1, grey).slice(0, 40));
    await assertRejects(() => loadImageFolder(dir), `${dir}/b.png`, "not a readable PNG");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Image grids.

test("toByte/fromByte follow NVlabs (⌊x·127.5 + 128⌋ clipped) and round-trip every byte", () => {
  for (let u = 0; u < 256; u++) {
    if (toByte(fromByte(u)) !== u) throw new Error(`byte ${u} does not round-trip`);
  }
  assertEquals([toByte(-1.5), toByte(2), toByte(0), toByte(-1), toByte(1), toByte(NaN)], [
    0,
    255,
    128,
    0,
    255,
    0,
  ]);
});

test("encodeImageGrid lays out cells with padding and nearest upscaling; saveImageGrid writes atomically", async () => {
  const N = 5, C = 3, H = 2, W = 3;
  const data = Float32Array.from({ length: N * C * H * W }, (_, i) => fromByte((i * 7) % 256));
  const png = decodePng(
    encodeImageGrid({ data, shape: [N, C, H, W] }, { cols: 3, scale: 2, pad: 1, padValue: 9 }),
  );
  // 3 columns of 2·3 pixels and 4 gaps; 2 rows of 2·2 pixels and 3 gaps.
  assertEquals([png.width, png.height, png.channels], [22, 11, 3]);
  const at = (x: number, y: number, c: number) => png.data[(y * 22 + x) * 3 + c];
  for (let n = 0; n < N; n++) {
    const x0 = 1 + (n % 3) * 7, y0 = 1 + Math.floor(n / 3) * 5;
    for (let y = 0; y < 4; y++) {
      for (let x = 0; x < 6; x++) {
        for (let c = 0; c < 3; c++) {
          const want = toByte(data[((n * C + c) * H + (y >> 1)) * W + (x >> 1)]);
          if (at(x0 + x, y0 + y, c) !== want) throw new Error(`cell ${n} (${x}, ${y}) channel ${c}`);
        }
      }
    }
  }
  assertEquals([at(0, 0, 0), at(7, 3, 1), at(20, 8, 2)], [9, 9, 9]); // gaps and the empty sixth cell
  // Grey images, the default scale (cells at least 64 pixels tall), and a wrong channel count.
  const grey = decodePng(encodeImageGrid({ data: new Float32Array(4 * 16 * 16), shape: [4, 1, 16, 16] }));
  assertEquals([grey.channels, grey.width, grey.height], [1, 2 * 64 + 3 * 2, 2 * 64 + 3 * 2]);
  let threw = "";
  try {
    encodeImageGrid({ data: new Float32Array(8), shape: [1, 2, 2, 2] });
  } catch (e) {
    threw = (e as Error).message;
  }
  if (!threw.includes("[N, 1 or 3, H, W]")) throw new Error(`two channels: "${threw}"`);
  // From a device tensor, atomically: the folder holds the PNG and nothing else afterwards.
  const device = await cpuDevice();
  const dir = await Deno.makeTempDir();
  try {
    const t = tensor(data, [N, C, H, W], { device });
    await saveImageGrid(`${dir}/grid.png`, t, { cols: 5 });
    t.dispose();
    const names = [];
    for await (const e of Deno.readDir(dir)) names.push(e.name);
    assertEquals(names, ["grid.png"]);
    const img = decodePng(await Deno.readFile(`${dir}/grid.png`));
    assertEquals([img.width, img.height], [5 * 3 * 32 + 6 * 2, 2 * 32 + 2 * 2]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
