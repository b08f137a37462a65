"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)), LLM.chat(messages)."""

from __future__ import annotations

import itertools
from typing import Any

from runtime.config import ConfigError, EngineConfig, default_model_path
from runtime.engine.llm_engine import LLMEngine
from runtime.messages import AddRequest
from runtime.model_source import generation_defaults
from runtime.output_processor import RequestState, detokenizer, fan_out
from runtime.outputs import CompletionOutput, RequestOutput
from runtime.sampling_params import SamplingParams
from runtime.tokenizer import apply_chat_template, fast_decoding, load_tokenizer

Prompt = str | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.config = EngineConfig(model=model or default_model_path(), **engine_args)
        if self.config.tensor_parallel_size * self.config.data_parallel_size > 1:
            raise ConfigError("the offline LLM runs one engine rank in this process: for tensor or data "
                              "parallelism serve the model with python -m runtime.serve -tp N / -dp N")
        self.engine = LLMEngine(self.config)
        self.tokenizer = load_tokenizer(self.config.tokenizer_path)
        # same text, without transformers' Python decode wrapper; None: no tokenizer, no text
        self._decoder = fast_decoding(self.tokenizer) if self.tokenizer is not None else None
        self._special_ids: set[int] = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        self._ids = itertools.count()

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} prompts")
        return prompt, self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:  # the checkpoint's generation_config.json defaults, as vLLM's LLM does
            sampling_params = SamplingParams(**generation_defaults(self.config.generation_config, self.config.model))
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")

        results: list[RequestOutput] = []
        states: dict[str, tuple[RequestOutput, RequestState]] = {}
        for prompt, params in zip(prompts, params_list):
            text, ids = self._encode(prompt)
            out = RequestOutput(request_id=str(next(self._ids)), prompt=text, prompt_token_ids=ids)
            results.append(out)
            for i, child in enumerate(fan_out(params, params.n)):
                rid = f"{out.request_id}-{i}"
                states[rid] = (out, RequestState(i, rid, ids, child, detokenizer(self._decoder, ids, child),
                                                 special_ids=self._special_ids))
                self.engine.add_request(AddRequest(rid, ids, child))

        while self.engine.has_unfinished():
            for delta in self.engine.step():
                _, state = states[delta.request_id]
                if state.finished:
                    continue  # ended by a stop string; the engine's last outputs are moot
                if state.apply(delta)[1]:  # a stop string: the engine would not know, so end it here
                    self.engine.abort_requests([delta.request_id])
        for out, state in states.values():
            out.num_cached_tokens = state.num_cached_tokens
            if state.prompt_logprobs is not None and out.prompt_logprobs is None:
                out.prompt_logprobs = [None] + [{t: lp for t, lp, _ in e} for e in state.prompt_logprobs]
            logprobs = [dict(e) for e in state.logprobs] if state.params.logprobs is not None else None
            out.outputs.append(CompletionOutput(state.index, state.text, state.token_ids, state.finish_reason,
                                                state.stop_reason, logprobs))
            out.finished = True
        return results

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            {"prompt_token_ids": apply_chat_template(self.tokenizer, conv, chat_template, add_generation_prompt)}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params)

    def get_tokenizer(self) -> Any:
        return self.tokenizer
