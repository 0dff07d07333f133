//! `wuerstchen train`.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use wuerstchen::config::Validate;
use wuerstchen::train::data::ImageFolder;
use wuerstchen::train::{self as tr, StageTrainer, TrainOptions};

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum StageArg {
    StageA,
    StageB,
    TextEncoder,
    StageC,
}

impl StageArg {
    fn name(self) -> &'static str {
        match self {
            StageArg::StageA => "stage-a",
            StageArg::StageB => "stage-b",
            StageArg::TextEncoder => "text-encoder",
            StageArg::StageC => "stage-c",
        }
    }
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Which part to train.
    #[arg(value_enum)]
    stage: StageArg,
    /// Folder of captioned images.
    #[arg(long)]
    data: PathBuf,
    /// Model folder being built (checkpoints under checkpoints/).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Log a line every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Tokenizer folder (tokenizer.json, or vocab.json + merges.txt) for text-encoder.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// stage-b only: keep the compressor an earlier stage-b run exported (MODEL/compressor)
    /// and train the decoder alone, e.g. while text-encoder and stage-c train on it.
    #[arg(long)]
    freeze_compressor: bool,
    /// stage-b only: the semantic compressor's config (JSON: c_hidden, downscale,
    /// c_out) for a fresh joint run, e.g. downscale 8 for a 16 x 16 map at 128 px.
    #[arg(long)]
    compressor_config: Option<PathBuf>,
    /// The model's config.json (diffusers format) for a fresh run instead of the stage's
    /// small default; a resumed run reuses the config it was started with.
    #[arg(long)]
    config: Option<PathBuf>,
    /// stage-c only: the prior guidance the exported model declares as its own default
    /// (prior/model_index.json `default_prior_guidance_scale`; diffusers' default is 4).
    #[arg(long)]
    default_prior_guidance: Option<f64>,
    /// stage-c only: weigh each sample's error, in terms of the clean latent, by
    /// max(alpha_bar, F) instead of P2's alpha_bar, so that the noisiest steps, where
    /// the caption alone must say what goes where, are not weighted down to nothing.
    /// A resume that does not name it goes on with the value the run last used.
    #[arg(long)]
    x0_weight_floor: Option<f64>,
    /// stage-c only: draw timesteps as S u / (1 + (S - 1) u) of a uniform u (SD3's
    /// shift), so that S > 1 trains the noisiest steps more often (S = 3: a quarter of
    /// the samples above t = 0.9 instead of a tenth).
    /// A resume that does not name it goes on with the value the run last used.
    #[arg(long)]
    timestep_shift: Option<f64>,
    /// stage-b only: the share of samples (0 to 1) whose features are blurred and
    /// noised by a random amount (conditioning augmentation), so that the decoder
    /// learns to take the shape from the caption when the prior's features are rough.
    /// A resume that does not name it goes on with the value the run last used.
    #[arg(long)]
    effnet_augment: Option<f64>,
    /// Store the exported weights in f16.
    #[arg(long)]
    export_f16: bool,
    /// Start a fresh run from these weights (fine-tuning), e.g. an exported
    /// MODEL/prior/prior/diffusion_pytorch_model.safetensors; every variable must be in
    /// it. A resumed run ignores it.
    #[arg(long)]
    init: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let device = Device::Cpu;
    if a.compressor_config.is_some()
        && (!matches!(a.stage, StageArg::StageB) || a.freeze_compressor)
    {
        anyhow::bail!("--compressor-config applies to stage-b with a compressor that trains");
    }
    if a.freeze_compressor && !matches!(a.stage, StageArg::StageB) {
        anyhow::bail!("--freeze-compressor applies to stage-b only");
    }
    let stage_flags = [
        (
            "--default-prior-guidance",
            a.default_prior_guidance,
            StageArg::StageC,
        ),
        ("--x0-weight-floor", a.x0_weight_floor, StageArg::StageC),
        ("--timestep-shift", a.timestep_shift, StageArg::StageC),
        ("--effnet-augment", a.effnet_augment, StageArg::StageB),
    ];
    for (flag, value, stage) in stage_flags {
        if value.is_some() && a.stage != stage {
            anyhow::bail!("{flag} applies to {} only", stage.name());
        }
    }
    let given_loss = tr::LossOptions {
        x0_weight_floor: a.x0_weight_floor,
        timestep_shift: a.timestep_shift,
        effnet_augment: a.effnet_augment,
    };
    if let Err(why) = given_loss.validate() {
        anyhow::bail!(why);
    }
    let data = ImageFolder::load(&a.data, None)?;
    let opts = TrainOptions {
        data: a.data,
        out: a.out,
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        ema_decay: a.ema_decay,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        export_f16: a.export_f16,
        init: a.init,
    };
    // read before anything is written under --out: a bad file must leave no trace
    let compressor_config = match &a.compressor_config {
        Some(path) => {
            wuerstchen::config::load_config::<wuerstchen::compressor::CompressorConfig>(path)?
        }
        None => Default::default(),
    };
    let given = a.config.as_deref();
    // after the model config, so that a refused one leaves nothing behind; a resume
    // that does not name an option goes on with the one it last used, said here
    let loss_options = |stage: &str| -> Result<tr::LossOptions> {
        let loss = tr::run_loss_options(&opts.out, stage, given_loss)?;
        if loss != tr::LossOptions::default() {
            eprintln!("{stage}: {}", loss.flags());
        }
        Ok(loss)
    };
    let mut trainer: Box<dyn StageTrainer> = match a.stage {
        StageArg::StageA => Box::new(tr::stage_a::StageATrainer::new(
            tr::run_config(&opts.out, "stage-a", given, tr::stage_a::default_config())?,
            &device,
        )?),
        StageArg::StageB => {
            let mut trainer = tr::stage_b::StageBTrainer::new(
                tr::run_config(&opts.out, "stage-b", given, tr::stage_b::default_config(64))?,
                compressor_config,
                &opts.out,
                &data,
                &device,
                a.freeze_compressor,
            )?;
            trainer.effnet_augment = loss_options("stage-b")?.effnet_augment.unwrap_or(0.0);
            Box::new(trainer)
        }
        StageArg::TextEncoder => {
            let Some(tok) = &a.tokenizer else {
                anyhow::bail!("train text-encoder needs --tokenizer DIR (a CLIP tokenizer folder)");
            };
            Box::new(tr::text_encoder::TextEncoderTrainer::new(
                tr::run_config(
                    &opts.out,
                    "text-encoder",
                    given,
                    tr::text_encoder::default_config(),
                )?,
                tok,
                &opts.out,
                data.size,
                &device,
            )?)
        }
        StageArg::StageC => {
            let te = tr::text_encoder::default_config();
            let mut trainer = tr::stage_c::StageCTrainer::new(
                tr::run_config(
                    &opts.out,
                    "stage-c",
                    given,
                    tr::stage_c::default_config(te.hidden_size),
                )?,
                &opts.out,
                data.size,
                &device,
            )?;
            let loss = loss_options("stage-c")?;
            trainer.default_guidance = a.default_prior_guidance;
            trainer.x0_weight_floor = loss.x0_weight_floor.unwrap_or(0.0);
            trainer.timestep_shift = loss.timestep_shift.unwrap_or(1.0);
            Box::new(trainer)
        }
    };
    eprintln!(
        "{}: {} images of {}px from {}",
        trainer.name(),
        data.len(),
        data.size,
        opts.data.display()
    );
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(opts.steps as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let log_every = a.log_every.max(1);
    tr::train(trainer.as_mut(), &opts, &data, &device, &mut |r| {
        bar.set_position(r.step as u64);
        bar.set_message(format!("loss {:.4}", r.loss));
        if r.step % log_every == 0 || r.step == r.steps {
            let line = format!(
                "step {}/{} loss {:.5} lr {:.2e} grad-norm {:.3} step {:.3}s {:.1} samples/s",
                r.step, r.steps, r.loss, r.lr, r.grad_norm, r.step_seconds, r.samples_per_second
            );
            if a.quiet {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    })?;
    bar.finish();
    Ok(())
}
