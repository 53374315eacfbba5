#!/usr/bin/env python3
"""Top-down PNG of a SemanticKITTI scan coloured by class: predictions beside ground truth.

A quick look without the rerun viewer (numpy only, PNG written by hand):

    sparseconv segment SCAN.bin --out-labels pred.label
    python tools/render_bev.py SCAN.bin pred.label [GT.label] --out bev.png

Colours are the SemanticKITTI colour map of data/semantickitti/semantic-kitti.yaml.
"""
import argparse
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

YAML = Path(__file__).resolve().parent.parent / "data/semantickitti/semantic-kitti.yaml"


def colour_map(path):
    text = path.read_text()
    section = text.split("color_map:")[1].split("content:")[0]
    cmap = {}
    for m in re.finditer(r"^\s+(\d+)\s*:\s*\[\s*(\d+),\s*(\d+),\s*(\d+)\]", section, re.M):
        k, b, g, r = map(int, m.groups())  # the yaml stores BGR
        cmap[k] = (r, g, b)
    return cmap


def render(points, labels, cmap, extent, res):
    w = int(2 * extent / res)
    img = np.zeros((w, w, 3), np.uint8)
    px = ((points[:, 0] + extent) / res).astype(int)
    py = ((extent - points[:, 1]) / res).astype(int)
    ok = (px >= 0) & (px < w) & (py >= 0) & (py < w)
    order = np.argsort(points[:, 2])  # higher points drawn last
    lut = np.zeros((1 << 16, 3), np.uint8)
    for k, c in cmap.items():
        lut[k] = c
    for i in order[ok[order]]:
        img[py[i], px[i]] = lut[labels[i]]
    return img


def write_png(path, img):
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scan")
    ap.add_argument("labels", nargs="+", help="one or two .label files (e.g. prediction and ground truth)")
    ap.add_argument("--out", default="bev.png")
    ap.add_argument("--extent", type=float, default=40.0, help="half width of the view in metres")
    ap.add_argument("--res", type=float, default=0.1, help="metres per pixel")
    ap.add_argument("--yaml", default=str(YAML))
    a = ap.parse_args()
    pts = np.fromfile(a.scan, dtype=np.float32).reshape(-1, 4)
    cmap = colour_map(Path(a.yaml))
    panels = []
    for f in a.labels:
        lab = np.fromfile(f, dtype=np.uint32) & 0xFFFF
        if len(lab) != len(pts):
            sys.exit(f"{f}: {len(lab)} labels for {len(pts)} points")
        panels.append(render(pts, lab, cmap, a.extent, a.res))
        panels.append(np.full((panels[-1].shape[0], 10, 3), 255, np.uint8))
    write_png(a.out, np.concatenate(panels[:-1], axis=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
