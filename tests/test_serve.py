"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1 and a free port, the official client.

Every wait polls a condition with a deadline; nothing sleeps in place of synchronisation.
"""
import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from sparsed_engine import LLM, SamplingParams
from sparsed_engine.engine.async_llm import AsyncLLM, EngineDeadError
from sparsed_engine.entrypoints.openai.api_server import build_app
from tests.child_env import child_env

KEY = "secret"
MODEL = "tiny-dlm"
SPARSE_KW = dict(attention_backend="sparsed", attention_config={"block_size": 16}, mask_pool_bytes=4 << 20)
# a short semi-autoregressive schedule: the committed prefix grows block by block
EXTRA = {"steps": 16, "block_length": 8}
SHORT = dict(max_tokens=32, steps=16, block_length=8)


def wait_for(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def serve(llm: AsyncLLM, api_key: str | None = KEY):
    """uvicorn in a thread on a socket bound to a free port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(llm, [MODEL], api_key), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The engine thread, uvicorn and the client share this process: one intra-op thread keeps
    them from oversubscribing a small machine (the model is tiny)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine():
    llm = AsyncLLM.from_engine_args(**SPARSE_KW)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serve(engine) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline():
    with LLM(**SPARSE_KW) as llm:
        yield llm


def stats(llm: AsyncLLM) -> dict:
    async def get():
        return await llm.run_in_loop(lambda e: e.get_stats())
    return asyncio.run(get())


# ---------------------------------------------------------------- results
def test_completion_stream_equals_non_stream_equals_offline(client, offline):
    prompt = "The quick brown fox"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.8, seed=7, extra_body=EXTRA)
    want = offline.generate(prompt, SamplingParams(**SHORT, temperature=0.8, seed=7), use_tqdm=False)[0].outputs[0]
    full = client.completions.create(**kw)
    assert full.choices[0].text == want.text and full.choices[0].finish_reason == want.finish_reason
    assert full.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.text
    assert sum(1 for t in texts if t) >= 2, "the committed prefix should arrive in several deltas"
    assert chunks[-2].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_string_is_held_back_in_streams(client, offline):
    """A stop string from the middle of the text: no part of it is ever streamed."""
    prompt = "Two plus two is"
    base = offline.generate(prompt, SamplingParams(**SHORT, seed=3, temperature=0.8), use_tqdm=False)[0].outputs[0]
    stop = base.text[len(base.text) // 2:len(base.text) // 2 + 3]
    assert stop.strip(), base.text
    want = offline.generate(prompt, SamplingParams(**SHORT, seed=3, temperature=0.8, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
    assert want.finish_reason == "stop"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.8, seed=3, stop=[stop], extra_body=EXTRA)
    assert client.completions.create(**kw).choices[0].text == want.text
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_prompt_list_and_token_ids(client, offline):
    for prompts in (["Hello world", "Two plus two"], [[5, 6, 7, 8, 9], [10, 11]]):
        want = offline.generate(prompts, SamplingParams(**SHORT, seed=1), use_tqdm=False)
        got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=32, seed=1, extra_body=EXTRA)
        assert [c.index for c in got.choices] == [0, 1]
        assert [c.text for c in got.choices] == [o.outputs[0].text for o in want]
        assert got.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)


def test_chat_stream_equals_non_stream_equals_offline(client, offline):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = offline.chat(messages, SamplingParams(**SHORT, seed=2), use_tqdm=False)[0].outputs[0]
    kw = dict(model=MODEL, messages=messages, max_tokens=32, seed=2, extra_body=EXTRA)
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.content == want.text
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_models_version_health(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/version").json()["version"]


def test_64_concurrent_requests_get_their_own_outputs(url, offline):
    prompts = [f"Request {i}: the engine packs" for i in range(64)]
    want = [offline.generate(p, SamplingParams(max_tokens=8, steps=4, seed=i, temperature=0.7),
                             use_tqdm=False)[0].outputs[0].text for i, p in enumerate(prompts)]

    async def one(c, i):
        kw = dict(model=MODEL, prompt=prompts[i], max_tokens=8, seed=i, temperature=0.7, extra_body={"steps": 4})
        if i % 2:
            return "".join([ch.choices[0].text async for ch in await c.completions.create(**kw, stream=True)])
        return (await c.completions.create(**kw)).choices[0].text

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    assert asyncio.run(all_of_them()) == want


def test_disconnected_client_is_aborted_while_others_finish(url, engine, offline):
    """The long request selects its sparse pattern at step 1 (skip 0), then its client goes away."""
    others = [f"Other {i} asks" for i in range(3)]
    want = [o.outputs[0].text for o in offline.generate(others, SamplingParams(**SHORT, seed=5), use_tqdm=False)]
    long_body = {"model": MODEL, "prompt": "A long one", "max_tokens": 128, "stream": True,
                 "steps": 128, "block_length": 8, "attention_config": {"skip": 0.0}}

    async def run():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http, \
                openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
            async with http.stream("POST", "/v1/completions", json=long_body) as resp:
                assert resp.status_code == 200
                lines = resp.aiter_lines()
                while not (await lines.__anext__()).startswith("data: {"):
                    pass   # the first delta: the request is running
                await asyncio.to_thread(wait_for, lambda: engine.stats["mask_pool"]["used_bytes"] > 0,
                                        "the long request's pattern")
                finish = [asyncio.create_task(c.completions.create(
                    model=MODEL, prompt=p, max_tokens=32, seed=5, extra_body=EXTRA)) for p in others]
            # the stream is closed here: the client went away mid-stream
            return [(await t).choices[0].text for t in finish]

    before = _scrape(url)
    assert asyncio.run(run()) == want
    wait_for(lambda: (s := stats(engine))["num_running"] == 0 and s["num_waiting"] == 0
             and s["mask_pool"]["used_bytes"] == 0, "the aborted request to leave the engine")
    key = ("sparsed:request_success_total", (("finished_reason", "abort"),))
    assert _scrape(url).get(key, 0) - before.get(key, 0) == 1


def test_disconnected_non_streaming_client_is_aborted(url, engine):
    async def run():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            task = asyncio.create_task(http.post("/v1/completions", json={
                "model": MODEL, "prompt": "A long one", "max_tokens": 128, "steps": 128}))
            await asyncio.to_thread(wait_for, lambda: engine.stats["num_running"] == 1, "the request to run")
            task.cancel()   # the client goes away: httpx closes the connection

    asyncio.run(run())
    wait_for(lambda: stats(engine)["num_running"] == 0, "the abandoned request to be aborted")


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 32, "block_length": 5}, "block_length"),
    ({"prompt": "x", "unmasking": "sideways"}, "unmasking"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": [], "max_tokens": 8}, "prompt"),
    ({"prompt": [999999], "max_tokens": 8}, "prompt"),
    ({"prompt": "x", "max_tokens": 100000}, "prompt"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "kv_cache": "full"}, "kv_cache"),
    ({"prompt": "x", "max_tokens": 8, "kv_cache": "dual"}, "kv_cache"),   # this server has no KV pool
    ({"prompt": "x", "no_such_field": 1}, "no_such_field"),
    ({}, "prompt"),
])
def test_bad_completion_request_is_400_naming_the_field(url, body, param):
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "BadRequestError" and err["message"]


def test_kv_cache_field_is_the_requests_mode():
    """`kv_cache` in the body is SamplingParams.kv_cache; absent, the server's --kv-cache applies."""
    from sparsed_engine.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    assert CompletionRequest(prompt="x", kv_cache="dual").sampling_params().kv_cache == "dual"
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], kv_cache="none")
    assert chat.sampling_params().kv_cache == "none"
    assert CompletionRequest(prompt="x").sampling_params().kv_cache is None


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.content.type"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, "max_completion_tokens"),
])
def test_bad_chat_request_is_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, **body)
    assert e.value.body["param"] == param, e.value.body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=8)
    assert e.value.body["param"] == "model" and "gpt-4" in e.value.body["message"]


def test_missing_or_wrong_key_is_401(url):
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200   # outside /v1: no key needed


# ---------------------------------------------------------------- metrics
def _scrape(url) -> dict:
    samples = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return samples


def test_metrics_count_what_was_sent(url, client):
    before = _scrape(url)
    outs = [client.completions.create(model=MODEL, prompt=f"Count {i}", max_tokens=16, seed=i,
                                      extra_body={"steps": 8}) for i in range(3)]
    after = _scrape(url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    finishes = [o.choices[0].finish_reason for o in outs]
    for reason in set(finishes):
        assert delta("sparsed:request_success_total", finished_reason=reason) == finishes.count(reason)
    assert delta("sparsed:prompt_tokens_total") == sum(o.usage.prompt_tokens for o in outs)
    assert delta("sparsed:generation_tokens_total") == sum(o.usage.completion_tokens for o in outs)
    assert delta("sparsed:e2e_request_latency_seconds_count") == 3
    assert delta("sparsed:time_to_first_token_seconds_count") == 3
    assert delta("sparsed:denoising_steps_total") >= 8   # the three may share steps
    assert after[("sparsed:num_requests_running", ())] == 0
    assert after[("sparsed:mask_pool_capacity_bytes", ())] == SPARSE_KW["mask_pool_bytes"]
    assert after[("sparsed:kv_cache_usage_perc", ())] == 0   # no KV pool on this server


# ---------------------------------------------------------------- the async engine without HTTP
def test_async_llm_streams_prefixes_and_aborts(engine, offline):
    params = SamplingParams(**SHORT, seed=11, temperature=0.5)
    want = offline.generate("Hello world", params, use_tqdm=False)[0].outputs[0]

    async def run():
        outs = [o async for o in engine.generate("Hello world", params, "direct-1")]
        agen = engine.generate("Hello world", SamplingParams(max_tokens=256, steps=256, block_length=8), "direct-2")
        await agen.__anext__()
        with pytest.raises(ValueError, match="request_id='direct-2' is already running"):
            [o async for o in engine.generate("Hello", params, "direct-2")]
        engine.abort("direct-2")
        rest = [o async for o in agen]
        with pytest.raises(ValueError, match="SamplingParams.unmasking='origin' is not a llada policy"):
            await engine.add_request("x", SamplingParams(max_tokens=8, unmasking="origin"))
        return outs, rest

    outs, rest = asyncio.run(run())
    ids = [o.outputs[0].token_ids for o in outs]
    assert all(b[:len(a)] == a for a, b in zip(ids, ids[1:])), "prefixes only grow"
    assert outs[-1].finished and outs[-1].outputs[0].text == want.text
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"


def test_burst_is_admitted_in_one_step():
    """Requests sent together start in the same step, even when one of them is still being
    validated as the loop takes in the others: the engine runs `steps` steps for all of them, not
    one more for those that would have started without it. Deterministic: the idle loop waits
    while a request is being validated (the window is long so that a slow machine cannot cut it)."""
    llm = AsyncLLM.from_engine_args(admission_window_s=60.0, **SPARSE_KW)
    late, queued = threading.Event(), []
    make = llm.engine.make_sequence

    def make_sequence(prompt, params, rid):
        if prompt == "late":
            late.wait(60)
        return make(prompt, params, rid)

    llm.engine.make_sequence = make_sequence

    async def run():
        async def one(i):
            prompt = "late" if i == 5 else f"Burst {i} of six"
            seq = await llm.add_request(prompt, SamplingParams(**SHORT, seed=i))
            queued.append(i)
            return [o async for o in llm.stream(seq)][-1]

        async def release():   # once the loop has taken in the other five
            await asyncio.to_thread(wait_for, lambda: len(queued) == 5 and llm._commands.empty(), "five requests")
            late.set()

        outs, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(6))), release())
        return outs

    try:
        outs = asyncio.run(run())
        assert all(o.finished and o.outputs[0].finish_reason for o in outs)
        assert llm.num_steps == SHORT["steps"]
        assert llm.step_seconds > 0
    finally:
        llm.shutdown()


def test_slow_reader_skips_stale_prefixes(engine, offline):
    """A reader that falls behind gets the newest state, not every prefix it missed."""
    params = SamplingParams(**SHORT, seed=13)
    want = offline.generate("Slow reader", params, use_tqdm=False)[0].outputs[0]

    async def run():
        seq = await engine.add_request("Slow reader", params)
        outs = engine.stream(seq)
        first = await outs.__anext__()
        await asyncio.to_thread(wait_for, lambda: engine.stats["num_running"] == 0, "the request to finish")
        await engine.run_in_loop(lambda e: None)   # after the last step's outputs were handed over
        return first, [o async for o in outs]

    first, rest = asyncio.run(run())
    assert not first.finished
    assert len(rest) == 1 and rest[0].finished and rest[0].outputs[0].text == want.text


def test_failed_prompt_of_a_list_leaves_nothing_arriving(url, engine):
    """A prompt list whose second prompt is bad: 400, and the validated first one is not left
    counted as on its way (an idle engine would wait for it)."""
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [[5, 6, 7], [999999]], "max_tokens": 8},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert not engine._arriving()


def test_engine_step_seconds_metric(url, client):
    before = _scrape(url)
    client.completions.create(model=MODEL, prompt="Time me", max_tokens=16, extra_body={"steps": 8})
    after = _scrape(url)
    key = ("sparsed:engine_step_seconds_total", ())
    assert after[key] > before.get(key, 0)


def test_serving_benchmark_request_fields():
    """benchmarks/serve.py sends kv_cache and the threshold policy only when asked, and warms up
    with a schedule that has a selection and a sparse step, and with a cache a cached step a block."""
    import argparse

    from benchmarks.serve import SPARSE, request_body, schedule_ratio, warmup_steps

    # 16 steps, skip 0.2: 4 dense, the selection step, 11 sparse
    assert schedule_ratio(16, 2.0, 3.0, 1.0) == pytest.approx(32 / (4 * 2 + 3 + 11))

    base = dict(max_tokens=32, steps=16, block_length=32, kv_cache=None, threshold=None)
    body = request_body([1, 2], 0, argparse.Namespace(**base))
    assert "kv_cache" not in body and "unmasking" not in body and "threshold" not in body
    body = request_body([1, 2], 0, argparse.Namespace(**{**base, "kv_cache": "dual", "threshold": 0.9}))
    assert body["kv_cache"] == "dual" and body["unmasking"] == "confidence_threshold" and body["threshold"] == 0.9
    for max_tokens in (32, 128):
        for kv_cache in (None, "none", "prefix", "dual"):
            args = argparse.Namespace(**{**base, "max_tokens": max_tokens, "kv_cache": kv_cache})
            steps, blocks = warmup_steps(args), max_tokens // 32
            assert steps % blocks == 0 and int(steps * SPARSE["skip"]) + 1 < steps - 1
            if kv_cache in ("prefix", "dual"):   # every block has a cached step after its refresh
                assert steps // blocks >= 2
    assert warmup_steps(argparse.Namespace(**{**base, "max_tokens": 128, "kv_cache": "dual"})) == 8


# ---------------------------------------------------------------- admission and failures
def test_max_waiting_is_503(tiny_llada_dir):
    llm = AsyncLLM.from_engine_args(model=str(tiny_llada_dir), max_num_seqs=1, max_model_len=4096, max_waiting=1)
    long_body = {"model": MODEL, "prompt": "x", "max_tokens": 2048, "steps": 2048, "stream": True}
    gate = threading.Event()

    async def run(base):
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async with http.stream("POST", "/v1/completions", json=long_body) as running:
                assert running.status_code == 200
                await asyncio.to_thread(wait_for, lambda: llm.stats["num_running"] == 1, "one running request")
                # hold the loop at a step boundary, so that on a fast GPU the running request cannot
                # finish (and let the waiting one in) before the third arrives
                held = asyncio.ensure_future(llm.run_in_loop(lambda engine: gate.wait(60)))
                async with http.stream("POST", "/v1/completions", json=long_body) as waiting:
                    assert waiting.status_code == 200
                    await asyncio.to_thread(wait_for, lambda: llm.num_waiting() == 1, "one waiting request")
                    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 8})
                    gate.set()
                    assert await held
                    assert r.status_code == 503, r.text
                    assert "max_waiting=1" in r.json()["error"]["message"]

    with serve(llm, api_key=None) as base:
        asyncio.run(run(base))
        wait_for(lambda: stats(llm)["num_running"] == 0 and stats(llm)["num_waiting"] == 0,
                 "both streams to be aborted")
    llm.shutdown()


def test_killed_worker_makes_health_503(tiny_llada_dir):
    llm = AsyncLLM.from_engine_args(model=str(tiny_llada_dir), device="cpu", sequence_parallel_size=2,
                                    distributed_executor_backend="mp")   # two CPU ranks on any machine
    with serve(llm, api_key=None) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        assert httpx.get(f"{base}/health").status_code == 200
        stream = client.completions.create(model=MODEL, prompt="x", max_tokens=256, stream=True,
                                           extra_body={"steps": 256, "block_length": 8})
        next(iter(stream))
        rank1 = [p for p in multiprocessing.active_children() if p.name == "sparsed-rank-1"]
        assert len(rank1) == 1
        os.kill(rank1[0].pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine is dead.*worker rank 1"):
            for _ in stream:
                pass
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, "/health to report the dead engine")
        with pytest.raises(openai.InternalServerError) as e:   # 503: no new work is taken
            client.completions.create(model=MODEL, prompt="x", max_tokens=8)
        assert e.value.status_code == 503
    with pytest.raises(EngineDeadError):
        asyncio.run(llm.add_request("x", SamplingParams(max_tokens=8)))
    llm.shutdown()


def test_worker_killed_while_idle_makes_health_503(tiny_llada_dir):
    """/health asks the workers: no request needs to run for a dead one to be noticed."""
    llm = AsyncLLM.from_engine_args(model=str(tiny_llada_dir), device="cpu", sequence_parallel_size=2,
                                    distributed_executor_backend="mp")   # two CPU ranks on any machine
    with serve(llm, api_key=None) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        rank0 = [p for p in multiprocessing.active_children() if p.name == "sparsed-rank-0"]
        os.kill(rank0[0].pid, signal.SIGKILL)
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, "/health to notice")
        assert "worker rank 0" in httpx.get(f"{base}/health").json()["error"]["message"]
    llm.shutdown()


# ---------------------------------------------------------------- the command line
def test_cli_serve_key_from_env_and_clean_sigterm(tiny_llada_dir):
    env = child_env(SPARSED_API_KEY=KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsed_engine.entrypoints.cli", "serve", "--model", str(tiny_llada_dir),
         "--port", "0", "--served-model-name", MODEL, "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        m = wait_for(lambda: next(filter(None, (re.search(r"on (http://127\.0\.0\.1:\d+)/v1", x) for x in lines)), None)
                     or proc.poll() is not None, "the serving line", 120)
        assert m is not True, "".join(lines)
        base = m.group(1)
        wait_for(lambda: _get(f"{base}/health") == 200, "/health")
        assert httpx.get(f"{base}/v1/models").status_code == 401
        c = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list().data] == [MODEL]
        assert c.completions.create(model=MODEL, prompt="Hello", max_tokens=8).choices[0].finish_reason
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "engine shut down" in "".join(lines)


def _get(url):
    try:
        return httpx.get(url).status_code
    except httpx.TransportError:
        return None
