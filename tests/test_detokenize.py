from splitserve.common.detokenize import IncrementalDetokenizer


def test_deltas_concatenate_to_the_full_decode(model_fp32):
    tok = model_fp32.tokenizer
    text = "Héllo wörld — naïve café 🙂 ok. 数学 and\n  indented   spaces"
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)
