/**
 * @file Training checkpoints: everything needed to continue a run exactly where it stopped.
 *
 * A checkpoint is a folder `<run>/checkpoints/step-NNNNNNNNN/` holding
 *
 * - `model.safetensors`: the network's parameters and buffers (PyTorch-style dotted names, F32),
 * - `ema.safetensors`: the exponential moving average of the parameters (the weights one samples with; EDM
 *   snapshots hold only these),
 * - `optimizer.safetensors`: Adam's `<param>.exp_avg` / `<param>.exp_avg_sq`,
 * - `state.json`: the step and images seen, the data iterator's position, the device generator's Philox key and
 *   counter, the optimizer's hyper-parameters and per-parameter step counts, the resolved training
 *   configuration and the loss history.
 *
 * The folder is written under a temporary name next to its final one and renamed when complete, so a crash
 * mid-save leaves either the previous checkpoints or the new one, never a half-written one (a rename of a folder
 * is atomic on one file system). Each file is flushed to disk before the rename and the folders after it, so a
 * power loss cannot leave a checkpoint folder whose files are empty or a rename that is undone. Before anything is written, every tensor is read back (a few batched reads, not
 * one per tensor) and checked to be finite: a diverged run cannot overwrite good checkpoints with NaNs.
 * The newest `keep` checkpoints are kept; older ones are deleted after the new one is in place.
 */

import { z } from "zod";
import {
  cat,
  type Device,
  encodeSafetensors,
  type HostTensor,
  loadSafetensorsWithMetadata,
  noGrad,
  optim,
  reshape,
  type Tensor,
} from "../engine/mod.ts";
import { zodMessage } from "../util/config.ts";
import { syncDir, writeNewFileSynced } from "../util/files.ts";

// ---------------------------------------------------------------------------------------------------------------
// The state file.

const nonNegInt = z.number().int().nonnegative();

/** One logged point of the loss curve. */
export const LossPointSchema = z.object({
  // Optimizer steps taken when the loss was logged.
  step: nonNegInt,
  // Training images seen by then.
  nimg: nonNegInt,
  // Mean loss over the steps since the previous log (full width).
  loss: z.number(),
});
export type LossPoint = z.infer<typeof LossPointSchema>;

/** Adam's JSON part (`OptimizerState.meta` of engine/optim.ts). */
export const OptimizerMetaSchema = z.object({
  // "Adam" or "AdamW".
  type: z.string(),
  // The learning rate of the last step.
  lr: z.number().nonnegative(),
  // β1, β2.
  betas: z.tuple([z.number(), z.number()]),
  // ε.
  eps: z.number().nonnegative(),
  // Weight decay.
  weightDecay: z.number().nonnegative(),
  // Steps taken per parameter name (bias corrections depend on them).
  steps: z.record(z.string(), nonNegInt),
});

/** `state.json`: the host-side state of a run at a checkpoint. */
export const TrainStateSchema = z.object({
  // Format version of this file.
  version: z.literal(1),
  // Optimizer steps taken.
  step: nonNegInt,
  // Training images seen (EDM's cur_nimg).
  nimg: nonNegInt,
  // The batch iterator: images consumed (its resume point) and the epoch of the next image.
  data: z.object({ position: nonNegInt, epoch: nonNegInt }),
  // The device's Philox generator: key (seed) and next unused counter.
  rng: z.object({ seed: nonNegInt, counter: nonNegInt }),
  // Adam's hyper-parameters and per-parameter step counts (its tensors are in optimizer.safetensors).
  optimizer: OptimizerMetaSchema,
  // The loss curve so far.
  lossHistory: z.array(LossPointSchema),
  // Seconds spent training (excluding sampling and checkpointing) up to this checkpoint.
  trainSeconds: z.number().nonnegative(),
  // The resolved training configuration (validated by models/train.ts).
  config: z.record(z.string(), z.unknown()),
  // When the checkpoint was written (ISO 8601).
  savedAt: z.string(),
});
export type TrainState = z.infer<typeof TrainStateSchema>;

// ---------------------------------------------------------------------------------------------------------------
// Reading tensors back.

/** Elements per batched read: well under llvmpipe's 128 MiB storage binding limit. */
const READ_CHUNK = 1 << 22;

/**
 * Reads many tensors to the host with few syncs: tensors are flattened and concatenated on the device in
 * chunks of up to 4 M elements, and each chunk is read once (a sync costs ~11 ms whatever its size).
 */
export async function readTensors(tensors: Record<string, Tensor>): Promise<Record<string, HostTensor>> {
  const entries = Object.entries(tensors);
  const out: Record<string, HostTensor> = {};
  let i = 0;
  while (i < entries.length) {
    const group: [string, Tensor][] = [];
    let n = 0;
    while (i < entries.length && (group.length === 0 || n + entries[i][1].size <= READ_CHUNK)) {
      group.push(entries[i]);
      n += entries[i][1].size;
      i++;
    }
    let data: Float32Array;
    if (group.length === 1) data = await group[0][1].toArray();
    else {
      const flat = noGrad(() => {
        const views = group.map(([, t]) => reshape(t, [t.size]));
        const c = cat(views);
        views.forEach((v) => v.dispose());
        return c;
      });
      data = await flat.toArray();
      flat.dispose();
    }
    let at = 0;
    for (const [name, t] of group) {
      out[name] = { shape: [...t.shape], data: data.subarray(at, at + t.size) };
      at += t.size;
    }
  }
  return out;
}

/** The name of the first tensor holding a NaN or ±Inf, with the bad value, or null when all are finite. */
export function firstNonFinite(tensors: Record<string, HostTensor>): { name: string; value: number } | null {
  for (const [name, t] of Object.entries(tensors)) {
    for (let j = 0; j < t.data.length; j++) {
      if (!Number.isFinite(t.data[j])) return { name, value: t.data[j] };
    }
  }
  return null;
}

// ---------------------------------------------------------------------------------------------------------------
// Saving.

/** What a checkpoint holds. The tensors are read, not taken: they stay the caller's. */
export interface CheckpointParts {
  /** The network's state dict. */
  model: Record<string, Tensor>;
  /** The EMA averages by parameter name. */
  ema: Record<string, Tensor>;
  /** The optimizer's state dict. */
  optimizer: optim.OptimizerState;
  /** The host state (without the optimizer meta, taken from `optimizer`, and the version). */
  state: Omit<TrainState, "version" | "optimizer" | "savedAt">;
}

/** Thrown when a checkpoint would contain NaN or ±Inf; nothing was written. */
export class NonFiniteCheckpointError extends Error {
  override name = "NonFiniteCheckpointError";
}

const CHECKPOINT_DIR = /^step-(\d+)$/;

/** The checkpoints folder of a run. */
export const checkpointsDir = (runDir: string): string => `${runDir}/checkpoints`;

/** The folder name of the checkpoint after `step` optimizer steps. */
export const checkpointName = (step: number): string => `step-${String(step).padStart(9, "0")}`;

/**
 * Writes a checkpoint into `<runDir>/checkpoints/step-NNNNNNNNN/` atomically (temporary folder, then rename)
 * and deletes all but the newest `keep` checkpoints. Throws `NonFiniteCheckpointError` (writing nothing) if a
 * tensor holds NaN or ±Inf. Returns the checkpoint's folder.
 */
export async function saveCheckpoint(
  runDir: string,
  parts: CheckpointParts,
  opts: { keep?: number } = {},
): Promise<string> {
  const keepN = opts.keep ?? 2;
  if (!Number.isInteger(keepN) || keepN < 1) throw new Error(`saveCheckpoint: keep ${keepN} must be ≥ 1`);
  const { step } = parts.state;
  const files = {
    "model.safetensors": parts.model,
    "ema.safetensors": parts.ema,
    "optimizer.safetensors": parts.optimizer.tensors,
  };
  const encoded: [string, Uint8Array][] = [];
  const metadata = { step: String(step), nimg: String(parts.state.nimg) };
  for (const [file, tensors] of Object.entries(files)) {
    const host = await readTensors(tensors);
    const bad = firstNonFinite(host);
    if (bad) {
      throw new NonFiniteCheckpointError(
        `checkpoint at step ${step} not written: "${bad.name}" in ${file} holds ${bad.value}`,
      );
    }
    encoded.push([file, encodeSafetensors(host, metadata)]);
  }
  const state: TrainState = {
    version: 1,
    ...parts.state,
    optimizer: parts.optimizer.meta,
    savedAt: new Date().toISOString(),
  };
  const root = checkpointsDir(runDir);
  await Deno.mkdir(root, { recursive: true });
  const final = `${root}/${checkpointName(step)}`;
  const tmp = `${root}/.tmp-${checkpointName(step)}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await Deno.mkdir(tmp);
    for (const [file, bytes] of encoded) await writeNewFileSynced(`${tmp}/${file}`, bytes);
    await writeNewFileSynced(`${tmp}/state.json`, JSON.stringify(state, null, 1) + "\n");
    // The folder's entries reach the disk before the folder gets its real name.
    await syncDir(tmp);
    // Re-saving the same step (a resumed run that stops again at once) replaces the old folder.
    await Deno.remove(final, { recursive: true }).catch(() => {});
    await Deno.rename(tmp, final);
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw new Error(`cannot write checkpoint ${final}: ${(e as Error).message}`);
  }
  // The rename itself survives a power loss only once the checkpoints folder is flushed.
  await syncDir(root);
  const all = await listCheckpoints(runDir);
  for (const old of all.slice(0, Math.max(0, all.length - keepN))) {
    await Deno.remove(old.dir, { recursive: true }).catch(() => {});
  }
  return final;
}

/** Removes temporary folders that a crash during `saveCheckpoint` left behind. */
export async function removeStaleTemporaries(runDir: string): Promise<void> {
  try {
    for await (const e of Deno.readDir(checkpointsDir(runDir))) {
      if (e.isDirectory && e.name.startsWith(".tmp-")) {
        await Deno.remove(`${checkpointsDir(runDir)}/${e.name}`, { recursive: true }).catch(() => {});
      }
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Finding and loading.

/** The complete checkpoints of a run (those with a state.json), oldest first. */
export async function listCheckpoints(runDir: string): Promise<{ step: number; dir: string }[]> {
  const out: { step: number; dir: string }[] = [];
  try {
    for await (const e of Deno.readDir(checkpointsDir(runDir))) {
      const m = e.isDirectory ? CHECKPOINT_DIR.exec(e.name) : null;
      if (!m) continue;
      const dir = `${checkpointsDir(runDir)}/${e.name}`;
      try {
        await Deno.stat(`${dir}/state.json`);
        out.push({ step: Number(m[1]), dir });
      } catch { /* incomplete: ignored */ }
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return out.sort((a, b) => a.step - b.step);
}

/** The newest complete checkpoint of a run, or null if it has none. */
export async function latestCheckpoint(runDir: string): Promise<string | null> {
  const all = await listCheckpoints(runDir);
  return all.length ? all[all.length - 1].dir : null;
}

/** Reads and validates a checkpoint's state.json; errors name the file and the bad field. */
export async function readTrainState(checkpointDir: string): Promise<TrainState> {
  const path = `${checkpointDir}/state.json`;
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new Error(`${path}: cannot read the checkpoint state: ${(e as Error).message}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new Error(`${path}: not valid JSON: ${(e as Error).message}`);
  }
  const r = TrainStateSchema.safeParse(json);
  if (!r.success) throw new Error(`${path}: ${zodMessage(r.error)}`);
  return r.data;
}

/** A loaded checkpoint; the tensors are new and belong to the caller (`disposeCheckpoint` frees them). */
export interface LoadedCheckpoint {
  dir: string;
  state: TrainState;
  model: Record<string, Tensor>;
  ema: Record<string, Tensor>;
  optimizer: optim.OptimizerState;
}

async function loadFile(path: string, device: Device): Promise<Record<string, Tensor>> {
  try {
    await Deno.stat(path);
  } catch {
    throw new Error(`checkpoint file ${path} is missing`);
  }
  const tensors = (await loadSafetensorsWithMetadata(path, { device })).tensors;
  // Checkpoints are written only when finite: a NaN or ±Inf here means a damaged or foreign file.
  const bad = firstNonFinite(await readTensors(tensors));
  if (bad) {
    for (const t of Object.values(tensors)) t.dispose();
    throw new Error(`checkpoint file ${path}: "${bad.name}" holds ${bad.value} (a damaged file?)`);
  }
  return tensors;
}

/**
 * Loads a checkpoint folder onto `device`. With `parts` only some files are read (sampling needs just the EMA
 * or the model weights); the others come back empty.
 */
export async function loadCheckpoint(
  dir: string,
  device: Device,
  parts: { model?: boolean; ema?: boolean; optimizer?: boolean } = {
    model: true,
    ema: true,
    optimizer: true,
  },
): Promise<LoadedCheckpoint> {
  const state = await readTrainState(dir);
  const model = parts.model ? await loadFile(`${dir}/model.safetensors`, device) : {};
  const ema = parts.ema ? await loadFile(`${dir}/ema.safetensors`, device) : {};
  const optTensors = parts.optimizer ? await loadFile(`${dir}/optimizer.safetensors`, device) : {};
  return { dir, state, model, ema, optimizer: { tensors: optTensors, meta: state.optimizer } };
}

/** Frees the tensors of a loaded checkpoint. */
export function disposeCheckpoint(c: LoadedCheckpoint): void {
  for (
    const t of [...Object.values(c.model), ...Object.values(c.ema), ...Object.values(c.optimizer.tensors)]
  ) {
    t.dispose();
  }
}
