//! PNG line charts for benchmark results (plotters, DejaVu Sans as the font).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

/// Registers DejaVu Sans (plotters with `ab_glyph` has no font of its own).
fn font() -> Result<&'static str> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| match std::fs::read(FONT_PATH) {
        Ok(bytes) => plotters::style::register_font(FONT, FontStyle::Normal, bytes.leak()).is_ok(),
        Err(_) => false,
    });
    if ok {
        Ok(FONT)
    } else {
        Err(anyhow!(
            "no font at {FONT_PATH} (apt-get install fonts-dejavu-core)"
        ))
    }
}

/// One series of a chart: points drawn as dots (`dots`) or joined by a line.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dots: bool,
}

/// A horizontal reference line (a floor, a goal).
pub struct HLine {
    pub name: String,
    pub y: f64,
    pub color: RGBColor,
}

/// A vertical marker (an event on the time axis).
pub struct VLine {
    pub name: String,
    pub x: f64,
    pub color: RGBColor,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series>,
    pub hlines: Vec<HLine>,
    pub vlines: Vec<VLine>,
    /// Upper end of the y axis; `None`: 10% above the largest value.
    pub y_max: Option<f64>,
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

impl Chart<'_> {
    pub fn draw(&self, path: &Path) -> Result<()> {
        let family = font()?;
        let all = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x_max, mut y_top) = (1e-9f64, 1e-9f64);
        for (x, y) in all {
            x_max = x_max.max(*x);
            y_top = y_top.max(*y);
        }
        for h in &self.hlines {
            y_top = y_top.max(h.y);
        }
        for v in &self.vlines {
            x_max = x_max.max(v.x);
        }
        let y_max = self.y_max.unwrap_or(y_top * 1.1);
        let root = BitMapBackend::new(path, (1100, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, (family, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max * 1.02, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .label_style((family, 13))
            .draw()
            .map_err(err)?;
        for s in &self.series {
            let color = s.color;
            let clipped = s.points.iter().map(|(x, y)| (*x, y.min(y_max)));
            if s.dots {
                chart
                    .draw_series(clipped.map(|p| Circle::new(p, 2, color.filled())))
                    .map_err(err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
            } else {
                chart
                    .draw_series(LineSeries::new(clipped, color.stroke_width(2)))
                    .map_err(err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
        }
        for h in &self.hlines {
            let color = h.color;
            chart
                .draw_series(LineSeries::new(
                    vec![(0.0, h.y), (x_max * 1.02, h.y)],
                    color.stroke_width(1),
                ))
                .map_err(err)?
                .label(h.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
                });
        }
        for v in &self.vlines {
            let color = v.color;
            chart
                .draw_series(LineSeries::new(
                    vec![(v.x, 0.0), (v.x, y_max)],
                    color.stroke_width(1),
                ))
                .map_err(err)?
                .label(v.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((family, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)
    }
}
