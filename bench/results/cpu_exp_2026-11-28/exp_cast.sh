#!/usr/bin/env bash
# exp's n as an integer: the saturating cast (`n as i32`, commit bbb47a2) against reading it from
# the bits of n + 1.5·2²³ (commit 180d791). Builds a small crate in a temporary folder from both
# versions of src/exp.rs, times exp_in_place / exp_f64_in_place on 65536 values (three rounds,
# each with a copy of the input), and checks that both give the same bits for all 2³² f32 inputs.
# Usage (from the repository root): bash bench/results/cpu_exp_2026-11-28/exp_cast.sh
set -euo pipefail
dir=$(mktemp -d)
mkdir -p "$dir/src"
git show bbb47a2:src/exp.rs >"$dir/src/old.rs"
git show 180d791:src/exp.rs >"$dir/src/new.rs"
cat >"$dir/Cargo.toml" <<'TOML'
[package]
name = "exp_cast"
version = "0.1.0"
edition = "2021"
TOML
cat >"$dir/src/main.rs" <<'RS'
#[allow(dead_code)]
mod new;
#[allow(dead_code)]
mod old;
use std::time::Instant;

type Pair = (&'static str, fn(&mut [f32]), fn(&mut [f64]));

fn main() {
    let n = 1 << 16;
    let x32: Vec<f32> = (0..n).map(|i| ((i * 7919) % 20000) as f32 * 0.004 - 60.0).collect();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let pairs: [Pair; 2] = [
        ("cast (bbb47a2)", old::exp_in_place, old::exp_f64_in_place),
        ("bits (180d791)", new::exp_in_place, new::exp_f64_in_place),
    ];
    for round in 0..3 {
        for (name, f32_exp, f64_exp) in pairs {
            let reps = 2000;
            let (mut v, mut w) = (x32.clone(), x64.clone());
            let t = Instant::now();
            for _ in 0..reps {
                v.copy_from_slice(&x32);
                f32_exp(&mut v);
                std::hint::black_box(&v);
            }
            let a = t.elapsed().as_secs_f64() / (reps * n) as f64 * 1e9;
            let t = Instant::now();
            for _ in 0..reps {
                w.copy_from_slice(&x64);
                f64_exp(&mut w);
                std::hint::black_box(&w);
            }
            let b = t.elapsed().as_secs_f64() / (reps * n) as f64 * 1e9;
            println!("round {round} {name}: f32 {a:.3} ns a value, f64 {b:.3} ns a value");
        }
    }
    let (mut a, mut b) = (vec![0f32; 1 << 20], vec![0f32; 1 << 20]);
    for chunk in 0u64..(1 << 12) {
        for (i, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
            let v = f32::from_bits(((chunk << 20) | i as u64) as u32);
            (*x, *y) = (v, v);
        }
        old::exp_in_place(&mut a);
        new::exp_in_place(&mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "chunk {chunk}");
    }
    println!("all 2^32 f32 inputs: the same bits");
}
RS
(cd "$dir" && cargo run --release -q)
rm -rf "$dir"
