//! The `sparseconv` binary end to end: results against the dense reference, and every kind of
//! bad input answered with one line on stderr and exit code 2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::io::tensors::{write, OutTensor, TensorFile};
use sparseconv::reference::{dense_conv, downsampled_coords};
use sparseconv::KernelSpec;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sparseconv"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparseconv-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

fn write_input(path: &Path, coords: &[[i32; 4]], feats: &[f32], c: usize) {
    let flat: Vec<i32> = coords.iter().flatten().copied().collect();
    write(
        path,
        vec![
            ("coords", OutTensor::I32(&flat, vec![coords.len(), 4])),
            ("feats", OutTensor::F32(feats, vec![coords.len(), c])),
        ],
        None,
    )
    .expect("write input");
}

fn write_weight(path: &Path, kernel: &[f32], shape: Vec<usize>, bias: Option<&[f32]>) {
    let mut t = vec![("kernel", OutTensor::F32(kernel, shape))];
    if let Some(b) = bias {
        t.push(("bias", OutTensor::F32(b, vec![b.len()])));
    }
    write(path, t, None).expect("write weight");
}

fn run_conv(args: &[&str]) -> (i32, String) {
    let out = bin().arg("conv").args(args).output().expect("run binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn conv_command_matches_dense_reference() {
    let coords = random_coords(5, 2, 8, 1, 0.3);
    let (cin, cout) = (6, 5);
    let feats = pseudo_random(coords.len() * cin, 1, 1.0);
    let input = tmp("in.safetensors");
    write_input(&input, &coords, &feats, cin);
    for (k, s, d, kmap) in [(3u32, 1u32, 1u32, "hash"), (3, 1, 2, "sort"), (2, 2, 1, "sort"), (3, 2, 1, "hash")] {
        let spec = KernelSpec::new(k, s, d).expect("spec");
        let kernel = pseudo_random(spec.volume() * cin * cout, 2, 0.3);
        let bias = pseudo_random(cout, 3, 0.1);
        let weight = tmp(&format!("w{k}{s}{d}.safetensors"));
        write_weight(&weight, &kernel, vec![spec.volume(), cin, cout], Some(&bias));
        let output = tmp(&format!("out{k}{s}{d}.safetensors"));
        let (code, err) = run_conv(&[
            "--input",
            input.to_str().expect("utf8"),
            "--weight",
            weight.to_str().expect("utf8"),
            "--kernel-size",
            &k.to_string(),
            "--stride",
            &s.to_string(),
            "--dilation",
            &d.to_string(),
            "--kmap",
            kmap,
            "--output",
            output.to_str().expect("utf8"),
        ]);
        assert_eq!(code, 0, "k{k} s{s} d{d}: {err}");
        let f = TensorFile::open(&output).expect("output");
        let oc = f.i32("coords", 2).expect("coords");
        let of = f.f32("feats", 2).expect("feats");
        assert_eq!(of.shape[1], cout);
        let outs: Vec<[i32; 4]> = oc.data.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
        let want_coords = if s == 1 { coords.clone() } else { downsampled_coords(&coords, s as i32) };
        assert_eq!(coord_set(&outs), coord_set(&want_coords));
        let want = dense_conv(&coords, &feats, cin, &outs, &kernel, cout, spec, 1, 1, Some(&bias));
        assert!(rel_err(&of.data, &want) < 2e-5, "k{k} s{s} d{d}");
    }
}

#[test]
fn bad_conv_input_is_one_line_and_exit_2() {
    let coords = random_coords(6, 1, 4, 1, 0.5);
    let feats = pseudo_random(coords.len() * 3, 1, 1.0);
    let good_in = tmp("good_in.safetensors");
    write_input(&good_in, &coords, &feats, 3);
    let good_w = tmp("good_w.safetensors");
    write_weight(&good_w, &pseudo_random(27 * 3 * 2, 2, 0.1), vec![27, 3, 2], None);
    let out = tmp("bad_out.safetensors");
    let g = |p: &Path| p.to_str().expect("utf8").to_string();

    let wrong_k = tmp("wrong_k.safetensors");
    write_weight(&wrong_k, &pseudo_random(8 * 3 * 2, 2, 0.1), vec![8, 3, 2], None);
    let wrong_cin = tmp("wrong_cin.safetensors");
    write_weight(&wrong_cin, &pseudo_random(27 * 4 * 2, 2, 0.1), vec![27, 4, 2], None);
    let wrong_bias = tmp("wrong_bias.safetensors");
    write_weight(&wrong_bias, &pseudo_random(27 * 3 * 2, 2, 0.1), vec![27, 3, 2], Some(&[0.0; 3]));
    let nan_w = tmp("nan_w.safetensors");
    let mut k = pseudo_random(27 * 3 * 2, 2, 0.1);
    k[5] = f32::NAN;
    write_weight(&nan_w, &k, vec![27, 3, 2], None);
    let dup = tmp("dup.safetensors");
    write_input(&dup, &[[0, 1, 2, 3], [0, 1, 2, 3]], &[0.0; 6], 3);
    let rows = tmp("rows.safetensors");
    let flat: Vec<i32> = coords.iter().flatten().copied().collect();
    write(
        &rows,
        vec![
            ("coords", OutTensor::I32(&flat, vec![coords.len(), 4])),
            ("feats", OutTensor::F32(&feats[..feats.len() - 3], vec![coords.len() - 1, 3])),
        ],
        None,
    )
    .expect("write");
    let far = tmp("far.safetensors");
    write_input(&far, &[[0, 1 << 20, 0, 0]], &[0.0; 3], 3);
    let junk = tmp("junk.safetensors");
    std::fs::write(&junk, b"\x05\x00\x00\x00\x00\x00\x00\x00hello").expect("write");
    let missing = tmp("missing.safetensors");

    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![g(&missing), g(&good_w), "3".into()], "missing.safetensors"),
        (vec![g(&junk), g(&good_w), "3".into()], "not a valid safetensors"),
        (vec![g(&good_in), g(&wrong_k), "3".into()], "expected [27, 3, Cout]"),
        (vec![g(&good_in), g(&wrong_cin), "3".into()], "expected [27, 3, Cout]"),
        (vec![g(&good_in), g(&wrong_bias), "3".into()], "bias"),
        (vec![g(&good_in), g(&nan_w), "3".into()], "NaN"),
        (vec![g(&dup), g(&good_w), "3".into()], "duplicate coordinate"),
        (vec![g(&rows), g(&good_w), "3".into()], "rows"),
        (vec![g(&far), g(&good_w), "3".into()], "grid units"),
        (vec![g(&good_in), g(&good_w), "0".into()], "kernel size"),
    ];
    for (args, needle) in cases {
        let (code, err) =
            run_conv(&["--input", &args[0], "--weight", &args[1], "--kernel-size", &args[2], "--output", &g(&out)]);
        assert_eq!(code, 2, "{needle}: exit code, stderr: {err}");
        assert!(err.contains(needle), "stderr `{err}` should mention `{needle}`");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Unknown option values are rejected by the argument parser, also with exit code 2.
    let (code, _) = run_conv(&[
        "--input",
        &g(&good_in),
        "--weight",
        &g(&good_w),
        "--kernel-size",
        "3",
        "--kmap",
        "tree",
        "--output",
        &g(&out),
    ]);
    assert_eq!(code, 2);
}

#[test]
fn stack_command_runs_and_rejects_bad_scans() {
    let out = bin()
        .args(["stack", repo("data/tiny/sequences/00/velodyne/000000.bin").to_str().expect("utf8"), "--repeat", "1"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("scans/s") && stdout.contains("Submanifold k3 s1 4->32"), "{stdout}");
    let empty = tmp("empty.bin");
    std::fs::write(&empty, b"").expect("write");
    for (p, needle) in [(empty, "no points"), (tmp("nope.bin"), "nope.bin")] {
        let o = bin().args(["stack", p.to_str().expect("utf8")]).output().expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let o = bin().args(["--threads", "0", "stack", "x.bin"]).output().expect("run");
    assert_eq!(o.status.code(), Some(2));
}
