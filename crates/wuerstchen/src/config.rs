//! Serde mirrors of each component's `config.json`.
//!
//! Missing keys take the defaults of the diffusers / transformers class, because that
//! is what `from_pretrained` does. Those defaults are NOT the official checkpoints'
//! values: the `official()` constructors give those.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Reads and parses a JSON config, naming the file in every error.
pub fn load_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Checks a config for what `from_pretrained` would only find out by crashing
/// mid-build, so the error can name the file.
pub trait Validate {
    fn validate(&self) -> std::result::Result<(), String>;
}

/// Reads a component config and validates it.
pub fn load_config<T: DeserializeOwned + Validate>(path: &Path) -> Result<T> {
    let config: T = load_json(path)?;
    config.validate().map_err(|message| Error::Config {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(config)
}

/// `WuerstchenPrior` (Stage C).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PriorConfig {
    pub c_in: usize,
    pub c: usize,
    pub c_cond: usize,
    pub c_r: usize,
    pub depth: usize,
    pub nhead: usize,
    pub dropout: f64,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self {
            c_in: 16,
            c: 1280,
            c_cond: 1024,
            c_r: 64,
            depth: 16,
            nhead: 16,
            dropout: 0.1,
        }
    }
}

impl PriorConfig {
    /// `warp-ai/wuerstchen-prior` / `prior/config.json`.
    pub fn official() -> Self {
        Self {
            c: 1536,
            c_cond: 1280,
            depth: 32,
            nhead: 24,
            ..Self::default()
        }
    }
}

impl Validate for PriorConfig {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.nhead == 0 || !self.c.is_multiple_of(self.nhead) {
            return Err(format!(
                "c = {} is not divisible by nhead = {}",
                self.c, self.nhead
            ));
        }
        if self.c_r < 4 {
            return Err(format!("c_r = {} is below 4", self.c_r));
        }
        Ok(())
    }
}

/// `WuerstchenDiffNeXt` (Stage B).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiffNeXtConfig {
    pub c_in: usize,
    pub c_out: usize,
    pub c_r: usize,
    pub patch_size: usize,
    pub c_cond: usize,
    pub c_hidden: Vec<usize>,
    pub nhead: Vec<i64>,
    pub blocks: Vec<usize>,
    pub level_config: Vec<String>,
    pub inject_effnet: Vec<bool>,
    pub effnet_embd: usize,
    pub clip_embd: usize,
    pub kernel_size: usize,
    pub dropout: DropoutSpec,
}

/// diffusers accepts one dropout for all levels or one per level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DropoutSpec {
    One(f64),
    PerLevel(Vec<f64>),
}

impl Default for DiffNeXtConfig {
    fn default() -> Self {
        Self {
            c_in: 4,
            c_out: 4,
            c_r: 64,
            patch_size: 2,
            c_cond: 1024,
            c_hidden: vec![320, 640, 1280, 1280],
            nhead: vec![-1, 10, 20, 20],
            blocks: vec![4, 4, 14, 4],
            level_config: ["CT", "CTA", "CTA", "CTA"].map(String::from).to_vec(),
            inject_effnet: vec![false, true, true, true],
            effnet_embd: 16,
            clip_embd: 1024,
            kernel_size: 3,
            dropout: DropoutSpec::One(0.1),
        }
    }
}

impl DiffNeXtConfig {
    /// `warp-ai/wuerstchen` / `decoder/config.json` (equal to the class defaults).
    pub fn official() -> Self {
        Self::default()
    }
}

impl Validate for DiffNeXtConfig {
    fn validate(&self) -> std::result::Result<(), String> {
        let n = self.c_hidden.len();
        let err = |m: String| Err(m);
        if n == 0 {
            return err("c_hidden is empty".into());
        }
        for (name, len) in [
            ("nhead", self.nhead.len()),
            ("blocks", self.blocks.len()),
            ("level_config", self.level_config.len()),
            ("inject_effnet", self.inject_effnet.len()),
        ] {
            if len != n {
                return err(format!("{name} has {len} entries, c_hidden has {n}"));
            }
        }
        for (i, lc) in self.level_config.iter().enumerate() {
            if let Some(bad) = lc.chars().find(|c| !"CTA".contains(*c)) {
                return err(format!(
                    "level_config[{i}] = {lc:?}: block type {bad:?} is not C, T or A"
                ));
            }
            if lc.contains('A') {
                let h = self.nhead[i];
                if h <= 0 || !self.c_hidden[i].is_multiple_of(h as usize) {
                    return err(format!(
                        "level {i} has attention but nhead = {h} does not divide c_hidden = {}",
                        self.c_hidden[i]
                    ));
                }
            }
        }
        if let DropoutSpec::PerLevel(d) = &self.dropout {
            if d.len() != n {
                return err(format!("dropout has {} entries, c_hidden has {n}", d.len()));
            }
        }
        if self.kernel_size.is_multiple_of(2) {
            return err(format!("kernel_size = {} must be odd", self.kernel_size));
        }
        Ok(())
    }
}

/// `PaellaVQModel` (Stage A).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PaellaVQConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub up_down_scale_factor: usize,
    pub levels: usize,
    pub bottleneck_blocks: usize,
    pub embed_dim: usize,
    pub latent_channels: usize,
    pub num_vq_embeddings: usize,
    pub scale_factor: f64,
}

impl Default for PaellaVQConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            up_down_scale_factor: 2,
            levels: 2,
            bottleneck_blocks: 12,
            embed_dim: 384,
            latent_channels: 4,
            num_vq_embeddings: 8192,
            scale_factor: 0.3764,
        }
    }
}

impl PaellaVQConfig {
    /// `warp-ai/wuerstchen` / `vqgan/config.json` (equal to the class defaults).
    pub fn official() -> Self {
        Self::default()
    }
}

impl Validate for PaellaVQConfig {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.levels == 0 || !self.embed_dim.is_multiple_of(1 << (self.levels - 1)) {
            return Err(format!(
                "embed_dim = {} must be divisible by 2^(levels-1) with levels = {} >= 1",
                self.embed_dim, self.levels
            ));
        }
        Ok(())
    }
}

/// transformers' `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipTextConfig {
    /// Text encoder of `warp-ai/wuerstchen-prior` (CLIP ViT-bigG/14).
    pub fn official_prior() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            ..Self::default()
        }
    }

    /// Text encoder of `warp-ai/wuerstchen` (CLIP ViT-H/14).
    pub fn official_decoder() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            ..Self::default()
        }
    }
}

impl Validate for ClipTextConfig {
    fn validate(&self) -> std::result::Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size = {} is not divisible by num_attention_heads = {h}",
                self.hidden_size
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "quick_gelu") {
            return Err(format!(
                "hidden_act = {:?} is not supported (gelu, quick_gelu)",
                self.hidden_act
            ));
        }
        Ok(())
    }
}

/// `DDPMWuerstchenScheduler`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub scaler: f64,
    pub s: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            scaler: 1.0,
            s: 0.008,
        }
    }
}
