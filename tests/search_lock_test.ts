/**
 * @file The run-folder lock: one holder at a time, refused with the holder named while it lives, taken over
 * from a dead holder (no such PID, a reused PID with another start time, a real second process killed with
 * SIGKILL), kept while the holder is on another host, refused when unreadable, and released on dispose.
 */

import { LOCK_FILE, type LockHolder, lockRunFolder, processStat } from "../util/lock.ts";
import { UsageError } from "../util/errors.ts";
import { assertEquals, assertThrows, test } from "./util.ts";

async function inTempDir(f: (dir: string) => Promise<void> | void): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "search_lock_" });
  try {
    await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const readHolder = (dir: string): LockHolder => JSON.parse(Deno.readTextFileSync(`${dir}/${LOCK_FILE}`));
const exists = (p: string) => {
  try {
    Deno.statSync(p);
    return true;
  } catch {
    return false;
  }
};
/** A lock file as another process would have left it. */
const plant = (dir: string, h: Partial<LockHolder>) =>
  Deno.writeTextFileSync(
    `${dir}/${LOCK_FILE}`,
    JSON.stringify({
      pid: Deno.pid,
      host: Deno.hostname(),
      bootId: null,
      procStart: processStat(Deno.pid)!.start,
      lockedAt: "2020-01-01T00:00:00.000Z",
      ...h,
    }),
  );

test("lock: records its holder, refuses a second taker while held, is released on dispose", () =>
  inTempDir((dir) => {
    {
      using lock = lockRunFolder(dir);
      const h = readHolder(dir);
      assertEquals(
        [h.pid, h.host, h.procStart],
        [Deno.pid, Deno.hostname(), processStat(Deno.pid)!.start],
        "holder",
      );
      assertEquals(lock.holder, h, "the lock's record");
      const err = assertThrows(
        () => lockRunFolder(dir),
        `${dir} is in use by process ${Deno.pid}`,
        "stop it or wait",
      );
      if (!(err instanceof UsageError)) throw new Error("a held lock is a UsageError");
      assertEquals(readHolder(dir), h, "the refused taker left the lock alone");
    }
    if (exists(`${dir}/${LOCK_FILE}`)) throw new Error("dispose removes the lock file");
    assertEquals(Deno.readDirSync(dir).toArray().length, 0, "no leftover files");
    const again = lockRunFolder(dir);
    again.release();
    again.release();
    if (exists(`${dir}/${LOCK_FILE}`)) throw new Error("release removes the lock file");
  }));

test("lock: takes over from a dead PID and from a reused PID; not from another host", () =>
  inTempDir((dir) => {
    plant(dir, { pid: 999_999_999 });
    lockRunFolder(dir).release();
    // Our own PID, but a different start time: the recorded process died and the PID was reused.
    plant(dir, { procStart: processStat(Deno.pid)!.start - 1 });
    const lock = lockRunFolder(dir);
    assertEquals(readHolder(dir).lockedAt, lock.holder.lockedAt, "taken over");
    lock.release();
    plant(dir, { pid: 999_999_999, host: "elsewhere.example" });
    assertThrows(
      () => lockRunFolder(dir),
      "process 999999999 on host elsewhere.example",
      `remove ${dir}/lock`,
    );
    Deno.writeTextFileSync(`${dir}/${LOCK_FILE}`, "{trunc");
    assertThrows(() => lockRunFolder(dir), "unreadable lock file", "remove it");
  }));

test("lock: a live second process holds it; after SIGKILL the lock is taken over", () =>
  inTempDir(async (dir) => {
    const lockUrl = new URL("../util/lock.ts", import.meta.url).href;
    const code = `import { lockRunFolder } from ${JSON.stringify(lockUrl)};
      const lock = lockRunFolder(${JSON.stringify(dir)});
      console.log("locked " + lock.holder.pid);
      await new Promise((r) => setTimeout(r, 120_000));`;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", code],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    try {
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let out = "";
      const deadline = Date.now() + 60_000;
      while (!out.includes("\n") && Date.now() < deadline) {
        const { value, done } = await reader.read();
        if (done) break;
        out += value;
      }
      assertEquals(out.trim(), `locked ${child.pid}`, "the child took the lock");
      assertThrows(() => lockRunFolder(dir), `is in use by process ${child.pid}`);
      child.kill("SIGKILL");
      const status = await child.status;
      assertEquals(status.signal, "SIGKILL", "child killed");
      reader.releaseLock();
      await child.stdout.cancel().catch(() => {});
      assertEquals(readHolder(dir).pid, child.pid, "the dead child's lock is still there");
      using lock = lockRunFolder(dir);
      assertEquals([readHolder(dir).pid, lock.holder.pid], [Deno.pid, Deno.pid], "taken over");
    } finally {
      try {
        child.kill("SIGKILL");
      } catch { /* already dead */ }
    }
  }));
