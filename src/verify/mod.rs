//! The answer verifier: does a model's response hold the gold answer? It is the correctness term
//! c of the reward (METHOD.md §3) and the judge of `thinkshort eval` (§7), and it follows HF
//! math-verify: numbers in any notation, LaTeX forms, tuples/intervals/sets/matrices, equations
//! against their value, and expressions equal at random points.
//!
//! `extract` finds the answer text, `latex` cleans it, `answer` gives it a shape and compares
//! shapes, `expr` parses and evaluates expressions, `numeric` holds complex arithmetic.

mod answer;
mod expr;
mod extract;
mod latex;
mod numeric;

pub use extract::tag_span;

/// How deeply an answer may nest before the verifier reads it as text it cannot parse: levels of
/// brackets, braces, `\frac`/`\sqrt` arguments, signs, exponents, function arguments, nested
/// tuples, sets, matrices and relations, and levels of the expression tree (a chain like
/// `1+2+3` is a tree as deep as it is long). The verifier recurses once per level, so without a
/// bound deep input would overflow the stack; real answers stay far below it.
const MAX_DEPTH: usize = 100;

/// Which fallbacks `extract_answer` may use when the response has no `<answer>…</answer>` span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractOptions {
    /// Fall back to the last `\boxed{}`.
    pub boxed_fallback: bool,
    /// Then fall back to the last number.
    pub number_fallback: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            boxed_fallback: true,
            number_fallback: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// The answer text found in the response, if any.
    pub extracted: Option<String>,
    pub correct: bool,
}

/// The answer in a response: the first well-formed `<answer>…</answer>` span, else (if enabled)
/// the last `\boxed{}`, else (if enabled) the last number.
pub fn extract_answer(response: &str, opts: &ExtractOptions) -> Option<String> {
    if let Some(a) = extract::answer_tag(response) {
        return Some(a);
    }
    if opts.boxed_fallback {
        if let Some(b) = extract::last_boxed(response) {
            return Some(b);
        }
    }
    if opts.number_fallback {
        return extract::last_number(response);
    }
    None
}

/// Whether an extracted answer is equivalent to the gold answer.
pub fn answers_match(extracted: &str, gold: &str) -> bool {
    let (e, g) = (latex::clean(extracted), latex::clean(gold));
    if e.is_empty() || g.is_empty() {
        return false;
    }
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    if squash(&e) == squash(&g) {
        return true;
    }
    let (ea, ga) = (answer::parse(&e), answer::parse(&g));
    if answer::equiv(&ea, &ga) {
        return true;
    }
    // Prose around a value ("The answer is 5 apples"): judge its last number, as math-verify
    // judges the last expression it can read. A matrix is not prose, though its environment's
    // name reads as a word: it never equals its last entry.
    if answer::is_prose(&e) && !answer::is_prose(&g) && !answer::writes_a_matrix(&e) {
        if let Some(n) = extract::last_number(&e) {
            return answer::equiv(&answer::parse(&latex::clean(&n)), &ga);
        }
    }
    false
}

/// Extracts the answer from `response` and compares it with `gold`.
pub fn verify(response: &str, gold: &str, opts: &ExtractOptions) -> Verdict {
    let extracted = extract_answer(response, opts);
    let correct = extracted.as_deref().is_some_and(|e| answers_match(e, gold));
    Verdict { extracted, correct }
}
