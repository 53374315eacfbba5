//! `sparseconv eval`: per-class IoU and mIoU of predictions or of scans segmented on the fly.

use crate::cli::segment::{load_model, print_iou};
use crate::cli::{default_yaml, ground_truth};
use crate::*;
use sparseconv::io::kitti::{read_label, LearningMap};
use sparseconv::pipeline;
use sparseconv::{Device, Error, Grouping, MapBuilder, Result};
use std::path::PathBuf;

pub(crate) fn cmd_eval(
    preds: &[PathBuf],
    model: Option<PathBuf>,
    labels: &[PathBuf],
    yaml: Option<PathBuf>,
) -> Result<()> {
    if preds.is_empty() {
        return Err(Error::invalid("eval", "give at least one predicted .label file"));
    }
    if preds.iter().chain(labels).any(|p| p.is_dir()) {
        return eval_folders(preds, labels, yaml);
    }
    if preds.len() != labels.len() {
        return Err(Error::invalid("eval", format!("{} predictions but {} label files", preds.len(), labels.len())));
    }
    let lm = LearningMap::load(&yaml.unwrap_or_else(default_yaml))?;
    let mut total = sparseconv::metrics::Confusion::new();
    let mut net: Option<pipeline::Model> = None;
    let engine = new_engine(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic)?;
    for (p, g) in preds.iter().zip(labels) {
        let gtt = ground_truth(g, &lm)?;
        let pt: Vec<u32> = if p.to_string_lossy().to_ascii_lowercase().ends_with(".label") {
            cli::train_ids(p, &read_label(p, Some(gtt.len()))?, &lm)
        } else {
            if net.is_none() {
                net = Some(load_model(model.clone(), None, None)?.0);
            }
            let m = net.as_ref().ok_or_else(|| Error::invalid("eval", "no model"))?;
            let prep = pipeline::prepare_file(p, None, pipeline::VoxelizeMode::Mean)?;
            if prep.points != gtt.len() {
                return Err(Error::format(g, format!("{} labels for a scan of {} points", gtt.len(), prep.points)));
            }
            pipeline::segment(&engine, m, &prep, &mut pipeline::Timings::default())?.point_labels
        };
        total.add(&sparseconv::metrics::Confusion::from_labels(&pt, &gtt)?);
    }
    print_iou(&total, &lm);
    Ok(())
}

/// Folder forms: predictions and ground truth as folders, sequence folders or dataset roots
/// (`sequences/XX/predictions/` against `sequences/XX/labels/`), matched by sequence and frame;
/// one table over all of them.
fn eval_folders(preds: &[PathBuf], labels: &[PathBuf], yaml: Option<PathBuf>) -> Result<()> {
    use crate::cli::sequence::label_files;
    let lm = LearningMap::load(&yaml.unwrap_or_else(default_yaml))?;
    let mut pred = Vec::new();
    for p in preds {
        pred.extend(label_files(p, "predictions")?);
    }
    let mut gt = std::collections::BTreeMap::new();
    for g in labels {
        gt.extend(label_files(g, "labels")?);
    }
    let mut total = sparseconv::metrics::Confusion::new();
    for ((seq, name), p) in &pred {
        let g = gt.get(&(seq.clone(), name.clone())).ok_or_else(|| {
            Error::invalid("eval", format!("no ground truth for sequence {seq} frame {name} ({})", p.display()))
        })?;
        let gtt = ground_truth(g, &lm)?;
        let pt = cli::train_ids(p, &read_label(p, Some(gtt.len()))?, &lm);
        total.add(&sparseconv::metrics::Confusion::from_labels(&pt, &gtt)?);
    }
    println!("{} scans", pred.len());
    print_iou(&total, &lm);
    Ok(())
}
