//! Decode steps as CUDA graphs: the forward of one `generate` step (about 13 launches per layer,
//! the head, the host work around each) recorded once and then replayed with one launch per
//! step while the batch keeps its rows.
//!
//! A step's kernels find the batch's slots and positions in device arrays (`indices`); every
//! other input is the same from step to step while the rows stay: shapes, buffers, and the
//! decode attention's split plan (made for the cache's capacity, not the current length). So a
//! recording owns its own copy of the positions and ends with a kernel that advances them by
//! one: replay k of a recording made at positions p runs the step at p + 1 + k, and a step is
//! replayed only when the host's placement for it says exactly that.
//!
//! A step is recorded when it has the previous step's slots (that step warmed the index cache
//! and the scratch buffer for these shapes); a step with new slots runs op by op. While
//! recording, an op that would upload an index array or grow the scratch fails the recording
//! (it would outlive the graph or be read at record time); the step then runs op by op, and the
//! loop stops recording after `MAX_FAILURES` such failures (`DecodeGraphStats::fallback` says why).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr};

use super::{lock, CudaBackend, CudaBuf, DeviceIndices, INDEX_CACHE_ENTRIES};
use crate::backend::TokenPlacement;
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
    graph: CudaGraph,
    slots: Vec<u32>,
    /// The positions of the step the next replay runs.
    next_positions: Vec<u32>,
    /// The index arrays (its own positions among them) and scratch the graph reads.
    _inputs: RecordedInputs,
}

/// The backend's buffers that a recording reads, kept alive as long as it is.
#[derive(Default)]
pub(in crate::cuda) struct RecordedInputs {
    pub indices: Vec<Arc<CudaSlice<u32>>>,
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
            match self.record(place, step)? {
                Ok(recording) => {
                    recording
                        .graph
                        .launch()
                        .context("launching a recorded decode step")?;
                    graph.recording = Some(recording);
                    lock(&self.graph_stats).captured += 1;
                    return Ok(());
                }
                Err(reason) => {
                    graph.failures += 1;
                    let mut stats = lock(&self.graph_stats);
                    if stats.fallback.is_none() {
                        eprintln!("note: a decode step could not be recorded as a CUDA graph ({reason}); it runs op by op");
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

    /// Records `step` (not running it) followed by the advance of its positions. Ok(Err(reason))
    /// when it cannot be recorded: nothing of it ran, and the caller runs it op by op.
    fn record(
        &self,
        place: &TokenPlacement,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<std::result::Result<Recording, String>> {
        let m = place.positions.len();
        // The recording's positions, where the step's ops look them up; uploaded outside it.
        let positions = self
            .k
            .stream
            .clone_htod(&place.positions)
            .context("copying a decode step's positions to the GPU")?;
        let (positions_ptr, _) = positions.device_ptr(&self.k.stream);
        {
            let mut cache = lock(&self.indices);
            if cache.len() == INDEX_CACHE_ENTRIES {
                cache.remove(0);
            }
            cache.push(DeviceIndices {
                host: place.positions.clone(),
                device: Arc::new(positions),
                ptr: positions_ptr,
            });
        }

        let began = self
            .k
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        let capture_began = began.is_ok();
        let mut outcome = began.map_err(|e| anyhow!("cuStreamBeginCapture: {e:?}"));
        let mut inputs = RecordedInputs::default();
        if capture_began {
            *lock(&self.recording) = Some(RecordedInputs::default());
            outcome = step()
                .and_then(|()| self.check_error())
                .and_then(|()| ops::kv_cache::advance_positions(&self.k, positions_ptr, m));
            inputs = lock(&self.recording).take().unwrap_or_default();
        }
        let ended = match outcome {
            Ok(()) => self
                .k
                .stream
                .end_capture(CUgraphInstantiate_flags(0))
                .map_err(|e| anyhow!("cuStreamEndCapture / cuGraphInstantiate: {e:?}")),
            Err(_) => {
                if capture_began {
                    // ends the capture that failed; nothing recorded runs
                    let _ = self.k.stream.end_capture(CUgraphInstantiate_flags(0));
                }
                Ok(None)
            }
        };
        // Errors of ops queued while recording (none of them ran), and of buffers freed on a
        // capture that had failed (cudarc keeps those for the next driver call).
        let op_error = lock(&self.error).take();
        let driver_error = self.k.ctx.check_err().err();
        // The positions change at every replay: no later op may find them in the cache.
        lock(&self.indices).retain(|e| e.ptr != positions_ptr);

        let reason = match (outcome, ended, op_error, driver_error) {
            (Ok(()), Ok(Some(graph)), None, None) => {
                return Ok(Ok(Recording {
                    graph,
                    slots: place.slots.clone(),
                    next_positions: place.positions.iter().map(|p| p + 1).collect(),
                    _inputs: inputs,
                }))
            }
            (_, _, Some(op_error), _) => op_error,
            (Err(e), _, _, _) | (_, Err(e), _, _) => format!("{e:#}"),
            (_, _, _, Some(e)) => format!("{e:?}"),
            (_, Ok(None), _, _) => "the capture recorded nothing".to_string(),
        };
        Ok(Err(reason))
    }
}
