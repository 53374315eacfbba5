#!/usr/bin/env python3
"""Cross-check sparseconv's MinkUNet logits against MinkowskiEngine 0.5.4 with the same weights
on the same voxels.

    sparseconv segment SCAN --model W.safetensors --logits out.safetensors
    python tools/crosscheck_minkowski.py W.safetensors out.safetensors --cr 0.5

Builds the SPVNAS MinkUNet from MinkowskiEngine layers (`build_minkowski` in
`compare_peers.py`, shared with the timing script), loads the TorchSparse-named tensors into
it, runs the voxels that `segment --logits` wrote, and prints max |ME - sparseconv| / max |ME|
over the logits (rows matched by coordinate).

MinkowskiEngine enumerates the 2x2x2 kernel with x fastest; TorchSparse (and sparseconv) with z
fastest, so k = 2 kernels are permuted on the way in (`--k2-order as-is` skips that, to show
that the permutation matters).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_peers  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("logits")
    ap.add_argument("--cr", type=float, default=0.5)
    ap.add_argument("--k2-order", choices=["permute", "as-is"], default="permute")
    a = ap.parse_args()
    import torch
    import MinkowskiEngine as ME
    from safetensors.torch import load_file

    w = load_file(a.weights)
    data = load_file(a.logits)
    coords, feats, ours = data["coords"].int(), data["feats"].float(), data["logits"].float()
    if a.k2_order == "as-is":
        # Undo the builder's permutation so the kernels go in unpermuted.
        inv = [0] * 8
        for i, j in enumerate(compare_peers.K2_TORCHSPARSE_FOR_ME):
            inv[j] = i
        w = {k: (v[inv] if v.dim() == 3 and v.shape[0] == 8 else v) for k, v in w.items()}
    net = compare_peers.build_minkowski(a.cr, w)
    with torch.no_grad():
        h, me_logits = net(ME.SparseTensor(features=feats, coordinates=coords))
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
