/**
 * @file Optimizers with PyTorch semantics, updating parameters in place on the device: `Adam`, `AdamW`,
 * global-norm gradient clipping (`clipGradNorm`), an exponential moving average of parameters (`EMA`, with a
 * given β; how a training recipe picks β, e.g. EDM's half-life rule, is the models layer's business), and
 * `zeroGrad`.
 *
 * Nothing here reads back to the host. A step is a few fused multi-tensor kernels (up to `MAX_GROUP` parameters
 * updated in place per dispatch, their exp_avg and exp_avg_sq in two flat buffers; see `kernels/optim.ts`), with
 * the step count and bias corrections computed on the host, which already knows them. Clipping computes the
 * global L2 norm on the device and returns it as a tensor; the clip coefficient either scales the gradients in
 * place (`clipGradNorm`, like `torch.nn.utils.clip_grad_norm_`) or is handed to `step({ gradScale })`, which
 * multiplies it in inside the fused update (`gradClipCoefficient`).
 *
 * Optimizer state is named after the parameters (dotted module names when given `module.namedParameters()`, or
 * "0", "1", … for a plain list) so that `stateDict()` can go into a safetensors checkpoint: tensors
 * `<name>.exp_avg`, `<name>.exp_avg_sq` plus JSON-able numbers (hyper-parameters and per-parameter steps).
 */

import { cst, inp } from "../kernels/elementwise.ts";
import {
  adam,
  adamGroupSize,
  clipFinish,
  ema,
  emaGroupSize,
  lockstepGroups,
  scaleInPlace,
  SUMSQ_CHUNK,
  sumSquares,
} from "../kernels/optim.ts";
import type { Device, Storage } from "./device.ts";
import { keep, type Tensor } from "./tensor.ts";
import { fmt, sameShape } from "./shape.ts";
import { copyInto, gather, map, view } from "./ops/core.ts";
import { contiguousStrides } from "../kernels/layout.ts";

/** Parameters as a list, as (name, tensor) pairs, or as anything with `namedParameters()` (an nn.Module). */
export type ParamsInput =
  | readonly Tensor[]
  | readonly (readonly [string, Tensor])[]
  | { namedParameters(): (readonly [string, Tensor])[] };

/** Normalises `ParamsInput` to named pairs; plain lists are named by index. Rejects duplicates. */
export function namedParams(params: ParamsInput, who = "optimizer"): [string, Tensor][] {
  let pairs: [string, Tensor][];
  if ("namedParameters" in params && typeof params.namedParameters === "function") {
    pairs = params.namedParameters().map(([n, t]) => [n, t]);
  } else {
    const list = params as readonly (Tensor | readonly [string, Tensor])[];
    pairs = list.map((x, i) => (Array.isArray(x) ? [x[0], x[1]] : [String(i), x as Tensor]));
  }
  const seen = new Set<Tensor>(), names = new Set<string>();
  for (const [n, t] of pairs) {
    if (seen.has(t)) throw new Error(`${who}: parameter "${n}" appears more than once`);
    if (names.has(n)) throw new Error(`${who}: two parameters are named "${n}"`);
    seen.add(t);
    names.add(n);
  }
  return pairs;
}

/** Releases every gradient (PyTorch's `zero_grad(set_to_none=True)`): the next backward starts fresh. */
export function zeroGrad(params: ParamsInput): void {
  for (const [, p] of namedParams(params, "zeroGrad")) {
    p.grad?.dispose();
    p.grad = null;
  }
}

const cloneKept = (t: Tensor): Tensor => keep(map(inp(0), [t]));

function checkScalar(who: string, t: Tensor, device: Device) {
  if (t.size !== 1) throw new Error(`${who}: gradScale must have one element, got shape ${fmt(t.shape)}`);
  if (t.device !== device) throw new Error(`${who}: gradScale is on another device than the parameters`);
}

/** The adapter's storage-buffer limit, which bounds a multi-tensor dispatch (none on the CPU backend). */
const maxStorageBuffers = (device: Device): number | undefined =>
  device.info.limits.maxStorageBuffersPerShaderStage;

/**
 * Splits `items` into the tensors of multi-tensor dispatches: per device, at most `size(item)` each, of similar
 * sizes (`lockstepGroups`).
 */
function groupsOf<T extends { p: Tensor }>(items: readonly T[], size: (first: T) => number): T[][] {
  const byDevice = new Map<Device, T[]>();
  for (const item of items) {
    const list = byDevice.get(item.p.device);
    if (list) list.push(item);
    else byDevice.set(item.p.device, [item]);
  }
  return [...byDevice.values()].flatMap((list) =>
    lockstepGroups(list.map((x) => x.p.size), size(list[0])).map((g) => g.map((i) => list[i]))
  );
}

/** `shadow = β·shadow + (1−β)·p` for each pair, several pairs per dispatch. */
function emaUpdate(pairs: readonly { p: Tensor; shadow: Tensor }[], beta: number): void {
  for (const group of groupsOf(pairs, (x) => emaGroupSize(maxStorageBuffers(x.p.device)))) {
    group[0].p.device.run(
      ema,
      { sizes: group.map((x) => x.p.size), beta },
      group.map((x) => x.p.storage),
      group.map((x) => x.shadow.mutableStorage),
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Adam / AdamW.

export interface AdamOptions {
  /** Learning rate (default 1e-3). May be changed between steps via `optimizer.lr`. */
  lr?: number;
  /** Coefficients of the running averages of the gradient and its square (default [0.9, 0.999]). */
  betas?: readonly [number, number];
  /** Added to the denominator (default 1e-8). */
  eps?: number;
  /** L2 penalty (Adam, default 0) or decoupled decay (AdamW, default 1e-2). */
  weightDecay?: number;
}

/** Steps taken by one parameter (0: no state yet); its moments live in the device's `FlatState`. */
interface ParamState {
  step: number;
}

/**
 * Adam's two moment estimates for every parameter on one device, each in one flat buffer (the `adam` kernel
 * binds the two buffers once per dispatch instead of two buffers per tensor, so a dispatch updates twice as many
 * tensors). Parameter k's moments start at a multiple of 4 (vec4 access); a parameter's region stays zero until
 * its first step, as a fresh state would be.
 */
class FlatState {
  readonly expAvg: Tensor;
  readonly expAvgSq: Tensor;
  readonly #offsets = new Map<Tensor, number>();

  constructor(params: readonly Tensor[], device: Device) {
    let total = 0;
    for (const p of params) {
      this.#offsets.set(p, total);
      total += Math.ceil(p.size / 4) * 4;
    }
    this.expAvg = keep(map(cst(0), [], [0], { shape: [total], device }));
    this.expAvgSq = keep(map(cst(0), [], [0], { shape: [total], device }));
  }

  offset(p: Tensor): number {
    const o = this.#offsets.get(p);
    if (o === undefined) throw new Error("Adam: a parameter has no place in the optimizer state");
    return o;
  }

  /** A copy of p's exp_avg or exp_avg_sq, shaped like p. */
  read(p: Tensor, which: "expAvg" | "expAvgSq"): Tensor {
    return keep(gather(this[which], p.shape, contiguousStrides(p.shape), this.offset(p)));
  }

  /** Copies `t` (shaped like p) into p's region of exp_avg or exp_avg_sq. */
  write(p: Tensor, which: "expAvg" | "expAvgSq", t: Tensor): void {
    const flat = view(t, [t.size]);
    copyInto(this[which], flat, [this.offset(p)]);
    flat.dispose();
  }

  dispose(): void {
    this.expAvg.dispose();
    this.expAvgSq.dispose();
  }
}

/** What `stateDict()` returns: named state tensors plus JSON-serialisable numbers. */
export interface OptimizerState {
  /**
   * `<param name>.exp_avg` and `<param name>.exp_avg_sq`: copies the optimizer owns until its next `stateDict()`
   * or `dispose()` (do not dispose them).
   */
  tensors: Record<string, Tensor>;
  meta: {
    type: string;
    lr: number;
    betas: [number, number];
    eps: number;
    weightDecay: number;
    /** Steps taken per parameter name (parameters that never had a gradient are absent). */
    steps: Record<string, number>;
  };
}

function checkHyper(who: string, lr: number, betas: readonly number[], eps: number, wd: number) {
  if (!(lr >= 0)) throw new Error(`${who}: invalid learning rate ${lr}`);
  if (!(eps >= 0)) throw new Error(`${who}: invalid epsilon value ${eps}`);
  if (betas.length !== 2) throw new Error(`${who}: betas must be two numbers, got [${betas}]`);
  betas.forEach((b, i) => {
    if (!(b >= 0 && b < 1)) throw new Error(`${who}: invalid beta parameter at index ${i}: ${b}`);
  });
  if (!(wd >= 0)) throw new Error(`${who}: invalid weight_decay value ${wd}`);
}

/**
 * `torch.optim.Adam` (amsgrad off): per element, with g the (optionally scaled) gradient,
 * `g += wd·p; m = lerp(m, g, 1−β1); v = β2·v + (1−β2)·g²; p −= lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps)`.
 */
export class Adam {
  lr: number;
  betas: [number, number];
  eps: number;
  weightDecay: number;
  readonly params: readonly [string, Tensor][];
  protected readonly decoupled: boolean = false;
  readonly #state = new Map<Tensor, ParamState>();
  readonly #flat = new Map<Device, FlatState>();
  /** The copies the last `stateDict()` handed out. */
  #snapshots: Tensor[] = [];

  constructor(params: ParamsInput, opts: AdamOptions = {}) {
    this.params = namedParams(params, this.constructor.name);
    this.lr = opts.lr ?? 1e-3;
    this.betas = [...(opts.betas ?? [0.9, 0.999])] as [number, number];
    this.eps = opts.eps ?? 1e-8;
    this.weightDecay = opts.weightDecay ?? this.defaultWeightDecay();
    checkHyper(this.constructor.name, this.lr, this.betas, this.eps, this.weightDecay);
    if (!this.params.length) throw new Error(`${this.constructor.name}: got an empty parameter list`);
  }

  protected defaultWeightDecay(): number {
    return 0;
  }

  /**
   * Updates every parameter that has a gradient, in place. `gradScale` (a one-element device tensor, e.g. the
   * coefficient from `gradClipCoefficient`) multiplies each gradient inside the update. With `ema`, the moving
   * average then follows every parameter with that β, as `ema.average.update(ema.beta)` after the step would,
   * but in the same dispatches as the parameters' update (parameters without a gradient get the plain EMA).
   * Records no tape and reads nothing back.
   */
  step(opts: { gradScale?: Tensor; ema?: { average: EMA; beta: number } } = {}): void {
    const who = this.constructor.name;
    checkHyper(who, this.lr, this.betas, this.eps, this.weightDecay);
    const average = opts.ema?.average, beta = opts.ema?.beta ?? 0;
    if (average) {
      EMA.checkBeta(beta);
      for (const [name] of this.params) {
        if (!average.shadow.has(name)) throw new Error(`${who}: the EMA has no average for "${name}"`);
      }
      if (average.params.length !== this.params.length) {
        throw new Error(
          `${who}: the EMA tracks ${average.params.length} parameters, the optimizer ${this.params.length}`,
        );
      }
    }
    // Validate everything before the first dispatch, then update the parameters in groups.
    const updates: { p: Tensor; g: Tensor; s: ParamState; offset: number; shadow?: Tensor }[] = [];
    const averageOnly: { p: Tensor; shadow: Tensor }[] = [];
    for (const [name, p] of this.params) {
      const g = p.grad;
      const shadow = average?.shadow.get(name);
      if (!g) {
        if (shadow) averageOnly.push({ p, shadow });
        continue;
      }
      if (!sameShape(g.shape, p.shape)) {
        throw new Error(`${who}: gradient of "${name}" has shape ${fmt(g.shape)}, parameter ${fmt(p.shape)}`);
      }
      if (g.device !== p.device) throw new Error(`${who}: gradient of "${name}" is on another device`);
      if (opts.gradScale) checkScalar(who, opts.gradScale, p.device);
      let s = this.#state.get(p);
      if (!s) this.#state.set(p, s = { step: 0 });
      updates.push({ p, g, s, offset: this.#flatOn(p.device).offset(p), shadow });
    }
    for (const u of updates) u.s.step++;
    // One dispatch per group of tensors on the same device (as many as the adapter's bindings allow).
    const withEma = !!average;
    const size = (u: { p: Tensor }) =>
      adamGroupSize(maxStorageBuffers(u.p.device), { scaled: !!opts.gradScale, ema: withEma });
    for (const group of groupsOf(updates, size)) {
      const device = group[0].p.device, flat = this.#flatOn(device);
      const inputs = group.map((u) => u.g.storage);
      if (opts.gradScale) inputs.push(opts.gradScale.storage);
      const outputs: Storage[] = [];
      for (const u of group) {
        outputs.push(u.p.mutableStorage);
        if (withEma) outputs.push(u.shadow!.mutableStorage);
      }
      outputs.push(flat.expAvg.mutableStorage, flat.expAvgSq.mutableStorage);
      device.run(
        adam,
        {
          tensors: group.map((u) => ({ n: u.p.size, step: u.s.step, offset: u.offset })),
          lr: this.lr,
          beta1: this.betas[0],
          beta2: this.betas[1],
          eps: this.eps,
          weightDecay: this.weightDecay,
          decoupled: this.decoupled,
          scaled: !!opts.gradScale,
          ema: withEma ? { beta } : undefined,
        },
        inputs,
        outputs,
      );
    }
    emaUpdate(averageOnly, beta);
  }

  /** Releases the gradients of this optimizer's parameters. */
  zeroGrad(): void {
    zeroGrad(this.params);
  }

  /** The flat state of the parameters on `device`, made (zero) at first use. */
  #flatOn(device: Device): FlatState {
    let flat = this.#flat.get(device);
    if (!flat) {
      flat = new FlatState(this.params.map(([, p]) => p).filter((p) => p.device === device), device);
      this.#flat.set(device, flat);
    }
    return flat;
  }

  #disposeSnapshots(): void {
    for (const t of this.#snapshots) t.dispose();
    this.#snapshots = [];
  }

  /**
   * The state for a checkpoint (see `OptimizerState`): the tensors are copies taken now, which this optimizer
   * frees at its next `stateDict()` or `dispose()`.
   */
  stateDict(): OptimizerState {
    this.#disposeSnapshots();
    const tensors: Record<string, Tensor> = {};
    const steps: Record<string, number> = {};
    for (const [name, p] of this.params) {
      const s = this.#state.get(p);
      if (!s) continue;
      const flat = this.#flatOn(p.device);
      tensors[`${name}.exp_avg`] = flat.read(p, "expAvg");
      tensors[`${name}.exp_avg_sq`] = flat.read(p, "expAvgSq");
      this.#snapshots.push(tensors[`${name}.exp_avg`], tensors[`${name}.exp_avg_sq`]);
      steps[name] = s.step;
    }
    return {
      tensors,
      meta: {
        type: this.constructor.name,
        lr: this.lr,
        betas: [...this.betas],
        eps: this.eps,
        weightDecay: this.weightDecay,
        steps,
      },
    };
  }

  /**
   * Restores hyper-parameters and per-parameter state (copied: the given tensors stay the caller's). Names and
   * shapes must match this optimizer's parameters; the tensors must be on the parameters' device.
   */
  loadStateDict(state: OptimizerState): void {
    const who = `${this.constructor.name}.loadStateDict`;
    const { meta, tensors } = state;
    if (meta.type !== this.constructor.name) {
      throw new Error(`${who}: state is from a ${meta.type} optimizer, not ${this.constructor.name}`);
    }
    checkHyper(who, meta.lr, meta.betas, meta.eps, meta.weightDecay);
    const byName = new Map(this.params);
    for (const name of Object.keys(meta.steps)) {
      if (!byName.has(name)) throw new Error(`${who}: state for unknown parameter "${name}"`);
    }
    const expected = new Set<string>();
    const incoming = new Map<Tensor, { step: number; expAvg: Tensor; expAvgSq: Tensor }>();
    for (const [name, p] of this.params) {
      const step = meta.steps[name];
      if (step === undefined) continue;
      if (!Number.isInteger(step) || step < 1) {
        throw new Error(`${who}: step ${step} of "${name}" is invalid`);
      }
      const pick = (key: string) => {
        const t = tensors[key];
        expected.add(key);
        if (!t) throw new Error(`${who}: missing tensor "${key}"`);
        if (!sameShape(t.shape, p.shape)) {
          throw new Error(
            `${who}: "${key}" has shape ${fmt(t.shape)}, parameter "${name}" has ${fmt(p.shape)}`,
          );
        }
        if (t.device !== p.device) {
          throw new Error(`${who}: "${key}" is on another device than parameter "${name}"`);
        }
        return t;
      };
      incoming.set(p, { step, expAvg: pick(`${name}.exp_avg`), expAvgSq: pick(`${name}.exp_avg_sq`) });
    }
    for (const key of Object.keys(tensors)) {
      if (!expected.has(key)) throw new Error(`${who}: unexpected tensor "${key}"`);
    }
    // Everything validated: replace the state (fresh zero buffers, then the incoming moments copied in).
    for (const flat of this.#flat.values()) flat.dispose();
    this.#flat.clear();
    this.#state.clear();
    for (const [p, s] of incoming) {
      this.#state.set(p, { step: s.step });
      const flat = this.#flatOn(p.device);
      flat.write(p, "expAvg", s.expAvg);
      flat.write(p, "expAvgSq", s.expAvgSq);
    }
    this.lr = meta.lr;
    this.betas = [meta.betas[0], meta.betas[1]];
    this.eps = meta.eps;
    this.weightDecay = meta.weightDecay;
  }

  /** Frees the optimizer state (not the parameters). */
  dispose(): void {
    this.#disposeSnapshots();
    for (const flat of this.#flat.values()) flat.dispose();
    this.#flat.clear();
    this.#state.clear();
  }
}

/**
 * `torch.optim.AdamW`: Adam with decoupled weight decay, `p *= 1 − lr·wd` before the Adam update
 * (default weightDecay 1e-2).
 */
export class AdamW extends Adam {
  protected override readonly decoupled: boolean = true;
  protected override defaultWeightDecay(): number {
    return 1e-2;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Gradient clipping.

/**
 * The global L2 norm of all gradients and the clip coefficient `min(maxNorm / (norm + 1e-6), 1)`, both as
 * one-element (shape []) device tensors; the gradients are untouched. Parameters without a gradient are
 * skipped; with none at all the norm is 0.
 */
export function gradClipCoefficient(params: ParamsInput, maxNorm: number): { norm: Tensor; coef: Tensor } {
  if (!(maxNorm >= 0)) throw new Error(`clipGradNorm: maxNorm ${maxNorm} must be ≥ 0`);
  const grads = namedParams(params, "clipGradNorm").map(([, p]) => p.grad).filter((g): g is Tensor => !!g);
  if (!grads.length) {
    const device = namedParams(params, "clipGradNorm")[0]?.[1].device;
    if (!device) throw new Error("clipGradNorm: got an empty parameter list");
    return {
      norm: map(cst(0), [], [0], { shape: [], device }),
      coef: map(cst(0), [], [1], { shape: [], device }),
    };
  }
  const device = grads[0].device;
  for (const g of grads) {
    if (g.device !== device) throw new Error("clipGradNorm: gradients are on different devices");
  }
  const counts = grads.map((g) => Math.ceil(g.size / SUMSQ_CHUNK));
  const total = counts.reduce((a, b) => a + b, 0);
  const partials = map(cst(0), [], [0], { shape: [total], device });
  let offset = 0;
  grads.forEach((g, i) => {
    device.run(sumSquares, { n: g.size, offset }, [g.storage], [partials.storage]);
    offset += counts[i];
  });
  const norm = map(cst(0), [], [0], { shape: [], device });
  const coef = map(cst(0), [], [0], { shape: [], device });
  device.run(clipFinish, { count: total, maxNorm }, [partials.storage], [norm.storage, coef.storage]);
  partials.dispose();
  return { norm, coef };
}

/**
 * `torch.nn.utils.clip_grad_norm_`: scales all gradients in place by `min(maxNorm / (norm + 1e-6), 1)` where
 * `norm` is the L2 norm of all gradients together, computed on the device. Returns that norm (shape []), still
 * on the device: reading it is up to the caller.
 */
export function clipGradNorm(params: ParamsInput, maxNorm: number): Tensor {
  const { norm, coef } = gradClipCoefficient(params, maxNorm);
  // Two gradients may share one allocation (an add passes its gradient to both operands as views): scale each
  // allocation once.
  const scaled = new Set<unknown>();
  for (const [, p] of namedParams(params, "clipGradNorm")) {
    if (!p.grad || scaled.has(p.grad.storage)) continue;
    scaled.add(p.grad.storage);
    p.device.run(scaleInPlace, { n: p.grad.size }, [coef.storage], [p.grad.mutableStorage]);
  }
  coef.dispose();
  return norm;
}

// ---------------------------------------------------------------------------------------------------------------
// Exponential moving average.

/**
 * An exponential moving average of parameters: `shadow = β·shadow + (1−β)·param` in place on each `update`.
 * The shadow starts as a copy of the parameters.
 */
export class EMA {
  beta: number;
  readonly params: readonly [string, Tensor][];
  /** The averaged tensors, by parameter name. */
  readonly shadow: ReadonlyMap<string, Tensor>;

  constructor(params: ParamsInput, opts: { beta?: number } = {}) {
    this.params = namedParams(params, "EMA");
    this.beta = opts.beta ?? 0.999;
    EMA.checkBeta(this.beta);
    this.shadow = new Map(this.params.map(([n, p]) => [n, cloneKept(p)]));
  }

  static checkBeta(beta: number): void {
    if (!(beta >= 0 && beta <= 1)) throw new Error(`EMA: beta ${beta} must be in [0, 1]`);
  }

  /** One averaging step with `beta` (default: this.beta); no tape, no readback. */
  update(beta: number = this.beta): void {
    EMA.checkBeta(beta);
    emaUpdate(this.params.map(([name, p]) => ({ p, shadow: this.shadow.get(name)! })), beta);
  }

  /** Copies the averages into `target` (default: the tracked parameters), matched by name, e.g. for evaluation. */
  copyTo(target: ParamsInput = this.params): void {
    for (const [name, p] of namedParams(target, "EMA.copyTo")) {
      const s = this.shadow.get(name);
      if (!s) throw new Error(`EMA.copyTo: no average for parameter "${name}"`);
      if (!sameShape(s.shape, p.shape)) {
        throw new Error(`EMA.copyTo: "${name}" has shape ${fmt(p.shape)}, its average ${fmt(s.shape)}`);
      }
      copyInto(p, s, p.shape.map(() => 0));
    }
  }

  /** The averages by parameter name (live references: do not dispose). */
  stateDict(): Record<string, Tensor> {
    return Object.fromEntries(this.shadow);
  }

  /** Copies saved averages in; every name must be present with the right shape. */
  loadStateDict(state: Record<string, Tensor>): void {
    for (const key of Object.keys(state)) {
      if (!this.shadow.has(key)) throw new Error(`EMA.loadStateDict: unexpected key "${key}"`);
    }
    for (const [name, s] of this.shadow) {
      const t = state[name];
      if (!t) throw new Error(`EMA.loadStateDict: missing key "${name}"`);
      if (!sameShape(t.shape, s.shape)) {
        throw new Error(`EMA.loadStateDict: "${name}" has shape ${fmt(t.shape)}, expected ${fmt(s.shape)}`);
      }
      if (t.device !== s.device) throw new Error(`EMA.loadStateDict: "${name}" is on another device`);
    }
    for (const [name, s] of this.shadow) copyInto(s, state[name], s.shape.map(() => 0));
  }

  dispose(): void {
    for (const s of this.shadow.values()) s.dispose();
  }
}
