//! Line charts as PNG bytes, drawn with plotters into memory.

use std::sync::Once;

use plotters::prelude::*;

use crate::{ReportError, Result};

/// DejaVu Sans (see fonts/LICENSE-DejaVu), embedded so that text renders on a machine without
/// fonts or fontconfig.
static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

pub(crate) fn register_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TrueType font checked in with the crate; failure is a build defect.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One named line: a value per epoch (epoch 1 first).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 360;
/// Line colours: train, validation (a colour-blind-safe pair), then more.
const COLOURS: [RGBColor; 4] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
];

fn draw_err(what: &str) -> impl Fn(String) -> ReportError + '_ {
    move |reason| ReportError::Draw {
        what: what.to_owned(),
        reason,
    }
}

/// Two panels side by side — loss and accuracy per epoch — as PNG bytes.
pub fn training_curves(loss: &[Series], accuracy: &[Series]) -> Result<Vec<u8>> {
    let epochs = loss
        .iter()
        .chain(accuracy)
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0);
    if epochs == 0 {
        return Err(ReportError::Empty(
            "training curves need at least one epoch".into(),
        ));
    }
    register_font();
    let err = draw_err("training curves");
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let finite_max = loss
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0f64, f64::max);
        panel(
            &left,
            "loss",
            loss,
            epochs,
            0.0..(finite_max * 1.05).max(1e-6),
        )
        .map_err(&err)?;
        panel(&right, "accuracy", accuracy, epochs, 0.0..1.0).map_err(&err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::encode_png(&rgb, WIDTH, HEIGHT, "training curves")
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
    epochs: usize,
    y: std::ops::Range<f64>,
) -> std::result::Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(1f64..(epochs.max(2) as f64), y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(epochs.clamp(2, 10))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(e, v)| (e as f64 + 1.0, *v));
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(points.map(|p| Circle::new(p, 3, colour.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, values: &[f64]) -> Series {
        Series {
            name: name.into(),
            values: values.to_vec(),
        }
    }

    #[test]
    fn curves_render_a_png_with_both_lines_and_text() {
        let png = training_curves(
            &[
                series("train", &[1.5, 0.8, 0.4]),
                series("val", &[1.6, 0.9, f64::NAN]),
            ],
            &[
                series("train", &[0.4, 0.7, 0.9]),
                series("val", &[0.35, 0.65, 0.88]),
            ],
        )
        .unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let count = |c: RGBColor| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        assert!(count(COLOURS[0]) > 200, "train line missing");
        assert!(count(COLOURS[1]) > 200, "val line missing");
        // Text (captions, tick labels) draws dark anti-aliased pixels beyond the axis lines.
        let dark = img.pixels().filter(|p| p.0.iter().all(|c| *c < 80)).count();
        assert!(dark > 500, "no text rendered ({dark} dark pixels)");
    }

    #[test]
    fn no_epochs_is_an_error() {
        assert!(training_curves(&[], &[]).is_err());
    }
}
