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
