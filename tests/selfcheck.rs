//! The selfcheck on test devices built over the CPU backend (a bf16-storage simulation, and one
//! with a faulty op), the random model's numerics, and the `selfcheck` / `bench forward` CLI.

use std::ops::Range;
use std::process::Command;
use thinkshort::backend::cpu::{self, CpuBackend};
use thinkshort::backend::{
    Backend, GradWrite, HeadNorms, PolicyTokens, TokenPlacement, TrainBackend,
};
use thinkshort::config::ModelConfig;
use thinkshort::grpo::{AdvantageOptions, LossOptions};
use thinkshort::model::Model;
use thinkshort::rng::Philox;
use thinkshort::sampling::{SamplingParams, TokenDraws};
use thinkshort::selfcheck::{self, Coverage, Report};

/// The CPU backend behind the `Backend` interface of a device: with `bf16`, every buffer not made
/// by `zeros_f32`/`upload_f32` stores bf16 (values rounded on upload and after every op, as a
/// bf16 GPU backend does), and the attention backward also rounds its intermediate operands as
/// the fused CUDA kernel does; with `faulty_swiglu`, swiglu_forward's output is 5 % too large.
#[derive(Clone, Copy)]
struct TestDevice {
    bf16: bool,
    faulty_swiglu: bool,
}

struct Buf {
    data: Vec<f32>,
    f32: bool,
}

#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
}

struct ViewMut<'a> {
    data: &'a mut [f32],
    round: bool,
}

impl ViewMut<'_> {
    /// Stores the op's result: rounded to bf16 unless the buffer is f32.
    fn store(self) {
        if self.round {
            round_bf16(self.data);
        }
    }
}

fn round_bf16(v: &mut [f32]) {
    v.iter_mut()
        .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
}

const CPU: CpuBackend = CpuBackend;

impl TestDevice {
    fn buf(&self, mut data: Vec<f32>, f32: bool) -> Buf {
        if self.bf16 && !f32 {
            round_bf16(&mut data);
        }
        Buf { data, f32 }
    }
}

impl Backend for TestDevice {
    type Buf = Buf;
    type View<'a> = View<'a>;
    type ViewMut<'a> = ViewMut<'a>;

    fn name(&self) -> &'static str {
        "test"
    }
    fn zeros(&self, len: usize) -> anyhow::Result<Buf> {
        Ok(self.buf(vec![0.0; len], false))
    }
    fn upload(&self, host: &[f32]) -> anyhow::Result<Buf> {
        Ok(self.buf(host.to_vec(), false))
    }
    fn zeros_f32(&self, len: usize) -> anyhow::Result<Buf> {
        Ok(self.buf(vec![0.0; len], true))
    }
    fn empty(&self, len: usize) -> anyhow::Result<Buf> {
        Ok(self.buf(vec![f32::NAN; len], false))
    }
    fn empty_f32(&self, len: usize) -> anyhow::Result<Buf> {
        Ok(self.buf(vec![f32::NAN; len], true))
    }
    fn upload_f32(&self, host: &[f32]) -> anyhow::Result<Buf> {
        Ok(self.buf(host.to_vec(), true))
    }
    fn download(&self, buf: View<'_>) -> anyhow::Result<Vec<f32>> {
        Ok(buf.data.to_vec())
    }
    fn storage_bytes(&self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
    }
    fn upload_into(&self, dst: ViewMut<'_>, host: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(dst.data.len() == host.len(), "upload_into: length");
        dst.data.copy_from_slice(host);
        dst.store();
        Ok(())
    }
    fn len(&self, buf: &Buf) -> usize {
        buf.data.len()
    }
    fn view<'a>(&self, buf: &'a Buf, range: Range<usize>) -> View<'a> {
        View {
            data: &buf.data[range],
        }
    }
    fn view_mut<'a>(&self, buf: &'a mut Buf, range: Range<usize>) -> ViewMut<'a> {
        ViewMut {
            data: &mut buf.data[range],
            round: self.bf16 && !buf.f32,
        }
    }

    type DecodeGraph = ();
    fn decode_graph(&self) {}

    fn embedding_forward(&self, out: ViewMut<'_>, table: View<'_>, ids: &[u32], dim: usize) {
        CPU.embedding_forward(out.data, table.data, ids, dim);
    }
    fn embedding_forward_sampled(
        &self,
        out: ViewMut<'_>,
        table: View<'_>,
        sampled: View<'_>,
        rows: &[u32],
        dim: usize,
    ) {
        CPU.embedding_forward_sampled(out.data, table.data, sampled.data, rows, dim);
    }
    fn add_rmsnorm_forward(
        &self,
        x: ViewMut<'_>,
        residual: View<'_>,
        out: ViewMut<'_>,
        w: View<'_>,
        dim: usize,
        eps: f32,
    ) {
        // Two ops on a device: x is stored (rounded) before the norm reads it.
        CPU.residual_add(&mut *x.data, residual.data);
        if x.round {
            round_bf16(x.data);
        }
        CPU.rmsnorm_forward(&mut *out.data, x.data, w.data, dim, eps);
        out.store();
    }
    fn rmsnorm_forward(&self, out: ViewMut<'_>, x: View<'_>, w: View<'_>, dim: usize, eps: f32) {
        CPU.rmsnorm_forward(&mut *out.data, x.data, w.data, dim, eps);
        out.store();
    }
    fn matmul_forward(
        &self,
        out: ViewMut<'_>,
        x: View<'_>,
        w: View<'_>,
        bias: Option<View<'_>>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let bias = bias.map(|b| b.data);
        CPU.matmul_forward(&mut *out.data, x.data, w.data, bias, m, k, n);
        out.store();
    }
    fn qkv_rope_forward(
        &self,
        [q, k, v]: [ViewMut<'_>; 3],
        qkv: View<'_>,
        biases: [Option<View<'_>>; 3],
        norms: Option<HeadNorms<'_, Self>>,
        positions: &[u32],
        inv_freq: View<'_>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        let biases = biases.map(|b| b.map(|b| b.data));
        let Some(n) = norms else {
            CPU.qkv_rope_forward(
                [&mut *q.data, &mut *k.data, &mut *v.data],
                qkv.data,
                biases,
                None,
                positions,
                inv_freq.data,
                n_heads,
                n_kv_heads,
                head_dim,
            );
            return [q, k, v].into_iter().for_each(ViewMut::store);
        };
        // a bf16 device rounds the biased parts before their norms, and the normed heads before
        // rotating them
        cpu::split_qkv(
            [&mut *q.data, &mut *k.data, &mut *v.data],
            qkv.data,
            positions.len(),
        );
        for (x, bias) in [&mut *q.data, &mut *k.data, &mut *v.data]
            .into_iter()
            .zip(biases)
        {
            if let Some(bias) = bias {
                cpu::add_bias_rows(x, bias);
            }
            if self.bf16 {
                round_bf16(x);
            }
        }
        if let Some([q_raw, k_raw]) = n.raw {
            q_raw.data.copy_from_slice(q.data);
            k_raw.data.copy_from_slice(k.data);
        }
        for (x, weight) in [(&mut *q.data, n.weights[0]), (&mut *k.data, n.weights[1])] {
            let raw = x.to_vec();
            CPU.rmsnorm_forward(x, &raw, weight.data, head_dim, n.eps);
            if self.bf16 {
                round_bf16(x);
            }
        }
        cpu::rope_forward(q.data, positions, inv_freq.data, n_heads, head_dim);
        cpu::rope_forward(k.data, positions, inv_freq.data, n_kv_heads, head_dim);
        [q, k, v].into_iter().for_each(ViewMut::store);
    }
    fn kv_cache_write(
        &self,
        cache_k: ViewMut<'_>,
        cache_v: ViewMut<'_>,
        k: View<'_>,
        v: View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    ) {
        CPU.kv_cache_write(
            cache_k.data,
            cache_v.data,
            k.data,
            v.data,
            place,
            capacity,
            kv_dim,
        );
    }
    fn kv_cache_gather(
        &self,
        dx: ViewMut<'_>,
        dcache: View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    ) {
        CPU.kv_cache_gather(&mut *dx.data, dcache.data, place, capacity, kv_dim);
        dx.store();
    }
    fn attention_forward(
        &self,
        out: ViewMut<'_>,
        lse: Option<ViewMut<'_>>,
        q: View<'_>,
        cache_k: View<'_>,
        cache_v: View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        CPU.attention_forward(
            &mut *out.data,
            lse.map(|l| l.data),
            q.data,
            cache_k.data,
            cache_v.data,
            place,
            capacity,
            n_heads,
            n_kv_heads,
            head_dim,
        );
        out.store();
    }
    fn swiglu_forward(&self, out: ViewMut<'_>, gate_up: View<'_>, inter: usize) {
        CPU.swiglu_forward(&mut *out.data, gate_up.data, inter);
        if self.faulty_swiglu {
            out.data.iter_mut().for_each(|v| *v *= 1.05);
        }
        out.store();
    }
    fn residual_add(&self, x: ViewMut<'_>, y: View<'_>) {
        CPU.residual_add(&mut *x.data, y.data);
        x.store();
    }
    fn gather_rows(&self, out: ViewMut<'_>, x: View<'_>, rows: &[usize], dim: usize) {
        CPU.gather_rows(out.data, x.data, rows, dim);
    }
    fn fill_zero(&self, out: ViewMut<'_>) {
        CPU.fill_zero(out.data);
    }
    fn copy(&self, dst: ViewMut<'_>, src: View<'_>) {
        CPU.copy(dst.data, src.data);
    }
    fn logprob_forward(
        &self,
        logp: ViewMut<'_>,
        entropy: ViewMut<'_>,
        logits: View<'_>,
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) {
        CPU.logprob_forward(
            &mut *logp.data,
            &mut *entropy.data,
            logits.data,
            targets,
            vocab,
            temperature,
        );
        logp.store();
        entropy.store();
    }

    fn sample_tokens(
        &self,
        out: ViewMut<'_>,
        logp: ViewMut<'_>,
        logits: View<'_>,
        draws: &TokenDraws,
        vocab: usize,
        params: &SamplingParams,
    ) {
        CPU.sample_tokens(
            &mut *out.data,
            &mut *logp.data,
            logits.data,
            draws,
            vocab,
            params,
        );
        out.store();
        logp.store();
    }
}

/// The CPU backward ops; every output stored like its buffer (bf16 unless made f32).
impl TrainBackend for TestDevice {
    fn attention_backward(
        &self,
        dq: ViewMut<'_>,
        dcache_k: ViewMut<'_>,
        dcache_v: ViewMut<'_>,
        dout: View<'_>,
        out: View<'_>,
        lse: View<'_>,
        q: View<'_>,
        cache_k: View<'_>,
        cache_v: View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        if self.bf16 {
            let shape = [capacity, n_heads, n_kv_heads, head_dim];
            let (dk, dv) = (&mut *dcache_k.data, &mut *dcache_v.data);
            let grads = [&mut *dq.data, dk, dv];
            let inputs = [
                dout.data,
                out.data,
                lse.data,
                q.data,
                cache_k.data,
                cache_v.data,
            ];
            attention_backward_bf16_operands(grads, inputs, place, shape);
        } else {
            CPU.attention_backward(
                &mut *dq.data,
                &mut *dcache_k.data,
                &mut *dcache_v.data,
                dout.data,
                out.data,
                lse.data,
                q.data,
                cache_k.data,
                cache_v.data,
                place,
                capacity,
                n_heads,
                n_kv_heads,
                head_dim,
            );
        }
        dq.store();
        dcache_k.store();
        dcache_v.store();
    }

    fn logprob_backward(
        &self,
        dlogits: ViewMut<'_>,
        dlogp: View<'_>,
        logits: View<'_>,
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) {
        CPU.logprob_backward(
            &mut *dlogits.data,
            dlogp.data,
            logits.data,
            targets,
            vocab,
            temperature,
        );
        dlogits.store();
    }
    fn matmul_backward(
        &self,
        dx: Option<ViewMut<'_>>,
        dx_write: GradWrite,
        dw: ViewMut<'_>,
        dout: View<'_>,
        x: View<'_>,
        w: View<'_>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        match dx {
            Some(dx) => {
                CPU.matmul_backward(
                    Some(&mut *dx.data),
                    dx_write,
                    &mut *dw.data,
                    dout.data,
                    x.data,
                    w.data,
                    m,
                    k,
                    n,
                );
                dx.store();
            }
            None => CPU.matmul_backward(
                None,
                dx_write,
                &mut *dw.data,
                dout.data,
                x.data,
                w.data,
                m,
                k,
                n,
            ),
        }
        dw.store();
    }
    fn bias_backward(&self, dbias: ViewMut<'_>, dout: View<'_>) {
        CPU.bias_backward(&mut *dbias.data, dout.data);
        dbias.store();
    }
    fn rmsnorm_backward(
        &self,
        dx: ViewMut<'_>,
        dx_write: GradWrite,
        dweight: ViewMut<'_>,
        dout: View<'_>,
        x: View<'_>,
        weight: View<'_>,
        dim: usize,
        eps: f32,
    ) {
        CPU.rmsnorm_backward(
            &mut *dx.data,
            dx_write,
            &mut *dweight.data,
            dout.data,
            x.data,
            weight.data,
            dim,
            eps,
        );
        dx.store();
        dweight.store();
    }
    fn rope_backward(
        &self,
        dx: ViewMut<'_>,
        positions: &[u32],
        inv_freq: View<'_>,
        n_heads: usize,
        head_dim: usize,
    ) {
        CPU.rope_backward(&mut *dx.data, positions, inv_freq.data, n_heads, head_dim);
        dx.store();
    }
    fn qkv_rope_backward(
        &self,
        dqkv: ViewMut<'_>,
        grads: [View<'_>; 3],
        positions: &[u32],
        inv_freq: View<'_>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        CPU.qkv_rope_backward(
            &mut *dqkv.data,
            grads.map(|g| g.data),
            positions,
            inv_freq.data,
            n_heads,
            n_kv_heads,
            head_dim,
        );
        dqkv.store();
    }
    fn swiglu_backward(
        &self,
        d_gate_up: ViewMut<'_>,
        dout: View<'_>,
        gate_up: View<'_>,
        inter: usize,
    ) {
        CPU.swiglu_backward(&mut *d_gate_up.data, dout.data, gate_up.data, inter);
        d_gate_up.store();
    }
    fn embedding_backward(&self, dtable: ViewMut<'_>, dout: View<'_>, ids: &[u32], dim: usize) {
        CPU.embedding_backward(&mut *dtable.data, dout.data, ids, dim);
        dtable.store();
    }
    fn scatter_add_rows(&self, dx: ViewMut<'_>, dout: View<'_>, rows: &[usize], dim: usize) {
        CPU.scatter_add_rows(&mut *dx.data, dout.data, rows, dim);
        dx.store();
    }
    fn sum_squares(&self, out: ViewMut<'_>, x: View<'_>) {
        CPU.sum_squares(&mut *out.data, x.data);
        out.store();
    }
    fn policy_loss_backward(
        &self,
        dlogits: ViewMut<'_>,
        logp: ViewMut<'_>,
        stats: ViewMut<'_>,
        logits: View<'_>,
        targets: &[u32],
        tokens: &PolicyTokens<'_, Self>,
        vocab: usize,
        temperature: f32,
        loss: &LossOptions,
    ) {
        let cpu_tokens = PolicyTokens::<CpuBackend> {
            seqs: tokens.seqs,
            advantages: tokens.advantages.data,
            weights: tokens.weights.data,
            old_logp: tokens.old_logp.map(|v| v.data),
            ref_logp: tokens.ref_logp.map(|v| v.data),
        };
        CPU.policy_loss_backward(
            &mut *dlogits.data,
            &mut *logp.data,
            &mut *stats.data,
            logits.data,
            targets,
            &cpu_tokens,
            vocab,
            temperature,
            loss,
        );
        dlogits.store();
        logp.store();
        stats.store();
    }
    fn group_advantages(
        &self,
        out: ViewMut<'_>,
        rewards: &[f64],
        group_size: usize,
        opts: &AdvantageOptions,
    ) {
        CPU.group_advantages(&mut *out.data, rewards, group_size, opts);
        out.store();
    }
    fn column_sums(&self, out: ViewMut<'_>, x: View<'_>, cols: usize) {
        CPU.column_sums(&mut *out.data, x.data, cols);
        out.store();
    }
    fn adamw_step(
        &self,
        params: ViewMut<'_>,
        master: ViewMut<'_>,
        m: ViewMut<'_>,
        v: ViewMut<'_>,
        grads: View<'_>,
        step: &thinkshort::optim::AdamWStep,
    ) {
        CPU.adamw_step(
            &mut *params.data,
            &mut *master.data,
            &mut *m.data,
            &mut *v.data,
            grads.data,
            step,
        );
        params.store();
        master.store();
        m.store();
        v.store();
    }
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The CPU attention backward with the fused kernel's roundings (kernels/flash_attention.cu):
/// P is a bf16 operand of dV = Pᵀ·dO and dS of dQ = dS·K and dK = dSᵀ·Q; the sums, lse and
/// D = dout·out stay f32. grads: [dq, dcache_k, dcache_v]; inputs: [dout, out, lse, q, cache_k,
/// cache_v]; shape: [capacity, n_heads, n_kv_heads, head_dim].
fn attention_backward_bf16_operands(
    [dq, dk, dv]: [&mut [f32]; 3],
    [dout, out, lse, q, ck, cv]: [&[f32]; 6],
    place: &TokenPlacement,
    [capacity, n_heads, n_kv_heads, head_dim]: [usize; 4],
) {
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for (m, (&slot, &pos)) in place.slots.iter().zip(&place.positions).enumerate() {
        for h in 0..n_heads {
            let row = m * q_dim + h * head_dim;
            let (qh, go) = (&q[row..][..head_dim], &dout[row..][..head_dim]);
            let d = dot(go, &out[row..][..head_dim]);
            let mut dq_row = vec![0.0f32; head_dim];
            for j in 0..=pos as usize {
                let at =
                    (slot as usize * capacity + j) * kv_dim + h / (n_heads / n_kv_heads) * head_dim;
                let (k, v) = (&ck[at..][..head_dim], &cv[at..][..head_dim]);
                let p = (dot(qh, k) * scale - lse[m * n_heads + h]).exp();
                let ds = bf16(p * (dot(go, v) - d));
                let p = bf16(p);
                for i in 0..head_dim {
                    dv[at + i] += p * go[i];
                    dk[at + i] += ds * qh[i] * scale;
                    dq_row[i] += ds * k[i];
                }
            }
            for (o, g) in dq[row..][..head_dim].iter_mut().zip(&dq_row) {
                *o = g * scale;
            }
        }
    }
}

fn run(dev: TestDevice) -> Report {
    selfcheck::run(&|| Ok(dev), 0, Coverage::Quick, &mut |_| {}).unwrap()
}

#[test]
fn a_faulty_op_fails_and_only_that_op() {
    let report = run(TestDevice {
        bf16: false,
        faulty_swiglu: true,
    });
    let (swiglu, others): (Vec<_>, Vec<_>) = report
        .rows
        .iter()
        .filter(|r| !r.op.starts_with("model ") && !r.op.starts_with("grpo step"))
        .partition(|r| r.op == "swiglu_forward");
    assert!(!swiglu.is_empty());
    for row in swiglu {
        assert!(!row.pass, "{row:?}");
        assert!((row.error - 0.05).abs() < 1e-3, "{row:?}");
    }
    for row in others {
        assert!(row.pass && row.error == 0.0, "{row:?}");
    }
    // The whole model uses swiglu in every layer: its log-probs, gradients and update see the
    // fault.
    for op in ["model logprobs", "model gradient", "grpo step/update"] {
        let model = report.rows.iter().find(|r| r.op == op).unwrap();
        assert!(!model.pass, "{model:?}");
    }
}

/// A bf16-storage device that computes exactly as the CPU does passes every tolerance, the op
/// checks with a margin of 2× at least (they allow for bf16 output rounding and little more).
#[test]
fn a_bf16_storage_device_passes_every_check() {
    let report = run(TestDevice {
        bf16: true,
        faulty_swiglu: false,
    });
    assert_eq!(report.failures(), 0, "{:#?}", report.rows);
    for row in report.rows.iter().filter(|r| r.metric == "rel") {
        assert!(
            row.error <= row.tolerance / 2.0,
            "too little margin: {row:?}"
        );
    }
    // the greedy generation lines of the tiny model and of its Qwen3 variant
    assert_eq!(report.info.len(), 2, "{:?}", report.info);
}

/// Model::random fills the tensors in parallel with exactly the values of one sequential
/// Philox stream (what the demo model and earlier runs were built with).
#[test]
fn random_model_weights_are_the_sequential_philox_stream() {
    let cfg = ModelConfig::from_json_str(
        r#"{"model_type":"qwen2","vocab_size":77,"hidden_size":25,"head_dim":6,"intermediate_size":40,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    let model = Model::random(cfg, 9, CpuBackend).unwrap();
    let mut rng = Philox::new(9, 0);
    let mut odd_tensors = 0;
    for spec in &model.layout.specs {
        let got = &model.params[spec.range()];
        if spec.name.ends_with("norm.weight") {
            assert!(got.iter().all(|&v| v == 1.0), "{}", spec.name);
        } else {
            odd_tensors += spec.len() % 2;
            for (i, &v) in got.iter().enumerate() {
                assert_eq!(v, 0.02 * rng.next_normal(), "{}[{i}]", spec.name);
            }
        }
    }
    assert!(
        odd_tensors > 0,
        "no tensor of odd length: a normal pair split across tensors is not exercised"
    );
}

#[test]
fn selfcheck_cuda_without_a_gpu_fails_with_one_line() {
    if thinkshort::cuda::require_cuda().is_ok() {
        return; // a GPU machine: the real selfcheck runs in tools/gpu_check.sh
    }
    let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .args(["selfcheck", "--backend", "cuda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("cuda"),
        "{stderr}"
    );
}

/// A --json path that cannot be written (a folder, a missing parent) fails at once, before the
/// selfcheck or a benchmark runs (they failed after it), and prints nothing on stdout.
#[test]
fn an_unwritable_json_path_fails_before_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing/report.json");
    let config = "tools/bench_model_10m.json";
    let commands: [&[&str]; 3] = [
        &["selfcheck", "--quick"],
        &["bench", "forward", "--model-config", config],
        &["bench", "step", "--model-config", config],
    ];
    for command in commands {
        for path in [dir.path(), missing.as_path()] {
            let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(command)
                .args(["--backend", "cpu", "--json"])
                .arg(path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && stderr.contains("not a file in an existing folder"),
                "{command:?}: {stderr}"
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.is_empty(), "{command:?}: {stdout}");
        }
    }
}

/// Runs `thinkshort bench ARGS --json FILE` on the CPU, checks it succeeded and that stdout holds
/// `expect`, and returns the JSON it wrote.
fn run_bench(args: &[&str], expect: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .arg("bench")
        .args(args)
        .args(["--backend", "cpu", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(expect), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn bench_forward_on_the_cpu_reports_every_batch_size() {
    let v = run_bench(
        &[
            "forward",
            "--model-config",
            "tools/bench_model_10m.json",
            "--batch",
            "1,2",
            "--prompt-len",
            "8",
            "--decode-steps",
            "2",
        ],
        "decode tok/s",
    );
    assert_eq!(v["bytes_per_param"], 4);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, batch) in results.iter().zip([1, 2]) {
        assert_eq!(r["batch"], batch);
        assert_eq!(r["prefill_tokens"], 8 * batch);
        for key in [
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "decode_gb_per_s",
        ] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
        }
    }
}

/// `bench step` of 2 prompts × 3 samples of 5 new tokens after 8 prompt tokens on a 10M model.
const TINY_STEP: [&str; 11] = [
    "step",
    "--model-config",
    "tools/bench_model_10m.json",
    "--prompts",
    "2",
    "--group",
    "3",
    "--prompt-len",
    "8",
    "--new-tokens",
    "5",
];

/// `bench step` on the CPU: one warm-up and two timed GRPO steps of a 10M model; the reported
/// rates multiply back to the work done (P·G·T sampled tokens, P·G·(L + T) trained tokens) and
/// the FLOPs to a count made here from the config (6 per matmul weight per token, the LM head on
/// the T scored rows of each sequence, 3 × 4·q_dim per attended position for attention).
#[test]
fn bench_step_on_the_cpu_reports_one_grpo_step() {
    let v = run_bench(
        &[&TINY_STEP[..], &["--peak-tflops", "2"]].concat(),
        "median step",
    );
    let r = &v["result"];
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
    assert!(
        close(f("rollout_tokens_per_s") * f("rollout_s"), 30.0),
        "{r}"
    );
    assert!(close(f("train_tokens_per_s") * f("update_s"), 78.0), "{r}");
    assert!(f("step_s") >= f("rollout_s") + f("update_s"), "{r}");
    assert!(f("peak_memory_bytes") > 0.0, "{r}");

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tools/bench_model_10m.json").unwrap())
            .unwrap();
    let c = |k: &str| cfg[k].as_f64().unwrap();
    let (h, i, v_, layers) = (
        c("hidden_size"),
        c("intermediate_size"),
        c("vocab_size"),
        c("num_hidden_layers"),
    );
    let head_dim = h / c("num_attention_heads");
    let (q, kv) = (h, c("num_key_value_heads") * head_dim);
    let matmul_weights = layers * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i);
    let (seqs, len, scored) = (6.0, 13.0, 30.0);
    let attended = seqs * len * (len + 1.0) / 2.0;
    let flops = 6.0 * matmul_weights * seqs * len
        + 6.0 * h * v_ * scored
        + 3.0 * 4.0 * q * attended * layers;
    assert!(
        close(f("train_tflops") * f("update_s") * 1e12, flops),
        "{r} vs {flops}"
    );
    assert!(close(f("train_mfu"), f("train_tflops") / 2.0), "{r}");
    assert!(f("memory_estimate_bytes") > 0.0, "{r}");
}

/// `--micro-batch 4`: the update of the 6 samples in passes of 4 and 2 trains the same tokens,
/// and the memory estimate (for one pass of 4, the rollout of all 6) is smaller than for one
/// pass; `--offload` trains them too, its estimate without the master weights and moments, and
/// `--activation-checkpointing`, its estimate smaller.
#[test]
fn bench_step_in_micro_batches_trains_the_same_tokens() {
    let run = |micro: &str| {
        run_bench(
            &[&TINY_STEP[..], &["--steps", "1", "--micro-batch", micro]].concat(),
            "median step",
        )["result"]
            .clone()
    };
    let (whole, parts) = (run("0"), run("4"));
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    let trained = f(&parts, "train_tokens_per_s") * f(&parts, "update_s");
    assert!((trained - 78.0).abs() <= 1e-6 * 78.0, "{parts}");
    assert!(
        f(&parts, "memory_estimate_bytes") < f(&whole, "memory_estimate_bytes"),
        "{parts} vs {whole}"
    );
    // The optimizer in host memory: the same work, 12 bytes per parameter (10.0M of them) off
    // the device's estimate.
    let offloaded = run_bench(
        &[&TINY_STEP[..], &["--steps", "1", "--offload"]].concat(),
        "optimizer in host memory",
    );
    assert_eq!(
        (&offloaded["offload"], &offloaded["micro_batch"]),
        (&serde_json::json!(true), &serde_json::json!(0))
    );
    let offloaded = offloaded["result"].clone();
    let trained = f(&offloaded, "train_tokens_per_s") * f(&offloaded, "update_s");
    assert!((trained - 78.0).abs() <= 1e-6 * 78.0, "{offloaded}");
    let saved = f(&whole, "memory_estimate_bytes") - f(&offloaded, "memory_estimate_bytes");
    assert!((saved / 12.0 / 1e6 - 10.0).abs() < 0.05, "{saved} bytes");
    // Activation checkpointing: the same work, a smaller estimate.
    let checkpointed = run_bench(
        &[
            &TINY_STEP[..],
            &["--steps", "1", "--activation-checkpointing"],
        ]
        .concat(),
        "activation checkpointing",
    );
    assert_eq!(
        checkpointed["activation_checkpointing"],
        serde_json::json!(true)
    );
    let checkpointed = checkpointed["result"].clone();
    let trained = f(&checkpointed, "train_tokens_per_s") * f(&checkpointed, "update_s");
    assert!((trained - 78.0).abs() <= 1e-6 * 78.0, "{checkpointed}");
    assert!(
        f(&checkpointed, "memory_estimate_bytes") < f(&whole, "memory_estimate_bytes"),
        "{checkpointed} vs {whole}"
    );
}

/// `--profile` on the CPU: one more step with every op's calls timed. The call counts follow
/// from the model and the run (8 layers, 5 new tokens: a prefill pass and 4 decode steps of 7
/// products per layer plus the head, the update one pass of each), the ops' times fit in
/// their phase's wall time, and the update's ops' FLOPs add up to the model FLOPs of the timed
/// steps' MFU (the same shapes: every completion runs to its cap), counted there from the
/// config, here op by op.
#[test]
fn bench_step_profile_on_the_cpu_counts_and_times_every_op() {
    let v = run_bench(
        &[&TINY_STEP[..], &["--steps", "1", "--profile"]].concat(),
        "profile update",
    );
    let profile = &v["profile"];
    // summed over the op's rows (a matrix product has one per shape)
    let total = |phase: &str, op: &str, key: &str| {
        profile[phase]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["op"] == op)
            .map(|o| o[key].as_f64().unwrap())
            .sum::<f64>()
    };
    let calls = |phase: &str, op: &str| total(phase, op, "calls") as u64;
    let (layers, new_tokens) = (8, 5);
    // the products: q, k and v in one, o, gate and up in one, down; the head
    let products = 4 * layers + 1;
    assert_eq!(
        calls("rollout_ops", "matmul_forward"),
        products * new_tokens
    );
    assert_eq!(
        calls("rollout_ops", "attention_forward"),
        layers * new_tokens
    );
    assert_eq!(calls("rollout_ops", "sample_tokens"), new_tokens);
    assert_eq!(calls("rollout_ops", "matmul_backward"), 0);
    assert_eq!(calls("update_ops", "matmul_backward"), products);
    assert_eq!(calls("update_ops", "attention_backward"), layers);
    assert_eq!(calls("update_ops", "policy_loss_backward"), 1);
    assert_eq!(calls("update_ops", "adamw_step"), 1);
    let shapes = |op| {
        let ops = profile["update_ops"].as_array().unwrap();
        let rows = ops.iter().filter(|o| o["op"] == op);
        rows.map(|o| o["shape"].clone()).collect::<Vec<_>>()
    };
    // q, k and v in one, o, gate and up in one, down and the head: 5 shapes, each [m, k, n]
    let products = shapes("matmul_backward");
    assert_eq!(products.len(), 5, "{products:?}");
    assert!(products
        .iter()
        .all(|s| s.as_array().map(Vec::len) == Some(3)));
    let update_flops: f64 = profile["update_ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["flops"].as_f64().unwrap())
        .sum();
    let r = &v["result"];
    let model_flops = r["train_tflops"].as_f64().unwrap() * r["update_s"].as_f64().unwrap() * 1e12;
    assert!(
        (update_flops - model_flops).abs() <= 1e-9 * model_flops,
        "the update's ops: {update_flops} FLOPs, the MFU's model: {model_flops}"
    );
    assert!(total("update_ops", "attention_backward", "flops") > 0.0);
    // f32 operands: SwiGLU reads gate and up and writes its output, [78 tokens, 1024] each, in
    // each of the 8 layers; AdamW reads the gradient, reads and writes the master weights and
    // both moments and writes the weights: 8 values a parameter
    let (tokens, inter) = (2.0 * 3.0 * (8.0 + 5.0), 1024.0);
    assert_eq!(
        total("update_ops", "swiglu_forward", "bytes"),
        8.0 * 3.0 * tokens * inter * 4.0
    );
    let params = v["num_params"].as_f64().unwrap();
    assert_eq!(
        total("update_ops", "adamw_step", "bytes"),
        8.0 * 4.0 * params
    );
    for phase in ["rollout", "update"] {
        let ops = profile[format!("{phase}_ops")].as_array().unwrap();
        let seconds: Vec<f64> = ops.iter().map(|o| o["seconds"].as_f64().unwrap()).collect();
        assert!(seconds.iter().all(|&s| s >= 0.0), "{ops:?}");
        assert!(
            seconds.windows(2).all(|w| w[0] >= w[1]),
            "largest first: {ops:?}"
        );
        let wall = profile[format!("{phase}_s")].as_f64().unwrap();
        assert!(
            seconds.iter().sum::<f64>() <= wall,
            "{phase}: {ops:?} in {wall} s"
        );
    }
}

#[test]
fn bench_forward_names_a_missing_config_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .args([
            "bench",
            "forward",
            "--model-config",
            "no/such/config.json",
            "--backend",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no/such/config.json"), "{stderr}");
}
