/**
 * @file Compute and packing pipelines, cached by WGSL source, and the explicit bind-group layouts they use.
 *
 * Sizes travel as uniforms, so a kernel's source depends only on its structure and one pipeline serves every
 * shape. Layouts are explicit and keyed by the binding kinds, one letter per binding: "r" read-only storage
 * buffer, "w" read-write storage buffer, "t" read-only rgba32float storage texture, "s" write-only rgba32float storage texture (the compute packing pass's
 * output), "u" uniform with a dynamic offset (a slot of the uniform ring). Compilation
 * errors arrive asynchronously; they are passed to `onError`, and the backend throws them at its next call.
 */

import type { TextureInput } from "../../kernels/types.ts";
import { packSource } from "../../kernels/wgsl.ts";

/** Binding kinds of the compute packing pass: the flat copy of the input, the uniform block, the output. */
export const PACK_COMPUTE_KINDS = "tus";

/** Binding kinds, one letter per binding (see the file comment). */
export type BindingKinds = string;

/** The kinds of a kernel's bindings: inputs (textures where listed), outputs, then the uniform block. */
export function kindsOf(
  nIn: number,
  nOut: number,
  textures: readonly TextureInput[] | undefined,
): BindingKinds {
  let kinds = "";
  for (let i = 0; i < nIn; i++) kinds += textures?.some((t) => t.input === i) ? "t" : "r";
  return kinds + "w".repeat(nOut) + "u";
}

export class PipelineCache {
  /**
   * Compute pipelines by binding kinds, then by source. Nested rather than keyed by a concatenation: kernels hand
   * over the same (memoized) source string every time, whose hash V8 computes once, while a concatenated key
   * is a new string, up to 80 KB, hashed again on every dispatch.
   */
  readonly #compute = new Map<BindingKinds, Map<string, GPUComputePipeline>>();
  readonly #layouts = new Map<string, { group: GPUBindGroupLayout; pipeline: GPUPipelineLayout }>();
  /** Packing pipelines by the kernel's `texel` function (the packing source is built only on a miss). */
  readonly #render = new Map<string, GPURenderPipeline>();
  /** Pipelines built so far (compute and packing). */
  created = 0;

  constructor(private readonly device: GPUDevice, private readonly onError: (message: string) => void) {}

  layoutFor(
    kinds: BindingKinds,
    visibility: number = GPUShaderStage.COMPUTE,
  ): { group: GPUBindGroupLayout; pipeline: GPUPipelineLayout } {
    const key = `${kinds}:${visibility}`;
    let l = this.#layouts.get(key);
    if (!l) {
      const entries: GPUBindGroupLayoutEntry[] = [...kinds].map((kind, binding) => {
        switch (kind) {
          case "r":
            return { binding, visibility, buffer: { type: "read-only-storage" } };
          case "w":
            return { binding, visibility, buffer: { type: "storage" } };
          case "t":
            return { binding, visibility, storageTexture: { access: "read-only", format: "rgba32float" } };
          case "s":
            return { binding, visibility, storageTexture: { access: "write-only", format: "rgba32float" } };
          default:
            return { binding, visibility, buffer: { type: "uniform", hasDynamicOffset: true } };
        }
      });
      const group = this.device.createBindGroupLayout({ entries });
      l = { group, pipeline: this.device.createPipelineLayout({ bindGroupLayouts: [group] }) };
      this.#layouts.set(key, l);
    }
    return l;
  }

  /** The compute pipeline of a kernel's `source` with bindings of `kinds`. */
  compute(name: string, source: string, kinds: BindingKinds): GPUComputePipeline {
    let bySource = this.#compute.get(kinds);
    if (!bySource) this.#compute.set(kinds, bySource = new Map());
    let p = bySource.get(source);
    if (!p) {
      const layout = this.layoutFor(kinds).pipeline;
      this.device.pushErrorScope("validation");
      const module = this.device.createShaderModule({ code: source, label: name });
      p = this.device.createComputePipeline({ layout, compute: { module, entryPoint: "main" }, label: name });
      this.device.popErrorScope().then((e) => {
        if (e) this.onError(`kernel "${name}" failed to compile: ${e.message}\n--- source ---\n${source}`);
      });
      bySource.set(source, p);
      this.created++;
    }
    return p;
  }

  /**
   * The compute form of the packing pipeline (for adapters that cannot render to rgba32float), cached with the
   * compute pipelines under its own binding kinds.
   */
  packCompute(name: string, texelFn: string): GPUComputePipeline {
    const cached = this.#compute.get(PACK_COMPUTE_KINDS)?.get(texelFn);
    if (cached) return cached;
    const p = this.compute(`${name} (pack)`, packSource(texelFn, "compute"), PACK_COMPUTE_KINDS);
    // Keyed by the texel function as well, so that a hit does not build the source again.
    this.#compute.get(PACK_COMPUTE_KINDS)!.set(texelFn, p);
    return p;
  }

  /** The packing pipeline (see `packSource` in kernels/wgsl.ts) of a kernel's `texel` function. */
  render(name: string, texelFn: string): GPURenderPipeline {
    let p = this.#render.get(texelFn);
    if (!p) {
      const source = packSource(texelFn);
      const layout = this.layoutFor("tu", GPUShaderStage.FRAGMENT).pipeline;
      this.device.pushErrorScope("validation");
      const module = this.device.createShaderModule({ code: source, label: name });
      p = this.device.createRenderPipeline({
        layout,
        vertex: { module, entryPoint: "vs" },
        fragment: { module, entryPoint: "fs", targets: [{ format: "rgba32float" }] },
        primitive: { topology: "triangle-list" },
        label: name,
      });
      this.device.popErrorScope().then((e) => {
        if (e) {
          this.onError(`packing pass "${name}" failed to compile: ${e.message}\n--- source ---\n${source}`);
        }
      });
      this.#render.set(texelFn, p);
      this.created++;
    }
    return p;
  }
}
