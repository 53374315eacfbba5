//! Whole-network backward of the training-mode MinkUNet and SPVCNN (strided, transposed and
//! 1×1 convs, BatchNorm with batch statistics, ReLU, residual adds, skip concats, SPVCNN's
//! point MLPs, trilinear devoxelization and point-to-voxel averaging, classifier, loss) against
//! f64 finite differences of an independent dense-grid reference of the same network, on a
//! small random two-scan cloud with negative coordinates.

mod common;

use std::collections::HashMap;

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::reference::{dense_conv_f64, downsampled_coords};
use sparseconv::train::net::TrainNet;
use sparseconv::train::ops::cross_entropy;
use sparseconv::voxel_prune::VoxelPlan;
use sparseconv::{Engine, KernelSpec};

const CLASSES: usize = 5;

type P = HashMap<String, (Vec<usize>, Vec<f64>)>;

struct F {
    coords: Vec<[i32; 4]>,
    stride: i32,
    f: Vec<f64>,
    c: usize,
}

fn w<'a>(p: &'a P, n: &str) -> &'a (Vec<usize>, Vec<f64>) {
    p.get(n).unwrap_or_else(|| panic!("reference needs `{n}`"))
}

fn conv(p: &P, name: &str, x: &F, outs: &[[i32; 4]], k: u32, s: u32, sign: i32, out_stride: i32) -> F {
    let (shape, kernel) = w(p, name);
    let cout = *shape.last().expect("shape");
    let stride = if sign > 0 { x.stride } else { out_stride };
    let spec = KernelSpec::new(k, s, 1).expect("spec");
    let f = dense_conv_f64(&x.coords, &x.f, x.c, outs, kernel, cout, spec, stride, sign, None);
    F { coords: outs.to_vec(), stride: out_stride, f, c: cout }
}

/// Training-mode BatchNorm (biased batch variance, eps 1e-5), optional ReLU.
fn bn(p: &P, pre: &str, x: &mut F, relu: bool) {
    let (g, b) = (&w(p, &format!("{pre}.weight")).1, &w(p, &format!("{pre}.bias")).1);
    let n = x.coords.len() as f64;
    for j in 0..x.c {
        let m = x.f.iter().skip(j).step_by(x.c).sum::<f64>() / n;
        let v = x.f.iter().skip(j).step_by(x.c).map(|a| (a - m).powi(2)).sum::<f64>() / n;
        for r in 0..x.coords.len() {
            let y = (x.f[r * x.c + j] - m) / (v + 1e-5).sqrt() * g[j] + b[j];
            x.f[r * x.c + j] = if relu { y.max(0.0) } else { y };
        }
    }
}

thread_local! {
    /// Voxel pruning ratio of every residual block's convs in the reference (0: none).
    static VOXEL: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Rows a voxel-pruned conv computes: per batch item, the `n − ⌊r·n⌋` rows of largest mean
/// |feature| (ties to the lower row), as `sparseconv::voxel_prune` documents.
fn kept(x: &F, r: f64) -> Vec<bool> {
    let score: Vec<f64> = x.f.chunks(x.c).map(|row| row.iter().map(|v| v.abs()).sum::<f64>() / x.c as f64).collect();
    let mut keep = vec![false; x.coords.len()];
    let batches: std::collections::BTreeSet<i32> = x.coords.iter().map(|c| c[0]).collect();
    for b in batches {
        let mut rows: Vec<usize> = (0..x.coords.len()).filter(|&i| x.coords[i][0] == b).collect();
        let n = rows.len();
        let k = n - ((r as f32 as f64 * n as f64).floor() as usize);
        rows.sort_by(|&a, &c| score[c].total_cmp(&score[a]).then(a.cmp(&c)));
        rows[..k].iter().for_each(|&i| keep[i] = true);
    }
    keep
}

/// A voxel-pruned conv + training BatchNorm (statistics of the computed rows only) + optional
/// residual and ReLU; the other rows get the input (equal widths) or the activated residual / 0.
fn pruned_conv_bn(p: &P, kernel: &str, bn_pre: &str, x: &F, res: Option<&[f64]>, r: f64) -> F {
    let keep = kept(x, r);
    let mut y = conv(p, kernel, x, &x.coords, 3, 1, 1, x.stride);
    let rows: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
    let c = y.c;
    let mut sub = F {
        coords: rows.iter().map(|&i| y.coords[i]).collect(),
        stride: y.stride,
        f: rows.iter().flat_map(|&i| y.f[i * c..(i + 1) * c].to_vec()).collect(),
        c,
    };
    bn(p, bn_pre, &mut sub, false);
    for (j, &i) in rows.iter().enumerate() {
        for k in 0..c {
            let v = sub.f[j * c + k] + res.map_or(0.0, |r| r[i * c + k]);
            y.f[i * c + k] = v.max(0.0);
        }
    }
    for i in (0..keep.len()).filter(|&i| !keep[i]) {
        for k in 0..c {
            y.f[i * c + k] = if x.c == c { x.f[i * c + k] } else { res.map_or(0.0, |r| r[i * c + k].max(0.0)) };
        }
    }
    y
}

/// A block's shortcut: its 1×1 conv + BatchNorm, or the input.
fn shortcut(p: &P, pre: &str, x: &F) -> Vec<f64> {
    if p.contains_key(&format!("{pre}.downsample.0.kernel")) {
        let mut s = conv(p, &format!("{pre}.downsample.0.kernel"), x, &x.coords, 1, 1, 1, x.stride);
        bn(p, &format!("{pre}.downsample.1"), &mut s, false);
        s.f
    } else {
        x.f.clone()
    }
}

fn residual(p: &P, pre: &str, x: &F) -> F {
    let r = VOXEL.with(|v| v.get());
    if r > 0.0 {
        let h = pruned_conv_bn(p, &format!("{pre}.net.0.kernel"), &format!("{pre}.net.1"), x, None, r);
        let sc = shortcut(p, pre, x);
        return pruned_conv_bn(p, &format!("{pre}.net.3.kernel"), &format!("{pre}.net.4"), &h, Some(&sc), r);
    }
    let mut h = conv(p, &format!("{pre}.net.0.kernel"), x, &x.coords, 3, 1, 1, x.stride);
    bn(p, &format!("{pre}.net.1"), &mut h, true);
    let mut y = conv(p, &format!("{pre}.net.3.kernel"), &h, &x.coords, 3, 1, 1, x.stride);
    bn(p, &format!("{pre}.net.4"), &mut y, false);
    let sc = shortcut(p, pre, x);
    y.f.iter_mut().zip(&sc).for_each(|(a, b)| *a = (*a + b).max(0.0));
    y
}

/// Stem, the four down stages (the first from `first(stem output)` when given) and the skips.
fn encode(p: &P, x0: &F, first: impl Fn(&F) -> Option<F>) -> (F, Vec<F>) {
    let mut h = conv(p, "stem.0.kernel", x0, &x0.coords, 3, 1, 1, 1);
    bn(p, "stem.1", &mut h, true);
    let mut h2 = conv(p, "stem.3.kernel", &h, &h.coords, 3, 1, 1, 1);
    bn(p, "stem.4", &mut h2, true);
    let mut skips = Vec::new();
    let mut h = match first(&h2) {
        Some(f) => {
            skips.push(h2);
            f
        }
        None => h2,
    };
    for s in 1..=4 {
        let outs = downsampled_coords(&h.coords, h.stride * 2);
        let mut d = conv(p, &format!("stage{s}.0.net.0.kernel"), &h, &outs, 2, 2, 1, h.stride * 2);
        bn(p, &format!("stage{s}.0.net.1"), &mut d, true);
        if skips.len() < s {
            skips.push(h);
        }
        h = residual(p, &format!("stage{s}.1"), &d);
        h = residual(p, &format!("stage{s}.2"), &h);
    }
    (h, skips)
}

/// Up stage `u` (1-based): transposed conv onto the skip, concat, two residual blocks.
fn up(p: &P, u: usize, h: &F, skip: &F) -> F {
    let mut up = conv(p, &format!("up{u}.0.net.0.kernel"), h, &skip.coords, 2, 2, -1, skip.stride);
    bn(p, &format!("up{u}.0.net.1"), &mut up, true);
    let c = up.c + skip.c;
    let mut f = Vec::new();
    for i in 0..skip.coords.len() {
        f.extend_from_slice(&up.f[i * up.c..(i + 1) * up.c]);
        f.extend_from_slice(&skip.f[i * skip.c..(i + 1) * skip.c]);
    }
    let cat = F { coords: skip.coords.clone(), stride: skip.stride, f, c };
    let h = residual(p, &format!("up{u}.1.0"), &cat);
    residual(p, &format!("up{u}.1.1"), &h)
}

/// Mean cross-entropy over labels != 0 (logit j = class j+1) of the classifier on `h` (`[N, c]`).
fn head_loss(p: &P, h: &[f64], c: usize, labels: &[u32]) -> f64 {
    let (lw, lb) = (&w(p, "classifier.0.weight").1, &w(p, "classifier.0.bias").1);
    let (mut total, mut count) = (0.0, 0.0);
    for (r, &l) in labels.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let z: Vec<f64> =
            (0..CLASSES).map(|o| lb[o] + (0..c).map(|i| h[r * c + i] * lw[o * c + i]).sum::<f64>()).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - z[l as usize - 1];
        count += 1.0;
    }
    total / count
}

/// Loss of the f64 reference MinkUNet.
fn reference_loss(p: &P, x0: &F, labels: &[u32]) -> f64 {
    let (mut h, mut skips) = encode(p, x0, |_| None);
    for u in 1..=4 {
        h = up(p, u, &h, &skips.pop().expect("skip"));
    }
    head_loss(p, &h.f, h.c, labels)
}

/// Trilinear interpolation of `x` at integer points `pts` (batch, x, y, z): the 8 voxels of
/// stride `s` around `s·floor(p/s)`, weights by distance, renormalized over those present.
fn devoxelize(x: &F, pts: &[[i32; 4]]) -> Vec<f64> {
    let s = x.stride;
    let row: HashMap<[i32; 4], usize> = x.coords.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let mut out = vec![0.0; pts.len() * x.c];
    for (i, q) in pts.iter().enumerate() {
        let lo: [i32; 3] = std::array::from_fn(|a| q[a + 1].div_euclid(s) * s);
        let mut taps = Vec::new();
        for j in 0..8 {
            let d = [(j >> 2) & 1, (j >> 1) & 1, j & 1];
            let c = [q[0], lo[0] + d[0] * s, lo[1] + d[1] * s, lo[2] + d[2] * s];
            if let Some(&r) = row.get(&c) {
                let f = |a: usize| {
                    let (p, l) = (q[a + 1] as f64, lo[a] as f64);
                    if d[a] == 1 {
                        p - l
                    } else {
                        l + s as f64 - p
                    }
                };
                taps.push((r, f(0) * f(1) * f(2) / (s as f64).powi(3)));
            }
        }
        let sum: f64 = taps.iter().map(|t| t.1).sum::<f64>() + 1e-8;
        for (r, wt) in taps {
            for k in 0..x.c {
                out[i * x.c + k] += wt / sum * x.f[r * x.c + k];
            }
        }
    }
    out
}

/// Average point features `f` (`[P, c]`) into the voxels of `x` (`s·floor(p/s)`).
fn voxelize_points(x: &F, pts: &[[i32; 4]], f: &[f64], c: usize) -> F {
    let s = x.stride;
    let row: HashMap<[i32; 4], usize> = x.coords.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let (mut sum, mut n) = (vec![0.0; x.coords.len() * c], vec![0.0; x.coords.len()]);
    for (i, q) in pts.iter().enumerate() {
        let key = [q[0], q[1].div_euclid(s) * s, q[2].div_euclid(s) * s, q[3].div_euclid(s) * s];
        if let Some(&r) = row.get(&key) {
            n[r] += 1.0;
            for k in 0..c {
                sum[r * c + k] += f[i * c + k];
            }
        }
    }
    let f = sum.iter().enumerate().map(|(i, v)| if n[i / c] > 0.0 { v / n[i / c] } else { 0.0 }).collect();
    F { coords: x.coords.clone(), stride: s, f, c }
}

/// SPVCNN point MLP `i`: Linear, BatchNorm over the points (batch statistics), ReLU.
fn point_mlp(p: &P, i: usize, f: &[f64], cin: usize) -> Vec<f64> {
    let (shape, wt) = w(p, &format!("point_transforms.{i}.0.weight"));
    let b = &w(p, &format!("point_transforms.{i}.0.bias")).1;
    let cout = shape[0];
    let n = f.len() / cin;
    let mut y = F { coords: vec![[0; 4]; n], stride: 1, f: vec![0.0; n * cout], c: cout };
    for r in 0..n {
        for o in 0..cout {
            y.f[r * cout + o] = b[o] + (0..cin).map(|j| f[r * cin + j] * wt[o * cin + j]).sum::<f64>();
        }
    }
    bn(p, &format!("point_transforms.{i}.1"), &mut y, true);
    y.f
}

/// Loss of the f64 reference SPVCNN, whose points are the voxels of `x0`.
fn reference_loss_spvcnn(p: &P, x0: &F, labels: &[u32]) -> f64 {
    let pts = &x0.coords;
    // Points read the stem output; their average starts the encoder.
    let z0 = std::cell::RefCell::new((Vec::new(), 0));
    let (mut h, mut skips) = encode(p, x0, |stem| {
        let f = devoxelize(stem, pts);
        let first = voxelize_points(stem, pts, &f, stem.c);
        *z0.borrow_mut() = (f, stem.c);
        Some(first)
    });
    let (mut z, mut zc) = z0.into_inner();
    let meet = |h: &F, z: &mut Vec<f64>, zc: &mut usize, i: usize| {
        let m = point_mlp(p, i, z, *zc);
        *z = devoxelize(h, pts).iter().zip(&m).map(|(a, b)| a + b).collect();
        *zc = h.c;
    };
    for u in 1..=4 {
        if u == 1 || u == 3 {
            meet(&h, &mut z, &mut zc, if u == 1 { 0 } else { 1 });
            h = voxelize_points(&h, pts, &z, zc);
        }
        h = up(p, u, &h, &skips.pop().expect("skip"));
    }
    meet(&h, &mut z, &mut zc, 2);
    head_loss(p, &z, zc, labels)
}

/// The training net's gradients of every trainable tensor against central differences of
/// `reference` along a random direction per tensor.
fn check_network(arch: &str, reference: fn(&P, &F, &[u32]) -> f64) {
    check_network_pruned(arch, reference, 0.0)
}

fn check_network_pruned(arch: &str, reference: fn(&P, &F, &[u32]) -> f64, voxel: f64) {
    // Width 1/8 of SPVNAS: channels 4, 4, 8, 16, 32, 32, 16, 12, 12.
    let ck = Checkpoint::random(11);
    let mut net = TrainNet::load_arch(arch, &ck, 0.125, CLASSES).expect("net");
    VOXEL.with(|v| v.set(voxel));
    if voxel > 0.0 {
        let names: Vec<String> = net.desc.block_convs().iter().map(|c| c.kernel.clone()).collect();
        let plan = VoxelPlan::uniform(names.iter().map(String::as_str), voxel as f32).expect("plan");
        net.set_voxel_plan(&plan).expect("voxel plan");
    }
    let x = random_tensor(5, 2, 14, 1, 0.3, 4);
    let labels: Vec<u32> =
        pseudo_random(x.len(), 3, 1.0).iter().map(|v| ((v + 1.0) * 3.0) as u32 % (CLASSES as u32 + 1)).collect();
    assert!(labels.contains(&0), "the ignore label is exercised");
    let e = Engine::default();
    let params = net.params.clone();
    let (logits, tape) = net.forward(&e, x.clone()).expect("forward");
    let (loss, dlogits) = cross_entropy(&logits, CLASSES, &labels, None).expect("loss");
    let grads = net.backward(&e, &tape, &dlogits).expect("backward");

    let mut p: P = (0..params.len())
        .map(|i| {
            let v = params.values[i].iter().map(|&a| a as f64).collect();
            (params.name(i).to_string(), (params.shape(i).to_vec(), v))
        })
        .collect();
    let x0 = F { coords: x.coords().to_vec(), stride: 1, f: x.feats().iter().map(|&a| a as f64).collect(), c: 4 };
    let l0 = reference(&p, &x0, &labels);
    assert!((l0 - loss).abs() < 1e-4 * l0, "{arch} forward: reference loss {l0} vs {loss}");

    let mut bad = Vec::new();
    let mut checked = 0;
    for i in (0..params.len()).filter(|&i| params.trainable(i)) {
        // Directional derivative along a random direction within tensor i.
        let name = params.name(i).to_string();
        let dir = pseudo_random(params.values[i].len(), 100 + i as u64, 1.0);
        let analytic: f64 = grads[i].iter().zip(&dir).map(|(&g, &d)| g as f64 * d as f64).sum();
        let base = p[&name].1.clone();
        // Small enough that no ReLU changes side (larger steps do, visibly), large enough for f64.
        let h = 1e-8;
        let mut at = |s: f64| {
            p.get_mut(&name).expect("name").1 = base.iter().zip(&dir).map(|(&a, &d)| a + s * h * d as f64).collect();
            reference(&p, &x0, &labels)
        };
        let numeric = (at(1.0) - at(-1.0)) / (2.0 * h);
        p.get_mut(&name).expect("name").1 = base;
        if (analytic - numeric).abs() > 1e-3 * analytic.abs().max(numeric.abs()) + 1e-6 {
            bad.push(format!("{name}: analytic {analytic} vs finite difference {numeric}"));
        }
        checked += 1;
    }
    assert!(bad.is_empty(), "{arch}: {} of {checked} tensors disagree:\n{}", bad.len(), bad.join("\n"));
    assert!(checked > 100, "{arch}: every trainable tensor checked ({checked})");
}

#[test]
fn minkunet_backward_matches_f64_finite_differences() {
    check_network("minkunet", reference_loss);
}

#[test]
fn spvcnn_backward_matches_f64_finite_differences() {
    check_network("spvcnn", reference_loss_spvcnn);
}

/// Training with voxel pruning: the selection is a constant of the step; the computed rows'
/// BatchNorm statistics, the passed-through inputs and the shortcut-only rows all carry
/// gradient, against the f64 reference that prunes the same voxels.
#[test]
fn voxel_pruned_minkunet_backward_matches_f64_finite_differences() {
    check_network_pruned("minkunet", reference_loss, 0.4);
}
