"""aha bench: the identical-work reward, the FLOP formula, and one alternating step of each side."""

import pytest

from aha.bench.bench import spread_rewards
from aha.infra.model import model_flops


def test_spread_reward_gives_every_group_a_spread():
    # identical texts everywhere: parity alone would tie; the in-group index noise breaks every tie
    texts = ["same"] * 16 + ["", "a", "b", "ab"] * 4
    rewards = spread_rewards(texts, group_size=8)
    for start in range(0, len(texts), 8):
        group = rewards[start:start + 8]
        assert len(set(group)) == 8
    # deterministic (CRC32, not Python's salted hash) and parity + 0.01 × index, by hand
    assert spread_rewards(["same"] * 2, 2) == spread_rewards(["same"] * 2, 2)
    parity = rewards[0]
    assert parity in (0.0, 1.0) and rewards[3] == pytest.approx(parity + 0.03)


def test_useful_flops_by_hand():
    # 1,000 params: 6 × 1e3 × 10 trained + 2 × 1e3 × 40 generated = 60,000 + 80,000
    assert model_flops(1_000, forward_tokens=40, trained_tokens=10) == 140_000.0


def test_bench_model_is_the_issue_size():
    from aha.bench.bench import bench_model
    from aha.infra.tokenizer import build_char_tokenizer
    model = bench_model(build_char_tokenizer())
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (256, 4, 4, 2, 768)
    assert 3.0e6 < sum(p.numel() for p in model.parameters()) < 3.4e6


def test_bench_smoke_one_step_each_side():
    pytest.importorskip("trl")
    pytest.importorskip("psutil")
    from aha.bench.bench import run_pair
    result = run_pair("spread", 4, warmup=0, steps=1, peak_flops=1e9, hidden=64, layers=1,
                      prompts_per_step=2, group_size=4, trl_bf16=True)
    for side in ("aha", "trl", "trl_bf16"):
        s = result[side]
        assert s["steps"] == 1 and s["s_per_step"] > 0 and s["peak_rss_mb"] > 0
        assert s["generate_s"] > 0 and s["update_s"] > 0
        assert s["mfu"] > 0 and s["generate_share"] > 0 and s["update_share"] > 0
    assert result["speedup"] == pytest.approx(result["trl"]["s_per_step"] / result["aha"]["s_per_step"])
    assert result["speedup_bf16"] == pytest.approx(result["trl_bf16"]["s_per_step"] / result["aha"]["s_per_step"])
    # the ceiling: TRL's s/step over aha's FLOP floor at the peak given (1 GFLOP/s)
    assert result["ceiling"] == pytest.approx(result["trl"]["s_per_step"] / (result["aha"]["flops_per_step"] / 1e9))
    from aha.bench.bench import cpu_name, format_table
    table = format_table([result], {"fp32": 1e9, "bf16": 1e9, "peak": 1e9}, "Test CPU")
    assert "CPU: Test CPU" in table and "trl_bf16" in table and cpu_name()


def test_cpu_name_names_the_kind_the_figures_belong_to(monkeypatch):
    """`cpu_name` (the bench's output and JSON): model name, family and model, and the kind (AMX,
    AVX512-BF16, AVX512, AVX2); a fast-bf16 CPU with oneDNN held to AVX2 says so."""
    import aha.bench.bench as bench
    info = "model name\t: {name}\ncpu family\t: 6\nmodel\t\t: 143\nflags\t\t: {flags}\n"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert bench.cpu_name(info.format(name="Intel Xeon", flags="avx2 avx512f amx_bf16")) == \
        "Intel Xeon (family 6 model 143, AMX)"
    assert bench.cpu_name(info.format(name="AMD EPYC", flags="fpu avx2")) == "AMD EPYC (family 6 model 143, AVX2)"
    assert bench.cpu_name("model name\t: Some CPU\n") == "Some CPU"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert bench.cpu_name(info.format(name="AMD EPYC", flags="avx2 avx512f avx512_bf16")) == \
        "AMD EPYC (family 6 model 143, AVX512-BF16, held to AVX2)"


def test_bench_without_trl_says_so(monkeypatch, capsys):
    import importlib.util

    from aha import cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TRL" in err


def test_bench_model_runs_each_side_in_its_own_process(tiny_model_dir):
    pytest.importorskip("trl")
    from aha.bench.model import format_model_table, run_model_bench
    result = run_model_bench(str(tiny_model_dir), steps=1, warmup=1, max_new_tokens=6, prompts=2, group=2)
    for side in ("aha", "trl"):
        s = result[side]
        assert len(s["all_steps"]) == 2 and s["timed_steps"] == 1          # warm-up + timed, each one step
        assert s["s_per_step"] == pytest.approx(s["all_steps"][1]["seconds"]) and 0 < s["generate_s"] < s["s_per_step"]
        assert 0 < s["completion_tokens_per_step"] <= 2 * 2 * 6
        assert s["peak_rss_mb"] > 100                                       # a whole python + torch process
    assert result["speedup"] == pytest.approx(result["trl"]["s_per_step"] / result["aha"]["s_per_step"])
    assert result["memory_ratio"] == pytest.approx(result["aha"]["peak_rss_mb"] / result["trl"]["peak_rss_mb"])
    assert "TRL/aha time" in format_model_table(result)


def test_bench_model_refuses_a_dir_without_a_model(tmp_path, capsys):
    from aha import cli
    assert cli.main(["bench", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
