/**
 * @file Weight inheritance: a new candidate starts from the weights of the closest trained one.
 *
 * DiffNAS's rapid-convergence strategy makes each candidate cheap to train; inheriting weights is the usual way
 * to do that in NAS (network morphism, Wei et al. 2016; the shared weights of once-for-all and slimmable
 * supernets, which models/slimmable.ts uses too). Two UNets of the family name their tensors by position
 * (`enc.16x16_block0.conv0.weight`), so a tensor that both networks have is found by name; where the shapes
 * differ (other channel counts) the leading slice that both have is copied (the parent's first `min(a, b)`
 * entries along every axis), exactly the slice a slimmable layer would use at a smaller width. Everything else
 * keeps its fresh initialisation. Tensors of other rank are skipped.
 *
 * The parent's weights are kept on the host (`HostState`), read back once when its trial finishes, so they can
 * be saved in the run folder and survive a restart.
 */

import { cat, type Device, type nn, noGrad, reshape, type Tensor, tensor } from "../engine/mod.ts";

/** A state dict on the host: the tensors' shapes and float32 values by name. */
export type HostState = Record<string, { shape: number[]; data: Float32Array }>;

/** What `inheritWeights` did, by tensor count. */
export interface InheritStats {
  /** Same name, same shape: copied whole. */
  copied: number;
  /** Same name and rank, other shape: the common leading slice copied. */
  sliced: number;
  /** Only in the child, or of another rank: initialised fresh. */
  fresh: number;
}

/** Reads a module's parameters and buffers back to the host in one readback (a sync costs ~11 ms). */
export async function hostState(module: nn.Module): Promise<HostState> {
  const entries = Object.entries(module.stateDict());
  if (!entries.length) return {};
  const flat = noGrad(() => cat(entries.map(([, t]) => reshape(t, [t.size]))));
  let all: Float32Array;
  try {
    all = await flat.toArray();
  } finally {
    flat.dispose();
  }
  const out: HostState = {};
  let at = 0;
  for (const [name, t] of entries) {
    out[name] = { shape: [...t.shape], data: all.slice(at, at += t.size) };
  }
  return out;
}

/** Row-major strides of a shape. */
function strides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length).fill(1);
  for (let i = shape.length - 2; i >= 0; i--) s[i] = s[i + 1] * shape[i + 1];
  return s;
}

/**
 * `child` with the leading block that it shares with `parent` replaced by the parent's values (both row-major
 * of equal rank). A new array; `child` is not changed.
 */
export function overlayLeadingSlice(
  child: { shape: readonly number[]; data: Float32Array },
  parent: { shape: readonly number[]; data: Float32Array },
): Float32Array {
  const rank = child.shape.length;
  if (parent.shape.length !== rank) {
    throw new Error(`overlayLeadingSlice: ranks differ ([${child.shape}] and [${parent.shape}])`);
  }
  const out = Float32Array.from(child.data);
  const common = child.shape.map((n, i) => Math.min(n, parent.shape[i]));
  if (common.some((n) => n === 0)) return out;
  const cs = strides(child.shape), ps = strides(parent.shape);
  const inner = common[rank - 1] ?? 1;
  const idx = new Array<number>(Math.max(rank - 1, 0)).fill(0);
  // Walk every index of the outer axes; copy one contiguous inner run per index.
  for (;;) {
    let co = 0, po = 0;
    for (let i = 0; i < rank - 1; i++) {
      co += idx[i] * cs[i];
      po += idx[i] * ps[i];
    }
    out.set(parent.data.subarray(po, po + inner), co);
    let d = rank - 2;
    while (d >= 0 && ++idx[d] === common[d]) idx[d--] = 0;
    if (d < 0) break;
  }
  return out;
}

/**
 * The state a child starts from: its fresh initialisation `fresh`, with every tensor that `parent` has by name
 * replaced whole where the shapes match, else its common leading slice overlaid. Pure (host arrays).
 */
export function inheritState(fresh: HostState, parent: HostState): { state: HostState; stats: InheritStats } {
  const stats: InheritStats = { copied: 0, sliced: 0, fresh: 0 };
  const state: HostState = {};
  for (const [name, t] of Object.entries(fresh)) {
    const p = parent[name];
    if (!p || p.shape.length !== t.shape.length) {
      stats.fresh++;
      state[name] = t;
    } else if (p.shape.every((n, i) => n === t.shape[i])) {
      stats.copied++;
      state[name] = { shape: t.shape, data: Float32Array.from(p.data) };
    } else {
      stats.sliced++;
      state[name] = { shape: t.shape, data: overlayLeadingSlice(t, p) };
    }
  }
  return { state, stats };
}

/** Uploads a host state to `device` as tensors (the caller disposes them). */
export function stateTensors(state: HostState, device: Device): Record<string, Tensor> {
  return Object.fromEntries(
    Object.entries(state).map(([name, t]) => [name, tensor(t.data, t.shape, { device })]),
  );
}

/**
 * Copies into `child` every tensor of `parent` that it has by name (see `inheritState`). Runs in place through
 * `loadStateDict`, so an optimizer built on `child` stays valid.
 */
export async function inheritWeights(child: nn.Module, parent: HostState): Promise<InheritStats> {
  const { state, stats } = inheritState(await hostState(child), parent);
  const own = Object.values(child.stateDict());
  if (!own.length) return stats;
  const tensors = stateTensors(state, own[0].device);
  try {
    child.loadStateDict(tensors);
  } finally {
    for (const t of Object.values(tensors)) t.dispose();
  }
  return stats;
}
