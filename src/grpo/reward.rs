//! The reward of one completion (METHOD.md §3):
//!     r = λc·c + λℓ·R_len(ℓ; L) + λf·(α_think·I_think + α_answer·I_answer),   L = B(t).
//! Correctness arrives as a bool (the caller runs the answer verifier, which reads the text of
//! the first well-formed `<answer>…</answer>` span, [`tag_span`], the span I_answer looks for).

use serde::{Deserialize, Serialize};

pub use crate::verify::tag_span;

/// The shape of the length reward R_len (Rmax = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LengthShape {
    /// ℓ/L up to L, then (2L − ℓ)/L down to 0 at 2L (paper default).
    #[default]
    Triangular,
    /// 1 up to L, then the same linear drop to 0 at 2L (paper ablation).
    Band,
}

/// R_len(ℓ; L) in [0, 1]. A budget of 0 is treated as 1 (the curricula never produce 0).
pub fn length_reward(len: usize, budget: usize, shape: LengthShape) -> f64 {
    let l = budget.max(1);
    if len > 2 * l {
        return 0.0;
    }
    let (len, l) = (len as f64, l as f64);
    if len <= l {
        match shape {
            LengthShape::Triangular => len / l,
            LengthShape::Band => 1.0,
        }
    } else {
        (2.0 * l - len) / l
    }
}

/// I_think: the completion holds a well-formed `<think>…</think>` span.
pub fn has_think(text: &str) -> bool {
    tag_span(text, "think").is_some()
}

/// I_answer: the completion holds a well-formed `<answer>…</answer>` span.
pub fn has_answer(text: &str) -> bool {
    tag_span(text, "answer").is_some()
}

/// λc, λℓ, λf and the format split α_think, α_answer (METHOD.md §3 defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardWeights {
    pub correct: f64,
    pub length: f64,
    pub format: f64,
    pub think: f64,
    pub answer: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights {
            correct: 0.6,
            length: 0.3,
            format: 0.1,
            think: 0.5,
            answer: 0.5,
        }
    }
}

/// The reward's components before the λ weights (each in [0, 1] with the default α's), so logs
/// read the same whatever the weights; `total` is the weighted sum.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RewardParts {
    /// c ∈ {0, 1}.
    pub correct: f64,
    /// R_len(ℓ; L).
    pub length: f64,
    /// α_think·I_think + α_answer·I_answer.
    pub format: f64,
    /// λc·correct + λℓ·length + λf·format.
    pub total: f64,
}

/// The reward of one completion of `len` tokens and text `text` under budget L = `budget`.
pub fn reward(
    correct: bool,
    len: usize,
    budget: usize,
    text: &str,
    w: &RewardWeights,
    shape: LengthShape,
) -> RewardParts {
    let c = if correct { 1.0 } else { 0.0 };
    let length = length_reward(len, budget, shape);
    let indicator = |b: bool| if b { 1.0 } else { 0.0 };
    let format = w.think * indicator(has_think(text)) + w.answer * indicator(has_answer(text));
    RewardParts {
        correct: c,
        length,
        format,
        total: w.correct * c + w.length * length + w.format * format,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_content_is_taken_verbatim() {
        let text = "<think>línea 1\nline 2</think>\n<answer>\\frac{1}{2}</answer>";
        assert_eq!(tag_span(text, "think"), Some("línea 1\nline 2"));
        assert_eq!(tag_span(text, "answer"), Some("\\frac{1}{2}"));
        assert_eq!(tag_span("<answer></answer>", "answer"), Some(""));
        // A later stray open tag after a complete span does not undo it.
        assert_eq!(tag_span("<answer>3</answer><answer>", "answer"), Some("3"));
        // Stray tags before the span: the span is the one the first closing tag ends.
        assert_eq!(
            tag_span("</answer> <answer>7</answer>", "answer"),
            Some("7")
        );
        assert_eq!(
            tag_span("<answer>1 <answer>7</answer>", "answer"),
            Some("7")
        );
        assert_eq!(tag_span("</answer><answer>", "answer"), None);
    }
}
