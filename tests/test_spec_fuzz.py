"""Fuzzing the spec loader: whatever the input, only the documented UserError escapes."""

import copy
import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling_study.errors import UserError
from scaling_study.grid import expand
from scaling_study.spec import load_spec, spec_from_data

from conftest import BASE_SPEC

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["10%", "2.2B", "trajectory", "tiny", "paper12", "1e-4"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=10)


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, prefix + (i,))


ALL_PATHS = [p for p in _paths(BASE_SPEC) if p]


def _mutated(path: tuple, value) -> dict:
    """BASE_SPEC with the field at `path` replaced by `value`."""
    data = copy.deepcopy(BASE_SPEC)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def _check(call):
    try:
        study = call()
    except UserError as err:
        # one line, no stack trace (the bad value itself may be any text, so look for the trace's header)
        assert str(err).strip() and "Traceback (most recent call last)" not in str(err)
        return
    expand(study)  # a spec that loads must also expand


@FUZZ
@given(st.text(max_size=400))
def test_random_text(text):
    _check(lambda: load_spec("fuzz.yaml", text=text))


@FUZZ
@given(st.sampled_from(ALL_PATHS), values)
def test_mutated_field(path, value):
    data = _mutated(path, value)
    _check(lambda: spec_from_data(data, "fuzz.yaml"))


@FUZZ
@given(st.sampled_from(ALL_PATHS), values)
def test_mutated_yaml_round_trip(path, value):
    data = _mutated(path, value)
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    _check(lambda: load_spec("fuzz.yaml", text=text))
