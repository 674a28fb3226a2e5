/**
 * @file DDSM's step-aware network (Yang et al. 2023, §3.3): the slimmable UNet (models/unet.ts) run at the width
 * a `WidthSchedule` (models/slimmable.ts) assigns to each denoising step.
 */

import { type Device, nn, type Tensor } from "../engine/mod.ts";
import { parseWidthSchedule, type StepPosition, widthAt, type WidthSchedule } from "./slimmable.ts";
import type { UNet, UNetForwardOptions } from "./unet.ts";

/**
 * DDSM's step-aware network: the slimmable UNet with a width per step (DDSM §3.3, `StepAwareUNet` in the
 * authors' code). The wrapped network is registered as `net`, so the state dict is the supernet's with a `net.`
 * prefix.
 */
export class StepAwareUNet extends nn.Module {
  readonly net: UNet;
  readonly schedule: WidthSchedule;

  constructor(net: UNet, schedule: WidthSchedule | unknown) {
    super();
    this.net = this.registerModule("net", net);
    this.schedule = parseWidthSchedule(schedule);
  }

  get device(): Device {
    return this.net.device;
  }

  /** The width this network runs at for a step at `at`. */
  widthAt(at: StepPosition): number {
    return widthAt(this.schedule, at);
  }

  /** F(x; cNoise, labels) at the width scheduled for `at` (all samples in the batch share the step). */
  forward(
    x: Tensor,
    cNoise: Tensor,
    classLabels: Tensor | null | undefined,
    at: StepPosition,
    opts: Omit<UNetForwardOptions, "width"> = {},
  ): Tensor {
    return this.net.forward(x, cNoise, classLabels, { ...opts, width: this.widthAt(at) });
  }
}
