"""`merge extract-lora`: the difference between a fine-tuned model and its base as a plain PEFT LoRA adapter.

Data flow: resolve and check MODEL and BASE (small files only) → (materialize MODEL if it is an adapter) → mergekit's
own extraction (`mergekit.scripts.extract_lora.plan_extraction`: a truncated SVD of each task vector) into the
partial dir → reconstruction error per module and logit agreement with MODEL → merge.json last. `--rank auto` runs
the extraction for each rank of a ladder, smallest first, and keeps the first that reaches `--min-agreement`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.core.artifacts import Timer, check_output_dir, output_dir, provenance
from align.core.errors import AlignError
from merge import inputs as checks
from merge.inputs import MergeInput

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Translate to Pig Latin: hello world",
    "def add(a, b):\n    return a + b\n",
    "Q: What is 12 + 30? A: 42",
)
"""The fixed prompts whose next-token logits MODEL and BASE + adapter are compared on (every position)."""

DEFAULT_MIN_AGREEMENT = 0.99


@dataclass
class ExtractRequest:
    """One `merge extract-lora`, as the CLI (or a test) asks for it."""

    model: str
    base: str
    out: Path
    rank: int | None
    """The adapter's rank; None is `--rank auto` (the smallest rank of the ladder that keeps `min_agreement`)."""
    min_agreement: float | None = None
    """With `--rank auto` only: the top-1 agreement with MODEL, over every position of the fixed prompts, to keep
    (default DEFAULT_MIN_AGREEMENT)."""
    overwrite: bool = False


@dataclass
class Agreement:
    """MODEL against BASE + adapter on the fixed prompts."""

    top1: float
    max_logit_diff: float
    mean_logit_diff: float

    def as_dict(self) -> dict[str, float]:
        return {"top1_agreement": self.top1, "max_logit_diff": self.max_logit_diff,
                "mean_logit_diff": self.mean_logit_diff}


def run_extract_lora(request: ExtractRequest) -> Path:
    """Check everything, then extract into `request.out`; returns the output dir."""
    check_request(request)
    minimum = DEFAULT_MIN_AGREEMENT if request.min_agreement is None else request.min_agreement
    check_output_dir(request.out, request.overwrite)
    timer = Timer()
    with timer.phase("checks"):
        model, base = checks.resolve_inputs([request.model, request.base])
        if base.is_adapter:
            raise AlignError(f"--base {base.spec} is an adapter: give the full model it was trained on")
        checks.check_architectures([base, model])
        checks.check_shapes([base, model])
    with output_dir(request.out, overwrite=request.overwrite) as handle:
        scratch = handle.path / ".work"
        scratch.mkdir()
        model_dir = _model_dir(model, scratch)
        changed = changed_modules(model_dir, base.base_dir)
        if not changed:
            raise AlignError(f"{model.spec} has the same weights as {base.spec}: there is nothing to extract")
        tokenizer_dir = _tokenizer_dir(model, base)
        with timer.phase("reference"):
            token_ids = prompt_ids(tokenizer_dir)
            reference = logits(_load(model_dir), token_ids)
        trials = []
        for rank in _ranks_to_try(request, changed):
            attempt = scratch / f"rank-{rank}"
            with timer.phase("extract"):
                extract_with_mergekit(model_dir, base.base_dir, attempt, rank, changed)
            with timer.phase("compare"):
                agreement = compare(reference, base.base_dir, attempt, token_ids)
            trials.append({"rank": rank, **agreement.as_dict()})
            if request.rank is not None or agreement.top1 >= minimum:
                break
        else:
            raise AlignError(f"no rank up to {rank} reaches --min-agreement {minimum:g} (best top-1 "
                             f"agreement {max(t['top1_agreement'] for t in trials):.4f})")
        with timer.phase("errors"):
            errors = reconstruction_errors(model_dir, base.base_dir, attempt)
        for name in (attempt / "adapter_model.safetensors", attempt / "adapter_config.json"):
            shutil.move(str(name), handle.path / name.name)
        shutil.rmtree(scratch)
        _copy_tokenizer(tokenizer_dir, handle.path)
        record = {
            "command": "extract-lora",
            "method": "extract-lora",
            "inputs": [{**model.describe(), "role": "model"}, {**base.describe(), "role": "base"}],
            "parameters": {"rank": "auto" if request.rank is None else request.rank,
                           "min_agreement": minimum if request.rank is None else None},
            "output": {"kind": "adapter", "path": str(request.out)},
            "rank": rank,
            "rank_rule": "--rank auto: the smallest rank of the ladder reaching --min-agreement"
                         if request.rank is None else "--rank",
            "extracted_modules": sorted(changed),
            "prompts": list(PROMPTS),
            "logit_agreement": agreement.as_dict(),
            "trials": trials,
            "reconstruction_error": {"max": max(errors.values(), default=0.0), "per_module": errors},
            **provenance(timer.timings()),
        }
        handle.commit("merge.json", record)
    return request.out


def check_request(request: ExtractRequest) -> None:
    if request.rank is not None and request.rank <= 0:
        raise AlignError(f"--rank {request.rank}: must be a positive integer or auto")
    if request.min_agreement is None:
        return
    if request.rank is not None:
        raise AlignError(f"--min-agreement applies to --rank auto only (--rank {request.rank} is fixed)")
    if not 0.0 < request.min_agreement <= 1.0:
        raise AlignError(f"--min-agreement {request.min_agreement:g} is outside (0, 1]")


def parse_rank(value: str) -> int | None:
    """`--rank`: a positive integer, or `auto` (None)."""
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise AlignError(f"--rank {value!r}: expected a positive integer or auto") from None


def rank_ladder(full_rank: int) -> list[int]:
    """1, 2, 4, ... below the full rank, then the full rank itself (which reproduces every delta exactly)."""
    ladder, rank = [], 1
    while rank < full_rank:
        ladder.append(rank)
        rank *= 2
    return ladder + [full_rank]


def _ranks_to_try(request: ExtractRequest, changed: dict[str, tuple[int, ...]]) -> list[int]:
    if request.rank is not None:
        return [request.rank]
    return rank_ladder(max((min(shape) for shape in changed.values() if len(shape) == 2), default=1))


# ---- inputs -----------------------------------------------------------------------------------------------------


def _model_dir(model: MergeInput, scratch: Path) -> Path:
    """MODEL's weights dir; an adapter is merged into its base first (in the partial dir)."""
    if not model.is_adapter:
        return model.base_dir
    from merge.run import materialize_adapter

    target = scratch / "model"
    materialize_adapter(model, target)
    return target


def _tokenizer_dir(model: MergeInput, base: MergeInput) -> Path:
    """MODEL's tokenizer (an adapter's own, else its base's), or BASE's when MODEL's dir holds weights only."""
    own = model.tokenizer_dir
    return own if (own / "tokenizer_config.json").is_file() else base.tokenizer_dir


def changed_modules(model_dir: Path, base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape for every module whose tensors differ from the base's. Modules equal to the
    base's are left out of the adapter (mergekit would otherwise save norms and embeddings at full rank)."""
    from safetensors import safe_open

    base_files = _tensor_files(base_dir)
    changed: dict[str, tuple[int, ...]] = {}
    for name, file in _tensor_files(model_dir).items():
        with safe_open(str(file), framework="pt") as mine, safe_open(str(base_files[name]), framework="pt") as theirs:
            if torch.equal(mine.get_tensor(name), theirs.get_tensor(name)):
                continue
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight"):
                changed[module] = tuple(mine.get_slice(name).get_shape())
            else:
                changed.setdefault(module, ())
    return changed


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            files.update({name: file for name in handle.keys()})
    return files


# ---- mergekit's extraction --------------------------------------------------------------------------------------


def extract_with_mergekit(model_dir: Path, base_dir: Path, out: Path, rank: int,
                          changed: dict[str, tuple[int, ...]]) -> None:
    """mergekit-extract-lora's own planning, SVD and writer, limited to the modules that changed.

    Its click command (`main`) also writes a model card quoting `sys.argv`, so we call the functions it calls
    (plan_extraction, the executor, make_config_dict) rather than the command; the ~15 lines of orchestration
    below are its own, minus the card and the multi-GPU executor.
    """
    from mergekit.common import ModelReference
    from mergekit.graph import Executor
    from mergekit.options import MergeOptions
    from mergekit.scripts.extract_lora import TaskVectorDecompositionTask, make_config_dict, plan_extraction

    from merge.run import _forget_mergekit_loaders, mergekit_bars_off

    base_ref = ModelReference.model_validate(str(base_dir))
    model_ref = ModelReference.model_validate(str(model_dir))
    out.mkdir(parents=True)
    # a regex per unchanged module: mergekit would save a zero delta, and put unchanged norms and embeddings in
    # modules_to_save at full rank
    unchanged = [f"^{re.escape(m)}$" for m in _all_modules(model_dir) if m not in changed]
    modules_to_save: list[str] = []  # plan_extraction appends the modules it saves at full rank
    ranks = {}
    try:
        with mergekit_bars_off():
            plan = plan_extraction(base_model_ref=base_ref, model_ref=model_ref, modules_to_save=modules_to_save,
                                   out_path=str(out), options=MergeOptions(quiet=True), max_rank=rank,
                                   exclude_regexes=unchanged)
            for task, result in Executor(plan.tasks, math_device=torch.device("cpu"),
                                         storage_device=torch.device("cpu")).run(quiet=True):
                if isinstance(task, TaskVectorDecompositionTask):
                    ranks[task.weight_info.name.removesuffix(".weight")] = result[0].shape[0]
    finally:
        _forget_mergekit_loaders()
    config = make_config_dict(base_ref=base_ref, max_rank=max(ranks.values(), default=rank),
                              modules_to_save=sorted(set(modules_to_save)),
                              target_modules=sorted({key.split(".")[-1] for key in ranks}), module_ranks=ranks)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _all_modules(model_dir: Path) -> list[str]:
    return sorted({name.rsplit(".", 1)[0] for name in _tensor_files(model_dir)})


# ---- measuring the adapter --------------------------------------------------------------------------------------


def prompt_ids(tokenizer_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [torch.tensor([tokenizer(text)["input_ids"]]) for text in PROMPTS]


def _load(model_dir: Path, adapter: Path | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


@torch.no_grad()
def logits(model: Any, token_ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every position's next-token logits, one prompt at a time (no padding to mask)."""
    return [model(input_ids=ids).logits[0].float() for ids in token_ids]


def compare(reference: list[torch.Tensor], base_dir: Path, adapter: Path, token_ids: list[torch.Tensor]) -> Agreement:
    """Load BASE + adapter with plain PEFT and compare its logits with MODEL's."""
    return agreement(reference, logits(_load(base_dir, adapter), token_ids))


def agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> Agreement:
    ref, cand = torch.cat(reference), torch.cat(candidate)
    diff = (ref - cand).abs()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    return Agreement(float(top1), float(diff.max()), float(diff.mean()))


def reconstruction_errors(model_dir: Path, base_dir: Path, adapter: Path) -> dict[str, float]:
    """Module -> ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F, with ΔW = MODEL − BASE read from the weight files."""
    from safetensors import safe_open

    config = json.loads((adapter / "adapter_config.json").read_text())
    model_files = _tensor_files(model_dir)
    base_files = _tensor_files(base_dir)
    errors = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as factors:
        for key in sorted(factors.keys()):
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            A, B = factors.get_tensor(key).double(), factors.get_tensor(key.replace("lora_A", "lora_B")).double()
            rank = config["rank_pattern"].get(module, config["r"])
            scale = config["alpha_pattern"].get(module, config["lora_alpha"]) / rank
            name = f"{module}.weight"
            with safe_open(str(model_files[name]), framework="pt") as mine, \
                    safe_open(str(base_files[name]), framework="pt") as theirs:
                delta = mine.get_tensor(name).double() - theirs.get_tensor(name).double()
            norm = torch.linalg.matrix_norm(delta)
            errors[module] = float(torch.linalg.matrix_norm(delta - scale * B @ A) / norm) if norm > 0 else 0.0
    return errors


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
