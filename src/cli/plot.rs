//! PNG plots of pruning sweeps (plotters, text in the bundled DejaVu Sans so no system fonts
//! are needed).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use sparseconv::prune::sensitivity::Sweep;
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
    let groups: Vec<usize> = s.groups.iter().filter(|g| g.prunable).map(|g| g.id).collect();
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
        .x_desc("fraction of the group's channels removed")
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
    for (i, &g) in groups.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let name = s.groups[g].name().trim_end_matches(".kernel").trim_end_matches(".weight");
        let yy = 30 + i as i32 * 25;
        legend_area.draw(&Rectangle::new([(10, yy), (34, yy + 12)], color.filled())).map_err(|e| fail(path, e))?;
        legend_area
            .draw(&Text::new(format!("{name} ({})", s.groups[g].width), (42, yy - 2), ("sans-serif", 15)))
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
        "Sensitivity: mIoU with one group pruned (no fine-tuning)",
        "mIoU (%)",
        |p| p.miou * 100.0,
        Some((base, &format!("unpruned {base:.1}%"))),
    )?;
    let b = s.base.1;
    lines(
        s,
        latency_png,
        "Latency saved with one group pruned (latency table, this machine)",
        "predicted time saved (ms)",
        |p| (b - p.predicted) * 1e3,
        None,
    )
}
