
import pytest

from aha.infra.errors import AhaError
from aha.tasks.rewards import (
    cosine_length,
    format_soft,
    format_strict,
    language_consistency,
    overlong_penalty,
    repetition_penalty,
    tag_count,
)

HOSTILE = ["", "no tags", "<think>", "</answer><answer>", "<answer>" * 1000, "\x00\uffff☃ 𝟙 ünï",
           "<think><think>x</think></think><answer>1</answer>", "9" * 100_000]


@pytest.mark.parametrize("text, strict, soft, tags", [
    (" <think>2+2=4</think> <answer>4</answer>", 1.0, 1.0, 1.0),
    ("<think>\nreason\n</think>\n<answer>\n4\n</answer>\n", 1.0, 1.0, 1.0),
    ("<think> </think><answer>4</answer>", 0.0, 1.0, 1.0),                  # empty thought
    ("<think>a</think><answer></answer>", 0.0, 1.0, 1.0),                   # empty answer
    ("Sure. <think>a</think><answer>4</answer>", 0.0, 1.0, 1.0),            # text before
    ("<think>a</think><answer>4</answer> Done.", 0.0, 1.0, 1.0),            # text after
    ("<answer>4</answer>", 0.0, 0.0, 0.5),
    ("<think>a</think> so <answer>4</answer>", 0.0, 0.0, 1.0),              # words between
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0, 1.0, 0.5),
    ("<answer>4</answer><think>a</think>", 0.0, 0.0, 1.0),                  # wrong order
    ("<think><think>x</think></think><answer>1</answer>", 0.0, 1.0, 0.5),   # nested
    ("<think>a <answer>4</answer></think>", 0.0, 0.0, 1.0),                 # answer inside thought
])
def test_format_components(text, strict, soft, tags):
    assert (format_strict(text), format_soft(text), tag_count(text)) == (strict, soft, tags)


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_components_stay_in_range_on_hostile_text(text):
    assert format_strict(text) in (0.0, 1.0) and format_soft(text) in (0.0, 1.0)
    assert 0.0 <= tag_count(text) <= 1.0
    assert 0.0 <= language_consistency(text) <= 1.0
    assert -1.0 <= repetition_penalty(text) <= 0.0


# Real sentences: a chain of thought per language, and mixed ones
ENGLISH = "Let me add the two numbers. Wait, I need to carry the one. So the answer is 8798. Let me double check: yes."
INDONESIAN = "Pertama, saya jumlahkan kedua angka itu. Tunggu, saya harus membawa satu. Jadi jawabannya adalah 8798."
CHINESE = "首先，我们把两个数字相加。等一下，需要进位。所以答案是8798。"
GERMAN = "Zuerst addiere ich die beiden Zahlen. Warte, ich muss eins übertragen. Also ist die Antwort 8798."


@pytest.mark.parametrize("text, language", [(ENGLISH, "en"), (INDONESIAN, "id"), (CHINESE, "zh"), (GERMAN, "de")])
def test_language_consistency_one_language(text, language):
    completion = f"<think>{text}</think> <answer>8798</answer>"
    assert language_consistency(completion, language) == 1.0
    others = {"en", "id", "zh", "de"} - {language}
    assert all(language_consistency(completion, other) == 0.0 for other in others)


def test_language_consistency_mixed():
    # 12 English words, then 12 Chinese characters (a word each)
    mixed = "<think>First we add the two numbers and then we check the sum. 然后我们检查结果是否正确。</think>"
    assert language_consistency(mixed, "en") == pytest.approx(12 / 24)
    assert language_consistency(mixed, "zh") == pytest.approx(12 / 24)
    # an Indonesian sentence (11 words), then an English one (15 words)
    indonesian = "Pertama, saya jumlahkan kedua angka itu dengan sangat hati-hati sekali."
    english = "Wait, I need to carry the one here, so let me redo the whole sum."
    mixed = f"<think>{indonesian} {english}</think>"
    assert language_consistency(mixed, "id") == pytest.approx(11 / 26)
    assert language_consistency(mixed, "en") == pytest.approx(15 / 26)


def test_language_consistency_edges():
    assert language_consistency("<think>1+7=8, 2+7=9</think><answer>98</answer>", "en") == 1.0   # no words
    assert language_consistency(ENGLISH, "en") == 1.0  # no tags: all of it
    assert (
        language_consistency(f"<think>{ENGLISH}</think><answer>{CHINESE}</answer>", "en") == 1.0
    )  # answer not counted
    with pytest.raises(AhaError, match="unknown language 'english'"):
        language_consistency(ENGLISH, "english")


def test_overlong_penalty():
    assert [overlong_penalty(n, 1024, 256) for n in (0, 768, 896, 1024, 5000)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(769, 1024, 256) == pytest.approx(-1 / 256)
    assert overlong_penalty(11, 10, 0) == -1.0 and overlong_penalty(10, 10, 0) == 0.0


def test_repetition_penalty():
    assert repetition_penalty("the cat sat on the mat") == 0.0
    assert repetition_penalty("wait wait wait wait wait wait") == pytest.approx(-0.75)   # 4 trigrams, 1 distinct
    assert repetition_penalty("Wait WAIT wait wait", ngram_size=2, max_penalty=-0.5) == pytest.approx(-0.5 * 2 / 3)
    assert repetition_penalty("two words") == 0.0


def test_cosine_length_orders():
    right_short, right_long = cosine_length(10, True, 1000), cosine_length(900, True, 1000)
    wrong_short, wrong_long = cosine_length(10, False, 1000), cosine_length(900, False, 1000)
    assert right_short > right_long > 0 > wrong_long > wrong_short
    assert cosine_length(5000, True, 1000) == pytest.approx(0.5)
    assert cosine_length(500, False, 1000) == pytest.approx(-0.75)
