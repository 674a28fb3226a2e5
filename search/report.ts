/**
 * @file The report of a search: `report.json` for programs, `report.html` for people, a table for the terminal.
 *
 * Everything here is a pure function of plain data (`ReportInput`): the caller reads the storage, computes the
 * Pareto front and the best-so-far curves, renders the sample grids, and hands them over; this file only ranks,
 * formats and draws. That keeps the report reproducible from the storage alone and testable without a device.
 *
 * The HTML page is one self-contained file that opens offline: CSS inline, plots inline SVG, sample grids as
 * `data:` URIs, no script at all, and a Content-Security-Policy that forbids any fetch should something slip
 * in. The plots are drawn by Apache ECharts' server-side SVG renderer, not by hand. Every string that comes
 * from data (specs, errors, proposer names, labels) is HTML-escaped: an LLM's proposal is untrusted text.
 */

import * as echarts from "echarts";
import type { LossPoint, Trial, TrialStatus } from "./types.ts";
import { writeTextAtomic } from "../util/files.ts";
import { queueWaitSeconds, trialWorker } from "./memory.ts";

// ---------------------------------------------------------------------------------------------------------------
// Input.

/** When the search ran and what a trial cost on average. */
export interface ReportTiming {
  /** Start of the search, milliseconds since the epoch. */
  started: number;
  /** End of the search (or the moment of this report), milliseconds since the epoch. */
  finished: number;
  /** Seconds the search processes ran (pauses between resumed runs excluded). */
  wallSeconds: number;
  /** Mean seconds per done trial; null when no trial is done. */
  perTrial: { trainSeconds: number | null; proxySeconds: number | null };
}

/** The default network, evaluated like a trial, for comparison. */
export interface ReportBaseline {
  /** Its name ("ddpmpp-cifar10-small"). */
  name: string;
  /** Its trial, when it ran as one. */
  trialId?: number;
  proxyFid: number;
  fid?: number;
  /** MACs per network evaluation. */
  macs: number;
  params: number;
  spec: unknown;
  /** Its training loss, when it did not run as a trial (a trial's own history is used otherwise). */
  lossHistory?: LossPoint[];
}

/** A sample grid to show. */
export interface ReportGrid {
  /** What it shows ("best: trial 12", "default network"). */
  label: string;
  trialId?: number;
  /** The PNG file's bytes. */
  png: Uint8Array;
  /** Where the caller saved it, relative to the run folder (listed in report.json instead of the bytes). */
  path?: string;
}

/** One series of a chart: points (x, y) drawn as dots, a line, or a step line. */
export interface ChartSeries {
  name: string;
  kind: "scatter" | "line" | "step";
  points: [number, number][];
  /** CSS colour; default: the palette's next colour. */
  color?: string;
  /** Marker: default a dot for scatter, none for lines. */
  symbol?: "circle" | "emptyCircle" | "diamond" | "triangle" | "rect" | "none";
  /** Marker size in pixels. */
  symbolSize?: number;
  dashed?: boolean;
}

/** A chart as data; `renderChartSvg` draws it. */
export interface ChartSpec {
  title: string;
  xLabel: string;
  yLabel: string;
  /** Logarithmic axes (points ≤ 0 on a log axis are dropped). */
  xLog?: boolean;
  yLog?: boolean;
  series: ChartSeries[];
  /** Size in pixels (default 540 × 360). */
  width?: number;
  height?: number;
}

/** A plain table: cells are text or numbers (null shows as a dash). */
export interface ReportTable {
  columns: string[];
  rows: (string | number | null)[][];
}

/** A section for the later methods (DDSM schedules, distillation): text, a table, charts; all data, no HTML. */
export interface ReportSection {
  title: string;
  text?: string;
  table?: ReportTable;
  charts?: ChartSpec[];
  /** Sample grids shown under the table (report.json lists their labels and paths, not the bytes). */
  grids?: ReportGrid[];
}

/** Everything the report shows. */
export interface ReportInput {
  title: string;
  /** The search's configuration (secrets in it are hidden by key name: *key*, *token*, *secret*, *password*). */
  settings: Record<string, unknown>;
  timing: ReportTiming;
  /** Every trial of the storage, in id order. */
  trials: Trial[];
  /** Done trials on the (proxy FID, MACs) Pareto front. */
  paretoIds: number[];
  /** Best proxy FID so far against trial number, one curve per proposer. */
  bestSoFar: { proposer: string; points: { trial: number; best: number }[] }[];
  baseline?: ReportBaseline;
  /** Sample grids of the best models and the default network. */
  grids: ReportGrid[];
  sections?: ReportSection[];
}

/** How much of the ranking to show. */
export interface ReportOptions {
  /** Trials in the best-architectures table (default 20) and in report.json's `top` (default: every done trial). */
  top?: number;
}

const DEFAULT_TOP = 20;
/** Trials whose loss curves are drawn. */
const LOSS_CURVES = 5;
const STATUSES: TrialStatus[] = ["done", "pruned", "failed", "rejected", "queued", "running"];

// ---------------------------------------------------------------------------------------------------------------
// Ranking and summaries (shared by the three outputs).

/** Done trials with a finite proxy FID, best first (ties: fewer MACs, then the earlier trial). */
export function rankTrials(trials: readonly Trial[]): Trial[] {
  return trials
    .filter((t) => t.status === "done" && Number.isFinite(t.scores.proxyFid))
    .sort((a, b) =>
      a.scores.proxyFid! - b.scores.proxyFid! ||
      (a.costs.macs ?? Infinity) - (b.costs.macs ?? Infinity) || a.id - b.id
    );
}

/** Trials per state, every state present. */
export function statusCounts(trials: readonly Trial[]): Record<TrialStatus, number> & { total: number } {
  const counts = Object.fromEntries(STATUSES.map((s) => [s, 0])) as Record<TrialStatus, number>;
  for (const t of trials) counts[t.status]++;
  return { ...counts, total: trials.length };
}

/**
 * A one-line summary of a spec: "32ch ×[1,2,2] 2 blocks attn@8" for a UNet-like architecture, compact JSON
 * (cut at 80 characters) for anything else.
 */
export function specSummary(spec: unknown): string {
  const s = spec as Record<string, unknown> | null;
  const isInt = (v: unknown): v is number => Number.isInteger(v);
  const isInts = (v: unknown): v is number[] => Array.isArray(v) && v.every(isInt);
  if (s && typeof s === "object" && isInt(s.modelChannels) && isInts(s.channelMult)) {
    const parts = [`${s.modelChannels}ch ×[${s.channelMult.join(",")}]`];
    if (isInt(s.numBlocks)) parts.push(`${s.numBlocks} block${s.numBlocks === 1 ? "" : "s"}`);
    else if (isInts(s.numBlocks)) parts.push(`blocks [${s.numBlocks.join(",")}]`);
    if (isInts(s.attnResolutions) && s.attnResolutions.length > 0) {
      parts.push(`attn@${s.attnResolutions.join(",")}`);
    }
    return parts.join(" ");
  }
  const json = JSON.stringify(spec) ?? String(spec);
  return json.length > 80 ? `${json.slice(0, 79)}…` : json;
}

/** Pruned, failed and rejected trials grouped by reason (the error's first line, cut at 160 characters). */
export function failureReasons(
  trials: readonly Trial[],
): { status: TrialStatus; reason: string; count: number; trialIds: number[] }[] {
  const groups = new Map<
    string,
    { status: TrialStatus; reason: string; count: number; trialIds: number[] }
  >();
  for (const t of trials) {
    if (t.status !== "pruned" && t.status !== "failed" && t.status !== "rejected") continue;
    const line = (t.error ?? "(no reason recorded)").split("\n")[0].trim();
    const reason = line.length > 160 ? `${line.slice(0, 159)}…` : line;
    const key = `${t.status}\u0000${reason}`;
    const g = groups.get(key) ?? { status: t.status, reason, count: 0, trialIds: [] };
    g.count++;
    g.trialIds.push(t.id);
    groups.set(key, g);
  }
  return [...groups.values()].sort((a, b) =>
    STATUSES.indexOf(a.status) - STATUSES.indexOf(b.status) ||
    b.count - a.count
  );
}

/** The Pareto trials, fewest MACs first; throws if an id is not a ranked (done, scored) trial. */
function paretoTrials(input: ReportInput, ranked: readonly Trial[]): Trial[] {
  const byId = new Map(ranked.map((t) => [t.id, t]));
  return input.paretoIds.map((id, i) => {
    const t = byId.get(id);
    if (!t) throw new Error(`paretoIds[${i}]: trial ${id} is not a done trial with a proxy FID`);
    return t;
  }).sort((a, b) => (a.costs.macs ?? 0) - (b.costs.macs ?? 0));
}

/** Settings with secret-looking keys hidden, at any depth. */
function redact(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(redact);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value).map((
        [k, v],
      ) => [k, /key|token|secret|password/i.test(k) ? "(hidden)" : redact(v)]),
    );
  }
  return value;
}

// ---------------------------------------------------------------------------------------------------------------
// report.json

/**
 * The JSON report: settings, timing, counts, the done trials best first (`top`), the Pareto front, best-so-far
 * curves, the default network, failures grouped by reason, sample grids by label and path (no PNG bytes), and the
 * extra sections as given.
 */
export function buildReportJson(input: ReportInput, options: ReportOptions = {}): Record<string, unknown> {
  const ranked = rankTrials(input.trials);
  const pareto = new Set(input.paretoIds);
  const row = (t: Trial) => ({
    id: t.id,
    proposer: t.proposer,
    seed: t.seed,
    proxyFid: t.scores.proxyFid ?? null,
    proxyName: t.scores.proxyName ?? null,
    fid: t.scores.fid ?? null,
    fidName: t.scores.fidName ?? null,
    macs: t.costs.macs ?? null,
    params: t.costs.params ?? null,
    trainSeconds: t.costs.trainSeconds ?? null,
    proxySeconds: t.costs.proxySeconds ?? null,
    parentId: t.parentId,
    worker: trialWorker(t),
    queueSeconds: queueWaitSeconds(t),
    pareto: pareto.has(t.id),
    summary: specSummary(t.spec),
    spec: t.spec,
  });
  const b = input.baseline;
  return {
    title: input.title,
    settings: redact(input.settings),
    timing: {
      started: new Date(input.timing.started).toISOString(),
      finished: new Date(input.timing.finished).toISOString(),
      wallSeconds: input.timing.wallSeconds,
      perTrial: input.timing.perTrial,
    },
    counts: statusCounts(input.trials),
    top: ranked.slice(0, options.top ?? ranked.length).map((t, i) => ({ rank: i + 1, ...row(t) })),
    pareto: paretoTrials(input, ranked).map(row),
    bestSoFar: input.bestSoFar,
    baseline: b
      ? {
        name: b.name,
        trialId: b.trialId ?? null,
        proxyFid: b.proxyFid,
        fid: b.fid ?? null,
        macs: b.macs,
        params: b.params,
        summary: specSummary(b.spec),
        spec: b.spec,
      }
      : null,
    failures: failureReasons(input.trials),
    grids: input.grids.map((g) => ({ label: g.label, trialId: g.trialId ?? null, path: g.path ?? null })),
    sections: (input.sections ?? []).map((s) =>
      s.grids
        ? {
          ...s,
          grids: s.grids.map((g) => ({ label: g.label, trialId: g.trialId ?? null, path: g.path ?? null })),
        }
        : s
    ),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Charts (ECharts, server-side SVG).

/** Distinct colours for proposers and curves (ECharts' default palette, which prints well). */
const PALETTE = [
  "#5470c6",
  "#91cc75",
  "#fac858",
  "#ee6666",
  "#73c0de",
  "#3ba272",
  "#fc8452",
  "#9a60b4",
  "#ea7ccc",
];
const GREY = "#c0c0c0", BASELINE_COLOR = "#d62728", PARETO_COLOR = "#222222";

/** One colour per proposer, the same in every chart (in order of each proposer's first trial). */
function proposerColours(input: ReportInput): (proposer: string) => string {
  const names = [
    ...new Set([...input.trials.map((t) => t.proposer), ...input.bestSoFar.map((c) => c.proposer)]),
  ];
  return (p) => PALETTE[Math.max(0, names.indexOf(p)) % PALETTE.length];
}

/** Draws a chart to an SVG string with ECharts' server-side renderer (no DOM, no animation). */
export function renderChartSvg(spec: ChartSpec): string {
  const width = spec.width ?? 540, height = spec.height ?? 360;
  const keep = (v: number, log?: boolean) => Number.isFinite(v) && (!log || v > 0);
  const series = spec.series.map((s, i) => {
    const color = s.color ?? PALETTE[i % PALETTE.length];
    const scatter = s.kind === "scatter";
    const symbol = s.symbol ?? (scatter ? "circle" : "none");
    return {
      name: s.name,
      type: scatter ? "scatter" : "line",
      step: s.kind === "step" ? "end" : undefined,
      data: s.points.filter(([x, y]) => keep(x, spec.xLog) && keep(y, spec.yLog)),
      symbol,
      showSymbol: symbol !== "none",
      symbolSize: s.symbolSize ?? (scatter ? 8 : 7),
      itemStyle: { color, opacity: scatter ? 0.85 : 1 },
      lineStyle: { color, width: 1.5, type: s.dashed ? "dashed" : "solid" },
      // Later series on top: the caller orders them.
      z: 2 + i,
    };
  });
  // The legend wraps at about four names a row; the plot starts below it.
  const legendRows = Math.ceil(series.length / 4);
  const chart = echarts.init(null, null, { renderer: "svg", ssr: true, width, height });
  try {
    chart.setOption({
      animation: false,
      backgroundColor: "#ffffff",
      textStyle: { fontFamily: "sans-serif" },
      legend: { top: 4, left: "center", itemWidth: 16, itemHeight: 10, textStyle: { fontSize: 11 } },
      grid: { left: 64, right: 20, top: 16 + 20 * legendRows, bottom: 48 },
      xAxis: {
        type: spec.xLog ? "log" : "value",
        name: spec.xLabel,
        nameLocation: "middle",
        nameGap: 28,
        scale: true,
        splitLine: { lineStyle: { color: "#eeeeee" } },
      },
      yAxis: {
        type: spec.yLog ? "log" : "value",
        name: spec.yLabel,
        nameLocation: "middle",
        nameGap: 46,
        scale: true,
        splitLine: { lineStyle: { color: "#eeeeee" } },
      },
      series,
    });
    return chart.renderToSVGString();
  } finally {
    chart.dispose();
  }
}

/** Proxy FID against MACs: done trials by proposer, pruned ones grey, the Pareto front, the default network. */
function paretoChart(input: ReportInput, ranked: Trial[], proxyName: string): ChartSpec {
  const point = (t: Trial): [number, number] => [(t.costs.macs ?? NaN) / 1e6, t.scores.proxyFid ?? NaN];
  const colour = proposerColours(input);
  const proposers = [...new Set(ranked.map((t) => t.proposer))];
  const series: ChartSeries[] = proposers.map((p) => ({
    name: p,
    kind: "scatter",
    color: colour(p),
    points: ranked.filter((t) => t.proposer === p).map(point),
  }));
  const pruned = input.trials.filter((t) => t.status === "pruned" && Number.isFinite(t.scores.proxyFid));
  if (pruned.length > 0) {
    series.push({ name: "pruned", kind: "scatter", color: GREY, points: pruned.map(point) });
  }
  // The front is a line under the dots (series later in the list are drawn on top), so its points keep their
  // proposer's colour.
  series.unshift({
    name: "Pareto front",
    kind: "line",
    color: PARETO_COLOR,
    points: paretoTrials(input, ranked).map(point),
  });
  const b = input.baseline;
  if (b) {
    series.push({
      name: `default (${b.name})`,
      kind: "scatter",
      color: BASELINE_COLOR,
      symbol: "diamond",
      symbolSize: 13,
      points: [[b.macs / 1e6, b.proxyFid]],
    });
  }
  const macs = ranked.map((t) => t.costs.macs ?? 0).filter((m) => m > 0);
  const wide = macs.length > 1 && Math.max(...macs) / Math.min(...macs) > 10;
  return {
    title: `${proxyName} against MACs (done trials; lower left is better)`,
    xLabel: `MACs per evaluation (M${wide ? ", log" : ""})`,
    yLabel: proxyName,
    xLog: wide,
    series,
  };
}

/** Best proxy FID so far against trial number, per proposer, with the default network as a dashed line. */
function bestSoFarChart(input: ReportInput, proxyName: string): ChartSpec {
  const colour = proposerColours(input);
  const series: ChartSeries[] = input.bestSoFar.map((c) => ({
    name: c.proposer,
    kind: "step",
    color: colour(c.proposer),
    symbol: "circle",
    symbolSize: 4,
    points: c.points.map((p) => [p.trial, p.best]),
  }));
  const xs = input.bestSoFar.flatMap((c) => c.points.map((p) => p.trial));
  const b = input.baseline;
  if (b && xs.length > 0) {
    series.push({
      name: `default (${b.name})`,
      kind: "line",
      color: BASELINE_COLOR,
      dashed: true,
      points: [[Math.min(...xs), b.proxyFid], [Math.max(...xs), b.proxyFid]],
    });
  }
  return {
    title: `Best ${proxyName} so far against trial number`,
    xLabel: "trial",
    yLabel: proxyName,
    series,
  };
}

/** Training loss against kimg of the best trials and the default network. */
function lossChart(input: ReportInput, ranked: Trial[]): ChartSpec {
  const curve = (h: LossPoint[]): [number, number][] => h.map((p) => [p.nimg / 1000, p.loss]);
  const series: ChartSeries[] = ranked.slice(0, LOSS_CURVES)
    .map((t, i): ChartSeries => ({
      name: `#${i + 1} trial ${t.id}`,
      kind: "line",
      points: curve(t.lossHistory),
    }))
    .filter((c) => c.points.length > 0);
  const b = input.baseline;
  const bHistory = b && (b.lossHistory ?? input.trials.find((t) => t.id === b.trialId)?.lossHistory);
  if (b && bHistory && bHistory.length > 0) {
    series.push({
      name: `default (${b.name})`,
      kind: "line",
      color: BASELINE_COLOR,
      dashed: true,
      points: curve(bHistory),
    });
  }
  return { title: `Training loss of the best ${LOSS_CURVES} trials`, xLabel: "kimg", yLabel: "loss", series };
}

// ---------------------------------------------------------------------------------------------------------------
// report.html

/** Escapes text for HTML content and quoted attribute values. */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const CSS = `
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1120px;margin:20px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{padding:3px 9px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f6f6f6;font-weight:600}.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.default td{background:#fff3e6}.tag{font-size:11px;padding:0 5px;border-radius:3px;background:#eee;margin-left:4px}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:13px}.meta dt{color:#666}.meta dd{margin:0}
.settings{columns:2;font-size:12px;margin:0;padding:0;list-style:none}.settings li{break-inside:avoid}
.settings code{color:#555}.charts{display:flex;flex-wrap:wrap;gap:18px}figure{margin:0}
figcaption{font-size:12px;color:#555;margin-top:2px;max-width:540px}.grids{display:flex;flex-wrap:wrap;gap:18px}
.grids img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}.empty{color:#a15c00;font-weight:600}
.muted{color:#777}details summary{cursor:pointer;color:#555}
`;

/** One self-contained HTML page (see the file comment). */
export function renderReportHtml(input: ReportInput, options: ReportOptions = {}): string {
  const ranked = rankTrials(input.trials);
  const proxyName = ranked.find((t) => t.scores.proxyName)?.scores.proxyName ?? "proxy FID";
  const e = (v: unknown) => escapeHtml(String(v));
  const out: string[] = [];
  out.push(
    `<!doctype html><html lang="en"><head><meta charset="utf-8">`,
    `<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">`,
    `<meta name="viewport" content="width=device-width,initial-scale=1">`,
    `<title>${e(input.title)}</title><style>${CSS.trim()}</style></head><body>`,
    `<h1>${e(input.title)}</h1>`,
    headerHtml(input),
    `<h2>Best architectures</h2>`,
  );
  if (ranked.length === 0) {
    out.push(`<p class="empty">No trial has finished yet: nothing to rank or plot.</p>`);
  } else {
    out.push(bestTableHtml(input, ranked, options.top ?? DEFAULT_TOP, proxyName));
  }
  out.push(baselineHtml(input));
  if (ranked.length > 0) {
    // Searches whose candidates do not train (DDSM's genomes share one supernet) have no loss curves to draw.
    const losses = lossChart(input, ranked);
    out.push(
      `<h2>Plots</h2><div class="charts">`,
      chartHtml(paretoChart(input, ranked, proxyName)),
      chartHtml(bestSoFarChart(input, proxyName)),
      ...(losses.series.length > 0 ? [chartHtml(losses)] : []),
      `</div>`,
    );
  }
  out.push(paretoTableHtml(input, ranked, proxyName), gridsHtml(input), statusHtml(input));
  for (const s of input.sections ?? []) out.push(sectionHtml(s));
  out.push(`</body></html>\n`);
  return out.join("\n");
}

/** Timing, trial counts, and the settings as dotted keys. */
function headerHtml(input: ReportInput): string {
  const t = input.timing, c = statusCounts(input.trials);
  const iso = (ms: number) => new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  const sec = (s: number | null) => s === null || !Number.isFinite(s) ? "–" : `${s.toFixed(1)} s`;
  const meta: [string, string][] = [
    ["started", iso(t.started)],
    ["finished", iso(t.finished)],
    ["wall time", formatDuration(t.wallSeconds)],
    ["per done trial", `training ${sec(t.perTrial.trainSeconds)}, proxy ${sec(t.perTrial.proxySeconds)}`],
    ["trials", `${c.total}: ${countsText(c)}`],
  ];
  const settings = flatten(redact(input.settings)).map(([k, v]) =>
    `<li><code>${escapeHtml(k)}</code> ${escapeHtml(v)}</li>`
  );
  return [
    `<dl class="meta">${meta.map(([k, v]) => `<dt>${k}</dt><dd>${escapeHtml(v)}</dd>`).join("")}</dl>`,
    `<details open><summary>settings (${settings.length})</summary><ul class="settings">${
      settings.join("")
    }</ul></details>`,
  ].join("\n");
}

function bestTableHtml(input: ReportInput, ranked: Trial[], top: number, proxyName: string): string {
  const pareto = new Set(input.paretoIds);
  const baselineId = input.baseline?.trialId;
  const hasFid = ranked.some((t) => Number.isFinite(t.scores.fid));
  const fidName = ranked.find((t) => t.scores.fidName)?.scores.fidName ?? "FID";
  const head =
    ["#", "trial", "proposer", proxyName, ...(hasFid ? [fidName] : []), "MACs (M)", "params (k)", "train s"]
      .map((h) => `<th>${escapeHtml(h)}</th>`).join("") + "<th>architecture</th>";
  const rows = ranked.slice(0, top).map((t, i) => {
    const tags = (pareto.has(t.id) ? `<span class="tag">Pareto</span>` : "") +
      (t.id === baselineId ? `<span class="tag">default</span>` : "");
    const cells = [
      num(i + 1, 0),
      num(t.id, 0),
      `<td>${escapeHtml(t.proposer)}</td>`,
      num(t.scores.proxyFid, 2),
      ...(hasFid ? [num(t.scores.fid, 2)] : []),
      num(millions(t.costs.macs), 2),
      num(thousands(t.costs.params), 1),
      num(t.costs.trainSeconds, 0),
      `<td title="${escapeHtml(JSON.stringify(t.spec) ?? "")}">${
        escapeHtml(specSummary(t.spec))
      }${tags}</td>`,
    ];
    return `<tr${t.id === baselineId ? ` class="default"` : ""}>${cells.join("")}</tr>`;
  });
  const more = ranked.length > top
    ? `<p class="muted">${ranked.length - top} more done trials: report.json ranks them all.</p>`
    : "";
  return `<table><thead><tr>${head}</tr></thead><tbody>${rows.join("")}</tbody></table>${more}`;
}

function baselineHtml(input: ReportInput): string {
  const b = input.baseline;
  if (!b) return "";
  const what = [
    `proxy FID ${fmt(b.proxyFid, 2)}`,
    ...(b.fid !== undefined ? [`FID ${fmt(b.fid, 2)}`] : []),
    `${fmt(millions(b.macs), 2)} M MACs`,
    `${fmt(thousands(b.params), 1)} k params`,
    specSummary(b.spec),
  ].join(", ");
  const trial = b.trialId !== undefined ? `, trial ${b.trialId}` : "";
  return `<p><b>Default network</b> (${escapeHtml(b.name)}${trial}): ${escapeHtml(what)}</p>`;
}

function paretoTableHtml(input: ReportInput, ranked: Trial[], proxyName: string): string {
  const front = paretoTrials(input, ranked);
  if (front.length === 0) return "";
  const name = escapeHtml(proxyName);
  const head = ["trial", "proposer", name, "MACs (M)", "params (k)", "architecture"].map((h) =>
    `<th>${h}</th>`
  );
  const rows = front.map((t) =>
    [
      num(t.id, 0),
      `<td>${escapeHtml(t.proposer)}</td>`,
      num(t.scores.proxyFid, 2),
      num(millions(t.costs.macs), 2),
      num(thousands(t.costs.params), 1),
      `<td>${escapeHtml(specSummary(t.spec))}</td>`,
    ].join("")
  );
  return `<h2>Pareto front (${name} against MACs, ${front.length} trials)</h2>` +
    `<table><thead><tr>${head.join("")}</tr></thead><tbody><tr>${
      rows.join("</tr><tr>")
    }</tr></tbody></table>`;
}

function gridsHtml(input: ReportInput): string {
  if (input.grids.length === 0) return "";
  return `<h2>Samples</h2>${gridFiguresHtml(input.grids, "grids")}`;
}

/** Sample grids as figures with their labels as captions. */
function gridFiguresHtml(grids: readonly ReportGrid[], what: string): string {
  const figures = grids.map((g, i) => {
    const { width } = pngSize(g.png, `${what}[${i}] (${g.label})`);
    // Small grids are enlarged by a whole factor so that pixels stay sharp squares.
    const shown = width * Math.max(1, Math.floor(256 / width));
    const named = g.trialId === undefined || g.label.includes(`trial ${g.trialId}`);
    const caption = escapeHtml(g.label) + (named ? "" : ` <span class="muted">trial ${g.trialId}</span>`);
    return `<figure><img alt="${escapeHtml(g.label)}" width="${shown}" src="data:image/png;base64,${
      base64(g.png)
    }"><figcaption>${caption}</figcaption></figure>`;
  });
  return `<div class="grids">${figures.join("")}</div>`;
}

function statusHtml(input: ReportInput): string {
  const c = statusCounts(input.trials);
  const counts =
    `<table><thead><tr>${
      STATUSES.map((s) => `<th class="n">${s}</th>`).join("")
    }<th class="n">total</th></tr></thead>` +
    `<tbody><tr>${STATUSES.map((s) => num(c[s], 0)).join("")}${num(c.total, 0)}</tr></tbody></table>`;
  const reasons = failureReasons(input.trials);
  const reasonRows = reasons.map((r) => {
    const ids = r.trialIds.slice(0, 12).join(", ") + (r.trialIds.length > 12 ? ", …" : "");
    return `<tr><td>${escapeHtml(r.status)}</td>${num(r.count, 0)}<td>${
      escapeHtml(r.reason)
    }</td><td>${ids}</td></tr>`;
  });
  return `<h2>Trial states</h2>${counts}` + (reasons.length === 0 ? "" : (
    `<table><thead><tr><th>state</th><th>trials</th><th>reason</th><th>ids</th></tr></thead><tbody>` +
    `${reasonRows.join("")}</tbody></table>`
  ));
}

function sectionHtml(s: ReportSection): string {
  const parts = [`<h2>${escapeHtml(s.title)}</h2>`];
  if (s.text) parts.push(`<p>${escapeHtml(s.text)}</p>`);
  if (s.table) {
    const head = s.table.columns.map((c) => `<th>${escapeHtml(c)}</th>`).join("");
    const rows = s.table.rows.map((r) =>
      `<tr>${
        r.map((v) =>
          typeof v === "number" ? `<td class="n">${shortNumber(v)}</td>` : `<td>${escapeHtml(v ?? "–")}</td>`
        ).join("")
      }</tr>`
    );
    parts.push(`<table><thead><tr>${head}</tr></thead><tbody>${rows.join("")}</tbody></table>`);
  }
  if (s.charts?.length) parts.push(`<div class="charts">${s.charts.map(chartHtml).join("")}</div>`);
  if (s.grids?.length) parts.push(gridFiguresHtml(s.grids, `section "${s.title}" grids`));
  return parts.join("\n");
}

/** A chart in a figure with its title as the caption, or a note when it has nothing to draw. */
function chartHtml(spec: ChartSpec): string {
  const points = spec.series.reduce((n, s) => n + s.points.length, 0);
  const body = points === 0 ? `<p class="muted">(no data yet)</p>` : renderChartSvg(spec);
  return `<figure>${body}<figcaption>${escapeHtml(spec.title)}</figcaption></figure>`;
}

// ---------------------------------------------------------------------------------------------------------------
// The terminal table.

/** The top trials as a plain-text table for the terminal (control characters in data are replaced). */
export function formatSummaryTable(input: ReportInput, top = 10): string {
  const ranked = rankTrials(input.trials);
  const c = statusCounts(input.trials);
  const lines: string[] = [];
  if (ranked.length === 0) {
    lines.push(`No trial has finished yet (${c.total} trials: ${countsText(c)}).`);
  } else {
    const proxyName = ranked.find((t) => t.scores.proxyName)?.scores.proxyName ?? "proxy FID";
    const header = ["rank", "id", "proposer", proxyName, "MACs (M)", "params (k)", "train s", "architecture"];
    const rows = ranked.slice(0, top).map((t, i) => [
      String(i + 1),
      String(t.id),
      t.proposer,
      fmt(t.scores.proxyFid, 2),
      fmt(millions(t.costs.macs), 2),
      fmt(thousands(t.costs.params), 1),
      fmt(t.costs.trainSeconds, 0),
      specSummary(t.spec),
    ]);
    lines.push(...padTable(header, rows, [false, false, true, false, false, false, false, true]));
    lines.push(`${c.total} trials: ${countsText(c)}.`);
  }
  const b = input.baseline;
  if (b) {
    lines.push(
      `Default network (${b.name}): proxy FID ${fmt(b.proxyFid, 2)}, ${fmt(millions(b.macs), 2)} M MACs, ` +
        `${fmt(thousands(b.params), 1)} k params, ${specSummary(b.spec)}.`,
    );
  }
  return lines.map(printable).join("\n");
}

/** Columns padded to their widest cell; `left[i]` aligns column i left (text), else right (numbers). */
function padTable(header: string[], rows: string[][], left: boolean[]): string[] {
  // A newline or tab inside a cell would break the columns: every control character becomes "?".
  // deno-lint-ignore no-control-regex
  const cells = [header, ...rows].map((r) => r.map((v) => v.replace(/[\u0000-\u001f\u007f-\u009f]/g, "?")));
  const widths = header.map((_, i) => Math.max(...cells.map((r) => r[i].length)));
  const line = (r: string[]) =>
    r.map((v, i) => left[i] ? v.padEnd(widths[i]) : v.padStart(widths[i])).join("  ").trimEnd();
  return [line(cells[0]), widths.map((w) => "-".repeat(w)).join("  "), ...cells.slice(1).map(line)];
}

// ---------------------------------------------------------------------------------------------------------------
// Writing.

/** Writes `report.json` and `report.html` into `dir`, each atomically; returns their paths. */
export async function writeReport(
  dir: string,
  input: ReportInput,
  options: ReportOptions = {},
): Promise<{ json: string; html: string }> {
  const json = `${dir}/report.json`, html = `${dir}/report.html`;
  await writeTextAtomic(json, JSON.stringify(buildReportJson(input, options), null, 2) + "\n");
  await writeTextAtomic(html, renderReportHtml(input, options));
  return { json, html };
}

// ---------------------------------------------------------------------------------------------------------------
// Small formatting helpers.

function fmt(v: number | null | undefined, digits: number): string {
  return v === null || v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits);
}
function num(v: number | null | undefined, digits: number): string {
  return `<td class="n">${fmt(v, digits)}</td>`;
}
/** A number in at most 4 significant digits, as written by a person ("0.5", "1234", "1.235e+6"). */
function shortNumber(v: number): string {
  return Number.isFinite(v) ? String(Number(v.toPrecision(4))) : "–";
}
const millions = (v: number | undefined) => v === undefined ? undefined : v / 1e6;
const thousands = (v: number | undefined) => v === undefined ? undefined : v / 1e3;

function countsText(c: Record<TrialStatus, number>): string {
  return STATUSES.filter((s) => c[s] > 0).map((s) => `${c[s]} ${s}`).join(", ") || "none";
}

/** "1 h 02 min 03 s", "4 min 05 s", "42 s". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const two = (n: number) => String(n).padStart(2, "0");
  return h > 0 ? `${h} h ${two(m)} min ${two(r)} s` : m > 0 ? `${m} min ${two(r)} s` : `${r} s`;
}

/** Nested settings as [dotted key, compact JSON value] pairs (arrays stay whole). */
function flatten(value: unknown, prefix = ""): [string, string][] {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    return Object.entries(value).flatMap(([k, v]) => flatten(v, prefix ? `${prefix}.${k}` : k));
  }
  return [[prefix || "(value)", JSON.stringify(value) ?? String(value)]];
}

/** Replaces control characters, so data cannot move the terminal's cursor or change its colours. */
function printable(text: string): string {
  // deno-lint-ignore no-control-regex
  return text.replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g, "?");
}

/** Width and height from a PNG's IHDR chunk; throws naming `what` if the bytes are not a PNG. */
function pngSize(png: Uint8Array, what: string): { width: number; height: number } {
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  if (png.length < 24 || signature.some((b, i) => png[i] !== b)) throw new Error(`${what}: not a PNG file`);
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  return { width: view.getUint32(16), height: view.getUint32(20) };
}

function base64(bytes: Uint8Array): string {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}
