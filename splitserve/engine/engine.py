"""The in-process engine: schedule -> run -> postprocess, with no sockets.

Services wrap it: a prefill server runs it in the PREFILL role (prefill, then hold KV blocks for
export), a decode server in the DECODE role (import KV blocks, then decode), and a colocated worker
does both.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import structlog
import torch

from splitserve.engine.block_manager import BlockManager, OutOfBlocks
from splitserve.engine.config import EngineConfig, EngineRole
from splitserve.engine.kv_cache import KVCache, KVLayout
from splitserve.engine.loader import ModelSource, iter_weights, load_weights, resolve_model
from splitserve.engine.models.llama import LlamaModel, ModelSpec, rope_cos_sin
from splitserve.engine.request import (
    FinishReason,
    RequestState,
    SamplingParams,
    Sequence,
    StepOutput,
)
from splitserve.engine.ops import select_ops
from splitserve.engine.runner import ModelRunner
from splitserve.engine.sampler import make_generator, sample, suppress_stop_tokens
from splitserve.engine.scheduler import Scheduler, SchedulerConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """Weights, tokenizer and shape of a model, loadable once and shared by engines in a process."""

    source: ModelSource
    spec: ModelSpec
    model: LlamaModel
    tokenizer: object
    eos_token_ids: frozenset[int]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def load(cls, config: EngineConfig) -> LoadedModel:
        from transformers import AutoConfig, AutoTokenizer

        started = time.monotonic()
        source = resolve_model(config.model)
        hf_config = AutoConfig.from_pretrained(source.path)
        spec = ModelSpec.from_hf_config(hf_config)
        ops = select_ops(config.torch_device, config.torch_dtype, spec.head_dim,
                         spec.num_heads // spec.num_kv_heads)
        with torch.device("meta"):
            model = LlamaModel(spec, ops)
        model = model.to_empty(device=config.torch_device).to(config.torch_dtype)
        model.tie_weights()  # to_empty() unties parameters that were created on the meta device
        cos, sin = rope_cos_sin(hf_config, spec, config.torch_dtype)
        model.set_rope(cos.to(config.torch_device), sin.to(config.torch_device))
        load_weights(model, iter_weights(source.path))
        ops.prepare(model)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        log.info("model loaded", model=source.name, path=str(source.path), dtype=config.dtype,
                 device=config.device, ops=ops.name, seconds=round(time.monotonic() - started, 2))
        return cls(source, spec, model, tokenizer, _eos_ids(source, tokenizer), config.torch_dtype,
                   config.torch_device)


def _eos_ids(source: ModelSource, tokenizer) -> frozenset[int]:
    """EOS ids from the tokenizer and generation_config.json (which may list several)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        configured = GenerationConfig.from_pretrained(source.path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    return frozenset(ids)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded or LoadedModel.load(config)
        if (self.loaded.dtype, self.loaded.device) != (config.torch_dtype, config.torch_device):
            raise ValueError(
                f"the loaded model is {self.loaded.dtype} on {self.loaded.device}, but this engine is "
                f"configured for {config.torch_dtype} on {config.torch_device}"
            )
        spec = self.loaded.spec
        self.layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim,
                               config.block_size, config.torch_dtype)
        num_blocks = config.kv_cache_bytes // self.layout.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes {config.kv_cache_bytes} holds no {self.layout.bytes_per_block}-byte block")
        self.cache = KVCache(self.layout, num_blocks, config.torch_device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(SchedulerConfig(config.token_budget, config.max_num_seqs), self.blocks)
        self.runner = ModelRunner(self.loaded.model, self.cache, config.torch_device)
        self.max_model_len = min(config.max_model_len or spec.max_position_embeddings,
                                 spec.max_position_embeddings, spec.sliding_window or spec.max_position_embeddings)
        if spec.sliding_window and spec.sliding_window < (config.max_model_len or spec.max_position_embeddings):
            log.info("context capped at the sliding window", max_model_len=self.max_model_len)
        self.sequences: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._generate_ids = itertools.count()

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request for prefill. Raises ValueError for input the engine cannot serve."""
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        self.scheduler.add(seq)
        return seq

    def _new_sequence(self, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(prompt) + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {self.max_model_len} tokens"
            )
        if any(not 0 <= t < self.loaded.spec.vocab_size for t in prompt):
            raise ValueError("prompt contains a token id outside the vocabulary")
        seq = Sequence(request_id, list(prompt), params)
        self.sequences[request_id] = seq
        self._generators[request_id] = make_generator(params.seed)
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free everything it holds."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return
        self.scheduler.remove(seq)
        seq.finish_reason = FinishReason.ABORT
        self._retire(seq, RequestState.ABORTED)

    def _retire(self, seq: Sequence, state: RequestState) -> None:
        # Every exit path frees the request's blocks here, so nothing leaks on finish or abort.
        self.blocks.free(seq.request_id)
        seq.transition(state)
        self.sequences.pop(seq.request_id, None)
        self._generators.pop(seq.request_id, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the loop -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One forward pass: a prefill batch if any request waits (vLLM's order), else a decode step."""
        if self.config.role is not EngineRole.DECODE:
            batch = self.scheduler.schedule_prefill()
            if batch:
                return self._run_prefill(batch)
        return self.decode_step()

    @torch.inference_mode()
    def prefill_step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule_prefill()
        return self._run_prefill(batch) if batch else []

    @torch.inference_mode()
    def decode_step(self) -> list[StepOutput]:
        batch, preempted = self.scheduler.schedule_decode()
        for seq in preempted:
            log.info("preempted", request_id=seq.request_id, free_blocks=self.blocks.num_free_blocks)
        if not batch:
            return []
        logits = self.runner.decode(batch, [self.blocks.block_table(s.request_id) for s in batch])
        for seq in batch:
            seq.num_computed_tokens = seq.num_tokens
        return self._postprocess(batch, logits)

    def _run_prefill(self, batch: list[Sequence]) -> list[StepOutput]:
        logits = self.runner.prefill(batch, [self.blocks.block_table(s.request_id) for s in batch])
        for seq in batch:
            seq.num_computed_tokens = seq.num_tokens
        outputs = self._postprocess(batch, logits)
        for seq in batch:
            if seq.is_finished:
                continue
            if self.config.role is EngineRole.PREFILL:
                seq.transition(RequestState.KV_READY)  # parked until export + release
            else:
                seq.transition(RequestState.DECODING)
                self.scheduler.running.append(seq)
        return outputs

    def _postprocess(self, batch: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        suppress_stop_tokens(logits, batch, self.loaded.eos_token_ids)
        tokens = sample(logits, batch, self._generators)
        outputs = []
        for seq, token in zip(batch, tokens):
            seq.output_token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                if seq in self.scheduler.running:
                    self.scheduler.running.remove(seq)
                self._retire(seq, RequestState.FINISHED)
            outputs.append(StepOutput(seq.request_id, token, reason))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_new_tokens:
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.loaded.eos_token_ids):
                return FinishReason.STOP
        if seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- disaggregation -------------------------------------------------------------------------

    def export_kv(self, request_id: str) -> torch.Tensor:
        """The KV blocks of a prefilled (KV_READY) request, as one contiguous tensor."""
        seq = self.sequences[request_id]
        if seq.state is not RequestState.KV_READY:
            raise ValueError(f"request {request_id!r} is {seq.state.value}, not kv_ready")
        return self.cache.export(self.blocks.block_table(request_id))

    def release(self, request_id: str) -> None:
        """Free a KV_READY request once its blocks have been pulled (or its lease ran out)."""
        seq = self.sequences.get(request_id)
        if seq is not None:
            self._retire(seq, RequestState.FINISHED)

    def reserve(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                params: SamplingParams) -> list[int]:
        """Reserve destination blocks for a request whose prompt was prefilled elsewhere.

        Raises OutOfBlocks when there is no room; the caller retries later.
        """
        num_cached = len(prompt_token_ids)
        if not self.blocks.can_allocate(num_cached):
            raise OutOfBlocks(f"{num_cached} tokens do not fit {self.blocks.num_free_blocks} free blocks")
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        seq.output_token_ids = list(output_token_ids)
        seq.transition(RequestState.TRANSFERRING)
        return self.blocks.allocate(request_id, num_cached)

    def import_kv(self, request_id: str, blocks: torch.Tensor) -> None:
        """Write the pulled blocks into the reserved ones and start decoding the request."""
        seq = self.sequences[request_id]
        self.cache.import_(self.blocks.block_table(request_id), blocks)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.transition(RequestState.DECODING)
        self.scheduler.running.append(seq)

    # -- convenience ----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion together; returns each one's output token ids."""
        seqs = [self.add_request(f"generate-{next(self._generate_ids)}", p, params) for p in prompts]
        while self.has_work:
            self.step()
        return [s.output_token_ids for s in seqs]
