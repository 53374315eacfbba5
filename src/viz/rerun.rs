//! Rerun recordings (`.rrd`) of segmented scans, laid out for a person opening the file.
//!
//! The file carries a blueprint (the Rust SDK of rerun 0.36 sends one), so the viewer does not
//! guess a layout from the entity tree:
//! - tab **Segmentation** (shown first): three large 3D views side by side, `/prediction`,
//!   `/ground_truth` and `/errors` (each its own entity root, so none draws over another), and
//!   below them the `/summary` text (points, voxels, stage times, errors). For a sequence a
//!   time-series view of `/timings/<stage>_ms`, one time step per scan on the `scan` timeline,
//!   sits beside it; a single scan logs no time series (its times are in the summary).
//! - tab **Network levels**: one 3D view per resolution, `/levels/stride_S`, each voxel drawn at
//!   its size and coloured by the majority predicted class of the scan voxels inside it.
//! - tab **Voxel pruning** (only when a voxel plan ran): `/voxel_pruning/stride_S`, each voxel
//!   coloured by whether the level's pruned convs computed it.
//!
//! Classes are logged the rerun way: an annotation context at `/` names the SemanticKITTI
//! classes and gives their colours, and points carry class ids, so hovering a point shows its
//! class. `/errors` and `/voxel_pruning` have contexts of their own (right / wrong / not
//! judged; computed / partly / skipped).

use std::path::{Path, PathBuf};

use rerun::blueprint::{Blueprint, Grid, Horizontal, Spatial3DView, Tabs, TextDocumentView, TimeSeriesView, Vertical};
use rerun::{AnnotationContext, ClassDescription, Points3D, Rgba32};

use crate::error::{Error, Result};
use crate::io::kitti::{LearningMap, NUM_CLASSES};
use crate::pipeline::{Timings, VOXEL_SIZE};
use crate::tensor::CoordSet;
use crate::viz::{majority_labels, Level};
use crate::voxel::PointCloud;

/// What to log for one scan.
pub struct SceneLog<'a> {
    /// Scan name, for the summary.
    pub name: String,
    /// The points (x, y, z first).
    pub points: &'a PointCloud,
    /// Predicted training id per point.
    pub pred: &'a [u32],
    /// Ground-truth training id per point, when known.
    pub gt: Option<&'a [u32]>,
    /// The scan's voxels (stride 1) and the predicted training id of each.
    pub voxels: &'a CoordSet,
    /// Predicted training id per voxel.
    pub voxel_labels: &'a [u32],
    /// The network's levels as it ran ([`crate::viz::levels`]); empty to log none.
    pub levels: &'a [Level],
    /// Stage timings of the run.
    pub timings: Timings,
}

/// Entity paths, shared with tests and the blueprint.
pub mod paths {
    /// Points coloured by predicted class.
    pub const PREDICTION: &str = "prediction";
    /// Points coloured by ground-truth class.
    pub const GROUND_TRUTH: &str = "ground_truth";
    /// Points marked right / wrong / not judged.
    pub const ERRORS: &str = "errors";
    /// Markdown summary of the scan.
    pub const SUMMARY: &str = "summary";
    /// Root of the per-stage time series (sequences only).
    pub const TIMINGS: &str = "timings";
    /// Root of the per-level views.
    pub const LEVELS: &str = "levels";
    /// Root of the voxel-pruning views.
    pub const VOXEL_PRUNING: &str = "voxel_pruning";
}

// Error view classes: wrong points strong and larger, right ones faint.
const NOT_JUDGED: u16 = 0;
const RIGHT: u16 = 1;
const WRONG: u16 = 2;
// Voxel-pruning view classes.
const COMPUTED_ALL: u16 = 1;
const COMPUTED_SOME: u16 = 2;
const COMPUTED_NONE: u16 = 3;

fn rr_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("cannot write rerun recording: {e}"))
}

/// A recording being written: one scan ([`write_rrd`]) or a sequence, one `scan` time step per
/// scan.
pub struct Recording {
    rec: rerun::RecordingStream,
    path: PathBuf,
    sequence: bool,
    scans: i64,
}

impl Recording {
    /// Start a recording at `path`; `sequence` puts every scan on its own `scan` time step and
    /// logs stage times as time series.
    pub fn create(path: &Path, classes: &LearningMap, sequence: bool) -> Result<Self> {
        let rec = rerun::RecordingStreamBuilder::new("sparseconv").save(path).map_err(|e| rr_err(path, e))?;
        let colors = super::class_colors(classes);
        let descs: Vec<ClassDescription> = (0..=NUM_CLASSES as u16)
            .map(|t| {
                let c = colors[t as usize];
                ClassDescription::from((t, classes.train_name(t as u32), Rgba32::from_rgb(c[0], c[1], c[2])))
            })
            .collect();
        let r = Self { rec, path: path.to_path_buf(), sequence, scans: 0 };
        r.rec.log_static("/", &AnnotationContext::new(descs)).map_err(|e| r.err(e))?;
        r.rec
            .log_static(
                paths::ERRORS,
                &AnnotationContext::new([
                    ClassDescription::from((NOT_JUDGED, "not judged (unlabelled)", Rgba32::from_rgb(215, 215, 215))),
                    ClassDescription::from((RIGHT, "right", Rgba32::from_rgb(175, 175, 175))),
                    ClassDescription::from((WRONG, "wrong", Rgba32::from_rgb(230, 20, 20))),
                ]),
            )
            .map_err(|e| r.err(e))?;
        Ok(r)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        rr_err(&self.path, e)
    }

    /// The layout, sent before the first scan's data (what it shows depends on that scan:
    /// ground truth, the levels, voxel pruning).
    fn blueprint(&self, log: &SceneLog<'_>) -> Blueprint {
        let mut scene = vec![Spatial3DView::new("Prediction").with_origin(paths::PREDICTION).into()];
        if log.gt.is_some() {
            scene.push(Spatial3DView::new("Ground truth").with_origin(paths::GROUND_TRUTH).into());
            scene.push(Spatial3DView::new("Errors (red: wrong)").with_origin(paths::ERRORS).into());
        }
        let mut below = vec![TextDocumentView::new("Summary").with_origin(paths::SUMMARY).into()];
        if self.sequence {
            below.push(TimeSeriesView::new("Stage times per scan (ms)").with_origin(paths::TIMINGS).into());
        }
        let first = Vertical::new([Horizontal::new(scene).into(), Horizontal::new(below).into()])
            .with_row_shares([4.0, 1.0])
            .with_name("Segmentation");
        let mut tabs = vec![first.into()];
        if !log.levels.is_empty() {
            let views = log.levels.iter().map(|l| {
                Spatial3DView::new(format!("stride {} ({} voxels)", l.stride, l.coords.len()))
                    .with_origin(format!("{}/stride_{}", paths::LEVELS, l.stride))
                    .into()
            });
            tabs.push(Grid::new(views).with_name("Network levels").into());
        }
        let pruned: Vec<&Level> = log.levels.iter().filter(|l| l.pruned_convs > 0).collect();
        if !pruned.is_empty() {
            let views = pruned.iter().map(|l| {
                Spatial3DView::new(format!("stride {}: {} pruned convs", l.stride, l.pruned_convs))
                    .with_origin(format!("{}/stride_{}", paths::VOXEL_PRUNING, l.stride))
                    .into()
            });
            tabs.push(Grid::new(views).with_name("Voxel pruning").into());
        }
        let time = rerun::blueprint::TimePanel::new().with_state(if self.sequence {
            rerun::blueprint::components::PanelState::Expanded
        } else {
            rerun::blueprint::components::PanelState::Collapsed
        });
        // The selection panel would take a fifth of the width; hovering still names classes.
        Blueprint::new(Tabs::new(tabs))
            .with_auto_views(false)
            .with_auto_layout(false)
            .with_time_panel(time)
            .with_selection_panel(
                rerun::blueprint::SelectionPanel::new().with_state(rerun::blueprint::components::PanelState::Collapsed),
            )
    }

    /// Log one scan (the next time step of a sequence).
    pub fn log_scan(&mut self, log: &SceneLog<'_>) -> Result<()> {
        let n = log.points.len();
        if log.pred.len() != n || log.gt.is_some_and(|g| g.len() != n) {
            return Err(Error::invalid("rerun", "labels do not match the number of points"));
        }
        if log.voxel_labels.len() != log.voxels.len() {
            return Err(Error::invalid("rerun", "voxel labels do not match the number of voxels"));
        }
        if self.scans == 0 && log.levels.iter().any(|l| l.pruned_convs > 0) {
            self.rec
                .log_static(
                    paths::VOXEL_PRUNING,
                    &AnnotationContext::new([
                        ClassDescription::from((
                            COMPUTED_ALL,
                            "computed by every pruned conv",
                            Rgba32::from_rgb(40, 200, 90),
                        )),
                        ClassDescription::from((COMPUTED_SOME, "computed by some", Rgba32::from_rgb(230, 180, 40))),
                        ClassDescription::from((
                            COMPUTED_NONE,
                            "skipped by every pruned conv",
                            Rgba32::from_rgb(70, 70, 90),
                        )),
                    ]),
                )
                .map_err(|e| self.err(e))?;
        }
        if self.scans == 0 {
            self.blueprint(log)
                .send(&self.rec, rerun::blueprint::BlueprintActivation { make_active: true, make_default: true })
                .map_err(|e| self.err(e))?;
        }
        if self.sequence {
            self.rec.set_time_sequence("scan", self.scans);
        }
        self.scans += 1;
        let pos: Vec<[f32; 3]> = (0..n)
            .map(|i| {
                let p = log.points.point(i);
                [p[0], p[1], p[2]]
            })
            .collect();
        let radius = rerun::Radius::new_scene_units(0.03);
        let ids = |l: &[u32]| l.iter().map(|&t| t as u16).collect::<Vec<u16>>();
        self.rec
            .log(
                paths::PREDICTION,
                &Points3D::new(pos.iter().copied()).with_class_ids(ids(log.pred)).with_radii([radius]),
            )
            .map_err(|e| self.err(e))?;
        let mut summary = format!("**{}**: {n} points, {} voxels\n\n", log.name, log.voxels.len());
        if let Some(gt) = log.gt {
            self.rec
                .log(
                    paths::GROUND_TRUTH,
                    &Points3D::new(pos.iter().copied()).with_class_ids(ids(gt)).with_radii([radius]),
                )
                .map_err(|e| self.err(e))?;
            // Unlabelled ground truth is not judged.
            let judged: Vec<u16> = log
                .pred
                .iter()
                .zip(gt)
                .map(|(&p, &g)| match (g, p == g) {
                    (0, _) => NOT_JUDGED,
                    (_, true) => RIGHT,
                    (_, false) => WRONG,
                })
                .collect();
            // Wrong points large and red; right ones small and pale, so mistakes stand out.
            let radii = judged.iter().map(|&j| {
                rerun::Radius::new_scene_units(match j {
                    WRONG => 0.06,
                    RIGHT => 0.02,
                    _ => 0.015,
                })
            });
            self.rec
                .log(
                    paths::ERRORS,
                    &Points3D::new(pos.iter().copied()).with_class_ids(judged.iter().copied()).with_radii(radii),
                )
                .map_err(|e| self.err(e))?;
            let labelled = judged.iter().filter(|&&j| j != NOT_JUDGED).count();
            let wrong = judged.iter().filter(|&&j| j == WRONG).count();
            summary += &format!(
                "**{wrong} of {labelled} labelled points wrong** ({:.1}%)\n\n",
                100.0 * wrong as f64 / labelled.max(1) as f64
            );
        }
        let t = &log.timings;
        let mut stages = vec![("voxelize", t.voxelize), ("kernel_maps", t.kernel_maps)];
        if t.voxel_prune > 0.0 {
            stages.push(("voxel_prune", t.voxel_prune));
        }
        stages.extend([("conv", t.conv), ("other", t.other), ("total", t.total())]);
        // One line each, so the summary fits under the views.
        let times: Vec<String> = stages.iter().map(|(name, v)| format!("{name} {:.1}", v * 1e3)).collect();
        summary += &format!("Time (ms): {}\n\n", times.join(" · "));
        if self.sequence {
            for (name, v) in stages {
                self.rec
                    .log(format!("{}/{name}_ms", paths::TIMINGS), &rerun::Scalars::single(v * 1e3))
                    .map_err(|e| self.err(e))?;
            }
        }
        let sizes: Vec<String> = log.levels.iter().map(|l| format!("stride {} {}", l.stride, l.coords.len())).collect();
        if !sizes.is_empty() {
            summary += &format!("Voxels per level: {}\n", sizes.join(" · "));
        }
        for l in log.levels {
            self.log_level(l, log)?;
        }
        self.rec.log(paths::SUMMARY, &rerun::TextDocument::from_markdown(summary)).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn log_level(&self, l: &Level, log: &SceneLog<'_>) -> Result<()> {
        let s = l.stride;
        let centres: Vec<[f32; 3]> = l
            .coords
            .coords()
            .iter()
            .map(|c| [c[1], c[2], c[3]].map(|q| (q as f32 + 0.5 * s as f32) * VOXEL_SIZE))
            .collect();
        let radius = [rerun::Radius::new_scene_units(0.5 * s as f32 * VOXEL_SIZE)];
        let classes = majority_labels(log.voxels, log.voxel_labels, &l.coords, NUM_CLASSES + 1)?;
        self.rec
            .log(
                format!("{}/stride_{s}", paths::LEVELS),
                &Points3D::new(centres.iter().copied())
                    .with_class_ids(classes.iter().map(|&t| t as u16))
                    .with_radii(radius),
            )
            .map_err(|e| self.err(e))?;
        if l.pruned_convs > 0 {
            let state = l.computed.iter().map(|&k| match k as usize {
                0 => COMPUTED_NONE,
                k if k == l.pruned_convs => COMPUTED_ALL,
                _ => COMPUTED_SOME,
            });
            self.rec
                .log(
                    format!("{}/stride_{s}", paths::VOXEL_PRUNING),
                    &Points3D::new(centres.iter().copied()).with_class_ids(state).with_radii(radius),
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Flush everything to the file.
    pub fn finish(self) -> Result<()> {
        self.rec.flush_blocking().map_err(|e| rr_err(&self.path, e))
    }
}

/// Write a one-scan recording (see the module docs for its layout).
pub fn write_rrd(path: &Path, classes: &LearningMap, log: &SceneLog<'_>) -> Result<()> {
    let mut r = Recording::create(path, classes, false)?;
    r.log_scan(log)?;
    r.finish()
}

/// What one entity of a recording holds.
#[derive(Debug, Clone, Default)]
pub struct EntityInfo {
    /// Rows logged on a timeline (one per time step).
    pub rows: usize,
    /// Static rows (annotation contexts).
    pub static_rows: usize,
    /// Timelines its rows are on (empty for static data).
    pub timelines: std::collections::BTreeSet<String>,
    /// Components logged, as `Archetype:field`.
    pub components: std::collections::BTreeSet<String>,
}

/// A recording read back with the pinned SDK's decoder: the data entities and the blueprint's.
#[derive(Debug, Clone, Default)]
pub struct RecordingContents {
    /// Data entities by path (`/prediction`, ...).
    pub entities: std::collections::BTreeMap<String, EntityInfo>,
    /// Blueprint entities by path (`/viewport`, `/container/…`, `/view/…`).
    pub blueprint: std::collections::BTreeMap<String, EntityInfo>,
}

/// Decode a `.rrd` file (for tests and inspection).
pub fn read_recording(path: &Path) -> Result<RecordingContents> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let it = re_log_encoding::DecoderApp::decode_eager(std::io::BufReader::new(f))
        .map_err(|e| Error::format(path, format!("not a rerun recording: {e}")))?;
    let mut out = RecordingContents::default();
    for msg in it {
        let msg = msg.map_err(|e| Error::format(path, format!("corrupt rerun recording: {e}")))?;
        if let re_log_types::LogMsg::ArrowMsg(store, arrow) = msg {
            let chunk =
                re_chunk::Chunk::from_arrow_msg(&arrow).map_err(|e| Error::format(path, format!("bad chunk: {e}")))?;
            let map = match store.kind() {
                re_log_types::StoreKind::Blueprint => &mut out.blueprint,
                _ => &mut out.entities,
            };
            let info = map.entry(chunk.entity_path().to_string()).or_default();
            if chunk.is_static() {
                info.static_rows += chunk.num_rows();
            } else {
                info.rows += chunk.num_rows();
            }
            info.timelines.extend(chunk.timelines().keys().map(|t| t.to_string()));
            info.components.extend(chunk.components().component_descriptors().map(|d| d.display_name().to_string()));
        }
    }
    Ok(out)
}
