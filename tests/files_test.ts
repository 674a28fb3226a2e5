/**
 * @file Durable, atomic writes (util/files.ts) and the checkpoints written with them (issue 17, cases 2 and 16):
 * a symlink is written through and stays a link, a device node or a folder is refused and left alone, and a
 * checkpoint's files and folders are flushed to disk (fsync) before the rename that commits it.
 */

import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { writeFileAtomic } from "../util/files.ts";
import { train } from "../models/train.ts";
import { assertRejects, MICRO_TRAINING, test } from "./util.ts";

async function inTempDir(f: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "files_" });
  try {
    await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

test("writeFileAtomic: a symlink is written through and stays a link; a device or a folder is refused", () =>
  inTempDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/target.txt`, "old");
    await Deno.symlink(`${dir}/target.txt`, `${dir}/link.txt`);
    await writeFileAtomic(`${dir}/link.txt`, "new");
    assert((await Deno.lstat(`${dir}/link.txt`)).isSymlink, "the link was replaced by a file");
    assertEquals(await Deno.readTextFile(`${dir}/target.txt`), "new");
    // A dangling link: its target is created.
    await Deno.symlink("made.txt", `${dir}/dangling`);
    await writeFileAtomic(`${dir}/dangling`, "made");
    assertEquals(await Deno.readTextFile(`${dir}/made.txt`), "made");
    assert((await Deno.lstat(`${dir}/dangling`)).isSymlink);
    // /dev/null stays a device; a folder stays a folder; neither leaves a temporary file behind.
    await assertRejects(() => writeFileAtomic("/dev/null", "x"), "/dev/null", "not a regular file");
    assert((await Deno.stat("/dev/null")).isCharDevice);
    await Deno.mkdir(`${dir}/folder`);
    await assertRejects(() => writeFileAtomic(`${dir}/folder`, "x"), "it is a folder");
    assertEquals(
      [...Deno.readDirSync(dir)].map((e) => e.name).sort(),
      ["dangling", "folder", "link.txt", "made.txt", "target.txt"],
    );
  }));

test("a checkpoint's files and folders are flushed to disk before it is committed", () =>
  inTempDir(async (dir) => {
    const proto = Deno.FsFile.prototype;
    const { syncData, sync } = proto;
    let dataSyncs = 0, folderSyncs = 0;
    proto.syncData = function () {
      dataSyncs++;
      return syncData.call(this);
    };
    proto.sync = function () {
      folderSyncs++;
      return sync.call(this);
    };
    try {
      await train({ ...MICRO_TRAINING, checkpointKimg: 0, kimg: 0.008, backend: "cpu", out: `${dir}/run` });
    } finally {
      proto.syncData = syncData;
      proto.sync = sync;
    }
    const ck = `${dir}/run/checkpoints/step-000000002`;
    const files = [...Deno.readDirSync(ck)].length;
    assert(files >= 4, `checkpoint files: ${files}`);
    // Every checkpoint file, and config.json and the log's rewrite; the checkpoint's folder and its parent.
    assert(dataSyncs >= files, `${dataSyncs} data syncs for ${files} checkpoint files`);
    assert(folderSyncs >= 2, `${folderSyncs} folder syncs`);
  }));
