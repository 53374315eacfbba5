#!/usr/bin/env python3
"""Time MinkUNet (SPVNAS architecture, synthetic weights) end to end on a SemanticKITTI scan
with spconv 2.x on the CPU, the same way `sparseconv bench` times it: read the scan, voxelize
at 5 cm (floor, mean features), run the network, argmax, map labels back to every point.

    pip install torch spconv==2.3.8 numpy
    OMP_NUM_THREADS=1 python tools/compare_peers.py data/semantickitti/sequences/00/velodyne/000000.bin --cr 0.5

spconv's CPU scatter races with more than one thread (wrong rows), so time it with one thread
(the default here) and compare against `sparseconv bench --threads 1` as well as 2 threads.
"""
import argparse
import statistics
import sys
import time


def build(cr, spconv, nn):
    cs = [int(cr * c) for c in [32, 32, 64, 128, 256, 256, 128, 96, 96]]

    def cbr(cin, cout, conv):
        return spconv.SparseSequential(conv, nn.BatchNorm1d(cout), nn.ReLU(True))

    class Res(nn.Module):
        def __init__(self, cin, cout, key):
            super().__init__()
            self.net = spconv.SparseSequential(
                spconv.SubMConv3d(cin, cout, 3, bias=False, indice_key=key), nn.BatchNorm1d(cout), nn.ReLU(True),
                spconv.SubMConv3d(cout, cout, 3, bias=False, indice_key=key), nn.BatchNorm1d(cout))
            self.down = None if cin == cout else spconv.SparseSequential(
                spconv.SubMConv3d(cin, cout, 1, bias=False, indice_key=key + "_1x1"), nn.BatchNorm1d(cout))

        def forward(self, x):
            y = self.net(x)
            s = x if self.down is None else self.down(x)
            return y.replace_feature(torch_relu(y.features + s.features))

    class MinkUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = spconv.SparseSequential(
                cbr(4, cs[0], spconv.SubMConv3d(4, cs[0], 3, bias=False, indice_key="s0")),
                cbr(cs[0], cs[0], spconv.SubMConv3d(cs[0], cs[0], 3, bias=False, indice_key="s0")))
            self.stages = nn.ModuleList()
            for i in range(4):
                self.stages.append(nn.ModuleList([
                    cbr(cs[i], cs[i], spconv.SparseConv3d(cs[i], cs[i], 2, stride=2, bias=False, indice_key=f"d{i}")),
                    Res(cs[i], cs[i + 1], f"s{i + 1}"), Res(cs[i + 1], cs[i + 1], f"s{i + 1}")]))
            self.ups = nn.ModuleList()
            for u in range(4):
                cin, cout, skip = cs[4 + u], cs[5 + u], cs[3 - u]
                self.ups.append(nn.ModuleList([
                    cbr(cin, cout, spconv.SparseInverseConv3d(cin, cout, 2, bias=False, indice_key=f"d{3 - u}")),
                    Res(cout + skip, cout, f"s{3 - u}"), Res(cout, cout, f"s{3 - u}")]))
            self.cls = nn.Linear(cs[8], 19)

        def forward(self, x):
            x = self.stem(x)
            skips = []
            for down, r1, r2 in self.stages:
                skips.append(x)
                x = r2(r1(down(x)))
            for up, r1, r2 in self.ups:
                s = skips.pop()
                u = up(x)
                x = u.replace_feature(torch_cat([u.features, s.features], 1))
                x = r2(r1(x))
            return self.cls(x.features)

    return MinkUNet()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scan")
    ap.add_argument("--cr", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import numpy as np
    import torch
    import spconv.pytorch as spconv
    from torch import nn

    global torch_relu, torch_cat
    torch_relu, torch_cat = torch.relu, torch.cat
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = build(a.cr, spconv, nn).eval()
    times = []
    for r in range(a.runs + 2):
        t0 = time.perf_counter()
        pts = np.fromfile(a.scan, dtype=np.float32).reshape(-1, 4)
        vc = np.floor(pts[:, :3] / 0.05).astype(np.int32)
        vc -= vc.min(0)
        uniq, inv = np.unique(vc, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        feats = np.zeros((len(uniq), 4), np.float64)
        np.add.at(feats, inv, pts)
        feats /= np.bincount(inv, minlength=len(uniq))[:, None]
        idx = np.concatenate([np.zeros((len(uniq), 1), np.int32), uniq[:, ::-1]], 1)  # b, z, y, x
        x = spconv.SparseConvTensor(torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(idx),
                                    (uniq.max(0)[::-1] + 1).tolist(), 1)
        with torch.no_grad():
            logits = net(x)
        labels = logits.argmax(1).numpy()[inv]
        dt = time.perf_counter() - t0
        if r >= 2:
            times.append(dt)
    print(f"spconv MinkUNet cr={a.cr}, {a.threads} thread(s): {len(pts)} points, {len(uniq)} voxels, "
          f"median {statistics.median(times) * 1e3:.1f} ms over {a.runs} runs (min {min(times) * 1e3:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
