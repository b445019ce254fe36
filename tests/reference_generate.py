"""Independent, literal re-statements of the official LLaDA `generate` and Dream
`diffusion_generate` (greedy), run on full-canvas logits, to check the engine against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_backends.base import RowSpec


def raw_logits(model, backend, canvas: torch.Tensor) -> torch.Tensor:
    """Unshifted logits at every position: lm_head(hidden[i]) for all i."""
    n = canvas.numel()
    device = next(model.parameters()).device
    meta = backend.build_metadata([RowSpec(n, 0)])
    hidden = model(canvas.to(device), torch.arange(n, device=device), meta)
    return model.compute_logits(hidden, torch.arange(n, device=device) + model.logits_shift).float().cpu()


def llada_generate(model, backend, prompt, steps, gen_length, block_length, mask_id, cfg_scale=0.0):
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    P = len(prompt)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    for b in range(num_blocks):
        block = x[P + b * block_length: P + (b + 1) * block_length]
        n_mask = int((block == mask_id).sum())
        sched = [n_mask // spb + (1 if i < n_mask % spb else 0) for i in range(spb)]
        for i in range(spb):
            mask_index = x == mask_id
            logits = raw_logits(model, backend, x)
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                un = raw_logits(model, backend, un_x)
                logits = un + (cfg_scale + 1) * (logits - un)
            x0 = logits.argmax(-1)
            x0_p = F.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            x0_p[P + (b + 1) * block_length:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(-float("inf")))
            sel = torch.topk(conf, sched[i]).indices
            x[sel] = x0[sel]
    return x[P:].tolist()


def dream_generate(model, backend, prompt, steps, gen_length, mask_id, alg, eps=1e-3):
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    ts = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        raw = raw_logits(model, backend, x)
        logits = torch.cat([raw[:1], raw[:-1]], dim=0)  # Dream's one-position shift
        probs = torch.softmax(logits[mask_index], dim=-1)
        conf, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            sp = torch.sort(probs, dim=-1, descending=True).values
            conf = sp[:, 0] - sp[:, 1]
        elif alg == "entropy":
            conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        num_mask = mask_index.sum() / 1
        t, s = ts[i], ts[i + 1]
        n = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full = torch.full(x.shape, -float("inf"))
        full[mask_index] = conf
        if n > 0:
            idx = torch.topk(full, n).indices
            x_ = torch.full_like(x, mask_id)
            x_[mask_index] = x0
            x[idx] = x_[idx]
    return x[len(prompt):].tolist()
