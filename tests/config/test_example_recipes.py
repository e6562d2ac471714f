"""Every recipe under examples/ validates into RLConfig (a typo in a shipped recipe fails here)."""

from pathlib import Path

import pytest

from megarl.config import load_config
from megarl.trainers.config import RLConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates(path):
    cfg = load_config(RLConfig, str(path), [])
    assert cfg.train.steps >= 1


def test_one_shot_recipes_match_the_paper():
    d = ROOT / "examples" / "one_shot_rlvr"
    pi1 = load_config(RLConfig, str(d / "pi1_qwen2.5-math-1.5b.yaml"), [])
    assert pi1.data.train_indices == (124,) and pi1.data.prompts_per_step == 128 and pi1.rollout.n == 8
    assert (pi1.optim.lr, pi1.actor.entropy_coef, pi1.actor.kl.coef, pi1.actor.kl.kind) == (1e-6, 0.001, 0.001, "k3")
    assert (pi1.rollout.temperature, pi1.rollout.max_new_tokens) == (0.6, 3072)
    ablation = load_config(RLConfig, str(d / "pi1_entropy_only.yaml"), [])
    assert ablation.actor.pg_coef == 0.0 and ablation.actor.entropy_coef == 0.001
    assert ablation.actor.kl.placement == "none" and ablation.optim.weight_decay == 0.0
