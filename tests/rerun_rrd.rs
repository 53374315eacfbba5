//! `segment --rerun` writes a recording with the expected entities (read back from the file).
#![cfg(feature = "rerun")]

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::*;
use sparseconv::nn::checkpoint::{save, Checkpoint};
use sparseconv::nn::minkunet::MinkUNet;
use sparseconv::viz::rerun::read_entities;

#[test]
fn segment_writes_a_readable_recording() {
    let dir = std::env::temp_dir().join(format!("sparseconv-rrd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ck = Checkpoint::random(5);
    MinkUNet::load(&ck, 0.25, 19).expect("shapes");
    let w = dir.join("w.safetensors");
    save(&w, &ck.synthesized(), HashMap::new(), false).expect("save");
    let rrd = dir.join("scan.rrd");
    // The 50-point fixture: CI builds this test unoptimized (profile ci-rerun).
    let scan = repo("data/tiny/sequences/00/velodyne/000000.bin");
    let labels = repo("data/tiny/sequences/00/labels/000000.label");
    let o = Command::new(env!("CARGO_BIN_EXE_sparseconv"))
        .args(["segment", scan.to_str().expect("utf8"), "--model", w.to_str().expect("utf8")])
        .args(["--labels", labels.to_str().expect("utf8"), "--rerun", rrd.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ents = read_entities(&rrd).expect("read back");
    for e in
        ["/scan/prediction", "/scan/ground_truth", "/scan/errors", "/summary", "/timings/conv_ms", "/timings/total_ms"]
    {
        assert!(ents.get(e).copied().unwrap_or(0) >= 1, "entity {e} missing in {ents:?}");
    }
    // A file that is not a recording is an error, not a panic.
    assert!(read_entities(&repo(SCAN)).is_err());
}
