/**
 * @file Tests of the proxy-FID machinery (eval/proxy.ts) and `deno task eval` (eval/evaluate.ts): Spearman's ρ
 * with ties against hand-computed values, metric names that carry the sample count, streamed statistics equal
 * to statistics of the same features computed at once, 8-bit quantization, latents that do not depend on the
 * batching, cached reference statistics validated (a damaged file is recomputed with a warning), and an end-to-end evaluation of a micro run's checkpoints (results saved, reused when the settings
 * match and recomputed when they do not, the rank correlation reported for three checkpoints).
 */

import { ok as assert } from "node:assert";
import { type Device, mean } from "../engine/mod.ts";
import { ProceduralShapes } from "../models/data.ts";
import { seededLatents } from "../models/generate.ts";
import { train, type TrainConfigInput } from "../models/train.ts";
import { FeatureStatistics } from "../eval/fid.ts";
import { type FeatureExtractor, quantize } from "../eval/features.ts";
import { averageRanks, datasetStatistics, metricName, referenceStatistics, spearman } from "../eval/proxy.ts";
import { type EvalEvent, evaluate } from "../eval/evaluate.ts";
import {
  assertClose,
  assertEquals,
  assertThrows,
  cpuDevice,
  gpuDevice,
  gpuTest,
  MICRO_TRAINING,
  readAll,
  test,
} from "./util.ts";

test("averageRanks gives ties their mean rank; spearman matches hand-computed values", () => {
  assertEquals(averageRanks([10, 20, 20, 5]), [2, 3.5, 3.5, 1]);
  assertEquals(spearman([1, 2, 3, 4], [10, 20, 30, 40]), 1);
  assertEquals(spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1);
  // Monotone but nonlinear: still 1 (ranks, not values).
  assertEquals(spearman([1, 2, 3, 4, 5], [1, 8, 27, 64, 125]), 1);
  // With ties: ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4]; ρ = Σ(da·db)/√(Σda²·Σdb²) = 4.5/√(4.5·5).
  assertClose([spearman([1, 2, 2, 3], [1, 2, 3, 4])], [4.5 / Math.sqrt(4.5 * 5)], { rtol: 1e-15 });
  // One swap among five: 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/120 = 0.9.
  assertClose([spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5])], [0.9], { rtol: 1e-15 });
  assert(Number.isNaN(spearman([1, 1, 1], [1, 2, 3])), "a constant list has no rank correlation");
  assertThrows(() => spearman([1, 2], [1]), "lists of 2 and 1");
  assertThrows(() => spearman([1, NaN], [1, 2]), "not finite");
  assertEquals(metricName("RFID", 256), "RFID-256");
  assertEquals(metricName("FID", 2048), "FID-2048");
});

test("quantize maps [−1, 1] to the 8-bit values NVlabs stores, clamping outside", () => {
  assertEquals(Array.from(quantize(Float32Array.from([-1, -2, 1, 3, 0, 0.999]))), [0, 0, 255, 255, 128, 255]);
  // Every byte survives the datasets' b/127.5 − 1 in float32 and back.
  const bytes = Array.from({ length: 256 }, (_, b) => b);
  assertEquals(Array.from(quantize(Float32Array.from(bytes, (b) => b / 127.5 - 1))), bytes);
});

/** A feature network whose features are the channel means: exact and fast, for the streaming tests. */
function channelMeans(device: Device): FeatureExtractor {
  return {
    name: "channel-means",
    dim: 3,
    fingerprint: "test",
    device,
    features: (x) => mean(x, [2, 3]),
    dispose: () => {},
  };
}

gpuTest(
  "datasetStatistics streams batches into the same statistics as one pass over all features",
  async () => {
    const device = await gpuDevice();
    const ds = new ProceduralShapes({ resolution: 8, length: 37, seed: 3 });
    const ex = channelMeans(device);
    const streamed = await datasetStatistics(ds, ex, 37, { batch: 10, keepFeatures: true });
    // The same features on the host: means of the quantized pixels.
    const host = new Float64Array(37 * 3);
    for (let i = 0; i < 37; i++) {
      const q = quantize(ds.get(i).image);
      for (let c = 0; c < 3; c++) {
        let s = 0;
        for (let k = 0; k < 64; k++) s += q[c * 64 + k];
        host[i * 3 + c] = s / 64;
      }
    }
    const once = new FeatureStatistics(3).add(host).statistics();
    assertClose(streamed.features!, host, { rtol: 1e-6 });
    assertClose(streamed.stats.mu, once.mu, { rtol: 1e-6 });
    assertClose(streamed.stats.sigma, once.sigma, { rtol: 1e-4, atol: 1e-3 });
    assertEquals(streamed.stats.count, 37);
  },
);

test("cached reference statistics: a truncated or altered file is recomputed with a warning; recompute skips it", async () => {
  const device = await cpuDevice();
  const ds = new ProceduralShapes({ resolution: 8, length: 20, seed: 3 });
  const ex = channelMeans(device);
  const cacheDir = await Deno.makeTempDir({ prefix: "proxy_cache_" });
  try {
    const warnings: string[] = [];
    const ref = () => referenceStatistics(ds, ex, 20, { cacheDir, onWarning: (m) => warnings.push(m) });
    const first = await ref();
    assertEquals([first.cached, (await ref()).cached, warnings], [false, true, []]);
    const path = first.path!;
    const good = await Deno.readFile(path);
    // Truncated (a crash or a full disk while copying the cache).
    await Deno.writeFile(path, good.subarray(0, good.length - 20));
    const again = await ref();
    assertEquals(again.cached, false);
    assertEquals(warnings.length, 1);
    assert(warnings[0].includes(path) && warnings[0].includes("recomputing"), warnings[0]);
    assertClose(again.stats.mu, first.stats.mu, { rtol: 0 });
    assertEquals((await ref()).cached, true, "the bad file was replaced");
    // The same size, one data byte changed: the checksum finds it.
    const altered = good.slice();
    altered[altered.length - 3] ^= 0x40;
    await Deno.writeFile(path, altered);
    assertEquals((await ref()).cached, false);
    assert(warnings[1]?.includes("checksum"), warnings[1]);
    // recompute (eval --force) ignores a good cache file.
    const forced = await referenceStatistics(ds, ex, 20, { cacheDir, recompute: true });
    assertEquals([forced.cached, warnings.length], [false, 2]);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
});

gpuTest("seeded latents: image i is the same whatever the batch it is drawn in", async () => {
  const device = await gpuDevice();
  const draw = (seed: number, start: number, count: number, shape: [number, number, number]) =>
    readAll([seededLatents(device, seed, start, count, shape)]).then(([v]) => v);
  const all = await draw(7, 0, 5, [3, 4, 4]);
  const part = await draw(7, 2, 3, [3, 4, 4]);
  assertEquals(Array.from(part), Array.from(all.subarray(2 * 48)));
  // An odd image size (3·3·3 = 27 values) draws image by image on block boundaries.
  const odd = await draw(7, 0, 3, [3, 3, 3]);
  const oddPart = await draw(7, 1, 2, [3, 3, 3]);
  assertEquals(Array.from(oddPart), Array.from(odd.subarray(27)));
  const other = await draw(8, 0, 1, [3, 4, 4]);
  assert(other.some((v, i) => v !== all[i]), "another seed gives other latents");
});

/** A micro UNet (8×8) trained for a few steps with a checkpoint every 16 images. */
const MICRO_RUN: TrainConfigInput = {
  ...MICRO_TRAINING,
  kimg: 0.048,
  checkpointKimg: 0.016,
  keepCheckpoints: 10,
};

gpuTest(
  "deno task eval: cost, latency, FID and RFID per checkpoint; saved, reused, rank correlation",
  async () => {
    const device = await gpuDevice();
    const run = await Deno.makeTempDir({ prefix: "eval_test_" });
    try {
      await train({ ...MICRO_RUN, out: run }, { device });
      const settings = {
        runs: [run],
        allCheckpoints: true,
        n: 24,
        steps: 3,
        proxyN: 8,
        proxySteps: 2,
        refN: 32,
        batch: 16,
        cacheDir: `${run}/cache`,
      };
      const events: EvalEvent[] = [];
      const report = await evaluate(settings, { device, onEvent: (e) => events.push(e) });
      assertEquals(events.filter((e) => e.type === "checkpoint").length, 3);
      assert(events.some((e) => e.type === "metric" && e.name === "FID-24" && e.done === 24));
      assertEquals(report.checkpoints.length, 3);
      assertEquals(report.features.name, "shapes-net");
      assertEquals(report.reference.n, 32);
      assertEquals(report.reference.cached, false);
      for (const r of report.checkpoints) {
        assertEquals(r.fid!.name, "FID-24");
        assertEquals(r.rfid!.name, "RFID-8");
        assertEquals(r.fid!.nfe, 5);
        assertEquals(r.rfid!.nfe, 3);
        assert(r.fid!.value > 0 && Number.isFinite(r.fid!.value), `FID ${r.fid!.value}`);
        assert(r.rfid!.value > 0 && Number.isFinite(r.rfid!.value), `RFID ${r.rfid!.value}`);
        assert(r.latency!.medianMs > 0);
        assert(r.cost.parameters > 40000 && r.cost.macs > 0 && r.cost.breakdown.attention > 0);
        assertEquals(r.reused, 0);
        await Deno.stat(`${run}/eval/${r.checkpoint.split("/").pop()}.json`);
      }
      const rc = report.rankCorrelation!;
      assertEquals(rc.count, 3);
      assert(rc.rho >= -1 && rc.rho <= 1, `ρ = ${rc.rho}`);
      // The checkpoints differ, so their FIDs do.
      assert(new Set(report.checkpoints.map((r) => r.fid!.value)).size === 3, "three different FIDs");

      // Same settings: all three measurements are read back, the reference comes from the cache.
      const second = await evaluate(settings, { device });
      assertEquals(second.checkpoints.map((r) => r.reused), [3, 3, 3]);
      assertEquals(second.reference.cached, true);
      assertEquals(second.checkpoints.map((r) => r.fid!.value), report.checkpoints.map((r) => r.fid!.value));

      // Another proxy protocol: the full FID is reused, the new RFID measured (and it differs).
      const third = await evaluate({ ...settings, allCheckpoints: false, latency: false, proxySteps: 3 }, {
        device,
      });
      assertEquals(third.checkpoints[0].reused, 1);
      assertEquals(third.checkpoints[0].fid!.value, report.checkpoints[2].fid!.value);
      assert(third.checkpoints[0].rfid!.value !== report.checkpoints[2].rfid!.value);
      // `force` measures everything again.
      const forced = await evaluate({ ...settings, allCheckpoints: false, force: true }, { device });
      assertEquals(forced.checkpoints[0].reused, 0);
      // KID comes from the full metric's own samples: the FID beside it is the same number.
      const kid = await evaluate({ ...settings, allCheckpoints: false, latency: false, kid: true }, {
        device,
      });
      const k = kid.checkpoints[0];
      assertEquals(k.kid!.name, "KID-24");
      assert(Number.isFinite(k.kid!.mean) && k.kid!.std >= 0, `KID ${k.kid!.mean} ± ${k.kid!.std}`);
      assertEquals(k.fid!.value, report.checkpoints[2].fid!.value);
    } finally {
      await Deno.remove(run, { recursive: true });
    }
  },
);

gpuTest("deno task eval: errors name the problem", async () => {
  const device = await gpuDevice();
  const empty = await Deno.makeTempDir({ prefix: "eval_test_" });
  try {
    await evaluate({ runs: [empty] }, { device }).then(
      () => assert(false, "expected an error"),
      (e) => assert(/has no checkpoint/.test((e as Error).message), (e as Error).message),
    );
    await evaluate({ runs: [empty], n: 1 }, { device }).then(
      () => assert(false, "expected an error"),
      (e) => assert(/eval: n:/.test((e as Error).message), (e as Error).message),
    );
  } finally {
    await Deno.remove(empty, { recursive: true });
  }
});
