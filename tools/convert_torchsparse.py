#!/usr/bin/env python3
"""Convert a TorchSparse / SPVNAS PyTorch checkpoint (.pt) into the safetensors file that
`sparseconv segment --model` loads.

    python tools/convert_torchsparse.py model.pt out.safetensors --arch minkunet --cr 0.5

Needs `torch` and `safetensors` (pip install torch safetensors). Tensor names and shapes are
kept exactly as TorchSparse stores them (conv kernels [K, Cin, Cout] in TorchSparse offset
order, [Cin, Cout] for 1x1 convs); `num_batches_tracked` is dropped; the `module.` prefix of
DataParallel checkpoints is stripped. The file's metadata records arch, cr, classes and voxel
size, so `segment` needs no flags for it.

MinkowskiEngine checkpoints use other module names and, for kernel size 2, another offset
order (x fastest); pass --permute-k2 to reorder [8, Cin, Cout] kernels from ME's order to
TorchSparse's, after renaming the tensors to the TorchSparse names yourself.
"""
import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("output")
    ap.add_argument("--arch", choices=["minkunet", "spvcnn"], required=True)
    ap.add_argument("--cr", type=float, required=True, help="width factor the model was trained with")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--voxel-size", type=float, default=0.05)
    ap.add_argument("--permute-k2", action="store_true", help="reorder k=2 kernels from MinkowskiEngine's offset order")
    a = ap.parse_args()

    try:
        import torch
        from safetensors.torch import save_file
    except ImportError as e:
        print(f"error: needs torch and safetensors ({e})", file=sys.stderr)
        return 2

    try:
        ck = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any load failure in one line
        print(f"error: {a.checkpoint}: cannot load: {e}", file=sys.stderr)
        return 2
    state = ck.get("model", ck.get("state_dict", ck)) if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        print(f"error: {a.checkpoint}: no state dict found", file=sys.stderr)
        return 2

    # ME (x fastest) -> TorchSparse (z fastest) for the 2x2x2 offsets: index x + 2y + 4z -> 4x + 2y + z.
    perm = [((i >> 2) & 1) | (((i >> 1) & 1) << 1) | ((i & 1) << 2) for i in range(8)]
    out = {}
    for name, t in state.items():
        if not torch.is_tensor(t) or name.endswith("num_batches_tracked"):
            continue
        if name.startswith("module."):
            name = name[len("module."):]
        t = t.detach().to(torch.float32).contiguous()
        if a.permute_k2 and name.endswith(".kernel") and t.dim() == 3 and t.shape[0] == 8:
            t = t[perm].contiguous()
        out[name] = t
    meta = {"arch": a.arch, "cr": str(a.cr), "classes": str(a.classes), "voxel_size": str(a.voxel_size)}
    save_file(out, a.output, metadata=meta)
    print(f"wrote {len(out)} tensors to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
