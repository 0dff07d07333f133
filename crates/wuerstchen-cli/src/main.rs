//! `wuerstchen`: the command-line front end of the library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use wuerstchen::forward::{run_forward, Component};

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
    /// Run one component's forward pass exactly as diffusers' module does (f32, CPU).
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
    },
    /// Generate an image from a prompt.
    Generate {
        /// The prompt.
        prompt: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward {
            component,
            model,
            inputs,
            output,
        } => forward(&component, &model, &inputs, &output),
        Command::Generate { .. } => Err(anyhow::anyhow!(
            "no model yet: the text-to-image pipeline is not built (see issue 3); \
             `wuerstchen forward` runs single components"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn forward(component: &str, model: &Path, inputs: &Path, output: &Path) -> Result<()> {
    let component: Component = component.parse()?;
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(inputs, &Device::Cpu)
        .with_context(|| format!("cannot read inputs from {}", inputs.display()))?;
    let out = run_forward(component, model, &tensors, &Device::Cpu)?;
    write_atomically(output, |tmp| {
        candle_core::safetensors::save(&HashMap::from([("output".to_string(), out)]), tmp)?;
        Ok(())
    })
}

/// Writes through a temporary file in the same folder and renames it into place, so a
/// failed run never leaves a partial output behind.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move output into {}", path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}
