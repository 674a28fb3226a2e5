/**
 * @file The idx file format of MNIST and Fashion-MNIST, and Fashion-MNIST's pair of files per split.
 *
 * An idx file is a big-endian header, then the data row-major: two zero bytes, a type byte (0x08: unsigned
 * bytes, the only type these datasets use), the number of dimensions d, d 32-bit sizes. Fashion-MNIST
 * (Xiao et al. 2017, Debian's `dataset-fashion-mnist` installs it under `FASHION_MNIST_DIR`) has per split an
 * images file of d = 3 ([count, 28, 28], 0 = background, 255 = full ink) and a labels file of d = 1 ([count],
 * classes 0–9), named `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, usually gzipped (`.gz`; a file is
 * gunzipped when it starts with gzip's magic bytes, whatever its name).
 *
 * Every check names the file and what is wrong with it: not gzip data, a bad magic number, the wrong number or
 * size of dimensions, a truncated or overlong body, a label out of range, or label and image counts that differ.
 * The dataset class that serves these images lives in models/data.ts (`FashionMnistDataset`).
 */

import { gunzipSync } from "node:zlib";

/** Where Debian's `dataset-fashion-mnist` puts the files. */
export const FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist";

/** Fashion-MNIST's class names, by label (the dataset's README). */
export const FASHION_MNIST_CLASSES = [
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
] as const;

/** Side of a Fashion-MNIST image in pixels. */
export const FASHION_MNIST_SIZE = 28;

/** The split names and their file-name prefixes. */
export const FASHION_MNIST_SPLITS = { train: "train", test: "t10k" } as const;
export type FashionMnistSplit = keyof typeof FASHION_MNIST_SPLITS;

/** A decoded idx file: its dimensions and its bytes (row-major). */
export interface IdxArray {
  dims: number[];
  data: Uint8Array;
}

const isGzip = (b: Uint8Array) => b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b;

/**
 * Decodes idx bytes (gunzipped first if they are gzip data). `file` names the source in errors; `ndims`, if
 * given, is the number of dimensions the caller needs.
 */
export function parseIdx(raw: Uint8Array, file: string, ndims?: number): IdxArray {
  let bytes = raw;
  if (isGzip(raw)) {
    try {
      bytes = new Uint8Array(gunzipSync(raw));
    } catch (e) {
      throw new Error(`idx: ${file} is damaged gzip data (${(e as Error).message})`);
    }
  }
  if (bytes.length < 4) {
    throw new Error(`idx: ${file} is truncated: ${bytes.length} bytes, not even a header`);
  }
  if (bytes[0] !== 0 || bytes[1] !== 0) {
    const magic = Array.from(bytes.subarray(0, 4), (b) => b.toString(16).padStart(2, "0")).join("");
    throw new Error(
      `idx: ${file} has the bad magic number 0x${magic}: an idx file starts 0x0000 (then type, dims)`,
    );
  }
  if (bytes[2] !== 0x08) {
    throw new Error(
      `idx: ${file} holds type 0x${
        bytes[2].toString(16).padStart(2, "0")
      }; only unsigned bytes (0x08) are read`,
    );
  }
  const d = bytes[3];
  if (ndims !== undefined && d !== ndims) {
    throw new Error(`idx: ${file} has ${d} dimension${d === 1 ? "" : "s"}, expected ${ndims}`);
  }
  const head = 4 + 4 * d;
  if (bytes.length < head) {
    throw new Error(
      `idx: ${file} is truncated: ${bytes.length} bytes, the header of ${d} dimensions is ${head}`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const dims = Array.from({ length: d }, (_, i) => view.getUint32(4 + 4 * i, false));
  const size = dims.reduce((a, b) => a * b, 1), body = bytes.length - head;
  if (body < size) {
    throw new Error(
      `idx: ${file} is truncated: dimensions [${dims.join(", ")}] need ${size} bytes of data, it has ${body}`,
    );
  }
  if (body > size) {
    throw new Error(
      `idx: ${file} has ${body - size} bytes after the ${size} of dimensions [${dims.join(", ")}]`,
    );
  }
  return { dims, data: bytes.subarray(head) };
}

/** Reads and decodes one idx file (gzipped or not). */
export async function readIdx(path: string, ndims?: number): Promise<IdxArray> {
  let raw: Uint8Array;
  try {
    raw = await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new Error(`idx: ${path} does not exist`);
    throw new Error(`idx: cannot read ${path}: ${(e as Error).message}`);
  }
  return parseIdx(raw, path, ndims);
}

/** One split of Fashion-MNIST in memory. */
export interface FashionMnistFiles {
  /** [count, 28, 28] bytes, 0 = background. */
  images: Uint8Array;
  /** [count] classes 0–9. */
  labels: Uint8Array;
  count: number;
  imagesFile: string;
  labelsFile: string;
}

const join = (dir: string, name: string) => (dir.endsWith("/") ? dir + name : `${dir}/${name}`);

/** The file `name` in `dir`, gzipped (`name.gz`, preferred) or not; an error lists both if neither exists. */
async function findFile(dir: string, name: string): Promise<string> {
  for (const f of [join(dir, `${name}.gz`), join(dir, name)]) {
    if (await Deno.stat(f).then((s) => s.isFile, () => false)) return f;
  }
  throw new Error(
    `Fashion-MNIST: neither ${name}.gz nor ${name} is in ${dir}` +
      (dir === FASHION_MNIST_DIR ? " (install it with `apt-get install dataset-fashion-mnist`)" : ""),
  );
}

/**
 * Reads one split (`train`: 60,000 images, `test`: the 10,000 of t10k) from `dir` (default Debian's folder),
 * checking that the images are 28×28, the labels 0–9, and that both files count the same images.
 */
export async function readFashionMnist(
  split: FashionMnistSplit = "train",
  dir: string = FASHION_MNIST_DIR,
): Promise<FashionMnistFiles> {
  if (!(await Deno.stat(dir).then((s) => s.isDirectory, () => false))) {
    throw new Error(
      `Fashion-MNIST: ${dir} is not a folder` +
        (dir === FASHION_MNIST_DIR ? " (install it with `apt-get install dataset-fashion-mnist`)" : ""),
    );
  }
  const prefix = FASHION_MNIST_SPLITS[split];
  const imagesFile = await findFile(dir, `${prefix}-images-idx3-ubyte`);
  const labelsFile = await findFile(dir, `${prefix}-labels-idx1-ubyte`);
  const images = await readIdx(imagesFile, 3), labels = await readIdx(labelsFile, 1);
  const [count, rows, cols] = images.dims, S = FASHION_MNIST_SIZE;
  if (rows !== S || cols !== S) {
    throw new Error(
      `Fashion-MNIST: ${imagesFile} holds ${rows}×${cols} images; Fashion-MNIST's are ${S}×${S}`,
    );
  }
  if (count === 0) throw new Error(`Fashion-MNIST: ${imagesFile} holds no images`);
  if (labels.dims[0] !== count) {
    throw new Error(
      `Fashion-MNIST: ${labelsFile} has ${labels.dims[0]} labels but ${imagesFile} has ${count} images`,
    );
  }
  const K = FASHION_MNIST_CLASSES.length;
  const bad = labels.data.findIndex((l) => l >= K);
  if (bad >= 0) {
    throw new Error(
      `Fashion-MNIST: ${labelsFile} label ${bad} is ${labels.data[bad]}; classes are 0–${K - 1}`,
    );
  }
  return { images: images.data, labels: labels.data, count, imagesFile, labelsFile };
}

/** Encodes bytes as an idx file of unsigned bytes with dimensions `dims` (for tests and tools). */
export function encodeIdx(dims: number[], data: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + 4 * dims.length + data.length), view = new DataView(out.buffer);
  out[2] = 0x08;
  out[3] = dims.length;
  dims.forEach((d, i) => view.setUint32(4 + 4 * i, d, false));
  out.set(data, 4 + 4 * dims.length);
  return out;
}
