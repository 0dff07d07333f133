//! Where a generation's randomness comes from: our own seeded generator, or a noise
//! file that replays every draw of another run (diffusers', say).
//!
//! The draws happen in diffusers' order: the prior's initial latents, one `z` per prior
//! call, the decoder's initial latents, one `z` per decoder call. candle's CPU RNG
//! cannot be seeded, so it is never used.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// xoshiro256++ seeded through SplitMix64, with Box–Muller normals: portable integer
/// and f64 arithmetic, so a seed gives the same image on every machine.
#[derive(Debug, Clone)]
pub struct SeededRng {
    s: [u64; 4],
    spare: Option<f64>,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
            spare: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in (0, 1]: never 0, so the logarithm below is finite.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn normal(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() as f32).collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// One named draw of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    PriorInit,
    PriorStep(usize),
    DecoderInit,
    DecoderStep(usize),
}

impl Draw {
    pub fn name(self) -> String {
        match self {
            Draw::PriorInit => "prior.init".into(),
            Draw::PriorStep(i) => format!("prior.step.{i}"),
            Draw::DecoderInit => "decoder.init".into(),
            Draw::DecoderStep(i) => format!("decoder.step.{i}"),
        }
    }
}

pub enum NoiseSource {
    Seeded(SeededRng),
    File {
        path: PathBuf,
        tensors: HashMap<String, Tensor>,
    },
}

impl NoiseSource {
    pub fn seeded(seed: u64) -> Self {
        NoiseSource::Seeded(SeededRng::new(seed))
    }

    /// Opens a noise file; [`NoiseSource::check`] validates it against a run's shapes.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "noise file not found"),
            ));
        }
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(NoiseSource::File {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// Checks, before any weight is loaded, that a noise file holds exactly the draws of
    /// this run, each F32 and of the right shape.
    pub fn check(&self, draws: &[(Draw, Vec<usize>)]) -> Result<()> {
        let NoiseSource::File { path, tensors } = self else {
            return Ok(());
        };
        let bad =
            |msg: String| Error::InvalidInput(format!("noise file {}: {msg}", path.display()));
        for (draw, shape) in draws {
            let name = draw.name();
            let t = tensors.get(&name).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` is missing (expected shape {shape:?})"
                ))
            })?;
            if t.dtype() != DType::F32 {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {:?}, expected F32",
                    t.dtype()
                )));
            }
            if t.dims() != shape.as_slice() {
                return Err(bad(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
        }
        let wanted: BTreeSet<String> = draws.iter().map(|(d, _)| d.name()).collect();
        if let Some(extra) = tensors.keys().filter(|k| !wanted.contains(*k)).min() {
            return Err(bad(format!(
                "unexpected tensor `{extra}`: this run draws {} ({} in all)",
                draws
                    .iter()
                    .map(|(d, _)| d.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                draws.len()
            )));
        }
        Ok(())
    }

    /// The next draw, standard normal, F32, on `device`.
    pub fn draw(&mut self, draw: Draw, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            NoiseSource::Seeded(rng) => rng.randn(shape, device),
            NoiseSource::File { tensors, .. } => {
                let name = draw.name();
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| Error::InvalidInput(format!("noise file has no `{name}`")))?;
                if t.dims() != shape {
                    return Err(Error::InvalidInput(format!(
                        "noise `{name}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                Ok(t.to_device(device)?)
            }
        }
    }
}

/// A fresh seed for a run that was given none: from the clock and the process's
/// random hasher keys, kept below 2^53 so it survives JSON and f64 round trips.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 11 // keep it exactly representable as f64 / JSON number
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_normals_are_reproducible_and_standard() {
        let mut a = SeededRng::new(7);
        let mut b = SeededRng::new(7);
        let mut c = SeededRng::new(8);
        let va: Vec<f64> = (0..20000).map(|_| a.normal()).collect();
        let vb: Vec<f64> = (0..20000).map(|_| b.normal()).collect();
        let vc: Vec<f64> = (0..20000).map(|_| c.normal()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        let mean = va.iter().sum::<f64>() / va.len() as f64;
        let var = va.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / va.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }
}
