//! `DDPMWuerstchenScheduler`: the cosine-schedule DDPM sampler of both stages.
//!
//! Time runs from 1 (pure noise) to 0 in continuous steps. The noise of each step
//! comes from the caller, so every run can be replayed and no hidden RNG is involved.
//! Arithmetic is f32 in diffusers' order, so the numbers match to the last bits.

use candle_core::{Result, Tensor};

use crate::config::SchedulerConfig;

/// The default Stage C schedule of the Würstchen model card and the Replicate model
/// (`DEFAULT_STAGE_C_TIMESTEPS`): 20 steps from 1 to 2/3, then 10 down to 0. The model
/// runs on all but the last value: 29 calls.
pub fn default_stage_c_timesteps() -> Vec<f32> {
    // diffusers builds it with numpy in f64; torch rounds to f32 when stepping.
    let mut t = numpy_linspace(1.0, 2.0 / 3.0, 20);
    t.extend(numpy_linspace(2.0 / 3.0, 0.0, 11).into_iter().skip(1));
    t.into_iter().map(|v| v as f32).collect()
}

/// `numpy.linspace(start, stop, n)`: `start + i * step`, the last value exactly `stop`.
fn numpy_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    let step = (stop - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i + 1 == n {
                stop
            } else {
                start + i as f64 * step
            }
        })
        .collect()
}

/// `torch.linspace(start, end, n)` in f32 (same formula, same values).
pub fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    // torch fills the first half forward from `start` and the second half backward
    // from `end`, so both endpoints are exact.
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct DdpmWuerstchenScheduler {
    config: SchedulerConfig,
    init_alpha_cumprod: f32,
    timesteps: Vec<f32>,
}

impl DdpmWuerstchenScheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let s = config.s as f32;
        let init = (s / (1.0 + s) * std::f32::consts::PI * 0.5).cos().powi(2);
        Self {
            config,
            init_alpha_cumprod: init,
            timesteps: Vec::new(),
        }
    }

    /// `linspace(1, 0, steps + 1)`: `steps` model calls.
    pub fn set_steps(&mut self, steps: usize) {
        self.timesteps = linspace(1.0, 0.0, steps + 1);
    }

    /// A custom schedule, e.g. [`default_stage_c_timesteps`].
    pub fn set_timesteps(&mut self, timesteps: Vec<f32>) {
        self.timesteps = timesteps;
    }

    /// All timesteps; the model is called at every one but the last.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Cumulative signal fraction ᾱ(t), clamped to [1e-4, 0.9999].
    pub fn alpha_cumprod(&self, t: f32) -> f32 {
        let scaler = self.config.scaler as f32;
        let t = if scaler > 1.0 {
            1.0 - (1.0 - t).powf(scaler)
        } else if scaler < 1.0 {
            t.powf(scaler)
        } else {
            t
        };
        let s = self.config.s as f32;
        let c = ((t + s) / (1.0 + s) * std::f32::consts::PI * 0.5).cos();
        (c * c / self.init_alpha_cumprod).clamp(1e-4, 0.9999)
    }

    /// The timestep after `t` in the schedule (diffusers picks the nearest entry).
    pub fn previous_timestep(&self, t: f32) -> Option<f32> {
        let idx = self
            .timesteps
            .iter()
            .enumerate()
            .min_by(|a, b| (a.1 - t).abs().total_cmp(&(b.1 - t).abs()))?
            .0;
        self.timesteps.get(idx + 1).copied()
    }

    /// One reverse step from `t` to the next timestep: the posterior mean from the
    /// predicted noise `eps`, plus `noise` scaled by the posterior std (none when the
    /// next timestep is 0).
    pub fn step(&self, eps: &Tensor, t: f32, sample: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let Some(t_prev) = self.previous_timestep(t) else {
            candle_core::bail!("timestep {t} is the last of the schedule: nothing to step to")
        };
        let abar = self.alpha_cumprod(t);
        let abar_prev = self.alpha_cumprod(t_prev);
        let alpha = abar / abar_prev;
        // mu = sqrt(1/alpha) * (x - (1 - alpha) * eps / sqrt(1 - abar))
        let scaled_eps = ((eps * (1.0 - alpha) as f64)? / (1.0 - abar).sqrt() as f64)?;
        let mu = ((sample - scaled_eps)? * (1.0 / alpha).sqrt() as f64)?;
        if t_prev == 0.0 {
            return Ok(mu);
        }
        let std = ((1.0 - alpha) * (1.0 - abar_prev) / (1.0 - abar)).sqrt();
        mu + (noise * std as f64)?
    }

    /// The clean sample implied by a noise prediction at `t`:
    /// (x - sqrt(1 - ᾱ) eps) / sqrt(ᾱ).
    pub fn estimate_x0(&self, eps: &Tensor, t: f32, sample: &Tensor) -> Result<Tensor> {
        let abar = self.alpha_cumprod(t) as f64;
        (sample - (eps * (1.0 - abar).sqrt())?)? / abar.sqrt()
    }

    /// Forward diffusion for training: sqrt(ᾱ) x0 + sqrt(1 - ᾱ) noise, per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[f32]) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if t.len() != b {
            candle_core::bail!("add_noise: {} timesteps for a batch of {b}", t.len());
        }
        let shape: Vec<usize> = std::iter::once(b)
            .chain(std::iter::repeat_n(1, x0.rank() - 1))
            .collect();
        let abar: Vec<f32> = t.iter().map(|&t| self.alpha_cumprod(t)).collect();
        let a = Tensor::from_vec(
            abar.iter().map(|a| a.sqrt()).collect::<Vec<_>>(),
            shape.as_slice(),
            x0.device(),
        )?
        .to_dtype(x0.dtype())?;
        let s = Tensor::from_vec(
            abar.iter().map(|a| (1.0 - a).sqrt()).collect::<Vec<_>>(),
            shape.as_slice(),
            x0.device(),
        )?
        .to_dtype(x0.dtype())?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }
}
