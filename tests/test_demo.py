"""The main job's task variant, its scripted expert and its output directory rules (the LeRobot-command parts
are tested in test_lerobot_loops.py on a real lerobot-train run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lerobot_xvla.demo_pusht import (
    BLOCK_CENTRE_RANGE,
    PUSHT_IMAGE_SIZE,
    START_DISTANCE,
    TOUCH_GAP,
    WALK_STEP,
    block_centre,
    expert_action,
    expert_max_reward,
    make_pusht_env,
    remove_previous_output,
    scripted_reach,
)
from lerobot_xvla.demo_report import (
    HELDOUT_LABELS,
    ClosedLoop,
    OfflineError,
    _frames_of_other_episodes,
    learning_figure,
    report_lines,
    summarise,
    wilson_interval,
)

SEEDS = list(range(100_000, 100_012))


def test_scripted_expert_touches_the_block_and_standing_still_does_not():
    assert (expert_max_reward(SEEDS, frames=30) == 1.0).all()
    env = make_pusht_env()
    for seed in SEEDS:
        observation, _ = env.reset(seed=seed)
        assert max(env.step(observation["agent_pos"])[1] for _ in range(5)) == 0.0


def test_reward_success_and_end_of_episode_mean_touching():
    env = make_pusht_env()
    for seed in SEEDS[:4]:
        observation, info = env.reset(seed=seed)
        for _ in range(30):
            observation, reward, terminated, truncated, info = env.step(expert_action(observation, info))
            touching = env.unwrapped.gap_to_block() <= TOUCH_GAP
            assert reward == float(touching) and terminated == touching == info["is_success"] and not truncated
            if terminated:
                break
        assert terminated


def test_reach_variant_starts_anywhere_and_keeps_pushts_physics():
    """Each seed gives one start: the block's centre anywhere on the table, the agent clear of it. A given state
    plays out exactly as in gym_pusht's PushT (same physics and image)."""
    import gymnasium as gym

    env = make_pusht_env()
    centres = []
    for seed in SEEDS:
        observation, info = env.reset(seed=seed)
        assert observation["pixels"].shape == (PUSHT_IMAGE_SIZE, PUSHT_IMAGE_SIZE, 3)
        centre = block_centre(info["block_pose"])
        assert (BLOCK_CENTRE_RANGE[0] <= centre).all() and (centre <= BLOCK_CENTRE_RANGE[1]).all()
        assert np.linalg.norm(info["pos_agent"] - centre) >= START_DISTANCE
        assert np.array_equal(env.reset(seed=seed)[1]["block_pose"], info["block_pose"])
        centres.append(centre)
    assert np.ptp(centres, axis=0).min() > 100  # the start varies with the seed, in x and in y

    original = gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array")
    state = {"reset_to_state": [300.0, 120.0, 220.0, 260.0, 0.3]}
    runs = []
    for pusht in (env, original):
        pusht.reset(seed=0, options=state)
        runs.append([pusht.step(np.array([250.0, 200.0 + 10 * t])) for t in range(6)])
    for (ours, *_, our_info), (theirs, *_, their_info) in zip(*runs, strict=True):
        assert np.array_equal(ours["pixels"], theirs["pixels"])
        assert np.array_equal(our_info["block_pose"], their_info["block_pose"])


def test_scripted_expert_walks_straight_at_the_block():
    block = np.array([150.0, 150.0, 0.3])
    centre = block_centre(block)
    far = centre + np.array([300.0, 0.0])
    assert scripted_reach(far, block) == pytest.approx(far - [WALK_STEP, 0.0])
    near = centre + np.array([10.0, -20.0])
    assert scripted_reach(near, block) == pytest.approx(centre)


def test_output_dir_of_another_program_is_never_deleted(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "data.txt").write_text("keep")
    with pytest.raises(SystemExit, match="refusing to overwrite .*mine: it exists and was not written by the main job"):
        remove_previous_output(precious, ".xvla_main_job")
    assert (precious / "data.txt").read_text() == "keep"
    (precious / ".xvla_main_job").touch()
    remove_previous_output(precious, ".xvla_main_job")
    assert not precious.exists()


def test_swapped_images_come_from_other_episodes():
    episodes = [range(0, 3), range(3, 4), range(4, 9)]
    source = _frames_of_other_episodes(episodes, np.random.default_rng(0))
    assert sorted(source) == list(range(9))
    for frames in episodes:
        assert all(source[frame] not in frames for frame in frames)
    assert len(set(source.values())) > 3  # drawn, not one fixed frame
    with pytest.raises(ValueError, match="at least two episodes"):
        _frames_of_other_episodes([range(0, 5)], np.random.default_rng(0))


def test_wilson_interval_matches_the_published_formula():
    """95% Wilson score intervals (Newcombe 1998, table I: 81/263 -> 0.2553-0.3662; 0/20 -> 0-0.1611)."""
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-5)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=5e-5)
    with pytest.raises(ValueError, match="needs trials > 0, got 0"):
        wilson_interval(0, 0)


def test_reach_geometry_is_pinned_to_gym_pushts_own_shapes():
    """What the README's closed-loop figures rest on, measured on gym_pusht's own pymunk bodies rather than on
    the constants that define the task: touching is a gap of at most 2 px between the agent's disc and the T
    (1.5 px succeeds, 2.5 px does not); over 300 seeds the T's centre of mass spans 90-422 px in x and y, the T
    stays on the 512 px table and the agent starts 120 px or more from that centre, inside 50-462 px."""
    import shapely.geometry as sg
    import shapely.ops

    env = make_pusht_env()
    pusht = env.unwrapped

    def block_shape():
        block = pusht.block
        return shapely.ops.unary_union([sg.Polygon([tuple(block.local_to_world(v)) for v in s.get_vertices()]) for s in block.shapes])

    env.reset(seed=0, options={"reset_to_state": [40.0, 40.0, 256.0, 256.0, 0.0]})
    (disc,) = pusht.agent.shapes
    t_shape, centre = block_shape(), np.array(pusht.block.local_to_world(pusht.block.center_of_gravity))
    for gap, touching in ((1.5, True), (2.5, False)):
        low, high = 0.0, 300.0  # bisect along +x from the centre of mass for the point `gap` px from the T
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if t_shape.distance(sg.Point(*(centre + [middle, 0.0]))) - disc.radius < gap else (low, middle)
        agent = centre + [low, 0.0]
        env.reset(seed=0, options={"reset_to_state": [*agent, 256.0, 256.0, 0.0]})
        _, reward, terminated, _, info = env.step(agent)
        assert (info["is_success"], terminated, reward) == (touching, touching, float(touching)), gap

    centres = []
    for seed in range(300):
        _, info = env.reset(seed=seed)
        centre = np.array(pusht.block.local_to_world(pusht.block.center_of_gravity))
        centres.append(centre)
        minx, miny, maxx, maxy = block_shape().bounds
        assert minx >= 0 and miny >= 0 and maxx <= 512 and maxy <= 512, seed
        agent = np.array(pusht.agent.position)
        assert np.linalg.norm(agent - centre) >= 120 and (agent >= 50).all() and (agent <= 462).all(), seed
    centres = np.array(centres)
    assert (centres >= 90).all() and (centres <= 422).all()
    assert (centres.min(axis=0) < 95).all() and (centres.max(axis=0) > 417).all()


def main_job_results():
    """Closed-loop outcomes as in the README (32/40 vs 8/40: 5 both, 27 only trained, 3 only untrained, 5 neither)
    and held-out errors whose means are 15.6 (true image) and 43.2 px (another episode's image)."""
    trained = np.array([True] * 5 + [True] * 27 + [False] * 3 + [False] * 5)
    untrained = np.array([True] * 5 + [False] * 27 + [True] * 3 + [False] * 5)
    loops = [ClosedLoop(success.astype(float), success.astype(float), success) for success in (trained, untrained)]
    means = {"trained": 15.6, "trained_given_other_episodes_images": 43.2, "untrained": 58.1}
    means |= {"mean_action": 58.6, "agent_stays_put": 46.2}
    heldout = {name: mean + np.array([-3.0, 3.0] * 8) for name, mean in means.items()}
    loss = (np.array([50, 100, 150]), np.array([1.5, 0.7, 0.4]))
    return loss, *loops, np.ones(40), heldout


def test_summary_holds_every_printed_figure():
    """The printed figures are read from summary.json as written (a JSON round trip), paired counts and the loss
    curve included."""
    loss, trained, untrained, expert, heldout = main_job_results()
    summary = json.loads(json.dumps(summarise(loss, trained, untrained, expert, heldout, horizon=8, eval_seed=100_000)))
    loop = summary["closed_loop"]
    assert loop["paired_by_env_seed"] == {
        "both_succeeded": 5, "only_trained_succeeded": 27, "only_untrained_succeeded": 3, "neither_succeeded": 5
    }
    assert (loop["trained"]["successes"], loop["untrained"]["successes"], loop["scripted_expert"]["successes"]) == (32, 8, 40)
    assert loop["trained"]["success_rate_95ci"] == pytest.approx(wilson_interval(32, 40))
    assert summary["loss_curve"] == {"step": [50, 100, 150], "loss": [1.5, 0.7, 0.4]}
    assert list(summary["heldout_action_error_px"]) == ["episodes", "first_actions", *HELDOUT_LABELS]
    assert summary["heldout_action_error_px"]["trained"]["per_episode"] == heldout["trained"].tolist()
    lines = report_lines(summary)
    assert lines == [
        "  closed loop, touched the block within the episode (env seeds 100000-100039):",
        "    trained:   32 of 40 (80%, 95% Wilson interval 65-90%); max reward 0.800 ± 0.400 [0.000, 1.000], "
        "sum reward 0.80 ± 0.40 [0.00, 1.00]",
        "    untrained: 8 of 40 (20%, 95% Wilson interval 10-35%); max reward 0.200 ± 0.400 [0.000, 1.000], "
        "sum reward 0.20 ± 0.40 [0.00, 1.00]",
        "    expert:    40 of 40 (100%, 95% Wilson interval 91-100%)",
        "    paired by env seed, trained vs untrained: succeeded alone in 27, failed alone in 3, same outcome in 10 "
        "(both succeeded in 5, neither in 5)",
        "  held-out action error (pixels, mean ± std [min, max] over 16 episodes, first 8 actions of each chunk):",
        "    trained:                                           15.6 ± 3.0 [12.6, 18.6]",
        "    trained, each frame given another episode's image: 43.2 ± 3.0 [40.2, 46.2]",
        "    untrained:                                         58.1 ± 3.0 [55.1, 61.1]",
        "    baseline: mean action:                             58.6 ± 3.0 [55.6, 61.6]",
        "    baseline: agent stays put:                         46.2 ± 3.0 [43.2, 49.2]",
    ]


def test_learning_figure_shows_counts_intervals_the_image_control_and_the_baselines():
    loss, trained, untrained, expert, heldout = main_job_results()
    frames = np.arange(20.0)
    episode = OfflineError(heldout["trained"], np.stack([frames * 10, 300 - frames], 1), np.stack([frames * 11, 310 - frames], 1))
    mean_action = np.array([400.0, 120.0])  # far above the x and below the y trajectory, as the real means can be
    figure = learning_figure(loss, episode, mean_action, trained, untrained, expert, heldout)
    figure.canvas.draw()
    curve, actions, errors, scores = figure.axes
    texts = {text.get_text() for axes in (errors, scores) for text in axes.texts}
    assert {"32/40\n[65-90%]", "8/40\n[10-35%]", "40/40\n[91-100%]"} <= texts  # counts and 95% Wilson intervals
    assert "paired by env seed (40 episodes):\nonly trained succeeded 27, only untrained 3\nboth 5, neither 5" in texts
    assert {"15.6", "43.2", "58.1", "58.6", "46.2"} <= texts  # the image control and the baselines, each labelled
    assert [label.get_text() for label in errors.get_xticklabels()] == list(HELDOUT_LABELS.values())
    low, high = actions.get_ylim()
    assert low < min(mean_action) and max(mean_action) < high  # the baseline lines are inside the axes ...
    legend = actions.get_legend().get_window_extent()
    assert legend.y1 < actions.get_window_extent().y0  # ... and the legend lies below them, not over them
    for axes in (errors, scores):
        bottom, top = axes.get_ylim()
        assert all(bottom <= text.xy[1] <= top for text in axes.texts if hasattr(text, "xy"))
