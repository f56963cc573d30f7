"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions.

Modules: `schema` (request parsing, response and error objects), `sse` (whole and
streamed responses), `app` (the routes), `server` (uvicorn in the caller's loop).

An ASGI app (Starlette, served by uvicorn inside the caller's event loop) in front of
any `Generation` backend given as two callables: `stream(GenerateRequest, timeout_s)`,
an async iterator of `GenerateChunk`s raising `EdgecloudError`s (the gateway's `route`,
or an edge's `EdgeRuntime.serve`), and `models()`. So the openai client,
AIPerf and GuideLLM work unchanged against the gateway or a single edge.

Requests map onto `GenerateRequest` through the SDK's `GenerateOptions`, so HTTP and
gRPC answer a bad field with the same message:

| OpenAI field          | here                                                          |
|-----------------------|---------------------------------------------------------------|
| prompt                | a string, or a list of token ids (models without a tokenizer);|
|                       | a list of one of either; more prompts than one: 400           |
| messages (chat)       | sent as `messages`; the edge renders its model's chat template|
|                       | (`lm.chat`; without one, "Role: content" turns)               |
| max_tokens            | default 16 (completions, as OpenAI); chat also reads          |
|                       | max_completion_tokens, default CHAT_MAX_TOKENS                |
| temperature           | default 1.0 as OpenAI (sampling); 0 is greedy, the only       |
|                       | setting where lossless output equals cloud_only token for     |
|                       | token; allowed [0, 100] (wider than OpenAI's [0, 2])          |
| top_p, seed, stop     | as OpenAI; stop is a string or up to 8 strings                |
| n, best_of, echo, ... | only their "off" values (UNSUPPORTED); anything else is a 400 |
|                       | (logprobs: the verifier sends no probabilities back)          |
| ignore_eos            | as vLLM's: generate past the end-of-sequence tokens, to       |
|                       | max_tokens or a stop string (load tools send it)              |
| user, metadata, ...   | IGNORED: accepted, no effect                                  |
| any other field       | a 400 naming it (`param`)                                     |

Extra fields: `mode` ("lossless" | "adaptive" | "edge_only" | "cloud_only"), `top_k`
(vLLM's -1 means off, like 0), `draft` {tree, width, depth}, `adaptive_threshold`,
`priority`, `tpot_slo_ms`, and `timeout` (seconds; default
`HttpConfig.default_timeout_s`). The openai client sends them with `extra_body={...}`.
`usage` counts the tokens returned (a stop string drops the tokens it starts in).

Responses follow OpenAI's schema; each choice also carries `token_ids` (as vLLM does),
and the response (streaming: its last chunk) an `edgecloud` object with every
`GenerationStats` field plus `tau`. Errors are OpenAI-style bodies,
`{"error": {"message", "type", "param", "code"}}`, with `code` the gRPC status name (a
model not served here: OpenAI's 404 "model_not_found") and `param` the field the
message starts with; statuses are in `serving.errors.HTTP_STATUS`. Every path
but /health (open, for load balancers) needs the bearer token, /metrics included.

Rollbacks: adaptive mode may later replace unverified tokens, which an append-only
OpenAI stream cannot express. In adaptive mode a stream therefore holds unverified
text back until a verified chunk follows it (rollbacks never reach past one) or the
generation ends; non-streaming responses apply rollbacks like the SDK does. Other modes
never roll back and stream every chunk at once (edge_only's are final unverified).
"""
