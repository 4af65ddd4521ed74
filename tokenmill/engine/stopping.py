"""Token-level stop checks, run after each token is appended to a sequence.

Stop strings work on text, not tokens, so they belong to the detokenizer
(``IncrementalDetokenizer``), which also holds back text that could start one.
"""

from __future__ import annotations

from tokenmill.engine.request import FinishReason, Sequence
from tokenmill.sampling_params import SamplingParams


def check_stop(seq: Sequence, params: SamplingParams, eos_token_ids: list[int],
               max_model_len: int) -> tuple[FinishReason, str | int | None] | None:
    """Why ``seq`` must end after its last token, or None to go on.

    Returns (STOP, None) for EOS (unless ignore_eos), (STOP, token id) for a stop_token_id,
    and (LENGTH, None) at max_tokens or when the sequence fills the context (max_model_len).
    EOS and stop ids count only from output index min_tokens on, the same rule as the
    sampler's mask (it forbids them while fewer than min_tokens tokens are out).
    """
    num_output = seq.num_output_tokens
    if num_output > params.min_tokens:
        last = seq.token_ids[-1]
        if not params.ignore_eos and last in eos_token_ids:
            return FinishReason.STOP, None
        if last in params.stop_token_ids:
            return FinishReason.STOP, last
    if params.max_tokens is not None and num_output >= params.max_tokens:
        return FinishReason.LENGTH, None
    if seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None
