/**
 * @file Shape arithmetic shared by the ops: NumPy broadcasting, axis normalisation, strides. Errors name the op
 * and show the shapes, because a shape error deep in a UNet is otherwise hard to place.
 */

/** A tensor shape: one size per dimension, outermost first. */
export type Shape = readonly number[];

export const fmt = (s: Shape): string => `[${s.join(", ")}]`;

/** The broadcast shape of several shapes (NumPy rules), or an error naming all of them. */
export function broadcastShapes(op: string, ...shapes: Shape[]): number[] {
  const rank = Math.max(...shapes.map((s) => s.length));
  const out = new Array<number>(rank).fill(1);
  for (const s of shapes) {
    for (let i = 0; i < s.length; i++) {
      const d = rank - s.length + i;
      if (s[i] === out[d] || s[i] === 1) continue;
      if (out[d] === 1) out[d] = s[i];
      else throw new Error(`${op}: shapes ${shapes.map(fmt).join(" and ")} cannot be broadcast together`);
    }
  }
  return out;
}

/** Element strides that read a tensor of `shape` as if broadcast to `target` (0 on broadcast dimensions). */
export function broadcastStrides(shape: Shape, target: Shape): number[] {
  const strides = new Array<number>(target.length).fill(0);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    const d = target.length - shape.length + i;
    strides[d] = shape[i] === 1 ? 0 : acc;
    acc *= shape[i];
  }
  return strides;
}

/** Resolves a possibly negative axis against a rank; throws with the op name when out of range. */
export function normAxis(op: string, axis: number, rank: number): number {
  // A rank-0 tensor accepts dim 0 and -1, like PyTorch.
  const r = Math.max(rank, 1);
  const a = axis < 0 ? axis + r : axis;
  if (!Number.isInteger(axis) || a < 0 || a >= r) {
    throw new Error(`${op}: dim ${axis} is out of range for a tensor of rank ${rank}`);
  }
  return a;
}

/** Normalised, sorted, de-duplicated axes; `undefined` means all axes. */
export function normAxes(op: string, dims: number | readonly number[] | undefined, rank: number): number[] {
  if (dims === undefined) return Array.from({ length: rank }, (_, i) => i);
  const list = typeof dims === "number" ? [dims] : dims;
  const out = [...new Set(list.map((d) => normAxis(op, d, rank)))].sort((a, b) => a - b);
  if (out.length !== list.length) throw new Error(`${op}: repeated dim in [${list.join(", ")}]`);
  return out;
}

export function sameShape(a: Shape, b: Shape): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}
