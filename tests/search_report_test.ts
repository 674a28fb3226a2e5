/**
 * @file The search report: report.json's ranking, Pareto front and counts; report.html self-contained (no
 * network, inline SVG plots, data-URI grids), escaping of untrusted strings, an empty search, the terminal
 * table, atomic writing; and, where a `chromium` binary is installed, a headless screenshot that must not be
 * blank.
 */

import { deepStrictEqual as assertEquals, match as assertMatch, ok as assert, throws } from "node:assert";
import { decode, encode } from "fast-png";
import type { Trial } from "../search/types.ts";
import {
  buildReportJson,
  formatSummaryTable,
  rankTrials,
  renderReportHtml,
  type ReportInput,
  specSummary,
  writeReport,
} from "../search/report.ts";
import { Rng } from "../util/random.ts";
import { fakeTrial } from "./util.ts";

/** Asserts that `text` contains `part`, showing the part when it does not. */
function assertStringIncludes(text: string, part: string): void {
  assert(text.includes(part), `missing: ${part.slice(0, 200)}`);
}

function trial(id: number, over: Partial<Trial> = {}): Trial {
  return fakeTrial(id, {
    spec: { modelChannels: 32, channelMult: [1, 2, 2], numBlocks: 2, attnResolutions: [8] },
    proposer: "llm",
    createdAt: 1_700_000_000_000 + id * 1000,
    ...over,
  });
}

/** A decaying noisy loss curve over `kimg` thousand images. */
function lossCurve(rng: Rng, kimg: number, floor: number) {
  return Array.from({ length: 40 }, (_, i) => {
    const nimg = Math.round(((i + 1) / 40) * kimg * 1000);
    return { step: i * 10, nimg, loss: floor + 0.6 * Math.exp(-nimg / 8000) + 0.03 * rng.next() };
  });
}

/** A small colourful PNG grid: 4×4 cells of 16×16 gradients with 1-pixel gaps. */
function gridPng(seed: number): Uint8Array {
  const cell = 16, n = 4, size = n * cell + (n - 1);
  const data = new Uint8Array(size * size * 3).fill(32);
  const rng = new Rng(seed);
  for (let cy = 0; cy < n; cy++) {
    for (let cx = 0; cx < n; cx++) {
      const base = [rng.int(256), rng.int(256), rng.int(256)];
      for (let y = 0; y < cell; y++) {
        for (let x = 0; x < cell; x++) {
          const o = ((cy * (cell + 1) + y) * size + cx * (cell + 1) + x) * 3;
          data[o] = (base[0] + 8 * x) % 256;
          data[o + 1] = (base[1] + 8 * y) % 256;
          data[o + 2] = base[2];
        }
      }
    }
  }
  return encode({ width: size, height: size, data, channels: 3, depth: 8 });
}

/** Ids of done trials not dominated in (proxy FID, MACs). */
function pareto(trials: Trial[]): number[] {
  const done = rankTrials(trials);
  return done.filter((a) =>
    !done.some((b) =>
      b !== a && b.scores.proxyFid! <= a.scores.proxyFid! && b.costs.macs! <= a.costs.macs! &&
      (b.scores.proxyFid! < a.scores.proxyFid! || b.costs.macs! < a.costs.macs!)
    )
  ).map((t) => t.id);
}

/** A synthetic search: 24 done trials from two proposers, plus pruned, failed, rejected and queued ones. */
function syntheticSearch(): ReportInput {
  const rng = new Rng(7);
  const trials: Trial[] = [];
  for (let id = 1; id <= 32; id++) {
    const proposer = id % 3 === 0 ? "evolutionary" : "llm";
    const mc = [16, 32, 48, 64][rng.int(4)], mult = [[1, 2], [1, 2, 2], [1, 2, 2, 2]][rng.int(3)];
    const macs = mc * mc * mult.length * 2.2e4 * (1 + rng.next());
    const spec = { modelChannels: mc, channelMult: mult, numBlocks: 1 + rng.int(3), attnResolutions: [8] };
    const proxyFid = 40 + 3e9 / macs * (0.5 + rng.next());
    if (id % 11 === 5) {
      trials.push(
        trial(id, { proposer, spec, status: "rejected", error: "MACs 912.3 M exceed the budget 400 M" }),
      );
    } else if (id % 13 === 7) {
      trials.push(
        trial(id, { proposer, spec, status: "failed", error: "loss became NaN at step 120\nstack..." }),
      );
    } else if (id % 9 === 4) {
      trials.push(trial(id, { proposer, spec, status: "pruned", error: "below the median at kimg 2" }));
    } else if (id > 30) {
      trials.push(trial(id, { proposer, spec, status: "queued" }));
    } else {
      trials.push(trial(id, {
        proposer,
        spec,
        scores: { proxyFid, proxyName: "RFID-128" },
        costs: { macs, params: mc * mc * 300, trainSeconds: 40 + rng.int(60), proxySeconds: 12 },
        lossHistory: lossCurve(rng, 10, 0.2 + 50 / proxyFid / 10),
      }));
    }
  }
  const bestSoFar = ["llm", "evolutionary"].map((proposer) => {
    let best = Infinity;
    const points: { trial: number; best: number }[] = [];
    for (const t of trials) {
      if (t.proposer !== proposer || t.status !== "done") continue;
      best = Math.min(best, t.scores.proxyFid!);
      points.push({ trial: t.id, best });
    }
    return { proposer, points };
  });
  const first = trials[0];
  return {
    title: "DiffNAS search: shapes-32",
    settings: {
      space: { channels: [16, 64], levels: [2, 4] },
      budget: { trials: 32, macs: 4e8 },
      llm: { model: "local", apiKey: "sk-do-not-show" },
    },
    timing: {
      started: Date.UTC(2025, 0, 2, 10, 0, 0),
      finished: Date.UTC(2025, 0, 2, 11, 2, 3),
      wallSeconds: 3723,
      perTrial: { trainSeconds: 71.5, proxySeconds: 12 },
    },
    trials,
    paretoIds: pareto(trials),
    bestSoFar,
    baseline: {
      name: "ddpmpp-small",
      trialId: first.id,
      proxyFid: first.scores.proxyFid!,
      macs: first.costs.macs!,
      params: first.costs.params!,
      spec: first.spec,
    },
    grids: [
      {
        label: "best: trial " + rankTrials(trials)[0].id,
        trialId: rankTrials(trials)[0].id,
        png: gridPng(1),
      },
      { label: "default network", trialId: first.id, png: gridPng(2), path: "grids/default.png" },
    ],
    sections: [{
      title: "DDSM schedule",
      text: "Widths per step group.",
      table: { columns: ["steps", "width"], rows: [["0–9", 0.5], ["10–17", 1], ["18", null]] },
      charts: [{
        title: "width against step",
        xLabel: "step",
        yLabel: "width",
        series: [{ name: "schedule", kind: "step", points: [[0, 0.5], [10, 1], [18, 1]] }],
      }],
    }],
  };
}

Deno.test("report.json: top trials by proxy FID, the Pareto front, counts, no PNG bytes, secrets hidden", () => {
  const input = syntheticSearch();
  const json = buildReportJson(input, { top: 5 }) as {
    top: { rank: number; id: number; proxyFid: number; summary: string; pareto: boolean }[];
    pareto: { id: number; macs: number }[];
    counts: Record<string, number>;
    grids: unknown[];
    settings: { llm: { apiKey: string } };
    baseline: { name: string };
    failures: { status: string; count: number }[];
  };
  const done = input.trials.filter((t) => t.status === "done");
  assertEquals(
    (buildReportJson(input).top as unknown[]).length,
    done.length,
    "by default every done trial is ranked",
  );
  const sorted = done.map((t) => t.scores.proxyFid!).sort((a, b) => a - b);
  assertEquals(json.top.map((t) => t.proxyFid), sorted.slice(0, 5));
  assertEquals(json.top.map((t) => t.rank), [1, 2, 3, 4, 5]);
  assertEquals(new Set(json.pareto.map((p) => p.id)), new Set(input.paretoIds));
  const macs = json.pareto.map((p) => p.macs);
  assertEquals(macs, [...macs].sort((a, b) => a - b));
  // The best trial is always on the front.
  assert(json.top[0].pareto);
  assertEquals(json.counts.total, 32);
  assertEquals(json.counts.done, done.length);
  for (const s of ["pruned", "failed", "rejected", "queued"]) {
    assertEquals(json.counts[s], input.trials.filter((t) => t.status === s).length, s);
    assert(json.counts[s] > 0, `the synthetic search has ${s} trials`);
  }
  assertEquals(json.counts.running, 0);
  assertEquals(
    json.failures.reduce((n, f) => n + f.count, 0),
    json.counts.pruned + json.counts.failed + json.counts.rejected,
  );
  assertEquals(json.grids, [
    { label: input.grids[0].label, trialId: input.grids[0].trialId, path: null },
    { label: "default network", trialId: 1, path: "grids/default.png" },
  ]);
  assertEquals(json.settings.llm.apiKey, "(hidden)");
  assertEquals(json.baseline.name, "ddpmpp-small");
  const text = JSON.stringify(json);
  assert(!text.includes("sk-do-not-show"));
  assertEquals(JSON.parse(text), json, "JSON-serialisable without loss");
});

Deno.test("report.json: a Pareto id that is not a done trial is named", () => {
  const input = syntheticSearch();
  const rejected = input.trials.find((t) => t.status === "rejected")!;
  input.paretoIds = [...input.paretoIds, rejected.id];
  throws(() => buildReportJson(input), {
    message: `paretoIds[${
      input.paretoIds.length - 1
    }]: trial ${rejected.id} is not a done trial with a proxy FID`,
  });
});

Deno.test("report.html: self-contained, three SVG plots, data-URI grids, sections", () => {
  const input = syntheticSearch();
  const html = renderReportHtml(input);
  assert(!/(src|href)\s*=\s*["']?\s*(https?:)?\/\//i.test(html), "no network reference in src/href");
  assert(!/<(script|link|iframe|object|embed)\b/i.test(html), "no script, link or embedded document");
  assert((html.match(/<svg/g) ?? []).length >= 4, "three search plots and the section's chart");
  assertEquals((html.match(/src="data:image\/png;base64,/g) ?? []).length, 2);
  assertStringIncludes(html, `data:image/png;base64,${btoa(String.fromCharCode(...input.grids[1].png))}`);
  const best = rankTrials(input.trials)[0];
  assertStringIncludes(
    html,
    `<td title="${JSON.stringify(best.spec).replaceAll('"', "&#34;")}">${specSummary(best.spec)}`,
  );
  assertStringIncludes(html, "DDSM schedule");
  assertStringIncludes(html, "MACs 912.3 M exceed the budget 400 M");
  assertStringIncludes(html, "1 h 02 min 03 s");
  assert(!html.includes("sk-do-not-show"));
  assert(html.length < 400_000, `report.html is ${html.length} characters`);
  assertStringIncludes(html, "Training loss of the best");
});

Deno.test("report.html: no loss chart when no trial trained (DDSM genomes)", () => {
  const input = syntheticSearch();
  const trials = input.trials.map((t) => ({ ...t, lossHistory: [] }));
  const html = renderReportHtml({ ...input, trials, baseline: { ...input.baseline!, lossHistory: [] } });
  assert(!html.includes("Training loss of the best"), "no empty loss chart");
  assertStringIncludes(html, "Best RFID-128 so far");
});

Deno.test("report.html: strings from data are escaped", () => {
  const input = syntheticSearch();
  const evil = `<script>alert("x")</script>`;
  input.trials[1].spec = { modelChannels: evil };
  input.trials[3].error = `${evil} & more`;
  input.trials[3].status = "failed";
  input.trials[4].proposer = evil;
  input.title = evil;
  input.grids[0].label = evil;
  input.paretoIds = pareto(input.trials);
  const html = renderReportHtml(input);
  assert(!html.includes("<script"), "no live <script> anywhere");
  assertStringIncludes(html, "&#60;script&#62;alert(&#34;x&#34;)&#60;/script&#62; &#38; more");
  assertStringIncludes(html, `{&#34;modelChannels&#34;:&#34;&#60;script&#62;`);
  // The terminal table keeps the text but cannot be fooled by control characters.
  input.trials[4].proposer = "llm\u001b[31mred";
  assert(!formatSummaryTable(input, 40).includes("\u001b"));
});

Deno.test("an empty search (no done trial) still renders, with a message", async () => {
  const input = syntheticSearch();
  input.trials = input.trials.filter((t) => t.status !== "done");
  input.paretoIds = [];
  input.bestSoFar = [];
  input.baseline = undefined;
  input.grids = [];
  input.sections = [];
  const html = renderReportHtml(input);
  assertStringIncludes(html, "No trial has finished yet");
  assertStringIncludes(html, "</html>");
  const json = buildReportJson(input) as { top: unknown[]; pareto: unknown[] };
  assertEquals(json.top, []);
  assertEquals(json.pareto, []);
  assertMatch(formatSummaryTable(input), /^No trial has finished yet \(\d+ trials: .*pruned/);
  const none = { ...input, trials: [] };
  assertStringIncludes(renderReportHtml(none), "No trial has finished yet");
  const dir = await Deno.makeTempDir();
  try {
    await writeReport(dir, none);
    assertEquals(
      (JSON.parse(await Deno.readTextFile(`${dir}/report.json`)) as { counts: { total: number } }).counts
        .total,
      0,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("terminal table: ranked rows with aligned columns and the default network", () => {
  const input = syntheticSearch();
  const text = formatSummaryTable(input, 4);
  const lines = text.split("\n");
  assertMatch(
    lines[0],
    /^rank\s+id\s+proposer\s+RFID-128\s+MACs \(M\)\s+params \(k\)\s+train s\s+architecture$/,
  );
  const best = rankTrials(input.trials)[0];
  assertMatch(lines[2], new RegExp(`^\\s*1\\s+${best.id}\\s+\\S+\\s+${best.scores.proxyFid!.toFixed(2)}\\s`));
  assertEquals(lines.length, 2 + 4 + 2);
  assertStringIncludes(lines.at(-1)!, "Default network (ddpmpp-small)");
  // Right-aligned proxy FID column: every row's value ends at the same position.
  const end = lines[0].indexOf("RFID-128") + "RFID-128".length;
  for (const l of lines.slice(2, 6)) assertMatch(l.slice(end - 5, end), /^\d+\.\d\d$|^ ?\d\.\d\d$/);
});

Deno.test("specSummary: UNet-like specs in one line, anything else as cut JSON", () => {
  assertEquals(
    specSummary({ modelChannels: 32, channelMult: [1, 2, 2], numBlocks: 2, attnResolutions: [8] }),
    "32ch ×[1,2,2] 2 blocks attn@8",
  );
  assertEquals(
    specSummary({ modelChannels: 64, channelMult: [1, 2], numBlocks: 1, attnResolutions: [] }),
    "64ch ×[1,2] 1 block",
  );
  assertEquals(
    specSummary({ modelChannels: 16, channelMult: [1, 2], numBlocks: [2, 1] }),
    "16ch ×[1,2] blocks [2,1]",
  );
  assertEquals(specSummary({ widths: [0.5, 1] }), `{"widths":[0.5,1]}`);
  assertEquals(specSummary({ s: "x".repeat(200) }).length, 80);
});

Deno.test("writeReport writes report.json and report.html", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const paths = await writeReport(dir, syntheticSearch());
    assertEquals(paths, { json: `${dir}/report.json`, html: `${dir}/report.html` });
    const json = JSON.parse(await Deno.readTextFile(paths.json)) as { title: string };
    assertEquals(json.title, "DiffNAS search: shapes-32");
    assertStringIncludes(await Deno.readTextFile(paths.html), "<svg");
    assertEquals([...Deno.readDirSync(dir)].map((e) => e.name).sort(), ["report.html", "report.json"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** The first Chromium-like browser on PATH (or in $CHROMIUM), or null. */
function findChromium(): string | null {
  const env = Deno.env.get("CHROMIUM");
  if (env) return env;
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    for (const name of ["chromium", "chromium-browser", "google-chrome"]) {
      try {
        if (Deno.statSync(`${dir}/${name}`).isFile) return `${dir}/${name}`;
      } catch { /* not here */ }
    }
  }
  return null;
}

const chromium = findChromium();
if (!chromium) {
  console.log("skipping the headless-browser check: no chromium on PATH (apt-get install chromium)");
}

Deno.test({
  name: "report.html renders in headless Chromium to a non-blank page",
  ignore: chromium === null,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      const { html } = await writeReport(dir, syntheticSearch());
      const shot = `${dir}/screenshot.png`;
      const out = await new Deno.Command(chromium!, {
        args: [
          "--headless",
          "--no-sandbox",
          "--disable-gpu",
          "--hide-scrollbars",
          "--no-first-run",
          `--user-data-dir=${dir}/profile`,
          `--screenshot=${shot}`,
          "--window-size=1200,2400",
          `file://${html}`,
        ],
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(120_000),
      }).output();
      const log = new TextDecoder().decode(out.stderr).slice(-2000);
      assert(out.success, `chromium exited with ${out.code}: ${log}`);
      const png = decode(await Deno.readFile(shot));
      assertEquals([png.width, png.height], [1200, 2400]);
      // Luminance spread and the share of non-white pixels: a blank or error page has almost none.
      const ch = png.channels, px = png.width * png.height;
      let sum = 0, sum2 = 0, ink = 0;
      const colours = new Set<number>();
      for (let i = 0; i < px; i++) {
        const r = png.data[i * ch], g = png.data[i * ch + 1], b = png.data[i * ch + 2];
        const y = 0.299 * r + 0.587 * g + 0.114 * b;
        sum += y;
        sum2 += y * y;
        if (y < 200) ink++;
        colours.add(((r >> 4) << 8) | ((g >> 4) << 4) | (b >> 4));
      }
      const variance = sum2 / px - (sum / px) ** 2;
      assert(variance > 100, `luminance variance ${variance.toFixed(1)}: the page looks blank`);
      assert(ink / px > 0.01, `only ${(100 * ink / px).toFixed(2)}% of pixels are dark`);
      assert(colours.size > 50, `only ${colours.size} distinct colours: plots and grids did not render`);
      // REPORT_KEEP=folder keeps the page and its screenshot for a person to look at.
      const keep = Deno.env.get("REPORT_KEEP");
      if (keep) {
        await Deno.copyFile(html, `${keep}/report.html`);
        await Deno.copyFile(shot, `${keep}/screenshot.png`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
