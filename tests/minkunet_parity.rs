//! MinkUNet logits against an independent implementation of the same network: every conv
//! as a dense-grid convolution, BatchNorm unfolded, coordinates computed separately, on a
//! crop of the real scan, with the same (synthetic) TorchSparse-named weights.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;
use sparseconv::io::tensors::Tensor;
use sparseconv::nn::checkpoint::{save, Checkpoint};
use sparseconv::nn::minkunet::{channels, MinkUNet};
use sparseconv::reference::{dense_conv, downsampled_coords};
use sparseconv::{KernelSpec, SparseTensor};

type W = BTreeMap<String, Tensor<f32>>;

struct Feat {
    coords: Vec<[i32; 4]>,
    stride: i32,
    f: Vec<f32>,
    c: usize,
}

fn t<'a>(w: &'a W, name: &str) -> &'a Tensor<f32> {
    w.get(name).unwrap_or_else(|| panic!("reference needs `{name}`"))
}

fn conv(w: &W, name: &str, x: &Feat, outs: &[[i32; 4]], k: u32, s: u32, sign: i32, out_stride: i32) -> Feat {
    let kt = t(w, name);
    let cout = *kt.shape.last().expect("shape");
    let spec = KernelSpec::new(k, s, 1).expect("spec");
    let stride = if sign > 0 { x.stride } else { out_stride };
    let f = dense_conv(&x.coords, &x.f, x.c, outs, &kt.data, cout, spec, stride, sign, None);
    Feat { coords: outs.to_vec(), stride: out_stride, f, c: cout }
}

fn bn(w: &W, p: &str, x: &mut Feat, relu: bool) {
    let g = &t(w, &format!("{p}.weight")).data;
    let b = &t(w, &format!("{p}.bias")).data;
    let m = &t(w, &format!("{p}.running_mean")).data;
    let v = &t(w, &format!("{p}.running_var")).data;
    for (i, val) in x.f.iter_mut().enumerate() {
        let j = i % x.c;
        let y = (*val as f64 - m[j] as f64) / (v[j] as f64 + 1e-5).sqrt() * g[j] as f64 + b[j] as f64;
        *val = if relu { y.max(0.0) as f32 } else { y as f32 };
    }
}

fn residual(w: &W, p: &str, x: &Feat) -> Feat {
    let mut h = conv(w, &format!("{p}.net.0.kernel"), x, &x.coords, 3, 1, 1, x.stride);
    bn(w, &format!("{p}.net.1"), &mut h, true);
    let mut y = conv(w, &format!("{p}.net.3.kernel"), &h, &x.coords, 3, 1, 1, x.stride);
    bn(w, &format!("{p}.net.4"), &mut y, false);
    let sc = if w.contains_key(&format!("{p}.downsample.0.kernel")) {
        let mut s = conv(w, &format!("{p}.downsample.0.kernel"), x, &x.coords, 1, 1, 1, x.stride);
        bn(w, &format!("{p}.downsample.1"), &mut s, false);
        s
    } else {
        Feat { coords: x.coords.clone(), stride: x.stride, f: x.f.clone(), c: x.c }
    };
    for (a, b) in y.f.iter_mut().zip(&sc.f) {
        *a = (*a + *b).max(0.0);
    }
    y
}

/// Transposed conv + BN + ReLU onto the skip's coordinates, concat, two residual blocks.
fn up_stage(w: &W, u: usize, h: &Feat, skip: &Feat) -> Feat {
    let mut up = conv(w, &format!("up{u}.0.net.0.kernel"), h, &skip.coords, 2, 2, -1, skip.stride);
    bn(w, &format!("up{u}.0.net.1"), &mut up, true);
    let c = up.c + skip.c;
    let mut f = Vec::with_capacity(up.coords.len() * c);
    for i in 0..up.coords.len() {
        f.extend_from_slice(&up.f[i * up.c..(i + 1) * up.c]);
        f.extend_from_slice(&skip.f[i * skip.c..(i + 1) * skip.c]);
    }
    let cat = Feat { coords: skip.coords.clone(), stride: skip.stride, f, c };
    let h = residual(w, &format!("up{u}.1.0"), &cat);
    residual(w, &format!("up{u}.1.1"), &h)
}

/// The linear classifier in f64.
fn classify(w: &W, f: &[f32], n: usize) -> Vec<f32> {
    let lw = t(w, "classifier.0.weight");
    let lb = &t(w, "classifier.0.bias").data;
    let (nc, cin) = (lw.shape[0], lw.shape[1]);
    let mut out = vec![0f32; n * nc];
    for i in 0..n {
        for o in 0..nc {
            let mut acc = lb[o] as f64;
            for j in 0..cin {
                acc += f[i * cin + j] as f64 * lw.data[o * cin + j] as f64;
            }
            out[i * nc + o] = acc as f32;
        }
    }
    out
}

fn reference_forward(w: &W, x0: Feat) -> Vec<f32> {
    let mut h = conv(w, "stem.0.kernel", &x0, &x0.coords, 3, 1, 1, 1);
    bn(w, "stem.1", &mut h, true);
    let mut h2 = conv(w, "stem.3.kernel", &h, &h.coords, 3, 1, 1, 1);
    bn(w, "stem.4", &mut h2, true);
    let mut h = h2;
    let mut skips = Vec::new();
    for s in 1..=4 {
        let outs = downsampled_coords(&h.coords, h.stride * 2);
        let mut d = conv(w, &format!("stage{s}.0.net.0.kernel"), &h, &outs, 2, 2, 1, h.stride * 2);
        bn(w, &format!("stage{s}.0.net.1"), &mut d, true);
        skips.push(h);
        h = residual(w, &format!("stage{s}.1"), &d);
        h = residual(w, &format!("stage{s}.2"), &h);
    }
    for u in 1..=4 {
        let skip = skips.pop().expect("skip");
        h = up_stage(w, u, &h, &skip);
    }
    classify(w, &h.f, h.coords.len())
}

/// Voxels of the real scan inside a box in front of the car (negative y included).
fn cropped_scan() -> SparseTensor {
    let vox = real_scan();
    let (mut coords, mut feats) = (Vec::new(), Vec::new());
    for (i, c) in vox.tensor.coords().iter().enumerate() {
        if (60..130).contains(&c[1]) && (-60..40).contains(&c[2]) {
            coords.push(*c);
            feats.extend_from_slice(&vox.tensor.feats()[i * 4..(i + 1) * 4]);
        }
    }
    SparseTensor::from_parts(coords, feats, 4).expect("crop")
}

#[test]
fn minkunet_matches_independent_reference_on_real_scan_crop() {
    let x = cropped_scan();
    assert!(x.len() > 1000, "crop too small: {} voxels", x.len());
    let cr = 0.5;
    // Synthesise TorchSparse-named weights, save them, and load them back from the file.
    let synth = Checkpoint::random(7);
    MinkUNet::load(&synth, cr, 19).expect("shapes");
    let weights = synth.synthesized();
    assert_eq!(weights["stem.0.kernel"].shape, vec![27, 4, 16]);
    assert_eq!(weights["stage1.0.net.0.kernel"].shape, vec![8, 16, 16]);
    assert_eq!(weights["stage2.1.downsample.0.kernel"].shape, vec![16, 32]);
    assert_eq!(weights["classifier.0.weight"].shape, vec![19, 48]);
    assert!(!weights.contains_key("stage1.1.downsample.0.kernel"), "identity shortcut at equal widths");
    let dir = std::env::temp_dir().join(format!("sparseconv-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("minkunet.safetensors");
    save(&path, &weights, HashMap::new(), false).expect("save");
    let model = MinkUNet::load(&Checkpoint::load(&path).expect("load"), cr, 19).expect("model");
    let want =
        reference_forward(&weights, Feat { coords: x.coords().to_vec(), stride: 1, f: x.feats().to_vec(), c: 4 });
    // The reference is not degenerate: logits vary across voxels and classes.
    let spread = want.iter().fold(f32::MIN, |a, &b| a.max(b)) - want.iter().fold(f32::MAX, |a, &b| a.min(b));
    assert!(spread > 1.0, "reference logits nearly constant (spread {spread})");
    eprintln!("parity crop: {} voxels, logit spread {spread}", x.len());
    for st in cpu_strategies() {
        let got = model.forward(&st.engine, &x).expect("forward");
        let e = rel_err(&got, &want);
        assert!(e < 1e-3, "{}: logits differ from the reference: rel err {e}", st.label);
        eprintln!("{}: rel err {e:.2e}", st.label);
    }
    assert_eq!(channels(cr).expect("cr"), [16, 16, 32, 64, 128, 128, 64, 48, 48]);
}

#[test]
fn checkpoints_for_another_width_or_arch_are_rejected() {
    let synth = Checkpoint::random(1);
    MinkUNet::load(&synth, 0.5, 19).expect("shapes");
    let mut weights = synth.synthesized();
    let dir = std::env::temp_dir().join(format!("sparseconv-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("w.safetensors");
    save(&path, &weights, HashMap::new(), true).expect("save f16");
    MinkUNet::load(&Checkpoint::load(&path).expect("load"), 0.5, 19).expect("f16 weights load");
    let e = MinkUNet::load(&Checkpoint::load(&path).expect("load"), 1.0, 19).expect_err("cr 1.0");
    assert!(e.to_string().contains("stem.0.kernel") && e.to_string().contains("[27, 4, 32]"), "{e}");
    weights.insert("head.extra".into(), Tensor { shape: vec![2], data: vec![0.0; 2] });
    save(&path, &weights, HashMap::new(), false).expect("save");
    let e = MinkUNet::load(&Checkpoint::load(&path).expect("load"), 0.5, 19).expect_err("unknown");
    assert!(e.to_string().contains("unknown tensor `head.extra`"), "{e}");
    weights.remove("head.extra");
    weights.remove("up4.1.1.net.4.running_var");
    save(&path, &weights, HashMap::new(), false).expect("save");
    let e = MinkUNet::load(&Checkpoint::load(&path).expect("load"), 0.5, 19).expect_err("missing");
    assert!(e.to_string().contains("missing tensor `up4.1.1.net.4.running_var`"), "{e}");
}

/// Trilinear voxel→point by brute force over a BTreeMap (independent of the engine's hashing).
fn v2p_ref(x: &Feat, pts: &[[i32; 4]]) -> Vec<f32> {
    let idx: BTreeMap<[i32; 4], usize> = x.coords.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let s = x.stride;
    let mut out = vec![0f32; pts.len() * x.c];
    for (i, p) in pts.iter().enumerate() {
        let lo: Vec<i32> = (1..4).map(|a| p[a].div_euclid(s) * s).collect();
        let mut ws = Vec::new();
        for dx in 0..2 {
            for dy in 0..2 {
                for dz in 0..2 {
                    let d = [dx, dy, dz];
                    let q = [p[0], lo[0] + dx * s, lo[1] + dy * s, lo[2] + dz * s];
                    if let Some(&r) = idx.get(&q) {
                        let w: f64 = (0..3)
                            .map(|a| {
                                let (pa, la) = (p[a + 1] as f64, lo[a] as f64);
                                if d[a] == 1 {
                                    pa - la
                                } else {
                                    la + s as f64 - pa
                                }
                            })
                            .product::<f64>()
                            / (s as f64).powi(3);
                        ws.push((r, w));
                    }
                }
            }
        }
        let sum: f64 = ws.iter().map(|x| x.1).sum::<f64>() + 1e-8;
        for (r, w) in ws {
            for j in 0..x.c {
                out[i * x.c + j] += (w / sum * x.f[r * x.c + j] as f64) as f32;
            }
        }
    }
    out
}

fn p2v_ref(x: &Feat, pts: &[[i32; 4]], pf: &[f32], c: usize) -> Feat {
    let idx: BTreeMap<[i32; 4], usize> = x.coords.iter().enumerate().map(|(i, &q)| (q, i)).collect();
    let s = x.stride;
    let mut sum = vec![0f64; x.coords.len() * c];
    let mut n = vec![0usize; x.coords.len()];
    for (i, p) in pts.iter().enumerate() {
        let q = [p[0], p[1].div_euclid(s) * s, p[2].div_euclid(s) * s, p[3].div_euclid(s) * s];
        if let Some(&r) = idx.get(&q) {
            n[r] += 1;
            for j in 0..c {
                sum[r * c + j] += pf[i * c + j] as f64;
            }
        }
    }
    let f =
        (0..x.coords.len() * c).map(|k| if n[k / c] == 0 { 0.0 } else { (sum[k] / n[k / c] as f64) as f32 }).collect();
    Feat { coords: x.coords.clone(), stride: s, f, c }
}

fn mlp_ref(w: &W, i: usize, f: &[f32], cin: usize) -> Vec<f32> {
    let lw = t(w, &format!("point_transforms.{i}.0.weight"));
    let lb = &t(w, &format!("point_transforms.{i}.0.bias")).data;
    let cout = lw.shape[0];
    let n = f.len() / cin;
    let mut h = Feat { coords: vec![[0; 4]; n], stride: 1, f: vec![0.0; n * cout], c: cout };
    for r in 0..n {
        for o in 0..cout {
            let mut acc = lb[o] as f64;
            for j in 0..cin {
                acc += f[r * cin + j] as f64 * lw.data[o * cin + j] as f64;
            }
            h.f[r * cout + o] = acc as f32;
        }
    }
    bn(w, &format!("point_transforms.{i}.1"), &mut h, true);
    h.f
}

fn spvcnn_reference(w: &W, x0: Feat) -> Vec<f32> {
    let pts = x0.coords.clone();
    let mut h = conv(w, "stem.0.kernel", &x0, &x0.coords, 3, 1, 1, 1);
    bn(w, "stem.1", &mut h, true);
    let mut s0 = conv(w, "stem.3.kernel", &h, &h.coords, 3, 1, 1, 1);
    bn(w, "stem.4", &mut s0, true);
    let z0 = v2p_ref(&s0, &pts);
    let c0 = s0.c;
    let mut h = p2v_ref(&s0, &pts, &z0, c0);
    let mut skips = vec![s0];
    for s in 1..=4 {
        let outs = downsampled_coords(&h.coords, h.stride * 2);
        let mut d = conv(w, &format!("stage{s}.0.net.0.kernel"), &h, &outs, 2, 2, 1, h.stride * 2);
        bn(w, &format!("stage{s}.0.net.1"), &mut d, true);
        h = residual(w, &format!("stage{s}.1"), &d);
        h = residual(w, &format!("stage{s}.2"), &h);
        if s < 4 {
            skips.push(Feat { coords: h.coords.clone(), stride: h.stride, f: h.f.clone(), c: h.c });
        }
    }
    let (mut zf, mut zc) = (z0, c0);
    let mut mi = 0;
    for u in 1..=4 {
        if u == 1 || u == 3 {
            let mut f = v2p_ref(&h, &pts);
            for (a, m) in f.iter_mut().zip(mlp_ref(w, mi, &zf, zc)) {
                *a += m;
            }
            mi += 1;
            zc = h.c;
            zf = f;
            h = p2v_ref(&h, &pts, &zf, zc);
        }
        let skip = skips.pop().expect("skip");
        h = up_stage(w, u, &h, &skip);
    }
    let mut f = v2p_ref(&h, &pts);
    for (a, m) in f.iter_mut().zip(mlp_ref(w, 2, &zf, zc)) {
        *a += m;
    }
    classify(w, &f, pts.len())
}

#[test]
fn spvcnn_matches_independent_reference_on_real_scan_crop() {
    use sparseconv::pipeline::Model;
    let x = cropped_scan();
    let synth = Checkpoint::random(11);
    let model = Model::load_arch("spvcnn", &synth, 0.5, 19).expect("spvcnn");
    let weights = synth.synthesized();
    assert_eq!(weights["point_transforms.0.0.weight"].shape, vec![128, 16]);
    assert_eq!(weights["point_transforms.2.1.running_var"].shape, vec![48]);
    let want = spvcnn_reference(&weights, Feat { coords: x.coords().to_vec(), stride: 1, f: x.feats().to_vec(), c: 4 });
    for st in cpu_strategies() {
        let got = model.forward(&st.engine, &x).expect("forward");
        let e = rel_err(&got, &want);
        assert!(e < 1e-3, "{}: SPVCNN logits differ from the reference: rel err {e}", st.label);
    }
}
