//! Drift figures: how much each layer moved (horizontal bars in network order) and the layer ×
//! layer CKA matrix between two models (a heat map with the values written in).

use plotters::prelude::*;

use crate::heatmap::{colour, Scale};
use crate::plot::register_font;
use crate::{ReportError, Result};

fn draw_err(what: &'static str) -> impl Fn(String) -> ReportError {
    move |reason| ReportError::Draw {
        what: what.into(),
        reason,
    }
}

/// One bar per layer (network order, top to bottom): `values[i]` for `labels[i]`, e.g. the
/// relative L2 change ‖W₁ − W₀‖/‖W₀‖. Non-finite values are drawn at the axis maximum.
pub fn layer_bars(title: &str, labels: &[String], values: &[f64]) -> Result<Vec<u8>> {
    if labels.is_empty() || labels.len() != values.len() {
        return Err(ReportError::Empty(format!(
            "{title}: {} labels for {} values",
            labels.len(),
            values.len()
        )));
    }
    register_font();
    let err = draw_err("layer drift chart");
    let n = labels.len();
    let (w, h) = (900u32, (80 + 16 * n) as u32);
    let finite_max = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max);
    let top = (finite_max * 1.1).max(1e-9);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(180)
            .build_cartesian_2d(0f64..top, 0f64..n as f64)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        // Row i (network order, top down) spans y ∈ [n−i−1, n−i); its name goes at its centre.
        for (i, label) in labels.iter().enumerate() {
            let (_, py) = chart.backend_coord(&(0.0, (n - i) as f64 - 0.5));
            root.draw(&Text::new(label.clone(), (12, py - 6), ("sans-serif", 11)))
                .map_err(|e| err(e.to_string()))?;
        }
        let bars = values.iter().enumerate().map(|(i, &v)| {
            let y0 = (n - i - 1) as f64 + 0.15;
            let v = if v.is_finite() { v } else { top };
            Rectangle::new([(0.0, y0), (v, y0 + 0.7)], RGBColor(0, 114, 178).filled())
        });
        chart.draw_series(bars).map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::encode_png(&rgb, w, h, "layer drift chart")
}

/// The rows × cols matrix of values in [0, 1] as coloured cells (viridis) with each value
/// written in: rows are labelled on the left, columns below.
pub fn matrix_heatmap(
    title: &str,
    row_labels: &[String],
    col_labels: &[String],
    values: &[Vec<f64>],
) -> Result<Vec<u8>> {
    let (rows, cols) = (row_labels.len(), col_labels.len());
    if rows == 0 || cols == 0 || values.len() != rows || values.iter().any(|r| r.len() != cols) {
        return Err(ReportError::Empty(format!(
            "{title}: a {rows}×{cols} heat map needs that many values"
        )));
    }
    register_font();
    let err = draw_err("CKA heat map");
    let cell = 72u32;
    let (w, h) = (160 + cell * cols as u32 + 20, 60 + cell * rows as u32 + 60);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        root.draw(&Text::new(title.to_owned(), (10, 10), ("sans-serif", 18)))
            .map_err(|e| err(e.to_string()))?;
        let (x0, y0) = (160i32, 50i32);
        for (i, row) in values.iter().enumerate() {
            root.draw(&Text::new(
                row_labels[i].clone(),
                (10, y0 + (i as i32) * cell as i32 + cell as i32 / 2 - 7),
                ("sans-serif", 13),
            ))
            .map_err(|e| err(e.to_string()))?;
            for (j, &v) in row.iter().enumerate() {
                let c = colour(v.clamp(0.0, 1.0) as f32, Scale::Sequential);
                let (cx, cy) = (x0 + (j as i32) * cell as i32, y0 + (i as i32) * cell as i32);
                root.draw(&Rectangle::new(
                    [(cx, cy), (cx + cell as i32 - 2, cy + cell as i32 - 2)],
                    RGBColor(c[0], c[1], c[2]).filled(),
                ))
                .map_err(|e| err(e.to_string()))?;
                // Dark text on the light end of the map, white on the dark end.
                let ink = if v > 0.6 { BLACK } else { WHITE };
                root.draw(&Text::new(
                    if v.is_finite() {
                        format!("{v:.2}")
                    } else {
                        "n/a".into()
                    },
                    (cx + cell as i32 / 2 - 14, cy + cell as i32 / 2 - 7),
                    ("sans-serif", 14).into_font().color(&ink),
                ))
                .map_err(|e| err(e.to_string()))?;
            }
        }
        for (j, l) in col_labels.iter().enumerate() {
            root.draw(&Text::new(
                l.clone(),
                (
                    x0 + (j as i32) * cell as i32 + 4,
                    y0 + (rows as i32) * cell as i32 + 8,
                ),
                ("sans-serif", 13),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::encode_png(&rgb, w, h, "CKA heat map")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_figures_render_and_bad_shapes_are_errors() {
        let labels: Vec<String> = ["conv1", "layer1.0.conv1", "fc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let png = layer_bars("relative change", &labels, &[0.01, 0.2, f64::INFINITY]).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!(img.width(), 900);
        assert!(layer_bars("x", &labels, &[1.0]).is_err());
        let m = vec![vec![1.0, 0.5, 0.1]; 3];
        let png = matrix_heatmap("CKA", &labels, &labels, &m).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        // The top-left cell (value 1) is viridis' yellow end.
        let p = img.get_pixel(170, 60).0;
        assert!(p[0] > 200 && p[1] > 200 && p[2] < 80, "{p:?}");
        assert!(matrix_heatmap("CKA", &labels, &labels, &m[..2]).is_err());
    }
}
