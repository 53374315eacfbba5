//! Autotuner: picks the grouping parameters of one layer by timing candidates on its actual input.

use std::time::Instant;

use super::conv::conv_forward;
use crate::error::Result;
use crate::kmap::KernelMap;
use crate::plan::{GroupingParams, Plan};

/// Candidate `(tolerance, max_rows)` pairs; `None` is the ungrouped plan. The output-tiled
/// plan is always tried as well.
pub fn candidates() -> Vec<Option<GroupingParams>> {
    let mut c = vec![None];
    for &tolerance in &[0.1f32, 0.3, 0.6] {
        for &max_rows in &[1usize << 15, 1 << 17] {
            c.push(Some(GroupingParams { tolerance, max_rows }));
        }
    }
    c
}

/// Time every candidate plan (best of `reps` runs each) and return the fastest with its time.
/// All candidates give bit-identical outputs, so tuning never changes results.
pub fn tune(map: &KernelMap, x: &[f32], cin: usize, w: &[f32], cout: usize, reps: usize) -> Result<(Plan, f64)> {
    let mut best: Option<(Plan, f64)> = None;
    let mut seen: Vec<Plan> = Vec::new();
    let plans = candidates()
        .into_iter()
        .map(|c| match c {
            None => Plan::ungrouped(map),
            Some(p) => Plan::grouped(map, p),
        })
        .chain(std::iter::once(Plan::output_tiled(map)));
    for plan in plans {
        // Different parameters often give the same groups: time each distinct plan once.
        if seen.iter().any(|s| s.groups == plan.groups && s.output_tiled == plan.output_tiled) {
            continue;
        }
        seen.push(plan.clone());
        let mut t_best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            let out = conv_forward(map, &plan, x, cin, w, cout, None)?;
            std::hint::black_box(&out);
            t_best = t_best.min(t0.elapsed().as_secs_f64());
        }
        if best.as_ref().is_none_or(|b| t_best < b.1) {
            best = Some((plan, t_best));
        }
    }
    Ok(best.unwrap_or_else(|| (Plan::ungrouped(map), 0.0)))
}
