#!/usr/bin/env python3
"""Cross-check sparseconv's MinkUNet logits against MinkowskiEngine 0.5.4 with the same weights
on the same voxels.

    sparseconv segment SCAN --model W.safetensors --logits out.safetensors
    python tools/crosscheck_minkowski.py W.safetensors out.safetensors --cr 0.5

Builds the SPVNAS MinkUNet from MinkowskiEngine layers (MinkowskiConvolution,
MinkowskiConvolutionTranspose, MinkowskiBatchNorm, MinkowskiReLU, ME.cat, Linear), loads the
TorchSparse-named tensors into it, runs the voxels that `segment --logits` wrote, and prints
max |ME - sparseconv| / max |ME| over the logits (rows matched by coordinate).

MinkowskiEngine enumerates the 2x2x2 kernel with x fastest; TorchSparse (and sparseconv) with z
fastest, so k = 2 kernels are permuted on the way in.
"""
import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("logits")
    ap.add_argument("--cr", type=float, default=0.5)
    ap.add_argument("--k2-order", choices=["permute", "as-is"], default="permute")
    ap.add_argument("--time", type=int, default=0, help="also time N network runs (voxels in, logits out)")
    a = ap.parse_args()
    import numpy as np
    import torch
    import MinkowskiEngine as ME
    from safetensors.torch import load_file

    w = load_file(a.weights)
    data = load_file(a.logits)
    coords, feats, ours = data["coords"].int(), data["feats"].float(), data["logits"].float()
    cs = [int(a.cr * c) for c in [32, 32, 64, 128, 256, 256, 128, 96, 96]]
    perm = [((j >> 2) & 1) | (((j >> 1) & 1) << 1) | ((j & 1) << 2) for j in range(8)]

    def kernel(name):
        t = w[name].float()
        if t.dim() == 2:  # 1x1 conv: [Cin, Cout]
                return t
        if t.shape[0] == 8 and a.k2_order == "permute":
                # ME index i = x + 2y + 4z holds TorchSparse index j = 4x + 2y + z.
                inv = [0] * 8
                for j, i in enumerate(perm):
                    inv[i] = j
                t = t[inv]
        return t

    def conv(cin, cout, k, s, name, transpose=False):
        cls = ME.MinkowskiConvolutionTranspose if transpose else ME.MinkowskiConvolution
        m = cls(cin, cout, kernel_size=k, stride=s, dimension=3, bias=False)
        kt = kernel(name)
        with torch.no_grad():
                m.kernel.copy_(kt.reshape(m.kernel.shape))
        return m

    def bn(c, p):
        m = ME.MinkowskiBatchNorm(c, eps=1e-5)
        with torch.no_grad():
                m.bn.weight.copy_(w[p + ".weight"])
                m.bn.bias.copy_(w[p + ".bias"])
                m.bn.running_mean.copy_(w[p + ".running_mean"])
                m.bn.running_var.copy_(w[p + ".running_var"])
        return m.eval()  # running statistics, as at inference

    relu = ME.MinkowskiReLU()

    def res(x, cin, cout, p):
        h = relu(bn(cout, p + ".net.1")(conv(cin, cout, 3, 1, p + ".net.0.kernel")(x)))
        h = bn(cout, p + ".net.4")(conv(cout, cout, 3, 1, p + ".net.3.kernel")(h))
        s = x if cin == cout else bn(cout, p + ".downsample.1")(conv(cin, cout, 1, 1, p + ".downsample.0.kernel")(x))
        return relu(h + s)

    def network():
        x = ME.SparseTensor(features=feats, coordinates=coords)
        with torch.no_grad():
            h = relu(bn(cs[0], "stem.1")(conv(4, cs[0], 3, 1, "stem.0.kernel")(x)))
            h = relu(bn(cs[0], "stem.4")(conv(cs[0], cs[0], 3, 1, "stem.3.kernel")(h)))
            skips = []
            for s in range(4):
                skips.append(h)
                p = f"stage{s + 1}"
                h = relu(bn(cs[s], p + ".0.net.1")(conv(cs[s], cs[s], 2, 2, p + ".0.net.0.kernel")(h)))
                h = res(h, cs[s], cs[s + 1], p + ".1")
                h = res(h, cs[s + 1], cs[s + 1], p + ".2")
            for u in range(4):
                cin, cout, skip = cs[4 + u], cs[5 + u], cs[3 - u]
                p = f"up{u + 1}"
                up = relu(bn(cout, p + ".0.net.1")(conv(cin, cout, 2, 2, p + ".0.net.0.kernel", transpose=True)(h)))
                h = ME.cat(up, skips.pop())
                h = res(h, cout + skip, cout, p + ".1.0")
                h = res(h, cout, cout, p + ".1.1")
            lin = torch.nn.Linear(cs[8], 19)
            lin.weight.copy_(w["classifier.0.weight"])
            lin.bias.copy_(w["classifier.0.bias"])
            me_logits = lin(h.F)
        return h, me_logits

    import time
    h, me_logits = network()
    times = []
    for _ in range(a.time):
        t0 = time.perf_counter()
        network()
        times.append(time.perf_counter() - t0)
    if times:
        times.sort()
        print(f"MinkowskiEngine network: median {1e3 * times[len(times) // 2]:.1f} ms over {len(times)} runs, {torch.get_num_threads()} torch threads")
    # Match rows by coordinate.
    key = lambda c: (c[:, 0].long() << 48) + ((c[:, 1].long() + 2**15) << 32) + ((c[:, 2].long() + 2**15) << 16) + (c[:, 3].long() + 2**15)
    k_ours, k_me = key(coords), key(h.C.int())
    order_ours, order_me = torch.argsort(k_ours), torch.argsort(k_me)
    if not torch.equal(k_ours[order_ours], k_me[order_me]):
        print("error: output coordinates differ", file=sys.stderr)
        return 1
    diff = (ours[order_ours] - me_logits[order_me]).abs().max().item()
    ref = me_logits.abs().max().item()
    agree = (ours[order_ours].argmax(1) == me_logits[order_me].argmax(1)).float().mean().item()
    print(f"{len(coords)} voxels: max |ME - sparseconv| / max |ME| = {diff / ref:.3e}; argmax agreement {100 * agree:.3f}%")
    return 0 if diff / ref < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
