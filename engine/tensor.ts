/**
 * @file The Tensor: a shape, a reference to device storage, and (when it was made by a differentiable op from
 * inputs that require gradients) the tape node that says how to send a gradient back to those inputs.
 *
 * Tensors are always contiguous and row-major. Storage is reference-counted so that `reshape` shares it.
 * Memory is freed by `dispose()` (or `using`), by `scope()`, which disposes everything created inside it except
 * what it returns, by `forwardScope()` (module forwards marked `@nn.scopedForward`), which does the same unless
 * the tape holds the intermediates for `backward`, and, as a safety net only, by a FinalizationRegistry when a
 * tensor is garbage-collected.
 */

import { type Device, getDefaultDevice, type Storage } from "./device.ts";
import { elementwise, type ElementwiseParams, type Expr, quadOutFits } from "../kernels/elementwise.ts";
import { broadcastStrides, type Shape } from "./shape.ts";
import { quadBufferElements, type QuadLayout, unpackQuadParams } from "../kernels/layout.ts";
import { copy } from "../kernels/copy.ts";

export type { Shape };

/**
 * Reference-counted storage shared by tensors that view the same elements (reshape). `readers` are the lazy
 * tensors whose pending expressions read it: an in-place write must compute them first.
 */
export class StorageRef {
  refs = 1;
  /** Weak, so that a forgotten lazy tensor can still be collected (and release its leaves). */
  readonly readers = new Set<WeakRef<Tensor>>();
  constructor(readonly device: Device, readonly storage: Storage) {}
  retain(): this {
    this.refs++;
    return this;
  }
  drop() {
    if (--this.refs === 0) this.device.release(this.storage);
  }
}

/** What a lazy tensor will be: an elementwise expression over leaf storages read with the given shapes. */
export interface LazyValue {
  expr: Expr;
  consts: number[];
  leaves: { ref: StorageRef; shape: Shape }[];
}

/**
 * What a deferred tensor will be: the output of one kernel over its leaves, computed when first needed, and
 * written in the layout its first consumer asks for where the producer can (see `Tensor.deferred`).
 */
export interface DeferredValue {
  leaves: { ref: StorageRef }[];
  /** Writes the value, row-major, into `out`. */
  run(out: Storage): void;
  /**
   * Writes the value into a new allocation in the padded channel-quad layout `layout` (kernels/layout.ts), or
   * returns null where this producer cannot.
   */
  runQuad?(layout: QuadLayout): Storage | null;
}

/** A lazy tensor holds its leaves; the registry drops whichever it holds when the tensor is collected. */
const finalizer = new FinalizationRegistry<StorageRef | LazyValue | DeferredValue>((held) => {
  if (held instanceof StorageRef) held.drop();
  else held.leaves.forEach((l) => l.ref.drop()); // dead WeakRefs in `readers` are skipped by deref()
});

/** How a tensor was computed: its differentiable inputs and the vector-Jacobian product back to them. */
export interface GradNode {
  readonly op: string;
  readonly inputs: readonly Tensor[];
  /** Given the gradient of the output, the gradient of each input (null where it needs none). */
  readonly vjp: (g: Tensor) => (Tensor | null)[];
}

export function sizeOf(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function checkShape(shape: Shape, what = "shape"): void {
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 1) {
      throw new Error(`${what} [${shape.join(", ")}] is invalid: every dimension must be a positive integer`);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scopes.

/** The tensors created while a scope is innermost, and whether any of them went on the tape. */
class Frame extends Set<Tensor> {
  /** A tape node was recorded in this frame (or in a forward scope that handed its tensors to it). */
  taped = false;
}

const scopes: Frame[] = [];

const innermost = (): Frame | undefined => scopes[scopes.length - 1];

/** Runs `fn` in a new frame; returns its result and the frame (popped again, also when `fn` throws). */
function inFrame<T>(fn: () => T, what: string): { result: T; frame: Frame } {
  const frame = new Frame();
  scopes.push(frame);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    scopes.pop();
    handOver(frame);
    throw e;
  }
  scopes.pop();
  if (result instanceof Promise) {
    handOver(frame);
    throw new Error(`${what}() takes a synchronous function; await outside the scope`);
  }
  return { result, frame };
}

/** Gives every tensor of a finished frame to the enclosing one (they die with it), with its taped mark. */
function handOver(frame: Frame) {
  const parent = innermost();
  if (!parent) return;
  for (const t of frame) parent.add(t);
  parent.taped ||= frame.taped;
}

/** Disposes every tensor of a finished frame except `result`'s tensors, which go to the enclosing frame. */
function disposeAllBut(frame: Frame, result: unknown) {
  const kept = new Set<Tensor>();
  collect(result, kept);
  const parent = innermost();
  for (const t of frame) {
    if (kept.has(t)) parent?.add(t);
    else t.dispose();
  }
  if (parent) parent.taped ||= frame.taped;
}

/**
 * Runs `fn` and disposes every tensor created inside it except the tensors in its result (found in returned
 * arrays and plain objects) and those passed to `keep`. Gradients that `backward` stores on tensors from outside
 * the scope survive it. Call `backward` inside the scope that built the graph.
 */
export function scope<T>(fn: () => T): T {
  const { result, frame } = inFrame(fn, "scope");
  disposeAllBut(frame, result);
  return result;
}

/**
 * Runs a forward computation (see `nn.scopedForward`) so that it can be written as plain maths:
 * when no tape recorded anything inside it (under `noGrad`, or when nothing requires grad) every tensor created
 * inside except the result is disposed at the end, like `scope`; when the tape did, the tape needs those
 * intermediates for `backward`, so they all go to the enclosing scope and live as long as it does (as if there
 * were no forward scope). If `fn` throws, its tensors also go to the enclosing scope.
 */
export function forwardScope<T>(fn: () => T): T {
  const { result, frame } = inFrame(fn, "forwardScope");
  if (frame.taped) handOver(frame);
  else disposeAllBut(frame, result);
  return result;
}

/**
 * Frees tensors a forward is done with now rather than at the end of its scope, where they would be freed
 * anyway: it disposes only tensors the innermost scope owns (made in it, or results of forward scopes that ended
 * in it), and only while no tape node has been recorded in that scope. So a forward that carries values through
 * a loop (a UNet's decoder consuming its skips) keeps the peak memory of sampling low, and under a tape it does
 * nothing. Tensors of the caller, and nulls, are ignored.
 */
export function discard(...ts: (Tensor | null | undefined)[]): void {
  const frame = innermost();
  if (!frame || frame.taped) return;
  for (const t of ts) if (t && frame.has(t)) t.dispose();
}

function collect(v: unknown, out: Set<Tensor>, depth = 0) {
  if (depth > 4 || v === null || typeof v !== "object") return;
  if (v instanceof Tensor) out.add(v);
  else if (Array.isArray(v)) v.forEach((x) => collect(x, out, depth + 1));
  else if (Object.getPrototypeOf(v) === Object.prototype) {
    Object.values(v as Record<string, unknown>).forEach((x) => collect(x, out, depth + 1));
  }
}

/** Takes a tensor out of the scopes that would dispose it: it now lives until disposed explicitly. */
export function keep<T extends Tensor>(t: T): T {
  for (const frame of scopes) frame.delete(t);
  return t;
}

// ---------------------------------------------------------------------------------------------------------------
// Gradient mode.

let noGradDepth = 0;

/** Runs `fn` without recording the tape (optimizer updates, sampling, evaluation). */
export function noGrad<T>(fn: () => T): T {
  noGradDepth++;
  try {
    return fn();
  } finally {
    noGradDepth--;
  }
}

export function isGradEnabled(): boolean {
  return noGradDepth === 0;
}

// ---------------------------------------------------------------------------------------------------------------

export interface TensorOptions {
  device?: Device;
  requiresGrad?: boolean;
}

export class Tensor {
  readonly shape: Shape;
  readonly size: number;
  readonly device: Device;
  #ref: StorageRef | null;
  /** Set while the value is a pending elementwise expression (see ops/core.ts `map`); storage comes later. */
  #lazy: LazyValue | null = null;
  /** Set while the value is a kernel's output not yet computed (see `deferred`). */
  #deferred: DeferredValue | null = null;
  #asReader: WeakRef<Tensor> | null = null;
  #disposed = false;
  /** Leaf tensors with `requiresGrad` accumulate `.grad` in `backward`. */
  requiresGrad = false;
  grad: Tensor | null = null;
  /** Set on tensors made by differentiable ops; null for leaves and after `backward` freed the graph. */
  node: GradNode | null = null;

  /** Wraps existing storage (the storage reference is taken over, or shared when `share` is given). */
  constructor(device: Device, shape: Shape, storage: Storage | null, share?: Tensor) {
    checkShape(shape);
    this.shape = Object.freeze([...shape]);
    this.size = sizeOf(shape);
    this.device = device;
    if (share) {
      share.realize();
      const r = share.#ref;
      if (!r) throw new Error("cannot share the storage of a disposed tensor");
      this.#ref = r.retain();
    } else this.#ref = storage ? new StorageRef(device, storage) : null;
    if (this.#ref) finalizer.register(this, this.#ref, this);
    scopes[scopes.length - 1]?.add(this);
  }

  /**
   * A tensor whose value is `value`, computed only when its storage is first needed; until then it retains its
   * leaves. Made by `map` in ops/core.ts, which also inlines lazy inputs into new expressions (fusion).
   */
  static lazy(device: Device, shape: Shape, value: LazyValue): Tensor {
    const t = new Tensor(device, shape, null);
    t.#lazy = value;
    t.#holdLeaves(value);
    return t;
  }

  /**
   * A tensor whose value a kernel computes only when needed: `value.run` writes it row-major when its storage
   * is first asked for, while a consumer that reads its input in a layout of its own (a convolution's padded
   * channel quads) may first ask for that form (`quadForm`), saving the rearranging pass. Until computed it
   * retains its leaves, and an in-place write to a leaf computes it first (as for lazy tensors).
   */
  static deferred(device: Device, shape: Shape, value: DeferredValue): Tensor {
    const t = new Tensor(device, shape, null);
    t.#deferred = value;
    t.#holdLeaves(value);
    return t;
  }

  /** Retains the leaves of this tensor's pending value and marks it as their reader (until computed). */
  #holdLeaves(value: LazyValue | DeferredValue) {
    this.#asReader = new WeakRef(this);
    for (const l of value.leaves) {
      l.ref.retain();
      l.ref.readers.add(this.#asReader);
    }
    finalizer.register(this, value, this);
  }

  /**
   * The value in the padded channel-quad layout `layout` (a convolution's packed input), as a new tensor of
   * `quadBufferElements(layout)` elements that the caller owns, where this tensor is not computed yet and its
   * producer can write that layout: a deferred kernel output whose producer supports it, or a pending
   * elementwise expression with whole channel and position quads (kernels/elementwise.ts `quadOut`). Otherwise
   * null. The tensor keeps its value; computed row-major later, if anything needs that, it is unpacked from the
   * quad form.
   */
  quadForm(layout: QuadLayout): Tensor | null {
    const d = this.#deferred, v = this.#lazy;
    let storage: Storage | null = null;
    if (d) storage = d.runQuad?.(layout) ?? null;
    else if (v && quadOutFits(this.shape, layout)) {
      storage = this.device.alloc(quadBufferElements(layout));
      this.#runElementwise(v, storage, layout);
    }
    if (!storage) return null;
    const quad = new Tensor(this.device, [quadBufferElements(layout)], storage);
    // From now on the row-major value, if ever needed, is unpacked from the quad form, and the producer's
    // leaves are let go: an in-place update of one (an optimizer's step on a norm weight) would otherwise
    // compute the value first, and the leaves' memory is free sooner.
    const ref = quad.storageRef;
    this.#releaseLeaves((d ?? v)!);
    finalizer.unregister(this);
    this.#lazy = null;
    this.#deferred = {
      leaves: [{ ref }],
      run: (out) => this.device.run(copy, unpackQuadParams(layout), [ref.storage], [out]),
    };
    this.#holdLeaves(this.#deferred);
    return quad;
  }

  /** The pending expression of a lazy tensor, or null once computed. */
  get lazyValue(): LazyValue | null {
    return this.#lazy;
  }

  /** The storage reference, computing a lazy value first (for building fused expressions). */
  get storageRef(): StorageRef {
    this.realize();
    if (!this.#ref) throw new Error(`tensor of shape [${this.shape}] was used after dispose()`);
    return this.#ref;
  }

  /** Computes a pending lazy or deferred value into fresh storage: one dispatch. */
  realize(): void {
    const d = this.#deferred, v = this.#lazy;
    if (!d && !v) return;
    this.#deferred = this.#lazy = null;
    finalizer.unregister(this);
    const storage = this.device.alloc(this.size, this.shape);
    if (d) d.run(storage);
    else this.#runElementwise(v!, storage);
    this.#ref = new StorageRef(this.device, storage);
    finalizer.register(this, this.#ref, this);
    this.#releaseLeaves((d ?? v)!);
  }

  /** Evaluates a pending expression into `out`: row-major, or in `quadOut`'s layout. */
  #runElementwise(v: LazyValue, out: Storage, quadOut?: QuadLayout) {
    const strides = v.leaves.map((l) => broadcastStrides(l.shape, this.shape));
    const params: ElementwiseParams = { expr: v.expr, consts: v.consts, shape: this.shape, strides, quadOut };
    this.device.run(elementwise, params, v.leaves.map((l) => l.ref.storage), [out]);
  }

  #releaseLeaves(v: LazyValue | DeferredValue) {
    for (const l of v.leaves) {
      if (this.#asReader) l.ref.readers.delete(this.#asReader);
      l.ref.drop();
    }
    this.#asReader = null;
  }

  /** A new uninitialised tensor on `device`. */
  static empty(shape: Shape, device: Device = getDefaultDevice()): Tensor {
    checkShape(shape);
    return new Tensor(device, shape, device.alloc(sizeOf(shape), shape));
  }

  /** The device allocation (computing a lazy value first); throws on a disposed tensor. */
  get storage(): Storage {
    this.realize();
    if (!this.#ref) throw new Error(`tensor of shape [${this.shape}] was used after dispose()`);
    return this.#ref.storage;
  }

  /**
   * The allocation for a kernel that overwrites it in place (optimizer steps, EMA, loading weights): lazy
   * tensors still waiting to read the old values are computed first.
   */
  get mutableStorage(): Storage {
    const s = this.storage;
    for (const reader of [...this.#ref!.readers]) reader.deref()?.realize();
    return s;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  get rank(): number {
    return this.shape.length;
  }

  /** Frees the storage (once every tensor sharing it is disposed). Safe to call twice. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    finalizer.unregister(this);
    if (this.#lazy) this.#releaseLeaves(this.#lazy);
    if (this.#deferred) this.#releaseLeaves(this.#deferred);
    this.#lazy = null;
    this.#deferred = null;
    this.#ref?.drop();
    this.#ref = null;
    this.node = null;
    for (const frame of scopes) frame.delete(this);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** The values, row-major, as float32 (submits pending work and waits for it). */
  async toArray(): Promise<Float32Array> {
    const v = await this.device.read(this.storage, this.size);
    return v instanceof Float32Array ? v : Float32Array.from(v);
  }

  /** The values at the device's own precision, widened to float64. */
  async toFloat64Array(): Promise<Float64Array> {
    const v = await this.device.read(this.storage, this.size);
    return v instanceof Float64Array ? v : Float64Array.from(v);
  }

  /** The single value of a one-element tensor. */
  async item(): Promise<number> {
    if (this.size !== 1) throw new Error(`item() needs one element, tensor has shape [${this.shape}]`);
    return (await this.toFloat64Array())[0];
  }

  /**
   * Reverse-mode differentiation of `sum(this * cotangent)` (cotangent defaults to ones, so a scalar loss needs
   * none). Leaves that require grad accumulate into `.grad`; the graph is freed afterwards.
   */
  backward(cotangent?: Tensor): void {
    backwardImpl(this, cotangent);
  }

  toString(): string {
    return `Tensor([${this.shape.join(", ")}], ${this.device.kind}${
      this.requiresGrad ? ", requiresGrad" : ""
    })`;
  }
}

// The tape walk lives in autograd.ts, which needs the ops; it installs itself here to avoid an import cycle.
let backwardImpl: (root: Tensor, cotangent?: Tensor) => void = () => {
  throw new Error("autograd is not loaded: import from engine/mod.ts");
};
export function installBackward(fn: (root: Tensor, cotangent?: Tensor) => void): void {
  backwardImpl = fn;
}

/**
 * Attaches the tape node to an op's output when gradients are on and some input requires them. Every
 * differentiable op ends with this: the value and its backward rule in one place.
 */
export function record(
  out: Tensor,
  op: string,
  inputs: Tensor[],
  vjp: (g: Tensor) => (Tensor | null)[],
): Tensor {
  if (noGradDepth === 0 && inputs.some((t) => t.requiresGrad)) {
    out.requiresGrad = true;
    out.node = { op, inputs, vjp };
    // The op's output and what its vjp saved were made in this frame: a forward scope must not free them.
    const frame = innermost();
    if (frame) frame.taped = true;
  }
  return out;
}

/** Throws unless all tensors are on one device; returns it. */
export function sameDevice(op: string, ...ts: Tensor[]): Device {
  const d = ts[0].device;
  for (const t of ts) {
    if (t.device !== d) {
      throw new Error(`${op}: tensors are on different devices (${d.kind} and ${t.device.kind})`);
    }
    if (t.disposed) throw new Error(`${op}: input of shape [${t.shape}] was used after dispose()`);
  }
  return d;
}
