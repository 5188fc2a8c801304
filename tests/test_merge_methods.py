"""The merge method registry: each method object carries its mergekit configuration, adapter math and defaults."""

from __future__ import annotations

import pytest
import torch

from align.core.errors import AlignError
from merge.methods import METHODS, MergeParams, Stack

PAIR = ["/models/a", "/models/b"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_a_configuration_mergekit_accepts(name):
    from mergekit.config import MergeConfiguration

    method = METHODS[name]
    assert method.name == name
    params = MergeParams(slices=[("/models/a", 0, 2), ("/models/b", 1, 3)]) if isinstance(method, Stack) else MergeParams()
    config = method.mergekit_config(PAIR, "/models/base" if method.needs_base else None, params)
    assert config["merge_method"] == method.mergekit_method(params)
    MergeConfiguration.model_validate(config)


def test_defaults_live_on_the_method():
    linear = METHODS["linear"].mergekit_config(PAIR, None, MergeParams())
    assert [m["parameters"]["weight"] for m in linear["models"]] == [0.5, 0.5]
    assert linear["parameters"] == {"normalize": False}
    ties = METHODS["ties"].mergekit_config(PAIR, "/models/base", MergeParams())
    assert [m["parameters"] for m in ties["models"]] == [{"weight": 1.0, "density": 0.5}] * 2
    assert "parameters" not in ties
    assert METHODS["slerp"].mergekit_config(PAIR, None, MergeParams())["parameters"] == {"t": 0.5}
    assert METHODS["dare"].mergekit_method(MergeParams()) == "dare_linear"
    assert METHODS["dare"].mergekit_method(MergeParams(consensus=True)) == "dare_ties"


def test_adapter_math_is_the_method_s_own():
    d0, d1 = torch.randn(4, 3), torch.randn(4, 3)
    linear = METHODS["linear"].adapter_deltas(MergeParams(weights=[1.0, 3.0], normalize=True), 2, 2)
    torch.testing.assert_close(linear("layers.0.q_proj", [d0, d1]), 0.25 * d0 + 0.75 * d1)
    slerp = METHODS["slerp"].adapter_deltas(MergeParams(t=[0.0]), 2, 2)
    torch.testing.assert_close(slerp("model.layers.0.q_proj", [d0, d1]), d0)
    assert METHODS["stack"].adapter_deltas(MergeParams(), 2, 2) is None and not METHODS["stack"].adapter_space


def test_model_counts_are_checked_by_the_method():
    with pytest.raises(AlignError, match="slerp merges exactly 2 models; 3 given"):
        METHODS["slerp"].check_count(3)
    with pytest.raises(AlignError, match="linear needs at least 2 models; 1 given"):
        METHODS["linear"].check_count(1)
    METHODS["ties"].check_count(1)  # a task vector against the base
