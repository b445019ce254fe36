"""Admission when a pool holds one request of two: a check shared by the pattern pool and the KV pool."""


def second_waits_then_both_finish(eng, prompt, params) -> None:
    """Two equal requests: the first step admits one and the other waits; both then finish, alike."""
    eng.add_request(prompt, params)
    eng.add_request(prompt, params)
    eng.step()
    assert len(eng.scheduler.running) == 1 and len(eng.scheduler.waiting) == 1
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert len(outs) == 2 and outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
