"""`Verifier.Verify`: one bidirectional stream per generation session.

The stream's first message opens the session (prefill), every later one is a round.
Replies come in order. Whatever ends the stream (the client closing it, a
cancellation, a bad message, a server drain) frees the session's KV-cache row.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from grpc import aio

from cloud_node.engine import RoundOutcome, Session, VerifierEngine
from cloud_node.validation import parse_open, parse_round
from lm.hidden_codec import EncodedHidden
from protocol.errors import EdgecloudError, FailedPrecondition, InvalidRequest, ServerError
from protocol.v1 import verification_pb2 as pb
from protocol.v1 import verification_pb2_grpc as pb_grpc
from serving.errors import abort_with

log = logging.getLogger(__name__)


class VerifierService(pb_grpc.VerifierServicer):
    def __init__(self, engine: VerifierEngine) -> None:
        self.engine = engine

    async def Verify(
        self, request_iterator: AsyncIterator[pb.VerifyRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.VerifyResponse]:
        session: Session | None = None
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise FailedPrecondition("open: this stream already has a session")
                    request = parse_open(message.open, self.engine.config, self.engine.vocab_size)
                    session = await self.engine.open(request)
                    yield pb.VerifyResponse(
                        opened=pb.SessionOpened(
                            session_id=session.id,
                            context_length=len(request.context),
                            max_tree_nodes=self.engine.config.max_tree_nodes,
                            max_context=self.engine.config.max_context,
                            hidden=hidden_message(session.opened_hidden),
                        )
                    )
                elif kind == "round":
                    if session is None:
                        raise FailedPrecondition("round: open a session on this stream first")
                    request = parse_round(message.round, self.engine.config, self.engine.vocab_size)
                    outcome = await self.engine.verify(session, request)
                    yield result_message(request.round_id, outcome, self.engine)
                    async for step in self.engine.decode(session, request.decode_tokens):
                        yield result_message(request.round_id, step, self.engine)
                else:
                    raise InvalidRequest("kind: each message must set `open` or `round`")
        except EdgecloudError as error:
            await abort_with(context, error)
        except Exception:
            log.exception("verify stream failed", extra={"session": session and session.id})
            await abort_with(context, ServerError("internal error; the session was closed"))
        finally:
            if session is not None:
                self.engine.close(session, "stream ended")


def result_message(
    round_id: int, outcome: RoundOutcome, engine: VerifierEngine
) -> pb.VerifyResponse:
    """A round's reply, with the verifier's load and pass cost as `engine` has them now."""
    per_round, per_position = engine.cost.estimate()
    return pb.VerifyResponse(
        result=pb.RoundResult(
            round_id=round_id,
            accepted_nodes=outcome.acceptance.nodes,
            accepted_tokens=outcome.acceptance.tokens,
            bonus_token=outcome.acceptance.bonus,
            nodes_verified=outcome.nodes_verified,
            server_ms=outcome.server_ms,
            batch_size=outcome.batch_size,
            hidden=hidden_message(outcome.hidden),
            slo_unreachable=outcome.slo_unreachable,
            load=engine.busy.load(),
            pass_ms_per_round=per_round,
            pass_ms_per_position=per_position,
        )
    )


def hidden_message(hidden: EncodedHidden | None) -> pb.HiddenState | None:
    """None leaves the field unset: a session that did not ask pays no bytes."""
    if hidden is None:
        return None
    return pb.HiddenState(
        dim=hidden.dim, encoding=int(hidden.encoding), data=hidden.data, scale=hidden.scale
    )
