"""The HF engine on a tiny random LLaMA: parity with plain generate, batching, joining, cancelling,
sampling, stop strings, readings and steering, and refusal of bad requests."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from monitors.capture import recording
from monitors.probes import make_probe
from service.engines.hf import EngineLimits, HFEngine
from service.engines.types import FinalEvent, GenerationRequest, PromptEvent, Sampling, TokenEvent
from service.models import encode_prompt
from service.models.tiny import tiny_llama
from steering.errors import InvalidArgument, LimitExceeded, NotFound
from steering.spec import AblateEdit, AddEdit, InterventionSpec, ReadSpec
from steering.vectors import make_vector

PROMPTS = ["Hello there", "The quick brown fox jumps", "a", "Steering vectors change behaviour."]


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(n_layers=3, d_model=64, seed=1)


@pytest.fixture(scope="module")
def engine(lm):
    eng = HFEngine(lm, limits=EngineLimits(max_prompt_tokens=200, max_new_tokens=64, max_abs_coef=50))
    g = torch.Generator().manual_seed(3)
    eng.registry.add_vector("v", make_vector({layer: torch.randn(64, generator=g) * 4 for layer in range(3)}))
    eng.registry.add_probe("p", make_probe(torch.randn(64, generator=g), 0.1, layer=1, name="p"))
    with eng:
        yield eng


def tokens(events) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def final(events) -> FinalEvent:
    assert isinstance(events[-1], FinalEvent)
    return events[-1]


def req(prompt: str, n: int = 8, edits=(), reads=(), **sampling) -> GenerationRequest:
    sampling.setdefault("ignore_eos", True)  # random weights hit EOS early; lengths must be predictable
    return GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=n, **sampling),
                             interventions=InterventionSpec(edits=list(edits), reads=list(reads)))


def hf_greedy(lm, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([encode_prompt(lm.tokenizer, prompt)])
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def run_concurrently(engine, requests):
    results: dict[int, list] = {}

    def go(i, r):
        results[i] = engine.run(r)

    threads = [threading.Thread(target=go, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [results[i] for i in range(len(requests))]


def test_greedy_matches_plain_transformers_generate(engine, lm):
    for p in PROMPTS:
        assert tokens(engine.run(req(p, 10))) == hf_greedy(lm, p, 10)
        got = tokens(engine.run(req(p, 10, ignore_eos=False)))
        assert got == hf_greedy(lm, p, 10)[: len(got)]
        assert len(got) == 10 or got[-1] in engine.eos_ids  # stops at EOS unless told otherwise


def test_concurrent_requests_are_batched_and_equal_solo_runs(engine):
    solo = [tokens(engine.run(req(p, 10))) for p in PROMPTS]
    steps = engine.steps
    together = run_concurrently(engine, [req(p, 10) for p in PROMPTS])
    assert [tokens(e) for e in together] == solo
    assert engine.steps - steps < 4 * 9, "requests ran one after another instead of in one batch"


def test_unsteered_request_in_a_steered_batch_equals_its_solo_run(engine):
    plain = tokens(engine.run(req(PROMPTS[1], 10)))
    steered_solo = tokens(engine.run(req(PROMPTS[0], 10, [AddEdit(vector="v", coef=8.0)])))
    mixed = run_concurrently(engine, [
        req(PROMPTS[0], 10, [AddEdit(vector="v", coef=8.0)]),
        req(PROMPTS[1], 10),
        req(PROMPTS[2], 10, [AblateEdit(vector="v", layers="all")]),
    ])
    assert tokens(mixed[1]) == plain
    assert tokens(mixed[0]) == steered_solo


def test_steering_changes_the_generation(engine):
    plain = tokens(engine.run(req(PROMPTS[3], 10)))
    assert tokens(engine.run(req(PROMPTS[3], 10, [AddEdit(vector="v", coef=20.0)]))) != plain
    assert tokens(engine.run(req(PROMPTS[3], 10, [AddEdit(vector="v", coef=0.0)]))) == plain


def test_request_joins_a_running_batch_between_decode_steps(engine):
    alone_b = tokens(engine.run(req(PROMPTS[1], 6)))
    alone_a = tokens(engine.run(req(PROMPTS[0], 30)))
    got: dict[str, list] = {"a": [], "b": []}
    b_done = threading.Event()
    a_done = threading.Event()

    def on_a(ev):
        got["a"].append(ev)
        if isinstance(ev, TokenEvent) and ev.index == 3:
            engine.submit(req(PROMPTS[1], 6), on_b)
        if isinstance(ev, FinalEvent):
            a_done.set()

    def on_b(ev):
        got["b"].append(ev)
        if isinstance(ev, FinalEvent):
            b_done.set()

    engine.submit(req(PROMPTS[0], 30), on_a)
    assert a_done.wait(60) and b_done.wait(60)
    assert tokens(got["a"]) == alone_a and tokens(got["b"]) == alone_b
    b_first = got["a"].index(next(e for e in got["a"] if isinstance(e, TokenEvent) and e.index == 3))
    assert len(tokens(got["a"][b_first:])) > 6, "B should have finished while A was still running"


def test_cancel_frees_the_slot_at_once(engine):
    events: list = []
    seen_two = threading.Event()

    def on(ev):
        events.append(ev)
        if isinstance(ev, TokenEvent) and ev.index == 1:
            seen_two.set()

    handle = engine.submit(req(PROMPTS[0], 60), on)
    assert seen_two.wait(30)
    handle.cancel()
    deadline = time.time() + 5
    while not isinstance(events[-1], FinalEvent) and time.time() < deadline:
        time.sleep(0.01)
    assert final(events).finish_reason == "cancelled"
    assert final(events).completion_tokens < 60
    while engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.running == 0


def test_sampling_is_seeded_per_request(engine):
    a = tokens(engine.run(req(PROMPTS[0], 12, temperature=1.5, seed=7)))
    b = tokens(engine.run(req(PROMPTS[0], 12, temperature=1.5, seed=7)))
    c = tokens(engine.run(req(PROMPTS[0], 12, temperature=1.5, seed=8)))
    assert a == b and a != c
    greedy = tokens(engine.run(req(PROMPTS[0], 12)))
    assert tokens(engine.run(req(PROMPTS[0], 12, temperature=1.0, top_k=1, seed=1))) == greedy
    assert tokens(engine.run(req(PROMPTS[0], 12, temperature=1.0, top_p=1e-6, seed=1))) == greedy


def test_stop_string_ends_the_generation_before_it(engine, lm):
    text = final(engine.run(req("Hello there", 16))).text
    visible = [i for i, ch in enumerate(text) if ch.isascii() and ch.isprintable() and i > 2]
    if not visible:
        pytest.skip("random model produced no ASCII to stop on")
    cut = visible[0]
    stop = text[cut]
    fin = final(engine.run(req("Hello there", 16, stop=[stop])))
    assert fin.finish_reason == "stop_string"
    assert fin.text == text[: text.index(stop)]


def test_readings_stream_per_token_and_match_a_reference(engine, lm):
    reads = [ReadSpec(name="p", kind="probe", source="p"), ReadSpec(name="d", kind="direction", source="v", layer=2)]
    events = engine.run(req(PROMPTS[1], 5, reads=reads))
    prompt_ev = next(e for e in events if isinstance(e, PromptEvent))
    ids = encode_prompt(lm.tokenizer, PROMPTS[1])
    assert len(prompt_ev.readings["p"]) == len(ids)
    gen = tokens(events)
    with torch.inference_mode(), recording(lm.layers) as store:
        lm.model(input_ids=torch.tensor([ids + gen]))
    probe = engine.registry.probe("p")
    ref_p = torch.sigmoid(store[1][0] @ probe.weight + probe.bias)
    v = engine.registry.vector("v").at(2)
    ref_d = store[2][0] @ (v / v.norm())
    torch.testing.assert_close(torch.tensor(prompt_ev.readings["p"]), ref_p[: len(ids)], atol=1e-4, rtol=1e-4)
    # a generated token carries the readings of the position that predicted it
    tok_ev = [e for e in events if isinstance(e, TokenEvent)]
    for k, ev in enumerate(tok_ev):
        pos = len(ids) - 1 + k
        assert ev.readings["p"] == pytest.approx(float(ref_p[pos]), abs=1e-4)
        assert ev.readings["d"] == pytest.approx(float(ref_d[pos]), abs=1e-3, rel=1e-4)


def test_no_entries_gives_logits_identical_to_the_unhooked_model(engine, lm):
    from steering.batch import BatchPlan, row_of
    from steering.compile import compile_spec

    ids = torch.tensor([encode_prompt(lm.tokenizer, PROMPTS[3])])
    with torch.inference_mode():
        plain = lm.model(input_ids=ids).logits
        steered = compile_spec(InterventionSpec(edits=[AddEdit(vector="v", coef=0.0)]), engine.registry, engine.shape)
        plan = BatchPlan([steered, None], 64)
        for slot in (0, 1):  # zero coefficient, and a slot with no entries at all
            engine.hooks.set_step(plan, torch.full((ids.shape[1],), row_of(slot, "prompt")))
            try:
                hooked = lm.model(input_ids=ids).logits
            finally:
                engine.hooks.set_step(None, None)
            assert torch.equal(hooked, plain)


@pytest.mark.parametrize("bad, error, field", [
    (req("x", edits=[AddEdit(vector="nope", coef=1.0)]), NotFound, "edits[0].vector"),
    (req("x", edits=[AddEdit(vector="v", coef=1.0, layers=[3])]), InvalidArgument, "edits[0].layers"),
    (req("x", edits=[AddEdit(vector="v", coef=51.0)]), LimitExceeded, "edits[0].coef"),
    (req("x", reads=[ReadSpec(name="r", kind="direction", source="v", layer=-1)]), InvalidArgument, "reads[0].layer"),
    (req("x" * 500), LimitExceeded, "prompt"),
    (req("x", n=65), LimitExceeded, "sampling.max_tokens"),
])
def test_bad_requests_are_refused_alone(engine, bad, error, field):
    events: list = []
    good = engine.submit(req(PROMPTS[0], 20), events.append)
    with pytest.raises(error) as info:
        engine.submit(bad, lambda ev: None)
    assert str(info.value).startswith(field) and info.value.field == field
    deadline = time.time() + 30
    while (not events or not isinstance(events[-1], FinalEvent)) and time.time() < deadline:
        time.sleep(0.01)
    assert final(events).finish_reason == "length"
    del good


def test_wrong_width_vector_is_refused_at_registration(engine):
    with pytest.raises(InvalidArgument, match="d_model"):
        engine.registry.add_vector("narrow", make_vector({0: torch.ones(32)}))
    with pytest.raises(InvalidArgument, match="non-finite"):
        make_vector({0: torch.tensor([1.0, float("nan")])})


def test_four_bit_model_is_hooked_read_and_steered(tiny_dir):
    pytest.importorskip("bitsandbytes")
    from service.models import load_model

    lm4 = load_model(str(tiny_dir), quantize="4bit", progress=False)
    eng = HFEngine(lm4)
    eng.registry.add_vector("v", make_vector({1: torch.randn(lm4.d_model, generator=torch.Generator().manual_seed(0)) * 20}))
    reads = [ReadSpec(name="d", kind="direction", source="v", layer=1)]
    with eng:
        plain = eng.run(req(PROMPTS[0], 6, reads=reads))
        steered = eng.run(req(PROMPTS[0], 6, [AddEdit(vector="v", coef=10.0)], reads=reads))
    assert all(abs(e.readings["d"]) > 0 for e in plain if isinstance(e, TokenEvent))
    assert tokens(plain) != tokens(steered)


def test_clamp_inside_the_model_reencodes_to_target(engine, lm):
    from monitors.sae import build_sae, parse_config
    from steering.batch import BatchPlan, row_of
    from steering.compile import compile_spec
    from steering.spec import ClampEdit

    g = torch.Generator().manual_seed(5)
    w_dec = torch.randn(32, 64, generator=g)
    tensors = {"W_dec": w_dec, "W_enc": (w_dec / w_dec.norm(dim=-1, keepdim=True) ** 2).T.contiguous(),
               "b_enc": torch.full((32,), 50.0), "b_dec": torch.zeros(64)}
    cfg = {"architecture": "standard", "d_in": 64, "d_sae": 32, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
    sae = build_sae(parse_config(cfg, "t"), tensors, "t")
    engine.registry.add_sae("tied", sae, replace=True)
    c = compile_spec(InterventionSpec(edits=[ClampEdit(sae="tied", feature=4, value=80.0)]), engine.registry, engine.shape)
    ids = torch.tensor([encode_prompt(lm.tokenizer, PROMPTS[1])])
    with torch.inference_mode():
        engine.hooks.set_step(BatchPlan([c], 64), torch.full((ids.shape[1],), row_of(0, "prompt")))
        try:
            with recording(lm.layers, [1]) as store:  # registered after the engine's hooks: sees the edit
                lm.model(input_ids=ids)
        finally:
            engine.hooks.set_step(None, None)
    torch.testing.assert_close(sae.encode(store[1][0])[:, 4], torch.full((ids.shape[1],), 80.0), atol=1e-3, rtol=1e-4)


def test_a_request_that_blows_up_its_logits_ends_alone(engine):
    engine.registry.add_vector("huge", make_vector({1: torch.full((64,), 3e38)}), replace=True)
    plain = tokens(engine.run(req(PROMPTS[1], 8)))
    bad, good = run_concurrently(engine, [req(PROMPTS[0], 8, [AddEdit(vector="huge", coef=50.0)]), req(PROMPTS[1], 8)])
    assert final(bad).finish_reason == "error" and "non-finite" in (final(bad).error or "")
    assert tokens(good) == plain and final(good).finish_reason == "length"


def test_a_consumer_that_raises_loses_only_its_request(engine):
    def explode(ev):
        raise RuntimeError("client bug")

    engine.submit(req(PROMPTS[0], 30), explode)
    assert tokens(engine.run(req(PROMPTS[2], 5))) == tokens(engine.run(req(PROMPTS[2], 5)))
    deadline = time.time() + 5
    while engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.running == 0


def test_one_token_requests_end_after_exactly_one_token(engine):
    results = run_concurrently(engine, [req(p, 1) for p in PROMPTS] + [req(PROMPTS[0], 5)])
    for events in results[:-1]:
        assert len(tokens(events)) == 1 and isinstance(events[-1], FinalEvent)
        assert sum(isinstance(e, FinalEvent) for e in events) == 1
    assert len(tokens(results[-1])) == 5


def test_more_requests_than_slots_queue_and_all_finish_correctly(lm):
    eng = HFEngine(lm, limits=EngineLimits(max_batch=2))
    with eng:
        solo = [tokens(eng.run(req(p, 6))) for p in PROMPTS]
        assert [tokens(e) for e in run_concurrently(eng, [req(p, 6) for p in PROMPTS])] == solo


def test_closing_the_async_stream_cancels_the_request(engine):
    import asyncio

    async def consume_two() -> list:
        got = []
        stream = engine.generate(req(PROMPTS[0], 60))
        async for ev in stream:
            got.append(ev)
            if len(tokens(got)) == 2:
                break
        await stream.aclose()  # what a gRPC servicer does when its client goes away
        return got

    got = asyncio.run(consume_two())
    assert len(tokens(got)) == 2
    deadline = time.time() + 5
    while engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.running == 0


def test_stopping_the_engine_ends_every_request(lm):
    eng = HFEngine(lm, limits=EngineLimits(max_batch=1)).start()
    events: list[list] = [[], []]
    eng.submit(req(PROMPTS[0], 60), events[0].append)
    eng.submit(req(PROMPTS[1], 60), events[1].append)  # waits in the queue (one slot)
    deadline = time.time() + 10
    while not tokens(events[0]) and time.time() < deadline:
        time.sleep(0.01)
    eng.stop()
    for evs in events:
        assert final(evs).finish_reason == "cancelled"


def test_calls_run_on_the_engine_thread_between_steps(engine):
    import threading as th

    fut = engine.call(lambda: th.current_thread().name)
    assert fut.result(10) == "steerwatch-hf-engine"
    failing = engine.call(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(10)
    assert tokens(engine.run(req(PROMPTS[0], 3)))  # the engine still serves
