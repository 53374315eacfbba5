//! Rerun recordings (`.rrd`) of a segmented scan: points coloured by predicted class, the
//! ground truth, an error view, and per-stage timings.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::kitti::LearningMap;
use crate::pipeline::Timings;
use crate::voxel::PointCloud;

/// What to log for one scan.
pub struct SceneLog<'a> {
    /// The points (x, y, z first).
    pub points: &'a PointCloud,
    /// Predicted training id per point.
    pub pred: &'a [u32],
    /// Ground-truth training id per point, when known.
    pub gt: Option<&'a [u32]>,
    /// Class names and colours.
    pub classes: &'a LearningMap,
    /// Stage timings of the run.
    pub timings: Timings,
}

fn rr_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("cannot write rerun recording: {e}"))
}

/// Write a `.rrd` recording: `scan/prediction`, `scan/ground_truth`, `scan/errors`,
/// `timings/<stage>_ms` and a `summary` text.
pub fn write_rrd(path: &Path, log: &SceneLog<'_>) -> Result<()> {
    let n = log.points.len();
    if log.pred.len() != n || log.gt.is_some_and(|g| g.len() != n) {
        return Err(Error::invalid("rerun", "labels do not match the number of points"));
    }
    let colors = super::class_colors(log.classes);
    let pos: Vec<[f32; 3]> = (0..n)
        .map(|i| {
            let p = log.points.point(i);
            [p[0], p[1], p[2]]
        })
        .collect();
    let color_of = |t: u32| {
        let c = colors.get(t as usize).copied().unwrap_or([0, 0, 0]);
        rerun::Color::from_rgb(c[0], c[1], c[2])
    };
    let rec = rerun::RecordingStreamBuilder::new("sparseconv").save(path).map_err(|e| rr_err(path, e))?;
    let radius = [rerun::Radius::new_scene_units(0.03)];
    rec.log(
        "scan/prediction",
        &rerun::Points3D::new(pos.iter().copied())
            .with_colors(log.pred.iter().map(|&t| color_of(t)))
            .with_radii(radius),
    )
    .map_err(|e| rr_err(path, e))?;
    let mut summary = format!(
        "{n} points; voxelize {:.1} ms, kernel maps {:.1} ms, conv {:.1} ms, other {:.1} ms\n",
        log.timings.voxelize * 1e3,
        log.timings.kernel_maps * 1e3,
        log.timings.conv * 1e3,
        log.timings.other * 1e3
    );
    if let Some(gt) = log.gt {
        rec.log(
            "scan/ground_truth",
            &rerun::Points3D::new(pos.iter().copied()).with_colors(gt.iter().map(|&t| color_of(t))).with_radii(radius),
        )
        .map_err(|e| rr_err(path, e))?;
        // Wrong points in red, right ones dim grey; unlabeled ground truth is not judged.
        let err_colors = log.pred.iter().zip(gt).map(|(&p, &g)| match (g, p == g) {
            (0, _) => rerun::Color::from_rgb(60, 60, 60),
            (_, true) => rerun::Color::from_rgb(110, 110, 110),
            (_, false) => rerun::Color::from_rgb(255, 20, 20),
        });
        rec.log("scan/errors", &rerun::Points3D::new(pos.iter().copied()).with_colors(err_colors).with_radii(radius))
            .map_err(|e| rr_err(path, e))?;
        let labelled = gt.iter().filter(|&&g| g != 0).count();
        let wrong = log.pred.iter().zip(gt).filter(|(p, g)| **g != 0 && p != g).count();
        summary += &format!("{wrong} of {labelled} labelled points wrong\n");
    }
    for (name, v) in [
        ("voxelize", log.timings.voxelize),
        ("kernel_maps", log.timings.kernel_maps),
        ("conv", log.timings.conv),
        ("other", log.timings.other),
        ("total", log.timings.total()),
    ] {
        rec.log(format!("timings/{name}_ms"), &rerun::Scalars::single(v * 1e3)).map_err(|e| rr_err(path, e))?;
    }
    rec.log("summary", &rerun::TextDocument::new(summary)).map_err(|e| rr_err(path, e))?;
    rec.flush_blocking().map_err(|e| rr_err(path, e))?;
    Ok(())
}

/// Entity paths logged in a `.rrd` file, with the number of rows logged to each (for tests and
/// inspection).
pub fn read_entities(path: &Path) -> Result<std::collections::BTreeMap<String, usize>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let it = re_log_encoding::DecoderApp::decode_eager(std::io::BufReader::new(f))
        .map_err(|e| Error::format(path, format!("not a rerun recording: {e}")))?;
    let mut out = std::collections::BTreeMap::new();
    for msg in it {
        let msg = msg.map_err(|e| Error::format(path, format!("corrupt rerun recording: {e}")))?;
        if let re_log_types::LogMsg::ArrowMsg(_, arrow) = msg {
            let chunk =
                re_chunk::Chunk::from_arrow_msg(&arrow).map_err(|e| Error::format(path, format!("bad chunk: {e}")))?;
            let rows = chunk.num_rows();
            *out.entry(chunk.entity_path().to_string()).or_insert(0) += rows;
        }
    }
    Ok(out)
}
