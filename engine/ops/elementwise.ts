/**
 * @file Differentiable elementwise ops with NumPy broadcasting. A scalar operand travels as a uniform constant,
 * not as a tensor. Each backward rule is a single fused kernel (an `Expr`), then `sumTo` undoes broadcasting.
 */

import { bin, cst, type Expr, inp, un, type UnaryOp } from "../../kernels/elementwise.ts";
import { record, Tensor } from "../tensor.ts";
import { map, packsConvInputs, sumTo, view } from "./core.ts";
import { sameShape } from "../shape.ts";

export type Operand = Tensor | number;

const g = inp(0);

/** Builds the forward of a binary op: tensors become inputs, numbers become constants. */
function operands(a: Operand, b: Operand): { inputs: Tensor[]; consts: number[]; A: Expr; B: Expr } {
  const inputs: Tensor[] = [], consts: number[] = [];
  const leaf = (v: Operand): Expr => {
    if (v instanceof Tensor) {
      inputs.push(v);
      return inp(inputs.length - 1);
    }
    if (typeof v !== "number") throw new Error(`expected a Tensor or a number, got ${typeof v}`);
    consts.push(v);
    return cst(consts.length - 1);
  };
  const A = leaf(a), B = leaf(b);
  if (!inputs.length) throw new Error("at least one operand must be a Tensor");
  return { inputs, consts, A, B };
}

/** Gradient w.r.t. a tensor operand: a fused expression of `g` and other tensors, then summed to its shape. */
function gradOf(t: Operand, expr: Expr, tensors: Tensor[], consts: number[] = []): Tensor | null {
  if (!(t instanceof Tensor) || !t.requiresGrad) return null;
  const full = map(expr, tensors, consts);
  const r = sumTo(full, t.shape);
  if (r !== full) full.dispose();
  return r;
}

const tensorsOf = (...xs: Operand[]) => xs.filter((x): x is Tensor => x instanceof Tensor);
const needsGrad = (x: Operand): x is Tensor => x instanceof Tensor && x.requiresGrad;

/**
 * The gradient of an operand that receives `gr` unchanged (add, and sub's first operand): a view sharing its
 * storage where the shapes match and `gr` is computed, or where both operands take it (`shared`: computed once
 * for both); otherwise a lazy copy that fuses into its consumer; for a broadcast operand, the sum of `gr`.
 * Measured on the bench UNet step: as lazy copies, the unshared gradients cost 58 identity dispatches per step.
 * Where convolutions pack their inputs (`packsConvInputs`), a shared `gr` stays lazy too: a convolution on
 * either side (a residual block's branch and skip) then writes it straight into its packed layout
 * (`Tensor.quadForm`) instead of packing it, at the price of evaluating the expression once per consumer that
 * needs it row-major: 16 (bench) and 20 (default) packing passes fewer per step, for 7 more dispatches.
 */
function passGrad(t: Operand, gr: Tensor, shared: boolean): Tensor | null {
  if (!needsGrad(t)) return null;
  // A broadcast operand: the sum reads `gr` itself (an identity copy first would be one more dispatch).
  if (!sameShape(t.shape, gr.shape)) return sumTo(gr, t.shape);
  if (!gr.lazyValue || (shared && !packsConvInputs(gr.device))) return view(gr, gr.shape);
  return map(g, [gr]);
}

export function add(a: Operand, b: Operand): Tensor {
  const { inputs, consts, A, B } = operands(a, b);
  const out = map(bin("add", A, B), inputs, consts);
  return record(out, "add", tensorsOf(a, b), (gr) => {
    const shared = needsGrad(a) && needsGrad(b);
    const r = [passGrad(a, gr, shared), passGrad(b, gr, shared)];
    return r.filter((_, i) => [a, b][i] instanceof Tensor);
  });
}

export function sub(a: Operand, b: Operand): Tensor {
  const { inputs, consts, A, B } = operands(a, b);
  const out = map(bin("sub", A, B), inputs, consts);
  return record(out, "sub", tensorsOf(a, b), (gr) => {
    const r = [passGrad(a, gr, false), gradOf(b, un("neg", g), [gr])];
    return r.filter((_, i) => [a, b][i] instanceof Tensor);
  });
}

/** The other operand of a binary op as an expression over (g = in0, other = in1 or a constant). */
function other(v: Operand): { e: Expr; ts: Tensor[]; cs: number[] } {
  return v instanceof Tensor ? { e: inp(1), ts: [v], cs: [] } : { e: cst(0), ts: [], cs: [v] };
}

export function mul(a: Operand, b: Operand): Tensor {
  const { inputs, consts, A, B } = operands(a, b);
  const out = map(bin("mul", A, B), inputs, consts);
  return record(out, "mul", tensorsOf(a, b), (gr) => {
    const ob = other(b), oa = other(a);
    const r = [
      gradOf(a, bin("mul", g, ob.e), [gr, ...ob.ts], ob.cs),
      gradOf(b, bin("mul", g, oa.e), [gr, ...oa.ts], oa.cs),
    ];
    return r.filter((_, i) => [a, b][i] instanceof Tensor);
  });
}

export function div(a: Operand, b: Operand): Tensor {
  const { inputs, consts, A, B } = operands(a, b);
  const out = map(bin("div", A, B), inputs, consts);
  return record(out, "div", tensorsOf(a, b), (gr) => {
    const ob = other(b);
    // d(a/b)/db = -out / b, with out = a/b already computed.
    const db = b instanceof Tensor
      ? gradOf(b, un("neg", bin("div", bin("mul", g, inp(1)), inp(2))), [gr, out, b])
      : null;
    const r = [gradOf(a, bin("div", g, ob.e), [gr, ...ob.ts], ob.cs), db];
    return r.filter((_, i) => [a, b][i] instanceof Tensor);
  });
}

/** a ** b with PyTorch semantics (negative bases allowed for integral exponents). */
export function pow(a: Operand, b: Operand): Tensor {
  const { inputs, consts, A, B } = operands(a, b);
  const out = map(bin("pow", A, B), inputs, consts);
  return record(out, "pow", tensorsOf(a, b), (gr) => {
    let da: Tensor | null = null, db: Tensor | null = null;
    if (a instanceof Tensor) {
      // b · a^(b−1)
      da = b instanceof Tensor
        ? gradOf(a, bin("mul", g, bin("mul", inp(2), bin("pow", inp(1), bin("sub", inp(2), cst(0))))), [
          gr,
          a,
          b,
        ], [1])
        : gradOf(a, bin("mul", g, bin("mul", cst(0), bin("pow", inp(1), cst(1)))), [gr, a], [b, b - 1]);
    }
    if (b instanceof Tensor) {
      // a^b · ln a
      db = a instanceof Tensor
        ? gradOf(b, bin("mul", g, bin("mul", inp(1), un("log", inp(2)))), [gr, out, a])
        : gradOf(b, bin("mul", g, bin("mul", inp(1), cst(0))), [gr, out], [Math.log(a)]);
    }
    return [da, db].filter((_, i) => [a, b][i] instanceof Tensor);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Unary ops: the forward op and the backward as an expression of g (in0) and either x or y = f(x) (in1).

interface UnaryRule {
  uses: "x" | "y";
  grad: Expr;
}

const v = inp(1);
const one = cst(0);
const UNARY_RULES: Partial<Record<UnaryOp, UnaryRule>> = {
  neg: { uses: "x", grad: un("neg", g) },
  abs: { uses: "x", grad: bin("mul", g, un("sign", v)) },
  exp: { uses: "y", grad: bin("mul", g, v) },
  log: { uses: "x", grad: bin("div", g, v) },
  sqrt: { uses: "y", grad: bin("div", g, bin("add", v, v)) },
  rsqrt: { uses: "y", grad: bin("mul", bin("mul", g, cst(1)), bin("mul", v, bin("mul", v, v))) },
  sin: { uses: "x", grad: bin("mul", g, un("cos", v)) },
  cos: { uses: "x", grad: un("neg", bin("mul", g, un("sin", v))) },
  tanh: { uses: "y", grad: bin("mul", g, bin("sub", one, bin("mul", v, v))) },
  sigmoid: { uses: "y", grad: bin("mul", g, bin("mul", v, bin("sub", one, v))) },
  silu: { uses: "x", grad: bin("mul", g, un("siluGrad", v)) },
  relu: { uses: "x", grad: bin("mul", g, un("step", v)) },
  gelu: { uses: "x", grad: bin("mul", g, un("geluGrad", v)) },
};
/** Constants the rules above refer to: cst(0) = 1, cst(1) = -0.5. */
const RULE_CONSTS = [1, -0.5];

function unary(op: UnaryOp, x: Tensor): Tensor {
  if (!(x instanceof Tensor)) throw new Error(`${op}: expected a Tensor`);
  const out = map(un(op, inp(0)), [x]);
  const rule = UNARY_RULES[op];
  if (!rule) throw new Error(`${op} has no gradient rule`);
  return record(out, op, [x], (gr) => [map(rule.grad, [gr, rule.uses === "x" ? x : out], RULE_CONSTS)]);
}

export const neg = (x: Tensor): Tensor => unary("neg", x);
export const abs = (x: Tensor): Tensor => unary("abs", x);
export const exp = (x: Tensor): Tensor => unary("exp", x);
export const log = (x: Tensor): Tensor => unary("log", x);
export const sqrt = (x: Tensor): Tensor => unary("sqrt", x);
export const rsqrt = (x: Tensor): Tensor => unary("rsqrt", x);
export const sin = (x: Tensor): Tensor => unary("sin", x);
export const cos = (x: Tensor): Tensor => unary("cos", x);
export const tanh = (x: Tensor): Tensor => unary("tanh", x);
export const sigmoid = (x: Tensor): Tensor => unary("sigmoid", x);
export const silu = (x: Tensor): Tensor => unary("silu", x);
export const relu = (x: Tensor): Tensor => unary("relu", x);
/** Exact (erf-based) GELU, as PyTorch's default. */
export const gelu = (x: Tensor): Tensor => unary("gelu", x);
