//! What this crate's CPU kernels share: the contiguous data of an operand, and running a kernel
//! written once for `T: Float` on f32 or f64 storage.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout};

/// The contiguous values of one operand.
pub(crate) fn contiguous<'a, T>(
    data: &'a [T],
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

/// One operand's kernel, on f32 or f64 storage.
pub(crate) fn run1(
    op: &str,
    (s, l): (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32]) -> Vec<f32>,
    f64: impl FnOnce(&[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(a) => CpuStorage::F32(f32(contiguous(a, l, op)?)),
        CpuStorage::F64(a) => CpuStorage::F64(f64(contiguous(a, l, op)?)),
        other => candle_core::bail!(
            "{op}: only f32 and f64 are supported, got {:?}",
            other.dtype()
        ),
    })
}

/// Two operands' kernel, on f32 or f64 storage (both the same).
pub(crate) fn run2(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(f32(contiguous(a, l1, op)?, contiguous(b, l2, op)?))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(f64(contiguous(a, l1, op)?, contiguous(b, l2, op)?))
        }
        (a, b) => candle_core::bail!(
            "{op}: operands must be both f32 or both f64, got {:?} and {:?}",
            a.dtype(),
            b.dtype()
        ),
    })
}

/// Three operands' kernel, on f32 or f64 storage (all the same).
pub(crate) fn run3(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32], &[f32], &[f32]) -> Vec<f32>,
    f64: impl FnOnce(&[f64], &[f64], &[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    Ok(match (s1, s2, s3) {
        (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32(f32(
            contiguous(a, l1, op)?,
            contiguous(b, l2, op)?,
            contiguous(c, l3, op)?,
        )),
        (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => CpuStorage::F64(f64(
            contiguous(a, l1, op)?,
            contiguous(b, l2, op)?,
            contiguous(c, l3, op)?,
        )),
        (a, _, _) => candle_core::bail!(
            "{op}: operands must be all f32 or all f64, got {:?} first",
            a.dtype()
        ),
    })
}
