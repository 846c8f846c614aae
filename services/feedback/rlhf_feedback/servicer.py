"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

from rlhf.events.v1 import events_pb2
from rlhf.feedback.v1 import feedback_pb2, feedback_pb2_grpc

from .core import FeedbackCore, FeedbackItem

SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name

_THUMBS = {events_pb2.THUMB_UP: "up", events_pb2.THUMB_DOWN: "down"}
_CHOICES = {events_pb2.CHOICE_A: "a", events_pb2.CHOICE_B: "b", events_pb2.CHOICE_TIE: "tie"}


def item_from_proto(p: feedback_pb2.FeedbackItem) -> FeedbackItem:
    kind = p.WhichOneof("signal")
    fields: dict = {}
    if kind == "thumb":
        fields["thumb"] = _THUMBS.get(p.thumb, f"<enum {p.thumb}>")
    elif kind == "rating":
        fields["rating"] = (p.rating.value, p.rating.scale_min, p.rating.scale_max)
    elif kind == "pairwise":
        fields["other_generation_id"] = p.pairwise.other_generation_id
        fields["choice"] = _CHOICES.get(p.pairwise.choice, f"<enum {p.pairwise.choice}>")
    elif kind == "edit":
        fields["edited_response"] = p.edit.edited_response
    return FeedbackItem(feedback_id=p.feedback_id, generation_id=p.generation_id, comment=p.comment,
                        user_id=p.user_id, session_id=p.session_id, **fields)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, core: FeedbackCore):
        self.core = core

    async def Submit(self, request: feedback_pb2.SubmitRequest, context) -> feedback_pb2.SubmitResponse:
        results = await self.core.submit([item_from_proto(p) for p in request.items])
        return feedback_pb2.SubmitResponse(results=[feedback_pb2.ItemResult(feedback_id=r.feedback_id,
                                                                            duplicate=r.duplicate)
                                                    for r in results])

    async def GetStats(self, request, context) -> feedback_pb2.GetStatsResponse:
        counts = await self.core.stats()
        return feedback_pb2.GetStatsResponse(counts=[feedback_pb2.Count(kind=k, outcome=o, count=n)
                                                     for (k, o), n in sorted(counts.items())])


def add_to_server(servicer: FeedbackServicer, server) -> None:
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server)
