"""The merge method registry: each method object carries its mergekit configuration, adapter math and defaults; and
every mergekit method beyond the first six, as a shortcut and as an example config, gives the very tensors mergekit
gives when called directly on the same configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from align.core.errors import AlignError
from merge.cli import main
from merge.methods import METHODS, REQUIRED, MergekitMethod, MergeParams, Stack
from merge.run import run_config_file

PAIR = ["/models/a", "/models/b"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_a_configuration_mergekit_accepts(name):
    from mergekit.config import MergeConfiguration

    method = METHODS[name]
    assert method.name == name
    params = MergeParams(slices=[("/models/a", 0, 2), ("/models/b", 1, 3)]) if isinstance(method, Stack) else MergeParams()
    models = PAIR
    if isinstance(method, MergekitMethod):
        params = MergeParams(options={o.name: [0.001] for o in method.options() if o.default is REQUIRED})
        models = PAIR[:method.model_counts()[1] or 2]
        method.check_count(len(models))
        method.check_params(params, len(models))
    config = method.mergekit_config(models, "/models/base" if method.needs_base else None, params)
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


def test_a_shortcut_s_options_are_its_mergekit_parameters_with_mergekit_s_defaults():
    from mergekit.merge_methods import registry

    for method in (m for m in METHODS.values() if isinstance(m, MergekitMethod)):
        spec = registry.get(method.mergekit_method(MergeParams())).spec
        assert [o.name for o in method.options()] == [p.name for p in spec.parameters], method.name
        for option, parameter in zip(method.options(), spec.parameters):
            if option.name not in method.defaults:  # mergekit's own default, or required where it has none
                assert option.default == (REQUIRED if parameter.required else parameter.default), (method.name, option.name)
    # where a shortcut departs from mergekit's default (a weight of 1 per model, density 0.5 for the pruning methods)
    overridden = {name: m.defaults for name, m in METHODS.items() if isinstance(m, MergekitMethod) and m.defaults}
    assert all(set(d) <= {"weight", "density"} for d in overridden.values()), overridden
    assert {d.get("density") for d in overridden.values()} <= {None, 0.5}
    # the same parameter name, each method's own default: DELLA normalizes, linear DELLA does not
    della = METHODS["della"].mergekit_config(PAIR, "/models/base", MergeParams())
    assert [m["parameters"] for m in della["models"]] == [{"weight": 1.0, "density": 0.5, "epsilon": 0.15}] * 2
    assert della["parameters"] == {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0}
    della_linear = METHODS["della-linear"].mergekit_config(PAIR, "/models/base", MergeParams())
    assert della_linear["parameters"]["normalize"] is False
    karcher = METHODS["karcher"].mergekit_config(PAIR, None, MergeParams(options={"max_iter": 3}))
    assert karcher["parameters"] == {"max_iter": 3, "tol": 1e-5} and "base_model" not in karcher
    nearswap = METHODS["nearswap"].mergekit_config(PAIR[:1], "/models/base", MergeParams(options={"t": [0.0, 0.01]}))
    assert nearswap["parameters"] == {"t": [0.0, 0.01]} and nearswap["models"] == [{"model": "/models/a"}]
    # what a pipeline merge stage sets (weights, density, t) drives them too
    staged = METHODS["breadcrumbs"].mergekit_config(PAIR, "/models/base", MergeParams(weights=[0.7, 0.3], density=[0.9]))
    assert [m["parameters"] for m in staged["models"]] == [{"weight": 0.7, "density": 0.9, "gamma": 0.01},
                                                           {"weight": 0.3, "density": 0.9, "gamma": 0.01}]


def test_model_counts_and_base_come_from_mergekit_s_input_contract():
    counts = {name: m.model_counts() for name, m in METHODS.items() if isinstance(m, MergekitMethod)}
    assert counts["model-stock"] == (2, None) and counts["nuslerp"] == (2, 2)
    assert counts["nearswap"] == counts["arcee-fusion"] == (1, 1) and counts["della"] == (1, None)
    assert {m.base_policy for m in METHODS.values() if isinstance(m, MergekitMethod) and not m.needs_base} == {
        "optional", "ignored"}
    assert METHODS["karcher"].base_policy == "ignored" and METHODS["multislerp"].base_policy == "optional"


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


# ---- every mergekit method: its example through `merge config`, its shortcut, and mergekit itself ------------------

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "recipes" / "merge").glob("*.yaml"))
# the mergekit 0.1.5 methods issue 16 asks for
REQUIRED_METHODS = {"model_stock", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "nuslerp", "multislerp",
            "karcher", "sce", "arcee_fusion", "nearswap"}
A, B, BASE = "models/sft-a", "models/sft-b", "models/base"
# each example's configuration as shortcut flags (written here, not derived from the YAML, so a shortcut that builds a
# different configuration fails the tensor comparison)
SHORTCUTS = {
    "model_stock": ["model-stock", A, B, "--base", BASE, "--no-filter-wise"],
    "della": ["della", A, B, "--base", BASE, "--weights", "0.5,0.5", "--density", "0.6", "--epsilon", "0.1",
              "--lambda", "1.0", "--seed", "0"],
    "della_linear": ["della-linear", A, B, "--base", BASE, "--weights", "0.7,0.3", "--density", "0.5", "--epsilon",
                     "0.2", "--lambda", "1", "--seed", "0"],
    "breadcrumbs": ["breadcrumbs", A, B, "--base", BASE, "--weights", "0.5,0.5", "--density", "0.8", "--gamma", "0.05"],
    "breadcrumbs_ties": ["breadcrumbs-ties", A, B, "--base", BASE, "--weights", "0.5,0.5", "--density", "0.8",
                         "--gamma", "0.05"],
    "nuslerp": ["nuslerp", A, B, "--base", BASE, "--weights", "0.7,0.3", "--nuslerp-flatten", "--no-nuslerp-row-wise"],
    "multislerp": ["multislerp", A, B, BASE, "--weights", "0.5,0.3,0.2", "--normalize-weights"],
    "karcher": ["karcher", A, B, BASE, "--max-iter", "10", "--tol", "1e-5"],
    "sce": ["sce", A, B, "--base", BASE, "--select-topk", "0.5"],
    "arcee_fusion": ["arcee-fusion", A, "--base", BASE],
    "nearswap": ["nearswap", A, "--base", BASE, "-t", "0.001"],
    "ram": ["ram", A, B, "--base", BASE, "--epsilon", "1e-5"],
    "ramplus_tl": ["ramplus-tl", A, B, "--base", BASE, "--r", "0.2", "--alpha", "0.5", "--epsilon", "1e-5"],
}


@pytest.fixture
def models_here(tmp_path, monkeypatch, tiny_model_dir, tiny_model_dir_b, tiny_base_model_dir) -> Path:
    """The examples name models/base, models/sft-a and models/sft-b: link the tiny models there and work there."""
    models = tmp_path / "models"
    models.mkdir()
    for name, target in (("base", tiny_base_model_dir), ("sft-a", tiny_model_dir), ("sft-b", tiny_model_dir_b)):
        (models / name).symlink_to(target, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def run_mergekit_directly(config_path: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    run_merge(config, str(out), MergeOptions(random_seed=seed, copy_tokenizer=True, quiet=True))
    return weights(out)


def assert_same_tensors(merged: dict[str, torch.Tensor], direct: dict[str, torch.Tensor], *inputs: Path) -> None:
    assert set(merged) == set(direct) == set(weights(inputs[0]))
    for name, tensor in merged.items():
        assert torch.equal(tensor, direct[name]), name
        assert torch.isfinite(tensor).all(), name
    # a real merge: the result is none of its inputs
    for source in map(weights, inputs):
        assert any(not torch.equal(tensor, source[name]) for name, tensor in merged.items())


def test_every_required_method_has_an_example_and_a_shortcut():
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in EXAMPLES}
    assert REQUIRED_METHODS <= methods
    assert all(p.stem == yaml.safe_load(p.read_text())["merge_method"] for p in EXAMPLES)
    assert set(SHORTCUTS) == methods
    assert {name.replace("-", "_") for name in METHODS} >= methods


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_and_shortcut_merge_exactly_as_mergekit_does(example, models_here, tiny_model_dir,
                                                            tiny_base_model_dir):
    direct = run_mergekit_directly(example, models_here / "direct", seed=0)

    through_config = run_config_file(example, models_here / "config", seed=0)
    assert_same_tensors(weights(through_config), direct, tiny_model_dir, tiny_base_model_dir)
    assert (through_config / "merge.json").is_file() and (through_config / "mergekit_config.yml").is_file()

    result = CliRunner().invoke(main, [*SHORTCUTS[example.stem], "--dtype", "float32", "-o", "shortcut"])
    assert result.exit_code == 0, result.output
    shortcut = models_here / "shortcut"
    assert_same_tensors(weights(shortcut), direct, tiny_model_dir, tiny_base_model_dir)
    written = yaml.safe_load((shortcut / "mergekit_config.yml").read_text())
    assert written["merge_method"] == example.stem
    assert json.loads((shortcut / "merge.json").read_text())["mergekit_method"] == example.stem


def test_readme_table_names_every_method_s_shortcut_and_example():
    readme = (ROOT / "README.md").read_text()
    for example in EXAMPLES:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{example.stem}` |")), None)
        assert row is not None, example.stem
        assert f"`merge {SHORTCUTS[example.stem][0]} " in row and f"recipes/merge/{example.name}" in row, row


def test_mergekit_s_spelling_reaches_the_same_shortcut_and_flags():
    result = CliRunner().invoke(main, ["model_stock", "-h"])
    assert result.exit_code == 0 and "Model Stock" in result.output
    result = CliRunner().invoke(main, ["sce", "a", "--base", "b", "--select_topk", "most", "-o", "out"])
    assert result.exit_code == 2 and "--select-topk 'most': expected comma-separated numbers" in result.stderr
