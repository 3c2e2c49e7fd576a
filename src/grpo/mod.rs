//! The pure math of GRPO (METHOD.md §3–5), free of model code: the reward of one completion,
//! group-normalised advantages, and the clipped policy loss with its gradient per token.
//! Everything is f64; callers convert model log-probs in and gradients out.

pub mod advantage;
pub mod policy_loss;
pub mod reward;

pub use advantage::{advantages, keep_mixed_groups, AdvantageOptions, Scale, StdKind};
pub use policy_loss::{
    completion_weights, included_completions, included_counts, policy_loss, token_loss,
    Aggregation, Clip, LossBatch, LossOptions, LossOutput, LossStats, TokenLoss, Truncated,
};
pub use reward::{
    has_answer, has_think, length_reward, reward, tag_span, LengthShape, RewardParts, RewardWeights,
};
