/**
 * @file Autograd semantics (accumulation, fan-out, noGrad, freed graphs, cotangents, disposed inputs), memory
 * (scopes, dispose, a 1000-step loop leaves the pool bounded, batching keeps syncs to the reads), and devices
 * (probes, the CPU backend chosen explicitly, clear errors).
 */

import { Device } from "../engine/device.ts";
import { full, ones, tensor, zeros } from "../engine/creation.ts";
import { add, exp, mul, sub, tanh } from "../engine/ops/elementwise.ts";
import { mean, sum } from "../engine/ops/reduce.ts";
import { mseLoss } from "../engine/ops/loss.ts";
import { discard, forwardScope, keep, noGrad, scope, type Tensor } from "../engine/tensor.ts";
import {
  assertClose,
  assertRejects,
  assertThrows,
  cpuDevice,
  gpuDevice,
  gpuTest,
  gradCheck,
  seededValues,
  test,
} from "./util.ts";

gpuTest("a tensor used twice receives the sum of both gradients", async () => {
  const device = await gpuDevice();
  const x = tensor([1, 2, 3], [3], { device, requiresGrad: true });
  sum(add(mul(x, x), x)).backward(); // d/dx (x² + x) = 2x + 1
  assertClose(await x.grad!.toArray(), [3, 5, 7]);
});

gpuTest(".grad accumulates across backward calls until reset", async () => {
  const device = await gpuDevice();
  const x = tensor([1, 2], [2], { device, requiresGrad: true });
  sum(mul(x, 3)).backward();
  sum(mul(x, 3)).backward();
  assertClose(await x.grad!.toArray(), [6, 6]);
});

test("noGrad records nothing; requiresGrad flows only from leaves that ask", async () => {
  const device = await cpuDevice();
  const x = tensor([1, 2], [2], { device, requiresGrad: true });
  const c = tensor([1, 1], [2], { device });
  const y = noGrad(() => mul(x, 2));
  if (y.requiresGrad || y.node) throw new Error("noGrad output recorded a tape node");
  if (add(c, 1).requiresGrad) throw new Error("constant-only op requires grad");
  assertThrows(() => sum(c).backward(), "does not require grad");
});

test("backward twice through the same graph is an error", async () => {
  const device = await cpuDevice();
  const x = tensor([1, 2], [2], { device, requiresGrad: true });
  const y = sum(exp(x));
  y.backward();
  assertThrows(() => y.backward(), "already freed");
});

gpuTest("a cotangent gives the vector-Jacobian product and must match the output shape", async () => {
  const device = await gpuDevice();
  const x = tensor([0.5, -1], [2], { device, requiresGrad: true });
  const y = tanh(x);
  y.backward(tensor([2, 3], [2], { device }));
  const t = [Math.tanh(0.5), Math.tanh(-1)];
  assertClose(await x.grad!.toArray(), [2 * (1 - t[0] ** 2), 3 * (1 - t[1] ** 2)], { rtol: 1e-5 });
  const z = tanh(x);
  assertThrows(() => z.backward(ones([3], { device })), "[3]", "[2]");
});

test("using a disposed tensor names the problem", async () => {
  const device = await cpuDevice();
  const x = tensor([1, 2], [2], { device, requiresGrad: true });
  const h = exp(x);
  const y = sum(mul(h, h));
  h.dispose();
  assertThrows(() => y.backward(), "disposed");
  assertThrows(() => exp(h), "dispose");
});

test("gradient of a composite chain (mse of a tanh network) matches finite differences", async () => {
  const x = { shape: [4, 3], data: seededValues(12, 1) };
  const w = { shape: [3], data: seededValues(3, 2) };
  const t = { shape: [4, 3], data: seededValues(12, 3) };
  await gradCheck((a, b, c) => mseLoss(tanh(mul(a, b)), c), [x, w, t]);
  await gradCheck((a, b) => mean(mul(sub(a, 0.5), exp(b))), [x, w]);
});

gpuTest("scope disposes intermediates, keeps results, kept tensors and leaf gradients", async () => {
  const device = await gpuDevice();
  const base = device.memory().liveBytes;
  const w = tensor(seededValues(256, 1), [256], { device, requiresGrad: true });
  let kept: Tensor | null = null;
  const loss = scope(() => {
    const h = tanh(mul(w, 2));
    kept = keep(exp(h));
    const l = sum(mul(h, h));
    l.backward();
    return l;
  });
  if (loss.disposed || !w.grad || w.grad.disposed || kept!.disposed) {
    throw new Error("scope disposed a survivor");
  }
  // Elementwise results are lazy and hold their inputs until computed: read them so that they own storage.
  await Promise.all([w.grad.toArray(), kept!.toArray(), loss.toArray()]);
  const extra = device.memory().liveBytes - base;
  // w, w.grad, kept, loss: 3·1 KiB + 4 bytes.
  if (extra !== 3 * 1024 + 4) throw new Error(`scope left ${extra} bytes live, expected ${3 * 1024 + 4}`);
  for (const t of [w.grad!, w, kept!, loss]) t.dispose();
  if (device.memory().liveBytes !== base) throw new Error("dispose did not free everything");
});

test("forwardScope: without a tape only the result survives; with one, intermediates live until the enclosing scope and backward works", async () => {
  const device = await cpuDevice();
  const w = tensor([0.5, -1, 2], [3], { device, requiresGrad: true });
  let inner: Tensor[] = [];
  const body = () => {
    const a = exp(w), b = mul(a, 2);
    inner = [a, b];
    return add(b, 1);
  };
  const y = noGrad(() => forwardScope(body));
  if (!inner.every((t) => t.disposed) || y.disposed) {
    throw new Error("noGrad: intermediates outlived the forward");
  }
  assertClose(await y.toArray(), [0.5, -1, 2].map((v) => 2 * Math.exp(v) + 1), { rtol: 1e-6 });
  y.dispose();
  scope(() => {
    const l = sum(forwardScope(body));
    if (inner.some((t) => t.disposed)) throw new Error("a taped forward freed what backward needs");
    l.backward();
  });
  if (!inner.every((t) => t.disposed)) throw new Error("taped intermediates outlived the enclosing scope");
  assertClose(await w.grad!.toArray(), [0.5, -1, 2].map((v) => 2 * Math.exp(v)), { rtol: 1e-6 });
  // A forward that throws hands what it made to the enclosing scope.
  scope(() => {
    assertThrows(() =>
      noGrad(() =>
        forwardScope(() => {
          inner = [exp(w)];
          throw new Error("bad input");
        })
      ), "bad input");
    if (inner[0].disposed) throw new Error("a failed forward freed its tensors early");
  });
  if (!inner[0].disposed) throw new Error("a failed forward's tensors outlived the enclosing scope");
});

test("discard frees only the scope's own untaped tensors", async () => {
  const device = await cpuDevice();
  const x = tensor([1, 2], [2], { device });
  const w = tensor([1, 2], [2], { device, requiresGrad: true });
  noGrad(() =>
    forwardScope(() => {
      const a = exp(x);
      discard(a, x, null);
      if (!a.disposed || x.disposed) {
        throw new Error("noGrad: discard missed its own tensor or took the caller's");
      }
      return null;
    })
  );
  let a: Tensor | null = null;
  scope(() => {
    forwardScope(() => {
      a = exp(w);
      discard(a);
      if (a.disposed) throw new Error("discard freed a tensor the tape holds");
      return mul(a, a);
    });
  });
  if (!a!.disposed) throw new Error("the taped tensor outlived the enclosing scope");
  x.dispose();
  w.dispose();
});

gpuTest("1000 training-like steps keep the pool bounded and sync only at reads", async () => {
  // A device of its own: on the shared one, tensors that earlier tests left to the FinalizationRegistry can
  // be freed during the loop and move the live-byte count either way.
  const device = await Device.create({ backend: "webgpu", fallback: false });
  const w = tensor(seededValues(4096, 5), [64, 64], { device, requiresGrad: true });
  const x = tensor(seededValues(4096, 6), [64, 64], { device });
  const startLive = device.memory().liveBytes;
  const startReads = device.counters().reads;
  let peakPool = 0;
  for (let step = 0; step < 1000; step++) {
    scope(() => {
      const loss = mean(mul(tanh(mul(x, w)), 0.5));
      loss.backward();
      noGrad(() => {
        const next = sub(w, mul(w.grad!, 0.01));
        next.dispose();
      });
      w.grad!.dispose();
      w.grad = null;
    });
    peakPool = Math.max(peakPool, device.memory().pooledBytes);
  }
  const probe = zeros([1], { device });
  await probe.toArray(); // one read drains the queue
  probe.dispose();
  const m = device.memory();
  if (m.liveBytes !== startLive) throw new Error(`live bytes grew from ${startLive} to ${m.liveBytes}`);
  if (peakPool > 8 * 2 ** 20) throw new Error(`pool grew to ${peakPool} bytes for a 16 KiB model`);
  if (device.counters().reads - startReads !== 1) throw new Error("the loop read back from the device");
  w.dispose();
  x.dispose();
  device.destroy();
});

gpuTest("disposing twice is harmless; reshape views keep storage alive", async () => {
  const device = await gpuDevice();
  const a = full([4], 2, { device });
  const { reshape } = await import("../engine/ops/shape.ts");
  const v = reshape(a, [2, 2]);
  a.dispose();
  a.dispose();
  assertClose(await v.toArray(), [2, 2, 2, 2]);
  v.dispose();
});

gpuTest("device probes: adapter, api, features, limits; CPU backend on request", async () => {
  const gpu = await gpuDevice();
  const info = gpu.info;
  if (info.backend !== "webgpu" || !info.adapter || !info.limits.maxStorageBufferBindingSize) {
    throw new Error(`incomplete device info: ${JSON.stringify(info)}`);
  }
  const cpu = await Device.create({ backend: "cpu", precision: "float64" });
  if (cpu.info.backend !== "cpu" || cpu.dtype !== "float64") {
    throw new Error("CPU float64 backend not selected");
  }
  await assertRejects(() => Device.create({ backend: "tpu" as "cpu" }), 'unknown backend "tpu"');
  await assertRejects(() => Device.create({ backend: "webgpu", precision: "float64" }), "float32 only");
});

gpuTest("ops across devices are refused with both device kinds named", async () => {
  const a = ones([2], { device: await gpuDevice() }), b = ones([2], { device: await cpuDevice() });
  assertThrows(() => add(a, b), "different devices (webgpu and cpu)");
});
