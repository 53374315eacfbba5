#!/usr/bin/env python3
"""Speed against FLOPs on the voxel-pruned convs: two `sparseconv bench --layers` tables of the
same model, one without and one with voxel pruning (issue 14's "measured speed-up within 20% of
the FLOP reduction on the pruned layers").

Usage: tools/voxel_layers.py UNPRUNED.txt PRUNED.txt

A conv counts as pruned where the pruned run's plan says "kept rows" (the f32 kernel that skips
pruned rows). FLOPs are 2 * pairs * cin * cout from each table's own pair counts, so the kept
rows' pairs are what the pruned run is charged for; times are each table's medians.
"""
import re
import sys

ROW = re.compile(r"^(\d+)\s+(\w+) k(\d+) s(\d+) (\d+)->(\d+)\s+(\d+)->(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(.+?)\s+([\d.]+)$")


def table(path):
    rows = {}
    for line in open(path):
        m = ROW.match(line.strip())
        if m:
            g = m.groups()
            rows[int(g[0])] = {
                "kind": g[1], "cin": int(g[4]), "cout": int(g[5]), "pairs": int(g[8]),
                "ms": float(g[9]), "plan": g[11].strip(),
            }
    if not rows:
        sys.exit(f"{path}: no `bench --layers` rows found")
    return rows


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    full, pruned = table(sys.argv[1]), table(sys.argv[2])
    if full.keys() != pruned.keys():
        sys.exit("the two tables list different convs (not the same model?)")
    flops = lambda r: 2.0 * r["pairs"] * r["cin"] * r["cout"]
    sel = [i for i, r in pruned.items() if "kept rows" in r["plan"]]
    if not sel:
        sys.exit(f"{sys.argv[2]}: no conv ran the kept-row kernel")
    rest = [i for i in pruned if i not in sel]
    for name, ids in [("pruned convs", sel), ("other convs", rest), ("all convs", list(pruned))]:
        f0, f1 = sum(flops(full[i]) for i in ids), sum(flops(pruned[i]) for i in ids)
        t0, t1 = sum(full[i]["ms"] for i in ids), sum(pruned[i]["ms"] for i in ids)
        print(
            f"{name:<13} {len(ids):>3} convs: GFLOP {f0 / 1e9:7.2f} -> {f1 / 1e9:7.2f} ({f0 / max(f1, 1):.2f}x), "
            f"ms {t0:8.2f} -> {t1:8.2f} ({t0 / max(t1, 1e-9):.2f}x), "
            f"GFLOP/s {f0 / 1e6 / max(t0, 1e-9):6.1f} -> {f1 / 1e6 / max(t1, 1e-9):6.1f}"
        )


if __name__ == "__main__":
    main()
