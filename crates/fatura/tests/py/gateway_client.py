"""Drives the fatura gateway with the official `openai` package, as a real client would.

Usage: gateway_client.py BASE_URL API_KEY SCENARIO [JSON_ARGS]
Prints one JSON object with what the client saw.
"""
import json
import sys

import openai
from openai import OpenAI


def chunk_view(chunk):
    d = chunk.model_dump(exclude_none=True)
    d.pop("id", None)
    return d


def main():
    base, key, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=30)
    model = args.get("model", "gpt-4o")
    messages = [{"role": "user", "content": args.get("content", "hello there world")}]
    headers = args.get("headers", {})
    extra = {"mock": args["mock"]} if "mock" in args else None
    out = {}
    try:
        if scenario == "chat":
            r = client.chat.completions.create(model=model, messages=messages, extra_headers=headers,
                                               extra_body=extra, user=args.get("user"),
                                               max_tokens=args.get("max_tokens"))
            d = r.model_dump(exclude_none=True)
            d.pop("id", None)
            out = {"response": d}
        elif scenario in ("stream", "stream_usage"):
            kwargs = {}
            if scenario == "stream_usage":
                kwargs["stream_options"] = {"include_usage": True}
            s = client.chat.completions.create(model=model, messages=messages, stream=True, extra_headers=headers,
                                               extra_body=extra, **kwargs)
            out = {"chunks": [chunk_view(c) for c in s]}
        elif scenario == "disconnect":
            s = client.chat.completions.create(model=model, messages=messages, stream=True, extra_body=extra)
            seen = []
            for c in s:
                seen.append(chunk_view(c))
                if len(seen) >= args.get("after", 3):
                    break
            s.response.close()
            out = {"chunks": seen}
        elif scenario == "embeddings":
            r = client.embeddings.create(model=model, input=args.get("input", ["one two three", "four five"]))
            out = {"usage": r.usage.model_dump(), "count": len(r.data)}
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    except openai.APIStatusError as e:
        out = {"status_error": e.status_code, "body": e.body}
    except openai.APIError as e:
        out = {"api_error": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
