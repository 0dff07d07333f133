//! `wuerstchen eval`, as a user runs it on the embedded default model.

mod common;

use std::path::Path;

use common::{bin, copy_dir, scratch, stdout_of};

/// The default model's semantic compressor (training only, not embedded).
fn compressor() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default/compressor")
}

/// `--denoising` prints one row per noise level, noisiest first, and the caption
/// helps there (the shipped prior places its shapes).
#[test]
fn denoising_prints_a_row_per_noise_level() {
    let stdout = stdout_of(
        bin()
            .args(["eval", "--count", "4", "--denoising"])
            .arg(compressor()),
    );
    let rows: Vec<Vec<f64>> = stdout
        .lines()
        .filter_map(|l| {
            let v: Vec<f64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            (v.len() == 4).then_some(v)
        })
        .collect();
    assert_eq!(rows.len(), 9, "{stdout}");
    assert_eq!(rows[0][0], 0.98);
    assert!(rows.windows(2).all(|w| w[0][0] > w[1][0]), "{stdout}");
    // alpha_bar rises as t falls; the caption helps at the noisiest level
    assert!(rows.windows(2).all(|w| w[0][1] < w[1][1]), "{stdout}");
    assert!(rows[0][2] < rows[0][3], "{stdout}");
}

#[test]
fn eval_refuses_nothing_to_judge_and_mixed_modes() {
    let out = bin().args(["eval", "--count", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--count 0"));
    let out = bin()
        .args(["eval", "--images", "/tmp/never-written", "--denoising"])
        .arg(compressor())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    assert!(!Path::new("/tmp/never-written").exists());
}

/// The shipped compressor at `input_scale` 1 (a 16 x 16 map of 128 px images, the
/// scale it was first trained at) against the embedded 12 x 12 prior: the prior would
/// denoise any map size, so the mismatch must be caught and named.
#[test]
fn denoising_refuses_a_compressor_of_another_map_size() {
    let dir = scratch("compressor-16");
    copy_dir(&compressor(), &dir);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let unscaled = config.replace("\"input_scale\": 0.75", "\"input_scale\": 1.0");
    assert_ne!(config, unscaled, "{config}");
    std::fs::write(dir.join("config.json"), unscaled).unwrap();
    let out = bin()
        .args(["eval", "--count", "2", "--denoising"])
        .arg(&dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("[2, 16, 16, 16]"), "{stderr}");
    assert!(stderr.contains("[2, 16, 12, 12]"), "{stderr}");
}
