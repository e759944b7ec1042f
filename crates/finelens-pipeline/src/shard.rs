//! Sharded runs: a data set split over machines. Shard `i` of `n` takes the images whose path
//! under the input root hashes to `i` (FNV-1a, 64 bits: stable across runs, machines and
//! platforms), so the shards never overlap and together are the whole set; each writes a partial
//! result, and [`crate::merge`] combines them into what one run would have written.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{settings, PipelineError};

/// Shard `index` of `count` (0-based: Kubernetes' `JOB_COMPLETION_INDEX`, or Slurm's
/// `SLURM_ARRAY_TASK_ID` with `--array=0-(n-1)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// FNV-1a over the bytes (Fowler, Noll, Vo): a fixed, dependency-free hash whose value does not
/// change between Rust versions, unlike `std`'s `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Shard {
    /// Whether the image at `relative` (its path under the input root) belongs to this shard.
    /// Separators are normalised to `/`, so a Windows and a Linux machine agree.
    pub fn contains(&self, relative: &Path) -> bool {
        let key = relative.to_string_lossy().replace('\\', "/");
        (fnv1a(key.as_bytes()) % self.count as u64) as usize == self.index
    }
}

impl FromStr for Shard {
    type Err = PipelineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || settings(format!("shard `{s}`: expected i/n with 0 ≤ i < n"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_paths() {
        let paths: Vec<String> = (0..500)
            .map(|i| format!("class_{}/{i:05}.png", i % 7))
            .collect();
        for n in [1, 2, 3, 7] {
            let mut counts = vec![0; n];
            for p in &paths {
                let owners: Vec<usize> = (0..n)
                    .filter(|&i| Shard { index: i, count: n }.contains(Path::new(p)))
                    .collect();
                assert_eq!(owners.len(), 1, "{p} belongs to exactly one of {n} shards");
                counts[owners[0]] += 1;
            }
            // Roughly balanced: no shard holds less than half its share.
            assert!(
                counts.iter().all(|&c| c * n * 2 >= paths.len()),
                "{counts:?}"
            );
        }
        // Stable: the published FNV-1a test vector, and separators do not matter.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let s = Shard { index: 1, count: 3 };
        assert_eq!(
            s.contains(Path::new("a/b.png")),
            s.contains(Path::new("a\\b.png"))
        );
    }

    #[test]
    fn shards_parse_and_print() {
        assert_eq!(
            "2/3".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 3 }
        );
        assert_eq!(Shard { index: 0, count: 4 }.to_string(), "0/4");
        for bad in ["3/3", "1", "a/2", "1/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
