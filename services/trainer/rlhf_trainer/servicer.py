"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import asyncio

from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from .core import Trainer


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def _status(self) -> trainer_pb2.StatusResponse:
        t = self.trainer
        e = t.last_eval
        last_eval = None if e is None else trainer_pb2.EvalStats(
            step=e.step, version=e.version, win_rate=e.win_rate, kl=e.kl, response_length=e.response_length,
            reward_mean=e.reward_mean, baseline_reward_mean=e.baseline_reward_mean, prompts=e.prompts)
        p = t.progress
        return trainer_pb2.StatusResponse(
            last_eval=last_eval,
            step=p.step,
            version=p.version,
            paused=t.paused.is_set(),
            rollouts_consumed=p.rollouts_consumed,
            groups_consumed=p.groups_consumed,
            algorithm=t.cfg.algorithm,
            recent=[
                trainer_pb2.StepStats(
                    step=s.step, version=s.version, reward_mean=s.reward_mean, reward_std=s.reward_std, kl=s.kl,
                    loss=s.loss, response_length_mean=s.response_length_mean,
                    version_lag_mean=s.version_lag_mean, step_seconds=s.step_seconds, rollouts=s.rollouts,
                    clip_fraction=s.clip_fraction, entropy=s.entropy, value_loss=s.value_loss, kl_beta=s.kl_beta,
                    kind=s.kind,
                )
                for s in list(t.recent)
            ],
        )

    async def Status(self, request, context) -> trainer_pb2.StatusResponse:
        return self._status()

    async def Pause(self, request, context) -> trainer_pb2.StatusResponse:
        self.trainer.paused.set()
        return self._status()

    async def Resume(self, request, context) -> trainer_pb2.StatusResponse:
        self.trainer.paused.clear()
        return self._status()

    async def Checkpoint(self, request, context) -> trainer_pb2.CheckpointResponse:
        path = await asyncio.get_running_loop().run_in_executor(None, self.trainer.checkpoint_now)
        return trainer_pb2.CheckpointResponse(path=str(path), step=self.trainer.step, version=self.trainer.version)
