#!/usr/bin/env python3
"""Time MinkUNet (SPVNAS architecture) end to end on a SemanticKITTI scan with spconv 2.x and
MinkowskiEngine 0.5.x on the CPU, the same way `sparseconv bench` times it: read the scan,
voxelize at 5 cm (floor, mean features), run the network, argmax, map labels back to every
point. With `--sparseconv BIN` the sparseconv CLI is timed in the same rounds
(`BIN bench SCAN --json`), so every number of one run comes from the same state of the machine.

    pip install torch spconv==2.3.8 numpy
    python tools/compare_peers.py data/semantickitti/sequences/00/velodyne/000000.bin --cr 0.5 \
        --peers spconv minkowski --threads 1 2 --sparseconv target/release/sparseconv

spconv's CPU scatter races with more than one thread (wrong rows), so spconv is timed with one
thread only. MinkowskiEngine's CPU build runs its convolutions on OpenMP/OpenBLAS threads;
the thread count is set through torch and the environment before anything is imported.

Weights are synthetic (speed does not depend on the values) unless `--weights` names a
TorchSparse-named safetensors file, which MinkowskiEngine then loads (see
`tools/crosscheck_minkowski.py`, which uses the same network builder).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WIDTHS = [32, 32, 64, 128, 256, 256, 128, 96, 96]
# MinkowskiEngine enumerates the 2x2x2 kernel with x fastest, TorchSparse (and sparseconv) with
# z fastest: ME index x + 2y + 4z holds TorchSparse index 4x + 2y + z.
K2_TORCHSPARSE_FOR_ME = [((i & 1) << 2) | (i & 2) | ((i >> 2) & 1) for i in range(8)]


def widths(cr):
    return [int(cr * c) for c in WIDTHS]


def build_spconv(cr):
    import numpy as np
    import torch
    import spconv.pytorch as spconv
    from torch import nn

    cs = widths(cr)

    def cbr(cout, conv):
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
            return y.replace_feature(torch.relu(y.features + s.features))

    class MinkUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = spconv.SparseSequential(
                cbr(cs[0], spconv.SubMConv3d(4, cs[0], 3, bias=False, indice_key="s0")),
                cbr(cs[0], spconv.SubMConv3d(cs[0], cs[0], 3, bias=False, indice_key="s0")))
            self.stages = nn.ModuleList()
            for i in range(4):
                self.stages.append(nn.ModuleList([
                    cbr(cs[i], spconv.SparseConv3d(cs[i], cs[i], 2, stride=2, bias=False, indice_key=f"d{i}")),
                    Res(cs[i], cs[i + 1], f"s{i + 1}"), Res(cs[i + 1], cs[i + 1], f"s{i + 1}")]))
            self.ups = nn.ModuleList()
            for u in range(4):
                cin, cout, skip = cs[4 + u], cs[5 + u], cs[3 - u]
                self.ups.append(nn.ModuleList([
                    cbr(cout, spconv.SparseInverseConv3d(cin, cout, 2, bias=False, indice_key=f"d{3 - u}")),
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
                x = u.replace_feature(torch.cat([u.features, s.features], 1))
                x = r2(r1(x))
            return self.cls(x.features)

    net = MinkUNet().eval()

    def run(feats, uniq):
        idx = torch.from_numpy(np.concatenate([np.zeros((len(uniq), 1), np.int32), uniq[:, ::-1]], 1))  # b, z, y, x
        x = spconv.SparseConvTensor(torch.from_numpy(feats), idx, (uniq.max(0)[::-1] + 1).tolist(), 1)
        return net(x)  # rows in input order

    return run


def build_minkowski(cr, weights=None):
    """SPVNAS MinkUNet from MinkowskiEngine layers; `weights` (a dict of TorchSparse-named
    tensors) is loaded when given, k = 2 kernels permuted into ME's offset order."""
    import torch
    import MinkowskiEngine as ME
    from torch import nn

    cs = widths(cr)

    def conv(cin, cout, k, s, name, transpose=False):
        cls = ME.MinkowskiConvolutionTranspose if transpose else ME.MinkowskiConvolution
        m = cls(cin, cout, kernel_size=k, stride=s, dimension=3, bias=False)
        if weights is not None:
            t = weights[name].float()
            if t.dim() == 3 and t.shape[0] == 8:
                t = t[K2_TORCHSPARSE_FOR_ME]
            with torch.no_grad():
                m.kernel.copy_(t.reshape(m.kernel.shape))
        return m

    def bn(c, name):
        m = ME.MinkowskiBatchNorm(c, eps=1e-5)
        if weights is not None:
            with torch.no_grad():
                for f in ["weight", "bias", "running_mean", "running_var"]:
                    getattr(m.bn, f).copy_(weights[f"{name}.{f}"])
        return m

    class Res(nn.Module):
        def __init__(self, cin, cout, p):
            super().__init__()
            self.c1, self.b1 = conv(cin, cout, 3, 1, p + ".net.0.kernel"), bn(cout, p + ".net.1")
            self.c2, self.b2 = conv(cout, cout, 3, 1, p + ".net.3.kernel"), bn(cout, p + ".net.4")
            self.down = None if cin == cout else nn.ModuleList(
                [conv(cin, cout, 1, 1, p + ".downsample.0.kernel"), bn(cout, p + ".downsample.1")])
            self.relu = ME.MinkowskiReLU()

        def forward(self, x):
            h = self.b2(self.c2(self.relu(self.b1(self.c1(x)))))
            s = x if self.down is None else self.down[1](self.down[0](x))
            return self.relu(h + s)

    class MinkUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = ME.MinkowskiReLU()
            self.stem = nn.ModuleList([conv(4, cs[0], 3, 1, "stem.0.kernel"), bn(cs[0], "stem.1"),
                                       conv(cs[0], cs[0], 3, 1, "stem.3.kernel"), bn(cs[0], "stem.4")])
            self.stages = nn.ModuleList()
            for s in range(4):
                p = f"stage{s + 1}"
                self.stages.append(nn.ModuleList([
                    conv(cs[s], cs[s], 2, 2, p + ".0.net.0.kernel"), bn(cs[s], p + ".0.net.1"),
                    Res(cs[s], cs[s + 1], p + ".1"), Res(cs[s + 1], cs[s + 1], p + ".2")]))
            self.ups = nn.ModuleList()
            for u in range(4):
                cin, cout, skip = cs[4 + u], cs[5 + u], cs[3 - u]
                p = f"up{u + 1}"
                self.ups.append(nn.ModuleList([
                    conv(cin, cout, 2, 2, p + ".0.net.0.kernel", transpose=True), bn(cout, p + ".0.net.1"),
                    Res(cout + skip, cout, p + ".1.0"), Res(cout, cout, p + ".1.1")]))
            self.cls = nn.Linear(cs[8], 19)
            if weights is not None:
                with torch.no_grad():
                    self.cls.weight.copy_(weights["classifier.0.weight"])
                    self.cls.bias.copy_(weights["classifier.0.bias"])

        def forward(self, x):
            c1, b1, c2, b2 = self.stem
            h = self.relu(b2(c2(self.relu(b1(c1(x))))))
            skips = []
            for down, b, r1, r2 in self.stages:
                skips.append(h)
                h = r2(r1(self.relu(b(down(h)))))
            for up, b, r1, r2 in self.ups:
                h = ME.cat(self.relu(b(up(h))), skips.pop())
                h = r2(r1(h))
            return h, self.cls(h.F)

    return MinkUNet().eval()


def minkowski_runner(cr):
    import numpy as np
    import torch
    import MinkowskiEngine as ME

    net = build_minkowski(cr)

    def run(feats, uniq):
        coords = torch.from_numpy(np.concatenate([np.zeros((len(uniq), 1), np.int32), uniq], 1))
        x = ME.SparseTensor(features=torch.from_numpy(feats), coordinates=coords)
        h, logits = net(x)
        # ME may store rows in another order than given; bring them back to input order.
        return logits[x.inverse_mapping]

    return run


def time_peer(name, scan, cr, runs, threads):
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = build_spconv(cr) if name == "spconv" else minkowski_runner(cr)
    times, nvox = [], 0
    for r in range(runs + 2):
        t0 = time.perf_counter()
        pts = np.fromfile(scan, dtype=np.float32).reshape(-1, 4)
        vc = np.floor(pts[:, :3] / 0.05).astype(np.int32)
        # spconv needs non-negative indices; a shift by a multiple of 16 (the coarsest stride)
        # keeps every downsampling level's voxels the same as sparseconv's, so all do equal work.
        vc -= (vc.min(0) // 16) * 16
        uniq, inv = np.unique(vc, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        feats = np.zeros((len(uniq), 4), np.float64)
        np.add.at(feats, inv, pts)
        feats /= np.bincount(inv, minlength=len(uniq))[:, None]
        with torch.no_grad():
            logits = run(feats.astype(np.float32), uniq)
        labels = logits.argmax(1).numpy()[inv]
        dt = time.perf_counter() - t0
        assert len(labels) == len(pts)
        nvox = len(uniq)
        if r >= 2:
            times.append(dt)
    return len(pts), nvox, times


def time_sparseconv(binary, scan, cr, runs, threads):
    out = subprocess.run([binary, "bench", scan, "--cr", str(cr), "--runs", str(runs), "--threads", str(threads),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_s"]["total"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scan")
    ap.add_argument("--cr", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="alternate all timings this many times")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--peers", nargs="+", choices=["spconv", "minkowski"], default=["spconv"])
    ap.add_argument("--sparseconv", help="path of the sparseconv binary to time in the same rounds")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        # One peer at one thread count per process: OpenMP and BLAS read their thread counts once.
        name, threads = a.worker[0], int(a.worker[1])
        n, nvox, times = time_peer(name, a.scan, a.cr, a.runs, threads)
        print(json.dumps({"points": n, "voxels": nvox, "median": statistics.median(times), "min": min(times)}))
        return 0

    for rnd in range(a.rounds):
        for threads in a.threads:
            for name in a.peers:
                if name == "spconv" and threads > 1:
                    continue  # its CPU scatter races: wrong rows with more than one thread
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                           MKL_NUM_THREADS=str(threads))
                out = subprocess.run([sys.executable, __file__, a.scan, "--cr", str(a.cr), "--runs", str(a.runs),
                                      "--worker", name, str(threads)], env=env, check=True, capture_output=True,
                                     text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"round {rnd + 1}: {name} MinkUNet cr={a.cr}, {threads} thread(s): {r['points']} points, "
                      f"{r['voxels']} voxels, median {r['median'] * 1e3:.1f} ms over {a.runs} runs "
                      f"(min {r['min'] * 1e3:.1f})", flush=True)
            if a.sparseconv:
                t = time_sparseconv(a.sparseconv, a.scan, a.cr, a.runs, threads)
                print(f"round {rnd + 1}: sparseconv MinkUNet cr={a.cr}, {threads} thread(s): "
                      f"median {t * 1e3:.1f} ms over {a.runs} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
