//! Timing helpers shared by `benches/` and the CLI: warm-up, repeated runs, median and spread.

use std::time::Instant;

/// Summary of repeated timings, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median run time.
    pub median: f64,
    /// Fastest run.
    pub min: f64,
    /// Slowest run.
    pub max: f64,
    /// Median absolute deviation from the median.
    pub mad: f64,
    /// Number of timed runs.
    pub runs: usize,
}

impl Stats {
    /// Summarize raw samples (seconds).
    pub fn from_samples(mut s: Vec<f64>) -> Stats {
        if s.is_empty() {
            return Stats { median: 0.0, min: 0.0, max: 0.0, mad: 0.0, runs: 0 };
        }
        s.sort_by(f64::total_cmp);
        let median = s[s.len() / 2];
        let mut dev: Vec<f64> = s.iter().map(|x| (x - median).abs()).collect();
        dev.sort_by(f64::total_cmp);
        Stats { median, min: s[0], max: s[s.len() - 1], mad: dev[dev.len() / 2], runs: s.len() }
    }

    /// Throughput in GFLOP/s at the median time.
    pub fn gflops(&self, flops: f64) -> f64 {
        if self.median > 0.0 {
            flops / self.median / 1e9
        } else {
            0.0
        }
    }
}

/// Run `f` `warmup` times untimed, then at least `min_runs` times and until `min_secs` have
/// passed (at most `max_runs`). `f` must finish its work (sync the device) before returning.
pub fn measure(warmup: usize, min_runs: usize, max_runs: usize, min_secs: f64, mut f: impl FnMut()) -> Stats {
    for _ in 0..warmup {
        f();
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < min_runs || (start.elapsed().as_secs_f64() < min_secs && samples.len() < max_runs) {
        let t0 = Instant::now();
        f();
        samples.push(t0.elapsed().as_secs_f64());
    }
    Stats::from_samples(samples)
}

/// FLOPs of a sparse conv over `pairs` map pairs: one multiply-add per pair, input and output channel.
pub fn conv_flops(pairs: usize, cin: usize, cout: usize) -> f64 {
    2.0 * pairs as f64 * cin as f64 * cout as f64
}

/// Deterministic pseudo-random f32 values in `[-scale, scale)` (SplitMix64), for synthetic
/// weights and test data without an RNG dependency.
pub fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
