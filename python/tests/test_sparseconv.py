"""pytest suite of the Python package: the CLI's labels, `conv` against a numpy reference,
pruning, the GIL, and every error path raising the right exception with the CLI's message."""

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import sparseconv

ROOT = Path(__file__).resolve().parents[2]
SCAN = ROOT / "data/semantickitti/sequences/00/velodyne/000000.bin"
MODEL = ROOT / "data/models/minkunet_cr0.5.safetensors"
PRUNED = ROOT / "data/models/minkunet_cr0.5_pruned.safetensors"


def cli_binary():
    """The `sparseconv` command: $SPARSECONV_BIN, else the repository's release or test build."""
    env = os.environ.get("SPARSECONV_BIN")
    if env:
        return Path(env)
    for p in (ROOT / "target/release/sparseconv", ROOT / "target/debug/sparseconv"):
        if p.exists():
            return p
    pytest.fail("no sparseconv binary: build it (cargo build --release) or set SPARSECONV_BIN")


def test_read_points_and_voxelize():
    pts = sparseconv.read_points(SCAN)
    assert pts.dtype == np.float32 and pts.shape == (124668, 4)
    coords, feats, inverse = sparseconv.voxelize(pts, 0.05)
    assert coords.dtype == np.int32 and coords.shape[1] == 4
    assert feats.shape == (coords.shape[0], 4) and inverse.shape == (pts.shape[0],)
    # Every point falls in the voxel it is mapped to, and each voxel holds the mean of its points.
    vox = np.floor(pts[:, :3] / np.float32(0.05)).astype(np.int32)
    assert (coords[inverse, 1:] == vox).all()
    sums = np.zeros_like(feats, dtype=np.float64)
    np.add.at(sums, inverse, pts)
    counts = np.bincount(inverse, minlength=coords.shape[0])[:, None]
    assert np.allclose(feats, sums / counts, atol=1e-5)


def test_labels_match_the_command_line(tmp_path):
    out = tmp_path / "pred.label"
    r = subprocess.run(
        [str(cli_binary()), "--threads", "2", "segment", str(SCAN), "--model", str(MODEL), "--out-labels", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    want = np.fromfile(out, dtype=np.uint32)
    model = sparseconv.Model.load(MODEL, threads=2)
    got = model.segment(sparseconv.read_points(SCAN))
    assert got.dtype == np.uint32 and got.shape == want.shape
    assert (got == want).all()
    # Training ids and logits agree with the raw labels.
    train = model.segment(sparseconv.read_points(SCAN), train_ids=True)
    assert train.min() >= 1 and train.max() <= 19
    logits = model.logits(sparseconv.read_points(SCAN))
    assert logits.shape == (want.shape[0], sparseconv.NUM_CLASSES)
    assert (logits.argmax(axis=1) + 1 == train).all()


def offsets(k, step):
    """TorchSparse's offset order (odd sizes: z outermost, x fastest; even: x outermost)."""
    r = range(-(k - 1) // 2, (k - 1) // 2 + 1) if k % 2 else range(-(k // 2 - 1), k // 2 + 1)
    out = []
    for a in r:
        for b in r:
            for c in r:
                out.append((c * step, b * step, a * step) if k % 2 else (a * step, b * step, c * step))
    return out


def reference_conv(coords, feats, weight, k, stride, dilation, ts, outputs, sign, step):
    """Sum over offsets of W[k]ᵀ x[q + sign·δ_k] for every output q (numpy, float64)."""
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = np.zeros((len(outputs), weight.shape[2]))
    for o, q in enumerate(outputs.tolist()):
        for kk, d in enumerate(offsets(k, step)):
            p = (q[0], q[1] + sign * d[0], q[2] + sign * d[1], q[3] + sign * d[2])
            i = index.get(p)
            if i is not None:
                out[o] += feats[i].astype(np.float64) @ weight[kk].astype(np.float64)
    return out


def small_cloud(seed, n=300, c=5, half=6):
    rng = np.random.default_rng(seed)
    coords = np.unique(rng.integers(-half, half, size=(n, 3)), axis=0)
    coords = np.concatenate([np.zeros((len(coords), 1), dtype=np.int64), coords], axis=1).astype(np.int32)
    return coords, rng.standard_normal((len(coords), c)).astype(np.float32)


def by_coord(coords, feats):
    return {tuple(c): f for c, f in zip(coords.tolist(), feats)}


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 1, 2), (1, 1, 1), (2, 2, 1), (3, 2, 1)])
def test_conv_matches_numpy(k, stride, dilation):
    coords, feats = small_cloud(k * 10 + stride)
    rng = np.random.default_rng(7)
    weight = (0.3 * rng.standard_normal((k**3, 5, 7))).astype(np.float32)
    oc, of = sparseconv.conv(coords, feats, weight, k, stride=stride, dilation=dilation)
    if stride == 1:
        outputs = coords
    else:
        outputs = np.unique(np.concatenate([coords[:, :1], (coords[:, 1:] // stride) * stride], axis=1), axis=0)
    want = reference_conv(coords, feats, weight, k, stride, dilation, 1, outputs, 1, dilation)
    got = by_coord(oc, of)
    assert len(got) == len(outputs)
    for q, w in zip(outputs.tolist(), want):
        assert np.allclose(got[tuple(q)], w, rtol=1e-4, atol=1e-4)


def test_transposed_conv_matches_numpy():
    coords, feats = small_cloud(3, c=4)
    rng = np.random.default_rng(8)
    down = (0.3 * rng.standard_normal((8, 4, 6))).astype(np.float32)
    cc, cf = sparseconv.conv(coords, feats, down, 2, stride=2)
    up = (0.3 * rng.standard_normal((8, 6, 3))).astype(np.float32)
    oc, of = sparseconv.conv(cc, cf, up, 2, stride=2, transposed=True, target_coords=coords, tensor_stride=2)
    want = reference_conv(cc, cf, up, 2, 2, 1, 2, coords, -1, 1)
    got = by_coord(oc, of)
    assert len(got) == len(coords)
    for q, w in zip(coords.tolist(), want):
        assert np.allclose(got[tuple(q)], w, rtol=1e-4, atol=1e-4)


def test_pruned_models_load_and_prune_writes_a_smaller_one(tmp_path):
    shipped = sparseconv.Model.load(PRUNED, threads=2)
    assert shipped.widths == "16/8/24/40/88/88/48/32/48"
    out = tmp_path / "half.safetensors"
    widths = sparseconv.prune_model(MODEL, out, 0.5)
    # The same widths as `sparseconv prune MODEL --ratio 0.5` (its defaults: l1, round to 16).
    assert widths == "16/16/16/32/64/64/32/32/32"
    m = sparseconv.Model.load(out, threads=2)
    assert m.widths == widths
    assert os.path.getsize(out) < os.path.getsize(MODEL) * 4  # f32 copy of an f16 file, pruned
    labels = m.segment(sparseconv.read_points(SCAN))
    assert labels.shape == (124668,)


def test_the_engine_releases_the_gil():
    model = sparseconv.Model.load(MODEL, threads=2)
    pts = sparseconv.read_points(SCAN)
    ticks = [0]
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.01)
    before = ticks[0]
    model.segment(pts)
    during = ticks[0] - before
    done.set()
    t.join()
    assert during > 20, f"the counting thread ran {during} times while the engine worked"


def test_errors_raise_the_right_exception(tmp_path):
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        sparseconv.read_points("/nonexistent/scan.bin")
    with pytest.raises(FileNotFoundError):
        sparseconv.Model.load("/nonexistent/model.safetensors")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="bad.bin"):
        sparseconv.read_points(bad)
    notmodel = tmp_path / "junk.safetensors"
    notmodel.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}{}{")
    with pytest.raises(ValueError, match="junk.safetensors"):
        sparseconv.Model.load(notmodel)
    with pytest.raises(ValueError, match="device"):
        sparseconv.Model.load(MODEL, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        sparseconv.Model.load(MODEL, threads=0)
    with pytest.raises(ValueError, match="precision"):
        sparseconv.Model.load(MODEL, precision="f8")
    with pytest.raises(ValueError, match="GPU mode"):
        sparseconv.Model.load(MODEL, precision="f16")
    model = sparseconv.Model.load(MODEL, threads=1)
    with pytest.raises(ValueError, match="points"):
        model.segment(np.zeros((10, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="outside the supported range"):
        model.segment(np.full((3, 4), 1e12, dtype=np.float32))
    with pytest.raises(ValueError, match="voxel"):
        sparseconv.voxelize(np.zeros((3, 4), dtype=np.float32), -1.0)
    coords, feats = small_cloud(1)
    w = np.zeros((27, 5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="weight"):
        sparseconv.conv(coords, feats, w[:, :3], 3)
    with pytest.raises(ValueError, match="coords"):
        sparseconv.conv(coords[:, :3].copy(), feats, w, 3)
    with pytest.raises(ValueError, match="feats"):
        sparseconv.conv(coords, feats[:5], w, 3)
    with pytest.raises(ValueError, match="target_coords"):
        sparseconv.conv(coords, feats, w[:8], 2, stride=2, transposed=True)
    with pytest.raises(ValueError, match="kernel"):
        sparseconv.conv(coords, feats, w, 0)
    with pytest.raises(ValueError, match="ratio"):
        sparseconv.prune_model(MODEL, tmp_path / "x.safetensors", 1.5)
    with pytest.raises(ValueError, match="granularity"):
        sparseconv.prune_model(MODEL, tmp_path / "x.safetensors", 0.5, granularity="voxel")
    with pytest.raises(TypeError):
        sparseconv.voxelize(np.zeros((3, 4), dtype=np.float64), 0.05)
