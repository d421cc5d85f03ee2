"""Rewards for RL editing methods: the exact world reward and CogniEdit's MLLM reward and instruction decomposition.

- `base`: the `RewardFn` protocol (batched NumPy, returns per-sample arrays with a 'reward' total).
- `world`: `WorldReward`, the synthetic world's verifier mapped onto CogniEdit's three [0, 5] scores.
- `mllm`: the judging prompt, a robust score parser, a standard-library OpenAI-compatible chat client, `MLLMReward`.
- `reasoning`: the decomposition prompt, the <info>/<think>/<answer>/<object> parser, `MLLMReasoner` and the exact
  offline `WorldReasoner`.
"""

from editing_jax.rewards.base import REWARD_KEY, RewardFn, check_batch, check_outputs
from editing_jax.rewards.mllm import (
    REWARD_PROMPT_TEMPLATE,
    SCORE_KEYS,
    ChatClient,
    ChatError,
    ChatRequest,
    MLLMReward,
    ParsedScores,
    ScoreParseError,
    encode_png_data_url,
    parse_scores,
)
from editing_jax.rewards.reasoning import (
    DECOMPOSITION_PROMPT,
    Decomposition,
    MLLMReasoner,
    WorldReasoner,
    decompose,
    parse_decomposition,
)
from editing_jax.rewards.world import WorldReward

__all__ = [
    "DECOMPOSITION_PROMPT",
    "REWARD_KEY",
    "REWARD_PROMPT_TEMPLATE",
    "SCORE_KEYS",
    "ChatClient",
    "ChatError",
    "ChatRequest",
    "Decomposition",
    "MLLMReasoner",
    "MLLMReward",
    "ParsedScores",
    "RewardFn",
    "ScoreParseError",
    "WorldReasoner",
    "WorldReward",
    "check_batch",
    "check_outputs",
    "decompose",
    "encode_png_data_url",
    "parse_decomposition",
    "parse_scores",
]
