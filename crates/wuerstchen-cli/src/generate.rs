//! `wuerstchen generate`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use wuerstchen::image_io::{encode_png, write_atomically};
use wuerstchen::noise::NoiseSource;
use wuerstchen::pipeline::{GenerationParams, WuerstchenPipeline};
use wuerstchen::{default_model, hub};

use crate::progress::StageBars;
use crate::GenerateArgs;

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = match (args.positional_prompt, args.prompt) {
        (Some(_), Some(_)) => {
            bail!("give the prompt once: as the positional PROMPT or with --prompt")
        }
        (a, b) => a.or(b).unwrap_or_default(),
    };
    let dtype = parse_dtype(&args.dtype)?;
    let device = parse_device(&args.device)?;
    let (prior_dir, decoder_dir) = locate_models(args.prior, args.decoder, !args.quiet)?;
    let pipeline = WuerstchenPipeline::open(&prior_dir, &decoder_dir, device, dtype)?;
    let d = args.sampling.over(pipeline.defaults());
    let mut params = GenerationParams {
        prompt,
        negative_prompt: args.negative_prompt,
        width: args.width.unwrap_or(d.width),
        height: args.height.unwrap_or(d.height),
        num_images: args.num_images,
        seed: args.seed,
        ..d
    };
    let outputs = output_paths(&args.out, params.num_images);

    let mut noise = match &args.noise {
        Some(path) => NoiseSource::from_file(path)?,
        None => {
            let seed = *params
                .seed
                .get_or_insert_with(wuerstchen::noise::random_seed);
            eprintln!("seed {seed}");
            NoiseSource::seeded(seed)
        }
    };
    let seed = if args.noise.is_some() {
        None
    } else {
        params.seed
    };

    let started = Instant::now();
    let mut bar = StageBars::new(args.quiet);
    let images = pipeline.generate(&params, &mut noise, &mut |p| bar.update(p), &|| false)?;

    let text = params.parameters_text(seed, &pipeline.model_name());
    for (image, path) in images.iter().zip(&outputs) {
        let png = encode_png(image, Some(&text))?;
        write_atomically(path, &png).with_context(|| format!("cannot write {}", path.display()))?;
        if !args.quiet {
            eprintln!(
                "wrote {} ({}x{})",
                path.display(),
                image.width,
                image.height
            );
        }
    }
    if !args.quiet {
        eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other:?} is not one of f32, f16, bf16"),
    })
}

pub fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("--device {s:?}: expected cpu, cuda or cuda:N"))?,
        None => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("--device {s}: this binary was built without CUDA (rebuild with --features cuda)");
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// The pipeline folders: `--prior/--decoder` (a folder, or a hub id such as
/// `warp-ai/wuerstchen-prior`, fetched into or found in the Hugging Face cache);
/// without them, the embedded default model. One without the other would pair two
/// unrelated models. `progress`: download bars on the terminal.
pub fn locate_models(
    prior: Option<PathBuf>,
    decoder: Option<PathBuf>,
    progress: bool,
) -> Result<(PathBuf, PathBuf)> {
    match (prior, decoder) {
        (Some(prior), Some(decoder)) => Ok((
            resolve(prior, "--prior", "prior", progress)?,
            resolve(decoder, "--decoder", "decoder", progress)?,
        )),
        (None, None) => {
            let root = default_model::materialize()?;
            Ok((root.join("prior"), root.join("decoder")))
        }
        (prior, _) => {
            let (given, missing) = if prior.is_some() {
                ("--prior", "--decoder")
            } else {
                ("--decoder", "--prior")
            };
            bail!(
                "{given} given without {missing}: give both (e.g. --prior {} --decoder {}), \
                 or neither for the embedded default model",
                hub::PRIOR_REPO,
                hub::DECODER_REPO
            )
        }
    }
}

/// A folder as given, or a hub id: with the `hub` feature its current revision,
/// downloaded into the Hugging Face cache where files are missing (as diffusers
/// does; `HF_HUB_OFFLINE=1` skips the hub), else, or when the hub cannot be reached,
/// the snapshot already in the cache.
fn resolve(given: PathBuf, flag: &str, marker: &str, progress: bool) -> Result<PathBuf> {
    let text = given.to_string_lossy().into_owned();
    let looks_like_id = !given.exists() && text.split('/').count() == 2 && !text.starts_with('.');
    if !looks_like_id {
        return Ok(given);
    }
    let cache = hub::cache_dir();
    let not_fetched = match fetch(&text, marker, cache.as_deref(), progress) {
        Ok(snapshot) => return Ok(snapshot),
        Err(why) => why,
    };
    if let Some(found) = cache
        .as_ref()
        .and_then(|c| hub::cached_snapshot(c, &text, marker))
    {
        if let NotFetched::Failed(why) = &not_fetched {
            eprintln!(
                "{flag} {text}: using the cached snapshot {} ({why})",
                found.display()
            );
        }
        return Ok(found);
    }
    let looked = cache
        .map(|c| c.display().to_string())
        .unwrap_or_else(|| "(no cache folder)".into());
    let why = match not_fetched {
        NotFetched::Skipped(why) => why.to_string(),
        NotFetched::Failed(why) => why,
    };
    bail!(
        "{flag} {text}: no such folder, and no snapshot of {text} with a {marker}/ folder in the Hugging Face \
         cache at {looked} ({why}): pass {flag} DIR (a diffusers pipeline folder)"
    )
}

/// Why a hub id was not fetched: not tried, or tried and failed.
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
enum NotFetched {
    Skipped(&'static str),
    Failed(String),
}

/// The hub's current revision of `repo`, in `cache`.
#[cfg(feature = "hub")]
fn fetch(
    repo: &str,
    marker: &str,
    cache: Option<&Path>,
    progress: bool,
) -> std::result::Result<PathBuf, NotFetched> {
    match cache {
        _ if hub::offline() => Err(NotFetched::Skipped("HF_HUB_OFFLINE is set")),
        None => Err(NotFetched::Skipped("no cache folder to download into")),
        Some(cache) => hub::download(repo, marker, cache, progress)
            .map_err(|e| NotFetched::Failed(format!("not downloaded: {e}"))),
    }
}

#[cfg(not(feature = "hub"))]
fn fetch(_: &str, _: &str, _: Option<&Path>, _: bool) -> std::result::Result<PathBuf, NotFetched> {
    Err(NotFetched::Skipped(
        "this build does not download: it lacks the `hub` feature",
    ))
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... in the same folder for more.
fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}{ext}")))
        .collect()
}
