//! Launchers for the kernels in `kernels/`, one file per kernel file. Each takes a
//! [`KernelCtx`](super::launch::KernelCtx), raw device pointers (`u64`) and sizes, checks the
//! sizes it can, queues the launch on the stream and returns the launch error, if any.

pub mod advantage;
pub mod attention;
pub mod decode_attention;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod kv_cache;
pub mod logprob;
pub mod optimizer;
pub mod policy_loss;
pub mod rmsnorm;
pub mod rope;
pub mod sampling;
