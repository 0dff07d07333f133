//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `tests/fixtures` at the repository root (made by scripts/make_fixtures.py).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e} (run scripts/make_fixtures.py)",
            path.display()
        )
    })
}

/// Asserts parity within the project bound and prints the report line.
pub fn assert_parity(label: &str, got: &Tensor, expected: &Tensor) {
    let report = wuerstchen::parity::compare(got, expected).unwrap();
    println!("{label:<40} {report}");
    assert!(report.passes(), "{label}: {report}");
}

/// The `component` recorded in a fixture folder's header.
pub fn fixture_component(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("fixture.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("component")?.as_str().map(str::to_string)
}
