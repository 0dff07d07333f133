//! `wuerstchen dataset` and `wuerstchen train`, run as a user runs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::{bin, copy_dir, fixtures, scratch};
use wuerstchen::compressor::SemanticCompressor;
use wuerstchen::stage_a::PaellaVQModel;
use wuerstchen::stage_b::WuerstchenDiffNeXt;
use wuerstchen::weights::FromFolder;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn dataset(dir: &Path, count: usize, size: usize) {
    let res = run(bin()
        .args([
            "dataset",
            "shapes",
            "--count",
            &count.to_string(),
            "--size",
            &size.to_string(),
            "--out",
        ])
        .arg(dir));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

fn train_stage_a(data: &Path, out: &Path, steps: usize, every: usize) -> Command {
    train_stage("stage-a", data, out, steps, every)
}

fn train_stage(stage: &str, data: &Path, out: &Path, steps: usize, every: usize) -> Command {
    let mut c = bin();
    c.args([
        "train",
        stage,
        "--quiet",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--warmup-steps",
        "2",
    ])
    .args([
        "--steps",
        &steps.to_string(),
        "--checkpoint-every",
        &every.to_string(),
        "--data",
    ])
    .arg(data)
    .arg("--out")
    .arg(out);
    c
}

/// (step, loss) of every log line.
fn losses(stderr: &str) -> Vec<(usize, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("step ")?;
            let (step, rest) = rest.split_once('/')?;
            let loss = rest.split_once(" loss ")?.1.split(' ').next()?;
            Some((step.parse().ok()?, loss.parse().ok()?))
        })
        .collect()
}

#[test]
fn stage_a_learns_and_its_export_loads() {
    let dir = scratch("smoke");
    let data = dir.join("data");
    dataset(&data, 12, 16);
    let out = dir.join("model");
    let res = run(&mut train_stage_a(&data, &out, 40, 20));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let l = losses(&stderr);
    assert_eq!(l.len(), 40, "{stderr}");
    for line in ["lr ", "grad-norm ", "samples/s"] {
        assert!(stderr.contains(line), "log lacks {line:?}: {stderr}");
    }
    let first: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = l[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    println!("stage-a loss {first:.4} -> {last:.4}");
    assert!(
        last < first * 0.8,
        "loss did not decrease: {first} -> {last}"
    );
    // the export is a diffusers vqgan folder that our loader (strict) accepts
    let (vq, cfg) =
        PaellaVQModel::load(&out.join("decoder/vqgan"), DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::rand(0f32, 1.0, (1, 3, 16, 16), &Device::Cpu).unwrap();
    let y = vq.decode(&vq.encode(&x).unwrap(), true).unwrap();
    assert_eq!(y.dims(), &[1, 3, 16, 16]);
    assert_eq!(cfg.num_vq_embeddings, 256);
    // seeded: a second run from scratch exports the same bytes
    let again = dir.join("again");
    assert!(run(&mut train_stage_a(&data, &again, 40, 20))
        .status
        .success());
    let weights = "decoder/vqgan/diffusion_pytorch_model.safetensors";
    assert!(
        std::fs::read(out.join(weights)).unwrap() == std::fs::read(again.join(weights)).unwrap(),
        "two runs with one seed differ"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn stage_b_learns_on_a_trained_stage_a_and_its_export_loads() {
    let dir = scratch("stage-b");
    let data = dir.join("data");
    dataset(&data, 16, 32);
    let out = dir.join("model");
    // Stage B needs Stage A first, and says so
    let res = run(&mut train_stage("stage-b", &data, &out, 2, 1));
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("run `wuerstchen train stage-a`"));
    assert!(run(&mut train_stage_a(&data, &out, 10, 10))
        .status
        .success());
    let res = run(train_stage("stage-b", &data, &out, 60, 60).args(["--lr", "5e-4"]));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let l = losses(&stderr);
    assert_eq!(l.len(), 60);
    let first: f64 = l[..15].iter().map(|x| x.1).sum::<f64>() / 15.0;
    let last: f64 = l[45..].iter().map(|x| x.1).sum::<f64>() / 15.0;
    println!("stage-b loss {first:.4} -> {last:.4}");
    assert!(last < first, "loss did not decrease: {first} -> {last}");
    let (_, cfg) =
        WuerstchenDiffNeXt::load(&out.join("decoder/decoder"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(cfg.effnet_embd, 16);
    SemanticCompressor::load(&out.join("compressor"), DType::F32, &Device::Cpu).unwrap();
    // Stage B recorded Stage A's latent scale: latents / scale_factor have unit spread
    let (vq, vq_cfg) =
        PaellaVQModel::load(&out.join("decoder/vqgan"), DType::F32, &Device::Cpu).unwrap();
    let img = wuerstchen::image_io::read_png(&data.join("00000.png"))
        .unwrap()
        .image;
    let x: Vec<f32> = img.data.iter().map(|&v| v as f32 / 255.0).collect();
    let x = Tensor::from_vec(x, (1, 32, 32, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let z = (vq.encode(&x.contiguous().unwrap()).unwrap() / vq_cfg.scale_factor).unwrap();
    let std = z
        .flatten_all()
        .unwrap()
        .var(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!(
        "scale_factor {:.4}, scaled latent std {std:.3}",
        vq_cfg.scale_factor
    );
    assert!(
        vq_cfg.scale_factor != 1.0 && (0.3..3.0).contains(&std),
        "std {std}"
    );

    // --freeze-compressor: the decoder goes on from the checkpoint, the compressor
    // (what the text encoder and Stage C learn from) stays byte for byte
    let compressor = out.join("compressor/diffusion_pytorch_model.safetensors");
    let decoder = out.join("decoder/decoder/diffusion_pytorch_model.safetensors");
    let (c_before, d_before) = (
        std::fs::read(&compressor).unwrap(),
        std::fs::read(&decoder).unwrap(),
    );
    let res = run(train_stage("stage-b", &data, &out, 64, 64).arg("--freeze-compressor"));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let steps: Vec<usize> = losses(&stderr).iter().map(|x| x.0).collect();
    assert_eq!(steps, (61..=64).collect::<Vec<_>>());
    assert!(losses(&stderr).iter().all(|x| x.1.is_finite()));
    assert_eq!(std::fs::read(&compressor).unwrap(), c_before);
    assert_ne!(std::fs::read(&decoder).unwrap(), d_before);
    // and it is refused where it means nothing
    let res = run(train_stage_a(&data, &out, 1, 1).arg("--freeze-compressor"));
    assert!(String::from_utf8_lossy(&res.stderr).contains("stage-b only"));
    // conditioning augmentation on every sample: the run goes on, the compressor stays
    let d_before = std::fs::read(&decoder).unwrap();
    let res = run(train_stage("stage-b", &data, &out, 66, 66).args([
        "--freeze-compressor",
        "--effnet-augment",
        "1",
    ]));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let l = losses(&stderr);
    assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), [65, 66]);
    assert!(l.iter().all(|x| x.1.is_finite()));
    assert_eq!(std::fs::read(&compressor).unwrap(), c_before);
    assert_ne!(std::fs::read(&decoder).unwrap(), d_before);
    let res = run(train_stage_a(&data, &out, 1, 1).args(["--effnet-augment", "0.5"]));
    assert!(String::from_utf8_lossy(&res.stderr).contains("stage-b only"));
    let res = run(train_stage("stage-b", &data, &out, 67, 67).args(["--effnet-augment", "1.5"]));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("--effnet-augment 1.5: must lie in [0, 1]"),
        "{stderr}"
    );

    // a compressor of another config: a finer map (downscale 8: 4 x 4 at 32 px)
    let finer = dir.join("finer");
    copy_dir(&out.join("decoder/vqgan"), &finer.join("decoder/vqgan"));
    let config = dir.join("compressor.json");
    std::fs::write(&config, r#"{"downscale": 8, "c_hidden": 8}"#).unwrap();
    let flags = ["--compressor-config", config.to_str().unwrap()];
    train_ok("stage-b", &data, &finer, 2, &flags);
    let (compressor, cfg) =
        SemanticCompressor::load(&finer.join("compressor"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!((cfg.downscale, cfg.c_hidden, cfg.c_out), (8, 8, 16));
    let x = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(compressor.forward(&x).unwrap().dims(), [1, 16, 4, 4]);
    // and one that first scales the images: 32 px at 3/4 is 24, a 3 x 3 map
    let scaled = dir.join("scaled");
    copy_dir(&out.join("decoder/vqgan"), &scaled.join("decoder/vqgan"));
    std::fs::write(
        &config,
        r#"{"downscale": 8, "c_hidden": 8, "input_scale": 0.75}"#,
    )
    .unwrap();
    train_ok("stage-b", &data, &scaled, 2, &flags);
    let (compressor, cfg) =
        SemanticCompressor::load(&scaled.join("compressor"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(cfg.input_scale, 0.75);
    assert_eq!(compressor.forward(&x).unwrap().dims(), [1, 16, 3, 3]);
    for (bad, why) in [
        (r#"{"downscale": 6}"#, "power of two"),
        (
            r#"{"input_scale": 1.5}"#,
            "input_scale 1.5 is not in (0, 1]",
        ),
    ] {
        std::fs::write(&config, bad).unwrap();
        let res = run(train_stage("stage-b", &data, &dir.join("bad"), 2, 2)
            .arg("--compressor-config")
            .arg(&config));
        assert!(String::from_utf8_lossy(&res.stderr).contains(why), "{bad}");
    }
    // a bad or missing config is refused before anything is written under --out, and
    // the missing file is named with its cause once
    assert!(!dir.join("bad").exists());
    let missing = dir.join("no-such-compressor.json");
    let res = run(train_stage("stage-b", &data, &dir.join("bad"), 2, 2)
        .arg("--compressor-config")
        .arg(&missing));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        stderr.contains(&format!("cannot read {}", missing.display())),
        "{stderr}"
    );
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    assert!(!dir.join("bad").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn killed_run_resumes_to_the_same_step_count() {
    let dir = scratch("resume");
    let data = dir.join("data");
    dataset(&data, 8, 16);
    let out = dir.join("model");
    let ckpt = out.join("checkpoints/stage-a.safetensors");
    let mut child = train_stage_a(&data, &out, 100_000, 3)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !ckpt.exists() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // a second run on the same folder is refused while the first trains
    let res = run(&mut train_stage_a(&data, &out, 4, 3));
    let second = String::from_utf8_lossy(&res.stderr);
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ckpt.exists(), "no checkpoint within a minute");
    assert!(
        still_running,
        "the first run ended before the second started"
    );
    assert!(!res.status.success(), "{second}");
    assert!(second.contains("already training stage-a"), "{second}");
    // whatever moment the kill hit, the checkpoint on disk is whole (atomic rename)
    let bytes = std::fs::read(&ckpt).unwrap();
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).expect("checkpoint is readable");
    let saved: usize = meta.metadata().as_ref().unwrap()["step"].parse().unwrap();
    assert!(
        saved >= 3 && saved.is_multiple_of(3),
        "checkpoint at step {saved}"
    );
    // resume: the run continues after the checkpointed step and reaches its goal
    let goal = saved + 4;
    let res = run(&mut train_stage_a(&data, &out, goal, 3));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let steps: Vec<usize> = losses(&stderr).iter().map(|x| x.0).collect();
    println!("killed after checkpoint {saved}; resumed steps {steps:?}");
    assert_eq!(steps, (saved + 1..=goal).collect::<Vec<_>>(), "{stderr}");
    // and a finished run has nothing left to do
    let res = run(&mut train_stage_a(&data, &out, goal, 3));
    assert!(res.status.success());
    assert!(losses(&String::from_utf8_lossy(&res.stderr)).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_training_data_is_named_and_nothing_is_written() {
    let dir = scratch("bad");
    let out = dir.join("model");
    let fails = |data: &Path, needle: &str| {
        let res = run(&mut train_stage_a(data, &out, 2, 1));
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "should fail on {needle}");
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "the model folder must not be created");
    };
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails(&empty, "no .png or .jpg images");
    fails(&dir.join("absent"), "absent");

    let data = dir.join("data");
    dataset(&data, 3, 16);
    std::fs::remove_file(data.join("00001.txt")).unwrap();
    fails(&data, "00001.png: image without caption");
    std::fs::write(data.join("00001.txt"), "a red circle on a blue background").unwrap();
    std::fs::write(data.join("00002.png"), b"not a png").unwrap();
    fails(&data, "00002.png: unreadable image");
    std::fs::remove_file(data.join("00002.png")).unwrap();
    std::fs::remove_file(data.join("00002.txt")).unwrap();
    let other = dir.join("other");
    dataset(&other, 1, 32);
    std::fs::copy(other.join("00000.png"), data.join("00009.png")).unwrap();
    std::fs::copy(other.join("00000.txt"), data.join("00009.txt")).unwrap();
    fails(&data, "00009.png: image is 32x32, expected 16x16");

    // dataset refuses to overwrite
    let res = run(bin()
        .args(["dataset", "shapes", "--count", "2", "--out"])
        .arg(&data));
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("already holds images"));
    std::fs::remove_dir_all(dir).unwrap();
}

fn tokenizer_dir() -> PathBuf {
    fixtures().join("tokenizer")
}

/// Runs a stage and returns its (step, loss) log.
fn train_ok(
    stage: &str,
    data: &Path,
    out: &Path,
    steps: usize,
    extra: &[&str],
) -> Vec<(usize, f64)> {
    let res = run(train_stage(stage, data, out, steps, steps).args(extra));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stage}: {stderr}");
    losses(&stderr)
}

fn mean(l: &[(usize, f64)]) -> f64 {
    l.iter().map(|x| x.1).sum::<f64>() / l.len() as f64
}

#[test]
fn text_encoder_and_stage_c_learn() {
    let dir = scratch("te-c");
    let data = dir.join("data");
    dataset(&data, 24, 32);
    let out = dir.join("model");
    let tok = tokenizer_dir().display().to_string();
    // each stage names the one it needs first
    let res = run(train_stage("text-encoder", &data, &out, 2, 2).args(["--tokenizer", &tok]));
    assert!(String::from_utf8_lossy(&res.stderr).contains("run `wuerstchen train stage-b`"));
    let res = run(&mut train_stage("text-encoder", &data, &out, 2, 2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("needs --tokenizer"));
    train_ok("stage-a", &data, &out, 5, &[]);
    train_ok("stage-b", &data, &out, 5, &[]);
    let res = run(&mut train_stage("stage-c", &data, &out, 2, 2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("run `wuerstchen train text-encoder`"));

    let l = train_ok(
        "text-encoder",
        &data,
        &out,
        40,
        &["--tokenizer", &tok, "--lr", "1e-3"],
    );
    println!(
        "text-encoder loss {:.4} -> {:.4}",
        mean(&l[..10]),
        mean(&l[30..])
    );
    assert!(
        mean(&l[30..]) < mean(&l[..10]),
        "text-encoder loss did not decrease"
    );
    let l = train_ok(
        "stage-c",
        &data,
        &out,
        40,
        &["--lr", "1e-3", "--default-prior-guidance", "6"],
    );
    // the export declares the guidance it is meant to be sampled with
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prior/model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["default_prior_guidance_scale"], 6.0);
    println!(
        "stage-c loss {:.4} -> {:.4}",
        mean(&l[..10]),
        mean(&l[30..])
    );
    assert!(
        mean(&l[30..]) < mean(&l[..10]),
        "stage-c loss did not decrease"
    );

    // --x0-weight-floor: refused where it means nothing or out of [0, 1]; from the same
    // checkpoint the same step weighs its samples more (never less) than P2 does
    let res = run(train_stage_a(&data, &out, 1, 1).args(["--x0-weight-floor", "0.5"]));
    assert!(String::from_utf8_lossy(&res.stderr).contains("stage-c only"));
    let res = run(train_stage("stage-c", &data, &out, 41, 41).args(["--x0-weight-floor", "2"]));
    assert!(String::from_utf8_lossy(&res.stderr).contains("must lie in [0, 1]"));
    let res = run(train_stage_a(&data, &out, 1, 1).args(["--timestep-shift", "3"]));
    assert!(String::from_utf8_lossy(&res.stderr).contains("stage-c only"));
    let res = run(train_stage("stage-c", &data, &out, 41, 41).args(["--timestep-shift", "0"]));
    assert!(String::from_utf8_lossy(&res.stderr).contains("must be a positive number"));
    let copy = dir.join("floored");
    copy_dir(&out, &copy);
    // a decoder guidance set by hand in the decoder's model_index.json outlives the
    // prior's next export, which rewrites that file over what it held
    let dec_index = out.join("decoder/model_index.json");
    let read_index = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&dec_index).unwrap()).unwrap()
    };
    let mut v = read_index();
    v["default_decoder_guidance_scale"] = 2.0.into();
    std::fs::write(&dec_index, v.to_string()).unwrap();
    let p2 = train_ok("stage-c", &data, &out, 41, &["--lr", "1e-3"]);
    let v = read_index();
    assert_eq!(v["default_decoder_guidance_scale"], 2.0);
    assert!(v["latent_dim_scale"].is_number());
    // and so does the prior guidance the step-40 run declared, not named again
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prior/model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["default_prior_guidance_scale"], 6.0);
    let floored = train_ok(
        "stage-c",
        &data,
        &copy,
        41,
        &["--lr", "1e-3", "--x0-weight-floor", "0.9"],
    );
    assert_eq!((p2.len(), floored.len()), (1, 1));
    assert!(
        floored[0].1 > p2[0].1 && floored[0].1.is_finite(),
        "{p2:?} {floored:?}"
    );
    // the floor is kept with the checkpoint: a resume that does not name it weighs
    // step 42 as one that names it again, to the last digit, and says so
    let (named, unfloored) = (dir.join("floor-named"), dir.join("unfloored"));
    copy_dir(&copy, &named);
    copy_dir(&copy, &unfloored);
    let res = run(train_stage("stage-c", &data, &copy, 42, 42).args(["--lr", "1e-3"]));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(
        stderr.contains("stage-c: --x0-weight-floor 0.9"),
        "{stderr}"
    );
    let again = train_ok(
        "stage-c",
        &data,
        &named,
        42,
        &["--lr", "1e-3", "--x0-weight-floor", "0.9"],
    );
    assert_eq!(losses(&stderr), again);
    let p2_again = train_ok(
        "stage-c",
        &data,
        &unfloored,
        42,
        &["--lr", "1e-3", "--x0-weight-floor", "0"],
    );
    assert_ne!(
        p2_again, again,
        "this step's weights do not tell the floor apart"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Two steps of each stage with guidance, into `png`.
fn generate_ok(prior: &Path, decoder: &Path, png: &Path) {
    let res = run(bin()
        .args(["generate", "a red circle on a blue background", "--quiet"])
        .args(["--seed", "1", "--prior-steps", "2", "--decoder-steps", "2"])
        .args(["--prior-guidance", "2", "--prior"])
        .arg(prior)
        .arg("--decoder")
        .arg(decoder)
        .arg("--out")
        .arg(png));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn all_four_stages_make_a_model_that_generates() {
    let dir = scratch("chain");
    let data = dir.join("data");
    dataset(&data, 6, 128);
    let out = dir.join("model");
    let tok = tokenizer_dir().display().to_string();
    train_ok("stage-a", &data, &out, 2, &[]);
    train_ok("stage-b", &data, &out, 2, &[]);
    train_ok("text-encoder", &data, &out, 2, &["--tokenizer", &tok]);
    train_ok("stage-c", &data, &out, 2, &[]);
    // the two pipeline folders load through generate, at the model's own size
    let png = dir.join("out.png");
    generate_ok(&out.join("prior"), &out.join("decoder"), &png);
    let img = wuerstchen::image_io::read_png(&png).unwrap().image;
    assert_eq!((img.width, img.height), (128, 128));

    // a fine-tune starts from the exported weights: with a zero learning rate its
    // export is those weights (f32 here); a file of another model is refused by tensor name
    let tuned = dir.join("tuned");
    for part in ["prior", "decoder", "compressor"] {
        copy_dir(&out.join(part), &tuned.join(part));
    }
    let weights = |m: &Path, part: &str| m.join(part).join("diffusion_pytorch_model.safetensors");
    let res = run(train_stage("stage-c", &data, &tuned, 1, 1)
        .arg("--init")
        .arg(weights(&out, "decoder/decoder")));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && stderr.contains("no tensor `"),
        "{stderr}"
    );
    let init = weights(&out, "prior/prior");
    let res = run(train_stage("stage-c", &data, &tuned, 2, 2)
        .args(["--lr", "0", "--init"])
        .arg(&init));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let load = |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (before, after) = (load(&init), load(&weights(&tuned, "prior/prior")));
    assert_eq!(before.len(), after.len());
    for (name, t) in &before {
        let d = (t - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        // the EMA of unchanged weights: equal up to its rounding
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6, "{name}: {d}");
    }

    // a decoder that reads the captions too (attention blocks, as the official Stage
    // B), trained on the frozen compressor in a folder of its own
    let dec = dir.join("text-decoder");
    let config = dir.join("decoder.json");
    std::fs::write(
        &config,
        r#"{"c_hidden": [8, 16], "blocks": [1, 1], "level_config": ["CT", "CTA"],
            "nhead": [-1, 2], "inject_effnet": [true, true], "c_cond": 16, "c_r": 8,
            "clip_embd": 64, "patch_size": 2, "dropout": 0.0}"#,
    )
    .unwrap();
    let text_decoder = || {
        let mut c = train_stage("stage-b", &data, &dec, 2, 2);
        c.args(["--freeze-compressor", "--config"]).arg(&config);
        run(&mut c)
    };
    std::fs::create_dir_all(dec.join("decoder")).unwrap();
    copy_dir(&out.join("decoder/vqgan"), &dec.join("decoder/vqgan"));
    copy_dir(&out.join("compressor"), &dec.join("compressor"));
    let res = text_decoder();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && stderr.contains("text-encoder"),
        "{stderr}"
    );
    for part in ["text_encoder", "tokenizer"] {
        copy_dir(
            &out.join("decoder").join(part),
            &dec.join("decoder").join(part),
        );
    }
    let res = text_decoder();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    // the pipeline-level files come from the stage-c export, as in the default model
    copy_dir(
        &out.join("decoder/scheduler"),
        &dec.join("decoder/scheduler"),
    );
    std::fs::copy(
        out.join("decoder/model_index.json"),
        dec.join("decoder/model_index.json"),
    )
    .unwrap();
    generate_ok(&out.join("prior"), &dec.join("decoder"), &png);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_file_sets_the_model_and_resume_keeps_it() {
    let dir = scratch("config");
    let data = dir.join("data");
    dataset(&data, 8, 16);
    let config = dir.join("vq.json");
    // a diffusers config.json: unknown keys such as _class_name are ignored, missing
    // ones take the class defaults
    std::fs::write(
        &config,
        r#"{"_class_name": "PaellaVQModel", "levels": 2, "bottleneck_blocks": 1,
            "embed_dim": 32, "latent_channels": 4, "num_vq_embeddings": 64,
            "scale_factor": 1.0}"#,
    )
    .unwrap();
    let out = dir.join("model");
    let res = run(train_stage_a(&data, &out, 2, 2)
        .arg("--config")
        .arg(&config));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let (_, cfg) =
        PaellaVQModel::load(&out.join("decoder/vqgan"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!((cfg.embed_dim, cfg.num_vq_embeddings), (32, 64));

    // resumed without --config: the saved config rebuilds the same model
    let res = run(&mut train_stage_a(&data, &out, 4, 2));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(losses(&String::from_utf8_lossy(&res.stderr)).len(), 2);
    let (_, cfg) =
        PaellaVQModel::load(&out.join("decoder/vqgan"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(cfg.num_vq_embeddings, 64);

    // another config for the same checkpoint is refused, naming what was saved
    std::fs::write(&config, r#"{"embed_dim": 48, "num_vq_embeddings": 64}"#).unwrap();
    let res = run(train_stage_a(&data, &out, 6, 2)
        .arg("--config")
        .arg(&config));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("stage-a.config.json"), "{stderr}");

    // a config that is not one is named
    std::fs::write(&config, "{\"levels\": \"two\"}").unwrap();
    let fresh = dir.join("fresh");
    let res = run(train_stage_a(&data, &fresh, 2, 2)
        .arg("--config")
        .arg(&config));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("vq.json"), "{stderr}");
    assert!(
        !fresh.join("checkpoints").exists(),
        "a refused run wrote {fresh:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
