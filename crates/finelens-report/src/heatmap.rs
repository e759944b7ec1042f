//! Attribution maps as pictures: channel reduction, Captum-style outlier clipping, colour maps,
//! heat maps and overlays, returned as PNG bytes.

use image::RgbImage;
use ndarray::{Array2, ArrayView2, ArrayView3, Axis};

use crate::{ReportError, Result};

/// How values map to colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Magnitudes, 0 … max: a perceptually uniform sequential map (viridis).
    Sequential,
    /// Signed values centred on zero: blue (negative) – white – red (positive), ColorBrewer RdBu.
    Diverging,
}

/// How a C×H×W attribution becomes one H×W plane for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelReduce {
    /// Σ over channels, keeping the sign (Captum's `visualize_image_attr`).
    Sum,
    /// The largest |value| over channels (Simonyan et al.'s saliency maps).
    MaxAbs,
}

impl ChannelReduce {
    /// The usual reduction for a scale: sum for signed maps, max |·| for magnitudes.
    pub fn for_scale(scale: Scale) -> Self {
        match scale {
            Scale::Diverging => ChannelReduce::Sum,
            Scale::Sequential => ChannelReduce::MaxAbs,
        }
    }
}

/// Captum's default `outlier_perc`: the largest values that hold the top 2% of the total
/// attribution mass are clipped, so that a few extreme cells do not wash out the rest.
pub const DEFAULT_OUTLIER_PERC: f32 = 2.0;

pub fn reduce_channels(map: ArrayView3<f32>, how: ChannelReduce) -> Array2<f32> {
    match how {
        ChannelReduce::Sum => map.sum_axis(Axis(0)),
        ChannelReduce::MaxAbs => map.fold_axis(Axis(0), 0f32, |m, v| m.max(v.abs())),
    }
}

/// Captum's `_cumulative_sum_threshold`: the smallest |value| at which the cumulative sum of the
/// sorted |values| reaches (100 − outlier_perc)% of their total.
pub fn outlier_threshold(values: impl Iterator<Item = f32>, outlier_perc: f32) -> f32 {
    let mut v: Vec<f32> = values.map(f32::abs).filter(|x| x.is_finite()).collect();
    v.sort_by(f32::total_cmp);
    let total: f64 = v.iter().map(|&x| x as f64).sum();
    let goal = total * (100.0 - outlier_perc.clamp(0.0, 100.0) as f64) / 100.0;
    let mut acc = 0f64;
    for &x in &v {
        acc += x as f64;
        if acc >= goal {
            return x;
        }
    }
    v.last().copied().unwrap_or(0.0)
}

/// Values divided by the outlier threshold and clipped: to [−1, 1] for a diverging scale, to
/// [0, 1] (of |value|) for a sequential one. An all-zero map stays zero.
pub fn normalise(a: ArrayView2<f32>, scale: Scale, outlier_perc: f32) -> Array2<f32> {
    let t = outlier_threshold(a.iter().copied(), outlier_perc);
    let t = if t > 0.0 { t } else { 1.0 };
    a.mapv(|v| match scale {
        Scale::Diverging => (v / t).clamp(-1.0, 1.0),
        Scale::Sequential => (v.abs() / t).clamp(0.0, 1.0),
    })
}

/// Matplotlib's viridis at nine evenly spaced points.
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

/// ColorBrewer RdBu (11 classes), from −1 (dark blue) through white to +1 (dark red).
const RDBU: [[u8; 3]; 11] = [
    [5, 48, 97],
    [33, 102, 172],
    [67, 147, 195],
    [146, 197, 222],
    [209, 229, 240],
    [247, 247, 247],
    [253, 219, 199],
    [244, 165, 130],
    [214, 96, 77],
    [178, 24, 43],
    [103, 0, 31],
];

fn lerp_table(table: &[[u8; 3]], t: f32) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (table.len() - 1) as f32;
    let i = (pos.floor() as usize).min(table.len() - 2);
    let f = pos - i as f32;
    let mix = |a: u8, b: u8| (a as f32 + (b as f32 - a as f32) * f).round() as u8;
    let (a, b) = (table[i], table[i + 1]);
    [mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2])]
}

/// The colour of a normalised value (in [0, 1] sequential, [−1, 1] diverging).
pub fn colour(v: f32, scale: Scale) -> [u8; 3] {
    match scale {
        Scale::Sequential => lerp_table(&VIRIDIS, v),
        Scale::Diverging => lerp_table(&RDBU, (v + 1.0) / 2.0),
    }
}

/// Integer upscaling so that small inputs (64×64) are still legible: at least 256 px a side.
pub fn display_factor(side: usize) -> usize {
    256usize.div_ceil(side.max(1)).max(1)
}

/// PNG bytes of an image.
pub fn png(img: &RgbImage) -> Result<Vec<u8>> {
    crate::encode_png(img.as_raw(), img.width(), img.height(), "image")
}

fn upscale(img: RgbImage, k: usize) -> RgbImage {
    if k <= 1 {
        return img;
    }
    let k = k as u32;
    RgbImage::from_fn(img.width() * k, img.height() * k, |x, y| {
        *img.get_pixel(x / k, y / k)
    })
}

/// An H×W map (already reduced over channels) as a colour-mapped image at its own size.
pub fn heatmap_rgb(a: ArrayView2<f32>, scale: Scale, outlier_perc: f32) -> RgbImage {
    let n = normalise(a, scale, outlier_perc);
    let (h, w) = n.dim();
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        image::Rgb(colour(n[[y as usize, x as usize]], scale))
    })
}

/// An H×W map as a colour-mapped PNG, upscaled to at least 256 pixels a side.
pub fn heatmap_png(a: ArrayView2<f32>, scale: Scale, outlier_perc: f32) -> Result<Vec<u8>> {
    let (h, w) = a.dim();
    png(&upscale(
        heatmap_rgb(a, scale, outlier_perc),
        display_factor(h.max(w)),
    ))
}

/// How strongly the heat map covers the image where attribution is strongest.
const OVERLAY_ALPHA: f32 = 0.7;

/// The heat map blended onto the input shown in grey (so the map's colours read): each pixel
/// takes the map's colour in proportion to its normalised magnitude, so cells with no
/// attribution show the image unchanged.
pub fn overlay_png(
    input: &RgbImage,
    a: ArrayView2<f32>,
    scale: Scale,
    outlier_perc: f32,
) -> Result<Vec<u8>> {
    let img = overlay_rgb(input, a, scale, outlier_perc)?;
    let side = img.width().max(img.height()) as usize;
    png(&upscale(img, display_factor(side)))
}

/// The overlay at the input's own size.
pub fn overlay_rgb(
    input: &RgbImage,
    a: ArrayView2<f32>,
    scale: Scale,
    outlier_perc: f32,
) -> Result<RgbImage> {
    let n = normalise(a, scale, outlier_perc);
    let (h, w) = n.dim();
    if (input.width() as usize, input.height() as usize) != (w, h) {
        return Err(ReportError::Draw {
            what: "overlay".into(),
            reason: format!(
                "the image is {}×{}, the attribution {w}×{h}",
                input.width(),
                input.height()
            ),
        });
    }
    let img = RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = input.get_pixel(x, y).0;
        let grey = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
        let v = n[[y as usize, x as usize]];
        let c = colour(v, scale);
        let alpha = OVERLAY_ALPHA * v.abs();
        let mix = |c: u8| ((1.0 - alpha) * grey + alpha * c as f32).round() as u8;
        image::Rgb([mix(c[0]), mix(c[1]), mix(c[2])])
    });
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array3};

    #[test]
    fn colour_maps_run_from_end_to_end() {
        assert_eq!(colour(0.0, Scale::Sequential), VIRIDIS[0]);
        assert_eq!(colour(1.0, Scale::Sequential), VIRIDIS[8]);
        assert_eq!(colour(-1.0, Scale::Diverging), RDBU[0]);
        assert_eq!(colour(0.0, Scale::Diverging), [247, 247, 247]);
        assert_eq!(colour(1.0, Scale::Diverging), RDBU[10]);
        assert_eq!(colour(f32::NAN, Scale::Sequential), VIRIDIS[0]);
    }

    #[test]
    fn outliers_are_clipped_like_captum() {
        // 98 cells of 1 and one of 1000: the big one holds most of the mass, so with 2% clipping
        // the threshold is 1000 (it is needed to reach 98% of the total); with 95% it is 1.
        let mut v = vec![1f32; 98];
        v.push(1000.0);
        assert_eq!(outlier_threshold(v.iter().copied(), 2.0), 1000.0);
        assert_eq!(outlier_threshold(v.iter().copied(), 95.0), 1.0);
        // Many ordinary cells and one outlier with under 2% of the mass: the threshold is the
        // ordinary value, the outlier is clipped to 1, the rest keep their proportions.
        let mut a = Array2::from_elem((40, 40), 1f32);
        a[[0, 0]] = 0.5;
        a[[9, 9]] = 5.0;
        let n = normalise(a.view(), Scale::Sequential, 2.0);
        assert_eq!(n[[9, 9]], 1.0);
        assert_eq!(n[[5, 5]], 1.0);
        assert_eq!(n[[0, 0]], 0.5);
        // Signs survive on a diverging scale; a zero map stays zero (no NaN).
        let s = normalise(
            array![[-2f32, 2.0], [0.0, 1.0]].view(),
            Scale::Diverging,
            0.0,
        );
        assert_eq!(s, array![[-1f32, 1.0], [0.0, 0.5]]);
        let z = normalise(Array2::zeros((3, 3)).view(), Scale::Diverging, 2.0);
        assert!(z.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn channels_reduce_by_sum_or_max_magnitude() {
        let m = Array3::from_shape_vec((2, 1, 2), vec![1f32, -3.0, 2.0, 1.0]).unwrap();
        assert_eq!(
            reduce_channels(m.view(), ChannelReduce::Sum),
            array![[3f32, -2.0]]
        );
        assert_eq!(
            reduce_channels(m.view(), ChannelReduce::MaxAbs),
            array![[2f32, 3.0]]
        );
    }

    #[test]
    fn pngs_decode_at_display_size_and_overlays_keep_unattributed_pixels() {
        let a = Array2::from_shape_fn((64, 64), |(y, x)| if x < 32 { 0.0 } else { y as f32 });
        let bytes = heatmap_png(a.view(), Scale::Sequential, 2.0).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (256, 256));
        let input = RgbImage::from_pixel(64, 64, image::Rgb([100, 100, 100]));
        let over = overlay_png(&input, a.view(), Scale::Sequential, 2.0).unwrap();
        let over = image::load_from_memory(&over).unwrap().to_rgb8();
        assert_eq!(over.get_pixel(0, 0).0, [100, 100, 100]);
        assert_ne!(over.get_pixel(255, 255).0, [100, 100, 100]);
        let small = RgbImage::new(8, 8);
        assert!(overlay_png(&small, a.view(), Scale::Sequential, 2.0).is_err());
    }
}
