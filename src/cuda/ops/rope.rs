//! Launchers for kernels/rope.cu (being written).
