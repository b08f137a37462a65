"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)), LLM.chat(messages)."""

from __future__ import annotations

import itertools
from typing import Any

from runtime.config import ConfigError, EngineConfig, default_model_path
from runtime.detokenizer import IncrementalDetokenizer
from runtime.engine.llm_engine import LLMEngine
from runtime.messages import AddRequest
from runtime.model_source import generation_defaults
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
        self._decoder = fast_decoding(self.tokenizer)  # same text, without transformers' Python decode wrapper
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
        children: dict[str, tuple[RequestOutput, CompletionOutput, IncrementalDetokenizer | None]] = {}
        for prompt, params in zip(prompts, params_list):
            text, ids = self._encode(prompt)
            out = RequestOutput(request_id=str(next(self._ids)), prompt=text, prompt_token_ids=ids)
            results.append(out)
            for i in range(params.n):
                child = msgspec_replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                rid = f"{out.request_id}-{i}"
                completion = CompletionOutput(index=i, text="", token_ids=[])
                if child.logprobs is not None:
                    completion.logprobs = []
                out.outputs.append(completion)
                detok = IncrementalDetokenizer(self._decoder, ids, child) if self.tokenizer is not None else None
                children[rid] = (out, completion, detok)
                self.engine.add_request(AddRequest(rid, ids, child))

        while self.engine.has_unfinished():
            for delta in self.engine.step():
                out, completion, detok = children[delta.request_id]
                completion.token_ids += delta.new_token_ids
                if delta.num_prompt_tokens:
                    out.num_cached_tokens = delta.num_cached_tokens
                if delta.prompt_logprobs is not None and out.prompt_logprobs is None:
                    out.prompt_logprobs = [None] + [{t: lp for t, lp, _ in e} for e in delta.prompt_logprobs]
                if delta.logprobs is not None and completion.logprobs is not None:
                    completion.logprobs += [dict(entry) for entry in delta.logprobs]
                stopped = False
                if detok is not None:
                    _, stopped = detok.update(delta.new_token_ids)
                    completion.text = detok.text
                if stopped:  # a stop string: the engine would not know, so end it here
                    self.engine.abort_requests([delta.request_id])
                    completion.finish_reason = "stop"
                    completion.stop_reason = detok.stop_reason if detok is not None else None
                elif delta.finish_reason is not None:
                    completion.finish_reason = delta.finish_reason
                    completion.stop_reason = delta.stop_reason
        for out in results:
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


def msgspec_replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(params, **changes)
