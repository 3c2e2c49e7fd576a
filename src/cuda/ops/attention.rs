//! Launchers for kernels/attention.cu (being written).
