"""The limits of a request, written once: the SDK checks them before sending, the
servers on receipt (`protocol.validation`), and the verifier's sampling parameters are
held to the same ones. Plain constants: importing this pulls in nothing else."""

from __future__ import annotations

MAX_TOKENS = 1 << 20
MAX_TEMPERATURE = 100.0
INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**64
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
# Draft tree shapes and drafters are names the edge checks (it knows which it has);
# the SDK only checks that a name is one.
MAX_NAME_CHARS = 32
# Scheduling at the verifier: priority classes (lower first) and per-token targets.
MAX_PRIORITY = 100
MAX_TPOT_SLO_MS = 60_000.0
MAX_DRAFT_WIDTH = 16
MAX_DRAFT_DEPTH = 32
# Chat requests: the roles a message may have, how many messages, how long each.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_CHAT_MESSAGES = 256
MAX_MESSAGE_CHARS = 1 << 20
