//! Numerical comparison against a reference output, as the parity tests report it.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The project's parity bound: `1e-4 * max(1, max|expected|)`, applied to both the
/// maximum and the RMS of the absolute difference.
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

#[derive(Debug, Clone, Copy)]
pub struct ParityReport {
    pub max_abs_diff: f64,
    pub rms_diff: f64,
    pub max_abs_expected: f64,
    pub tolerance: f64,
}

impl ParityReport {
    pub fn passes(&self) -> bool {
        self.max_abs_diff <= self.tolerance && self.rms_diff <= self.tolerance
    }
}

impl std::fmt::Display for ParityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max|diff| {:.3e}  rms {:.3e}  tolerance {:.3e}  (max|expected| {:.3})  {}",
            self.max_abs_diff,
            self.rms_diff,
            self.tolerance,
            self.max_abs_expected,
            if self.passes() { "ok" } else { "FAIL" }
        )
    }
}

/// Compares `got` with `expected` (same shape) in f64.
pub fn compare(got: &Tensor, expected: &Tensor) -> Result<ParityReport> {
    if got.dims() != expected.dims() {
        return Err(Error::InvalidInput(format!(
            "shape {:?} differs from the expected {:?}",
            got.dims(),
            expected.dims()
        )));
    }
    let a = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = expected
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut max_abs_diff = 0f64;
    let mut sq = 0f64;
    let mut max_abs_expected = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        // NaN anywhere must fail, and `max` would swallow it
        max_abs_diff = if d.is_nan() {
            f64::INFINITY
        } else {
            max_abs_diff.max(d)
        };
        sq += d * d;
        max_abs_expected = max_abs_expected.max(y.abs());
    }
    let rms_diff = (sq / a.len().max(1) as f64).sqrt();
    Ok(ParityReport {
        max_abs_diff,
        rms_diff: if rms_diff.is_nan() {
            f64::INFINITY
        } else {
            rms_diff
        },
        max_abs_expected,
        tolerance: RELATIVE_TOLERANCE * max_abs_expected.max(1.0),
    })
}
