//! Launchers for kernels/logprob.cu (being written).
