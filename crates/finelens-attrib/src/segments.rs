//! The features perturbation methods switch on and off: SLIC superpixels on an image (Achanta,
//! Shaji, Smith, Lucchi, Fua & Süsstrunk 2012), or a text model's tokens.
//!
//! SLIC is k-means on (CIELAB colour, position) with each centre searching only a 2S × 2S window
//! (S = √(H·W / k), the grid step), in the paper's parameter-free form SLICO: distance
//! D² = d_lab²/m_c² + d_xy²/S², m_c the largest colour distance in the cluster the round before
//! (the first round m = 10, scikit-image's compactness); centres start on the grid, moved to the lowest colour gradient of their 3×3
//! neighbourhood, then ten assignment / update rounds. Pieces of a label cut off from its main
//! part, and pieces under a quarter of the expected size, join a neighbouring segment (the
//! paper's connectivity step), so every segment is one connected region.

/// One feature id per position of the H×W plane (shared by the channels), ids 0..count.
#[derive(Debug, Clone, PartialEq)]
pub struct Segments {
    pub ids: Vec<usize>,
    pub count: usize,
}

impl Segments {
    /// Each row of the plane its own feature: a text model's input is 1 × T × hidden, so the
    /// rows are its tokens.
    pub fn rows(h: usize, w: usize) -> Segments {
        Segments {
            ids: (0..h * w).map(|p| p / w).collect(),
            count: h,
        }
    }

    /// Positions per segment.
    pub fn sizes(&self) -> Vec<usize> {
        let mut n = vec![0; self.count];
        for &id in &self.ids {
            n[id] += 1;
        }
        n
    }
}

/// scikit-image's default compactness for CIELAB.
pub const COMPACTNESS: f64 = 10.0;
const ROUNDS: usize = 10;

/// sRGB in [0, 1] → CIELAB (D65).
fn lab(r: f64, g: f64, b: f64) -> [f64; 3] {
    let lin = |c: f64| {
        let c = c.clamp(0.0, 1.0);
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let (r, g, b) = (lin(r), lin(g), lin(b));
    let x = (0.412453 * r + 0.357580 * g + 0.180423 * b) / 0.950456;
    let y = 0.212671 * r + 0.715160 * g + 0.072169 * b;
    let z = (0.019334 * r + 0.119193 * g + 0.950227 * b) / 1.088754;
    let f = |t: f64| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// SLIC superpixels of a C×H×W image (flat). Three channels are read as sRGB in [0, 1] and
/// clustered in CIELAB; any other channel count as it is.
pub fn slic(image: &[f32], (c, h, w): (usize, usize, usize), segments: usize) -> Segments {
    let hw = h * w;
    let k = segments.clamp(1, hw);
    // Colour features per pixel.
    let dims = if c == 3 { 3 } else { c };
    let mut colour = vec![0f64; hw * dims];
    for p in 0..hw {
        if c == 3 {
            let v = lab(
                image[p] as f64,
                image[hw + p] as f64,
                image[2 * hw + p] as f64,
            );
            colour[p * 3..p * 3 + 3].copy_from_slice(&v);
        } else {
            for ch in 0..c {
                colour[p * dims + ch] = image[ch * hw + p] as f64;
            }
        }
    }
    let step = ((hw as f64) / k as f64).sqrt().max(1.0);
    let (ny, nx) = (
        ((h as f64 / step).round() as usize).max(1),
        ((w as f64 / step).round() as usize).max(1),
    );
    // Centres: (y, x, colour…), on the grid, moved to the lowest gradient nearby.
    let grad = |y: usize, x: usize| -> f64 {
        let at = |yy: usize, xx: usize| &colour[(yy * w + xx) * dims..][..dims];
        let (y0, y1) = (y.saturating_sub(1), (y + 1).min(h - 1));
        let (x0, x1) = (x.saturating_sub(1), (x + 1).min(w - 1));
        let d = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        d(at(y, x1), at(y, x0)) + d(at(y1, x), at(y0, x))
    };
    let mut centres: Vec<Vec<f64>> = Vec::with_capacity(ny * nx);
    for i in 0..ny {
        for j in 0..nx {
            let cy = (((i as f64 + 0.5) * h as f64 / ny as f64) as usize).min(h - 1);
            let cx = (((j as f64 + 0.5) * w as f64 / nx as f64) as usize).min(w - 1);
            let mut best = (grad(cy, cx), cy, cx);
            for yy in cy.saturating_sub(1)..=(cy + 1).min(h - 1) {
                for xx in cx.saturating_sub(1)..=(cx + 1).min(w - 1) {
                    let g = grad(yy, xx);
                    if g < best.0 {
                        best = (g, yy, xx);
                    }
                }
            }
            let (_, y, x) = best;
            let mut v = vec![y as f64, x as f64];
            v.extend_from_slice(&colour[(y * w + x) * dims..][..dims]);
            centres.push(v);
        }
    }
    let s2 = step * step;
    let reach = (2.0 * step).ceil() as isize;
    let mut label = vec![usize::MAX; hw];
    let mut dist = vec![f64::INFINITY; hw];
    let mut colour_dist = vec![0f64; hw];
    // SLICO: each cluster's colour distances are scaled by the largest its pixels had in the
    // previous round (the first round by the compactness m), so textured regions weigh colour
    // less and stay compact instead of shattering into colour-sorted fragments.
    let mut mc2 = vec![COMPACTNESS * COMPACTNESS; centres.len()];
    for _ in 0..ROUNDS {
        dist.fill(f64::INFINITY);
        for (ci, cen) in centres.iter().enumerate() {
            let (cy, cx) = (cen[0].round() as isize, cen[1].round() as isize);
            let (y0, y1) = ((cy - reach).max(0), (cy + reach).min(h as isize - 1));
            let (x0, x1) = ((cx - reach).max(0), (cx + reach).min(w as isize - 1));
            for y in y0..=y1 {
                for x in x0..=x1 {
                    let p = y as usize * w + x as usize;
                    let dc: f64 = colour[p * dims..][..dims]
                        .iter()
                        .zip(&cen[2..])
                        .map(|(a, b)| (a - b).powi(2))
                        .sum();
                    let dxy = (y as f64 - cen[0]).powi(2) + (x as f64 - cen[1]).powi(2);
                    let d = dc / mc2[ci] + dxy / s2;
                    if d < dist[p] {
                        dist[p] = d;
                        label[p] = ci;
                        colour_dist[p] = dc;
                    }
                }
            }
        }
        let mut sums = vec![vec![0f64; 2 + dims]; centres.len()];
        let mut counts = vec![0usize; centres.len()];
        let mut widest = vec![0f64; centres.len()];
        for p in 0..hw {
            let l = label[p];
            if l == usize::MAX {
                continue;
            }
            counts[l] += 1;
            widest[l] = widest[l].max(colour_dist[p]);
            sums[l][0] += (p / w) as f64;
            sums[l][1] += (p % w) as f64;
            for (s, v) in sums[l][2..].iter_mut().zip(&colour[p * dims..][..dims]) {
                *s += v;
            }
        }
        for ((cen, s), &n) in centres.iter_mut().zip(&sums).zip(&counts) {
            if n > 0 {
                for (c, v) in cen.iter_mut().zip(s) {
                    *c = v / n as f64;
                }
            }
        }
        for (m, w) in mc2.iter_mut().zip(&widest) {
            // A flat cluster (every colour distance 0) keeps any colour change decisive.
            *m = w.max(1e-6);
        }
    }
    connected(&label, h, w, (hw / k / 4).max(1))
}

/// Relabel so that every segment is one 4-connected region: components of a label get ids in
/// scan order, and a component smaller than `min_size` joins the segment of the component the
/// scan met just before it (its neighbour above or to the left, as scikit-image does).
fn connected(label: &[usize], h: usize, w: usize, min_size: usize) -> Segments {
    let hw = h * w;
    let mut out = vec![usize::MAX; hw];
    let mut count = 0;
    let mut stack = Vec::new();
    let mut component = Vec::new();
    for start in 0..hw {
        if out[start] != usize::MAX {
            continue;
        }
        // The segment already placed next to this component (above or left of its first pixel).
        let adjacent = if start >= w {
            Some(out[start - w])
        } else if start % w > 0 {
            Some(out[start - 1])
        } else {
            None
        };
        component.clear();
        stack.push(start);
        out[start] = count;
        while let Some(p) = stack.pop() {
            component.push(p);
            let (y, x) = (p / w, p % w);
            let mut visit = |q: usize| {
                if out[q] == usize::MAX && label[q] == label[start] {
                    out[q] = count;
                    stack.push(q);
                }
            };
            if y > 0 {
                visit(p - w);
            }
            if y + 1 < h {
                visit(p + w);
            }
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < w {
                visit(p + 1);
            }
        }
        match adjacent {
            Some(a) if component.len() < min_size => {
                for &p in &component {
                    out[p] = a;
                }
            }
            _ => count += 1,
        }
    }
    Segments { ids: out, count }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four flat-coloured quadrants with 4 segments asked for: SLIC finds the quadrants exactly.
    /// With more segments every segment is connected, no segment crosses a colour edge, and the
    /// ids run 0..count.
    #[test]
    fn slic_follows_colour_edges_and_segments_are_connected() {
        let (h, w) = (24, 32);
        let colours = [
            [0.9, 0.1, 0.1],
            [0.1, 0.8, 0.2],
            [0.1, 0.2, 0.9],
            [0.9, 0.9, 0.1],
        ];
        let quadrant = |p: usize| (p / w >= h / 2) as usize * 2 + (p % w >= w / 2) as usize;
        let mut img = vec![0f32; 3 * h * w];
        for p in 0..h * w {
            for ch in 0..3 {
                img[ch * h * w + p] = colours[quadrant(p)][ch];
            }
        }
        let s = slic(&img, (3, h, w), 4);
        assert_eq!(s.count, 4);
        for p in 0..h * w {
            for q in 0..h * w {
                assert_eq!(s.ids[p] == s.ids[q], quadrant(p) == quadrant(q));
            }
        }
        let s = slic(&img, (3, h, w), 24);
        assert!(s.count >= 12 && s.count <= 40, "{} segments", s.count);
        assert!(s.sizes().iter().all(|&n| n > 0));
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); s.count];
        for (p, &id) in s.ids.iter().enumerate() {
            members[id].push(p);
        }
        for m in &members {
            assert!(
                m.iter().all(|&p| quadrant(p) == quadrant(m[0])),
                "a segment crosses an edge"
            );
            // Connected: a flood fill from one member reaches all.
            let mut seen = vec![false; h * w];
            let mut stack = vec![m[0]];
            seen[m[0]] = true;
            let mut reached = 0;
            while let Some(p) = stack.pop() {
                reached += 1;
                let (y, x) = (p / w, p % w);
                let nb = [
                    (y > 0).then(|| p - w),
                    (y + 1 < h).then(|| p + w),
                    (x > 0).then(|| p - 1),
                    (x + 1 < w).then(|| p + 1),
                ];
                for q in nb.into_iter().flatten() {
                    if !seen[q] && s.ids[q] == s.ids[p] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
            assert_eq!(reached, m.len());
        }
        // Deterministic; and rows are tokens.
        assert_eq!(slic(&img, (3, h, w), 24), s);
        let r = Segments::rows(3, 4);
        assert_eq!(
            (r.count, &r.ids[..]),
            (3, &[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2][..])
        );
    }

    /// On pure noise there are no edges to follow: SLIC still gives about the count asked for
    /// (compactness keeps the grid), not a few merged blobs.
    #[test]
    fn noise_gives_about_the_count_asked_for() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let img: Vec<f32> = (0..3 * 64 * 64).map(|_| rng.random::<f32>()).collect();
        let s = slic(&img, (3, 64, 64), 50);
        assert!(s.count >= 25 && s.count <= 80, "{} segments", s.count);
    }

    #[test]
    fn lab_of_white_black_and_red() {
        let close = |a: [f64; 3], b: [f64; 3]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 0.05);
        assert!(
            close(lab(1.0, 1.0, 1.0), [100.0, 0.0, 0.0]),
            "{:?}",
            lab(1.0, 1.0, 1.0)
        );
        assert!(close(lab(0.0, 0.0, 0.0), [0.0, 0.0, 0.0]));
        // skimage.color.rgb2lab([[[1, 0, 0]]]) = [53.24, 80.09, 67.20]
        assert!(
            close(lab(1.0, 0.0, 0.0), [53.24, 80.09, 67.20]),
            "{:?}",
            lab(1.0, 0.0, 0.0)
        );
    }
}
