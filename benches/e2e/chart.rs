//! `e2e.svg`: the HTTP tier's throughput and latency by batch size, one colour per pass,
//! drawn from a report. It reads the report only; it measures nothing and writes no
//! file (the caller does).

use std::fmt::Write as _;

use crate::report::E2eReport;

/// Two panels, one colour per pass: accepted records/s by batch size (each pass's raw
/// producer as a dashed line, its figure in the legend), and p50 (solid) and p99 (dashed)
/// latency by batch size on a log scale.
pub(crate) fn chart(r: &E2eReport) -> String {
    const COLORS: [&str; 2] = ["#4878a8", "#d35400"];
    let passes = &r.passes;
    let labels: Vec<String> = passes
        .first()
        .map(|p| p.http_tier.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|e| format!("batch {}", e.batch_size))
        .collect();
    let raws: Vec<f64> = passes
        .iter()
        .map(|p| p.raw_producer.records_per_sec)
        .collect();
    let top = passes
        .iter()
        .flat_map(|p| &p.http_tier)
        .map(|e| e.report.records_per_sec)
        .chain(raws.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.15;
    let (w, h, pad) = (900.0, 420.0, 60.0);
    let panel = (w - 3.0 * pad) / 2.0;
    let plot_h = h - 2.5 * pad;
    let y0 = h - 1.5 * pad;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="14" text-anchor="middle">Accepted records/s by batch size</text>
<text x="{}" y="24" font-size="14" text-anchor="middle">Latency by batch size (ms, log scale)</text>
"##,
        pad + panel / 2.0,
        2.0 * pad + panel * 1.5
    );
    // Left panel: bars, one per pass in each batch size's slot.
    let x0 = pad;
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/>"##,
        x0 + panel
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="black"/>"##,
        y0 - plot_h
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let y = y0 - plot_h * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            x0 - 4.0,
            y + 4.0,
            human(v),
            x0 + panel
        );
    }
    let slot = panel / labels.len().max(1) as f64;
    let bar = slot * 0.7 / passes.len().max(1) as f64;
    for (k, pass) in passes.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        for (i, e) in pass.http_tier.iter().enumerate() {
            let rate = e.report.records_per_sec;
            if !rate.is_finite() {
                continue;
            }
            let bh = plot_h * rate / top;
            let x = x0 + slot * i as f64 + slot * 0.15 + bar * k as f64;
            let _ = writeln!(
                svg,
                r##"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{bh:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"##,
                y0 - bh,
                x + bar / 2.0,
                y0 - bh - 4.0,
                human(rate),
            );
        }
        let raw = raws[k];
        if raw.is_finite() {
            let ry = y0 - plot_h * raw / top;
            let _ = writeln!(
                svg,
                r##"<line x1="{x0}" y1="{ry:.1}" x2="{}" y2="{ry:.1}" stroke="{color}" stroke-dasharray="6 4"/>"##,
                x0 + panel,
            );
        }
    }
    for (i, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            x0 + slot * (i as f64 + 0.5),
            y0 + 16.0
        );
    }
    // Right panel: p50 and p99 on a log scale from 0.1 ms to 10 s.
    let x1 = 2.0 * pad + panel;
    let _ = writeln!(
        svg,
        r##"<line x1="{x1}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/>"##,
        x1 + panel
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x1}" y1="{y0}" x2="{x1}" y2="{}" stroke="black"/>"##,
        y0 - plot_h
    );
    let (lo, hi) = (-1.0_f64, 4.0_f64);
    let ly = |ms: f64| y0 - plot_h * ((ms.max(0.1).log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
    for e in -1..=4 {
        let ms = 10f64.powi(e);
        let y = ly(ms);
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{x1}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            x1 - 4.0,
            y + 4.0,
            if ms < 1.0 {
                format!("{ms}")
            } else {
                format!("{ms:.0}")
            },
            x1 + panel
        );
    }
    for (k, pass) in passes.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        // The passes' points side by side in each slot, the first one's labels on its
        // left, the others' on their right.
        let shift = (k as f64 - (passes.len() as f64 - 1.0) / 2.0) * 14.0;
        let (anchor, dx) = if k == 0 && passes.len() > 1 {
            ("end", -6.0)
        } else {
            ("start", 6.0)
        };
        for (key, dash) in [("p50", ""), ("p99", r#" stroke-dasharray="6 4""#)] {
            let points: Vec<(f64, f64, f64)> = pass
                .http_tier
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let ms = match key {
                        "p50" => e.report.latency_ms.p50,
                        _ => e.report.latency_ms.p99,
                    };
                    (x1 + slot * (i as f64 + 0.5) + shift, ly(ms), ms)
                })
                .filter(|p| p.2.is_finite())
                .collect();
            let path: Vec<String> = points
                .iter()
                .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"##,
                path.join(" ")
            );
            for (x, y, ms) in &points {
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="{color}" font-size="10" text-anchor="{anchor}">{key} {ms:.1}</text>"##,
                    x + dx,
                    y + if key == "p99" { -6.0 } else { 12.0 },
                );
            }
        }
    }
    for (i, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            x1 + slot * (i as f64 + 0.5),
            y0 + 16.0
        );
    }
    // Legend: one swatch per pass.
    for (k, pass) in passes.iter().enumerate() {
        let x = pad + 400.0 * k as f64;
        let _ = writeln!(
            svg,
            r##"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{} (raw producer {}, dashed)</text>"##,
            h - 50.0,
            COLORS[k % COLORS.len()],
            x + 18.0,
            h - 40.0,
            pass.short_label(),
            human(raws[k]),
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{} · {} cores · closed loop · p99 dashed · commit {}</text>"##,
        w / 2.0,
        h - 12.0,
        r.machine.cpu,
        r.machine.cores,
        r.commit
    );
    svg.push_str("</svg>\n");
    svg
}

/// `1234567` as `1.23M`, `12345` as `12k`.
fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
