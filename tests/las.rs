//! LAS/LAZ reading (`io::las`): the bundled tiles with their point counts, scale and offset
//! applied (checked against the raw records of the uncompressed file), re-centred, classes;
//! truncated and corrupted files are errors, never panics; `segment` end to end.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sparseconv::io::las::read_las;

const TILES: &[(&str, usize)] = &[
    ("data/las/32-1-472-150-76.laz", 5_658),
    ("data/las/append-bug.laz", 37_805),
    ("data/las/autzen_trim.laz", 110_000),
    ("data/las/file_with_both_wkt_and_geotiff_vlrs.las", 25_408),
];

#[test]
fn every_bundled_tile_reads_re_centred_with_its_classes() {
    for &(path, n) in TILES {
        let l = read_las(&repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(l.cloud.dims, 4, "{path}");
        assert_eq!(l.cloud.data.len(), 4 * n, "{path}: points");
        assert_eq!(l.classes.len(), n, "{path}: classes");
        for p in l.cloud.data.chunks_exact(4) {
            // Tiles span at most a few km: after re-centring everything is near the origin.
            assert!(p[0].abs() < 5000.0 && p[1].abs() < 5000.0 && p[2].abs() < 5000.0, "{path}: {p:?}");
            assert!((0.0..=1.0).contains(&p[3]), "{path}: intensity {}", p[3]);
        }
        assert!(l.classes.contains(&2), "{path}: every tile has ground points");
        // And the engine takes it: voxel keys in range at 5 cm.
        sparseconv::voxel::voxelize(&l.cloud, 0.05).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

/// The first points of the uncompressed tile decoded by hand: X, Y, Z are i32 at the start of
/// each record, scaled and offset by the header's factors (LAS 1.4 §2.4).
#[test]
fn scale_and_offset_are_applied() {
    let path = repo("data/las/file_with_both_wkt_and_geotiff_vlrs.las");
    let b = std::fs::read(&path).expect("read");
    let f64_at = |at: usize| f64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize;
    let i32_at = |at: usize| i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let (scale, offset) = ([f64_at(131), f64_at(139), f64_at(147)], [f64_at(155), f64_at(163), f64_at(171)]);
    let (start, len) = (u32_at(96), u16::from_le_bytes([b[105], b[106]]) as usize);
    let l = read_las(&path).expect("tile");
    for i in [0usize, 1, 1000, 25_407] {
        let rec = start + i * len;
        for a in 0..3 {
            let want = f64::from(i32_at(rec + 4 * a)) * scale[a] + offset[a] - l.centre[a];
            let got = f64::from(l.cloud.data[4 * i + a]);
            assert!((got - want).abs() < 1e-3, "point {i} axis {a}: {got} against {want}");
        }
        let intensity = u16::from_le_bytes([b[rec + 12], b[rec + 13]]);
        assert_eq!(l.cloud.data[4 * i + 3], f32::from(intensity) / 65535.0);
    }
}

fn corrupt(tag: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let p = tmp_path(tag, name);
    std::fs::write(&p, bytes).expect("write");
    p
}

#[test]
fn truncated_and_corrupted_files_are_errors() {
    for &(path, _) in TILES {
        let b = std::fs::read(repo(path)).expect("read");
        let ext = Path::new(path).extension().and_then(|e| e.to_str()).expect("ext");
        let mut cases: Vec<(String, Vec<u8>)> = [0usize, 4, 100, 226, 400, b.len() / 2, b.len() - 1]
            .iter()
            .map(|&n| (format!("cut at {n}"), b[..n.min(b.len())].to_vec()))
            .collect();
        let mut sig = b.clone();
        sig[0] = b'X';
        cases.push(("signature".into(), sig));
        let mut many = b.clone();
        many[107..111].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(("point count".into(), many));
        let mut short = b.clone();
        short[94..96].copy_from_slice(&10u16.to_le_bytes());
        cases.push(("header size".into(), short));
        if b[25] == 4 {
            let mut big = b.clone();
            big[247..255].copy_from_slice(&(1u64 << 40).to_le_bytes());
            cases.push(("1.4 point count".into(), big));
        }
        // Flipped bytes through the records (LAZ: the compressed stream and its chunk table).
        for k in 1..40 {
            let mut m = b.clone();
            let at = (k * 7919 * 31) % b.len();
            m[at] ^= 0xA5;
            cases.push((format!("byte {at} flipped"), m));
        }
        for (what, bytes) in cases {
            let p = corrupt("las", &format!("bad.{ext}"), &bytes);
            // Either a clear error or, for a flip the format cannot notice (a coordinate's low
            // bits), a cloud; never a panic.
            let r = std::panic::catch_unwind(|| read_las(&p));
            match r {
                Err(_) => panic!("{path}: {what}: the reader panicked"),
                Ok(Err(e)) => assert!(e.to_string().contains("bad."), "{path}: {what}: {e}"),
                Ok(Ok(_)) => assert!(what.contains("flipped"), "{path}: {what}: read as valid"),
            }
        }
    }
}

#[test]
fn segment_reads_las_and_says_it_re_centred() {
    let (code, out, err) = run_cli(&["--threads", "2", "segment", "data/las/32-1-472-150-76.laz"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("re-centred by (326800, 6724186, 101) m") && out.contains("2 ground 1461"), "{out}");
    let b = std::fs::read(repo("data/las/32-1-472-150-76.laz")).expect("read");
    let p = corrupt("las-cli", "cut.laz", &b[..b.len() / 3]);
    let (code, _, err) = run_cli(&["segment", &arg(&p)]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cut.laz"), "{err}");
}
