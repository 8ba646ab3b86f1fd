"""AdamSPD and the SPD add-on as the client optimizer of DeepSpeed ZeRO stages 1, 2 and 3 (gloo on
CPU, float32): with spdecay.integrations.deepspeed.attach(engine) the trajectory equals the
single-process run, decision by decision; without it the first step is refused; DeepSpeed's own
checkpoints resume exactly; offload is refused by attach. The work runs in
tests/helpers/ds_worker.py (one launch per process count, every case inside); here we assert on its
numbers."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from tests.helpers import ds_worker as _ds_worker  # noqa: E402

pytestmark = pytest.mark.distributed

# float32, 12 steps: the only difference to one process is the rounding of the gradient average
# across ranks (~1e-7 measured); a layout that treats each partition as one layer is ~3e-2 off.
TOL = 1e-5
BLIND = 1e-3
ATTACH_HINT = "spdecay.integrations.deepspeed.attach(engine)"
TRAJECTORIES = ("s0", "s1", "s2", "s3", "addon_s1", "addon_s2", "addon_s3", "s2_round_robin_aligned")


_RUNS: dict[int, dict] = {}


def _run(world: int, tmp_path_factory) -> dict:
    """Every check with 2 processes; with 3 (uneven partitions) the trajectories only."""
    if world not in _RUNS:
        _RUNS[world] = _ds_worker.spawn(world, tmp_path_factory.mktemp(f"ds{world}"),
                                        full=world == 2)
    return _RUNS[world]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}proc")
def res(request, tmp_path_factory):
    """The trajectories (ZeRO-1/2/3, the add-on on ZeRO-2), with 2 and with 3 processes."""
    return _run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def res2(tmp_path_factory):
    """Every other check (resumes, refusals, controls): they do not depend on the process
    count, so the 2-process run only."""
    return _run(2, tmp_path_factory)


def test_reference_fires_on_some_steps_and_not_others(res):
    for key in ("ref_fired", "ref_addon_fired"):
        steps = res[key]
        assert len(steps) == _ds_worker.STEPS
        per_tensor = {n: [s[n] for s in steps] for n in steps[0]}
        mixed = [n for n, f in per_tensor.items() if any(f) and not all(f)]
        assert len(mixed) >= 3, per_tensor  # several layers switch between fired and not
        assert any(not any(s.values()) or not all(s.values()) for s in steps)


@pytest.mark.parametrize("key", TRAJECTORIES)
def test_trajectory_equals_single_process(res, key):
    if key not in res:
        pytest.skip("checked with 2 processes only (the 3-process run: ZeRO-1/2/3, add-on ZeRO-2)")
    r = res[key]
    assert r["diff"] < TOL, f"{key}: max |difference| {r['diff']:.3g} to the single-process run"
    ref = res["ref_addon_fired" if key.startswith("addon") else "ref_fired"]
    assert r["fired"] == ref  # the same decision for every layer at every step


@pytest.mark.parametrize("key", ["s1", "s2", "addon_s1", "addon_s2"])
def test_layout_has_split_tensors_and_mixed_partitions(res2, key):
    backbone = [ranks[0] for ranks in res2[key]["pieces"]]  # per rank: logical ids in group 0
    split = [i for i in range(5) if sum(i in ids for ids in backbone) >= 2]
    assert split, backbone  # a tensor cut across two ranks' partitions
    assert any(len(set(ids)) >= 2 for ids in backbone), backbone  # several tensors on one rank
    assert sorted({i for ids in backbone for i in ids}) == list(range(5))  # every tensor somewhere
    gate = [ranks[2] for ranks in res2[key]["pieces"]]
    assert [] in gate  # a rank whose partition of the gate group is only padding


def test_without_zero_attach_has_nothing_to_do(res2):
    assert res2["s0"]["pieces"] == [[]] * len(res2["s0"]["pieces"])  # no layouts on any rank


def test_round_robin_reorders_the_partitions(res2):
    backbone = [ranks[0] for ranks in res2["s2_round_robin_aligned"]["pieces"]]
    order = [i for ids in backbone for i in ids]
    order = [i for k, i in enumerate(order) if k == 0 or order[k - 1] != i]  # split tensors once
    assert sorted(order) == list(range(5)) and order != sorted(order), backbone


def test_whole_partition_layout_is_detected(res2):
    # the control that proves the comparison can fail: per-partition decisions are far off
    assert res2["whole_partition_layout"] > BLIND


@pytest.mark.parametrize("key", ["no_attach_s1", "no_attach_s2", "no_attach_s3", "addon_no_attach_s2"])
def test_without_attach_the_first_step_is_refused(res2, key):
    r = res2[key]
    assert r["error"] is not None, f"{key}: stepped flat partitions without a layout"
    assert r["error"].startswith("RuntimeError") and ATTACH_HINT in r["error"], r["error"]
    assert r["unchanged"]  # refused before anything changed


@pytest.mark.parametrize("key", ["s1", "s2", "s3", "addon_s2"])
def test_deepspeed_checkpoint_resumes_exactly(res2, key):
    r = res2[key]
    assert r["resume_at_load"] < TOL  # the saved step-6 weights, not the fresh seed's
    # anchors come only from the checkpoint (the fresh engines start from another seed)
    assert r["resume"] < TOL, f"resumed run {r['resume']:.3g} from the uninterrupted one"


@pytest.mark.parametrize("key, error, words", [
    ("attach_offload", "NotImplementedError", "optimizer offload"),
    ("attach_offload_s3", "NotImplementedError", "optimizer offload"),
    ("attach_param_offload_s3", "NotImplementedError", "parameter offload"),
    ("attach_bf16_no_zero", "NotImplementedError", "DeepSpeed wraps the optimizer in"),
    ("attach_without_spd", "TypeError", "expected spdecay.AdamSPD"),
])
def test_attach_refuses_what_it_does_not_map(res2, key, error, words):
    assert res2[key] is not None and res2[key].startswith(error), res2[key]
    assert words in res2[key], res2[key]
