//! Launchers for kernels/kv_cache.cu (being written).
