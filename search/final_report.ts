/**
 * @file What the final stage of a DiffNAS search (`deno task search --final`, search/final.ts) writes and shows:
 * the shape of `final.json`, its markdown and terminal tables, and the "Full training of the best" section of
 * the search's report (report.html/json), drawn from `final.json` whenever the run folder has one.
 *
 * Kept apart from search/final.ts (which trains) so that the report (search/search_report.ts) can read
 * `final.json` without importing the stage that regenerates the report.
 */

import type { FidProtocol } from "../eval/proxy.ts";
import type { Architecture } from "./space.ts";
import type { ReportGrid, ReportSection } from "./report.ts";

/** Name of the final stage's JSON in a run folder. */
export const FINAL_JSON = "final.json";
/** Name of its markdown table. */
export const FINAL_MD = "final.md";
/** Folder (in the run folder) of the retrained networks' EMA weights and sample grids. */
export const FINAL_DIR = "final";

/** The trainer schedule of the full training (search/config.ts `trialSchedule` at `kimg`). */
export interface FinalSchedule {
  kimg: number;
  batch: number;
  lr: number;
  lrRampupKimg: number;
  emaHalfLifeKimg: number;
  pMean: number;
  logEvery: number;
  gradClip: number | null;
}

/** The settings a `final.json` was measured with; all but `top` must match for its rows to be kept. */
export interface FinalSettingsRecord {
  /** Done trials taken by proxy score (the default network comes on top of them). */
  top: number;
  /** Thousands of training images of each retraining. */
  kimg: number;
  /** Images of the FID. */
  fidN: number;
  /** The search's seed (training and the FID's latents). */
  seed: number;
  schedule: FinalSchedule;
  fid: FidProtocol;
  /** Real images behind the reference statistics. */
  refN: number;
  /** The search's data (null: the embedded procedural shapes). */
  data: unknown;
}

/** One retrained architecture. */
export interface FinalRow {
  /** Its trial in the search memory (null for the default network when the memory has no baseline trial). */
  trialId: number | null;
  proposer: string;
  /** The default network. */
  baseline: boolean;
  summary: string;
  architecture: Architecture;
  macs: number;
  params: number;
  /** The search's proxy score of it ("RFID-128"), null when it has none (a baseline that did not finish). */
  proxyName: string | null;
  proxy: number | null;
  /** "FID-2048". */
  fidName: string;
  /** FID after the full training; null when the training or the FID failed (`error` says why). */
  fid: number | null;
  error?: string;
  trainSeconds: number;
  fidSeconds: number;
  /** The EMA weights and the sample grid, relative to the run folder (null when not written). */
  weights: string | null;
  grid: string | null;
}

/** The best retrained candidate against the default network. */
export interface FinalComparison {
  /** The non-default row with the lowest FID (index into rows), or null. */
  best: number | null;
  /** The default network's row, or null. */
  baseline: number | null;
  /** (FID best − FID default) / FID default; null when either is missing. */
  relative: number | null;
}

/** What `final.json` holds. */
export interface FinalReport {
  version: 1;
  /** False while architectures remain to be trained. */
  complete: boolean;
  settings: FinalSettingsRecord;
  /** The top trials in proxy order, then the default network when it is not among them. */
  rows: FinalRow[];
  comparison: FinalComparison;
  /** Seconds of this invocation. */
  seconds: number;
}

/** The best non-default row by FID and the default network's row, with the relative FID difference. */
export function compareToBaseline(rows: readonly FinalRow[]): FinalComparison {
  const baseline = rows.findIndex((r) => r.baseline);
  let best = -1;
  rows.forEach((r, i) => {
    if (r.baseline || r.fid === null || !Number.isFinite(r.fid)) return;
    if (best < 0 || r.fid < rows[best].fid!) best = i;
  });
  const b = baseline >= 0 ? rows[baseline].fid : null;
  const relative = best >= 0 && b !== null && Number.isFinite(b) && b > 0 ? (rows[best].fid! - b) / b : null;
  return { best: best >= 0 ? best : null, baseline: baseline >= 0 ? baseline : null, relative };
}

const fixed = (
  v: number | null,
  digits: number,
) => (v === null || !Number.isFinite(v) ? "–" : v.toFixed(digits));

/** The table's header and one row of cells per architecture (shared by the terminal, markdown and report). */
export function finalCells(r: FinalReport): { head: string[]; rows: string[][] } {
  const proxyName = r.rows.find((x) => x.proxyName)?.proxyName ?? "proxy";
  const fidName = `FID-${r.settings.fidN}`;
  return {
    head: [
      "trial",
      "architecture",
      "MACs (M)",
      "params (k)",
      `${proxyName} (search)`,
      `${fidName} (${r.settings.kimg} kimg)`,
      "train s",
      "",
    ],
    rows: r.rows.map((x) => [
      x.trialId === null ? "–" : String(x.trialId),
      x.summary,
      (x.macs / 1e6).toFixed(2),
      (x.params / 1e3).toFixed(1),
      fixed(x.proxy, 2),
      x.fid === null ? `failed: ${x.error ?? "?"}` : x.fid.toFixed(2),
      x.trainSeconds.toFixed(0),
      x.baseline ? "default network" : "",
    ]),
  };
}

/** One sentence: the best candidate's FID against the default network's, as a relative difference. */
export function comparisonLine(r: FinalReport): string {
  const c = r.comparison, fidName = `FID-${r.settings.fidN}`;
  if (c.best === null || c.baseline === null || c.relative === null) {
    const why = c.baseline === null
      ? "the default network has no row"
      : c.best === null
      ? "no candidate other than the default network has an FID"
      : "the default network has no FID";
    return `best against the default network: not available (${why})`;
  }
  const best = r.rows[c.best], base = r.rows[c.baseline];
  const pct = (100 * c.relative).toFixed(1);
  return `best against the default network: ${fidName} ${best.fid!.toFixed(2)} (trial ${best.trialId}, ` +
    `${best.summary}) against ${base.fid!.toFixed(2)}: ${c.relative <= 0 ? "" : "+"}${pct}% ` +
    `(${c.relative < 0 ? "better" : c.relative > 0 ? "worse" : "equal"}), at ` +
    `${(best.macs / base.macs).toFixed(2)}× the MACs and ${
      (best.params / base.params).toFixed(2)
    }× the parameters`;
}

/** The table as plain text for the terminal (columns padded), with the comparison under it. */
export function formatFinalTable(r: FinalReport): string {
  const { head, rows } = finalCells(r);
  // Data cannot break the columns or drive the terminal: every control character becomes "?".
  // deno-lint-ignore no-control-regex
  const all = [head, ...rows].map((cells) => cells.map((c) => c.replace(/[\u0000-\u001f\u007f]/g, "?")));
  const widths = head.map((_, j) => Math.max(...all.map((cells) => cells[j].length)));
  const numeric = new Set([0, 2, 3, 4, 5, 6]);
  const line = (cells: string[]) =>
    cells.map((c, j) => (numeric.has(j) ? c.padStart(widths[j]) : c.padEnd(widths[j]))).join("  ").trimEnd();
  return [
    `Full training of the best (${r.settings.kimg} kimg, seed ${r.settings.seed}, FID-${r.settings.fidN} with ` +
    `${r.settings.fid.steps} Heun steps)${r.complete ? "" : " (incomplete)"}`,
    line(head),
    ...rows.map(line),
    comparisonLine(r),
  ].join("\n");
}

/** `final.md`: the table in markdown with the settings and the comparison. */
export function finalMarkdown(r: FinalReport): string {
  const { head, rows } = finalCells(r);
  const s = r.settings;
  const esc = (c: string) => c.replace(/\|/g, "\\|");
  return [
    `# Full training of the best${r.complete ? "" : " (incomplete)"}`,
    "",
    `The top ${s.top} trial(s) of the search by proxy score and the default network, each retrained from ` +
    `scratch for ${s.kimg} kimg (batch ${s.schedule.batch}, lr ${s.schedule.lr}, ramp ` +
    `${s.schedule.lrRampupKimg} kimg, EMA half-life ${s.schedule.emaHalfLifeKimg} kimg) with seed ${s.seed}; ` +
    `FID-${s.fidN} of the EMA network with ${s.fid.steps} Heun steps against ${s.refN} real images.`,
    "",
    `| ${head.map(esc).join(" | ")} |`,
    `|${head.map(() => "---").join("|")}|`,
    ...rows.map((cells) => `| ${cells.map(esc).join(" | ")} |`),
    "",
    comparisonLine(r),
    "",
  ].join("\n");
}

/**
 * The report's "Full training of the best" section from the run folder's `final.json` (with the grids it
 * names), or null when there is none. An unreadable file gives a section that says so.
 */
export async function finalSection(dir: string): Promise<ReportSection | null> {
  let r: FinalReport;
  try {
    r = JSON.parse(await Deno.readTextFile(`${dir}/${FINAL_JSON}`));
    if (!r || !Array.isArray(r.rows) || !r.settings) throw new Error("no rows or settings");
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    return {
      title: "Full training of the best",
      text: `${FINAL_JSON} could not be read: ${(e as Error).message}`,
    };
  }
  const { head, rows } = finalCells(r);
  const grids: ReportGrid[] = [];
  for (const row of r.rows) {
    if (!row.grid) continue;
    try {
      const png = await Deno.readFile(`${dir}/${row.grid}`);
      const label = `${row.baseline ? "default network" : "candidate"}${
        row.trialId === null ? "" : `: trial ${row.trialId}`
      }, FID-${r.settings.fidN} ${fixed(row.fid, 2)} after ${r.settings.kimg} kimg`;
      grids.push({ label, trialId: row.trialId ?? undefined, png, path: row.grid });
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
  }
  return {
    title: "Full training of the best",
    text: `${finalMarkdown(r).split("\n")[2]} ${comparisonLine(r)}.` +
      (r.complete ? "" : " Incomplete: `deno task search --final` continues it."),
    table: { columns: head, rows },
    grids,
  };
}
