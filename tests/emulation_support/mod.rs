//! Shared by the tests/emulated_*.rs files (kernels run on the CPU by tests/cuda_emulator):
//! the [`Emulator`] that runs thinkshort's launchers, random bf16 inputs, bf16 conversions, the
//! relative-error check `selfcheck` uses, and the demo task's training inputs.
#![allow(dead_code)] // each test file uses its own subset

pub mod emulated_device;
pub mod null_device;

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::anyhow;
use cuda_emulator::{launch_kernel, Arg, Launch};
use cudarc::driver::LaunchConfig;
use half::bf16;
use thinkshort::cuda::launch::{KernelArg, KernelLaunch, Launcher};
use thinkshort::generate::GenerateConfig;
use thinkshort::prompt::PromptTemplate;
use thinkshort::sampling::SamplingParams;
use thinkshort::train::{Example, TrainInputs};

/// Runs the launchers of `thinkshort::cuda::ops` on the CPU: their launches go to the emulator
/// (which checks the arguments against the kernel's parameters) and a device pointer is the
/// address of a host buffer (`ptr` / `ptr_mut`).
pub struct Emulator;

impl Launcher for Emulator {
    unsafe fn launch(&self, l: &KernelLaunch) -> anyhow::Result<()> {
        let args: Vec<Arg> = l
            .args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr(p) => Arg::Pointer(p),
                KernelArg::I32(v) => Arg::Int32(v),
                KernelArg::I64(v) => Arg::Int64(v),
                KernelArg::U64(v) => Arg::Int64(v as i64),
                KernelArg::F32(v) => Arg::Float32(v),
                KernelArg::F64(v) => Arg::Float64(v),
            })
            .collect();
        let c = &l.config;
        let cfg = Launch {
            grid: c.grid_dim,
            block: c.block_dim,
            shared_bytes: c.shared_mem_bytes as usize,
        };
        // SAFETY: the launcher's contract: the pointers are host buffers of the sizes the kernel
        // touches.
        unsafe { launch_kernel(l.module, l.function, cfg, &args) }
            .map_err(|e| anyhow!("{} (kernels/{}.cu): {e}", l.function, l.module))
    }

    unsafe fn fill_zero(&self, ptr: u64, bytes: usize) -> anyhow::Result<()> {
        // SAFETY: the caller's contract: ptr is a host buffer of at least `bytes` bytes.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(())
    }
}

/// Runs launches on the [`Emulator`] and keeps them, so a test can see which kernels its launcher
/// picked and on what grid (the kernels choose their vector paths themselves and stay correct on
/// any grid, so a launcher that sizes the grid for the wrong path shows only here).
#[derive(Default)]
pub struct Recorder(RefCell<Vec<KernelLaunch>>);

impl Launcher for Recorder {
    unsafe fn launch(&self, l: &KernelLaunch) -> anyhow::Result<()> {
        self.0.borrow_mut().push(l.clone());
        // SAFETY: the caller's contract, passed on.
        unsafe { Emulator.launch(l) }
    }

    unsafe fn fill_zero(&self, ptr: u64, bytes: usize) -> anyhow::Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { Emulator.fill_zero(ptr, bytes) }
    }
}

/// Runs `op` (a launcher called with host buffers) on the emulator; returns its launches.
pub fn run_recorded(op: impl FnOnce(&dyn Launcher) -> anyhow::Result<()>) -> Vec<KernelLaunch> {
    let r = Recorder::default();
    op(&r).unwrap_or_else(|e| panic!("{e:#}"));
    r.0.into_inner()
}

/// `launches` ran `kernels` in order, the first on `cfg`: the grid of the path the test means to
/// take (vector or scalar, which kernel variant).
pub fn assert_launches(launches: &[KernelLaunch], kernels: &[&str], cfg: LaunchConfig) {
    let names: Vec<&str> = launches.iter().map(|l| l.function).collect();
    assert_eq!(names, kernels, "the kernels launched");
    let geometry = |c: &LaunchConfig| (c.grid_dim, c.block_dim, c.shared_mem_bytes);
    assert_eq!(
        geometry(&launches[0].config),
        geometry(&cfg),
        "{}: grid, block and shared memory",
        kernels[0]
    );
}

/// A host buffer as the device pointer the launchers take.
pub fn ptr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}
pub fn ptr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

/// Relative-error tolerance for bf16 results, as in `selfcheck`.
pub const TOL: f64 = 1e-2;

pub struct Rand(pub u64);

impl Rand {
    /// Uniform in [-1, 1) (splitmix64).
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// n bf16 values of scale `scale`: (bits for the kernel, the same values in f32).
    pub fn bf16s(&mut self, n: usize, scale: f32) -> (Vec<u16>, Vec<f32>) {
        let v: Vec<bf16> = (0..n)
            .map(|_| bf16::from_f32(self.next() * scale))
            .collect();
        (
            v.iter().map(|x| x.to_bits()).collect(),
            v.iter().map(|x| x.to_f32()).collect(),
        )
    }
}

pub fn to_f32(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

pub fn to_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// ‖a − b‖ / ‖b‖; NaN anywhere gives infinity.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    assert!(
        e < TOL,
        "{what}: relative error {e:.3e} (tolerance {TOL:.0e})"
    );
}

/// Fails naming the first element where `got` and `want` differ (without printing both vectors).
pub fn assert_same<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: element {i} is {:?}, not {:?}", got[i], want[i]);
    }
}

/// Sampling at temperature 1 with no EOS or stop strings, seed 0: every sample runs to its cap.
pub fn sampling_to_the_cap() -> GenerateConfig {
    GenerateConfig {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: 0,
        first_stream: 0,
        eos_ids: Vec::new(),
        stop_strings: Vec::new(),
        sync_every: None,
        keep_ended_rows: None,
    }
}

/// Problems of the demo task, as `thinkshort train` makes them.
pub fn demo_examples(seed: u64, count: u64) -> Vec<Example> {
    thinkshort::demo::task::problems(seed, count)
        .into_iter()
        .map(|p| Example {
            gold: p.gold(),
            question: p.question,
        })
        .collect()
}

/// Every metric except the timings.
pub fn without_timings(line: &str) -> serde_json::Value {
    let mut m: serde_json::Value = serde_json::from_str(line).unwrap();
    for k in ["tokens_per_s", "step_s", "rollout_s", "update_s"] {
        m.as_object_mut().unwrap().remove(k);
    }
    m
}

/// The demo model and task (100 training problems, 4 held out).
pub fn demo_inputs() -> TrainInputs {
    TrainInputs {
        model_dir: PathBuf::from(thinkshort::commands::train::DEMO_MODEL),
        template: PromptTemplate::plain(thinkshort::demo::task::PROMPT_TEMPLATE).unwrap(),
        train: demo_examples(2, 100),
        eval: demo_examples(3, 4),
        is_correct: thinkshort::train::answer_is_correct,
    }
}
