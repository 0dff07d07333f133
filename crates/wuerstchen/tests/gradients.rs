//! Every block's backward pass against central finite differences, in f64.
//!
//! candle 0.11's fused softmax / layer norm have no backward; our blocks are built
//! from differentiable ops, and these checks prove the gradients are real.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use wuerstchen::blocks::{AttnBlock, GlobalResponseNorm, ResBlock, TimestepBlock};
use wuerstchen::noise::SeededRng;
use wuerstchen::stage_a::MixingResidualBlock;
use wuerstchen::stage_b::ResBlockStageB;

fn randn(rng: &mut SeededRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Builds a block on a fresh VarMap in f64, redraws every weight (so no zero-initialised
/// layer hides a path), and checks d(sum(f * w))/d(param) and d/d(input) at a few
/// entries against finite differences.
fn check<M>(
    label: &str,
    input_shape: &[usize],
    build: impl Fn(VarBuilder) -> M,
    f: impl Fn(&M, &Tensor) -> Tensor,
) {
    let mut rng = SeededRng::new(label.len() as u64);
    let varmap = VarMap::new();
    let model = build(VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu));
    for var in varmap.all_vars() {
        var.set(&(randn(&mut rng, var.dims()) * 0.5).unwrap())
            .unwrap();
    }
    let x = Var::from_tensor(&randn(&mut rng, input_shape)).unwrap();
    let out_shape = f(&model, x.as_tensor()).dims().to_vec();
    let w = randn(&mut rng, &out_shape);
    let loss = |m: &M, x: &Tensor| f(m, x).mul(&w).unwrap().sum_all().unwrap();
    let grads = loss(&model, x.as_tensor()).backward().unwrap();

    let mut targets: Vec<(String, Var)> = vec![("input".into(), x.clone())];
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    targets.extend(names.into_iter().map(|n| (n.clone(), data[n].clone())));
    drop(data);

    let h = 1e-6;
    let mut worst = 0f64;
    for (name, var) in &targets {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{label}: no gradient reaches `{name}`"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // a few entries per tensor: first, last, one in the middle
        for &i in &[0, base.len() / 2, base.len() - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = loss(&model, x.as_tensor()).to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                l
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (numeric - g[i]).abs() / numeric.abs().max(g[i].abs()).max(1.0);
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "{label}: d/d {name}[{i}] analytic {} numeric {numeric}",
                g[i]
            );
        }
    }
    println!(
        "{label:<24} {} tensors, worst relative error {worst:.2e}",
        targets.len()
    );
}

#[test]
fn shared_blocks_have_true_gradients() {
    check(
        "GlobalResponseNorm",
        &[2, 6, 2, 3],
        |vb| GlobalResponseNorm::new(6, vb).unwrap(),
        |m, x| m.forward(x).unwrap(),
    );
    check(
        "ResBlock",
        &[2, 4, 3, 5],
        |vb| ResBlock::new(4, 0, 3, vb).unwrap(),
        |m, x| m.forward(x, None).unwrap(),
    );
    let r = Tensor::new(
        &[[0.3f64, -0.2, 0.1, 0.7], [0.5, 0.1, -0.4, 0.2]],
        &Device::Cpu,
    )
    .unwrap();
    check(
        "TimestepBlock",
        &[2, 3, 2, 2],
        |vb| TimestepBlock::new(3, 4, vb).unwrap(),
        |m, x| m.forward(x, &r).unwrap(),
    );
    let cond = Tensor::new(&[[[0.3f64, -0.2, 0.1], [0.5, 0.1, -0.4]]; 2], &Device::Cpu).unwrap();
    check(
        "AttnBlock",
        &[2, 4, 2, 3],
        |vb| AttnBlock::new(4, 3, 2, true, vb).unwrap(),
        |m, x| m.forward(x, &cond).unwrap(),
    );
}

#[test]
fn stage_blocks_have_true_gradients() {
    let skip = Tensor::new(
        &[[[[0.3f64, -0.2], [0.1, 0.4]], [[0.5, 0.1], [-0.4, 0.2]]]; 2],
        &Device::Cpu,
    )
    .unwrap();
    check(
        "ResBlockStageB",
        &[2, 3, 2, 2],
        |vb| ResBlockStageB::new(3, 2, 3, vb).unwrap(),
        |m, x| m.forward(x, Some(&skip)).unwrap(),
    );
    check(
        "MixingResidualBlock",
        &[2, 3, 4, 3],
        |vb| MixingResidualBlock::new(3, 5, vb).unwrap(),
        |m, x| m.forward(x).unwrap(),
    );
}
