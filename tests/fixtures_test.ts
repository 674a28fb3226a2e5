/**
 * @file PyTorch golden values: every file in `../shared/fixtures/torch-ops/` is run through the same op on the
 * WebGPU and the CPU backend, and the output and the gradient of sum(output · cotangent) with respect to each
 * input must meet the file's tolerance. A fixture whose op is not mapped here fails, so new fixtures cannot be
 * skipped silently.
 */

import * as T from "../engine/mod.ts";
import type { Device, Tensor } from "../engine/mod.ts";
import { assertClose, cpuDevice, gpuDevice, gpuTest, test } from "./util.ts";

interface Fixture {
  op: string;
  params: Record<string, unknown>;
  inputs: { name: string; shape: number[]; data: number[] }[];
  output: { shape: number[]; data: number[] };
  cotangent?: { shape: number[]; data: number[] } | number[];
  grads?: ({ shape: number[]; data: number[] } | number[] | null)[];
  tol: { rtol: number; atol: number };
}

const FIXTURES = new URL("../../shared/fixtures/torch-ops/", import.meta.url);

type Run = (xs: Tensor[], p: Record<string, unknown>) => Tensor;
const num = (v: unknown) => v as number;

const UNARY: Record<string, (x: Tensor) => Tensor> = {
  abs: T.abs,
  cos: T.cos,
  exp: T.exp,
  gelu: T.gelu,
  log: T.log,
  neg: T.neg,
  relu: T.relu,
  rsqrt: T.rsqrt,
  sigmoid: T.sigmoid,
  silu: T.silu,
  sin: T.sin,
  sqrt: T.sqrt,
  tanh: T.tanh,
};

const OPS: Record<string, Run> = {
  ...Object.fromEntries(Object.entries(UNARY).map(([k, f]) => [k, ([x]: Tensor[]) => f(x)])),
  add: ([a, b]) => T.add(a, b),
  sub: ([a, b]) => T.sub(a, b),
  mul: ([a, b]) => T.mul(a, b),
  div: ([a, b]) => T.div(a, b),
  pow: ([a], p) => T.pow(a, num(p.exponent)),
  sum: ([a], p) => T.sum(a, p.dim as number[], p.keepdim as boolean),
  mean: ([a], p) => T.mean(a, p.dim as number[], p.keepdim as boolean),
  amax: ([a], p) => T.amax(a, p.dim as number[], p.keepdim as boolean),
  softmax: ([a], p) => T.softmax(a, num(p.dim)),
  log_softmax: ([a], p) => T.logSoftmax(a, num(p.dim)),
  matmul: ([a, b]) => T.matmul(a, b),
  linear: ([x, w, b]) => T.linear(x, w, b),
  conv2d: ([x, w, b], p) => T.conv2d(x, w, b, { stride: num(p.stride), padding: num(p.padding) }),
  conv_transpose2d: ([x, w, b], p) =>
    T.convTranspose2d(x, w, b, {
      stride: num(p.stride),
      padding: num(p.padding),
      outputPadding: num(p.output_padding ?? 0),
    }),
  group_norm: ([x, w, b], p) => T.groupNorm(x, num(p.num_groups), w, b, num(p.eps)),
  layer_norm: ([x, w, b], p) => T.layerNorm(x, p.normalized_shape as number[], w, b, num(p.eps)),
  avg_pool2d: ([x], p) =>
    T.avgPool2d(x, num(p.kernel_size), num(p.stride ?? p.kernel_size), num(p.padding ?? 0)),
  interpolate_nearest: ([x], p) => T.interpolateNearest(x, num(p.scale_factor)),
  cat: (xs, p) => T.cat(xs, num(p.dim)),
  permute: ([x], p) => T.permute(x, p.dims as number[]),
  narrow: ([x], p) => T.narrow(x, num(p.dim), num(p.start), num(p.length)),
  scaled_dot_product_attention: ([q, k, v]) => T.scaledDotProductAttention(q, k, v),
  mse_loss: ([a, b], p) => T.mseLoss(a, b, (p.reduction ?? "mean") as T.Reduction),
};

const dataOf = (v: { data: number[] } | number[]) => (Array.isArray(v) ? v : v.data);

async function check(f: Fixture, file: string, device: Device) {
  const run = OPS[f.op];
  if (!run) throw new Error(`${file}: op "${f.op}" has no mapping in fixtures_test.ts`);
  const xs = f.inputs.map((x) => T.tensor(x.data, x.shape, { device, requiresGrad: true }));
  const y = run(xs, f.params);
  if (y.shape.join() !== f.output.shape.join()) {
    throw new Error(`${file}: output shape [${y.shape}], PyTorch gives [${f.output.shape}]`);
  }
  assertClose(await y.toArray(), f.output.data, f.tol, `${file} (${device.kind}) output`);
  if (f.grads && f.cotangent) {
    y.backward(T.tensor(dataOf(f.cotangent), y.shape, { device }));
    for (let i = 0; i < xs.length; i++) {
      const want = f.grads[i];
      if (!want) continue;
      const got = xs[i].grad;
      if (!got) throw new Error(`${file}: input "${f.inputs[i].name}" got no gradient`);
      assertClose(
        await got.toArray(),
        dataOf(want),
        f.tol,
        `${file} (${device.kind}) grad of ${f.inputs[i].name}`,
      );
    }
  }
}

const files = [...Deno.readDirSync(FIXTURES)].filter((e) => e.name.endsWith(".json")).map((e) => e.name)
  .sort();

test("the golden fixture folder is present and non-empty", () => {
  if (files.length < 10) throw new Error(`only ${files.length} fixtures found in ${FIXTURES.pathname}`);
});

for (const file of files) {
  gpuTest(`fixture ${file} matches PyTorch on WebGPU and CPU`, async () => {
    const f = JSON.parse(await Deno.readTextFile(new URL(file, FIXTURES))) as Fixture;
    await check(f, file, await gpuDevice());
    await check(f, file, await cpuDevice());
  });
}
