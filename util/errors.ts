/**
 * @file The error kinds every layer shares, so that the command line can tell them apart without knowing
 * where they came from: a `UsageError` is something the user asked for (a bad flag, a bad config field, a
 * missing run folder) and exits with 2; anything else (a corrupt file, a diverged training, a failed device)
 * is a runtime failure and exits with 1.
 */

/** A problem with what the user asked for (bad option, missing run directory): the CLI exits with 2. */
export class UsageError extends Error {
  override name = "UsageError";
}
