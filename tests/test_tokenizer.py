"""Tokenizer ids equal OpenAI's (golden tokenizer.json, produced by the official CLIP-ReID tokenizer)."""
import json

import numpy as np
import pytest

from clipreid_jax import tokenizer
from conftest import golden_root

_GOLDEN = golden_root() / "tokenizer" / "tokenizer.json"
_CASES = json.loads(_GOLDEN.read_text())["cases"] if _GOLDEN.is_file() else []


def test_golden_file_present():
  assert _CASES, f"{_GOLDEN}: no tokenizer cases found"


@pytest.mark.parametrize("case", _CASES, ids=[c["text"][:24] for c in _CASES])
def test_matches_official_ids(case):
  tok = tokenizer.default_tokenizer()
  assert tok.encode(case["text"]) == case["bpe_ids_without_sot_eot"]
  context = len(case["ids_77"])
  ids = tokenizer.tokenize(case["text"], context_length=context, truncate=case["truncate"])
  np.testing.assert_array_equal(ids[0], case["ids_77"])
  assert int(ids[0].argmax()) == case["eot_index"]
  msg = case.get("tokenize_without_truncate_raises")
  if msg is not None:
    with pytest.raises(ValueError) as err:
      tokenizer.tokenize(case["text"], context_length=context)
    assert str(err.value) == msg
  elif "tokenize_without_truncate_raises" in case:  # null: the official tokenize does not raise here
    np.testing.assert_array_equal(tokenizer.tokenize(case["text"], context_length=context)[0], case["ids_77"])


def test_specials_and_sizes():
  tok = tokenizer.default_tokenizer()
  assert len(tok.encoder) == tokenizer.VOCAB_SIZE
  assert tok.encoder["<|startoftext|>"] == tokenizer.SOT_ID == 49406
  assert tok.encoder["<|endoftext|>"] == tokenizer.EOT_ID == 49407
  assert tok.decode(tok.encode("a photo of a person.")).strip() == "a photo of a person ."


def test_matches_openai_package_on_more_text():
  """Cross-check against the openai-clip package's own tokenizer on sentences the golden file lacks."""
  import importlib.util
  spec = importlib.util.find_spec("clip")
  path = spec.submodule_search_locations[0] + "/simple_tokenizer.py"
  mod_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  ref = mod.SimpleTokenizer()
  texts = ["A man in a yellow T-shirt rides a bike!", "Zebra-striped véhicule #42 (rear view)",
           "    ", "donaudampfschifffahrtsgesellschaftskapitän", "x" * 300]
  for text in texts:
    assert tokenizer.default_tokenizer().encode(text) == ref.encode(text), text


def test_a_text_that_fills_the_context_exactly_is_kept_whole():
  """Start + 75 tokens + end is 77: no error and no truncation; one token more needs `truncate`."""
  tok = tokenizer.default_tokenizer()
  text = " ".join(["a"] * 75)
  assert len(tok.encode(text)) == 75
  ids = tokenizer.tokenize(text)[0]
  assert ids[0] == tokenizer.SOT_ID and ids[-1] == tokenizer.EOT_ID and list(ids[1:-1]) == tok.encode(text)
  with pytest.raises(ValueError, match="too long for context length 77"):
    tokenizer.tokenize(text + " a")
  np.testing.assert_array_equal(tokenizer.tokenize(text + " a", truncate=True)[0], ids)

