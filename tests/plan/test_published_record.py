"""The planner against the published record: each test names its paper, table or equation, and
the tolerance it allows. Figures are the papers' own; the planner computes them from shapes."""

import pytest

from lmscale.model.config import ModelConfig
from lmscale.plan.flops import chinchilla_optimal, training_flops_per_token
from lmscale.plan.hardware import accelerator
from lmscale.plan.memory import block_activations, training_memory
from lmscale.plan.models import model_from_params, named_model
from lmscale.plan.perf import Cluster, energy_kwh, step_time, training_cost
from lmscale.plan.strategy import Strategy
from lmscale.plan.workload import Workload

GB = 1e9  # the ZeRO paper's gigabyte


def _zero_model(psi: float) -> ModelConfig:
    return model_from_params(psi, family="gpt2", max_seq_len=2048, vocab_size=50257)


# ZeRO (Rajbhandari et al. 2019), Table 1: per-device memory of model states in GB, mixed-precision
# Adam (K = 12), for Psi = 7.5B, 128B, 1T and data-parallel degrees Nd; columns P_os, P_os+g,
# P_os+g+p. Rows with Nd = 1 hold 16 Psi.
ZERO_TABLE_1 = {
    7.5e9: {1: (120, 120, 120), 4: (52.5, 41.3, 30), 16: (35.6, 21.6, 7.5), 64: (31.4, 16.6, 1.88),
            1024: (30.1, 15.1, 0.12)},
    128e9: {1: (2048, 2048, 2048), 4: (896, 704, 512), 16: (608, 368, 128), 64: (536, 284, 32),
            1024: (513, 257, 2)},
    1e12: {1: (16000, 16000, 16000), 4: (7000, 5500, 4000), 16: (4750, 2875, 1000),
           1024: (4011, 2013, 15.6)},
}  # fmt: skip


@pytest.mark.parametrize("psi", ZERO_TABLE_1)
def test_model_states_match_zero_table_1(psi):
    model = _zero_model(psi)
    scale = psi / model.num_params()  # the paper's Psi is round; the shape's count is close
    assert abs(scale - 1) < 0.03
    workload = Workload(model, 2048, 2048 * 1024, precision="mixed")
    for dp, row in ZERO_TABLE_1[psi].items():
        for stage, published in zip((1, 2, 3), row, strict=True):
            states = training_memory(workload, Strategy(dp=dp, zero=stage)).model_states
            assert states * scale / GB == pytest.approx(published, rel=0.02, abs=0.01), (
                psi,
                dp,
                stage,
            )


def test_zero_communication_volume_section_7():
    """ZeRO section 7: plain data parallel and P_os+g move 2 Psi per step; P_os+g+p 3 Psi (1.5x)."""
    model = _zero_model(7.5e9)
    workload = Workload(model, 2048, 2048 * 64, precision="mixed")
    cluster = Cluster.of(accelerator("a100-80gb"), 64)
    volume = {z: step_time(workload, Strategy(dp=64, zero=z), cluster).comm_bytes["data parallel"]
              for z in (0, 1, 3)}  # fmt: skip
    psi_bytes = model.num_params() * 2 * 63 / 64  # 16-bit elements, ring share
    assert volume[0] == pytest.approx(2 * psi_bytes, rel=0.01)
    assert volume[1] == pytest.approx(volume[0], rel=1e-9)
    assert volume[3] / volume[0] == pytest.approx(1.5, rel=1e-9)


# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
# Table 2 (activation bytes per layer) for the models of their Table 3 (s = 2048, t = 8).
KORTHIKANTI_TABLE_3 = {"22B": (64, 6144, 48, 4), "175B": (96, 12288, 96, 1),
                       "530B": (128, 20480, 105, 1), "1T": (160, 25600, 128, 1)}  # fmt: skip


@pytest.mark.parametrize("name", KORTHIKANTI_TABLE_3)
def test_activations_per_layer_match_korthikanti_table_2(name):
    a, h, layers, b = KORTHIKANTI_TABLE_3[name]
    s, t = 2048, 8
    model = ModelConfig(family="gpt2", vocab_size=51200, dim=h, n_layers=layers, n_heads=a,
                        max_seq_len=s, dropout=0.1)  # fmt: skip
    workload = Workload(model, s, s * b * 64, precision="mixed", attention="eager")
    sbh = s * b * h
    expected = {
        Strategy(micro_batch=b): sbh * (34 + 5 * a * s / h),
        Strategy(tp=t, micro_batch=b): sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        Strategy(tp=t, sp=True, micro_batch=b): sbh / t * (34 + 5 * a * s / h),
        Strategy(tp=t, recompute="selective", micro_batch=b): sbh * (10 + 24 / t),
        Strategy(tp=t, sp=True, recompute="selective", micro_batch=b): sbh * 34 / t,
        Strategy(tp=t, recompute="full", micro_batch=b): 2 * sbh,
    }
    for strategy, published in expected.items():
        assert block_activations(workload, strategy) == pytest.approx(published, rel=1e-9), strategy


def _gpt3_megatron() -> ModelConfig:
    # Megatron-LM pads GPT-2's vocabulary to 51,200.
    return named_model("gpt3-175b").replace(vocab_size=51200)


def test_hardware_flops_match_megatron_equation_3():
    """Narayanan et al. 2021, eq. 3: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) per iteration,
    activation recomputation included."""
    for model in (
        _gpt3_megatron(),
        ModelConfig(
            family="gpt2", vocab_size=51200, dim=25600, n_layers=128, n_heads=160, max_seq_len=2048
        ),
    ):
        s, h, layers, vocab = 2048, model.dim, model.n_layers, model.vocab_size
        _, hardware = training_flops_per_token(model, s, recompute="full")
        published = 96 * s * layers * h**2 * (1 + s / (6 * h) + vocab / (16 * layers * h)) / s
        assert hardware == pytest.approx(published, rel=1e-3)


@pytest.mark.parametrize(
    "model, gpus, tflops, tokens, days",
    [
        # Narayanan et al. 2021, section 5.1: GPT-3 175B on 1024 A100s at 140 TFLOP/s per GPU,
        # 300B tokens, "34 days"; the 1T model on 3072 GPUs at 163 TFLOP/s, 450B tokens, "84 days".
        (_gpt3_megatron(), 1024, 140, 300e9, 34),
        (ModelConfig(family="gpt2", vocab_size=51200, dim=25600, n_layers=128, n_heads=160,
                     max_seq_len=2048), 3072, 163, 450e9, 84),
    ],
)  # fmt: skip
def test_training_time_matches_megatron_section_5_1(model, gpus, tflops, tokens, days):
    workload = Workload(model, 2048, 2048 * 1536, tokens=tokens, precision="mixed")
    cluster = Cluster.of(accelerator("a100-80gb"), gpus, mfu=tflops / 312)
    strategy = Strategy(dp=gpus // 64, tp=8, pp=8, zero=1, recompute="full")
    cost = training_cost(workload, strategy, cluster)
    compute_days = cost.steps * cost.step.compute / 86400  # their estimate is compute alone
    assert compute_days == pytest.approx(days, rel=0.05)


def test_mfu_matches_palm_appendix_b():
    """Chowdhery et al. 2022 (PaLM), appendix B: 540B trains at 238.3K tokens/s on 6144 TPU v4
    chips (275 TFLOP/s bf16 peak): MFU 46.2% with 6N + 12 L H Q T FLOPs per token."""
    model = named_model("palm-540b")
    assert model.num_params() == pytest.approx(540.35e9, rel=0.002)
    per_token, _ = training_flops_per_token(model, 2048)
    mfu = 238.3e3 * per_token / (6144 * 275e12)
    assert mfu == pytest.approx(0.462, abs=0.003)


def test_gpt3_training_compute_matches_brown_table_d1():
    """Brown et al. 2020, Table D.1: GPT-3 175B, 300B tokens, 3.14e23 FLOPs (6 N D, no attention)."""
    model = named_model("gpt3-175b")
    assert model.num_params() == pytest.approx(175e9, rel=0.01)
    assert 6 * model.num_params() * 300e9 == pytest.approx(3.14e23, rel=0.01)
    per_token, _ = training_flops_per_token(model, 2048)
    assert 1.0 < per_token * 300e9 / 3.14e23 < 1.05  # the attention term adds a few percent


# Hoffmann et al. 2022 (Chinchilla), Table 3: compute-optimal FLOPs and tokens by model size.
CHINCHILLA_TABLE_3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                      (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                      (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12),
                      (10e12, 1.30e28, 216.2e12)]  # fmt: skip


@pytest.mark.parametrize("params, flops, tokens", CHINCHILLA_TABLE_3)
def test_compute_optimal_size_matches_chinchilla_table_3(params, flops, tokens):
    n, d = chinchilla_optimal(flops)
    assert n == pytest.approx(params, rel=0.05)
    assert d == pytest.approx(tokens, rel=0.10)


@pytest.mark.parametrize(
    "name, reported_hours", [("llama2-7b", 184_320), ("llama2-70b", 1_720_320)]
)
def test_default_a100_mfu_reproduces_llama2_gpu_hours(name, reported_hours):
    """Touvron et al. 2023 (Llama 2), Table 2: A100-80GB GPU-hours for 2T tokens at 4096 context;
    the catalog's default A100 MFU (0.45) must reproduce them within 10%."""
    model = named_model(name)
    workload = Workload(model, 4096, 4e6, tokens=2e12, precision="mixed")
    cluster = Cluster.of(accelerator("a100-80gb"), 2048)
    strategy = Strategy(dp=256, tp=8, zero=1)
    hours = training_cost(workload, strategy, cluster)
    compute_hours = hours.steps * hours.step.compute * 2048 / 3600
    assert compute_hours == pytest.approx(reported_hours, rel=0.10)


def test_energy_and_emissions_match_patterson_table_4():
    """Patterson et al. 2021, Table 4, GPT-3: 10,000 V100s for 14.8 days at 330 W average,
    PUE 1.10: 1,287 MWh; at 0.429 kg CO2e/kWh, 552 t."""
    hours = 10_000 * 14.8 * 24
    energy = energy_kwh(hours, 330, 1.10)
    assert energy / 1000 == pytest.approx(1287, rel=0.01)
    assert energy * 0.429 / 1000 == pytest.approx(552, rel=0.01)
