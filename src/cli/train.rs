//! `sparseconv train`: train MinkUNet on labelled scans (resumable), optionally exporting
//! inference weights.

use sparseconv::{Error, Result};
use std::path::{Path, PathBuf};

#[allow(clippy::too_many_arguments)]
pub(crate) fn cmd_train(
    config: Option<PathBuf>,
    out: &Path,
    resume: Option<PathBuf>,
    init: Option<PathBuf>,
    lr_scale: Option<f64>,
    data: Vec<PathBuf>,
    epochs: Option<usize>,
    max_steps: Option<usize>,
    export: Option<PathBuf>,
    half: bool,
) -> Result<()> {
    use sparseconv::train::trainer::{TrainConfig, Trainer};
    use std::io::Write;
    let mut cfg = match &config {
        Some(p) => Some(TrainConfig::load(p)?),
        None if resume.is_none() => Some(TrainConfig::default()),
        None => None,
    };
    if let Some(c) = cfg.as_mut() {
        if !data.is_empty() {
            c.data = data.clone();
        }
        if let Some(e) = epochs {
            c.epochs = e;
        }
        let scale = lr_scale.unwrap_or(if init.is_some() { 0.1 } else { 1.0 });
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid("--lr-scale", format!("must be positive, got {scale}")));
        }
        c.lr *= scale;
    }
    if resume.is_some() && lr_scale.is_some() {
        return Err(Error::invalid("--lr-scale", "a resumed run keeps its stored rate"));
    }
    let mut t = match &resume {
        Some(r) => {
            let t = Trainer::resume(r, cfg)?;
            if !data.is_empty() || epochs.is_some() {
                return Err(Error::invalid("--resume", "change data or epochs in a --config, not with flags"));
            }
            t.config.validate()?;
            t
        }
        None => Trainer::new(cfg.unwrap_or_default(), init.as_deref())?,
    };
    // Voxel pruning trains as it will run (give the same flags again on --resume).
    if let Some(plan) = crate::cli::voxel::plan_for(&t.net.desc)? {
        t.set_voxel_plan(&plan)?;
        eprintln!("voxel pruning on: {} convs, fill {}, score {}", plan.ratios.len(), plan.fill, plan.score);
    }
    let (per_epoch, total) = t.steps();
    let stop = max_steps.map_or(total, |m| (t.step + m).min(total));
    eprintln!(
        "training {} cr={} on {} scans: {} steps ({} epochs x {per_epoch}), lr {:e}, {} parameters, from step {}",
        t.config.arch,
        t.config.cr,
        t.train_scans(),
        total,
        t.config.epochs,
        t.config.lr,
        t.params().trainable_count(),
        t.step
    );
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let log_path = out.join("log.csv");
    let fresh_log = !log_path.exists() || resume.is_none();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(!fresh_log)
        .write(true)
        .truncate(fresh_log)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    if fresh_log {
        writeln!(log, "step,loss,lr,voxels,data_s,forward_s,backward_s,optimizer_s,miou")
            .map_err(|e| Error::io(&log_path, e))?;
    }
    let bar = indicatif::ProgressBar::new(total as u64).with_position(t.step as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut smooth: Option<f64> = None;
    let mut last_miou = None;
    let ckpt = out.join("checkpoint.safetensors");
    while t.step < stop {
        let mut r = t.train_step()?;
        let every = |n: usize| n > 0 && t.step % n == 0;
        if t.step == total || every(t.config.eval_every) {
            r.miou = Some(t.evaluate()?.0.unwrap_or(0.0));
            last_miou = r.miou;
        }
        if t.step == stop || every(t.config.save_every) {
            t.save_checkpoint(&ckpt)?;
        }
        let step_s: f64 = r.seconds.iter().sum();
        smooth = Some(smooth.map_or(r.loss, |s| 0.9 * s + 0.1 * r.loss));
        writeln!(
            log,
            "{},{:.6},{:.6e},{},{:.4},{:.4},{:.4},{:.4},{}",
            r.step,
            r.loss,
            r.lr,
            r.voxels,
            r.seconds[0],
            r.seconds[1],
            r.seconds[2],
            r.seconds[3],
            r.miou.map_or(String::new(), |m| format!("{m:.4}"))
        )
        .map_err(|e| Error::io(&log_path, e))?;
        bar.set_position(r.step as u64);
        bar.set_message(format!(
            "loss {:.3} lr {:.2e} {:.2} s/step {:.1} scans/s{}",
            smooth.unwrap_or(r.loss),
            r.lr,
            step_s,
            t.config.batch as f64 / step_s.max(1e-9),
            last_miou.map_or(String::new(), |m| format!(" mIoU {:.1}%", 100.0 * m))
        ));
    }
    bar.finish();
    eprintln!("checkpoint: {} (step {} of {total})", ckpt.display(), t.step);
    if let Some(m) = last_miou {
        eprintln!("mIoU on the evaluation scans: {:.1}%", 100.0 * m);
    }
    if let Some(p) = export {
        t.export(&p, half)?;
        eprintln!("inference weights: {}", p.display());
    }
    Ok(())
}
