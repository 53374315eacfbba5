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
        let mut up = conv(w, &format!("up{u}.0.net.0.kernel"), &h, &skip.coords, 2, 2, -1, skip.stride);
        bn(w, &format!("up{u}.0.net.1"), &mut up, true);
        let c = up.c + skip.c;
        let mut f = Vec::with_capacity(up.coords.len() * c);
        for i in 0..up.coords.len() {
            f.extend_from_slice(&up.f[i * up.c..(i + 1) * up.c]);
            f.extend_from_slice(&skip.f[i * skip.c..(i + 1) * skip.c]);
        }
        let cat = Feat { coords: skip.coords.clone(), stride: skip.stride, f, c };
        h = residual(w, &format!("up{u}.1.0"), &cat);
        h = residual(w, &format!("up{u}.1.1"), &h);
    }
    let lw = t(w, "classifier.0.weight");
    let lb = &t(w, "classifier.0.bias").data;
    let (nc, cin) = (lw.shape[0], lw.shape[1]);
    let mut out = vec![0f32; h.coords.len() * nc];
    for i in 0..h.coords.len() {
        for o in 0..nc {
            let mut acc = lb[o] as f64;
            for j in 0..cin {
                acc += h.f[i * cin + j] as f64 * lw.data[o * cin + j] as f64;
            }
            out[i * nc + o] = acc as f32;
        }
    }
    out
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
    for st in strategies() {
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
