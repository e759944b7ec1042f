//! torchvision's `ImageFolder`: `root/<class>/**/<image>`, classes sorted by folder name and
//! numbered in that order, files sorted by path within a class.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{io_err, DataError, Result};

/// File endings read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// What to do with a file that has an image ending but cannot be read as an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBadImage {
    /// Leave it out and report it in [`ImageFolder::skipped`].
    Skip,
    /// Fail with an error naming it (`--strict`).
    Fail,
}

#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
    /// Files left out, with the reason, when opened with [`OnBadImage::Skip`].
    pub skipped: Vec<(PathBuf, String)>,
}

fn is_image_path(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io_err(dir))?;
    v.sort();
    Ok(v)
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if is_image_path(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads just the header: catches non-images, unknown formats and truncated headers without
/// decoding pixels.
pub fn check_image_header(path: &Path) -> std::result::Result<(u32, u32), String> {
    image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

impl ImageFolder {
    pub fn open(root: &Path, on_bad: OnBadImage) -> Result<Self> {
        if !root.is_dir() {
            return Err(if root.exists() {
                DataError::NotADirectory {
                    path: root.to_owned(),
                }
            } else {
                DataError::Io {
                    path: root.to_owned(),
                    error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
                }
            });
        }
        let class_dirs: Vec<PathBuf> = sorted_entries(root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses {
                path: root.to_owned(),
            });
        }
        let mut classes = Vec::new();
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        for (label, dir) in class_dirs.iter().enumerate() {
            classes.push(
                dir.file_name()
                    .expect("a directory entry has a name")
                    .to_string_lossy()
                    .into_owned(),
            );
            let mut files = Vec::new();
            collect_images(dir, &mut files)?;
            let before = samples.len();
            for path in files {
                match check_image_header(&path) {
                    Ok(_) => samples.push(Sample { path, label }),
                    Err(reason) => match on_bad {
                        OnBadImage::Skip => skipped.push((path, reason)),
                        OnBadImage::Fail => return Err(DataError::Decode { path, reason }),
                    },
                }
            }
            if samples.len() == before {
                return Err(DataError::EmptyClass { path: dir.clone() });
            }
        }
        Ok(Self {
            root: root.to_owned(),
            classes,
            samples,
            skipped,
        })
    }

    /// A seeded, stratified split: `val_fraction` of each class (at least one image when the
    /// class has two or more) goes to validation. Same seed, same split.
    pub fn split(&self, val_fraction: f64, seed: u64) -> Result<(Vec<Sample>, Vec<Sample>)> {
        stratified_split(
            &self.samples,
            self.classes.len(),
            |s| s.label,
            val_fraction,
            seed,
        )
    }

    /// Per-class image counts, in class order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for s in &self.samples {
            c[s.label] += 1;
        }
        c
    }
}

/// A seeded, stratified split of `items` over `classes` classes: `val_fraction` of each class
/// (at least one item when the class has two or more) goes to validation. Same seed, same split.
pub fn stratified_split<T: Clone>(
    items: &[T],
    classes: usize,
    label: impl Fn(&T) -> usize,
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>)> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DataError::Config(format!(
            "validation fraction {val_fraction} must be in [0, 1)"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for class in 0..classes {
        let mut of_class: Vec<T> = items
            .iter()
            .filter(|s| label(s) == class)
            .cloned()
            .collect();
        of_class.shuffle(&mut rng);
        let mut n_val = (of_class.len() as f64 * val_fraction).round() as usize;
        if val_fraction > 0.0 && n_val == 0 && of_class.len() >= 2 {
            n_val = 1;
        }
        val.extend(of_class.drain(..n_val));
        train.extend(of_class);
    }
    Ok((train, val))
}

/// Images to analyse, from whatever a user points at.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Each image with its class name when it came from an ImageFolder.
    pub images: Vec<(PathBuf, Option<String>)>,
    /// Files left out, with the reason (under [`OnBadImage::Skip`]).
    pub skipped: Vec<(PathBuf, String)>,
    /// The directory the images are under (the file's own directory for a single image).
    pub root: PathBuf,
}

impl Inputs {
    /// One image file; a folder of images; or an ImageFolder (class subfolders, each image keeps
    /// its class name), in torchvision's order. At most `limit` images are kept, taken evenly
    /// across classes for an ImageFolder (round robin) so that a small limit still shows every
    /// class.
    pub fn discover(path: &Path, on_bad: OnBadImage, limit: Option<usize>) -> Result<Self> {
        if path.is_file() {
            if !is_image_path(path) {
                return Err(DataError::Decode {
                    path: path.to_owned(),
                    reason: format!(
                        "not an image file (expected {})",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                });
            }
            check_image_header(path).map_err(|reason| DataError::Decode {
                path: path.to_owned(),
                reason,
            })?;
            return Ok(Self {
                images: vec![(path.to_owned(), None)],
                skipped: Vec::new(),
                root: path.parent().map(Path::to_owned).unwrap_or_default(),
            });
        }
        if !path.is_dir() {
            return Err(DataError::Io {
                path: path.to_owned(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        let entries = sorted_entries(path)?;
        let limit = limit.unwrap_or(usize::MAX);
        if entries.iter().any(|p| p.is_dir()) && !entries.iter().any(|p| is_image_path(p)) {
            let folder = ImageFolder::open(path, on_bad)?;
            let mut per_class: Vec<std::collections::VecDeque<&Sample>> =
                vec![Default::default(); folder.classes.len()];
            for s in &folder.samples {
                per_class[s.label].push_back(s);
            }
            let mut images = Vec::new();
            while images.len() < limit && per_class.iter().any(|q| !q.is_empty()) {
                for q in per_class.iter_mut() {
                    if let Some(s) = q.pop_front() {
                        if images.len() < limit {
                            images.push((s.path.clone(), Some(folder.classes[s.label].clone())));
                        }
                    }
                }
            }
            return Ok(Self {
                images,
                skipped: folder.skipped,
                root: path.to_owned(),
            });
        }
        let mut images = Vec::new();
        let mut skipped = Vec::new();
        for p in entries
            .into_iter()
            .filter(|p| p.is_file() && is_image_path(p))
        {
            if images.len() >= limit {
                break;
            }
            match check_image_header(&p) {
                Ok(_) => images.push((p, None)),
                Err(reason) => match on_bad {
                    OnBadImage::Skip => skipped.push((p, reason)),
                    OnBadImage::Fail => return Err(DataError::Decode { path: p, reason }),
                },
            }
        }
        if images.is_empty() {
            return Err(DataError::NoImages {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            images,
            skipped,
            root: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn classes_sorted_files_sorted_and_bad_files_handled() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        png(&r.join("zebra/b.png"));
        png(&r.join("zebra/a.PNG"));
        png(&r.join("ant/sub/x.png"));
        std::fs::write(r.join("ant/notes.txt"), "not an image, ignored by ending").unwrap();
        std::fs::write(r.join("ant/broken.jpg"), "garbage").unwrap();

        let f = ImageFolder::open(r, OnBadImage::Skip).unwrap();
        assert_eq!(f.classes, vec!["ant", "zebra"]);
        let names: Vec<String> = f
            .samples
            .iter()
            .map(|s| s.path.strip_prefix(r).unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["ant/sub/x.png", "zebra/a.PNG", "zebra/b.png"]);
        assert_eq!(f.skipped.len(), 1);
        assert!(f.skipped[0].0.ends_with("broken.jpg"));

        let e = ImageFolder::open(r, OnBadImage::Fail)
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.jpg: cannot decode image"), "{e}");
    }

    #[test]
    fn empty_class_and_missing_root_are_errors() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("a/1.png"));
        std::fs::create_dir_all(d.path().join("b")).unwrap();
        let e = ImageFolder::open(d.path(), OnBadImage::Skip)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("b: class folder has no readable images (.png, .jpg, .jpeg)"),
            "{e}"
        );
        let e = ImageFolder::open(&d.path().join("nope"), OnBadImage::Skip)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope: no such directory"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(ImageFolder::open(empty.path(), OnBadImage::Skip)
            .unwrap_err()
            .to_string()
            .contains("no class folders"));
    }

    #[test]
    fn split_is_seeded_stratified_and_disjoint() {
        let d = tempfile::tempdir().unwrap();
        for c in ["a", "b"] {
            for i in 0..10 {
                png(&d.path().join(format!("{c}/{i}.png")));
            }
        }
        let f = ImageFolder::open(d.path(), OnBadImage::Fail).unwrap();
        let (t1, v1) = f.split(0.2, 5).unwrap();
        let (t2, v2) = f.split(0.2, 5).unwrap();
        let (_, v3) = f.split(0.2, 6).unwrap();
        assert_eq!((t1.len(), v1.len()), (16, 4));
        assert_eq!(v1, v2);
        assert_eq!(t1, t2);
        assert_ne!(v1, v3);
        assert_eq!(v1.iter().filter(|s| s.label == 0).count(), 2);
        assert!(v1.iter().all(|s| !t1.contains(s)));
        assert!(f.split(1.0, 0).is_err());
    }

    #[test]
    fn inputs_from_a_file_a_flat_folder_or_an_image_folder() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for c in ["a", "b"] {
            for i in 0..3 {
                png(&r.join(format!("tree/{c}/{i}.png")));
            }
        }
        png(&r.join("flat/2.png"));
        png(&r.join("flat/1.png"));
        std::fs::write(r.join("flat/0.png"), "garbage").unwrap();

        let one = Inputs::discover(&r.join("flat/1.png"), OnBadImage::Fail, None).unwrap();
        assert_eq!(one.images, vec![(r.join("flat/1.png"), None)]);

        let flat = Inputs::discover(&r.join("flat"), OnBadImage::Skip, None).unwrap();
        assert_eq!(flat.images.len(), 2);
        assert_eq!(flat.skipped.len(), 1);
        let e = Inputs::discover(&r.join("flat"), OnBadImage::Fail, None).unwrap_err();
        assert!(e.to_string().contains("0.png"), "{e}");

        // A limit takes classes in turn.
        let tree = Inputs::discover(&r.join("tree"), OnBadImage::Fail, Some(3)).unwrap();
        let labels: Vec<_> = tree
            .images
            .iter()
            .map(|(_, l)| l.clone().unwrap())
            .collect();
        assert_eq!(labels, vec!["a", "b", "a"]);

        std::fs::create_dir_all(r.join("empty")).unwrap();
        assert!(Inputs::discover(&r.join("empty"), OnBadImage::Skip, None).is_err());
        assert!(Inputs::discover(&r.join("missing"), OnBadImage::Skip, None).is_err());
        std::fs::write(r.join("notes.txt"), "x").unwrap();
        let e = Inputs::discover(&r.join("notes.txt"), OnBadImage::Skip, None).unwrap_err();
        assert!(e.to_string().contains("not an image file"), "{e}");
    }
}
