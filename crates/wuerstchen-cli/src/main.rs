//! `wuerstchen`: the command-line front end of the library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use wuerstchen::forward::{run_forward, Component};
use wuerstchen::pipeline::GenerationParams;

mod bench;
mod generate;
mod progress;
mod train;

#[derive(Parser)]
#[command(
    name = "wuerstchen",
    version,
    about = "Würstchen text-to-image in Rust, equal to diffusers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the official full-size components (random weights) and the whole
    /// pipeline: median of N runs, GFLOP/s, peak memory.
    Bench(bench::BenchArgs),
    /// Run one component's forward pass exactly as diffusers' module does (f32 on the CPU unless --dtype / --device say otherwise).
    Forward {
        /// prior | decoder | vqgan-decode | vqgan-encode | text-encoder
        component: String,
        /// The component's own folder (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Safetensors file with the inputs, named as diffusers' arguments.
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the result, as the F32 tensor `output`.
        #[arg(long)]
        output: PathBuf,
        /// f32 | f16 | bf16: the component's dtype, as `generate --dtype` builds it
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// cpu | cuda | cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Generate images from a prompt: Stage C prior -> Stage B decoder -> Stage A.
    Generate(Box<GenerateArgs>),
    /// Make a training dataset.
    Dataset {
        #[command(subcommand)]
        kind: DatasetKind,
    },
    /// Train one stage on a folder of captioned images (PNG + same-stem .txt).
    Train(train::TrainArgs),
    /// Judge a shapes model: generate from captions of the dataset grammar (a quarter
    /// held out), analyse each image, print the confusion figures.
    Eval(EvalArgs),
    /// Serve predictions over HTTP (Replicate's Cog API) and a web page.
    Serve {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 5000)]
        port: u16,
        /// Prior pipeline folder or hub id; with --decoder. Default: the embedded model.
        #[arg(long)]
        prior: Option<PathBuf>,
        #[arg(long)]
        decoder: Option<PathBuf>,
        /// Predictions that may wait behind the running one; without it a busy server
        /// answers 409, as Cog does.
        #[arg(long, default_value_t = 0)]
        queue: usize,
        /// f32 | f16 | bf16
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// cpu | cuda | cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Print the generation parameters stored in a PNG written by `generate`.
    Inspect {
        /// The PNG file.
        file: PathBuf,
    },
}

/// The sampling flags `generate` and `eval` share.
#[derive(clap::Args)]
struct SamplingArgs {
    /// Linear prior schedule of N calls; default: the 29-call DEFAULT_STAGE_C_TIMESTEPS.
    #[arg(long)]
    prior_steps: Option<usize>,
    /// Default 4, or the model folder's own.
    #[arg(long)]
    prior_guidance: Option<f64>,
    #[arg(long, default_value_t = 12)]
    decoder_steps: usize,
    /// Classifier-free guidance of the decoder, for a decoder that reads the caption.
    /// Default 0 (diffusers': off), or the model folder's own.
    #[arg(long)]
    decoder_guidance: Option<f64>,
}

impl SamplingArgs {
    /// `d` (a model's defaults) with these flags applied.
    fn over(&self, d: GenerationParams) -> GenerationParams {
        GenerationParams {
            prior_steps: self.prior_steps,
            prior_guidance: self.prior_guidance.unwrap_or(d.prior_guidance),
            decoder_steps: self.decoder_steps,
            decoder_guidance: self.decoder_guidance.unwrap_or(d.decoder_guidance),
            ..d
        }
    }
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Captions to generate (image i uses seed SEED + i).
    #[arg(long, default_value_t = 48)]
    count: usize,
    #[arg(long, default_value_t = wuerstchen::analysis::EVAL_SEED)]
    seed: u64,
    /// Prior pipeline folder or hub id; with --decoder. Default: the embedded model.
    #[arg(long)]
    prior: Option<PathBuf>,
    #[arg(long)]
    decoder: Option<PathBuf>,
    /// Also save the images here, named by index and caption.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Judge the decoder alone: skip the prior and decode this semantic compressor's
    /// features (a MODEL/compressor folder from `train stage-b`) of each caption's own
    /// rendering, the ceiling of what the prior can get from the decoder.
    #[arg(long)]
    from_compressor: Option<PathBuf>,
    /// Judge the prior's denoising instead of generating: noise this semantic
    /// compressor's features of each caption's own rendering to several levels and
    /// print how much of them the prior recovers in one step, with the caption and
    /// without. A prior that cannot recover them from the caption at the noisiest
    /// levels draws from its own noise.
    #[arg(long, conflicts_with_all = ["from_compressor", "images"])]
    denoising: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Subcommand)]
enum DatasetKind {
    /// Coloured shapes on coloured backgrounds with captions of a fixed grammar
    /// (some colour/shape pairs held out: see docs/training.md).
    Shapes {
        /// Folder to fill (must not hold images yet).
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt (or --prompt).
    #[arg(value_name = "PROMPT")]
    positional_prompt: Option<String>,
    #[arg(long)]
    prompt: Option<String>,
    /// Used where guidance is on (> 1).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Pixels, a multiple of 128; default 1024, or the model folder's own size.
    #[arg(long)]
    width: Option<usize>,
    /// Pixels, a multiple of 128; default 1024, or the model folder's own size.
    #[arg(long)]
    height: Option<usize>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Default: random, printed and stored in the PNG.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Prior pipeline folder (prior/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    prior: Option<PathBuf>,
    /// Decoder pipeline folder (decoder/, vqgan/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    decoder: Option<PathBuf>,
    /// Replay: every random draw comes from this safetensors file (--seed is ignored).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu | cuda | cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output PNG; with several images the stem gets -0, -1, ...
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// candle asks for its thread count on every matmul, and without `RAYON_NUM_THREADS`
/// that means parsing /proc/cpuinfo each time (a tenth of a training step's time on 2
/// cores). Work the default out once and pin it, before any thread starts.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

fn serve(
    host: &str,
    port: u16,
    prior: Option<PathBuf>,
    decoder: Option<PathBuf>,
    queue: usize,
    dtype: &str,
    device: &str,
) -> Result<()> {
    use std::net::ToSocketAddrs;
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("--host {host} --port {port} is not an address to listen on"))?;
    let (prior, decoder) = generate::locate_models(prior, decoder, true)?;
    let spec = wuerstchen_server::worker::ModelSpec {
        prior,
        decoder,
        device: generate::parse_device(device)?,
        dtype: generate::parse_dtype(dtype)?,
    };
    // tensor work runs on the server's own model thread; the runtime only does I/O
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime
        .block_on(wuerstchen_server::serve(addr, spec, queue))
        .with_context(|| format!("serving on {addr}"))
}

fn eval(a: EvalArgs) -> Result<()> {
    use wuerstchen::analysis::{evaluate, Analysis, Features};
    use wuerstchen::dataset::ShapeSpec;
    use wuerstchen::image_io::{encode_png, write_atomically, RgbImage};
    use wuerstchen::weights::FromFolder;
    if a.count == 0 {
        anyhow::bail!("--count 0: nothing to judge (at least 1 caption)");
    }
    let (prior, decoder) = generate::locate_models(a.prior, a.decoder, true)?;
    let pipeline = wuerstchen::pipeline::WuerstchenPipeline::open(
        &prior,
        &decoder,
        Device::Cpu,
        candle_core::DType::F32,
    )?;
    let load_compressor = |dir: &std::path::Path| {
        wuerstchen::compressor::SemanticCompressor::load(dir, candle_core::DType::F32, &Device::Cpu)
    };
    if let Some(dir) = &a.denoising {
        let (compressor, _) = load_compressor(dir)?;
        let rows = wuerstchen::analysis::denoising_errors(&pipeline, &compressor, a.count, a.seed)?;
        println!("one-step estimates of the true features of {} captions (squared error relative to theirs)", a.count);
        println!(
            "{:>6} {:>9} {:>13} {:>16}",
            "t", "alpha_bar", "with caption", "without caption"
        );
        for r in rows {
            println!(
                "{:>6.2} {:>9.4} {:>13.3} {:>16.3}",
                r.t, r.alpha_bar, r.with_caption, r.without_caption
            );
        }
        return Ok(());
    }
    let recipe = a.sampling.over(pipeline.defaults());
    if let Some(dir) = &a.images {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let compressor = a
        .from_compressor
        .as_deref()
        .map(load_compressor)
        .transpose()?;
    let mut saved = Ok(());
    let mut on_image = |i: usize, spec: &ShapeSpec, image: &RgbImage, found: &Analysis| {
        let caption = spec.caption();
        eprintln!(
            "{i:>3} {caption:<60} found {} {} on {}, at {}",
            found
                .color
                .map_or("-", |c| wuerstchen::dataset::COLORS[c].0),
            found.shape.map_or("-", |s| wuerstchen::dataset::SHAPES[s]),
            wuerstchen::dataset::COLORS[found.background].0,
            found
                .position
                .map_or("-", |p| wuerstchen::dataset::POSITIONS[p]),
        );
        if let (Some(dir), Ok(())) = (&a.images, &saved) {
            let path = dir.join(format!("{i:03}-{}.png", caption.replace(' ', "_")));
            saved =
                encode_png(image, Some(&caption)).and_then(|bytes| write_atomically(&path, &bytes));
        }
    };
    let features = match &compressor {
        Some((compressor, _)) => Features::Compressor(compressor),
        None => Features::Prior,
    };
    let report = evaluate(&pipeline, features, a.count, a.seed, &recipe, &mut on_image)?;
    saved?;
    print!("{report}");
    Ok(())
}

fn main() -> ExitCode {
    pin_thread_count();
    wuerstchen::memory::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward {
            component,
            model,
            inputs,
            output,
            dtype,
            device,
        } => forward(&component, &model, &inputs, &output, &dtype, &device),
        Command::Generate(args) => generate::run(*args),
        Command::Inspect { file } => inspect(&file),
        Command::Serve {
            host,
            port,
            prior,
            decoder,
            queue,
            dtype,
            device,
        } => serve(&host, port, prior, decoder, queue, &dtype, &device),
        Command::Eval(args) => eval(args),
        Command::Train(args) => train::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Dataset {
            kind:
                DatasetKind::Shapes {
                    out,
                    count,
                    size,
                    seed,
                },
        } => wuerstchen::dataset::write_shapes_dataset(&out, count, size, seed).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn forward(
    component: &str,
    model: &Path,
    inputs: &Path,
    output: &Path,
    dtype: &str,
    device: &str,
) -> Result<()> {
    let component: Component = component.parse()?;
    let (dtype, device) = (
        generate::parse_dtype(dtype)?,
        generate::parse_device(device)?,
    );
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(inputs, &Device::Cpu)
        .with_context(|| format!("cannot read inputs from {}", inputs.display()))?;
    let out = run_forward(component, model, &tensors, &device, dtype)?;
    let bytes = safetensors::serialize([("output", out)], None)?;
    wuerstchen::image_io::write_atomically(output, &bytes)?;
    Ok(())
}

fn inspect(file: &Path) -> Result<()> {
    match wuerstchen::image_io::read_parameters(file)? {
        Some(text) => {
            println!("{text}");
            Ok(())
        }
        None => anyhow::bail!("{} has no `parameters` text chunk", file.display()),
    }
}
