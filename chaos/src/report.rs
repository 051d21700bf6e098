//! The report of one run, in the run directory: `report.json` (everything, for tools and
//! CI), `summary.md` (what a person reads first: verdict, how to replay, faults with their
//! RTO, counts, violations, convergence) and `timeline.png` (faults, I/O latency and
//! replication lag on one time axis, to see at a glance what a fault did to the workload).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checker::FaultRto;
use crate::history::{FaultRecord, History, Op, OpRecord, Violation};

/// Everything known about a run once it is over. `report.json` is this, pretty-printed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub duration_s: f64,
    /// The deliberate bug of a negative-control run (one that must fail, proving that the
    /// checker catches this kind of breakage), if any.
    pub negative_control: Option<String>,
    /// Scheduled faults that took effect.
    pub faults_injected: u64,
    /// Scheduled faults that could not be applied (each also a violation).
    #[serde(default)]
    pub faults_not_applied: u64,
    pub faults: Vec<FaultRecord>,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub writes_verified: u64,
    pub reads_checked: u64,
    pub flushes_ok: u64,
    pub violations: Vec<Violation>,
    pub rto: Vec<FaultRto>,
    /// Whether every replica of every volume had the same content at the end.
    pub converged: bool,
    pub convergence: Vec<ReplicaDigest>,
    pub p50_write_ms: f64,
    pub p99_write_ms: f64,
    pub max_lag_bytes: u64,
    /// Blocks the verify after the run found differing between replicas (`None`: it could
    /// not run).
    #[serde(default)]
    pub verify_differing_blocks: Option<u64>,
    /// The command line that replays this run.
    pub command: String,
    pub passed: bool,
}

/// Content digest of one replica of one volume, taken after the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaDigest {
    pub vol: u32,
    pub volume: String,
    pub node: u64,
    pub site: String,
    pub digest: String,
}

/// Writes `report.json`, `summary.md` and `timeline.png` into `dir` (created if needed).
/// The text files come first, so that a plotting failure still leaves the verdict behind.
pub fn write(dir: &Path, report: &Report, history: &History) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report)? + "\n";
    write_file(&dir.join("report.json"), json.as_bytes())?;
    write_file(&dir.join("summary.md"), summary_md(report).as_bytes())?;
    let png = dir.join("timeline.png");
    draw_timeline(&png, report, history, font()).with_context(|| format!("{}", png.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Median and 99th percentile latency of the acknowledged writes, in ms (0 without any).
pub fn write_latency_ms(history: &History) -> (f64, f64) {
    let mut lat: Vec<u64> = history
        .ops
        .iter()
        .filter(|o| o.ok() && matches!(o.op, Op::Write { .. }))
        .map(latency_us)
        .collect();
    lat.sort_unstable();
    let ms = |p| percentile(&lat, p) as f64 / 1000.0;
    (ms(0.50), ms(0.99))
}

/// Highest replication lag sampled, any volume, any site.
pub fn max_lag_bytes(history: &History) -> u64 {
    history.lag.iter().map(|l| l.bytes).max().unwrap_or(0)
}

fn latency_us(o: &OpRecord) -> u64 {
    o.end_us.saturating_sub(o.start_us)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Violations listed in `summary.md`; all of them are in `report.json`.
const SUMMARY_VIOLATIONS: usize = 50;

fn verdict(report: &Report) -> &'static str {
    if report.passed {
        "PASS"
    } else {
        "FAIL"
    }
}

/// `summary.md`: a pure function of the report.
pub fn summary_md(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# roamdisk chaos: {}, seed {}\n", r.scenario, r.seed);
    let _ = writeln!(s, "**{}**: {}\n", verdict(r), verdict_reason(r));
    if let Some(nc) = &r.negative_control {
        let _ = writeln!(s, "Negative control `{nc}`: the checker must catch it.\n");
    }
    let _ = writeln!(s, "Replay:\n\n```sh\n{}\n```\n", r.command);
    counts_md(&mut s, r);
    faults_md(&mut s, r);
    violations_md(&mut s, r);
    convergence_md(&mut s, r);
    s
}

fn verdict_reason(r: &Report) -> String {
    let total = r.violations.len() as u64;
    let mut why = match total {
        0 => "no violations".to_string(),
        n => format!("{n} violation{} ({})", plural(n), violation_kinds(r)),
    };
    let replicas = if r.converged {
        "replicas converged"
    } else {
        "replicas did NOT converge"
    };
    let _ = write!(
        why,
        ", {replicas}, {} acknowledged writes verified",
        r.writes_verified
    );
    why
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `lost_write ×2, stale_read ×1` (of the violations kept).
fn violation_kinds(r: &Report) -> String {
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for v in &r.violations {
        *by_kind.entry(&v.kind).or_default() += 1;
    }
    let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
    kinds.join(", ")
}

fn counts_md(s: &mut String, r: &Report) {
    let rows = [
        ("duration", format!("{:.1} s", r.duration_s)),
        ("faults injected", r.faults_injected.to_string()),
        ("faults not applied", r.faults_not_applied.to_string()),
        (
            "blocks differing (verify)",
            r.verify_differing_blocks
                .map_or("verify did not run".to_owned(), |n| n.to_string()),
        ),
        ("writes acknowledged", r.writes_acked.to_string()),
        ("writes failed (in doubt)", r.writes_failed.to_string()),
        ("writes verified", r.writes_verified.to_string()),
        ("reads checked", r.reads_checked.to_string()),
        ("flushes", r.flushes_ok.to_string()),
        (
            "write latency p50 / p99",
            format!("{:.2} / {:.2} ms", r.p50_write_ms, r.p99_write_ms),
        ),
        ("max replication lag", human_bytes(r.max_lag_bytes)),
    ];
    s.push_str("## Counts\n\n| | |\n|---|---:|\n");
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push('\n');
}

fn faults_md(s: &mut String, r: &Report) {
    let _ = writeln!(s, "## Faults ({})\n", r.faults.len());
    if r.faults.is_empty() {
        s.push_str("None.\n\n");
        return;
    }
    s.push_str("| # | start (s) | end (s) | kind | target | RTO (ms) | note |\n");
    s.push_str("|---:|---:|---:|---|---|---:|---|\n");
    for (i, f) in r.faults.iter().enumerate() {
        let end = f.end_us.map_or("-".to_string(), secs);
        let rto = rto_of(r, i, f).map_or("-".to_string(), |ms| ms.to_string());
        let note = f.note.as_deref().unwrap_or("");
        let _ = writeln!(
            s,
            "| {} | {} | {end} | {} | {} | {rto} | {} |",
            i + 1,
            secs(f.start_us),
            cell(&f.kind),
            cell(&f.target),
            cell(note)
        );
    }
    s.push('\n');
}

/// The RTO of the `i`th fault: the checker gives one per fault in order, but look it up
/// by identity if the lists do not line up (a report assembled by hand, say).
fn rto_of(r: &Report, i: usize, f: &FaultRecord) -> Option<u64> {
    let same = |x: &FaultRto| x.kind == f.kind && x.target == f.target && x.start_us == f.start_us;
    r.rto
        .get(i)
        .filter(|x| same(x))
        .or_else(|| r.rto.iter().find(|x| same(x)))
        .map(|x| x.rto_ms)
}

fn violations_md(s: &mut String, r: &Report) {
    let total = r.violations.len() as u64;
    let _ = writeln!(s, "## Violations ({total})\n");
    if total == 0 {
        s.push_str("None.\n\n");
        return;
    }
    s.push_str("| at (s) | kind | vol | block | detail |\n|---:|---|---:|---:|---|\n");
    for v in r.violations.iter().take(SUMMARY_VIOLATIONS) {
        let block = v.block.map_or("-".to_string(), |b| b.to_string());
        let (at, kind, detail) = (secs(v.at_us), cell(&v.kind), cell(&v.detail));
        let _ = writeln!(s, "| {at} | {kind} | {} | {block} | {detail} |", v.vol);
    }
    let rest = total.saturating_sub(SUMMARY_VIOLATIONS as u64);
    if rest > 0 {
        let _ = writeln!(s, "\n… and {rest} more (see `report.json`).");
    }
    s.push('\n');
}

fn convergence_md(s: &mut String, r: &Report) {
    let verdict = if r.converged { "converged" } else { "DIVERGED" };
    let _ = writeln!(s, "## Convergence: {verdict}\n");
    if r.convergence.is_empty() {
        s.push_str("No replica digests.\n");
        return;
    }
    let usual = usual_digests(&r.convergence);
    s.push_str("| vol | volume | node | site | digest | |\n|---:|---|---:|---|---|---|\n");
    for d in &r.convergence {
        let odd = if usual.get(&d.vol) == Some(&d.digest.as_str()) {
            ""
        } else {
            "differs"
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | `{}` | {odd} |",
            d.vol,
            cell(&d.volume),
            d.node,
            cell(&d.site),
            cell(&d.digest)
        );
    }
}

/// The most common digest per volume, so the table can point at the odd replica out.
fn usual_digests(ds: &[ReplicaDigest]) -> HashMap<u32, &str> {
    let mut counts: BTreeMap<(u32, &str), usize> = BTreeMap::new();
    for d in ds {
        *counts.entry((d.vol, &d.digest)).or_default() += 1;
    }
    let mut best: HashMap<u32, (&str, usize)> = HashMap::new();
    for ((vol, digest), n) in counts {
        let e = best.entry(vol).or_insert((digest, n));
        if n > e.1 {
            *e = (digest, n);
        }
    }
    best.into_iter().map(|(vol, (d, _))| (vol, d)).collect()
}

/// A Markdown table cell: one line, no column separators.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn secs(us: u64) -> String {
    format!("{:.3}", us as f64 / 1e6)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{b} B"),
        _ => format!("{v:.1} {}", UNITS[unit]),
    }
}

// ---- timeline.png ----

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 800;
const TITLE_H: u32 = 40;
/// Width of the y label area of every panel: the same for all so the time axes line up.
const Y_LABELS_W: u32 = 150;
/// Latency points drawn at most (successful, failed): enough to see the shape, few
/// enough to keep the PNG small and quick to draw for a run of a million operations.
const MAX_OK_POINTS: usize = 16_000;
const MAX_FAILED_POINTS: usize = 4_000;
/// Floor of the latency axis (a log scale has no 0): 10 µs.
const MIN_LATENCY_MS: f64 = 0.01;

const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";
/// A family never registered: drawing without text uses it, so that any text drawn by
/// mistake fails loudly in tests instead of silently needing a font.
const NO_FONT: &str = "roamdisk-no-font";

/// Registers DejaVu Sans as plotters' `sans-serif` (once per process) and returns the
/// family to draw text with, or `None` when the font is not there: plotters with `ab_glyph`
/// has no font of its own, and a missing font must not cost us the plot.
fn font() -> Option<&'static str> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let Ok(bytes) = std::fs::read(FONT_PATH) else {
            return false;
        };
        let bytes: &'static [u8] = bytes.leak();
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
    });
    ok.then_some(FONT)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// Draws the three panels; without a font (`None`) no text at all.
fn draw_timeline(
    path: &Path,
    report: &Report,
    history: &History,
    font: Option<&str>,
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (title, body) = root.split_vertically(TITLE_H);
    if let Some(f) = font {
        draw_title(&title, report, f)?;
    }
    let x = 0.0..end_s(history);
    let kinds = fault_kinds(&history.faults);
    let faults_h = (50 + 26 * kinds.len() as u32).clamp(110, 230);
    let (faults_area, rest) = body.split_vertically(faults_h);
    let (latency_area, lag_area) = rest.split_vertically((HEIGHT - TITLE_H - faults_h) / 2 + 30);
    let text = Text {
        on: font.is_some(),
        family: font.unwrap_or(NO_FONT),
    };
    draw_faults(&faults_area, x.clone(), &history.faults, &kinds, text)?;
    draw_latency(&latency_area, x.clone(), history, &kinds, text)?;
    draw_lag(&lag_area, x, history, &kinds, text)?;
    root.present().map_err(plot_err)
}

/// Whether and with which font family a panel draws its text.
#[derive(Clone, Copy)]
struct Text<'a> {
    on: bool,
    family: &'a str,
}

impl Text<'_> {
    fn style(&self, size: u32) -> TextStyle<'_> {
        (self.family, size).into_font().color(&BLACK)
    }

    /// Size of a label area: none without text, as plotters draws the labels (and needs a
    /// font) whenever there is an area to draw them in.
    fn label_area(&self, size: u32) -> u32 {
        if self.on {
            size
        } else {
            0
        }
    }
}

fn draw_title(area: &Area, r: &Report, family: &str) -> anyhow::Result<()> {
    let title = format!(
        "roamdisk chaos: {}, seed {}, {:.0} s, {} faults, {} writes verified",
        r.scenario, r.seed, r.duration_s, r.faults_injected, r.writes_verified
    );
    let style = (family, 22).into_font().color(&BLACK);
    area.draw_text(&title, &style, (12, 10)).map_err(plot_err)?;
    let color = if r.passed { RGBColor(0, 140, 0) } else { RED };
    let v = (family, 26)
        .into_font()
        .style(FontStyle::Bold)
        .color(&color);
    area.draw_text(verdict(r), &v, (WIDTH as i32 - 90, 8))
        .map_err(plot_err)
}

/// End of the time axis (s): the last thing recorded, at least one second.
fn end_s(h: &History) -> f64 {
    let ops = h.ops.iter().map(|o| o.end_us.max(o.start_us));
    let faults = h
        .faults
        .iter()
        .map(|f| f.end_us.unwrap_or(0).max(f.start_us));
    let lag = h.lag.iter().map(|l| l.t_us);
    let end = ops.chain(faults).chain(lag).max().unwrap_or(0);
    (end as f64 / 1e6).max(1.0) * 1.01
}

/// Fault kinds in order of first injection: one row each, one color each.
fn fault_kinds(faults: &[FaultRecord]) -> Vec<String> {
    let mut kinds: Vec<String> = Vec::new();
    for f in faults {
        if !kinds.contains(&f.kind) {
            kinds.push(f.kind.clone());
        }
    }
    kinds
}

fn kind_color(kinds: &[String], kind: &str) -> PaletteColor<Palette99> {
    Palette99::pick(kinds.iter().position(|k| k == kind).unwrap_or(0))
}

/// The time span a fault is drawn over: one without an end gets a sliver, to be seen.
fn fault_span(f: &FaultRecord, x_end: f64) -> (f64, f64) {
    let start = f.start_us as f64 / 1e6;
    let end = f.end_us.map_or(0.0, |e| e as f64 / 1e6);
    (start, end.max(start + x_end / 400.0))
}

fn draw_faults(
    area: &Area,
    x: Range<f64>,
    faults: &[FaultRecord],
    kinds: &[String],
    text: Text,
) -> anyhow::Result<()> {
    let rows = kinds.len().max(1);
    let x_end = x.end;
    let mut chart = ChartBuilder::on(area)
        .margin(6)
        .margin_right(24)
        .y_label_area_size(text.label_area(Y_LABELS_W))
        .build_cartesian_2d(x, -0.5..rows as f64 - 0.5)
        .map_err(plot_err)?;
    // Row i (top to bottom) is at y = rows - 1 - i.
    let row_y = |kind: &str| {
        let i = kinds.iter().position(|k| k == kind).unwrap_or(0);
        (rows - 1 - i) as f64
    };
    let label = |y: &f64| {
        let i = rows as f64 - 1.0 - y.round();
        let exact = (y - y.round()).abs() < 1e-6 && i >= 0.0;
        let kind = kinds.get(i as usize).filter(|_| exact);
        kind.cloned().unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_labels(14)
        .y_labels(rows)
        .y_label_formatter(&label)
        .label_style(text.style(13))
        .draw()
        .map_err(plot_err)?;
    let bars = faults.iter().map(|f| {
        let (x0, x1) = fault_span(f, x_end);
        let y = row_y(&f.kind);
        let color = kind_color(kinds, &f.kind);
        Rectangle::new([(x0, y - 0.3), (x1, y + 0.3)], color.filled())
    });
    chart.draw_series(bars).map_err(plot_err)?;
    Ok(())
}

/// One point of the latency panel.
struct LatencyPoint {
    t_s: f64,
    ms: f64,
    class: usize,
}

/// Latency classes: the color and legend of each.
const CLASSES: [(&str, RGBColor); 4] = [
    ("write", RGBColor(30, 90, 200)),
    ("read", RGBColor(0, 150, 60)),
    ("flush", RGBColor(230, 140, 0)),
    ("failed", RGBColor(220, 0, 0)),
];
const FAILED: usize = 3;

fn latency_points(ops: &[OpRecord]) -> Vec<LatencyPoint> {
    let point = |o: &OpRecord| LatencyPoint {
        t_s: o.start_us as f64 / 1e6,
        ms: (latency_us(o) as f64 / 1000.0).max(MIN_LATENCY_MS),
        class: match (&o.op, o.ok()) {
            (_, false) => FAILED,
            (Op::Write { .. }, true) => 0,
            (Op::Read { .. }, true) => 1,
            (Op::Flush, true) => 2,
        },
    };
    let ok: Vec<&OpRecord> = ops.iter().filter(|o| o.ok()).collect();
    let failed: Vec<&OpRecord> = ops.iter().filter(|o| !o.ok()).collect();
    let mut points: Vec<LatencyPoint> = every_nth(&ok, MAX_OK_POINTS).map(|o| point(o)).collect();
    // Failed ones last, so they are drawn on top.
    points.extend(every_nth(&failed, MAX_FAILED_POINTS).map(|o| point(o)));
    points
}

/// At most about `max` items, evenly spread: downsampling that keeps the shape over time.
fn every_nth<T>(items: &[T], max: usize) -> impl Iterator<Item = &T> {
    let step = items.len().div_ceil(max.max(1)).max(1);
    items.iter().step_by(step)
}

/// Faults as faint bands behind a panel, to relate what it shows to what was injected.
fn fault_bands<'a>(
    faults: &'a [FaultRecord],
    kinds: &'a [String],
    x_end: f64,
    y: (f64, f64),
) -> impl Iterator<Item = Rectangle<(f64, f64)>> + 'a {
    faults.iter().map(move |f| {
        let (x0, x1) = fault_span(f, x_end);
        let color = kind_color(kinds, &f.kind).mix(0.12);
        Rectangle::new([(x0, y.0), (x1, y.1)], color.filled())
    })
}

fn draw_latency(
    area: &Area,
    x: Range<f64>,
    h: &History,
    kinds: &[String],
    text: Text,
) -> anyhow::Result<()> {
    let points = latency_points(&h.ops);
    let top = points.iter().map(|p| p.ms).fold(1.0, f64::max) * 2.0;
    let x_end = x.end;
    let mut chart = ChartBuilder::on(area)
        .margin(6)
        .margin_right(24)
        .y_label_area_size(text.label_area(Y_LABELS_W))
        .build_cartesian_2d(x, (MIN_LATENCY_MS..top).log_scale())
        .map_err(plot_err)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(14)
        .y_labels(8)
        .y_label_formatter(&|y| short_num(*y))
        .label_style(text.style(13));
    if text.on {
        mesh.y_desc("latency (ms)").axis_desc_style(text.style(14));
    }
    mesh.draw().map_err(plot_err)?;
    chart
        .draw_series(fault_bands(&h.faults, kinds, x_end, (MIN_LATENCY_MS, top)))
        .map_err(plot_err)?;
    for (class, (name, color)) in CLASSES.iter().enumerate() {
        let (size, alpha) = if class == FAILED { (3, 0.9) } else { (2, 0.45) };
        let dots = points
            .iter()
            .filter(|p| p.class == class)
            .map(|p| Circle::new((p.t_s, p.ms), size, color.mix(alpha).filled()));
        let series = chart.draw_series(dots).map_err(plot_err)?;
        if text.on {
            let c = *color;
            series
                .label(*name)
                .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
        }
    }
    if text.on {
        legend(&mut chart, text)?;
    }
    Ok(())
}

fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    text: Text,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .label_font(text.style(12))
        .draw()
        .map_err(plot_err)
}

/// `0.01`, `0.1`, `1`, `10`: axis numbers without float noise.
fn short_num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

fn draw_lag(
    area: &Area,
    x: Range<f64>,
    h: &History,
    kinds: &[String],
    text: Text,
) -> anyhow::Result<()> {
    const MIB: f64 = 1024.0 * 1024.0;
    let mut series: BTreeMap<(u32, &str), Vec<(f64, f64)>> = BTreeMap::new();
    for l in &h.lag {
        let p = (l.t_us as f64 / 1e6, l.bytes as f64 / MIB);
        series.entry((l.vol, &l.site)).or_default().push(p);
    }
    let top = series
        .values()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(0.01)
        * 1.1;
    let x_end = x.end;
    let mut chart = ChartBuilder::on(area)
        .margin(6)
        .margin_right(24)
        .x_label_area_size(text.label_area(40))
        .y_label_area_size(text.label_area(Y_LABELS_W))
        .build_cartesian_2d(x, 0.0..top)
        .map_err(plot_err)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(14)
        .y_labels(6)
        .y_label_formatter(&|y| short_num(*y))
        .label_style(text.style(13));
    if text.on {
        mesh.x_desc("time (s)")
            .y_desc("replication lag (MiB)")
            .axis_desc_style(text.style(14));
    }
    mesh.draw().map_err(plot_err)?;
    chart
        .draw_series(fault_bands(&h.faults, kinds, x_end, (0.0, top)))
        .map_err(plot_err)?;
    for (i, ((vol, site), mut points)) in series.into_iter().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i + 5);
        let line = LineSeries::new(points, color.stroke_width(2));
        let drawn = chart.draw_series(line).map_err(plot_err)?;
        if text.on {
            let c = color.to_rgba();
            drawn
                .label(format!("vol {vol} to {site}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
    }
    if text.on && !h.lag.is_empty() {
        legend(&mut chart, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker;
    use crate::history::{LagSample, Seen};

    /// A minute of a small run: writes, reads and flushes every 20 ms on two connections,
    /// a partition in the middle during which operations fail, lag samples for two sites.
    fn synthetic_history() -> History {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut h = History::default();
        let mut versions = [0u64; 8];
        for i in 0..3000u64 {
            let conn = (i % 2) as u32;
            let start_us = i * 20_000 + rng.u64(0..5000);
            let outage = (25_000_000..31_000_000).contains(&start_us);
            let lat = if outage {
                2_000_000
            } else {
                rng.u64(300..8000)
            };
            let block = conn as u64 + 2 * rng.u64(0..4);
            let op = match i % 7 {
                0 => Op::Flush,
                1 | 2 => Op::Read {
                    block,
                    seen: match versions[block as usize] {
                        0 => Seen::Zero,
                        version => Seen::Version { version },
                    },
                },
                _ => {
                    versions[block as usize] += 1;
                    Op::Write {
                        block,
                        version: versions[block as usize],
                    }
                }
            };
            h.ops.push(OpRecord {
                conn,
                vol: 0,
                node: 1,
                start_us,
                end_us: start_us + lat,
                op,
                error: outage.then(|| "timeout".to_string()),
            });
        }
        h.faults.push(FaultRecord {
            kind: "partition".into(),
            target: "osaka<->hokkaido".into(),
            start_us: 25_000_000,
            end_us: Some(31_000_000),
            note: None,
            applied: true,
            scheduled: true,
        });
        h.faults.push(FaultRecord {
            kind: "kill_node".into(),
            target: "node 4".into(),
            start_us: 40_000_000,
            end_us: None,
            note: Some("restarted | by itself".into()),
            applied: true,
            scheduled: true,
        });
        for t in 0..60u64 {
            for (site, scale) in [("hokkaido", 3u64), ("fukuoka", 1)] {
                let bytes = if (25..35).contains(&t) {
                    (t - 24) * 1_000_000 * scale
                } else {
                    0
                };
                h.lag.push(LagSample {
                    t_us: t * 1_000_000,
                    vol: 0,
                    site: site.into(),
                    bytes,
                    entries: bytes / 4096,
                    seconds_ms: 0,
                });
            }
        }
        h
    }

    fn report_for(h: &History, violations: Vec<Violation>) -> Report {
        let c = checker::check(h);
        let (p50, p99) = write_latency_ms(h);
        let digest = |node: u64, site: &str, digest: &str| ReplicaDigest {
            vol: 0,
            volume: "vm1".into(),
            node,
            site: site.into(),
            digest: digest.into(),
        };
        Report {
            scenario: "partition_heal".into(),
            seed: 42,
            duration_s: 60.0,
            negative_control: None,
            faults_injected: h.faults.len() as u64,
            faults_not_applied: 0,
            verify_differing_blocks: Some(0),
            faults: h.faults.clone(),
            writes_acked: c.writes_acked,
            writes_failed: c.writes_failed,
            writes_verified: c.writes_verified,
            reads_checked: c.reads_checked,
            flushes_ok: c.flushes_ok,
            passed: violations.is_empty(),
            violations,
            rto: c.rto,
            converged: true,
            convergence: vec![digest(1, "tokyo", "ab12"), digest(4, "osaka", "ab12")],
            p50_write_ms: p50,
            p99_write_ms: p99,
            max_lag_bytes: max_lag_bytes(h),
            command: "roamdisk-chaos run --scenario partition_heal --seed 42".into(),
        }
    }

    fn check_dir(dir: &Path, r: &Report) -> String {
        let json = std::fs::read_to_string(dir.join("report.json")).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.violations, r.violations);
        assert_eq!(back.seed, r.seed);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        for key in [
            "violations",
            "faults_injected",
            "writes_verified",
            "scenario",
            "seed",
        ] {
            assert!(value.get(key).is_some(), "{key}");
        }
        let png = std::fs::read(dir.join("timeline.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.len() > 10_000, "{} bytes", png.len());
        std::fs::read_to_string(dir.join("summary.md")).unwrap()
    }

    #[test]
    fn passing_report() {
        let h = synthetic_history();
        let r = report_for(&h, Vec::new());
        assert!(r.writes_verified > 100 && r.writes_failed > 50, "{r:?}");
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &r, &h).unwrap();
        let md = check_dir(dir.path(), &r);
        assert!(md.contains("**PASS**") && !md.contains("FAIL"), "{md}");
        assert!(md.contains(&r.command));
        assert!(md.contains("| partition | osaka<->hokkaido |"), "{md}");
        assert!(md.contains("restarted \\| by itself"), "{md}");
        assert!(md.contains("## Violations (0)"));
        if std::env::var_os("ROAMDISK_KEEP_REPORT").is_some() {
            let _ = std::fs::copy(dir.path().join("timeline.png"), "/tmp/timeline-pass.png");
        }
    }

    #[test]
    fn failing_report_lists_violations() {
        let h = synthetic_history();
        let violations: Vec<Violation> = (0..60u64)
            .map(|i| Violation {
                kind: if i % 3 == 0 {
                    "lost_write"
                } else {
                    "stale_read"
                }
                .into(),
                vol: 0,
                block: Some(i),
                at_us: i * 1000,
                detail: format!("vol 0 block {i}: read v1 at 0.001 s, but v2 was flushed"),
            })
            .collect();
        let mut r = report_for(&h, violations);
        r.converged = false;
        r.convergence[1].digest = "ffff".into();
        r.negative_control = Some("drop_acked_writes".into());
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("nested"), &r, &h).unwrap();
        let md = check_dir(&dir.path().join("nested"), &r);
        assert!(
            md.contains("**FAIL**: 60 violations (lost_write ×20, stale_read ×40)"),
            "{md}"
        );
        assert!(md.contains("… and 10 more"), "{md}");
        assert!(
            md.contains("DIVERGED") && md.contains("| differs |"),
            "{md}"
        );
        assert!(md.contains("drop_acked_writes"));
    }

    #[test]
    fn timeline_without_a_font_draws_no_text() {
        let h = synthetic_history();
        let r = report_for(&h, Vec::new());
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("t.png");
        draw_timeline(&png, &r, &h, None).unwrap();
        assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
        // An empty history still gives a plot.
        draw_timeline(&png, &r, &History::default(), None).unwrap();
        draw_timeline(&png, &r, &History::default(), font()).unwrap();
    }

    #[test]
    fn helpers() {
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), 2);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.99), 4);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(short_num(0.01), "0.01");
        assert_eq!(short_num(100.0), "100");
        assert_eq!(every_nth(&(0..100).collect::<Vec<_>>(), 30).count(), 25);
    }
}
