/**
 * @file The layer checker behind `deno task check`: imports go only downward and the product has no import
 * cycles (DESIGN.md, Layout).
 *
 * The product's layers, bottom first:
 *
 *     util/  <  kernels/  <  engine/  <  models/  <  eval/  <  search/  <  cli.ts
 *
 * A file may import files of its own layer and of the layers below it. `eval/` sits above `models/` because it
 * measures models (eval/proxy.ts drives models/generate.ts, eval/features.ts trains on models/data.ts); nothing
 * in `models/` imports `eval/`. `tests/`, `bench/` and `tools/` stand outside the product: they may import
 * anything, and nothing in the product may import them. A file in none of these places is reported, so that a
 * new folder gets a place in the order before it gets code.
 *
 * The import graph comes from `deno info --json` (Deno's own parser and resolver, so multi-line, type-only,
 * re-exported and dynamic imports all count, each with its line) over one temporary root module that imports
 * every .ts file in the repository. Cycles are the strongly connected components of the product's files
 * (Tarjan); each is printed as chains of files that together pass through every member, with the imports that
 * close them.
 *
 * Run: `deno run -A tools/check_layers.ts [repo folder]`; it prints each problem and exits with 1 if any.
 */

/** The product's layers, bottom first: a file may import its own layer and those before it. */
export const PRODUCT_LAYERS = ["util", "kernels", "engine", "models", "eval", "search", "cli"] as const;

/** Places outside the product: they may import anything, and the product may not import them. */
export const FREE_LAYERS = ["tests", "bench", "tools"] as const;

/**
 * Cycles that exist today and are being removed on another branch; each is the exact set of files of one
 * cycle, which is then reported as "allowed (known)" instead of failing. A cycle that grows to more files is a
 * new cycle and fails. Delete these entries once that branch is merged.
 */
export const KNOWN_CYCLES: readonly (readonly string[])[] = [
  // None: the two cycles that were here (engine/shape.ts ↔ engine/tensor.ts and models/slimmable.ts ↔
  // models/unet.ts / unet_blocks.ts) were removed. A new entry needs a reason and an issue that removes it.
];

/** One import: `from` (a path relative to the repository, "/"-separated) imports `to` at `line` (1-based). */
export interface ImportEdge {
  from: string;
  to: string;
  line: number;
}

/** One cycle: the files in order, the first repeated at the end, and the import behind each step. */
export interface Cycle {
  chain: string[];
  imports: ImportEdge[];
  /** True when the cycle's component is one of the known cycles. */
  known: boolean;
}

/** What `checkLayers` found. `ok` is false when anything but known cycles was found. */
export interface LayerReport {
  /** "file:line imports target (layer A may not import layer B)", and files in no layer. */
  violations: string[];
  /** Every cycle, known ones included. */
  cycles: Cycle[];
  /** Known cycles that no longer exist (their KNOWN_CYCLES entry can go). */
  staleKnown: string[][];
  ok: boolean;
}

type Layer = typeof PRODUCT_LAYERS[number] | typeof FREE_LAYERS[number];

/** The layer of a repository path: its first folder, or "cli" for cli.ts; null when it has none. */
export function layerOf(file: string): Layer | null {
  if (file === "cli.ts") return "cli";
  const slash = file.indexOf("/");
  if (slash < 0) return null;
  const top = file.slice(0, slash);
  const folders: readonly string[] = [...PRODUCT_LAYERS.filter((l) => l !== "cli"), ...FREE_LAYERS];
  return folders.includes(top) ? top as Layer : null;
}

const rank = (layer: Layer): number => (PRODUCT_LAYERS as readonly string[]).indexOf(layer);
const isFree = (layer: Layer): boolean => rank(layer) < 0;

/**
 * Checks `edges` among `files` (repository paths): the layer order, and cycles among the product's files.
 * `known` lists the allowed cycles as sets of files (default: KNOWN_CYCLES).
 */
export function checkLayers(
  files: readonly string[],
  edges: readonly ImportEdge[],
  known: readonly (readonly string[])[] = KNOWN_CYCLES,
): LayerReport {
  const violations: string[] = [];
  for (const f of [...files].sort()) {
    if (layerOf(f) === null) {
      violations.push(`${f}: in no layer (known: ${[...PRODUCT_LAYERS, ...FREE_LAYERS].join(", ")})`);
    }
  }
  const sorted = [...edges].sort((a, b) => a.from.localeCompare(b.from) || a.line - b.line);
  for (const e of sorted) {
    const a = layerOf(e.from), b = layerOf(e.to);
    if (a === null || b === null || isFree(a)) continue;
    if (isFree(b) || rank(b) > rank(a)) {
      violations.push(`${e.from}:${e.line} imports ${e.to} (layer ${a} may not import layer ${b})`);
    }
  }

  // Cycles among the product's files only: tests and bench may import each other freely.
  const product = (f: string) => {
    const l = layerOf(f);
    return l !== null && !isFree(l);
  };
  const out = new Map<string, ImportEdge[]>();
  for (const e of sorted) {
    if (!product(e.from) || !product(e.to)) continue;
    if (!out.has(e.from)) out.set(e.from, []);
    out.get(e.from)!.push(e);
  }
  const nodes = [...new Set([...files.filter(product), ...out.keys()])].sort();
  const cycles: Cycle[] = [];
  const seenKnown = new Set<string>();
  for (const component of stronglyConnected(nodes, out)) {
    const self = component.length === 1 && (out.get(component[0]) ?? []).some((e) => e.to === component[0]);
    if (component.length === 1 && !self) continue;
    const key = component.join(" ");
    const isKnown = known.some((k) => [...k].sort().join(" ") === key);
    if (isKnown) seenKnown.add(key);
    for (const c of coveringCycles(component, out)) cycles.push({ ...c, known: isKnown });
  }
  const staleKnown = known.map((k) => [...k].sort()).filter((k) => !seenKnown.has(k.join(" ")));
  return { violations, cycles, staleKnown, ok: violations.length === 0 && cycles.every((c) => c.known) };
}

/** Tarjan's strongly connected components, each sorted. */
function stronglyConnected(nodes: string[], out: Map<string, ImportEdge[]>): string[][] {
  const index = new Map<string, number>(), low = new Map<string, number>();
  const stack: string[] = [], onStack = new Set<string>(), result: string[][] = [];
  let next = 0;
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const { to: w } of out.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(w);
      } while (w !== v);
      result.push(component.sort());
    }
  };
  for (const v of nodes) if (!index.has(v)) visit(v);
  return result;
}

/** Shortest cycles inside one component until every member lies on one (a component may need several). */
function coveringCycles(component: string[], out: Map<string, ImportEdge[]>): Omit<Cycle, "known">[] {
  const members = new Set(component), covered = new Set<string>(), cycles: Omit<Cycle, "known">[] = [];
  for (const start of component) {
    if (covered.has(start)) continue;
    // Breadth-first from `start` inside the component until an import leads back to it.
    const via = new Map<string, ImportEdge>();
    const queue = [start];
    let closing: ImportEdge | undefined;
    for (let i = 0; i < queue.length && !closing; i++) {
      for (const e of out.get(queue[i]) ?? []) {
        if (!members.has(e.to)) continue;
        if (e.to === start) {
          closing = e;
          break;
        }
        if (!via.has(e.to)) {
          via.set(e.to, e);
          queue.push(e.to);
        }
      }
    }
    const imports = [closing!];
    for (let f = closing!.from; f !== start; f = via.get(f)!.from) imports.unshift(via.get(f)!);
    const chain = [start, ...imports.map((e) => e.to)];
    chain.forEach((f) => covered.add(f));
    cycles.push({ chain, imports });
  }
  return cycles;
}

/** The report as lines for a terminal: violations, then cycles (known ones marked), then a summary. */
export function formatReport(r: LayerReport, counts?: { files: number; imports: number }): string[] {
  const lines = [...r.violations];
  for (const c of r.cycles) {
    lines.push(`${c.known ? "allowed (known): " : ""}cycle ${c.chain.join(" → ")}`);
    for (const e of c.imports) lines.push(`  ${e.from}:${e.line} imports ${e.to}`);
  }
  for (const k of r.staleKnown) {
    lines.push(`note: the known cycle ${k.join(", ")} is gone; delete it from KNOWN_CYCLES`);
  }
  const bad = r.cycles.filter((c) => !c.known).length;
  const seen = counts ? `${counts.files} files, ${counts.imports} imports: ` : "";
  lines.push(
    `layers: ${seen}${r.violations.length} violation(s), ${bad} cycle(s)` +
      (r.cycles.length > bad ? `, ${r.cycles.length - bad} known cycle(s) allowed` : ""),
  );
  return lines;
}

// ---------------------------------------------------------------------------------------------------------------
// The repository's import graph.

/** Top-level folders that hold no source (run outputs, caches, dependencies). Dot-folders are skipped too. */
const SKIP = new Set(["node_modules", "runs", "out", "vendor-device"]);

/** Every .ts file under `root`, as repository paths, sorted. */
export async function sourceFiles(root: string): Promise<string[]> {
  const files: string[] = [];
  const walk = async (dir: string, rel: string) => {
    for await (const e of Deno.readDir(dir)) {
      if (e.name.startsWith(".") || (rel === "" && SKIP.has(e.name))) continue;
      const path = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory) await walk(`${dir}/${e.name}`, path);
      else if (e.isFile && e.name.endsWith(".ts")) files.push(path);
    }
  };
  await walk(root, "");
  return files.sort();
}

/** The files, their imports of each other and any unresolvable imports, from `deno info --json`. */
export async function importGraph(
  root: string,
): Promise<{ files: string[]; edges: ImportEdge[]; errors: string[] }> {
  root = await Deno.realPath(root);
  const files = await sourceFiles(root);
  const url = (path: string) => new URL(path, "file:///").href;
  const base = url(`${root}/`);
  const rel = (href: string) => href.startsWith(base) ? decodeURIComponent(href.slice(base.length)) : null;

  const tmp = await Deno.makeTempDir({ prefix: "check_layers" });
  let info: { modules: DenoInfoModule[] };
  try {
    const entry = `${tmp}/all.ts`;
    await Deno.writeTextFile(entry, files.map((f) => `import "${url(`${root}/${f}`)}";\n`).join(""));
    const args = ["info", "--json"];
    try {
      await Deno.stat(`${root}/deno.json`);
      args.push("--config", `${root}/deno.json`);
    } catch { /* no config: plain resolution */ }
    const r = await new Deno.Command(Deno.execPath(), { args: [...args, entry], cwd: root }).output();
    if (!r.success) {
      throw new Error(`deno info failed (exit ${r.code}): ${new TextDecoder().decode(r.stderr).trim()}`);
    }
    info = JSON.parse(new TextDecoder().decode(r.stdout));
  } finally {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }

  const edges = new Map<string, ImportEdge>(), errors: string[] = [];
  for (const m of info.modules) {
    const from = rel(m.specifier);
    if (from === null) continue;
    if (m.error) errors.push(`${from}: ${m.error}`);
    for (const d of m.dependencies ?? []) {
      for (const r of [d.code, d.type]) {
        if (!r) continue;
        const line = (r.span?.start.line ?? 0) + 1;
        if (r.error) errors.push(`${from}:${line} cannot resolve ${d.specifier}: ${r.error}`);
        const to = r.specifier ? rel(r.specifier) : null;
        if (to === null) continue;
        const key = `${from} ${to}`, old = edges.get(key);
        if (!old || line < old.line) edges.set(key, { from, to, line });
      }
    }
  }
  return { files, edges: [...edges.values()], errors };
}

/** The parts of `deno info --json`'s module entries that the checker reads. */
interface DenoInfoModule {
  specifier: string;
  error?: string;
  dependencies?: {
    specifier: string;
    code?: DenoInfoResolution;
    type?: DenoInfoResolution;
  }[];
}
interface DenoInfoResolution {
  specifier?: string;
  error?: string;
  span?: { start: { line: number; character: number } };
}

if (import.meta.main) {
  const root = Deno.args[0] ?? decodeURIComponent(new URL("..", import.meta.url).pathname);
  const graph = await importGraph(root);
  const report = checkLayers(graph.files, graph.edges);
  const lines = [
    ...graph.errors,
    ...formatReport(report, { files: graph.files.length, imports: graph.edges.length }),
  ];
  console.log(lines.join("\n"));
  if (!report.ok || graph.errors.length) Deno.exit(1);
}
