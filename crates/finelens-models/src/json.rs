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
