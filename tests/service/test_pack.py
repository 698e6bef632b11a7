"""Monitor packs: a quick build on the tiny model, loading into a replica as shared pack: ids usable by
every tenant from policies, the reserved prefix, a pack for another model refused; and the real
default pack (slow)."""

from __future__ import annotations

import json
import math

import grpc
import pytest

from service.pack import MANIFEST, default_pack_dir, load_pack, read_manifest
from service.pack_build import PackConfig, build_pack
from service.serve import start_replica
from service.settings import Settings
from steering.errors import InvalidArgument
from steering.registry import Registry
from tests.service.grpc_harness import (
    MODEL_NAME,
    Client,
    direction_monitor,
    one_torch_thread,
    policy_doc,
    rpc_error,
    run,
    tiny_lm,
)


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "tiny"
    with one_torch_thread():
        build_pack(tiny_lm(0), out, PackConfig.quick(), lambda title: _null())
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_quick_pack_manifest_and_report(pack_dir):
    m = read_manifest(pack_dir)
    assert m["model"] == MODEL_NAME
    assert [(a["name"], a["kind"]) for a in m["assets"]] == [
        ("deception", "probe"), ("sycophancy", "vector"), ("refusal", "vector"), ("sae", "sae")]
    rep = m["report"]
    assert 0.0 <= rep["deception"]["layers"][0]["heldout"]["auroc"] <= 1.0
    assert [e["coef"] for e in rep["sycophancy"]["effect"]] == [-4.0, 0.0, 4.0]
    assert rep["sycophancy"]["effect"][1]["neutral_kl"] == pytest.approx(0.0, abs=1e-6)  # coef 0 = plain
    assert all(0.0 <= e["sycophantic_choice"] <= 1.0 for e in rep["sycophancy"]["effect"])
    assert 0.0 <= rep["sae"]["dead_fraction"] <= 1.0 and rep["sae"]["l0"] <= 8 + 1e-6  # TopK k = 8
    assert (pack_dir / "REPORT.md").read_text().startswith(f"# Monitor pack for {MODEL_NAME}")


def test_load_pack_registers_shared_ids_and_refuses_another_model(pack_dir):
    reg = Registry(64)
    loaded = load_pack(pack_dir, reg, model_name=MODEL_NAME, d_model=64)
    assert loaded == {"probe": ["pack:deception"], "vector": ["pack:sycophancy", "pack:refusal"], "sae": ["pack:sae"]}
    assert reg.sae("pack:sae").hook_layer == read_manifest(pack_dir)["report"]["sae"]["layer"]
    assert reg.probe("pack:deception").threshold is not None
    with pytest.raises(InvalidArgument, match="was built for model"):
        load_pack(pack_dir, Registry(64), model_name="gemma-3-270m", d_model=64)
    bad = pack_dir.parent / "broken"
    bad.mkdir(exist_ok=True)
    (bad / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(InvalidArgument, match="unknown pack format"):
        read_manifest(bad)


def test_replica_serves_the_pack_to_every_tenant(pack_dir):
    async def body() -> None:
        s = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, monitor_pack=str(pack_dir))
        with one_torch_thread():
            replica = await start_replica(s, lm=tiny_lm(0))
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
            try:
                secret, _ = await replica.app.store.create_key("acme", "tenant")
                c = Client(channel, secret)
                info = await c.info()
                assert list(info.shared_vectors) == ["pack:sycophancy", "pack:refusal"]
                assert "pack:deception" in [p.probe_id for p in info.probes]
                assert "pack:sae" in [x.sae_id for x in info.saes]
                layer = read_manifest(pack_dir)["assets"][2]["layer"]
                monitors = [{"name": "deception", "kind": "probe", "source": "pack:deception", "threshold": 2.0,
                             "aggregation": "mean", "window": 4},
                            direction_monitor("refusal", "pack:refusal", 1e9, action="annotate", layer=layer),
                            {"name": "latent", "kind": "sae_feature", "source": "pack:sae", "feature": 0,
                             "threshold": -1.0, "action": "annotate", "explain": True}]
                steering = [{"kind": "add", "vector": "pack:sycophancy", "coef": -1.0}]
                await c.put_policy("safety", policy_doc(monitors, steering), make_default=True)
                res = await c.generate("Tell me a story", 4, include_readings=True)
                for t in res.tokens:
                    assert 0.0 <= t.readings["deception"] <= 1.0 and math.isfinite(t.readings["refusal"])
                assert [(x.source, x.kind) for x in res.final.steering] == [("pack:sycophancy", "add")]
                (ex,) = res.final.explanations  # the SAE latent fired at once (threshold -1): occlusion
                assert (ex.monitor, ex.method, ex.error) == ("latent", "occlusion", "") and len(ex.top) > 0
                code, details = await rpc_error(c.upload_vector("pack:mine", {0: [0.0] * 64}))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in details
            finally:
                await channel.close()
                await replica.stop(0.0)
    run(body())


@pytest.mark.slow
def test_default_pack_loads_and_reads_in_range(default_model):
    """The real default pack (built by `steerwatch pack build`, e.g. by quickstart.sh or CI)."""
    from service.engines.hf import HFEngine
    from service.engines.types import GenerationRequest, Sampling, TokenEvent
    from steering.spec import InterventionSpec, ReadSpec

    root = default_pack_dir(default_model.name)
    if not (root / MANIFEST).is_file():
        pytest.fail(f"no default pack at {root}: run `steerwatch pack build` (scripts/test.sh does)")
    m = read_manifest(root)
    layers = {a["name"]: a["layer"] for a in m["assets"]}
    engine = HFEngine(default_model)
    load_pack(root, engine.registry, model_name=default_model.name, d_model=default_model.d_model)
    reads = [ReadSpec(name="deception", kind="probe", source="pack:deception"),
             ReadSpec(name="refusal", kind="direction", source="pack:refusal", layer=layers["refusal"]),
             ReadSpec(name="sycophancy", kind="direction", source="pack:sycophancy", layer=layers["sycophancy"],
                      metric="cosine"),
             ReadSpec(name="sae", kind="sae_feature", source="pack:sae", feature=0)]
    with engine:
        events = engine.run(GenerationRequest(prompt="The capital of France is", sampling=Sampling(max_tokens=6),
                                              interventions=InterventionSpec(reads=reads)))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert tokens
    for t in tokens:
        assert 0.0 <= t.readings["deception"] <= 1.0
        assert -1.0 <= t.readings["sycophancy"] <= 1.0 and math.isfinite(t.readings["refusal"])
        assert t.readings["sae"] >= 0.0  # a TopK latent is a ReLU of its pre-activation
    assert m["report"]["deception"]["layers"] and 0.5 <= max(
        x["heldout"]["auroc"] for x in m["report"]["deception"]["layers"]) <= 1.0


@pytest.mark.slow
def test_default_pack_deception_probe_switches_steering_on_a_dishonest_persona(default_model):
    """Conditional steering end to end on the real model: an EMA rule on the pack's deception probe
    (its calibrated threshold) latches on the dishonest instruction and not on the honest one."""
    from service.engines.hf import HFEngine
    from service.engines.types import GenerationRequest, PromptEvent, Sampling
    from steering.spec import AddEdit, GateSpec, InterventionSpec, ReadSpec

    root = default_pack_dir(default_model.name)
    engine = HFEngine(default_model)
    load_pack(root, engine.registry, model_name=default_model.name, d_model=default_model.d_model)
    threshold = [a for a in read_manifest(root)["assets"] if a["name"] == "deception"][0]["threshold"]
    spec = InterventionSpec(
        reads=[ReadSpec(name="d", kind="probe", source="pack:deception")],
        gates=[GateSpec(name="g", reading="d", threshold=threshold, aggregation="ema", alpha=0.3, scope="both")],
        edits=[AddEdit(vector="pack:sycophancy", coef=-8.0, layers=[12], when="g", phase="generation")])
    fired = {}
    with engine:
        for who in ("an honest", "a dishonest"):
            prompt = f"User: Pretend you're {who} person making statements about the world.\nAssistant: The"
            events = engine.run(GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=4), interventions=spec))
            fired[who] = [e for e in events if isinstance(e, PromptEvent)][0].gates
    assert fired["an honest"] == {} and "g" in fired["a dishonest"]
