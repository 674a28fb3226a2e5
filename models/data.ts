/**
 * @file Training data: datasets of 8-bit images served as tensors in [−1, 1], NCHW (a byte u becomes
 * u/127.5 − 1, as in NVlabs/edm), and a seeded, resumable, shuffling batch iterator.
 *
 * Three sources:
 * - `ProceduralShapes`, the embedded default: colour images generated on the fly from (seed, index); the label
 *   is the kind of the largest shape (disc, rectangle, triangle, ring, stripes). Three scene styles:
 *   - "flat" (the default): one large light-grey shape (radius 30–38% of the side, centred within the middle
 *     sixth; rings 2.4–4 pixels thick and stripes of at least 4 pixels at 16×16, light and dark) on a plain
 *     dark-grey background: two grey levels, the simplest scene a network can get the five shapes from. Even so,
 *     an unconditional 16×16 training drew single light blobs at 6 and 12 kimg; the default network, which is
 *     conditioned on the label, draws discs and rings by 12 kimg (README, "The embedded data", the
 *     training-length table).
 *   - "bold": one large plain shape (radius 27–36% of the side, centred within the middle third, a colour far
 *     from the background's, rings 2–3 pixels thick and stripes of at least 3 pixels at 16×16) on a smooth
 *     gradient between two nearby colours. The default training drew multicoloured blobs on these.
 *   - "busy" (the original data, bytes unchanged): structure at every scale — a two-colour gradient with
 *     low-frequency colour noise, two to five antialiased shapes with random colours, positions, sizes,
 *     shading, highlights and translucency, fine checker/hatch textures on some, and a faint per-pixel grain.
 *     Measured on 200 images at 32×32: pixel standard deviation 0.49, neighbour correlation 0.94 at 1 pixel,
 *     0.78 at 4 and 0.44 at 16; about 0.3 ms per image after warm-up.
 *   Geometry lives in [0, 1]², so one (seed, index) is the same scene at 16×16 and 32×32 (only pixel-scale
 *   textures, stripe periods below 3 pixels and grain differ). Only +, −, ×, ÷, √, floor and integer hashing
 *   are used (no sin/exp, whose last bit may differ between JavaScript engines), so the bytes are identical on
 *   every machine. `renderProcedural(…, { shapes: false })` paints a scene's background alone (the "no shapes"
 *   control of eval/controls.ts).
 * - `loadCifar10`: the CIFAR-10 binary version (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`:
 *   records of 1 label byte + 1024 R, 1024 G, 1024 B bytes, row-major 32×32).
 * - `loadImageFolder`: every `.png` under a folder (sorted by path), all one size and channel count, with
 *   optional labels from NVlabs' `dataset.json` (`{"labels": [["00000/img00000000.png", 6], …]}`).
 *
 * - `loadFashionMnist`: Fashion-MNIST's idx files (models/idx.ts), grey 28×28 clothing in 10 classes, served
 *   at 28×28 or zero-padded (with the background's 0) to 32×32 like EDM's MNIST-style data.
 *
 * Bad files are reported with the file's name and what is wrong with it.
 */

import { z } from "zod";
import { Device, type Tensor, tensor } from "../engine/mod.ts";
import { parseConfig } from "../util/config.ts";
import { decodePng, pngSize } from "./images.ts";
import { hash2, Rng } from "../util/random.ts";
import {
  FASHION_MNIST_CLASSES,
  FASHION_MNIST_SIZE,
  type FashionMnistSplit,
  readFashionMnist,
} from "./idx.ts";

// ---------------------------------------------------------------------------------------------------------------
// The dataset interface.

/** One example: the image C×H×W in [−1, 1] and its class, if the dataset has labels. */
export interface Example {
  image: Float32Array;
  label?: number;
}

/** A finite, random-access set of same-sized 8-bit images. */
export interface Dataset {
  readonly name: string;
  readonly length: number;
  readonly channels: number;
  readonly height: number;
  readonly width: number;
  /** The number of classes; 0 when the dataset has no labels. */
  readonly numClasses: number;
  /** Image i in [−1, 1], planar C×H×W, with its label. */
  get(i: number): Example;
  /** Image i as bytes, planar C×H×W. */
  bytes(i: number): Uint8Array;
  /** The class of image i (undefined without labels). */
  label(i: number): number | undefined;
}

/** The shared part: range checks and the byte → [−1, 1] mapping. */
abstract class ByteDataset implements Dataset {
  abstract readonly name: string;
  abstract readonly length: number;
  abstract readonly channels: number;
  abstract readonly height: number;
  abstract readonly width: number;
  abstract readonly numClasses: number;
  protected abstract read(i: number): Uint8Array;
  protected abstract labelOf(i: number): number | undefined;

  protected check(i: number) {
    if (!Number.isInteger(i) || i < 0 || i >= this.length) {
      throw new Error(`${this.name}: index ${i} is out of range [0, ${this.length})`);
    }
  }
  bytes(i: number): Uint8Array {
    this.check(i);
    return this.read(i);
  }
  label(i: number): number | undefined {
    this.check(i);
    return this.labelOf(i);
  }
  get(i: number): Example {
    const b = this.bytes(i), image = new Float32Array(b.length);
    for (let j = 0; j < b.length; j++) image[j] = b[j] / 127.5 - 1;
    const label = this.labelOf(i);
    return label === undefined ? { image } : { image, label };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The procedural dataset.

/** The procedural scene styles (see the file comment); "flat" is the default. */
export const PROCEDURAL_SCENES = ["flat", "bold", "busy"] as const;
export type ProceduralScene = typeof PROCEDURAL_SCENES[number];

/** The image sides the procedural shapes are drawn at, in pixels. */
export const PROCEDURAL_RESOLUTIONS = { min: 8, max: 256 } as const;

/** Options of `ProceduralShapes`. */
export const ProceduralConfig = z.object({
  // Side of the square images in pixels (16 and 32 are the intended sizes).
  resolution: z.number().int().min(PROCEDURAL_RESOLUTIONS.min).max(PROCEDURAL_RESOLUTIONS.max).default(32),
  // Seed of the whole set: image i is a function of (seed, i) only.
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // Number of images (they are generated on demand, so this costs no memory).
  length: z.number().int().positive().default(50000),
  // Scene style: "flat" (one light shape on dark grey), "bold" (one coloured shape on a smooth gradient) or
  // "busy" (the original cluttered scenes).
  scene: z.enum(PROCEDURAL_SCENES).default("flat"),
}).strict();
export type ProceduralOptions = z.input<typeof ProceduralConfig>;

/** Names of the procedural classes (the kind of the largest shape). */
export const PROCEDURAL_CLASSES = ["disc", "rectangle", "triangle", "ring", "stripes"] as const;

type RGB = [number, number, number];

/** The two colours of the "flat" scenes: a light shape (light and dark stripes) on a dark background. */
const FLAT_PALETTE: readonly RGB[] = [[0.15, 0.15, 0.15], [0.85, 0.85, 0.85]];

interface ShapeSpec {
  kind: number;
  cx: number;
  cy: number;
  /** Signed distance in [0, 1]² units, negative inside. */
  sd: (u: number, v: number) => number;
  colour: RGB;
  /** Colour change per unit of distance along `shadeDir` (lighting gradient across the shape). */
  shade: number;
  shadeDir: [number, number];
  alpha: number;
  /** Sphere-like highlight: centre and radius, or none. */
  highlight: [number, number, number] | null;
  /** Second colour and stripe direction/period for striped fills. */
  stripes: { colour: RGB; dir: [number, number]; period: number } | null;
  /** Fine texture: checker or hatch of this period and amplitude. */
  texture: { kind: "checker" | "hatch"; period: number; amp: number; dir: [number, number] } | null;
}

const clamp01 = (x: number) => (x < 0 ? 0 : x > 1 ? 1 : x);
const smooth = (t: number) => t * t * (3 - 2 * t);
/** Triangle wave in [0, 1] with period 1: 0 at integers, 1 at half-integers. */
const tri = (t: number) => {
  const f = t - Math.floor(t);
  return f < 0.5 ? 2 * f : 2 - 2 * f;
};

/** A uniform random colour; with `avoid`, redrawn (up to `tries` times) until its L1 distance is ≥ `contrast`. */
function randomColour(rng: Rng, avoid?: RGB, contrast = 0.6, tries = 8): RGB {
  let c: RGB = [rng.next(), rng.next(), rng.next()];
  for (let k = 0; k < tries && avoid; k++) {
    if (Math.abs(c[0] - avoid[0]) + Math.abs(c[1] - avoid[1]) + Math.abs(c[2] - avoid[2]) >= contrast) break;
    c = [rng.next(), rng.next(), rng.next()];
  }
  return c;
}

/** How `makeShape` draws a shape in one scene style. */
interface ShapeStyle {
  /** Range of the centre's coordinates. */
  centre: [number, number];
  /** Least L1 colour distance from the background at the centre (and between stripe colours). */
  contrast: number;
  /** Ring half-thickness and stripe period ranges, relative to the radius / in [0, 1]² units. */
  ringHalf: [number, number];
  stripePeriod: [number, number];
  /** Largest lighting gradient. */
  shade: number;
  /** Fine textures, highlights and translucency ("busy" only). */
  ornaments: boolean;
  /** Colours drawn from this palette (never the background's or, for stripes, the fill's) instead of uniformly. */
  palette?: readonly RGB[];
}

const BUSY_SHAPE: ShapeStyle = {
  centre: [0.12, 0.88],
  contrast: 0.6,
  ringHalf: [0.12, 0.25],
  stripePeriod: [0.07, 0.15],
  shade: 0.9,
  ornaments: true,
};
// Large, centred, high-contrast and plain: a ring is 2–3 pixels thick and a stripe period at least 3 pixels at
// 16×16, so a small network can draw every class at the default resolution.
const BOLD_SHAPE: ShapeStyle = {
  centre: [0.34, 0.66],
  contrast: 1.0,
  ringHalf: [0.2, 0.3],
  stripePeriod: [0.17, 0.24],
  shade: 0.35,
  ornaments: false,
};

// One large flat shape in the middle: a ring is 2.4–4 pixels thick and a stripe period at least 4 pixels at 16×16.
const FLAT_SHAPE: ShapeStyle = {
  centre: [0.42, 0.58],
  contrast: 1.0,
  ringHalf: [0.25, 0.33],
  stripePeriod: [0.25, 0.3],
  shade: 0,
  ornaments: false,
  palette: FLAT_PALETTE,
};

/** A palette colour other than `avoid` (compared exactly: `avoid` is a palette colour too). */
function paletteColour(rng: Rng, palette: readonly RGB[], avoid: RGB): RGB {
  const others = palette.filter((c) => c[0] !== avoid[0] || c[1] !== avoid[1] || c[2] !== avoid[2]);
  return others[rng.int(others.length)];
}

function makeShape(
  rng: Rng,
  kind: number,
  r: number,
  R: number,
  bgAt: (u: number, v: number) => RGB,
  style: ShapeStyle,
): ShapeSpec {
  const cx = rng.range(...style.centre), cy = rng.range(...style.centre);
  const tries = style.ornaments ? 8 : 32;
  const colour = style.palette
    ? paletteColour(rng, style.palette, bgAt(cx, cy))
    : randomColour(rng, bgAt(cx, cy), style.contrast, tries);
  let sd: (u: number, v: number) => number;
  let stripes: ShapeSpec["stripes"] = null;
  const boxSd = (hw: number, hh: number, a: number, b: number) => (u: number, v: number) => {
    const dx = u - cx, dy = v - cy;
    const ex = Math.abs(dx * a + dy * b) - hw, ey = Math.abs(-dx * b + dy * a) - hh;
    const ox = ex > 0 ? ex : 0, oy = ey > 0 ? ey : 0;
    return Math.sqrt(ox * ox + oy * oy) + Math.min(Math.max(ex, ey), 0);
  };
  const discSd = (rad: number) => (u: number, v: number) => {
    const dx = u - cx, dy = v - cy;
    return Math.sqrt(dx * dx + dy * dy) - rad;
  };
  if (kind === 0) sd = discSd(r);
  else if (kind === 1) {
    const [a, b] = rng.direction();
    sd = boxSd(r * rng.range(0.55, 1.05), r * rng.range(0.4, 0.95), a, b);
  } else if (kind === 2) {
    // Three vertices roughly 120° apart (rotation by the exact cos/sin of 120°), jittered, made counter-clockwise.
    const [a, b] = rng.direction(), s3 = Math.sqrt(3) / 2;
    const dirs: [number, number][] = [[a, b], [-0.5 * a - s3 * b, s3 * a - 0.5 * b], [
      -0.5 * a + s3 * b,
      -s3 * a - 0.5 * b,
    ]];
    const vs = dirs.map(([x, y]) => {
      const rr = r * rng.range(0.75, 1.2);
      return [cx + x * rr + rng.range(-0.15, 0.15) * r, cy + y * rr + rng.range(-0.15, 0.15) * r];
    });
    const area = (vs[1][0] - vs[0][0]) * (vs[2][1] - vs[0][1]) -
      (vs[2][0] - vs[0][0]) * (vs[1][1] - vs[0][1]);
    if (area < 0) [vs[1], vs[2]] = [vs[2], vs[1]];
    const edges = [0, 1, 2].map((k) => {
      const [x0, y0] = vs[k], [x1, y1] = vs[(k + 1) % 3];
      const ex = x1 - x0, ey = y1 - y0, len = Math.sqrt(ex * ex + ey * ey);
      return [x0, y0, ey / len, -ex / len]; // outward normal of a counter-clockwise edge
    });
    sd = (u, v) => {
      let m = -Infinity;
      for (const [x0, y0, nx, ny] of edges) m = Math.max(m, (u - x0) * nx + (v - y0) * ny);
      return m;
    };
  } else if (kind === 3) {
    const half = r * rng.range(...style.ringHalf), disc = discSd(r * rng.range(0.7, 0.9));
    sd = (u, v) => Math.abs(disc(u, v)) - half;
  } else {
    const [a, b] = rng.direction();
    sd = rng.next() < 0.5 ? discSd(r) : boxSd(r * rng.range(0.6, 1.0), r * rng.range(0.5, 0.9), a, b);
    // At least 3 pixels per stripe period, so that 16×16 renderings do not alias.
    const period = Math.max(rng.range(...style.stripePeriod), 3 / R);
    const second = style.palette
      ? paletteColour(rng, style.palette, colour)
      : randomColour(rng, colour, style.contrast, tries);
    stripes = { colour: second, dir: rng.direction(), period };
  }
  if (!style.ornaments) {
    const [shade, shadeDir] = [rng.range(-style.shade, style.shade), rng.direction()];
    return { kind, cx, cy, sd, colour, shade, shadeDir, alpha: 1, highlight: null, stripes, texture: null };
  }
  const texture: ShapeSpec["texture"] = rng.next() < 0.3
    ? {
      kind: rng.next() < 0.5 ? "checker" : "hatch",
      // Fine texture is pixel-scale: 2–3.5 pixels per checker cell or hatch period at any resolution.
      period: rng.range(2, 3.5) / R,
      amp: rng.range(0.05, 0.12),
      dir: rng.direction(),
    }
    : null;
  const highlight: ShapeSpec["highlight"] = (kind === 0 || kind === 3) && rng.next() < 0.5
    ? [cx + rng.range(-0.4, 0.4) * r, cy + rng.range(-0.4, 0.4) * r, r * rng.range(0.35, 0.6)]
    : null;
  return {
    kind,
    cx,
    cy,
    sd,
    colour,
    shade: rng.range(-style.shade, style.shade),
    shadeDir: rng.direction(),
    alpha: rng.next() < 0.2 ? rng.range(0.55, 0.85) : 1,
    highlight,
    stripes,
    texture,
  };
}

/** What the pixel loop draws: a background, shapes in painting order, and per-pixel grain (0: none). */
interface Scene {
  background: (u: number, v: number, out: RGB) => void;
  shapes: ShapeSpec[];
  label: number;
  grain: number;
}

/** Options of `renderProcedural`. */
export interface RenderOptions {
  /** Scene style (default "flat"). */
  scene?: ProceduralScene;
  /** Draw the shapes (default true); false paints the same scene's background alone (FID's "no shapes" control). */
  shapes?: boolean;
}

/**
 * Renders scene `index` of `seed` at `R`×`R` into planar RGB bytes; returns the label. Exported for tests and
 * tools; `ProceduralShapes` is the dataset.
 */
export function renderProcedural(
  seed: number,
  index: number,
  R: number,
  opts: RenderOptions = {},
): { bytes: Uint8Array; label: number } {
  const rng = new Rng(hash2(seed >>> 0, index >>> 0));
  const style = opts.scene ?? "flat";
  const scene = style === "busy"
    ? busyScene(rng, R)
    : style === "bold"
    ? boldScene(rng, R)
    : flatScene(rng, R);
  const shapes = opts.shapes === false ? [] : scene.shapes;
  return { bytes: paint(R, scene.background, shapes, scene.grain, rng), label: scene.label };
}

/**
 * The "flat" scene: one large light shape (its kind is the label; stripes alternate light and dark) on a plain
 * dark background; no shading, no grain. Two grey levels, so that a small network spends its first thousands
 * of images on geometry rather than on colour (see the README's training-length table).
 */
function flatScene(rng: Rng, R: number): Scene {
  const bg = FLAT_PALETTE[0];
  const background = (_u: number, _v: number, out: RGB) => {
    out[0] = bg[0], out[1] = bg[1], out[2] = bg[2];
  };
  const label = rng.int(PROCEDURAL_CLASSES.length);
  const shape = makeShape(rng, label, rng.range(0.3, 0.38), R, () => bg, FLAT_SHAPE);
  return { background, shapes: [shape], label, grain: 0 };
}

/**
 * The "bold" scene: one large plain shape (its kind is the label) with a high-contrast colour, on a smooth
 * gradient between two nearby colours; no grain.
 */
function boldScene(rng: Rng, R: number): Scene {
  const c0 = randomColour(rng), c1 = c0.map((c) => clamp01(c + rng.range(-0.2, 0.2))) as RGB;
  const [gx, gy] = rng.direction(), gk = rng.range(0.4, 1.2);
  const background = (u: number, v: number, out: RGB) => {
    const g = clamp01(0.5 + ((u - 0.5) * gx + (v - 0.5) * gy) * gk);
    for (let c = 0; c < 3; c++) out[c] = c0[c] + (c1[c] - c0[c]) * g;
  };
  const bgAt = (u: number, v: number): RGB => {
    const o: RGB = [0, 0, 0];
    background(u, v, o);
    return o;
  };
  const label = rng.int(PROCEDURAL_CLASSES.length);
  const shape = makeShape(rng, label, rng.range(0.27, 0.36), R, bgAt, BOLD_SHAPE);
  return { background, shapes: [shape], label, grain: 0 };
}

/**
 * The "busy" scene (the original data): a two-colour gradient with low-frequency colour noise, one large and one
 * to four small shapes with textures, highlights and translucency, and grain.
 */
function busyScene(rng: Rng, R: number): Scene {
  // Background: a linear two-colour gradient plus smooth colour noise on a 5×5 lattice.
  const c0 = randomColour(rng), c1 = randomColour(rng, c0);
  const [gx, gy] = rng.direction(), gk = rng.range(0.6, 1.6);
  const G = 4, lattice = new Float64Array((G + 1) * (G + 1) * 3);
  const noiseAmp = rng.range(0.04, 0.16);
  for (let k = 0; k < (G + 1) * (G + 1); k++) {
    const lum = rng.range(-1, 1);
    for (let c = 0; c < 3; c++) lattice[k * 3 + c] = noiseAmp * (0.7 * lum + 0.3 * rng.range(-1, 1));
  }
  const background = (u: number, v: number, out: RGB) => {
    const g = clamp01(0.5 + ((u - 0.5) * gx + (v - 0.5) * gy) * gk);
    const fu = u * G, fv = v * G;
    const iu = Math.min(G - 1, Math.floor(fu)), iv = Math.min(G - 1, Math.floor(fv));
    const su = smooth(fu - iu), sv = smooth(fv - iv);
    for (let c = 0; c < 3; c++) {
      const at = (i: number, j: number) => lattice[(j * (G + 1) + i) * 3 + c];
      const n = (1 - sv) * ((1 - su) * at(iu, iv) + su * at(iu + 1, iv)) +
        sv * ((1 - su) * at(iu, iv + 1) + su * at(iu + 1, iv + 1));
      out[c] = c0[c] + (c1[c] - c0[c]) * g + n;
    }
  };
  const bgAt = (u: number, v: number): RGB => {
    const o: RGB = [0, 0, 0];
    background(u, v, o);
    return o;
  };
  // Shapes: one large "main" shape (its kind is the label) and one to four small ones.
  const label = rng.int(PROCEDURAL_CLASSES.length);
  const main = makeShape(rng, label, rng.range(0.2, 0.32), R, bgAt, BUSY_SHAPE);
  const small: ShapeSpec[] = [];
  const nSmall = 1 + rng.int(4);
  for (let k = 0; k < nSmall; k++) {
    small.push(makeShape(rng, rng.int(5), rng.range(0.05, 0.15), R, bgAt, BUSY_SHAPE));
  }
  const shapes = rng.next() < 0.5 ? [...small, main] : [main, ...small];
  return { background, shapes, label, grain: rng.range(0.01, 0.03) };
}

/** Paints a scene into planar RGB bytes: antialiased shapes over the background, then grain. */
function paint(
  R: number,
  background: Scene["background"],
  shapes: readonly ShapeSpec[],
  grain: number,
  rng: Rng,
): Uint8Array {
  const bytes = new Uint8Array(3 * R * R), px: RGB = [0, 0, 0], col: RGB = [0, 0, 0];
  for (let y = 0; y < R; y++) {
    for (let x = 0; x < R; x++) {
      const u = (x + 0.5) / R, v = (y + 0.5) / R;
      background(u, v, px);
      for (const s of shapes) {
        // Coverage of the pixel: a one-pixel-wide linear ramp across the edge (antialiasing).
        const cov = clamp01(0.5 - s.sd(u, v) * R) * s.alpha;
        if (cov <= 0) continue;
        const du = u - s.cx, dv = v - s.cy;
        const light = s.shade * (du * s.shadeDir[0] + dv * s.shadeDir[1]);
        let stripeMix = 0;
        if (s.stripes) {
          const p = s.stripes.period, t = (u * s.stripes.dir[0] + v * s.stripes.dir[1]) / p;
          stripeMix = clamp01(0.5 + (tri(t) - 0.5) * 0.5 * p * R);
        }
        let tex = 0;
        if (s.texture) {
          const q = s.texture.period;
          tex = s.texture.kind === "checker"
            ? ((Math.floor(u / q) + Math.floor(v / q)) & 1 ? s.texture.amp : -s.texture.amp)
            : (tri((u * s.texture.dir[0] + v * s.texture.dir[1]) / q) - 0.5) * 2 * s.texture.amp;
        }
        let spec = 0;
        if (s.highlight) {
          const hx = u - s.highlight[0], hy = v - s.highlight[1];
          const h = clamp01(1 - Math.sqrt(hx * hx + hy * hy) / s.highlight[2]);
          spec = 0.6 * h * h;
        }
        for (let c = 0; c < 3; c++) {
          const base = s.stripes
            ? s.colour[c] + (s.stripes.colour[c] - s.colour[c]) * stripeMix
            : s.colour[c];
          col[c] = base + light + tex + spec;
          px[c] += (col[c] - px[c]) * cov;
        }
      }
      const n = grain > 0 ? rng.range(-grain, grain) : 0;
      for (let c = 0; c < 3; c++) bytes[(c * R + y) * R + x] = Math.round(clamp01(px[c] + n) * 255);
    }
  }
  return bytes;
}

/** The embedded default dataset: procedurally generated scenes of shapes (see the file comment). */
export class ProceduralShapes extends ByteDataset {
  readonly name: string;
  readonly length: number;
  readonly channels = 3;
  readonly height: number;
  readonly width: number;
  readonly numClasses = PROCEDURAL_CLASSES.length;
  readonly seed: number;
  readonly scene: ProceduralScene;
  #cache: { i: number; bytes: Uint8Array; label: number } | null = null;

  constructor(opts: ProceduralOptions = {}) {
    super();
    const o = parseConfig(ProceduralConfig, opts, "ProceduralShapes");
    this.length = o.length;
    this.height = this.width = o.resolution;
    this.seed = o.seed;
    this.scene = o.scene;
    // The busy scenes keep the name they had before the bold (and then the flat) ones became the default.
    this.name = o.scene === "busy"
      ? `procedural-shapes-${o.resolution}x${o.resolution}-seed${o.seed}`
      : `procedural-${o.scene}-${o.resolution}x${o.resolution}-seed${o.seed}`;
  }
  #render(i: number) {
    if (this.#cache?.i !== i) {
      this.#cache = { i, ...renderProcedural(this.seed, i, this.height, { scene: this.scene }) };
    }
    return this.#cache;
  }
  protected read(i: number): Uint8Array {
    return this.#render(i).bytes.slice();
  }
  protected labelOf(i: number): number {
    return this.#render(i).label;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// CIFAR-10 (binary version).

/** The CIFAR-10 class names, by label. */
export const CIFAR10_CLASSES = [
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
] as const;

const CIFAR_RECORD = 1 + 3 * 32 * 32;

/** CIFAR-10 records held in memory: 1 label byte then R, G, B planes of 32×32 bytes each. */
export class Cifar10Dataset extends ByteDataset {
  readonly name: string;
  readonly length: number;
  readonly channels = 3;
  readonly height = 32;
  readonly width = 32;
  readonly numClasses = 10;
  constructor(readonly records: Uint8Array, readonly files: string[]) {
    super();
    this.length = records.length / CIFAR_RECORD;
    this.name = `cifar10(${files.length} file${files.length === 1 ? "" : "s"}, ${this.length} images)`;
  }
  protected read(i: number): Uint8Array {
    return this.records.slice(i * CIFAR_RECORD + 1, (i + 1) * CIFAR_RECORD);
  }
  protected labelOf(i: number): number {
    return this.records[i * CIFAR_RECORD];
  }
}

async function isDirectory(path: string, who: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new Error(`${who}: ${path} does not exist`);
    throw new Error(`${who}: cannot read ${path}: ${(e as Error).message}`);
  }
}

const join = (dir: string, name: string) => (dir.endsWith("/") ? dir + name : `${dir}/${name}`);

/**
 * Reads CIFAR-10's binary files: `path` is one `.bin` file, or a folder holding `data_batch_*.bin` (split
 * "train") / `test_batch.bin` (split "test"), directly or in its `cifar-10-batches-bin` subfolder.
 */
export async function loadCifar10(path: string, split: "train" | "test" = "train"): Promise<Cifar10Dataset> {
  const who = "CIFAR-10";
  let files: string[];
  if (await isDirectory(path, who)) {
    let dir = path;
    const sub = join(path, "cifar-10-batches-bin");
    if (await Deno.stat(sub).then((s) => s.isDirectory, () => false)) dir = sub;
    const names: string[] = [];
    for await (const e of Deno.readDir(dir)) if (e.isFile) names.push(e.name);
    const pick = split === "train"
      ? names.filter((n) => /^data_batch_\d+\.bin$/.test(n)).sort((a, b) =>
        parseInt(a.slice(11)) - parseInt(b.slice(11))
      )
      : names.filter((n) => n === "test_batch.bin");
    if (!pick.length) {
      throw new Error(
        `${who}: no ${split === "train" ? "data_batch_*.bin" : "test_batch.bin"} in ${dir} ` +
          "(expected the binary version: data_batch_1.bin … data_batch_5.bin and test_batch.bin)",
      );
    }
    files = pick.map((n) => join(dir, n));
  } else files = [path];
  const parts: Uint8Array[] = [];
  for (const f of files) {
    const b = await Deno.readFile(f);
    if (b.length === 0) throw new Error(`${who}: ${f} is empty`);
    if (b.length % CIFAR_RECORD !== 0) {
      const whole = Math.floor(b.length / CIFAR_RECORD), rest = b.length % CIFAR_RECORD;
      throw new Error(
        `${who}: ${f} has a truncated record: ${b.length} bytes are ${whole} whole records of ${CIFAR_RECORD} ` +
          `bytes (1 label + 3072 pixels) and ${rest} bytes of record ${whole + 1}`,
      );
    }
    for (let r = 0; r < b.length / CIFAR_RECORD; r++) {
      const l = b[r * CIFAR_RECORD];
      if (l > 9) throw new Error(`${who}: ${f} record ${r + 1} has label ${l}; CIFAR-10 labels are 0–9`);
    }
    parts.push(b);
  }
  const all = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return new Cifar10Dataset(all, files);
}

// ---------------------------------------------------------------------------------------------------------------
// Fashion-MNIST.

/** The sides Fashion-MNIST is served at: native, or padded by 2 background pixels on every side. */
export const FASHION_MNIST_RESOLUTIONS = [28, 32] as const;
/**
 * The default side: native 28×28. The UNet halves 28 → 14 → 7, so the default two-level network runs at 28
 * unchanged, and 28² is 0.77× the pixels of 32² (README, "Fashion-MNIST": the measured speeds and grids).
 */
export const FASHION_MNIST_DEFAULT_RESOLUTION = 28;

/** One Fashion-MNIST split in memory, grey (1 channel), 28×28 or padded to 32×32. */
export class FashionMnistDataset extends ByteDataset {
  readonly name: string;
  readonly length: number;
  readonly channels = 1;
  readonly height: number;
  readonly width: number;
  readonly numClasses = FASHION_MNIST_CLASSES.length;
  constructor(
    readonly images: Uint8Array,
    readonly labels: Uint8Array,
    readonly split: FashionMnistSplit,
    resolution: number,
    readonly files: string[],
  ) {
    super();
    this.length = labels.length;
    this.height = this.width = resolution;
    // The name keys cached reference statistics: it names the split and the size, not the folder.
    this.name = `fashion-mnist-${split}-${resolution}x${resolution}`;
  }
  protected read(i: number): Uint8Array {
    const S = FASHION_MNIST_SIZE, R = this.height, pad = (R - S) / 2;
    const src = this.images.subarray(i * S * S, (i + 1) * S * S);
    if (!pad) return src.slice();
    const out = new Uint8Array(R * R);
    for (let y = 0; y < S; y++) out.set(src.subarray(y * S, (y + 1) * S), (y + pad) * R + pad);
    return out;
  }
  protected labelOf(i: number): number {
    return this.labels[i];
  }
}

/** Reads a Fashion-MNIST split from `dir` (default Debian's folder) at `resolution` (28 or 32). */
export async function loadFashionMnist(
  opts: { path?: string; split?: FashionMnistSplit; resolution?: number } = {},
): Promise<FashionMnistDataset> {
  const split = opts.split ?? "train", resolution = opts.resolution ?? FASHION_MNIST_DEFAULT_RESOLUTION;
  if (!(FASHION_MNIST_RESOLUTIONS as readonly number[]).includes(resolution)) {
    throw new Error(`Fashion-MNIST: resolution ${resolution} is not 28 (native) or 32 (padded)`);
  }
  const f = await readFashionMnist(split, opts.path);
  return new FashionMnistDataset(f.images, f.labels, split, resolution, [f.imagesFile, f.labelsFile]);
}

// ---------------------------------------------------------------------------------------------------------------
// A folder of PNG images.

/** Decoded PNGs held in memory as planar bytes. */
export class ImageFolderDataset extends ByteDataset {
  readonly name: string;
  readonly length: number;
  readonly numClasses: number;
  constructor(
    readonly dir: string,
    readonly files: string[],
    readonly channels: number,
    readonly height: number,
    readonly width: number,
    readonly pixels: Uint8Array,
    readonly labels: Int32Array | null,
  ) {
    super();
    this.length = files.length;
    this.numClasses = labels ? Math.max(...labels) + 1 : 0;
    this.name = `images(${dir}, ${files.length} × ${channels}×${height}×${width})`;
  }
  protected read(i: number): Uint8Array {
    const n = this.channels * this.height * this.width;
    return this.pixels.slice(i * n, (i + 1) * n);
  }
  protected labelOf(i: number): number | undefined {
    return this.labels ? this.labels[i] : undefined;
  }
}

async function walkPngs(dir: string, rel = ""): Promise<string[]> {
  const out: string[] = [];
  for await (const e of Deno.readDir(rel ? join(dir, rel) : dir)) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory) out.push(...await walkPngs(dir, r));
    else if (e.isFile && /\.png$/i.test(e.name)) out.push(r);
  }
  return out;
}

/**
 * Reads every `.png` under `dir` (recursively, sorted by relative path). All must have the same size and
 * channel count (grey or RGB; an opaque alpha channel is dropped). Labels come from `dataset.json` if present.
 */
export async function loadImageFolder(dir: string): Promise<ImageFolderDataset> {
  const who = "image folder";
  if (!(await isDirectory(dir, who))) throw new Error(`${who}: ${dir} is not a folder`);
  const files = (await walkPngs(dir)).sort();
  if (!files.length) throw new Error(`${who}: ${dir} is empty: it contains no .png images`);
  let first: { file: string; w: number; h: number; c: number } | null = null;
  let pixels = new Uint8Array(0);
  for (let i = 0; i < files.length; i++) {
    const f = join(dir, files[i]);
    let img;
    try {
      const bytes = await Deno.readFile(f);
      // The header's size is compared before decoding: a small file may declare a huge image.
      const size = pngSize(bytes);
      if (first && (size.width !== first.w || size.height !== first.h)) {
        throw new Error(
          `${who}: ${f} is ${size.width}×${size.height}, but ${first.file} is ${first.w}×${first.h}: ` +
            "all images must have one size",
        );
      }
      img = decodePng(bytes);
    } catch (e) {
      const msg = (e as Error).message;
      throw new Error(msg.startsWith(`${who}: `) ? msg : `${who}: ${f}: ${msg}`);
    }
    if (!first) {
      first = { file: f, w: img.width, h: img.height, c: img.channels };
      pixels = new Uint8Array(files.length * img.channels * img.width * img.height);
    } else if (img.channels !== first.c) {
      const kind = (c: number) => (c === 1 ? "grey (1 channel)" : "RGB (3 channels)");
      throw new Error(`${who}: ${f} is ${kind(img.channels)}, but ${first.file} is ${kind(first.c)}`);
    }
    // Interleaved HWC → planar CHW.
    const { c, w, h } = first, base = i * c * w * h;
    for (let p = 0; p < w * h; p++) {
      for (let k = 0; k < c; k++) pixels[base + k * w * h + p] = img.data[p * c + k];
    }
  }
  const labels = await readLabels(dir, files, who);
  return new ImageFolderDataset(dir, files, first!.c, first!.h, first!.w, pixels, labels);
}

/** Labels from NVlabs' dataset.json ({"labels": [[relative path, class], …]} or {"labels": null}). */
async function readLabels(dir: string, files: string[], who: string): Promise<Int32Array | null> {
  const path = join(dir, "dataset.json");
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw new Error(`${who}: cannot read ${path}: ${(e as Error).message}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new Error(`${who}: ${path} is not valid JSON (${(e as Error).message})`);
  }
  const parsed = z.object({
    labels: z.array(z.tuple([z.string(), z.number().int().nonnegative()])).nullable(),
  }).safeParse(json);
  if (!parsed.success) {
    throw new Error(`${who}: ${path} must be {"labels": [["file.png", class], …]} or {"labels": null}`);
  }
  if (!parsed.data.labels) return null;
  const map = new Map(parsed.data.labels.map(([f, l]) => [f.replace(/\\/g, "/"), l]));
  return Int32Array.from(files, (f) => {
    const l = map.get(f);
    if (l === undefined) throw new Error(`${who}: ${path} has no label for ${f}`);
    return l;
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Choosing a source by configuration.

/** Which dataset to use. */
export const DataConfig = z.discriminatedUnion("kind", [
  z.object({
    // The embedded procedural shapes (no download).
    kind: z.literal("procedural"),
    // Image side in pixels.
    resolution: z.number().int().min(PROCEDURAL_RESOLUTIONS.min).max(PROCEDURAL_RESOLUTIONS.max).default(32),
    // Seed of the set.
    seed: z.number().int().min(0).max(0xffffffff).default(0),
    // Number of images.
    length: z.number().int().positive().default(50000),
    // Scene style: "flat" (one light shape on dark grey; the default), "bold" (one coloured shape on a smooth
    // gradient) or "busy" (the original cluttered scenes).
    scene: z.enum(PROCEDURAL_SCENES).default("flat"),
  }).strict(),
  z.object({
    // CIFAR-10's binary files.
    kind: z.literal("cifar10"),
    // A data_batch_*.bin / test_batch.bin file or the folder holding them.
    path: z.string().min(1),
    // "train" (data_batch_1…5) or "test" (test_batch).
    split: z.enum(["train", "test"]).default("train"),
  }).strict(),
  z.object({
    // A folder of same-sized PNG images.
    kind: z.literal("png"),
    // The folder (searched recursively; dataset.json supplies labels).
    path: z.string().min(1),
  }).strict(),
  z.object({
    // Fashion-MNIST's idx files (gzipped or not).
    kind: z.literal("fashion-mnist"),
    // The folder holding them (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist).
    path: z.string().min(1).optional(),
    // "train" (60,000 images) or "test" (t10k, 10,000).
    split: z.enum(["train", "test"]).default("train"),
    // Image side: 28 (native) or 32 (padded with 2 background pixels per side).
    resolution: z.union([z.literal(28), z.literal(32)]).default(FASHION_MNIST_DEFAULT_RESOLUTION),
  }).strict(),
]);
export type DataOptions = z.input<typeof DataConfig>;

/** Opens the dataset a configuration names (default: the procedural shapes at 32×32). */
export async function openDataset(opts: DataOptions = { kind: "procedural" }): Promise<Dataset> {
  const o = parseConfig(DataConfig, opts, "dataset");
  if (o.kind === "procedural") {
    return new ProceduralShapes({ resolution: o.resolution, seed: o.seed, length: o.length, scene: o.scene });
  }
  if (o.kind === "cifar10") return await loadCifar10(o.path, o.split);
  if (o.kind === "fashion-mnist") {
    return await loadFashionMnist({ path: o.path, split: o.split, resolution: o.resolution });
  }
  return await loadImageFolder(o.path);
}

// ---------------------------------------------------------------------------------------------------------------
// Batches.

/** Options of `BatchIterator`. */
export const BatchConfig = z.object({
  // Images per batch.
  batchSize: z.number().int().positive(),
  // Seed of the shuffling: epoch e visits the images in a permutation drawn from (seed, e).
  seed: z.number().int().min(0).max(0xffffffff).default(0),
  // Visit the images in a new random order each epoch (false: in index order).
  shuffle: z.boolean().default(true),
  // Images already consumed (to resume a run exactly where it stopped).
  position: z.number().int().nonnegative().default(0),
  // Device of the batch tensors (default: the default device).
  device: z.custom<Device>((v) => v instanceof Device, { message: "must be a Device" }).optional(),
}).strict();
export type BatchOptions = z.input<typeof BatchConfig>;

/** A batch on the host. */
export interface HostBatch {
  /** [B, C, H, W] values in [−1, 1]. */
  images: Float32Array;
  shape: [number, number, number, number];
  /** Class of each image (absent without labels). */
  labels?: Int32Array;
  /** Dataset index of each image. */
  indices: Int32Array;
  /** The epoch of the batch's first image (0-based). */
  epoch: number;
}

/** A batch on the device; the tensors belong to the caller. */
export interface Batch {
  /** [B, C, H, W] in [−1, 1]. */
  images: Tensor;
  /** One-hot class labels [B, numClasses] (NVlabs' `class_labels`), absent without labels. */
  labels?: Tensor;
  labelIndices?: Int32Array;
  indices: Int32Array;
  epoch: number;
}

/**
 * An endless stream of batches: epoch after epoch, each a fresh seeded permutation of the dataset (a batch may
 * straddle two epochs, like NVlabs' InfiniteSampler). The stream is a function of (seed, position) only, so
 * `position` is all a checkpoint needs to resume it.
 */
export class BatchIterator implements Iterable<Batch> {
  readonly batchSize: number;
  readonly seed: number;
  readonly shuffle: boolean;
  readonly device?: Device;
  #position: number;
  #perm: { epoch: number; order: Int32Array } | null = null;

  constructor(readonly dataset: Dataset, opts: BatchOptions) {
    const o = parseConfig(BatchConfig, opts, "BatchIterator");
    if (dataset.length < 1) throw new Error(`BatchIterator: ${dataset.name} is empty`);
    this.batchSize = o.batchSize;
    this.seed = o.seed;
    this.shuffle = o.shuffle;
    this.device = o.device;
    this.#position = o.position;
  }

  /** Images consumed so far. */
  get position(): number {
    return this.#position;
  }
  /** The epoch the next image belongs to. */
  get epoch(): number {
    return Math.floor(this.#position / this.dataset.length);
  }

  /** The order in which epoch `e` visits the dataset. */
  order(epoch: number): Int32Array {
    if (this.#perm?.epoch !== epoch) {
      const n = this.dataset.length;
      const order = this.shuffle
        ? new Rng(hash2(this.seed, epoch)).permutation(n)
        : Int32Array.from({ length: n }, (_, i) => i);
      this.#perm = { epoch, order };
    }
    return this.#perm.order;
  }

  /** The next batch on the host. */
  nextHost(): HostBatch {
    const ds = this.dataset, B = this.batchSize, n = ds.length;
    const per = ds.channels * ds.height * ds.width;
    const images = new Float32Array(B * per), indices = new Int32Array(B);
    const labels = ds.numClasses ? new Int32Array(B) : undefined;
    const epoch = this.epoch;
    for (let b = 0; b < B; b++) {
      const p = this.#position++;
      const i = this.order(Math.floor(p / n))[p % n];
      indices[b] = i;
      const bytes = ds.bytes(i);
      for (let j = 0; j < per; j++) images[b * per + j] = bytes[j] / 127.5 - 1;
      if (labels) labels[b] = ds.label(i) ?? 0;
    }
    const shape: HostBatch["shape"] = [B, ds.channels, ds.height, ds.width];
    return labels ? { images, shape, labels, indices, epoch } : { images, shape, indices, epoch };
  }

  /** The next batch as tensors. */
  next(): Batch {
    const h = this.nextHost();
    const device = this.device;
    const images = tensor(h.images, h.shape, { device });
    if (!h.labels) return { images, indices: h.indices, epoch: h.epoch };
    const K = this.dataset.numClasses, oneHot = new Float32Array(h.labels.length * K);
    h.labels.forEach((l, b) => (oneHot[b * K + l] = 1));
    const labels = tensor(oneHot, [h.labels.length, K], { device });
    return { images, labels, labelIndices: h.labels, indices: h.indices, epoch: h.epoch };
  }

  *[Symbol.iterator](): Iterator<Batch> {
    for (;;) yield this.next();
  }
}
