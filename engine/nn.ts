/**
 * @file Neural-network modules in the style of `torch.nn`: a `Module` base class that owns named parameters,
 * buffers and submodules, and the layers the diffusion models are built from: `Linear`, `Conv2d`, `GroupNorm`,
 * `SiLU` and `Sequential`. (Model-specific blocks, such as EDM's self-attention, live in models/.)
 *
 * A `forward` marked `@scopedForward` runs in a `forwardScope` (engine/tensor.ts), so it is written as plain
 * maths: its intermediates are freed when it returns unless the tape holds them for `backward`.
 *
 * Modules register their parts explicitly (`registerParameter`, `registerBuffer`, `registerModule`), in the
 * order PyTorch would see them assigned, so `namedParameters()` and `stateDict()` give the same dotted names
 * as PyTorch's `named_parameters()` / `state_dict()` (`"blocks.0.conv.weight"`) and a checkpoint maps
 * one-to-one onto a PyTorch model with the same structure. Parameters are leaf tensors with `requiresGrad`,
 * taken out of any enclosing `scope()` (they live until `module.dispose()`). `loadStateDict` copies into the
 * existing parameters (so an optimizer holding them stays valid), with PyTorch's strictness and shape checks.
 *
 * Initialization follows PyTorch's defaults, drawn from the device's Philox generator (so `manualSeed` makes
 * models reproducible across backends): `kaiming_uniform_(w, a=√5)`, i.e. U(−b, b) with
 * b = gain·√(3/fan_in), gain = √(2/(1+a²)) = √(1/3), hence b = 1/√fan_in; biases U(−1/√fan_in, 1/√fan_in);
 * GroupNorm weight 1, bias 0.
 */

import { cst } from "../kernels/elementwise.ts";
import { type Device, getDefaultDevice } from "./device.ts";
import { forwardScope, keep, type Tensor } from "./tensor.ts";
import { fmt, sameShape } from "./shape.ts";
import { copyInto, map } from "./ops/core.ts";
import { silu } from "./ops/elementwise.ts";
import { randUniform } from "./ops/random.ts";
import { linear } from "./ops/matmul.ts";
import { conv2d, type Pair } from "./ops/conv.ts";
import { groupNorm } from "./ops/norm.ts";
import { loadSafetensors } from "./safetensors.ts";

const VALID_NAME = /^[^.]+$/;

/**
 * Method decorator for a module's `forward`: runs it in a `forwardScope`, so the body is plain maths and its
 * intermediates are freed when it returns, unless a tape recorded them (then they live until the caller's scope
 * ends, after `backward`). Only for forwards whose intermediates nothing else keeps: a forward that calls
 * foreign code which stashes tensors it made (a user's callback) must free its own intermediates instead.
 *
 * ```ts
 * class Block extends nn.Module {
 *   @nn.scopedForward
 *   forward(x: Tensor): Tensor {
 *     return add(x, this.conv.forward(silu(this.norm.forward(x))));
 *   }
 * }
 * ```
 */
export function scopedForward<This, A extends unknown[], R>(
  forward: (this: This, ...args: A) => R,
  _context: ClassMethodDecoratorContext<This, (this: This, ...args: A) => R>,
): (this: This, ...args: A) => R {
  return function (this: This, ...args: A): R {
    return forwardScope(() => forward.apply(this, args));
  };
}

/** Base class of all modules: a tree of named parameters, buffers and submodules. */
export class Module {
  /** Training or evaluation mode (see `train()` / `eval()`); layers like dropout read it. */
  training = true;
  readonly #params = new Map<string, Tensor>();
  readonly #buffers = new Map<string, Tensor>();
  readonly #modules = new Map<string, Module>();

  #checkName(kind: string, name: string) {
    if (!VALID_NAME.test(name)) {
      throw new Error(`${this.constructor.name}: ${kind} name "${name}" must be non-empty without "."`);
    }
    if (this.#params.has(name) || this.#buffers.has(name) || this.#modules.has(name)) {
      throw new Error(`${this.constructor.name}: "${name}" is already registered`);
    }
  }

  /** Makes `t` a parameter called `name` (a gradient-tracking leaf that outlives scopes); returns it. */
  protected registerParameter(name: string, t: Tensor): Tensor {
    this.#checkName("parameter", name);
    if (t.node) {
      throw new Error(
        `${this.constructor.name}: parameter "${name}" must be a leaf tensor, not an op's output`,
      );
    }
    t.requiresGrad = true;
    this.#params.set(name, keep(t));
    return t;
  }

  /** Registers state that is saved in the state dict but not trained (e.g. running statistics); returns it. */
  protected registerBuffer(name: string, t: Tensor): Tensor {
    this.#checkName("buffer", name);
    this.#buffers.set(name, keep(t));
    return t;
  }

  /** Registers a submodule under `name` (its parameters become `name.…`); returns it. */
  protected registerModule<M extends Module>(name: string, m: M): M {
    this.#checkName("module", name);
    if (!(m instanceof Module)) throw new Error(`${this.constructor.name}: "${name}" is not a Module`);
    this.#modules.set(name, m);
    return m;
  }

  /** Direct submodules with their names, in registration order. */
  namedChildren(): [string, Module][] {
    return [...this.#modules];
  }

  /** This module ("" ) and all descendants with dotted names, depth first, like `named_modules()`. */
  namedModules(prefix = ""): [string, Module][] {
    const out: [string, Module][] = [[prefix, this]];
    for (const [n, m] of this.#modules) out.push(...m.namedModules(prefix ? `${prefix}.${n}` : n));
    return out;
  }

  /**
   * Every parameter with its dotted name, own parameters first and then each submodule's, like PyTorch's
   * `named_parameters()`; a tensor shared by two modules is listed once (under its first name).
   */
  namedParameters(): [string, Tensor][] {
    const seen = new Set<Tensor>();
    const out: [string, Tensor][] = [];
    for (const [prefix, m] of this.namedModules()) {
      for (const [n, t] of m.#params) {
        if (seen.has(t)) continue;
        seen.add(t);
        out.push([prefix ? `${prefix}.${n}` : n, t]);
      }
    }
    return out;
  }

  parameters(): Tensor[] {
    return this.namedParameters().map(([, t]) => t);
  }

  namedBuffers(): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const [prefix, m] of this.namedModules()) {
      for (const [n, t] of m.#buffers) out.push([prefix ? `${prefix}.${n}` : n, t]);
    }
    return out;
  }

  /** Number of trainable scalars. */
  parameterCount(): number {
    return this.parameters().reduce((acc, t) => acc + t.size, 0);
  }

  /**
   * Parameters and buffers by dotted name (per module: parameters, buffers, then submodules, like
   * `state_dict()`). The tensors are the live ones, not copies: do not dispose them.
   */
  stateDict(): Record<string, Tensor> {
    const out: Record<string, Tensor> = {};
    const walk = (m: Module, prefix: string) => {
      for (const [n, t] of m.#params) out[prefix + n] = t;
      for (const [n, t] of m.#buffers) out[prefix + n] = t;
      for (const [n, c] of m.#modules) walk(c, `${prefix}${n}.`);
    };
    walk(this, "");
    return out;
  }

  /**
   * Copies tensors into the matching parameters and buffers (in place, so references held elsewhere, e.g. by
   * an optimizer, stay valid). Shapes must match exactly; with `strict` (default) the key sets must match too.
   * Everything is checked before anything is copied. Returns the missing and unexpected keys.
   */
  loadStateDict(
    state: Record<string, Tensor>,
    opts: { strict?: boolean } = {},
  ): { missingKeys: string[]; unexpectedKeys: string[] } {
    const who = `${this.constructor.name}.loadStateDict`;
    const own = this.stateDict();
    const missingKeys = Object.keys(own).filter((k) => !(k in state));
    const unexpectedKeys = Object.keys(state).filter((k) => !(k in own));
    if ((opts.strict ?? true) && (missingKeys.length || unexpectedKeys.length)) {
      const parts: string[] = [];
      if (missingKeys.length) parts.push(`missing key(s): ${missingKeys.map((k) => `"${k}"`).join(", ")}`);
      if (unexpectedKeys.length) {
        parts.push(`unexpected key(s): ${unexpectedKeys.map((k) => `"${k}"`).join(", ")}`);
      }
      throw new Error(`${who}: ${parts.join("; ")}`);
    }
    const pairs: [Tensor, Tensor][] = [];
    for (const [k, dst] of Object.entries(own)) {
      const src = state[k];
      if (!src) continue;
      if (!sameShape(src.shape, dst.shape)) {
        throw new Error(
          `${who}: size mismatch for "${k}": the checkpoint has shape ${fmt(src.shape)}, the model ${
            fmt(dst.shape)
          }`,
        );
      }
      if (src.device !== dst.device) {
        throw new Error(`${who}: "${k}" is on a ${src.device.kind} device, the model on ${dst.device.kind}`);
      }
      if (src.disposed) throw new Error(`${who}: "${k}" was disposed`);
      pairs.push([dst, src]);
    }
    for (const [dst, src] of pairs) if (dst !== src) copyInto(dst, src, dst.shape.map(() => 0));
    return { missingKeys, unexpectedKeys };
  }

  /**
   * Loads parameters and buffers by name from a safetensors file onto the module's device, with
   * `loadStateDict`'s strict rules over the keys `select` keeps (default: all). The file's tensors are freed
   * afterwards, also when the load fails.
   */
  async loadSafetensors(path: string, select: (key: string) => boolean = () => true): Promise<void> {
    const own = Object.values(this.stateDict());
    if (!own.length) throw new Error(`${this.constructor.name}.loadSafetensors: the module has no tensors`);
    const tensors = await loadSafetensors(path, { device: own[0].device });
    try {
      this.loadStateDict(Object.fromEntries(Object.entries(tensors).filter(([k]) => select(k))));
    } finally {
      for (const t of Object.values(tensors)) t.dispose();
    }
  }

  /** Sets training mode on this module and all descendants; returns this. */
  train(mode = true): this {
    for (const [, m] of this.namedModules()) m.training = mode;
    return this;
  }

  /** Evaluation mode (`train(false)`); returns this. */
  eval(): this {
    return this.train(false);
  }

  /** Releases every parameter's gradient. */
  zeroGrad(): void {
    for (const p of this.parameters()) {
      p.grad?.dispose();
      p.grad = null;
    }
  }

  /**
   * Frees this module's parameters, buffers and their gradients, then calls each child's `dispose()` (so a
   * subclass that holds other tensors frees them by overriding it).
   */
  dispose(): void {
    for (const t of [...this.#params.values(), ...this.#buffers.values()]) {
      t.grad?.dispose();
      t.grad = null;
      t.dispose();
    }
    for (const [, child] of this.namedChildren()) child.dispose();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Initialization.

/**
 * PyTorch's `kaiming_uniform_` bound for a leaky-ReLU slope `a`: gain·√(3/fan_in) with gain = √(2/(1+a²)).
 * With the default a = √5 of Linear/Conv2d this is 1/√fan_in.
 */
export function kaimingUniformBound(fanIn: number, a = Math.sqrt(5)): number {
  return Math.sqrt(2 / (1 + a * a)) * Math.sqrt(3 / fanIn);
}

/** U(−bound, bound) of `shape` from the device generator (bound 0 gives zeros). */
function uniformInit(shape: number[], bound: number, device: Device): Tensor {
  return randUniform(shape, -bound, bound, { device });
}

export interface LayerOptions {
  /** Device of the parameters (default: the default device). */
  device?: Device;
  /** Whether the layer has an additive bias (default true). */
  bias?: boolean;
}

// ---------------------------------------------------------------------------------------------------------------
// Layers.

/** `y = x·Wᵀ + b` with weight [outFeatures, inFeatures] and bias [outFeatures], like `nn.Linear`. */
export class Linear extends Module {
  readonly weight: Tensor;
  readonly bias: Tensor | null;

  constructor(readonly inFeatures: number, readonly outFeatures: number, opts: LayerOptions = {}) {
    super();
    for (const [k, v] of [["inFeatures", inFeatures], ["outFeatures", outFeatures]] as const) {
      if (!Number.isInteger(v) || v < 1) throw new Error(`Linear: ${k} must be a positive integer, got ${v}`);
    }
    const device = opts.device ?? getDefaultDevice();
    const bound = 1 / Math.sqrt(inFeatures);
    this.weight = this.registerParameter(
      "weight",
      uniformInit([outFeatures, inFeatures], kaimingUniformBound(inFeatures), device),
    );
    this.bias = (opts.bias ?? true)
      ? this.registerParameter("bias", uniformInit([outFeatures], bound, device))
      : null;
  }

  forward(x: Tensor): Tensor {
    return linear(x, this.weight, this.bias);
  }
}

export interface Conv2dLayerOptions extends LayerOptions {
  /** Default 1. */
  stride?: Pair;
  /** Zero padding per side (default 0), or "valid" / "same". */
  padding?: Pair | "valid" | "same";
}

/** 2-D convolution with weight [out, in, kH, kW] and bias [out], like `nn.Conv2d` (no groups or dilation). */
export class Conv2d extends Module {
  readonly weight: Tensor;
  readonly bias: Tensor | null;
  readonly kernelSize: [number, number];
  readonly stride?: Pair;
  readonly padding?: Pair | "valid" | "same";

  constructor(
    readonly inChannels: number,
    readonly outChannels: number,
    kernelSize: Pair,
    opts: Conv2dLayerOptions = {},
  ) {
    super();
    for (const [k, v] of [["inChannels", inChannels], ["outChannels", outChannels]] as const) {
      if (!Number.isInteger(v) || v < 1) throw new Error(`Conv2d: ${k} must be a positive integer, got ${v}`);
    }
    const ks: [number, number] = typeof kernelSize === "number" ? [kernelSize, kernelSize] : [...kernelSize];
    if (!ks.every((k) => Number.isInteger(k) && k >= 1)) {
      throw new Error(
        `Conv2d: kernelSize must be a positive integer or a pair of them, got ${JSON.stringify(kernelSize)}`,
      );
    }
    this.kernelSize = ks;
    this.stride = opts.stride;
    this.padding = opts.padding;
    const device = opts.device ?? getDefaultDevice();
    const fanIn = inChannels * ks[0] * ks[1];
    this.weight = this.registerParameter(
      "weight",
      uniformInit([outChannels, inChannels, ks[0], ks[1]], kaimingUniformBound(fanIn), device),
    );
    this.bias = (opts.bias ?? true)
      ? this.registerParameter("bias", uniformInit([outChannels], 1 / Math.sqrt(fanIn), device))
      : null;
  }

  forward(x: Tensor): Tensor {
    return conv2d(x, this.weight, this.bias, { stride: this.stride, padding: this.padding });
  }
}

/** Group normalization over [N, C, ...] with per-channel affine weight (ones) and bias (zeros), like `nn.GroupNorm`. */
export class GroupNorm extends Module {
  readonly weight: Tensor | null;
  readonly bias: Tensor | null;
  readonly eps: number;

  constructor(
    readonly numGroups: number,
    readonly numChannels: number,
    opts: { eps?: number; affine?: boolean; device?: Device } = {},
  ) {
    super();
    if (
      !Number.isInteger(numGroups) || numGroups < 1 || !Number.isInteger(numChannels) ||
      numChannels % numGroups
    ) {
      throw new Error(`GroupNorm: numChannels ${numChannels} must be divisible by numGroups ${numGroups}`);
    }
    this.eps = opts.eps ?? 1e-5;
    const device = opts.device ?? getDefaultDevice();
    const filled = (v: number) => map(cst(0), [], [v], { shape: [numChannels], device });
    const affine = opts.affine ?? true;
    this.weight = affine ? this.registerParameter("weight", filled(1)) : null;
    this.bias = affine ? this.registerParameter("bias", filled(0)) : null;
  }

  forward(x: Tensor): Tensor {
    if (x.rank >= 2 && x.shape[1] !== this.numChannels) {
      throw new Error(`GroupNorm: expected ${this.numChannels} channels, got input ${fmt(x.shape)}`);
    }
    return groupNorm(x, this.numGroups, this.weight, this.bias, this.eps);
  }
}

/** x·sigmoid(x), like `nn.SiLU`. */
export class SiLU extends Module {
  forward(x: Tensor): Tensor {
    return silu(x);
  }
}

/** A module with a one-tensor forward, for `Sequential`. */
export interface Layer extends Module {
  forward(x: Tensor): Tensor;
}

/** Applies its layers in order; they are named "0", "1", … like `nn.Sequential`. */
export class Sequential extends Module {
  readonly layers: readonly Layer[];
  constructor(...layers: Layer[]) {
    super();
    this.layers = layers.map((l, i) => this.registerModule(String(i), l));
  }
  forward(x: Tensor): Tensor {
    let h = x;
    for (const l of this.layers) {
      const next = l.forward(h);
      // Without a tape, intermediate activations are garbage as soon as the next layer has run.
      if (h !== x && next !== h && !next.requiresGrad) h.dispose();
      h = next;
    }
    return h;
  }
}
