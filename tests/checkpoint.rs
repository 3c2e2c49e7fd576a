//! Checkpoints round-trip: a model written back as a HF folder loads to the same parameters and
//! scores the same; a failed write leaves nothing behind.

use std::path::Path;
use thinkshort::backend::cpu::CpuBackend;
use thinkshort::checkpoint::{write_folder_atomically, write_model_files};
use thinkshort::model::Model;

#[test]
fn saved_model_reloads_bit_for_bit() {
    for name in ["qwen2_tied", "llama_untied_bf16", "qwen2_sharded_f16"] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let model = Model::load(&src, CpuBackend).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("step-000001");
        write_folder_atomically(&dest, |dir| {
            write_model_files(dir, &src, &model.layout, &model.params)
        })
        .unwrap();
        let back = Model::load(&dest, CpuBackend).unwrap();
        assert_eq!(back.params, model.params, "{name}");
        assert!(dest.join("tokenizer.json").is_file() && dest.join("config.json").is_file());
        let st = std::fs::read(dest.join("model.safetensors")).unwrap();
        let names = safetensors::SafeTensors::deserialize(&st)
            .unwrap()
            .names()
            .len();
        assert_eq!(
            names,
            model.layout.specs.len(),
            "{name}: tied heads are written once"
        );
        // Only the checkpoint itself is left in the parent folder.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}

#[test]
fn a_failed_write_leaves_no_partial_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("ckpt");
    let err = write_folder_atomically(&dest, |dir| {
        std::fs::write(dir.join("half.bin"), b"x").unwrap();
        anyhow::bail!("interrupted")
    });
    assert!(err.is_err());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "partial files left behind"
    );
}

#[test]
fn non_finite_weights_never_reach_a_checkpoint() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_tied");
    let mut model = Model::load(&src, CpuBackend).unwrap();
    model.params[7] = f32::NAN;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("ckpt");
    let err = write_folder_atomically(&dest, |dir| {
        write_model_files(dir, &src, &model.layout, &model.params)
    })
    .unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(!dest.exists());
}
