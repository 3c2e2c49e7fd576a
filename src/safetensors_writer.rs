//! Writes f32 tensors as a safetensors file straight from their slices: the header, then each
//! tensor's bytes in turn through a buffered writer. The safetensors crate's `serialize` first
//! copies every tensor into one buffer (for a 7B model's weights, 30 GB of host memory on top of
//! the weights themselves); this writes the same format with no copy.
//!
//! Format: an 8-byte little-endian header length, a JSON header (padded with spaces to a
//! multiple of 8 bytes) mapping each name to {dtype, shape, data_offsets}, and optionally
//! `__metadata__`, then the tensors' little-endian data back to back.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

/// One tensor to write: its name, shape and f32 values (as many as the shape holds), in one or
/// more slices written back to back.
pub struct F32Tensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub data: Vec<&'a [f32]>,
}

impl F32Tensor<'_> {
    fn len(&self) -> usize {
        self.data.iter().map(|part| part.len()).sum()
    }
}

/// Writes `tensors` (in this order) and `metadata` to `path`.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[F32Tensor],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        header.insert("__metadata__".to_string(), meta.into());
    }
    let mut offset = 0usize;
    for t in tensors {
        if t.shape.iter().product::<usize>() != t.len() {
            bail!(
                "tensor `{}`: shape {:?} holds {} values, the data {}",
                t.name,
                t.shape,
                t.shape.iter().product::<usize>(),
                t.len()
            );
        }
        if header.contains_key(t.name) {
            bail!("tensor `{}` named twice", t.name);
        }
        let end = offset + 4 * t.len();
        header.insert(
            t.name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_string(&header)?.into_bytes();
    // The data then starts 8-byte aligned, as the safetensors crate writes it.
    json.resize(json.len().next_multiple_of(8), b' ');

    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
    let write = |out: &mut std::io::BufWriter<std::fs::File>, bytes: &[u8]| {
        out.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write(&mut out, &(json.len() as u64).to_le_bytes())?;
    write(&mut out, &json)?;
    for t in tensors {
        for chunk in t.data.iter().flat_map(|part| part.chunks(1 << 20)) {
            let le: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            write(&mut out, &le)?;
        }
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    // On the disk before a checkpoint that holds it replaces older ones.
    out.get_ref()
        .sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};

    /// The safetensors crate reads back every tensor (shape, dtype, the exact bits) and the
    /// metadata, across the writer's 1M-value chunks and a tensor's parts; bad shapes and
    /// repeated names are errors.
    #[test]
    fn the_safetensors_crate_reads_back_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a: Vec<f32> = (0..(1 << 20) + 3)
            .map(|i| (i as f32).sqrt() - 7.5)
            .collect();
        let b = [f32::MIN_POSITIVE, -0.0, 1e30, f32::EPSILON, 3.0, -2.5];
        let tensors = [
            F32Tensor {
                name: "big",
                shape: vec![a.len()],
                data: vec![&a],
            },
            F32Tensor {
                name: "small.weight",
                shape: vec![2, 3],
                data: vec![&b],
            },
            F32Tensor {
                name: "in.parts",
                shape: vec![3, 3],
                data: vec![&b[4..], &[], &b, &a[..1]],
            },
            F32Tensor {
                name: "empty",
                shape: vec![0, 4],
                data: vec![&[]],
            },
        ];
        write_f32_safetensors(&path, &tensors, &[("format", "pt")]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for t in &tensors {
            let view = st.tensor(t.name).unwrap();
            assert_eq!(
                (view.dtype(), view.shape()),
                (Dtype::F32, &t.shape[..]),
                "{}",
                t.name
            );
            let back: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
            let written = t.data.concat();
            assert!(back
                .iter()
                .zip(&written)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_eq!(back.len(), written.len());
        }
        let bad = F32Tensor {
            name: "x",
            shape: vec![4],
            data: vec![&b],
        };
        let err = write_f32_safetensors(&path, &[bad], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`x`") && err.contains("[4]"), "{err}");
        let twice = [
            F32Tensor {
                name: "x",
                shape: vec![6],
                data: vec![&b],
            },
            F32Tensor {
                name: "x",
                shape: vec![6],
                data: vec![&b],
            },
        ];
        let err = write_f32_safetensors(&path, &twice, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("named twice"), "{err}");
    }
}
