//! The official full-size architectures, built without weights, against the
//! state-dict layout diffusers / transformers produce for the same configs. This is
//! what lets the real checkpoints load key for key.

mod common;

use std::collections::BTreeMap;

use common::fixtures;
use wuerstchen::clip::ClipTextModel;
use wuerstchen::config::{ClipTextConfig, DiffNeXtConfig, PaellaVQConfig, PriorConfig};
use wuerstchen::stage_a::PaellaVQModel;
use wuerstchen::stage_b::WuerstchenDiffNeXt;
use wuerstchen::stage_c::WuerstchenPrior;
use wuerstchen::weights::record_parameters;

#[derive(serde::Deserialize)]
struct Entry {
    shape: Vec<usize>,
    parameter: bool,
}

#[derive(serde::Deserialize)]
struct Layout {
    parameters: usize,
    tensors: BTreeMap<String, Entry>,
}

fn check(name: &str, ours: BTreeMap<String, Vec<usize>>, official_params: usize) {
    let text = std::fs::read_to_string(fixtures().join(format!("full_size/{name}.json"))).unwrap();
    let reference: Layout = serde_json::from_str(&text).unwrap();
    // BatchNorm's step counter is a buffer no forward pass reads
    let theirs: BTreeMap<&str, &Vec<usize>> = reference
        .tensors
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, v)| (k.as_str(), &v.shape))
        .collect();
    let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(**k)).collect();
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| !theirs.contains_key(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{name}: we lack {} tensors, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        extra.is_empty(),
        "{name}: we have {} extra tensors, e.g. {:?}",
        extra.len(),
        &extra[..extra.len().min(5)]
    );
    for (k, shape) in &ours {
        assert_eq!(&shape, &theirs[k.as_str()], "{name}: shape of {k}");
    }
    let ours_params: usize = ours
        .iter()
        .filter(|(k, _)| reference.tensors[k.as_str()].parameter)
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(ours_params, reference.parameters, "{name}: parameter count");
    assert_eq!(
        ours_params, official_params,
        "{name}: parameter count of the official model"
    );
    println!(
        "{name}: {} tensors, {ours_params} parameters, identical layout",
        ours.len()
    );
}

#[test]
fn prior_layout_equals_diffusers() {
    let (_, names) =
        record_parameters(|vb| WuerstchenPrior::new(&PriorConfig::official(), vb)).unwrap();
    check("prior", names, 993_636_896);
}

#[test]
fn decoder_layout_equals_diffusers() {
    let (_, names) =
        record_parameters(|vb| WuerstchenDiffNeXt::new(&DiffNeXtConfig::official(), vb)).unwrap();
    check("decoder", names, 1_055_365_280);
}

#[test]
fn vqgan_layout_equals_diffusers() {
    let (_, names) =
        record_parameters(|vb| PaellaVQModel::new(&PaellaVQConfig::official(), vb)).unwrap();
    // REFERENCE.md's 18,374,134 leaves out the 8192 x 4 codebook (and counts the
    // BatchNorm affine); the state dict holds both.
    check("vqgan", names, 18_406_894);
}

#[test]
fn text_encoder_layouts_equal_transformers() {
    let (_, names) =
        record_parameters(|vb| ClipTextModel::new(&ClipTextConfig::official_prior(), vb)).unwrap();
    check("prior_text_encoder", names, 693_021_440);
    let (_, names) =
        record_parameters(|vb| ClipTextModel::new(&ClipTextConfig::official_decoder(), vb))
            .unwrap();
    check("decoder_text_encoder", names, 352_984_064);
}

#[test]
fn official_configs_parse_from_hub_json() {
    // the hub's prior/config.json, verbatim keys
    let json = r#"{"_class_name": "WuerstchenPrior", "_diffusers_version": "0.19.0.dev0",
        "c": 1536, "c_cond": 1280, "c_in": 16, "c_r": 64, "depth": 32, "dropout": 0.1, "nhead": 24}"#;
    let cfg: PriorConfig = serde_json::from_str(json).unwrap();
    assert_eq!(cfg, PriorConfig::official());
    // an empty config gets the class defaults, as from_pretrained does
    let cfg: PriorConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, PriorConfig::default());
    assert_ne!(PriorConfig::default(), PriorConfig::official());
}
