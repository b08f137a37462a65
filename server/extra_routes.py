"""vLLM's small endpoints beside the generation ones: /tokenize, /detokenize, /version, /ping."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import FastAPI
from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from server.protocol import APIError, ChatMessage, _Strict, validation_error
from server.serving import Serving


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def _version() -> str:
    try:
        return metadata.version("moe-runtime")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def add_extra_routes(app: FastAPI, serving: Serving, read_json: Any) -> None:
    from server.endpoints import json_response
    from server.protocol import ChatCompletionRequest

    def parse(model: Any, body: Any) -> Any:
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as err:
            raise validation_error(err) from None

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = parse(TokenizeRequest, await read_json(request))
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give either prompt or messages", param="prompt")
        if req.messages is not None:
            chat = ChatCompletionRequest.model_validate(
                {"messages": [m.model_dump(exclude_none=True) for m in req.messages],
                 "add_generation_prompt": req.add_generation_prompt,
                 "continue_final_message": req.continue_final_message,
                 "chat_template_kwargs": req.chat_template_kwargs, "tools": req.tools}
            )
            ids = await serving.chat_prompt(chat, req.tools)
        else:
            ids = await serving.encode(req.prompt, "prompt", add_special_tokens=req.add_special_tokens)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [serving.token_text(t) for t in ids]
        return json_response(body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = parse(DetokenizeRequest, await read_json(request))
        serving.check_model(req.model)
        if serving.tokenizer is None:
            raise APIError("tokens: this model has no tokenizer", param="tokens")
        return json_response({"prompt": serving.decode(serving.check_token_ids(req.tokens, "tokens"))})

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": _version()})

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return Response(status_code=200)
