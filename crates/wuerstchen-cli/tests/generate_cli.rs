//! `wuerstchen generate` and `inspect`, the contract of issue 3, run as a user runs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{bin, copy_dir, fixtures, scratch};
use wuerstchen::image_io::read_png;

fn pipeline_fixtures() -> PathBuf {
    fixtures().join("pipeline")
}

/// The cheapest run of the fixture pipelines: 128 x 128, one step per stage.
const TINY: [&str; 8] = [
    "--width",
    "128",
    "--height",
    "128",
    "--prior-steps",
    "1",
    "--decoder-steps",
    "1",
];

fn wuerstchen(args: &[String]) -> Output {
    bin().args(args).output().unwrap()
}

/// `generate` on the tiny fixture pipelines with the given extra flags.
fn generate_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let p = pipeline_fixtures();
    let mut v: Vec<String> = vec!["generate".into(), "--quiet".into()];
    // the fixture folders unless the case names its own
    for part in ["prior", "decoder"] {
        let flag = format!("--{part}");
        if !extra.contains(&flag.as_str()) {
            v.extend([flag, p.join(part).display().to_string()]);
        }
    }
    v.extend(["--out".into(), out.display().to_string()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The CLI flags of a recorded diffusers run (params.json).
fn case_flags(case: &str) -> Vec<String> {
    let text = std::fs::read_to_string(pipeline_fixtures().join(case).join("params.json")).unwrap();
    let p: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut f = vec![
        "--prompt".to_string(),
        p["prompt"].as_str().unwrap().into(),
        "--negative-prompt".into(),
        p["negative_prompt"].as_str().unwrap().into(),
    ];
    for (flag, key) in [
        ("--width", "width"),
        ("--height", "height"),
        ("--num-images", "num_images"),
        ("--prior-guidance", "prior_guidance"),
        ("--decoder-steps", "decoder_steps"),
        ("--decoder-guidance", "decoder_guidance"),
        ("--prior-steps", "prior_steps"),
    ] {
        if !p[key].is_null() {
            f.extend([flag.to_string(), p[key].to_string()]);
        }
    }
    f.extend([
        "--noise".into(),
        pipeline_fixtures()
            .join(case)
            .join("noise.safetensors")
            .display()
            .to_string(),
    ]);
    f
}

#[test]
fn replays_match_diffusers_images() {
    for case in [
        "cfg_both_stages",
        "two_images_linear",
        "long_prompt_no_guidance",
    ] {
        let dir = scratch(case);
        let out = dir.join("img.png");
        let mut args = generate_args(&out, &[]);
        args.extend(case_flags(case));
        let res = wuerstchen(&args);
        assert!(
            res.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let mut i = 0;
        while pipeline_fixtures()
            .join(case)
            .join(format!("expected-{i}.png"))
            .exists()
        {
            let expected = read_png(
                &pipeline_fixtures()
                    .join(case)
                    .join(format!("expected-{i}.png")),
            )
            .unwrap();
            let got_path = if out.exists() {
                out.clone()
            } else {
                dir.join(format!("img-{i}.png"))
            };
            let got = read_png(&got_path).unwrap();
            assert_eq!(
                (got.image.width, got.image.height),
                (expected.image.width, expected.image.height)
            );
            let n = got.image.data.len();
            let mut max = 0u8;
            let mut exact = 0;
            for (a, b) in got.image.data.iter().zip(&expected.image.data) {
                max = max.max(a.abs_diff(*b));
                exact += usize::from(a == b);
            }
            let frac = exact as f64 / n as f64;
            println!(
                "{case} image {i}: max diff {max} level(s), {:.3}% exact",
                100.0 * frac
            );
            assert!(
                max <= 1,
                "{case} image {i}: a value differs by {max} levels"
            );
            assert!(
                frac >= 0.98,
                "{case} image {i}: only {:.2}% exact",
                100.0 * frac
            );
            i += 1;
        }
        assert!(i >= 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn seeded_runs_are_reproducible() {
    let dir = scratch("seed");
    let run = |name: &str, seed: &str| -> Vec<u8> {
        let out = dir.join(name);
        let common = [
            "a blue square",
            "--width",
            "128",
            "--height",
            "128",
            "--prior-steps",
            "2",
        ];
        let mut args = generate_args(&out, &common);
        args.extend([
            "--decoder-steps".into(),
            "2".into(),
            "--seed".into(),
            seed.into(),
        ]);
        let res = wuerstchen(&args);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        std::fs::read(out).unwrap()
    };
    let a = run("a.png", "42");
    let b = run("b.png", "42");
    let c = run("c.png", "43");
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a, c, "another seed, another image");
    let text = wuerstchen::image_io::read_parameters(&dir.join("a.png"))
        .unwrap()
        .unwrap();
    assert!(text.contains("Seed: 42,"), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn half_precision_and_bf16_stay_close_to_f32() {
    let dir = scratch("f16");
    let run = |dtype: &str| {
        let out = dir.join(format!("{dtype}.png"));
        let common = [
            "a red circle",
            "--width",
            "256",
            "--height",
            "128",
            "--prior-steps",
            "3",
        ];
        let mut args = generate_args(&out, &common);
        args.extend(["--decoder-steps", "2", "--seed", "1", "--dtype", dtype].map(String::from));
        let res = wuerstchen(&args);
        assert!(
            res.status.success(),
            "{dtype}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        read_png(&out).unwrap().image.data
    };
    let f32 = run("f32");
    // bf16 on the CPU: bf16 linear layers (AMX tiles where the CPU has them), f32 rest
    for dtype in ["f16", "bf16"] {
        let b = run(dtype);
        let mean = f32
            .iter()
            .zip(&b)
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / f32.len() as f64;
        println!("{dtype} vs f32: mean difference {mean:.3} levels");
        assert!(mean < 2.0, "{dtype} image drifts {mean} levels from f32");
        assert!(
            b != f32,
            "{dtype} image is bit-equal to f32's: did {dtype} run?"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn png_carries_parameters_and_inspect_prints_them() {
    let dir = scratch("meta");
    for (name, prompt, chunk) in [
        ("latin.png", "a café on a hill", "tEXt"),
        ("utf8.png", "一只猫 on a roof", "iTXt"),
    ] {
        let out = dir.join(name);
        let common: Vec<&str> = [prompt].into_iter().chain(TINY).collect();
        let mut args = generate_args(&out, &common);
        args.extend([
            "--seed".into(),
            "7".into(),
            "--negative-prompt".into(),
            "dark".into(),
        ]);
        let res = wuerstchen(&args);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let bytes = std::fs::read(&out).unwrap();
        assert!(
            bytes.windows(4).any(|w| w == chunk.as_bytes()),
            "{name}: no {chunk} chunk"
        );
        let res = wuerstchen(&["inspect".into(), out.display().to_string()]);
        assert!(res.status.success());
        let text = String::from_utf8(res.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], prompt);
        assert_eq!(lines[1], "Negative prompt: dark");
        assert!(
            lines[2].starts_with("Steps: 1, CFG scale: 4, Seed: 7, Size: 128x128, Model: "),
            "{}",
            lines[2]
        );
    }
    // a PNG without parameters
    let png = wuerstchen::image_io::encode_png(
        &wuerstchen::image_io::RgbImage {
            width: 1,
            height: 1,
            data: vec![1, 2, 3],
        },
        None,
    )
    .unwrap();
    std::fs::write(dir.join("plain.png"), png).unwrap();
    let res = wuerstchen(&[
        "inspect".into(),
        dir.join("plain.png").display().to_string(),
    ]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("no `parameters`"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A failing run: non-zero exit, `needle` in the message, no panic, nothing written.
fn assert_fails(extra: &[&str], needle: &str) {
    let dir = scratch(&format!(
        "fail-{}",
        needle.replace(|c: char| !c.is_alphanumeric(), "")
    ));
    let out = dir.join("out.png");
    let res = wuerstchen(&generate_args(&out, extra));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "should fail: {extra:?}");
    assert!(
        stderr.contains(needle),
        "message for {extra:?} should mention {needle:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "{extra:?}: a file was left behind");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn invalid_parameters_are_named() {
    assert_fails(
        &["x", "--width", "1000"],
        "width 1000 is not a multiple of 128 (try 896)",
    );
    assert_fails(
        &["x", "--height", "8192"],
        "height 8192 is outside 128..=4096",
    );
    assert_fails(
        &["x", "--num-images", "0"],
        "num_images 0 is outside 1..=16",
    );
    assert_fails(&["x", "--prior-steps", "0"], "prior_steps 0 is outside");
    assert_fails(&["x", "--decoder-steps", "0"], "decoder_steps 0 is outside");
    assert_fails(
        &["x", "--prior-guidance=-1"],
        "prior_guidance -1 must be a number >= 0",
    );
    assert_fails(&["x", "--decoder-guidance", "NaN"], "decoder_guidance NaN");
    assert_fails(&["   "], "prompt is empty");
    assert_fails(&["x", "--dtype", "f64"], "--dtype \"f64\"");
    assert_fails(&["x", "--device", "tpu"], "--device \"tpu\"");
}

#[test]
fn noise_file_errors_are_named() {
    let dir = scratch("noise");
    let cfg = pipeline_fixtures().join("cfg_both_stages/noise.safetensors");
    let base = [
        "x",
        "--width",
        "256",
        "--height",
        "128",
        "--decoder-steps",
        "3",
    ];
    let with = |file: &Path, needle: &str| {
        let mut a: Vec<&str> = base.to_vec();
        let f = file.display().to_string();
        a.extend(["--noise", &f]);
        assert_fails(&a, needle);
    };
    // a different size needs other shapes
    let mut a: Vec<&str> = vec![
        "x",
        "--width",
        "128",
        "--height",
        "128",
        "--decoder-steps",
        "3",
        "--noise",
    ];
    let f = cfg.display().to_string();
    a.push(&f);
    assert_fails(
        &a,
        "`prior.init` has shape [1, 16, 3, 6], expected [1, 16, 3, 3]",
    );
    // fewer decoder steps than the file: an extra tensor
    let mut a: Vec<&str> = vec![
        "x",
        "--width",
        "256",
        "--height",
        "128",
        "--decoder-steps",
        "2",
        "--noise",
    ];
    a.push(&f);
    assert_fails(&a, "unexpected tensor `decoder.step.2`");
    // a missing tensor and a wrong dtype
    let mut t = candle_core::safetensors::load(&cfg, &candle_core::Device::Cpu).unwrap();
    t.remove("prior.step.7");
    let missing = dir.join("missing.safetensors");
    candle_core::safetensors::save(&t, &missing).unwrap();
    with(&missing, "`prior.step.7` is missing");
    let mut t = candle_core::safetensors::load(&cfg, &candle_core::Device::Cpu).unwrap();
    let v = t["decoder.init"].to_dtype(candle_core::DType::F16).unwrap();
    t.insert("decoder.init".into(), v);
    let f16 = dir.join("f16.safetensors");
    candle_core::safetensors::save(&t, &f16).unwrap();
    with(&f16, "`decoder.init` has dtype F16, expected F32");
    with(&dir.join("absent.safetensors"), "absent.safetensors");
    std::fs::write(dir.join("junk.safetensors"), b"junk").unwrap();
    with(&dir.join("junk.safetensors"), "junk.safetensors");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_and_corrupt_model_folders_fail_cleanly() {
    assert_fails(&["x", "--prior", "/no/such/prior"], "/no/such/prior");
    let dir = scratch("corrupt");
    let decoder = dir.join("decoder");
    copy_dir(&pipeline_fixtures().join("decoder"), &decoder);
    let weights = decoder.join("vqgan/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let d = decoder.display().to_string();
    let args: Vec<&str> = ["x"]
        .into_iter()
        .chain(TINY)
        .chain(["--decoder", &d])
        .collect();
    assert_fails(&args, "vqgan/diffusion_pytorch_model.safetensors");
    std::fs::remove_dir_all(decoder.join("vqgan")).unwrap();
    assert_fails(&args, "no vqgan/ folder");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn default_size_and_guidance_follow_the_model_folder() {
    let dir = scratch("native");
    let prior = dir.join("prior");
    copy_dir(&pipeline_fixtures().join("prior"), &prior);
    // our keys added to a pipeline folder's model_index.json
    let declare = |folder: &Path, keys: &[(&str, serde_json::Value)]| {
        let index = folder.join("model_index.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        for (k, value) in keys {
            v[*k] = value.clone();
        }
        std::fs::write(&index, v.to_string()).unwrap();
    };
    declare(
        &prior,
        &[
            ("default_width", 256.into()),
            ("default_height", 128.into()),
            ("default_prior_guidance_scale", 7.5.into()),
        ],
    );
    let decoder = dir.join("decoder");
    copy_dir(&pipeline_fixtures().join("decoder"), &decoder);
    declare(&decoder, &[("default_decoder_guidance_scale", 1.5.into())]);
    let out = dir.join("native.png");
    let p = prior.display().to_string();
    let d = decoder.display().to_string();
    let args = [
        "x",
        "--prior",
        &p,
        "--decoder",
        &d,
        "--prior-steps",
        "1",
        "--decoder-steps",
        "1",
        "--seed",
        "3",
    ];
    let res = wuerstchen(&generate_args(&out, &args));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let png = read_png(&out).unwrap();
    assert_eq!((png.image.width, png.image.height), (256, 128));
    let text = wuerstchen::image_io::read_parameters(&out)
        .unwrap()
        .unwrap();
    assert!(text.contains("CFG scale: 7.5,"), "{text}");
    assert!(text.contains("Decoder CFG scale: 1.5,"), "{text}");
    // a flag still wins
    let res = wuerstchen(&generate_args(
        &out,
        &[
            &args[..],
            &["--prior-guidance", "2", "--decoder-guidance", "0"],
        ]
        .concat(),
    ));
    assert!(res.status.success());
    let text = wuerstchen::image_io::read_parameters(&out)
        .unwrap()
        .unwrap();
    assert!(text.contains("CFG scale: 2,"), "{text}");
    assert!(text.contains("Decoder CFG scale: 0,"), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn hub_ids_are_found_in_the_hugging_face_cache_offline() {
    let cache = scratch("hfcache");
    let run = |out: &Path| {
        bin()
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .args(["generate", "x", "--quiet", "--seed", "1", "--out"])
            .arg(out)
            .args(TINY)
            .args([
                "--prior",
                "warp-ai/wuerstchen-prior",
                "--decoder",
                "warp-ai/wuerstchen",
            ])
            .output()
            .unwrap()
    };
    // nothing cached: the error says which folder to pass and where it looked
    let res = run(&cache.join("none.png"));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("pass --prior DIR"), "{stderr}");
    assert!(stderr.contains(&cache.display().to_string()), "{stderr}");
    if cfg!(feature = "hub") {
        assert!(stderr.contains("HF_HUB_OFFLINE is set"), "{stderr}");
    }
    assert!(!cache.join("none.png").exists());
    // the official repos' snapshot layout
    for (repo, part) in [("wuerstchen-prior", "prior"), ("wuerstchen", "decoder")] {
        let snap = cache.join(format!("models--warp-ai--{repo}/snapshots/0123abcd"));
        copy_dir(&pipeline_fixtures().join(part), &snap);
    }
    let out = cache.join("found.png");
    let res = run(&out);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let text = wuerstchen::image_io::read_parameters(&out)
        .unwrap()
        .unwrap();
    assert!(text.contains("Model: warp-ai/wuerstchen-prior"), "{text}");
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn without_model_flags_the_embedded_default_model_draws_at_its_own_size() {
    let dir = scratch("default");
    let cache = dir.join("cache");
    let run = |extra: &[&str], out: &Path| {
        bin()
            .env("WUERSTCHEN_CACHE", &cache)
            .args(["generate", "a red circle on a blue background", "--quiet"])
            .args(["--seed", "3", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = dir.join("default.png");
    let res = run(&[], &out);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let png = read_png(&out).unwrap();
    assert_eq!((png.image.width, png.image.height), (128, 128));
    let text = wuerstchen::image_io::read_parameters(&out)
        .unwrap()
        .unwrap();
    assert!(text.contains("Model: wuerstchen-default-"), "{text}");
    // the second run finds the materialised copy and draws the same bytes
    let again = dir.join("again.png");
    assert!(run(&[], &again).status.success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    // one model flag without the other is refused before anything is written
    for flag in ["--prior", "--decoder"] {
        let half = dir.join("half.png");
        let res = run(&[flag, "warp-ai/wuerstchen"], &half);
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success());
        assert!(stderr.contains("give both"), "{stderr}");
        assert!(!half.exists());
    }
    std::fs::remove_dir_all(dir).unwrap();
}
