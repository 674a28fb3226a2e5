/**
 * @file Reverse-mode differentiation over the tape that `record` builds.
 *
 * `backward(root, cotangent)` orders the graph topologically, then walks it in reverse: each node's
 * vector-Jacobian product turns its output gradient into input gradients, which are summed where a tensor
 * feeds several ops. Leaves that require grad accumulate into `.grad` (kept out of any scope); intermediate
 * gradients are disposed as soon as they are used; each node is freed after it runs, so a second backward
 * through the same graph is an error, as in PyTorch.
 */

import { bin, cst, inp } from "../kernels/elementwise.ts";
import { fmt, sameShape } from "./shape.ts";
import { type GradNode, installBackward, keep, noGrad, Tensor } from "./tensor.ts";
import { map, view } from "./ops/core.ts";

const FREED: GradNode = {
  op: "freed",
  inputs: [],
  vjp: () => {
    throw new Error("backward through a graph that was already freed by an earlier backward()");
  },
};

/** Tensors reachable from `root` through tape nodes, inputs before the ops that use them. */
function topoOrder(root: Tensor): Tensor[] {
  const order: Tensor[] = [];
  const seen = new Set<Tensor>();
  const stack: [Tensor, number][] = [[root, 0]];
  seen.add(root);
  while (stack.length) {
    const top = stack[stack.length - 1];
    const [t, i] = top;
    const inputs = t.node?.inputs ?? [];
    if (i < inputs.length) {
      top[1]++;
      const c = inputs[i];
      if (c.requiresGrad && !seen.has(c)) {
        seen.add(c);
        stack.push([c, 0]);
      }
    } else {
      stack.pop();
      order.push(t);
    }
  }
  return order;
}

export function backward(root: Tensor, cotangent?: Tensor): void {
  if (!root.requiresGrad) {
    throw new Error(
      "backward: this tensor does not require grad (no input had requiresGrad, or it was made under noGrad)",
    );
  }
  if (root.node === FREED) FREED.vjp(root);
  if (cotangent && !sameShape(cotangent.shape, root.shape)) {
    throw new Error(
      `backward: cotangent shape ${fmt(cotangent.shape)} does not match output shape ${fmt(root.shape)}`,
    );
  }
  noGrad(() => {
    const grads = new Map<Tensor, Tensor>();
    grads.set(
      root,
      cotangent
        ? view(cotangent, cotangent.shape)
        : map(cst(0), [], [1], { shape: root.shape, device: root.device }),
    );
    const order = topoOrder(root);
    for (let k = order.length - 1; k >= 0; k--) {
      const t = order[k];
      const g = grads.get(t);
      if (!g) continue;
      grads.delete(t);
      if (!t.node) {
        accumulateLeaf(t, g);
        continue;
      }
      const node = t.node;
      if (node === FREED) FREED.vjp(g);
      for (const x of node.inputs) {
        if (x.disposed) {
          throw new Error(`backward: an input of "${node.op}" (shape ${fmt(x.shape)}) was disposed`);
        }
      }
      const gs = node.vjp(g);
      if (gs.length !== node.inputs.length) {
        throw new Error(
          `backward: "${node.op}" returned ${gs.length} gradients for ${node.inputs.length} inputs`,
        );
      }
      const taken = new Set<Tensor>([g]);
      gs.forEach((gi, i) => {
        const x = node.inputs[i];
        if (!gi || !x.requiresGrad) {
          if (gi && !taken.has(gi)) gi.dispose();
          return;
        }
        if (!sameShape(gi.shape, x.shape)) {
          throw new Error(
            `backward: "${node.op}" gave a gradient of shape ${fmt(gi.shape)} for input ${fmt(x.shape)}`,
          );
        }
        // A gradient object may be returned twice (or be g itself): give each use its own reference.
        if (taken.has(gi)) gi = view(gi, gi.shape);
        taken.add(gi);
        const prev = grads.get(x);
        if (prev) {
          grads.set(x, map(bin("add", inp(0), inp(1)), [prev, gi]));
          prev.dispose();
          gi.dispose();
        } else grads.set(x, gi);
      });
      g.dispose();
      t.node = FREED;
    }
  });
}

function accumulateLeaf(t: Tensor, g: Tensor) {
  if (!t.grad) {
    t.grad = keep(g);
    return;
  }
  const sum = map(bin("add", inp(0), inp(1)), [t.grad, g]);
  t.grad.dispose();
  g.dispose();
  t.grad = keep(sum);
}

installBackward(backward);
