/**
 * @file Elementwise kernels from a small expression language.
 *
 * An `Expr` is a tree over inputs (`x0..x6`), constants and the unary/binary operations in `UNARY` and
 * `BINARY`. Each operation is defined once, as WGSL text and as a JavaScript function, so the GPU kernel and its
 * CPU reference cannot drift apart. One dispatch evaluates a whole tree, which is how forward chains and every
 * backward rule (for example `g * (1 - y*y)` for tanh) run as a single kernel.
 *
 * Broadcasting is done with strides: each input carries one stride per output dimension, 0 where it is
 * broadcast. Dimensions are coalesced first, and inputs laid out like the output (or scalars) skip index math.
 * Constant values travel as uniforms, so `x * 0.5` and `x * 0.25` share one pipeline.
 */

import { type FloatArray, type GpuCaps, type GpuDispatch, type Kernel, ParamWriter } from "./types.ts";
import { cachedSource } from "./source_cache.ts";
import {
  coalesce,
  contiguousStrides,
  quadBlockStoreWgsl,
  quadBorderRowWgsl,
  type QuadLayout,
  quadPitch,
  toQuadBuffer,
} from "./layout.ts";
import { ENTRY_1D, grid1d, header, splitIndexWgsl } from "./wgsl.ts";

export type UnaryOp = keyof typeof UNARY;
export type BinaryOp = keyof typeof BINARY;

export type Expr =
  | { op: "in"; i: number }
  | { op: "const"; i: number }
  | { op: UnaryOp; a: Expr }
  | { op: BinaryOp; a: Expr; b: Expr }
  | { op: "where"; c: Expr; a: Expr; b: Expr };

/** erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the same formula on both sides. */
function erfJs(x: number): number {
  const s = x < 0 ? -1 : 1;
  const ax = Math.abs(x);
  const t = 1 / (1 + 0.3275911 * ax);
  const y = 1 -
    ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t *
      Math.exp(-ax * ax);
  return s * y;
}

/** PyTorch's pow: negative bases allowed for integer exponents, pow(x, 0) = 1. */
function powJs(a: number, b: number): number {
  return Math.pow(a, b);
}

const SQRT1_2 = Math.SQRT1_2;
const INV_SQRT_2PI = 1 / Math.sqrt(2 * Math.PI);

/** WGSL helpers, emitted only when an expression uses them. */
const PRELUDE: Record<string, string> = {
  erf: `fn erf_(x: f32) -> f32 {
  let ax = abs(x);
  let t = 1.0 / (1.0 + 0.3275911 * ax);
  let y = 1.0 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-ax * ax);
  return select(y, -y, x < 0.0);
}`,
  pow: `fn pow_(a: f32, b: f32) -> f32 {
  if (b == 0.0) { return 1.0; }
  if (a >= 0.0) { return pow(a, b); }
  if (b != round(b)) { return bitcast<f32>(0x7fc00000u); }
  let m = pow(-a, b);
  return select(m, -m, (i32(b) & 1) == 1);
}`,
  sigmoid: `fn sigmoid_(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }`,
  // tanh through exp overflows to inf/inf = NaN past |x| ~ 44 on some drivers; tanh(±15) is ±1 in f32 already.
  tanh: `fn tanh_(x: f32) -> f32 { return tanh(clamp(x, -15.0, 15.0)); }`,
};

interface UnaryDef {
  wgsl: (a: string) => string;
  js: (a: number) => number;
  needs?: string[];
}
interface BinaryDef {
  wgsl: (a: string, b: string) => string;
  js: (a: number, b: number) => number;
  needs?: string[];
}

const sigmoidJs = (x: number) => 1 / (1 + Math.exp(-x));

export const UNARY = {
  neg: { wgsl: (a) => `(-${a})`, js: (a) => -a },
  abs: { wgsl: (a) => `abs(${a})`, js: Math.abs },
  exp: { wgsl: (a) => `exp(${a})`, js: Math.exp },
  log: { wgsl: (a) => `log(${a})`, js: Math.log },
  sqrt: { wgsl: (a) => `sqrt(${a})`, js: Math.sqrt },
  rsqrt: { wgsl: (a) => `inverseSqrt(${a})`, js: (a) => 1 / Math.sqrt(a) },
  sin: { wgsl: (a) => `sin(${a})`, js: Math.sin },
  cos: { wgsl: (a) => `cos(${a})`, js: Math.cos },
  tanh: { wgsl: (a) => `tanh_(${a})`, js: Math.tanh, needs: ["tanh"] },
  sigmoid: { wgsl: (a) => `sigmoid_(${a})`, js: sigmoidJs, needs: ["sigmoid"] },
  silu: { wgsl: (a) => `(${a} * sigmoid_(${a}))`, js: (a) => a * sigmoidJs(a), needs: ["sigmoid"] },
  relu: { wgsl: (a) => `max(${a}, 0.0)`, js: (a) => (a > 0 ? a : 0) },
  /** Exact (erf) GELU, PyTorch's default. */
  gelu: {
    wgsl: (a) => `(0.5 * ${a} * (1.0 + erf_(${a} * ${SQRT1_2})))`,
    js: (a) => 0.5 * a * (1 + erfJs(a * SQRT1_2)),
    needs: ["erf"],
  },
  /** d/dx gelu(x) = Φ(x) + x φ(x). */
  geluGrad: {
    wgsl: (a) => `(0.5 * (1.0 + erf_(${a} * ${SQRT1_2})) + ${a} * ${INV_SQRT_2PI} * exp(-0.5 * ${a} * ${a}))`,
    js: (a) => 0.5 * (1 + erfJs(a * SQRT1_2)) + a * INV_SQRT_2PI * Math.exp(-0.5 * a * a),
    needs: ["erf"],
  },
  /** d/dx silu(x) = s(x) (1 + x (1 - s(x))). */
  siluGrad: {
    wgsl: (a) => `(sigmoid_(${a}) * (1.0 + ${a} * (1.0 - sigmoid_(${a}))))`,
    js: (a) => sigmoidJs(a) * (1 + a * (1 - sigmoidJs(a))),
    needs: ["sigmoid"],
  },
  erf: { wgsl: (a) => `erf_(${a})`, js: erfJs, needs: ["erf"] },
  recip: { wgsl: (a) => `(1.0 / ${a})`, js: (a) => 1 / a },
  square: { wgsl: (a) => `(${a} * ${a})`, js: (a) => a * a },
  sign: { wgsl: (a) => `sign(${a})`, js: (a) => (a > 0 ? 1 : a < 0 ? -1 : 0) },
  /** 1 where x > 0, else 0 (the derivative of relu, taken as 0 at 0 like PyTorch). */
  step: { wgsl: (a) => `select(0.0, 1.0, ${a} > 0.0)`, js: (a) => (a > 0 ? 1 : 0) },
} satisfies Record<string, UnaryDef>;

export const BINARY = {
  add: { wgsl: (a, b) => `(${a} + ${b})`, js: (a, b) => a + b },
  sub: { wgsl: (a, b) => `(${a} - ${b})`, js: (a, b) => a - b },
  mul: { wgsl: (a, b) => `(${a} * ${b})`, js: (a, b) => a * b },
  div: { wgsl: (a, b) => `(${a} / ${b})`, js: (a, b) => a / b },
  pow: { wgsl: (a, b) => `pow_(${a}, ${b})`, js: powJs, needs: ["pow"] },
  max: { wgsl: (a, b) => `max(${a}, ${b})`, js: Math.max },
  min: { wgsl: (a, b) => `min(${a}, ${b})`, js: Math.min },
  gt: { wgsl: (a, b) => `select(0.0, 1.0, ${a} > ${b})`, js: (a, b) => (a > b ? 1 : 0) },
  eq: { wgsl: (a, b) => `select(0.0, 1.0, ${a} == ${b})`, js: (a, b) => (a === b ? 1 : 0) },
} satisfies Record<string, BinaryDef>;

// ---------------------------------------------------------------------------------------------------------------
// Expression builders, so callers write `mul(inp(0), un("tanh", inp(1)))`.

export const inp = (i: number): Expr => ({ op: "in", i });
export const cst = (i: number): Expr => ({ op: "const", i });
export const un = (op: UnaryOp, a: Expr): Expr => ({ op, a }) as Expr;
export const bin = (op: BinaryOp, a: Expr, b: Expr): Expr => ({ op, a, b }) as Expr;
export const where = (c: Expr, a: Expr, b: Expr): Expr => ({ op: "where", c, a, b });

function isUnary(op: string): op is UnaryOp {
  return op in UNARY;
}

/** WGSL text of an expression; `consts` is the uniform word index of constant 0. */
function toWgsl(e: Expr, constBase: number, needs: Set<string>): string {
  if (e.op === "in") return `x${e.i}`;
  if (e.op === "const") return `pf(${constBase + e.i}u)`;
  if (e.op === "where") {
    return `select(${toWgsl(e.b, constBase, needs)}, ${toWgsl(e.a, constBase, needs)}, ${
      toWgsl(e.c, constBase, needs)
    } != 0.0)`;
  }
  if (isUnary(e.op)) {
    const d: UnaryDef = UNARY[e.op];
    d.needs?.forEach((n) => needs.add(n));
    return d.wgsl(toWgsl((e as { a: Expr }).a, constBase, needs));
  }
  const d: BinaryDef = BINARY[e.op as BinaryOp];
  d.needs?.forEach((n) => needs.add(n));
  const be = e as { a: Expr; b: Expr };
  return d.wgsl(toWgsl(be.a, constBase, needs), toWgsl(be.b, constBase, needs));
}

/** A JavaScript closure evaluating the expression on one element's input values. */
export function compileJs(e: Expr, consts: number[]): (x: number[]) => number {
  if (e.op === "in") {
    const i = e.i;
    return (x) => x[i];
  }
  if (e.op === "const") {
    const v = consts[e.i];
    if (v === undefined) throw new Error(`expression uses constant ${e.i}, but only ${consts.length} given`);
    return () => v;
  }
  if (e.op === "where") {
    const c = compileJs(e.c, consts), a = compileJs(e.a, consts), b = compileJs(e.b, consts);
    return (x) => (c(x) !== 0 ? a(x) : b(x));
  }
  if (isUnary(e.op)) {
    const f = (UNARY[e.op] as UnaryDef).js, a = compileJs((e as { a: Expr }).a, consts);
    return (x) => f(a(x));
  }
  const f = (BINARY[e.op as BinaryOp] as BinaryDef).js;
  const be = e as { a: Expr; b: Expr };
  const a = compileJs(be.a, consts), b = compileJs(be.b, consts);
  return (x) => f(a(x), b(x));
}

// ---------------------------------------------------------------------------------------------------------------
// Shapes and strides.

export interface ElementwiseParams {
  expr: Expr;
  /** Values of `cst(i)` nodes; they travel as uniforms. */
  consts: number[];
  /** Output shape. */
  shape: readonly number[];
  /** Per input, one element stride per output dimension; 0 where the input is broadcast. */
  strides: readonly (readonly number[])[];
  /**
   * Write the [N, C, H, W] result in this padded channel-quad layout (kernels/layout.ts; a buffer of
   * `quadBufferElements` floats, borders and row ends zero) instead of row-major, for a convolution that reads
   * it so (C and W multiples of 4): an invocation evaluates four vec4 groups, one per channel of a quad, and
   * stores them transposed as four texels.
   */
  quadOut?: QuadLayout;
}

type Access = "same" | "scalar" | "strided";

function accessOf(strides: number[], contiguous: number[]): Access {
  if (strides.every((s) => s === 0)) return "scalar";
  if (strides.every((s, d) => s === contiguous[d])) return "same";
  return "strided";
}

const MAX_INPUTS = 7; // 8 storage buffers per stage, one is the output

function prepare(p: ElementwiseParams) {
  if (p.strides.length > MAX_INPUTS) throw new Error(`elementwise: at most ${MAX_INPUTS} inputs`);
  for (const s of p.strides) {
    if (s.length !== p.shape.length) {
      throw new Error(`elementwise: stride list [${s}] does not match output shape [${p.shape}]`);
    }
  }
  const c = coalesce(p.shape, p.strides);
  const cont = contiguousStrides(c.shape);
  const access = c.strides.map((s) => accessOf(s, cont));
  const n = c.shape.reduce((a, b) => a * b, 1);
  return { ...c, access, n };
}

/**
 * How a strided input is read when each invocation computes four consecutive elements (V = 4), by its innermost
 * stride: "broadcast" (0: one load serves all four), "vec4" (1, with every outer stride a multiple of 4: one
 * vec4 load, as for a slice of a wider tensor), "gather" (four scalar loads, each a per-lane loop on llvmpipe).
 */
type Inner = "broadcast" | "vec4" | "gather";

function innerOf(strides: readonly number[]): Inner {
  const rank = strides.length, inner = strides[rank - 1];
  if (inner === 0) return "broadcast";
  if (inner === 1 && strides.slice(0, rank - 1).every((s) => s % 4 === 0)) return "vec4";
  return "gather";
}

export const elementwise: Kernel<ElementwiseParams> = {
  name: "elementwise",

  gpu(p: ElementwiseParams, caps: GpuCaps): GpuDispatch {
    const { shape, strides, access, n } = prepare(p);
    const rank = shape.length;
    const anyStrided = access.includes("strided");
    if (p.quadOut) checkQuadOut(p, p.quadOut);
    // Four consecutive elements per invocation when they share every coordinate but the innermost: llvmpipe
    // runs vec4 loads/stores as one gather each (a scalar load is a per-lane loop) and the index arithmetic is
    // done once per four elements.
    const V = shape[rank - 1] % 4 === 0 ? 4 : 1;
    const inner = strides.map((s, k) => (access[k] === "strided" && V === 4 ? innerOf(s) : undefined));
    // Uniforms: the group count; then, with strided inputs, the group shape and, per strided input, its strides
    // in the units it is loaded in (a gathered input also its innermost element stride).
    const groupShape = [...shape.slice(0, rank - 1), shape[rank - 1] / V];
    const w = new ParamWriter().u32(n / V);
    const strideWord: number[] = [];
    if (anyStrided) {
      w.u32(...groupShape);
      strides.forEach((s, k) => {
        if (access[k] !== "strided") return;
        strideWord[k] = w.offset;
        const outer = s.slice(0, rank - 1), last = s[rank - 1];
        if (inner[k] === "vec4") w.u32(...outer.map((x) => x / 4), 1);
        else w.u32(...outer, last * V);
        if (inner[k] === "gather") w.u32(last);
      });
    }
    const constBase = w.offset;
    w.f32(...p.consts);
    const quadBase = w.offset;
    const quad = p.quadOut;
    if (quad) {
      const CQ = quad.C / 4, WQ = quad.W / 4;
      w.u32(CQ, quad.H, WQ, quad.Hp, quad.Wp, quad.top, quad.left, quadPitch(quad));
      w.u32(quad.N * CQ * quad.H * WQ, quad.N * quad.Hp * CQ);
    }

    // The source depends on the structure alone (the expression, rank, vector width and input access; the
    // stride and constant words follow from those): built once per structure (kernels/source_cache.ts).
    const key = `elementwise:${rank}:${V}:${access.join(",")}:${inner.join(",")}:${JSON.stringify(p.expr)}:${
      quad ? `quad${p.consts.length}` : ""
    }`;
    const source = cachedSource(key, () => {
      const needs = new Set<string>();
      const body = toWgsl(p.expr, constBase, needs);
      const lines: string[] = [];
      if (anyStrided) {
        // Offsets of group i's first element in each strided input, from the group's coordinates.
        access.forEach((a, k) => a === "strided" && lines.push(`var o${k} = 0u;`));
        lines.push(`var rem = i;`);
        lines.push(
          ...splitIndexWgsl(
            rank,
            1,
            (d) =>
              access.flatMap((a, k) => (a === "strided" ? [`o${k} += c * pu(${strideWord[k] + d}u);`] : [])),
          ),
        );
      }
      const vec4Input = (k: number) => (V === 4 && access[k] === "same") || inner[k] === "vec4";
      if (V === 1) {
        access.forEach((a, k) =>
          lines.push(`let x${k} = in${k}[${a === "same" ? "i" : a === "scalar" ? "0u" : `o${k}`}];`)
        );
        lines.push(`out[i] = ${body};`);
      } else {
        access.forEach((a, k) => {
          if (a === "same") lines.push(`let v${k} = in${k}[i];`);
          else if (a === "scalar") lines.push(`let s${k} = in${k}[0u];`);
          else if (inner[k] === "vec4") lines.push(`let v${k} = in${k}[o${k}];`);
          else if (inner[k] === "broadcast") lines.push(`let s${k} = in${k}[o${k}];`);
        });
        const comps: string[] = [];
        for (let j = 0; j < 4; j++) {
          lines.push(`var r${j}: f32;`, `{`);
          access.forEach((_, k) => {
            const src = vec4Input(k)
              ? `v${k}[${j}]`
              : inner[k] === "gather"
              ? `in${k}[o${k} + ${j}u * pu(${strideWord[k] + rank}u)]`
              : `s${k}`;
            lines.push(`  let x${k} = ${src};`);
          });
          lines.push(`  r${j} = ${body};`, `}`);
          comps.push(`r${j}`);
        }
        lines.push(
          quad ? `return vec4<f32>(${comps.join(", ")});` : `out[i] = vec4<f32>(${comps.join(", ")});`,
        );
      }
      let head = header(strides.map((_, k) => `in${k}`), ["out"]);
      // Inputs read whole four at a time, and a V = 4 output, are declared as vec4 arrays.
      strides.forEach((_, k) => {
        if (vec4Input(k)) {
          head = head.replace(
            `var<storage, read> in${k}: array<f32>;`,
            `var<storage, read> in${k}: array<vec4<f32>>;`,
          );
        }
      });
      if (V === 4) {
        head = head.replace(
          `var<storage, read_write> out: array<f32>;`,
          `var<storage, read_write> out: array<vec4<f32>>;`,
        );
      }
      const helpers = [...needs].map((k) => PRELUDE[k]);
      if (quad) return head + helpers.join("\n") + quadSource(lines, quadBase);
      return head + helpers.join("\n") + `
${ENTRY_1D} {
  let i = linearId(wid, nwg, lid, 256u);
  if (i >= pu(0u)) { return; }
  ${lines.join("\n  ")}
}`;
    });
    const invocations = quad ? quad.N * (quad.C / 4) * (quad.H * quad.W / 4 + quad.Hp) : n / V;
    return { source, workgroups: grid1d(invocations, caps.maxWorkgroupsPerDimension), params: w.finish() };
  },

  cpu(p: ElementwiseParams, inputs: FloatArray[], outputs: FloatArray[]): void {
    const { shape, strides, n } = prepare(p);
    const f = compileJs(p.expr, p.consts);
    if (p.quadOut) checkQuadOut(p, p.quadOut);
    // With quadOut: row-major first, then placed in the layout.
    const out = p.quadOut ? new Float64Array(n) : outputs[0];
    const rank = shape.length;
    const k = inputs.length;
    const idx = new Array<number>(rank).fill(0);
    const off = new Array<number>(k).fill(0);
    const x = new Array<number>(k);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < k; j++) x[j] = inputs[j][off[j]];
      out[i] = f(x);
      // Odometer increment of the multi-index and every input offset.
      for (let d = rank - 1; d >= 0; d--) {
        idx[d]++;
        for (let j = 0; j < k; j++) off[j] += strides[j][d];
        if (idx[d] < shape[d]) break;
        for (let j = 0; j < k; j++) off[j] -= strides[j][d] * shape[d];
        idx[d] = 0;
      }
    }
    if (p.quadOut) toQuadBuffer(p.quadOut, out, outputs[0]);
  },
};

/** Whether `l` is a quad layout of an output [N, C, H, W] with C and W multiples of 4 (`quadOut` applies). */
export function quadOutFits(shape: readonly number[], l: QuadLayout): boolean {
  const [N, C, H, W] = shape;
  return shape.length === 4 && l.N === N && l.C === C && l.H === H && l.W === W && C % 4 === 0 &&
    W % 4 === 0 && l.top + H <= l.Hp && l.left + W <= l.Wp;
}

function checkQuadOut(p: ElementwiseParams, l: QuadLayout) {
  if (!quadOutFits(p.shape, l)) {
    throw new Error(
      `elementwise: quadOut ${JSON.stringify(l)} does not fit output [${p.shape}] (needs [N, C, H, W], ` +
        `C and W multiples of 4)`,
    );
  }
}

/**
 * The quad-layout kernel: `unit(i)` evaluates vec4 group i of the row-major result (the body of the V = 4
 * kernel); invocations below the interior count take a block (n, channel quad, h, position quad), evaluate the
 * four channels' groups and store them transposed; the rest each zero the border texels of one padded row of
 * one channel quad (and, for the image's last quad, the row's end up to the pitch).
 */
function quadSource(lines: string[], q: number): string {
  return `
fn unit(i: u32) -> vec4<f32> {
  ${lines.join("\n  ")}
}

${ENTRY_1D} {
  let b = linearId(wid, nwg, lid, 256u);
  let CQ = pu(${q}u); let H = pu(${q + 1}u); let WQ = pu(${q + 2}u); let Hp = pu(${q + 3}u);
  let Wp = pu(${q + 4}u); let top = pu(${q + 5}u); let left = pu(${q + 6}u); let pitch = pu(${q + 7}u);
  let interior = pu(${q + 8}u);
  if (b < interior) {
    let wq = b % WQ;
    var r = b / WQ;
    let h = r % H;
    r = r / H;
    let cq = r % CQ;
    let n = r / CQ;
    let HWQ = H * WQ;
    let i0 = (4u * (n * CQ + cq) * H + h) * WQ + wq;
    let u0 = unit(i0);
    let u1 = unit(i0 + HWQ);
    let u2 = unit(i0 + 2u * HWQ);
    let u3 = unit(i0 + 3u * HWQ);
    let t = (n * Hp + h + top) * pitch + cq * Wp + left + 4u * wq;
    ${quadBlockStoreWgsl("out", "u", "    ")}
    return;
  }
  let e = b - interior;
  if (e >= pu(${q + 9}u)) { return; }
  let cq = e % CQ;
  let padded = e / CQ;
  let hp = padded % Hp;
  let r = padded * pitch;
  let col = cq * Wp;
  let end = select(col + Wp, pitch, cq + 1u == CQ);
  ${quadBorderRowWgsl("out", "4u * WQ", "  ")}
}`;
}
