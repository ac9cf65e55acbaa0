"""Custom machine types from cores × memory, by Compute Engine's rules for each family."""

import pytest

from sdm_peer.providers.gce.machine_types import (DEFAULT_ORDER, FAMILIES, UnservableShape, custom_machine_type,
                                              memory_mb)


@pytest.mark.parametrize("cores, memory_gb, family, expected", [
    (2, 8, "n2", "n2-custom-2-8192"),
    (4, 16, "n2", "n2-custom-4-16384"),
    (36, 72, "n2", "n2-custom-36-73728"),
    (2, 20, "n2", "n2-custom-2-20480-ext"),  # 10 GB per vCPU: past N2's 8, extended memory
    (1, 1, "n1", "custom-1-1024"),
    (1, 6.5, "n1", "custom-1-6656"),
    (1, 8, "n1", "custom-1-8192-ext"),
    (4, 3.75, "n1", "custom-4-3840"),
    (2, 4, "n2d", "n2d-custom-2-4096"),
    (48, 96, "n2d", "n2d-custom-48-98304"),
    (2, 16, "e2", "e2-custom-2-16384"),
    (32, 128, "e2", "e2-custom-32-131072"),
])
def test_machine_type_string_in_a_given_family(cores, memory_gb, family, expected):
    assert custom_machine_type(cores, memory_gb, family) == expected


@pytest.mark.parametrize("cores, memory_gb, expected", [
    (2, 8, "n2-custom-2-8192"),  # N2 first
    (1, 2, "custom-1-2048"),  # 1 vCPU: only N1 has it
    (1, 24, "custom-1-24576-ext"),  # and with extended memory
    (34, 68, "custom-34-69632"),  # N2 has no 34 (36 after 32), N1 does
    (128, 256, "n2-custom-128-262144"),  # past N1's 96
    (2, 700, "n2d-custom-2-716800-ext"),  # past N2's and N1's 624 GB cap, within N2D's 768
])
def test_family_is_the_first_that_fits(cores, memory_gb, expected):
    assert custom_machine_type(cores, memory_gb) == expected


@pytest.mark.parametrize("cores, memory_gb, family, reason", [
    (3, 6, "n2", "n2 takes 2 to 32 in steps of 2, then 36 to 128 in steps of 4 vCPUs"),
    (34, 68, "n2", "n2 takes"),
    (1, 1, "n2", "n2 takes"),
    (2, 0.5, "n1", "n1 needs at least 0.9 GB per vCPU"),
    (4, 1, "n2", "n2 needs at least 0.5 GB per vCPU"),
    (2, 20, "e2", "e2 allows at most 8 GB per vCPU (no extended memory)"),
    (2, 640, "n2", "n2 allows at most 624 GB in all"),
    (12, 24, "n2d", "n2d takes 2, 4, 8, 16, or 32 to 96 in steps of 16 vCPUs"),
    (98, 196, "n1", "n1 takes 1, or 2 to 96 in steps of 2 vCPUs"),
])
def test_shape_a_family_cannot_serve_is_refused_with_the_reason(cores, memory_gb, family, reason):
    with pytest.raises(UnservableShape, match="^" + str(cores)) as refused:
        custom_machine_type(cores, memory_gb, family)
    assert reason in str(refused.value)


def test_shape_no_family_serves_names_every_familys_reason():
    with pytest.raises(UnservableShape) as refused:
        custom_machine_type(1, 0.5)
    message = str(refused.value)
    assert message.startswith("1 vCPU x 0.5 GB: ")
    for name in DEFAULT_ORDER:
        assert f"{name} " in message


@pytest.mark.parametrize("memory_gb", [1.1, 0.1, 3.3])
def test_memory_must_be_a_multiple_of_256_mb(memory_gb):
    with pytest.raises(UnservableShape, match="not a multiple of 256 MB"):
        memory_mb(memory_gb)


def test_memory_refusal_suggests_the_nearest_valid_sizes():
    with pytest.raises(UnservableShape, match=r"^2 vCPU x 1.1 GB: .*nearest: 1 or 1\.25 GB"):
        custom_machine_type(2, 1.1)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="machine_family must be one of n2, n1, n2d, e2"):
        custom_machine_type(2, 8, "c3")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_allowed_vcpu_count_at_its_minimum_and_maximum_memory_is_served(name):
    family = FAMILIES[name]
    for cores in sorted(family.vcpus):
        for per_vcpu in (family.min_mb_per_vcpu, family.max_mb_per_vcpu):
            megabytes = -(-cores * per_vcpu // 256) * 256  # rounded up to the 256 MB step
            if megabytes > family.max_total_mb:
                continue
            assert custom_machine_type(cores, megabytes / 1024, name).startswith(f"{family.prefix}-{cores}-")
