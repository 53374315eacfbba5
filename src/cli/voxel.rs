//! The voxel-pruning flags every segmenting command shares (`--voxel-prune R`,
//! `--voxel-plan FILE`, `--voxel-fill`, `--voxel-score`), turned into a plan for a model.

use std::path::PathBuf;
use std::sync::OnceLock;

use sparseconv::nn::arch::NetDesc;
use sparseconv::pipeline::Model;
use sparseconv::voxel_prune::{check_ratio, Fill, Score, VoxelPlan};
use sparseconv::{Error, Result};

/// Voxel (activation) pruning, as parsed from the command line.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct VoxelArgs {
    /// Voxel pruning: skip the fraction R (in [0, 1)) of the least important voxels (by
    /// feature magnitude) in every residual block's convs, computing only the rest (segment,
    /// eval, demo, bench's --model, train, sensitivity).
    #[arg(long, global = true, value_name = "R", allow_negative_numbers = true)]
    pub voxel_prune: Option<f32>,
    /// Voxel pruning per conv from a plan file (`# sparseconv voxel plan`, then `conv NAME R`
    /// lines; see `sparseconv::voxel_prune`); instead of --voxel-prune.
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "voxel_prune")]
    pub voxel_plan: Option<PathBuf>,
    /// What pruned voxels get: `input` (passed through where the width stays, else zero) or
    /// `zero` (the conv adds nothing: a residual block reduces to its shortcut) [default: the
    /// plan's, else input].
    #[arg(long, global = true, value_name = "FILL")]
    pub voxel_fill: Option<String>,
    /// Voxel importance: `l1` (mean |feature|, SPS-Conv) or `l2` [default: the plan's, else l1].
    #[arg(long, global = true, value_name = "SCORE")]
    pub voxel_score: Option<String>,
    /// Compute every voxel and overwrite the pruned ones (SPS-Conv's released semantics: the
    /// same answer, none of the speed); for checking and for timing that contrast.
    #[arg(long, global = true)]
    pub voxel_reference: bool,
}

static ARGS: OnceLock<VoxelArgs> = OnceLock::new();

/// Record the parsed flags (once, at startup).
pub fn set(a: VoxelArgs) {
    let _ = ARGS.set(a);
}

/// Whether any voxel-pruning flag was given.
pub fn given() -> bool {
    ARGS.get().is_some_and(|a| {
        a.voxel_prune.is_some()
            || a.voxel_plan.is_some()
            || a.voxel_reference
            || a.voxel_fill.is_some()
            || a.voxel_score.is_some()
    })
}

/// The plan the flags ask for on the network `desc` (`None`: no voxel pruning).
pub fn plan_for(desc: &NetDesc) -> Result<Option<VoxelPlan>> {
    let Some(a) = ARGS.get() else { return Ok(None) };
    let mut plan = match (&a.voxel_prune, &a.voxel_plan) {
        (Some(r), _) => {
            check_ratio("--voxel-prune", *r)?;
            VoxelPlan::uniform(desc.block_convs().iter().map(|c| c.kernel.as_str()), *r)?
        }
        (None, Some(p)) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            VoxelPlan::parse(&text, &p.display().to_string())?
        }
        (None, None) => {
            if given() {
                return Err(Error::invalid(
                    "--voxel-fill/--voxel-score/--voxel-reference",
                    "need --voxel-prune R or --voxel-plan FILE",
                ));
            }
            return Ok(None);
        }
    };
    if let Some(f) = &a.voxel_fill {
        plan.fill = f.parse::<Fill>().map_err(|e| Error::invalid("--voxel-fill", e))?;
    }
    if let Some(s) = &a.voxel_score {
        plan.score = s.parse::<Score>().map_err(|e| Error::invalid("--voxel-score", e))?;
    }
    plan.reference = a.voxel_reference;
    Ok(Some(plan))
}

/// Apply the flags' plan to `model`; returns a one-line summary when it prunes.
pub fn apply(model: &mut Model) -> Result<Option<String>> {
    let Some(plan) = plan_for(model.desc())? else { return Ok(None) };
    model.set_voxel_plan(&plan)?;
    let n = plan.ratios.values().filter(|&&r| r > 0.0).count();
    let rs: Vec<f32> = plan.ratios.values().copied().filter(|&r| r > 0.0).collect();
    let (lo, hi) = rs.iter().fold((f32::MAX, 0f32), |(l, h), &r| (l.min(r), h.max(r)));
    Ok(Some(format!(
        "voxel pruning: {n} convs, ratio {}, score {}, fill {}{}",
        if n == 0 {
            "-".to_string()
        } else if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}-{hi}")
        },
        plan.score,
        plan.fill,
        if plan.reference { ", reference (every voxel computed)" } else { "" }
    )))
}

/// Fill and score from the flags for a sweep that picks its own ratios (`sensitivity
/// --granularity voxel`); a ratio or plan given with it is an error.
pub fn sweep_settings() -> Result<VoxelPlan> {
    let a = ARGS.get().cloned().unwrap_or_default();
    if a.voxel_prune.is_some() || a.voxel_plan.is_some() {
        return Err(Error::invalid("--voxel-prune", "the sweep picks its own ratios (give --ratios)"));
    }
    let mut plan = VoxelPlan::default();
    if let Some(f) = &a.voxel_fill {
        plan.fill = f.parse::<Fill>().map_err(|e| Error::invalid("--voxel-fill", e))?;
    }
    if let Some(s) = &a.voxel_score {
        plan.score = s.parse::<Score>().map_err(|e| Error::invalid("--voxel-score", e))?;
    }
    plan.reference = a.voxel_reference;
    Ok(plan)
}
