/**
 * @file A real PostgreSQL server for tests: `initdb` into a temporary folder, started with `pg_ctl` on
 * 127.0.0.1 at a free port (its unix socket in the same folder, so it touches nothing of the machine's), and
 * stopped and removed when the test process ends. PostgreSQL refuses to run as root, so as root (CI) the
 * server runs as the unprivileged `postgres` system user (Debian's package creates it) through `runuser`.
 *
 * `startPostgres()` returns the server or the reason it cannot run here (no binaries, no unprivileged user,
 * initdb or start failed); the tests skip with that reason in their names, and only then.
 */

/** A running server. */
export interface PostgresServer {
  /** postgres://postgres@127.0.0.1:PORT/postgres (trust authentication on loopback: any password works). */
  url: string;
  port: number;
  /** Stops the server and removes its folder (also done when the process ends). */
  stop(): void;
}

/** The folder of initdb, pg_ctl and postgres: PG_BIN, then Debian's /usr/lib/postgresql/N/bin, then PATH. */
function findBinaries(): string | null {
  const env = Deno.env.get("PG_BIN");
  const candidates = env ? [env] : [];
  try {
    const versions = [...Deno.readDirSync("/usr/lib/postgresql")].map((e) => e.name)
      .filter((n) => /^\d+$/.test(n)).sort((a, b) => Number(b) - Number(a));
    candidates.push(...versions.map((v) => `/usr/lib/postgresql/${v}/bin`));
  } catch { /* not Debian's layout */ }
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) if (dir) candidates.push(dir);
  for (const dir of candidates) {
    try {
      if (Deno.statSync(`${dir}/initdb`).isFile && Deno.statSync(`${dir}/pg_ctl`).isFile) return dir;
    } catch { /* next */ }
  }
  return null;
}

/** A port nothing listens on now (the OS picks it). */
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Runs a command (as `user` when given, through runuser); returns its exit code and output. */
function run(cmd: string, args: string[], user: string | null): { ok: boolean; out: string } {
  const [c, a] = user ? ["runuser", ["-u", user, "--", cmd, ...args]] : [cmd, args];
  try {
    const r = new Deno.Command(c, { args: a, stdout: "piped", stderr: "piped" }).outputSync();
    const dec = new TextDecoder();
    return { ok: r.success, out: dec.decode(r.stdout) + dec.decode(r.stderr) };
  } catch (e) {
    return { ok: false, out: (e as Error).message };
  }
}

let started: Promise<PostgresServer | string> | null = null;

/** The test process's server (started once), or why there is none. */
export function startPostgres(): Promise<PostgresServer | string> {
  return (started ??= Promise.resolve().then(start));
}

function start(): PostgresServer | string {
  const bin = findBinaries();
  if (!bin) {
    return "PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin, PG_BIN or PATH)";
  }
  const root = Deno.uid() === 0;
  let user: string | null = null;
  if (root) {
    if (!run("id", ["-u", "postgres"], null).ok) {
      return "running as root and there is no unprivileged `postgres` user to run the server as";
    }
    user = "postgres";
  }
  const dir = Deno.makeTempDirSync({ prefix: "pg-test-" });
  const remove = () => {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch { /* gone */ }
  };
  if (user) {
    const chown = run("chown", ["-R", `${user}:`, dir], null);
    if (!chown.ok) {
      remove();
      return `cannot hand ${dir} to ${user}: ${chown.out.trim()}`;
    }
  }
  const data = `${dir}/data`;
  const init = run(
    `${bin}/initdb`,
    ["-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
    user,
  );
  if (!init.ok) {
    remove();
    return `initdb failed: ${init.out.trim().split("\n").slice(-3).join(" ")}`;
  }
  for (let tries = 0; tries < 3; tries++) {
    const port = freePort();
    // fsync off and a small footprint: a throwaway server for tests.
    const opts =
      `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off ` +
      `-c full_page_writes=off -c shared_buffers=16MB -c max_connections=100`;
    const r = run(
      `${bin}/pg_ctl`,
      ["-D", data, "-o", opts, "-l", `${dir}/log`, "-w", "-t", "60", "start"],
      user,
    );
    if (r.ok) {
      let stopped = false;
      const stop = () => {
        if (stopped) return;
        stopped = true;
        run(`${bin}/pg_ctl`, ["-D", data, "-m", "immediate", "-w", "stop"], user);
        remove();
      };
      globalThis.addEventListener("unload", stop);
      return { url: `postgres://postgres@127.0.0.1:${port}/postgres`, port, stop };
    }
    let log = "";
    try {
      log = Deno.readTextFileSync(`${dir}/log`);
    } catch { /* none */ }
    if (!/already in use|could not bind/i.test(log)) {
      remove();
      return `the server did not start: ${(log || r.out).trim().split("\n").slice(-3).join(" ")}`;
    }
  }
  remove();
  return "the server did not start: no free port in 3 tries";
}

/**
 * Registers a test that needs the server: where it cannot run, registered as ignored with the reason in its name.
 */
export function pgTest(
  server: PostgresServer | string,
  name: string,
  fn: (pg: PostgresServer) => Promise<void>,
): void {
  if (typeof server === "string") {
    Deno.test({ name: `${name} [skipped: ${server}]`, ignore: true, fn: () => {} });
    return;
  }
  Deno.test({ name, fn: () => fn(server), sanitizeResources: false, sanitizeOps: false });
}
