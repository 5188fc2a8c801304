"""`align export`: GGUF files that load back through transformers' GGUF loader (the project's own .gguf path) with
the source model's logits, tokens, chat template and end-of-turn token; pre-flight errors that write nothing.

transformers rebuilds a GGUF vocabulary as a byte-level BPE, so these tests use a tiny byte-level BPE tokenizer
trained here with the `tokenizers` library (the char tokenizer of conftest.py is a WordLevel one)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import CHATML, make_tiny_llama

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "pig latin moves the first consonants to the end",
    "What is the capital of France? Paris.", "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)",
    "1 + 1 = 2, 12 * 12 = 144", "hello world, say hello in pig latin: ellohay orldway",
]


def make_bpe_tokenizer(vocab_size: int = 320, chat_template: str | None = CHATML):
    """A byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder), ChatML specials at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def save_bpe_model(path: Path, seed: int = 0, tied: bool = False, chat_template: str | None = CHATML,
                   extra_tokens: int = 0, fit: bool = True) -> Path:
    tokenizer = make_bpe_tokenizer(chat_template=chat_template)
    model = make_tiny_llama(len(tokenizer), seed=seed)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if fit:
        fit_briefly(model, tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    if extra_tokens:
        tokenizer.add_tokens([f"<extra{i}>" for i in range(extra_tokens)])
    tokenizer.save_pretrained(path)
    return path


def fit_briefly(model, tokenizer, steps: int = 40) -> None:
    """A few Adam steps on the corpus, so the model predicts with real margins: a random model's next-token
    distribution is nearly flat, and its top-1 flips under any rounding, which would say nothing about Q8_0."""
    import torch

    torch.manual_seed(0)
    batch = tokenizer(CORPUS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory) -> Path:
    return save_bpe_model(tmp_path_factory.mktemp("bpe") / "model")


def cli(*args: str):
    from align.cli import main

    return CliRunner().invoke(main, ["export", *args])


def test_f16_export_reloads_with_the_source_logits_tokens_template_and_eos(bpe_model_dir, tmp_path, cache_dir):
    from align.export import export_gguf, verify_round_trip

    result = export_gguf(str(bpe_model_dir), tmp_path / "m.gguf", "f16")
    check = verify_round_trip(str(bpe_model_dir), result.path)
    # f16 weights: each logit differs by rounding only (logits of order 1-10; the max is over ~3000 positions x 320
    # tokens), which may swap a near-tie (1 of 3024 positions on the machine that wrote this) but no clear decision
    assert check.max_abs_diff < 4e-2, check
    assert check.top1_agreement_clear == 1.0 and check.top1_agreement >= 0.999, check
    assert check.tokens_match and check.chat_template_match and check.eos_match
    assert result.eos_token == "<|im_end|>"
    assert not (tmp_path / "m.gguf.partial").exists()


def test_q8_0_export_agrees_on_top1_and_reports_kl(bpe_model_dir, tmp_path, cache_dir):
    from align.export import export_gguf, verify_round_trip

    f16 = export_gguf(str(bpe_model_dir), tmp_path / "m16.gguf", "f16")
    q8 = export_gguf(str(bpe_model_dir), tmp_path / "m8.gguf", "q8_0")
    check = verify_round_trip(str(bpe_model_dir), q8.path)
    # A briefly trained model's logits are close together, so Q8_0's rounding swaps near-ties (0.9937 overall on the
    # 3024 positions, on an AVX2 machine; the count moves with the CPU's fp32 accumulation order). A decision the
    # source makes clearly may flip only rarely (1 of 2884 there), and most positions must be clear for that to mean
    # much.
    assert check.top1_agreement_clear >= 0.999 and check.clear_positions >= 0.8 * check.positions, check
    assert check.top1_agreement >= 0.98, check
    assert 0 <= check.mean_kl < 1e-2, check
    assert q8.bytes < f16.bytes


def test_gguf_keys_are_llama_cpps(bpe_model_dir, tmp_path):
    import gguf

    from align.export import export_gguf

    path = export_gguf(str(bpe_model_dir), tmp_path / "m.gguf", "q8_0").path
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}
    im_end = 2
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == im_end and fields["tokenizer.ggml.eot_token_id"] == im_end
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.padding_token_id"] == 0
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [3, 3, 3] and set(types[3:]) == {1}  # the ChatML specials are CONTROL
    by_name = {t.name: t.tensor_type.name for t in reader.tensors}
    assert by_name["blk.0.attn_q.weight"] == "Q8_0" and by_name["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in by_name  # untied lm_head


def test_q_and_k_rows_are_permuted_as_llama_cpp_expects_and_transformers_undoes():
    import numpy as np
    import torch
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from align.export import permute_for_rope

    weight = torch.arange(8 * 3 * 4, dtype=torch.float32).reshape(8 * 3, 4)  # 3 heads of dim 8
    permuted = permute_for_rope(weight, 3)
    assert not torch.equal(permuted, weight)
    # within a head, llama.cpp interleaves the two rotary halves: rows 0,4,1,5,2,6,3,7
    assert torch.equal(permuted[:8, 0], weight[[0, 4, 1, 5, 2, 6, 3, 7], 0])
    back = LlamaTensorProcessor({})._reverse_permute_weights(permuted.numpy(), 3, 3)
    assert np.array_equal(back, weight.numpy())


def test_tied_embeddings_write_no_output_tensor_and_reload_tied(tmp_path, cache_dir):
    import gguf

    from align.export import export_gguf, verify_round_trip

    source = save_bpe_model(tmp_path / "tied", tied=True)
    path = export_gguf(str(source), tmp_path / "tied.gguf", "f16").path
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    # as for every f16 file here: each clear decision kept, a near-tie may flip (1 of 3024 on an AVX512-BF16 CPU)
    check = verify_round_trip(str(source), path)
    assert check.top1_agreement_clear == 1.0 and check.top1_agreement >= 0.999, check


def test_an_adapter_is_merged_into_its_base_before_export(bpe_model_dir, tmp_path, cache_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.export import export_gguf, verify_round_trip

    base = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(bpe_model_dir).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bpe_model_dir)

    merged = export_gguf(str(adapter), tmp_path / "a.gguf", "f16").path
    plain = export_gguf(str(bpe_model_dir), tmp_path / "b.gguf", "f16").path
    check = verify_round_trip(str(adapter), merged)
    assert check.max_abs_diff < 0.1 and check.top1_agreement_clear == 1.0 and check.top1_agreement >= 0.999, check
    # and the adapter mattered: the base alone differs from the merged source by far more than rounding
    assert verify_round_trip(str(adapter), plain).max_abs_diff > 10 * check.max_abs_diff


def test_cli_writes_the_file_and_prints_the_round_trip(bpe_model_dir, tmp_path, cache_dir):
    out = tmp_path / "cli.gguf"
    result = cli(str(bpe_model_dir), "-o", str(out), "--type", "q8_0", "--verify")
    assert result.exit_code == 0, result.output
    assert out.is_file() and "q8_0" in result.output and "top-1 agreement" in result.output


@pytest.mark.parametrize("case, message", [
    ("exists", "exists (pass --overwrite"),
    ("no_template", "has no chat template"),
    ("mismatch", "tokens but the embedding has"),
    ("arch", "architecture GPT2LMHeadModel is not supported"),
    ("suffix", "must end in .gguf"),
])
def test_preflight_errors_are_one_line_exit_2_and_write_nothing(case, message, bpe_model_dir, tmp_path):
    out = tmp_path / "out.gguf"
    source = bpe_model_dir
    if case == "exists":
        out.write_bytes(b"old")
    elif case == "no_template":
        source = save_bpe_model(tmp_path / "plain", chat_template=None, fit=False)
    elif case == "mismatch":
        source = save_bpe_model(tmp_path / "grown", extra_tokens=3, fit=False)
    elif case == "arch":
        from transformers import GPT2Config, GPT2LMHeadModel

        source = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=323)).save_pretrained(source)
        make_bpe_tokenizer().save_pretrained(source)
    elif case == "suffix":
        out = tmp_path / "out.bin"
    result = cli(str(source), "-o", str(out))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    if case == "exists":
        assert out.read_bytes() == b"old"
    else:
        assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


def test_overwrite_replaces_an_existing_file(bpe_model_dir, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    assert cli(str(bpe_model_dir), "-o", str(out), "--overwrite").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_greedy_generates_the_same_first_tokens_as_transformers(bpe_model_dir, tmp_path):
    from align.export import export_gguf

    path = export_gguf(str(bpe_model_dir), tmp_path / "m.gguf", "f16").path
    assert greedy_tokens_agree(*transformers_and_llama_cpp(str(bpe_model_dir), path), new_tokens=8)


def transformers_and_llama_cpp(source: str, gguf_file: Path) -> tuple[Any, Any, Any]:
    """The source's tokenizer and model as `align export` loads them, and llama.cpp on the exported file."""
    import llama_cpp

    from align.export import load_export_tokenizer, load_merged_model
    from align.core.models import resolve_model

    resolved = resolve_model(source)
    tokenizer = load_export_tokenizer(resolved)
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=512, n_threads=2, verbose=False, logits_all=False)
    return tokenizer, load_merged_model(resolved, tokenizer), llm


def greedy_tokens_agree(tokenizer: Any, model: Any, llm: Any, new_tokens: int) -> bool:
    """The same prompt ids into transformers and llama.cpp, greedy: the same first tokens (f16 file)."""
    import torch

    from align.export import round_trip_prompts

    for prompt in round_trip_prompts(tokenizer):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected, context = [], list(ids)
        with torch.no_grad():  # greedy by hand: no stop token, so both sides produce exactly new_tokens
            for _ in range(new_tokens):
                expected.append(int(model(torch.tensor([context])).logits[0, -1].argmax()))
                context.append(expected[-1])
        llm.reset()
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == new_tokens:
                break
        if got != expected:
            print(prompt, got, expected)
            return False
    return True


@pytest.mark.slow
def test_embedded_model_round_trips_in_f16_and_q8_0(tmp_path):
    """SmolLM2-135M (tied embeddings, GQA 9/3 heads, 49152 tokens): f16 reproduces the logits up to f16 rounding;
    Q8_0 keeps every top-1 the source decides clearly, and its few flips are near-ties."""
    from align.export import export_gguf, verify_round_trip

    f16 = export_gguf("smollm2-135m", tmp_path / "smol-f16.gguf", "f16")
    check = verify_round_trip("smollm2-135m", f16.path)
    assert check.max_abs_diff < 0.25 and check.top1_agreement_clear == 1.0, check
    assert check.tokens_match and check.chat_template_match and check.eos_match, check
    q8 = export_gguf("smollm2-135m", tmp_path / "smol-q8_0.gguf", "q8_0")
    check = verify_round_trip("smollm2-135m", q8.path)
    assert check.top1_agreement_clear >= 0.99 and check.top1_agreement >= 0.95 and check.mean_kl < 0.01, check
    assert q8.bytes < 0.6 * f16.bytes


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_reads_the_embedded_model_export_as_transformers_does(tmp_path):
    """llama.cpp itself on the exported SmolLM2: its tokenizer gives transformers' ids for every round-trip prompt
    (special tokens included), greedy decoding gives the same first tokens, and a chat reply stops at <|im_end|>, where
    the SFT stage's template contract says a turn ends."""
    import torch

    from align.export import export_gguf, round_trip_prompts

    path = export_gguf("smollm2-135m", tmp_path / "smol-f16.gguf", "f16").path
    tokenizer, model, llm = transformers_and_llama_cpp("smollm2-135m", path)
    for prompt in round_trip_prompts(tokenizer):
        expected = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == expected, prompt
    assert greedy_tokens_agree(tokenizer, model, llm, new_tokens=8)

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    reply = out[0, ids.shape[1]:].tolist()
    assert reply[-1] == tokenizer.eos_token_id, "transformers did not end the turn within 64 tokens"
    completion = llm.create_completion(chat, max_tokens=64, temperature=0.0, top_k=1)["choices"][0]
    assert completion["finish_reason"] == "stop"
    assert completion["text"] == tokenizer.decode(reply[:-1])


def test_a_pipeline_export_stage_writes_the_file_and_the_report_names_it(bpe_model_dir, tmp_path, cache_dir):
    from align.pipeline.run import load_pipeline, run_pipeline

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f'model: {{name: "{bpe_model_dir}", dtype: float32, compile: false}}\n'
                      "stages:\n  - {name: gguf, kind: export, model: base, type: q8_0}\n")
    rundir = tmp_path / "run"
    run_pipeline(load_pipeline(recipe), rundir, progress=False)
    record = json.loads((rundir / "gguf" / "export.json").read_text())
    assert (rundir / "gguf" / "model.gguf").is_file() and record["type"] == "q8_0"
    assert record["round_trip"]["top1_agreement_clear"] >= 0.999 and record["round_trip"]["tokens_match"]
    assert "`gguf/model.gguf` (q8_0" in (rundir / "report.md").read_text()
    with pytest.raises(Exception, match="not an earlier stage"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(recipe.read_text().replace("model: base", "model: merged"))
        load_pipeline(bad)


def test_a_gguf_tokenizer_takes_its_special_tokens_from_the_file_metadata(bpe_model_dir, tmp_path):
    """transformers 5.17's GPT-2 GGUF converter returns the BOS token as EOS; the metadata ids win."""
    from transformers import AutoTokenizer

    from align.export import export_gguf
    from align.core.models import gguf_special_token_ids, set_gguf_special_tokens

    path = export_gguf(str(bpe_model_dir), tmp_path / "m.gguf", "f16").path
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = gguf_special_token_ids(path)
    tokenizer.eos_token = tokenizer.bos_token  # what the 5.17 converter hands back
    set_gguf_special_tokens(tokenizer, path)
    assert tokenizer.eos_token_id == ids["eos"] != ids["bos"]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token_id == ids["bos"]
