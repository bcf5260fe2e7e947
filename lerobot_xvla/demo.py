"""The main job on the embedded tiny default: X-VLA through LeRobot's own factory, offline on a CPU.

    python -m lerobot_xvla.demo [--output-dir outputs/demo]

Builds the tiny X-VLA (`lerobot_xvla.offline`) with a locally written tokenizer, resolves it through
LeRobot's factory exactly as `lerobot-train --policy.type=xvla` does, runs preprocessor -> policy ->
postprocessor on a camera frame, saves the checkpoint and loads it back.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors

from .offline import TINY_ARCHITECTURE, build_word_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args(argv)

    tokenizer = build_word_tokenizer(args.output_dir / "tokenizer")
    config = make_policy_config(
        "xvla",
        **copy.deepcopy(TINY_ARCHITECTURE),
        tokenizer_name=str(tokenizer),
        device="cpu",
        input_features={
            "observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 96, 96)),
            "observation.state": PolicyFeature(FeatureType.STATE, (20,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (20,))},
    )
    policy_cls = get_policy_class(config.type)
    policy = policy_cls(config)
    preprocessor, postprocessor = make_pre_post_processors(config)
    print(f"policy: {policy_cls.__module__}.{policy_cls.__name__}, {sum(p.numel() for p in policy.parameters()):,} parameters")

    observation = {
        "observation.images.front": torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8),
        "observation.state": torch.zeros(20),
        "task": "pick up the red cube",
    }
    action = postprocessor(policy.select_action(preprocessor(observation)))
    print(f"first action of the chunk: {[round(v, 3) for v in action[0].tolist()]}")

    checkpoint = args.output_dir / "checkpoint"
    policy.save_pretrained(checkpoint)
    preprocessor.save_pretrained(checkpoint)
    postprocessor.save_pretrained(checkpoint)
    reloaded = policy_cls.from_pretrained(checkpoint)
    print(f"checkpoint: {checkpoint.resolve()} (reloaded: {type(reloaded).__name__}, action mode {reloaded.config.action_mode})")


if __name__ == "__main__":
    main()
