"""The iteration-latency model against Vidur's H100 profile and serving.md section 3's checks."""

import numpy as np
import pytest

from kvjax.serve import latency
from kvjax.serve.env import make

# serving.md section 3: Vidur H100 Llama-2-7B linear ops per iteration (ms), 32 layers.
VIDUR_TABLE = {64: 5.86, 128: 6.4, 256: 9.2, 512: 12.0, 1024: 21.0, 2048: 40.4, 4096: 83.2}


def test_bundled_profile_is_the_published_table():
    table = latency.bundled_vidur_table()
    for n, ms in VIDUR_TABLE.items():
        assert table[n] == pytest.approx(ms, rel=0.02), n
    assert 5.6 <= table[1] <= 5.9


def test_fit_recovers_a_known_line_and_floor():
    n = np.array([1, 16, 64, 1024, 2048, 4096])
    table = {int(k): max(5.0, 1.5 + 0.02 * k) for k in n}
    floor, a, b = latency.fit_linear_ops(table)
    assert floor == pytest.approx(5e-3) and a == pytest.approx(1.5e-3)
    assert b == pytest.approx(20e-6)


def test_model_reproduces_the_vidur_table():
    floor, a, b = latency.fit_linear_ops(latency.bundled_vidur_table())
    _, p = make("h100-llama3-8b")
    # The preset is the 7B fit with lin_b x 1.15 for Llama-3-8B's larger MLP.
    assert float(p.t_weights) == pytest.approx(floor, rel=0.01)
    assert float(p.lin_a) == pytest.approx(a, rel=0.01)
    assert float(p.lin_b) == pytest.approx(1.15 * b, rel=0.01)
    p7 = p.replace(lin_b=b)
    for n, ms in VIDUR_TABLE.items():
        model = 1e3 * float(latency.linear_time(p7, n))
        tol = 0.30 if n == 256 else 0.10  # 256 tokens is the knee the max() form cuts
        assert model == pytest.approx(ms, rel=tol), (n, model, ms)


def test_256_decodes_at_1_5k_context_take_about_29_ms():
    _, p = make("h100-llama3-8b")
    dt = float(latency.iteration_time(p, 256, 256 * 1536, 0.0))
    assert dt == pytest.approx(0.029, rel=0.07)
    assert 256 / dt == pytest.approx(8800, rel=0.07)  # output tokens/s


def test_4k_prefill_takes_95_to_110_ms_and_recompute_is_10x_pcie():
    _, p = make("h100-llama3-8b")
    prefill = float(latency.iteration_time(p, 4096, 0, latency.prefill_pairs(4096, 0)))
    assert 0.095 <= prefill <= 0.110
    pcie = float(latency.transfer_time(p, 4096 // 16))
    assert pcie == pytest.approx(4096 * 131072 / 50e9, rel=1e-6)  # 10.7 ms for 512 MiB
    assert 8 <= prefill / pcie <= 12


def test_fp8_kv_halves_decode_attention_and_transfers():
    _, p = make("h100-llama3-8b")
    _, p8 = make("h100-llama3-8b", kv_dtype="fp8")
    bf = float(latency.iteration_time(p, 256, 256 * 1536, 0.0))
    f8 = float(latency.iteration_time(p8, 256, 256 * 1536, 0.0))
    attn = float(p.attn_decode) * 256 * 1536
    assert bf - f8 == pytest.approx(attn / 2, rel=1e-4)
    assert float(latency.transfer_time(p8, 10)) == pytest.approx(
        float(latency.transfer_time(p, 10)) / 2
    )


def test_h200_presets_are_faster_per_iteration():
    _, h100 = make("h100-llama3-8b")
    _, h200 = make("h200-llama3-8b")
    for args in ((1, 0, 0.0), (256, 256 * 1536, 0.0)):
        assert float(latency.iteration_time(h200, *args)) < float(
            latency.iteration_time(h100, *args)
        )
