import copy
import random
from types import SimpleNamespace

from splitserve.common.detokenize import IncrementalDetokenizer, fast_backend


def test_deltas_concatenate_to_the_full_decode(model_fp32):
    tok = model_fp32.tokenizer
    text = "Héllo wörld — naïve café 🙂 ok. 数学 and\n  indented   spaces"
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)


class _DecodeOnly:
    """A tokenizer that only has transformers' decode: the detokenizer's general path."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def test_the_fast_path_gives_the_deltas_of_transformers_decode(model_fp32):
    tok = model_fp32.tokenizer
    assert fast_backend(tok) is not None  # the default model's tokenizer takes it
    assert fast_backend(_DecodeOnly(tok)) is None
    rng = random.Random(0)
    for _ in range(200):  # any ids: special tokens, half characters, bytes that never decode alone
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            fast, general = IncrementalDetokenizer(tok, skip), IncrementalDetokenizer(_DecodeOnly(tok), skip)
            assert [fast.add(i) for i in ids] == [general.add(i) for i in ids]
            assert fast.text == general.text


def test_a_tokenizer_that_cleans_up_spaces_or_decodes_its_own_way_keeps_transformers_decode(model_fp32):
    tok = SimpleNamespace(backend_tokenizer=model_fp32.tokenizer.backend_tokenizer,
                          clean_up_tokenization_spaces=True)
    assert fast_backend(tok) is None

    class OwnDecode(type(model_fp32.tokenizer)):
        def _decode(self, token_ids, *args, **kwargs):
            return "#" * len(token_ids)

    own = copy.copy(model_fp32.tokenizer)
    own.__class__ = OwnDecode
    assert fast_backend(own) is None
    detokenizer = IncrementalDetokenizer(own)
    assert [detokenizer.add(t) for t in (504, 505)] == ["#", "#"]
