//! AdamW with linear warmup, global-norm gradient clipping and an EMA of the weights.
//! Our own (not candle_nn's) so that its moments can be checkpointed and resumed.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub grad_clip: f64,
}

/// Named trainable variables with their optimizer moments.
pub struct AdamW {
    pub config: AdamWConfig,
    pub vars: Vec<(String, Var)>,
    /// first and second moments, by variable name
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
    pub step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        for (n, var) in &vars {
            m.insert(n.clone(), var.as_tensor().zeros_like()?);
            v.insert(n.clone(), var.as_tensor().zeros_like()?);
        }
        Ok(Self {
            config,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Learning rate at the current step: linear warmup, then constant.
    pub fn lr(&self) -> f64 {
        let w = self.config.warmup_steps.max(1);
        self.config.lr * ((self.step + 1) as f64 / w as f64).min(1.0)
    }

    /// Clips the gradients to `grad_clip` global norm, applies one AdamW update and
    /// returns the norm before clipping.
    pub fn step(&mut self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        let scale = if norm > self.config.grad_clip && norm > 0.0 {
            self.config.grad_clip / norm
        } else {
            1.0
        };
        let c = &self.config;
        let lr = self.lr();
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // detached: otherwise each moment would keep every earlier step's graph alive
            let g = (g.detach() * scale)?;
            let m = ((&self.m[name] * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
            let v = ((&self.v[name] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor().detach() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(norm)
    }
}

/// Exponential moving average of the weights, the copy that gets exported.
pub struct Ema {
    pub decay: f64,
    pub shadow: HashMap<String, Tensor>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    pub fn update(&mut self, vars: &[(String, Var)], step: usize) -> Result<()> {
        // warm start: short runs are not dominated by the initial weights
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for (n, v) in vars {
            let s = &self.shadow[n];
            let new = ((s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
            self.shadow.insert(n.clone(), new);
        }
        Ok(())
    }
}
