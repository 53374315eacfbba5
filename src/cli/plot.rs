//! PNG plots of pruning sweeps (plotters, text in the bundled DejaVu Sans so no system fonts
//! are needed).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use sparseconv::prune::sensitivity::{Granularity, Sweep};
use sparseconv::{Error, Result};

static FONT: Once = Once::new();

fn font() {
    FONT.call_once(|| {
        // Bundled, so registration cannot fail on a valid build; a failure only loses text.
        let _ = register_font("sans-serif", FontStyle::Normal, include_bytes!("../../assets/fonts/DejaVuSans.ttf"));
    });
}

fn fail(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid("plot", format!("{}: {e}", path.display()))
}

/// One line per group: `y(point)` against ratio, with a dashed reference at `reference`.
fn lines(
    s: &Sweep,
    path: &Path,
    title: &str,
    y_label: &str,
    y: impl Fn(&sparseconv::prune::sensitivity::Point) -> f64,
    reference: Option<(f64, &str)>,
) -> Result<()> {
    font();
    let groups: Vec<usize> = s.units.iter().map(|u| u.id).collect();
    let ys: Vec<f64> = s.points.iter().map(&y).chain(reference.map(|r| r.0)).collect();
    let (lo, hi) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (0.0, 1.0) };
    let pad = (hi - lo) * 0.05;
    let xs: Vec<f64> = s.points.iter().map(|p| p.ratio).collect();
    let xmax = xs.iter().copied().fold(0.0, f64::max).max(0.1);
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(path, e))?;
    let (chart_area, legend_area) = root.split_horizontally(1080);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..xmax * 1.02, (lo - pad)..(hi + pad))
        .map_err(|e| fail(path, e))?;
    chart
        .configure_mesh()
        .x_desc(format!("fraction of the {} removed", s.granularity.unit()))
        .y_desc(y_label)
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| fail(path, e))?;
    if let Some((r, label)) = reference {
        chart
            .draw_series(DashedLineSeries::new([(0.0, r), (xmax * 1.02, r)], 8, 6, BLACK.stroke_width(2)))
            .map_err(|e| fail(path, e))?;
        chart
            .draw_series(std::iter::once(Text::new(label.to_string(), (xmax * 0.02, r), ("sans-serif", 16))))
            .map_err(|e| fail(path, e))?;
    }
    for (i, &g) in groups.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s.points.iter().filter(|p| p.group == g).map(|p| (p.ratio, y(p))).collect();
        chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2))).map_err(|e| fail(path, e))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| fail(path, e))?;
    }
    // The legend beside the chart: 33 groups do not fit inside it.
    for (i, u) in s.units.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let name = u.name.trim_end_matches(".kernel").trim_end_matches(".weight");
        // Up to 35 names at 25 px; more (one per conv) closer together.
        let step = (860 / s.units.len().max(1) as i32).clamp(12, 25);
        let yy = 30 + i as i32 * step;
        legend_area.draw(&Rectangle::new([(10, yy), (34, yy + 12)], color.filled())).map_err(|e| fail(path, e))?;
        legend_area
            .draw(&Text::new(format!("{name} ({})", u.of), (42, yy - 2), ("sans-serif", (step - 10).clamp(10, 15))))
            .map_err(|e| fail(path, e))?;
    }
    root.present().map_err(|e| fail(path, e))?;
    Ok(())
}

/// mIoU against ratio (`miou_png`) and predicted latency saved against ratio (`latency_png`).
pub fn sensitivity(s: &Sweep, miou_png: &Path, latency_png: &Path) -> Result<()> {
    let base = s.base.0 * 100.0;
    lines(
        s,
        miou_png,
        if s.granularity == Granularity::Channel {
            "Sensitivity: mIoU with one group pruned (no fine-tuning)"
        } else {
            "Sensitivity: mIoU with one conv pruned (no fine-tuning)"
        },
        "mIoU (%)",
        |p| p.miou * 100.0,
        Some((base, &format!("unpruned {base:.1}%"))),
    )?;
    let b = s.base.1;
    lines(
        s,
        latency_png,
        "Latency saved with one unit pruned (latency table, this machine)",
        "predicted time saved (ms)",
        |p| (b - p.predicted) * 1e3,
        None,
    )
}

/// Histograms (as lines, one per model) of log10 |γ| over every BatchNorm: network slimming's
/// "before and after" picture.
pub fn gamma_histograms(models: &[(String, Vec<f32>)], path: &Path) -> Result<()> {
    font();
    const BINS: usize = 60;
    let (lo, hi) = (-6.0f64, 1.0f64);
    let bin = |v: f32| -> usize {
        let l = (v.abs() as f64).max(1e-30).log10().clamp(lo, hi - 1e-9);
        ((l - lo) / (hi - lo) * BINS as f64) as usize
    };
    let mut hists = Vec::new();
    for (_, g) in models {
        let mut h = vec![0f64; BINS];
        for &v in g {
            h[bin(v)] += 1.0;
        }
        let n = g.len().max(1) as f64;
        hists.push(h.iter().map(|c| 100.0 * c / n).collect::<Vec<f64>>());
    }
    let top = hists.iter().flatten().copied().fold(1.0, f64::max) * 1.05;
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("BatchNorm |γ| (network slimming)", ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..hi, 0.0..top)
        .map_err(|e| fail(path, e))?;
    chart
        .configure_mesh()
        .x_desc("log10 |γ| (values below 1e-6 in the first bin)")
        .y_desc("% of channels")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| fail(path, e))?;
    for (i, ((name, _), h)) in models.iter().zip(&hists).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let w = (hi - lo) / BINS as f64;
        let pts: Vec<(f64, f64)> =
            h.iter().enumerate().flat_map(|(b, &c)| [(lo + b as f64 * w, c), (lo + (b + 1) as f64 * w, c)]).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| fail(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| fail(path, e))?;
    root.present().map_err(|e| fail(path, e))?;
    Ok(())
}
