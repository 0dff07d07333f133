//! Weight loading from diffusers / transformers folders.
//!
//! Safetensors files are memory-mapped; each tensor is read (and cast to the requested
//! dtype) only when the model asks for it. Loading is strict in both directions, as
//! `load_state_dict(strict=True)` is: a tensor the model needs but the file lacks, a
//! shape that differs from the config, and a tensor in the file that the model never
//! asked for are all errors naming the tensor and the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::kernels::linear_kind;

/// Weight file names diffusers and transformers write, in the order we look for them.
const WEIGHT_FILES: &[&str] = &["diffusion_pytorch_model.safetensors", "model.safetensors"];
const INDEX_FILES: &[&str] = &[
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
];

/// Buffers that PyTorch checkpoints carry but that no forward pass reads: BatchNorm's
/// step counter and the position-id range older transformers versions saved.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("num_batches_tracked") || name.ends_with("position_ids")
}

/// The safetensors files of one component, memory-mapped.
pub struct WeightFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl WeightFiles {
    /// Opens the weights of a component folder: a single safetensors file or a sharded
    /// set listed by an `*.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        for name in WEIGHT_FILES {
            let path = dir.join(name);
            if path.is_file() {
                return Self::open_files(&[path]);
            }
        }
        for name in INDEX_FILES {
            let path = dir.join(name);
            if path.is_file() {
                return Self::open_files(&sharded_files(&path)?);
            }
        }
        Err(Error::NoWeights {
            dir: dir.to_path_buf(),
            expected: WEIGHT_FILES
                .iter()
                .chain(INDEX_FILES)
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            if !path.is_file() {
                return Err(Error::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                ));
            }
            // SAFETY: the file is mapped read-only; like every mmap reader we rely on no
            // other process truncating it while the model is being loaded.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                index.insert(name, files.len());
            }
            files.push((path.clone(), st));
        }
        Ok(Self { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Builds a model from these weights and checks afterwards that every tensor in the
    /// files was used. bf16 on the CPU builds bf16 linear layers on f32 activations
    /// ([`linear_kind`]); f32 on an AVX-512 or AVX2 CPU packs them for our kernel.
    pub fn build<M>(
        &self,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<M> {
        let state = Arc::new(LoadState::default());
        let backend = CheckedBackend {
            files: self,
            state: state.clone(),
        };
        let built = linear_kind::build_model(Box::new(backend), dtype, device, build);
        let model = match built {
            Ok(m) => m,
            Err(e) => {
                let ours = state.first_error.lock().unwrap().take();
                return Err(ours.unwrap_or(Error::Candle(e)));
            }
        };
        let used = state.used.lock().unwrap();
        if let Some(name) = self
            .index
            .keys()
            .find(|n| !used.contains(*n) && !is_ignored_buffer(n))
        {
            return Err(Error::UnexpectedTensor {
                name: name.clone(),
                file: self.files[self.index[name]].0.clone(),
            });
        }
        Ok(model)
    }

    fn describe_files(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            _ => PathBuf::from(
                self.files
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
            ),
        }
    }
}

fn sharded_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index_path.to_path_buf(),
        message: e.to_string(),
    })?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = index.weight_map.values().collect();
    names.sort();
    names.dedup();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

struct CheckedBackend<'a> {
    files: &'a WeightFiles,
    state: Arc<LoadState>,
}

#[derive(Default)]
struct LoadState {
    used: Mutex<HashSet<String>>,
    /// Candle's builder only carries `candle_core::Error`; the typed error is kept here
    /// so `build` can return it unchanged.
    first_error: Mutex<Option<Error>>,
}

impl CheckedBackend<'_> {
    fn fail(&self, err: Error) -> candle_core::Error {
        let msg = err.to_string();
        self.state.first_error.lock().unwrap().get_or_insert(err);
        candle_core::Error::Msg(msg)
    }

    fn load(
        &self,
        name: &str,
        want: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(&fi) = self.files.index.get(name) else {
            return Err(self.fail(Error::MissingTensor {
                name: name.to_string(),
                file: self.files.describe_files(),
            }));
        };
        let (path, st) = &self.files.files[fi];
        let view = st.get(name)?;
        if let Some(want) = want {
            if view.shape() != want.dims() {
                return Err(self.fail(Error::ShapeMismatch {
                    name: name.to_string(),
                    file: path.clone(),
                    expected: want.dims().to_vec(),
                    found: view.shape().to_vec(),
                }));
            }
        }
        let tensor = view.load(&Device::Cpu)?;
        if !tensor.dtype().is_float() {
            return Err(self.fail(Error::NotFloat {
                name: name.to_string(),
                file: path.clone(),
                dtype: format!("{:?}", tensor.dtype()),
            }));
        }
        self.state.used.lock().unwrap().insert(name.to_string());
        tensor.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for CheckedBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.files.contains(name)
    }
}

/// A backend that hands out zero tensors of whatever shape the model asks for, without
/// allocating them, and records the names and shapes. Building the full-size models
/// with it costs no memory and yields their exact state-dict layout.
#[derive(Default)]
struct RecordingBackend {
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        // A stride-0 view of one scalar: shaped like the weight, backed by 1 element.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape of `{name}` unknown while recording")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Builds a model without weights and returns its parameter names and shapes, the
/// equivalent of `{k: v.shape for k, v in model.state_dict().items()}` minus buffers.
pub fn record_parameters<M>(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, BTreeMap<String, Vec<usize>>)> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = RecordingBackend { seen: seen.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let model = build(vb)?;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    Ok((model, seen))
}

/// Opens one component folder: parses and validates `config.json` and maps the
/// weights, ready for [`WeightFiles::build`].
pub fn open_component<C>(dir: &Path) -> Result<(C, WeightFiles)>
where
    C: serde::de::DeserializeOwned + crate::config::Validate,
{
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
        ));
    }
    let config: C = crate::config::load_config(&dir.join("config.json"))?;
    Ok((config, WeightFiles::open_dir(dir)?))
}

/// A model built from one diffusers component folder (`config.json` + weights).
pub trait FromFolder: Sized {
    type Config: serde::de::DeserializeOwned + crate::config::Validate;

    fn build(cfg: &Self::Config, vb: VarBuilder) -> candle_core::Result<Self>;

    /// Loads the folder strictly, casting the weights to `dtype`.
    fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, Self::Config)> {
        let (config, files) = open_component::<Self::Config>(dir)?;
        let model = files.build(dtype, device, |vb| Self::build(&config, vb))?;
        Ok((model, config))
    }
}
