"""Cross-embodiment training (`--policy.mixture`): one X-VLA on two LeRobotDatasets of robots whose actions, states,
cameras and frame rates differ (the PushT reach recorded by the main job, and a toy 6-joint arm with two cameras at
30 fps), through LeRobot's own lerobot-train and lerobot-eval, offline on the CPU."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import draccus
import numpy as np
import pytest
import torch
from conftest import LEROBOT_ENV, lerobot, randomize_, tiny_config
from lerobot.configs.train import TrainPipelineConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.processor import DataProcessorPipeline, NormalizerProcessorStep, TransitionKey
from lerobot.utils.constants import ACTION, OBS_STATE
from safetensors.torch import load_file
from torch.utils.data import default_collate

from lerobot_xvla import XVLAPolicy
from lerobot_xvla.compat import LEROBOT_06
from lerobot_xvla.demo import DEMO_CONFIG, lerobot_command
from lerobot_xvla.demo_pusht import PUSHT_TASK, REACH_ENV, record_pusht_dataset
from lerobot_xvla.execution import ChunkExecutor
from lerobot_xvla.mixture.dataset import MixtureDataset, block_sizes, describe_sources, make_mixture_datasets
from lerobot_xvla.mixture.normalize import DomainNormalizerStep
from lerobot_xvla.mixture.sources import MIXTURE_DOMAIN_KEY, MixtureError, MixtureSource
from lerobot_xvla.modeling_xvla import DOMAIN_LOSS, load_for_inference

PUSHT, TOY = 3, 5  # the two domains
TOP = "observation.images.top"
TOY_IMAGE = (24, 32)


def record_toy_arm(root: Path, episodes: int = 3, frames: int = 12) -> Path:
    """A 6-joint arm with two cameras (top, wrist) at 30 fps, states near 100 and actions near -50 (far from
    PushT's pixels), so per-domain statistics cannot be mistaken for pooled ones."""
    rng = np.random.default_rng(0)
    image = {"dtype": "image", "shape": (*TOY_IMAGE, 3), "names": ["height", "width", "channel"]}
    features = {
        TOP: image, "observation.images.wrist": dict(image),
        OBS_STATE: {"dtype": "float32", "shape": (6,), "names": None}, ACTION: {"dtype": "float32", "shape": (6,), "names": None},
    }  # fmt: skip
    dataset = LeRobotDataset.create("local/toy_arm", fps=30, features=features, root=root, robot_type="toy", use_videos=False)
    for _ in range(episodes):
        for _ in range(frames):
            dataset.add_frame({
                TOP: rng.integers(0, 255, (*TOY_IMAGE, 3), dtype=np.uint8),
                "observation.images.wrist": rng.integers(0, 255, (*TOY_IMAGE, 3), dtype=np.uint8),
                OBS_STATE: (100 + rng.normal(size=6)).astype(np.float32),
                ACTION: (-50 + 5 * rng.normal(size=6)).astype(np.float32), "task": "wave",
            })  # fmt: skip
        dataset.save_episode()
    dataset.finalize()
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mixture_data")
    pusht = record_pusht_dataset(base / "pusht", seeds=[0, 1, 2], frames=12, repo_id="local/xvla_demo_pusht").root
    return {"pusht": Path(pusht), "toy": record_toy_arm(base / "toy")}


def sources(roots: dict[str, Path], **toy: object) -> list[dict]:
    return [
        {"repo_id": "local/xvla_demo_pusht", "root": str(roots["pusht"]), "domain_id": PUSHT, "weight": 1,
         "rename_map": {"observation.image": TOP}},
        {"repo_id": "local/toy_arm", "root": str(roots["toy"]), "domain_id": TOY, "weight": 3, **toy},
    ]  # fmt: skip


def mixture_arg(entries: list[dict]) -> str:
    # JSON: with --config_path, LeRobot's parser reads values as JSON (YAML otherwise, of which JSON is a subset)
    return f"--policy.mixture={json.dumps(entries)}"


def parse_train_config(roots, *args: str, entries: list[dict] | None = None) -> TrainPipelineConfig:
    return draccus.parse(
        TrainPipelineConfig,
        config_path=str(DEMO_CONFIG),
        args=["--dataset.repo_id=mixture", mixture_arg(entries if entries is not None else sources(roots)), *args],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, roots, tokenizer_dir) -> tuple[Path, str]:
    """4 steps on the mixture, checkpoints at 2 and 4; on LeRobot 0.6 a third of each source's episodes is held out."""
    out = tmp_path_factory.mktemp("mixture_train") / "run"
    held_out = ["--dataset.eval_split=0.34", "--eval_steps=2"] if LEROBOT_06 else []
    log = lerobot(
        "lerobot-train", f"--config_path={DEMO_CONFIG}", "--dataset.repo_id=mixture", mixture_arg(sources(roots)),
        f"--policy.tokenizer_name={tokenizer_dir}", "--policy.log_loss_terms_every=2", "--steps=4", "--save_freq=2",
        "--log_freq=2", "--batch_size=4", "--num_workers=0", f"--output_dir={out}", *held_out,
    )  # fmt: skip
    return out, log


def checkpoint(out: Path, step: str = "000004") -> Path:
    return out / "checkpoints" / step / "pretrained_model"


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_block_sizes_realise_the_weights(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 6))
    frames = rng.integers(1, 5000, count).tolist()
    weights = rng.uniform(0.01, 10, count).tolist()
    sizes = block_sizes(frames, weights)
    total = sum(sizes)
    assert all(size >= n for size, n in zip(sizes, frames, strict=True))  # every frame at least once an epoch
    for size, weight in zip(sizes, weights, strict=True):
        assert abs(size / total - weight / sum(weights)) <= 1 / total
    assert min(size / n for size, n in zip(sizes, frames, strict=True)) < 1 + count / min(frames) + 1e-9  # no extra epoch


def filled_mixture(roots, weights=(1, 3)) -> MixtureDataset:
    cfg = parse_train_config(roots)
    entries = cfg.policy.mixture
    for index, (source, weight) in enumerate(zip(entries, weights, strict=True)):
        source.weight = weight
        describe_sources(source, index, LeRobotDataset(source.repo_id, root=source.root).meta, 20, "auto")
    datasets = [LeRobotDataset(s.repo_id, root=s.root, delta_timestamps={ACTION: [i / s.fps for i in range(8)]}) for s in entries]
    return MixtureDataset(entries, datasets, (64, 64))


@pytest.mark.parametrize("weights", [(1, 3), (5, 1), (1, 1)])
def test_lerobots_sampler_draws_sources_at_their_weights(roots, weights):
    """One epoch of the sampler lerobot-train uses (LeRobot 0.6's EpisodeAwareSampler over the mixture's blocks,
    0.4's shuffled indices) draws each source in the ratio of its weight and every frame of it."""
    mixture = filled_mixture(roots, weights)
    if LEROBOT_06:
        from lerobot.datasets import EpisodeAwareSampler

        meta = mixture.meta.episodes
        sampler = EpisodeAwareSampler(meta["dataset_from_index"], meta["dataset_to_index"], shuffle=True, seed=0)
        order = list(sampler)
    else:
        order = torch.randperm(len(mixture)).tolist()
    assert sorted(order) == list(range(len(mixture)))
    located = [mixture.locate(i) for i in order]
    drawn = np.bincount([source for source, _ in located], minlength=2)
    share = np.asarray(weights) / sum(weights)
    assert np.abs(drawn / drawn.sum() - share).max() <= 1 / len(mixture)
    for source, frames in enumerate(mixture.frames):
        assert {frame for s, frame in located if s == source} == set(range(frames))


def test_items_of_every_source_stack_into_one_batch(roots):
    """Items of both robots have the same keys and shapes: zero-padded state and actions, the toy's wrist view as
    zeros for PushT, images at the network's size, the domain id of each."""
    mixture = filled_mixture(roots)
    pusht, toy = mixture[0], mixture[len(mixture) - 1]
    batch = default_collate([pusht, toy])
    assert batch[ACTION].shape == (2, 8, 6) and batch[OBS_STATE].shape == (2, 6)
    assert batch[TOP].shape == batch["observation.images.wrist"].shape == (2, 3, 64, 64)
    assert batch[MIXTURE_DOMAIN_KEY].tolist() == [PUSHT, TOY]
    assert torch.all(batch[ACTION][0, :, 2:] == 0) and torch.all(batch[OBS_STATE][0, 2:] == 0)
    assert torch.all(batch["observation.images.wrist"][0] == 0) and batch["observation.images.wrist"][1].std() > 0.1
    raw = LeRobotDataset("local/toy_arm", root=roots["toy"])[mixture.locate(len(mixture) - 1)[1]]
    assert torch.allclose(batch[OBS_STATE][1], raw[OBS_STATE])  # not normalised here: the preprocessor does it per domain


# --------------------------------------------------------------------------------------------------------------
# The network: losses and views per domain
# --------------------------------------------------------------------------------------------------------------
def mixture_policy(toy_mode: str = "auto", toy_width: int = 6, anchors: tuple[float, list[float]] | None = None,
                   action: int | None = None, **overrides) -> XVLAPolicy:
    """A tiny policy over PushT's domain (2-D, one camera) and the toy arm's; anchors: (anchor_horizon_s, [fps of each]);
    action: the action feature's width (default the toy's)."""
    horizon, (pusht_fps, toy_fps) = anchors if anchors else (None, (10.0, 30.0))
    settings = {"num_domains": 8, "action_mode": "auto", "chunk_size": 8, "n_action_steps": 8, **overrides}
    config = tiny_config(views=2, state=6, action=action or toy_width, **settings, mixture=[
        MixtureSource(repo_id="a", domain_id=PUSHT, action_dim=2, state_dim=2, cameras=["observation.images.cam0"],
                      anchor_horizon_s=horizon, fps=pusht_fps),
        MixtureSource(repo_id="b", domain_id=TOY, action_mode=toy_mode, action_dim=toy_width, state_dim=6,
                      cameras=["observation.images.cam0", "observation.images.cam1"], anchor_horizon_s=horizon, fps=toy_fps),
    ])  # fmt: skip
    return XVLAPolicy(config)


def test_padded_channels_get_no_loss_and_no_gradient():
    model = mixture_policy().model
    torch.manual_seed(0)
    pred = torch.randn(4, 8, 20, requires_grad=True)
    target = torch.randn(4, 8, 20)
    domain = torch.tensor([PUSHT, TOY, PUSHT, TOY])
    losses = model._mixture_losses(pred, target, None, domain)
    total = sum(v for k, v in losses.items() if not k.startswith(DOMAIN_LOSS))
    total.backward()
    assert torch.all(pred.grad[[0, 2], :, 2:] == 0) and torch.all(pred.grad[[1, 3], :, 6:] == 0)
    assert torch.all(pred.grad[[0, 2], :, :2] != 0) and torch.all(pred.grad[[1, 3], :, :6] != 0)
    # the same numbers as each domain's own loss on its samples, weighted by their share of the batch
    own = {d: model.domain_modes[d].loss(pred[domain == d], target[domain == d], None)["joints_loss"] for d in (PUSHT, TOY)}
    assert torch.allclose(total, (own[PUSHT] + own[TOY]) / 2)
    assert torch.allclose(losses[f"{DOMAIN_LOSS}{PUSHT}"], own[PUSHT])
    shifted = target.clone()
    shifted[[0, 2], :, 2:] += 100  # whatever sits in PushT's padding costs nothing
    again = model._mixture_losses(pred, shifted, None, domain)
    assert torch.equal(again["joints_loss"], losses["joints_loss"])


def test_modes_that_denoise_different_widths_cannot_share_a_network():
    with pytest.raises(ValueError, match="different widths"):
        mixture_policy(toy_mode="joint", toy_width=14)  # joint denoises 14 values, auto 20


@pytest.mark.parametrize("blind", [False, True])
def test_the_domain_blind_control_shares_one_prompt_and_head(blind):
    """domain_blind: the same observation gives the same chunk under either domain id; without it, not."""
    model = randomize_(mixture_policy(domain_blind=blind).model).eval()
    inputs = {
        "input_ids": torch.ones(2, model.config.tokenizer_max_length, dtype=torch.long),
        "image_input": torch.randn(1, 2, 3, 64, 64).expand(2, -1, -1, -1, -1), "image_mask": torch.ones(2, 2, dtype=torch.bool),
        "domain_id": torch.tensor([PUSHT, TOY]), "proprio": torch.zeros(2, 20),
    }  # fmt: skip
    chunk = model.generate_actions(**inputs, steps=2, noise=torch.randn(1, 8, 20).expand(2, -1, -1))
    assert torch.allclose(chunk[0], chunk[1], atol=1e-5) == blind  # rows of one batch may differ by float rounding


def test_views_a_domain_lacks_are_masked_per_sample():
    policy = mixture_policy()
    config = policy.config
    batch = {
        "observation.language.tokens": torch.ones(2, config.tokenizer_max_length, dtype=torch.long),
        "observation.images.cam0": torch.rand(2, 3, 64, 64), "observation.images.cam1": torch.rand(2, 3, 64, 64),
        OBS_STATE: torch.rand(2, 6), MIXTURE_DOMAIN_KEY: torch.tensor([PUSHT, TOY]),
    }  # fmt: skip
    inputs = policy._build_model_inputs(batch)
    assert inputs["domain_id"].tolist() == [PUSHT, TOY]
    assert inputs["image_mask"].tolist() == [[True, False], [True, True]]


# --------------------------------------------------------------------------------------------------------------
# Normalisation per domain
# --------------------------------------------------------------------------------------------------------------
STATS = {
    PUSHT: {OBS_STATE: {"mean": [200.0, 300.0], "std": [50.0, 20.0], "min": [0.0, 0.0], "max": [512.0, 512.0]},
            ACTION: {"mean": [210.0, 290.0], "std": [40.0, 30.0], "min": [1.0, 2.0], "max": [500.0, 510.0]}},
    TOY: {OBS_STATE: {"mean": [100.0] * 6, "std": [2.0] * 6, "min": [95.0] * 6, "max": [105.0] * 6},
          ACTION: {"mean": [-50.0] * 6, "std": [5.0] * 6, "min": [-70.0] * 6, "max": [-30.0] * 6}},
}  # fmt: skip
WIDTHS = {PUSHT: {OBS_STATE: 2, ACTION: 2}, TOY: {OBS_STATE: 6, ACTION: 6}}


@pytest.mark.parametrize("mode", [NormalizationMode.MEAN_STD, NormalizationMode.MIN_MAX])
def test_each_domain_is_normalised_with_its_own_statistics_as_lerobot_would(mode, tmp_path):
    norm_map = {FeatureType.STATE: mode, FeatureType.ACTION: mode}
    step = DomainNormalizerStep(widths=WIDTHS, norm_map=norm_map, stats=STATS)
    state, action = torch.rand(4, 6) * 500, torch.rand(4, 8, 6) * 500
    state[[0, 2], 2:] = 0  # PushT's padding
    action[[0, 2], :, 2:] = 0
    ids = torch.tensor([PUSHT, TOY, PUSHT, TOY])
    transition = {TransitionKey.OBSERVATION: {OBS_STATE: state}, TransitionKey.ACTION: action,
                  TransitionKey.COMPLEMENTARY_DATA: {"domain_id": ids}}  # fmt: skip
    out = step(transition)
    for domain, rows in ((PUSHT, [0, 2]), (TOY, [1, 3])):
        width = WIDTHS[domain][ACTION]
        features = {OBS_STATE: PolicyFeature(FeatureType.STATE, (width,)), ACTION: PolicyFeature(FeatureType.ACTION, (width,))}
        lerobots = NormalizerProcessorStep(features=features, norm_map=norm_map, stats=STATS[domain])
        expected = lerobots({TransitionKey.OBSERVATION: {OBS_STATE: state[rows, :width]}, TransitionKey.ACTION: action[rows, :, :width]})
        assert torch.allclose(out[TransitionKey.OBSERVATION][OBS_STATE][rows, :width], expected[TransitionKey.OBSERVATION][OBS_STATE])
        assert torch.allclose(out[TransitionKey.ACTION][rows, :, :width], expected[TransitionKey.ACTION])
    assert torch.all(out[TransitionKey.ACTION][[0, 2], :, 2:] == 0)  # padding stays zero
    # saved and loaded by LeRobot's own pipeline: the per-domain table survives; the inverse undoes it for one domain
    DataProcessorPipeline(steps=[step], name="pre").save_pretrained(tmp_path)
    loaded = DataProcessorPipeline.from_pretrained(tmp_path, config_filename="pre.json").steps[0]
    assert isinstance(loaded, DomainNormalizerStep) and loaded.widths == WIDTHS
    inverse = DomainNormalizerStep(widths=WIDTHS, norm_map=norm_map, inverse=True, domain_id=TOY)
    inverse.load_state_dict(loaded.state_dict())
    back = inverse({TransitionKey.ACTION: out[TransitionKey.ACTION][[1, 3]]})[TransitionKey.ACTION]
    assert torch.allclose(back, action[[1, 3]], atol=1e-3)


def test_a_mixture_postprocessor_needs_the_domain_it_acts_as():
    step = DomainNormalizerStep(widths=WIDTHS, norm_map={FeatureType.ACTION: NormalizationMode.MEAN_STD}, stats=STATS, inverse=True)
    with pytest.raises(ValueError, match=r"acts as one of its domains \[3, 5\]: set --policy.domain_id"):
        step({TransitionKey.ACTION: torch.zeros(1, 2)})


# --------------------------------------------------------------------------------------------------------------
# lerobot-train and lerobot-eval
# --------------------------------------------------------------------------------------------------------------
def test_lerobot_train_samples_by_weight_and_logs_each_domains_loss(trained):
    out, log = trained
    assert "X-VLA mixture: local/xvla_demo_pusht -> domain 3" in log and "25.0% of samples (weight 1)" in log
    assert "X-VLA mixture: local/toy_arm -> domain 5" in log and "75.0% of samples (weight 3)" in log
    assert f"{DOMAIN_LOSS}{PUSHT}=" in log and f"{DOMAIN_LOSS}{TOY}=" in log
    if LEROBOT_06:
        assert "X-VLA held-out loss terms: loss=" in log and f"{DOMAIN_LOSS}{TOY}=" in log.split("held-out loss terms")[1]
    config = json.loads((checkpoint(out) / "config.json").read_text())
    table = {s["domain_id"]: (s["action_dim"], s["state_dim"], s["cameras"], s["fps"], s["task"]) for s in config["mixture"]}
    assert table == {PUSHT: (2, 2, [TOP], 10.0, PUSHT_TASK), TOY: (6, 6, [TOP, "observation.images.wrist"], 30.0, "wave")}


@pytest.mark.parametrize("domain, source", [(PUSHT, "pusht"), (TOY, "toy")])
def test_each_domain_deploys_with_its_own_statistics_width_and_bounds(trained, roots, domain, source):
    """Loaded for one domain, the checkpoint normalises with that dataset's statistics (round trip through the
    saved processor files), acts with its width and clamps to its action range."""
    out, _ = trained
    policy, preprocessor, postprocessor = load_for_inference(checkpoint(out), domain_id=domain)
    repo = {"pusht": "local/xvla_demo_pusht", "toy": "local/toy_arm"}[source]
    stats = LeRobotDataset(repo, root=roots[source]).meta.stats
    normalizer = next(s for s in preprocessor.steps if isinstance(s, DomainNormalizerStep))
    for key in (OBS_STATE, ACTION):
        for name in ("mean", "std"):
            assert np.allclose(normalizer.domain_stats(domain)[key][name].numpy(), stats[key][name], atol=1e-5)
    guard = postprocessor.steps[-1]
    assert np.allclose(guard.low, stats[ACTION]["min"]) and np.allclose(guard.high, stats[ACTION]["max"])
    width = policy.config.mixture_domains[domain].action_dim
    camera = {TOP: torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)}
    if domain == TOY:
        camera["observation.images.wrist"] = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    observation = {**camera, OBS_STATE: torch.as_tensor(stats[OBS_STATE]["mean"], dtype=torch.float32), "task": "wave"}
    action = postprocessor(policy.select_action(preprocessor(observation)))
    assert action.shape == (1, width) and torch.isfinite(action).all()
    assert torch.all(action >= torch.tensor(guard.low)) and torch.all(action <= torch.tensor(guard.high))


def test_lerobot_eval_runs_one_domain_of_the_mixture_in_its_env(trained, tmp_path):
    out, _ = trained
    args = [
        f"--policy.path={checkpoint(out)}", "--env.type=pusht", f"--env.task={REACH_ENV}", "--env.episode_length=8",
        '--rename_map={"observation.image": "observation.images.top"}', "--eval.n_episodes=1", "--eval.batch_size=1",
        "--eval.use_async_envs=false", "--policy.device=cpu",
    ]  # fmt: skip
    log = lerobot("lerobot-eval", *args, f"--policy.domain_id={PUSHT}", f"--output_dir={tmp_path / 'eval'}")
    assert "Traceback" not in log
    assert f"using the instruction it was trained with, {PUSHT_TASK!r}" in log  # the env sends none: its domain's
    assert json.loads((tmp_path / "eval" / "eval_info.json").read_text())["overall"]["n_episodes"] == 1
    for domain, message in ((None, r"choose the one it acts as with --policy.domain_id \(one of \[3, 5\]"),
                            (TOY, "domain 5 of this mixture policy was trained on 6-D actions"),
                            (4, r"domain_id=4 is not one of the mixture's domains \[3, 5\]")):  # fmt: skip
        chosen = [] if domain is None else [f"--policy.domain_id={domain}"]
        result = subprocess.run([lerobot_command("lerobot-eval"), *args, *chosen, f"--output_dir={tmp_path / f'e{domain}'}"],
                                capture_output=True, text=True, env=LEROBOT_ENV, timeout=600)  # fmt: skip
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert re.search(rf"^error: .*{message}", result.stderr, re.MULTILINE), result.stderr[-3000:]


# lerobot-train with one change: each DataLoader draws its iterator's base seed from a generator of its own. LeRobot
# 0.6.1 restores the checkpoint's RNG state (load_training_state) before it creates the training DataLoader's
# iterator, whose creation draws that seed from the global generator; the uninterrupted run drew it at step 0. The
# resumed run's noise and dropout are therefore one draw off: for every policy, not a mixture's only.
LEROBOT_TRAIN_WITHOUT_THE_RESUME_SEED_DRAW = """
import sys, torch
from torch.utils.data import DataLoader
init = DataLoader.__init__
def own_generator(self, *args, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    init(self, *args, **kwargs)
DataLoader.__init__ = own_generator
from lerobot.scripts.lerobot_train import main
sys.argv[0] = "lerobot-train"
main()
"""


def test_resume_continues_the_mixture_exactly(trained, tmp_path):
    """--resume picks the mixture up from its checkpoint (the per-domain processors included) and, on LeRobot 0.6,
    whose sampler order is a function of the seed and the step, the data order where it stopped. Resumed without
    LeRobot's extra seed draw (above), the weights at step 4 are bit-equal to the uninterrupted run's: nothing of the
    mixture (sampling, per-domain statistics, losses, held-out passes) breaks an exact resume."""
    out, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / "000004")
    (resumed / "checkpoints" / "last").unlink()
    (resumed / "checkpoints" / "last").symlink_to("000002")
    train_config = resumed / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    edited = json.loads(train_config.read_text())
    edited["output_dir"] = str(resumed)
    train_config.write_text(json.dumps(edited))
    args = [f"--config_path={train_config}", "--resume=true", "--steps=4"]
    if not LEROBOT_06:  # 0.4 restarts the sampler on resume: the data order, hence the weights, differ
        log = lerobot("lerobot-train", *args)
    else:
        command = [sys.executable, "-c", LEROBOT_TRAIN_WITHOUT_THE_RESUME_SEED_DRAW, *args]
        result = subprocess.run(command, capture_output=True, text=True, env=LEROBOT_ENV, timeout=900)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-6000:]
        assert "Resuming data order at epoch 0, sample 8" in log  # 2 steps of 4
        expected = load_file(checkpoint(out) / "model.safetensors")
        weights = load_file(checkpoint(resumed) / "model.safetensors")
        assert expected.keys() == weights.keys() and all(torch.equal(expected[k], weights[k]) for k in expected)
    assert "X-VLA mixture:" in log and "X-VLA implementation: lerobot_xvla" in log
    state = json.loads((resumed / "checkpoints" / "last" / "training_state" / "training_step.json").read_text())
    assert state["step"] == 4


# --------------------------------------------------------------------------------------------------------------
# Time anchors, each source at its own fps
# --------------------------------------------------------------------------------------------------------------
ANCHOR_S = 0.8  # PushT (10 fps): 8 frames; the toy arm (30 fps): 24 frames


def test_time_anchors_read_each_source_at_its_own_fps(roots):
    """anchor_horizon_s per source: each dataset loads the frames of its horizon at its own rate, shorter
    trajectories are padded (and marked) to the longest, and the policy's targets are each sample's own
    trajectory interpolated at chunk_size points over its own horizon (checked against numpy's interp)."""
    entries = [{**entry, "anchor_horizon_s": ANCHOR_S} for entry in sources(roots)]
    cfg = parse_train_config(roots, entries=entries)
    mixture, _ = make_mixture_datasets(cfg)
    assert [len(d.delta_timestamps[ACTION]) for d in mixture.datasets] == [9, 25]
    pusht, toy = mixture[0], mixture[len(mixture) - 1]
    assert pusht[ACTION].shape == toy[ACTION].shape == (25, 6)
    assert pusht["action_is_pad"][9:].all() and not pusht["action_is_pad"][:9].any()
    batch = default_collate([pusht, toy])
    chunk = 8
    policy = mixture_policy(chunk_size=chunk, n_action_steps=chunk, anchors=(ANCHOR_S, [10.0, 30.0]))
    targets, valid, first = policy._targets(batch, batch[MIXTURE_DOMAIN_KEY])
    assert valid is None and targets.shape == (2, chunk, 20)
    for row, (width, frames) in enumerate([(2, 8), (6, 24)]):
        trajectory = batch[ACTION][row, : frames + 1, :width].numpy()
        times = np.linspace(0, frames, chunk + 1)
        expected = np.stack([np.interp(times, np.arange(frames + 1), trajectory[:, j]) for j in range(width)], axis=-1)
        assert np.allclose(targets[row, :, :width].numpy(), expected[1:], atol=1e-4)
        assert np.allclose(first[row, :width].numpy(), expected[0])
        assert torch.all(targets[row, :, width:] == 0)


def test_a_mixture_domain_deploys_with_its_own_time_anchors():
    """Acting as one domain, the policy interpolates at that domain's horizon and dataset fps."""
    for domain, (width, frames, fps) in {PUSHT: (2, 8, 10.0), TOY: (6, 24, 30.0)}.items():
        config = mixture_policy(anchors=(ANCHOR_S, [10.0, 30.0]), action=width, domain_id=domain, n_action_steps=frames).config
        assert config.time_anchors == (ANCHOR_S, fps) and config.executable_steps == frames
        executor = ChunkExecutor(config)
        chunk = torch.linspace(1, 8, 8)[None, :, None].expand(1, 8, width)  # anchors at 0.8 s * k / 8
        executor.add_chunk(chunk)
        assert len(executor.queue) == frames  # one action per control step of the domain's dataset
        assert torch.allclose(executor.queue[-1], chunk[:, -1])  # the last lands on the horizon's end
    assert mixture_policy().config.time_anchors is None


@pytest.mark.parametrize(
    "toy, message",
    [
        ({}, r"mixture\[1\] \(local/toy_arm\) has no anchor_horizon_s while mixture\[0\] .* has one"),
        ({"anchor_horizon_s": -1}, r"mixture\[1\] \(local/toy_arm\): anchor_horizon_s must be a finite number of seconds > 0"),
        ({"anchor_horizon_s": 200}, r"anchor_horizon_s=200 at its 30 fps spans 6000 frames, more than 4096"),
        ({"anchor_horizon_s": 0.2}, r"mixture\[1\] \(local/toy_arm\): anchor_horizon_s=0.2 at its 30 fps gives 6 control steps per chunk, fewer than n_action_steps=8"),
        ({"domain_id": PUSHT, "anchor_horizon_s": 1.0}, r"share domain_id 3 but not their action space \(anchor_horizon_s 1.0 vs 0.8\)"),
    ],
)
def test_time_anchor_mistakes_are_named(roots, toy, message):
    entries = sources(roots, **toy)
    entries[0]["anchor_horizon_s"] = ANCHOR_S
    assert re.search(message, mixture_error(roots, entries))


def test_policy_level_time_anchors_are_refused_with_a_mixture(roots):
    message = mixture_error(roots, None, "--policy.anchor_horizon_s=1", "--policy.anchor_fps=10")
    assert "anchor_horizon_s cannot be combined with mixture: time anchors are set per source" in message


# --------------------------------------------------------------------------------------------------------------
# Mistakes, named before training starts
# --------------------------------------------------------------------------------------------------------------
def mixture_error(roots, entries=None, *args: str) -> str:
    try:
        make_mixture_datasets(parse_train_config(roots, *args, entries=entries))
    except (MixtureError, draccus.utils.DecodingError) as error:
        return str(error)
    raise AssertionError("no error")


@pytest.mark.parametrize(
    "toy, message",
    [
        ({"domain_id": PUSHT}, r"share domain_id 3 but not their action space \(action_dim 6 vs 2\): give each robot its own domain id"),
        ({"action_dim": 7}, r"mixture\[1\] \(local/toy_arm\): action_dim=7 but the dataset's actions have 6 values"),
        ({"action_mode": "franka_joint7"}, r"mixture\[1\] \(local/toy_arm\): action dimension 6 does not fit"),
        ({"action_mode": "so101_ee6d"}, "converts joints by kinematics"),
        ({"rename_map": {"observation.images.side": TOP}}, r"rename_map names \['observation.images.side'\], which the dataset does not have"),
        ({"rename_map": {"observation.images.wrist": TOP}}, r"rename_map maps several cameras onto \['observation.images.top'\]"),
        ({"rename_map": {TOP: "observation.images.side"}}, r"no image for the primary camera 'observation.images.top'"),
        ({"weight": 0}, "weight must be a finite number > 0, got 0"),
        ({"domain_id": 8}, r"domain_id must be a whole number in \[0, num_domains=8\), got 8"),
        ({"domian_id": 2}, "The fields `domian_id` are not valid for MixtureSource"),
    ],
)
def test_mixture_mistakes_are_named(roots, toy, message):
    assert re.search(message, mixture_error(roots, sources(roots, **toy)))


def test_dataset_flags_that_belong_to_the_sources_are_refused(roots):
    assert "--dataset.root is per source with --policy.mixture" in mixture_error(roots, None, f"--dataset.root={roots['toy']}")
    with pytest.raises(MixtureError, match=r"pass --dataset.repo_id=mixture .* or --policy.mixture='\[\]' to train on a/b alone"):
        make_mixture_datasets(parse_train_config(roots, "--dataset.repo_id=a/b"))


def test_lerobot_train_prints_a_mixture_mistake_in_one_line(roots, tokenizer_dir, tmp_path):
    result = subprocess.run(
        [lerobot_command("lerobot-train"), f"--config_path={DEMO_CONFIG}", "--dataset.repo_id=mixture",
         mixture_arg(sources(roots, action_dim=7)), f"--policy.tokenizer_name={tokenizer_dir}", "--steps=1",
         f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=LEROBOT_ENV, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: mixture[1] (local/toy_arm): action_dim=7 but the dataset's actions have 6 values"
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------------------
# LoRA and DDP
# --------------------------------------------------------------------------------------------------------------
def test_lora_on_a_mixture_from_its_checkpoint(trained, roots, tmp_path):
    out, _ = trained
    log = lerobot(
        "lerobot-train", f"--policy.path={checkpoint(out)}", "--peft.method_type=LORA", "--policy.push_to_hub=false",
        "--dataset.repo_id=mixture", "--steps=2", "--batch_size=4", "--num_workers=0", "--save_freq=2",
        "--wandb.enable=false", f"--output_dir={tmp_path / 'lora'}",
    )  # fmt: skip
    assert "X-VLA mixture: local/toy_arm -> domain 5" in log
    assert (tmp_path / "lora" / "checkpoints" / "000002" / "pretrained_model" / "adapter_config.json").exists()


def test_ddp_with_two_cpu_processes_on_a_mixture(roots, tokenizer_dir, tmp_path):
    result = subprocess.run(
        [
            lerobot_command("accelerate"), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
            "--mixed_precision=no", "--dynamo_backend=no", lerobot_command("lerobot-train"), f"--config_path={DEMO_CONFIG}",
            "--dataset.repo_id=mixture", mixture_arg(sources(roots)), f"--policy.tokenizer_name={tokenizer_dir}",
            "--policy.log_loss_terms_every=1", "--steps=2", "--save_freq=2", "--log_freq=1", "--batch_size=2",
            "--num_workers=0", f"--output_dir={tmp_path / 'ddp'}",
        ],
        capture_output=True, text=True, env=LEROBOT_ENV, timeout=900,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Effective batch size: 2 x 2 = 4" in log and "X-VLA mixture: local/toy_arm" in log
    assert (tmp_path / "ddp" / "checkpoints" / "000002" / "pretrained_model" / "policy_preprocessor.json").exists()
