import math

import pytest
import torch
from simple_parsing import parse
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from recipes.toyworld import Config, main
from unlearn.eval import TIE_ATOL
from unlearn.toyworld import ITEM_SPLITS


def _plain_accuracy(model, tokenizer, items) -> float:
    """Multiple-choice accuracy by summed log-likelihood, one unpadded sequence at a time.

    A choice's score is sum_t log p(choice token t | BOS, prompt, earlier choice tokens); the item's
    credit is 1/k if the true choice is among the k choices within TIE_ATOL of the best, else 0.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    credit = 0.0
    for item in items:
        prompt_ids = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            ids = tokenizer(item["prompt"] + choice, add_special_tokens=False)["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids, "the prompt's tokens changed"
            n_choice = len(ids) - len(prompt_ids)
            tokens = torch.tensor([[bos, *ids]])
            with torch.no_grad():
                logprobs = model(tokens).logits[0, :-1].double().log_softmax(-1)
            picked = logprobs.gather(-1, tokens[0, 1:, None])[:, 0]
            scores.append(float(picked[-n_choice:].sum()))
        tied = [i for i, score in enumerate(scores) if score >= max(scores) - TIE_ATOL]
        credit += (item["answer"] in tied) / len(tied)
    return credit / len(items)


@pytest.mark.filterwarnings("error")
def test_main_reports_what_the_final_models_know(tiny_world, capsys):
    """main() reports the final unfiltered and filtered models' accuracy on each item split, as a
    plain log-likelihood scorer in this test measures it on the saved models."""
    metrics = main(Config(preset="tiny", root=str(tiny_world.root.parent)))
    assert set(metrics) == {
        f"{model}/{split}_acc" for model in ("unfiltered", "filtered") for split in ITEM_SPLITS
    } | {"build_seconds"}
    for model_name in ("unfiltered", "filtered"):
        model_dir = tiny_world.model_dir(model_name)
        model = GPTNeoXForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for split in ITEM_SPLITS:
            expected = _plain_accuracy(model, tokenizer, tiny_world.items(split, "reserved"))
            assert metrics[f"{model_name}/{split}_acc"] == pytest.approx(expected), split
    assert math.isfinite(metrics["build_seconds"]) and metrics["build_seconds"] > 0
    out = capsys.readouterr().out
    assert "unfiltered (reserved)" in out and "filtered (seen)" in out and "stage boundary" in out


def test_cli_parses_and_rejects_unknown_presets():
    cfg = parse(Config, args=["--preset", "tiny", "--seed", "3"])
    assert cfg == Config(preset="tiny", seed=3)
    with pytest.raises(SystemExit):
        parse(Config, args=["--preset", "huge"])
