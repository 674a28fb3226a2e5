/**
 * @file `deno task search --final`: the final stage of a DiffNAS search. The search ranks candidates by a cheap
 * proxy after a short schedule; what a user wants in the end is the real FID of the winners after a full
 * training, next to the default network's under the same protocol:
 *
 *     memory ← the run folder's memory.sqlite (the search's settings and trials; only read)
 *     rows   ← the top K done trials by proxy score, then the default network if it is not among them
 *     for each row not already in final.json:
 *         train it from scratch with the full run's schedule (config.ts FULL_RUN: 12 kimg, its learning-rate
 *         ramp and EMA half-life; `trialSchedule` at that length), the search's seed and data
 *         FID-n of the EMA network with the proxy's sampler (Heun, its steps and seed) — the protocol of the
 *         long runs of `--validate-proxy`
 *         save the EMA weights (final/trial-<id>.safetensors) and a sample grid (final/trial-<id>.png)
 *         rewrite final.json and final.md (atomically)
 *     rewrite report.html/json with the section "Full training of the best"
 *
 * Resumable: the same command on the same folder keeps every row `final.json` already holds for an
 * architecture still selected, when it was measured with the same settings (schedule, FID size and protocol,
 * seed, data, reference size; `top` may change, so a larger K only adds rows); other settings are refused,
 * naming what differs. Training is seeded and deterministic on one device, so a row trained again would give the
 * same FID. The folder is locked while it runs, like a search (a running search on it refuses this, and back).
 */

import { z } from "zod";
import { Device, saveSafetensors } from "../engine/mod.ts";
import { Trainer } from "../models/trainer.ts";
import type { FidProtocol } from "../eval/proxy.ts";
import { parseUsage } from "../util/config.ts";
import { UsageError } from "../util/errors.ts";
import { writeFileAtomic, writeTextAtomic } from "../util/files.ts";
import { lockRunFolder } from "../util/lock.ts";
import { FULL_RUN, type SearchConfig, SearchConfigSchema, trialSchedule } from "./config.ts";
import { baselineArchitecture, defaultWorkerName, openTrialSetup, type TrialSetup } from "./diffnas.ts";
import {
  compareToBaseline,
  FINAL_DIR,
  FINAL_JSON,
  FINAL_MD,
  finalMarkdown,
  type FinalReport,
  type FinalRow,
  type FinalSettingsRecord,
  formatFinalTable,
} from "./final_report.ts";
import { rankTrials, specSummary } from "./report.ts";
import { candidateTrainerConfig, proxyProtocol, scoreNetwork, type TrialEvent } from "./runner.ts";
import { sampleGrid, writeSearchReport } from "./search_report.ts";
import { type Architecture, architectureKey, checkBudget, toUNetSpec } from "./space.ts";
import { MEMORY_FILE, SqliteStorage } from "./sqlite_storage.ts";
import type { SearchStorage, Trial } from "./types.ts";

/** Settings of the final stage (the search's own come from its memory). */
export const FinalSettingsSchema = z.strictObject({
  // Done trials to retrain, best proxy score first (the default network is added when not among them).
  top: z.number().int().min(1).max(100).default(1),
  // Thousands of training images of each retraining (default: the full run's, `deno task train`'s 12).
  kimg: z.number().positive().max(100000).default(FULL_RUN.kimg),
  // Images of the FID after the full training.
  fidN: z.number().int().min(2).max(100000).default(2048),
});
export type FinalSettingsInput = z.input<typeof FinalSettingsSchema>;
export type FinalSettings = z.output<typeof FinalSettingsSchema>;

/** Settings whose change keeps the rows of an earlier `final.json`. */
const FREE_SETTINGS: ReadonlySet<string> = new Set(["top"]);

/** One architecture to retrain. */
interface Selected {
  trial: Trial | null;
  arch: Architecture;
  baseline: boolean;
}

/** What the final stage reports as it goes. */
export type FinalEvent =
  | { type: "start"; dir: string; device: string; rows: { summary: string; trialId: number | null }[] }
  | { type: "reference"; cached: boolean; seconds: number }
  | { type: "kept"; index: number; total: number; row: FinalRow }
  | { type: "dropped"; row: FinalRow }
  | { type: "row-start"; index: number; total: number; summary: string; trialId: number | null }
  | { type: "row-progress"; event: TrialEvent }
  | { type: "row-end"; index: number; total: number; row: FinalRow }
  | { type: "report"; html: string; json: string };

/** Options besides the settings. */
export interface FinalOptions {
  signal?: AbortSignal;
  onEvent?: (e: FinalEvent) => void;
  /** Use this device instead of creating one. */
  device?: Device;
  /** Device backend when none is given (default: the search's). */
  backend?: "webgpu" | "cpu";
}

/** The outcome: the report, the files written and the terminal table. */
export interface FinalOutcome {
  report: FinalReport;
  json: string;
  markdown: string;
  reportHtml: string;
  reportJson: string;
  /** The terminal table with the comparison line. */
  summary: string;
}

/** The selection: the top `top` done trials by proxy score, then the default network if not among them. */
export function selectFinal(trials: readonly Trial[], baseArch: Architecture, top: number): Selected[] {
  const baseKey = architectureKey(baseArch);
  const isBase = (t: Trial) => t.proposer === "baseline" || t.key === baseKey;
  const picked: Selected[] = rankTrials(trials).slice(0, top).map((t) => ({
    trial: t,
    arch: t.spec as Architecture,
    baseline: isBase(t),
  }));
  if (!picked.some((s) => s.baseline)) {
    const t = trials.find(isBase) ?? null;
    picked.push({ trial: t, arch: t ? t.spec as Architecture : baseArch, baseline: true });
  }
  return picked;
}

/**
 * The rows of the `final.json` at `path` to keep: none when there is no file; its rows when it was measured with
 * the settings of `expected` (all but `top`); refused (UsageError naming the setting) otherwise.
 */
export async function storedFinalRows(path: string, expected: FinalSettingsRecord): Promise<FinalRow[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
  let stored: FinalReport;
  try {
    stored = JSON.parse(text);
    if (!stored || typeof stored !== "object" || !Array.isArray(stored.rows)) throw new Error("no rows");
  } catch (e) {
    throw new UsageError(`${path} is not a final-stage report (${(e as Error).message}); move it away`);
  }
  const have = (stored.settings ?? {}) as unknown as Record<string, unknown>;
  for (const [key, want] of Object.entries(expected)) {
    if (FREE_SETTINGS.has(key)) continue;
    if (JSON.stringify(have[key]) !== JSON.stringify(want)) {
      throw new UsageError(
        `${path} was measured with ${key} ${JSON.stringify(have[key])}, this run asks for ` +
          `${JSON.stringify(want)}: give the same settings to continue it, or move ${path} away`,
      );
    }
  }
  return stored.rows;
}

/** Checks that `dir` holds a search memory; returns its path. */
async function memoryPath(dir: string): Promise<string> {
  const path = `${dir.replace(/\/+$/, "") || "/"}/${MEMORY_FILE}`;
  try {
    if (!(await Deno.stat(path)).isFile) throw new UsageError(`--out ${dir}: ${MEMORY_FILE} is not a file`);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new UsageError(
        `--out ${dir} holds no search memory (${MEMORY_FILE}): give a search's run folder`,
      );
    }
    throw e;
  }
  return path;
}

/** The search's settings from its memory, for this folder (which may have been moved since). */
async function searchSettings(storage: SearchStorage, dir: string): Promise<SearchConfig> {
  const meta = await storage.getMeta();
  if (!meta) throw new UsageError(`${dir}/${MEMORY_FILE} holds no search settings`);
  const cfg = parseUsage(SearchConfigSchema, meta.config, `${dir}/${MEMORY_FILE} settings`);
  if (cfg.method !== "diffnas") {
    throw new UsageError(`--final retrains DiffNAS candidates; ${dir} holds a ${cfg.method} search`);
  }
  return { ...cfg, out: dir };
}

/** When the search ran, for the regenerated report: from its last report.json, else from its memory. */
async function searchTiming(dir: string, meta: Record<string, unknown> | null) {
  const ended = (meta?.ended ?? null) as { at?: string; stoppedBy?: string } | null;
  try {
    const r = JSON.parse(await Deno.readTextFile(`${dir}/report.json`));
    const t = r?.timing;
    const startedAt = Date.parse(t?.started), finishedAt = Date.parse(t?.finished);
    if (Number.isFinite(startedAt) && Number.isFinite(finishedAt) && Number.isFinite(t?.wallSeconds)) {
      return { startedAt, finishedAt, wallSeconds: t.wallSeconds, stoppedBy: ended?.stoppedBy ?? "unknown" };
    }
  } catch {
    // No earlier report (or an unreadable one): the memory's times.
  }
  const startedAt = Date.parse(String(meta?.createdAt)), end = Date.parse(String(ended?.at));
  const finishedAt = Number.isFinite(end) ? end : Date.now();
  return {
    startedAt: Number.isFinite(startedAt) ? startedAt : finishedAt,
    finishedAt,
    wallSeconds: Number.isFinite(startedAt) ? (finishedAt - startedAt) / 1000 : 0,
    stoppedBy: ended?.stoppedBy ?? "unknown",
  };
}

/** Runs the final stage on the search in `dir` (see the file comment). */
export async function runFinal(
  dir: string,
  settingsInput: FinalSettingsInput | Record<string, unknown> = {},
  opts: FinalOptions = {},
): Promise<FinalOutcome> {
  const t0 = performance.now();
  const settings = parseUsage(
    FinalSettingsSchema,
    Object.fromEntries(Object.entries(settingsInput).filter(([, v]) => v !== undefined)),
    "final-stage settings",
  );
  const emit = opts.onEvent ?? (() => {});
  await memoryPath(dir);
  using _lock = lockRunFolder(dir);
  const storage = SqliteStorage.inRunFolder(dir);
  let device: Device | undefined;
  let setup: TrialSetup | undefined;
  try {
    const cfg = await searchSettings(storage, dir);
    const trials = await storage.listTrials();
    if (!trials.some((t) => t.status === "done")) {
      throw new UsageError(`${dir}: the search has no done trial yet; run or resume the search first`);
    }
    device = opts.device ?? await Device.create({ backend: opts.backend ?? cfg.backend });
    setup = await openTrialSetup(cfg, device, storage, dir, defaultWorkerName());
    const { ctx, base, dataset } = setup;
    const selected = selectFinal(trials, baselineArchitecture(base), settings.top);
    emit({
      type: "start",
      dir,
      device: `${device.info.adapter} (${device.kind})`,
      rows: selected.map((s) => ({ summary: specSummary(s.arch), trialId: s.trial?.id ?? null })),
    });
    emit({ type: "reference", cached: setup.reference.cached, seconds: setup.reference.seconds });

    const schedule = trialSchedule({ ...cfg.training, kimg: settings.kimg });
    const fid: FidProtocol = { ...proxyProtocol(cfg), n: settings.fidN };
    const record: FinalSettingsRecord = {
      top: settings.top,
      kimg: settings.kimg,
      fidN: settings.fidN,
      seed: cfg.seed,
      schedule,
      fid,
      refN: Math.min(cfg.refN, dataset.length),
      data: cfg.data ?? null,
    };
    const json = `${dir}/${FINAL_JSON}`, markdown = `${dir}/${FINAL_MD}`;
    const stored = await storedFinalRows(json, record);
    const rows: (FinalRow | null)[] = selected.map(() => null);
    const keyOf = (a: Architecture) => architectureKey(a);
    for (const old of stored) {
      const i = selected.findIndex((s) => keyOf(s.arch) === keyOf(old.architecture));
      if (i >= 0) rows[i] = old;
      else emit({ type: "dropped", row: old });
    }
    const report = (complete: boolean): FinalReport => {
      const done = rows.filter((r): r is FinalRow => r !== null);
      return {
        version: 1,
        complete,
        settings: record,
        rows: done,
        comparison: compareToBaseline(done),
        seconds: (performance.now() - t0) / 1000,
      };
    };
    const write = async (complete: boolean) => {
      const r = report(complete);
      await writeTextAtomic(json, JSON.stringify(r, null, 2) + "\n");
      await writeTextAtomic(markdown, finalMarkdown(r));
      return r;
    };

    await Deno.mkdir(`${dir}/${FINAL_DIR}`, { recursive: true });
    for (const [i, s] of selected.entries()) {
      if (rows[i]) {
        emit({ type: "kept", index: i, total: selected.length, row: rows[i]! });
        continue;
      }
      const summary = specSummary(s.arch);
      emit({ type: "row-start", index: i, total: selected.length, summary, trialId: s.trial?.id ?? null });
      const spec = toUNetSpec(s.arch, base);
      const cost = spec.ok ? checkBudget(spec.value, {}) : null;
      const name = `${FINAL_DIR}/${s.trial ? `trial-${s.trial.id}` : "default"}`;
      const row: FinalRow = {
        trialId: s.trial?.id ?? null,
        proposer: s.trial?.proposer ?? "baseline",
        baseline: s.baseline,
        summary,
        architecture: s.arch,
        macs: cost?.macs ?? s.trial?.costs.macs ?? 0,
        params: cost?.params ?? s.trial?.costs.params ?? 0,
        proxyName: s.trial?.status === "done" ? s.trial.scores.proxyName ?? null : null,
        proxy: s.trial?.status === "done" ? s.trial.scores.proxyFid ?? null : null,
        fidName: `FID-${fid.n}`,
        fid: null,
        trainSeconds: 0,
        fidSeconds: 0,
        weights: null,
        grid: null,
      };
      let trainer: Trainer | undefined;
      try {
        if (!spec.ok) throw new Error(`its architecture does not build: ${spec.reason}`);
        const cfgT = candidateTrainerConfig(spec.value, cfg, cfg.seed, schedule);
        const totalNimg = Math.round(schedule.kimg * 1000);
        const onEvent = (event: TrialEvent) => emit({ type: "row-progress", event });
        trainer = new Trainer(cfgT, device, dataset);
        const run = await trainer.run({
          untilNimg: totalNimg,
          signal: opts.signal,
          onStep: (p) => onEvent({ type: "train", nimg: p.nimg, totalNimg }),
          onLog: (e) => onEvent({ type: "train", nimg: e.nimg, totalNimg, loss: e.loss }),
        });
        row.trainSeconds = run.trainSeconds;
        if (run.stoppedBy === "aborted") throw new Error("interrupted");
        const net = trainer.emaNetwork();
        await saveSafetensors(`${dir}/${name}.safetensors`, net.stateDict(), {
          trial: String(row.trialId ?? "default"),
          kimg: String(settings.kimg),
        });
        row.weights = `${name}.safetensors`;
        const m = await scoreNetwork(net, cfgT.sigmaData, ctx, "FID", fid, onEvent);
        row.fid = m.value;
        row.fidSeconds = m.seconds;
        const png = await sampleGrid(net, cfg, cfgT.sigmaData);
        if (png) {
          await writeFileAtomic(`${dir}/${name}.png`, png);
          row.grid = `${name}.png`;
        }
      } catch (e) {
        if ((e as Error).message === "interrupted") throw e;
        row.error = (e as Error).message;
      } finally {
        trainer?.dispose();
      }
      rows[i] = row;
      emit({ type: "row-end", index: i, total: selected.length, row });
      await write(false);
    }
    const final = await write(true);
    const meta = await storage.getMeta();
    const r = await writeSearchReport(ctx, trials, base, await searchTiming(dir, meta));
    emit({ type: "report", html: r.html, json: r.json });
    return {
      report: final,
      json,
      markdown,
      reportHtml: r.html,
      reportJson: r.json,
      summary: formatFinalTable(final),
    };
  } finally {
    setup?.dispose();
    await storage.close();
    if (device && !opts.device) device.destroy();
  }
}
