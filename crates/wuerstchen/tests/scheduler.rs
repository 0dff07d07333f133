//! DDPMWuerstchenScheduler against diffusers' numbers.

mod common;

use candle_core::Tensor;
use common::{assert_parity, fixtures, load};
use wuerstchen::config::SchedulerConfig;
use wuerstchen::scheduler::{default_stage_c_timesteps, DdpmWuerstchenScheduler};

fn vec(t: &Tensor) -> Vec<f32> {
    t.to_vec1().unwrap()
}

#[test]
fn alpha_cumprod_matches_for_every_scaler() {
    let f = load(&fixtures().join("scheduler/scheduler.safetensors"));
    for (label, scaler) in [("s1", 1.0), ("s2", 2.0), ("s05", 0.5)] {
        let sched = DdpmWuerstchenScheduler::new(SchedulerConfig { scaler, s: 0.008 });
        let t = vec(&f[&format!("{label}.t")]);
        let want = vec(&f[&format!("{label}.alpha_cumprod")]);
        let mut worst = 0f32;
        for (ti, wi) in t.iter().zip(&want) {
            worst = worst.max((sched.alpha_cumprod(*ti) - wi).abs());
        }
        println!(
            "alpha_cumprod scaler {scaler}: max|diff| {worst:.3e} over {} points",
            t.len()
        );
        assert!(worst <= 1e-6, "scaler {scaler}: {worst}");
    }
}

#[test]
fn both_timestep_schedules_match() {
    let f = load(&fixtures().join("scheduler/scheduler.safetensors"));
    let default = default_stage_c_timesteps();
    assert_eq!(default.len(), 30, "29 model calls + the final 0");
    assert_eq!(
        default,
        vec(&f["default.timesteps"]),
        "default Stage C schedule"
    );
    let mut s = DdpmWuerstchenScheduler::new(SchedulerConfig::default());
    s.set_steps(7);
    assert_eq!(
        s.timesteps(),
        vec(&f["linear.timesteps"]).as_slice(),
        "linear schedule"
    );
}

#[test]
fn step_with_recorded_noise_matches_diffusers() {
    let f = load(&fixtures().join("scheduler/scheduler.safetensors"));
    for label in ["default", "linear"] {
        let mut sched = DdpmWuerstchenScheduler::new(SchedulerConfig::default());
        let ts = vec(&f[&format!("{label}.timesteps")]);
        sched.set_timesteps(ts.clone());
        let mut x = f[&format!("{label}.x0")].clone();
        for (i, &t) in ts[..ts.len() - 1].iter().enumerate() {
            let eps = &f[&format!("{label}.eps.{i}")];
            let noise = &f[&format!("{label}.noise.{i}")];
            x = sched.step(eps, t, &x, noise).unwrap();
            // compare every step, not only the end, so an error cannot cancel out
            let report =
                wuerstchen::parity::compare(&x, &f[&format!("{label}.x.{}", i + 1)]).unwrap();
            assert!(report.passes(), "{label} step {i} (t = {t}): {report}");
        }
        assert_parity(
            &format!("{label} schedule, final sample"),
            &x,
            &f[&format!("{label}.x.{}", ts.len() - 1)],
        );
    }
}

#[test]
fn add_noise_matches() {
    let f = load(&fixtures().join("scheduler/scheduler.safetensors"));
    let sched = DdpmWuerstchenScheduler::new(SchedulerConfig::default());
    let got = sched
        .add_noise(
            &f["add_noise.x0"],
            &f["add_noise.noise"],
            &vec(&f["add_noise.t"]),
        )
        .unwrap();
    assert_parity("add_noise", &got, &f["add_noise.out"]);
    assert!(sched
        .add_noise(&f["add_noise.x0"], &f["add_noise.noise"], &[0.5])
        .is_err());
}

#[test]
fn stepping_past_the_last_timestep_is_an_error() {
    let mut s = DdpmWuerstchenScheduler::new(SchedulerConfig::default());
    s.set_steps(2);
    let x = Tensor::zeros((1, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(s.step(&x, 0.0, &x, &x).is_err());
}
