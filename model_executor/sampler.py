"""Where the logits are (rank 0, or the single worker): logits -> committed tokens.

Per request: classifier-free guidance combines its two rows, its family's denoiser picks the
positions and tokens, drawing from the request's own generator (seeded on its first step, kept
until the engine reports the request finished or aborted). Only positions and token ids leave.
"""
from __future__ import annotations

import torch

from model_executor.denoisers.base import Denoiser
from model_executor.step_input import RequestSampling, RowInput, SampledTokens


class Sampler:
    def __init__(self, denoiser: Denoiser, device: torch.device, mask_token_id: int):
        self.denoiser = denoiser
        self.device = device
        self.mask_token_id = mask_token_id
        self.generators: dict[int, torch.Generator] = {}   # by RequestSampling.seq_id

    def free(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.generators.pop(seq_id, None)

    def sample(self, rows: list[RowInput], logits: list[torch.Tensor],
               requests: list[RequestSampling]) -> list[SampledTokens]:
        out, row = [], 0
        for s in requests:
            try:
                out.append(self._sample_one(rows[row], logits[row:row + s.num_rows], s))
            except Exception as e:  # noqa: BLE001 - fails this request alone; the others go on
                out.append(SampledTokens([], [], f"request {s.request_id!r} failed in sampling: "
                                                 f"{type(e).__name__}: {e}"))
            row += s.num_rows
        return out

    def _sample_one(self, row: RowInput, logits: list[torch.Tensor], s: RequestSampling) -> SampledTokens:
        seq_logits = logits[0]
        if s.num_rows == 2:  # classifier-free guidance: conditional, then unconditional row
            uncond = logits[1]
            seq_logits = uncond + (s.cfg_scale + 1) * (seq_logits - uncond)
        # a committed mask id would leave its position masked for good (a mask id in the output)
        seq_logits = seq_logits.index_fill(-1, torch.tensor([self.mask_token_id], device=seq_logits.device),
                                           float("-inf"))
        gen = self.generators.get(s.seq_id)
        if gen is None:
            gen = torch.Generator(device=seq_logits.device).manual_seed(s.seed)
            self.generators[s.seq_id] = gen
        idx, tokens = self.denoiser.unmask(seq_logits, s, gen)
        return SampledTokens(row.logits_positions[idx.cpu()].tolist(), tokens.tolist())
