//! `sparseconv segment` over many scans: files, folders, SemanticKITTI sequences and globs in,
//! the official submission layout out (`OUT/sequences/XX/predictions/NNNNNN.label`, raw class
//! ids), the next scan read and voxelized on another thread while the current one computes.
//! Also the folder forms `eval` accepts.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use sparseconv::io::kitti::{write_label, LearningMap};
use sparseconv::io::PointFormat;
use sparseconv::pipeline::{self, Model, Prepared, VoxelizeMode};
use sparseconv::{Engine, Error, Result};

/// One scan to segment and where its prediction goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    /// The scan file.
    pub scan: PathBuf,
    /// Sequence id (`XX` of a `sequences/XX/` path, else `00`).
    pub seq: String,
    /// Frame name (the file name without its point-format extension).
    pub name: String,
}

impl Job {
    fn of(scan: PathBuf) -> Self {
        let seq = sequence_of(&scan).unwrap_or_else(|| "00".to_string());
        let name = frame_name(&scan);
        Self { scan, seq, name }
    }

    /// `OUT/sequences/XX/predictions/NAME.label`.
    pub fn output(&self, out_dir: &Path) -> PathBuf {
        out_dir.join("sequences").join(&self.seq).join("predictions").join(format!("{}.label", self.name))
    }
}

/// `XX` where the path runs through `sequences/XX/`.
fn sequence_of(p: &Path) -> Option<String> {
    let parts: Vec<String> = p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    parts.windows(2).rev().find(|w| w[0] == "sequences").map(|w| w[1].clone())
}

fn frame_name(p: &Path) -> String {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for ext in [".pcd.bin", ".bin", ".ply", ".npy", ".las", ".laz"] {
        if let Some(stem) = name.strip_suffix(ext) {
            return stem.to_string();
        }
    }
    name
}

fn is_scan(p: &Path) -> bool {
    let n = p.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    p.is_file() && [".bin", ".ply", ".npy", ".las", ".laz"].iter().any(|e| n.ends_with(e))
}

/// The scan files directly in `dir`, sorted by name.
fn scans_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_scan(p))
        .collect();
    v.sort();
    Ok(v)
}

/// The sub-folders of `dir`, sorted by name.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    Ok(v)
}

/// Every scan the inputs name, in order: a file; a glob (`*`, `?`, `[...]`); a folder of scans;
/// a sequence folder (with `velodyne/`); a dataset root (with `sequences/`), restricted to
/// `sequences` when given.
pub(crate) fn expand_inputs(inputs: &[PathBuf], sequences: &[String]) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let mut used_sequences = false;
    for input in inputs {
        let text = input.to_string_lossy();
        if !input.exists() && text.contains(['*', '?', '[']) {
            let mut found: Vec<PathBuf> = glob::glob(&text)
                .map_err(|e| Error::invalid("scan pattern", format!("{text}: {e}")))?
                .filter_map(|p| p.ok())
                .filter(|p| is_scan(p))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::invalid("scan pattern", format!("{text} matches no scan file")));
            }
            jobs.extend(found.into_iter().map(Job::of));
        } else if input.is_file() {
            jobs.push(Job::of(input.clone()));
        } else if input.join("sequences").is_dir() {
            used_sequences = true;
            for dir in subdirs(&input.join("sequences"))? {
                let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if !sequences.is_empty() && !sequences.contains(&id) {
                    continue;
                }
                let velodyne = dir.join("velodyne");
                if velodyne.is_dir() {
                    jobs.extend(scans_in(&velodyne)?.into_iter().map(Job::of));
                }
            }
            for s in sequences {
                if !input.join("sequences").join(s).join("velodyne").is_dir() {
                    return Err(Error::invalid(
                        "--sequences",
                        format!("{} has no sequences/{s}/velodyne folder", input.display()),
                    ));
                }
            }
        } else if input.join("velodyne").is_dir() {
            jobs.extend(scans_in(&input.join("velodyne"))?.into_iter().map(Job::of));
        } else if input.is_dir() {
            jobs.extend(scans_in(input)?.into_iter().map(Job::of));
        } else {
            return Err(Error::io(input, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
    }
    if !sequences.is_empty() && !used_sequences {
        return Err(Error::invalid(
            "--sequences",
            "needs a dataset root (a folder holding sequences/) among the inputs",
        ));
    }
    if jobs.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::invalid(
            "segment",
            format!("no scan files (.bin, .ply, .npy, .las, .laz) in {}", names.join(", ")),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for j in &jobs {
        if !seen.insert((j.seq.clone(), j.name.clone())) {
            return Err(Error::invalid(
                "segment",
                format!(
                    "two scans would write sequences/{}/predictions/{}.label ({})",
                    j.seq,
                    j.name,
                    j.scan.display()
                ),
            ));
        }
    }
    Ok(jobs)
}

/// What a run over many scans needs.
pub(crate) struct SequenceRun<'a> {
    pub jobs: Vec<Job>,
    pub out_dir: PathBuf,
    pub resume: bool,
    pub model: &'a Model,
    pub engine: &'a Engine,
    pub labels: &'a LearningMap,
    pub format: Option<PointFormat>,
    pub mode: VoxelizeMode,
    /// Write a rerun recording with one `scan` time step per scan.
    pub rerun: Option<PathBuf>,
}

/// Ground truth beside a SemanticKITTI scan (`XX/velodyne/N.bin` → `XX/labels/N.label`).
#[cfg_attr(not(feature = "rerun"), allow(dead_code))]
fn labels_beside(scan: &Path) -> Option<PathBuf> {
    let dir = scan.parent()?;
    if dir.file_name()? != "velodyne" {
        return None;
    }
    let p = dir.parent()?.join("labels").join(scan.file_stem()?).with_extension("label");
    p.is_file().then_some(p)
}

/// The sequence's recording, when one is asked for.
struct SequenceRecording {
    #[cfg(feature = "rerun")]
    rec: Option<sparseconv::viz::rerun::Recording>,
}

impl SequenceRecording {
    fn new(path: Option<&Path>, labels: &LearningMap) -> Result<Self> {
        #[cfg(feature = "rerun")]
        {
            let rec = path.map(|p| sparseconv::viz::rerun::Recording::create(p, labels, true)).transpose()?;
            Ok(Self { rec })
        }
        #[cfg(not(feature = "rerun"))]
        {
            let _ = labels;
            match path {
                Some(_) => {
                    Err(Error::invalid("--rerun", "this build has no rerun support (build with `--features rerun`)"))
                }
                None => Ok(Self {}),
            }
        }
    }

    fn on(&self) -> bool {
        #[cfg(feature = "rerun")]
        return self.rec.is_some();
        #[cfg(not(feature = "rerun"))]
        false
    }

    /// Log one segmented scan (its points read again: `Prepared` keeps only the voxels).
    #[allow(unused_variables)]
    fn log(
        &mut self,
        format: Option<PointFormat>,
        labels: &LearningMap,
        job: &Job,
        prepared: &Prepared,
        seg: &pipeline::Segmentation,
        timings: pipeline::Timings,
        trace: &[sparseconv::device::LayerTrace],
    ) -> Result<()> {
        #[cfg(feature = "rerun")]
        if let Some(rec) = &mut self.rec {
            let points = match pipeline::points_of(&job.scan, format)? {
                Some(p) => p,
                None => crate::cli::segment::voxel_points(&prepared.voxels),
            };
            let gt = match labels_beside(&job.scan) {
                Some(p) => {
                    let raw = sparseconv::io::kitti::read_label(&p, Some(prepared.points))?;
                    Some(crate::cli::train_ids(&p, &raw, labels))
                }
                None => None,
            };
            let levels = sparseconv::viz::levels(trace);
            rec.log_scan(&sparseconv::viz::rerun::SceneLog {
                name: format!("{}/{}", job.seq, job.name),
                points: &points,
                pred: &seg.point_labels,
                gt: gt.as_deref(),
                voxels: prepared.voxels.coord_set(),
                voxel_labels: &seg.voxel_labels,
                levels: &levels,
                timings,
            })?;
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<()>> {
        #[cfg(feature = "rerun")]
        if let Some(rec) = self.rec {
            rec.finish()?;
            return Ok(Some(()));
        }
        Ok(None)
    }
}

/// Segment every job, writing predictions in the submission layout; prints a summary.
pub(crate) fn run(r: SequenceRun<'_>) -> Result<()> {
    let total = r.jobs.len();
    let todo: Vec<Job> = r.jobs.into_iter().filter(|j| !(r.resume && j.output(&r.out_dir).is_file())).collect();
    let skipped = total - todo.len();
    let bar = indicatif::ProgressBar::new(todo.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} scans, {per_sec}, ETA {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let mut points = 0usize;
    // When the first scan finished: it also tunes every layer's plan (`Grouping::Auto`).
    let mut first_done: Option<(f64, usize)> = None;
    // Resident memory after 10 scans, against the end: a long run must not grow.
    let (mut done, mut rss_at_10) = (0usize, None);
    let (format, mode) = (r.format, r.mode);
    let mut recording = SequenceRecording::new(r.rerun.as_deref(), r.labels)?;
    std::thread::scope(|s| -> Result<()> {
        // One scan ahead: reading and voxelizing the next scan overlaps the current network pass.
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<(Prepared, f64)>)>(1);
        let scans: Vec<PathBuf> = todo.iter().map(|j| j.scan.clone()).collect();
        s.spawn(move || {
            for (i, scan) in scans.iter().enumerate() {
                let t = Instant::now();
                let p = pipeline::prepare_file(scan, format, mode).map(|p| (p, t.elapsed().as_secs_f64()));
                let failed = p.is_err();
                if tx.send((i, p)).is_err() || failed {
                    return;
                }
            }
        });
        for (i, prepared) in rx {
            let job = &todo[i];
            let (prepared, voxelize) = prepared?;
            let mut timings = pipeline::Timings { voxelize, ..Default::default() };
            if recording.on() {
                r.engine.start_trace();
            }
            let seg = pipeline::segment(r.engine, r.model, &prepared, &mut timings)?;
            recording.log(format, r.labels, job, &prepared, &seg, timings, &r.engine.take_trace())?;
            let raw: Vec<u32> = seg.point_labels.iter().map(|&t| r.labels.to_raw(t)).collect();
            let out = job.output(&r.out_dir);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            // Written whole, then renamed: a stopped run never leaves a truncated prediction
            // that --resume would take for a finished one.
            let partial = out.with_extension("label.partial");
            write_label(&partial, &raw)?;
            std::fs::rename(&partial, &out).map_err(|e| Error::io(&out, e))?;
            points += prepared.points;
            if first_done.is_none() {
                first_done = Some((t0.elapsed().as_secs_f64(), points));
            }
            done += 1;
            if done == 10 {
                rss_at_10 = crate::cli::memory_mib().map(|m| m.0);
            }
            bar.set_message(format!("{}/{}", job.seq, job.name));
            bar.inc(1);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    if let (Some(()), Some(p)) = (recording.finish()?, &r.rerun) {
        println!("wrote rerun recording {} (one `scan` time step per scan)", p.display());
    }
    println!(
        "segmented {} scans ({skipped} already written, skipped): {points} points in {secs:.1} s, {:.2} scans/s, {:.0} points/s; predictions under {}",
        todo.len(),
        todo.len() as f64 / secs.max(1e-9),
        points as f64 / secs.max(1e-9),
        r.out_dir.join("sequences").display()
    );
    if let Some((now, peak)) = crate::cli::memory_mib() {
        match rss_at_10 {
            Some(m10) => println!(
                "resident memory: {m10:.0} MiB after 10 scans, {now:.0} MiB after all {}; peak {peak:.0} MiB",
                todo.len()
            ),
            None => println!("resident memory: {now:.0} MiB; peak {peak:.0} MiB"),
        }
    }
    if let (Some((t1, p1)), true) = (first_done, todo.len() > 1) {
        let (n, s) = ((todo.len() - 1) as f64, (secs - t1).max(1e-9));
        println!(
            "after the first scan (which also tunes the layers): {:.2} scans/s, {:.0} points/s",
            n / s,
            (points - p1) as f64 / s
        );
    }
    Ok(())
}

/// `.label` files an `eval` argument names, keyed `(sequence, frame)`: a file; a folder of
/// `.label` files; a sequence folder (its `sub` folder: `predictions` or `labels`); a root with
/// `sequences/` (every sequence's `sub` folder).
pub(crate) fn label_files(input: &Path, sub: &str) -> Result<Vec<((String, String), PathBuf)>> {
    let key = |p: &Path| {
        let seq = sequence_of(p).unwrap_or_else(|| "00".to_string());
        let name = p.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (seq, name)
    };
    let labels_in = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "label"))
            .collect();
        v.sort();
        Ok(v)
    };
    let files = if input.is_file() {
        vec![input.to_path_buf()]
    } else if input.join("sequences").is_dir() {
        let mut v = Vec::new();
        for dir in subdirs(&input.join("sequences"))? {
            if dir.join(sub).is_dir() {
                v.extend(labels_in(&dir.join(sub))?);
            }
        }
        v
    } else if input.join(sub).is_dir() {
        labels_in(&input.join(sub))?
    } else if input.is_dir() {
        labels_in(input)?
    } else {
        return Err(Error::io(input, std::io::Error::from(std::io::ErrorKind::NotFound)));
    };
    if files.is_empty() {
        return Err(Error::invalid("eval", format!("no .label files in {}", input.display())));
    }
    Ok(files.into_iter().map(|p| (key(&p), p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sequences_come_from_the_path() {
        let j = Job::of(PathBuf::from("/d/sequences/08/velodyne/000123.bin"));
        assert_eq!((j.seq.as_str(), j.name.as_str()), ("08", "000123"));
        assert_eq!(j.output(Path::new("/o")), PathBuf::from("/o/sequences/08/predictions/000123.label"));
        let j = Job::of(PathBuf::from("scans/n015-LIDAR_TOP.pcd.bin"));
        assert_eq!((j.seq.as_str(), j.name.as_str()), ("00", "n015-LIDAR_TOP"));
    }
}
