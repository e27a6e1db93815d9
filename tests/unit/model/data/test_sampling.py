"""The stable user sample (model/data/sampling.py) and the memory hint that proposes one."""

from __future__ import annotations

import pytest

from demandstream.model.data.sampling import (
    MIN_SUGGESTED,
    available_memory_bytes,
    check_fraction,
    in_user_sample,
    suggested_user_sample,
    training_memory_bytes,
)
from demandstream.model.errors import OptionError

USERS = [f"user-{i}" for i in range(20_000)] + [str(512_000_000 + i) for i in range(20_000)]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9])
def test_the_sample_keeps_about_the_fraction_of_sequential_and_named_ids(fraction):
    for ids in (USERS[:20_000], USERS[20_000:]):  # REES46 and Taobao ids are consecutive numbers
        kept = sum(in_user_sample(u, fraction) for u in ids)
        sd = (len(ids) * fraction * (1 - fraction)) ** 0.5
        assert abs(kept - len(ids) * fraction) < 5 * sd


def test_the_sample_is_a_function_of_the_id_and_nested_across_fractions():
    quarter = {u for u in USERS if in_user_sample(u, 0.25)}
    assert quarter == {u for u in reversed(USERS) if in_user_sample(u, 0.25)}  # no order, no state
    assert quarter <= {u for u in USERS if in_user_sample(u, 0.5)}
    assert all(in_user_sample(u, 1.0) for u in USERS[:100])


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.0001, float("nan")])
def test_a_fraction_outside_0_1_is_refused(bad):
    with pytest.raises(OptionError, match=r"fraction in \(0, 1\]"):
        check_fraction(bad)


def test_the_hint_proposes_a_fraction_that_fits_and_none_when_all_fits():
    assert suggested_user_sample(10_000, 167, training_memory_bytes(10_000, 167)) is None
    cases = [
        (40_000_000, 500, 16_000_000_000),
        (5_000_000, 167, 4_000_000_000),
        (4_000_000, 10_000, 4 * 2**30),
    ]
    for rows, categories, available in cases:
        f = suggested_user_sample(rows, categories, available)
        assert f is not None and MIN_SUGGESTED <= f < 1
        assert training_memory_bytes(int(rows * f), categories) <= available  # it fits ...
        assert (
            training_memory_bytes(int(rows * f * 1.2), categories) > available
        )  # ... without giving much away
    assert suggested_user_sample(10**8, 167, 10**9) == MIN_SUGGESTED  # less than the libraries need


def test_the_estimate_covers_the_measured_runs_and_errs_on_the_side_of_warning():
    # the runs the constants were rounded up from (model/data/sampling.py, docs/MODEL.md §4.9)
    for rows, categories, measured_gb in [
        (221_186, 167, 1.45),
        (898_999, 167, 2.01),  # since the slots' counts are narrow (2.13 GB before)
        (45_072, 5_730, 1.51),  # since the chunked cascade-scale fit (2.74 GB before it)
        (179_548, 9_501, 1.73),
    ]:
        estimate = training_memory_bytes(rows, categories) / 1e9
        assert measured_gb <= estimate <= 1.2 * measured_gb


def test_available_memory_reads_meminfo_and_gives_none_without_it(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n")
    assert available_memory_bytes(meminfo) == 12_000_000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert available_memory_bytes(meminfo) is None
    assert available_memory_bytes(tmp_path / "absent") is None
