//! Decode steps as CUDA graphs: the forward of one `generate` step (about 13 launches per layer,
//! the head, the host work around each) recorded once and then replayed with one launch per
//! step while the batch keeps its rows.
//!
//! A step's kernels find the batch's slots and positions in device arrays; every other input is
//! the same from step to step while the rows stay: shapes, buffers, and the decode attention's
//! split plan (made for the cache's capacity, not the current length). So a recording owns its
//! own copy of the positions (`CudaBackend::positions` hands it to the ops while recording; it
//! never enters the index cache, where an array of the same values could be taken for it) and
//! ends with a kernel that advances them by one: replay k of a recording made at positions p
//! runs the step at p + 1 + k, and a step is replayed only when the host's placement for it
//! says exactly that.
//!
//! A step is recorded when it has the previous step's slots (that step warmed the index cache
//! and the scratch buffer for these shapes); a step with new slots runs op by op. While
//! recording, an op that would upload an index array or grow the scratch fails the recording
//! (it would outlive the graph or be read at record time); the step then runs op by op, and the
//! loop stops recording after `MAX_FAILURES` such failures (`DecodeGraphStats::fallback` says why).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::{lock, CudaBackend, CudaBuf};
use crate::backend::TokenPlacement;
use crate::cuda::device::{DeviceGraph, DeviceMemory};
use crate::cuda::ops;

/// Failed recordings after which a decode loop runs the rest of its steps op by op.
const MAX_FAILURES: u32 = 2;

/// One decode loop's recording (`Backend::DecodeGraph` of the CUDA backend).
#[derive(Default)]
pub struct CudaDecodeGraph {
    recording: Option<Recording>,
    /// Slots of the last step that ran.
    previous_slots: Vec<u32>,
    failures: u32,
}

/// A recorded step. Fields drop in order: the graph before the buffers it reads.
struct Recording {
    graph: Box<dyn DeviceGraph>,
    slots: Vec<u32>,
    /// The positions of the step the next replay runs.
    next_positions: Vec<u32>,
    /// The positions the graph's kernels read and its last kernel advances: [M] u32.
    _positions: Arc<dyn DeviceMemory>,
    /// The index arrays and scratch the graph reads.
    _inputs: RecordedInputs,
}

/// What the ops see while a step is being recorded: the recording's positions, and the
/// backend's buffers they used (kept alive as long as the recording is).
pub(in crate::cuda) struct RecordedInputs {
    /// The step's positions (host values) and the recording's device copy of them.
    pub positions: (Vec<u32>, u64),
    pub indices: Vec<Arc<dyn DeviceMemory>>,
    pub scratch: Vec<Arc<CudaBuf>>,
}

impl CudaBackend {
    /// `Backend::decode_step`: replays the recording when `place` is its next step, records a
    /// step with the previous step's slots, runs any other step op by op.
    pub(super) fn run_decode_step(
        &self,
        graph: &mut CudaDecodeGraph,
        place: &TokenPlacement,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        self.check_error()?;
        let recording_on = self.decode_graphs.load(Ordering::Relaxed)
            && graph.failures < MAX_FAILURES
            && lock(&self.profile).is_none(); // profiling times each op: run them one by one
        if let Some(rec) = graph.recording.as_mut().filter(|_| recording_on) {
            if rec.slots == place.slots && rec.next_positions == place.positions {
                rec.graph
                    .launch()
                    .context("launching a recorded decode step")?;
                rec.next_positions.iter_mut().for_each(|p| *p += 1);
                lock(&self.graph_stats).replayed += 1;
                return Ok(());
            }
        }
        graph.recording = None;
        if recording_on && graph.previous_slots == place.slots {
            // A recording that cannot be launched has run nothing either: op by op then.
            let recorded =
                self.record(place, step)?
                    .and_then(|recording| match recording.graph.launch() {
                        Ok(()) => Ok(recording),
                        Err(e) => Err(format!("launching the recorded step: {e:#}")),
                    });
            match recorded {
                Ok(recording) => {
                    graph.recording = Some(recording);
                    lock(&self.graph_stats).captured += 1;
                    return Ok(());
                }
                Err(reason) => {
                    graph.failures += 1;
                    let mut stats = lock(&self.graph_stats);
                    if stats.fallback.is_none() {
                        eprintln!(
                            "note: a decode step could not be recorded as a CUDA graph \
                             ({reason}); it runs op by op"
                        );
                    }
                    stats.fallback = Some(reason);
                }
            }
        }
        if graph.previous_slots != place.slots {
            graph.previous_slots = place.slots.clone();
        }
        lock(&self.graph_stats).eager += 1;
        step()
    }

    /// The device positions of a batch for the ops that read them (RoPE, the KV-cache write,
    /// attention): while a step is being recorded, the recording's own (which its replays
    /// advance); else the index cache's upload.
    pub(super) fn positions(&self, host: &[u32]) -> Result<u64> {
        let recorded = lock(&self.recording)
            .as_ref()
            .map(|inputs| inputs.positions.clone());
        match recorded {
            Some((values, ptr)) => {
                anyhow::ensure!(
                    values == host,
                    "an op of the recorded decode step asked for other positions than the step's"
                );
                Ok(ptr)
            }
            None => self.indices(host),
        }
    }

    /// Records `step` (not running it) followed by the advance of its positions. Ok(Err(reason))
    /// when it cannot be recorded: nothing of it ran, and the caller runs it op by op. An error
    /// only when the stream could not be brought out of capture.
    fn record(
        &self,
        place: &TokenPlacement,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<std::result::Result<Recording, String>> {
        let m = place.positions.len();
        // The recording's positions, uploaded outside it.
        let positions = self
            .device_copy(&place.positions)
            .context("copying a decode step's positions to the GPU")?;
        let positions_ptr = positions.ptr();
        ops::kv_cache::prepare_advance_positions(self.launcher())
            .context("loading the advance_positions kernel")?;

        let began = self.dev.begin_recording();
        let capture_began = began.is_ok();
        let mut outcome = began;
        let mut inputs = None;
        if capture_began {
            *lock(&self.recording) = Some(RecordedInputs {
                positions: (place.positions.clone(), positions_ptr),
                indices: Vec::new(),
                scratch: Vec::new(),
            });
            outcome = step()
                .and_then(|()| self.check_error())
                .and_then(|()| ops::kv_cache::advance_positions(self.launcher(), positions_ptr, m));
            inputs = lock(&self.recording).take();
        }
        // Errors that cudarc kept from buffers freed on a capture that had failed: taken now,
        // or end_capture would return one of them without ending the capture.
        let driver_error = self.dev.take_deferred_error();
        let ended = if capture_began {
            self.dev.end_recording()
        } else {
            Ok(None)
        };
        // An error kept while ending (a graph destroyed after a failed instantiation): taken
        // too, or the status query below would return it.
        let driver_error = driver_error.or_else(|| self.dev.take_deferred_error());
        // Errors of ops queued while recording: none of them ran.
        let op_error = lock(&self.error)
            .take()
            .map(|failure| format!("{:#}", failure.error()));
        if self
            .dev
            .recording()
            .context("after recording a decode step")?
        {
            // One more try, so that the stream stays usable when this step is refused.
            let _ = self.dev.take_deferred_error();
            let _ = self.dev.end_recording();
            if self.dev.recording().unwrap_or(true) {
                bail!("the CUDA stream is still capturing after recording a decode step");
            }
        }

        let reason = match (outcome, ended, op_error, driver_error, inputs) {
            (Ok(()), Ok(Some(graph)), None, None, Some(inputs)) => {
                return Ok(Ok(Recording {
                    graph,
                    slots: place.slots.clone(),
                    next_positions: place.positions.iter().map(|p| p + 1).collect(),
                    _positions: positions,
                    _inputs: inputs,
                }))
            }
            (_, _, Some(op_error), _, _) => op_error,
            (Err(e), _, _, _, _) | (_, Err(e), _, _, _) => format!("{e:#}"),
            (_, _, _, Some(e), _) => e,
            (_, Ok(None), _, _, _) => "the capture recorded nothing".to_string(),
            (_, _, _, _, None) => "the recorded inputs went missing".to_string(),
        };
        Ok(Err(reason))
    }
}
