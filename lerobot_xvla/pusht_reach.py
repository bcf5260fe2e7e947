"""The main job's PushT variant (see demo_pusht.py): touch the T-shaped block."""

from __future__ import annotations

import numpy as np
import shapely.geometry as sg
from gym_pusht.envs.pusht import PushTEnv, pymunk_to_shapely

from .demo_pusht import BLOCK_CENTRE_LOCAL, BLOCK_CENTRE_RANGE, START_DISTANCE, TOUCH_GAP


class PushTReachEnv(PushTEnv):
    """gym_pusht's PushT whose reward and success are 1 on the step the agent touches the block (ending the
    episode), else 0. A reset with `options["reset_to_state"]` sets that state, as in PushT."""

    def reset(self, seed=None, options=None):
        if options is None or options.get("reset_to_state") is None:
            super(PushTEnv, self).reset(seed=seed)  # gymnasium.Env.reset: seeds self.np_random
            options = {**(options or {}), "reset_to_state": self._start_clear_of_the_block()}
        return super().reset(seed=seed, options=options)

    def step(self, action):
        observation, _, _, truncated, info = super().step(action)
        touching = self.gap_to_block() <= TOUCH_GAP
        info["is_success"] = touching
        return observation, float(touching), touching, truncated, info

    def gap_to_block(self) -> float:
        """Pixels between the agent's disc and the block (0 when they touch)."""
        (disc,) = self.agent.shapes
        block = pymunk_to_shapely(self.block, self.block.shapes)
        return max(0.0, block.distance(sg.Point(*self.agent.position)) - disc.radius)

    def _start_clear_of_the_block(self) -> np.ndarray:
        """(agent x, y, block x, y, angle) from self.np_random: the block anywhere on the table at any angle
        (PushT keeps it within 100..400, near the middle, where a policy that ignores the image would find it
        by heading for the middle), the agent anywhere START_DISTANCE from its centre of mass."""
        random = self.np_random
        angle = random.uniform(-np.pi, np.pi)
        centre = random.uniform(*BLOCK_CENTRE_RANGE, 2)
        # PushT's reset places the block at angle 0, then turns it about its centre of mass: the state's block
        # position is that of the unturned block, whose centre of mass is BLOCK_CENTRE_LOCAL from it.
        block = np.array([*(centre - BLOCK_CENTRE_LOCAL), angle])
        agent = random.uniform(50.0, 462.0, 2)
        while np.linalg.norm(agent - centre) < START_DISTANCE:
            agent = random.uniform(50.0, 462.0, 2)
        return np.concatenate([agent, block])
