"""The real Trainer on CUDA, one process: fp32 and bf16, with and without torch.compile and full activation
checkpointing. Marked `gpu`; skips cleanly without a CUDA torch or a CUDA device.

Each case runs `moeyard train` in a subprocess that sees the machine's GPUs (the rest of the suite hides
them, tests/conftest.py) with `train.device=cuda`, so a run cannot fall back to the CPU unnoticed, and
compares its losses with the fp32 eager run's on the same GPU.

    .venv/bin/pytest -q -m gpu
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.helpers import TINY, moeyard_cmd, run_losses

pytestmark = pytest.mark.gpu

STEPS = 4
FAST = ["optim.lr=1e-2", "optim.warmup_steps=1", f"train.steps={STEPS}", "train.log_every=1", "train.device=cuda"]
BF16_RTOL = 5e-3
"""bf16 keeps 8 significant bits (rounding 2**-9 ~ 2e-3 per op): over four steps the CPU's bf16 losses stay
within 5e-3 of fp32 (tests/unit/test_gpu_path.py), while the fp32 losses fall by more than 20%. Compile
and checkpointing change only the order of roundings, so each variant is held to the same bound."""
CASES = [
    ("bf16", False, "none"),
    ("fp32", True, "none"),
    ("bf16", True, "none"),
    ("fp32", False, "full"),
    ("bf16", False, "full"),
    ("bf16", True, "full"),
]


@pytest.fixture(scope="session")
def cuda_env(host_gpu_env: dict[str, str]) -> dict[str, str]:
    """The environment of a subprocess that sees this machine's GPUs; skips where there is none."""
    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU build")
    probe = [moeyard_cmd()[0], "-c", "import torch; print(torch.cuda.device_count())"]
    count = subprocess.run(probe, env=host_gpu_env, capture_output=True, text=True, timeout=120).stdout.strip()
    if count in ("", "0"):
        pytest.skip("no CUDA device")
    return host_gpu_env


def _train(env: dict[str, str], run_dir, dtype: str, compile: bool, ac: str) -> list[float]:
    overrides = [*TINY, *FAST, f"train.dtype={dtype}", f"parallel.compile={str(compile).lower()}"]
    overrides += [f"parallel.activation_checkpoint={ac}", f"run.dir={run_dir}"]
    out = subprocess.run(moeyard_cmd(*overrides), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_losses(run_dir)


@pytest.fixture(scope="session")
def fp32_eager(cuda_env: dict[str, str], tmp_path_factory) -> list[float]:
    losses = _train(cuda_env, tmp_path_factory.mktemp("fp32-eager"), "fp32", False, "none")
    assert len(losses) == STEPS and (losses[0] - losses[-1]) / losses[0] > 0.2, losses
    return losses


@pytest.mark.parametrize(("dtype", "compile", "ac"), CASES, ids=[f"{d}-compile{int(c)}-ac_{a}" for d, c, a in CASES])
def test_trainer_on_cuda_trains_like_fp32_eager(
    cuda_env: dict[str, str], fp32_eager: list[float], tmp_path, dtype: str, compile: bool, ac: str
) -> None:
    losses = _train(cuda_env, tmp_path, dtype, compile, ac)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(fp32_eager), rtol=BF16_RTOL, atol=0)
