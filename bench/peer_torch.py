"""
@file The PyTorch CPU peer of the bench's training steps (bench/peer_torch.ts spawns it): the same UNet as
models/unet.ts (EDM's SongUNet / DhariwalUNet blocks, written here in PyTorch), the same EDM
preconditioning and loss, torch.optim.Adam with the same hyper-parameters, and optionally EDM's EMA, at the
same batch, fed one-hot class labels of random classes when the network is class-conditional (as the
Trainer feeds ours from its labelled data). Only the layout (encoder/decoder entries with their channels, heads and resampling, from
models/unet.ts `unetLayout`) and the spec come from the TypeScript side, so both build the same network; the
parameter counts are compared before anything is timed.

Protocol (one JSON object per line): argv[1] is the workload as JSON; the process answers
{"ready": true, "params": N} after one warm-up step, then for each line {"run": K} runs K training steps and
answers {"ms": wall ms of the K steps, "cpu_ms": this process's CPU ms, "rss_peak_mib": peak RSS}; EOF ends it.
"""

import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def norm_groups(channels, groups, min_per_group):
    """EDM's group count lowered to a divisor of the channels (models/unet_blocks.ts normGroups)."""
    g = max(1, min(groups, channels // min_per_group))
    for k in range(min(g, channels), 1, -1):
        if channels % k == 0:
            return k
    return 1


def weight_init(shape, mode, fan_in, fan_out, scale):
    """EDM's weight_init (networks.py), times `scale`; zeros when scale is 0."""
    if scale == 0:
        return torch.zeros(shape)
    if mode == "xavier_uniform":
        b = scale * math.sqrt(6 / (fan_in + fan_out))
        return (torch.rand(shape) * 2 - 1) * b
    if mode == "kaiming_uniform":
        b = scale * math.sqrt(3 / fan_in)
        return (torch.rand(shape) * 2 - 1) * b
    raise ValueError(f"init mode {mode}")


class Conv(nn.Module):
    def __init__(self, cin, cout, k, init, bias=True):
        super().__init__()
        mode, w, b = init
        self.weight = nn.Parameter(weight_init([cout, cin, k, k], mode, cin * k * k, cout * k * k, w))
        self.bias = nn.Parameter(weight_init([cout], mode, cin * k * k, cout * k * k, b)) if bias else None
        self.pad = k // 2

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=self.pad)


class Linear(nn.Module):
    def __init__(self, fin, fout, init):
        super().__init__()
        mode, w, b = init
        self.weight = nn.Parameter(weight_init([fout, fin], mode, fin, fout, w))
        self.bias = nn.Parameter(weight_init([fout], mode, fin, fout, b))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class GroupNorm(nn.Module):
    def __init__(self, c, spec):
        super().__init__()
        self.groups = norm_groups(c, spec["normGroups"], spec["normMinChannelsPerGroup"])
        self.eps = spec["normEps"]
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class UNetBlock(nn.Module):
    """EDM's UNetBlock (models/unet_blocks.ts UNetBlock), parameters in the same order."""

    def __init__(self, e, spec, emb_c, inits):
        super().__init__()
        cin, cout = e["inChannels"], e["outChannels"]
        self.up, self.down, self.heads = e["up"], e["down"], e["heads"]
        self.adaptive = spec["adaptiveScale"]
        self.skip_scale = spec["skipScale"]
        self.dropout = spec["dropout"]
        self.norm0 = GroupNorm(cin, spec)
        self.conv0 = Conv(cin, cout, 3, inits["init"])
        self.affine = Linear(emb_c, cout * (2 if self.adaptive else 1), inits["init"])
        self.norm1 = GroupNorm(cout, spec)
        self.conv1 = Conv(cout, cout, 3, inits["zero"])
        self.skip = None
        if cout != cin or self.up or self.down:
            if spec["resampleProj"] or cout != cin:
                self.skip = Conv(cin, cout, 1, inits["init"])
        if self.heads:
            self.norm2 = GroupNorm(cout, spec)
            self.qkv = Conv(cout, 3 * cout, 1, inits["qkv"])
            self.proj = Conv(cout, cout, 1, inits["proj"])

    def resample(self, x):
        if self.down:
            return F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3)
        if self.adaptive:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        skip = self.skip(self.resample(x)) if self.skip is not None else self.resample(x)
        h = (h + skip) * self.skip_scale
        if self.heads:
            N, C, H, W = h.shape
            c = C // self.heads
            # EDM's reading of the qkv channels: [N·heads, c, 3, L].
            q, k, v = self.qkv(self.norm2(h)).reshape(N * self.heads, c, 3, H * W).unbind(2)
            w = torch.einsum("nci,ncj->nij", q, k / math.sqrt(c)).softmax(dim=2)
            a = torch.einsum("nij,ncj->nci", w, v)
            h = (self.proj(a.reshape(N, C, H, W)) + h) * self.skip_scale
        return h


class UNet(nn.Module):
    """The UNet of a spec and its layout (models/unet.ts): SongUNet mapping (optionally class-conditional),
    positional embedding."""

    def __init__(self, spec, layout):
        super().__init__()
        if spec["embedding"] != "positional" or spec["mapping"] != "song" or spec["augmentDim"]:
            raise ValueError("peer_torch: only the positional SongUNet mapping without augment labels is written here")
        mc = spec["modelChannels"]
        noise_c, emb_c = mc * spec["channelMultNoise"], mc * spec["channelMultEmb"]
        i = spec["init"]
        inits = {
            "init": (i["mode"], i["weight"], i["bias"]),
            "zero": (i["mode"], i["zero"], 0),
            "qkv": (i["mode"], i["qkv"], i["bias"]),
            "proj": (i["mode"], i["proj"], 0),
        }
        half = noise_c // 2
        denom = half - (1 if spec["embeddingEndpoint"] else 0)
        self.register_buffer(
            "freqs", torch.tensor([(1 / spec["maxPositions"]) ** (k / denom) for k in range(half)])
        )
        self.layout_order = spec["embeddingLayout"]
        # SongUNet's class conditioning: a biased linear from the one-hot label into the noise embedding
        # (registered before map_layer0, as in EDM), with EDM's label dropout in training.
        self.label_dim, self.label_dropout = spec["labelDim"], spec["labelDropout"]
        self.map_label = Linear(self.label_dim, noise_c, inits["init"]) if self.label_dim else None
        self.map_layer0 = Linear(noise_c, emb_c, inits["init"])
        self.map_layer1 = Linear(emb_c, emb_c, inits["init"])

        def make(e):
            if e["kind"] == "conv":
                return Conv(e["inChannels"], e["outChannels"], 3, inits["init"])
            if e["kind"] == "block":
                return UNetBlock(e, spec, emb_c, inits)
            raise ValueError(f"peer_torch: layout kind {e['kind']} is not written here")

        self.enc_keys = [e["key"] for e in layout["enc"]]
        self.dec = layout["dec"]
        self.enc = nn.ModuleDict({e["key"]: make(e) for e in layout["enc"]})
        self.decm = nn.ModuleDict({e["key"]: make(e) for e in layout["dec"]})
        c_last = layout["dec"][-1]["outChannels"]
        self.out_norm = GroupNorm(c_last, spec)
        self.out_conv = Conv(c_last, spec["outChannels"], 3, inits["zero"])

    def embed(self, c_noise, class_labels):
        a = c_noise.unsqueeze(1) * self.freqs.unsqueeze(0)
        c, s = a.cos(), a.sin()
        if self.layout_order == "cos-sin":
            emb = torch.cat([c, s], 1)
        elif self.layout_order == "sin-cos":
            emb = torch.cat([s, c], 1)
        else:
            emb = torch.stack([s, c], 2).flatten(1)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = labels * (torch.rand([labels.shape[0], 1]) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x, c_noise, class_labels=None):
        if self.map_label is not None and class_labels is None:
            raise ValueError(f"peer_torch: class_labels [N, {self.label_dim}] are required (labelDim > 0)")
        emb = self.embed(c_noise, class_labels)
        skips, h = [], x
        for k in self.enc_keys:
            m = self.enc[k]
            h = m(h, emb) if isinstance(m, UNetBlock) else m(h)
            skips.append(h)
        for e in self.dec:
            if e["skipChannels"]:
                h = torch.cat([h, skips.pop()], 1)
            h = self.decm[e["key"]](h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def edm_loss(net, images, labels, sigma_data, p_mean, p_std):
    """EDM's preconditioning and loss (models/edm.ts edmLoss, EDMPrecond)."""
    n = images.shape[0]
    sigma = (torch.randn(n) * p_std + p_mean).exp().reshape(n, 1, 1, 1)
    noisy = images + torch.randn_like(images) * sigma
    sd2 = sigma_data**2
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data * c_in
    c_noise = sigma.log().reshape(n) / 4
    D = c_skip * noisy + c_out * net(noisy * c_in, c_noise, labels)
    weight = (sigma**2 + sd2) / (sigma * sigma_data) ** 2
    return (weight * (D - images) ** 2).mean()


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    w = json.loads(sys.argv[1])
    torch.set_num_threads(w.get("threads", 2))
    torch.manual_seed(0)
    net = UNet(w["spec"], w["layout"]).train()
    params = list(net.parameters())
    adam = w["adam"]
    opt = torch.optim.Adam(params, lr=adam["lr"], betas=tuple(adam["betas"]), eps=adam["eps"])
    ema = [p.detach().clone() for p in params] if w.get("ema") else None
    B, R = w["batch"], w["spec"]["imgResolution"]
    images = torch.randn(B, w["spec"]["inChannels"], R, R)
    K = w["spec"]["labelDim"]
    nimg = 0

    def step():
        nonlocal nimg
        # EDM's ramp-up of the learning rate and of the EMA half-life (models/trainer.ts), when given.
        ramp = adam.get("rampupImg")
        if ramp:
            for g in opt.param_groups:
                g["lr"] = adam["lr"] * min(nimg / ramp, 1)
        # A fresh batch of one-hot labels per step, as the Trainer's data iterator gives ours.
        labels = F.one_hot(torch.randint(K, (B,)), K).to(images.dtype) if K else None
        loss = edm_loss(net, images, labels, w["sigmaData"], w["pMean"], w["pStd"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            e = w["ema"]
            ratio = e["rampupRatio"]
            half = e["halfLifeImg"] if ratio is None else min(e["halfLifeImg"], nimg * ratio)
            beta = 0.5 ** (B / max(half, 1e-8))
            with torch.no_grad():
                for s, p in zip(ema, params):
                    s.copy_(p.detach().lerp(s, beta))
        nimg += B

    step()
    count = sum(p.numel() for p in params)
    print(json.dumps({"ready": True, "params": count, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        k = json.loads(line)["run"]
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(k):
            step()
        ms = (time.perf_counter() - t0) * 1000
        cpu = (time.process_time() - c0) * 1000
        print(json.dumps({"ms": ms, "cpu_ms": cpu, "rss_peak_mib": peak_rss_mib()}), flush=True)


if __name__ == "__main__":
    main()
