//! Running out of device memory, on the CUDA backend over the emulated device: an allocation that
//! the pool's cached memory blocks is tried again after the cache is given back, an op that
//! finds no room is reported and then forgotten on recovery (other failures are not), and an
//! update whose passes find no room runs them again at half the micro-batch, giving the step
//! that micro-batch gives, and a training run and SFT go on at the halved micro-batch.

mod emulation_support;

use std::path::Path;
use std::sync::Arc;

use emulation_support::emulated_device::EmulatedDevice;
use emulation_support::{demo_inputs, without_timings};
use thinkshort::backend::{out_of_device_memory, Backend};
use thinkshort::config::ModelConfig;
use thinkshort::cuda::CudaBackend;
use thinkshort::grpo::{AdvantageOptions, LossOptions};
use thinkshort::model::Model;
use thinkshort::optim::AdamW;
use thinkshort::sft::{train_sft, SftExample, SftOptions};
use thinkshort::train::halving::halving_on_out_of_memory;
use thinkshort::train::optimizer::DeviceOptimizer;
use thinkshort::train::update::{policy_update, UpdateBatch, UpdateOptions, UpdateResult};
use thinkshort::train::{train_on, RunControl};

const MULTIPROCESSORS: usize = 4;

fn backend_on(device: &Arc<EmulatedDevice>) -> CudaBackend {
    CudaBackend::with_device(device.clone(), "CPU emulator".to_string()).unwrap()
}

/// A buffer freed into the pool's cache takes room that a buffer of another size cannot use;
/// the backend gives the cache back and allocates again, where the first try failed.
#[test]
fn an_allocation_the_cached_memory_blocks_succeeds_once_the_cache_is_given_back() {
    let device =
        Arc::new(EmulatedDevice::with_memory(MULTIPROCESSORS, 4 << 20).keeping_freed_memory());
    let b = backend_on(&device);
    let first = b.empty(1_300_000).unwrap(); // 2.6 MB of bf16
    drop(first);
    let (free, _) = b.memory_info().unwrap();
    assert!(
        free < 2_000_000,
        "the cache should take the freed buffer's room: {free} bytes free"
    );
    let second = b.empty_f32(500_000); // 2.0 MB: more than the cache leaves
    assert!(
        second.is_ok(),
        "{:#}",
        second.err().map_or(String::new(), |e| format!("{e:#}"))
    );
    // No cache to give back: the error says the device has no room.
    let too_big = b
        .empty_f32(1 << 20)
        .err()
        .expect("4 MiB more on a device of 4 MiB");
    assert_eq!(
        out_of_device_memory(&too_big).map(|e| e.bytes),
        Some(4 << 20),
        "{too_big:#}"
    );
}

/// An op whose own allocation (here the device copy of `gather_rows`' row indices) finds no
/// room is reported by `synchronize` as out of device memory and skips the ops after it until
/// the backend recovers (a job started meanwhile fails without a retry: what it would read was
/// never made); then the same op runs and gives the right rows. A failure of another kind is
/// not forgotten.
#[test]
fn an_op_that_runs_out_of_memory_is_reported_then_forgotten_on_recovery() {
    let device = Arc::new(EmulatedDevice::with_memory(MULTIPROCESSORS, 1 << 20));
    let b = backend_on(&device);
    let (rows, dim) = (16, 8);
    let host: Vec<f32> = (0..rows * dim).map(|i| i as f32).collect(); // exact in bf16
    let x = b.upload(&host).unwrap();
    let mut out = b.empty(3 * dim).unwrap();
    let (free, _) = b.memory_info().unwrap();
    let filler = b.empty(free / 2).unwrap(); // every byte left
    b.gather_rows(b.full_mut(&mut out), b.full(&x), &[5, 0, 15], dim);
    let err = b.synchronize().err().expect("the row indices found room");
    assert!(out_of_device_memory(&err).is_some(), "{err:#}");
    assert!(
        format!("{err:#}").contains(
            "CUDA gather_rows: copying indices to the GPU: out of memory on the device (12 bytes asked for)"
        ),
        "{err:#}"
    );
    // Skipped until recovered: the error stays, and the fill never ran (new memory holds NaN).
    b.fill_zero(b.full_mut(&mut out));
    assert!(b.synchronize().is_err());
    // A job that would read what these ops left is not retried: the failure is before it.
    let mut tries = 0;
    let job = halving_on_out_of_memory(&b, "the test", 0, 3, true, |_| {
        tries += 1;
        Ok(())
    });
    let before = job.err().expect("a job ran after a failed op");
    assert!(
        out_of_device_memory(&before).is_some() && tries == 0,
        "{before:#}"
    );

    drop(filler);
    b.recover_from_out_of_memory().unwrap();
    let skipped = b.download(b.full(&out)).unwrap();
    assert!(skipped.iter().all(|v| v.is_nan()), "{skipped:?}");
    b.gather_rows(b.full_mut(&mut out), b.full(&x), &[5, 0, 15], dim);
    let got = b.download(b.full(&out)).unwrap();
    let want: Vec<f32> = [5, 0, 15]
        .iter()
        .flat_map(|&r| host[r * dim..(r + 1) * dim].to_vec())
        .collect();
    assert_eq!(got, want);

    b.gather_rows(b.full_mut(&mut out), b.full(&x), &[5, 0, 16], dim);
    let kept = b
        .recover_from_out_of_memory()
        .err()
        .expect("a bad row was forgotten");
    assert!(
        format!("{kept:#}").contains("row 16 out of range"),
        "{kept:#}"
    );
    assert!(b.synchronize().is_err());
}

const CONFIG: &str = r#"{"model_type":"qwen2","vocab_size":256,"hidden_size":128,
    "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
    "num_key_value_heads":2,"tie_word_embeddings":true}"#;

/// One update of 8 completions (two groups of 4: four short completions, then four long ones) of
/// a fresh tiny model on `device`, `micro_batch` completions per pass; its result, the weights
/// after it and the peak of live device bytes.
fn update_on(
    device: &Arc<EmulatedDevice>,
    micro_batch: usize,
    halve: bool,
) -> anyhow::Result<(UpdateResult, Vec<f32>, usize)> {
    let cfg = ModelConfig::from_json_str(CONFIG).unwrap();
    let master = Model::random(cfg.clone(), 9, thinkshort::backend::cpu::CpuBackend)?.params;
    let mut model = Model::from_host(cfg, &master, backend_on(device))?;
    let mut opt = DeviceOptimizer::new(
        &model.backend,
        &AdamW::new(master.len(), 0.9, 0.999, 1e-8, 0.0),
        &master,
    )?;
    let owned: Vec<(Vec<u32>, Vec<u32>)> = (0..8u32)
        .map(|i| {
            let ids = |n: u32, k: u32| (0..n).map(|j| (j * 37 + k) % 256).collect();
            let completion = if i < 4 { 4 + i } else { 56 + i };
            (ids(12 + i % 3, i), ids(completion, 5 * i + 1))
        })
        .collect();
    let seqs: Vec<(&[u32], &[u32])> = owned.iter().map(|(p, c)| (&p[..], &c[..])).collect();
    let rewards = [1.0, 0.0, 0.5, 0.25, 0.0, 1.0, 1.0, 0.75];
    let loss = LossOptions {
        beta: 0.0,
        ..LossOptions::default()
    };
    let u = UpdateBatch {
        seqs: &seqs,
        rewards: &rewards,
        group_size: 4,
        truncated: &[false; 8],
        keep: None,
        ref_logp: None,
        old_logp: None,
    };
    let o = UpdateOptions {
        loss: &loss,
        advantage: &AdvantageOptions::default(),
        epochs: 2,
        temperature: 1.0,
        lr: 1e-3,
        grad_clip: 1.0,
        micro_batch,
        halve_on_out_of_memory: halve,
    };
    device.reset_peak();
    let result = policy_update(&mut model, &mut opt, &u, &o)?;
    let peak = device.peak_bytes();
    let weights = opt.master_weights(&model.backend)?;
    Ok((result, weights, peak))
}

/// On a device with room for passes of `smaller` completions but not of `larger` (0: all 8), the
/// update that may halve its micro-batch runs its passes again at `smaller` and gives, bit for
/// bit, the update run at `smaller` from the start (two epochs: the first epoch's log-probs are
/// the second's logπold); one that may not fails, saying the device ran out of memory.
#[test]
fn an_update_that_runs_out_of_memory_halves_its_micro_batch() {
    let roomy = Arc::new(EmulatedDevice::new(MULTIPROCESSORS));
    // 8 → 4: the only pass fails; 4 → 2: the short completions' pass runs, the long ones' fails
    for (larger, smaller) in [(0, 4), (4, 2)] {
        let (_, _, peak_larger) = update_on(&roomy, larger, false).unwrap();
        let (want, want_weights, peak_smaller) = update_on(&roomy, smaller, false).unwrap();
        assert!(
            peak_smaller < peak_larger,
            "{peak_smaller} vs {peak_larger} bytes"
        );
        let tight = Arc::new(EmulatedDevice::with_memory(
            MULTIPROCESSORS,
            (peak_smaller + peak_larger) / 2,
        ));

        let err = update_on(&tight, larger, false)
            .err()
            .expect("the larger passes fitted");
        assert!(out_of_device_memory(&err).is_some(), "{err:#}");

        let (halved, weights, _) = update_on(&tight, larger, true).unwrap();
        assert_eq!((halved.micro_batch, want.micro_batch), (smaller, smaller));
        assert_eq!(halved.loss.to_bits(), want.loss.to_bits());
        assert_eq!(halved.grad_norm.to_bits(), want.grad_norm.to_bits());
        assert_eq!(halved.first_logp, want.first_logp);
        assert!(weights == want_weights, "the weights differ");
    }
}

/// A short demo run (2 steps of 2 prompts × 4 samples, KL coefficient `beta`) on `device`,
/// `micro_batch` sequences per pass (0: chosen from the free memory) into `out`; the device's
/// peak of live bytes.
fn demo_run_on(device: &Arc<EmulatedDevice>, beta: &str, micro_batch: usize, out: &Path) -> usize {
    let mut cfg = thinkshort::commands::train::demo_config();
    let micro = micro_batch.to_string();
    let settings = [
        ("steps", "2"),
        ("prompts_per_step", "2"),
        ("group_size", "4"),
        ("micro_batch", micro.as_str()),
        ("eval_every", "0"),
        ("loss.beta", beta),
    ];
    cfg.set_all(&settings).unwrap();
    let control = RunControl {
        out,
        resume: None,
        stop_after: None,
        dry_run: false,
        interrupt: None,
    };
    device.reset_peak();
    train_on(backend_on(device), &cfg, &demo_inputs(), &control)
        .unwrap_or_else(|e| panic!("training on the emulated device: {e:#}"));
    device.peak_bytes()
}

/// A device that reports more free memory than it has (as the pool's fragmentation makes the
/// estimate too low): `train` chooses passes of all 8 sequences, a pass runs out of memory (the
/// reference log-probs' with β > 0, the update's with β = 0), the passes run again at 4, and the
/// run goes on at 4 (no later pass tries 8 again). Every step's metrics say 4, config.toml keeps
/// the 8 chosen, and the run is, bit for bit, the run with micro_batch = 4 from the start.
///
/// The two runs at 4 also show that β = 0 keeps no reference model (METHOD.md §5): their peaks
/// differ by at least the reference's bf16 copy of the weights.
#[test]
fn a_training_run_that_runs_out_of_memory_goes_on_at_half_the_micro_batch() {
    let with_reference = halving_run("0.1");
    let without = halving_run("0");
    let demo = ModelConfig::from_model_dir(Path::new(thinkshort::commands::train::DEMO_MODEL));
    let weights = 2 * thinkshort::params::ParamLayout::new(&demo.unwrap()).total_len();
    assert!(
        with_reference >= without + weights,
        "peaks {with_reference} (β = 0.1) and {without} (β = 0) bytes, weights {weights}"
    );
}

/// The halving run at `beta`; returns the device's peak of the run at micro-batch 4.
fn halving_run(beta: &str) -> usize {
    let dirs = tempfile::tempdir().unwrap();
    let run_dir = |name: &str| dirs.path().join(name);
    let roomy = Arc::new(EmulatedDevice::new(MULTIPROCESSORS));
    let peak_of_four = demo_run_on(&roomy, beta, 4, &run_dir("four"));
    let peak_of_eight = demo_run_on(&roomy, beta, 8, &run_dir("eight"));
    assert!(
        peak_of_four < peak_of_eight,
        "β = {beta}: {peak_of_four} vs {peak_of_eight} bytes"
    );
    let tight = Arc::new(
        EmulatedDevice::with_memory(MULTIPROCESSORS, (peak_of_four + peak_of_eight) / 2)
            .overstating_free_memory(1 << 30),
    );
    demo_run_on(&tight, beta, 0, &run_dir("halved"));
    // one allocation refused, then again after the cache was given back: no later pass tries 8
    assert_eq!(tight.refusals(), 2, "β = {beta}");

    let read = |name: &str, file: &str| std::fs::read(run_dir(name).join(file)).unwrap();
    let config = String::from_utf8(read("halved", "config.toml")).unwrap();
    assert!(config.contains("micro_batch = 8"), "{config}");
    let metrics = |name: &str| {
        let text = String::from_utf8(read(name, "metrics.jsonl")).unwrap();
        text.lines().map(without_timings).collect::<Vec<_>>()
    };
    let (halved, four) = (metrics("halved"), metrics("four"));
    assert_eq!(halved.len(), 2);
    assert!(halved.iter().all(|m| m["micro_batch"] == 4), "{halved:?}");
    assert_eq!(halved, four);
    let weights = |name: &str| read(name, "step-000002/model.safetensors");
    assert!(
        weights("halved") == weights("four"),
        "the trained weights differ"
    );
    peak_of_four
}

/// Three SFT steps of batches of 6 on a fresh tiny model on `device`, `micro_batch` examples per
/// pass (0: the whole batch): each step's loss, the trained weights and the device's peak.
fn sft_on(device: &Arc<EmulatedDevice>, micro_batch: usize) -> (Vec<f64>, Vec<f32>, usize) {
    let cfg = ModelConfig::from_json_str(CONFIG).unwrap();
    let master = Model::random(cfg.clone(), 4, thinkshort::backend::cpu::CpuBackend)
        .unwrap()
        .params;
    let mut model = Model::from_host(cfg, &master, backend_on(device)).unwrap();
    let data: Vec<SftExample> = (0..9u32)
        .map(|i| SftExample {
            prompt: (0..4 + i % 5).map(|j| (i * 11 + j) % 256).collect(),
            completion: (0..20 + 3 * i).map(|j| (i * 5 + j * 7 + 2) % 256).collect(),
        })
        .collect();
    let opts = SftOptions {
        steps: 3,
        batch_size: 6,
        micro_batch,
        lr: 1e-2,
        warmup_steps: 0,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: 2,
    };
    device.reset_peak();
    let mut losses = Vec::new();
    let trained = train_sft(&mut model, master, &data, &opts, |s| losses.push(s.loss))
        .unwrap_or_else(|e| panic!("SFT on the emulated device: {e:#}"));
    (losses, trained, device.peak_bytes())
}

/// SFT whose passes of the whole batch of 6 do not fit goes on at 3, for good (two refused
/// allocations in three steps), and trains as SFT at 3 from the start, bit for bit.
#[test]
fn sft_that_runs_out_of_memory_goes_on_at_half_the_micro_batch() {
    let roomy = Arc::new(EmulatedDevice::new(MULTIPROCESSORS));
    let (_, _, peak_of_six) = sft_on(&roomy, 0);
    let (losses_at_three, weights_at_three, peak_of_three) = sft_on(&roomy, 3);
    assert!(
        peak_of_three < peak_of_six,
        "{peak_of_three} vs {peak_of_six} bytes"
    );
    let tight = Arc::new(EmulatedDevice::with_memory(
        MULTIPROCESSORS,
        (peak_of_three + peak_of_six) / 2,
    ));
    let (losses, weights, _) = sft_on(&tight, 0);
    assert_eq!(tight.refusals(), 2);
    assert_eq!(losses, losses_at_three);
    assert!(weights == weights_at_three, "the trained weights differ");
}

/// A job whose own op runs out of memory (an allocation inside `gather_rows`, kept until the
/// next wait) but which returns without waiting is halved too: the job counts as done only once
/// the device has run its ops.
#[test]
fn a_job_whose_op_runs_out_of_memory_without_waiting_is_halved() {
    let device = Arc::new(EmulatedDevice::with_memory(MULTIPROCESSORS, 1 << 20));
    let b = backend_on(&device);
    let dim = 8;
    let x = b
        .upload(&(0..16 * dim).map(|i| i as f32).collect::<Vec<_>>())
        .unwrap();
    let mut out = b.empty(3 * dim).unwrap();
    let mut sizes = Vec::new();
    let (done, ran_with) = halving_on_out_of_memory(&b, "the test", 4, 4, true, |size| {
        sizes.push(size);
        // at 4 per pass the device is full when the op uploads its row indices
        let (free, _) = b.memory_info()?;
        let filler = if size == 4 {
            Some(b.empty(free / 2)?)
        } else {
            None
        };
        b.gather_rows(b.full_mut(&mut out), b.full(&x), &[5, 0, 15], dim);
        drop(filler);
        Ok(size)
    })
    .unwrap();
    assert_eq!((done, ran_with, sizes), (2, 2, vec![4, 2]));
    assert_eq!(
        b.download(b.full(&out)).unwrap()[..dim],
        (40..48).map(|v| v as f32).collect::<Vec<_>>()[..]
    );
}
