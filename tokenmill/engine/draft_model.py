"""DraftModelProposer: a smaller model with the target's tokenizer drafts k tokens ahead.

The draft model has its own paged KV cache (its own tensors and KVCacheManager, as many blocks
as the target's) and keeps, per target sequence, a shadow ``Sequence`` of what its cache holds.
Each step it first syncs every shadow with its target sequence: the tokens they share (the
target's tokens up to the last sync, plus the drafts the target accepted) keep their K/V, the
rest is truncated. Then it runs k forwards over the batch of candidates: the first feeds each
shadow its missing tokens (the accepted drafts and the target's own next token, or the whole
prompt the first time), the others one draft token each.

Drafts are drawn with the request's sampling controls applied to the draft's logits (the same
pipeline as the target's), from a generator of the proposer's own (seeded from the request's,
so a seeded request stays reproducible); their distribution q goes with them to the verifier.
Greedy requests draft the argmax, with no q (one-hot).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache import KVCacheTensors, resolve_kv_cache_dtype
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Sequence
from tokenmill.engine.sampler import (
    SampleRow,
    SamplingBatch,
    apply_penalties,
    apply_truncation,
    draw_uniforms,
    sample_with_uniforms,
)
from tokenmill.engine.step import DraftProposal, SpecCandidate
from tokenmill.model.attention import AttentionMetadata, SeqSlice
from tokenmill.model.loading import LoadedModel, load_model

# Mixed into the request's seed for the draft's own generator, so draft and verifier draw apart.
_DRAFT_SEED_SALT = 0x5DEECE66D


@dataclass
class _Shadow:
    """The draft model's view of one target sequence."""

    seq: Sequence  # token_ids: the target's tokens, then this step's drafts; num_computed: K/V held
    num_synced: int  # how many of seq.token_ids are the target's (the rest are drafts)
    generator: torch.Generator | None


class DraftModelProposer:
    """Drafts from a second, smaller model over its own paged KV cache."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCacheTensors, kv: KVCacheManager, k: int,
                 vocab_size: int, eos_token_ids: list[int], device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kv = kv
        self.k = k
        self.vocab_size = vocab_size  # the target's: draft logits are cut or padded to it
        self.eos_token_ids = eos_token_ids
        self.device = device
        self._shadows: dict[int, _Shadow] = {}

    @classmethod
    def load(cls, config: EngineConfig, target: LoadedModel, num_blocks: int, dtype: torch.dtype,
             device: torch.device) -> DraftModelProposer:
        """Load ``config.speculative_config.model``; ValueError when its tokenizer is not the target's."""
        spec = config.speculative_config
        draft = load_model(dataclasses.replace(config, model=spec.model, speculative_config=None), dtype, device)
        if draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab():
            raise ValueError(f"speculative_config: the draft model {spec.model!r} does not share the tokenizer "
                             f"of the target model {target.name!r} ({draft.tokenizer.vocab_size} vs "
                             f"{target.tokenizer.vocab_size} tokens, or different ids for them)")
        # the target's number of blocks, in the target's KV type (sized for it by the engine)
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, device)[0]
        cache = KVCacheTensors(draft.config, num_blocks, config.block_size, kv_dtype, device)
        eos = sorted(set(target.config.eos_token_ids) | set(target.tokenizer.eos_token_ids))
        return cls(draft.model, cache, KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=False),
                   spec.num_speculative_tokens, target.config.vocab_size, eos, device)

    @property
    def num_tracked(self) -> int:
        """Sequences whose K/V the draft cache holds."""
        return len(self._shadows)

    @torch.inference_mode()
    def propose(self, candidates: list[SpecCandidate], live_seq_ids: set[int]) -> dict[int, DraftProposal]:
        for seq_id in [i for i in self._shadows if i not in live_seq_ids]:
            self._drop(seq_id)
        work = [(c, self._sync(c.seq)) for c in candidates]
        drafts: dict[int, list[int]] = {c.seq.seq_id: [] for c, _ in work}
        probs: dict[int, list[torch.Tensor]] = {c.seq.seq_id: [] for c, _ in work}
        for _ in range(self.k):
            work = [(c, sh) for c, sh in work if len(drafts[c.seq.seq_id]) < min(self.k, c.max_drafts)]
            work = [(c, sh) for c, sh in work if self._make_room(sh)]
            if not work:
                break
            logits = self._forward([sh for _, sh in work])  # [B, V]
            tokens, q = self._draw(work, logits, drafts)
            for i, (c, sh) in enumerate(work):
                sh.seq.num_computed_tokens = sh.seq.num_tokens
                sh.seq.token_ids.append(tokens[i])
                drafts[c.seq.seq_id].append(tokens[i])
                if q is not None and q[i] is not None:
                    probs[c.seq.seq_id].append(q[i])
        return {seq_id: DraftProposal(ids, torch.stack(probs[seq_id]) if probs[seq_id] else None)
                for seq_id, ids in drafts.items() if ids}

    # ---- keeping the draft cache in step with the target ------------------------------------

    def _sync(self, target: Sequence) -> _Shadow:
        """The shadow of target, holding K/V only for the tokens it shares with target now."""
        sh = self._shadows.get(target.seq_id)
        if sh is None:
            generator = None
            if target.generator is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed((target.generator.initial_seed() ^ _DRAFT_SEED_SALT) % (1 << 63))
            sh = self._shadows[target.seq_id] = _Shadow(Sequence(target.seq_id, [], 0), 0, generator)
        shared = sh.num_synced
        old, new = sh.seq.token_ids, target.token_ids
        while shared < min(len(old), len(new)) and old[shared] == new[shared]:
            shared += 1
        keep = min(shared, sh.seq.num_computed_tokens)
        self.kv.truncate(sh.seq, keep)
        sh.seq.num_computed_tokens = keep
        sh.seq.token_ids = list(new)
        sh.num_synced = len(new)
        return sh

    def _make_room(self, sh: _Shadow) -> bool:
        """Slots for sh's uncomputed tokens; False (and sh dropped) when the draft cache is full."""
        if self.kv.allocate_slots(sh.seq, sh.seq.num_tokens - sh.seq.num_computed_tokens) is not None:
            return True
        self._drop(sh.seq.seq_id)
        return False

    def _drop(self, seq_id: int) -> None:
        sh = self._shadows.pop(seq_id, None)
        if sh is not None:
            self.kv.free(sh.seq)

    # ---- one draft forward and its tokens ---------------------------------------------------

    def _forward(self, shadows: list[_Shadow]) -> torch.Tensor:
        """Feed each shadow its uncomputed tokens in one forward; logits at each one's last token [B, V]."""
        fed = [sh.seq.num_tokens - sh.seq.num_computed_tokens for sh in shadows]
        order = sorted(range(len(shadows)), key=lambda i: fed[i] != 1)
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        last = [0] * len(shadows)
        for i in order:  # single-token feeds first: the attention metadata wants decodes in front
            seq = shadows[i].seq
            start, end = seq.num_computed_tokens, seq.num_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slices.append(SeqSlice(self.kv.block_table(seq), start, end - start))
            last[i] = len(ids) - 1
        dev = self.device
        meta = AttentionMetadata.build(slices, self.kv.block_size, dev)
        hidden = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                                    self.kv_cache.layers, meta)
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=dev)]).float()
        if logits.shape[-1] > self.vocab_size:
            logits = logits[:, :self.vocab_size]
        elif logits.shape[-1] < self.vocab_size:
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=-torch.inf)
        return logits

    def _draw(self, work: list[tuple[SpecCandidate, _Shadow]], logits: torch.Tensor,
              drafts: dict[int, list[int]]) -> tuple[list[int], list[torch.Tensor | None] | None]:
        """Each row's draft token under its request's controls, and q for the sampled rows."""
        rows = [SampleRow(c.params, c.seq.prompt_token_ids, c.seq.output_token_ids + drafts[c.seq.seq_id],
                          sh.generator) for c, sh in work]
        batch = SamplingBatch.build(rows, self.vocab_size, self.eos_token_ids, logits.device)
        processed = apply_penalties(logits, batch)
        if batch.all_greedy:
            return processed.argmax(dim=-1).tolist(), None
        final = apply_truncation(processed, batch)
        tokens = sample_with_uniforms(final, draw_uniforms(batch.generators, batch.greedy_rows, logits.device))
        tokens = torch.where(batch.greedy, processed.argmax(dim=-1), tokens)
        q = final.softmax(dim=-1)
        return tokens.tolist(), [None if g else q[i] for i, g in enumerate(batch.greedy_rows)]
