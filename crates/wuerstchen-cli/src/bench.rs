//! `wuerstchen bench`: the official full-size components with random weights, timed.

use anyhow::Result;
use wuerstchen::bench::{bench, table, BenchEvent, BenchSpec, Component};

use crate::generate::{parse_device, parse_dtype};
use crate::progress::StageBars;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// prior | decoder | vqgan-decode | prior-text-encoder | decoder-text-encoder |
    /// pipeline; repeatable. Default: every component but the pipeline (which runs
    /// the whole default recipe, minutes per run on a CPU).
    #[arg(long = "component")]
    components: Vec<String>,
    /// Image width in pixels (a multiple of 128).
    #[arg(long, default_value_t = 1024)]
    width: usize,
    /// Image height in pixels (a multiple of 128).
    #[arg(long, default_value_t = 1024)]
    height: usize,
    /// f32 | bf16 | f16 (the text encoders stay in f32, as in the pipeline).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// CPU threads; default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Timed runs per component (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// cpu | cuda | cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print one JSON array instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress on stderr (which component runs, each run's seconds, the
    /// pipeline's steps).
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    // before any tensor op: the thread pool reads it once, candle's matmul each call
    if let Some(n) = a.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let threads = candle_core::utils::get_num_threads();
    let components = if a.components.is_empty() {
        Component::ALL[..5].to_vec()
    } else {
        a.components
            .iter()
            .map(|c| Component::parse(c))
            .collect::<Result<Vec<_>, _>>()?
    };
    let spec = BenchSpec {
        width: a.width,
        height: a.height,
        dtype: parse_dtype(&a.dtype)?,
        threads,
        runs: a.runs,
        warmup: a.warmup,
    };
    let device = parse_device(&a.device)?;
    let mut rows = Vec::new();
    for c in components {
        if !a.quiet {
            eprintln!(
                "{}: building and {} warm-up run(s)...",
                c.name(),
                spec.warmup
            );
        }
        // the pipeline's calls take minutes: a bar per denoising stage (each done at
        // its last step, before the call's time is printed)
        let mut bars = StageBars::new(a.quiet);
        let row = bench(c, &spec, &device, &mut |e| match e {
            BenchEvent::Step(p) => bars.update(p),
            BenchEvent::Timed(s) if !a.quiet => eprintln!("  {s:.3} s"),
            BenchEvent::Timed(_) => {}
        })?;
        rows.push(row);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}
