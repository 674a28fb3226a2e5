/**
 * @file Configuration parsing: one zod error formatter and the two ways the layers parse options.
 *
 * - `parseConfig` for options a program passes (sampler settings, dataset options): a failure is a plain
 *   `Error` ("heunSampler: invalid options: steps: Too small: …"), a bug in the caller.
 * - `parseUsage` for options a user typed or wrote in a config file: a failure is a `UsageError` naming every
 *   bad field ("train config: batch: Invalid input: …"), which the command line turns into exit code 2.
 *
 * Both name every failing field by its dotted path, so a user can find it in a nested config.
 */

import type { z } from "zod";
import { UsageError } from "./errors.ts";

/** Every issue of a zod error as `path: message`, joined by "; " (`root` names an issue without a path). */
export function zodMessage(err: z.ZodError, root = "(root)"): string {
  return err.issues.map((i) => `${i.path.length ? i.path.join(".") : root}: ${i.message}`).join("; ");
}

/** Parses `value` (undefined: `{}`) with `schema`; the `Error` names `what` and every bad field. */
export function parseConfig<S extends z.ZodType>(schema: S, value: unknown, what: string): z.output<S> {
  const r = schema.safeParse(value ?? {});
  if (r.success) return r.data;
  throw new Error(`${what}: invalid options: ${zodMessage(r.error, "(options)")}`);
}

/** Parses what a user gave (undefined: `{}`); a failure is a `UsageError` naming `what` and every bad field. */
export function parseUsage<S extends z.ZodType>(schema: S, value: unknown, what: string): z.output<S> {
  const r = schema.safeParse(value ?? {});
  if (r.success) return r.data;
  throw new UsageError(`${what}: ${zodMessage(r.error, "(options)")}`);
}

/**
 * Reads a JSON file a user named (a config, a network spec); errors are `UsageError`s that name the file. A
 * UTF-8 byte-order mark at the start is skipped (editors on some systems write one).
 */
export async function readJsonFile(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UsageError(`cannot read ${path}: ${(e as Error).message}`);
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new UsageError(`${path} is not valid JSON: ${(e as Error).message}`);
  }
}
