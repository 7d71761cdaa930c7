//! PNG plots of a bench report (plotters, bitmap backend, text through ab_glyph).

use std::path::{Path, PathBuf};

use mmpg_baselines::HELD_OUT_LOSS;
use mmpg_bench::{BenchReport, Family};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Where a TrueType font is looked for (plotters' bitmap backend draws text with it).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font once; the error says how to get one.
fn ensure_font() -> Result<(), String> {
    static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        let from_env = std::env::var("MMPG_FONT").ok();
        let candidates = from_env.iter().map(String::as_str).chain(FONT_PATHS.iter().copied());
        for path in candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the process's lifetime.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err("no TrueType font found for plot labels: `apt-get install fonts-dejavu-core` or set MMPG_FONT=<file.ttf>"
            .into())
    })
    .clone()
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

const COLOURS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// Mean accuracy per severity level for each method (CDC and baselines).
fn severity_plot(report: &BenchReport, path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("QA accuracy vs shift severity", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.2f64..5.2f64, 0f64..100f64)?;
    chart.configure_mesh().x_desc("severity (0 = clean)").y_desc("accuracy %").draw()?;
    for (i, method) in report.methods.iter().enumerate() {
        let mut points = Vec::new();
        for severity in 0..=5u8 {
            let accs: Vec<f64> =
                method.devices.iter().filter(|d| d.severity == severity).map(|d| d.adapted_accuracy).collect();
            if !accs.is_empty() {
                points.push((f64::from(severity), 100.0 * accs.iter().sum::<f64>() / accs.len() as f64));
            }
        }
        let c = colour(i);
        let width = if method.family == Family::Cdc { 3 } else { 1 };
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(width)))?
            .label(method.method.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, c.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// The K sweep: accuracy against upload bytes.
fn upload_plot(report: &BenchReport, path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_bytes = report.k_sweep.iter().map(|(_, b, _)| *b).fold(1.0, f64::max) * 1.5;
    let min_bytes = report.k_sweep.iter().map(|(_, b, _)| *b).fold(f64::INFINITY, f64::min).min(max_bytes) / 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption("QA accuracy vs upload bytes (K sweep)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((min_bytes.max(1.0)..max_bytes).log_scale(), 0f64..100f64)?;
    chart.configure_mesh().x_desc("bytes up per adaptation").y_desc("accuracy %").draw()?;
    let points: Vec<(f64, f64)> = report.k_sweep.iter().map(|(_, b, a)| (*b, 100.0 * a)).collect();
    chart.draw_series(LineSeries::new(points.clone(), colour(0).stroke_width(2)))?;
    for ((k, _, _), p) in report.k_sweep.iter().zip(&points) {
        chart.draw_series(std::iter::once(Circle::new(*p, 4, colour(0).filled())))?;
        chart.draw_series(std::iter::once(Text::new(format!("K={k}"), (p.0, p.1 + 2.5), ("sans-serif", 14))))?;
    }
    if let Some(stat) = report.methods.iter().find(|m| m.method == "static") {
        let y = 100.0 * stat.accuracy.mean;
        chart
            .draw_series(LineSeries::new(vec![(min_bytes.max(1.0), y), (max_bytes, y)], colour(7).stroke_width(1)))?
            .label("static")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour(7)));
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

/// The ε sweep: QA accuracy and R@1 against the privacy budget of each upload, with CDC's
/// non-private summaries and static as lines.
fn epsilon_plot(report: &BenchReport, path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) =
        report.epsilon_sweep.iter().fold((f64::INFINITY, 0f64), |(lo, hi), p| (lo.min(p.epsilon), hi.max(p.epsilon)));
    let (lo, hi) = (lo.min(hi) / 2.0, hi * 2.0);
    let mut chart = ChartBuilder::on(&root)
        .caption("Private summaries: accuracy vs ε per upload (Gaussian mechanism)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("ε per upload (log scale; δ as in the table)")
        .y_desc("% (shifted devices)")
        .draw()?;
    let qa: Vec<(f64, f64)> = report.epsilon_sweep.iter().map(|p| (p.epsilon, 100.0 * p.accuracy)).collect();
    chart
        .draw_series(LineSeries::new(qa.clone(), colour(0).stroke_width(2)))?
        .label("QA accuracy, private")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour(0)));
    chart.draw_series(qa.iter().map(|p| Circle::new(*p, 4, colour(0).filled())))?;
    let r1: Vec<(f64, f64)> =
        report.epsilon_sweep.iter().filter_map(|p| p.r1.map(|r| (p.epsilon, 100.0 * r))).collect();
    if !r1.is_empty() {
        chart
            .draw_series(LineSeries::new(r1.clone(), colour(1).stroke_width(2)))?
            .label("R@1, private")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour(1)));
        chart.draw_series(r1.iter().map(|p| Circle::new(*p, 4, colour(1).filled())))?;
    }
    for (name, label, c) in [(mmpg_bench::CDC, "QA, CDC without noise", 2), ("static", "QA, static", 7)] {
        if let Some(m) = report.methods.iter().find(|m| m.method == name) {
            let y = 100.0 * m.accuracy.mean;
            chart
                .draw_series(LineSeries::new(vec![(lo, y), (hi, y)], colour(c).stroke_width(1)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour(c)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// FTA accuracy against its label budget, with CDC (no labels) and static as lines.
fn labels_plot(report: &BenchReport, path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let fta: Vec<_> = report.methods.iter().filter(|m| m.labels_per_device > 0).collect();
    let max_labels = fta.iter().map(|m| m.labels_per_device).max().unwrap_or(64) as f64 * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption("FTA accuracy vs labels per device, against CDC (0 labels)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((2f64..max_labels).log_scale(), 0f64..100f64)?;
    chart.configure_mesh().x_desc("labelled clips on the device").y_desc("accuracy %").draw()?;
    let mut scopes: Vec<String> = Vec::new();
    for m in &fta {
        let scope = m.method.split_once(' ').map_or(String::new(), |(_, s)| s.to_string());
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    for (i, scope) in scopes.iter().enumerate() {
        let mut points: Vec<(f64, f64)> = fta
            .iter()
            .filter(|m| m.method.ends_with(scope.as_str()))
            .map(|m| (m.labels_per_device as f64, 100.0 * m.accuracy.mean))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = colour(i + 1);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(format!("FTA {scope}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    for (name, c) in [(mmpg_bench::CDC, colour(0)), ("static", colour(7))] {
        if let Some(m) = report.methods.iter().find(|m| m.method == name) {
            let y = 100.0 * m.accuracy.mean;
            chart
                .draw_series(LineSeries::new(vec![(2.0, y), (max_labels, y)], c.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// The held-out loss per epoch each FTA row recorded on its first device (epoch 0 the model as it
/// came), one line per row. Other curves (TENT's entropy per step) are in the JSON report.
fn held_out_curves(report: &BenchReport) -> Vec<(String, &Vec<f64>)> {
    report
        .methods
        .iter()
        .filter_map(|m| m.example_curves.as_ref().map(|(device, curves)| (m, device, curves)))
        .flat_map(|(m, device, curves)| {
            curves
                .iter()
                .filter(|(name, _)| name == HELD_OUT_LOSS)
                .map(move |(_, values)| (format!("{} on {device}", m.method), values))
        })
        .filter(|(_, values)| !values.is_empty())
        .collect()
}

fn curves_plot(report: &BenchReport, path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let lines = held_out_curves(report);
    let epochs = lines.iter().map(|(_, v)| v.len()).max().unwrap_or(1).max(2) as f64 - 1.0;
    let finite = || lines.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite());
    let (lo, hi) = (finite().fold(f64::INFINITY, f64::min), finite().fold(f64::NEG_INFINITY, f64::max));
    let (lo, hi) = if lo < hi { (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)) } else { (0.0, 1.0) };
    let mut chart = ChartBuilder::on(&root)
        .caption("Fine-tuning on one device: held-out loss per epoch (epoch 0: the static model)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..epochs, lo..hi)?;
    chart.configure_mesh().x_desc("epoch").y_desc("mean cross-entropy").draw()?;
    for (i, (label, values)) in lines.iter().enumerate() {
        let points: Vec<(f64, f64)> =
            values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(e, v)| (e as f64, *v)).collect();
        let c = colour(i + 1);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, c.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// Draws every plot the report has data for into `dir`; returns the files written.
pub fn draw_all(report: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>, String> {
    ensure_font()?;
    let mut written = Vec::new();
    let mut draw = |file: &str, f: fn(&BenchReport, &Path) -> PlotResult| -> Result<(), String> {
        let path = dir.join(file);
        f(report, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
        Ok(())
    };
    draw("accuracy_vs_severity.png", severity_plot)?;
    if !report.k_sweep.is_empty() {
        draw("accuracy_vs_upload.png", upload_plot)?;
    }
    if !report.epsilon_sweep.is_empty() {
        draw("accuracy_vs_epsilon.png", epsilon_plot)?;
    }
    if report.methods.iter().any(|m| m.labels_per_device > 0) {
        draw("fta_vs_labels.png", labels_plot)?;
    }
    if !held_out_curves(report).is_empty() {
        draw("fta_held_out_loss.png", curves_plot)?;
    }
    Ok(written)
}
