//! NumPy's `.npy` format, version 1.0 (numpy/lib/format.py): float32 arrays that
//! `numpy.load` reads as they are.

/// `.npy` bytes of a little-endian float32 array of `shape` (C order).
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len());
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is padded with spaces to a multiple of
    // 64 bytes, as numpy writes it, so that the data is aligned.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact bytes `numpy.save` (numpy 2.x) writes for
    /// `np.array([[1.5, -2], [0.25, 3]], dtype=np.float32)`.
    #[test]
    fn matches_numpy_byte_for_byte() {
        let mut expected =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }"
                .to_vec();
        expected.extend(std::iter::repeat_n(b' ', 58));
        expected.push(b'\n');
        expected.extend_from_slice(b"\x00\x00\xc0?\x00\x00\x00\xc0\x00\x00\x80>\x00\x00@@");
        assert_eq!(encode_f32(&[2, 2], &[1.5, -2.0, 0.25, 3.0]), expected);
        // numpy's header for (3, 64, 64) is also 118 bytes; a 1-D shape keeps its comma.
        let b = encode_f32(&[3, 64, 64], &vec![0.0; 3 * 64 * 64]);
        assert_eq!(&b[8..10], &[118, 0]);
        assert_eq!(b.len(), 128 + 4 * 3 * 64 * 64);
        let one = encode_f32(&[3], &[0.0; 3]);
        assert!(String::from_utf8_lossy(&one).contains("'shape': (3,), }"));
        assert_eq!((10 + u16::from_le_bytes([one[8], one[9]]) as usize) % 64, 0);
    }
}
