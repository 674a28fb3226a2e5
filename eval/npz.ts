/**
 * @file NumPy's `.npy` and `.npz` files, read and written without dependencies, so that FID reference
 * statistics published as `.npz` (NVlabs/edm's `fid-refs/*.npz`, pytorch-fid's, with arrays `mu` and `sigma`)
 * load directly and ours can be written in the same form.
 *
 * `.npy` (format versions 1.0–3.0): the magic bytes `\x93NUMPY`, the version, a little-endian header length (u16
 * in 1.0, u32 in 2.0/3.0), then a Python dict literal such as `{'descr': '<f8', 'fortran_order': False,
 * 'shape': (2048, 2048), }` padded with spaces to a 16- or 64-byte boundary, then the raw elements. Floating
 * dtypes `f2`/`f4`/`f8` of either byte order are read (to Float32Array for f2/f4, Float64Array for f8), and
 * Fortran-ordered arrays are reordered to C order; object (pickled) arrays are refused.
 *
 * `.npz` is a zip archive of `<key>.npy` members, stored (np.savez) or deflated (np.savez_compressed). The
 * reader walks the central directory (with ZIP64 records and extra fields: NumPy writes every member with
 * `force_zip64`, so local headers carry ZIP64 extras even for small files), inflates with the platform's
 * `DecompressionStream("deflate-raw")`, and checks every member's CRC-32. The writer produces stored members.
 */

/** A decoded array: its NumPy dtype string, its shape, and its elements in C (row-major) order. */
export interface NpyArray {
  dtype: string;
  shape: number[];
  data: Float32Array | Float64Array;
}

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // "\x93NUMPY"

// ---------------------------------------------------------------------------------------------------------------
// .npy

/** Reads one field of the header dict: a quoted string, True/False, or a tuple of integers. */
function headerField(header: string, key: string, source: string): string {
  const m = new RegExp(`['"]${key}['"]\\s*:\\s*('[^']*'|"[^"]*"|True|False|\\([^)]*\\))`).exec(header);
  if (!m) throw new Error(`npy ${source}: header has no "${key}": ${header.trim()}`);
  return m[1];
}

/** Parses `.npy` bytes. `source` names the file (or npz member) in errors. */
export function parseNpy(bytes: Uint8Array, source = "<bytes>"): NpyArray {
  const fail = (msg: string): never => {
    throw new Error(`npy ${source}: ${msg}`);
  };
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) fail("not a .npy file (bad magic)");
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let headerLen: number, start: number;
  if (major === 1) {
    headerLen = view.getUint16(8, true);
    start = 10;
  } else if (major === 2 || major === 3) {
    if (bytes.length < 12) fail("truncated header length");
    headerLen = view.getUint32(8, true);
    start = 12;
  } else return fail(`unsupported format version ${major}.${bytes[7]}`);
  if (start + headerLen > bytes.length) fail(`header of ${headerLen} bytes runs past the end (truncated?)`);
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
    bytes.subarray(start, start + headerLen),
  );
  const descr = headerField(header, "descr", source).slice(1, -1);
  const fortran = headerField(header, "fortran_order", source) === "True";
  const shapeText = headerField(header, "shape", source);
  const dims = shapeText.slice(1, -1).split(",").map((t) => t.trim()).filter((t) => t.length > 0);
  const shape = dims.map((t) => {
    if (!/^\d+$/.test(t)) fail(`shape ${shapeText} is not a tuple of integers`);
    return Number(t);
  });
  const m = /^([<>|=])f([248])$/.exec(descr);
  if (!m) {
    fail(`dtype '${descr}' is not supported (floating point only: '<f8', '<f4', '<f2' or big-endian)`);
  }
  const [, order, widthText] = m!;
  const width = Number(widthText);
  const little = order !== ">";
  const count = shape.reduce((a, b) => a * b, 1);
  const dataStart = start + headerLen;
  if (bytes.length - dataStart < count * width) {
    fail(
      `shape (${shape}) of '${descr}' needs ${count * width} bytes of data, the file has ${
        bytes.length - dataStart
      }`,
    );
  }
  const data = width === 8 ? new Float64Array(count) : new Float32Array(count);
  for (let i = 0; i < count; i++) {
    const at = dataStart + i * width;
    data[i] = width === 8
      ? view.getFloat64(at, little)
      : width === 4
      ? view.getFloat32(at, little)
      : halfToFloat(view.getUint16(at, little));
  }
  return { dtype: descr, shape, data: fortran && shape.length > 1 ? toCOrder(data, shape) : data };
}

/** IEEE binary16 bits to a number. */
function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Reorders a Fortran-ordered (first index fastest) array to C order (last index fastest). */
function toCOrder<T extends Float32Array | Float64Array>(f: T, shape: number[]): T {
  const out = new (f.constructor as { new (n: number): T })(f.length);
  const rank = shape.length;
  const fStrides = new Array<number>(rank);
  let s = 1;
  for (let d = 0; d < rank; d++) {
    fStrides[d] = s;
    s *= shape[d];
  }
  const idx = new Array<number>(rank).fill(0);
  for (let c = 0; c < out.length; c++) {
    let at = 0;
    for (let d = 0; d < rank; d++) at += idx[d] * fStrides[d];
    out[c] = f[at];
    for (let d = rank - 1; d >= 0; d--) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

/** `.npy` (format 1.0) bytes of a little-endian float64 ('<f8') or float32 ('<f4') C-ordered array. */
export function encodeNpy(data: Float64Array | Float32Array, shape: readonly number[]): Uint8Array {
  const count = shape.reduce((a, b) => a * b, 1);
  if (!shape.every((d) => Number.isInteger(d) && d >= 0) || count !== data.length) {
    throw new Error(`encodeNpy: shape [${shape}] does not hold ${data.length} values`);
  }
  const width = data instanceof Float64Array ? 8 : 4;
  const tuple = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  let header = `{'descr': '<f${width}', 'fortran_order': False, 'shape': ${tuple}, }`;
  // Pad with spaces so that magic + version + length + header + "\n" is a multiple of 64 bytes.
  const total = Math.ceil((10 + header.length + 1) / 64) * 64;
  header = header.padEnd(total - 10 - 1, " ") + "\n";
  const out = new Uint8Array(total + count * width);
  out.set(MAGIC);
  out[6] = 1;
  out[7] = 0;
  const view = new DataView(out.buffer);
  view.setUint16(8, header.length, true);
  out.set(new TextEncoder().encode(header), 10);
  for (let i = 0; i < count; i++) {
    if (width === 8) view.setFloat64(total + 8 * i, data[i], true);
    else view.setFloat32(total + 4 * i, data[i], true);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Zip.

let crcTable: Uint32Array | null = null;

/** CRC-32 (IEEE 802.3, as zip uses it). */
export function crc32(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

async function inflateRaw(data: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([data as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
    new DecompressionStream("deflate-raw"),
  );
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

interface ZipEntry {
  name: string;
  method: number;
  flags: number;
  crc: number;
  compressedSize: number;
  size: number;
  localOffset: number;
}

/** The members of a zip archive (central directory entries), ZIP64 aware. */
function zipDirectory(bytes: Uint8Array, fail: (msg: string) => never): ZipEntry[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  // End of central directory: the last "PK\5\6" within the final 64 KiB + 22 bytes.
  let eocd = -1;
  for (let at = bytes.length - 22; at >= Math.max(0, bytes.length - 22 - 0xffff); at--) {
    if (view.getUint32(at, true) === 0x06054b50) {
      eocd = at;
      break;
    }
  }
  if (eocd < 0) fail("not a zip archive (no end-of-central-directory record)");
  let count = view.getUint16(eocd + 10, true);
  let cdSize = view.getUint32(eocd + 12, true);
  let cdOffset = view.getUint32(eocd + 16, true);
  if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
    const locator = eocd - 20;
    if (locator < 0 || view.getUint32(locator, true) !== 0x07064b50) fail("ZIP64 locator missing");
    const z64 = Number(view.getBigUint64(locator + 8, true));
    if (z64 + 56 > bytes.length || view.getUint32(z64, true) !== 0x06064b50) fail("ZIP64 end record missing");
    count = Number(view.getBigUint64(z64 + 32, true));
    cdSize = Number(view.getBigUint64(z64 + 40, true));
    cdOffset = Number(view.getBigUint64(z64 + 48, true));
  }
  if (cdOffset + cdSize > bytes.length) fail("central directory runs past the end (truncated?)");
  const entries: ZipEntry[] = [];
  let at = cdOffset;
  for (let k = 0; k < count; k++) {
    if (at + 46 > bytes.length || view.getUint32(at, true) !== 0x02014b50) {
      fail(`central directory entry ${k} is corrupt`);
    }
    const nameLen = view.getUint16(at + 28, true), extraLen = view.getUint16(at + 30, true);
    const commentLen = view.getUint16(at + 32, true);
    const e: ZipEntry = {
      name: new TextDecoder().decode(bytes.subarray(at + 46, at + 46 + nameLen)),
      flags: view.getUint16(at + 8, true),
      method: view.getUint16(at + 10, true),
      crc: view.getUint32(at + 16, true),
      compressedSize: view.getUint32(at + 20, true),
      size: view.getUint32(at + 24, true),
      localOffset: view.getUint32(at + 42, true),
    };
    // ZIP64 extended information (header id 1): 64-bit values for the fields that read 0xFFFFFFFF, in order.
    let x = at + 46 + nameLen;
    const xEnd = x + extraLen;
    while (x + 4 <= xEnd) {
      const id = view.getUint16(x, true), len = view.getUint16(x + 2, true);
      if (id === 1) {
        let f = x + 4;
        const next = () => {
          if (f + 8 > x + 4 + len) fail(`ZIP64 extra field of "${e.name}" is too short`);
          const v = Number(view.getBigUint64(f, true));
          f += 8;
          return v;
        };
        if (e.size === 0xffffffff) e.size = next();
        if (e.compressedSize === 0xffffffff) e.compressedSize = next();
        if (e.localOffset === 0xffffffff) e.localOffset = next();
      }
      x += 4 + len;
    }
    entries.push(e);
    at = xEnd + commentLen;
  }
  return entries;
}

/**
 * The arrays of an `.npz` archive by key (member name without ".npy"). `source` names the file in errors.
 */
export async function readNpz(bytes: Uint8Array, source = "<bytes>"): Promise<Record<string, NpyArray>> {
  const fail = (msg: string): never => {
    throw new Error(`npz ${source}: ${msg}`);
  };
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: Record<string, NpyArray> = {};
  for (const e of zipDirectory(bytes, fail)) {
    if (e.name.endsWith("/")) continue;
    if (e.flags & 1) fail(`member "${e.name}" is encrypted`);
    const lh = e.localOffset;
    if (lh + 30 > bytes.length || view.getUint32(lh, true) !== 0x04034b50) {
      fail(`local header of "${e.name}" is missing`);
    }
    // The local header has its own name and extra lengths (NumPy's local ZIP64 extras differ from the directory's).
    const dataStart = lh + 30 + view.getUint16(lh + 26, true) + view.getUint16(lh + 28, true);
    if (dataStart + e.compressedSize > bytes.length) {
      fail(`member "${e.name}" runs past the end (truncated?)`);
    }
    const raw = bytes.subarray(dataStart, dataStart + e.compressedSize);
    let content: Uint8Array;
    if (e.method === 0) content = raw;
    else if (e.method === 8) {
      try {
        content = await inflateRaw(raw);
      } catch (err) {
        return fail(`member "${e.name}" does not inflate: ${(err as Error).message}`);
      }
    } else return fail(`member "${e.name}" uses compression method ${e.method} (only stored and deflate)`);
    if (content.length !== e.size) fail(`member "${e.name}" is ${content.length} bytes, expected ${e.size}`);
    if (crc32(content) !== e.crc) fail(`member "${e.name}" fails its CRC-32 check (corrupt)`);
    const key = e.name.endsWith(".npy") ? e.name.slice(0, -4) : e.name;
    out[key] = parseNpy(content, `${source}:${e.name}`);
  }
  return out;
}

/** Reads an `.npz` file. */
export async function loadNpz(path: string): Promise<Record<string, NpyArray>> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    throw new Error(`npz ${path}: cannot read the file: ${(e as Error).message}`);
  }
  return readNpz(bytes, path);
}

/** An `.npz` archive (stored members, like np.savez) holding each array as `<key>.npy`. */
export function encodeNpz(
  arrays: Record<string, { data: Float64Array | Float32Array; shape: readonly number[] }>,
): Uint8Array {
  const enc = new TextEncoder();
  const locals: Uint8Array[] = [], centrals: Uint8Array[] = [];
  let offset = 0;
  for (const [key, { data, shape }] of Object.entries(arrays)) {
    const name = enc.encode(`${key}.npy`);
    const body = encodeNpy(data, shape);
    const crc = crc32(body);
    if (body.length >= 0xffffffff || offset >= 0xffffffff) {
      throw new Error(`encodeNpz: "${key}" needs ZIP64, which the writer does not produce`);
    }
    const local = new Uint8Array(30 + name.length + body.length);
    const lv = new DataView(local.buffer);
    lv.setUint32(0, 0x04034b50, true);
    lv.setUint16(4, 20, true); // version needed
    lv.setUint16(8, 0, true); // stored
    lv.setUint16(10, 0, true); // time
    lv.setUint16(12, 0x21, true); // date: 1980-01-01
    lv.setUint32(14, crc, true);
    lv.setUint32(18, body.length, true);
    lv.setUint32(22, body.length, true);
    lv.setUint16(26, name.length, true);
    local.set(name, 30);
    local.set(body, 30 + name.length);
    const central = new Uint8Array(46 + name.length);
    const cv = new DataView(central.buffer);
    cv.setUint32(0, 0x02014b50, true);
    cv.setUint16(4, 20, true);
    cv.setUint16(6, 20, true);
    cv.setUint16(14, 0x21, true);
    cv.setUint32(16, crc, true);
    cv.setUint32(20, body.length, true);
    cv.setUint32(24, body.length, true);
    cv.setUint16(28, name.length, true);
    cv.setUint32(42, offset, true);
    central.set(name, 46);
    locals.push(local);
    centrals.push(central);
    offset += local.length;
  }
  const cdSize = centrals.reduce((n, c) => n + c.length, 0);
  const end = new Uint8Array(22);
  const ev = new DataView(end.buffer);
  ev.setUint32(0, 0x06054b50, true);
  ev.setUint16(8, centrals.length, true);
  ev.setUint16(10, centrals.length, true);
  ev.setUint32(12, cdSize, true);
  ev.setUint32(16, offset, true);
  const out = new Uint8Array(offset + cdSize + 22);
  let at = 0;
  for (const part of [...locals, ...centrals, end]) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}
