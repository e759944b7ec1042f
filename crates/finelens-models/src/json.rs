//! JSON helpers shared by every crate that writes results: serde_json writes a non-finite `f64`
//! as `null` (JSON has no NaN), but will not read that `null` back into an `f64`. An undefined
//! figure (the relative change of an all-zero tensor, the correlation of a constant map) is NaN in
//! memory and `null` on disk, so the readers of our result structs map `null` back to NaN.

use serde::{Deserialize, Deserializer};

/// `null` → NaN, for an `f64` field: `#[serde(deserialize_with = "…::f64_or_nan")]`.
pub fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// `null` entries → NaN, for a `Vec<f64>` field.
pub fn vec_f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// `null` entries → NaN, for a `Vec<Vec<f64>>` field (a matrix).
pub fn matrix_f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
    Ok(Vec::<Vec<Option<f64>>>::deserialize(d)?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Figures {
        #[serde(deserialize_with = "super::f64_or_nan")]
        x: f64,
        #[serde(deserialize_with = "super::vec_f64_or_nan")]
        v: Vec<f64>,
        #[serde(deserialize_with = "super::matrix_f64_or_nan")]
        m: Vec<Vec<f64>>,
    }

    /// With serde_json's `float_roundtrip` (set in the workspace), every f64 reads back as the
    /// very value written; the default parser can be an ulp off (0.37004830130749156 came back as
    /// 0.3700483013074915), which broke the equality of merged shards with a single run.
    #[test]
    fn every_f64_reads_back_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20_000 {
            let x: f64 = rng.random::<f64>() * 10f64.powi(rng.random_range(-8..8));
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x}");
        }
        let x = 0.37004830130749156f64;
        assert_eq!(
            serde_json::from_str::<f64>(&serde_json::to_string(&x).unwrap()).unwrap(),
            x
        );
    }

    #[test]
    fn nan_goes_out_as_null_and_comes_back() {
        let f = Figures {
            x: f64::NAN,
            v: vec![1.0, f64::NAN],
            m: vec![vec![f64::NAN, 2.0]],
        };
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(text, r#"{"x":null,"v":[1.0,null],"m":[[null,2.0]]}"#);
        let back: Figures = serde_json::from_str(&text).unwrap();
        assert!(back.x.is_nan() && back.v[1].is_nan() && back.m[0][0].is_nan());
        assert_eq!((back.v[0], back.m[0][1]), (1.0, 2.0));
    }
}
