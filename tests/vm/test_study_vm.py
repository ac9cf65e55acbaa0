"""A whole small study with nobody acting: the fake Compute API boots every instance its managed
groups create as a QEMU VM; the first group's worker finishes its config, creates the next
config's group in the hand-off and removes its own; the next group boots, claims and finishes."""

import pytest

from sdm_peer import states as st

from ..runs import status, with_store
from .conftest import FIGURES, STUDY, wait_for

STUDY_SECONDS = 2400  # two boots one after the other under TCG, each beside another VM
pytestmark = pytest.mark.timeout(STUDY_SECONDS + 600)


def test_a_study_hands_off_to_its_next_group_and_finishes_with_nobody_acting(study, worker):
    """(`worker`: the worker VM of tests/vm/test_worker_vm.py boots beside the second VM.)"""
    run, compute, vms = study

    def configs_done():
        return [c["state"] for c in status(run)["configs"]] == [st.CONFIG_DONE] * 2
    wait_for(configs_done, STUDY_SECONDS, "study with both configs DONE", interval=5)
    config_of = with_store(run, lambda store: {e["key"]: e["config"] for e in store.experiments()})
    attempts = with_store(run, lambda store: store.attempts())
    first, second = (f"sdm-{STUDY}-c1-m1", f"sdm-{STUDY}-c1-m2")
    # One VM per group, made by the fake's managed group from the template: the first group's
    # by the provisioning of bootstrap, the second's by the first VM's worker in its hand-off.
    assert [name.rsplit("-", 1)[0] for name in vms.vms] == [first, second]
    vm_a, vm_b = vms.vms
    for name in (vm_a, vm_b):
        claims = [a["claimed_at"] for a in attempts if a["worker"] == name]
        FIGURES[f"boot to first claim, {name} (study)"] = f"{min(claims) - vms.vms[name].started_wall:.0f} s"
    assert sorted((config_of[a["key"]], a["worker"], a["outcome"]) for a in attempts) == \
        [(first.removeprefix(f"sdm-{STUDY}-"), vm_a, st.DONE)] * 3 + [(second.removeprefix(f"sdm-{STUDY}-"), vm_b,
                                                                       st.DONE)] * 3
    provisioned = with_store(run, lambda store: store.events(kind="group_provisioned"))
    assert [(e["config"], e["worker"]) for e in provisioned] == [("c1-m1", "bootstrap"), ("c1-m2", vm_a)]
    created = [body["name"] for _, _, body in compute.calls("POST", "instanceGroupManagers$")]
    assert created == [first, second]
    # Each last worker removed its own group; Compute Engine powered its VM off (ACPI), and the
    # guest went down cleanly.
    wait_for(lambda: not compute.groups, 600, "every group removed", interval=5)
    for name in (vm_a, vm_b):
        assert vms.vms[name].wait_stopped(300) is not None, f"{name} did not power off"
