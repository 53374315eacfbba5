//! `sparseconv bn-gamma`: the distribution of BatchNorm scales |γ| in one or more models — what
//! network slimming (Liu et al., ICCV 2017: L1 on γ while training, `l1: {"@bn": λ}` in a train
//! config, then `prune --criterion bn`) changes — as quantiles and a PNG histogram.

use std::path::PathBuf;

use sparseconv::nn::arch::NetDesc;
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::{Error, Result};

use super::prune::arch_of;

/// `bn-gamma`'s arguments.
#[derive(clap::Args)]
pub struct GammaArgs {
    /// Models (e.g. before and after training with an L1 penalty on γ).
    #[arg(required = true, num_args = 1..)]
    pub models: Vec<PathBuf>,
    /// PNG histogram to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Every BatchNorm γ of the network in `ck`.
fn gammas(ck: &Checkpoint) -> Result<Vec<f32>> {
    let kind = arch_of(ck, None)?;
    let desc = NetDesc::from_checkpoint(kind, ck, sparseconv::io::kitti::NUM_CLASSES)?;
    let mut out = Vec::new();
    for c in desc.convs() {
        let name = format!("{}.weight", c.bn);
        let t = ck.get(&name).ok_or_else(|| Error::tensor(&name, "missing from the model"))?;
        out.extend_from_slice(&t.data);
    }
    Ok(out)
}

/// Run the command.
pub fn run(a: GammaArgs) -> Result<()> {
    let mut models = Vec::new();
    println!("{:<40} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9}", "model", "γ", "p10", "median", "p90", "max", "<1e-2");
    for p in &a.models {
        let ck = Checkpoint::load(p)?;
        let g = gammas(&ck).map_err(|e| e.in_file(p))?;
        let mut s: Vec<f32> = g.iter().map(|v| v.abs()).collect();
        s.sort_by(f32::total_cmp);
        let q = |f: f64| s[((s.len() - 1) as f64 * f) as usize];
        println!(
            "{:<40} {:>8} {:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e} {:>8.1}%",
            p.display().to_string(),
            s.len(),
            q(0.1),
            q(0.5),
            q(0.9),
            q(1.0),
            100.0 * s.iter().filter(|&&v| v < 1e-2).count() as f64 / s.len() as f64
        );
        let name = p.file_stem().map_or("model".into(), |n| n.to_string_lossy().to_string());
        models.push((name, g));
    }
    super::plot::gamma_histograms(&models, &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
