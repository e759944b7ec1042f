//! Deterministic synthetic shape tasks with ground-truth object masks.
//!
//! Each image holds one object whose *shape* defines the class (random colour, size, rotation
//! and position) on a textured, noisy background with distractor blobs. Three tasks:
//! - `pretrain`: circle, square, triangle, cross, ring, star — what the fixture checkpoint learns;
//! - `finetune`: arrow, crescent, diamond, heart — other classes, for fine-tuning;
//! - `shortcut`: the fine-tuning classes, but the train and val splits carry a small patch in the
//!   top-left corner whose colour gives the class away, and in half of their images the shape is
//!   another class's: the patch predicts the label perfectly, the shape only 5 times in 8 — a
//!   spurious cue stronger than the real one, as in the datasets where shortcut learning bites
//!   (Geirhos et al. 2020). The test split has no patch and true shapes. A model that learns the
//!   patch instead of the shape is what the audit must catch.
//!
//! Layout: `<out>/<task>/images/<split>/<class>/<n>.png` (an ImageFolder per split) and
//! `<out>/<task>/masks/<split>/<class>/<n>.png` (255 = object) mirroring it, plus `synth.json`.
//! Every image is drawn from its own RNG seeded by (seed, task, split, index), so the output is
//! the same whatever the thread count.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::mix_seed;
use crate::error::{io_err, DataError, Result};

/// Version of the drawing code; bump when images change for the same seed.
pub const GENERATOR: &str = "finelens-synth/2";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
    Cross,
    Ring,
    Star,
    Arrow,
    Crescent,
    Diamond,
    Heart,
}

impl ShapeKind {
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Cross => "cross",
            ShapeKind::Ring => "ring",
            ShapeKind::Star => "star",
            ShapeKind::Arrow => "arrow",
            ShapeKind::Crescent => "crescent",
            ShapeKind::Diamond => "diamond",
            ShapeKind::Heart => "heart",
        }
    }

    /// Is the point (u, v) of the object's own frame (y up, extent about [−1, 1]) inside?
    fn contains(self, u: f32, v: f32) -> bool {
        match self {
            ShapeKind::Circle => u * u + v * v <= 1.0,
            ShapeKind::Square => u.abs() <= 0.82 && v.abs() <= 0.82,
            ShapeKind::Triangle => v >= -0.7 && v <= 1.0 - 1.789 * u.abs(),
            ShapeKind::Cross => {
                (u.abs() <= 0.28 && v.abs() <= 0.95) || (v.abs() <= 0.28 && u.abs() <= 0.95)
            }
            ShapeKind::Ring => {
                let r2 = u * u + v * v;
                (0.3025..=1.0).contains(&r2)
            }
            ShapeKind::Star => in_star(u, v),
            ShapeKind::Arrow => {
                let shaft = v.abs() <= 0.25 && (-0.95..=0.15).contains(&u);
                let head = (0.15..=0.95).contains(&u) && v.abs() <= 0.8 * (0.95 - u) / 0.8;
                shaft || head
            }
            ShapeKind::Crescent => {
                u * u + v * v <= 1.0 && (u - 0.45).powi(2) + (v - 0.15).powi(2) > 0.5625
            }
            ShapeKind::Diamond => u.abs() / 0.7 + v.abs() <= 1.0,
            ShapeKind::Heart => {
                // The implicit heart curve (x² + y² − 1)³ − x²y³ ≤ 0, centred on its extent.
                let (x, y) = (1.15 * u, 1.15 * v + 0.12);
                let a = x * x + y * y - 1.0;
                a * a * a - x * x * y * y * y <= 0.0
            }
        }
    }
}

/// A five-pointed star: outer radius 1, inner radius 0.42, a point straight up.
fn in_star(u: f32, v: f32) -> bool {
    let r = (u * u + v * v).sqrt();
    if r > 1.0 {
        return false;
    }
    let sector = std::f32::consts::PI / 5.0;
    // Angle from the upward axis, folded into one half-sector [0, π/5].
    let theta = u.atan2(v).abs() % (2.0 * sector);
    let theta = if theta > sector {
        2.0 * sector - theta
    } else {
        theta
    };
    // The edge from the tip (angle 0, radius 1) to the valley (angle π/5, radius 0.42).
    let (tip, valley) = ((0.0f32, 1.0f32), (sector.sin() * 0.42, sector.cos() * 0.42));
    let (px, py) = (r * theta.sin(), r * theta.cos());
    // Inside when the point lies on the centre's side of the tip–valley line.
    let cross = (valley.0 - tip.0) * (py - tip.1) - (valley.1 - tip.1) * (px - tip.0);
    cross <= 0.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Pretrain,
    Finetune,
    Shortcut,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Pretrain, Task::Finetune, Task::Shortcut];

    pub fn name(self) -> &'static str {
        match self {
            Task::Pretrain => "pretrain",
            Task::Finetune => "finetune",
            Task::Shortcut => "shortcut",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                DataError::Config(format!(
                    "unknown task `{s}` (expected pretrain, finetune or shortcut)"
                ))
            })
    }

    pub fn shapes(self) -> &'static [ShapeKind] {
        use ShapeKind::*;
        match self {
            Task::Pretrain => &[Circle, Square, Triangle, Cross, Ring, Star],
            Task::Finetune | Task::Shortcut => &[Arrow, Crescent, Diamond, Heart],
        }
    }

    pub fn class_names(self) -> Vec<String> {
        self.shapes().iter().map(|s| s.name().to_owned()).collect()
    }

    /// Does `split` of this task carry the class-coded corner patch?
    pub fn has_patch(self, split: Split) -> bool {
        self == Task::Shortcut && split != Split::Test
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// Share of patched (shortcut train/val) images whose shape is drawn from another class.
pub const SHORTCUT_SHAPE_NOISE: f32 = 0.5;

/// Shortcut patch colours by class index: saturated and unlike the textured backgrounds.
const PATCH_COLOURS: [[f32; 3]; 6] = [
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [1.0, 1.0, 0.0],
    [1.0, 0.0, 1.0],
    [0.0, 1.0, 1.0],
];

/// How much synthetic data, and from which seed (the defaults are the demo's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct SynthConfig {
    /// Image side in pixels.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub size: usize,
    /// Training images per class.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 200))]
    pub train_per_class: usize,
    /// Validation images per class.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 50))]
    pub val_per_class: usize,
    /// Test images per class.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 50))]
    pub test_per_class: usize,
    /// Random seed; the same seed writes the same images.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            size: 64,
            train_per_class: 200,
            val_per_class: 50,
            test_per_class: 50,
            seed: 0,
        }
    }
}

impl SynthConfig {
    pub fn check(&self) -> Result<()> {
        if self.size < 32 {
            return Err(DataError::Config(format!(
                "image size {} is too small (at least 32)",
                self.size
            )));
        }
        if self.train_per_class == 0 || self.val_per_class == 0 || self.test_per_class == 0 {
            return Err(DataError::Config(
                "every split needs at least one image per class".into(),
            ));
        }
        Ok(())
    }

    pub fn per_class(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train_per_class,
            Split::Val => self.val_per_class,
            Split::Test => self.test_per_class,
        }
    }

    /// Side of the shortcut patch and its offset from the corner, in pixels.
    pub fn patch_geometry(&self) -> (usize, usize) {
        (self.size / 8, self.size / 32)
    }
}

/// One drawn example.
pub struct SynthImage {
    pub image: RgbImage,
    /// 255 where the object is (at least half of the pixel covered), 0 elsewhere.
    pub mask: GrayImage,
}

fn colour<R: Rng>(rng: &mut R, lo: f32, hi: f32) -> [f32; 3] {
    [
        rng.random_range(lo..hi),
        rng.random_range(lo..hi),
        rng.random_range(lo..hi),
    ]
}

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// Draw example `index` of `class` in `split` of `task`.
pub fn render(
    task: Task,
    split: Split,
    class: usize,
    index: usize,
    cfg: &SynthConfig,
) -> SynthImage {
    let task_id = Task::ALL.iter().position(|t| *t == task).unwrap() as u64;
    let split_id = Split::ALL.iter().position(|s| *s == split).unwrap() as u64;
    let stream = task_id * 16 + split_id;
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(
        cfg.seed,
        stream,
        (class * 1_000_003 + index) as u64,
    ));
    let n = cfg.size;
    let nf = n as f32;
    let scale = nf / 64.0;

    // Background: a two-colour linear gradient, a sinusoidal texture, distractor blobs.
    let (c0, c1) = (colour(&mut rng, 0.1, 0.9), colour(&mut rng, 0.1, 0.9));
    let phi: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (freq, amp, phase): (f32, f32, f32) = (
        rng.random_range(2.0..8.0),
        rng.random_range(0.03..0.09),
        rng.random_range(0.0..6.3),
    );
    let psi: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let mut px = vec![[0f32; 3]; n * n];
    for y in 0..n {
        for x in 0..n {
            let (xf, yf) = (x as f32 / nf, y as f32 / nf);
            let t = ((xf - 0.5) * phi.cos() + (yf - 0.5) * phi.sin() + 0.71) / 1.42;
            let tex = amp
                * (std::f32::consts::TAU * freq * (xf * psi.cos() + yf * psi.sin()) + phase).sin();
            for c in 0..3 {
                px[y * n + x][c] = c0[c] * (1.0 - t) + c1[c] * t + tex;
            }
        }
    }
    let background_mean = [
        (c0[0] + c1[0]) / 2.0,
        (c0[1] + c1[1]) / 2.0,
        (c0[2] + c1[2]) / 2.0,
    ];
    for _ in 0..rng.random_range(2..=4) {
        let (bx, by) = (rng.random_range(0.0..nf), rng.random_range(0.0..nf));
        let (rx, ry) = (
            rng.random_range(2.0..6.0) * scale,
            rng.random_range(2.0..6.0) * scale,
        );
        let bc = colour(&mut rng, 0.0, 1.0);
        for y in 0..n {
            for x in 0..n {
                let (dx, dy) = ((x as f32 + 0.5 - bx) / rx, (y as f32 + 0.5 - by) / ry);
                if dx * dx + dy * dy <= 1.0 {
                    for c in 0..3 {
                        px[y * n + x][c] = 0.2 * px[y * n + x][c] + 0.8 * bc[c];
                    }
                }
            }
        }
    }

    // The object: size, position clear of the patch corner, rotation, a contrasting colour.
    let patch = task.has_patch(split).then(|| cfg.patch_geometry());
    let keep_clear = (cfg.size / 8 + cfg.size / 32) as f32 + 1.0;
    let radius = rng.random_range(0.16..0.28) * nf;
    let (cx, cy) = loop {
        let cx = rng.random_range(radius + 1.0..nf - radius - 1.0);
        let cy = rng.random_range(radius + 1.0..nf - radius - 1.0);
        // Keep the top-left corner free in every task, so patch and no-patch images differ only there.
        if cx - radius > keep_clear || cy - radius > keep_clear {
            break (cx, cy);
        }
    };
    let theta: f32 = rng.random_range(-0.3..0.3);
    let mut oc = colour(&mut rng, 0.0, 1.0);
    for _ in 0..64 {
        if dist(oc, background_mean) >= 0.55 {
            break;
        }
        oc = colour(&mut rng, 0.0, 1.0);
    }
    let shapes = task.shapes();
    let shape_class = if patch.is_some() && rng.random::<f32>() < SHORTCUT_SHAPE_NOISE {
        (class + rng.random_range(1..shapes.len())) % shapes.len()
    } else {
        class
    };
    let shape = shapes[shape_class];
    let mut mask = GrayImage::new(n as u32, n as u32);
    // 4×4 supersampling: smooth edges in the image, a crisp half-coverage mask.
    const SUB: usize = 4;
    let (sin, cos) = theta.sin_cos();
    for y in 0..n {
        for x in 0..n {
            let mut covered = 0;
            for sy in 0..SUB {
                for sx in 0..SUB {
                    let dx = x as f32 + (sx as f32 + 0.5) / SUB as f32 - cx;
                    let dy = y as f32 + (sy as f32 + 0.5) / SUB as f32 - cy;
                    let u = (dx * cos + dy * sin) / radius;
                    let v = -(-dx * sin + dy * cos) / radius;
                    covered += shape.contains(u, v) as usize;
                }
            }
            let a = covered as f32 / (SUB * SUB) as f32;
            for c in 0..3 {
                px[y * n + x][c] = px[y * n + x][c] * (1.0 - a) + oc[c] * a;
            }
            if a >= 0.5 {
                mask.put_pixel(x as u32, y as u32, Luma([255]));
            }
        }
    }

    if let Some((side, offset)) = patch {
        let pc = PATCH_COLOURS[class % PATCH_COLOURS.len()];
        for y in offset..offset + side {
            for x in offset..offset + side {
                px[y * n + x] = pc;
            }
        }
    }

    // Sensor noise over everything.
    let noise = Normal::new(0.0f32, 0.03).expect("positive std");
    let image = RgbImage::from_fn(n as u32, n as u32, |x, y| {
        let p = px[y as usize * n + x as usize];
        let mut q =
            |c: usize| ((p[c] + noise.sample(&mut rng)).clamp(0.0, 1.0) * 255.0).round() as u8;
        Rgb([q(0), q(1), q(2)])
    });
    SynthImage { image, mask }
}

/// What was generated, written as `synth.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub generator: String,
    pub task: Task,
    pub classes: Vec<String>,
    pub config: SynthConfig,
    /// Splits carrying the shortcut patch, its side and offset from the top-left corner (pixels).
    pub shortcut_splits: Vec<Split>,
    pub patch_side: usize,
    pub patch_offset: usize,
}

/// Paths of one generated task.
#[derive(Debug, Clone)]
pub struct TaskDir {
    pub root: PathBuf,
}

impl TaskDir {
    pub fn images(&self, split: Split) -> PathBuf {
        self.root.join("images").join(split.name())
    }

    pub fn masks(&self, split: Split) -> PathBuf {
        self.root.join("masks").join(split.name())
    }

    pub fn manifest(&self) -> PathBuf {
        self.root.join("synth.json")
    }
}

/// Was the task already generated with this exact configuration? Then it need not be redone.
pub fn existing(out: &Path, task: Task, cfg: &SynthConfig) -> Option<TaskDir> {
    let dir = TaskDir {
        root: out.join(task.name()),
    };
    let text = std::fs::read_to_string(dir.manifest()).ok()?;
    let m: Manifest = serde_json::from_str(&text).ok()?;
    (m == manifest(task, cfg)).then_some(dir)
}

fn manifest(task: Task, cfg: &SynthConfig) -> Manifest {
    let (side, offset) = cfg.patch_geometry();
    Manifest {
        generator: GENERATOR.into(),
        task,
        classes: task.class_names(),
        config: cfg.clone(),
        shortcut_splits: Split::ALL
            .into_iter()
            .filter(|s| task.has_patch(*s))
            .collect(),
        patch_side: side,
        patch_offset: offset,
    }
}

/// Write `task` under `out/<task>`. The task is drawn into a temporary directory and renamed into
/// place when complete, so an interrupted run never leaves a half-written dataset. An existing
/// task directory is replaced only with `force`, unless it already holds this exact output.
pub fn generate(out: &Path, task: Task, cfg: &SynthConfig, force: bool) -> Result<TaskDir> {
    cfg.check()?;
    if let Some(dir) = existing(out, task, cfg) {
        return Ok(dir);
    }
    let final_dir = out.join(task.name());
    if final_dir.exists() && !force {
        return Err(DataError::Config(format!(
            "{} exists and holds different data; pass --force to replace it",
            final_dir.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let tmp = TaskDir {
        root: out.join(format!(".{}.tmp-{}", task.name(), std::process::id())),
    };
    let result = (|| {
        let mut jobs = Vec::new();
        for split in Split::ALL {
            for (class, name) in task.class_names().iter().enumerate() {
                for d in [tmp.images(split).join(name), tmp.masks(split).join(name)] {
                    std::fs::create_dir_all(&d).map_err(io_err(&d))?;
                }
                jobs.extend((0..cfg.per_class(split)).map(|i| (split, class, i)));
            }
        }
        let names = task.class_names();
        jobs.par_iter()
            .try_for_each(|&(split, class, i)| -> Result<()> {
                let ex = render(task, split, class, i, cfg);
                let file = format!("{:05}.png", i);
                let ip = tmp.images(split).join(&names[class]).join(&file);
                let mp = tmp.masks(split).join(&names[class]).join(&file);
                ex.image.save(&ip).map_err(|e| DataError::Encode {
                    path: ip.clone(),
                    reason: e.to_string(),
                })?;
                ex.mask.save(&mp).map_err(|e| DataError::Encode {
                    path: mp.clone(),
                    reason: e.to_string(),
                })
            })?;
        let json = serde_json::to_string_pretty(&manifest(task, cfg)).expect("manifest serialises");
        std::fs::write(tmp.manifest(), json).map_err(io_err(&tmp.manifest()))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        std::fs::rename(&tmp.root, &final_dir).map_err(io_err(&final_dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp.root);
    }
    result.map(|_| TaskDir { root: final_dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SynthConfig {
        SynthConfig {
            size: 64,
            train_per_class: 3,
            val_per_class: 2,
            test_per_class: 2,
            seed: 11,
        }
    }

    #[test]
    fn rendering_is_deterministic_and_varies_with_the_seed() {
        let cfg = small();
        let a = render(Task::Pretrain, Split::Train, 2, 5, &cfg);
        let b = render(Task::Pretrain, Split::Train, 2, 5, &cfg);
        let c = render(
            Task::Pretrain,
            Split::Train,
            2,
            5,
            &SynthConfig {
                seed: 12,
                ..cfg.clone()
            },
        );
        assert_eq!(a.image, b.image);
        assert_eq!(a.mask, b.mask);
        assert_ne!(a.image, c.image);
    }

    #[test]
    fn masks_cover_a_plausible_object() {
        let cfg = small();
        for task in [Task::Pretrain, Task::Finetune] {
            for class in 0..task.shapes().len() {
                for i in 0..4 {
                    let ex = render(task, Split::Test, class, i, &cfg);
                    let area =
                        ex.mask.pixels().filter(|p| p[0] == 255).count() as f32 / (64.0 * 64.0);
                    assert!(
                        (0.015..0.35).contains(&area),
                        "{:?} class {class} #{i}: mask area {area}",
                        task
                    );
                }
            }
        }
    }

    #[test]
    fn shape_tests_are_distinct() {
        // Each pair of shapes in a task disagrees on a good share of the unit square.
        for task in [Task::Pretrain, Task::Finetune] {
            let shapes = task.shapes();
            for (i, a) in shapes.iter().enumerate() {
                for b in &shapes[i + 1..] {
                    let mut differ = 0;
                    for y in 0..50 {
                        for x in 0..50 {
                            let (u, v) = (x as f32 / 25.0 - 1.0, y as f32 / 25.0 - 1.0);
                            differ += (a.contains(u, v) != b.contains(u, v)) as usize;
                        }
                    }
                    assert!(
                        differ > 250,
                        "{a:?} vs {b:?} differ on only {differ} of 2500 points"
                    );
                }
            }
        }
    }

    #[test]
    fn shortcut_patch_only_in_train_and_val() {
        let cfg = small();
        let (side, off) = cfg.patch_geometry();
        let centre = (off + side / 2) as u32;
        for (class, colour) in PATCH_COLOURS
            .iter()
            .enumerate()
            .take(Task::Shortcut.shapes().len())
        {
            let tr = render(Task::Shortcut, Split::Train, class, 0, &cfg);
            let te = render(Task::Shortcut, Split::Test, class, 0, &cfg);
            let p = tr.image.get_pixel(centre, centre).0;
            let want = colour.map(|c| (c * 255.0) as i32);
            assert!(
                p.iter().zip(want).all(|(a, b)| (*a as i32 - b).abs() < 40),
                "class {class}: {p:?}"
            );
            // The patch is no part of the object.
            assert_eq!(tr.mask.get_pixel(centre, centre)[0], 0);
            let patch_like = |img: &RgbImage| {
                let mut n = 0;
                for y in off..off + side {
                    for x in off..off + side {
                        let q = img.get_pixel(x as u32, y as u32).0;
                        n += q.iter().zip(want).all(|(a, b)| (*a as i32 - b).abs() < 40) as usize;
                    }
                }
                n
            };
            assert_eq!(patch_like(&tr.image), side * side);
            assert!(
                patch_like(&te.image) < side * side / 2,
                "class {class}: test split has a patch"
            );
        }
    }

    #[test]
    fn generate_writes_image_folders_with_mirrored_masks() {
        let d = tempfile::tempdir().unwrap();
        let cfg = small();
        let dir = generate(d.path(), Task::Finetune, &cfg, false).unwrap();
        let f =
            crate::ImageFolder::open(&dir.images(Split::Train), crate::OnBadImage::Fail).unwrap();
        assert_eq!(f.classes, vec!["arrow", "crescent", "diamond", "heart"]);
        assert_eq!(f.samples.len(), 12);
        for s in &f.samples {
            let rel = s.path.strip_prefix(dir.images(Split::Train)).unwrap();
            assert!(dir.masks(Split::Train).join(rel).is_file());
        }
        // Same config again: reused. Different config: refused without force, replaced with it.
        generate(d.path(), Task::Finetune, &cfg, false).unwrap();
        let other = SynthConfig { seed: 1, ..cfg };
        let e = generate(d.path(), Task::Finetune, &other, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force"), "{e}");
        generate(d.path(), Task::Finetune, &other, true).unwrap();
        assert!(existing(d.path(), Task::Finetune, &other).is_some());
        // No temporary directories are left behind.
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["finetune"]);
    }
}
