//! Every component against diffusers' output on the committed fixtures.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use common::{assert_parity, fixture_component, fixtures, load};
use wuerstchen::flops;
use wuerstchen::forward::{run_forward, Component};
use wuerstchen::resize::resize_bicubic_aa;
use wuerstchen::stage_a::PaellaVQModel;
use wuerstchen::stage_b::WuerstchenDiffNeXt;
use wuerstchen::weights::FromFolder;

/// A fixture's model, loaded as `run_forward` loads it (for inference, f32, on the
/// CPU), and its inputs.
fn fixture_model<M: FromFolder>(case: &str) -> (M, HashMap<String, Tensor>) {
    let dir = fixtures().join(case);
    let (model, _) = M::load(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
    (model, load(&dir.join("inputs.safetensors")))
}

/// A fixture's model built as a training run builds it: from a plain VarBuilder, so
/// without the inference-only folds and packed layers.
fn training_build<M: FromFolder>(case: &str) -> M {
    let dir = fixtures().join(case).join("model");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config: M::Config = serde_json::from_str(&config).unwrap();
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture is not modified while the test maps it
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) };
    M::build(&config, vb.unwrap()).unwrap()
}

/// One fixture folder: its inputs and diffusers' output.
struct Case {
    dir: PathBuf,
    inputs: HashMap<String, Tensor>,
    expected: Tensor,
}

impl Case {
    fn open(dir: PathBuf) -> Self {
        let inputs = load(&dir.join("inputs.safetensors"));
        let expected = load(&dir.join("expected.safetensors"))["output"].clone();
        Self {
            dir,
            inputs,
            expected,
        }
    }

    /// The fixture's component run as `run_forward` runs it (loaded for inference,
    /// on the CPU) with weights in `dtype`.
    fn run(&self, kind: Component, dtype: DType) -> Tensor {
        run_forward(
            kind,
            &self.dir.join("model"),
            &self.inputs,
            &Device::Cpu,
            dtype,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.dir.display()))
    }
}

/// Runs every fixture of one component kind; returns how many ran.
fn run_component(kind: Component) -> usize {
    run_component_in(kind, DType::F32, assert_parity)
}

/// Runs every fixture of `kind` with weights in `dtype` and judges each output.
fn run_component_in(
    kind: Component,
    dtype: DType,
    judge: impl Fn(&str, &Tensor, &Tensor),
) -> usize {
    let mut ran = 0;
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    for dir in dirs {
        if fixture_component(&dir).as_deref() != Some(kind.name()) {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let case = Case::open(dir);
        judge(&name, &case.run(kind, dtype), &case.expected);
        ran += 1;
    }
    ran
}

#[test]
fn prior_matches_diffusers() {
    assert!(run_component(Component::Prior) >= 2);
}

/// Classifier-free guidance runs the prior on each latent twice, under the text and
/// under none: the halves are computed once up to the first attention block, giving
/// diffusers' output for less work than a batch whose halves differ. An attention
/// block given images that do not divide its conditioning's batch says so.
#[test]
fn prior_computes_the_halves_of_a_guidance_batch_once() {
    use wuerstchen::stage_c::WuerstchenPrior;
    let (prior, inputs) = fixture_model::<WuerstchenPrior>("prior_guidance");
    let expected = &load(&fixtures().join("prior_guidance/expected.safetensors"))["output"];
    let (x, r, c) = (&inputs["x"], &inputs["r"], &inputs["c"]);
    let (shared, shared_flops) = flops::counted(|| prior.forward(x, r, c));
    assert_parity("prior_guidance", &shared.unwrap(), expected);
    // one value of the second half changed: every image is computed
    let mut values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    *values.last_mut().unwrap() += 1e-3;
    let nudged = Tensor::from_vec(values, x.shape(), &Device::Cpu).unwrap();
    let (apart, apart_flops) = flops::counted(|| prior.forward(&nudged, r, c));
    apart.unwrap();
    assert!(
        shared_flops < apart_flops,
        "{shared_flops} FLOPs shared, {apart_flops} apart"
    );
    let cond = prior.condition(c).unwrap();
    let err = prior
        .forward_conditioned(&x.i(0..3).unwrap(), &r.i(0..3).unwrap(), &cond)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("3 images under a conditioning of batch 4"),
        "{err}"
    );
}

#[test]
fn decoder_matches_diffusers() {
    assert!(run_component(Component::Decoder) >= 3);
}

/// Loaded for inference, the decoder folds each level's effnet mapper into its
/// ResBlocks' first layers (a sixth less work at 1024 px); built as a training run
/// builds it, it keeps the mappers, whose weights then train. Both give diffusers'
/// output, and the folded one does less work.
#[test]
fn decoder_folds_its_effnet_mappers_only_for_inference() {
    for case in ["decoder_a", "decoder_b", "decoder_c"] {
        let fixture = Case::open(fixtures().join(case));
        let (folded, folded_flops) = flops::counted(|| fixture.run(Component::Decoder, DType::F32));
        let model = training_build::<WuerstchenDiffNeXt>(case);
        let (inputs, expected) = (&fixture.inputs, &fixture.expected);
        let input = |name: &str| &inputs[name];
        let (unfolded, unfolded_flops) = flops::counted(|| {
            model.forward(input("x"), input("r"), input("effnet"), input("clip"))
        });
        assert_parity(&format!("{case} unfolded"), &unfolded.unwrap(), expected);
        assert_parity(&format!("{case} folded"), &folded, expected);
        println!("{case}: {folded_flops} FLOPs folded, {unfolded_flops} unfolded");
        assert!(
            folded_flops < unfolded_flops,
            "{case}: folding saved no work"
        );
    }
}

/// A pipeline computes the text's keys and values once and reuses them at every step:
/// the same output as a whole call at every step, and conditioning made by another
/// model is an error that says so, not a wrong image.
#[test]
fn text_conditioning_made_once_serves_every_step() {
    use wuerstchen::stage_c::WuerstchenPrior;
    let (prior, inputs) = fixture_model::<WuerstchenPrior>("prior_a");
    let cond = prior.condition(&inputs["c"]).unwrap();
    for (x, r) in [
        (inputs["x"].clone(), inputs["r"].clone()),
        (
            (&inputs["x"] * 0.5).unwrap(),
            (&inputs["r"] * 0.25).unwrap(),
        ),
    ] {
        let whole = prior.forward(&x, &r, &inputs["c"]).unwrap();
        let reused = prior.forward_conditioned(&x, &r, &cond).unwrap();
        assert_parity("prior_a, conditioning reused", &reused, &whole);
    }
    let (other, other_inputs) = fixture_model::<WuerstchenPrior>("prior_b");
    let other = other.condition(&other_inputs["c"]).unwrap();
    let err = prior
        .forward_conditioned(&inputs["x"], &inputs["r"], &other)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("conditioning for 3 layers given to a prior of 2"),
        "{err}"
    );

    let (decoder, inputs) = fixture_model::<WuerstchenDiffNeXt>("decoder_a");
    let cond = decoder.condition(&inputs["clip"]).unwrap();
    let input = |name: &str| &inputs[name];
    let whole = decoder.forward(input("x"), input("r"), input("effnet"), input("clip"));
    let reused = decoder.forward_conditioned(input("x"), input("r"), input("effnet"), &cond);
    assert_parity(
        "decoder_a, conditioning reused",
        &reused.unwrap(),
        &whole.unwrap(),
    );
    let (other, other_inputs) = fixture_model::<WuerstchenDiffNeXt>("decoder_b");
    let other = other.condition(&other_inputs["clip"]).unwrap();
    let err = decoder
        .forward_conditioned(input("x"), input("r"), input("effnet"), &other)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("conditioning for 8 attention blocks given to a decoder of 6"),
        "{err}"
    );
}

#[test]
fn vqgan_decode_matches_diffusers() {
    assert!(run_component(Component::VqganDecode) >= 2);
}

/// Loaded for inference, Stage A folds each MixingResidualBlock's six scalars (norm
/// scales and shifts, branch gains) into its depthwise conv and linear layers; built
/// as a training run builds it, it keeps them as weights. Both give diffusers' image.
#[test]
fn vqgan_folds_its_gammas_only_for_inference() {
    for case in ["vqgan_a_decode", "vqgan_b_decode"] {
        let fixture = Case::open(fixtures().join(case));
        let folded = fixture.run(Component::VqganDecode, DType::F32);
        let model = training_build::<PaellaVQModel>(case);
        let unfolded = model.decode(&fixture.inputs["latents"], false).unwrap();
        assert_parity(&format!("{case} unfolded"), &unfolded, &fixture.expected);
        assert_parity(&format!("{case} folded"), &folded, &fixture.expected);
    }
}

/// Stage A in tiles (with its margin of context) gives the whole decode's image: no
/// seams, equal far below one 8-bit level (1/255 of the [0, 1] range, 2/255 here).
#[test]
fn tiled_vqgan_decode_equals_the_whole_decode() {
    for case in ["vqgan_a_decode", "vqgan_b_decode"] {
        let dir = fixtures().join(case);
        let (model, _) = PaellaVQModel::load(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
        // ragged: tiles of 4 over 13 x 11 latents leave 1 x 3 at the edges
        let latents = wuerstchen::noise::SeededRng::new(3)
            .randn(&[1, 4, 13, 11], &Device::Cpu)
            .unwrap();
        let whole = model.decode(&latents, false).unwrap();
        let tiled = model.decode_tiled(&latents, false, 4).unwrap();
        assert_eq!(tiled.dims(), whole.dims());
        let d = (tiled - &whole)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!(
            "{case}: tiles of 4 latents, margin {}: max difference {d:e}",
            model.decode_margin()
        );
        assert!(d < 1e-5, "{case}: tiled decode differs by {d}");
    }
}

#[test]
fn vqgan_encode_matches_diffusers() {
    assert!(run_component(Component::VqganEncode) >= 2);
}

#[test]
fn text_encoder_matches_transformers() {
    assert!(run_component(Component::TextEncoder) >= 2);
}

/// Runs the fixtures of `kinds` with weights in `dtype` (on the CPU: 16-bit linear
/// layers, f32 elsewhere) against the reference's f32 output: every value within
/// `max` of the output's largest, the root-mean-square difference within `rms` of it.
/// The difference must also be nonzero: the 16-bit layers really ran.
fn within_tolerance_of_f32(dtype: DType, kinds: &[Component], max: f64, rms: f64) {
    let judge = |name: &str, got: &Tensor, expected: &Tensor| {
        let r = wuerstchen::parity::compare(got, expected).unwrap();
        let scale = r.max_abs_expected.max(1e-6);
        let (max_rel, rms_rel) = (r.max_abs_diff / scale, r.rms_diff / scale);
        println!(
            "{name:<24} {dtype:?}: max {max_rel:.2e}, rms {rms_rel:.2e} of the largest output"
        );
        assert!(max_rel < max && rms_rel < rms, "{name}: {r}");
        assert!(
            r.max_abs_diff > 0.0,
            "{name}: bit-equal to f32, so {dtype:?} did not run"
        );
    };
    for &kind in kinds {
        assert!(run_component_in(kind, dtype, judge) >= 2);
    }
}

const STAGES: [Component; 3] = [Component::Prior, Component::Decoder, Component::VqganDecode];

/// bf16 on the CPU: bf16 weights and inputs in the linear layers. The stated
/// tolerance: 0.5% max, 0.1% rms (bf16 keeps 8 significant bits, a relative rounding
/// of 2^-9 = 0.2% per operand; the sums stay f32, so errors average out: measured
/// 0.05-0.1% max, 0.01-0.02% rms on the stages' fixtures, 0.2-0.3% max, 0.04% rms on
/// the text encoders').
#[test]
fn bf16_linear_layers_stay_within_bf16_tolerance_of_diffusers_f32() {
    let kinds = [&STAGES[..], &[Component::TextEncoder]].concat();
    within_tolerance_of_f32(DType::BF16, &kinds, 5e-3, 1e-3);
}

/// f16 on the CPU: f16 weights in the linear layers, f32 inputs and arithmetic. The
/// stated tolerance: 0.05% max, 0.01% rms (f16 keeps 11 significant bits, 2^-12 =
/// 0.024% per weight, and only the weights are rounded: measured 0.004-0.01% max,
/// 0.001-0.002% rms on these fixtures).
#[test]
fn f16_linear_layers_stay_within_f16_tolerance_of_diffusers_f32() {
    // (not the text encoders: their fixtures' weights are stored in f16, so they
    // would run f32's arithmetic on the same values)
    within_tolerance_of_f32(DType::F16, &STAGES, 5e-4, 1e-4);
}

#[test]
fn vector_quantizer_picks_diffusers_codes() {
    for case in ["vqgan_a_decode", "vqgan_b_decode"] {
        let dir = fixtures().join(case);
        let q = load(&dir.join("quantize.safetensors"));
        let (model, _) = PaellaVQModel::load(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
        let idx = model.quantize_indices(&q["latents"]).unwrap();
        let got: Vec<u32> = idx.to_vec1().unwrap();
        let want: Vec<i64> = q["indices"].to_vec1().unwrap();
        let same = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| **a as i64 == **b)
            .count();
        println!("{case}: {same}/{} codebook indices equal", want.len());
        assert_eq!(same, want.len(), "{case}: indices differ");
        assert_parity(
            &format!("{case} quantized"),
            &model.quantize(&q["latents"]).unwrap(),
            &q["quantized"],
        );
    }
}

#[test]
fn bicubic_antialiased_resize_matches_torch() {
    let t = load(&fixtures().join("resize/resize.safetensors"));
    let mut checked = 0;
    for (key, expected) in &t {
        let Some((src, size)) = key.split_once('.') else {
            continue;
        };
        let (h, w) = size.split_once('x').unwrap();
        let got = resize_bicubic_aa(&t[src], h.parse().unwrap(), w.parse().unwrap()).unwrap();
        assert_parity(&format!("resize {src} -> {size}"), &got, expected);
        checked += 1;
    }
    assert!(checked >= 18);
    // the first batch item resized alone equals its slice of the batch
    let x = &t["x"];
    let one = resize_bicubic_aa(&x.i(0..1).unwrap(), 16, 16).unwrap();
    assert_parity("resize batch slice", &one, &t["x.16x16"].i(0..1).unwrap());
}
