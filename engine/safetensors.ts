/**
 * @file Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
 *
 *     [8 bytes: N, little-endian u64] [N bytes: JSON header, UTF-8, padded with spaces] [data area]
 *
 * The header maps each tensor name to `{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}` (byte
 * offsets into the data area, which starts right after the header) and may hold `"__metadata__"`, a map of
 * string to string. Like the reference implementation, the writer orders tensors by name, puts
 * `__metadata__` first, pads the header with spaces to a multiple of 8 bytes (so the data area is 8-byte
 * aligned), and stores each tensor contiguously, row-major, little-endian; the reader insists that the tensors
 * tile the data area exactly, without gaps or overlaps.
 *
 * Tensors are written as F32 (the engine's type). Reading also accepts F16, BF16 and F64, converted to float32.
 * Files are written atomically and durably (util/files.ts: a flushed temporary file, then a rename), so a crash
 * or power loss mid-write never leaves a truncated checkpoint under the real name. Errors name the file and say what is wrong.
 */

import { getDefaultDevice } from "./device.ts";
import { tensor } from "./creation.ts";
import type { Tensor, TensorOptions } from "./tensor.ts";
import { writeFileAtomic } from "../util/files.ts";

/** A tensor on the host: shape and row-major float32 values. */
export interface HostTensor {
  shape: number[];
  data: Float32Array;
}

/** A decoded entry: the stored dtype, the shape, and the values converted to float32. */
export interface DecodedTensor extends HostTensor {
  dtype: string;
}

/** Bytes per element of the dtypes the reader converts. */
const DTYPE_BYTES: Record<string, number> = { F32: 4, F16: 2, BF16: 2, F64: 8 };

/** The reference implementation refuses headers above 100 MB; so do we (a corrupt length would be huge). */
const MAX_HEADER_BYTES = 100_000_000;

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// ---------------------------------------------------------------------------------------------------------------
// Encoding.

/**
 * The bytes of a safetensors file holding `tensors` as F32 (ordered by name) and optional string metadata.
 */
export function encodeSafetensors(
  tensors: Record<string, { shape: readonly number[]; data: ArrayLike<number> }>,
  metadata?: Record<string, string>,
): Uint8Array {
  const names = Object.keys(tensors).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const header: Record<string, unknown> = {};
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") {
        throw new Error(`safetensors: metadata "${k}" must be a string, got ${typeof v}`);
      }
    }
    header.__metadata__ = metadata;
  }
  let offset = 0;
  for (const name of names) {
    if (name === "__metadata__") {
      throw new Error(`safetensors: "__metadata__" is reserved and cannot name a tensor`);
    }
    const { shape, data } = tensors[name];
    const numel = shape.reduce((a, b) => a * b, 1);
    if (!shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new Error(`safetensors: tensor "${name}" has invalid shape [${shape}]`);
    }
    if (numel !== data.length) {
      throw new Error(
        `safetensors: tensor "${name}" has shape [${shape}] (${numel} values) but ${data.length} values`,
      );
    }
    header[name] = { dtype: "F32", shape: [...shape], data_offsets: [offset, offset + 4 * numel] };
    offset += 4 * numel;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) {
    const p = new Uint8Array(padded).fill(0x20);
    p.set(json);
    json = p;
  }
  const out = new Uint8Array(8 + json.length + offset);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let at = 8 + json.length;
  for (const name of names) {
    const data = tensors[name].data;
    const f = data instanceof Float32Array ? data : Float32Array.from(data);
    if (LITTLE_ENDIAN_HOST) out.set(new Uint8Array(f.buffer, f.byteOffset, f.byteLength), at);
    else for (let i = 0; i < f.length; i++) view.setFloat32(at + 4 * i, f[i], true);
    at += f.byteLength;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Decoding.

/** IEEE half (binary16) bits to a number. */
function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

function convert(bytes: Uint8Array, begin: number, numel: number, dtype: string): Float32Array {
  const out = new Float32Array(numel);
  const view = new DataView(bytes.buffer, bytes.byteOffset + begin, numel * DTYPE_BYTES[dtype]);
  switch (dtype) {
    case "F32":
      if (LITTLE_ENDIAN_HOST) out.set(new Float32Array(bytes.slice(begin, begin + 4 * numel).buffer));
      else for (let i = 0; i < numel; i++) out[i] = view.getFloat32(4 * i, true);
      break;
    case "F64":
      for (let i = 0; i < numel; i++) out[i] = view.getFloat64(8 * i, true);
      break;
    case "F16":
      for (let i = 0; i < numel; i++) out[i] = halfToFloat(view.getUint16(2 * i, true));
      break;
    case "BF16": {
      // bfloat16 is the top half of a float32.
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < numel; i++) bits[i] = view.getUint16(2 * i, true) << 16;
      break;
    }
  }
  return out;
}

const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * Parses safetensors bytes. `source` (a file name) prefixes every error. Checks the header length, the JSON,
 * every entry's dtype/shape/offsets, and that the tensors tile the data area exactly.
 */
export function decodeSafetensors(
  bytes: Uint8Array,
  source = "<bytes>",
): { tensors: Record<string, DecodedTensor>; metadata: Record<string, string> } {
  const fail = (msg: string): never => {
    throw new Error(`safetensors ${source}: ${msg}`);
  };
  if (bytes.length < 8) {
    fail(`${bytes.length} bytes is too short to hold the 8-byte header length (truncated?)`);
  }
  const n = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES)) {
    fail(`header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit (corrupt?)`);
  }
  const headerLen = Number(n);
  if (8 + headerLen > bytes.length) {
    fail(`header length ${headerLen} runs past the end of the ${bytes.length}-byte file (truncated?)`);
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + headerLen));
  } catch {
    return fail("header is not valid UTF-8");
  }
  if (!text.startsWith("{")) {
    fail(`header does not start with "{" (got ${JSON.stringify(text.slice(0, 16))})`);
  }
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (e) {
    return fail(`header is not valid JSON: ${(e as Error).message}`);
  }
  if (!isPlainObject(header)) return fail("header is not a JSON object");

  // Objects are built with fromEntries so that a key like "__proto__" stays an ordinary key.
  const meta = header.__metadata__ ?? {};
  if (!isPlainObject(meta)) fail(`"__metadata__" must be an object of strings`);
  for (const [k, v] of Object.entries(meta as Record<string, unknown>)) {
    if (typeof v !== "string") fail(`"__metadata__" value "${k}" is not a string`);
  }
  const metadata = Object.fromEntries(Object.entries(meta as Record<string, string>));

  const dataStart = 8 + headerLen;
  const dataLen = bytes.length - dataStart;
  const entries: { name: string; dtype: string; shape: number[]; begin: number; end: number }[] = [];
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (!isPlainObject(info)) return fail(`entry "${name}" is not an object`);
    const { dtype, shape, data_offsets: offsets } = info;
    if (typeof dtype !== "string") return fail(`tensor "${name}" has no dtype`);
    if (!(dtype in DTYPE_BYTES)) {
      fail(`tensor "${name}" has dtype ${dtype}; supported: ${Object.keys(DTYPE_BYTES).join(", ")}`);
    }
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      return fail(`tensor "${name}" has an invalid shape ${JSON.stringify(shape)}`);
    }
    if (
      !Array.isArray(offsets) || offsets.length !== 2 ||
      !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)
    ) {
      return fail(`tensor "${name}" has invalid data_offsets ${JSON.stringify(offsets)}`);
    }
    const [begin, end] = offsets as number[];
    const numel = (shape as number[]).reduce((a, b) => a * b, 1);
    if (end < begin) fail(`tensor "${name}" has data_offsets [${begin}, ${end}] that end before they begin`);
    if (end > dataLen) {
      fail(
        `tensor "${name}" has data_offsets [${begin}, ${end}] outside the ${dataLen}-byte data area (truncated?)`,
      );
    }
    if (end - begin !== numel * DTYPE_BYTES[dtype]) {
      fail(
        `tensor "${name}" of shape [${shape}] and dtype ${dtype} needs ${
          numel * DTYPE_BYTES[dtype]
        } bytes, ` +
          `but its data_offsets [${begin}, ${end}] span ${end - begin}`,
      );
    }
    entries.push({ name, dtype, shape: shape as number[], begin, end });
  }
  // Like the reference reader: sorted by offset, the tensors must cover the data area with no gap or overlap.
  const sorted = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let expected = 0;
  for (const e of sorted) {
    if (e.begin !== expected) {
      fail(
        `tensor "${e.name}" starts at byte ${e.begin} of the data area, expected ${expected} (gap or overlap)`,
      );
    }
    expected = e.end;
  }
  if (expected !== dataLen) {
    fail(
      `tensors end at byte ${expected} of the data area, but it has ${dataLen} bytes (trailing or missing data)`,
    );
  }

  const tensors: Record<string, DecodedTensor> = Object.fromEntries(entries.map((e) => {
    const numel = e.shape.reduce((a, b) => a * b, 1);
    return [e.name, {
      dtype: e.dtype,
      shape: e.shape,
      data: convert(bytes, dataStart + e.begin, numel, e.dtype),
    }];
  }));
  return { tensors, metadata };
}

// ---------------------------------------------------------------------------------------------------------------
// Files.

/**
 * Writes `tensors` (read back from their devices, as F32) and optional string `metadata` to `path`,
 * atomically (util/files.ts).
 */
export async function saveSafetensors(
  path: string,
  tensors: Record<string, Tensor>,
  metadata?: Record<string, string>,
): Promise<void> {
  const host: Record<string, HostTensor> = {};
  for (const [name, t] of Object.entries(tensors)) {
    if (t.disposed) throw new Error(`saveSafetensors ${path}: tensor "${name}" was disposed`);
    host[name] = { shape: [...t.shape], data: await t.toArray() };
  }
  let bytes: Uint8Array;
  try {
    bytes = encodeSafetensors(host, metadata);
  } catch (e) {
    throw new Error(`saveSafetensors ${path}: ${(e as Error).message}`);
  }
  try {
    await writeFileAtomic(path, bytes);
  } catch (e) {
    // The message is "cannot write <path>: <reason>".
    throw new Error(`saveSafetensors ${path}: ${(e as Error).message}`);
  }
}

/** Loads a file's tensors (converted to float32) onto a device, with its `__metadata__`. */
export async function loadSafetensorsWithMetadata(
  path: string,
  opts: TensorOptions = {},
): Promise<{ tensors: Record<string, Tensor>; metadata: Record<string, string> }> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    throw new Error(`safetensors ${path}: cannot read the file: ${(e as Error).message}`);
  }
  const decoded = decodeSafetensors(bytes, path);
  const device = opts.device ?? getDefaultDevice();
  for (const [name, t] of Object.entries(decoded.tensors)) {
    if (t.data.length === 0) {
      throw new Error(
        `safetensors ${path}: tensor "${name}" of shape [${t.shape}] is empty, which tensors cannot be`,
      );
    }
  }
  const tensors: Record<string, Tensor> = Object.fromEntries(
    Object.entries(decoded.tensors).map(([name, t]) => [
      name,
      tensor(t.data, t.shape, { device, requiresGrad: opts.requiresGrad }),
    ]),
  );
  return { tensors, metadata: decoded.metadata };
}

/** Loads a file's tensors (F32, or F16/BF16/F64 converted to float32) onto a device. */
export async function loadSafetensors(
  path: string,
  opts: TensorOptions = {},
): Promise<Record<string, Tensor>> {
  return (await loadSafetensorsWithMetadata(path, opts)).tensors;
}
