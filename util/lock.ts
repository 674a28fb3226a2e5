/**
 * @file One process per run folder (a search run or a training run): a lock file (`lock`) that names its holder, refused to others while the
 * holder lives, taken over once it is dead.
 *
 * Taking the lock: the holder's record (PID, host, boot id, the process's start time, when the lock was taken)
 * is written to a new private file (`createNew`) and flushed, then hard-linked to `lock`. The link is atomic and
 * fails if `lock` exists, so two processes can never both succeed, and `lock` is never seen half-written.
 *
 * When `lock` exists, its holder is alive if it runs on this host and `/proc/PID` shows a live (not zombie)
 * process whose start time (field 22 of `/proc/PID/stat`, clock ticks since boot) is the one recorded: a new
 * process that got the same PID after the holder died has another start time, and after a reboot the boot id
 * differs. A holder on another host cannot be checked and counts as alive; so does any holder where `/proc` is
 * missing. A dead holder's lock is taken over: renamed aside (atomic), checked to be the very file judged dead
 * (if another process took it over in between, its lock is put back and the loop sees a live holder), removed,
 * and the link tried again.
 *
 * No folder fsync: a lock lost to a power cut is harmless, and one that survives it names a dead holder (the
 * boot id differs). The record itself is flushed before the link, so `lock` is never empty after a crash.
 *
 * The lock is released on dispose (`using lock = lockRunFolder(dir)`) or `release()`, which removes `lock` only
 * if it still holds this process's record.
 */

import { UsageError } from "./errors.ts";

/** Name of the lock file in a run folder. */
export const LOCK_FILE = "lock";

/** What the lock file records about its holder. */
export interface LockHolder {
  pid: number;
  host: string;
  /** /proc/sys/kernel/random/boot_id of the holder's machine (null where absent). */
  bootId: string | null;
  /** The holder's start time in clock ticks since boot (/proc/PID/stat field 22; null where absent). */
  procStart: number | null;
  /** When the lock was taken (ISO 8601). */
  lockedAt: string;
}

/** State and start time of a process from /proc/PID/stat, or null when there is no such process (or /proc). */
export function processStat(pid: number): { state: string; start: number } | null {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch {
    return null;
  }
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
  const fields = text.slice(text.lastIndexOf(")") + 2).trim().split(/\s+/);
  return { state: fields[0], start: Number(fields[19]) };
}

function bootId(): string | null {
  try {
    return Deno.readTextFileSync("/proc/sys/kernel/random/boot_id").trim();
  } catch {
    return null;
  }
}

const hasProc = () => processStat(Deno.pid) !== null;

/** Whether the holder of a lock may still be running (see the file comment). */
export function holderAlive(h: LockHolder): boolean {
  if (h.host !== Deno.hostname() || !hasProc()) return true;
  const boot = bootId();
  if (h.bootId && boot && h.bootId !== boot) return false;
  const st = processStat(h.pid);
  if (!st || st.state === "Z" || st.state === "X") return false;
  return h.procStart === null || st.start === h.procStart;
}

function parseHolder(text: string): LockHolder | null {
  try {
    const h = JSON.parse(text);
    return Number.isInteger(h?.pid) && typeof h.host === "string" ? h as LockHolder : null;
  } catch {
    return null;
  }
}

const isError = (e: unknown, kind: typeof Deno.errors.NotFound) => e instanceof kind;

/** A held run-folder lock; released on dispose. */
export class RunLock implements Disposable {
  #held = true;
  constructor(readonly path: string, readonly holder: LockHolder, readonly text: string) {}

  /** Removes the lock file if it is still this process's. Idempotent. */
  release(): void {
    if (!this.#held) return;
    this.#held = false;
    try {
      if (Deno.readTextFileSync(this.path) === this.text) Deno.removeSync(this.path);
    } catch (e) {
      if (!isError(e, Deno.errors.NotFound)) throw e;
    }
  }

  [Symbol.dispose](): void {
    this.release();
  }
}

/**
 * Takes the lock of run folder `dir` for this process. A live holder is a `UsageError` that names it
 * ("runs/x is in use by process 1234 (started …); stop it or wait"); a dead one's lock is taken over.
 */
export function lockRunFolder(dir: string): RunLock {
  const path = `${dir.replace(/\/+$/, "") || "/"}/${LOCK_FILE}`;
  const me: LockHolder = {
    pid: Deno.pid,
    host: Deno.hostname(),
    bootId: bootId(),
    procStart: processStat(Deno.pid)?.start ?? null,
    lockedAt: new Date().toISOString(),
  };
  const text = JSON.stringify(me);
  const tag = `${Deno.pid}.${crypto.randomUUID().slice(0, 8)}`;
  const mine = `${path}.${tag}.new`;
  try {
    const f = Deno.openSync(mine, { write: true, createNew: true });
    try {
      f.writeSync(new TextEncoder().encode(text));
      f.syncDataSync();
    } finally {
      f.close();
    }
  } catch (e) {
    throw new Error(`cannot lock ${dir}: ${(e as Error).message}`);
  }
  try {
    for (let round = 0; round < 8; round++) {
      try {
        Deno.linkSync(mine, path);
        return new RunLock(path, me, text);
      } catch (e) {
        if (!isError(e, Deno.errors.AlreadyExists)) {
          throw new Error(`cannot lock ${dir}: ${(e as Error).message}`);
        }
      }
      let current: string;
      try {
        current = Deno.readTextFileSync(path);
      } catch (e) {
        if (isError(e, Deno.errors.NotFound)) continue; // released in between: try again
        throw e;
      }
      const holder = parseHolder(current);
      if (!holder) {
        throw new UsageError(
          `${dir} has an unreadable lock file ${path}; if no process uses this run folder, remove it`,
        );
      }
      if (holderAlive(holder)) {
        const where = holder.host === me.host ? "" : ` on host ${holder.host}`;
        const hint = holder.host === me.host ? "" : ` (if it is gone, remove ${path})`;
        throw new UsageError(
          `${dir} is in use by process ${holder.pid}${where} (started ${holder.lockedAt}); stop it or wait${hint}`,
        );
      }
      // The holder is dead: move its lock aside and make sure it is the file that was judged.
      const aside = `${path}.${tag}.stale`;
      try {
        Deno.renameSync(path, aside);
      } catch (e) {
        if (isError(e, Deno.errors.NotFound)) continue;
        throw e;
      }
      const moved = Deno.readTextFileSync(aside);
      if (moved !== current) {
        // Another process took over in between: put its lock back (the next round sees it alive).
        try {
          Deno.linkSync(aside, path);
        } catch { /* a third process holds it now; the next round reads whoever does */ }
      }
      Deno.removeSync(aside);
    }
    throw new UsageError(`${dir}: could not take its lock; other processes keep taking it over`);
  } finally {
    try {
      Deno.removeSync(mine);
    } catch { /* already gone */ }
  }
}
