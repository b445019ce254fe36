"""A worker: one device, the model on it, its attention backend and that backend's pattern pool."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from attention_backends.base import PoolSpec
from attention_backends.registry import get_backend_class
from model_executor.model_loader import load_model, read_model_info
from model_executor.model_runner import ModelRunner
from model_executor.step_input import StepInput


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    dtype: torch.dtype
    device: str
    attention_backend: str
    load_format: str = "auto"


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.device = torch.device(config.device)
        info = read_model_info(config.model)
        layout = info.model_class.attention_layout(info.config)
        self.backend = get_backend_class(config.attention_backend)(layout, self.device, config.dtype)
        self.model = load_model(info, self.backend, config.dtype, self.device, config.load_format)
        self.runner = ModelRunner(self.model, self.backend, self.device)

    def available_pool_bytes(self, fraction: float) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(free * fraction)

    def init_pool(self, spec: PoolSpec) -> None:
        self.backend.init_pool(spec)

    def pool_usage(self) -> dict:
        return self.backend.pool_usage()

    def execute(self, step: StepInput) -> list[torch.Tensor]:
        return self.runner.run(step)
