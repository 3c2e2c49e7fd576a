//! `train`'s memory estimate (src/train/memory.rs), which sizes the update's micro-batches,
//! held against what the update really allocates: a counting global allocator records the peak
//! of live heap bytes while `policy_update` runs on the CPU backend (whose buffers are the
//! model code's buffers, f32), over what was live before it (weights, optimizer state).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use thinkshort::backend::cpu::CpuBackend;
use thinkshort::backend::Backend;
use thinkshort::config::ModelConfig;
use thinkshort::grpo::{AdvantageOptions, LossOptions};
use thinkshort::model::Model;
use thinkshort::optim::AdamW;
use thinkshort::train::memory::{RunShape, TrainMemory};
use thinkshort::train::optimizer::DeviceOptimizer;
use thinkshort::train::update::{policy_update, UpdateBatch, UpdateOptions};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests of this file measure one process-wide counter: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak live bytes of one update of `sequences` sequences of `prompt` + `completion` tokens,
/// `micro_batch` per pass, above the bytes live before it, and the estimate of a pass.
fn measure(
    config: &str,
    checkpoint_layers: bool,
    sequences: usize,
    prompt: usize,
    completion: usize,
    micro_batch: usize,
) -> (usize, usize) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = ModelConfig::from_json_str(config).unwrap();
    let mut model = Model::random(cfg.clone(), 5, CpuBackend).unwrap();
    // A few rows per head chunk, as 1 GiB is of Qwen2.5's vocabulary.
    model.head_chunk_bytes = 64 * 4 * cfg.vocab_size;
    model.checkpoint_layers = checkpoint_layers;
    let host = model
        .backend
        .download(model.backend.full(&model.params))
        .unwrap();
    let mut opt = DeviceOptimizer::new(
        &model.backend,
        &AdamW::new(host.len(), 0.9, 0.999, 1e-8, 0.0),
        &host,
    )
    .unwrap();
    drop(host);
    let owned: Vec<(Vec<u32>, Vec<u32>)> = (0..sequences as u32)
        .map(|i| {
            let ids = |n: usize, k: u32| (0..n as u32).map(|j| (j * 31 + k) % 2048).collect();
            (ids(prompt, i), ids(completion, 7 * i + 1))
        })
        .collect();
    let seqs: Vec<(&[u32], &[u32])> = owned.iter().map(|(p, c)| (&p[..], &c[..])).collect();
    let rewards: Vec<f64> = (0..sequences).map(|i| (i % 3) as f64).collect();
    let truncated = vec![false; sequences];
    let loss = LossOptions {
        beta: 0.0,
        ..LossOptions::default()
    };
    let u = UpdateBatch {
        seqs: &seqs,
        rewards: &rewards,
        group_size: 4,
        truncated: &truncated,
        keep: None,
        ref_logp: None,
        old_logp: None,
    };
    let o = UpdateOptions {
        loss: &loss,
        advantage: &AdvantageOptions::default(),
        epochs: 1,
        temperature: 1.0,
        lr: 1e-5,
        grad_clip: 1.0,
        micro_batch,
    };
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = policy_update(&mut model, &mut opt, &u, &o).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(!result.skipped);
    let estimate = TrainMemory::estimate(
        &cfg,
        model.backend.storage_bytes(),
        model.head_chunk_bytes,
        &RunShape {
            sequences,
            micro_batch,
            prompt_len: prompt,
            cap: completion,
            checkpoint_layers,
            ..RunShape::default()
        },
    );
    (peak, estimate.update)
}

const QWEN2: &str = r#"{"model_type":"qwen2","vocab_size":2048,"hidden_size":128,
    "intermediate_size":384,"num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,
    "tie_word_embeddings":true}"#;

/// Qwen3's per-head q/k norms keep q and k before them; heads wider than hidden / heads.
const QWEN3: &str = r#"{"model_type":"qwen3","vocab_size":2048,"hidden_size":128,
    "intermediate_size":384,"num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,
    "head_dim":64,"tie_word_embeddings":true}"#;

/// The update's real peak on the CPU stays within 10 % of the estimate (the room the automatic
/// micro-batch choice keeps free) for one pass and for micro-batches, with the head in chunks,
/// with and without activation checkpointing. The measured ratios were 0.98 to 1.02 when this
/// test was written.
#[test]
fn update_peak_allocation_is_within_a_tenth_of_the_estimate() {
    for (config, checkpoint, sequences, prompt, completion, micro_batch) in [
        (QWEN2, false, 16, 32, 96, 0),
        (QWEN2, false, 16, 32, 96, 4),
        (QWEN2, false, 8, 64, 192, 3),
        (QWEN2, false, 32, 16, 48, 0),
        (QWEN3, false, 16, 32, 96, 0),
        (QWEN3, false, 8, 64, 192, 3),
        (QWEN2, true, 16, 32, 96, 0),
        (QWEN2, true, 8, 64, 192, 3),
        (QWEN3, true, 16, 32, 96, 0),
    ] {
        let (peak, estimate) = measure(
            config,
            checkpoint,
            sequences,
            prompt,
            completion,
            micro_batch,
        );
        let ratio = peak as f64 / estimate as f64;
        assert!(
            (0.9..=1.1).contains(&ratio),
            "{sequences} sequences of {prompt} + {completion} tokens, micro-batch {micro_batch}, \
             checkpointing {checkpoint}: \
             peak {peak} bytes, estimate {estimate} (ratio {ratio:.3})"
        );
    }
}
