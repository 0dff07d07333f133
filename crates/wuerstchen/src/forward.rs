//! One component's forward pass on named input tensors: the engine of
//! `wuerstchen forward`, which checks a component against another implementation.
//!
//! Input names are diffusers' argument names; each is checked for presence, dtype and
//! shape against the component's config before any compute, so a bad file gets an
//! error that names the tensor instead of a shape error deep inside a conv.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::clip::ClipTextModel;
use crate::error::{Error, Result};
use crate::stage_a::PaellaVQModel;
use crate::stage_b::WuerstchenDiffNeXt;
use crate::stage_c::WuerstchenPrior;
use crate::weights::FromFolder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Prior,
    Decoder,
    VqganDecode,
    VqganEncode,
    TextEncoder,
}

impl Component {
    pub const ALL: [Component; 5] = [
        Component::Prior,
        Component::Decoder,
        Component::VqganDecode,
        Component::VqganEncode,
        Component::TextEncoder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Prior => "prior",
            Component::Decoder => "decoder",
            Component::VqganDecode => "vqgan-decode",
            Component::VqganEncode => "vqgan-encode",
            Component::TextEncoder => "text-encoder",
        }
    }

    /// Input tensor names, in diffusers' argument order.
    pub fn inputs(self) -> &'static [&'static str] {
        match self {
            Component::Prior => &["x", "r", "c"],
            Component::Decoder => &["x", "r", "effnet", "clip"],
            Component::VqganDecode => &["latents"],
            Component::VqganEncode => &["images"],
            Component::TextEncoder => &["input_ids", "attention_mask"],
        }
    }
}

impl std::str::FromStr for Component {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Component::ALL.iter().map(|c| c.name()).collect();
                Error::InvalidInput(format!(
                    "unknown component {s:?}: expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// Named inputs with checks that name the offending tensor.
struct Inputs<'a> {
    tensors: &'a HashMap<String, Tensor>,
    component: Component,
    /// What float inputs are cast to: the model's activation dtype.
    float_dtype: DType,
}

impl Inputs<'_> {
    fn get(&self, name: &str, rank: usize) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::InvalidInput(format!(
                "input tensor `{name}` is missing ({} takes {})",
                self.component.name(),
                self.component.inputs().join(", ")
            ))
        })?;
        if t.rank() != rank {
            return Err(Error::InvalidInput(format!(
                "input `{name}` has shape {:?}: expected {rank} dimensions",
                t.dims()
            )));
        }
        Ok(t.clone())
    }

    fn float(&self, name: &str, rank: usize) -> Result<Tensor> {
        let t = self.get(name, rank)?;
        if !t.dtype().is_float() {
            return Err(Error::InvalidInput(format!(
                "input `{name}` has dtype {:?}: expected F32",
                t.dtype()
            )));
        }
        Ok(t.to_dtype(self.float_dtype)?)
    }

    fn int(&self, name: &str, rank: usize) -> Result<Tensor> {
        let t = self.get(name, rank)?;
        if t.dtype().is_float() {
            return Err(Error::InvalidInput(format!(
                "input `{name}` has dtype {:?}: expected I64",
                t.dtype()
            )));
        }
        Ok(t)
    }
}

fn expect_dim(name: &str, t: &Tensor, dim: usize, want: usize, what: &str) -> Result<()> {
    let got = t.dim(dim)?;
    if got != want {
        return Err(Error::InvalidInput(format!(
            "input `{name}` has shape {:?}: dimension {dim} is {got}, the model's {what} is {want}",
            t.dims()
        )));
    }
    Ok(())
}

fn expect_batch(tensors: &[(&str, &Tensor)]) -> Result<()> {
    let (n0, t0) = tensors[0];
    let b = t0.dim(0)?;
    for (n, t) in &tensors[1..] {
        if t.dim(0)? != b {
            return Err(Error::InvalidInput(format!(
                "input `{n}` has batch {} but `{n0}` has batch {b}",
                t.dim(0)?
            )));
        }
    }
    Ok(())
}

/// Runs `component` from the folder `model_dir` on `inputs`, its weights in `dt` on
/// `device` (bf16 on the CPU: bf16 linear layers on f32 activations); the output in f32.
pub fn run_forward(
    component: Component,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    device: &Device,
    dt: DType,
) -> Result<Tensor> {
    let inp = Inputs {
        tensors: inputs,
        component,
        float_dtype: crate::kernels::linear_kind::activation_dtype(dt, device),
    };
    let out = match component {
        Component::Prior => {
            let (x, r, c) = (inp.float("x", 4)?, inp.float("r", 1)?, inp.float("c", 3)?);
            expect_batch(&[("x", &x), ("r", &r), ("c", &c)])?;
            let (model, cfg) = WuerstchenPrior::load(model_dir, dt, device)?;
            expect_dim("x", &x, 1, cfg.c_in, "c_in")?;
            expect_dim("c", &c, 2, cfg.c_cond, "c_cond")?;
            model.forward(
                &x.to_device(device)?,
                &r.to_device(device)?,
                &c.to_device(device)?,
            )?
        }
        Component::Decoder => {
            let (x, r) = (inp.float("x", 4)?, inp.float("r", 1)?);
            let (effnet, clip) = (inp.float("effnet", 4)?, inp.float("clip", 3)?);
            expect_batch(&[("x", &x), ("r", &r), ("effnet", &effnet), ("clip", &clip)])?;
            let (model, cfg) = WuerstchenDiffNeXt::load(model_dir, dt, device)?;
            expect_dim("x", &x, 1, cfg.c_in, "c_in")?;
            expect_dim("effnet", &effnet, 1, cfg.effnet_embd, "effnet_embd")?;
            expect_dim("clip", &clip, 2, cfg.clip_embd, "clip_embd")?;
            let multiple = cfg.patch_size << (cfg.c_hidden.len() - 1);
            let (h, w) = (x.dim(2)?, x.dim(3)?);
            if h % multiple != 0 || w % multiple != 0 {
                return Err(Error::InvalidInput(format!(
                    "input `x` is {h}x{w}: height and width must be multiples of {multiple} for this decoder"
                )));
            }
            let d = |t: &Tensor| t.to_device(device);
            model.forward(&d(&x)?, &d(&r)?, &d(&effnet)?, &d(&clip)?)?
        }
        Component::VqganDecode => {
            let latents = inp.float("latents", 4)?;
            let (model, cfg) = PaellaVQModel::load(model_dir, dt, device)?;
            expect_dim(
                "latents",
                &latents,
                1,
                cfg.latent_channels,
                "latent_channels",
            )?;
            model.decode(&latents.to_device(device)?, false)?
        }
        Component::VqganEncode => {
            let images = inp.float("images", 4)?;
            let (model, cfg) = PaellaVQModel::load(model_dir, dt, device)?;
            expect_dim("images", &images, 1, cfg.in_channels, "in_channels")?;
            let multiple = cfg.up_down_scale_factor << (cfg.levels - 1);
            let (h, w) = (images.dim(2)?, images.dim(3)?);
            if h % multiple != 0 || w % multiple != 0 {
                return Err(Error::InvalidInput(format!(
                    "input `images` is {h}x{w}: height and width must be multiples of {multiple}"
                )));
            }
            model.encode(&images.to_device(device)?)?
        }
        Component::TextEncoder => {
            let ids = inp.int("input_ids", 2)?;
            let mask = inp.int("attention_mask", 2)?;
            if ids.dims() != mask.dims() {
                return Err(Error::InvalidInput(format!(
                    "`input_ids` {:?} and `attention_mask` {:?} differ in shape",
                    ids.dims(),
                    mask.dims()
                )));
            }
            let (model, cfg) = ClipTextModel::load(model_dir, dt, device)?;
            if ids.dim(1)? > cfg.max_position_embeddings {
                return Err(Error::InvalidInput(format!(
                    "input_ids has {} positions, the model has {}",
                    ids.dim(1)?,
                    cfg.max_position_embeddings
                )));
            }
            let ids64 = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
            if let Some(bad) = ids64
                .iter()
                .find(|&&i| i < 0 || i as usize >= cfg.vocab_size)
            {
                return Err(Error::InvalidInput(format!(
                    "input_ids contains {bad}, outside the vocabulary of {} tokens",
                    cfg.vocab_size
                )));
            }
            let ids = ids.to_dtype(DType::U32)?.to_device(device)?;
            model.forward(&ids, &mask.to_device(device)?)?
        }
    };
    Ok(out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}
