import copy
import random
from types import SimpleNamespace

import pytest

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


def _sentencepiece_tokenizer(decoder: str):
    """A tokenizer that decodes as Llama 2's (SentencePiece's "▁" for a space, byte fallback, the
    space at the start of a decode stripped) or as Mistral's Metaspace decoder: what the default
    model's byte-level tokenizer cannot show."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁The": 3, "▁capital": 4, "▁is": 5, "▁Paris": 6, ".": 7}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.decoder = {
        "llama2": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)]),
        "metaspace": decoders.Metaspace(replacement="▁", prepend_scheme="always")}[decoder]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
def test_the_first_output_token_keeps_its_space_on_a_sentencepiece_tokenizer(decoder):
    """"The capital is" -> "▁Paris" "." is " Paris." (as vLLM, whose window starts in the prompt);
    before, the first token was decoded alone and lost its space: "Paris."."""
    from splitserve.services.gateway.output import OutputProcessor

    from splitserve.v1 import common_pb2 as pb

    tok = _sentencepiece_tokenizer(decoder)
    prompt, output = [1, 3, 4, 5], [6, 7]
    assert tok.decode(prompt + output, skip_special_tokens=True) == "The capital is Paris."
    for general in (False, True):  # the tokenizers fast path and transformers' decode
        detok = IncrementalDetokenizer(_DecodeOnly(tok) if general else tok, prompt_token_ids=prompt)
        assert [detok.add(t) for t in output] == [" Paris", "."] and detok.text == " Paris."
    processor = OutputProcessor(tok, (), len(prompt), prompt_tail=tuple(prompt))
    first = processor.process(pb.TokenEvent(request_id="r", index=0, token_ids=output[:1]))
    last = processor.process(pb.TokenEvent(request_id="r", index=1, token_ids=output[1:],
                                           finish_reason=pb.FINISH_REASON_LENGTH))
    assert first.text + last.text == " Paris."


def test_skip_special_tokens_false_keeps_them_in_the_text_but_not_the_stop_token(model_fp32):
    """vLLM's skip_special_tokens: false keeps special tokens in the text, all but the one that
    ended the request (EOS, or one of its stop_token_ids, special or not), which shows only under
    include_stop_str_in_output."""
    from splitserve.services.gateway.model import ServedModel
    from splitserve.services.gateway.output import OutputProcessor
    from splitserve.v1 import common_pb2 as pb

    tok = model_fp32.tokenizer
    hi, end, comma = tok("Hi")["input_ids"], tok.convert_tokens_to_ids("<|im_end|>"), tok(",")["input_ids"]

    eos = ServedModel.load(None, None).eos_token_ids  # what the gateway reads, as the engine does
    assert eos == model_fp32.eos_token_ids and end in eos

    def text(ids, finish, skip=True, include=False, stop_token_ids=()) -> str:
        processor = OutputProcessor(tok, (), 1, skip_special_tokens=skip, include_stop_str=include,
                                    stop_token_ids=stop_token_ids, eos_token_ids=eos)
        event = pb.TokenEvent(request_id="r", index=0, token_ids=ids, finish_reason=finish)
        return processor.process(event).text

    stop, length = pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH
    assert text(hi + [end] + hi, length, skip=False) == "Hi<|im_end|>Hi"
    assert text(hi + [end] + hi, length) == "HiHi"
    assert text(hi + [end], stop, skip=False) == "Hi"  # EOS ended it
    assert text(hi + [end], stop, skip=False, include=True) == "Hi<|im_end|>"
    assert text(hi + comma, stop, stop_token_ids=tuple(comma)) == "Hi"  # a stop token id that is not special
    assert text(hi + comma, stop, stop_token_ids=tuple(comma), include=True) == "Hi,"
    assert text(hi + comma, stop) == "Hi,"  # ended by a grammar: its last token is text
