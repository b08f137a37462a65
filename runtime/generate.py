"""Quick try from the shell: python -m runtime.generate --model PATH --prompt "..." [--max-tokens N]."""

from __future__ import annotations

import argparse
import sys

from runtime.config import ConfigError, EngineConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = EngineConfig.from_cli(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from runtime.llm import LLM
    from runtime.sampling_params import SamplingParams

    fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
    llm = LLM(**fields)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens
    )
    prompts = args.prompt or ["The meaning of a mixture of experts is"]
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        print(f"--- {prompt!r}\n{out.outputs[0].text}\n[{len(out.outputs[0].token_ids)} tokens, "
              f"finish_reason={out.outputs[0].finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
