"""On-policy preference pairs: sample an adapter on training prompts and keep its wrong answers as `rejected`."""

from __future__ import annotations

import json
from pathlib import Path

from align.core.errors import AlignError
from align.pipeline.stages import Pipeline, PairsStage


def run_pairs_stage(stage: PairsStage, pipeline: Pipeline) -> Path:
    """Sample the adapter `samples` times per prompt; every distinct wrong answer becomes a rejected completion."""
    from align.core.artifacts import output_dir
    from align.core.data import load_sft_data, render_chat
    from align.core.models import resolve_model
    from eval.generate import free, generate_texts, load_for_eval
    from eval.suites import GenerationSpec

    rows, _, _ = load_sft_data(stage.data, split=stage.split, limit=stage.limit)
    prompts, references = [], []
    for row in rows:
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            raise AlignError(f"{stage.data}: pairs need conversations that end with the reference answer")
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"].strip())
    with output_dir(pipeline.rundir / stage.name, overwrite=True) as handle:
        lm = load_for_eval(stage.adapter, resolve_model(pipeline.path(stage.adapter)))
        texts = [render_chat(lm.tokenizer, p, add_generation_prompt=True) for p in prompts]
        settings = GenerationSpec(max_new_tokens=stage.max_new_tokens, do_sample=True, temperature=stage.temperature,
                                  top_p=1.0)
        samples = [generate_texts(lm, texts, settings, seed=stage.seed + k) for k in range(stage.samples)]
        free(lm)
        pairs, correct = [], 0
        for i, (prompt, reference) in enumerate(zip(prompts, references)):
            wrong = []
            for k in range(stage.samples):
                answer = samples[k][i].strip()
                if answer == reference:
                    correct += 1
                elif answer and answer not in wrong:
                    wrong.append(answer)
            pairs += [{"prompt": prompt, "chosen": [{"role": "assistant", "content": reference}],
                       "rejected": [{"role": "assistant", "content": w}]} for w in wrong]
        if not pairs:
            raise AlignError(f"pairs stage '{stage.name}': every sample was correct, so there is nothing to prefer "
                             "against (raise temperature or samples, or use harder prompts)")
        (handle.path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        record = {"prompts": len(prompts), "samples_per_prompt": stage.samples, "pairs": len(pairs),
                  "sample_accuracy": correct / (len(prompts) * stage.samples), "adapter": pipeline.path(stage.adapter),
                  "config": stage.model_dump(mode="json")}
        return handle.commit("pairs.json", record)

