//! The CLIP-architecture text encoder, trained contrastively (CLIP's objective)
//! against the frozen semantic compressor's features of the paired images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};

use super::{require_stage, write_component, StageTrainer};
use crate::clip::ClipTextModel;
use crate::compressor::{CompressorConfig, SemanticCompressor};
use crate::config::ClipTextConfig;
use crate::error::{Error, Result};
use crate::noise::SeededRng;
use crate::tokenizer::ClipTokenizer;
use crate::weights::FromFolder;

/// CLIP's initial temperature, fixed: logits = 10 * cosine similarity.
const LOGIT_SCALE: f64 = 10.0;

pub struct TextEncoderTrainer {
    pub config: ClipTextConfig,
    varmap: VarMap,
    encoder: ClipTextModel,
    text_proj: Linear,
    image_proj: Linear,
    compressor: SemanticCompressor,
    tokenizer: ClipTokenizer,
    tokenizer_dir: PathBuf,
}

/// Loads the compressor Stage B trained (and its config), with a pointer to the
/// command that makes it.
pub(crate) fn load_compressor(
    out: &Path,
    device: &Device,
) -> Result<(SemanticCompressor, CompressorConfig)> {
    let dir = out.join("compressor");
    require_stage(&dir, "semantic compressor", "stage-b")?;
    SemanticCompressor::load(&dir, DType::F32, device)
}

impl TextEncoderTrainer {
    pub fn new(
        config: ClipTextConfig,
        tokenizer_dir: &Path,
        out: &Path,
        image_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = ClipTokenizer::from_dir(tokenizer_dir)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::InvalidParameter(format!(
                "the tokenizer has {} tokens, the text encoder's vocab_size is {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let (compressor, _) = load_compressor(out, device)?;
        let side = {
            let probe = Tensor::zeros((1, 3, image_size, image_size), DType::F32, device)?;
            compressor.forward(&probe)?.elem_count()
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let encoder = ClipTextModel::new(&config, vb.pp("text_encoder"))?;
        let text_proj = candle_nn::linear_no_bias(config.hidden_size, 64, vb.pp("text_proj"))?;
        let image_proj = candle_nn::linear_no_bias(side, 64, vb.pp("image_proj"))?;
        for (name, var) in varmap.data().lock().unwrap().iter() {
            // layer norms start as identity, as transformers initialises them
            if name.contains("layer_norm") && name.ends_with("weight") {
                var.set(&var.as_tensor().ones_like()?)?;
            }
        }
        Ok(Self {
            config,
            varmap,
            encoder,
            text_proj,
            image_proj,
            compressor,
            tokenizer,
            tokenizer_dir: tokenizer_dir.to_path_buf(),
        })
    }
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)?)
}

/// Cross-entropy of each row against the diagonal.
fn diagonal_cross_entropy(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let eye = Tensor::eye(n, DType::F32, logits.device())?;
    let diag = (logits * eye)?.sum_keepdim(D::Minus1)?;
    Ok((lse - diag)?.mean_all()?)
}

impl StageTrainer for TextEncoderTrainer {
    fn name(&self) -> &'static str {
        "text-encoder"
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn loss(&mut self, images: &Tensor, captions: &[String], _: &mut SeededRng) -> Result<Tensor> {
        let dev = images.device();
        let caps: Vec<&str> = captions.iter().map(String::as_str).collect();
        let (ids, mask) = self.tokenizer.encode_tensors(&caps, dev)?;
        let hidden = self.encoder.forward(&ids, &mask)?; // (B, 77, D)
                                                         // CLIP pools at the end-of-text token: the last unmasked position
        let last = mask
            .to_dtype(DType::F32)?
            .sum_keepdim(1)?
            .affine(1.0, -1.0)?; // (B, 1)
        let pos = Tensor::arange(0f32, mask.dim(1)? as f32, dev)?.unsqueeze(0)?;
        let pick = pos
            .broadcast_eq(&last)?
            .to_dtype(DType::F32)?
            .unsqueeze(2)?; // (B, 77, 1)
        let pooled = hidden.broadcast_mul(&pick)?.sum(1)?; // (B, D)
        let text = normalize(&self.text_proj.forward(&pooled)?)?;
        let feats = self.compressor.forward(images)?.flatten_from(1)?.detach();
        let image = normalize(&self.image_proj.forward(&feats)?)?;
        let logits = (text.matmul(&image.t()?)? * LOGIT_SCALE)?;
        let loss = ((diagonal_cross_entropy(&logits)?
            + diagonal_cross_entropy(&logits.t()?.contiguous()?)?)?
            * 0.5)?;
        Ok(loss)
    }

    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
        let te: HashMap<String, Tensor> = weights
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("text_encoder.")
                    .map(|n| (n.to_string(), v.clone()))
            })
            .collect();
        for pipeline in ["prior", "decoder"] {
            let root = out.join(pipeline);
            write_component(
                &root.join("text_encoder"),
                "CLIPTextModel",
                &self.config,
                &te,
                "model.safetensors",
            )?;
            copy_tokenizer(&self.tokenizer_dir, &root.join("tokenizer"))?;
        }
        Ok(())
    }
}

/// Copies a tokenizer folder's files (tokenizer.json or vocab.json + merges.txt).
fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for name in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = from.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            crate::image_io::write_atomically(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// The default model's text encoder: CLIP's tokenizer and vocabulary, 2 layers of 64.
pub fn default_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-5,
    }
}

/// Share of captions replaced by "" while a stage learns to follow text: the
/// unconditional mode classifier-free guidance needs (Würstchen drops 5%).
pub const CAPTION_DROPOUT: f64 = 0.05;

/// The trained, frozen text encoder of one pipeline folder, as a stage conditioned on
/// it sees captions.
pub struct TextCondition {
    encoder: ClipTextModel,
    tokenizer: ClipTokenizer,
}

impl TextCondition {
    /// `pipeline` is "prior" or "decoder": the folder under `out` whose
    /// `text_encoder/` and `tokenizer/` the text-encoder stage wrote. `width` names
    /// the model's input for text and its size, which must be the encoder's.
    pub fn load(out: &Path, pipeline: &str, width: (&str, usize), device: &Device) -> Result<Self> {
        let te_dir = out.join(pipeline).join("text_encoder");
        require_stage(&te_dir, "text encoder", "text-encoder")?;
        let (encoder, cfg) = ClipTextModel::load(&te_dir, DType::F32, device)?;
        if cfg.hidden_size != width.1 {
            return Err(Error::InvalidParameter(format!(
                "{pipeline} {} {} differs from the text encoder's hidden_size {}",
                width.0, width.1, cfg.hidden_size
            )));
        }
        let tokenizer = ClipTokenizer::from_dir(&out.join(pipeline).join("tokenizer"))?;
        Ok(Self { encoder, tokenizer })
    }

    /// Hidden states (B, 77, hidden) of the captions, each replaced by "" with
    /// probability CAPTION_DROPOUT (one draw per caption, made first).
    pub fn embed(&self, captions: &[String], rng: &mut SeededRng, dev: &Device) -> Result<Tensor> {
        let drop = super::uniform(rng, captions.len());
        let caps: Vec<&str> = captions
            .iter()
            .zip(&drop)
            .map(|(c, &u)| {
                if (u as f64) < CAPTION_DROPOUT {
                    ""
                } else {
                    c.as_str()
                }
            })
            .collect();
        let (ids, mask) = self.tokenizer.encode_tensors(&caps, dev)?;
        Ok(self.encoder.forward(&ids, &mask)?.detach())
    }
}
