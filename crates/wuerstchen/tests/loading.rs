//! Strict weight loading: every way a folder can be wrong gets an error that names the
//! tensor, the file and the shapes.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixtures, load};
use wuerstchen::stage_c::WuerstchenPrior;
use wuerstchen::weights::FromFolder;
use wuerstchen::Error;

/// A scratch copy of a fixture model folder.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(fixture: &str, tag: &str) -> Self {
        let dst = std::env::temp_dir().join(format!("wuerstchen-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(fixtures().join(fixture).join("model")).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
        Scratch(dst)
    }

    fn weights(&self) -> PathBuf {
        self.0.join("diffusion_pytorch_model.safetensors")
    }

    /// Rewrites the weights file after editing the tensor map.
    fn edit(&self, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
        let mut t = load(&self.weights());
        f(&mut t);
        candle_core::safetensors::save(&t, self.weights()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_prior(dir: &Path) -> Result<(), Error> {
    WuerstchenPrior::load(dir, DType::F32, &Device::Cpu).map(|_| ())
}

#[test]
fn missing_tensor_is_named() {
    let s = Scratch::copy_of("prior_a", "missing");
    s.edit(|t| {
        assert!(t.remove("blocks.3.channelwise.2.gamma").is_some());
    });
    match load_prior(&s.0).unwrap_err() {
        Error::MissingTensor { name, file } => {
            assert_eq!(name, "blocks.3.channelwise.2.gamma");
            assert_eq!(file, s.weights());
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let s = Scratch::copy_of("prior_a", "extra");
    s.edit(|t| {
        t.insert(
            "blocks.99.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_prior(&s.0).unwrap_err();
    assert!(
        matches!(&e, Error::UnexpectedTensor { name, .. } if name == "blocks.99.weight"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_names_both_shapes() {
    let s = Scratch::copy_of("prior_a", "shape");
    s.edit(|t| {
        t.insert(
            "projection.weight".into(),
            Tensor::zeros((32, 8, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_prior(&s.0).unwrap_err();
    match &e {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "projection.weight");
            assert_eq!(expected, &vec![32, 16, 1, 1]);
            assert_eq!(found, &vec![32, 8, 1, 1]);
        }
        _ => panic!("wrong error: {e}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("[32, 8, 1, 1]") && msg.contains("[32, 16, 1, 1]"),
        "{msg}"
    );
}

#[test]
fn half_precision_weights_load_and_cast() {
    let s = Scratch::copy_of("prior_a", "f16");
    s.edit(|t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::BF16).unwrap();
        }
    });
    let (model, _) = WuerstchenPrior::load(&s.0, DType::F32, &Device::Cpu).unwrap();
    let inputs = load(&fixtures().join("prior_a/inputs.safetensors"));
    let y = model
        .forward(&inputs["x"], &inputs["r"], &inputs["c"])
        .unwrap();
    let expected = &load(&fixtures().join("prior_a/expected.safetensors"))["output"];
    // bf16 weights: close to the f32 reference but not equal
    let report = wuerstchen::parity::compare(&y, expected).unwrap();
    assert!(
        report.max_abs_diff < 0.5 && report.max_abs_diff > 0.0,
        "{report}"
    );
}

#[test]
fn missing_folder_config_and_weights_are_reported() {
    let e = load_prior(Path::new("/nonexistent/prior"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/prior"), "{e}");

    let s = Scratch::copy_of("prior_a", "noconfig");
    std::fs::remove_file(s.0.join("config.json")).unwrap();
    let e = load_prior(&s.0).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");

    let s = Scratch::copy_of("prior_a", "noweights");
    std::fs::remove_file(s.weights()).unwrap();
    let e = load_prior(&s.0).unwrap_err();
    assert!(matches!(e, Error::NoWeights { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

#[test]
fn corrupt_and_truncated_files_are_errors() {
    let s = Scratch::copy_of("prior_a", "corrupt");
    let bytes = std::fs::read(s.weights()).unwrap();
    std::fs::write(s.weights(), &bytes[..bytes.len() / 2]).unwrap();
    let e = load_prior(&s.0).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e}");

    std::fs::write(s.weights(), b"not a safetensors file").unwrap();
    let e = load_prior(&s.0).unwrap_err();
    assert!(
        e.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );

    std::fs::write(s.0.join("config.json"), "{\"c\": \"wide\"}").unwrap();
    let e = load_prior(&s.0).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
}

#[test]
fn inconsistent_config_is_rejected_before_building() {
    let s = Scratch::copy_of("prior_a", "badcfg");
    std::fs::write(s.0.join("config.json"), r#"{"c": 32, "nhead": 5}"#).unwrap();
    let e = load_prior(&s.0).unwrap_err().to_string();
    assert!(e.contains("nhead") && e.contains("config.json"), "{e}");
}
