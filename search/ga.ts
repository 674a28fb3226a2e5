/**
 * @file The genetic search of DDSM's step schedule (Yang et al., ICLR 2024; the authors ran pymoo's NSGA-II
 * with one objective): pure operators on genomes and the generation loop, with the fitness behind a callback.
 *
 * A genome is one width index per sampling step (genes in [0, choices)). One generation, as pymoo runs it:
 *
 *     parents  ← binary tournaments on fitness (lower is better)
 *     children ← single-point crossover of parent pairs, then per-gene resampling mutation
 *                (each gene redrawn uniformly with probability `mutationRate`)
 *     duplicates are eliminated: a child equal to another child or to a member of the population is redrawn
 *     population ← the best `population` of parents ∪ children (elitist survival; the best is never lost)
 *
 * The initial population is the uniform genomes (every step at one width), the caller's seed genomes (DDSM
 * here: switch schedules and genomes read off the step-importance profile) and random ones. Every random
 * choice comes from an `Rng` seeded by (seed, generation), and the fitness of a genome is looked up by its key
 * before it is computed, so a killed search run again replays the same generations from its stored
 * evaluations and computes only what is missing.
 */

import { hash2, Rng } from "../util/random.ts";

/** One width index per sampling step. */
export type Genome = number[];

/** An evaluated genome. */
export interface Individual {
  genome: Genome;
  key: string;
  fitness: number;
}

/** Settings of the generation loop. */
export interface GaSettings {
  /** Genes per genome (sampling steps). */
  length: number;
  /** Values per gene (widths). */
  choices: number;
  /** Individuals kept per generation. */
  population: number;
  /** Generations after the initial one. */
  generations: number;
  /** Probability that a gene is redrawn in a child. */
  mutationRate: number;
  /** Seed of every random choice. */
  seed: number;
  /** Genomes put in the initial population after the uniform ones, before the random ones. */
  seeds?: readonly Genome[];
}

/** The canonical key of a genome (its genes joined by "-"). */
export function genomeKey(g: readonly number[]): string {
  return g.join("-");
}

/** Throws unless `g` has `length` integer genes in [0, choices). */
export function checkGenome(g: readonly number[], length: number, choices: number): void {
  if (g.length !== length) throw new Error(`genome ${genomeKey(g)}: ${g.length} genes, expected ${length}`);
  for (const [i, v] of g.entries()) {
    if (!Number.isInteger(v) || v < 0 || v >= choices) {
      throw new Error(`genome ${genomeKey(g)}: gene ${i} is ${v}, not an integer in [0, ${choices})`);
    }
  }
}

/** The `choices` uniform genomes: every gene the same value. */
export function uniformGenomes(length: number, choices: number): Genome[] {
  return Array.from({ length: choices }, (_, c) => new Array(length).fill(c));
}

/** A genome with every gene drawn uniformly. */
export function randomGenome(rng: Rng, length: number, choices: number): Genome {
  return Array.from({ length }, () => rng.int(choices));
}

/** Single-point crossover: a cut k in [1, length − 1]; the children swap tails at k. */
export function crossover(a: readonly number[], b: readonly number[], rng: Rng): [Genome, Genome] {
  if (a.length !== b.length) throw new Error(`crossover: parents of ${a.length} and ${b.length} genes`);
  if (a.length < 2) return [[...a], [...b]];
  const k = 1 + rng.int(a.length - 1);
  return [[...a.slice(0, k), ...b.slice(k)], [...b.slice(0, k), ...a.slice(k)]];
}

/** Per-gene resampling mutation: each gene is redrawn uniformly from [0, choices) with probability `rate`. */
export function mutate(g: readonly number[], rate: number, choices: number, rng: Rng): Genome {
  return g.map((v) => rng.next() < rate ? rng.int(choices) : v);
}

/** The first occurrence of each genome (by key), in order. */
export function uniqueGenomes(gs: readonly Genome[]): Genome[] {
  const seen = new Set<string>();
  return gs.filter((g) => {
    const k = genomeKey(g);
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

/** Binary tournament: the fitter of two individuals drawn at random. */
export function tournament(pop: readonly Individual[], rng: Rng): Individual {
  const a = pop[rng.int(pop.length)], b = pop[rng.int(pop.length)];
  return b.fitness < a.fitness ? b : a;
}

/**
 * Elitist survival: the `size` fittest of the union, duplicates (by key) removed; ties keep the earlier one,
 * so the ranking does not depend on anything but the fitness and the order given.
 */
export function survive(union: readonly Individual[], size: number): Individual[] {
  const seen = new Set<string>();
  const unique = union.filter((i) => !seen.has(i.key) && (seen.add(i.key), true));
  return unique.map((ind, order) => ({ ind, order }))
    .sort((x, y) => x.ind.fitness - y.ind.fitness || x.order - y.order)
    .slice(0, size)
    .map((x) => x.ind);
}

/**
 * The initial genomes: the uniform ones, the given seeds, then random ones up to `population` (no
 * duplicates).
 */
export function initialGenomes(s: GaSettings): Genome[] {
  const rng = new Rng(hash2(s.seed, 0x1a17));
  for (const g of s.seeds ?? []) checkGenome(g, s.length, s.choices);
  const out = uniqueGenomes([...uniformGenomes(s.length, s.choices), ...(s.seeds ?? [])])
    .slice(0, s.population);
  const keys = new Set(out.map(genomeKey));
  for (let tries = 0; out.length < s.population && tries < 100 * s.population; tries++) {
    const g = randomGenome(rng, s.length, s.choices);
    if (!keys.has(genomeKey(g))) keys.add(genomeKey(g)), out.push(g);
  }
  return out;
}

/**
 * The children of generation `generation`: `population` new genomes from tournaments, crossover and mutation,
 * none equal to a member of `pop` or to another child (pymoo's eliminate_duplicates; after 100 tries per
 * child the search space is taken as exhausted and fewer are returned).
 */
export function offspring(pop: readonly Individual[], s: GaSettings, generation: number): Genome[] {
  const rng = new Rng(hash2(s.seed, generation + 1));
  const taken = new Set(pop.map((i) => i.key));
  const out: Genome[] = [];
  for (let tries = 0; out.length < s.population && tries < 100 * s.population; tries++) {
    const [a, b] = crossover(tournament(pop, rng).genome, tournament(pop, rng).genome, rng);
    for (const child of [a, b]) {
      const g = mutate(child, s.mutationRate, s.choices, rng);
      const k = genomeKey(g);
      if (out.length < s.population && !taken.has(k)) taken.add(k), out.push(g);
    }
  }
  return out;
}

/** One generation's outcome. */
export interface GenerationRecord {
  generation: number;
  /** Best fitness in the population after survival. */
  best: number;
  bestKey: string;
  /** Genomes evaluated in this generation (cached ones included). */
  evaluated: number;
}

/** What `runGa` returns. */
export interface GaResult {
  population: Individual[];
  best: Individual;
  history: GenerationRecord[];
  /** False when `shouldStop` ended the loop before the last generation. */
  complete: boolean;
}

/**
 * Runs the GA: the initial population, then `generations` generations. `evaluate` gives a genome's fitness
 * (the caller caches it by key); `shouldStop` (time budget) is asked before each genome of a generation after
 * the initial one: when it says stop, that generation is dropped and the loop ends.
 */
export async function runGa(
  s: GaSettings,
  evaluate: (g: Genome, key: string) => Promise<number>,
  opts: { shouldStop?: () => boolean; onGeneration?: (r: GenerationRecord) => void } = {},
): Promise<GaResult> {
  if (s.population < 2) throw new Error(`GA: population must be at least 2, got ${s.population}`);
  if (!(s.mutationRate >= 0 && s.mutationRate <= 1)) {
    throw new Error(`GA: mutationRate must be in [0, 1], got ${s.mutationRate}`);
  }
  // null: stopped before every genome was scored (the generation is dropped; its scores stay in the caller's
  // cache for a resumed run).
  const score = async (gs: Genome[], stoppable: boolean): Promise<Individual[] | null> => {
    const out: Individual[] = [];
    for (const g of gs) {
      if (stoppable && opts.shouldStop?.()) return null;
      checkGenome(g, s.length, s.choices);
      const key = genomeKey(g);
      out.push({ genome: g, key, fitness: await evaluate(g, key) });
    }
    return out;
  };
  const history: GenerationRecord[] = [];
  const record = (generation: number, pop: Individual[], evaluated: number) => {
    const r = { generation, best: pop[0].fitness, bestKey: pop[0].key, evaluated };
    history.push(r);
    opts.onGeneration?.(r);
  };
  const first = initialGenomes(s);
  // The initial population is always scored whole: there is no best without it.
  const scored = (await score(first, false))!;
  let pop = survive(scored, s.population);
  record(0, pop, first.length);
  let complete = true;
  for (let gen = 1; gen <= s.generations; gen++) {
    const children = offspring(pop, s, gen);
    if (!children.length) break;
    const kids = await score(children, true);
    if (!kids) {
      complete = false;
      break;
    }
    pop = survive([...pop, ...kids], s.population);
    record(gen, pop, children.length);
  }
  return { population: pop, best: pop[0], history, complete };
}
