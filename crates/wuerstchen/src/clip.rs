//! The CLIP text encoder, transformers' `CLIPTextModel`, returning `last_hidden_state`.
//!
//! Both Würstchen pipelines take the hidden states of all 77 positions, computed with
//! the causal mask combined with the padding mask; the padding mask changes the states
//! at padded positions, so it is part of the contract.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::blocks::{layer_norm, softmax_last_dim, upcast};
use crate::config::ClipTextConfig;
use crate::flops::{self, Linear};
use crate::kernels::attention::{merge_heads, split_heads};

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, Some((&self.weight, &self.bias)), self.eps)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: flops::linear(h, h, attn.pp("q_proj"))?,
            k_proj: flops::linear(h, h, attn.pp("k_proj"))?,
            v_proj: flops::linear(h, h, attn.pp("v_proj"))?,
            out_proj: flops::linear(h, h, attn.pp("out_proj"))?,
            layer_norm2: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: flops::linear(h, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: flops::linear(cfg.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
            heads: cfg.num_attention_heads,
            quick_gelu: cfg.hidden_act == "quick_gelu",
        })
    }

    /// x (B, L, D), mask (B, 1, L, L) additive
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hd = x.dim(2)? / self.heads;
        let h = self.layer_norm1.forward(x)?;
        // (B, L, D) -> (B, heads, L, hd)
        let split = |t: Tensor| split_heads(&t, self.heads);
        let q = split((self.q_proj.forward(&h)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        flops::add_attention(&q, &k)?;
        let scores = upcast(&q.matmul(&k.t()?)?)?;
        let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        // (B, heads, L, hd) -> (B, L, D)
        let attn = merge_heads(&probs.matmul(&v)?)?;
        let x = (x + self.out_proj.forward(&attn)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = if self.quick_gelu {
            let h = self.fc1.forward(&h)?;
            (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?
        } else {
            self.fc1.forward_gelu(&h)?
        };
        x + self.fc2.forward(&h)?
    }
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Loads a `text_encoder/` folder in either key layout.
    pub fn load(
        dir: &std::path::Path,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<(Self, ClipTextConfig)> {
        let (cfg, files) = crate::weights::open_component::<ClipTextConfig>(dir)?;
        let prefix = Self::key_prefix(files.names());
        let model = files.build(dtype, device, |vb| {
            Self::new(&cfg, if let Some(p) = prefix { vb.pp(p) } else { vb })
        })?;
        Ok((model, cfg))
    }

    /// `vb` points at the model root: the caller adds `text_model` when the checkpoint
    /// uses the hub's prefixed layout (see [`ClipTextModel::key_prefix`]).
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                emb.pp("token_embedding"),
            )?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?,
            layers,
            final_layer_norm: LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
        })
    }

    /// The hub's checkpoints name tensors `text_model.…`; transformers 5 saves them
    /// without the prefix. Returns the prefix to use for a file's tensor names.
    pub fn key_prefix<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<&'static str> {
        names
            .any(|n| n.starts_with("text_model."))
            .then_some("text_model")
    }

    pub fn vocab_size(&self) -> usize {
        self.token_embedding.embeddings().dim(0).unwrap_or(0)
    }

    /// input_ids (B, L) u32, attention_mask (B, L) 0/1 -> last_hidden_state (B, L, D)
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&pos)?;
        let mask = attention_bias(attention_mask, b, l, input_ids.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }
}

/// Causal mask combined with the key padding mask, as an additive f32 bias
/// (B, 1, L, L): 0 where query i may see key j (j <= i and j not padding), the most
/// negative f32 elsewhere, as transformers' `finfo.min`.
fn attention_bias(attention_mask: &Tensor, b: usize, l: usize, dev: &Device) -> Result<Tensor> {
    let keep = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut bias = vec![0f32; b * l * l];
    for (bi, row) in keep.iter().enumerate() {
        for i in 0..l {
            for j in 0..l {
                if j > i || row[j] == 0.0 {
                    bias[(bi * l + i) * l + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, l, l), dev)
}
