/**
 * @file Images for people to look at: a grid of samples written as one PNG, and the PNG encoding/decoding the
 * data sources use (through the `fast-png` npm package).
 *
 * Pixel values follow NVlabs/edm: a dataset byte u becomes u/127.5 − 1 in [−1, 1], and a generated value x
 * becomes the byte ⌊x·127.5 + 128⌋ clipped to [0, 255] (generate.py), so bytes round-trip exactly. Small
 * images are enlarged by nearest-neighbour repetition so that single pixels stay visible. Files are written to
 * a temporary name in the same folder and renamed, so a reader never sees half a PNG.
 */

import { z } from "zod";
import { convertIndexedToRgb, decode as decodePngRaw, encode as encodePngRaw } from "fast-png";
import { Tensor } from "../engine/mod.ts";
import { parseConfig } from "../util/config.ts";
import { writeFileAtomic } from "../util/files.ts";

/** Options of `saveImageGrid` / `encodeImageGrid`. */
export const ImageGridConfig = z.object({
  // Images per row (default ⌈√N⌉).
  cols: z.number().int().positive().optional(),
  // Nearest-neighbour enlargement factor (default: the smallest that makes each cell at least 64 pixels tall).
  scale: z.number().int().positive().max(64).optional(),
  // Gap between cells in output pixels.
  pad: z.number().int().nonnegative().max(64).default(2),
  // Grey level of the gaps, 0–255.
  padValue: z.number().int().min(0).max(255).default(32),
}).strict();
export type ImageGridOptions = z.input<typeof ImageGridConfig>;

/** An image batch on the host: values [N, C, H, W] row-major. */
export interface HostImages {
  data: ArrayLike<number>;
  shape: readonly number[];
}

/** NVlabs/edm's conversion of a value in [−1, 1] to a byte: ⌊x·127.5 + 128⌋ clipped to [0, 255]. */
export function toByte(x: number): number {
  const v = Math.floor(x * 127.5 + 128);
  return v < 0 ? 0 : v > 255 ? 255 : Number.isNaN(v) ? 0 : v;
}

/** A dataset byte as a value in [−1, 1]: u/127.5 − 1. */
export const fromByte = (u: number): number => u / 127.5 - 1;

/**
 * The grid as PNG bytes: images [N, C, H, W] (C = 1 grey or 3 RGB) with values in [−1, 1], `cols` per row, each
 * enlarged `scale` times.
 */
export function encodeImageGrid(images: HostImages, opts: ImageGridOptions = {}): Uint8Array {
  const o = parseConfig(ImageGridConfig, opts, "encodeImageGrid");
  const [N, C, H, W] = images.shape;
  if (images.shape.length !== 4 || !(C === 1 || C === 3)) {
    throw new Error(`encodeImageGrid: images must be [N, 1 or 3, H, W], got [${images.shape}]`);
  }
  if (images.data.length !== N * C * H * W) {
    throw new Error(`encodeImageGrid: ${images.data.length} values do not fill [${images.shape}]`);
  }
  const cols = Math.min(o.cols ?? Math.ceil(Math.sqrt(N)), N), rows = Math.ceil(N / cols);
  const scale = o.scale ?? Math.max(1, Math.ceil(64 / H));
  const cw = W * scale, ch = H * scale, pad = o.pad;
  const width = cols * cw + (cols + 1) * pad, height = rows * ch + (rows + 1) * pad;
  const out = new Uint8Array(width * height * C).fill(o.padValue);
  for (let n = 0; n < N; n++) {
    const x0 = pad + (n % cols) * (cw + pad), y0 = pad + Math.floor(n / cols) * (ch + pad);
    for (let y = 0; y < ch; y++) {
      const sy = Math.floor(y / scale);
      for (let x = 0; x < cw; x++) {
        const sx = Math.floor(x / scale), at = ((y0 + y) * width + x0 + x) * C;
        for (let c = 0; c < C; c++) out[at + c] = toByte(images.data[((n * C + c) * H + sy) * W + sx]);
      }
    }
  }
  return encodePngRaw({ width, height, data: out, channels: C, depth: 8 });
}

/**
 * Writes a grid of images (a tensor [N, C, H, W] in [−1, 1], read back here, or host values) as a PNG at
 * `path`, atomically (temporary file in the same folder, then rename).
 */
export async function saveImageGrid(
  path: string,
  images: Tensor | HostImages,
  opts: ImageGridOptions = {},
): Promise<void> {
  const host = images instanceof Tensor ? { data: await images.toArray(), shape: images.shape } : images;
  await writeFileAtomic(path, encodeImageGrid(host, opts));
}

/** A decoded PNG as 8-bit interleaved pixels with 1 (grey) or 3 (RGB) channels. */
export interface DecodedImage {
  width: number;
  height: number;
  channels: 1 | 3;
  data: Uint8Array;
}

/** The most pixels a PNG may declare (4096×4096): its header is read first, so a hostile one is refused cheaply. */
export const PNG_MAX_PIXELS = 4096 * 4096;

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/**
 * The width and height a PNG's header (IHDR, the first chunk) declares, read without decoding anything: a small
 * file may declare a huge image that would take gigabytes to decode.
 */
export function pngSize(bytes: Uint8Array): { width: number; height: number } {
  if (bytes.length < 24 || PNG_SIGNATURE.some((b, i) => bytes[i] !== b)) {
    throw new Error("not a readable PNG (no PNG signature)");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (String.fromCharCode(...bytes.subarray(12, 16)) !== "IHDR") {
    throw new Error("not a readable PNG (the first chunk is not IHDR)");
  }
  return { width: view.getUint32(16), height: view.getUint32(20) };
}

/**
 * Decodes a PNG to 8-bit grey or RGB: palettes are expanded, 16-bit samples are rounded to 8 bits, and an alpha
 * channel is dropped if every pixel is opaque (otherwise an error: a transparent training image is ambiguous).
 * Errors say what is wrong; the caller adds the file name. The header's size is checked first, against
 * `maxPixels` (default `PNG_MAX_PIXELS`).
 */
export function decodePng(
  bytes: Uint8Array,
  opts: { maxPixels?: number } = {},
): DecodedImage {
  // The declared size is checked before decoding (which allocates width × height × channels).
  const declared = pngSize(bytes), max = opts.maxPixels ?? PNG_MAX_PIXELS;
  if (declared.width * declared.height > max) {
    throw new Error(
      `declares ${declared.width}×${declared.height} pixels, more than the limit of ${max} pixels ` +
        `(${Math.sqrt(max)}×${Math.sqrt(max)})`,
    );
  }
  let png;
  try {
    png = decodePngRaw(bytes);
  } catch (e) {
    throw new Error(`not a readable PNG (${(e as Error).message})`);
  }
  const { width, height } = png;
  let data: ArrayLike<number> = png.data, channels = png.channels, depth: number = png.depth;
  if (png.palette) {
    data = convertIndexedToRgb(png);
    channels = png.palette[0]?.length === 4 ? 4 : 3;
    depth = 8;
  } else if (depth < 8) {
    throw new Error(`${depth}-bit samples are not supported (use 8 or 16 bits per sample)`);
  }
  if (![1, 2, 3, 4].includes(channels)) throw new Error(`unsupported channel count ${channels}`);
  const pixels = width * height;
  if (data.length < pixels * channels) throw new Error("pixel data is truncated");
  const colour = channels >= 3 ? 3 : 1, alpha = channels === 2 || channels === 4;
  const opaque = depth === 16 ? 65535 : 255;
  const out = new Uint8Array(pixels * colour);
  for (let p = 0; p < pixels; p++) {
    if (alpha && data[p * channels + channels - 1] !== opaque) {
      throw new Error(`has transparent pixels (alpha ${data[p * channels + channels - 1]} at pixel ${p})`);
    }
    for (let c = 0; c < colour; c++) {
      const v = data[p * channels + c];
      out[p * colour + c] = depth === 16 ? Math.round(v / 257) : v;
    }
  }
  return { width, height, channels: colour as 1 | 3, data: out };
}

/** Encodes 8-bit interleaved grey (1), grey+alpha (2), RGB (3) or RGBA (4) pixels as a PNG. */
export function encodePng(
  width: number,
  height: number,
  channels: 1 | 2 | 3 | 4,
  data: Uint8Array,
): Uint8Array {
  return encodePngRaw({ width, height, data, channels, depth: 8 });
}
