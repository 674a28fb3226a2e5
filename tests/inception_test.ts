/**
 * @file The FID Inception-v3: parameter count from the architecture (and against torchvision's published
 * 27,161,264 for the variant with AuxLogits and 1000 classes), PyTorch names and shapes, the whole network at
 * 107×107 (so that Mixed_7c still sees 2×2) against a float64 host implementation written independently here (conv, BatchNorm eps 0.001, ReLU,
 * padding-excluding average pools, Mixed_7c's max pool, branch order), both preprocessing conventions against
 * their resize formulas, the safetensors loader round trip, and errors that name missing, unexpected and
 * mis-shaped weights.
 */

import { type Device, encodeSafetensors, type Tensor, tensor } from "../engine/mod.ts";
import { inceptionConvs, inceptionParameterCount, InceptionV3 } from "../eval/inception.ts";
import { assertClose, assertRejects, gpuDevice, gpuTest, uniformStream } from "./util.ts";

let shared: InceptionV3 | null = null;
/** One network on the WebGPU device for the tests that only read it. */
async function network(): Promise<InceptionV3> {
  return (shared ??= new InceptionV3({ device: await gpuDevice(), resize: false }));
}

gpuTest(
  "parameter count: 21,785,568 (conv + BN), 23,850,960 with fc; names and shapes follow PyTorch",
  async () => {
    const count = inceptionParameterCount();
    if (count.convWeights !== 21_751_136 || count.batchNorm !== 34_432 || count.total !== 21_785_568) {
      throw new Error(`architecture count ${JSON.stringify(count)}`);
    }
    const withFc = inceptionParameterCount({ fc: true });
    if (withFc.fc !== 2048 * 1008 + 1008 || withFc.total !== 23_850_960) {
      throw new Error(JSON.stringify(withFc));
    }
    // torchvision documents inception_v3 (1000 classes, with AuxLogits) at 27,161,264 parameters; AuxLogits are
    // BasicConv2d(768, 128, 1), BasicConv2d(128, 768, 5) and Linear(768, 1000).
    const aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000;
    if (count.total + 2048 * 1000 + 1000 + aux !== 27_161_264) {
      throw new Error("does not add up to torchvision's");
    }
    const net = await network();
    if (net.parameterCount() !== count.total) {
      throw new Error(
        `module has ${net.parameterCount()} parameters`,
      );
    }
    // The module's parameters are exactly the architecture table's, in PyTorch's order.
    const params = net.namedParameters();
    const convs = inceptionConvs();
    if (convs.length !== 94 || params.length !== 3 * 94) {
      throw new Error(`${convs.length} convs, ${params.length} params`);
    }
    convs.forEach((c, i) => {
      const [name, w] = params[3 * i];
      const want = [c.outChannels, c.inChannels, ...c.kernel].join();
      if (name !== `${c.name}.conv.weight` || w.shape.join() !== want) {
        throw new Error(`parameter ${3 * i}: ${name} [${w.shape}], expected ${c.name}.conv.weight [${want}]`);
      }
      if (params[3 * i + 1][0] !== `${c.name}.bn.weight` || params[3 * i + 2][0] !== `${c.name}.bn.bias`) {
        throw new Error(`BatchNorm of ${c.name} is named ${params[3 * i + 1][0]}, ${params[3 * i + 2][0]}`);
      }
    });
    const buffers = net.namedBuffers().map(([n]) => n);
    if (buffers.length !== 188 || buffers[187] !== "Mixed_7c.branch_pool.bn.running_var") {
      throw new Error(`buffers: ${buffers.length}, last ${buffers[187]}`);
    }
    const fcNet = new InceptionV3({ device: await gpuDevice(), fc: true });
    try {
      if (fcNet.parameterCount() !== withFc.total) throw new Error(`with fc: ${fcNet.parameterCount()}`);
      const names = fcNet.namedParameters().map(([n]) => n);
      if (names.at(-2) !== "fc.weight" || names.at(-1) !== "fc.bias") {
        throw new Error(`last ${names.slice(-2)}`);
      }
    } finally {
      fcNet.dispose();
    }
  },
);

// ---------------------------------------------------------------------------------------------------------------
// An independent float64 implementation of the network (batch of one).

interface Act {
  c: number;
  h: number;
  w: number;
  v: Float64Array;
}

type Weights = Record<string, { shape: number[]; data: Float32Array }>;

function conv(
  x: Act,
  wt: { shape: number[]; data: Float32Array },
  stride: number,
  ph: number,
  pw: number,
): Act {
  const [co, ci, kh, kw] = wt.shape;
  if (ci !== x.c) throw new Error(`reference conv: ${ci} input channels for ${x.c}`);
  const h = Math.floor((x.h + 2 * ph - kh) / stride) + 1, w = Math.floor((x.w + 2 * pw - kw) / stride) + 1;
  const v = new Float64Array(co * h * w);
  for (let o = 0; o < co; o++) {
    for (let i = 0; i < ci; i++) {
      for (let a = 0; a < kh; a++) {
        for (let b = 0; b < kw; b++) {
          const k = wt.data[((o * ci + i) * kh + a) * kw + b];
          for (let y = 0; y < h; y++) {
            const sy = y * stride - ph + a;
            if (sy < 0 || sy >= x.h) continue;
            for (let z = 0; z < w; z++) {
              const sx = z * stride - pw + b;
              if (sx >= 0 && sx < x.w) v[(o * h + y) * w + z] += k * x.v[(i * x.h + sy) * x.w + sx];
            }
          }
        }
      }
    }
  }
  return { c: co, h, w, v };
}

/** BasicConv2d: conv (no bias) → BatchNorm(eps 0.001) → ReLU, reading `name.conv.weight` and `name.bn.*`. */
function basic(wts: Weights, name: string, x: Act, stride = 1, ph = 0, pw = ph): Act {
  const y = conv(x, wts[`${name}.conv.weight`], stride, ph, pw);
  const g = wts[`${name}.bn.weight`].data, b = wts[`${name}.bn.bias`].data;
  const m = wts[`${name}.bn.running_mean`].data, s = wts[`${name}.bn.running_var`].data;
  const plane = y.h * y.w;
  for (let c = 0; c < y.c; c++) {
    for (let p = 0; p < plane; p++) {
      const t = (y.v[c * plane + p] - m[c]) / Math.sqrt(s[c] + 0.001) * g[c] + b[c];
      y.v[c * plane + p] = Math.max(t, 0);
    }
  }
  return y;
}

/** 3×3 pooling; "avg" divides by the in-bounds count (TF), "max" ignores the padding. */
function pool(x: Act, kind: "avg" | "max", stride: number, pad: number): Act {
  const h = Math.floor((x.h + 2 * pad - 3) / stride) + 1, w = Math.floor((x.w + 2 * pad - 3) / stride) + 1;
  const v = new Float64Array(x.c * h * w);
  for (let c = 0; c < x.c; c++) {
    for (let y = 0; y < h; y++) {
      for (let z = 0; z < w; z++) {
        let acc = kind === "max" ? -Infinity : 0, n = 0;
        for (let a = 0; a < 3; a++) {
          for (let b = 0; b < 3; b++) {
            const sy = y * stride - pad + a, sx = z * stride - pad + b;
            if (sy < 0 || sy >= x.h || sx < 0 || sx >= x.w) continue;
            const t = x.v[(c * x.h + sy) * x.w + sx];
            acc = kind === "max" ? Math.max(acc, t) : acc + t;
            n++;
          }
        }
        v[(c * h + y) * w + z] = kind === "max" ? acc : acc / n;
      }
    }
  }
  return { c: x.c, h, w, v };
}

function concat(...xs: Act[]): Act {
  const v = new Float64Array(xs.reduce((n, x) => n + x.v.length, 0));
  let at = 0;
  for (const x of xs) (v.set(x.v, at), (at += x.v.length));
  return { c: xs.reduce((n, x) => n + x.c, 0), h: xs[0].h, w: xs[0].w, v };
}

/** The FID Inception-v3 forward (after preprocessing) as pytorch-fid describes it, in float64. */
function referenceFeatures(W: Weights, input: Act): Float64Array {
  const B = (n: string, x: Act, s = 1, ph = 0, pw = ph) => basic(W, n, x, s, ph, pw);
  let x = B("Conv2d_1a_3x3", input, 2);
  x = B("Conv2d_2a_3x3", x);
  x = B("Conv2d_2b_3x3", x, 1, 1);
  x = pool(x, "max", 2, 0);
  x = B("Conv2d_3b_1x1", x);
  x = B("Conv2d_4a_3x3", x);
  x = pool(x, "max", 2, 0);
  for (const n of ["Mixed_5b", "Mixed_5c", "Mixed_5d"]) {
    x = concat(
      B(`${n}.branch1x1`, x),
      B(`${n}.branch5x5_2`, B(`${n}.branch5x5_1`, x), 1, 2),
      B(`${n}.branch3x3dbl_3`, B(`${n}.branch3x3dbl_2`, B(`${n}.branch3x3dbl_1`, x), 1, 1), 1, 1),
      B(`${n}.branch_pool`, pool(x, "avg", 1, 1)),
    );
  }
  x = concat(
    B("Mixed_6a.branch3x3", x, 2),
    B("Mixed_6a.branch3x3dbl_3", B("Mixed_6a.branch3x3dbl_2", B("Mixed_6a.branch3x3dbl_1", x), 1, 1), 2),
    pool(x, "max", 2, 0),
  );
  for (const n of ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]) {
    const r = (k: string, y: Act) => B(`${n}.${k}`, y, 1, 0, 3); // 1×7
    const c = (k: string, y: Act) => B(`${n}.${k}`, y, 1, 3, 0); // 7×1
    x = concat(
      B(`${n}.branch1x1`, x),
      c("branch7x7_3", r("branch7x7_2", B(`${n}.branch7x7_1`, x))),
      r(
        "branch7x7dbl_5",
        c("branch7x7dbl_4", r("branch7x7dbl_3", c("branch7x7dbl_2", B(`${n}.branch7x7dbl_1`, x)))),
      ),
      B(`${n}.branch_pool`, pool(x, "avg", 1, 1)),
    );
  }
  x = concat(
    B("Mixed_7a.branch3x3_2", B("Mixed_7a.branch3x3_1", x), 2),
    B(
      "Mixed_7a.branch7x7x3_4",
      B(
        "Mixed_7a.branch7x7x3_3",
        B("Mixed_7a.branch7x7x3_2", B("Mixed_7a.branch7x7x3_1", x), 1, 0, 3),
        1,
        3,
        0,
      ),
      2,
    ),
    pool(x, "max", 2, 0),
  );
  for (const [n, kind] of [["Mixed_7b", "avg"], ["Mixed_7c", "max"]] as const) {
    const s = B(`${n}.branch3x3_1`, x);
    const d = B(`${n}.branch3x3dbl_2`, B(`${n}.branch3x3dbl_1`, x), 1, 1);
    x = concat(
      B(`${n}.branch1x1`, x),
      B(`${n}.branch3x3_2a`, s, 1, 0, 1),
      B(`${n}.branch3x3_2b`, s, 1, 1, 0),
      B(`${n}.branch3x3dbl_3a`, d, 1, 0, 1),
      B(`${n}.branch3x3dbl_3b`, d, 1, 1, 0),
      B(`${n}.branch_pool`, pool(x, kind, 1, 1)),
    );
  }
  const plane = x.h * x.w;
  return Float64Array.from(
    { length: x.c },
    (_, c) => x.v.subarray(c * plane, (c + 1) * plane).reduce((a, b) => a + b) / plane,
  );
}

/** Weights with He-scaled convolutions and non-trivial BatchNorm statistics, so activations stay O(1). */
function randomWeights(net: InceptionV3, seed: number): Weights {
  const u = uniformStream(seed);
  const out: Weights = {};
  for (const [name, t] of Object.entries(net.stateDict())) {
    const n = t.size, data = new Float32Array(n);
    if (name.endsWith("conv.weight")) {
      const fanIn = t.shape[1] * t.shape[2] * t.shape[3], bound = Math.sqrt(6 / fanIn);
      for (let i = 0; i < n; i++) data[i] = (2 * u() - 1) * bound;
    } else if (name.endsWith("bn.weight")) { for (let i = 0; i < n; i++) data[i] = 0.8 + 0.6 * u(); }
    else if (name.endsWith("bn.running_var")) { for (let i = 0; i < n; i++) data[i] = 0.5 + u(); }
    else for (let i = 0; i < n; i++) data[i] = 0.4 * u() - 0.2; // bn.bias, bn.running_mean
    out[name] = { shape: [...t.shape], data };
  }
  return out;
}

const onDevice = (w: Weights, device: Device): Record<string, Tensor> =>
  Object.fromEntries(Object.entries(w).map(([k, v]) => [k, tensor(v.data, v.shape, { device })]));

gpuTest(
  "the network at 107×107 (no resize; 2×2 at Mixed_7c) matches an independent float64 implementation",
  async () => {
    const device = await gpuDevice();
    const net = await network();
    const W = randomWeights(net, 5);
    const loaded = onDevice(W, device);
    net.loadWeights(loaded);
    Object.values(loaded).forEach((t) => t.dispose());
    const u = uniformStream(9);
    const pixels = Float32Array.from({ length: 3 * 107 * 107 }, () => Math.floor(256 * u()));
    const images = tensor(pixels, [1, 3, 107, 107], { device });
    const f = net.features(images);
    if (f.shape.join() !== "1,2048") throw new Error(`features shape [${f.shape}]`);
    const got = await f.toFloat64Array();
    f.dispose();
    images.dispose();
    // NVlabs' normalisation (x − 128)/128, no resize: the input is already ≥ 75×75.
    const want = referenceFeatures(W, {
      c: 3,
      h: 107,
      w: 107,
      v: Float64Array.from(pixels, (p) => (p - 128) / 128),
    });
    const scale = Math.max(...want.map(Math.abs));
    if (!(scale > 1e-3)) {
      throw new Error(
        `reference features vanish (max ${scale}): the test would be vacuous`,
      );
    }
    assertClose(got, want, { rtol: 2e-3, atol: 2e-4 * scale }, "pool features");
  },
);

gpuTest(
  "preprocessing: NVlabs (TF1 resize, (x − 128)/128) and pytorch-fid (half-pixel, x/127.5 − 1)",
  async () => {
    const device = await gpuDevice();
    const H = 5, W = 7;
    const u = uniformStream(3);
    const pixels = Float32Array.from({ length: 3 * H * W }, () => 255 * u());
    const images = tensor(pixels, [1, 3, H, W], { device });
    // Source coordinate of output o along an axis of n inputs, and the bilinear blend (clamped at the border).
    const sample = (c: number, sy: number, sx: number) => {
      const y0 = Math.min(Math.floor(sy), H - 1), x0 = Math.min(Math.floor(sx), W - 1);
      const y1 = Math.min(y0 + 1, H - 1), x1 = Math.min(x0 + 1, W - 1), ly = sy - y0, lx = sx - x0;
      const p = (y: number, x: number) => pixels[(c * H + y) * W + x];
      return (1 - ly) * ((1 - lx) * p(y0, x0) + lx * p(y0, x1)) +
        ly * ((1 - lx) * p(y1, x0) + lx * p(y1, x1));
    };
    for (const preprocess of ["nvlabs", "pytorch-fid"] as const) {
      const net = new InceptionV3({ device, preprocess });
      const x = net.preprocess(images);
      if (x.shape.join() !== "1,3,299,299") throw new Error(`${preprocess}: shape [${x.shape}]`);
      const got = await x.toFloat64Array();
      x.dispose();
      net.dispose();
      const want = new Float64Array(3 * 299 * 299);
      for (let c = 0; c < 3; c++) {
        for (let oy = 0; oy < 299; oy++) {
          for (let ox = 0; ox < 299; ox++) {
            const v = preprocess === "nvlabs"
              ? (sample(c, (oy * H) / 299, (ox * W) / 299) - 128) / 128
              : sample(c, Math.max((oy + 0.5) * H / 299 - 0.5, 0), Math.max((ox + 0.5) * W / 299 - 0.5, 0)) /
                  127.5 - 1;
            want[(c * 299 + oy) * 299 + ox] = v;
          }
        }
      }
      assertClose(got, want, { rtol: 0, atol: 2e-5 }, preprocess);
    }
    images.dispose();
    await assertRejects(
      () => new InceptionV3({ device }).preprocess(tensor([1, 2, 3, 4], [1, 1, 2, 2], { device })),
      "[N, 3, H, W]",
    );
    await assertRejects(() => new InceptionV3({ device, preprocess: "tf" as "nvlabs" }), "preprocess");
  },
);

gpuTest("loader: a safetensors file with PyTorch names round-trips; ignorable keys are skipped", async () => {
  const device = await gpuDevice();
  const dir = await Deno.makeTempDir();
  const target = new InceptionV3({ device });
  try {
    const W = randomWeights(target, 11);
    // What a converted torchvision/pytorch-fid checkpoint may also hold.
    const fcWeight = Float32Array.from({ length: 2048 * 1008 }, (_, i) => (i % 97) / 97);
    const extra: Weights = {
      "Conv2d_1a_3x3.bn.num_batches_tracked": { shape: [1], data: Float32Array.of(7) },
      "fc.weight": { shape: [1008, 2048], data: fcWeight },
      "fc.bias": { shape: [1008], data: new Float32Array(1008).fill(0.5) },
      "AuxLogits.fc.bias": { shape: [1000], data: new Float32Array(1000) },
    };
    await Deno.writeFile(`${dir}/inception.safetensors`, encodeSafetensors({ ...W, ...extra }));
    await Deno.writeFile(`${dir}/nofc.safetensors`, encodeSafetensors(W));
    const net = await InceptionV3.load(`${dir}/inception.safetensors`, { device, fc: true });
    try {
      const state = net.stateDict();
      if (Object.keys(state).length !== Object.keys(W).length + 2) throw new Error("state dict size");
      // Every tensor of the first and last layers, the classifier, and a spread of the others.
      const names = Object.keys(state).filter((k, i) =>
        k.startsWith("Conv2d_1a_3x3.") || k.startsWith("Mixed_7c.branch_pool.") || k.startsWith("fc.") ||
        i % 37 === 0
      );
      for (const name of names) {
        assertClose(await state[name].toArray(), (W[name] ?? extra[name]).data, { rtol: 0, atol: 0 }, name);
      }
    } finally {
      net.dispose();
    }
    // Without fc weights in the file, an fc network names them; without fc the file loads.
    await assertRejects(
      () => InceptionV3.load(`${dir}/nofc.safetensors`, { device, fc: true }),
      "nofc.safetensors",
      '"fc.weight"',
      '"fc.bias"',
      "missing",
    );
    (await InceptionV3.load(`${dir}/nofc.safetensors`, { device })).dispose();
    // Missing, unexpected and mis-shaped tensors are named; nothing is copied when anything is wrong.
    const state: Record<string, Tensor> = { ...target.stateDict() };
    delete state["Mixed_6c.branch7x7dbl_4.conv.weight"];
    state["Mixed_9z.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"];
    await assertRejects(
      () => target.loadWeights(state),
      '"Mixed_6c.branch7x7dbl_4.conv.weight"',
      "missing",
      '"Mixed_9z.conv.weight"',
      "unexpected",
    );
    const bad = tensor(new Float32Array(191), [191], { device });
    await assertRejects(
      () => target.loadWeights({ ...target.stateDict(), "Mixed_7c.branch_pool.bn.running_var": bad }),
      '"Mixed_7c.branch_pool.bn.running_var"',
      "[191]",
      "[192]",
    );
    bad.dispose();
    await assertRejects(
      () => InceptionV3.load(`${dir}/absent.safetensors`, { device }),
      "absent.safetensors",
    );
  } finally {
    target.dispose();
    await Deno.remove(dir, { recursive: true });
  }
});

gpuTest("logits need the fc layer; features are [N, 2048] for a batch", async () => {
  const device = await gpuDevice();
  const net = await network();
  const images = tensor(new Float32Array(2 * 3 * 75 * 75).fill(100), [2, 3, 75, 75], { device });
  const f = net.features(images);
  if (f.shape.join() !== "2,2048") throw new Error(`batch features [${f.shape}]`);
  const v = await f.toArray();
  // Two identical images give identical features.
  assertClose(v.subarray(2048), v.subarray(0, 2048), { rtol: 0, atol: 0 }, "batch rows");
  f.dispose();
  images.dispose();
  await assertRejects(() => net.logits(images), "fc");
});
