//! Launchers for kernels/elementwise.cu (being written).
