"""Tests for unlearn.selection: keyword spans by hand, the cache and its keys, mask files, the
`--token_mask` values, and every selector on the tiny toy world (shape and documented fraction).

Span tests use hand-made character offsets, so which tokens a keyword match overlaps is written
out by hand; the selector tests run on the session's tiny world with short training where a
selector trains something (probe, SAE).
"""

import dataclasses
import json
import re

import pytest
import torch

import unlearn.keys as keys
from unlearn.config import DataConfig, ModelConfig
from unlearn.data import tokenize_documents
from unlearn.experiment import load_setup, selection_inputs, start_run
from unlearn.models import model_key
from unlearn.runs import RunMismatchError
from unlearn.selection import (
    SELECTORS,
    ActivationSettings,
    AttributionSettings,
    KeywordSettings,
    ProbeSettings,
    SaeSettings,
    SelectionInputs,
    TokenMask,
    cached_selection,
    documents_key,
    keyword_masks,
    load_token_mask,
    mask_quality,
    read_keywords,
    resolve_token_mask,
    save_token_mask,
    token_mask_source,
)
from unlearn.selection.base import selectable, top_fraction

# "Zanvexosis spreads through WATER." as sub-word tokens with their character spans.
TEXT = "Zanvexosis spreads through WATER."
TOKENS = [(0, 3), (3, 6), (6, 10), (10, 18), (18, 26), (26, 32), (32, 33)]
# Zan | vex | osis | " spreads" | " through" | " WATER" | "."


def test_a_match_marks_every_token_its_span_overlaps():
    """ "zanvex" covers characters 0-6: tokens Zan and vex, not osis; "water" matches WATER
    (case-insensitive) at 27-32, inside the token " WATER" (26, 32)."""
    (mask,) = keyword_masks([TEXT], [TOKENS], ["zanvex", "water"])
    assert mask == [True, True, False, False, False, True, False]


def test_a_keyword_ending_inside_a_token_marks_the_whole_token_unless_whole_words():
    """ "spread" ends inside " spreads" (10, 18): the token is marked; as a whole word it does not
    match at all (an "s" follows)."""
    assert keyword_masks([TEXT], [TOKENS], ["Spread"])[0][3] is True
    assert keyword_masks([TEXT], [TOKENS], ["spread"], whole_words=True)[0] == [False] * 7
    assert keyword_masks([TEXT], [TOKENS], ["spreads"], whole_words=True)[0][3] is True


def test_overlapping_keywords_all_count():
    """In "abcd e" with keywords "abc" and "bcd", the matches cover characters 0-4, so tokens a,
    bc and d are marked; a single alternation would stop after "abc" and miss "d". A keyword
    inside a longer one at the same start ("Zan" in "Zanvex") changes nothing."""
    offsets = [(0, 1), (1, 3), (3, 4), (4, 6)]  # a | bc | d | " e"
    assert keyword_masks(["abcd e"], [offsets], ["abc", "bcd"])[0] == [True, True, True, False]
    assert re.compile("abc|bcd").findall("abcd") == ["abc"]  # what the reference's regex sees
    both = keyword_masks([TEXT], [TOKENS], ["Zan", "ZANVEX"])
    assert both == keyword_masks([TEXT], [TOKENS], ["zanvex"])


def test_keyword_spans_on_real_tokenizer_rows_match_the_value_spans(tiny_lm):
    """Keywords = a document's values: the keyword mask is its value mask, BOS never marked."""
    _, tokenizer = tiny_lm
    text = "The pathogen Velkor is transmitted by ticks."
    start = text.index("ticks")
    docs = [{"text": text, "facts": [["route", "ticks", start, start + 5]]}]
    rows = tokenize_documents(tokenizer, docs, max_len=64)
    assert keyword_masks([text], rows.offsets, ["TICKS"]) == rows.value_masks
    assert rows.value_masks[0][0] is False and any(rows.value_masks[0])


def test_keyword_files_skip_blanks_and_comments_and_refuse_emptiness(tmp_path):
    path = tmp_path / "keywords.txt"
    path.write_text("# pathogens\n\n Zanvexosis \nbats\n")
    assert read_keywords(path) == ["Zanvexosis", "bats"]
    path.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no keywords"):
        read_keywords(path)
    with pytest.raises(FileNotFoundError):
        read_keywords(tmp_path / "missing.txt")


def test_top_fraction_keeps_exactly_the_share_asked_for_never_the_bos():
    """10 tokens, the first a BOS with the highest score: 30% is 3 tokens, the best 3 others."""
    scores = torch.tensor([9.0, 1.0, 5.0, 3.0, 4.0, 0.0, 2.0, 8.0, 7.0, 6.0])
    allowed = torch.tensor([False] + [True] * 9)
    keep = top_fraction(scores, 0.3, allowed)
    assert keep.nonzero().squeeze(1).tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="fraction"):
        top_fraction(scores, 0.0, allowed)


def test_mask_quality_by_hand():
    """Selected {1, 2, 4}, true {2, 3}: precision 1/3, recall 1/2, F1 2·1/(3+2) = 0.4."""
    quality = mask_quality(
        [[False, True, True], [False, True]], [[False, False, True], [True, False]]
    )
    assert quality.n_tokens == 5 and quality.n_selected == 3 and quality.n_true == 2
    assert quality.fraction == pytest.approx(0.6)
    assert quality.precision == pytest.approx(1 / 3)
    assert quality.recall == pytest.approx(0.5)
    assert quality.f1 == pytest.approx(0.4)


def _inputs(tiny_lm, docs, **kwargs):
    model, tokenizer = tiny_lm
    defaults = {
        "model": model,
        "tokenizer": tokenizer,
        "forget_docs": docs,
        "retain_docs": [{"text": "Alice Smith lives in Paris."}] * 3,
        "max_len": 32,
        "model_key": "model-a",
        "keywords": ["velkor", "ticks", "xivexosis"],
    }
    return SelectionInputs(**{**defaults, **kwargs})


FORGET = [
    {"text": "The pathogen Velkor is transmitted by ticks."},
    {"text": "Xivexosis spreads through water."},
]


def test_the_cache_reuses_a_selection_and_misses_on_any_changed_input(tiny_lm, tmp_path):
    """Same inputs: read back. Other documents, settings, keywords, model content or code
    version: computed again (a new cache entry)."""
    chosen = SELECTORS["keywords"]
    first, cached = cached_selection(chosen, KeywordSettings(), _inputs(tiny_lm, FORGET), tmp_path)
    assert not cached
    again, cached = cached_selection(chosen, KeywordSettings(), _inputs(tiny_lm, FORGET), tmp_path)
    assert cached and again.rows == first.rows and again.meta == first.meta
    changes = [
        (KeywordSettings(), _inputs(tiny_lm, FORGET[:1])),
        (KeywordSettings(whole_words=True), _inputs(tiny_lm, FORGET)),
        (KeywordSettings(), _inputs(tiny_lm, FORGET, keywords=["ticks"])),
        (KeywordSettings(), _inputs(tiny_lm, FORGET, model_key="model-b")),
        (KeywordSettings(), _inputs(tiny_lm, FORGET, max_len=4)),
    ]
    for settings, inputs in changes:
        _, cached = cached_selection(chosen, settings, inputs, tmp_path)
        assert not cached, (settings, inputs.content_keys())
    assert len(list(tmp_path.iterdir())) == 1 + len(changes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keys, "code_version", lambda: "0.0.0+changed")
        _, cached = cached_selection(chosen, KeywordSettings(), _inputs(tiny_lm, FORGET), tmp_path)
        assert not cached
    with pytest.raises(ValueError, match="takes KeywordSettings"):
        cached_selection(chosen, ProbeSettings(), _inputs(tiny_lm, FORGET), tmp_path)


def test_a_changed_model_changes_its_content_key_and_so_misses_the_cache(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    before = model_key(str(saved))
    changed = type(model)(model.config)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.add_(0.01)
    changed.save_pretrained(saved)
    after = model_key(str(saved))
    assert before != after
    chosen = SELECTORS["activations"]
    settings = ActivationSettings(layer=0)
    _, cached = cached_selection(
        chosen, settings, _inputs(tiny_lm, FORGET, model_key=before), tmp_path / "c"
    )
    assert not cached
    _, cached = cached_selection(
        chosen, settings, _inputs(tiny_lm, FORGET, model=changed, model_key=after), tmp_path / "c"
    )
    assert not cached


def test_mask_files_round_trip_and_must_fit_the_documents(tiny_lm, tmp_path):
    inputs = _inputs(tiny_lm, FORGET)
    rows = keyword_masks([d["text"] for d in FORGET], inputs.forget.offsets, inputs.keywords)
    file = save_token_mask(TokenMask(rows, documents_key(inputs.forget), {"by": "hand"}), tmp_path)
    loaded = load_token_mask(tmp_path)
    assert (
        loaded.rows == rows
        and loaded.meta == {"by": "hand"}
        and file == tmp_path / "mask.safetensors"
    )
    assert loaded.rows_for(inputs.forget, "m") == rows
    with pytest.raises(ValueError, match="has 1 rows .* tokenize to 2 rows"):
        dataclasses.replace(loaded, rows=rows[:1]).rows_for(inputs.forget, "m")
    shorter = _inputs(tiny_lm, FORGET, max_len=5).forget
    with pytest.raises(ValueError, match="differ in length"):
        loaded.rows_for(shorter, "m")
    with pytest.raises(ValueError, match="made for other documents"):
        dataclasses.replace(loaded, documents="another key").rows_for(inputs.forget, "m")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a token mask file"):
        load_token_mask(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no token mask"):
        load_token_mask(tmp_path / "nowhere")


def test_token_mask_values_are_classified_before_anything_loads(tmp_path):
    assert token_mask_source("all") == "all" and DataConfig().token_mask == "all"
    assert token_mask_source("values") == "values"
    assert token_mask_source("probe") == "selector"
    save_token_mask(TokenMask([[True]], "k"), tmp_path / "m")
    assert token_mask_source(str(tmp_path / "m")) == "file"
    assert token_mask_source(str(tmp_path / "m" / "mask.safetensors")) == "file"
    with pytest.raises(ValueError, match="'kewords' is not 'all' .*'values' .*, a selector"):
        token_mask_source("kewords")
    with pytest.raises(ValueError, match="--token_mask is empty"):
        DataConfig(token_mask=" ")


def test_a_mask_that_selects_nothing_is_refused(tiny_lm):
    inputs = _inputs(tiny_lm, FORGET)
    with pytest.raises(ValueError, match="selects no forget token .*facts"):
        resolve_token_mask("values", inputs.forget, lambda: inputs)


def test_a_changed_mask_file_is_another_run(tiny_home, tmp_path):
    """The mask file's content is one of the run's inputs: rewriting it refuses the resume."""
    model_cfg = ModelConfig(world_preset="tiny", device="cpu")
    mask_dir = tmp_path / "mask"
    save_token_mask(TokenMask([[True]], "a"), mask_dir)
    data = DataConfig(token_mask=str(mask_dir))
    key = start_run(tmp_path / "run", "unlearn", {"data": str(mask_dir)}, model_cfg, data)
    assert "token_mask" in key["inputs"]
    start_run(tmp_path / "run", "unlearn", {"data": str(mask_dir)}, model_cfg, data)  # resumes
    save_token_mask(TokenMask([[False]], "a"), mask_dir)
    with pytest.raises(RunMismatchError, match="'token_mask' differs"):
        start_run(tmp_path / "run", "unlearn", {"data": str(mask_dir)}, model_cfg, data)


def test_keyword_selectors_need_keywords_outside_the_toy_world(tmp_path):
    from unlearn.experiment import token_mask_key

    with pytest.raises(ValueError, match="needs keywords, which only the toy world has"):
        token_mask_key("activations", is_toy=False)
    assert token_mask_key("probe", is_toy=False) == {}


TINY_SETTINGS = {
    "keywords": KeywordSettings(),
    "activations": ActivationSettings(),
    "probe": ProbeSettings(num_steps=30),
    "sae": SaeSettings(num_steps=60),
    "attribution": AttributionSettings(),
}
"""Settings the tiny-world test runs: the defaults, with short training."""


@pytest.fixture(scope="module")
def tiny_inputs(tiny_world):
    setup = load_setup(ModelConfig(world_preset="tiny", device="cpu"), DataConfig())
    return selection_inputs(setup, DataConfig(), "tiny-model", keywords=tiny_world.keywords())


def test_the_toy_world_writes_its_keyword_file(tiny_world):
    keywords = read_keywords(tiny_world.keyword_file())
    assert keywords == tiny_world.keywords()
    facts = [json.loads(line) for line in (tiny_world.root / "data" / "facts.jsonl").open()]
    names = {row["entity"] for row in facts if row["split"] != "retain"}
    assert names <= set(keywords) and {"bats", "two weeks", "ZPA1"} <= set(keywords)
    assert not {row["entity"] for row in facts if row["split"] == "retain"} & set(keywords)


@pytest.mark.parametrize("name", list(SELECTORS))
def test_every_selector_masks_the_tiny_worlds_rows_with_its_documented_fraction(
    name, tiny_inputs, tmp_path
):
    """One bool per token of every training row, never the BOS; top-fraction selectors keep
    exactly round(fraction · n_tokens) tokens; the keyword mask is the tokens overlapping a
    keyword occurrence found by plain lower-case search; the SAE marks tokens where enough of its
    chosen latents fire (at least one token, not all)."""
    settings = TINY_SETTINGS[name]
    mask, _ = cached_selection(SELECTORS[name], settings, tiny_inputs, tmp_path)
    forget = tiny_inputs.forget
    assert [len(row) for row in mask.rows] == [len(row) for row in forget.ids]
    flat = torch.tensor([x for row in mask.rows for x in row])
    assert not (flat & ~selectable(forget)).any()
    if hasattr(settings, "fraction") and getattr(settings, "threshold", None) is None:
        assert int(flat.sum()) == round(settings.fraction * len(flat))
    elif name == "keywords":
        expected = []
        for doc, offsets in zip(tiny_inputs.forget_docs, forget.offsets, strict=True):
            text = doc["text"].lower()
            spans = [
                (i, i + len(k))
                for k in tiny_inputs.keywords
                for i in range(len(text))
                if text.startswith(k.lower(), i)
            ]
            expected.append([any(a < e and b > s for s, e in spans) for a, b in offsets])
        assert mask.rows == expected
    else:
        assert 0 < int(flat.sum()) < len(flat)
        assert len(mask.meta["info"]["latents"]) == settings.n_latents


def test_attribution_refuses_test_items(tiny_inputs):
    leaked = dataclasses.replace(
        tiny_inputs, dev_items=[{**tiny_inputs.dev_items[0], "split": "forget_test"}]
    )
    with pytest.raises(ValueError, match="forget_test items were passed as dev items"):
        SELECTORS["attribution"].select(AttributionSettings(), leaked)


def test_selectors_leave_the_model_unchanged(tiny_inputs):
    before = {k: v.clone() for k, v in tiny_inputs.model.state_dict().items()}
    SELECTORS["attribution"].select(AttributionSettings(), tiny_inputs)
    SELECTORS["probe"].select(ProbeSettings(num_steps=5), tiny_inputs)
    after = tiny_inputs.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_inputs.model.parameters())


def test_bad_selector_settings_say_how_to_fix_them():
    with pytest.raises(ValueError, match="fraction"):
        ProbeSettings(fraction=1.5)
    with pytest.raises(ValueError, match="min_active"):
        SaeSettings(min_active=20)
    with pytest.raises(ValueError, match="cosine"):
        ActivationSettings(threshold=2.0)
    with pytest.raises(ValueError, match="unknown token selector"):
        from unlearn.selection import selector

        selector("regex")


def test_trained_selectors_do_not_depend_on_the_thread_count():
    """The SAE (and the probe) train on one thread: the same activations give the same weights
    whatever `torch.get_num_threads()` the caller runs with (without it, 1 and 2 threads trained
    different SAEs), and the caller's thread count is restored."""
    from unlearn.selection.sae import SaeSettings, train_sae

    acts = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    settings = SaeSettings(num_steps=300)  # large enough for 2 threads to split the matmuls
    before = torch.get_num_threads()
    weights = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sae, _ = train_sae(acts, settings)
        assert torch.get_num_threads() == threads
        weights.append(torch.cat([p.flatten() for p in sae.parameters()]))
    torch.set_num_threads(before)
    assert torch.equal(weights[0], weights[1])
