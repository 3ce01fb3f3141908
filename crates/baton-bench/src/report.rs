//! The report: a timeline chart (`timeline.svg`) and a self-contained page
//! (`report.html`, with the chart inlined and no external resources).
//!
//! The timeline has three panels sharing the time axis, one point per
//! 100 ms bucket: request rate (req/s), p50 and p99 latency (ms) and failed
//! requests. Each restart is drawn once, across all three panels, as a
//! translucent rectangle filled with [`RESTART_FILL`] from the restart's
//! start to its end (at least a few pixels wide), labelled `restart N`.
//! Nothing else in the chart uses that colour for a rectangle, so counting
//! the rectangles of that fill counts the restarts. The legend has a strip
//! of its own above the panels, so it never covers data.

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::BenchError;
use crate::result::BenchResult;

/// Fill colour of the restart spans, as it appears in the SVG.
pub const RESTART_FILL: &str = "#E8A33C";
const RESTART_COLOR: RGBColor = RGBColor(0xE8, 0xA3, 0x3C);
const RATE_COLOR: RGBColor = RGBColor(0x1F, 0x77, 0xB4);
const P50_COLOR: RGBColor = RGBColor(0x2C, 0xA0, 0x2C);
const P99_COLOR: RGBColor = RGBColor(0x94, 0x67, 0xBD);
const ERROR_COLOR: RGBColor = RGBColor(0xD6, 0x27, 0x28);

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 790;
/// Height of the legend strip above the panels, in pixels.
const LEGEND_HEIGHT: u32 = 30;
/// Narrowest restart span drawn, in pixels, so an instant restart (a signal)
/// stays visible.
const MIN_SPAN_PX: i32 = 3;

/// Write `timeline.svg` and `report.html` into `dir` (created if missing).
pub fn write_report(result: &BenchResult, dir: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BenchError::output(format!("report directory {}", dir.display()), e))?;
    let svg = timeline_svg(result)?;
    let svg_path = dir.join("timeline.svg");
    std::fs::write(&svg_path, &svg)
        .map_err(|e| BenchError::output(svg_path.display().to_string(), e))?;
    let html_path = dir.join("report.html");
    std::fs::write(&html_path, report_html(result, &svg))
        .map_err(|e| BenchError::output(html_path.display().to_string(), e))?;
    Ok(())
}

fn draw_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::output("timeline.svg", e.to_string())
}

/// Render the timeline chart as an SVG document.
pub fn timeline_svg(result: &BenchResult) -> Result<String, BenchError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw_timeline(result, &root)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_timeline(
    result: &BenchResult,
    root: &DrawingArea<SVGBackend<'_>, Shift>,
) -> Result<(), BenchError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let title = format!(
        "{} ({} mode, {} clients): {} requests, {} failed, {} restarts",
        result.config.url,
        result.config.mode,
        result.config.concurrency,
        result.requests,
        result.failed,
        result.restarts.len()
    );
    let root = root.titled(&title, ("sans-serif", 18)).map_err(draw_err)?;
    // The legend has a strip of its own above the panels: it never covers
    // data.
    let (legend, root) = root.split_vertically(LEGEND_HEIGHT);
    draw_legend(&legend)?;

    let bucket_s = result.timeline.bucket_ms as f64 / 1000.0;
    let per_s = if bucket_s > 0.0 { 1.0 / bucket_s } else { 0.0 };
    let buckets = &result.timeline.buckets;
    let x_max = buckets
        .last()
        .map(|b| b.t_s + bucket_s)
        .into_iter()
        .chain(result.restarts.iter().map(|r| r.start_s + r.duration_s))
        .chain(std::iter::once(result.elapsed_s))
        .fold(0.1_f64, f64::max);
    let rate_max = buckets
        .iter()
        .map(|b| b.requests as f64 * per_s)
        .fold(1.0_f64, f64::max)
        * 1.1;
    let latency_max = buckets
        .iter()
        .filter_map(|b| b.p99_ms)
        .fold(0.1_f64, f64::max)
        * 1.1;
    let errors_max = buckets.iter().map(|b| b.errors).max().unwrap_or(0).max(1) as f64 * 1.1;

    let panels = root.split_evenly((3, 1));
    let [rate_area, latency_area, errors_area] = panels.as_slice() else {
        return Err(draw_err("cannot split the drawing area"));
    };
    let mut rate_chart = build_chart(rate_area, x_max, rate_max)?;
    let mut latency_chart = build_chart(latency_area, x_max, latency_max)?;
    let mut errors_chart = build_chart(errors_area, x_max, errors_max)?;

    // Restart spans first, so the series are drawn over them: one rectangle
    // per restart from the top of the first panel to the bottom of the last.
    let top = rate_chart.plotting_area().get_pixel_range().1.start;
    let bottom = errors_chart.plotting_area().get_pixel_range().1.end;
    let (root_x, root_y) = root.get_base_pixel();
    for r in &result.restarts {
        let x0 = rate_chart.backend_coord(&(r.start_s, 0.0)).0;
        let x1 = rate_chart
            .backend_coord(&(r.start_s + r.duration_s, 0.0))
            .0
            .max(x0 + MIN_SPAN_PX);
        // `root` (the titled area) draws relative to its own origin.
        root.draw(&Rectangle::new(
            [(x0 - root_x, top - root_y), (x1 - root_x, bottom - root_y)],
            RESTART_COLOR.mix(0.3).filled(),
        ))
        .map_err(draw_err)?;
        root.draw(&Text::new(
            format!("restart {}", r.index),
            (x0 - root_x + 2, top - root_y + 2),
            ("sans-serif", 12).into_font().color(&BLACK),
        ))
        .map_err(draw_err)?;
    }

    rate_chart
        .configure_mesh()
        .disable_x_mesh()
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("req/s")
        .x_desc("time (s)")
        .draw()
        .map_err(draw_err)?;
    rate_chart
        .draw_series(LineSeries::new(
            // Buckets from the end of the window on only hold the requests
            // that were in flight then: as a rate they would be a false dip.
            buckets
                .iter()
                .filter(|b| b.t_s + 1e-9 < result.elapsed_s)
                .map(|b| (b.t_s, b.requests as f64 * per_s)),
            RATE_COLOR.stroke_width(1),
        ))
        .map_err(draw_err)?;

    latency_chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("latency (ms)")
        .x_desc("time (s)")
        .draw()
        .map_err(draw_err)?;
    for (color, pick) in [
        (
            P50_COLOR,
            (|b| b.p50_ms) as fn(&crate::TimelineBucket) -> Option<f64>,
        ),
        (P99_COLOR, |b| b.p99_ms),
    ] {
        // Buckets without an ok request break the line rather than bridge it.
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for b in buckets {
            match pick(b) {
                Some(v) => {
                    if let Some(s) = segments.last_mut() {
                        s.push((b.t_s, v));
                    }
                }
                None => {
                    if segments.last().is_some_and(|s| !s.is_empty()) {
                        segments.push(Vec::new());
                    }
                }
            }
        }
        for segment in segments.into_iter().filter(|s| !s.is_empty()) {
            latency_chart
                .draw_series(LineSeries::new(segment, color.stroke_width(1)))
                .map_err(draw_err)?;
        }
    }

    errors_chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("failed / 100 ms")
        .x_desc("time (s)")
        .draw()
        .map_err(draw_err)?;
    errors_chart
        .draw_series(AreaSeries::new(
            buckets.iter().map(|b| (b.t_s, b.errors as f64)),
            0.0,
            ERROR_COLOR.mix(0.5),
        ))
        .map_err(draw_err)?;
    Ok(())
}

/// The legend strip: one swatch and label per series, and the restart
/// window. The restart swatch is a thick line, not a rectangle, so that the
/// rectangles of its colour in the chart are the restarts alone.
fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), BenchError> {
    let font = ("sans-serif", 13).into_font().color(&BLACK);
    let mut x = 70;
    let y = (LEGEND_HEIGHT / 2) as i32;
    for (label, color, width) in [
        ("requests/s", RATE_COLOR, 2),
        ("p50 latency", P50_COLOR, 2),
        ("p99 latency", P99_COLOR, 2),
        ("failed requests", ERROR_COLOR, 2),
        (
            "restarts (each restart's window, start to end)",
            RESTART_COLOR,
            10,
        ),
    ] {
        area.draw(&PathElement::new(
            [(x, y), (x + 18, y)],
            color
                .mix(if width > 2 { 0.5 } else { 1.0 })
                .stroke_width(width),
        ))
        .map_err(draw_err)?;
        area.draw(&Text::new(label, (x + 24, y - 7), font.clone()))
            .map_err(draw_err)?;
        x += 24 + 8 * label.len() as i32 + 20;
    }
    Ok(())
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn build_chart<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    x_max: f64,
    y_max: f64,
) -> Result<Chart<'a, 'b>, BenchError> {
    ChartBuilder::on(area)
        .margin(8)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(draw_err)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Render the HTML page around an already rendered chart.
fn report_html(result: &BenchResult, svg: &str) -> String {
    // Inline the <svg> element itself, without any XML declaration.
    let svg = svg.find("<svg").map_or(svg, |i| &svg[i..]);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>baton bench: {url}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em; color: #222; }}\n\
         table {{ border-collapse: collapse; margin: 1em 0; }}\n\
         td, th {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }}\n\
         th {{ background: #f3f3f3; }}\n td.l, th.l {{ text-align: left; }}\n\
         .bad {{ color: #b00; font-weight: bold; }}\n .good {{ color: #070; font-weight: bold; }}\n\
         pre {{ background: #f7f7f7; padding: 1em; }}\n\
         </style>\n</head>\n<body>\n<h1>baton bench: {url}</h1>\n",
        url = escape(&result.config.url)
    );
    let verdict = if result.failed == 0 {
        "<p class=\"good\">No failed requests.</p>".to_owned()
    } else {
        format!(
            "<p class=\"bad\">{} of {} requests failed.</p>",
            result.failed, result.requests
        )
    };
    h.push_str(&verdict);
    h.push('\n');
    let failed_restarts = result.failed_restarts();
    if failed_restarts > 0 {
        let _ = writeln!(
            h,
            "<p class=\"bad\">{failed_restarts} of {} restarts did not succeed.</p>",
            result.restarts.len()
        );
    }
    let _ = writeln!(h, "<figure>\n{svg}\n<figcaption>Each orange band is a restart window: from the moment the restart began (the restart command was started, or the signal or control request was sent) to the moment it ended (the command exited, or the answer came). Requests that completed inside one are counted \"in restart windows\" below.</figcaption>\n</figure>");
    let started =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(result.started_unix_s.max(0.0));
    let command: Vec<String> = std::env::args().collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        h,
        "<h2>Run</h2>\n<table>\n\
         <tr><th class=\"l\">date</th><td class=\"l\">{}</td></tr>\n\
         <tr><th class=\"l\">Baton version</th><td class=\"l\">{}</td></tr>\n\
         <tr><th class=\"l\">command line</th><td class=\"l\"><code>{}</code></td></tr>\n\
         <tr><th class=\"l\">machine</th><td class=\"l\">{cores} cores, {} {}, Linux {}</td></tr>\n\
         </table>",
        humantime::format_rfc3339_seconds(started),
        env!("CARGO_PKG_VERSION"),
        escape(&command.join(" ")),
        std::env::consts::OS,
        std::env::consts::ARCH,
        escape(kernel.trim()),
    );

    h.push_str("<h2>Latency (ms)</h2>\n<table>\n<tr><th class=\"l\"></th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>\n");
    for (name, l) in [
        ("all", &result.latency.all),
        ("in restart windows", &result.latency.in_restart_windows),
        (
            "outside restart windows",
            &result.latency.outside_restart_windows,
        ),
    ] {
        let _ = writeln!(
            h,
            "<tr><td class=\"l\">{name}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Errors</h2>\n<table>\n<tr><th class=\"l\">class</th><th>total</th><th>in restart windows</th></tr>\n");
    for class in crate::ErrorClass::ALL {
        let _ = writeln!(
            h,
            "<tr><td class=\"l\">{class}</td><td>{}</td><td>{}</td></tr>",
            result.errors.get(class),
            result.errors_in_restart_windows.get(class)
        );
    }
    h.push_str("</table>\n");

    if !result.restarts.is_empty() {
        h.push_str("<h2>Restarts</h2>\n<table>\n<tr><th>#</th><th>start (s)</th><th>duration (s)</th><th class=\"l\">outcome</th><th>requests in window</th><th class=\"l\">errors in window</th></tr>\n");
        for r in &result.restarts {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td class=\"l {}\">{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
                r.index,
                r.start_s,
                r.duration_s,
                if r.success { "good" } else { "bad" },
                escape(&r.outcome.describe()),
                r.requests,
                escape(&r.errors.to_string())
            );
        }
        h.push_str("</table>\n");
    }
    let _ = writeln!(
        h,
        "<h2>Summary</h2>\n<pre>{}</pre>",
        escape(&result.summary())
    );
    h.push_str("</body>\n</html>\n");
    h
}
