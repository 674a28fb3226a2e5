/**
 * @file The layer checker (tools/check_layers.ts): planted upward imports and cycles in small synthetic graphs
 * are reported with the import that breaks the rule; a clean graph and the real repository pass.
 */

import { checkLayers, formatReport, type ImportEdge, importGraph, layerOf } from "../tools/check_layers.ts";
import { ok as assert } from "node:assert";
import { assertEquals, test } from "./util.ts";

const edge = (from: string, to: string, line = 1): ImportEdge => ({ from, to, line });
const filesOf = (edges: ImportEdge[]) => [...new Set(edges.flatMap((e) => [e.from, e.to]))];

/** A graph that follows every rule: each layer imports the one below, tests and bench import from the top. */
const CLEAN = [
  edge("cli.ts", "search/run.ts"),
  edge("search/run.ts", "eval/proxy.ts"),
  edge("search/run.ts", "models/train.ts"),
  edge("eval/proxy.ts", "models/generate.ts"),
  edge("models/generate.ts", "models/unet.ts"),
  edge("models/unet.ts", "engine/mod.ts"),
  edge("engine/mod.ts", "engine/ops/conv.ts"),
  edge("engine/ops/conv.ts", "kernels/conv.ts"),
  edge("kernels/conv.ts", "util/errors.ts"),
  edge("models/train.ts", "util/config.ts"),
  edge("tests/util.ts", "cli.ts"),
  edge("tests/a_test.ts", "tests/util.ts"),
  edge("tests/util.ts", "tests/a_test.ts"),
  edge("bench/main.ts", "tests/util.ts"),
];

test("layerOf: the first folder, cli.ts on its own, null elsewhere", () => {
  assertEquals(layerOf("engine/ops/conv.ts"), "engine");
  assertEquals(layerOf("cli.ts"), "cli");
  assertEquals(layerOf("tests/util.ts"), "tests");
  assertEquals(layerOf("main.ts"), null);
  assertEquals(layerOf("cli/x.ts"), null);
  assertEquals(layerOf("scripts/x.ts"), null);
});

test("a clean graph passes, with no known cycles needed", () => {
  const r = checkLayers(filesOf(CLEAN), CLEAN, []);
  assertEquals(r.violations, []);
  assertEquals(r.cycles, []);
  assert(r.ok, "clean graph failed");
});

test("upward imports are reported with file, line, target and both layers", () => {
  const planted = [
    ...CLEAN,
    edge("engine/tensor.ts", "models/unet.ts", 7),
    edge("models/data.ts", "eval/fid.ts", 3),
    edge("kernels/conv.ts", "tests/util.ts", 12),
    edge("util/config.ts", "cli.ts", 2),
  ];
  const r = checkLayers(filesOf(planted), planted, []);
  assertEquals(r.violations, [
    "engine/tensor.ts:7 imports models/unet.ts (layer engine may not import layer models)",
    "kernels/conv.ts:12 imports tests/util.ts (layer kernels may not import layer tests)",
    "models/data.ts:3 imports eval/fid.ts (layer models may not import layer eval)",
    "util/config.ts:2 imports cli.ts (layer util may not import layer cli)",
  ]);
  assert(!r.ok, "upward imports passed");
});

test("a file in no layer is reported", () => {
  const r = checkLayers(["scripts/x.ts", "cli.ts"], [edge("scripts/x.ts", "cli.ts")], []);
  assertEquals(r.violations.length, 1);
  assert(r.violations[0].startsWith("scripts/x.ts: in no layer"), r.violations[0]);
  assert(!r.ok, "a file in no layer passed");
});

test("a planted cycle is reported as a chain with the imports that close it", () => {
  const planted = [...CLEAN, edge("models/unet.ts", "models/generate.ts", 9)];
  const r = checkLayers(filesOf(planted), planted, []);
  assertEquals(r.violations, []);
  assertEquals(r.cycles.length, 1);
  assertEquals(r.cycles[0].chain, ["models/generate.ts", "models/unet.ts", "models/generate.ts"]);
  assertEquals(r.cycles[0].imports, [
    edge("models/generate.ts", "models/unet.ts"),
    edge("models/unet.ts", "models/generate.ts", 9),
  ]);
  assert(!r.ok, "a cycle passed");
  const text = formatReport(r).join("\n");
  assert(text.includes("cycle models/generate.ts → models/unet.ts → models/generate.ts"), text);
  assert(text.includes("models/unet.ts:9 imports models/generate.ts"), text);
  // A file that imports itself is a cycle too.
  const self = checkLayers(["engine/a.ts"], [edge("engine/a.ts", "engine/a.ts", 4)], []);
  assertEquals(self.cycles.map((c) => c.chain), [["engine/a.ts", "engine/a.ts"]]);
});

test("every member of a larger cycle lies on a reported chain; cycles among tests are not reported", () => {
  // a → b → c → a and b → a: two shortest cycles cover a, b and c.
  const planted = [
    edge("engine/a.ts", "engine/b.ts", 1),
    edge("engine/b.ts", "engine/a.ts", 2),
    edge("engine/b.ts", "engine/c.ts", 3),
    edge("engine/c.ts", "engine/a.ts", 4),
    edge("tests/x.ts", "tests/y.ts"),
    edge("tests/y.ts", "tests/x.ts"),
  ];
  const r = checkLayers(filesOf(planted), planted, []);
  const onChains = new Set(r.cycles.flatMap((c) => c.chain));
  assertEquals([...onChains].sort(), ["engine/a.ts", "engine/b.ts", "engine/c.ts"]);
  assert(!r.ok, "a cycle passed");
});

test("a known cycle is allowed only with exactly its files; a gone one is noted", () => {
  const cycle = [...CLEAN, edge("engine/ops/conv.ts", "engine/mod.ts", 5)];
  const allowed = checkLayers(filesOf(cycle), cycle, [["engine/ops/conv.ts", "engine/mod.ts"]]);
  assert(allowed.ok, "the known cycle failed");
  assert(allowed.cycles.every((c) => c.known), "the known cycle was not marked known");
  assert(
    formatReport(allowed).some((l) => l.startsWith("allowed (known): cycle ")),
    "no 'allowed (known)' line",
  );
  // A third file joins the cycle: a different set of files, so it fails.
  const grown = [
    ...cycle,
    edge("engine/mod.ts", "engine/extra.ts"),
    edge("engine/extra.ts", "engine/ops/conv.ts"),
  ];
  assert(
    !checkLayers(filesOf(grown), grown, [["engine/ops/conv.ts", "engine/mod.ts"]]).ok,
    "a grown cycle passed",
  );
  const gone = checkLayers(filesOf(CLEAN), CLEAN, [["engine/ops/conv.ts", "engine/mod.ts"]]);
  assert(gone.ok, "a gone known cycle failed");
  assertEquals(gone.staleKnown, [["engine/mod.ts", "engine/ops/conv.ts"]]);
});

test("the repository follows its layers (deno info graph)", async () => {
  const root = decodeURIComponent(new URL("..", import.meta.url).pathname);
  const graph = await importGraph(root);
  assertEquals(graph.errors, []);
  // The graph is the real one: files from every layer and imports that are known to exist.
  for (
    const f of [
      "cli.ts",
      "util/config.ts",
      "kernels/conv.ts",
      "engine/mod.ts",
      "models/unet.ts",
      "eval/fid.ts",
    ]
  ) {
    assert(graph.files.includes(f), `${f} not found`);
  }
  const has = (from: string, to: string) => graph.edges.some((e) => e.from === from && e.to === to);
  assert(has("eval/proxy.ts", "models/generate.ts"), "eval/proxy.ts → models/generate.ts missing");
  assert(has("tests/layers_test.ts", "tools/check_layers.ts"), "this test's own import missing");
  const r = checkLayers(graph.files, graph.edges);
  assert(r.ok, formatReport(r).join("\n"));
});
