/**
 * @file Tests of safetensors I/O: a file built by hand from the format description compared byte for byte with
 * the encoder, hand-built F16/BF16/F64 files decoded, random round trips in memory and through files on both
 * backends (written atomically), and malformed files rejected with messages that name the file and the fault.
 */

import fc from "fast-check";
import { deepStrictEqual as assertEquals } from "node:assert";
import {
  decodeSafetensors,
  encodeSafetensors,
  loadSafetensors,
  loadSafetensorsWithMetadata,
  saveSafetensors,
} from "../engine/safetensors.ts";
import { tensor } from "../engine/creation.ts";
import * as nn from "../engine/nn.ts";
import type { Tensor } from "../engine/tensor.ts";
import {
  assertRejects,
  assertThrows,
  cpuDevice,
  gpuDevice,
  gpuTest,
  RUNS,
  seededValues,
  shapeArb,
  test,
} from "./util.ts";

const ascii = (s: string) => Array.from(s, (c) => c.charCodeAt(0));

/** Bytes of a file: u64 little-endian header length, the header text, then raw data bytes. */
function file(header: string, data: number[]): Uint8Array {
  const len = [header.length, 0, 0, 0, 0, 0, 0, 0];
  return Uint8Array.from([...len, ...ascii(header), ...data]);
}

// {"a": [1, -2] as F32 [2], "b": [[0.5]] as F32 [1, 1]}, metadata {"format": "pt"}, written out by hand.
const HAND_HEADER = '{"__metadata__":{"format":"pt"},' +
  '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' +
  '"b":{"dtype":"F32","shape":[1,1],"data_offsets":[8,12]}}';
const HAND_FILE = Uint8Array.from([
  // N = 144 = 141 bytes of JSON + 3 spaces of padding to a multiple of 8.
  0x90,
  0,
  0,
  0,
  0,
  0,
  0,
  0,
  ...ascii(HAND_HEADER),
  0x20,
  0x20,
  0x20,
  // 1.0f, -2.0f, 0.5f, little-endian.
  0x00,
  0x00,
  0x80,
  0x3f,
  0x00,
  0x00,
  0x00,
  0xc0,
  0x00,
  0x00,
  0x00,
  0x3f,
]);

test("encoder output equals a file built by hand from the format description, byte for byte", () => {
  assertEquals(HAND_HEADER.length, 141);
  const bytes = encodeSafetensors(
    { b: { shape: [1, 1], data: [0.5] }, a: { shape: [2], data: new Float32Array([1, -2]) } },
    { format: "pt" },
  );
  assertEquals(Array.from(bytes), Array.from(HAND_FILE));
  // The data area starts 8-byte aligned.
  assertEquals((8 + 144) % 8, 0);
});

test("the hand-built file decodes to its tensors and metadata", () => {
  const { tensors, metadata } = decodeSafetensors(HAND_FILE, "hand.safetensors");
  assertEquals(metadata, { format: "pt" });
  assertEquals(Object.keys(tensors).sort(), ["a", "b"]);
  assertEquals([tensors.a.dtype, tensors.a.shape, Array.from(tensors.a.data)], ["F32", [2], [1, -2]]);
  assertEquals([tensors.b.shape, Array.from(tensors.b.data)], [[1, 1], [0.5]]);
});

test("F16, BF16 and F64 tensors (hand-built, unaligned, unpadded header) are converted to float32", () => {
  const header = '{"x16":{"dtype":"F16","shape":[5],"data_offsets":[0,10]},' +
    '"xb":{"dtype":"BF16","shape":[3],"data_offsets":[10,16]},' +
    '"x64":{"dtype":"F64","shape":[1],"data_offsets":[16,24]}}';
  const data = [
    // F16: 1, -2, 65504 (largest), 2^-24 (smallest subnormal), +inf.
    0x00,
    0x3c,
    0x00,
    0xc0,
    0xff,
    0x7b,
    0x01,
    0x00,
    0x00,
    0x7c,
    // BF16: 1, -0.5, 3.140625.
    0x80,
    0x3f,
    0x00,
    0xbf,
    0x49,
    0x40,
    // F64: 0.1 = 0x3FB999999999999A.
    0x9a,
    0x99,
    0x99,
    0x99,
    0x99,
    0x99,
    0xb9,
    0x3f,
  ];
  const { tensors } = decodeSafetensors(file(header, data));
  assertEquals(Array.from(tensors.x16.data), [1, -2, 65504, 2 ** -24, Infinity]);
  assertEquals(Array.from(tensors.xb.data), [1, -0.5, 3.140625]);
  assertEquals(Array.from(tensors.x64.data), [Math.fround(0.1)]);
  assertEquals([tensors.x16.dtype, tensors.xb.dtype, tensors.x64.dtype], ["F16", "BF16", "F64"]);
});

const nameArb = fc.stringMatching(/^[a-z][a-z0-9_.]{0,12}$/);

test("property: encode → decode returns the same tensors bit for bit, header padded to 8 bytes", () => {
  fc.assert(
    fc.property(
      fc.dictionary(nameArb, fc.tuple(shapeArb(0, 3, 6), fc.nat()), { maxKeys: 5 }),
      fc.dictionary(nameArb, fc.string(), { maxKeys: 3 }),
      (spec, metadata) => {
        const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
        for (const [name, [shape, seed]] of Object.entries(spec)) {
          const data = seededValues(shape.reduce((a, b) => a * b, 1), seed, -1e3, 1e3);
          if (data.length > 1) data[1] = -0; // signed zero must survive
          tensors[name] = { shape, data };
        }
        const bytes = encodeSafetensors(tensors, metadata);
        const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
        assertEquals(n % 8, 0);
        const out = decodeSafetensors(bytes);
        assertEquals(out.metadata, { ...metadata });
        assertEquals(Object.keys(out.tensors).sort(), Object.keys(tensors).sort());
        for (const [name, t] of Object.entries(tensors)) {
          assertEquals(out.tensors[name].shape, t.shape);
          assertEquals(new Uint32Array(out.tensors[name].data.buffer), new Uint32Array(t.data.buffer));
        }
      },
    ),
    { numRuns: RUNS * 4 },
  );
});

gpuTest("save/load round trip on both backends; writes are atomic and overwrite", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const dev of [await gpuDevice(), await cpuDevice()]) {
      const path = `${dir}/model-${dev.kind}.safetensors`;
      const src: Record<string, Tensor> = {
        "down.0.conv.weight": tensor(seededValues(2 * 3 * 3 * 3, 1), [2, 3, 3, 3], { device: dev }),
        "down.0.conv.bias": tensor([0.25, -0.5], [2], { device: dev }),
        "scalar": tensor([7], [], { device: dev }),
      };
      await saveSafetensors(path, { stale: tensor([1], [1], { device: dev }) });
      await saveSafetensors(path, src, { step: "12", note: "ünïcode ✓" });
      const { tensors, metadata } = await loadSafetensorsWithMetadata(path, { device: dev });
      assertEquals(metadata, { step: "12", note: "ünïcode ✓" });
      assertEquals(Object.keys(tensors).sort(), Object.keys(src).sort());
      for (const [name, t] of Object.entries(src)) {
        assertEquals(tensors[name].shape, t.shape);
        assertEquals(tensors[name].device, dev);
        assertEquals(Array.from(await tensors[name].toArray()), Array.from(await t.toArray()), name);
      }
      const plain = await loadSafetensors(path, { device: dev, requiresGrad: true });
      assertEquals(plain.scalar.requiresGrad, true);
    }
    // Only the final files remain: no temporary files left behind.
    const names = [];
    for await (const e of Deno.readDir(dir)) names.push(e.name);
    assertEquals(names.sort(), ["model-cpu.safetensors", "model-webgpu.safetensors"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

gpuTest(
  "Module.loadSafetensors: weights by name onto the module's device, select drops keys, errors name keys",
  async () => {
    const device = await gpuDevice();
    const dir = await Deno.makeTempDir();
    const a = new nn.Linear(3, 2, { device }), b = new nn.Linear(3, 2, { device });
    try {
      const path = `${dir}/linear.safetensors`;
      await saveSafetensors(path, { ...a.stateDict(), "extra.weight": tensor([1], [1], { device }) });
      await assertRejects(() => b.loadSafetensors(path), 'unexpected key(s): "extra.weight"');
      await b.loadSafetensors(path, (key) => !key.startsWith("extra."));
      assertEquals(Array.from(await b.weight.toArray()), Array.from(await a.weight.toArray()));
      assertEquals(Array.from(await b.bias!.toArray()), Array.from(await a.bias!.toArray()));
      await assertRejects(() => b.loadSafetensors(path, (key) => key !== "bias"), 'missing key(s): "bias"');
    } finally {
      a.dispose();
      b.dispose();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

test("malformed files are rejected with messages naming the file and the fault", () => {
  const ok = (h: string) => `{"t":{"dtype":"F32","shape":[2],"data_offsets":${h}}}`;
  const two = [0, 0, 0x80, 0x3f, 0, 0, 0, 0x40];
  const cases: [Uint8Array, string][] = [
    [Uint8Array.from([1, 2, 3]), "3 bytes is too short"],
    [file(ok("[0,8]"), two).slice(0, 40), "runs past the end of the 40-byte file (truncated?)"],
    [Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x7b]), "exceeds the 100000000-byte limit"],
    [file("[1, 2]  ", []), `header does not start with "{"`],
    [file("{not json}", []), "header is not valid JSON"],
    [
      file(ok("[0,8]"), two.slice(0, 6)),
      `tensor "t" has data_offsets [0, 8] outside the 6-byte data area (truncated?)`,
    ],
    [file(ok("[0,4]"), two.slice(0, 4)), `needs 8 bytes, but its data_offsets [0, 4] span 4`],
    [file(ok("[8,0]"), two), "end before they begin"],
    [file(ok("[0,8]"), [...two, 0, 0]), "tensors end at byte 8 of the data area, but it has 10 bytes"],
    [
      file('{"t":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}', two),
      "has dtype I64; supported: F32, F16, BF16, F64",
    ],
    [
      file('{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}', two),
      `tensor "t" has an invalid shape [-1]`,
    ],
    [file('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', two), "invalid data_offsets [0]"],
    [file('{"__metadata__":{"k":3}}', []), `"__metadata__" value "k" is not a string`],
    [file('{"t":[1]}', []), `entry "t" is not an object`],
    [
      file(
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}',
        [...two, 0, 0, 0, 0],
      ),
      `tensor "b" starts at byte 8 of the data area, expected 4 (gap or overlap)`,
    ],
    [
      file(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        two,
      ),
      `expected 8 (gap or overlap)`,
    ],
  ];
  for (const [bytes, part] of cases) {
    assertThrows(() => decodeSafetensors(bytes, "bad.safetensors"), "safetensors bad.safetensors: ", part);
  }
});

test("the encoder rejects bad input; loading names a missing file", async () => {
  assertThrows(
    () => encodeSafetensors({ t: { shape: [2, 2], data: [1, 2, 3] } }),
    `"t" has shape [2,2] (4 values) but 3 values`,
  );
  assertThrows(() => encodeSafetensors({ __metadata__: { shape: [1], data: [1] } }), "reserved");
  assertThrows(() => encodeSafetensors({}, { k: 1 as unknown as string }), `metadata "k" must be a string`);
  assertEquals(Array.from(encodeSafetensors({})), [8, 0, 0, 0, 0, 0, 0, 0, ...ascii("{}      ")]);
  const dev = await cpuDevice();
  await assertRejects(
    () => loadSafetensors("/nonexistent/x.safetensors", { device: dev }),
    "/nonexistent/x.safetensors",
    "cannot read",
  );
  await assertRejects(
    () => saveSafetensors("/nonexistent/dir/x.safetensors", { a: tensor([1], [1], { device: dev }) }),
    "saveSafetensors /nonexistent/dir/x.safetensors: cannot write",
  );
  const path = await Deno.makeTempFile();
  await Deno.writeFile(path, file('{"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', []));
  await assertRejects(() => loadSafetensors(path, { device: dev }), path, `tensor "t" of shape [0] is empty`);
  await Deno.remove(path);
});
