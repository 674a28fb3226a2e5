/**
 * @file Atomic file writes: a file is either its old contents or its new ones, never a mix, even if the
 * process is killed or the machine loses power mid-write.
 *
 * The bytes go to a temporary sibling, are flushed to disk (`fsync`), and the sibling is renamed over the
 * target; then the folder is flushed so the rename itself survives a power loss. Two kinds of target need care:
 *
 * - a symbolic link is written through: the temporary file and the rename go to the link's final target, so
 *   the link stays a link (renaming over it would replace the link with a regular file);
 * - anything that exists and is not a regular file (a device node such as /dev/null, a FIFO, a folder) is
 *   refused with an error that says what it is: a rename would replace a device node with a regular file.
 */

import { UsageError } from "./errors.ts";

/** Writes `data` to `path` atomically and durably (see the file comment). */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const target = await resolveTarget(path);
  const tmp = `${target}.${Deno.pid}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  try {
    await writeNewFileSynced(tmp, data);
    await Deno.rename(tmp, target);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(`cannot write ${path}: ${(e as Error).message}`);
  }
  await syncDir(parentDir(target));
}

/**
 * Checks, before any long work, that `path` can be written by `writeFileAtomic`: creates its folder, refuses a
 * path under a file or one that is a folder or device, and writes and removes a probe file next to it (which
 * finds a read-only folder). `what` names the option in the `UsageError` ("--out: README.md is a file, …").
 */
export async function checkWritable(path: string, what: string): Promise<void> {
  const parts = path.split("/");
  for (let i = 1; i < parts.length; i++) {
    const prefix = parts.slice(0, i).join("/");
    if (!prefix) continue;
    const info = await Deno.stat(prefix).catch(() => null);
    if (info && !info.isDirectory) throw new UsageError(`${what}: ${prefix} is a file, not a folder`);
    if (!info) break;
  }
  let target: string;
  try {
    await Deno.mkdir(parentDir(path), { recursive: true });
    target = await resolveTarget(path);
  } catch (e) {
    throw new UsageError(`${what}: ${(e as Error).message}`);
  }
  const probe = `${target}.${Deno.pid}.probe`;
  try {
    await writeNewFileSynced(probe, "");
    await Deno.remove(probe);
  } catch (e) {
    throw new UsageError(`${what}: cannot write ${path} (${(e as Error).message})`);
  }
}

/** `writeFileAtomic` for text. */
export function writeTextAtomic(path: string, text: string): Promise<void> {
  return writeFileAtomic(path, text);
}

/**
 * Creates `path` (it must not exist), writes all of `data` and flushes it to disk before returning: the building
 * block of the atomic writes, and of writers that fill a temporary folder and rename the folder.
 */
export async function writeNewFileSynced(path: string, data: Uint8Array | string): Promise<void> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const f = await Deno.open(path, { write: true, createNew: true });
  try {
    let off = 0;
    while (off < bytes.length) off += await f.write(bytes.subarray(off));
    await f.syncData();
  } finally {
    f.close();
  }
}

/** Flushes a folder's entries (a rename or a new file in it) to disk; a no-op where the OS does not allow it. */
export async function syncDir(dir: string): Promise<void> {
  let f: Deno.FsFile | undefined;
  try {
    f = await Deno.open(dir, { read: true });
    await f.sync();
  } catch {
    // Some file systems refuse fsync on a folder; the rename is still atomic there.
  } finally {
    f?.close();
  }
}

/** The folder part of a path ("." for a bare name). */
export function parentDir(path: string): string {
  const i = path.lastIndexOf("/");
  return i < 0 ? "." : i === 0 ? "/" : path.slice(0, i);
}

/** The path a write to `path` must replace: the final target of a symlink; refuses non-regular files. */
async function resolveTarget(path: string): Promise<string> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return path;
    throw new Error(`cannot write ${path}: ${(e as Error).message}`);
  }
  let target = path;
  if (info.isSymlink) {
    try {
      target = await Deno.realPath(path);
      info = await Deno.stat(target);
    } catch (e) {
      // A dangling link: write its target (relative links resolve against the link's folder).
      if (!(e instanceof Deno.errors.NotFound)) {
        throw new Error(`cannot write ${path}: ${(e as Error).message}`);
      }
      const link = await Deno.readLink(path);
      return link.startsWith("/") ? link : `${parentDir(path)}/${link}`;
    }
  }
  if (!info.isFile) {
    const kind = info.isDirectory ? "a folder" : "not a regular file (a device, FIFO or socket)";
    throw new Error(`cannot write ${path}: it is ${kind}; give the path of a regular file`);
  }
  return target;
}
