//! `wuerstchen forward`, the contract of issue 2, run as a user runs it.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

use candle_core::{DType, Device, Tensor};
use common::{assert_succeeded, bin, fixtures, scratch};

fn forward(component: &str, model: &Path, inputs: &Path, output: &Path) -> Output {
    bin()
        .args(["forward", component, "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap()
}

fn component_of(case: &str) -> String {
    let text = std::fs::read_to_string(fixtures().join(case).join("fixture.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["component"].as_str().unwrap().to_string()
}

#[test]
fn every_component_matches_its_fixture_through_the_binary() {
    let dir = scratch("ok");
    for case in [
        "prior_b",
        "decoder_b",
        "vqgan_a_decode",
        "vqgan_b_encode",
        "text_encoder_a",
    ] {
        let f = fixtures().join(case);
        let out = dir.join(format!("{case}.safetensors"));
        let res = forward(
            &component_of(case),
            &f.join("model"),
            &f.join("inputs.safetensors"),
            &out,
        );
        assert!(
            res.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert_eq!(got.len(), 1, "only `output` is written");
        let got = &got["output"];
        assert_eq!(got.dtype(), DType::F32);
        let want = &candle_core::safetensors::load(f.join("expected.safetensors"), &Device::Cpu)
            .unwrap()["output"];
        let report = wuerstchen::parity::compare(got, want).unwrap();
        println!("{case:<20} {report}");
        assert!(report.passes(), "{case}: {report}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn dtype_builds_the_component_as_generate_does() {
    let dir = scratch("dtype");
    let f = fixtures().join("prior_b");
    let run = |dtype: &str| {
        let out = dir.join(format!("{dtype}.safetensors"));
        let res = bin()
            .args(["forward", "prior", "--model"])
            .arg(f.join("model"))
            .arg("--inputs")
            .arg(f.join("inputs.safetensors"))
            .arg("--output")
            .arg(&out)
            .args(["--dtype", dtype])
            .output()
            .unwrap();
        (res, out)
    };
    let want = &candle_core::safetensors::load(f.join("expected.safetensors"), &Device::Cpu)
        .unwrap()["output"];
    let load =
        |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap()["output"].clone();
    let (res, f32_out) = run("f32");
    assert_succeeded(&res);
    let (res, bf16_out) = run("bf16");
    assert_succeeded(&res);
    let (f32_out, bf16_out) = (load(&f32_out), load(&bf16_out));
    assert_eq!(bf16_out.dtype(), DType::F32);
    // bf16 ran (its rounding moves the output) and stayed within bf16's tolerance
    let moved = (&bf16_out - &f32_out)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(moved.to_scalar::<f32>().unwrap() > 0.0);
    let report = wuerstchen::parity::compare(&bf16_out, want).unwrap();
    let scale = report.max_abs_expected.max(1.0);
    assert!(report.max_abs_diff <= 5e-3 * scale, "{report}");
    assert!(report.rms_diff <= 1e-3 * scale, "{report}");
    let (res, out) = run("f64");
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("--dtype \"f64\""));
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs a failing case: non-zero exit, a message containing `needle`, no output file.
fn assert_fails(component: &str, model: &Path, inputs: &Path, needle: &str) {
    let dir = scratch(&format!("fail-{}", needle.len()));
    let out = dir.join("out.safetensors");
    let res = forward(component, model, inputs, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "should fail: {component}");
    assert!(
        stderr.contains(needle),
        "message should mention {needle:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "no output (or temp file) may be left behind"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn write_inputs(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dev = Device::Cpu;
    let prior = fixtures().join("prior_a");
    let dir = scratch("inputs");

    assert_fails(
        "nonsense",
        &prior.join("model"),
        &prior.join("inputs.safetensors"),
        "unknown component",
    );
    assert_fails(
        "prior",
        Path::new("/no/such/prior"),
        &prior.join("inputs.safetensors"),
        "/no/such/prior",
    );
    assert_fails(
        "prior",
        &prior.join("model"),
        &dir.join("absent.safetensors"),
        "absent.safetensors",
    );

    // a missing input tensor is named
    let only_x = dir.join("only_x.safetensors");
    write_inputs(
        &only_x,
        vec![("x", Tensor::zeros((1, 16, 4, 4), DType::F32, &dev).unwrap())],
    );
    assert_fails("prior", &prior.join("model"), &only_x, "`r`");

    // wrong channel count is named with the config value
    let wrong = dir.join("wrong.safetensors");
    write_inputs(
        &wrong,
        vec![
            ("x", Tensor::zeros((1, 7, 4, 4), DType::F32, &dev).unwrap()),
            ("r", Tensor::zeros(1, DType::F32, &dev).unwrap()),
            ("c", Tensor::zeros((1, 77, 24), DType::F32, &dev).unwrap()),
        ],
    );
    assert_fails("prior", &prior.join("model"), &wrong, "c_in is 16");

    // token ids outside the vocabulary
    let te = fixtures().join("text_encoder_b");
    let ids = dir.join("ids.safetensors");
    write_inputs(
        &ids,
        vec![
            ("input_ids", Tensor::full(5000i64, (1, 77), &dev).unwrap()),
            (
                "attention_mask",
                Tensor::ones((1, 77), DType::I64, &dev).unwrap(),
            ),
        ],
    );
    assert_fails(
        "text-encoder",
        &te.join("model"),
        &ids,
        "outside the vocabulary",
    );

    // a decoder input whose size the UNet cannot halve
    let dec = fixtures().join("decoder_a");
    let mut t = candle_core::safetensors::load(dec.join("inputs.safetensors"), &dev).unwrap();
    t.insert(
        "x".into(),
        Tensor::zeros((2, 4, 20, 40), DType::F32, &dev).unwrap(),
    );
    let odd = dir.join("odd.safetensors");
    candle_core::safetensors::save(&t, &odd).unwrap();
    assert_fails("decoder", &dec.join("model"), &odd, "multiples of 8");

    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_prints_the_json_contract() {
    let args = [
        "bench",
        "--component",
        "vqgan-decode",
        "--width",
        "128",
        "--height",
        "128",
    ];
    let runs = ["--runs", "2", "--warmup", "0", "--threads", "1", "--json"];
    let loud = bin().args(args).args(runs).output().unwrap();
    let stderr = String::from_utf8_lossy(&loud.stderr);
    assert!(loud.status.success(), "{stderr}");
    // progress on stderr: the component, then each timed run's seconds
    assert!(
        stderr.contains("vqgan-decode: building") && stderr.matches(" s\n").count() == 2,
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&loud.stdout);
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let row = &rows.as_array().unwrap()[0];
    for key in [
        "component",
        "dtype",
        "width",
        "height",
        "batch",
        "threads",
        "median_s",
        "min_s",
        "max_s",
        "gflop",
        "peak_rss_mib",
    ] {
        assert!(row.get(key).is_some(), "no {key} in {row}");
    }
    assert_eq!(row["component"], "vqgan-decode");
    assert_eq!(
        (row["width"].as_u64(), row["threads"].as_u64()),
        (Some(128), Some(1))
    );
    let (min, med, max) = (
        row["min_s"].as_f64().unwrap(),
        row["median_s"].as_f64().unwrap(),
        row["max_s"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= med && med <= max, "{row}");

    // --quiet: nothing on stderr, the same JSON on stdout
    let quiet = bin().args(args).args(runs).arg("--quiet").output().unwrap();
    assert!(
        quiet.status.success() && quiet.stderr.is_empty(),
        "{quiet:?}"
    );
    let rows: serde_json::Value = serde_json::from_slice(&quiet.stdout).unwrap();
    assert_eq!(rows[0]["component"], "vqgan-decode");

    let bad = bin()
        .args(["bench", "--component", "vae", "--width", "100"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("vae"), "{stderr}");
}
