from transformers import AutoTokenizer

from aha.infra.tokenizer import TAGS, build_char_tokenizer


def test_round_trip_and_single_token_tags(tmp_path):
    tok = build_char_tokenizer()
    text = "User: 4821+3977\nAssistant: <think>1+7=8, 2+7=9</think> <answer>8798</answer>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    for tag in TAGS:
        assert len(tok(tag)["input_ids"]) == 1
    # "User: " is 6 characters, each one token
    assert len(tok("User: ")["input_ids"]) == 6
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
    assert loaded.pad_token_id != loaded.eos_token_id


def test_chat_template_gives_the_training_prompt():
    tok = build_char_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "12+34"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "User: 12+34\nAssistant:"
