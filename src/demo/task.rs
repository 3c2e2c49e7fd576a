//! The demo's reasoning task: chains of 2–4 additions and subtractions of integers 0–20, with
//! every partial result in 0..=99, e.g. "7 + 5 - 3 + 9".
//!
//! The SFT completions make the length trade-off real:
//! - the step-by-step part ("7 + 5 = 12 . 12 - 3 = 9 . 9 + 9 = 18 .") is what a ~1M-parameter
//!   model needs: it cannot add four numbers in one go, but it can do one small sum per step;
//! - the "check :" part recomputes the same chain once more; it is pure redundancy (it always
//!   agrees with the steps), so a policy can drop it at no cost in accuracy;
//! - cutting below the steps' length means skipping partial results, which costs accuracy.
//!
//! Every text is space-separated words, so the demo's word-level tokenizer (`vocab.rs`)
//! round-trips it exactly, one token per word.

use crate::rng::{self, Philox};

/// The demo prompt; `{question}` and `{budget}` are filled by `crate::prompt::PromptTemplate`.
/// The budget is one number token, so it must be at most `vocab::MAX_NUMBER`.
pub const PROMPT_TEMPLATE: &str = "compute : {question} . budget : {budget} tokens .";

/// Operations per problem, inclusive.
pub const MIN_OPS: usize = 2;
pub const MAX_OPS: usize = 4;
/// Operands are drawn from 0..=MAX_OPERAND; every partial result lies in 0..=MAX_VALUE.
pub const MAX_OPERAND: i64 = 20;
pub const MAX_VALUE: i64 = 99;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Space-separated: "7 + 5 - 3 + 9".
    pub question: String,
    pub answer: i64,
}

impl Problem {
    /// The gold answer as the verifier compares it: the integer as text.
    pub fn gold(&self) -> String {
        self.answer.to_string()
    }
}

/// How much reasoning a completion writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// The steps only: the shortest text that still shows every partial result.
    Short,
    /// The steps, then `checks` redundant recomputations ("check : " + the steps again).
    /// `Long { checks: 0 }` is the same text as `Short`.
    Long { checks: usize },
}

/// Problem `index` of the set drawn with `seed`. Each problem has its own Philox stream, so it
/// depends only on (seed, index), never on which other problems were generated.
pub fn problem(seed: u64, index: u64) -> Problem {
    let mut rng = Philox::new(seed, index);
    // Rejection sampling: redraw the whole chain until every partial result is in range.
    loop {
        let num_ops = MIN_OPS + pick(&mut rng, (MAX_OPS - MIN_OPS + 1) as u64) as usize;
        let mut value = pick(&mut rng, MAX_OPERAND as u64 + 1) as i64;
        let mut question = value.to_string();
        let mut in_range = true;
        for _ in 0..num_ops {
            let add = rng.next_uniform() < 0.5;
            let operand = pick(&mut rng, MAX_OPERAND as u64 + 1) as i64;
            value = if add {
                value + operand
            } else {
                value - operand
            };
            in_range &= (0..=MAX_VALUE).contains(&value);
            question.push_str(if add { " + " } else { " - " });
            question.push_str(&operand.to_string());
        }
        if in_range {
            return Problem {
                question,
                answer: value,
            };
        }
    }
}

/// Problems 0..count of the set drawn with `seed`.
pub fn problems(seed: u64, count: u64) -> Vec<Problem> {
    (0..count).map(|i| problem(seed, i)).collect()
}

/// A uniform integer in 0..n.
fn pick(rng: &mut Philox, n: u64) -> u64 {
    ((rng.next_uniform() * n as f64) as u64).min(n - 1)
}

/// The style of SFT example `index`: the mix that teaches long, partly redundant reasoning,
/// with enough spread in length for GRPO to find the shorter forms by sampling:
/// 15% `Short`, 50% one check, 35% two checks.
pub fn sft_style(seed: u64, index: u64) -> Style {
    // The last draw of the problem's own stream: rejection sampling never gets that far.
    let u = rng::uniform(seed, index, u64::MAX);
    match u {
        u if u < 0.15 => Style::Short,
        u if u < 0.65 => Style::Long { checks: 1 },
        _ => Style::Long { checks: 2 },
    }
}

/// The completion the SFT model imitates (without the EOS token that ends it):
/// "<think> STEPS [check : STEPS]... </think> <answer> N </answer>".
pub fn sft_completion(p: &Problem, style: Style) -> String {
    let steps = steps(&p.question);
    let checks = match style {
        Style::Short => 0,
        Style::Long { checks } => checks,
    };
    let mut think = steps.clone();
    for _ in 0..checks {
        think.push_str(" check : ");
        think.push_str(&steps);
    }
    format!("<think> {think} </think> <answer> {} </answer>", p.answer)
}

/// "7 + 5 - 3" -> "7 + 5 = 12 . 12 - 3 = 9 .": one step per operation, each starting from the
/// previous partial result.
fn steps(question: &str) -> String {
    let bad = || panic!("not a demo question: {question:?}");
    let mut words = question.split(' ');
    let mut value: i64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(bad);
    let mut out = Vec::new();
    while let Some(op) = words.next() {
        let operand: i64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(bad);
        let next = match op {
            "+" => value + operand,
            "-" => value - operand,
            _ => bad(),
        };
        out.push(format!("{value} {op} {operand} = {next} ."));
        value = next;
    }
    out.join(" ")
}
