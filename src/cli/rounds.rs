//! Two models timed in alternating rounds on the same scans and threads: the only fair way to
//! compare them on a shared, noisy machine (`bench --baseline`, `prune`).

use std::path::PathBuf;
use std::time::Instant;

use sparseconv::device::LayerTrace;
use sparseconv::pipeline::{self, Model, Timings};
use sparseconv::{Engine, Result};

/// What one model's runs measured.
#[derive(Default)]
pub struct Measured {
    /// End-to-end seconds (scan file in, labels out) of every timed run.
    pub totals: Vec<f64>,
    /// Median end-to-end seconds of each round.
    pub round_medians: Vec<f64>,
    /// Per conv layer (execution order): the trace of its first run and every run's seconds.
    pub layers: Vec<(LayerTrace, Vec<f64>)>,
    /// Kernel-map building seconds of every timed run.
    pub maps: Vec<f64>,
}

/// Median of a list of seconds (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

/// Run `runs` timed segmentations of every scan per model per round, models alternating, after
/// `warmup` untimed runs of each (which also tune the grouping). `trace` records per-layer times.
pub fn alternate(
    scans: &[PathBuf],
    models: &[(&Engine, &Model)],
    warmup: usize,
    runs: usize,
    rounds: usize,
    trace: bool,
) -> Result<Vec<Measured>> {
    let mut out: Vec<Measured> = models.iter().map(|_| Measured::default()).collect();
    let once = |e: &Engine, m: &Model, scan: &PathBuf| -> Result<Timings> {
        let mut t = Timings::default();
        let t0 = Instant::now();
        let p = pipeline::prepare_file(scan, None, pipeline::VoxelizeMode::Mean)?;
        t.voxelize = t0.elapsed().as_secs_f64();
        let seg = pipeline::segment(e, m, &p, &mut t)?;
        std::hint::black_box(&seg.point_labels);
        Ok(t)
    };
    for &(e, m) in models {
        for scan in scans {
            for _ in 0..warmup {
                once(e, m, scan)?;
            }
        }
    }
    for _ in 0..rounds {
        for (k, &(e, m)) in models.iter().enumerate() {
            let mut this_round = Vec::new();
            for scan in scans {
                for _ in 0..runs {
                    if trace {
                        e.start_trace();
                    }
                    let t = once(e, m, scan)?;
                    this_round.push(t.total());
                    out[k].maps.push(t.kernel_maps);
                    let layers = &mut out[k].layers;
                    for (i, l) in e.take_trace().into_iter().enumerate() {
                        if layers.len() <= i {
                            layers.push((l.clone(), Vec::new()));
                        }
                        layers[i].1.push(l.seconds);
                    }
                }
            }
            out[k].round_medians.push(median(&this_round));
            out[k].totals.extend(this_round);
        }
    }
    Ok(out)
}
