/**
 * @file The heartbeat thread of a PostgreSQL memory (a Web Worker with its own connection): it marks a running
 * trial alive every `intervalMs` whatever the main thread is doing. The CPU kernels are synchronous, so a
 * training step or a proxy batch can hold the main thread's event loop for seconds; a heartbeat timer there
 * would stall with it and a live worker would be presumed dead (in the distributed test, the default network's
 * steps on a loaded machine outlasted a 4 s grace three times in a row). A process killed with `kill -9` loses
 * this thread with it, which is what the grace period detects. (Optuna heartbeats from a thread for the same
 * reason.)
 *
 * Messages in: `{ type: "open", url, search }` once, `{ type: "start", id, worker, intervalMs }`,
 * `{ type: "stop", id }`, `{ type: "close" }`. Out: `{ type: "ready", error }` once connected (starting a thread
 * and its connection took several seconds on a loaded machine: the first trial waits for it rather than run
 * without heartbeats), `{ type: "stopped", id, calls, ms, lost }` (heartbeats sent, milliseconds spent,
 * heartbeats the memory refused because the trial was no longer this worker's), `{ type: "closed" }`.
 */

/// <reference lib="deno.worker" />

import { PostgresStorage } from "./postgres_storage.ts";

let storage: Promise<PostgresStorage> | null = null;
/** One trial's heartbeats. */
interface Beat {
  timer: ReturnType<typeof setInterval> | undefined;
  calls: number;
  ms: number;
  lost: number;
  busy: Promise<void>;
}
const beats = new Map<number, Beat>();

self.onmessage = async (e: MessageEvent) => {
  const m = e.data;
  if (m.type === "open") {
    storage = PostgresStorage.open(m.url, { search: m.search, maxConnections: 1 });
    // Connected (or not: then its heartbeats fail and the grace period takes over), the thread is ready.
    const error = await storage.then(() => null, (e) => (e as Error).message);
    self.postMessage({ type: "ready", error });
  } else if (m.type === "start") {
    const b: Beat = { timer: undefined, calls: 0, ms: 0, lost: 0, busy: Promise.resolve() };
    b.timer = setInterval(() => {
      b.busy = b.busy.then(async () => {
        const t0 = performance.now();
        try {
          if (!(await (await storage!).heartbeat(m.id, m.worker))) b.lost++;
        } catch {
          // A missed heartbeat is what the grace period allows for.
        } finally {
          b.calls++;
          b.ms += performance.now() - t0;
        }
      });
    }, m.intervalMs);
    beats.set(m.id, b);
  } else if (m.type === "stop") {
    const b = beats.get(m.id);
    if (!b) return;
    clearInterval(b.timer);
    beats.delete(m.id);
    await b.busy;
    self.postMessage({ type: "stopped", id: m.id, calls: b.calls, ms: b.ms, lost: b.lost });
  } else if (m.type === "close") {
    for (const b of beats.values()) clearInterval(b.timer);
    if (storage) await (await storage.catch(() => null))?.close();
    self.postMessage({ type: "closed" });
  }
};
